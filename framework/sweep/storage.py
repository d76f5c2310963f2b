"""Sweep storage: one netCDF file per task, plus the combined file of each analyzer.

A results folder holds ``points/<key>.nc`` (one task: a grid point restricted to one
analyzer; ``key`` is its :func:`~framework.sweep.spec_hash`) and ``<analyzer>.nc``
(the combined dataset). Every write goes through :func:`framework.io.save`, which is
atomic, so a file is either whole or absent. A task file carries its key in the
``symphase_spec_sha256`` attr; a file whose key does not match, or that cannot be
read, is ignored with a :class:`RuntimeWarning` (the task is recomputed).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import xarray as xr

__all__ = [
    "POINTS_DIR",
    "is_failure",
    "load_point",
    "point_path",
    "prepare",
    "store_combined",
    "store_point",
]

#: Sub-folder of a results folder that holds the per-task files.
POINTS_DIR = "points"


def prepare(folder: Path) -> None:
    """Create ``folder/points`` (and ``folder``) if missing."""
    (folder / POINTS_DIR).mkdir(parents=True, exist_ok=True)


def point_path(folder: Path, key: str) -> Path:
    """The file of the task ``key`` under the results folder ``folder``."""
    return folder / POINTS_DIR / f"{key}.nc"


def is_failure(ds: xr.Dataset) -> bool:
    """Whether a task dataset records a failure (``symphase_failed = 1``)."""
    return bool(int(ds.attrs.get("symphase_failed", 0)))


def load_point(folder: Path, key: str) -> xr.Dataset | None:
    """The stored dataset of task ``key``, or None if absent, unreadable or mismatched."""
    from framework.io import load

    path = point_path(folder, key)
    if not path.exists():
        return None
    try:
        ds = load(path)
    except Exception as exc:
        warnings.warn(f"recomputing unreadable sweep result {path.name}: {exc}",
                      RuntimeWarning, stacklevel=3)
        return None
    if ds.attrs.get("symphase_spec_sha256") != key:
        warnings.warn(f"recomputing {path.name}: its specification hash does not match",
                      RuntimeWarning, stacklevel=3)
        return None
    return ds


def store_point(folder: Path | None, key: str, ds: xr.Dataset) -> xr.Dataset:
    """Write task ``key`` atomically (if ``folder``); return what a resumed run will see.

    The stored file is read back, so that a fresh and a resumed sweep combine
    identical datasets.
    """
    if folder is None:
        return ds
    from framework.io import load, save

    return load(save(ds, point_path(folder, key)))


def store_combined(folder: Path, name: str, ds: xr.Dataset) -> Path:
    """Write the combined dataset of analyzer ``name`` atomically to ``folder/<name>.nc``."""
    from framework.io import save

    return save(ds, folder / f"{name}.nc")
