"""Sweep storage: one netCDF file per task, plus the combined file of each analyzer.

A results folder holds ``points/<key>.nc`` (one task: a grid point restricted to one
analyzer; ``key`` is its :func:`~framework.sweep.spec_hash`) and ``<analyzer>.nc``
(the combined dataset). Every write goes through :func:`framework.io.save`, which is
atomic, so a file is either whole or absent. A task file carries its key in the
``symphase_spec_sha256`` attr and the checksum of its content in ``symphase_checksum``
(:func:`framework.io.checksum`); a file whose key or checksum does not match, that has no
checksum, or that cannot be read, is ignored with a :class:`RuntimeWarning` (the task is
recomputed and the file replaced).

Locks. While a task is computed, its lock ``points/.<key>.lock`` is held (an exclusive
``flock``, released by the kernel when the holder dies, however it dies): a second sweep
into the same folder that reaches a locked task skips it, and at the end waits for the
lock and reuses the file the first one stored (:func:`point_lock`), so no task is
computed twice. The holder of a task's lock removes the task's stale temporary files
(``points/.<key>.nc.*.tmp``, left by a process killed while saving); the combined files'
stale temporaries are removed under the lock ``points/.<analyzer>.combined.lock``.
Without ``fcntl`` (Windows) there are no locks.

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
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import xarray as xr

__all__ = [
    "POINTS_DIR",
    "folder_token",
    "is_failure",
    "load_point",
    "point_lock",
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


#: Age (seconds) after which a leftover temporary file of the token is removed.
_STALE_TOKEN_TMP = 60.0


def prepare(folder: Path) -> None:
    """Create ``folder/points`` (and ``folder``) if missing; remove stale token temporaries.

    Raises :class:`~framework.validators.SpecificationError` naming ``results_dir`` if the
    folder cannot be created or is not writable.
    """
    from framework.validators import SpecificationError

    points = folder / POINTS_DIR
    try:
        points.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecificationError(
            f"'results_dir' {str(folder)!r}: cannot create {str(points)!r} "
            f"({exc.strerror or exc})"
        ) from None
    if not os.access(points, os.W_OK | os.X_OK):
        raise SpecificationError(f"'results_dir' {str(folder)!r}: the folder is not writable")
    now = time.time()
    for tmp in points.glob(f"{_TOKEN_FILE}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TOKEN_TMP:
                tmp.unlink()


def _remove_stale(folder: Path, name: str) -> None:
    """Remove the temporary files of ``folder/name`` (call with that file's lock held)."""
    for tmp in folder.glob(f".{name}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def _flock(path: Path, wait: bool) -> Iterator[bool]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locks
        yield True
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def point_lock(folder: Path, key: str, *, wait: bool = False) -> Iterator[bool]:
    """Hold the lock of task ``key`` (yields True), or yield False if another holds it.

    With ``wait``, block until the other holder is done (then yield True). Holding the
    lock, the task's stale temporary files are removed.
    """
    points = folder / POINTS_DIR
    with _flock(points / f".{key}.lock", wait) as held:
        if held:
            _remove_stale(points, f"{key}.nc")
        yield held


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


def load_point(folder: Path, key: str, *, warn: bool = True) -> xr.Dataset | None:
    """The stored dataset of task ``key``, or None if absent, unreadable or mismatched.

    A file that is present but unusable warns (:class:`RuntimeWarning`) unless not ``warn``.
    """
    from framework.io import load

    path = point_path(folder, key)
    if not path.exists():
        return None
    try:
        with _io_lock:
            ds = load(path, require_checksum=True)
    except Exception as exc:
        if warn:
            warnings.warn(f"recomputing unreadable or damaged sweep result {path.name}: "
                          f"{exc}", RuntimeWarning, stacklevel=3)
        return None
    if ds.attrs.get("symphase_spec_sha256") != key:
        if warn:
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

    with _flock(folder / POINTS_DIR / f".{name}.combined.lock", True), _io_lock:
        _remove_stale(folder, f"{name}.nc")
        return save(ds, folder / f"{name}.nc")
