"""Sweep storage: one netCDF file per task, plus the combined file of each analyzer.

A results folder holds ``points/<key>.nc`` (one task: a grid point restricted to one
analyzer; ``key`` is its :func:`~framework.sweep.spec_hash`) and ``<analyzer>.nc``
(the combined dataset). Every write goes through :func:`framework.io.save`, which is
atomic, so a file is either whole or absent. A task file carries its key in the
``symphase_spec_sha256`` attr; a file whose key does not match, or that cannot be
read, is ignored with a :class:`RuntimeWarning` (the task is recomputed).

Task files are written by the worker that computed the task when it sees the results
folder (:func:`folder_token`: ``points/.symphase-folder`` holds a random token that the
submitting process passes along), otherwise by the submitting process. They are
written without Dask's file lock (``framework.io.save(..., lock=False)``): each file is
private to its task (a unique temporary file, renamed atomically).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import uuid
import warnings
from pathlib import Path

import xarray as xr

__all__ = [
    "POINTS_DIR",
    "folder_token",
    "is_failure",
    "load_point",
    "point_path",
    "prepare",
    "sees_folder",
    "store_combined",
    "store_point",
]

#: Sub-folder of a results folder that holds the per-task files.
POINTS_DIR = "points"
_TOKEN_FILE = ".symphase-folder"
# netCDF-C/HDF5 calls from several threads of one process (the "threads" scheduler)
# are not safe even under xarray's own locks (a segfault was observed with in-memory
# writes): this process's sweep file I/O goes through one lock.
_io_lock = threading.Lock()


def prepare(folder: Path) -> None:
    """Create ``folder/points`` (and ``folder``) if missing."""
    (folder / POINTS_DIR).mkdir(parents=True, exist_ok=True)


def _read_token(folder: Path) -> str | None:
    try:
        return (folder / POINTS_DIR / _TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def folder_token(folder: Path) -> str:
    """The random token that identifies the prepared results folder ``folder``.

    Created (atomically) on first use and kept; a worker that reads the same token
    from the same path sees the same folder (:func:`sees_folder`).
    """
    token = _read_token(folder)
    if token is not None:
        return token
    points = folder / POINTS_DIR
    fd, tmp = tempfile.mkstemp(prefix=f"{_TOKEN_FILE}.", suffix=".tmp", dir=points)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(uuid.uuid4().hex + "\n")
        os.replace(tmp, points / _TOKEN_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    token = _read_token(folder)  # a concurrent sweep's token may have won
    if token is None:  # pragma: no cover - the file was just written
        raise OSError(f"cannot read {points / _TOKEN_FILE}")
    return token


def sees_folder(folder: Path, token: str) -> bool:
    """Whether this process sees the results folder that has ``token`` at ``folder``."""
    return _read_token(folder) == token


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
        with _io_lock:
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
    identical datasets. The file is private to the task: it is written without Dask's
    file lock (see :func:`framework.io.save`).
    """
    if folder is None:
        return ds
    from framework.io import load, save

    with _io_lock:
        return load(save(ds, point_path(folder, key), lock=False))


def store_combined(folder: Path, name: str, ds: xr.Dataset) -> Path:
    """Write the combined dataset of analyzer ``name`` atomically to ``folder/<name>.nc``."""
    from framework.io import save

    with _io_lock:
        return save(ds, folder / f"{name}.nc")
