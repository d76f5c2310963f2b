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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from framework.theory.base import Engine, Rates

if TYPE_CHECKING:
    from framework.activation import Activation
    from framework.learning_rule import LearningRule
    from framework.model import Model
    from framework.normalization import Normalization

__all__ = ["RuleEngine"]


class RuleEngine(Engine):
    """``base`` with the rates of ``rule`` (module docstring).

    ``name``, ``exact`` and ``semidefinite`` are the wrapped engine's (results record
    the engine that computed the expectations, and the rule in their attrs).
    """

    def __init__(self, base: Engine, rule: LearningRule) -> None:
        super().__init__(base.model, base.normalization, base.activation)
        self.base, self.rule = base, rule
        self.name = base.name  # type: ignore[misc]
        self.exact = base.exact  # type: ignore[misc]
        self.semidefinite = base.semidefinite  # type: ignore[misc]
        self.trainable, self.held = base.trainable, base.held
        self.initial_params = dict(base.initial_params)
        #: the wrapped engine's accuracy settings (None for an exact engine)
        self.quadrature = getattr(base, "quadrature", None)
        #: the rule's rates are analytic a little beyond the PSD cone (on an exact engine)
        self.analytic_beyond_cone = bool(rule.analytic_beyond_cone)

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
        self, Q: Any, R: Any, params: Mapping[str, Any] | None = None, *, check: bool = True
    ) -> tuple[float, float]:
        """The wrapped engine's."""
        return self.base.generalization_error(Q, R, params, check=check)

    def weight_moments(
        self, X: Any, Bt: Any, params: Mapping[str, Any] | None = None, *,
        landscape: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The wrapped engine's (the loss landscape does not depend on the rule)."""
        return self.base.weight_moments(X, Bt, params, landscape=landscape)

    def weight_moments_stack(
        self, Xs: Any, Bt: Any, params: Mapping[str, Any] | None = None, *,
        landscape: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The wrapped engine's."""
        return self.base.weight_moments_stack(Xs, Bt, params, landscape=landscape)

    def held_hessian(
        self, Q: Any, R: Any, params: Mapping[str, Any] | None = None
    ) -> np.ndarray:
        """The wrapped engine's."""
        return self.base.held_hessian(Q, R, params)

    def describe(self) -> str:
        """The wrapped engine's description and the rule's."""
        return f"{self.base.describe()}; learning rule {self.rule.name!r}: {self.rule.describe()}"

    def attrs(self) -> dict[str, Any]:
        """The wrapped engine's attrs (description included) and the rule's."""
        return {**self.base.attrs(), "engine_description": self.describe(),
                **self.rule.attrs()}
