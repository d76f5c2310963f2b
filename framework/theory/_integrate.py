"""Integration of the order-parameter ODEs on a report grid.

* :func:`solve_grid`: the scipy path, :func:`scipy.integrate.solve_ivp` with
  ``t_eval`` (the report grid) and terminal events for the failures of a state
  (an entry beyond ``max_value``, loss of positive (semi-)definiteness of ``Q``) and
  for ``stop_below`` (``eps_g`` below a threshold). Used by
  :func:`integrate_diagonal_scale` (scipy engine) and by
  :meth:`framework.theory.quadrature.ExpectationEngine.integrate`.
* :func:`integrate_diagonal_scale`: the closed-form ODE of a diagonal-scale
  normalization, on the compiled DOP853 (:mod:`framework.theory._dop853`) or on
  :func:`solve_grid`.

Failure codes (``_STATUS_MESSAGES`` of :mod:`framework.theory._kernels`): 1 non-finite
state, 2 an entry beyond ``max_value``, 3 ``Q`` lost positive definiteness, 4 step size
too small. A failing run keeps the grid points reached before the failure.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.integrate import BDF, DOP853, LSODA, RK45, Radau, solve_ivp

from framework.theory import _dop853
from framework.theory._kernels import (
    _STATUS_MESSAGES,
    HAVE_NUMBA,
    SEMIDEFINITE_TOL,
    _is_jitted,
    _state_status_py,
    generalization_error,
    ode_rhs,
    pack_state,
    unpack_state,
)

__all__ = [
    "GridSolution",
    "StopIntegration",
    "TheoryTrajectory",
    "integrate_diagonal_scale",
    "solve_grid",
]

Array = NDArray[np.float64]
ScaleFn = Callable[[Array], Array]

_SCIPY_METHODS = {"DOP853": DOP853, "RK45": RK45, "LSODA": LSODA, "Radau": Radau, "BDF": BDF}

#: Tolerance of the semidefinite criterion (:data:`framework.theory._kernels.SEMIDEFINITE_TOL`):
#: ``Q`` is accepted while its smallest eigenvalue is above ``-SEMIDEFINITE_TOL * max(1,
#: max |Q|)``.


# --------------------------------------------------------------------------------------
# Grid solver (scipy)
# --------------------------------------------------------------------------------------


class GridSolution(NamedTuple):
    """Result of :func:`solve_grid`.

    Attributes
    ----------
    y : ndarray, shape (n_rows, n)
        States at ``alpha[:n_rows]`` (a prefix of the grid).
    status : int
        0 (success, or stopped by ``stop_below``) or a failure code.
    t_fail : float
        Time at which the failure was detected (NaN on success).
    """

    y: Array
    status: int
    t_fail: float
    message: str = ""


class StopIntegration(Exception):
    """Raised by a right-hand side to end :func:`solve_grid` early at an accepted state,
    keeping the rows reached: ``code`` (a key of ``_STATUS_MESSAGES``) and a message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def definiteness(y: Array, K: int, semidefinite: bool = False) -> float:
    """Continuous margin of ``Q = y[:K*K]`` (symmetrized) to the boundary of the valid set.

    Positive definite (``semidefinite=False``): the smallest eigenvalue of ``Q``.
    Semidefinite: the smallest eigenvalue plus ``SEMIDEFINITE_TOL * max(1, max |Q|)``
    (the criterion of ``ClosedFormEngine._state_status``). Negative when invalid.
    """
    Q = np.asarray(y[: K * K]).reshape(K, K)
    if not np.all(np.isfinite(Q)):
        return -1.0
    lam = float(np.linalg.eigvalsh(0.5 * (Q + Q.T))[0])
    if semidefinite:
        lam += SEMIDEFINITE_TOL * max(1.0, float(np.max(np.abs(Q))))
    return lam


def _terminal(fn: Callable[[float, Array], float]) -> Callable[[float, Array], float]:
    """Mark ``fn`` a terminal event of :func:`solve_ivp` (downward zero crossings)."""
    fn.terminal = True  # type: ignore[attr-defined]
    fn.direction = -1.0  # type: ignore[attr-defined]
    return fn


@functools.cache
def _watched(base: type) -> type:
    """``base`` (a scipy solver class) that registers itself in the list passed as
    ``watch`` and fails a step whose accepted state is non-finite (code 1).

    A non-finite state cannot be an event: an event needs a sign change of a finite
    function inside the step. The registered solver also gives the time of a solver
    failure (``solve_ivp`` does not report it) and the exact end state.
    """

    class Watched(base):
        def __init__(self, fun, t0, y0, t_bound, *, watch: list, **options):
            watch.append(self)
            self.nonfinite = False
            self.stopped: StopIntegration | None = None
            super().__init__(fun, t0, y0, t_bound, **options)

        def _step_impl(self):
            # non-finite rates at an accepted state: scipy's step control would loop
            # forever on a NaN step size, so stop here (code 5)
            f = getattr(self, "f", None)
            if f is not None and not np.all(np.isfinite(f)):
                self.stopped = StopIntegration(5, _STATUS_MESSAGES[5])
                return False, _STATUS_MESSAGES[5]
            try:
                ok, message = super()._step_impl()
            except StopIntegration as stop:
                self.stopped = stop
                return False, stop.message
            if ok and not np.all(np.isfinite(self.y)):
                self.nonfinite = True
                return False, _STATUS_MESSAGES[1]
            return ok, message

    Watched.__name__ = Watched.__qualname__ = f"Watched{base.__name__}"
    return Watched


class _Segment(NamedTuple):
    rows: Array  # (n, dim): states at the grid points reached
    status: int  # failure code, 0 if none
    t_fail: float
    stop: tuple[float, Array] | None  # (t, y) where the stop event fired
    message: str = ""


def _segment(fun, t0, y0, grid, events, stop_index, method, rtol, atol) -> _Segment:
    """One :func:`solve_ivp` run from ``(t0, y0)`` reporting on ``grid`` (all ``> t0``)."""
    watch: list = []
    with np.errstate(all="ignore"):  # trial stages may leave the valid region
        sol = solve_ivp(fun, (t0, grid[-1]), y0, method=_watched(_SCIPY_METHODS[method]),
                        t_eval=grid, events=events, rtol=rtol, atol=atol, watch=watch)
    solver = watch[0]
    rows = np.ascontiguousarray(np.reshape(sol.y, (y0.size, -1)).T)  # sol.y: [] if no row
    if sol.status == 0:
        rows[-1] = solver.y  # the end state itself, not its interpolant
        return _Segment(rows, 0, math.nan, None)
    if sol.status == -1:
        if solver.stopped is not None:
            return _Segment(rows, solver.stopped.code, float(solver.t), None,
                            solver.stopped.message)
        return _Segment(rows, 1 if solver.nonfinite else 4, float(solver.t), None)
    fired = [(float(te[0]), i) for i, te in enumerate(sol.t_events) if te.size]
    t_event, i = min(fired)
    if i == stop_index:
        return _Segment(rows, 0, math.nan, (t_event, np.array(sol.y_events[i][0])))
    return _Segment(rows, 2 + i, t_event, None)


def solve_grid(
    fun: Callable[[float, Array], Array],
    y0: Array,
    alpha: Array,
    *,
    K: int,
    rtol: float,
    atol: float,
    max_value: float,
    method: str = "DOP853",
    semidefinite: bool = False,
    status: Callable[[Array], int] | None = None,
    eps_g: Callable[[Array], float] | None = None,
    stop_below: float | None = None,
) -> GridSolution:
    """Integrate ``dy/dt = fun(t, y)`` from ``alpha[0]`` and report on the grid ``alpha``.

    :func:`scipy.integrate.solve_ivp` with ``t_eval`` and terminal events.

    Parameters
    ----------
    fun : callable ``(t, y) -> dy/dt``
        Right-hand side on the packed state; ``y[:K*K]`` is ``Q`` (row-major).
    y0 : ndarray, shape (n,)
        Initial state at ``alpha[0]``.
    alpha : ndarray, shape (n_t,)
        Strictly increasing report grid.
    K : int
        Number of student units (``Q`` is the leading ``K*K`` block of the state).
    rtol, atol : float
        Tolerances of the solver.
    max_value : float
        Event "state exceeded max_value" (code 2): ``max |y|`` reaches ``max_value``.
    method : {"DOP853", "RK45", "LSODA", "Radau", "BDF"}
        The scipy solver class.
    semidefinite : bool
        Event "Q lost positive definiteness" (code 3): ``False``, the smallest
        eigenvalue of ``Q`` reaches 0; ``True``, it reaches ``-SEMIDEFINITE_TOL *
        max(1, max |Q|)`` (:func:`definiteness`).
    status : callable ``y -> int``, optional
        Failure code of the initial state (0: valid). Default: the criteria above.
    eps_g : callable ``y -> float``, optional
        Generalization error of a state; needed with ``stop_below``.
    stop_below : float, optional
        Stop at the first reported grid point (after ``alpha[0]``) with ``eps_g <
        stop_below``; that point is the last one reported (status 0). A terminal
        event locates the crossing, the run then goes on to the next grid point and
        stops there if ``eps_g`` is still below (else it resumes).

    Returns
    -------
    GridSolution
        ``(y, status, t_fail, message)``: a failure (non-finite state, code 1; an event, codes 2
        and 3, at the time of the located crossing; step-size underflow, code 4) keeps
        the grid points before it; an invalid initial state gives no rows and
        ``t_fail = alpha[0]``; non-finite rates at an accepted state (the initial one
        included: its row alone is kept) stop there (code 5); a
        :class:`StopIntegration` raised by ``fun`` stops with its code and message.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    y0 = np.asarray(y0, dtype=np.float64)
    if method not in _SCIPY_METHODS:
        raise ValueError(f"method must be one of {sorted(_SCIPY_METHODS)}, got {method!r}")
    if stop_below is not None and eps_g is None:
        raise ValueError("eps_g must be given with stop_below, got eps_g=None")
    if status is None:
        def status(y: Array) -> int:
            if not np.all(np.isfinite(y)):
                return 1
            if np.max(np.abs(y)) > max_value:
                return 2
            return 3 if definiteness(y, K, semidefinite) <= 0.0 else 0
    code = int(status(y0))
    if code:
        return GridSolution(np.empty((0, y0.size)), code, float(alpha[0]),
                            _STATUS_MESSAGES[code])
    failures = [
        _terminal(lambda t, y: max_value - float(np.max(np.abs(y)))),  # code 2
        _terminal(lambda t, y: definiteness(y, K, semidefinite)),  # code 3
    ]
    stop_index = len(failures)
    with_stop = failures
    eps_of = eps_g if eps_g is not None else (lambda y: math.inf)  # unused without a stop
    threshold = -math.inf if stop_below is None else float(stop_below)
    if stop_below is not None:
        with_stop = [*failures, _terminal(lambda t, y: eps_of(y) - threshold)]
    rows = [y0[None]]
    t, y, j = float(alpha[0]), y0, 1
    # eps_g already below at the start: the next grid point decides (as after a crossing)
    pending = stop_below is not None and eps_of(y0) < threshold
    while j < alpha.size:
        grid = alpha[j : j + 1] if pending else alpha[j:]
        seg = _segment(fun, t, y, grid, failures if pending else with_stop, stop_index,
                       method, rtol, atol)
        rows.append(seg.rows)
        j += seg.rows.shape[0]
        if seg.status:
            return GridSolution(np.concatenate(rows), seg.status, seg.t_fail,
                                seg.message or _STATUS_MESSAGES[seg.status])
        if pending:  # reached the grid point after the crossing
            if eps_of(seg.rows[-1]) < threshold:
                break
            pending, t, y = False, float(alpha[j - 1]), seg.rows[-1]
        elif seg.stop is not None:
            (t, y), pending = seg.stop, True
        else:
            break
    return GridSolution(np.concatenate(rows), 0, math.nan, _STATUS_MESSAGES[0])


# --------------------------------------------------------------------------------------
# Closed-form integrator of a diagonal-scale normalization
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TheoryTrajectory:
    """Result of :func:`integrate_diagonal_scale`.

    Attributes
    ----------
    alpha : ndarray, shape (n,)
        Output times actually reached (a prefix of the requested grid).
    Q : ndarray, shape (n, K, K)
    R : ndarray, shape (n, K, M)
    eps_g : ndarray, shape (n,)
        Generalization error, output-noise term included.
    diverged : bool
        True if the integration stopped early (see ``message``).
    alpha_diverged : float
        Time at which the failure was detected (NaN if not diverged).
    nfev : int
        Number of right-hand-side evaluations.
    message : str
        Human-readable status.
    engine : str
        ``"numba"`` (compiled DOP853) or ``"scipy"`` (solver class of ``method``).
    """

    alpha: Array
    Q: Array
    R: Array
    eps_g: Array
    diverged: bool
    alpha_diverged: float
    nfev: int
    message: str
    engine: str


def _choose_engine(engine: str, method: str, scale_fn, scale_jac_fn, kernels) -> str:
    if engine not in ("auto", "numba", "scipy"):
        raise ValueError(f"engine must be 'auto', 'numba' or 'scipy', got {engine!r}")
    if method not in _SCIPY_METHODS:
        raise ValueError(f"method must be one of {sorted(_SCIPY_METHODS)}, got {method!r}")
    fns = (scale_fn, scale_jac_fn) if kernels is None else (kernels.scale, kernels.jacobian)
    compilable = (
        HAVE_NUMBA and method == "DOP853" and all(fn is None or _is_jitted(fn) for fn in fns)
    )
    if engine == "numba" and not compilable:
        raise ValueError(
            "engine='numba' needs numba, method='DOP853' and numba-jitted scale functions"
            f" (or scale kernels), got method={method!r}"
        )
    if engine == "auto":
        return "numba" if compilable else "scipy"
    return engine


def _run_scipy(Q0, R0, T, scale_fn, scale_jac_fn, eta, batch_size, noise_var, alpha,
               rtol, atol, second_order, max_value, method):
    K, M = R0.shape
    nfev = 0

    def fun(_t, y):
        nonlocal nfev
        nfev += 1
        Q, R = unpack_state(y, K, M)
        s = None if scale_fn is None else scale_fn(Q)
        jac = None if (scale_fn is None or scale_jac_fn is None) else scale_jac_fn(Q)
        with np.errstate(all="ignore"):  # trial stages may leave the valid region
            dQ, dR = ode_rhs(Q, R, T, s, jac, eta, batch_size, noise_var, second_order)
        return pack_state(dQ, dR)

    sol = solve_grid(fun, pack_state(Q0, R0), alpha, K=K, method=method, rtol=rtol,
                     atol=atol, max_value=max_value, semidefinite=True,
                     status=lambda y: _state_status_py(y, K, max_value))
    Qs, Rs = unpack_state(sol.y, K, M)
    eps = np.array([
        generalization_error(Q, R, T, None if scale_fn is None else scale_fn(Q), noise_var)
        for Q, R in zip(Qs, Rs, strict=True)
    ])
    return sol.y, eps, sol.status, float(sol.t_fail), nfev


def _kernel_functions(kernels, p: Array, scale_fn, scale_jac_fn):
    """Python-callable scale functions for the scipy engine (given ones take precedence)."""
    if scale_fn is None:
        def scale_fn(Q):
            return kernels.scale(np.ascontiguousarray(Q, dtype=np.float64), p)
    if scale_jac_fn is None:
        def scale_jac_fn(Q):
            return kernels.jacobian(np.ascontiguousarray(Q, dtype=np.float64), p)
    return scale_fn, scale_jac_fn


def integrate_diagonal_scale(
    Q0: ArrayLike,
    R0: ArrayLike,
    T: ArrayLike,
    scale_fn: ScaleFn | None = None,
    scale_jac_fn: ScaleFn | None = None,
    eta: float = 1.0,
    batch_size: int = 1,
    noise_var: float = 0.0,
    alpha: ArrayLike = (0.0, 1.0),
    rtol: float = 1e-10,
    atol: float = 1e-12,
    method: str = "DOP853",
    second_order: bool = True,
    engine: str = "auto",
    max_value: float = 1e10,
    *,
    kernels=None,
    kernel_params: ArrayLike | None = None,
) -> TheoryTrajectory:
    """Integrate the order-parameter ODE of a diagonal-scale normalization.

    The packed state is ``concatenate(Q.ravel(), R.ravel())`` with the full
    symmetric ``Q`` (:func:`~framework.theory._kernels.pack_state`); the right-hand side
    keeps ``Q`` exactly symmetric.

    Parameters
    ----------
    Q0, R0 : array_like, shapes (K, K), (K, M)
        Initial order parameters at ``alpha[0]``.
    T : array_like, shape (M, M)
        Teacher overlaps (constant).
    scale_fn : callable ``Q -> s`` (shape (K,)), optional
        Scale of the normalization ``x~_i = s_i(Q) x_i``. ``None``: plain
        network (``s = 1``, fastest path) unless ``kernels`` are given.
    scale_jac_fn : callable ``Q -> ds_dQ`` (shape (K, K, K)), optional
        Its Jacobian, ``ds_dQ[i, j, k] = d s_i / d Q_jk`` (``Q_jk``, ``Q_kj``
        independent). ``None`` with a ``scale_fn``: no gradient flows through
        the statistics (``C = 0``).
    eta : float
        Learning rate (step ``eta / sqrt(N)`` on ``J``, ``alpha = steps / N``).
    batch_size : int
        Minibatch size (divides the ``eta^2`` term).
    noise_var : float
        Output-noise variance (in the ``eta^2`` term and in ``eps_g``).
    alpha : array_like
        Increasing output grid; the integration runs from ``alpha[0]`` to
        ``alpha[-1]``.
    rtol, atol : float
        Tolerances of the adaptive solver.
    method : {"DOP853", "RK45", "LSODA", "Radau", "BDF"}
        Solver; the scipy solver class of that name unless the compiled path
        is used.
    second_order : bool
        Keep the ``eta^2`` term.
    engine : {"auto", "numba", "scipy"}
        ``"auto"`` uses a compiled DOP853 (a port of scipy's, same results to
        rounding) when numba is installed, ``method == "DOP853"`` and the scale
        functions are ``None`` or numba-jitted (or ``kernels`` are given); otherwise
        scipy's solver (:func:`solve_grid`). Jitted scale functions must compile as
        ``float64[::1](float64[:, ::1])`` and ``float64[:, :, ::1](float64[:, ::1])``
        (C-contiguous results); they enter as first-class functions, so the
        integrator is compiled (and cached on disk) once for all of them.
    max_value : float
        Any state entry beyond this magnitude counts as divergence.
    kernels : ScaleKernels, optional
        Compiled scale functions of a normalization
        (:meth:`framework.normalization.Normalization.scale_kernels`): ``s(Q, p)`` and
        its Jacobian (always used; zero for a normalization without gradient through
        its statistics), with the parameters ``p = kernel_params`` constant during the
        run. The compiled engine calls them (one compiled integrator for all kernels);
        the scipy engine calls ``scale_fn``/``scale_jac_fn`` if given (they must be
        the same functions), else the kernels from Python.
    kernel_params : array_like, shape (len(kernels.names), K), optional
        The parameter values ``p`` (:meth:`ScaleKernels.pack`); may be omitted for
        kernels without parameters.

    Returns
    -------
    TheoryTrajectory
        On divergence (non-finite state, ``|state| > max_value``, ``Q`` not
        positive definite, or step size underflow) the integration stops; the
        result holds the grid points reached before, ``diverged=True`` and
        ``alpha_diverged``.
    """
    # writeable copies: a read-only array (the model's T) types differently in numba
    Q0, R0, T = (np.array(a, dtype=np.float64, order="C") for a in (Q0, R0, T))
    alpha = np.ascontiguousarray(alpha, dtype=np.float64).reshape(-1)
    if alpha.size == 0 or np.any(np.diff(alpha) <= 0):
        raise ValueError(f"alpha must be a non-empty, strictly increasing grid, got {alpha!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    K, M = R0.shape
    p: np.ndarray | None = None
    if kernels is not None:
        n_params = len(kernels.names)
        given = np.zeros((n_params, K)) if kernel_params is None and not n_params \
            else kernel_params
        p = np.ascontiguousarray(given, dtype=np.float64) if given is not None else None
        if p is None or p.shape != (n_params, K):
            raise ValueError(
                f"kernel_params must have shape (len(kernels.names), K) = ({n_params}, {K}),"
                f" got {None if p is None else p.shape}"
            )
    elif kernel_params is not None:
        raise ValueError("kernel_params needs kernels, got kernels=None")
    chosen = _choose_engine(engine, method, scale_fn, scale_jac_fn, kernels)
    if kernels is not None and chosen == "scipy":
        assert p is not None  # checked above
        scale_fn, scale_jac_fn = _kernel_functions(kernels, p, scale_fn, scale_jac_fn)
    args = (Q0, R0, T, scale_fn, scale_jac_fn, eta, int(batch_size), noise_var, alpha,
            rtol, atol, second_order, max_value)
    if chosen == "numba":
        ys, eps, status, t_fail, nfev = _dop853._run_numba(*args, kernels, p)
    else:
        ys, eps, status, t_fail, nfev = _run_scipy(*args, method)
    Qs, Rs = unpack_state(ys, K, M)
    return TheoryTrajectory(
        alpha=alpha[: ys.shape[0]].copy(),
        Q=Qs.copy(),
        R=Rs.copy(),
        eps_g=eps,
        diverged=status != 0,
        alpha_diverged=t_fail if status != 0 else float("nan"),
        nfev=nfev,
        message=_STATUS_MESSAGES[status],
        engine=chosen,
    )
