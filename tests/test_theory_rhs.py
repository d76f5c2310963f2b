"""ODE right-hand side of the diagonal-scale theory and its integrator.

(a) against the expected one-step increment of explicit finite-N online SGD;
(b) Saad & Solla's small-eta symmetric fixed point; (c) invariance of the
symmetric subspace; (d) batch-norm scale invariance and norm conservation;
(e) compiled kernel == numpy reference; plus integration (plateau, engines,
divergence).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import fsolve
from scipy.special import erf

from framework.theory._kernels import (
    drift_moments,
    drift_terms,
    effective_covariance,
    generalization_error,
    integrate_diagonal_scale,
    ode_rhs,
    ode_rhs_reference,
    pack_state,
    stein_matrix,
    unpack_state,
)


def g(u):
    return erf(u / np.sqrt(2.0))


def g_prime(u):
    return np.sqrt(2.0 / np.pi) * np.exp(-(u**2) / 2.0)


# Batch normalization with population statistics and gamma = 1: s_i = Q_ii^(-1/2).
def bn_scale(Q):
    return 1.0 / np.sqrt(np.diag(Q).copy())


def bn_jac(Q):
    K = Q.shape[0]
    jac = np.zeros((K, K, K))
    for i in range(K):
        jac[i, i, i] = -0.5 * Q[i, i] ** -1.5
    return jac


bn_scale_jit = numba.njit(bn_scale)
bn_jac_jit = numba.njit(bn_jac)


def random_order_parameters(K, M, seed, jitter=0.2):
    rng = np.random.default_rng(seed)
    A = rng.uniform(-1.0, 1.0, (K + M, K + M))
    C = A @ A.T / (K + M) + jitter * np.eye(K + M)
    return C[:K, :K], C[:K, K:], C[K:, K:]


def symmetric_point(K, Qd, Qo, Rd, Ro):
    Q = np.full((K, K), Qo)
    np.fill_diagonal(Q, Qd)
    R = np.full((K, K), Ro)
    np.fill_diagonal(R, Rd)
    return Q, R


# --------------------------------------------------------------------------------------
# (a) finite-N online SGD
# --------------------------------------------------------------------------------------


def realise(Q, R, T, N):
    """Weights ``J`` (K x N), ``B`` (M x N) with exactly these overlaps (first P coordinates)."""
    K = Q.shape[0]
    Sigma = np.block([[Q, R], [R.T, T]])
    W = np.zeros((Sigma.shape[0], N))
    W[:, : Sigma.shape[0]] = np.sqrt(N) * np.linalg.cholesky(Sigma)
    return W[:K], W[K:]


def sgd_step(J, B, xi, eta, noise, batchnorm):
    """One explicit online SGD step per row of ``xi``; returns (J', a, x~).

    Plain: ``x~ = x``.  BN (population statistics, gamma = 1):
    ``x~_i = x_i / sqrt(Q_ii)`` with ``Q_ii = |J_i|^2 / N`` from the current
    weights, so ``d x~_i / d J_i = (xi / sqrt N - x_i J_i / (N Q_ii)) / sqrt(Q_ii)``
    and the update is ``J_i += eta * delta~_i * d x~_i / d J_i`` with
    ``delta~_i = (zeta - sigma) g'(x~_i) = -d eps / d x~_i``.
    """
    N = J.shape[1]
    x = xi @ J.T / np.sqrt(N)
    y = xi @ B.T / np.sqrt(N)
    q = np.einsum("ij,ij->i", J, J) / N
    s = 1.0 / np.sqrt(q) if batchnorm else np.ones_like(q)
    xt = s * x
    delta = (g(y).sum(1) + noise - g(xt).sum(1))[:, None] * g_prime(xt)  # (n, K)
    dxt_dJ = xi[:, None, :] / np.sqrt(N)
    if batchnorm:
        dxt_dJ = dxt_dJ - (x / (N * q))[:, :, None] * J[None]
    J_new = J[None] + eta * (delta * s)[:, :, None] * dxt_dJ
    return J_new, delta * s, xt


class Moments:
    """Streaming mean and standard error."""

    def __init__(self):
        self.n, self.s1, self.s2 = 0, 0.0, 0.0

    def add(self, v):
        self.n += v.shape[0]
        self.s1 = self.s1 + v.sum(0)
        self.s2 = self.s2 + (v**2).sum(0)

    @property
    def mean(self):
        return self.s1 / self.n

    @property
    def stderr(self):
        var = np.maximum(self.s2 / self.n - self.mean**2, 0.0) * self.n / (self.n - 1)
        return np.sqrt(var / self.n)


def sgd_increment_statistics(Q, R, T, N, etas, noise_var, batchnorm, n_samples, seed):
    """Monte Carlo of ``N (Q' - Q)``, ``N (R' - R)`` for each eta (common random numbers).

    Also returns the eta^2 coefficient per sample, ``(N dQ(eta2)/eta2 -
    N dQ(eta1)/eta1) / (eta2 - eta1)``, and the finite-N bias bound for it.

    Finite-N bias.  For both rules the increments are, exactly,
    ``N dR = eta a_i (y_n - [BN] x_i R_in / Q_ii)`` and ``N dQ = drift +
    eta^2 a_i a_k v_i.v_k / N`` whose drift averages exactly to the ODE's, and
    ``v_i.v_k / N = 1 + D'_ik / N`` (``v_i = xi`` plain, ``v_i`` = ``xi`` minus its
    component along ``J_i`` for BN).  Averaging the out-of-span part of ``|xi|^2``
    (independent of ``a``) leaves ``E[N dQ] - rhs = eta^2 E[a_i a_k D_ik] / N``
    with ``D = |u|^2 - P`` (plain) or ``D = |u|^2 - P - x~_i^2 - x~_k^2 +
    x~_i x~_k Q_ik / sqrt(Q_ii Q_kk)`` (BN), ``u`` the ``P`` in-span input
    coordinates.  The O(1/N) allowance is ``eta^2 (|m| + 5 se(m)) / N`` with
    ``m`` the sample mean of ``a_i a_k D_ik`` (a 5-sigma bound on |E[a a D]|,
    measured on the simulated process, not taken from the theory).
    """
    K, M = R.shape
    P = K + M
    J, B = realise(Q, R, T, N)
    rng = np.random.default_rng(seed)
    stats = {eta: (Moments(), Moments()) for eta in etas}
    second, aaD = Moments(), Moments()
    qt = Q / np.sqrt(np.outer(np.diag(Q), np.diag(Q)))
    chunk = 4000
    for _ in range(n_samples // chunk):
        xi = rng.standard_normal((chunk, N))
        noise = rng.standard_normal(chunk) * np.sqrt(noise_var)
        per_eta = {}
        for eta in etas:
            J_new, a, xt = sgd_step(J, B, xi, eta, noise, batchnorm)
            dQ = np.einsum("nkj,nlj->nkl", J_new, J_new) - N * Q  # N (Q' - Q)
            dR = np.einsum("nkj,mj->nkm", J_new, B) - N * R
            stats[eta][0].add(dQ)
            stats[eta][1].add(dR)
            per_eta[eta] = dQ / eta
        e1, e2 = etas
        second.add((per_eta[e2] - per_eta[e1]) / (e2 - e1))
        D = (np.sum(xi[:, :P] ** 2, 1) - P)[:, None, None] * np.ones((1, K, K))
        if batchnorm:
            D = D - xt[:, :, None] ** 2 - xt[:, None, :] ** 2 + xt[:, :, None] * xt[:, None, :] * qt
        aaD.add(a[:, :, None] * a[:, None, :] * D)
    bias_coeff = (np.abs(aaD.mean) + 5 * aaD.stderr) / N  # bound on |E[a a D]| / N
    return stats, second, bias_coeff


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
def test_rhs_matches_finite_n_sgd(batchnorm):
    K, M, N = 3, 2, 400
    noise_var = 0.1
    etas = (0.4, 1.2)
    Q, R, T = random_order_parameters(K, M, seed=7)
    if batchnorm:  # norms far from 1 so that the scale matters
        D = np.diag([0.6, 1.5, 2.2])
        Q, R = D @ Q @ D, D @ R
    s, jac = (bn_scale(Q), bn_jac(Q)) if batchnorm else (None, None)
    stats, second, bias_coeff = sgd_increment_statistics(
        Q, R, T, N, etas, noise_var, batchnorm, n_samples=160_000, seed=11
    )
    for eta in etas:
        dQ, dR = ode_rhs(Q, R, T, s, jac, eta=eta, noise_var=noise_var)
        mQ, mR = stats[eta]
        assert np.all(np.abs(mQ.mean - dQ) < 5 * mQ.stderr + eta**2 * bias_coeff + 1e-12)
        assert np.all(np.abs(mR.mean - dR) < 5 * mR.stderr + 1e-12)  # no 1/N term in dR
    # eta^2 coefficient isolated by common random numbers: E[a a^T] (batch size 1).
    rhs = [ode_rhs(Q, R, T, s, jac, eta=eta, noise_var=noise_var)[0] / eta for eta in etas]
    coeff = (rhs[1] - rhs[0]) / (etas[1] - etas[0])
    assert np.all(np.abs(second.mean - coeff) < 5 * second.stderr + bias_coeff + 1e-12)
    assert np.all(np.diag(coeff) > 10 * np.diag(second.stderr))  # the check has teeth


def test_batch_size_divides_second_order_term():
    Q, R, T = random_order_parameters(3, 3, seed=3)
    base = ode_rhs(Q, R, T, eta=0.8, second_order=False)[0]
    full1 = ode_rhs(Q, R, T, eta=0.8, batch_size=1)[0]
    full4 = ode_rhs(Q, R, T, eta=0.8, batch_size=4)[0]
    np.testing.assert_allclose(full4 - base, (full1 - base) / 4, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(ode_rhs(Q, R, T, eta=0.8)[1],
                                  ode_rhs(Q, R, T, eta=0.8, batch_size=4)[1])


# --------------------------------------------------------------------------------------
# (b), (c) symmetric phase
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [2, 3, 4])
def test_saad_solla_small_eta_fixed_point(K):
    Q, R = symmetric_point(K, *(2 * [1 / (2 * K - 1)]), *(2 * [1 / np.sqrt(K * (2 * K - 1))]))
    dQ, dR = ode_rhs(Q, R, np.eye(K), eta=1.0, second_order=False)
    assert np.abs(dQ).max() < 1e-12
    assert np.abs(dR).max() < 1e-12


@pytest.mark.parametrize("K", [2, 3, 4, 5])
@pytest.mark.parametrize("rhs", [ode_rhs, ode_rhs_reference], ids=["fast", "reference"])
def test_symmetric_subspace_is_invariant(K, rhs):
    Q, R = symmetric_point(K, 0.7, 0.25, 0.45, 0.12)
    dQ, dR = rhs(Q, R, np.eye(K), eta=0.6, noise_var=0.05)
    off = ~np.eye(K, dtype=bool)
    for block in (dQ, dR):
        assert np.ptp(np.diag(block)) < 1e-14
        assert np.ptp(block[off]) < 1e-14
    np.testing.assert_array_equal(dQ, dQ.T)


# --------------------------------------------------------------------------------------
# (d) batch normalization
# --------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    K=st.integers(1, 4),
    M=st.integers(1, 4),
    d=arrays(np.float64, 4, elements=st.floats(0.2, 5.0)),
)
def test_batchnorm_scale_invariance_and_norm_conservation(seed, K, M, d):
    Q, R, T = random_order_parameters(K, M, seed)
    D = np.diag(d[:K])
    Q2, R2 = D @ Q @ D, D @ R
    e1 = generalization_error(Q, R, T, bn_scale(Q), noise_var=0.1)
    e2 = generalization_error(Q2, R2, T, bn_scale(Q2), noise_var=0.1)
    assert abs(e1 - e2) < 1e-12
    for rhs in (ode_rhs, ode_rhs_reference):
        dQ, _ = rhs(Q2, R2, T, bn_scale(Q2), bn_jac(Q2), eta=0.7, second_order=False)
        assert np.abs(np.diag(dQ)).max() < 1e-14
        dQ2, _ = rhs(Q2, R2, T, bn_scale(Q2), bn_jac(Q2), eta=0.7)
        assert np.all(np.diag(dQ2) > 0)  # the norms only grow, through eta^2


# --------------------------------------------------------------------------------------
# (e) fast kernel == reference
# --------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    K=st.integers(1, 6),
    M=st.integers(1, 5),
    with_scale=st.booleans(),
    with_jac=st.booleans(),
    second_order=st.booleans(),
    batch_size=st.integers(1, 8),
    noise_var=st.floats(0.0, 1.0),
    eta=st.floats(0.01, 3.0),
)
def test_fast_rhs_equals_reference(seed, K, M, with_scale, with_jac, second_order, batch_size,
                                   noise_var, eta):
    Q, R, T = random_order_parameters(K, M, seed)
    rng = np.random.default_rng(seed + 1)
    s = rng.uniform(0.3, 3.0, K) if with_scale else None
    jac = rng.normal(size=(K, K, K)) if with_jac else None
    kw = dict(eta=eta, batch_size=batch_size, noise_var=noise_var, second_order=second_order)
    fast = ode_rhs(Q, R, T, s, jac, **kw)
    ref = ode_rhs_reference(Q, R, T, s, jac, **kw)
    for a, b in zip(fast, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * max(1.0, np.abs(b).max()))
    np.testing.assert_array_equal(fast[0], fast[0].T)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), K=st.integers(1, 6), M=st.integers(1, 5),
       with_scale=st.booleans(), with_jac=st.booleans(), second_order=st.booleans(),
       noise_var=st.floats(0.0, 1.0), weighted=st.booleans())
def test_compiled_drift_terms_equal_reference(seed, K, M, with_scale, with_jac, second_order,
                                              noise_var, weighted):
    """drift_terms (compiled moments and Stein matrix, the structured-input ODE's path)
    == drift_moments and stein_matrix (numpy on the I3/I4 closed forms)."""
    Q, R, T = random_order_parameters(K, M, seed)
    rng = np.random.default_rng(seed + 2)
    s = rng.uniform(0.3, 3.0, K) if with_scale else None
    jac = rng.normal(size=(K, K, K)) if with_jac else None
    w = np.concatenate([-rng.uniform(0.2, 2.0, K), rng.uniform(0.2, 2.0, M)]) if weighted \
        else None
    fast = drift_terms(Q, R, T, s, jac, noise_var, second_order, w)
    ref = (*drift_moments(Q, R, T, s, jac, noise_var, second_order, w),
           stein_matrix(Q, R, T, s, w))
    for a, b in zip(fast, ref, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * max(1.0, np.abs(b).max()))
    if not second_order:
        assert not np.any(fast[2])


def test_plain_equals_unit_scale_without_jacobian():
    Q, R, T = random_order_parameters(3, 2, seed=5)
    a = ode_rhs(Q, R, T, eta=0.5)
    b = ode_rhs(Q, R, T, np.ones(3), np.zeros((3, 3, 3)), eta=0.5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------
# Integration
# --------------------------------------------------------------------------------------


def small_init(K, M, init_scale=1e-3, N=10_000, seed=0):
    """Order parameters of ``J_ij ~ N(0, init_scale^2)`` against ``B_n = sqrt(N) e_n``."""
    J = np.random.default_rng(seed).normal(0.0, init_scale, (K, N))
    return J @ J.T / N, J[:, :M] / np.sqrt(N)


def symmetric_fixed_point(K, eta):
    """Full-RHS fixed point in the symmetric subspace, from the small-eta one."""

    def residual(p):
        dQ, dR = ode_rhs(*symmetric_point(K, *p), np.eye(K), eta=eta)
        return [dQ[0, 0], dQ[0, 1], dR[0, 0], dR[0, 1]]

    q, r = 1 / (2 * K - 1), 1 / np.sqrt(K * (2 * K - 1))
    p = fsolve(residual, [q, q, r, r], xtol=1e-14)
    assert np.abs(residual(p)).max() < 1e-12
    return symmetric_point(K, *p)


def test_plateau_then_escape():
    K = M = 2
    eta = 0.5
    Q0, R0 = small_init(K, M)
    alpha = np.linspace(0.0, 1000.0, 1001)
    res = integrate_diagonal_scale(Q0, R0, np.eye(K), eta=eta, alpha=alpha)
    assert not res.diverged and np.isnan(res.alpha_diverged)
    assert res.alpha.shape == (1001,)
    assert res.Q.shape == (1001, K, K) and res.R.shape == (1001, K, M)
    eps_star = generalization_error(*symmetric_fixed_point(K, eta), np.eye(K))
    plateau = res.eps_g[(res.alpha >= 50) & (res.alpha <= 150)]
    assert np.abs(plateau - eps_star).max() < 1e-4 * eps_star  # within 0.01 %
    assert res.eps_g[0] > 20 * eps_star  # starts far above the plateau
    assert res.eps_g[-1] < 1e-9  # and finally learns the teacher
    # monotone decay after it, down to where eps_g (a cancellation of O(1) terms) is rounding
    decaying = res.eps_g[(res.alpha >= 150) & (res.eps_g > 1e-9)]
    assert decaying.size > 100 and np.all(np.diff(decaying) < 0)


def test_engines_agree_plain():
    Q0, R0 = small_init(3, 3, init_scale=0.3, seed=1)
    alpha = np.linspace(0.0, 300.0, 61)
    kw = dict(eta=0.8, noise_var=0.05, alpha=alpha)
    fast = integrate_diagonal_scale(Q0, R0, np.eye(3), **kw)
    slow = integrate_diagonal_scale(Q0, R0, np.eye(3), **kw, engine="scipy")
    assert (fast.engine, slow.engine) == ("numba", "scipy")
    np.testing.assert_allclose(fast.Q, slow.Q, rtol=0, atol=1e-7)
    np.testing.assert_allclose(fast.R, slow.R, rtol=0, atol=1e-7)
    np.testing.assert_allclose(fast.eps_g, slow.eps_g, rtol=0, atol=1e-8)
    radau = integrate_diagonal_scale(Q0, R0, np.eye(3), **kw, method="Radau", rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(radau.eps_g, fast.eps_g, rtol=0, atol=1e-5)


def test_engines_agree_batchnorm():
    Q0, R0 = small_init(2, 2, init_scale=0.7, seed=2)
    alpha = np.linspace(0.0, 200.0, 41)
    kw = dict(eta=0.5, batch_size=2, alpha=alpha)
    fast = integrate_diagonal_scale(Q0, R0, np.eye(2), bn_scale_jit, bn_jac_jit, **kw)
    slow = integrate_diagonal_scale(Q0, R0, np.eye(2), bn_scale, bn_jac, **kw)
    assert (fast.engine, slow.engine) == ("numba", "scipy")
    np.testing.assert_allclose(fast.Q, slow.Q, rtol=0, atol=1e-7)
    np.testing.assert_allclose(fast.eps_g, slow.eps_g, rtol=0, atol=1e-8)
    # BN: the student norms only grow; eps_g sees the direction only
    assert np.all(np.diff(np.diagonal(fast.Q, axis1=1, axis2=2), axis=0) >= 0)
    eps = [generalization_error(Q, R, np.eye(2), bn_scale(Q))
           for Q, R in zip(fast.Q, fast.R, strict=True)]
    np.testing.assert_allclose(fast.eps_g, eps, rtol=0, atol=1e-14)


@pytest.mark.parametrize("engine", ["numba", "scipy"])
def test_divergence_is_reported(engine):
    Q0, R0 = small_init(2, 2, init_scale=0.3)
    alpha = np.linspace(0.0, 500.0, 101)
    res = integrate_diagonal_scale(Q0, R0, np.eye(2), eta=6.0, alpha=alpha, engine=engine,
                                   max_value=20.0)
    assert res.diverged and res.message == "state exceeded max_value"
    n = res.alpha.size
    assert 0 < n < alpha.size and res.alpha[-1] < res.alpha_diverged
    assert res.Q.shape[0] == res.R.shape[0] == res.eps_g.shape[0] == n
    assert np.all(np.isfinite(res.eps_g)) and np.abs(res.Q).max() <= 20.0


@pytest.mark.parametrize("engine", ["numba", "scipy"])
def test_non_finite_rhs_stops_integration(engine):
    @numba.njit
    def poisoned_scale(Q):  # undefined beyond Q_00 = 0.2: the RHS becomes NaN
        return np.ones(Q.shape[0]) if Q[0, 0] < 0.2 else np.full(Q.shape[0], np.nan)

    fn = poisoned_scale if engine == "numba" else poisoned_scale.py_func
    Q0, R0 = small_init(2, 2, init_scale=0.3)
    res = integrate_diagonal_scale(Q0, R0, np.eye(2), fn, None, eta=0.5,
                                   alpha=np.linspace(0, 200, 41), engine=engine)
    assert res.diverged and res.message == "step size became too small"
    assert res.Q[-1, 0, 0] < 0.2 and res.alpha_diverged > 0


def test_non_positive_definite_start_is_reported():
    Q0 = np.array([[1.0, 2.0], [2.0, 1.0]])
    res = integrate_diagonal_scale(Q0, np.zeros((2, 2)), np.eye(2), eta=0.5, alpha=[0.0, 1.0])
    assert res.diverged and res.message == "Q lost positive definiteness"
    assert res.alpha.size == 0 and res.alpha_diverged == 0.0


def test_pack_roundtrip_and_argument_checks():
    Q, R, _ = random_order_parameters(3, 2, seed=1)
    Q2, R2 = unpack_state(pack_state(Q, R), 3, 2)
    np.testing.assert_array_equal(Q2, Q)
    np.testing.assert_array_equal(R2, R)
    with pytest.raises(ValueError, match="increasing"):
        integrate_diagonal_scale(Q, R, np.eye(2), alpha=[1.0, 0.0])
    with pytest.raises(ValueError, match="method"):
        integrate_diagonal_scale(Q, R, np.eye(2), alpha=[0.0, 1.0], method="Euler")
    with pytest.raises(ValueError, match="numba"):
        integrate_diagonal_scale(Q, R, np.eye(2), bn_scale, bn_jac, alpha=[0.0, 1.0],
                                 engine="numba")
    np.testing.assert_allclose(
        effective_covariance(Q, R, np.eye(2)), np.block([[Q, R], [R.T, np.eye(2)]])
    )
