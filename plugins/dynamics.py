"""The ``dynamics`` analyzer: the order-parameter ODE integrated over alpha, under the
experiment's learning rule (``learning_rule`` attrs; a rule other than ``sgd``
integrates on scipy's solver through the rule's rates)."""

from __future__ import annotations

from typing import ClassVar

import attrs
import numpy as np
import xarray as xr

from framework import Analyzer, Experiment, SpecificationError, hookimpl, theory
from framework.datasets import trajectory_dataset
from framework.validators import (
    alpha_grid_option,
    boolean,
    check_int,
    check_real,
    gt,
    integer,
    one_of,
    quadrature_option,
    to_bool,
    to_float,
)


def alpha_grid(
    alpha: tuple[float, ...] | None, alpha_max: float, n_points: int, alpha_min: float
) -> np.ndarray:
    """``alpha`` if given, else ``0`` followed by ``n_points - 1`` log-spaced values."""
    if alpha is not None:
        return np.asarray(alpha)
    n_points = check_int("n_points", n_points, minimum=2)
    if n_points > theory.GRID_LIMIT:
        raise SpecificationError(
            f"'n_points' must be <= {theory.GRID_LIMIT}, got {n_points}")
    alpha_max = check_real("alpha_max", alpha_max, minimum=0.0, strict=True)
    if alpha_max > theory.ALPHA_LIMIT:
        raise SpecificationError(
            f"'alpha_max' must be <= {theory.ALPHA_LIMIT:g} (an explicit integrator needs "
            f"~alpha * eta steps once converged), got {alpha_max:g}")
    if not alpha_min < alpha_max:
        raise SpecificationError(
            f"'alpha_min' must be < alpha_max = {alpha_max}, got {alpha_min}"
        )
    return np.concatenate([[0.0], np.geomspace(alpha_min, alpha_max, n_points - 1)])


@attrs.frozen
class Dynamics(Analyzer):
    """Integrate the order-parameter ODE (N -> infinity) from the experiment's init.

    Parameters
    ----------
    alpha : sequence of float, optional
        Explicit report grid (strictly increasing, starts the integration).
    alpha_max : float
        Last time of the default grid: 0 then ``n_points - 1`` log-spaced values
        from ``alpha_min`` to ``alpha_max``.
    n_points, alpha_min : int, float
        The default grid's size and first positive time.
    rtol, atol : float
        Tolerances of the adaptive integrator (DOP853 by default).
    method : str
        "DOP853", "RK45", "LSODA", "Radau" or "BDF".
    second_order : bool
        Keep the ``eta^2`` term; False is the small-learning-rate (gradient-flow) limit.
    max_value : float
        Divergence threshold: the run stops, marked ``diverged``, when an entry of ``Q``
        or ``R`` exceeds it in magnitude (or turns non-finite, or ``Q`` loses positive
        semi-definiteness, or the rates turn non-finite, or an estimating engine loses
        its accuracy after the start). Sustained growth below it is flagged as
        ``runaway`` (:data:`framework.datasets.RUNAWAY_RULE`).
    quadrature : mapping, optional
        Options of the generic engine's :class:`~framework.theory.Quadrature` (e.g.
        ``{"samples": 16384}``); ignored by the exact engine.

    The horizon is bounded: ``alpha_max <= 1e8``, ``alpha_max * max(eta, eta_v) <=
    1e7``, ``n_points <= 1e6`` (:func:`framework.theory.check_horizon`).
    """

    name: ClassVar[str] = "dynamics"
    description: ClassVar[str] = "order-parameter ODE over alpha (exact N -> infinity theory)"
    size_options: ClassVar[dict[str, str]] = {"n_points": "trajectory"}
    #: The experiment's learning rule is applied (framework.LearningRule).
    supports_learning_rules: ClassVar[bool] = True
    #: The model's input distribution is applied (structured inputs, framework.inputs).
    supports_structured_inputs: ClassVar[bool] = True
    supports_input_mean: ClassVar[bool] = True

    alpha: tuple[float, ...] | None = attrs.field(default=None, converter=alpha_grid_option)
    alpha_max: float = attrs.field(default=1000.0, converter=to_float, validator=gt(0.0))
    n_points: int = attrs.field(default=201, validator=integer(minimum=2))
    alpha_min: float = attrs.field(default=0.01, converter=to_float, validator=gt(0.0))
    rtol: float = attrs.field(default=1e-10, converter=to_float, validator=gt(0.0))
    atol: float = attrs.field(default=1e-12, converter=to_float, validator=gt(0.0))
    method: str = attrs.field(
        default="DOP853", validator=one_of("DOP853", "RK45", "LSODA", "Radau", "BDF")
    )
    second_order: bool = attrs.field(default=True, converter=to_bool, validator=boolean())
    max_value: float = attrs.field(default=1e8, converter=to_float, validator=gt(0.0))
    quadrature: dict | None = attrs.field(default=None, converter=quadrature_option)

    def __attrs_post_init__(self) -> None:
        grid = alpha_grid(self.alpha, self.alpha_max, self.n_points, self.alpha_min)
        theory.check_horizon(grid, 0.0)

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        out["alpha"] = None if self.alpha is None else list(self.alpha)
        if self.quadrature is None:
            out.pop("quadrature", None)  # the default: specifications stored before it
        return out

    def check(self, experiment: Experiment) -> None:
        # closed form or generic engine: every (activation, normalization) pair works;
        # this validates the normalization against the model (e.g. layernorm's K >= 2)
        theory.select_engine(experiment.model, experiment.normalization,
                             rule=experiment.learning_rule)
        grid = alpha_grid(self.alpha, self.alpha_max, self.n_points, self.alpha_min)
        theory.check_horizon(grid, experiment.eta, experiment.model.layers().eta_v)

    def run(self, experiment: Experiment) -> xr.Dataset:
        grid = alpha_grid(self.alpha, self.alpha_max, self.n_points, self.alpha_min)
        initial = experiment.initial_order_parameters()
        traj = theory.integrate(
            experiment.model, experiment.normalization, initial,
            eta=experiment.eta, batch_size=experiment.batch_size, alpha=grid,
            rtol=self.rtol, atol=self.atol, method=self.method,
            second_order=self.second_order, max_value=self.max_value,
            quadrature=self.quadrature, rule=experiment.learning_rule,
        )
        ds = trajectory_dataset(experiment, traj, grid, method=self.method, rtol=self.rtol,
                                atol=self.atol, second_order=self.second_order)
        ds.attrs.update(experiment.learning_rule.attrs())
        return ds


@hookimpl
def symphase_register_analyzers(registry):
    registry.add_analyzer(Dynamics)
