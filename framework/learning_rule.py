"""The interface every learning-rule plugin implements.

A learning rule says how a step is taken from the per-sample loss gradient. The
framework's conventions (DESIGN.md) are those of online SGD: a step ``eta / sqrt(N)``
on ``J`` along the gradient, i.e. ``dW = -(eta / N) grad_W eps`` in ``W = J /
sqrt(N)``, time ``alpha = steps / N``. A rule replaces the gradient by an update
*direction* ``D``: ``J <- J - eta D`` in the finite-``N`` simulation, and gives the
order-parameter rates of the ``N -> infinity`` limit through the expectations of an
:class:`~framework.theory.Engine`. Rules are registered with the
``symphase_register_learning_rules`` hook and chosen by
``Experiment(learning_rule=...)`` (default ``"sgd"``).

What a subclass must implement
------------------------------
``name`` and ``description`` (class attributes), :meth:`rates` (the ODE's right-hand
side on an engine) and :meth:`direction` (the simulation's update direction).

What is optional
----------------
``engine_native = True`` declares that the engines' own :meth:`Engine.rates
<framework.theory.Engine.rates>` *are* this rule's (the plain gradient step): then
:func:`framework.theory.select_engine` returns the engine itself (its compiled
integrator included) and the simulation's compiled kernel applies. :meth:`check`
refuses a (model, normalization) pair the rule cannot train (e.g. trainable
parameters), :meth:`supports` an engine class that cannot integrate the rule (asked by
:func:`framework.theory.select_engine`, which falls back to the next engine).

Subclasses are frozen attrs classes whose fields are the rule's options, validated
strictly (:mod:`framework.validators`: a wrong type is refused naming the field).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from framework._named import Named

if TYPE_CHECKING:
    from framework.activation import Activation
    from framework.model import Model
    from framework.normalization import Normalization
    from framework.theory.base import Engine, Rates

__all__ = ["LearningRule"]


class LearningRule(Named):
    """Base class of learning rules (see the module docstring for the contract)."""

    #: Registry name, e.g. ``"sgd"``.
    name: ClassVar[str] = ""
    kind: ClassVar[str] = "learning_rule"
    #: One-line description shown by ``symphase plugins``.
    description: ClassVar[str] = ""
    #: True if :meth:`Engine.rates <framework.theory.Engine.rates>` are this rule's rates
    #: (the plain gradient step): engines and compiled kernels are used as they are.
    engine_native: ClassVar[bool] = False
    #: True if :meth:`rates` on an exact engine are analytic a little beyond the PSD cone
    #: of the state, like the engines' closed forms (e.g. the engine's rates at another
    #: ``eta``); False (default) makes :func:`framework.theory.equilibrium.ode_jacobian`
    #: keep its finite-difference steps inside the cone, as for an engine of estimates.
    analytic_beyond_cone: ClassVar[bool] = False

    # -- capability ------------------------------------------------------------------
    def check(self, model: Model, normalization: Normalization) -> None:
        """Raise :class:`~framework.SpecificationError` if the rule cannot train this
        (model, normalization) pair (default: accept)."""

    def supports(
        self,
        engine: type[Engine],
        model: Model,
        normalization: Normalization,
        activation: Activation,
    ) -> str | None:
        """None if the engine class can integrate this rule for the triple, else the
        reason (one phrase); asked by each engine's ``supports`` (default: None)."""
        return None

    # -- the theory ------------------------------------------------------------------
    def rates(
        self,
        engine: Engine,
        Q: Any,
        R: Any,
        params: Mapping[str, Any] | None = None,
        *,
        eta: float,
        batch_size: int = 1,
        second_order: bool = True,
        check: bool = True,
    ) -> Rates:
        """The order-parameter rates of this rule at ``(Q, R)`` from ``engine``'s
        expectations (its public methods); the arguments are those of
        :meth:`Engine.rates <framework.theory.Engine.rates>`."""
        raise NotImplementedError(f"learning rule {self.name!r} must implement rates()")

    # -- the simulation ----------------------------------------------------------------
    def direction(
        self, model: Model, normalization: Normalization, J: np.ndarray, grad: np.ndarray,
        state: dict[str, Any],
    ) -> np.ndarray:
        """The update direction ``D`` of one step, ``J <- J - eta D``.

        ``J``: the student weights ``(P, K, N)`` (``P`` replicas, components O(1));
        ``grad``: the minibatch mean of ``grad_J`` of the loss at ``J``, same shape
        (gradient through the statistics included). Weight decay is not part of it (the
        simulation adds ``-(lambda / N) J`` to the step). ``state``: a dict the caller
        keeps for one run (empty at its first step), where a rule with memory keeps it
        (e.g. a velocity). Returns an array of the same shape; it may be ``grad`` itself.
        """
        raise NotImplementedError(f"learning rule {self.name!r} must implement direction()")

    # -- description -----------------------------------------------------------------
    def describe(self) -> str:
        """One line for attrs (default: the description)."""
        return self.description

    def attrs(self) -> dict[str, Any]:
        """What the rule writes into a result's attrs (strings and numbers)."""
        return {"learning_rule": self.name,
                "learning_rule_json": json.dumps(self.to_dict(), sort_keys=True),
                "learning_rule_description": self.describe()}
