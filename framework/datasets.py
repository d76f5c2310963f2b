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

__all__ = [
    "CONVENTIONS",
    "DIMENSIONS",
    "check_dataset",
    "convention_attrs",
    "coordinate",
    "dataset",
    "flatten_attrs",
    "order_parameter_variables",
    "variable",
]

#: The shared dimension names: time, student units (twice, for K x K arrays), teacher
#: units (twice), eigenvalue index, simulation replica, fixed-point branch.
DIMENSIONS: tuple[str, ...] = (
    "alpha", "student", "student_", "teacher", "teacher_", "eigen", "replica", "branch",
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
