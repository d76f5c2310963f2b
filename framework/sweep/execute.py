"""Sweep execution: run the tasks of a sweep on Dask or here, resume from storage.

One task is one (grid point, analyzer) pair: the point's experiment restricted to that
analyzer, keyed by its :func:`~framework.sweep.spec_hash`. :func:`run` validates the
sweep, reuses the tasks stored under ``results_dir`` (:mod:`framework.sweep.storage`),
computes the others with the chosen scheduler, stores each as it completes, and
combines them per analyzer (:mod:`framework.sweep.combine`). See :mod:`framework.sweep`
for the schedulers.
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
import xarray as xr

from framework.experiment import Experiment
from framework.sweep.combine import combine_sweep
from framework.sweep.grid import Sweep, _describe, spec_hash
from framework.sweep.storage import (
    is_failure,
    load_point,
    prepare,
    store_combined,
    store_point,
)
from framework.validators import SpecificationError

__all__ = ["run", "sweep"]


def run(
    sweep: Sweep,
    *,
    results_dir: str | os.PathLike[str] | None = None,
    scheduler: Any = None,
    workers: int | None = None,
    progress: bool | None = None,
    retry_failed: bool = False,
) -> dict[str, xr.Dataset]:
    """Run ``sweep`` and return ``{analyzer name: Dataset}``; see :meth:`Sweep.run`."""
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
    _execute(todo, results, folder, scheduler, workers, show, len(tasks))

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


def _execute(
    todo: dict[str, Experiment],
    results: dict[str, xr.Dataset],
    folder: Path | None,
    scheduler: Any,
    workers: int | None,
    show: bool,
    total: int,
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

            futures = {
                client.submit(_compute, task.to_json(), key, plugins, key=f"symphase-{key}",
                              pure=False): key
                for key, task in todo.items()
            }
            try:
                for future in as_completed(futures):
                    key = futures[future]
                    results[key] = store_point(folder, key, future.result())
                    bar.update(1)
            finally:
                client.cancel(list(futures))
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
    **more: Sequence[Any],
) -> dict[str, xr.Dataset]:
    """Sweep ``experiment`` over ``grid`` (and/or keyword grid keys); see :meth:`Sweep.run`."""
    full = dict(grid or {})
    for key, values in more.items():
        if key in full:
            raise SpecificationError(f"sweep key {key!r} given twice")
        full[key] = values
    return Sweep(experiment, full).run(
        results_dir=results_dir, scheduler=scheduler, workers=workers, progress=progress,
        retry_failed=retry_failed,
    )
