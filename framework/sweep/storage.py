"""Sweep storage: batch files of task records, per-task locks, the combined files.

Layout of a results folder::

    <analyzer>.nc                 the combined dataset of each analyzer (framework.io.save)
    points/<random>.points        a batch file: the records of the tasks one writer stored
    points/<key>.nc               a task file of symphase before batch files (still read)
    points/.locks/points.lock     the locks of the tasks (Linux: one byte per task)
    points/.locks/<key>.lock      the lock of task <key> (elsewhere)
    points/.symphase-folder       the folder's random token

One task is a grid point restricted to one analyzer; its ``key`` is its
:func:`~framework.sweep.spec_hash` (64 hex digits).

Batch files. A netCDF file per task cost ~10 ms to write and as much to read back,
several times the computation of a small point; records in a batch file cost ~0.2 ms
to encode. A writer (:class:`PointWriter`: the synchronous loop, each Dask task of a
worker that sees the folder, the submitting process for the others) collects the tasks
it computes and writes them as ONE file, atomically (a temporary file in ``points/``,
renamed, then flushed to disk in a background thread, :func:`wait_synced`; the folder
is not flushed: a file that a power failure lost, or left partial, fails verification
and its tasks are recomputed), when its batch ends, when :data:`MAX_POINTS_PER_FILE` are
pending (or :data:`MAX_PENDING_BYTES`), or when :data:`FLUSH_SECONDS` have passed
since it last wrote (checked as each task completes). A small point therefore costs no
file of its own, and a point that takes longer than that is stored as soon as it
completes. A task computed but
not yet written is lost if its process is killed (SIGKILL, the workers of an
interrupted cluster): at most the writer's pending tasks; a synchronous run writes them
on Ctrl-C and on any exception. Batch files are never modified, except that a file
with damaged records is rewritten without them (below), and :func:`remove_points`
rewrites files without the records it is asked to remove.

A batch file is the 16-byte magic :data:`MAGIC` followed by records. A record is a
112-byte prefix (little-endian u64 lengths of its JSON header and of its data, the
sha256 of the record, the 64-character key) then the UTF-8 JSON header (attrs,
coordinate names, per variable: name, dims, dtype, shape, attrs and the offset of its
bytes, or the strings themselves), then the raw C-order bytes of the numeric
variables (16-byte aligned). The sha256 covers the two lengths, the key, the header and
the data: it is the task's checksum (the batch-file form of the ``symphase_checksum``
attr of :func:`framework.io.save`). Nothing is pickled and nothing is evaluated on load.
Attrs are flattened as for netCDF (:func:`framework.results.flatten_attrs`); numeric
and boolean variables keep their dtype, string variables their dtype (``<U..`` or
object), so decoding a record gives back the dataset that was stored
(:func:`encode_point` returns that dataset, and a fresh and a resumed sweep combine
identical datasets without reading back what was just written).

Verification. Every record is verified when its file is read: a record whose sha256
does not match (a flipped bit anywhere in it) is ignored with a :class:`RuntimeWarning`
naming the file, the file is rewritten without it (or removed if nothing sound is
left; readers see the old or the new file, never a partial one), and the task is
recomputed. A file that does not start with :data:`MAGIC` is ignored with a warning.
When a task has several records (a failure retried with ``retry_failed``), a success
wins over a failure. Task files of the old layout (``points/<key>.nc``) are read with
:func:`framework.io.load` (checksum required, key checked) when no batch file holds the
task; an unusable one is ignored with a warning, and the recomputed task goes to a
batch file, which wins from then on.

Locks. While a task is computed and until its record is written, its lock is held:
on Linux an exclusive open-file-description lock (``F_OFD_SETLK``) on one byte of
``points/.locks/points.lock`` chosen by the key (creating a file per task cost ~0.2-0.35
ms, as much as storing a small point), elsewhere (or on a file system that refuses
those) an exclusive ``flock`` on ``points/.locks/<key>.lock``; either is released by
the kernel when the holder dies, however it dies. A second sweep into the same folder that
reaches a locked task skips it, and at the end waits for the lock and reuses the record
the first one stored (:func:`point_lock`, :func:`acquire`), so no task is computed
twice. The holder of a lock looks for the task in the batch files written meanwhile
(:func:`load_point`; the folder is listed again and only files not seen before are
read: :class:`_Catalog`) before computing it. Without ``fcntl`` (Windows) there are no
locks, and stale temporaries are not removed.

Temporaries. A writer holds an ``flock`` on its temporary file until it is renamed;
:func:`prepare` removes every temporary in ``points/`` that nobody holds (left by a
process killed while writing; the folder token's after a minute); the combined files'
stale temporaries are removed under the lock ``points/.locks/<analyzer>.combined.lock``.

Batch files are written by the worker that computed the tasks when it sees the results
folder (:func:`folder_token`: ``points/.symphase-folder`` holds a random token that the
submitting process passes along), otherwise by the submitting process; no Dask lock is
taken (each file is private to its writer). The combined ``<analyzer>.nc`` files are
netCDF, written by :func:`framework.io.save` (atomically; flushed to disk in the
background like the batch files, :func:`store_combined`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import re
import struct
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from framework.io import write_atomic

__all__ = [
    "FLUSH_SECONDS",
    "MAGIC",
    "MAX_PENDING_BYTES",
    "MAX_POINTS_PER_FILE",
    "POINTS_DIR",
    "POINTS_SUFFIX",
    "PointLock",
    "PointWriter",
    "acquire",
    "encode_point",
    "folder_token",
    "is_failure",
    "load_point",
    "load_points",
    "point_lock",
    "point_path",
    "prepare",
    "read_points",
    "remove_points",
    "sees_folder",
    "store_combined",
    "store_point",
    "wait_synced",
]

#: Sub-folder of a results folder that holds the batch files.
POINTS_DIR = "points"
#: Suffix of a batch file.
POINTS_SUFFIX = ".points"
#: First 16 bytes of a batch file (format version 1).
MAGIC = b"SYMPHASE-PTS-v1\n"
_MAGIC_FAMILY = b"SYMPHASE-PTS-v"
#: A writer writes its pending records once this long (seconds) after its last write.
FLUSH_SECONDS = 1.0
#: A writer writes its pending records once this many are pending.
MAX_POINTS_PER_FILE = 64
#: ... or once they hold this many bytes (large points are not kept in memory).
MAX_PENDING_BYTES = 1 << 26
_LOCKS_DIR = ".locks"
_SLOTS_FILE = "points.lock"
_TOKEN_FILE = ".symphase-folder"
_KEY = re.compile(r"[0-9a-f]{64}")
# prefix: header length, data length, sha256, key
_PREFIX = struct.Struct("<QQ32s64s")
_ALIGN = 16
# netCDF-C/HDF5 calls from several threads of one process (the "threads" scheduler)
# are not safe even under xarray's own locks (a segfault was observed with in-memory
# writes): this process's netCDF sweep I/O (old task files, combined files) goes
# through one lock. Batch files are plain Python and numpy.
_io_lock = threading.Lock()

#: Age (seconds) after which a leftover temporary file of the token is removed.
_STALE_TOKEN_TMP = 60.0


# -- the folder ---------------------------------------------------------------------------
def prepare(folder: Path) -> None:
    """Create ``folder/points`` (and its lock folder); remove stale temporaries.

    A temporary file in ``points/`` is stale when no process holds its ``flock`` (its
    writer died); the token's temporaries when older than a minute. Raises
    :class:`~framework.validators.SpecificationError` naming ``results_dir`` if the
    folder cannot be created or is not writable.
    """
    from framework.validators import SpecificationError

    points = folder / POINTS_DIR
    try:
        (points / _LOCKS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecificationError(
            f"'results_dir' {str(folder)!r}: cannot create {str(points)!r} "
            f"({exc.strerror or exc})"
        ) from None
    if not os.access(points, os.W_OK | os.X_OK):
        raise SpecificationError(f"'results_dir' {str(folder)!r}: the folder is not writable")
    now = time.time()
    for tmp in points.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if tmp.name.startswith(f"{_TOKEN_FILE}."):
                if now - tmp.stat().st_mtime > _STALE_TOKEN_TMP:
                    tmp.unlink()
                continue
            _remove_if_unheld(tmp)


def _remove_if_unheld(path: Path) -> None:
    """Remove the temporary ``path`` unless a live writer holds its ``flock``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locks, temporaries stay
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # being written
        path.unlink()
    finally:
        os.close(fd)


def _remove_stale(folder: Path, name: str) -> None:
    """Remove the temporary files of ``folder/name`` (call with that file's lock held)."""
    for tmp in folder.glob(f".{name}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


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
    """The task file ``points/<key>.nc`` of the layout before batch files (still read)."""
    return folder / POINTS_DIR / f"{key}.nc"


def is_failure(ds: xr.Dataset) -> bool:
    """Whether a task dataset records a failure (``symphase_failed = 1``)."""
    return bool(int(ds.attrs.get("symphase_failed", 0)))


# -- locks --------------------------------------------------------------------------------
class PointLock:
    """A held lock of one task (see :func:`acquire`); :meth:`release` it once."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the flock


def _lock_file(path: Path, wait: bool) -> PointLock | None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locks
        return PointLock(None)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return PointLock(fd)


#: ``struct flock`` of Linux (LP64 and ILP32 with 64-bit ``off_t``: Python's ``fcntl``
#: uses ``F_OFD_*`` with a 64-bit ``off_t``): type, whence, start, length, pid.
_FLOCK = "hhqqi4x"
_OFD_ERRORS = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)


def _ofd() -> Any:
    """The ``fcntl`` module if it has open-file-description locks (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return None
    return fcntl if hasattr(fcntl, "F_OFD_SETLK") else None


_OFD = _ofd()


def _lock_slot(path: Path, key: str, wait: bool) -> PointLock | None:
    """Lock task ``key``'s byte of the shared lock file ``path`` (an OFD lock).

    An open-file-description lock belongs to this descriptor, like ``flock`` (two
    writers of one process exclude each other; the kernel releases it when the
    descriptor is closed or its process dies). The byte is the key's first 60 bits:
    distinct keys share one with probability 2**-60, which would only make one wait
    for the other. Raises ``OSError`` with errno in :data:`_OFD_ERRORS` where the file
    system does not support it.
    """
    fcntl = _OFD
    assert fcntl is not None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK,
                    struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, int(key[:15], 16), 1, 0))
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    return PointLock(fd)


def acquire(folder: Path, key: str, *, wait: bool = False) -> PointLock | None:
    """Take the lock of task ``key``; None if another holds it (unless ``wait``).

    On Linux the lock is a byte of ``points/.locks/points.lock`` (:func:`_lock_slot`:
    no file per task, whose creation cost more than a small point's storage), else
    (or where the file system refuses such locks) an ``flock`` on
    ``points/.locks/<key>.lock``.
    """
    locks = folder / POINTS_DIR / _LOCKS_DIR
    for attempt in range(2):
        try:
            if _OFD is not None:
                try:
                    return _lock_slot(locks / _SLOTS_FILE, key, wait)
                except OSError as exc:
                    if isinstance(exc, FileNotFoundError) or exc.errno not in _OFD_ERRORS:
                        raise
            return _lock_file(locks / f"{key}.lock", wait)
        except FileNotFoundError:  # a folder not made by prepare(): create the lock folder
            if attempt:
                raise
            locks.mkdir(parents=True, exist_ok=True)
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def point_lock(folder: Path, key: str, *, wait: bool = False) -> Iterator[bool]:
    """Hold the lock of task ``key`` (yields True), or yield False if another holds it.

    With ``wait``, block until the other holder is done (then yield True).
    """
    lock = acquire(folder, key, wait=wait)
    try:
        yield lock is not None
    finally:
        if lock is not None:
            lock.release()


# -- records ------------------------------------------------------------------------------
def _pad(n: int) -> int:
    return -n % _ALIGN


def _digest(n_header: int, n_data: int, key: bytes, header: Any, data: Any) -> bytes:
    h = hashlib.sha256(struct.pack("<QQ", n_header, n_data))
    h.update(key)
    h.update(header)
    h.update(data)
    return h.digest()


def _same_attrs(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(
        k in b and type(b[k]) is type(v) and (b[k] == v or v != v) for k, v in a.items())


_FLAT = frozenset({str, int, float})


def _flat(attrs: Any) -> Any:
    """``flatten_attrs(attrs)``: ``attrs`` itself when already flat (str keys, values
    exactly str, int or float, which flattening keeps as they are)."""
    from framework.results import flatten_attrs

    if all(type(k) is str and type(v) in _FLAT for k, v in attrs.items()):
        return attrs
    return flatten_attrs(attrs)


def encode_point(key: str, ds: xr.Dataset) -> tuple[bytes, xr.Dataset]:
    """``(record, dataset)``: the batch-file record of task ``key`` and what it decodes to.

    The dataset is ``ds`` itself when its attrs are already flat (as
    :func:`framework.results.finalize` leaves them), else a shallow copy with flattened
    attrs: decoding the record gives a dataset identical to it. Raises ``ValueError``
    for a ``key`` that is not 64 hex digits and ``TypeError`` for a variable that
    cannot be stored (an object array of non-strings, a structured dtype).
    """
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"'key' must be 64 lowercase hex digits (a spec_hash), got {key!r}")
    if not all(getattr(var, "_in_memory", False) for var in ds.variables.values()):
        ds = ds.load()  # (~50 us for a small point even when nothing is to be loaded)
    kept = ds
    attrs = _flat(ds.attrs)
    if attrs is not ds.attrs and not _same_attrs(attrs, ds.attrs):
        kept = ds.copy(deep=False)
        kept.attrs = attrs
    coords = [str(n) for n in ds.coords]
    chunks: list[bytes] = []
    variables = []
    offset = 0
    for name, var in ds.variables.items():
        values = np.asarray(var.values)
        var_attrs = _flat(var.attrs)
        if var_attrs is not var.attrs and not _same_attrs(var_attrs, var.attrs):
            if kept is ds:
                kept = ds.copy(deep=False)
            kept.variables[name].attrs = var_attrs
        entry: dict[str, Any] = {"name": str(name), "dims": [str(d) for d in var.dims],
                                 "dtype": values.dtype.str, "shape": list(values.shape),
                                 "attrs": var_attrs}
        kind = values.dtype.kind
        if kind in "OU":
            items = values.ravel().tolist()
            if kind == "O" and not all(isinstance(v, str) for v in items):
                bad = next(type(v).__name__ for v in items if not isinstance(v, str))
                raise TypeError(f"cannot store variable {str(name)!r}: an object array "
                                f"holds a {bad}; only strings are stored")
            entry["strings"] = items
        elif kind in "biufcmM" and values.dtype.fields is None:
            raw = np.ascontiguousarray(values).tobytes()
            entry["offset"] = offset
            chunks.append(raw)
            chunks.append(b"\0" * _pad(len(raw)))
            offset += len(raw) + _pad(len(raw))
        else:
            raise TypeError(f"cannot store variable {str(name)!r} of dtype {values.dtype}")
        variables.append(entry)
    header = json.dumps({"attrs": attrs, "coords": coords, "variables": variables},
                        allow_nan=True, ensure_ascii=False).encode()
    data = b"".join(chunks)
    key_bytes = key.encode("ascii")
    prefix = _PREFIX.pack(len(header), len(data), _digest(len(header), len(data), key_bytes,
                                                          header, data), key_bytes)
    return b"".join([prefix, header, b"\0" * _pad(len(header)), data]), kept


class _Record:
    """A verified record in a file buffer."""

    __slots__ = ("at", "buf", "end", "key")

    def __init__(self, buf: bytearray, at: int, end: int, key: str) -> None:
        self.buf, self.at, self.end, self.key = buf, at, end, key

    def dataset(self) -> xr.Dataset:
        n_header = _PREFIX.unpack_from(self.buf, self.at)[0]
        start = self.at + _PREFIX.size
        header = json.loads(bytes(memoryview(self.buf)[start:start + n_header]))
        base = start + n_header + _pad(n_header)
        coords: dict[str, xr.Variable] = {}
        data_vars: dict[str, xr.Variable] = {}
        is_coord = set(header["coords"])
        for entry in header["variables"]:
            dtype = np.dtype(entry["dtype"])
            shape = tuple(entry["shape"])
            if "strings" in entry:
                values = np.array(entry["strings"], dtype=dtype).reshape(shape)
            else:
                count = int(np.prod(shape, dtype=np.int64))
                values = np.frombuffer(self.buf, dtype=dtype, count=count,
                                       offset=base + entry["offset"]).reshape(shape)
            var = xr.Variable(entry["dims"], values, entry["attrs"])
            (coords if entry["name"] in is_coord else data_vars)[entry["name"]] = var
        return xr.Dataset(data_vars, coords=coords, attrs=header["attrs"])


def _parse(buf: bytearray) -> tuple[list[_Record], int, bool]:
    """``(sound records, damaged count, truncated)`` of a batch file's content.

    A record whose sha256 does not match is damaged; if its lengths run past the end
    of the file, nothing after it can be framed (``truncated``).
    """
    records: list[_Record] = []
    damaged = 0
    at = len(MAGIC)
    view = memoryview(buf)
    while at < len(buf):
        if at + _PREFIX.size > len(buf):
            return records, damaged + 1, True
        n_header, n_data, digest, key_bytes = _PREFIX.unpack_from(buf, at)
        start = at + _PREFIX.size
        data_at = start + n_header + _pad(n_header)
        end = data_at + n_data
        if end > len(buf):
            return records, damaged + 1, True
        header = view[start:start + n_header]
        if (_digest(n_header, n_data, key_bytes, header, view[data_at:end]) == digest
                and _KEY.fullmatch(key_bytes.decode("ascii", "replace"))):
            records.append(_Record(buf, at, end, key_bytes.decode("ascii")))
        else:
            damaged += 1
        at = end
    return records, damaged, False


def read_points(path: str | os.PathLike[str]) -> dict[str, xr.Dataset]:
    """The task datasets stored in the batch file ``path``, by task key.

    Raises ``ValueError`` if the file is not a batch file or has a damaged record.
    """
    buf = bytearray(Path(path).read_bytes())
    if not buf.startswith(MAGIC):
        raise ValueError(f"{os.fspath(path)}: not a symphase batch file (no magic bytes)")
    records, damaged, _ = _parse(buf)
    if damaged:
        raise ValueError(f"{os.fspath(path)}: {damaged} damaged record(s) (sha256 mismatch)")
    return {r.key: r.dataset() for r in records}


# -- writing ------------------------------------------------------------------------------
def _new_name() -> str:
    return f"{uuid.uuid4().hex}{POINTS_SUFFIX}"


class PointWriter:
    """Collects computed tasks (with their held locks) and writes them as batch files.

    :meth:`add` queues a task's record, returns the dataset a resumed run will see,
    and writes the queue as one file when :data:`MAX_POINTS_PER_FILE` records (or
    :data:`MAX_PENDING_BYTES`) are pending or :data:`FLUSH_SECONDS` have passed since
    its last write (or its creation); :meth:`flush` writes
    it now. The locks are released once their records are on disk (or the write
    failed). Use as a context manager: leaving it flushes, also on an exception.
    """

    def __init__(self, folder: Path, *, flush_seconds: float = FLUSH_SECONDS,
                 max_points: int = MAX_POINTS_PER_FILE) -> None:
        self.folder = folder
        self.flush_seconds = flush_seconds
        self.max_points = max_points
        self._pending: list[tuple[str, bytes, PointLock | None]] = []
        self._since = time.monotonic()  # the last write
        self._bytes = 0

    def add(self, key: str, ds: xr.Dataset, lock: PointLock | None) -> xr.Dataset:
        """Queue task ``key`` (whose ``lock`` the writer now owns); return its dataset."""
        try:
            record, kept = encode_point(key, ds)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        self._pending.append((key, record, lock))
        self._bytes += len(record)
        if (len(self._pending) >= self.max_points or self._bytes >= MAX_PENDING_BYTES
                or time.monotonic() - self._since >= self.flush_seconds):
            self.flush()
        return kept

    def flush(self) -> None:
        """Write the pending records as one batch file and release their locks."""
        pending, self._pending, self._bytes = self._pending, [], 0
        self._since = time.monotonic()
        if not pending:
            return
        try:
            name = _new_name()
            path = self.folder / POINTS_DIR / name
            # flushed to disk after the rename, in the background, and no folder fsync:
            # a file that a power failure lost or tore (its records fail verification)
            # only means recomputing its tasks
            write_atomic(path, [MAGIC, *(record for _, record, _ in pending)],
                         sync_folder=False, sync=False)
            _syncer.add(path)
            _catalog(self.folder).written(name, [key for key, _, _ in pending])
        finally:
            for _, _, lock in pending:
                if lock is not None:
                    lock.release()

    def __enter__(self) -> PointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


class _Syncer:
    """Flushes written batch files to disk (``fsync``) in a background thread.

    A batch file's ``fsync`` took 3-8 ms here, as long as computing a few small points:
    done by the writer, it delayed each Dask batch (and the locks of its tasks) by that
    much. Every record is verified when read (sha256), so a file renamed before it is on
    disk risks nothing but recomputation after a power failure (the folder is not
    flushed either). :meth:`wait` returns once the files added so far are flushed.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Path | threading.Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def add(self, path: Path | threading.Event) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid():  # none yet, or forked
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._run, args=(self._queue,),
                                                name="symphase-fsync", daemon=True)
                self._pid = os.getpid()
                self._thread.start()
            self._queue.put(path)

    @staticmethod
    def _run(todo: queue.SimpleQueue[Path | threading.Event]) -> None:
        while True:
            item = todo.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            with contextlib.suppress(OSError):  # removed meanwhile, or not supported
                fd = os.open(item, os.O_RDWR)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def wait(self) -> None:
        """Return once every file added before this call is flushed."""
        done = threading.Event()
        self.add(done)
        done.wait()


_syncer = _Syncer()


def wait_synced() -> None:
    """Return once every batch file this process wrote is flushed to disk."""
    _syncer.wait()


def store_point(folder: Path | None, key: str, ds: xr.Dataset) -> xr.Dataset:
    """Write task ``key`` as a batch file of its own now (if ``folder``); return its dataset.

    The caller holds the task's lock, or knows nobody else computes it. Returns what a
    resumed run will see (:func:`encode_point`).
    """
    if folder is None:
        return ds
    with PointWriter(folder) as writer:
        return writer.add(key, ds, None)


# -- reading ------------------------------------------------------------------------------
class _Catalog:
    """Which task keys the batch files of one folder hold, as this process has read them.

    Batch files are immutable (a damaged one is replaced by a file of the same name
    without the damaged records): listing the folder and reading only the names not
    seen before keeps the catalog current. An entry may be stale (a record removed as
    damaged); every record is verified again when it is decoded.
    """

    def __init__(self, folder: Path) -> None:
        self.points = folder / POINTS_DIR
        self.files: dict[str, list[str]] = {}  # file name -> keys of its sound records
        self.where: dict[str, set[str]] = {}  # key -> names of the files holding it
        self.lock = threading.Lock()

    def _add(self, name: str, keys: list[str]) -> None:
        self.files[name] = keys
        for key in keys:
            self.where.setdefault(key, set()).add(name)

    def written(self, name: str, keys: list[str]) -> None:
        with self.lock:
            self._add(name, keys)

    def forget(self) -> None:
        """Drop what was read (files were rewritten here): the next refresh reads all."""
        with self.lock:
            self.files.clear()
            self.where.clear()

    def refresh(self, warn: bool) -> dict[str, bytearray]:
        """Read the batch files not seen before; returns their content by name."""
        try:
            names = {n for n in os.listdir(self.points) if n.endswith(POINTS_SUFFIX)}
        except FileNotFoundError:
            names = set()
        fresh: dict[str, bytearray] = {}
        with self.lock:
            for gone in set(self.files) - names:
                for key in self.files.pop(gone):
                    self.where[key].discard(gone)
            new = names - set(self.files)
        for name in sorted(new):
            got = _read_file(self.points / name, warn)
            with self.lock:
                self._add(name, [] if got is None else [r.key for r in got[1]])
            if got is not None:
                fresh[name] = got[0]
        return fresh

    def holders(self, keys: Collection[str]) -> dict[str, list[str]]:
        """``{file name: the keys among keys it holds}``."""
        out: dict[str, list[str]] = {}
        with self.lock:
            for key in keys:
                for name in self.where.get(key, ()):
                    out.setdefault(name, []).append(key)
        return out


_catalogs: dict[str, _Catalog] = {}
_catalogs_lock = threading.Lock()


def _catalog(folder: Path) -> _Catalog:
    name = os.path.abspath(folder)
    with _catalogs_lock:
        if name not in _catalogs:
            _catalogs[name] = _Catalog(Path(name))
        return _catalogs[name]


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _read_file(path: Path, warn: bool) -> tuple[bytearray, list[_Record]] | None:
    """The content and sound records of a batch file; a damaged file is repaired.

    A file with damaged records is rewritten without them, or removed if none is sound
    (atomically: a concurrent reader sees either version, both without surprises).
    """
    try:
        buf = bytearray(path.read_bytes())
    except FileNotFoundError:
        return None  # replaced or removed meanwhile
    except OSError as exc:
        if warn:
            _warn(f"recomputing the sweep results in unreadable {path.name}: {exc}")
        return None
    if not buf.startswith(MAGIC):
        if warn:
            what = ("written by another version of symphase"
                    if buf.startswith(_MAGIC_FAMILY) else "not a symphase batch file")
            _warn(f"ignoring {path.name} in the sweep results: {what}")
        return None
    records, damaged, truncated = _parse(buf)
    if not damaged:
        return buf, records
    if warn:
        _warn(f"recomputing {damaged}{'+' if truncated else ''} damaged sweep result(s) in "
              f"{path.name}: the sha256 of the record does not match (the file is "
              f"rewritten with its {len(records)} sound record(s))")
    with contextlib.suppress(OSError):
        if records:
            write_atomic(path, [MAGIC, *(bytes(buf[r.at:r.end]) for r in records)])
            buf = bytearray(path.read_bytes())
            records = _parse(buf)[0]
        else:
            path.unlink()
    return buf, records


def _legacy(folder: Path, key: str, warn: bool) -> xr.Dataset | None:
    """Task ``key`` from its task file of the layout before batch files, if usable."""
    from framework.io import load

    path = point_path(folder, key)
    if not path.exists():
        return None
    try:
        with _io_lock:
            ds = load(path, require_checksum=True)
    except Exception as exc:
        if warn:
            _warn(f"recomputing unreadable or damaged sweep result {path.name}: {exc}")
        return None
    if ds.attrs.get("symphase_spec_sha256") != key:
        if warn:
            _warn(f"recomputing {path.name}: its specification hash does not match")
        return None
    return ds


def _best(candidates: list[xr.Dataset]) -> xr.Dataset | None:
    """A success if there is one, else the last failure."""
    for ds in candidates:
        if not is_failure(ds):
            return ds
    return candidates[-1] if candidates else None


def load_points(folder: Path, keys: Collection[str], *,
                warn: bool = True) -> dict[str, xr.Dataset]:
    """The stored datasets of those of ``keys`` that ``folder`` holds (sound records only).

    Damaged or unreadable files warn (:class:`RuntimeWarning`) unless not ``warn``.
    """
    catalog = _catalog(folder)
    fresh = catalog.refresh(warn)
    wanted = set(keys)
    found: dict[str, list[xr.Dataset]] = {}
    for name, held in sorted(catalog.holders(wanted).items()):
        buf = fresh.get(name)
        records: list[_Record]
        if buf is None:
            got = _read_file(catalog.points / name, warn)
            if got is None:
                continue
            buf, records = got
        else:
            records = _parse(buf)[0]
        for record in records:
            if record.key in held:
                found.setdefault(record.key, []).append(record.dataset())
    out = {k: ds for k, c in found.items() if (ds := _best(c)) is not None}
    for key in wanted - set(out):
        legacy = _legacy(folder, key, warn)
        if legacy is not None:
            out[key] = legacy
    return out


def load_point(folder: Path, key: str, *, warn: bool = True) -> xr.Dataset | None:
    """The stored dataset of task ``key``, or None (see :func:`load_points`)."""
    return load_points(folder, (key,), warn=warn).get(key)


#: A combined dataset up to this size (bytes) is serialized in memory, without Dask's lock.
IN_MEMORY_COMBINED_BYTES = 1 << 28


def remove_points(folder: Path, keys: Collection[str]) -> int:
    """Remove the stored records of the tasks ``keys``; returns how many were removed.

    Batch files are rewritten without them (atomically; a file left empty is removed)
    and old task files of those keys are deleted, so that the next run recomputes
    them. Do not run two of these on one folder at the same time (one rewrite could
    undo the other's); sweeps writing meanwhile are safe (they never modify a file).
    """
    points = Path(folder) / POINTS_DIR
    drop = set(keys)
    removed = 0
    for path in sorted(points.glob(f"*{POINTS_SUFFIX}")):
        got = _read_file(path, warn=True)
        if got is None:
            continue
        buf, records = got
        keep = [r for r in records if r.key not in drop]
        if len(keep) == len(records):
            continue
        removed += len(records) - len(keep)
        if keep:
            write_atomic(path, [MAGIC, *(bytes(buf[r.at:r.end]) for r in keep)])
        else:
            path.unlink(missing_ok=True)
    for key in drop:
        with contextlib.suppress(FileNotFoundError):
            point_path(Path(folder), key).unlink()
            removed += 1
    _catalog(Path(folder)).forget()
    return removed


def store_combined(folder: Path, name: str, ds: xr.Dataset) -> Path:
    """Write the combined dataset of analyzer ``name`` atomically to ``folder/<name>.nc``.

    Up to :data:`IN_MEMORY_COMBINED_BYTES` it is serialized in memory
    (``framework.io.save(..., lock=False)``): while a ``dask.distributed`` client is the
    default scheduler, xarray would otherwise take a ``distributed.Lock`` (a round trip
    to the scheduler) for every netCDF operation, ~100 per small combined file, though
    the temporary file is private to this call. Like a batch file, it is flushed to disk
    in the background after the rename (:func:`wait_synced`): after a power failure a
    partial file fails its checksum (:func:`framework.io.load`), and the next run of the
    sweep writes it again from the stored tasks.
    """
    from framework.io import save

    lock = _lock_file(folder / POINTS_DIR / _LOCKS_DIR / f"{name}.combined.lock", True)
    try:
        with _io_lock:
            _remove_stale(folder, f"{name}.nc")
            path = save(ds, folder / f"{name}.nc", lock=ds.nbytes > IN_MEMORY_COMBINED_BYTES,
                        sync=False)
            _syncer.add(path)  # like the batch files (a partial file fails its checksum)
            return path
    finally:
        if lock is not None:
            lock.release()
