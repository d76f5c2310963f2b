"""The weight-space Hessian with inputs that have a mean (issue 14, item 4): ``xi ~ N(m u,
Sigma)``, the mean direction ``u`` one more column of the span block.

Reference: the Hessian of the loss ``F(W) = E[(sum_i g(x~_i) - sum_n g(y_n))^2] / 2`` in
all ``K N`` coordinates of ``W = J / sqrt(N)`` at ``N = 12`` (two eigenspaces of 6
directions, the mean along the first direction of the second), by Monte Carlo over explicit
input vectors with the second derivatives written out by hand -- batch norm's population
statistics ``mean_i = m W_i . u`` and ``var_i = W_i Lambda W_i^T`` differentiated twice --
against the reduced spectrum (span block once, each eigenspace's complement block ``N_l -
rank_l`` times) at a generic point of the cone; for ``batchnorm_affine`` over ``(W, gamma,
beta)``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import erf

from framework import SpecificationError, TeacherStudent, theory
from framework.manager import get_normalization
from framework.theory import equilibrium as eq

K = M = 2
N_L = 6  # directions per eigenspace
LAM = np.array([0.5, 2.0])
MEAN, S_DIR = 1.5, np.array([0.4, 0.3])
INPUTS = {"eigenvalues": LAM.tolist(), "fractions": [0.5, 0.5], "mean": MEAN,
          "direction": S_DIR.tolist(), "mean_space": 1}
C = N_L  # the mean direction's coordinate: the first of eigenspace 1


def _g(u):
    return erf(u / np.sqrt(2.0))


def _gp(u):
    return np.sqrt(2.0 / np.pi) * np.exp(-0.5 * u * u)


def _point():
    """Student weights W (K, 12) at a generic point and a teacher with B_l B_l^T = f_l T,
    B . u = s exactly (the model's per-eigenspace teacher)."""
    model = TeacherStudent(K, M, inputs=INPUTS)
    T = np.asarray(model.T, dtype=float)
    B = np.zeros((M, 2 * N_L))
    B[:, :M] = np.linalg.cholesky(0.5 * T)
    B[:, C] = S_DIR
    B[:, C + 1:C + 1 + M] = np.linalg.cholesky(0.5 * T - np.outer(S_DIR, S_DIR))
    W = 0.4 * np.random.default_rng(1).standard_normal((K, 2 * N_L))
    return model, W, B


GAMMA, BETA = np.array([1.2, 0.8]), np.array([0.1, -0.2])  # batchnorm_affine's


def _monte_carlo_hessian(W, B, norm, samples=400_000, batches=8):
    """Mean and standard error of the eigenvalues of the Monte Carlo Hessian (batches);
    ``batchnorm_affine``: over ``(W, gamma, beta)`` at ``GAMMA``, ``BETA``."""
    lc = np.repeat(LAM, N_L)
    n = W.shape[1]
    affine = norm == "batchnorm_affine"
    mats = []
    for bidx in range(batches):
        xi = np.random.default_rng(100 + bidx).standard_normal((samples // batches, n))
        xi *= np.sqrt(lc)
        xi[:, C] += MEAN
        zeta = xi.copy()
        zeta[:, C] -= MEAN  # xi - m u
        if norm.startswith("batchnorm"):  # z_i = W_i zeta / sigma_i, sigma_i^2 = W_i Lambda W_i^T
            a = zeta @ W.T
            sig = np.sqrt((W**2 * lc).sum(1))
            w = lc * W
            z = a / sig
            v = [zeta / sig[i] - a[:, i:i + 1] * w[i] / sig[i] ** 3 for i in range(K)]
            gam = GAMMA if affine else np.ones(K)
            xt = gam * z + (BETA if affine else 0.0)  # x~_i = gamma_i z_i + beta_i
            if affine:  # d x~_i / d(W_i, gamma_i, beta_i), padded to one length
                v = [np.concatenate([gam[i] * v[i], z[:, i:i + 1], np.ones((len(z), 1))],
                                    axis=1) for i in range(K)]
        else:  # plain: x~ = W xi; meanonly: x~ = W (xi - m u)
            d = xi if norm == "plain" else zeta
            xt = d @ W.T
            v = [d] * K
        e = _g(xt).sum(1) - _g(xi @ B.T).sum(1)
        nv = v[0].shape[1]  # n, or n + 2 with (gamma_i, beta_i)
        H = np.zeros((K, nv, K, nv))
        for i in range(K):
            for k in range(K):
                wgt = _gp(xt[:, i]) * _gp(xt[:, k])
                if i == k:
                    wgt = wgt - e * xt[:, i] * _gp(xt[:, i])  # e g''
                H[i, :, k, :] = (v[i] * wgt[:, None]).T @ v[k] / xi.shape[0]
            if norm.startswith("batchnorm"):  # e g' times the second derivative of x~_i
                cc = e * _gp(xt[:, i]) * (GAMMA[i] if affine else 1.0)
                cz, ca = cc @ zeta / xi.shape[0], cc @ a[:, i] / xi.shape[0]
                H[i, :n, i, :n] += (-(np.outer(cz, w[i]) + np.outer(w[i], cz)) / sig[i] ** 3
                                    - ca * np.diag(lc) / sig[i] ** 3
                                    + 3.0 * ca * np.outer(w[i], w[i]) / sig[i] ** 5)
                if affine:  # d^2 x~_i / dW_i d gamma_i = d z_i / d W_i
                    cross = (e * _gp(xt[:, i])) @ (v[i][:, :n] / gam[i]) / xi.shape[0]
                    H[i, :n, i, n] += cross
                    H[i, n, i, :n] += cross
        mats.append(H.reshape(K * nv, K * nv))
    vals = np.array([np.linalg.eigvalsh(h) for h in mats])
    return np.linalg.eigvalsh(np.mean(mats, axis=0)), vals.std(0, ddof=1) / np.sqrt(batches)


def _spectrum(model, W, B, norm):
    blocks = (slice(0, N_L), slice(N_L, 2 * N_L))
    Q = np.stack([W[:, b] @ W[:, b].T for b in blocks])
    R = np.stack([W[:, b] @ B[:, b].T for b in blocks])
    params = {theory.MEAN_OVERLAP: W[:, C]}
    samples = 1 << 13
    if norm == "batchnorm_affine":  # lambda_min's error 0.010 at 2^13: above accuracy
        params.update(gamma=GAMMA, beta=BETA)
        samples = 1 << 15
    return eq.weight_space_hessian(model, get_normalization(norm), Q, R, params,
                                   quadrature={"samples": samples, "replicates": 8})


@pytest.mark.parametrize("norm", ["plain", "meanonly", "batchnorm", "batchnorm_affine"])
def test_spectrum_against_monte_carlo(norm):
    model, W, B = _point()
    spec = _spectrum(model, W, B, norm)
    # the span: rank 4 of eigenspace 0, the mean column plus rank 4 in eigenspace 1
    assert spec.space_ranks.tolist() == [4, 5] and spec.dim_span == 9
    assert spec.complement_multiplicity(2 * N_L).tolist() == [2, 2, 1, 1]
    mult = spec.complement_multiplicity(2 * N_L)
    values = np.concatenate([spec.span, np.repeat(spec.complement, mult)])
    errors = np.concatenate([spec.span_error, np.repeat(spec.complement_error, mult)])
    order = np.argsort(values)
    values, errors = values[order], errors[order]
    np.testing.assert_array_equal(values, spec.full(2 * N_L))
    ref, ref_err = _monte_carlo_hessian(W, B, norm)
    z = np.abs(values - ref) / np.hypot(errors, ref_err)
    assert np.max(z) < 5.0, (z, values, ref)
    gaps = np.diff(ref)
    assert np.ptp(ref) > 200 * np.max(ref_err)  # the comparison resolves the spectrum
    assert np.sum(gaps > 5 * np.max(ref_err)) >= 10  # and its structure
    # r is state, not a parameter (the theta block: batchnorm_affine's gamma and beta
    # only); the escape mode's change of r is its u component
    assert spec.theta_names == (("gamma", "beta") if norm == "batchnorm_affine" else ())
    assert spec.escape_block == "span"
    np.testing.assert_allclose(spec.escape_dr, spec.escape_dW[:, C])


def test_escape_mode_changes_the_state_consistently():
    """The escape mode's (dQ_l, dR_l, dr) are the first-order changes of the state
    (Q_l = W_l W_l^T, R_l = W_l Bt_l^T, r = W u) along dW, in the realization."""
    model, W, B = _point()
    spec = _spectrum(model, W, B, "plain")
    X, Bt, dW = spec.X, spec.Bt, spec.escape_dW
    width = X.shape[1] // 2
    for ell in range(2):
        cols = slice(ell * width, (ell + 1) * width)
        np.testing.assert_allclose(
            spec.escape_dQ[ell], X[:, cols] @ dW[:, cols].T + dW[:, cols] @ X[:, cols].T,
            atol=1e-14)
        np.testing.assert_allclose(spec.escape_dR[ell], dW[:, cols] @ Bt[:, cols].T,
                                   atol=1e-14)
    np.testing.assert_allclose(X[:, width], W[:, C], atol=1e-15)  # u: first of block 1
    np.testing.assert_allclose(Bt[:, width], S_DIR, atol=1e-15)
    assert abs(np.linalg.norm(dW) - 1.0) < 1e-12


def test_mean_overlaps_outside_the_cone_are_refused():
    model, W, B = _point()
    blocks = (slice(0, N_L), slice(N_L, 2 * N_L))
    Q = np.stack([W[:, b] @ W[:, b].T for b in blocks])
    R = np.stack([W[:, b] @ B[:, b].T for b in blocks])
    r = 3.0 * np.sqrt(np.diag(Q[1]))  # |r_i| above sqrt(Q_l,ii): no such weights
    with pytest.raises(SpecificationError, match=r"mean overlaps r .* do not fit"):
        eq.weight_space_hessian(model, get_normalization("plain"), Q, R,
                                {theory.MEAN_OVERLAP: r})


def test_analyzers_at_the_plateau_with_a_mean():
    """fixedpoint -> hessian -> escape with a mean (coarse quadrature: the escape analyzer
    re-solves the plateau with it): the plateau is a realizable state (the cone with the
    mean direction), its Hessian has a negative lambda_min with the mean direction in the
    span, and the ODE escapes from it along the Jacobian's unstable mode."""
    from framework import Experiment

    model = TeacherStudent(2, 2, inputs={"eigenvalues": [1.0], "mean": 2.0,
                                         "direction": 0.5})
    quad = {"samples": 1024, "replicates": 8}
    eng = theory.select_engine(model, get_normalization("plain"), quadrature=quad)
    points = eq.find_fixed_points(model, get_normalization("plain"), eta=0.5, engine=eng)
    assert points and all(eq.state_margin(model, fp.Q, fp.R, fp.params) > -1e-9
                          for fp in points)
    # no root of the saturated flow at infinity (|W|^2 ~ 1e5 from the anti-aligned start)
    assert max(float(np.max(fp.Q)) for fp in points) < 10.0
    fp = min(points, key=lambda p: p.eps_g)
    spec = eq.weight_space_hessian(model, get_normalization("plain"), fp.Q, fp.R,
                                   fp.params, engine=eng)
    assert spec.lambda_min < -10 * spec.lambda_min_error
    assert spec.dim_span == spec.space_ranks[0] and spec.escape_dr is not None
    mult = spec.complement_multiplicity(100)
    assert spec.span.size + int(mult.sum()) == 2 * 100  # all K N eigenvalues
    ds = Experiment(model=model, normalization="plain", eta=0.5, analyzers=[
        {"name": "escape", "alpha_max": 600.0, "n_points": 61, "quadrature": quad}]).run()[
        "escape"]
    assert bool(ds.escaped) and 50.0 < float(ds.alpha_escape) < 600.0
    assert abs(float(ds.eps_g[0]) / float(ds.eps_plateau) - 1.0) < 0.01
    assert "mean_overlap" in ds and "unstable_dmean_overlap" in ds


def test_hessian_analyzer_at_given_order_parameters_with_a_mean():
    from framework import Experiment, OrderParameters

    model = TeacherStudent(2, 2, inputs={"eigenvalues": [1.0], "mean": 2.0,
                                         "direction": 0.5})
    at = OrderParameters(np.array([[0.5, 0.1], [0.1, 0.4]]),
                         np.array([[0.3, 0.1], [0.0, 0.2]]), np.eye(2))
    ds = Experiment(model=model, normalization="plain", eta=0.5, init_N=1000,
                    analyzers=[{"name": "hessian", "at": at}]).run()["hessian"]
    # u joins the span (rank 4 of (W, B) plus u); every one of the K N eigenvalues counted
    assert ds.dim_span.values.tolist() == [5] and int(ds.multiplicity.sum()) == 2 * 1000
    np.testing.assert_allclose(ds.mean_overlap.values, 0.0)  # 'at': r = 0
    assert "escape_dmean_overlap" in ds


def test_damped_newton_converges_with_broyden_steps():
    """The fallback root search of fixed points with a mean: Newton with backtracking and
    Broyden updates between finite-difference Jacobians reaches a known root to 1e-13,
    also where the function has no values beyond a boundary (AccuracyError: not a step),
    and gives up (None) where it has none at the start."""
    calls = []

    def f(x):
        calls.append(1)
        if x[0] <= 0.0:
            raise theory.AccuracyError("no value beyond the boundary")
        return np.array([np.log(x[0]) - 0.5 * np.log(2.0), x[1] - 0.5 * x[0] + 0.1 * x[1] ** 3
                         - 0.1 * 0.5 ** 1.5])

    # Newton's full first step from x0 = 5 lands at x0 = -1.3: backtracked
    x = eq._damped_newton(f, np.array([5.0, -1.0]))
    assert x is not None
    np.testing.assert_allclose(x, [np.sqrt(2.0), np.sqrt(0.5)], atol=1e-13)
    assert len(calls) < 100  # 2 x 2 finite differences per Jacobian, few of them
    assert eq._damped_newton(lambda y: np.full(2, np.nan), np.ones(2)) is None


@pytest.mark.parametrize("with_mean", [False, True])
def test_weight_norm_hessian_with_structured_inputs_against_monte_carlo(with_mean):
    """Weight normalization under a spread spectrum, centred and with a mean: its
    statistic is of the weights, |W_i|^2 = sum_l Q_l,ii, not of the pre-activations (and
    blind to the mean). The Hessian over (W, g) against central differences of the Monte
    Carlo gradient (common inputs, written out by hand: x~_i = g_i W_i . xi / |W_i|) in
    all K N + K coordinates at N = 12."""
    if with_mean:
        model, W, B = _point()
        n = 2 * N_L
    else:
        model = TeacherStudent(K, M, inputs={"eigenvalues": LAM.tolist(),
                                             "fractions": [0.5, 0.5]})
        T = np.asarray(model.T, dtype=float)
        n = 2 * N_L
        B = np.zeros((M, n))
        B[:, :M] = np.linalg.cholesky(0.5 * T)
        B[:, N_L:N_L + M] = np.linalg.cholesky(0.5 * T)
        W = 0.4 * np.random.default_rng(1).standard_normal((K, n))
    g = np.array([1.3, 0.7])
    lc = np.repeat(LAM, N_L)

    def grad(Wv, gv, xi):
        nrm = np.sqrt((Wv**2).sum(1))
        a = xi @ Wv.T
        z = a / nrm
        xt = gv * z
        e = _g(xt).sum(1) - _g(xi @ B.T).sum(1)
        c = e[:, None] * _gp(xt)  # d loss / d x~
        dW = [(c[:, i:i + 1] * gv[i] * (xi / nrm[i] - a[:, i:i + 1] * Wv[i] / nrm[i] ** 3))
              .mean(0) for i in range(K)]
        return np.concatenate([np.ravel(dW), (c * z).mean(0)])

    v0 = np.concatenate([W.ravel(), g])
    h = 1e-5
    mats = []
    for b in range(4):
        xi = np.random.default_rng(200 + b).standard_normal((100_000, n)) * np.sqrt(lc)
        if with_mean:
            xi[:, C] += MEAN
        H = np.empty((v0.size, v0.size))
        for j in range(v0.size):
            e = np.zeros(v0.size)
            e[j] = h
            hi, lo = v0 + e, v0 - e
            H[j] = (grad(hi[:-K].reshape(K, n), hi[-K:], xi)
                    - grad(lo[:-K].reshape(K, n), lo[-K:], xi)) / (2 * h)
        mats.append(0.5 * (H + H.T))
    vals = np.array([np.linalg.eigvalsh(m) for m in mats])
    ref, ref_err = np.linalg.eigvalsh(np.mean(mats, axis=0)), vals.std(0, ddof=1) / 2.0
    blocks = (slice(0, N_L), slice(N_L, n))
    Q = np.stack([W[:, s] @ W[:, s].T for s in blocks])
    R = np.stack([W[:, s] @ B[:, s].T for s in blocks])
    params = {"g": g, **({theory.MEAN_OVERLAP: W[:, C]} if with_mean else {})}
    samples = 1 << (15 if with_mean else 13)  # lambda_min's error 0.018 at 2^13 with it
    spec = eq.weight_space_hessian(model, get_normalization("weightnorm"), Q, R, params,
                                   quadrature={"samples": samples, "replicates": 8})
    assert spec.theta_names == ("g",)
    assert spec.space_ranks.tolist() == ([4, 5] if with_mean else [4, 4])
    mult = spec.complement_multiplicity(n)
    values = np.concatenate([spec.span, np.repeat(spec.complement, mult)])
    errors = np.concatenate([spec.span_error, np.repeat(spec.complement_error, mult)])
    order = np.argsort(values)
    z = np.abs(values[order] - ref) / np.hypot(errors[order], ref_err)
    assert np.max(z) < 5.0, (z, values[order], ref)
    assert np.ptp(ref) > 100 * np.max(ref_err)
