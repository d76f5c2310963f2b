"""Building labelled result datasets (public: part of the plugin author's kit).

An analyzer's :meth:`~framework.Analyzer.run` returns an :class:`xarray.Dataset` with the
shared dimension names (:data:`DIMENSIONS`), ``long_name`` and ``units`` on every data
variable and attrs that survive netCDF (strings and numbers). These helpers build one::

    from framework import datasets

    def run(self, experiment):
        Q, R = ...                                   # (A, K, K), (A, K, M)
        return datasets.dataset(
            {
                **datasets.order_parameter_variables(Q, R, dims=("alpha",)),
                "eps_g": datasets.variable(eps, ("alpha",), "generalization error"),
            },
            coords={"alpha": datasets.coordinate(alpha, "alpha", "time alpha = steps / N")},
            experiment=experiment,                   # the shared conventions as attrs
            attrs={"method": "my method"},
        )

The analyzer does not attach provenance: :meth:`framework.Experiment.run` (and sweeps)
add the JSON copy of the specification, the flattened ``spec.*`` attrs, plugin names and
versions and the symphase version, then fire ``symphase_dataset_created``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from framework.results import CONVENTIONS, convention_attrs, flatten_attrs

if TYPE_CHECKING:
    from framework.experiment import Experiment
    from framework.theory import Trajectory

__all__ = [
    "CONVENTIONS",
    "DIMENSIONS",
    "RUNAWAY_RULE",
    "add_input_spaces",
    "check_dataset",
    "convention_attrs",
    "coordinate",
    "dataset",
    "flatten_attrs",
    "order_parameter_variables",
    "parameter_long_name",
    "runaway_growth",
    "trajectory_dataset",
    "variable",
]

#: The shared dimension names: time, student units (twice, for K x K arrays), teacher
#: units (twice), eigenvalue index, simulation replica, fixed-point branch, eigenspace of
#: the input covariance.
DIMENSIONS: tuple[str, ...] = (
    "alpha", "student", "student_", "teacher", "teacher_", "eigen", "replica", "branch",
    "eigenspace",
)


def variable(
    data: Any, dims: str | Sequence[str], long_name: str, units: str = "1", **attrs: Any
) -> xr.DataArray:
    """A data variable with ``long_name`` and ``units`` attrs.

    Parameters
    ----------
    data : array_like
        The values; ``data.ndim`` must equal the number of ``dims``.
    dims : str or sequence of str
        Dimension names, preferably from :data:`DIMENSIONS` (``("alpha", "student")``).
    long_name : str
        What the variable is, in words (``"generalization error"``); not empty.
    units : str
        Its units; ``"1"`` for dimensionless quantities (the default).
    **attrs
        Further attrs (strings and numbers, so that they survive netCDF).

    Returns
    -------
    xarray.DataArray
    """
    if not isinstance(long_name, str) or not long_name.strip():
        raise ValueError(f"'long_name' must be a non-empty string, got {long_name!r}")
    if not isinstance(units, str):
        raise TypeError(f"'units' must be a string, got {units!r}")
    dims = (dims,) if isinstance(dims, str) else tuple(dims)
    return xr.DataArray(data, dims=dims, attrs={"long_name": long_name, "units": units, **attrs})


def coordinate(values: Any, dim: str, long_name: str, units: str = "1") -> xr.DataArray:
    """A one-dimensional coordinate along ``dim`` with ``long_name`` and ``units``.

    Parameters
    ----------
    values : array_like, 1-d
        The coordinate values.
    dim : str
        The dimension it labels (and its name in ``coords``).
    long_name, units : str
        As for :func:`variable`.

    Returns
    -------
    xarray.DataArray
    """
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"'values' of coordinate {dim!r} must be 1-d, got shape {values.shape}")
    return variable(values, (dim,), long_name, units)


def order_parameter_variables(
    Q: Any, R: Any, dims: Sequence[str] = ("alpha",)
) -> dict[str, xr.DataArray]:
    """``Q`` (..., K, K) and ``R`` (..., K, M) as labelled variables with leading ``dims``.

    Parameters
    ----------
    Q : array_like, shape (*dims, K, K)
        Student-student overlaps ``J J^T / N``, dimensions ``(*dims, "student",
        "student_")``.
    R : array_like, shape (*dims, K, M)
        Student-teacher overlaps ``J B^T / N``, dimensions ``(*dims, "student",
        "teacher")``.
    dims : sequence of str
        The leading dimensions (``("alpha",)``, ``("branch",)``, ``()``, ...).

    Returns
    -------
    dict
        ``{"Q": DataArray, "R": DataArray}``, with the long names the built-in analyzers
        use.
    """
    dims = tuple(dims)
    return {
        "Q": variable(Q, (*dims, "student", "student_"), "student-student overlap Q = J J^T / N"),
        "R": variable(R, (*dims, "student", "teacher"), "student-teacher overlap R = J B^T / N"),
    }


def dataset(
    data_vars: Mapping[str, xr.DataArray],
    coords: Mapping[str, Any] | None = None,
    *,
    experiment: Experiment | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """A result dataset, checked with :func:`check_dataset`.

    Parameters
    ----------
    data_vars : mapping
        Name -> :func:`variable` (every one with ``long_name`` and ``units``).
    coords : mapping, optional
        Name -> :func:`coordinate` or anything :class:`xarray.Dataset` accepts.
    experiment : Experiment, optional
        If given, the shared conventions and training parameters
        (:func:`convention_attrs`) come first in the attrs.
    attrs : mapping, optional
        The analyzer's own attrs (method, tolerances, ...); nested mappings are
        flattened to ``"a.b"`` keys, lists to JSON strings (:func:`flatten_attrs`).

    Returns
    -------
    xarray.Dataset
    """
    out: dict[str, Any] = dict(convention_attrs(experiment)) if experiment is not None else {}
    out.update(flatten_attrs(attrs or {}))
    ds = xr.Dataset(dict(data_vars), coords=dict(coords or {}), attrs=out)
    check_dataset(ds)
    return ds


def check_dataset(ds: xr.Dataset) -> None:
    """Raise ``ValueError`` unless ``ds`` follows the result conventions.

    Every data variable has non-empty string ``long_name`` and ``units`` attrs, and every
    dataset attr is a string or a number (what survives netCDF). Useful in a plugin's
    tests.
    """
    missing = [
        str(name) for name, var in ds.data_vars.items()
        if not all(isinstance(var.attrs.get(k), str) and var.attrs.get(k)
                   for k in ("long_name", "units"))
    ]
    if missing:
        raise ValueError(
            f"data variables must have 'long_name' and 'units' attrs, missing on "
            f"{', '.join(map(repr, missing))}"
        )
    netcdf = str | int | float | np.integer | np.floating
    bad = [k for k, v in ds.attrs.items() if isinstance(v, bool) or not isinstance(v, netcdf)]
    if bad:
        raise ValueError(
            "dataset attrs must be strings or numbers (netCDF), got "
            + ", ".join(f"{k!r}={ds.attrs[k]!r}" for k in bad)
        )


def add_input_spaces(ds: xr.Dataset, inputs: Any, Q_l: np.ndarray, R_l: np.ndarray,
                     dims: Sequence[str], *, N: int | None = None,
                     r: np.ndarray | None = None) -> None:
    """Add the order parameters per input eigenspace to ``ds`` (in place): ``Q_space``
    ``(*dims, eigenspace, student, student_)``, ``R_space``, the coordinates
    ``input_eigenvalue`` and ``input_fraction`` along ``eigenspace`` (with ``N``: the
    fractions realized, ``N_l / N``, and the attr ``input_block_sizes``), and relabel
    ``Q``, ``R`` as the pre-activation covariances (:mod:`framework.inputs`). With an
    input mean: ``mean_overlap`` ``(*dims, student)`` (``r``, required then), the
    teacher's ``teacher_mean_overlap`` and the attrs ``input_mean``,
    ``input_mean_space``."""
    dims = tuple(dims)
    if not inputs.centred:
        if r is None:
            raise ValueError("add_input_spaces: inputs with a mean need 'r', the student's "
                             "overlaps with the mean direction")
        M = np.shape(R_l)[-1]
        ds["mean_overlap"] = variable(
            r, (*dims, "student"), "student overlap with the input-mean direction r_i = "
            "J_i . u / sqrt(N) (pre-activation mean m r_i)")
        ds.coords["teacher_mean_overlap"] = variable(
            inputs.teacher_overlap(M), ("teacher",), "teacher overlap with the input-mean "
            "direction s_n = B_n . u / sqrt(N) (pre-activation mean m s_n)")
        ds.attrs["input_mean"] = float(inputs.mean)
        ds.attrs["input_mean_space"] = int(inputs.mean_space)
    frac = inputs.fractions if N is None else inputs.block_sizes(N) / N
    ds.coords["eigenspace"] = coordinate(np.arange(inputs.L), "eigenspace",
                                         "eigenspace l of the input covariance")
    ds.coords["input_eigenvalue"] = variable(inputs.eigenvalues, ("eigenspace",),
                                             "eigenvalue lambda_l of the input covariance")
    ds.coords["input_fraction"] = variable(
        frac, ("eigenspace",), "fraction f_l of the N directions in eigenspace l"
        + ("" if N is None else " (realized: N_l / N)"))
    ds["Q_space"] = variable(Q_l, (*dims, "eigenspace", "student", "student_"),
                             "student-student overlap per input eigenspace Q_l = J^(l) "
                             "J^(l)^T / N")
    ds["R_space"] = variable(R_l, (*dims, "eigenspace", "student", "teacher"),
                             "student-teacher overlap per input eigenspace R_l = J^(l) "
                             "B^(l)^T / N")
    for name, what in (("Q", "student-student"), ("R", "student-teacher")):
        if name in ds:
            ds[name].attrs["long_name"] = (
                f"{what} pre-activation covariance {name} = sum_l lambda_l {name}_space[l] "
                f"(J Sigma {'J' if name == 'Q' else 'B'}^T / N)")
    if N is not None:
        ds.attrs["input_block_sizes"] = ", ".join(str(int(n)) for n in inputs.block_sizes(N))


def trajectory_dataset(
    experiment: Experiment,
    traj: Trajectory,
    grid: np.ndarray,
    *,
    method: str,
    rtol: float,
    atol: float,
    second_order: bool,
) -> xr.Dataset:
    """A dataset of an ODE trajectory (:class:`framework.theory.Trajectory`) on ``grid``.

    Variables ``eps_g``, ``eps_g_error``, ``Q``, ``R`` (dims ``alpha, ...``), ``Q_norm``,
    ``R_norm`` (the overlaps the activation sees, for a diagonal-scale normalization
    whose scale is not 1), ``param_<name>`` per trainable parameter, ``diverged``,
    ``alpha_diverged``; grid points the run did not reach are NaN. Attrs: the
    conventions, the engine (``engine``, ``engine_description``), the integrator
    (``method``, ``rtol``, ``atol``, ``second_order``, ``nfev``, ``status``).
    """
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
        with np.errstate(all="ignore"):  # a zero weight norm: s infinite (status says why)
            for j in range(reached):
                p = {**fixed, **{k: v[j] for k, v in traj.params.items() if k in fixed}}
                s[j] = norm.scale(Q[j], p) if np.all(np.isfinite(Q[j])) else np.nan
    with np.errstate(all="ignore"):
        sQs, sR = s[:, :, None] * Q * s[:, None, :], s[:, :, None] * R
    if not np.allclose(s[:reached], 1.0, rtol=0, atol=0):
        data["Q_norm"] = xr.DataArray(
            sQs, dims=("alpha", "student", "student_"),
            attrs={"long_name": "normalized overlap s_i Q_ik s_k (what the activation sees)",
                   "units": "1"},
        )
        data["R_norm"] = xr.DataArray(
            sR, dims=("alpha", "student", "teacher"),
            attrs={"long_name": "normalized overlap s_i R_in", "units": "1"},
        )
    seen = np.einsum("aii->ai", sQs)[:reached]
    with np.errstate(invalid="ignore"):
        runaway = bool(reached >= 2 and runaway_growth(seen, experiment.model.T))
    data["runaway"] = xr.DataArray(
        runaway, attrs={"long_name": "sustained runaway growth of the weights (see the "
                                     "attr runaway_rule)", "units": "1"},
    )
    data["eps_g_error"] = xr.DataArray(
        pad(traj.eps_g_error, ()), dims=("alpha",),
        attrs={"long_name": "error estimate of eps_g (standard error of the quadrature "
                            "replicates; 0: exact engine)", "units": "1"},
    )
    model_params = ("v",) if experiment.model.layers().readout_trained else ()
    for k, v in traj.params.items():
        data[f"param_{k}"] = xr.DataArray(
            pad(v, (K,)), dims=("alpha", "student"),
            attrs={"long_name": parameter_long_name(k, k in model_params), "units": "1"},
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
            "engine_exact": int(traj.exact),
            "integrator_backend": traj.integrator,
            "integrator": f"{method} rtol={rtol} atol={atol}",
            "second_order": int(second_order),
            "nfev": int(traj.nfev),
            "status": str(traj.message),
            "eps_g_method": str(traj.eps_g_method),
            "runaway_rule": RUNAWAY_RULE,
        },
    )
    if traj.spaces:
        inputs = experiment.model.input_distribution()
        L = inputs.L
        add_input_spaces(ds, inputs, pad(traj.spaces["Q"], (L, K, K)),
                         pad(traj.spaces["R"], (L, K, M)), ("alpha",),
                         r=pad(traj.spaces["r"], (K,)) if "r" in traj.spaces else None)
    return ds


def parameter_long_name(name: str, model_parameter: bool = False) -> str:
    """``long_name`` of a trainable parameter's variable (``param_<name>``): the model's
    trained readout ``v`` or a normalization parameter."""
    if model_parameter:
        return f"trained student readout {name} (second-layer weights, before c_K)"
    return f"trainable normalization parameter {name}"


#: The rule of the ``runaway`` flag of trajectories (ODE and simulation alike).
RUNAWAY_RULE = (
    "runaway = the largest normalized self-overlap q_i = (s Q s)_ii (the variance the "
    "activation sees; Q_ii without a normalization) at the last reported point exceeds "
    "10 max(1, max_n T_nn, max_i q_i at the start) and grew by at least 5 % over the last "
    "fifth of the reported points (growth still going on); a run that stopped early "
    "(diverged) is judged on the points it reached"
)


def runaway_growth(q: np.ndarray, T: np.ndarray) -> bool:
    """:data:`RUNAWAY_RULE` for self-overlaps ``q (n_alpha, K)`` (rows reached, in time
    order) and teacher overlaps ``T``."""
    q = np.asarray(q, dtype=float)
    q = q[np.all(np.isfinite(q), axis=1)]
    if q.shape[0] < 2:
        return False
    top = q.max(axis=1)
    bound = 10.0 * max(1.0, float(np.max(np.diagonal(np.asarray(T)))), float(top[0]))
    earlier = top[max(0, q.shape[0] - 1 - max(1, q.shape[0] // 5))]
    return bool(top[-1] > bound and top[-1] >= 1.05 * earlier)
