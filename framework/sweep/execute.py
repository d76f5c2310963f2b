"""Sweep execution: run the tasks of a sweep on Dask or here, resume from storage.

One task is one (grid point, analyzer) pair: the point's experiment restricted to that
analyzer, keyed by its :func:`~framework.sweep.spec_hash`. :func:`run` validates the
sweep, reuses the tasks stored under ``results_dir`` (:mod:`framework.sweep.storage`),
computes the others with the chosen scheduler, stores each as it completes, and
combines them per analyzer (:mod:`framework.sweep.combine`). See :mod:`framework.sweep`
for the schedulers.

On Dask, the tasks are submitted in batches of ``points_per_task`` (default:
:func:`default_points_per_task`), so that a small point does not pay a scheduler round
trip of its own; a worker that sees the results folder stores each task's file itself
as soon as the task is computed (the submitting process stores the others).
"""

from __future__ import annotations

import logging
import os
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
from framework.sweep.grid import Sweep, _describe, spec_hash
from framework.sweep.storage import (
    folder_token,
    is_failure,
    load_point,
    prepare,
    sees_folder,
    store_combined,
    store_point,
)
from framework.validators import SpecificationError

__all__ = ["default_points_per_task", "run", "sweep"]

#: Upper bound of the default batch size (:func:`default_points_per_task`).
MAX_DEFAULT_POINTS_PER_TASK = 32
#: Batches per worker the default aims at (load balance against per-task overhead).
TASKS_PER_WORKER = 4


def default_points_per_task(n_tasks: int, n_workers: int) -> int:
    """Default batch size: about :data:`TASKS_PER_WORKER` batches per worker.

    ``max(1, min(MAX_DEFAULT_POINTS_PER_TASK, n_tasks // (TASKS_PER_WORKER * n_workers)))``:
    a sweep with few tasks per worker is not batched; a long sweep of small points pays
    one scheduler round trip per batch instead of one per point, and every worker still
    gets several batches to balance uneven points.
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
    folder = Path(results_dir) if results_dir is not None else None
    if folder is not None:
        prepare(folder)

    # One task per (point, analyzer); identical specifications share a task.
    tasks: dict[str, Experiment] = {}
    keys: dict[str, list[str]] = {a.name: [] for a in sweep.experiment.analyzers}
    for exp in experiments:
        for analyzer in exp.analyzers:
            task = attrs.evolve(exp, analyzers=(analyzer,))
            key = spec_hash(task)
            tasks.setdefault(key, task)
            keys[analyzer.name].append(key)

    results: dict[str, xr.Dataset] = {}
    if folder is not None:
        for key in tasks:
            stored = load_point(folder, key)
            if stored is not None and (not retry_failed or not is_failure(stored)):
                results[key] = stored
    todo = {k: t for k, t in tasks.items() if k not in results}
    show = sys.stderr.isatty() if progress is None else bool(progress)
    _execute(todo, results, folder, scheduler, workers, show, len(tasks), batch)

    out = {}
    for analyzer in sweep.experiment.analyzers:
        names = keys[analyzer.name]
        combined = combine_sweep(sweep, analyzer, [results[k] for k in names], names)
        if folder is not None:
            store_combined(folder, analyzer.name, combined)
        out[analyzer.name] = combined
    return out


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


def _compute(spec_json: str, key: str, plugins: Sequence[Any] = ()) -> xr.Dataset:
    """Run one task (on a worker): an experiment with exactly one analyzer.

    An exception raised by the analyzer is returned as a failure record (a dataset
    without variables, ``symphase_failed = 1``, ``symphase_error``), so that the other
    points complete and the failure is stored like a result.
    """
    from framework.results import finalize, provenance_attrs

    _ensure_plugins(plugins)
    experiment = Experiment.from_json(spec_json)
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


def _compute_batch(
    items: Sequence[tuple[str, str]],
    plugins: Sequence[Any],
    folder: Path | None,
    token: str | None,
) -> list[tuple[str, xr.Dataset, bool]]:
    """Run a batch of tasks (on a worker); store each as it completes if the folder is here.

    Returns ``(key, dataset, stored)`` per task: ``stored`` says that the task's file was
    written here (and ``dataset`` read back from it); otherwise the submitting process
    stores it.
    """
    here = folder is not None and token is not None and sees_folder(folder, token)
    out = []
    for spec_json, key in items:
        ds = _compute(spec_json, key, plugins)
        if here:
            ds = store_point(folder, key, ds)
        out.append((key, ds, here))
    return out


def _execute(
    todo: dict[str, Experiment],
    results: dict[str, xr.Dataset],
    folder: Path | None,
    scheduler: Any,
    workers: int | None,
    show: bool,
    total: int,
    points_per_task: int | None,
) -> None:
    from framework import manager

    if not todo:
        return
    plugins = tuple(manager._runtime_plugins)
    bar = _progress(show, total, total - len(todo))
    try:
        if scheduler == "synchronous":
            for key, task in todo.items():
                results[key] = store_point(folder, key, _compute(task.to_json(), key, plugins))
                bar.update(1)
            return
        client, owned = _client(scheduler, workers, len(todo))
        try:
            from distributed import as_completed

            n_workers = max(1, sum(client.nthreads().values()))
            size = points_per_task or default_points_per_task(len(todo), n_workers)
            items = [(task.to_json(), key) for key, task in todo.items()]
            token = folder_token(folder) if folder is not None else None
            where = folder.absolute() if folder is not None else None
            futures = [
                client.submit(_compute_batch, items[i:i + size], plugins, where, token,
                              key=f"symphase-{items[i][1]}-{len(items[i:i + size])}",
                              pure=False)
                for i in range(0, len(items), size)
            ]
            try:
                for future in as_completed(futures):
                    for key, ds, stored in future.result():
                        results[key] = ds if stored else store_point(folder, key, ds)
                        bar.update(1)
            finally:
                client.cancel(futures)
        finally:
            for thing in owned:
                thing.close()
    finally:
        bar.close()


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
    if scheduler in (None, "processes", "threads"):
        n = workers or max(1, min(os.cpu_count() or 1, n_tasks))
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=scheduler != "threads",
            dashboard_address=":0", silence_logs=logging.ERROR,
        )
        client = Client(cluster)
        return client, [client, cluster]
    if not isinstance(scheduler, str):
        raise TypeError(
            "'scheduler' must be None, 'processes', 'threads', 'synchronous', a scheduler "
            f"address or a distributed.Client, got {scheduler!r}"
        )
    try:
        client = Client(scheduler)  # timeout: dask config distributed.comm.timeouts.connect
    except (OSError, TimeoutError) as exc:
        raise SpecificationError(
            f"'scheduler' {scheduler!r}: cannot connect ({_describe(exc)})"
        ) from None
    return client, [client]


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
