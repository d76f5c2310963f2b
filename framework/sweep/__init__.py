"""Parameter sweeps: a grid of experiments run on Dask, stored point by point.

A sweep is a base :class:`~framework.Experiment` and a grid ``{key: [values...]}``;
its points are the Cartesian product of the values, in the grid's key order. Grid
keys are

- experiment fields: ``eta``, ``batch_size``, ``seed``, ``init_scale``, ``init_N``,
  ``normalization`` (a name, a ``{"name": ..., **hyper-parameters}`` mapping or an
  instance);
- model fields: ``K``, ``M``, ``noise``, ``activation`` (also spelled ``model.K``, ...).
  When ``K`` is swept and ``M`` is not, ``M`` follows ``K`` if the base model has
  ``M == K`` (the symmetric teacher-student setting) and stays fixed otherwise. When
  ``M`` changes, the base teacher overlap ``T`` must be the identity and becomes the
  identity of the new size;
- analyzer options: ``"ANALYZER.OPTION"``, e.g. ``"dynamics.alpha_max"``, for an
  analyzer of the base experiment.

Every point is validated before anything is computed; an invalid value is reported
with the key, the value and its grid position.

Work unit and storage. One task is one (grid point, analyzer) pair: the point's
experiment restricted to that analyzer. Its key is :func:`spec_hash` of that
experiment, the sha256 of its canonical JSON. With ``results_dir``, each task's
dataset is stored atomically under ``results_dir/points/`` (a record of a batch
file, :mod:`framework.sweep.storage`) as soon as it completes, and a re-run loads
the stored tasks instead of recomputing them, so a
sweep killed at any moment resumes where it stopped (a task that was running is
recomputed; no file is ever partial). While a task is computed its lock is held, so
that a second sweep into the same folder waits for it instead of computing it again;
every stored file carries a checksum of its content, verified on reuse (a damaged file
is recomputed); stale temporary files are removed (:mod:`framework.sweep.storage`). At
the end the combined datasets are written to ``results_dir/<analyzer>.nc``. The key
covers the specification only, not the symphase version: delete ``results_dir`` to
recompute after changing the code.

Combined results. :meth:`Sweep.run` returns ``{analyzer name: xarray.Dataset}``;
each dataset has the grid keys as leading dimensions (named exactly like the keys,
e.g. ``eta``, ``normalization``, ``dynamics.alpha_max``) with coordinates equal to the
values (numbers as numbers; strings, such as normalization names, as string
coordinates; anything else as canonical JSON strings). The points are outer-joined by
label along every analyzer dimension (:mod:`framework.sweep.combine`): ``student`` has
the labels ``0..max(K)-1`` when ``K`` is swept, two ``alpha`` grids give their union,
and an entry a point does not have is missing: NaN for floats, integers and booleans
(which then become float64), ``""`` for strings, recorded in the variable's
``symphase_fill`` attr. Variables added by the sweep:

- ``sweep_failed`` (bool): the analyzer raised an exception at that point; its
  variables there are missing (filled as above). ``sweep_error`` holds
  ``"ExceptionType: message"`` ("" if it succeeded). The other points complete
  regardless. A failure is stored like a result, so a re-run does not retry it unless
  ``retry_failed=True``. Divergence that an analyzer detects itself is *not* a
  failure: it is the analyzer's own variable (e.g. ``diverged``), combined like any other;
- ``sweep_sha256`` (str): the task key of its stored record.

The attrs are those of :func:`framework.results.provenance_attrs` for the *base*
experiment (``symphase_spec_json``, ``spec.*``, plugins, version; sweep coordinates
override the swept fields) plus ``symphase_sweep_grid_json`` (the grid),
``symphase_sweep_dims`` (JSON list of the grid keys) and the flattened ``sweep.grid.*``.
:func:`framework.load_experiment` rebuilds the base experiment,
:func:`point_experiment` the experiment of one point, :func:`load_sweep` the sweep.

Execution (``scheduler``): ``None`` (default) runs a single task here and otherwise
picks ``"processes"`` when spawning worker processes is safe
(:func:`~framework.sweep.execute.spawn_is_safe`: no main script, or the sweep runs
inside its ``if __name__ == "__main__":`` block) and ``"threads"`` when it is not (a
plain script without that guard); ``"processes"`` starts an embedded
``dask.distributed.LocalCluster`` of single-threaded worker processes (``workers`` of
them; default: one per CPU, at most one per task) and closes it afterwards (refused,
with the reason, where spawning is not safe); ``"threads"`` the same with threads in
this process; ``"synchronous"`` runs the tasks here one after another (no Dask
needed); any other string must be the address of an existing ``dask.distributed``
scheduler (e.g. ``"tcp://10.0.0.1:8786"``; anything else is a
:class:`~framework.SpecificationError` before any work), and a ``distributed.Client``
is used as is. Worker processes of an embedded cluster die with the process that
started them (SIGKILL included: :mod:`framework.sweep._worker`) and ignore SIGINT; an
interrupted run (Ctrl-C, an exception) kills them and closes the cluster at once, and
every task stored so far is kept. Plugins registered at run time with
:func:`framework.register_plugin` are shipped with each task and registered on the
workers; modules must be importable there.
On Dask, tasks are submitted in batches of at most ``points_per_task`` (default: about
two batches per worker, at most 32 tasks each; a batch interleaves the grid, so that
batches cost about the same; a worker stores the tasks of its batch as they complete,
so batching changes neither the results nor what a resumed run recomputes). A worker
that sees the results folder (the same path holds the same
random token, ``points/.symphase-folder``) writes its tasks' records itself, without
Dask's distributed file lock; otherwise it returns the datasets and the process that
calls :meth:`Sweep.run` stores them, so remote workers need no shared file system.

Layout: :mod:`~framework.sweep.grid` (the specification), :mod:`~framework.sweep.combine`
(combining labelled parts), :mod:`~framework.sweep.execute` (running, resuming) and
:mod:`~framework.sweep.storage` (files). Experiment TOML files are read by the CLI
(``framework._toml``), not here.
"""

from framework.sweep.execute import sweep
from framework.sweep.grid import (
    EXPERIMENT_KEYS,
    MODEL_KEYS,
    Sweep,
    load_sweep,
    point_experiment,
    spec_hash,
)
from framework.sweep.storage import POINTS_DIR

__all__ = [
    "EXPERIMENT_KEYS",
    "MODEL_KEYS",
    "POINTS_DIR",
    "Sweep",
    "load_sweep",
    "point_experiment",
    "spec_hash",
    "sweep",
]
