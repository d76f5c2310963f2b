"""An engine whose rates are those of a learning rule.

:func:`framework.theory.select_engine` returns the chosen engine itself for the plain
gradient step (a rule with ``engine_native``, or no rule) and wraps it in a
:class:`RuleEngine` otherwise: :meth:`RuleEngine.rates` asks the rule
(:meth:`framework.LearningRule.rates`), which computes from the wrapped engine's public
expectations; everything else (``eps_g``, weight-space gradients, held parameters) is
the wrapped engine's, and :meth:`Engine.integrate` integrates through the rule's rates
(scipy's solver; the compiled integrators know only the gradient step). Fixed points,
Jacobians and the escape geometry of :mod:`framework.theory.equilibrium`, written
against the interface, take a ``RuleEngine`` like any engine.

The valid states of a run under a rule are those of the joint cone: the covariance
``[[Q, R], [R^T, T]]`` positive semidefinite (within ``SEMIDEFINITE_TOL * max(1, max
|entry|)``), not only ``Q`` (:meth:`RuleEngine._state_status`). A rule's rates are
computed from a realization of the state (e.g. the natural gradient's Fisher), which
exists only there: trial steps beyond are rejected, and a run stopped at the boundary
(the rule's flow leading out) says so in its message, the rows inside the cone kept.
E.g. the damped natural gradient near the optimum, a corner of the joint cone (the
student equals the teacher), where a state crossed by the integrator's error sits on a
line of fixed points of the rule's extension beyond the cone (the realization's
``Z = sqrt(T - Y Y^T)`` clipped at 0: a teacher the student matches) and drifted out:
``eps_g`` went to -2e-3 before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from framework.theory._kernels import _STATUS_MESSAGES, SEMIDEFINITE_TOL
from framework.theory.base import Engine, Rates, Trajectory, WrappedEngine
from framework.validators import SpecificationError

if TYPE_CHECKING:
    from framework.learning_rule import LearningRule

__all__ = ["RuleEngine"]


class RuleEngine(WrappedEngine):
    """``base`` with the rates of ``rule`` (module docstring).

    ``name``, ``exact`` and ``semidefinite`` are the wrapped engine's (results record
    the engine that computed the expectations, and the rule in their attrs).
    """

    def __init__(self, base: Engine, rule: LearningRule) -> None:
        super().__init__(base)
        self.rule = rule
        #: the rule's rates are analytic a little beyond the PSD cone (on an exact engine)
        self.analytic_beyond_cone = bool(rule.analytic_beyond_cone)
        #: (smallest eigenvalue, max |R|) of the last state outside the joint cone
        self._outside: tuple[float, float] | None = None

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
        """The rule's rates from the wrapped engine's expectations."""
        return self.rule.rates(self.base, Q, R, params, eta=eta, batch_size=batch_size,
                               second_order=second_order, check=check)

    def generalization_error(
        self, Q: Any, R: Any, params: Mapping[str, Any] | None = None, *, check: bool = True,
        mean: Any = None, weights_gram: Any = None,
    ) -> tuple[float, float]:
        """The wrapped engine's."""
        return self.base.generalization_error(Q, R, params, check=check, mean=mean,
                                              weights_gram=weights_gram)

    def weight_moments(
        self, X: Any, Bt: Any, params: Mapping[str, Any] | None = None, *,
        landscape: bool = True, shift: Any = None, weights_metric: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The wrapped engine's (the loss landscape does not depend on the rule)."""
        return self.base.weight_moments(X, Bt, params, landscape=landscape, shift=shift,
                                        weights_metric=weights_metric)

    def weight_moments_stack(
        self, Xs: Any, Bt: Any, params: Mapping[str, Any] | None = None, *,
        landscape: bool = True, shift: Any = None, weights_metric: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The wrapped engine's."""
        return self.base.weight_moments_stack(Xs, Bt, params, landscape=landscape,
                                              shift=shift, weights_metric=weights_metric)

    def held_hessian(
        self, Q: Any, R: Any, params: Mapping[str, Any] | None = None
    ) -> np.ndarray:
        """The wrapped engine's."""
        return self.base.held_hessian(Q, R, params)

    def _joint_margin(self, Q: np.ndarray, R: np.ndarray) -> tuple[float, float]:
        """Smallest eigenvalue of ``[[Q, R], [R^T, T]]`` and the tolerance below 0
        (``SEMIDEFINITE_TOL * max(1, max |entry|)``)."""
        joint = np.block([[0.5 * (Q + Q.T), R], [R.T, self.T]])
        tol = SEMIDEFINITE_TOL * max(1.0, float(np.max(np.abs(joint))))
        return float(np.linalg.eigvalsh(joint)[0]), tol

    def _state_status(self, y: np.ndarray, max_value: float) -> int:
        """The base checks, then the joint cone: the covariance ``[[Q, R], [R^T, T]]``
        PSD within ``SEMIDEFINITE_TOL * max(1, max |entry|)``, else 3 (the integrator
        rejects such trial states; :meth:`integrate` names the cause)."""
        code = super()._state_status(y, max_value)
        if code:
            return code
        Q, R, _ = self.unpack(y)
        lam, tol = self._joint_margin(Q, R)
        if lam < -tol:
            self._outside = (lam, float(np.max(np.abs(R))))  # the last state refused
            return 3
        return 0

    def integrate(self, Q0: Any, R0: Any, *args: Any, **kwargs: Any) -> Trajectory:
        """:meth:`Engine.integrate` in the joint cone: an initial state outside it is
        refused; a run stopped at its boundary says so in ``message``."""
        Q0, R0 = np.asarray(Q0, dtype=float), np.asarray(R0, dtype=float)
        lam, tol = self._joint_margin(Q0, R0)
        if lam < -tol:
            raise SpecificationError(
                f"the initial state is outside the joint cone: the covariance [[Q, R], "
                f"[R^T, T]] must be positive semidefinite (within {tol:.3g}), got smallest "
                f"eigenvalue {lam:.3g}; the rule {self.rule.name!r} needs a realization")
        self._outside = None
        tr = super().integrate(Q0, R0, *args, **kwargs)
        if tr.diverged and self._outside is not None and tr.message == _STATUS_MESSAGES[4]:
            lam, r = self._outside  # the steps were cut back at the joint cone's boundary
            # rows already beyond the boundary (within the trial tolerance) are not the
            # order parameters of a network (their eps_g can be negative): not reported
            n = tr.alpha.size
            while n > 1 and self._joint_margin(tr.Q[n - 1], tr.R[n - 1])[0] < 0.0:
                n -= 1
            tr = dataclasses.replace(
                tr, alpha=tr.alpha[:n], Q=tr.Q[:n], R=tr.R[:n], eps_g=tr.eps_g[:n],
                eps_g_error=tr.eps_g_error[:n], params={k: v[:n] for k, v in tr.params.items()},
                spaces={k: v[:n] for k, v in tr.spaces.items()}, message=(
                    f"{tr.message}: the rule's flow leads out of the joint cone at alpha = "
                    f"{tr.alpha_diverged:.6g} (trial states with [[Q, R], [R^T, T]] not "
                    f"positive semidefinite, smallest eigenvalue down to {lam:.3g}, max |R| = "
                    f"{r:.3g}, were refused: no network realizes them); the rows inside the "
                    f"cone are kept, the last at alpha = {tr.alpha[n - 1]:.6g} with eps_g = "
                    f"{tr.eps_g[n - 1]:.3g}"))
        return tr

    def describe(self) -> str:
        """The wrapped engine's description and the rule's."""
        return f"{self.base.describe()}; learning rule {self.rule.name!r}: {self.rule.describe()}"

    def attrs(self) -> dict[str, Any]:
        """The wrapped engine's attrs (description included) and the rule's."""
        return {**self.base.attrs(), "engine_description": self.describe(),
                **self.rule.attrs()}
