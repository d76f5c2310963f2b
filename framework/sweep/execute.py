"""Sweep execution: run the tasks of a sweep on Dask or here, resume from storage.

One task is one (grid point, analyzer) pair: the point's experiment restricted to that
analyzer, keyed by its :func:`~framework.sweep.spec_hash`. :func:`run` validates the
sweep, reuses the tasks stored under ``results_dir`` (:mod:`framework.sweep.storage`),
computes the others with the chosen scheduler, stores them in batch files, and
combines them per analyzer (:mod:`framework.sweep.combine`). See :mod:`framework.sweep`
for the schedulers.

On Dask, the tasks are submitted in batches of at most ``points_per_task`` (default:
:func:`default_points_per_task`) that interleave the grid (:func:`_batches`), so that a
small point does not pay a scheduler round trip of its own. A batch carries its
validated experiments pickled together (:class:`_Recipes`, :class:`_Batch`) and comes
back as one pickle (:func:`_run_batch`). Tasks are stored by a
:class:`~framework.sweep.storage.PointWriter`:
a worker that sees the results folder writes the tasks of its batch as one batch file
itself (at the end of the batch, or earlier for slow points: see
:mod:`framework.sweep.storage`); the submitting process stores the others, one batch
file per Dask batch; a synchronous run writes a file every 64 tasks or every second
(``MAX_POINTS_PER_FILE``, ``FLUSH_SECONDS``), and what it computed on Ctrl-C or an
error. A task's lock is held from before it is computed until its record is written;
a writer releases its locks before it waits for another sweep's (no deadlock).
"""

from __future__ import annotations

import ast
import contextlib
import itertools
import logging
import os
import pickle
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import xarray as xr

from framework.experiment import Experiment
from framework.sweep.combine import combine_sweep
from framework.sweep.grid import Sweep, _apply, _describe, spec_hash
from framework.sweep.storage import (
    PointLock,
    PointWriter,
    _same_attrs,
    acquire,
    folder_token,
    is_failure,
    load_point,
    load_points,
    prepare,
    sees_folder,
    store_combined,
)
from framework.validators import SpecificationError

__all__ = ["default_points_per_task", "default_scheduler", "run", "spawn_is_safe", "sweep"]

#: Upper bound of the default batch size (:func:`default_points_per_task`).
MAX_DEFAULT_POINTS_PER_TASK = 32
#: The scheduler names that are not addresses.
KNOWN_SCHEDULERS = ("processes", "threads", "synchronous")
#: Batches per worker the default aims at (load balance against per-task overhead: a
#: Dask task costs ~2-5 ms of CPU in the client, the scheduler and the worker, several
#: small points' worth; batches interleave the grid, see :func:`_batches`).
TASKS_PER_WORKER = 2


def default_points_per_task(n_tasks: int, n_workers: int) -> int:
    """Default batch size: about :data:`TASKS_PER_WORKER` batches per worker.

    ``max(1, min(MAX_DEFAULT_POINTS_PER_TASK, n_tasks // (TASKS_PER_WORKER * n_workers)))``:
    a sweep with few tasks per worker is not batched; a long sweep of small points pays
    one scheduler round trip per batch instead of one per point, and the batches
    interleave the grid (:func:`_batches`) so that uneven points balance.
    """
    return max(1, min(MAX_DEFAULT_POINTS_PER_TASK,
                      n_tasks // (TASKS_PER_WORKER * max(1, n_workers))))


def _check_points_per_task(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise SpecificationError(
            f"'points_per_task' must be an integer >= 1 or None, got {value!r}"
        )
    if value < 1:
        raise SpecificationError(f"'points_per_task' must be >= 1, got {value!r}")
    return int(value)


def run(
    sweep: Sweep,
    *,
    results_dir: str | os.PathLike[str] | None = None,
    scheduler: Any = None,
    workers: int | None = None,
    progress: bool | None = None,
    retry_failed: bool = False,
    points_per_task: int | None = None,
) -> dict[str, xr.Dataset]:
    """Run ``sweep`` and return ``{analyzer name: Dataset}``; see :meth:`Sweep.run`."""
    batch = _check_points_per_task(points_per_task)
    experiments = sweep.validate()
    if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
        raise SpecificationError(f"'workers' must be >= 1, got {workers!r}")
    if isinstance(scheduler, str) and scheduler not in KNOWN_SCHEDULERS:
        _check_address(scheduler)  # one clear error, before anything is computed
    folder = Path(results_dir) if results_dir is not None else None
    if folder is not None:
        prepare(folder)

    tasks, keys, recipes = _tasks(sweep, experiments)

    results: dict[str, xr.Dataset] = {}
    if folder is not None:
        for key, stored in load_points(folder, tasks).items():
            if not retry_failed or not is_failure(stored):
                results[key] = stored
    todo = {k: t for k, t in tasks.items() if k not in results}
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if scheduler is None:
        scheduler = default_scheduler(len(todo))
    how = (None if scheduler == "synchronous" or not todo  # nothing is sent anywhere
           else _Recipes(sweep, {k: recipes[k] for k in todo}, todo))
    _execute(todo, results, folder, scheduler, workers, show, len(tasks), batch,
             retry_failed, how)

    out = {}
    for analyzer in sweep.experiment.analyzers:
        names = keys[analyzer.name]
        combined = combine_sweep(sweep, analyzer, [results[k] for k in names], names)
        if folder is not None:
            store_combined(folder, analyzer.name, combined)
        out[analyzer.name] = combined
    return out


#: A task's place in its sweep: (the analyzer's position in the base experiment, the
#: grid index of its point).
Recipe = tuple[int, tuple[int, ...]]
#: What a worker is sent per task: the experiment's JSON, or ``(analyzer position,
#: grid assignment)`` to apply to the base of that analyzer (:func:`_experiment`).
Spec = str | tuple[int, tuple[tuple[str, Any], ...]]

_PLAIN = (str, int, float, bool, type(None))


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is JSON data of Python types (pickles as itself, nothing else)."""
    if type(value) in _PLAIN:
        return True
    if type(value) in (list, tuple):
        return all(_is_plain(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _is_plain(v) for k, v in value.items())
    return False


class _Recipes:
    """How the submitting process describes tasks to workers: pickles, or overrides of a base.

    Building a point's experiment on a worker costs: its JSON ~0.5 ms to parse
    (:meth:`Experiment.from_json` validates every field), the grid values applied to a
    parsed base ~0.2 ms (validated again), a tenth and a twentieth of a small point.
    The validated experiments of a batch pickled together cost ~0.01 ms per point to
    unpickle (and sub-objects they share, such as the model, are pickled once). So
    a task is sent as its pickled experiment (:attr:`pickled`, per analyzer) when the
    analyzer's first and last tasks pickle without references to ``__main__`` (whose
    classes a worker cannot import) and unpickle to experiments that hash to their keys
    (checked here, before any work).

    Otherwise, and as the fallback of a worker that cannot unpickle a batch, a task is
    described as the grid assignment of its point, applied on the worker to the JSON of
    the base experiment restricted to its analyzer (:attr:`bases`; sent once per Dask
    task, parsed once per worker process, :func:`_base`) as :meth:`Sweep.validate` did
    (``grid._apply``). Only for grid values that are plain JSON data (numbers, strings,
    ...; a normalization instance or an input distribution makes it the point's JSON),
    and only for an analyzer whose first and last tasks rebuilt this way hash to their
    keys (checked here; else its tasks are sent as JSON): the worker builds the
    experiment the key was computed from (tested for the grid keys).
    """

    def __init__(self, sweep: Sweep, recipes: Mapping[str, Recipe],
                 tasks: Mapping[str, Experiment] | None = None) -> None:
        self.sweep = sweep
        self.recipes = dict(recipes)
        analyzers = sweep.experiment.analyzers
        plain = all(_is_plain(v) for values in sweep.grid.values() for v in values)
        bases: list[str | None] = []
        for analyzer in analyzers:
            base = None
            if plain:
                with contextlib.suppress(ValueError, TypeError, LookupError):
                    base = (sweep.experiment if len(analyzers) == 1 else attrs.evolve(
                        sweep.experiment, analyzers=(analyzer,))).to_json()
            bases.append(base)
        self.bases = tuple(bases)
        first: dict[int, str] = {}
        last: dict[int, str] = {}
        for key, (j, _) in self.recipes.items():
            first.setdefault(j, key)
            last[j] = key
        pickled = [tasks is not None] * len(analyzers)
        for key in {*first.values(), *last.values()}:  # checks, before any work
            j, index = self.recipes[key]
            if pickled[j] and tasks is not None:
                pickled[j] = _pickles_to(tasks[key], key)
            if bases[j] is None:
                continue
            try:
                same = spec_hash(_experiment(self._override(j, index), self.bases)) == key
            except (ValueError, TypeError, LookupError):
                same = False
            if not same:  # e.g. a grid key that grid._apply would not rebuild alike
                bases[j] = None
        self.bases = tuple(bases)
        #: Per analyzer: whether its tasks are sent as pickled experiments.
        self.pickled = tuple(pickled)

    def _override(self, j: int, index: tuple[int, ...]) -> Spec:
        return (j, tuple(self.sweep._assignment(index).items()))

    def spec(self, key: str, task: Experiment) -> Spec:
        """What a worker is sent for task ``key`` (whose experiment is ``task``), unpickled."""
        recipe = self.recipes.get(key)
        if recipe is None or self.bases[recipe[0]] is None:
            return task.to_json()
        return self._override(*recipe)

    def batch(self, items: Sequence[tuple[str, Experiment]]) -> _Batch:
        """The :class:`_Batch` of the tasks ``items`` (``(key, experiment)`` pairs)."""
        keys = [key for key, _ in items]
        specs: list[Spec | None] = []
        chosen: list[int] = []
        objects: list[Experiment] = []
        for i, (key, task) in enumerate(items):
            recipe = self.recipes.get(key)
            if recipe is not None and self.pickled[recipe[0]]:
                chosen.append(i)
                objects.append(task)
                # the fallback if the worker cannot unpickle: only when it is cheap
                specs.append(None if self.bases[recipe[0]] is None
                             else self._override(*recipe))
            else:
                specs.append(self.spec(key, task))
        blob = pickle.dumps(objects, protocol=pickle.HIGHEST_PROTOCOL) if objects else None
        return _Batch(keys, specs, tuple(chosen), blob, self.bases)


def _pickles_to(task: Experiment, key: str) -> bool:
    """Whether ``task`` pickles without ``__main__`` references and back to hash ``key``."""
    try:
        data = pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)
        return b"__main__" not in data and spec_hash(pickle.loads(data)) == key
    except Exception:  # anything unpicklable: sent as overrides or JSON instead
        return False


class _Batch:
    """The tasks of one Dask task, as sent to a worker (built by :meth:`_Recipes.batch`).

    ``keys`` and ``specs`` per task (:data:`Spec`, or None for a task only in the pickle);
    ``pickled``: the positions of the tasks whose experiments ``blob`` holds (pickled
    together, in that order); ``bases``: the base experiments' JSON that the overrides
    apply to. Dask does not look inside (a tuple of tuples it would walk, ~0.5 ms per
    batch of 16 in the submitting process).
    """

    __slots__ = ("bases", "blob", "keys", "pickled", "specs")

    def __init__(self, keys: Sequence[str], specs: Sequence[Spec | None],
                 pickled: tuple[int, ...], blob: bytes | None,
                 bases: Sequence[str | None]) -> None:
        self.keys = list(keys)
        self.specs = list(specs)
        self.pickled = pickled
        self.blob = blob
        self.bases = tuple(bases)

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.keys, self.specs, self.pickled, self.blob, self.bases)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.keys, self.specs, self.pickled, self.blob, self.bases = state

    def __len__(self) -> int:
        return len(self.keys)

    def items(self) -> list[tuple[Spec | Experiment, str]]:
        """``(spec or experiment, key)`` per task (the pickled experiments unpickled).

        A batch whose pickle this process cannot load (another version of a class, a
        missing module) uses the overrides sent along; a task without them raises
        :class:`~framework.validators.SpecificationError` saying why.
        """
        specs: list[Spec | Experiment | None] = list(self.specs)
        if self.blob is not None:
            try:
                objects = pickle.loads(self.blob)
            except Exception as exc:
                for i in self.pickled:
                    if specs[i] is None:
                        raise SpecificationError(
                            f"sweep task {self.keys[i]}: this worker cannot unpickle the "
                            f"experiments sent to it ({type(exc).__name__}: "
                            f"{_describe(exc)}); do the worker and the submitting process "
                            "run the same symphase and plugins?"
                        ) from exc
            else:
                for i, task in zip(self.pickled, objects, strict=True):
                    specs[i] = task
        assert all(s is not None for s in specs)
        return [(s, k) for s, k in zip(specs, self.keys, strict=True)]  # type: ignore[misc]


_bases: dict[str, Experiment] = {}
_bases_lock = threading.Lock()
#: Base experiments a worker process keeps parsed (a few sweeps at a time).
MAX_CACHED_BASES = 16


def _base(text: str) -> Experiment:
    """``Experiment.from_json(text)``, parsed once per process (a few kept)."""
    with _bases_lock:
        base = _bases.get(text)
    if base is None:
        base = Experiment.from_json(text)
        with _bases_lock:
            if len(_bases) >= MAX_CACHED_BASES:
                _bases.pop(next(iter(_bases)))
            _bases[text] = base
    return base


def _experiment(spec: Spec | Experiment, bases: Sequence[str | None] = ()) -> Experiment:
    """The experiment of a task as sent to a worker (see :class:`_Recipes`)."""
    if isinstance(spec, Experiment):
        return spec
    if isinstance(spec, str):
        return Experiment.from_json(spec)
    j, assignment = spec
    text = bases[j]
    assert text is not None
    return _apply(_base(text), dict(assignment))


def _tasks(sweep: Sweep, experiments: Sequence[Experiment]) -> tuple[
        dict[str, Experiment], dict[str, list[str]], dict[str, Recipe]]:
    """``(tasks, keys, recipes)`` of a validated sweep (``experiments`` in C order).

    One task per (point, analyzer), by key (identical specifications share a task);
    ``keys``: per analyzer, the key of each point in C order; ``recipes``: each task's
    place in the sweep (:data:`Recipe`, for :class:`_Recipes`).
    """
    tasks: dict[str, Experiment] = {}
    keys: dict[str, list[str]] = {a.name: [] for a in sweep.experiment.analyzers}
    recipes: dict[str, Recipe] = {}
    indexes = itertools.product(*(range(n) for n in sweep.shape))
    for exp, index in zip(experiments, indexes, strict=True):
        for j, analyzer in enumerate(exp.analyzers):
            # a point of one analyzer is its own task (evolve would validate it again)
            task = exp if len(exp.analyzers) == 1 else attrs.evolve(exp, analyzers=(analyzer,))
            key = spec_hash(task)
            if key not in tasks:
                tasks[key] = task
                recipes[key] = (j, index)
            keys[analyzer.name].append(key)
    return tasks, keys, recipes


_plugin_lock = threading.Lock()


def _plugin_key(obj: Any) -> str:
    name = getattr(obj, "__name__", None)
    module = getattr(obj, "__module__", None)
    if name is None:
        name, module = type(obj).__qualname__, type(obj).__module__
    return f"{module}:{name}"


def _ensure_plugins(plugins: Sequence[Any]) -> None:
    """Register on this worker the run-time plugins of the submitting process."""
    from framework import manager

    with _plugin_lock:
        have = {_plugin_key(p) for p in manager._runtime_plugins}
        for plugin in plugins:
            if _plugin_key(plugin) not in have:
                manager.register_plugin(plugin)
                have.add(_plugin_key(plugin))


def _compute(spec: Spec | Experiment, key: str, plugins: Sequence[Any] = (),
             bases: Sequence[str | None] = ()) -> xr.Dataset:
    """Run one task: an experiment (on a worker: its :data:`Spec`) with exactly one analyzer.

    An exception raised by the analyzer is returned as a failure record (a dataset
    without variables, ``symphase_failed = 1``, ``symphase_error``), so that the other
    points complete and the failure is stored like a result.
    """
    from framework.results import finalize, provenance_attrs

    _ensure_plugins(plugins)
    experiment = _experiment(spec, bases)
    (analyzer,) = experiment.analyzers
    try:
        ds = finalize(analyzer.run(experiment), experiment, analyzer)
        ds.attrs["symphase_failed"] = 0
    except Exception as exc:
        ds = xr.Dataset(attrs=provenance_attrs(experiment, analyzer))
        ds.attrs["symphase_failed"] = 1
        ds.attrs["symphase_error"] = f"{type(exc).__name__}: {_describe(exc)}"
    ds.attrs["symphase_spec_sha256"] = key
    return ds


def _reusable(ds: xr.Dataset | None, retry_failed: bool) -> bool:
    return ds is not None and not (retry_failed and is_failure(ds))


def _acquire(folder: Path, key: str, writer: PointWriter, wait: bool) -> PointLock | None:
    """The lock of task ``key``; with ``wait``, the writer's locks are released first.

    A writer holds the locks of its pending tasks: waiting for another sweep's lock
    while holding them could deadlock (that sweep may wait for one of ours).
    """
    lock = acquire(folder, key)
    if lock is None and wait:
        writer.flush()
        lock = acquire(folder, key, wait=True)
    return lock


def _compute_locked(folder: Path, spec: Spec | Experiment, key: str, plugins: Sequence[Any],
                    retry_failed: bool, writer: PointWriter, wait: bool = False,
                    bases: Sequence[str | None] = ()) -> xr.Dataset | None:
    """Compute task ``key`` under its lock and queue it on ``writer``.

    Returns the dataset a resumed run will see, or None if another sweep holds the
    lock (unless ``wait``). Holding the lock, a record another sweep stored meanwhile is
    reused instead of computing the task again. The writer releases the lock once the
    record is written.
    """
    lock = _acquire(folder, key, writer, wait)
    if lock is None:
        return None
    try:
        stored = load_point(folder, key, warn=False)
        if _reusable(stored, retry_failed):
            lock.release()
            return stored
        ds = _compute(spec, key, plugins, bases)
    except BaseException:
        lock.release()
        raise
    return writer.add(key, ds, lock)


#: Status of a task returned by a worker: stored by the worker, to be stored by the
#: submitting process, or skipped because another sweep holds its lock.
STORED, RETURNED, BUSY = "stored", "returned", "busy"


def _compute_batch(
    items: _Batch | Sequence[tuple[Spec, str]],
    plugins: Sequence[Any],
    folder: Path | None,
    token: str | None,
    retry_failed: bool = False,
    bases: Sequence[str | None] = (),
) -> list[tuple[str, xr.Dataset | None, str]]:
    """Run a batch of tasks (on a worker); store them as one batch file if the folder is here.

    ``items``: a :class:`_Batch`, or ``(spec, key)`` pairs (:data:`Spec`; ``bases`` the
    base experiments' JSON that the overrides apply to, see :class:`_Recipes`).

    Returns ``(key, dataset, status)`` per task: :data:`STORED` (the task's record was
    written here under its lock before this returns; ``dataset`` is what a resumed run
    will see), :data:`RETURNED` (the submitting process stores it) or :data:`BUSY`
    (another sweep holds the task's lock; ``dataset`` is None).
    """
    work: Sequence[tuple[Spec | Experiment, str]]
    if isinstance(items, _Batch):
        bases, work = items.bases, items.items()
    else:
        work = items
    if folder is None or token is None or not sees_folder(folder, token):
        out = [(key, _cheap_to_pickle(_compute(spec, key, plugins, bases)), RETURNED)
               for spec, key in work]
    else:
        out = []
        with PointWriter(folder) as writer:
            for spec, key in work:
                ds = _compute_locked(folder, spec, key, plugins, retry_failed, writer,
                                     bases=bases)
                out.append((key, _cheap_to_pickle(ds), STORED if ds is not None else BUSY))
    _share_indexes([ds for _, ds, _ in out])
    return out


def _run_batch(*args: Any) -> bytes:
    """:func:`_compute_batch` on a Dask worker, its result pickled here.

    Dask measures a task's result (``sizeof``, walking every variable of every dataset)
    and serializes it object by object, ~0.1 ms per small point in the worker; the
    bytes cost neither, and pickled together the batch's shared index coordinates are
    written once (:func:`_share_indexes`). The submitting process unpickles them.
    """
    return pickle.dumps(_compute_batch(*args), protocol=pickle.HIGHEST_PROTOCOL)


def _same_coordinate(a: tuple[Any, xr.Variable], b: tuple[Any, xr.Variable]) -> bool:
    """Whether two (index, index variable) pairs are identical (as ``Variable.identical``,
    with the same index type, dimension, dtype and encoding)."""
    from xarray.core.indexes import PandasIndex

    (a_index, a_var), (b_index, b_var) = a, b
    try:
        return bool(
            type(a_index) is PandasIndex and type(b_index) is PandasIndex
            and a_index.dim == b_index.dim and a_index.coord_dtype == b_index.coord_dtype
            and type(a_var) is type(b_var) and a_var.dims == b_var.dims
            and a_var.dtype == b_var.dtype and a_var.shape == b_var.shape
            and _same_attrs(a_var.attrs, b_var.attrs) and a_var.encoding == b_var.encoding
            and np.array_equal(a_index.index.values, b_index.index.values)
        )
    except (ValueError, TypeError):  # e.g. an array-valued attr
        return False


def _share_indexes(datasets: Sequence[xr.Dataset | None]) -> None:
    """Make the identical index coordinates of a batch's datasets one object each.

    Pickling a batch back to the submitting process then writes each such coordinate
    once (pickle's memo) instead of once per point: rebuilding a pandas index is most
    of the cost of unpickling a small point's dataset (16 points of ``dynamics``:
    7 ms -> 0.8 ms), and the combination compares identical objects at no cost. The
    datasets are unchanged (an index and its variable are replaced by an identical
    one); on an xarray whose datasets keep them otherwise, nothing is shared.
    """
    seen: dict[Any, tuple[Any, xr.Variable]] = {}
    for ds in datasets:
        if ds is None:
            continue
        indexes = getattr(ds, "_indexes", None)
        variables = getattr(ds, "_variables", None)
        if type(indexes) is not dict or type(variables) is not dict:
            return
        for name, index in list(indexes.items()):
            var = variables.get(name)
            if var is None:
                continue
            first = seen.setdefault(name, (index, var))
            if first[0] is not index and _same_coordinate(first, (index, var)):
                indexes[name], variables[name] = first


def _cheap_to_pickle(ds: xr.Dataset | None) -> xr.Dataset | None:
    """``ds``, with its unset ``_cache`` slot set to ``{}`` (what xarray's accessors do).

    Pickling reads every slot; reading the unset one goes through xarray's
    ``__getattr__``, which builds a "did you mean" message with difflib: that was half
    the cost of pickling a small point's dataset back to the client (~0.1 ms).
    """
    if ds is not None:
        try:
            object.__getattribute__(ds, "_cache")
        except AttributeError:
            with contextlib.suppress(AttributeError, TypeError):
                object.__setattr__(ds, "_cache", {})
    return ds


def _execute(
    todo: dict[str, Experiment],
    results: dict[str, xr.Dataset],
    folder: Path | None,
    scheduler: Any,
    workers: int | None,
    show: bool,
    total: int,
    points_per_task: int | None,
    retry_failed: bool = False,
    recipes: _Recipes | None = None,
) -> None:
    from framework import manager

    if not todo:
        return
    plugins = tuple(manager._runtime_plugins)
    bar = _progress(show, total, total - len(todo))
    busy: list[str] = []
    writer = PointWriter(folder) if folder is not None else None

    def done(key: str, ds: xr.Dataset | None, status: str) -> None:
        if status == BUSY:
            busy.append(key)
            return
        if status == RETURNED and writer is not None:
            assert folder is not None and ds is not None
            ds = writer.add(key, ds, _acquire(folder, key, writer, wait=True))
        assert ds is not None
        results[key] = ds
        bar.update(1)

    try:
        if scheduler == "synchronous":
            for key, task in todo.items():
                if writer is None:
                    done(key, _compute(task, key, plugins), RETURNED)
                else:
                    assert folder is not None
                    ds = _compute_locked(folder, task, key, plugins, retry_failed, writer)
                    done(key, ds, STORED if ds is not None else BUSY)
        else:
            _execute_dask(todo, folder, scheduler, workers, points_per_task, plugins,
                          retry_failed, done, writer, recipes)
        # Tasks another sweep was computing: wait for its lock, reuse what it stored.
        for key in busy:
            assert folder is not None and writer is not None
            ds = _compute_locked(folder, todo[key], key, plugins, retry_failed, writer,
                                 wait=True)
            assert ds is not None
            results[key] = ds
            bar.update(1)
    finally:
        try:
            if writer is not None:
                writer.flush()  # also on Ctrl-C: every point computed here is kept
        finally:
            bar.close()


def _execute_dask(
    todo: dict[str, Experiment],
    folder: Path | None,
    scheduler: Any,
    workers: int | None,
    points_per_task: int | None,
    plugins: Sequence[Any],
    retry_failed: bool,
    done: Any,
    writer: PointWriter | None,
    recipes: _Recipes | None = None,
) -> None:
    client, owned = _client(scheduler, workers, len(todo))
    futures: list[Any] = []
    finished = False
    try:
        from distributed import as_completed

        n_workers = max(1, sum(client.nthreads().values()))
        size = points_per_task or default_points_per_task(len(todo), n_workers)
        token = folder_token(folder) if folder is not None else None
        where = folder.absolute() if folder is not None else None
        for batch in _batches(list(todo.items()), size):
            sent = (recipes.batch(batch) if recipes is not None else
                    _Batch([k for k, _ in batch], [t.to_json() for _, t in batch], (), None,
                           ()))
            futures.append(client.submit(
                _run_batch, sent, plugins, where, token, retry_failed,
                key=f"symphase-{batch[0][0]}-{len(batch)}", pure=False))
        for future in as_completed(futures):
            for key, ds, status in pickle.loads(future.result()):
                done(key, ds, status)
            if writer is not None:
                writer.flush()  # what this process stored for the batch
        finished = True
    finally:
        _shutdown(client, owned, futures, finished)


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` in ``ceil(len / size)`` batches of at most ``size``, interleaved.

    Batch ``j`` holds items ``j, j + n, j + 2n, ...`` (``n`` batches): the cost of a
    point often varies smoothly along the grid (e.g. with ``eta`` or ``K``), and
    interleaved batches cost about the same, so that few batches per worker balance.
    """
    n = -(-len(items) // size)
    return [items[j::n] for j in range(n)]


def _worker_pids(cluster: Any) -> list[int]:
    """Process ids of the worker processes of an embedded ``LocalCluster``."""
    pids = []
    for nanny in list(getattr(cluster, "workers", {}).values()):
        process = getattr(getattr(nanny, "process", None), "process", None)
        pid = getattr(process, "pid", None)
        if isinstance(pid, int):
            pids.append(pid)
    return pids


def _shutdown(client: Any, owned: list[Any], futures: list[Any], finished: bool) -> None:
    """Release the cluster; after an interruption or error, kill owned workers first.

    An interrupted run (Ctrl-C, SIGTERM in the CLI, an exception) must not wait for the
    points being computed: the worker processes of an embedded cluster are killed
    (SIGKILL) before the cluster is closed; every point stored so far is whole (stores
    are atomic) and a re-run resumes from them.
    """
    quiet = _quiet_dask() if not finished else contextlib.nullcontext()
    with quiet:
        _release(client, owned, futures, finished)


#: Seconds Dask's loggers stay silent after an interrupted run began tearing down.
QUIET_SECONDS = 10.0


@contextlib.contextmanager
def _quiet_dask() -> Any:
    """Silence Dask's loggers while an interrupted run tears its cluster down.

    Killing workers mid-task makes the scheduler log errors about keys it cannot gather,
    and a thread worker that is still computing logs its cancelled close a little later;
    the run reports the interruption itself, in one line. The levels are restored
    :data:`QUIET_SECONDS` after the teardown (a timer), so that later Dask use in the same
    process (a notebook) logs as before.
    """
    names = ["distributed", *(n for n in logging.root.manager.loggerDict
                              if n.startswith("distributed."))]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL + 1)

    def restore() -> None:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)

    try:
        yield
    finally:
        timer = threading.Timer(QUIET_SECONDS, restore)
        timer.daemon = True
        timer.start()


def _release(client: Any, owned: list[Any], futures: list[Any], finished: bool) -> None:
    if not finished:
        for thing in owned:
            for nanny in list(getattr(thing, "workers", {}).values()):
                with contextlib.suppress(Exception):
                    nanny.auto_restart = False
            for pid in _worker_pids(thing):
                with contextlib.suppress(OSError):
                    os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
    with contextlib.suppress(Exception):
        if futures and not owned:  # a shared cluster: do not leave our tasks queued there
            client.cancel(futures)
    for thing in owned:
        if finished:
            thing.close()
        else:
            with contextlib.suppress(Exception):
                thing.close(timeout=2) if "Cluster" in type(thing).__name__ else thing.close()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(show: bool, total: int, done: int) -> Any:
    if not show:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the 'sweep' extra
        return _NoBar()
    return tqdm(total=total, initial=done, desc="sweep", unit="task", file=sys.stderr)


def _client(scheduler: Any, workers: int | None, n_tasks: int) -> tuple[Any, list[Any]]:
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - dask is in the 'sweep' extra
        raise SpecificationError(
            "'scheduler' needs dask.distributed (pip install 'symphase[sweep]'); "
            "use scheduler='synchronous' without it"
        ) from None
    if isinstance(scheduler, Client):
        return scheduler, []
    if scheduler in ("processes", "threads"):
        processes = scheduler == "processes"
        if processes and not spawn_is_safe():
            raise SpecificationError(
                "'scheduler' 'processes': worker processes are spawned and re-run the "
                f"main script {_main_file()!r}, which calls the sweep outside an "
                "`if __name__ == \"__main__\":` block; add that guard, or use "
                "scheduler='threads' (the default there)"
            )
        n = workers or max(1, min(os.cpu_count() or 1, n_tasks))
        extra = {"preload": ["framework.sweep._worker"]} if processes else {}
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=processes,
            dashboard_address=":0", silence_logs=logging.ERROR, **extra,
        )
        try:
            client = Client(cluster)
        except BaseException:
            cluster.close()
            raise
        return client, [client, cluster]
    if not isinstance(scheduler, str):
        raise TypeError(
            "'scheduler' must be None, 'processes', 'threads', 'synchronous', a scheduler "
            f"address or a distributed.Client, got {scheduler!r}"
        )
    _check_address(scheduler)
    try:
        client = Client(scheduler)  # timeout: dask config distributed.comm.timeouts.connect
    except (OSError, TimeoutError, ValueError) as exc:
        raise SpecificationError(
            f"'scheduler' {scheduler!r}: cannot connect ({_describe(exc)})"
        ) from None
    return client, [client]


def _check_address(scheduler: str) -> None:
    """A scheduler address is ``protocol://host:port`` or ``host:port``; one clear error."""
    try:
        from distributed.comm import parse_address, parse_host_port
    except ImportError:  # pragma: no cover - dask is in the 'sweep' extra
        raise SpecificationError(
            f"'scheduler' {scheduler!r} needs dask.distributed (pip install "
            "'symphase[sweep]'); use scheduler='synchronous' without it"
        ) from None

    hint = ("expected a dask.distributed scheduler address such as 'tcp://host:8786', "
            "or 'processes', 'threads', 'synchronous'")
    try:
        protocol, location = parse_address(scheduler)
        if protocol in ("tcp", "tls", "ws", "wss"):
            host, _ = parse_host_port(location)
            if not host:
                raise ValueError("no host")
    except (ValueError, TypeError) as exc:
        raise SpecificationError(
            f"'scheduler' {scheduler!r} is not a scheduler address ({_describe(exc)}); {hint}"
        ) from None


def _main_file() -> str | None:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return path if isinstance(path, str) else None


def _guarded_lines(source: str) -> list[tuple[int, int]]:
    """Line ranges of the bodies of ``if __name__ == "__main__":`` blocks in ``source``."""

    def is_main_test(test: ast.expr) -> bool:
        if not (isinstance(test, ast.Compare) and len(test.ops) == 1
                and isinstance(test.ops[0], ast.Eq)):
            return False
        sides = [test.left, test.comparators[0]]
        names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
        consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
        return len(names) == 1 and len(consts) == 1

    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and is_main_test(node.test) and node.body:
            out.append((node.body[0].lineno, node.body[-1].end_lineno or node.lineno))
    return out


def spawn_is_safe() -> bool:
    """Whether spawned worker processes can start without re-running this sweep.

    A spawned process imports the main script again (as ``__mp_main__``). That is safe
    when there is no main script file (an interactive session, a notebook, ``python -c``)
    or when the code that runs this sweep is inside an ``if __name__ == "__main__":``
    block of the script (found by reading the script: the line of its top-level frame
    that is executing must lie in such a block; the ``symphase`` command is). When the
    script cannot be read, it is not safe.
    """
    path = _main_file()
    if path is None:
        return True
    main = sys.modules["__main__"]
    frame = sys._getframe()
    line = None
    while frame is not None:  # the outermost frame of the main script's top level
        if frame.f_code.co_name == "<module>" and frame.f_globals is vars(main):
            line = frame.f_lineno
        frame = frame.f_back  # type: ignore[assignment]
    if line is None:
        return False  # e.g. another thread: the script's state is unknown
    try:
        with open(path, encoding="utf-8") as fh:
            blocks = _guarded_lines(fh.read())
    except (OSError, SyntaxError, ValueError):
        return False
    return any(first <= line <= last for first, last in blocks)


def default_scheduler(n_tasks: int) -> str:
    """The scheduler of ``scheduler=None``: where the tasks run when the caller does not say.

    ``"synchronous"`` for a single task (a cluster would only add start-up time);
    ``"processes"`` (a local cluster of worker processes, real parallelism) when
    :func:`spawn_is_safe`; else ``"threads"`` (a local cluster of threads in this process:
    a script without a main guard works, and numpy/scipy release the GIL for much of the
    work, but pure-Python parts of the points do not run in parallel).
    """
    if n_tasks <= 1:
        return "synchronous"
    return "processes" if spawn_is_safe() else "threads"


def sweep(
    experiment: Experiment,
    grid: Mapping[str, Sequence[Any]] | None = None,
    /,
    *,
    results_dir: str | os.PathLike[str] | None = None,
    scheduler: Any = None,
    workers: int | None = None,
    progress: bool | None = None,
    retry_failed: bool = False,
    points_per_task: Any = None,
    **more: Sequence[Any],
) -> dict[str, xr.Dataset]:
    """Sweep ``experiment`` over ``grid`` (and/or keyword grid keys); see :meth:`Sweep.run`.

    ``points_per_task`` is an int or None (typed ``Any`` so that
    :meth:`Experiment.sweep <framework.Experiment.sweep>` can forward it with the grid
    keywords); it is validated by :meth:`Sweep.run`.
    """
    full = dict(grid or {})
    for key, values in more.items():
        if key in full:
            raise SpecificationError(f"sweep key {key!r} given twice")
        full[key] = values
    return Sweep(experiment, full).run(
        results_dir=results_dir, scheduler=scheduler, workers=workers, progress=progress,
        retry_failed=retry_failed, points_per_task=points_per_task,
    )
