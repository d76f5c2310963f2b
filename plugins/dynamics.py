"""The ``dynamics`` analyzer: the order-parameter ODE integrated over alpha."""

from __future__ import annotations

from typing import ClassVar

import attrs
import numpy as np
import xarray as xr

from framework import Analyzer, Experiment, SpecificationError, convention_attrs, hookimpl, theory
from framework._validation import check_int, check_real, gt, integer, one_of


def _alpha_tuple(value: object) -> tuple[float, ...] | None:
    if value is None:
        return None
    out = tuple(float(a) for a in np.atleast_1d(np.asarray(value, dtype=float)))
    if len(out) < 2 or not np.all(np.isfinite(out)) or np.any(np.diff(out) <= 0) or out[0] < 0:
        raise SpecificationError(
            f"'alpha' must be a strictly increasing grid of >= 2 finite values >= 0, got {value!r}"
        )
    return out


def alpha_grid(
    alpha: tuple[float, ...] | None, alpha_max: float, n_points: int, alpha_min: float
) -> np.ndarray:
    """``alpha`` if given, else ``0`` followed by ``n_points - 1`` log-spaced values."""
    if alpha is not None:
        return np.asarray(alpha)
    n_points = check_int("n_points", n_points, minimum=2)
    alpha_max = check_real("alpha_max", alpha_max, minimum=0.0, strict=True)
    if not alpha_min < alpha_max:
        raise SpecificationError(
            f"'alpha_min' must be < alpha_max = {alpha_max}, got {alpha_min}"
        )
    return np.concatenate([[0.0], np.geomspace(alpha_min, alpha_max, n_points - 1)])


def order_parameter_variables(
    Q: np.ndarray, R: np.ndarray, dims: tuple[str, ...] = ("alpha",)
) -> dict[str, xr.DataArray]:
    """``Q`` and ``R`` as labelled variables with leading ``dims``."""
    return {
        "Q": xr.DataArray(
            Q, dims=(*dims, "student", "student_"),
            attrs={"long_name": "student-student overlap Q = J J^T / N", "units": "1"},
        ),
        "R": xr.DataArray(
            R, dims=(*dims, "student", "teacher"),
            attrs={"long_name": "student-teacher overlap R = J B^T / N", "units": "1"},
        ),
    }


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
        definiteness). With the erf activation a too-large ``eta`` makes the weights grow
        without bound rather than overflow, so this bound is what detects it.
    """

    name: ClassVar[str] = "dynamics"
    description: ClassVar[str] = "order-parameter ODE over alpha (exact N -> infinity theory)"

    alpha: tuple[float, ...] | None = attrs.field(default=None, converter=_alpha_tuple)
    alpha_max: float = attrs.field(default=1000.0, converter=float, validator=gt(0.0))
    n_points: int = attrs.field(default=201, validator=integer(minimum=2))
    alpha_min: float = attrs.field(default=0.01, converter=float, validator=gt(0.0))
    rtol: float = attrs.field(default=1e-10, converter=float, validator=gt(0.0))
    atol: float = attrs.field(default=1e-12, converter=float, validator=gt(0.0))
    method: str = attrs.field(
        default="DOP853", validator=one_of("DOP853", "RK45", "LSODA", "Radau", "BDF")
    )
    second_order: bool = attrs.field(default=True, converter=bool)
    max_value: float = attrs.field(default=1e8, converter=float, validator=gt(0.0))

    def __attrs_post_init__(self) -> None:
        alpha_grid(self.alpha, self.alpha_max, self.n_points, self.alpha_min)

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        out["alpha"] = None if self.alpha is None else list(self.alpha)
        return out

    def check(self, experiment: Experiment) -> None:
        # closed form or generic engine: every (activation, normalization) pair works;
        # this validates the normalization against the model (e.g. layernorm's K >= 2)
        theory.expectation_engine(experiment.model, experiment.normalization)

    def run(self, experiment: Experiment) -> xr.Dataset:
        grid = alpha_grid(self.alpha, self.alpha_max, self.n_points, self.alpha_min)
        initial = experiment.initial_order_parameters()
        traj = theory.integrate(
            experiment.model, experiment.normalization, initial,
            eta=experiment.eta, batch_size=experiment.batch_size, alpha=grid,
            rtol=self.rtol, atol=self.atol, method=self.method,
            second_order=self.second_order, max_value=self.max_value,
        )
        return trajectory_dataset(experiment, traj, grid, self)


def trajectory_dataset(
    experiment: Experiment, traj: theory.Trajectory, grid: np.ndarray, analyzer: Analyzer
) -> xr.Dataset:
    """A dataset of an ODE trajectory on ``grid``; unreached points are NaN."""
    n, reached = len(grid), len(traj.alpha)
    K, M = experiment.model.K, experiment.model.M

    def pad(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        out = np.full((n, *shape), np.nan)
        out[:reached] = values
        return out

    Q = pad(traj.Q, (K, K))
    R = pad(traj.R, (K, M))
    data = {
        "eps_g": xr.DataArray(
            pad(traj.eps_g, ()), dims=("alpha",),
            attrs={"long_name": "generalization error", "units": "1"},
        ),
        **order_parameter_variables(Q, R),
        "diverged": xr.DataArray(
            bool(traj.diverged),
            attrs={"long_name": "integration stopped on divergence", "units": "1"},
        ),
        "alpha_diverged": xr.DataArray(
            float(traj.alpha_diverged),
            attrs={"long_name": "alpha at which divergence was detected (NaN if none)",
                   "units": "1"},
        ),
    }
    norm = experiment.normalization
    s = np.ones((n, K))  # no per-unit scale outside the diagonal-scale family
    if norm.is_diagonal_scale():  # s at the current parameters
        fixed = norm.parameters(K)
        for j in range(reached):
            p = {**fixed, **{k: v[j] for k, v in traj.params.items()}}
            s[j] = norm.scale(Q[j], p) if np.all(np.isfinite(Q[j])) else np.nan
    if not np.allclose(s[:reached], 1.0, rtol=0, atol=0):
        data["Q_norm"] = xr.DataArray(
            s[:, :, None] * Q * s[:, None, :], dims=("alpha", "student", "student_"),
            attrs={"long_name": "normalized overlap s_i Q_ik s_k (what the activation sees)",
                   "units": "1"},
        )
        data["R_norm"] = xr.DataArray(
            s[:, :, None] * R, dims=("alpha", "student", "teacher"),
            attrs={"long_name": "normalized overlap s_i R_in", "units": "1"},
        )
    data["eps_g_error"] = xr.DataArray(
        pad(traj.eps_g_error, ()), dims=("alpha",),
        attrs={"long_name": "error estimate of eps_g (standard error of the quadrature "
                            "replicates; 0: exact engine)", "units": "1"},
    )
    for k, v in traj.params.items():
        data[f"param_{k}"] = xr.DataArray(
            pad(v, (K,)), dims=("alpha", "student"),
            attrs={"long_name": f"trainable normalization parameter {k}", "units": "1"},
        )
    ds = xr.Dataset(
        data,
        coords={
            "alpha": ("alpha", grid, {"long_name": "time alpha = steps / N", "units": "1"}),
            "student": np.arange(K), "student_": np.arange(K),
            "teacher": np.arange(M),
        },
        attrs={
            **convention_attrs(experiment),
            "theory": "N -> infinity order-parameter ODE (" + traj.description + ")",
            "engine": traj.engine,
            "engine_description": traj.description,
            "integrator_backend": traj.integrator,
            "integrator": f"{analyzer.method} rtol={analyzer.rtol} atol={analyzer.atol}",
            "second_order": int(analyzer.second_order),
            "nfev": int(traj.nfev),
            "status": str(traj.message),
        },
    )
    return ds


@hookimpl
def symphase_register_analyzers(registry):
    registry.add_analyzer(Dynamics)
