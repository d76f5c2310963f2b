"""Order-parameter theory for a (model, normalization) pair.

The engines behind one interface (:class:`Engine`, :mod:`framework.theory.base`):

* :class:`ClosedFormEngine` (``"closed_form"``): the exact erf closed forms for a
  normalization of the diagonal-scale family ``x~_i = s_i(Q, theta) x_i``, trainable
  scale parameters as extra state and shifts held at 0; errors 0. It integrates on the
  compiled DOP853 where it can.
* :class:`ExpectationEngine` (``"generic"``): the general ODE of DESIGN.md for any
  normalization and activation from the normalization's per-sample ``forward`` /
  ``backward``, by randomized quasi-Monte Carlo with common random numbers; accuracy
  set by a :class:`Quadrature`; raises :class:`AccuracyError` rather than return noise.

:func:`select_engine` is the one place that chooses: with ``engine="auto"`` it asks
each class of :data:`ENGINES`, in order, whether it :meth:`~Engine.supports` the
(model, normalization, activation, parameter values) and takes the first that does;
a name picks that engine (or raises :class:`ClosedFormUnavailable` with the reason).
Fixed points, Jacobians, Hessians and the escape geometry are written once against the
interface in :mod:`framework.theory.equilibrium`.

Learning rules (:class:`~framework.LearningRule`, ``rule=``): each engine's
:meth:`~Engine.supports` also asks the rule whether it can be integrated on that
engine, so the choice falls back to the next engine when the rule refuses one. The
plain gradient step (no rule, or a rule with ``engine_native`` such as ``sgd``) gets
the engine itself; any other rule the chosen engine wrapped in a :class:`RuleEngine`,
whose rates are the rule's (:mod:`framework.theory.ruled`).

The functions below (:func:`generalization_error`, :func:`ode_rhs`,
:func:`integrate`, ...) are conveniences over ``select_engine(...)``; they take the
activation object (``activation=``), by default the model's
(:meth:`framework.Model.activation_function`). This package imports no plugin
manager.

Trainable normalization parameters (``normalization.trainable``) are extra state,
``dtheta/dalpha = -eta E[d eps / d theta]`` (the ``simulation`` analyzer's step
``eta / N`` per sample); ``params=`` gives their current values (default: the
normalization's initial ``parameters(K)``).

Conventions: ``eps_g = E[(zeta - sigma)^2] / 2`` *including* the output noise
variance ``model.noise / 2``; time ``alpha = steps / N``; learning rate ``eta`` as in
:class:`~framework.Experiment`; minibatch gradients averaged (the ``eta^2`` term of
``dQ/dalpha`` is divided by the batch size).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from framework import _numba_notice
from framework.activation import Activation
from framework.model import Model, OrderParameters
from framework.normalization import Normalization
from framework.theory.base import (
    ALPHA_LIMIT,
    ALPHA_RATE_LIMIT,
    GRID_LIMIT,
    AccuracyError,
    ClosedFormUnavailable,
    Drift,
    Engine,
    Rates,
    Trajectory,
    check_horizon,
)
from framework.theory.closed import ClosedFormEngine
from framework.theory.quadrature import (
    ExpectationEngine,
    GenericRates,
    GenericTrajectory,
    Quadrature,
)
from framework.theory.ruled import RuleEngine
from framework.theory.spectral import MEAN_OVERLAP, SpectralEngine
from framework.validators import SpecificationError

if TYPE_CHECKING:
    from framework.learning_rule import LearningRule

# one line on stderr before numba compiles the kernels (first run only, see the module)
_numba_notice.install()

__all__ = [
    "ALPHA_LIMIT",
    "ALPHA_RATE_LIMIT",
    "ENGINES",
    "ENGINE_CHOICES",
    "GRID_LIMIT",
    "MEAN_OVERLAP",
    "AccuracyError",
    "ClosedFormEngine",
    "ClosedFormUnavailable",
    "Drift",
    "Engine",
    "ExpectationEngine",
    "GenericRates",
    "GenericTrajectory",
    "Quadrature",
    "Rates",
    "RuleEngine",
    "SpectralEngine",
    "Trajectory",
    "check_horizon",
    "expectation_engine",
    "generalization_error",
    "generalization_error_batch",
    "has_closed_form",
    "integrate",
    "ode_rhs",
    "select_engine",
]

#: The engine classes in the order :func:`select_engine` tries them (``engine="auto"``).
ENGINES: dict[str, type[Engine]] = {
    "closed_form": ClosedFormEngine,
    "generic": ExpectationEngine,
}

#: Values of the ``engine`` argument.
ENGINE_CHOICES = ("auto", *ENGINES)


@functools.lru_cache(maxsize=32)
def _cached(cls: type[Engine], model: Model, normalization: Normalization,
            activation: Activation, quadrature: Quadrature,
            rule: LearningRule | None) -> Engine:
    return _build(cls, model, normalization, activation, quadrature, rule)


def _build(cls: type[Engine], model: Model, normalization: Normalization,
           activation: Activation, quadrature: Quadrature,
           rule: LearningRule | None) -> Engine:
    eng = cls(model, normalization, activation, quadrature)
    inputs = model.input_distribution()
    if not inputs.isotropic:  # the blocks per input eigenspace around the engine
        return SpectralEngine(eng, inputs)
    return eng if rule is None else RuleEngine(eng, rule)


def _structured_reason(cls: type[Engine], model: Model, normalization: Normalization,
                       rule: LearningRule | None) -> str | None:
    """Why ``cls`` cannot run ``model``'s structured inputs (None: it can, or the inputs
    are isotropic)."""
    inputs = model.input_distribution()
    if inputs.isotropic:
        return None
    if cls.drift is Engine.drift:
        return "it provides no Engine.drift, which structured inputs need"
    if rule is not None and not rule.engine_native:
        return (f"learning rule {rule.name!r} is not available with structured inputs "
                f"(only the plain gradient step is)")
    if normalization.weight_statistics and not cls.supports_weight_statistics:
        return (f"normalization {normalization.name!r} computes its statistics from the "
                f"weights (|J_i|^2 / N), which are not the pre-activation moments with "
                f"structured inputs or an input mean, and this engine takes the "
                f"pre-activation covariance only (engine 'generic' takes both)")
    if not inputs.centred:
        if not cls.supports_input_mean:
            return ("its expectations are at centred pre-activations only (inputs with a "
                    "mean need the quadrature, engine 'generic')")
        why = normalization.supports_input_mean()
        if why is not None:
            return why
    return None


def select_engine(
    model: Model,
    normalization: Normalization,
    activation: Activation | None = None,
    *,
    engine: str = "auto",
    quadrature: Quadrature | Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    rule: LearningRule | None = None,
) -> Engine:
    """The engine object for this triple (cached per model, normalization, activation,
    quadrature, learning rule): the one place that chooses.

    ``engine="auto"``: the first class of :data:`ENGINES` whose
    :meth:`~Engine.supports` accepts the triple, ``params`` (e.g. a nonzero shift
    parameter is not for the closed form) and ``rule``; a name: that engine, or
    :class:`ClosedFormUnavailable` naming the reason. ``quadrature`` is a
    :class:`Quadrature`, a mapping of its options, or None (defaults; used by engines
    that take one). ``activation``: the model's :class:`~framework.Activation` (default:
    ``model.activation_function()``). ``rule``: a :class:`~framework.LearningRule`
    instance (None: the plain gradient step); a rule that is not ``engine_native`` gets
    the chosen engine wrapped in a :class:`RuleEngine` (its rates are the rule's).
    """
    if engine not in ENGINE_CHOICES:
        raise SpecificationError(
            f"'engine' must be one of {', '.join(map(repr, ENGINE_CHOICES))}, got {engine!r}"
        )
    act = activation if activation is not None else model.activation_function()
    if not isinstance(act, Activation):
        raise SpecificationError(
            f"'activation' must be an Activation, got {type(act).__name__}")
    if not isinstance(quadrature, Quadrature):
        quadrature = Quadrature.from_dict(quadrature)
    normalization.parameters(model.K)  # validates K for the normalization
    if rule is not None:
        from framework.learning_rule import LearningRule

        if not isinstance(rule, LearningRule):
            raise SpecificationError(
                f"'rule' must be a LearningRule or None, got {type(rule).__name__}")
        rule.check(model, normalization)
    wrap = None if rule is None or rule.engine_native else rule  # native: the engine itself
    names = list(ENGINES) if engine == "auto" else [engine]
    reasons = []
    for name in names:
        cls = ENGINES[name]
        why = cls.supports(model, normalization, act, params, rule=rule)
        if why is None:
            why = _structured_reason(cls, model, normalization, rule)
        if why is None:
            try:
                return _cached(cls, model, normalization, act, quadrature, wrap)
            except TypeError:  # an unhashable plugin instance
                return _build(cls, model, normalization, act, quadrature, wrap)
        reasons.append(f"{name}: {why}")
    under = f" under learning rule {rule.name!r}" if rule is not None else ""
    hint = "" if "generic" in names else "; use engine='generic'"
    raise ClosedFormUnavailable(
        f"no engine {engine!r} for activation {act.name!r} with normalization "
        f"{normalization.name!r}{under} ({'; '.join(reasons)}){hint}"
    )


def expectation_engine(
    model: Model,
    normalization: Normalization,
    quadrature: Quadrature | Mapping[str, Any] | None = None,
    *,
    engine: str = "auto",
    params: Mapping[str, Any] | None = None,
) -> Engine:
    """:func:`select_engine` with the quadrature as third argument (its former name and
    signature, kept for code written against it)."""
    return select_engine(model, normalization, engine=engine, quadrature=quadrature,
                         params=params)


def has_closed_form(
    model: Model, normalization: Normalization, activation: Activation | None = None
) -> bool:
    """True if the exact :class:`ClosedFormEngine` applies (at the initial parameters)."""
    act = activation if activation is not None else model.activation_function()
    return ClosedFormEngine.supports(model, normalization, act) is None


def generalization_error(
    model: Model,
    normalization: Normalization,
    order_parameters: OrderParameters,
    *,
    activation: Activation | None = None,
    engine: str = "auto",
    params: Mapping[str, Any] | None = None,
    quadrature: Quadrature | Mapping[str, Any] | None = None,
) -> float:
    """``eps_g`` at the given order parameters (noise term included).

    Exact with the closed form; with the generic engine an estimate whose error is
    within the quadrature's accuracy (else :class:`AccuracyError`).
    """
    op = order_parameters
    eng = select_engine(model, normalization, activation, engine=engine,
                        quadrature=quadrature, params=params)
    return eng.generalization_error(op.Q, op.R, params)[0]


def generalization_error_batch(
    model: Model,
    normalization: Normalization,
    Q: np.ndarray,
    R: np.ndarray,
    *,
    activation: Activation | None = None,
    engine: str = "auto",
    params: Mapping[str, Any] | None = None,
    quadrature: Quadrature | Mapping[str, Any] | None = None,
) -> np.ndarray:
    """``eps_g`` for stacks ``Q (..., K, K)``, ``R (..., K, M)``; returns shape ``(...)``.

    ``params`` maps parameter names to arrays ``(..., K)`` (or ``(K,)``).
    """
    Q = np.asarray(Q, dtype=float)
    R = np.asarray(R, dtype=float)
    lead = Q.shape[:-2]
    Qf = Q.reshape(-1, *Q.shape[-2:])
    Rf = R.reshape(-1, *R.shape[-2:])
    eng = select_engine(model, normalization, activation, engine=engine,
                        quadrature=quadrature, params=params)
    pf = {k: np.broadcast_to(np.asarray(v, dtype=float), (*lead, model.K)).reshape(
        -1, model.K) for k, v in (params or {}).items()}
    vals = [
        eng.generalization_error(q, r, {k: v[j] for k, v in pf.items()})[0]
        for j, (q, r) in enumerate(zip(Qf, Rf, strict=True))
    ]
    return np.asarray(vals, dtype=float).reshape(lead)


def ode_rhs(
    model: Model,
    normalization: Normalization,
    Q: np.ndarray,
    R: np.ndarray,
    eta: float,
    batch_size: int = 1,
    second_order: bool = True,
    *,
    activation: Activation | None = None,
    engine: str = "auto",
    params: Mapping[str, Any] | None = None,
    quadrature: Quadrature | Mapping[str, Any] | None = None,
    rule: LearningRule | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(dQ/dalpha, dR/dalpha)`` of the general ODE (DESIGN.md) at ``(Q, R)``.

    ``second_order=False`` drops the ``eta^2`` term (gradient-flow limit). For the
    parameters' rates and the error estimates use ``select_engine(...).rates(...)``.
    ``rule``: a learning rule (None: the plain gradient step, :func:`select_engine`).
    """
    eng = select_engine(model, normalization, activation, engine=engine,
                        quadrature=quadrature, params=params, rule=rule)
    r = eng.rates(Q, R, params, eta=eta, batch_size=batch_size, second_order=second_order)
    return r.dQ, r.dR


def integrate(
    model: Model,
    normalization: Normalization,
    initial: OrderParameters,
    *,
    eta: float,
    alpha: np.ndarray,
    activation: Activation | None = None,
    batch_size: int = 1,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    method: str = "DOP853",
    second_order: bool = True,
    max_value: float = 1e8,
    engine: str = "auto",
    params: Mapping[str, Any] | None = None,
    quadrature: Quadrature | Mapping[str, Any] | None = None,
    min_rtol: float = 1e-5,
    min_atol: float = 1e-8,
    stop_below: float | None = None,
    rule: LearningRule | None = None,
) -> Trajectory:
    """Integrate the order-parameter ODE from ``initial`` and report on the grid ``alpha``.

    Returns a :class:`Trajectory` (``alpha``, ``Q``, ``R``, ``eps_g``, ``eps_g_error``,
    ``params``, ``diverged``, ``alpha_diverged``, ``nfev``, ``message``, ``engine``,
    ``integrator``): on divergence (non-finite or huge values, ``Q`` losing positive
    definiteness) it stops and keeps the grid points reached. ``max_value`` bounds
    ``|Q|, |R|`` entries: beyond it the weights count as run away (divergent learning).

    An engine whose values are estimates (not :attr:`Engine.exact`) integrates with
    tolerances at least ``min_rtol``/``min_atol`` (tighter ones only resolve the
    quadrature's own error, ~1e-5 relative, at great cost). With an activation with a
    kink (relu) the quadrature's right-hand side is only piecewise smooth in the state:
    pass ``rtol=1e-4`` or more, else the adaptive step size chases those jumps.

    ``stop_below``: stop at the first reported grid point with ``eps_g`` below it.
    ``rule``: a learning rule (None: the plain gradient step, :func:`select_engine`).
    """
    eng = select_engine(model, normalization, activation, engine=engine,
                        quadrature=quadrature, params=params, rule=rule)
    if not eng.exact:
        rtol, atol = max(rtol, min_rtol), max(atol, min_atol)
    return eng.integrate(
        initial.Q, initial.R, eta=eta, alpha=np.asarray(alpha), params=params,
        batch_size=batch_size, rtol=rtol, atol=atol, method=method,
        second_order=second_order, max_value=max_value, stop_below=stop_below,
    )
