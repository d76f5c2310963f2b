"""The one module that reads and writes results (netCDF via xarray).

Writes are atomic: the dataset goes to a temporary file in the destination folder,
which is then renamed over the destination. Nothing is pickled and nothing is
evaluated on load; the experiment is rebuilt from the JSON copy in the attrs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from framework.results import _attr_value

__all__ = ["load", "load_experiment", "save"]


def _netcdf_safe(dataset: xr.Dataset) -> xr.Dataset:
    ds = dataset.copy()
    ds.attrs = {k: _attr_value(v) for k, v in ds.attrs.items()}
    for name in list(ds.variables):
        var = ds[name]
        var.attrs = {k: _attr_value(v) for k, v in var.attrs.items()}
        if var.dtype == bool:
            ds[name] = var.astype(np.int8)
            ds[name].attrs.update(var.attrs, symphase_dtype="bool")
    return ds


def save(dataset: xr.Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``dataset`` to ``path`` (netCDF4) atomically and return the path.

    Attrs are converted to strings and numbers; boolean variables are stored as int8
    with ``symphase_dtype = "bool"`` and restored by :func:`load`.
    """
    from framework.manager import plugin_manager

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _netcdf_safe(dataset)
    plugin_manager().hook.symphase_before_save(dataset=ds, path=str(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        ds.to_netcdf(tmp, engine="netcdf4")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike[str]) -> xr.Dataset:
    """Open a stored result fully into memory (the file is closed afterwards)."""
    with xr.open_dataset(path, engine="netcdf4") as ds:
        out = ds.load()
    for name in list(out.variables):
        if out[name].attrs.get("symphase_dtype") == "bool":
            attrs = {k: v for k, v in out[name].attrs.items() if k != "symphase_dtype"}
            out[name] = out[name].astype(bool)
            out[name].attrs = attrs
    return out


def load_experiment(path_or_dataset: Any) -> Any:
    """Rebuild the :class:`~framework.Experiment` stored in a result's attrs."""
    from framework.experiment import Experiment

    ds = path_or_dataset if isinstance(path_or_dataset, xr.Dataset) else load(path_or_dataset)
    try:
        text = ds.attrs["symphase_spec_json"]
    except KeyError:
        raise ValueError(
            "dataset has no 'symphase_spec_json' attr: it was not produced by an Experiment"
        ) from None
    return Experiment.from_json(text)
