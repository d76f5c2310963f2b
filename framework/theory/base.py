"""The one interface every theory engine implements, and its result types.

An :class:`Engine` computes, for one (model, normalization, activation) triple, the
expectations behind the order-parameter theory: the right-hand side of the ODE
(:meth:`Engine.rates`), the generalization error, its gradient in weight space (for
Hessians), the Hessian block of parameters held fixed by symmetry, and the
integrated trajectory. Fixed points, Jacobians, Hessians and the escape geometry
(:mod:`framework.theory.equilibrium`) are written once against it.

Which engine runs is decided in one place, :func:`framework.theory.select_engine`,
which asks each class of :data:`framework.theory.ENGINES` in turn whether it
:meth:`~Engine.supports` the triple. Nothing else asks "which engine am I in": an
engine answers :attr:`~Engine.exact` and the results have the same fields whichever
engine made them (error estimates are 0 when exact, ``params`` empty without
trainable parameters).

Conventions (DESIGN.md): ``eps_g = E[(zeta - sigma)^2] / 2`` including the output
noise ``model.noise / 2``; time ``alpha = steps / N``; learning rate ``eta`` with step
``eta / sqrt(N)`` on ``J``; minibatch gradients averaged (the ``eta^2`` term of
``dQ/dalpha`` divided by the batch size); trainable parameters move by
``dtheta/dalpha = -eta E[d eps / d theta]``.

The two layers (:meth:`framework.Model.layers`): outputs ``sigma = c_K sum_i v_i
g(x~_i)``, ``zeta = c_M sum_n v*_n g(y_n) + noise``; the engines compute with the error
weights ``w = (-c_K v, c_M v*)`` (``zeta - sigma = w . g(u)`` without noise). A trained
readout is the parameter ``"v"`` (K,), last in :attr:`Engine.trainable`, with ``dv/dalpha
= -eta_v d eps_g / d v - weight_decay_v v``; first-layer weight decay adds ``-2 lambda Q``
to ``dQ/dalpha`` and ``-lambda R`` to ``dR/dalpha`` (:meth:`Engine.layer_rates`).
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from framework.theory._integrate import (
    _SCIPY_METHODS,
    StopIntegration,
    definiteness,
    solve_grid,
)
from framework.theory._kernels import _STATUS_MESSAGES
from framework.validators import SpecificationError

if TYPE_CHECKING:
    from framework.activation import Activation
    from framework.learning_rule import LearningRule
    from framework.model import Model
    from framework.normalization import Normalization

__all__ = [
    "ALPHA_LIMIT",
    "ALPHA_RATE_LIMIT",
    "GRID_LIMIT",
    "AccuracyError",
    "ClosedFormUnavailable",
    "Drift",
    "Engine",
    "Rates",
    "Trajectory",
    "WrappedEngine",
    "check_horizon",
]


class AccuracyError(ArithmeticError):
    """An engine's error estimate exceeds the requested accuracy."""


class ClosedFormUnavailable(NotImplementedError):
    """No closed form applies to this (activation, normalization) pair."""


@dataclass(frozen=True)
class Rates:
    """Right-hand side of the ODE and ``eps_g`` at one state, with error estimates.

    Every ``*_error`` has the shape of its value and is 0 when the engine is exact.
    ``dparams`` maps each integrated trainable parameter to ``dtheta/dalpha`` (K,)
    (empty without trainable parameters).
    """

    dQ: np.ndarray
    dR: np.ndarray
    dparams: dict[str, np.ndarray]
    eps_g: float
    dQ_error: np.ndarray
    dR_error: np.ndarray
    dparams_error: dict[str, np.ndarray]
    eps_g_error: float


@dataclass(frozen=True)
class Drift:
    """Expectations of the per-sample gradient at one state, per replicate, from which
    the rates of the gradient step are assembled (:meth:`Engine.drift`).

    The leading axis ``r`` of every array is the replicate (1 for an exact engine; the
    quadrature's independent randomizations otherwise: the rates are linear in these
    expectations, so an estimate's error is the standard error over ``r``). With ``a =
    -d eps / dx`` the per-sample gradient with respect to the raw student
    pre-activations and ``u = (x, y)`` the raw pre-activations::

        dR/dalpha = eta (E[a y^T] + C R)
        dQ/dalpha = eta (E[a x^T] + E[x a^T] + C Q + Q C^T) + (eta^2 / B) E[a a^T]

    for isotropic inputs (before weight decay: :meth:`Engine.layer_rates`); per input
    eigenspace in :mod:`framework.theory.spectral`.

    Attributes
    ----------
    au : ndarray (r, K, K + M)
        ``E[a u^T]``.
    A : ndarray (r, K, K + M)
        ``E[grad_u a]``, with ``E[a u^T] = A Sigma`` (Stein's lemma): what the rates per
        input eigenspace need (an exact engine gives it in closed form, smooth across
        the boundary of the PSD cone; else ``E[a u^T] Sigma^+``).
    C : ndarray (r, K, K)
        ``-(Gbar + Gbar^T)``, ``Gbar = E[d eps / d stats]`` pulled back to ``Q`` (the
        path through the population statistics; zeros without statistics).
    aa : ndarray (r, K, K)
        ``E[a a^T]`` (output noise included; zeros when ``second_order`` is False).
    dparams : dict
        ``dtheta/dalpha`` (r, K) of the normalization's trainable parameters.
    dE_da : ndarray (r, K) or None
        ``d eps_g / d a`` for the effective student readout ``a = c_K v`` (a trained
        readout only; :meth:`Engine.layer_rates` turns it into ``dv/dalpha``).
    eps : ndarray (r,)
        ``eps_g`` (noise term included).
    Ea : ndarray (r, K) or None
        ``E[a]``: with an input mean (non-centred pre-activations, ``mean`` given to
        :meth:`Engine.drift`) the input's mean moves ``J`` along it by ``eta m (E[a] +
        b)`` (:mod:`framework.theory.spectral`); None when the pre-activations are
        centred. ``au`` and ``A`` are then about the *centred* pre-activations: ``au =
        E[a (u - E u)^T] = A Sigma``.
    b : ndarray (r, K) or None
        ``-E[d eps / d mean_i]`` through the population statistics' dependence on the
        pre-activation mean (batch norm's centring; zeros without it); None when centred.
    """

    au: np.ndarray
    A: np.ndarray
    C: np.ndarray
    aa: np.ndarray
    dparams: dict[str, np.ndarray]
    dE_da: np.ndarray | None
    eps: np.ndarray
    Ea: np.ndarray | None = None
    b: np.ndarray | None = None


@dataclass(frozen=True)
class Trajectory:
    """An integrated ODE trajectory on a report grid (the prefix reached).

    Attributes
    ----------
    alpha : ndarray (n,)
        Report times reached (a prefix of the requested grid).
    Q, R : ndarray (n, K, K), (n, K, M)
    eps_g : ndarray (n,)
        Generalization error (output-noise term included).
    eps_g_error : ndarray (n,)
        Its error estimate (zeros when the engine is exact).
    params : dict
        Trainable parameter name -> ``(n, K)`` (empty without trainable parameters).
    diverged : bool
        The run stopped early on divergence (see ``message``).
    alpha_diverged : float
        Where the failure was detected (NaN if none).
    nfev : int
        Right-hand-side evaluations.
    message : str
    engine : str
        Name of the engine that computed the rates (``"closed_form"``, ``"generic"``).
    integrator : str
        ``"numba"`` (compiled DOP853) or ``"scipy"``.
    description : str
        The engine's one-line description (stored in attrs).
    exact : bool
        The engine's values are exact (``eps_g_error`` is 0).
    eps_g_method : str
        How ``eps_g`` was computed (e.g. the converged phase in deviation variables).
    """

    alpha: np.ndarray
    Q: np.ndarray
    R: np.ndarray
    eps_g: np.ndarray
    diverged: bool
    alpha_diverged: float
    nfev: int
    message: str
    engine: str
    params: dict[str, np.ndarray] = field(default_factory=dict)
    eps_g_error: np.ndarray = field(default_factory=lambda: np.zeros(0))
    integrator: str = "scipy"
    description: str = ""
    exact: bool = False
    #: How ``eps_g`` was computed (stored as the attr ``eps_g_method``).
    eps_g_method: str = "the engine's eps_g at the integrated order parameters"
    #: Order parameters per input eigenspace (structured inputs): ``{"Q": (n, L, K,
    #: K), "R": (n, L, K, M)}``, ``Q_l = J^(l) J^(l)^T / N``; then ``Q`` and ``R`` are
    #: the pre-activation covariances ``sum_l lambda_l Q_l`` (:mod:`framework.inputs`).
    #: Empty for isotropic inputs.
    spaces: dict[str, np.ndarray] = field(default_factory=dict)


class Engine(abc.ABC):
    """Expectations of the order-parameter theory for one (model, normalization,
    activation) triple.

    What a subclass implements: :meth:`supports` (class-level capability test),
    :meth:`rates`, :meth:`generalization_error`, :meth:`weight_moments` and
    :meth:`describe`; optionally :meth:`held_hessian` (parameters held fixed by a
    symmetry), :meth:`attrs`, and :meth:`integrate` (the default integrates through
    :meth:`rates`; an engine may use a faster integrator where it has one).

    Attributes
    ----------
    name : str
        Registry name (``select_engine(..., engine=name)``) and the ``engine`` attr of
        results.
    exact : bool
        Values are exact (error estimates 0) rather than estimates.
    semidefinite : bool
        A positive semidefinite ``Q`` is a valid state.
    trainable : tuple of str
        Trainable normalization parameters integrated as state.
    held : tuple of str
        Trainable parameters held at 0 (by a symmetry of the problem).
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    #: True if a positive *semi*-definite ``Q`` is a valid state (the engine is smooth
    #: on the boundary of the cone, e.g. identical students); else ``Q`` must be
    #: positive definite.
    semidefinite: ClassVar[bool] = False
    #: True if :meth:`drift` and :meth:`generalization_error` take a non-zero
    #: pre-activation mean (inputs with a mean, :mod:`framework.inputs`).
    supports_input_mean: ClassVar[bool] = False

    #: True if :meth:`drift`, :meth:`generalization_error` and :meth:`weight_moments`
    #: take the Gram matrix of the weights apart from the pre-activation covariance
    #: (``weights_gram``, ``weights_metric``): the statistics of a normalization with
    #: :attr:`~framework.Normalization.weight_statistics` under structured inputs.
    supports_weight_statistics: ClassVar[bool] = False

    def _preactivation_statistics_only(self, gram: Any) -> None:
        """Refuse a weight Gram apart from the pre-activation covariance (an engine
        without :attr:`supports_weight_statistics`)."""
        if gram is not None:
            raise ClosedFormUnavailable(
                f"engine {self.name!r} computes a normalization's statistics from the "
                f"pre-activation covariance only (weight statistics under structured "
                f"inputs need engine='generic')")

    def _centred_only(self, mean: Any) -> None:
        """Refuse a non-zero pre-activation mean (an engine without
        :attr:`supports_input_mean`)."""
        if mean is not None and np.any(np.asarray(mean, dtype=float) != 0.0):
            raise ClosedFormUnavailable(
                f"engine {self.name!r} computes expectations at centred pre-activations "
                f"only, got a pre-activation mean {np.asarray(mean).tolist()} (inputs with "
                f"a mean need engine='generic')")

    def __init__(
        self,
        model: Model,
        normalization: Normalization,
        activation: Activation,
        quadrature: Any = None,
    ) -> None:
        """``quadrature``: accuracy settings, for engines that take them (exact engines
        ignore it)."""
        self.model = model
        self.normalization = normalization
        self.activation = activation
        self.K, self.M = model.K, model.M
        #: the teacher's pre-activation covariance (``T`` for isotropic inputs, ``Tt =
        #: mean_eigenvalue * T`` otherwise: the engine computes at the pre-activation
        #: covariances, :mod:`framework.inputs`)
        self.T = np.asarray(model.input_distribution().teacher_covariance(model.T),
                            dtype=float)
        self.noise = float(model.noise)
        self.layers = model.layers()
        #: Trainable parameters of the model (``("v",)`` with a trained readout), state
        #: after the normalization's.
        self.model_trainable: tuple[str, ...] = ("v",) if self.layers.readout_trained else ()
        self.trainable: tuple[str, ...] = (*normalization.trainable, *self.model_trainable)
        self.held: tuple[str, ...] = ()
        self.initial_params = {
            k: np.asarray(v, dtype=float) for k, v in normalization.parameters(self.K).items()
        }
        if self.model_trainable:
            if "v" in self.initial_params:
                raise SpecificationError(
                    f"normalization {normalization.name!r} has a parameter named 'v', which "
                    f"is the trained readout of the model; rename the parameter")
            self.initial_params["v"] = np.array(self.layers.readout, dtype=float)

    # -- capability --------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def supports(
        cls,
        model: Model,
        normalization: Normalization,
        activation: Activation,
        params: Mapping[str, Any] | None = None,
        rule: LearningRule | None = None,
    ) -> str | None:
        """None if this engine applies to the triple (and parameter values) under the
        learning rule ``rule`` (None: the plain gradient step of :meth:`rates`), else the
        reason why not (one phrase, used in error messages). An implementation ends with
        ``return cls.supports_rule(rule, model, normalization, activation)``."""

    @classmethod
    def supports_rule(
        cls,
        rule: LearningRule | None,
        model: Model,
        normalization: Normalization,
        activation: Activation,
    ) -> str | None:
        """None if this engine can integrate ``rule`` (None: the plain gradient step),
        else the reason: the rule is asked (:meth:`framework.LearningRule.supports`)
        with this engine class."""
        if rule is None:
            return None
        return rule.supports(cls, model, normalization, activation)

    # -- the expectations ----------------------------------------------------------------
    @abc.abstractmethod
    def rates(
        self,
        Q: Any,
        R: Any,
        params: Mapping[str, Any] | None = None,
        *,
        eta: float,
        batch_size: int = 1,
        second_order: bool = True,
        check: bool = True,
    ) -> Rates:
        """``dQ/dalpha``, ``dR/dalpha``, ``dtheta/dalpha`` and ``eps_g`` at ``(Q, R)``
        with the parameters ``params`` (defaults: :meth:`params`)."""

    def drift(
        self,
        Q: Any,
        R: Any,
        params: Mapping[str, Any] | None = None,
        *,
        eta: float,
        second_order: bool = True,
        check: bool = True,
        mean: Any = None,
        weights_gram: Any = None,
    ) -> Drift:
        """The expectations of the per-sample gradient at the pre-activation covariances
        ``(Q, R)`` (:class:`Drift`), from which the rates of the gradient step are
        assembled for any input distribution (:mod:`framework.theory.spectral`).

        Optional: an engine without it cannot run structured inputs (the default raises
        :class:`NotImplementedError`, and :func:`~framework.theory.select_engine` then
        says so). ``eta`` scales ``dparams``; ``check``: as in :meth:`rates`. ``mean``:
        the pre-activation mean ``(K + M,)`` of inputs with a mean (None: centred), only
        for an engine with :attr:`supports_input_mean`. ``weights_gram``: the Gram matrix
        ``J J^T / N`` ``(K, K)`` of the weights, from which a normalization with
        ``weight_statistics`` computes its statistics (None: ``Q``, isotropic inputs);
        then ``Drift.C`` is the pull-back onto it, only for an engine with
        :attr:`supports_weight_statistics`.
        """
        raise NotImplementedError(
            f"engine {self.name!r} does not provide Engine.drift (the expectations of the "
            f"per-sample gradient), which structured inputs need")

    @abc.abstractmethod
    def generalization_error(
        self, Q: Any, R: Any, params: Mapping[str, Any] | None = None, *, check: bool = True,
        mean: Any = None, weights_gram: Any = None,
    ) -> tuple[float, float]:
        """``(eps_g, error estimate)`` at ``(Q, R)`` (noise term included); ``mean``: the
        pre-activation mean ``(K + M,)`` (None: centred), ``weights_gram``: the weights'
        Gram matrix (None: ``Q``; see :meth:`drift`)."""

    @abc.abstractmethod
    def weight_moments(
        self,
        X: Any,
        Bt: Any,
        params: Mapping[str, Any] | None = None,
        *,
        landscape: bool = True,
        shift: Any = None,
        weights_metric: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``eps_g``, ``dF/dX`` and ``dF/dtheta`` in weight space, per replicate.

        ``F(X, theta) = eps_g(X X^T, X Bt^T; theta)`` for a realization ``X (K, D)``,
        ``Bt (M, D)``. Returns ``(eps (r,), dF/dX (r, K, D), {name: (r, K)})`` with
        ``r`` replicates (1 for an exact engine). ``landscape=True``: for a normalization
        without gradients through its statistics, the gradient of ``eps_g`` itself (the
        loss landscape), not the SGD drift. ``shift`` ``(D,)``: the inputs' mean in the
        realization's coordinates (inputs ``N(shift, I_D)``; None: centred), for an engine
        with :attr:`supports_input_mean`. ``weights_metric`` ``(D,)``: a normalization
        with ``weight_statistics`` sees the weights' Gram ``X diag(weights_metric) X^T``
        (None: ``X X^T``), for an engine with :attr:`supports_weight_statistics`.
        """

    def weight_moments_stack(
        self,
        Xs: Any,
        Bt: Any,
        params: Mapping[str, Any] | None = None,
        *,
        landscape: bool = True,
        shift: Any = None,
        weights_metric: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """:meth:`weight_moments` for a stack of realizations ``Xs (S, K, D)`` at common
        parameters: ``(eps (S, r), dF/dX (S, r, K, D), {name: (S, r, K)})``.

        Default: one :meth:`weight_moments` call per realization; an engine may
        vectorize it (the Hessian's finite differences call it with every perturbed
        weight coordinate at once).
        """
        kw = {} if shift is None else {"shift": shift}
        if weights_metric is not None:
            kw["weights_metric"] = weights_metric
        parts = [self.weight_moments(X, Bt, params, landscape=landscape, **kw) for X in Xs]
        return (np.stack([e for e, _, _ in parts]), np.stack([g for _, g, _ in parts]),
                {k: np.stack([t[k] for _, _, t in parts]) for k in parts[0][2]}
                if parts else {})

    def held_hessian(
        self, Q: Any, R: Any, params: Mapping[str, Any] | None = None
    ) -> np.ndarray:
        """Hessian block of the :attr:`held` parameters, ``(K h, K h)``, decoupled from
        ``(W, theta)`` (default: none held, ``(0, 0)``)."""
        return np.zeros((0, 0))

    def integrate(
        self,
        Q0: Any,
        R0: Any,
        *,
        eta: float,
        alpha: Any,
        params: Mapping[str, Any] | None = None,
        batch_size: int = 1,
        rtol: float = 1e-7,
        atol: float = 1e-9,
        method: str = "DOP853",
        second_order: bool = True,
        max_value: float = 1e8,
        stop_below: float | None = None,
    ) -> Trajectory:
        """Integrate the ODE over ``(Q, R, theta)`` from ``(Q0, R0, params)`` through
        :meth:`rates` and report on the grid ``alpha`` (scipy's ``solve_ivp`` with
        terminal events, :func:`framework.theory._integrate.solve_grid`).

        ``stop_below``: if given, stop at the first reported grid point with ``eps_g <
        stop_below`` (that point is the last one reported; not a divergence), e.g. to
        measure an escape time without integrating the converged phase.

        Divergence (non-finite state, an entry beyond ``max_value``, ``Q`` leaving the
        closed positive semidefinite cone (its boundary is a valid start), step-size
        underflow, non-finite rates at a valid state) stops the run and keeps the rows
        reached. An :class:`AccuracyError` at the initial state propagates (more
        quadrature samples are needed); later in the run (typically a state running
        away, where the estimate's variance grows) it stops the run with the rows
        reached, ``diverged`` and the error's text in ``message``. The grid is bounded by
        :func:`check_horizon`.
        """
        if method not in _SCIPY_METHODS:
            raise SpecificationError(
                f"'method' must be one of {', '.join(map(repr, _SCIPY_METHODS))}, got {method!r}"
            )
        alpha = check_horizon(alpha, eta, self.layers.eta_v)
        p0 = self.params(params)
        y0 = self.pack(np.asarray(Q0, dtype=float), np.asarray(R0, dtype=float), p0)
        fixed = {k: v for k, v in p0.items() if k not in self.trainable}
        nfev = 0

        def split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
            Q, R, tp = self.unpack(y)
            return Q, R, {**fixed, **tp}

        t_start = float(alpha[0])

        def fun(t: float, y: np.ndarray) -> np.ndarray:
            nonlocal nfev
            nfev += 1
            Q, R, p = split(y)
            with np.errstate(all="ignore"):
                if self._state_status(y, max_value):  # outside the cone
                    return np.full_like(y, np.nan)
                try:
                    r = self.rates(Q, R, p, eta=eta, batch_size=batch_size,
                                   second_order=second_order)
                except AccuracyError as exc:
                    if t <= t_start:  # at the start: more samples are needed, say so
                        raise
                    # later (typically a run-away state): stop, keep the rows reached
                    raise StopIntegration(6, (
                        f"{_STATUS_MESSAGES[6]} at alpha = {t:.6g} with max |Q| = "
                        f"{float(np.max(np.abs(Q))):.3g} (stopped there, rows kept): "
                        f"{exc}")) from exc
            return self.pack(r.dQ, r.dR, r.dparams)

        ys, status, t_fail, message = solve_grid(
            fun, y0, alpha, K=self.K, method=method, rtol=rtol, atol=atol,
            max_value=max_value, semidefinite=True,
            status=lambda y: self._state_status(y, max_value),
            eps_g=_eps_g_of_state(self, fixed), stop_below=stop_below,
        )
        n_rows = ys.shape[0]
        Qs, Rs, ps = self.unpack(ys)
        Qs = 0.5 * (Qs + np.swapaxes(Qs, -1, -2))
        eps = np.empty(n_rows)
        eps_err = np.empty(n_rows)
        for j in range(n_rows):  # one quadrature per reported time
            with np.errstate(all="ignore"):  # a non-finite row is explained by message
                eps[j], eps_err[j] = self.generalization_error(
                    Qs[j], Rs[j], {**fixed, **{k: v[j] for k, v in ps.items()}}
                )
        return Trajectory(
            alpha=alpha[:n_rows].copy(), Q=Qs.copy(), R=Rs.copy(), eps_g=eps,
            diverged=status != 0, alpha_diverged=float(t_fail) if status else math.nan,
            nfev=nfev, message=message, engine=self.name,
            params={k: np.array(v) for k, v in ps.items()}, eps_g_error=eps_err,
            description=self.describe(), exact=self.exact,
        )

    def _state_status(self, y: np.ndarray, max_value: float) -> int:
        """0 for a valid integrator state, else the failure code of
        ``framework.theory._kernels._STATUS_MESSAGES``: non-finite (1), beyond
        ``max_value`` (2), ``Q`` outside the closed positive semidefinite cone, i.e. an
        eigenvalue below ``-1e-9 max(1, max |Q|)`` (3). :meth:`integrate` accepts the
        boundary for every engine: the expectations are defined there (identical students,
        a zero-norm unit; the quadrature samples the degenerate Gaussian exactly), and it
        is invariant under the flow; :attr:`semidefinite` is about smoothness there
        (Jacobians)."""
        if not np.all(np.isfinite(y)):
            return 1
        if np.max(np.abs(y)) > max_value:
            return 2
        return 3 if definiteness(y, self.K, True) < 0 else 0

    def boundary_estimates(self) -> AbstractContextManager[None]:
        """A context in which an engine of estimates is smooth up to the PSD cone's
        boundary and takes states just beyond it (by rounding or by a second-order
        curvature of a finite-difference step) as on it, so that derivatives there can
        be taken by finite differences (:func:`~framework.theory.equilibrium.ode_jacobian`
        at identical students). An exact engine (analytic beyond the cone) needs nothing:
        the default changes nothing."""
        return contextlib.nullcontext()

    # -- description -----------------------------------------------------------------
    @abc.abstractmethod
    def describe(self) -> str:
        """One line for attrs."""

    def attrs(self) -> dict[str, Any]:
        """What the engine writes into a result's attrs (strings and numbers)."""
        return {"engine": self.name, "engine_description": self.describe(),
                "engine_exact": int(self.exact)}

    # -- parameters and the packed state ------------------------------------------------
    def params(self, overrides: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Initial parameter values (the normalization's, then the model's trained
        readout ``"v"``) updated with ``overrides`` (each broadcast to (K,))."""
        out = dict(self.initial_params)
        for name, value in (overrides or {}).items():
            if name not in out:
                valid = ", ".join(map(repr, out)) or "none"
                raise SpecificationError(
                    f"unknown parameter {name!r} of normalization "
                    f"{self.normalization.name!r} and model {self.model.name!r}; "
                    f"parameters: {valid}"
                )
            out[name] = np.broadcast_to(np.asarray(value, dtype=float), (self.K,)).copy()
        return out

    # -- the two layers -------------------------------------------------------------------
    def norm_params(self, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The normalization's parameters of ``params`` (without the model's ``"v"``)."""
        return {k: v for k, v in params.items() if k not in self.model_trainable}

    def error_weights(self, params: Mapping[str, Any] | None = None) -> np.ndarray:
        """``w = (-c_K v, c_M v*)`` at the parameters (the trained readout's ``"v"`` if
        trained, else the model's fixed readout)."""
        v = params.get("v") if (params is not None and self.model_trainable) else None
        return self.layers.error_weights(v)

    def layer_rates(
        self, Q: np.ndarray, R: np.ndarray, params: Mapping[str, np.ndarray],
        dQ: np.ndarray, dR: np.ndarray, dE_da: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Weight decay on ``(dQ, dR)`` and the trained readout's rate.

        ``dE_da``: ``d eps_g / d a`` (K,) for the effective student weights ``a = c_K
        v`` (ignored without a trained readout). Returns ``(dQ, dR, {"v": dv/dalpha})``
        with ``dv/dalpha = -eta_v c_K dE_da - weight_decay_v v`` (empty dict without a
        trained readout).
        """
        lay = self.layers
        if lay.weight_decay:
            dQ = dQ - 2.0 * lay.weight_decay * Q
            dR = dR - lay.weight_decay * R
        if not self.model_trainable:
            return dQ, dR, {}
        dv = -lay.eta_v * lay.c_student * np.asarray(dE_da, dtype=float)
        if lay.weight_decay_v:
            dv = dv - lay.weight_decay_v * np.asarray(params["v"], dtype=float)
        return dQ, dR, {"v": dv}

    def pack(self, Q: np.ndarray, R: np.ndarray, params: Mapping[str, np.ndarray]) -> np.ndarray:
        """State vector ``[Q.ravel(), R.ravel(), theta_1, theta_2, ...]`` (trainable)."""
        return np.concatenate(
            [np.ravel(Q), np.ravel(R), *(np.ravel(params[k]) for k in self.trainable)]
        )

    def unpack(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Inverse of :meth:`pack` (also for stacks ``(n, size)``)."""
        K, M = self.K, self.M
        y = np.asarray(y)
        lead = y.shape[:-1]
        Q = y[..., : K * K].reshape(*lead, K, K)
        R = y[..., K * K : K * K + K * M].reshape(*lead, K, M)
        off = K * K + K * M
        params = {}
        for j, k in enumerate(self.trainable):
            params[k] = y[..., off + j * K : off + (j + 1) * K]
        return Q, R, params

    def nan_rates(self) -> Rates:
        """Rates of an invalid state (NaN everywhere)."""
        K, M = self.K, self.M
        nan = {k: np.full(K, np.nan) for k in self.trainable}
        return Rates(np.full((K, K), np.nan), np.full((K, M), np.nan), nan, math.nan,
                     np.full((K, K), np.nan), np.full((K, M), np.nan), dict(nan), math.nan)


class WrappedEngine(Engine):
    """An engine around another one, ``base``, built by
    :func:`~framework.theory.select_engine` (:class:`~framework.theory.RuleEngine`,
    :class:`~framework.theory.SpectralEngine`): its ``name``, ``exact``,
    ``semidefinite``, parameters and accuracy settings are the wrapped engine's (results
    record the engine that computed the expectations)."""

    def __init__(self, base: Engine) -> None:
        super().__init__(base.model, base.normalization, base.activation)
        self.base = base
        self.name = base.name  # type: ignore[misc]
        self.exact = base.exact  # type: ignore[misc]
        self.semidefinite = base.semidefinite  # type: ignore[misc]
        self.trainable, self.held = base.trainable, base.held
        self.initial_params = dict(base.initial_params)
        #: the wrapped engine's accuracy settings (None for an exact engine)
        self.quadrature = getattr(base, "quadrature", None)

    @classmethod
    def supports(
        cls,
        model: Model,
        normalization: Normalization,
        activation: Activation,
        params: Mapping[str, Any] | None = None,
        rule: LearningRule | None = None,
    ) -> str | None:
        """Not selectable on its own: :func:`~framework.theory.select_engine` builds it
        around the engine it chose."""
        return "a wrapper around another engine, built by select_engine"

    def boundary_estimates(self) -> AbstractContextManager[None]:
        """The wrapped engine's (:meth:`Engine.boundary_estimates`)."""
        return self.base.boundary_estimates()


def pinv_psd(S: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of a symmetric PSD matrix (eigenvalues below ``1e-13`` of the
    largest treated as 0)."""
    lam, vec = np.linalg.eigh(0.5 * (S + S.T))
    cut = 1e-13 * max(float(np.max(np.abs(lam))), 1e-300)
    inv = np.where(lam > cut, 1.0 / np.where(lam > cut, lam, 1.0), 0.0)
    return (vec * inv) @ vec.T


#: Largest ``alpha`` an integration may reach, and the largest ``alpha * rate``
#: (``rate = max(eta, eta_v)``): once converged an explicit integrator's steps are bounded
#: by stability to ``~1 / (rate * lambda_max)``, so the number of steps grows like
#: ``alpha * rate`` -- a horizon of ``1e300`` would never finish.
ALPHA_LIMIT = 1e8
ALPHA_RATE_LIMIT = 1e7
#: Largest report grid (rows of the trajectory).
GRID_LIMIT = 10**6


def check_horizon(alpha: Any, eta: float, eta_v: float = 0.0) -> np.ndarray:
    """``alpha`` as a float grid, refused (naming the limit and the value) if it is not
    strictly increasing and finite, longer than :data:`GRID_LIMIT` points, ends beyond
    :data:`ALPHA_LIMIT`, or ``alpha[-1] * max(eta, eta_v)`` exceeds
    :data:`ALPHA_RATE_LIMIT` (the integration would take ~that many steps)."""
    alpha = np.asarray(alpha, dtype=float).reshape(-1)
    if alpha.size == 0 or not np.all(np.isfinite(alpha)) or np.any(np.diff(alpha) <= 0):
        raise SpecificationError(
            f"'alpha' must be a finite, strictly increasing grid, got {alpha!r}")
    if alpha.size > GRID_LIMIT:
        raise SpecificationError(
            f"'alpha' must have at most {GRID_LIMIT} points, got {alpha.size}")
    end = float(alpha[-1])
    if end > ALPHA_LIMIT:
        raise SpecificationError(
            f"the integration horizon alpha must be <= {ALPHA_LIMIT:g}, got {end:g}")
    rate = max(float(eta), float(eta_v))
    if end * rate > ALPHA_RATE_LIMIT:
        raise SpecificationError(
            f"the integration horizon alpha * max(eta, eta_v) must be <= "
            f"{ALPHA_RATE_LIMIT:g} (the converged phase takes ~that many integrator "
            f"steps), got alpha = {end:g} with rate {rate:g}")
    return alpha


def _eps_g_of_state(
    eng: Engine, fixed: Mapping[str, np.ndarray]
) -> Callable[[np.ndarray], float]:
    """``y -> eps_g`` of a packed state of ``eng`` (``fixed``: the parameters that are
    not state), for the ``stop_below`` event of :meth:`Engine.integrate`."""

    def eps_g(y: np.ndarray) -> float:
        Q, R, tp = eng.unpack(y)
        eps, _ = eng.generalization_error(0.5 * (Q + np.swapaxes(Q, -1, -2)), R,
                                          {**fixed, **tp}, check=False)
        return float(eps)

    return eps_g
