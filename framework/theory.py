"""Order-parameter theory for an (model, normalization) pair.

This is the public face of the theory engine. It chooses the exact closed form
(erf activation and a normalization of the diagonal-scale family,
``x~_i = s_i(Q) x_i``) and otherwise raises :class:`ClosedFormUnavailable`
(the generic numerical engine plugs in here).

Conventions: ``eps_g = E[(zeta - sigma)^2] / 2`` *including* the output noise
variance ``model.noise / 2``; time ``alpha = steps / N``; learning rate ``eta`` as in
:class:`~framework.Experiment`; minibatch gradients averaged (the ``eta^2`` term of
``dQ/dalpha`` is divided by the batch size).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from framework import _theory
from framework.manager import get_activation
from framework.model import OrderParameters, TeacherStudent
from framework.normalization import Normalization

__all__ = [
    "ClosedFormUnavailable",
    "generalization_error",
    "generalization_error_batch",
    "has_closed_form",
    "integrate",
    "ode_rhs",
    "scale_functions",
]

ScaleFn = Callable[[np.ndarray], np.ndarray]


class ClosedFormUnavailable(NotImplementedError):
    """No closed form applies to this (activation, normalization) pair."""


def has_closed_form(model: TeacherStudent, normalization: Normalization) -> bool:
    """True for the erf activation with a diagonal-scale normalization."""
    return (
        get_activation(model.activation).closed_form == "erf"
        and normalization.is_diagonal_scale()
    )


def scale_functions(
    model: TeacherStudent, normalization: Normalization
) -> tuple[ScaleFn, ScaleFn]:
    """``(s(Q), ds/dQ(Q))`` of the normalization at its initial parameter values."""
    if not has_closed_form(model, normalization):
        raise ClosedFormUnavailable(
            f"no closed form for activation {model.activation!r} with normalization "
            f"{normalization.name!r} (needs 'erf' and a diagonal-scale normalization)"
        )
    params = normalization.parameters(model.K)

    def scale(Q: np.ndarray) -> np.ndarray:
        return normalization.scale(Q, params)

    def jacobian(Q: np.ndarray) -> np.ndarray:
        return normalization.scale_jacobian(Q, params)

    return scale, jacobian


def generalization_error(
    model: TeacherStudent, normalization: Normalization, order_parameters: OrderParameters
) -> float:
    """Exact ``eps_g`` at the given order parameters (noise term included)."""
    scale, _ = scale_functions(model, normalization)
    op = order_parameters
    return float(
        _theory.generalization_error(op.Q, op.R, op.T, scale(op.Q), noise_var=model.noise)
    )


def generalization_error_batch(
    model: TeacherStudent, normalization: Normalization, Q: np.ndarray, R: np.ndarray
) -> np.ndarray:
    """``eps_g`` for stacks ``Q (..., K, K)``, ``R (..., K, M)``; returns shape ``(...)``."""
    scale, _ = scale_functions(model, normalization)
    Q = np.asarray(Q, dtype=float)
    R = np.asarray(R, dtype=float)
    lead = Q.shape[:-2]
    Qf = Q.reshape(-1, *Q.shape[-2:])
    Rf = R.reshape(-1, *R.shape[-2:])
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
) -> tuple[np.ndarray, np.ndarray]:
    """``(dQ/dalpha, dR/dalpha)`` of the general ODE (DESIGN.md) at ``(Q, R)``.

    ``second_order=False`` drops the ``eta^2`` term (gradient-flow limit).
    """
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
) -> _theory.TheoryTrajectory:
    """Integrate the order-parameter ODE from ``initial`` and report on the grid ``alpha``.

    Returns a :class:`TheoryTrajectory` (``alpha``, ``Q``, ``R``, ``eps_g``,
    ``diverged``, ``alpha_diverged``, ``nfev``, ``message``): on divergence
    (non-finite or huge values, ``Q`` losing positive definiteness) it stops and keeps
    the grid points reached. ``max_value`` bounds ``|Q|, |R|`` entries: beyond it the
    weights count as run away (divergent learning).
    """
    if not has_closed_form(model, normalization):
        scale_functions(model, normalization)  # raises ClosedFormUnavailable
    plain = not normalization.scale_invariant and _is_identity(model, normalization, initial)
    scale, jac = (None, None) if plain else scale_functions(model, normalization)
    return _theory.integrate_diagonal_scale(
        initial.Q, initial.R, model.T, scale, jac,
        eta=eta, batch_size=batch_size, noise_var=model.noise, alpha=np.asarray(alpha),
        rtol=rtol, atol=atol, method=method, second_order=second_order, max_value=max_value,
    )


def _is_identity(
    model: TeacherStudent, normalization: Normalization, op: OrderParameters
) -> bool:
    """True if ``s(Q) == 1`` with zero Jacobian at a probe point (the plain fast path)."""
    scale, jac = scale_functions(model, normalization)
    probe = op.Q + np.eye(model.K)
    return bool(np.all(scale(probe) == 1.0) and np.all(jac(probe) == 0.0))
