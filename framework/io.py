"""The one module that reads and writes results (netCDF via xarray).

Writes are atomic: the dataset goes to a temporary file in the destination folder,
is flushed to disk, and is then renamed over the destination, so a reader (or a
sweep resumed after a crash) sees either the old file, the new file, or no file,
never a partial one. Nothing is pickled and nothing is evaluated on load; the
experiment is rebuilt from the JSON copy in the attrs.

Every stored file also opens with plain ``xarray.open_dataset``: attrs are strings
and numbers (nested mappings flattened to ``a.b`` keys, sequences as JSON), boolean
variables are int8 with ``symphase_dtype = "bool"`` (restored by :func:`load`),
strings are netCDF strings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from framework.results import flatten_attrs

__all__ = ["ChecksumError", "checksum", "load", "load_experiment", "save", "write_atomic"]

_BOOL_MARK = "symphase_dtype"
#: Global attr holding :func:`checksum` of the stored content (written by :func:`save`).
CHECKSUM_ATTR = "symphase_checksum"


class ChecksumError(ValueError):
    """A stored file's content does not match its recorded checksum (it is damaged)."""


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _attrs_text(attrs: Any) -> bytes:
    items = sorted((str(k), _plain(v)) for k, v in attrs.items() if k != CHECKSUM_ATTR)
    return json.dumps(items, default=repr, allow_nan=True).encode()


def checksum(dataset: xr.Dataset) -> str:
    """sha256 (hex) of a stored dataset's content: every variable and attr but the checksum.

    Covers names, dimensions, dtypes, shapes, values and attrs, in the form netCDF stores
    them (as :func:`save` writes them and ``xarray.open_dataset`` reads them back), so a
    single flipped bit in any value or attr changes it.
    """
    h = hashlib.sha256()
    for name in sorted(map(str, dataset.variables)):
        var = dataset.variables[name]
        values = np.asarray(var.values)
        h.update(json.dumps([name, list(map(str, var.dims)), list(values.shape)]).encode())
        h.update(_attrs_text(var.attrs))
        if values.dtype.kind in "OUS":
            h.update(json.dumps([str(v) for v in values.ravel().tolist()]).encode())
        else:
            h.update(values.dtype.str.encode())
            h.update(np.ascontiguousarray(values).tobytes())
    h.update(_attrs_text(dataset.attrs))
    return h.hexdigest()


def _netcdf_safe(dataset: xr.Dataset) -> xr.Dataset:
    """A copy whose attrs, dtypes and encodings netCDF4 stores losslessly.

    Built in one step from the prepared variables (assigning them one by one realigns the
    whole dataset each time: ~7 ms for a small point, most of a sweep point's storage)."""
    coords: dict[str, xr.Variable] = {}
    data_vars: dict[str, xr.Variable] = {}
    for name, var in dataset.variables.items():
        attrs = flatten_attrs(var.attrs)
        if var.dtype == bool:
            var = var.astype(np.int8)
            attrs[_BOOL_MARK] = "bool"
        elif var.dtype.kind == "U":
            var = var.astype(object)
        var = var.copy(deep=False)
        var.attrs = attrs
        # Encodings inherited from a file we read (dtype, _FillValue, chunking) may no
        # longer fit the data; xarray chooses fresh ones.
        var.encoding = {}
        if var.dtype.kind == "f":
            var.encoding["_FillValue"] = None  # NaN is data here, not "missing"
        (coords if name in dataset.coords else data_vars)[str(name)] = var
    ds = xr.Dataset(data_vars, coords=coords, attrs=flatten_attrs(dataset.attrs))
    ds.encoding = {}
    return ds


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform/filesystem
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, chunks: list[bytes], *, sync_folder: bool = True,
                 sync: bool = True) -> None:
    """Write the bytes ``chunks`` to ``path`` atomically; an existing ``path`` is replaced.

    The bytes go to a temporary file ``.<name>.<random>.tmp`` next to ``path``, which is
    flushed to disk (unless not ``sync``: then a power failure may leave the renamed
    file partial, for content that is verified when read) and renamed over ``path``;
    then, if ``sync_folder``, the folder is
    flushed too (the rename survives a power failure; without it, a power failure may
    lose the new file, never leave a partial one). On any error
    (or interruption) the temporary file is removed. The writer holds an exclusive
    ``flock`` on the temporary file until it is renamed, so that a cleaner can tell a
    stale temporary (nobody holds it: its writer died) from one being written
    (:func:`framework.sweep.storage.prepare`); if a cleaner removed it in the instant
    before the lock was taken, the write is retried.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locks
        fcntl = None  # type: ignore[assignment]
    for attempt in range(3):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(fd, "wb", closefd=False) as fh:
                for chunk in chunks:
                    fh.write(chunk)
                fh.flush()
                if sync:
                    os.fsync(fh.fileno())
            _normal_permissions(tmp)
            try:
                os.replace(tmp, path)
            except FileNotFoundError:  # removed by a cleaner before we held it
                if attempt == 2:
                    raise
                continue
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        break
    if sync_folder:
        _fsync_dir(path.parent)


def _normal_permissions(path: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # mkstemp creates 0600; give normal permissions


def save(dataset: xr.Dataset, path: str | os.PathLike[str], *, lock: bool = True,
         sync: bool = True) -> Path:
    """Write ``dataset`` to ``path`` (netCDF4) atomically and return the path.

    Attrs are converted to strings and numbers (see the module docstring); boolean
    variables are stored as int8 with ``symphase_dtype = "bool"`` and restored by
    :func:`load`. The data is written to a temporary file next to ``path``, flushed to
    disk and renamed over ``path``; on any error (or interruption) the temporary file is
    removed and an existing ``path`` is left untouched.

    Parameters
    ----------
    dataset : xarray.Dataset
        What to store.
    path : path
        The destination file.
    lock : bool
        ``True`` (default): xarray writes the temporary file itself, taking the file
        lock of the active Dask scheduler (while a ``dask.distributed`` client is the
        default scheduler, also in a worker's task, that is a ``distributed.Lock``: a
        round trip to the scheduler). ``False``, for a file private to one task (no
        lock is needed: the temporary file is unique and the rename atomic): the file
        is serialized in memory (``to_netcdf()`` without a path, which takes no file
        lock) and its bytes written to the temporary file. Same file, same atomicity;
        the file is held in memory once, so keep ``True`` for very large datasets.
    sync : bool
        ``True`` (default): the file is flushed to disk before it is renamed, and then
        its folder. ``False``: neither (the caller flushes it later, if at all): a power
        failure may leave it partial or lose it; :func:`load` then refuses it (its
        checksum, or netCDF itself).
    """
    from framework.manager import plugin_manager

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _netcdf_safe(dataset.copy(deep=False).load())  # read before we replace a source
    plugin_manager().hook.symphase_before_save(dataset=ds, path=str(path))
    ds = _netcdf_safe(ds)  # a hook may have added attrs or variables
    ds.attrs[CHECKSUM_ATTR] = checksum(ds)
    if not lock:
        write_atomic(path, [bytes(ds.to_netcdf(None, engine="netcdf4", format="NETCDF4"))],
                     sync_folder=sync, sync=sync)
        return path
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4")
        if sync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        _normal_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync:
        _fsync_dir(path.parent)
    return path


def load(path: str | os.PathLike[str], *, require_checksum: bool = False) -> xr.Dataset:
    """Open a stored result fully into memory (the file is closed afterwards).

    A file written by :func:`save` records :func:`checksum` of its content in the
    ``symphase_checksum`` attr; it is verified here (:class:`ChecksumError` if the
    content differs: the file is damaged). A file without one (written by other tools or
    older versions) loads unverified, unless ``require_checksum``. The checksum attr
    is not part of the returned dataset (it describes the file, and a dataset saved
    again gets a new one).
    """
    with xr.open_dataset(path, engine="netcdf4") as ds:
        out = ds.load()
    recorded = out.attrs.pop(CHECKSUM_ATTR, None)
    if recorded is None:
        if require_checksum:
            raise ChecksumError(f"{os.fspath(path)}: no {CHECKSUM_ATTR!r} attr to verify")
    elif recorded != checksum(out):
        raise ChecksumError(f"{os.fspath(path)}: the content does not match its "
                            f"{CHECKSUM_ATTR!r} (the file is damaged)")
    for name in list(out.variables):
        var = out.variables[name]
        if var.attrs.get(_BOOL_MARK) == "bool":
            attrs = {k: v for k, v in var.attrs.items() if k != _BOOL_MARK}
            new = var.astype(bool)
            new.attrs = attrs
            new.encoding = {}
            if name in out.indexes and name in out.dims:
                out = out.assign_coords({name: new})
            else:
                out[name] = new
    return out


def load_experiment(path_or_dataset: Any) -> Any:
    """Rebuild the :class:`~framework.Experiment` stored in a result's attrs.

    ``path_or_dataset`` is a stored file (read with :func:`load`) or a dataset; see
    :meth:`Experiment.from_dataset <framework.Experiment.from_dataset>`. For a sweep
    this is the base experiment; :func:`framework.point_experiment` rebuilds the
    experiment of one grid point.
    """
    from framework._resources import check_memory
    from framework.experiment import Experiment

    ds = path_or_dataset if isinstance(path_or_dataset, xr.Dataset) else load(path_or_dataset)
    text = ds.attrs.get("symphase_spec_json")
    if isinstance(text, str):
        try:
            spec = json.loads(text)
        except (ValueError, RecursionError):
            spec = None  # Experiment.from_dataset reports it
        if isinstance(spec, dict):
            check_memory(spec, what="the stored experiment")  # before allocating
    return Experiment.from_dataset(ds)
