"""Closed-form erf integrals and eps_g against Monte Carlo.

Every comparison uses ``|mc - exact| < 5 * stderr + 1e-12`` with ``stderr``
the Monte Carlo standard error of that entry (fixed seed, derandomized
hypothesis), never a hand-tuned tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import erf

from framework.theory._erf import I2, I3, I4, J2, safe_arcsin
from framework.theory._kernels import effective_covariance, generalization_error

N_MC = 300_000
SEED = 20240601
MC_SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


def g(u):
    return erf(u / np.sqrt(2.0))


def g_prime(u):
    return np.sqrt(2.0 / np.pi) * np.exp(-(u**2) / 2.0)


@st.composite
def covariances(draw, min_p=2, max_p=5):
    """Positive definite ``A A^T / P + jitter I`` from a bounded random ``A``."""
    P = draw(st.integers(min_p, max_p))
    A = draw(arrays(np.float64, (P, P), elements=st.floats(-1.5, 1.5)))
    jitter = draw(st.floats(0.01, 0.5))
    return A @ A.T / P + jitter * np.eye(P)


def gaussian_samples(C, n=N_MC, seed=SEED):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, C.shape[0])) @ np.linalg.cholesky(C).T


def mc_outer_mean(X, Y):
    """Mean and standard error of ``X[:, i] * Y[:, j]`` over samples (rows)."""
    n = X.shape[0]
    mean = X.T @ Y / n
    second = (X**2).T @ (Y**2) / n
    stderr = np.sqrt(np.maximum(second - mean**2, 0.0) / (n - 1))
    return mean, stderr


def assert_mc_close(exact, mean, stderr):
    assert exact.shape == mean.shape
    assert np.all(np.isfinite(exact))
    excess = np.abs(mean - exact) - (5.0 * stderr + 1e-12)
    assert np.all(excess < 0), f"worst excess over 5 stderr: {excess.max():.3g}"


def pairwise(A, B):
    """Per-sample outer product flattened: ``(n, p) x (n, q) -> (n, p*q)``."""
    return (A[:, :, None] * B[:, None, :]).reshape(A.shape[0], -1)


@MC_SETTINGS
@given(C=covariances())
def test_I2_monte_carlo(C):
    u = gaussian_samples(C)
    assert_mc_close(I2(C), *mc_outer_mean(g(u), g(u)))


@MC_SETTINGS
@given(C=covariances())
def test_I3_monte_carlo(C):
    P = C.shape[0]
    u = gaussian_samples(C)
    mean, stderr = mc_outer_mean(pairwise(g_prime(u), g(u)), u)  # (a, b) x c
    assert_mc_close(I3(C), mean.reshape(P, P, P), stderr.reshape(P, P, P))


@MC_SETTINGS
@given(C=covariances())
def test_I4_monte_carlo(C):
    P = C.shape[0]
    u = gaussian_samples(C)
    mean, stderr = mc_outer_mean(pairwise(g_prime(u), g_prime(u)), pairwise(g(u), g(u)))
    shape = (P, P, P, P)
    assert_mc_close(I4(C), mean.reshape(shape), stderr.reshape(shape))


@MC_SETTINGS
@given(C=covariances())
def test_J2_monte_carlo(C):
    u = gaussian_samples(C)
    assert_mc_close(J2(C), *mc_outer_mean(g_prime(u), g_prime(u)))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(C=covariances(), data=st.data())
def test_index_subsets_and_symmetries(C, data):
    P = C.shape[0]
    idx = data.draw(st.lists(st.integers(0, P - 1), min_size=1, max_size=P, unique=True))
    full3, full4, fullj = I3(C), I4(C), J2(C)
    np.testing.assert_array_equal(I3(C, idx), full3[idx])
    np.testing.assert_array_equal(I4(C, idx), full4[np.ix_(idx, idx)])
    np.testing.assert_array_equal(J2(C, idx), fullj[np.ix_(idx, idx)])
    np.testing.assert_allclose(full4, full4.transpose(1, 0, 2, 3), rtol=0, atol=1e-15)
    np.testing.assert_allclose(full4, full4.transpose(0, 1, 3, 2), rtol=0, atol=1e-15)
    np.testing.assert_allclose(I2(C), I2(C).T, rtol=0, atol=0)


def test_safe_arcsin_clips_only_rounding():
    assert safe_arcsin(1.0 + 1e-14) == np.pi / 2
    assert safe_arcsin(-1.0 - 1e-14) == -np.pi / 2
    with np.errstate(invalid="ignore"):
        assert np.isnan(safe_arcsin(1.0 + 1e-9))


def test_invalid_shape_rejected():
    with pytest.raises(ValueError, match="square"):
        I2(np.ones((2, 3)))


@MC_SETTINGS
@given(C=covariances(), data=st.data())
def test_generalization_error_monte_carlo(C, data):
    P = C.shape[0]
    K = data.draw(st.integers(1, P - 1))
    s = np.array(data.draw(st.lists(st.floats(0.3, 3.0), min_size=K, max_size=K)))
    noise_var = data.draw(st.floats(0.0, 0.5))
    Q, R, T = C[:K, :K], C[:K, K:], C[K:, K:]
    u = gaussian_samples(C)
    noise = np.random.default_rng(SEED + 1).standard_normal(u.shape[0]) * np.sqrt(noise_var)
    zeta = g(u[:, K:]).sum(axis=1) + noise
    sigma = g(s * u[:, :K]).sum(axis=1)
    loss = 0.5 * (zeta - sigma) ** 2
    mean = np.array(loss.mean())
    stderr = np.array(loss.std(ddof=1) / np.sqrt(loss.size))
    assert_mc_close(np.array(generalization_error(Q, R, T, s, noise_var)), mean, stderr)


def test_effective_covariance_is_scaled_covariance():
    rng = np.random.default_rng(0)
    K, M = 3, 2
    A = rng.normal(size=(K + M, K + M))
    C = A @ A.T
    s = rng.uniform(0.5, 2.0, K)
    D = np.diag(np.concatenate([s, np.ones(M)]))
    np.testing.assert_allclose(
        effective_covariance(C[:K, :K], C[:K, K:], C[K:, K:], s), D @ C @ D, rtol=1e-15
    )
