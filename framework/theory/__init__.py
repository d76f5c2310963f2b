"""Order-parameter theory for an (model, normalization) pair.

This is the public face of the theory engines. Every function takes ``engine``:

* ``"auto"`` (default): the exact closed form when :func:`has_closed_form` (erf
  activation, a normalization of the diagonal-scale family ``x~_i = s_i(Q) x_i``,
  no trainable parameters) or :func:`has_closed_form_parameters` (the same with
  trainable parameters that are parameters of the scale, ``s_i(Q, theta)``, or
  shifts held at 0: the exact :class:`ClosedFormEngine`, parameters as extra state),
  else the generic engine;
* ``"closed_form"``: the closed form, or :class:`ClosedFormUnavailable`;
* ``"generic"``: the generic expectation engine (:class:`ExpectationEngine`), which
  evaluates the general ODE of DESIGN.md for any normalization and activation from
  the normalization's per-sample ``forward``/``backward`` by randomized quasi-Monte
  Carlo with common random numbers. Its accuracy is set by a :class:`Quadrature`
  (``quadrature=``); when an error estimate exceeds the requested accuracy it raises
  :class:`AccuracyError` rather than return noise.

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
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from framework._validation import SpecificationError
from framework.manager import get_activation
from framework.model import OrderParameters, TeacherStudent
from framework.normalization import Normalization
from framework.theory import _kernels as _theory
from framework.theory.closed import ClosedFormEngine, supports_closed_form_parameters
from framework.theory.quadrature import (
    AccuracyError,
    ExpectationEngine,
    GenericRates,
    GenericTrajectory,
    Quadrature,
)

__all__ = [
    "ENGINES",
    "AccuracyError",
    "ClosedFormEngine",
    "ClosedFormUnavailable",
    "ExpectationEngine",
    "GenericRates",
    "GenericTrajectory",
    "Quadrature",
    "expectation_engine",
    "generalization_error",
    "generalization_error_batch",
    "has_closed_form",
    "has_closed_form_parameters",
    "integrate",
    "ode_rhs",
    "scale_functions",
]

ScaleFn = Callable[[np.ndarray], np.ndarray]


#: Values of the ``engine`` argument.
ENGINES = ("auto", "closed_form", "generic")


class ClosedFormUnavailable(NotImplementedError):
    """No closed form applies to this (activation, normalization) pair."""


def has_closed_form(model: TeacherStudent, normalization: Normalization) -> bool:
    """True for the erf activation with a diagonal-scale normalization without
    trainable parameters (their dynamics has no closed form here)."""
    return (
        get_activation(model.activation).closed_form == "erf"
        and normalization.is_diagonal_scale()
        and not normalization.trainable
    )


def has_closed_form_parameters(model: TeacherStudent, normalization: Normalization) -> bool:
    """True for the erf activation with a diagonal-scale normalization whose trainable
    parameters are all ``scale_parameters`` or ``shift_parameters`` (at 0): the exact
    :class:`ClosedFormEngine` integrates them as extra state."""
    return (
        get_activation(model.activation).closed_form == "erf"
        and supports_closed_form_parameters(normalization)
    )


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise SpecificationError(
            f"'engine' must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}"
        )


def _use_generic(model: TeacherStudent, normalization: Normalization, engine: str) -> bool:
    """Resolve ``engine`` for the parameter-free closed form: True means "use an engine
    object" (:func:`expectation_engine`, which may still be the exact
    :class:`ClosedFormEngine`); raises for an unknown value or an impossible closed
    form."""
    _check_engine(engine)
    if engine == "generic":
        return True
    closed = has_closed_form(model, normalization)
    if engine == "closed_form" and not closed and \
            not has_closed_form_parameters(model, normalization):
        raise ClosedFormUnavailable(_no_closed_form(model, normalization))
    return not closed


def _no_closed_form(model: TeacherStudent, normalization: Normalization) -> str:
    why = ("has trainable parameters that are neither scale_parameters nor "
           "shift_parameters") if normalization.trainable and \
        normalization.is_diagonal_scale() else "is not of the diagonal-scale family"
    if get_activation(model.activation).closed_form != "erf":
        why = f"activation {model.activation!r} has no closed form"
    return (
        f"no closed form for activation {model.activation!r} with normalization "
        f"{normalization.name!r} ({why}; needs 'erf' and a diagonal-scale normalization); "
        "use engine='generic'"
    )


def _shift_is_zero(normalization: Normalization, params: Mapping[str, Any] | None) -> bool:
    return all(
        np.all(np.asarray(v, dtype=float) == 0.0)
        for k, v in (params or {}).items() if k in normalization.shift_parameters
    )


@functools.lru_cache(maxsize=16)
def _closed_engine_cached(model: TeacherStudent, normalization: Normalization) -> ClosedFormEngine:
    return ClosedFormEngine(model, normalization, get_activation(model.activation))


@functools.lru_cache(maxsize=16)
def _engine_cached(
    model: TeacherStudent, normalization: Normalization, quadrature: Quadrature
) -> ExpectationEngine:
    return ExpectationEngine(model, normalization, get_activation(model.activation), quadrature)


def expectation_engine(
    model: TeacherStudent,
    normalization: Normalization,
    quadrature: Quadrature | Mapping[str, Any] | None = None,
    *,
    engine: str = "auto",
    params: Mapping[str, Any] | None = None,
) -> ExpectationEngine:
    """The engine object for this pair (cached per model, normalization, quadrature).

    With ``engine="auto"`` (or ``"closed_form"``) and :func:`has_closed_form_parameters`
    (and the shift parameters in ``params``, if given, at 0) this is the exact
    :class:`ClosedFormEngine` (trainable parameters as state, errors 0, no quadrature);
    otherwise the generic :class:`ExpectationEngine` (``engine="closed_form"`` then
    raises :class:`ClosedFormUnavailable`).

    ``quadrature`` is a :class:`Quadrature`, a mapping of its options, or None
    (defaults; unused by the exact engine). The engine's ``rates(Q, R, params,
    eta=...)`` returns the right-hand side with error estimates
    (:class:`GenericRates`), ``generalization_error(Q, R)`` returns ``(eps_g, error)``,
    ``integrate(...)`` a :class:`GenericTrajectory`; ``name`` is ``"closed_form"`` or
    ``"generic"`` and ``describe()`` a line for attrs.
    """
    _check_engine(engine)
    if not isinstance(quadrature, Quadrature):
        quadrature = Quadrature.from_dict(quadrature)
    normalization.parameters(model.K)  # validates K for the normalization
    if engine != "generic" and has_closed_form_parameters(model, normalization) \
            and _shift_is_zero(normalization, params):
        try:
            return _closed_engine_cached(model, normalization)
        except TypeError:  # an unhashable plugin instance
            return ClosedFormEngine(model, normalization, get_activation(model.activation))
    if engine == "closed_form":
        raise ClosedFormUnavailable(_no_closed_form(model, normalization))
    try:
        return _engine_cached(model, normalization, quadrature)
    except TypeError:  # an unhashable plugin instance
        return ExpectationEngine(
            model, normalization, get_activation(model.activation), quadrature
        )


def scale_functions(
    model: TeacherStudent, normalization: Normalization
) -> tuple[ScaleFn, ScaleFn]:
    """``(s(Q), ds/dQ(Q))`` of the normalization at its initial parameter values.

    Only where the closed form applies (:func:`has_closed_form`); otherwise raises
    :class:`ClosedFormUnavailable` -- callers use it as the gate of closed-form code,
    so it never returns a scale the erf formulas would misuse. (The generic engine
    needs no scale: ``expectation_engine`` / ``engine="generic"``.)
    """
    params = normalization.parameters(model.K)  # validates K for the normalization
    if not has_closed_form(model, normalization):
        raise ClosedFormUnavailable(_no_closed_form(model, normalization))

    def scale(Q: np.ndarray) -> np.ndarray:
        return normalization.scale(Q, params)

    def jacobian(Q: np.ndarray) -> np.ndarray:
        return normalization.scale_jacobian(Q, params)

    return scale, jacobian


def generalization_error(
    model: TeacherStudent,
    normalization: Normalization,
    order_parameters: OrderParameters,
    *,
    engine: str = "auto",
    params: Mapping[str, Any] | None = None,
    quadrature: Quadrature | Mapping[str, Any] | None = None,
) -> float:
    """``eps_g`` at the given order parameters (noise term included).

    Exact with the closed form; with the generic engine an estimate whose error is
    within the quadrature's accuracy (else :class:`AccuracyError`). ``params``
    (normalization parameter values) needs the generic engine.
    """
    op = order_parameters
    if params is not None or _use_generic(model, normalization, engine):
        eng = expectation_engine(model, normalization, quadrature, engine=engine,
                                 params=params)
        return eng.generalization_error(op.Q, op.R, params)[0]
    scale, _ = scale_functions(model, normalization)
    return float(
        _theory.generalization_error(op.Q, op.R, op.T, scale(op.Q), noise_var=model.noise)
    )


def generalization_error_batch(
    model: TeacherStudent,
    normalization: Normalization,
    Q: np.ndarray,
    R: np.ndarray,
    *,
    engine: str = "auto",
    params: Mapping[str, Any] | None = None,
    quadrature: Quadrature | Mapping[str, Any] | None = None,
) -> np.ndarray:
    """``eps_g`` for stacks ``Q (..., K, K)``, ``R (..., K, M)``; returns shape ``(...)``.

    ``params`` maps parameter names to arrays ``(..., K)`` (or ``(K,)``), generic
    engine only.
    """
    Q = np.asarray(Q, dtype=float)
    R = np.asarray(R, dtype=float)
    lead = Q.shape[:-2]
    Qf = Q.reshape(-1, *Q.shape[-2:])
    Rf = R.reshape(-1, *R.shape[-2:])
    if params is not None or _use_generic(model, normalization, engine):
        eng = expectation_engine(model, normalization, quadrature, engine=engine,
                                 params=params)
        pf = {k: np.broadcast_to(np.asarray(v, dtype=float), (*lead, model.K)).reshape(
            -1, model.K) for k, v in (params or {}).items()}
        vals = [
            eng.generalization_error(q, r, {k: v[j] for k, v in pf.items()})[0]
            for j, (q, r) in enumerate(zip(Qf, Rf, strict=True))
        ]
        return np.asarray(vals, dtype=float).reshape(lead)
    scale, _ = scale_functions(model, normalization)
    out = np.array(
        [
            _theory.generalization_error(q, r, model.T, scale(q), noise_var=model.noise)
            for q, r in zip(Qf, Rf, strict=True)
        ]
    )
    return out.reshape(lead)


def ode_rhs(
    model: TeacherStudent,
    normalization: Normalization,
    Q: np.ndarray,
    R: np.ndarray,
    eta: float,
    batch_size: int = 1,
    second_order: bool = True,
    *,
    engine: str = "auto",
    params: Mapping[str, Any] | None = None,
    quadrature: Quadrature | Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(dQ/dalpha, dR/dalpha)`` of the general ODE (DESIGN.md) at ``(Q, R)``.

    ``second_order=False`` drops the ``eta^2`` term (gradient-flow limit). For the
    parameters' rates and the error estimates use
    ``expectation_engine(...).rates(...)``.
    """
    if params is not None or _use_generic(model, normalization, engine):
        eng = expectation_engine(model, normalization, quadrature, engine=engine,
                                 params=params)
        r = eng.rates(Q, R, params, eta=eta, batch_size=batch_size, second_order=second_order)
        return r.dQ, r.dR
    scale, jac = scale_functions(model, normalization)
    return _theory.ode_rhs(
        Q, R, model.T, scale(Q), jac(Q), eta,
        batch_size=batch_size, noise_var=model.noise, second_order=second_order,
    )


def integrate(
    model: TeacherStudent,
    normalization: Normalization,
    initial: OrderParameters,
    *,
    eta: float,
    alpha: np.ndarray,
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
) -> _theory.TheoryTrajectory | GenericTrajectory:
    """Integrate the order-parameter ODE from ``initial`` and report on the grid ``alpha``.

    Returns a :class:`TheoryTrajectory` (``alpha``, ``Q``, ``R``, ``eps_g``,
    ``diverged``, ``alpha_diverged``, ``nfev``, ``message``, ``engine``): on divergence
    (non-finite or huge values, ``Q`` losing positive definiteness) it stops and keeps
    the grid points reached. ``max_value`` bounds ``|Q|, |R|`` entries: beyond it the
    weights count as run away (divergent learning).

    With an engine object (generic engine, or trainable parameters: the exact
    :class:`ClosedFormEngine`, ``engine = "closed_form"``) the result is a
    :class:`GenericTrajectory`: the same fields plus ``params`` (trajectories of the
    trainable parameters, starting from ``params`` or the initial values),
    ``eps_g_error`` and ``quadrature``; the generic engine's integrator tolerances are
    at least ``min_rtol``/``min_atol`` (tighter ones only resolve the quadrature's own
    error, ~1e-5 relative, at great cost). With an
    activation with a kink (relu) the quadrature's right-hand side is only piecewise
    smooth in the state (each sample's ``g'`` jumps as it crosses the kink): pass
    ``rtol=1e-4`` or more, else the adaptive step size chases those jumps.

    ``stop_below`` (engine objects only; the parameter-free closed form, which is cheap,
    always fills the grid): stop at the first reported grid point with ``eps_g`` below
    it (see :meth:`ExpectationEngine.integrate`).
    """
    if params is not None or _use_generic(model, normalization, engine):
        eng = expectation_engine(model, normalization, quadrature, engine=engine,
                                 params=params)
        if not eng.exact:
            rtol, atol = max(rtol, min_rtol), max(atol, min_atol)
        return eng.integrate(
            initial.Q, initial.R, eta=eta, alpha=np.asarray(alpha), params=params,
            batch_size=batch_size, rtol=rtol, atol=atol,
            method=method, second_order=second_order, max_value=max_value,
            stop_below=stop_below,
        )
    scale, jac = scale_functions(model, normalization)
    plain = not normalization.scale_invariant and _is_identity(scale, jac, initial.Q)
    return _theory.integrate_diagonal_scale(
        initial.Q, initial.R, model.T, None if plain else scale, None if plain else jac,
        eta=eta, batch_size=batch_size, noise_var=model.noise, alpha=np.asarray(alpha),
        rtol=rtol, atol=atol, method=method, second_order=second_order, max_value=max_value,
    )


def _is_identity(scale: ScaleFn, jac: ScaleFn, Q: np.ndarray) -> bool:
    """True if ``s(Q) == 1`` with zero Jacobian at a probe point (the plain fast path)."""
    probe = Q + np.eye(Q.shape[0])
    return bool(np.all(scale(probe) == 1.0) and np.all(jac(probe) == 0.0))
