"""The converged phase in deviation variables (framework.theory._tail): eps_g accurate to
1e-6 relative down to 1e-10 and beyond, never negative (issue: silent wrong values)."""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest

from framework import Experiment, TeacherStudent
from framework.theory import _kernels, _tail


def _realization(K: int, scale: float, seed: int, N: int = 60):
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((K, N)) * np.sqrt(rng.uniform(0.5, 1.5, (K, 1)))
    J = B + scale * rng.standard_normal((K, N))
    return J, B


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("noise,second_order,batch", [(0.0, True, 1), (0.1, True, 3),
                                                      (0.0, False, 1)])
def test_deviation_rhs_is_the_ode_in_other_coordinates(K, noise, second_order, batch):
    # 4 Gauss-Legendre nodes in t: rounding for |J - B| / |B| <= 0.01 (the tail starts at
    # eps_g < 1e-5, i.e. ~3e-3); the node error at 0.05 is below 1e-15 too
    for scale in (0.05, 0.01):
        J, B = _realization(K, scale, 7)
        N = J.shape[1]
        Q, R, T = J @ J.T / N, J @ B.T / N, B @ B.T / N
        E, D = R - T, (J - B) @ (J - B).T / N
        dQ, dR = _kernels.ode_rhs(Q, R, T, eta=0.7, noise_var=noise,
                                  second_order=second_order, batch_size=batch)
        dE, dD, eps = _tail.deviation_rhs(T, E, D, eta=0.7, noise_var=noise,
                                          second_order=second_order, batch_size=batch)
        np.testing.assert_allclose(dE, dR, rtol=0, atol=1e-15)
        np.testing.assert_allclose(dD, dQ - dR - dR.T, rtol=0, atol=2e-15)
        assert eps == pytest.approx(_kernels.generalization_error(Q, R, T, noise_var=noise),
                                    rel=0, abs=1e-15)


def test_compiled_moments_equal_the_reference():
    J, B = _realization(3, 0.2, 1)
    N = J.shape[1]
    T, E, D = B @ B.T / N, (J - B) @ B.T / N, (J - B) @ (J - B).T / N
    for noise in (0.0, 0.05):
        ref = _tail._moments_reference(T, E, D, noise, True)
        got = _tail._moments(T, E, D, noise, True)
        for a, b in zip(ref, got, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-17)


def _mp_reference(J: np.ndarray, B: np.ndarray, eta: str):
    """(eps_g, dE/dalpha, dD/dalpha) in 50-digit arithmetic from the textbook
    Saad-Solla integrals at the exact order parameters of the realization."""
    mp.mp.dps = 50
    K, N = J.shape
    Jm, Bm = mp.matrix(J.tolist()), mp.matrix(B.tolist())

    def dot(X, i, Y, j):
        return mp.fsum(X[i, c] * Y[j, c] for c in range(N)) / N

    P = 2 * K
    rows = [(Jm, i) for i in range(K)] + [(Bm, n) for n in range(K)]
    C = [[dot(*rows[a], *rows[b]) for b in range(P)] for a in range(P)]
    w = [-1] * K + [1] * K

    def I3(a, b, c):
        L3 = (1 + C[a][a]) * (1 + C[c][c]) - C[a][c] ** 2
        return 2 / mp.pi / mp.sqrt(L3) * (C[b][c] * (1 + C[a][a]) - C[a][b] * C[a][c]) / (
            1 + C[a][a])

    def I4(a, b, c, d):
        L4 = (1 + C[a][a]) * (1 + C[b][b]) - C[a][b] ** 2
        L0 = (L4 * C[c][d] - C[b][c] * C[b][d] * (1 + C[a][a])
              - C[a][c] * C[a][d] * (1 + C[b][b]) + C[a][b] * C[a][c] * C[b][d]
              + C[a][b] * C[a][d] * C[b][c])
        L1 = (L4 * (1 + C[c][c]) - C[b][c] ** 2 * (1 + C[a][a])
              - C[a][c] ** 2 * (1 + C[b][b]) + 2 * C[a][b] * C[a][c] * C[b][c])
        L2 = (L4 * (1 + C[d][d]) - C[b][d] ** 2 * (1 + C[a][a])
              - C[a][d] ** 2 * (1 + C[b][b]) + 2 * C[a][b] * C[a][d] * C[b][d])
        return 4 / mp.pi**2 / mp.sqrt(L4) * mp.asin(L0 / mp.sqrt(L1 * L2))

    e = mp.mpf(eta)
    dR = [[e * mp.fsum(w[c] * I3(i, K + n, c) for c in range(P)) for n in range(K)]
          for i in range(K)]
    dQ = [[e * mp.fsum(w[c] * (I3(i, k, c) + I3(k, i, c)) for c in range(P))
           + e**2 * mp.fsum(w[c] * w[d] * I4(i, k, c, d) for c in range(P) for d in range(P))
           for k in range(K)] for i in range(K)]
    eps = mp.fsum(w[a] * w[b] * mp.asin(C[a][b] / mp.sqrt((1 + C[a][a]) * (1 + C[b][b])))
                  for a in range(P) for b in range(P)) / mp.pi
    E = [[C[i][K + n] - C[K + i][K + n] for n in range(K)] for i in range(K)]
    D = [[C[i][j] - C[i][K + j] - C[j][K + i] + C[K + i][K + j] for j in range(K)]
         for i in range(K)]
    dD = [[dQ[i][j] - dR[i][j] - dR[j][i] for j in range(K)] for i in range(K)]

    def f(A):
        return np.array([[float(x) for x in r] for r in A])

    T = f([[C[K + a][K + b] for b in range(K)] for a in range(K)])
    return float(eps), f(dR), f(dD), T, f(E), f(D)


@pytest.mark.parametrize("scale", [1e-5, 1e-6])
def test_deviation_formulation_against_50_digit_arithmetic(scale):
    """At eps_g ~ 1e-11 and 1e-13 the closed form at (Q, R) has lost 1e-7 and 1e-4
    relative; the deviation formulation keeps rounding accuracy."""
    J, B = _realization(2, scale, 3, N=30)
    eps, dR, dD, T, E, D = _mp_reference(J, B, "0.5")
    dE_t, dD_t, eps_t = _tail.deviation_rhs(T, E, D, eta=0.5)
    assert eps_t == pytest.approx(eps, rel=1e-13)
    np.testing.assert_allclose(dE_t, dR, rtol=0, atol=1e-13 * np.abs(dR).max())
    np.testing.assert_allclose(dD_t, dD, rtol=0, atol=1e-13 * np.abs(dD).max())
    N = J.shape[1]
    std = _kernels.generalization_error(J @ J.T / N, J @ B.T / N, B @ B.T / N)
    assert abs(std - eps) / eps > 1e-9  # what the deviation variables avoid


def _dynamics(K, eta, alpha_max, **model):
    exp = Experiment(TeacherStudent(K=K, M=K, **model), eta=eta, seed=0,
                     analyzers=[{"name": "dynamics", "alpha_max": alpha_max,
                                 "n_points": 200}])
    return exp.run()["dynamics"], exp


@pytest.mark.parametrize("K,eta", [(2, 0.5), (3, 1.0)])
def test_late_eps_g_accurate_and_never_negative(K, eta):
    ds, exp = _dynamics(K, eta, 4000.0)
    eps = ds.eps_g.values
    assert np.all(eps >= 0.0)
    assert "deviation" in ds.attrs["eps_g_method"]
    assert "rtol = 1e-10" in ds.attrs["eps_g_method"]
    # reference: the same tail at rtol 1e-13, followed by direct integration 10 decades
    # further before the linear flow takes over
    T = np.asarray(exp.model.T, dtype=float)
    ref = _tail.refine_tail(ds.alpha.values, ds.Q.values, ds.R.values,
                            np.where(ds.alpha.values < _alpha_start(ds), 1.0, 0.0), T,
                            eta=eta, rtol=1e-13, floor=1e-30)
    assert not isinstance(ref, str)
    got = eps[ref.start:]
    ok = ref.eps_g > 1e-250
    assert np.any(ref.eps_g[ok] < 1e-10) and np.any(ref.eps_g[ok] < 1e-30)
    rel = np.abs(got[ok] - ref.eps_g[ok]) / ref.eps_g[ok]
    assert rel.max() < 1e-6, rel.max()


def _alpha_start(ds) -> float:
    text = ds.attrs["eps_g_method"]
    return float(text.split("up to alpha = ")[1].split(";")[0])


def test_overlap_with_the_closed_form_and_permuted_teachers():
    """Where both are accurate (eps_g ~ 1e-6) the tail continues the closed form; a
    student that learns the other teacher (a permuted matching) is refined alike."""
    ds, exp = _dynamics(2, 0.5, 600.0)
    a, Q, R, eps = ds.alpha.values, ds.Q.values, ds.R.values, ds.eps_g.values
    T = np.asarray(exp.model.T, dtype=float)
    tail = _tail.refine_tail(a, Q, R, np.maximum(eps, 0), T, eta=0.5)
    assert not isinstance(tail, str)
    j = tail.start
    # the reference at rtol 1e-13: at 1e-12 its own integration error reached 3.5e-6
    # relative at eps_g = 1.9e-7 on some machines (6e-8 at 1e-13)
    plain = _kernels.integrate_diagonal_scale(Q[j], R[j], T, eta=0.5, alpha=a[j:],
                                              rtol=1e-13, atol=1e-15)
    window = (plain.eps_g > 1e-7) & (plain.eps_g < 1e-5)
    assert window.sum() >= 3
    np.testing.assert_allclose(tail.eps_g[window], plain.eps_g[window], rtol=1e-6)
    swap = [1, 0]
    tail_p = _tail.refine_tail(a, Q, R[:, :, swap], np.maximum(eps, 0), T[np.ix_(swap, swap)],
                               eta=0.5)
    assert not isinstance(tail_p, str)
    np.testing.assert_allclose(tail_p.eps_g, tail.eps_g, rtol=1e-12, atol=0)


def test_no_refinement_says_why():
    ds, _ = _dynamics(2, 0.5, 50.0)
    assert "never fell below" in ds.attrs["eps_g_method"]
    ds, _ = _dynamics(2, 0.5, 2000.0, noise=0.01)
    assert ds.attrs["eps_g_method"].startswith("closed form at the integrated")
    assert np.all(ds.eps_g.values > 0)


@pytest.mark.parametrize("K", [2, 3])
def test_linear_flow_in_eigenmodes(K):
    """The linear flow propagated in the eigenbasis of each block (at every report time
    directly) against matrix exponentials row to row where those are accurate (eps_g >
    1e-100 on a log-spaced grid; deeper, their rounding compounds: 2.7e-8 at 1e-185,
    7e-7 at 1e-220), and for K = 2 against 600-digit arithmetic at eps_g ~ 3e-220."""
    lin = _tail._LinearTail(np.eye(K), eta=0.5, batch_size=1, second_order=True)
    rng = np.random.default_rng(K)
    E0 = 1e-10 * rng.standard_normal((K, K))
    X = 1e-10 * rng.standard_normal((K, K))
    D0 = X @ X.T
    grid = np.geomspace(100.0, 3e4, 120)
    modes = lin._propagate_modes(E0, D0, grid)
    assert modes is not None  # well conditioned here
    ref = lin._propagate_expm(E0, D0, grid)
    early = ref[2] > 1e-100
    assert early.sum() > 50
    np.testing.assert_allclose(modes[2][early], ref[2][early], rtol=1e-10, atol=0)
    np.testing.assert_allclose(modes[0], ref[0], rtol=0, atol=1e-12 * np.abs(ref[0]).max())
    assert np.all(modes[2] >= 0) and modes[2][-1] == 0.0  # below the smallest double
    if K == 2:
        n, j = K * K, 97
        with mp.workdps(600):
            e = E0.ravel()
            z0 = mp.matrix(np.concatenate([np.outer(e, e).ravel(), D0.ravel()]).tolist())
            dt = mp.mpf(grid[j]) - mp.mpf(grid[0])
            zt = mp.expm(mp.matrix(lin.A[n:, n:].tolist()) * dt) * z0
            exact = mp.fsum(mp.mpf(c) * zt[i] for i, c in enumerate(lin.eps_coef[n:]))
            assert 1e-225 < exact < 1e-215
            assert abs((mp.mpf(modes[2][j]) - exact) / exact) < 1e-11
