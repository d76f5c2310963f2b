"""The integrators: Hairer's DOP853 table, the compiled DOP853 with scale kernels, and
the scipy grid solver (``solve_ivp`` with events)."""

from __future__ import annotations

import math
import pathlib
import re

import numpy as np
import pytest

from framework.normalization import ScaleKernels
from framework.theory import _dop853
from framework.theory._integrate import solve_grid
from framework.theory._kernels import HAVE_NUMBA, integrate_diagonal_scale

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# The coefficient table
# --------------------------------------------------------------------------------------


def test_dop853_table_equals_scipy():
    ref = pytest.importorskip("scipy.integrate._ivp.dop853_coefficients")
    assert (_dop853.N_STAGES, _dop853.N_STAGES_EXTENDED, _dop853.INTERPOLATOR_POWER) == (
        ref.N_STAGES, ref.N_STAGES_EXTENDED, ref.INTERPOLATOR_POWER)
    for name in ("A", "B", "C", "D", "E3", "E5"):
        ours, theirs = getattr(_dop853, name), np.asarray(getattr(ref, name))
        assert ours.shape == theirs.shape, name
        np.testing.assert_allclose(ours, theirs, rtol=1e-16, atol=1e-16, err_msg=name)


def test_dop853_table_is_consistent():
    # row sums of A are the nodes; the 8th-order weights sum to 1; the error
    # estimators annihilate constants
    np.testing.assert_allclose(_dop853.A.sum(axis=1), _dop853.C, rtol=0, atol=1e-14)
    assert abs(_dop853.B.sum() - 1.0) < 1e-14
    assert abs(_dop853.E5.sum()) < 1e-14 and abs(_dop853.E3.sum()) < 1e-14


def test_framework_imports_no_private_scipy_module():
    private = re.compile(r"^\s*(from|import)\s+scipy(\.\w+)*\._", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "framework").rglob("*.py")
                 if private.search(p.read_text())]
    assert offenders == []


# --------------------------------------------------------------------------------------
# Compiled DOP853 with the scale kernels of a normalization
# --------------------------------------------------------------------------------------


def bn_scale(Q, gamma):
    return gamma / np.sqrt(np.diagonal(Q))


def bn_jac(Q, gamma):
    K = Q.shape[0]
    J = np.zeros((K, K, K))
    idx = np.arange(K)
    J[idx, idx, idx] = -0.5 * gamma * np.diagonal(Q) ** -1.5
    return J


def small_init(K, M, init_scale, seed):
    J = np.random.default_rng(seed).normal(0.0, init_scale, (K, 10_000))
    return J @ J.T / 10_000, J[:, :M] / 100.0


@pytest.fixture(scope="module")
def bn_kernels():
    numba = pytest.importorskip("numba")

    @numba.njit(cache=False)
    def scale(Q, p):  # s_i = gamma_i / sqrt(Q_ii)
        K = Q.shape[0]
        s = np.empty(K)
        for i in range(K):
            s[i] = p[0, i] / math.sqrt(Q[i, i])
        return s

    @numba.njit(cache=False)
    def jacobian(Q, p):
        K = Q.shape[0]
        J = np.zeros((K, K, K))
        for i in range(K):
            J[i, i, i] = -0.5 * p[0, i] * Q[i, i] ** -1.5
        return J

    @numba.njit(cache=False)
    def parameter_jacobian(Q, p):
        K = Q.shape[0]
        J = np.zeros((1, K, K))
        for i in range(K):
            J[0, i, i] = 1.0 / math.sqrt(Q[i, i])
        return J

    return ScaleKernels(("gamma",), scale, jacobian, parameter_jacobian)


@pytest.mark.skipif(not HAVE_NUMBA, reason="needs numba")
def test_kernels_run_compiled_and_agree_with_scipy(bn_kernels):
    K = M = 2
    Q0, R0 = small_init(K, M, init_scale=0.7, seed=2)
    gamma = np.array([1.3, 0.8])
    p = bn_kernels.pack({"gamma": gamma}, K)
    alpha = np.linspace(0.0, 200.0, 41)
    kw = dict(eta=0.5, batch_size=2, noise_var=0.01, alpha=alpha)
    fast = integrate_diagonal_scale(Q0, R0, np.eye(M), **kw, engine="numba",
                                    kernels=bn_kernels, kernel_params=p)
    auto = integrate_diagonal_scale(Q0, R0, np.eye(M), **kw, kernels=bn_kernels,
                                    kernel_params=p)
    slow = integrate_diagonal_scale(Q0, R0, np.eye(M), lambda Q: bn_scale(Q, gamma),
                                    lambda Q: bn_jac(Q, gamma), **kw, engine="scipy")
    assert (fast.engine, auto.engine, slow.engine) == ("numba", "numba", "scipy")
    assert not fast.diverged and fast.alpha.shape == alpha.shape
    # both runs are DOP853 at rtol = 1e-10, atol = 1e-12 (the compiled one a port of
    # scipy's, steps identical up to rounding): 1e-8 is far above the accumulated
    # local errors and far below any modelling difference
    np.testing.assert_allclose(fast.Q, slow.Q, rtol=0, atol=1e-8)
    np.testing.assert_allclose(fast.R, slow.R, rtol=0, atol=1e-8)
    np.testing.assert_allclose(fast.eps_g, slow.eps_g, rtol=0, atol=1e-8)
    np.testing.assert_array_equal(auto.Q, fast.Q)
    # the kernels really move the dynamics: gamma enters (gamma = 1 differs)
    unit = integrate_diagonal_scale(Q0, R0, np.eye(M), **kw, kernels=bn_kernels,
                                    kernel_params=np.ones((1, K)))
    assert np.abs(unit.eps_g - fast.eps_g).max() > 1e-3


@pytest.mark.skipif(not HAVE_NUMBA, reason="needs numba")
def test_kernels_on_the_scipy_engine(bn_kernels):
    K = M = 2
    Q0, R0 = small_init(K, M, init_scale=0.7, seed=3)
    gamma = np.array([0.9, 1.1])
    alpha = np.linspace(0.0, 50.0, 11)
    kw = dict(eta=0.5, alpha=alpha)
    via_kernels = integrate_diagonal_scale(Q0, R0, np.eye(M), **kw, engine="scipy",
                                           kernels=bn_kernels, kernel_params=gamma[None])
    python = integrate_diagonal_scale(Q0, R0, np.eye(M), lambda Q: bn_scale(Q, gamma),
                                      lambda Q: bn_jac(Q, gamma), **kw, engine="scipy")
    assert via_kernels.engine == "scipy"
    np.testing.assert_allclose(via_kernels.Q, python.Q, rtol=0, atol=1e-12)
    np.testing.assert_allclose(via_kernels.eps_g, python.eps_g, rtol=0, atol=1e-12)


@pytest.mark.skipif(not HAVE_NUMBA, reason="needs numba")
def test_kernel_params_are_checked(bn_kernels):
    Q0, R0 = np.eye(2), np.zeros((2, 2))
    with pytest.raises(ValueError, match=r"kernel_params must have shape .*\(1, 2\).*\(2, 2\)"):
        integrate_diagonal_scale(Q0, R0, np.eye(2), kernels=bn_kernels,
                                 kernel_params=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"kernel_params must have shape.*None"):
        integrate_diagonal_scale(Q0, R0, np.eye(2), kernels=bn_kernels)
    with pytest.raises(ValueError, match="kernel_params needs kernels"):
        integrate_diagonal_scale(Q0, R0, np.eye(2), kernel_params=np.ones((1, 2)))


# --------------------------------------------------------------------------------------
# The scipy grid solver
# --------------------------------------------------------------------------------------

TOL = dict(rtol=1e-10, atol=1e-12)


def test_grid_solver_fills_the_grid():
    # K = 1: y = (Q, u, v) with Q constant and a harmonic oscillator (u, v)
    def fun(t, y):
        return np.array([0.0, y[2], -y[1]])

    alpha = np.linspace(0.0, 10.0, 21)
    sol = solve_grid(fun, np.array([1.0, 1.0, 0.0]), alpha, K=1, max_value=10.0, **TOL)
    assert sol.status == 0 and math.isnan(sol.t_fail) and sol.y.shape == (21, 3)
    np.testing.assert_allclose(sol.y[:, 1], np.cos(alpha), rtol=0, atol=1e-8)


def test_grid_solver_locates_max_value():
    def fun(t, y):  # Q = exp(t)
        return y.copy()

    alpha = np.linspace(0.0, 5.0, 11)
    sol = solve_grid(fun, np.array([1.0]), alpha, K=1, max_value=20.0, **TOL)
    assert sol.status == 2
    assert abs(sol.t_fail - math.log(20.0)) < 1e-8  # the crossing, not a step end
    assert sol.y.shape[0] == 6 and alpha[5] < sol.t_fail  # the grid points before it
    assert np.all(sol.y <= 20.0)


@pytest.mark.parametrize("semidefinite", [False, True])
def test_grid_solver_locates_loss_of_definiteness(semidefinite):
    def fun(t, y):  # Q = [[1, t], [t, 1]]: smallest eigenvalue 1 - t
        return np.array([0.0, 1.0, 1.0, 0.0])

    alpha = np.linspace(0.0, 2.0, 8)
    sol = solve_grid(fun, np.array([1.0, 0.0, 0.0, 1.0]), alpha, K=2, max_value=10.0,
                     semidefinite=semidefinite, **TOL)
    assert sol.status == 3 and sol.y.shape[0] == 4 and alpha[3] < 1.0 < alpha[4]
    assert abs(sol.t_fail - (1.0 + (1e-9 if semidefinite else 0.0))) < 1e-10


def test_grid_solver_initial_state_is_checked():
    sol = solve_grid(lambda t, y: y, np.array([-1.0]), np.array([0.0, 1.0]), K=1,
                     max_value=10.0, **TOL)
    assert sol.status == 3 and sol.y.shape == (0, 1) and sol.t_fail == 0.0
    # the semidefinite criterion accepts a singular Q
    sol = solve_grid(lambda t, y: 0 * y, np.zeros(1), np.array([0.0, 1.0]), K=1,
                     max_value=10.0, semidefinite=True, **TOL)
    assert sol.status == 0 and sol.y.shape == (2, 1)


def _oscillator(t, y):
    return np.array([0.0, y[2], -y[1]])


def test_grid_solver_stop_below_reports_the_first_grid_point_below():
    alpha = np.linspace(0.0, 10.0, 41)
    y0 = np.array([1.0, 1.0, 0.0])
    sol = solve_grid(_oscillator, y0, alpha, K=1, max_value=10.0, eps_g=lambda y: y[1],
                     stop_below=-0.5, **TOL)
    j = int(np.argmax(np.cos(alpha) < -0.5))  # crossing at 2 pi / 3
    assert sol.status == 0 and sol.y.shape[0] == j + 1
    np.testing.assert_allclose(sol.y[:, 1], np.cos(alpha[: j + 1]), rtol=0, atol=1e-8)


def test_grid_solver_stop_below_resumes_if_back_above():
    # eps = cos(t) is below -0.5 on (2 pi / 3, 4 pi / 3) only: no grid point there, so
    # the run goes on to the next downward crossing (2 pi + 2 pi / 3) and stops at 9
    alpha = np.array([0.0, 1.0, 5.0, 9.0, 10.0])
    sol = solve_grid(_oscillator, np.array([1.0, 1.0, 0.0]), alpha, K=1, max_value=10.0,
                     eps_g=lambda y: y[1], stop_below=-0.5, **TOL)
    assert sol.status == 0 and sol.y.shape[0] == 4
    np.testing.assert_allclose(sol.y[:, 1], np.cos(alpha[:4]), rtol=0, atol=1e-8)


def test_grid_solver_stop_below_already_below_at_the_start():
    # the initial point is not a reported point of the criterion: the next one decides
    alpha = np.array([0.0, 0.5, 1.0, 2.0])
    sol = solve_grid(_oscillator, np.array([1.0, 1.0, 0.0]), alpha, K=1, max_value=10.0,
                     eps_g=lambda y: y[1], stop_below=2.0, **TOL)
    assert sol.status == 0 and sol.y.shape[0] == 2


def test_grid_solver_argument_checks():
    with pytest.raises(ValueError, match=r"method must be one of.*'Euler'"):
        solve_grid(_oscillator, np.ones(3), np.array([0.0, 1.0]), K=1, max_value=10.0,
                   method="Euler", **TOL)
    with pytest.raises(ValueError, match="eps_g must be given with stop_below"):
        solve_grid(_oscillator, np.ones(3), np.array([0.0, 1.0]), K=1, max_value=10.0,
                   stop_below=0.1, **TOL)
