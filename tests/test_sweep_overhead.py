"""Per-point overhead of sweeps (issue 16 item 4): the fast paths give what the slow ones do.

- the attrs merge of the stacked combination (``drop_conflicts``) equals xarray's;
- records of already flat attrs are byte-identical to those of the flattening path;
- task locks: on Linux a byte of one shared lock file (no file per task) that excludes
  like the per-task ``flock`` did (another descriptor of this process, another process,
  released when the holder dies), with the per-task files where those locks are refused;
- workers rebuild each task from the base experiment and the point's grid values (no
  JSON per point): exactly the experiment its key was computed from, else the JSON;
- batches carry their validated experiments pickled together, with the overrides as the
  fallback of a worker that cannot unpickle them; results come back pickled as bytes;
- a sweep sent so equals the synchronous one and resumes from what it stored;
- records of lazily loaded datasets equal those of loaded ones; the stacked combination
  compares a shared index once and still refuses one that differs;
- a batch's identical index coordinates are shared (cheap to pickle), nothing changes;
- batch files are flushed to disk in the background, after they are renamed.
"""

from __future__ import annotations

import errno
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import framework
from framework import Experiment, TeacherStudent
from framework.results import flatten_attrs
from framework.sweep import POINTS_DIR, Sweep, execute, spec_hash, storage
from framework.sweep import combine as combine_mod
from framework.sweep.storage import acquire, encode_point, prepare

KEYS = ["a" * 64, "b" * 64, "a" * 15 + "c" * 49]  # the first and the third share a byte
ROOT = Path(__file__).resolve().parents[1]


# -- the attrs merge ----------------------------------------------------------------------
VALUES = ["a", "b", "", 1, 2, 0, 1.0, 2.5, True, False, float("nan"), float("nan"),
          np.float64(1.0), np.int64(2), np.array([1, 2]), [1, 2], None]


def test_drop_conflicts_equals_xarrays_merge_attrs():
    merge = combine_mod._attrs_merger()
    if merge is None:  # pragma: no cover - an xarray layout without merge_attrs
        pytest.skip("xarray's merge_attrs is not importable")
    rng = random.Random(16)
    names = [f"k{i}" for i in range(5)]
    for _ in range(3000):
        parts = []
        for _ in range(rng.randint(1, 5)):
            chosen = rng.sample(names, rng.randint(0, len(names)))
            parts.append({k: rng.choice(VALUES) for k in chosen})
        if rng.random() < 0.2:
            parts = [parts[0]] * len(parts)  # the very same dict (a shared attrs object)
        fast = combine_mod._drop_conflicts(parts, merge)
        slow = dict(merge(parts, combine_attrs="drop_conflicts"))
        assert list(fast) == list(slow), parts  # same keys in the same order
        assert all(fast[k] is slow[k] for k in fast), parts  # the same (first) values


# -- records ------------------------------------------------------------------------------
def point(attrs: dict, var_attrs: dict) -> xr.Dataset:
    return xr.Dataset({"x": ("a", np.arange(3.0), var_attrs), "s": ((), "txt")},
                      coords={"a": ("a", [1, 2, 3], {"units": "1"})}, attrs=attrs)


@pytest.mark.parametrize(("attrs", "var_attrs"), [
    ({"eta": 0.1, "K": 2, "name": "plain", "v": float("nan")}, {"units": "1", "n": 3}),
    ({"flag": True, "n": np.int64(3), "x": np.float32(0.5), "none": None, "l": [1, 2],
      "nested": {"a": 1, "b": {"c": "d"}}}, {"ok": np.bool_(True), "arr": np.arange(2)}),
    ({}, {}),
])
def test_records_of_flat_attrs_equal_those_of_the_flattening_path(monkeypatch, attrs,
                                                                  var_attrs):
    key = KEYS[0]
    fast, kept = encode_point(key, point(attrs, var_attrs))
    monkeypatch.setattr(storage, "_flat", flatten_attrs)  # always flatten (the old path)
    slow, kept_slow = encode_point(key, point(attrs, var_attrs))
    assert fast == slow
    xr.testing.assert_identical(kept, kept_slow)
    assert kept.attrs == flatten_attrs(attrs)


# -- locks --------------------------------------------------------------------------------
linux_only = pytest.mark.skipif(storage._OFD is None, reason="open-file-description locks")


@linux_only
def test_task_locks_are_bytes_of_one_file_and_exclude_like_flock(tmp_path):
    prepare(tmp_path)
    first = acquire(tmp_path, KEYS[0])
    assert first is not None
    assert acquire(tmp_path, KEYS[0]) is None  # another descriptor of this process
    other = acquire(tmp_path, KEYS[1])
    assert other is not None  # another task: its own byte
    assert acquire(tmp_path, KEYS[2]) is None  # a key of the same byte waits for it too
    first.release()
    again = acquire(tmp_path, KEYS[0])
    assert again is not None
    again.release()
    other.release()
    locks = tmp_path / POINTS_DIR / ".locks"
    assert sorted(p.name for p in locks.iterdir()) == ["points.lock"]  # no file per task


@linux_only
def test_a_task_lock_held_by_a_killed_process_is_released(tmp_path):
    prepare(tmp_path)
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from framework.sweep.storage import acquire
        lock = acquire(Path({str(tmp_path)!r}), {KEYS[0]!r})
        print("held" if lock is not None else "busy", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        assert acquire(tmp_path, KEYS[0]) is None  # held by the other process
        mine = acquire(tmp_path, KEYS[1])
        assert mine is not None
        mine.release()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 30
        lock = None
        while lock is None and time.monotonic() < deadline:  # released by the kernel
            lock = acquire(tmp_path, KEYS[0], wait=True)
        assert lock is not None
        lock.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_per_task_lock_files_where_byte_locks_are_refused(tmp_path, monkeypatch):
    pytest.importorskip("fcntl")

    def refused(path: Path, key: str, wait: bool) -> None:
        raise OSError(errno.EINVAL, "byte-range locks not supported here")

    monkeypatch.setattr(storage, "_lock_slot", refused)
    prepare(tmp_path)
    lock = acquire(tmp_path, KEYS[0])
    assert lock is not None
    assert (tmp_path / POINTS_DIR / ".locks" / f"{KEYS[0]}.lock").exists()
    assert acquire(tmp_path, KEYS[0]) is None
    lock.release()
    again = acquire(tmp_path, KEYS[0])
    assert again is not None
    again.release()


@linux_only
def test_other_errors_of_byte_locks_are_raised(tmp_path, monkeypatch):
    def broken(path: Path, key: str, wait: bool) -> None:
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(storage, "_lock_slot", broken)
    prepare(tmp_path)
    with pytest.raises(OSError, match="input/output"):
        acquire(tmp_path, KEYS[0])


# -- batches ------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "size"), [(1, 1), (1, 32), (5, 1), (9, 4), (10, 3), (64, 16),
                                         (65, 16), (100, 32)])
def test_batches_partition_the_tasks_interleaved(n, size):
    from framework.sweep.execute import _batches

    batches = _batches(list(range(n)), size)
    assert len(batches) == -(-n // size)  # as many as contiguous batches of `size`
    assert sorted(i for b in batches for i in b) == list(range(n))  # each task once
    assert max(map(len, batches)) - min(map(len, batches)) <= 1  # balanced
    assert all(list(b) == list(range(j, n, len(batches))) for j, b in enumerate(batches))


# -- tasks sent as overrides of the base experiment -----------------------------------------
def dynamics(**options: object) -> dict:
    return {"name": "dynamics", "alpha_max": 1.0, "n_points": 4, **options}


GRIDS = [
    ([dynamics()], {"eta": [0.1, 0.25], "seed": [0, 3]}),
    ([dynamics()], {"K": [1, 2, 3], "noise": [0.0, 0.1]}),  # M follows K
    ([dynamics()], {"dynamics.alpha_max": [1.0, 2], "normalization": ["plain", "batchnorm"],
                    "init_scale": [0.5, 1]}),
    ([dynamics(), {"name": "fixedpoint"}], {"eta": [0.1, 0.2], "fixedpoint.horizon": [1e3]}),
    ([dynamics()], {"normalization": [{"name": "batchnorm", "gamma": 2.0}, "plain"]}),
]


@pytest.mark.parametrize(("analyzers", "grid"), GRIDS)
def test_workers_rebuild_each_task_from_the_base_and_its_grid_values(analyzers, grid):
    sweep = Sweep(Experiment(TeacherStudent(2, 2), analyzers=analyzers), grid)
    tasks, keys, recipes = execute._tasks(sweep, sweep.validate())
    assert sorted(recipes) == sorted(tasks)
    assert all(len(k) == sweep.size for k in keys.values())
    how = execute._Recipes(sweep, recipes)
    for key, task in tasks.items():
        spec = how.spec(key, task)
        assert isinstance(spec, tuple)  # not the point's JSON
        rebuilt = execute._experiment(pickle.loads(pickle.dumps(spec)), how.bases)
        assert rebuilt == task
        assert spec_hash(rebuilt) == key


def test_grid_values_that_are_not_plain_data_are_sent_as_json():
    norm = framework.get_normalization("batchnorm")
    sweep = Sweep(Experiment(TeacherStudent(2, 2), analyzers=[dynamics()]),
                  {"eta": [0.1, 0.2], "normalization": [norm, "plain"]})
    tasks, _, recipes = execute._tasks(sweep, sweep.validate())
    how = execute._Recipes(sweep, recipes)
    assert how.bases == (None,)
    for key, task in tasks.items():
        spec = how.spec(key, task)
        assert spec == task.to_json()
        assert spec_hash(execute._experiment(spec)) == key


def test_an_analyzer_whose_rebuilt_task_differs_is_sent_as_json(monkeypatch):
    sweep = Sweep(Experiment(TeacherStudent(2, 2), analyzers=[dynamics()]),
                  {"seed": [0, 1], "eta": [0.1, 0.2]})  # the first point is the base
    tasks, _, recipes = execute._tasks(sweep, sweep.validate())
    monkeypatch.setattr(execute, "_apply", lambda base, assignment: base)  # loses them
    how = execute._Recipes(sweep, recipes)
    assert how.bases == (None,)
    assert all(how.spec(k, t) == t.to_json() for k, t in tasks.items())


@pytest.mark.parametrize(("analyzers", "grid"), GRIDS)
def test_a_batch_carries_its_experiments_pickled_and_the_overrides(analyzers, grid):
    sweep = Sweep(Experiment(TeacherStudent(2, 2), analyzers=analyzers), grid)
    tasks, _, recipes = execute._tasks(sweep, sweep.validate())
    how = execute._Recipes(sweep, recipes, tasks)
    assert all(how.pickled)
    items = list(tasks.items())
    batch = pickle.loads(pickle.dumps(how.batch(items)))
    assert len(batch) == len(items) and batch.blob is not None
    got = batch.items()
    assert [k for _, k in got] == [k for k, _ in items]
    for (task, key), (_, original) in zip(got, items, strict=True):
        assert isinstance(task, Experiment)
        assert task == original
        assert spec_hash(task) == key
    # a worker that cannot unpickle them rebuilds them from the overrides, alike
    plain = all(b is not None for b in how.bases)
    batch.blob = b"not a pickle"
    if plain:
        for (spec, _key), (_, original) in zip(batch.items(), items, strict=True):
            assert execute._experiment(spec, batch.bases) == original
    else:  # no cheap fallback for these: a clear error
        with pytest.raises(framework.SpecificationError, match="cannot unpickle"):
            batch.items()


def test_tasks_that_do_not_pickle_back_to_their_key_are_sent_as_before(monkeypatch):
    sweep = Sweep(Experiment(TeacherStudent(2, 2), analyzers=[dynamics()]),
                  {"eta": [0.1, 0.2], "seed": [0, 1]})
    tasks, _, recipes = execute._tasks(sweep, sweep.validate())
    key, task = next(iter(tasks.items()))
    assert execute._pickles_to(task, key)
    assert not execute._pickles_to(task, "0" * 64)  # another hash
    assert not execute._pickles_to(lambda: 0, key)  # type: ignore[arg-type]
    monkeypatch.setattr(execute, "_pickles_to", lambda task, key: False)
    how = execute._Recipes(sweep, recipes, tasks)
    assert how.pickled == (False,)
    batch = how.batch(list(tasks.items()))
    assert batch.blob is None and batch.pickled == ()
    assert [s for s, _ in batch.items()] == [how.spec(k, t) for k, t in tasks.items()]
    assert execute._Recipes(sweep, recipes).pickled == (False,)  # no tasks given


def test_a_batch_returns_its_results_pickled_as_they_are(tmp_path):
    sweep = Sweep(Experiment(TeacherStudent(2, 2), analyzers=[dynamics()]),
                  {"eta": [0.1, 0.2], "seed": [0, 1]})
    tasks, _, recipes = execute._tasks(sweep, sweep.validate())
    batch = execute._Recipes(sweep, recipes, tasks).batch(list(tasks.items()))
    prepare(tmp_path)
    token = storage.folder_token(tmp_path)
    blob = execute._run_batch(batch, (), tmp_path, token, False)
    assert isinstance(blob, bytes)
    back = pickle.loads(blob)
    assert [(k, status) for k, _, status in back] == [(k, execute.STORED) for k in tasks]
    stored = storage.load_points(tmp_path, list(tasks))
    for key, ds, _ in back:
        xr.testing.assert_identical(ds, stored[key])
        xr.testing.assert_identical(ds, execute._compute(tasks[key], key))


def test_a_sweep_of_pickled_batches_equals_the_synchronous_one_and_resumes(tmp_path,
                                                                          monkeypatch):
    exp = Experiment(TeacherStudent(2, 2), analyzers=[dynamics(), {"name": "fixedpoint"}])
    grid = {"eta": [0.05 * (i + 1) for i in range(6)], "seed": [0, 1, 2, 3]}
    local = exp.sweep(grid, scheduler="synchronous")
    sent: list[tuple[int, int]] = []  # (tasks, of which pickled) per batch
    real = execute._Recipes.batch

    def spy(self, items):  # type: ignore[no-untyped-def]
        out = real(self, items)
        sent.append((len(out), len(out.pickled)))
        return out

    monkeypatch.setattr(execute._Recipes, "batch", spy)
    out = tmp_path / "r"
    threads = exp.sweep(grid, scheduler="threads", workers=2, results_dir=out)
    assert sent == [(12, 12)] * 4  # 48 tasks in 4 batches, every experiment pickled
    for name, ds in local.items():
        xr.testing.assert_identical(threads[name], ds)
        xr.testing.assert_identical(framework.load(out / f"{name}.nc"), ds)
    monkeypatch.setattr(execute, "_compute", None)  # nothing is computed again
    again = exp.sweep(grid, scheduler="threads", workers=2, results_dir=out)
    for name, ds in local.items():
        xr.testing.assert_identical(again[name], ds)


def test_the_base_experiment_is_parsed_once_per_process(monkeypatch):
    monkeypatch.setattr(execute, "_bases", {})
    monkeypatch.setattr(execute, "MAX_CACHED_BASES", 2)
    texts = [Experiment(TeacherStudent(2, 2), eta=eta, analyzers=[dynamics()]).to_json()
             for eta in (0.1, 0.2, 0.3)]
    first = execute._base(texts[0])
    assert execute._base(texts[0]) is first
    assert first == Experiment.from_json(texts[0])
    execute._base(texts[1])
    execute._base(texts[2])
    assert list(execute._bases) == texts[1:]  # the oldest is dropped


def test_sweep_sent_as_overrides_equals_the_synchronous_one(tmp_path):
    exp = Experiment(TeacherStudent(2, 2), analyzers=[dynamics()])
    grid = {"K": [1, 2], "dynamics.alpha_max": [0.5, 1.0], "seed": [0, 1]}
    local = exp.sweep(grid, scheduler="synchronous")["dynamics"]
    for size in (1, 3, None):
        out = tmp_path / str(size)
        threads = exp.sweep(grid, scheduler="threads", workers=2, points_per_task=size,
                            results_dir=out)["dynamics"]
        xr.testing.assert_identical(threads, local)
        xr.testing.assert_identical(framework.load(out / "dynamics.nc"), local)


# -- shared index coordinates ---------------------------------------------------------------
def part(alpha: object, attrs: dict | None = None, eta: float = 0.1) -> xr.Dataset:
    alpha = np.asarray(alpha)
    return xr.Dataset({"eps_g": ("alpha", np.exp(-eta * alpha.astype(float)))},
                      coords={"alpha": ("alpha", alpha, attrs or {"units": "1"}),
                              "student": [0, 1]}, attrs={"eta": eta})


def test_identical_index_coordinates_of_a_batch_are_shared_and_nothing_changes():
    parts = [part([0.0, 0.5, 1.0]), part([0.0, 0.5, 1.0], eta=0.2), None,
             part([0.0, 0.5, 2.0]),  # other values
             part([0.0, 0.5, 1.0], {"units": "s"}),  # other attrs
             part([0, 1, 2]), part([0.0, 1.0, 2.0]),  # other dtypes, equal values
             part([0.0, 0.5, 1.0], eta=0.3)]
    before = [p.copy(deep=True) if p is not None else None for p in parts]
    execute._share_indexes(parts)
    for p, b in zip(parts, before, strict=True):
        if p is not None:
            xr.testing.assert_identical(p, b)
            assert p.attrs == b.attrs
    a, b, _, c, d, e, f, g = parts
    shared = [x for x in (b, c, d, e, f, g) if x.xindexes["alpha"] is a.xindexes["alpha"]]
    assert shared == [b, g]
    assert all(x.xindexes["student"] is a.xindexes["student"] for x in (b, c, d, e, f, g))
    assert f.xindexes["alpha"] is not e.xindexes["alpha"]
    back = pickle.loads(pickle.dumps(parts))
    for p, q in zip(parts, back, strict=True):
        if p is not None:
            xr.testing.assert_identical(p, q)
    assert back[1].xindexes["alpha"] is back[0].xindexes["alpha"]  # pickled once


def test_a_lazily_loaded_dataset_gives_the_record_of_the_loaded_one(tmp_path):
    ds = point({"eta": 0.1}, {"units": "1"})
    path = tmp_path / "p.nc"
    ds.to_netcdf(path)
    with xr.open_dataset(path) as lazy:
        assert not all(v._in_memory for v in lazy.variables.values())
        record, kept = encode_point(KEYS[0], lazy)
        loaded = lazy.load()
        assert record == encode_point(KEYS[0], loaded)[0]
    xr.testing.assert_identical(kept, loaded)


def test_stacking_compares_a_shared_index_once_and_refuses_one_that_differs(monkeypatch):
    import pandas as pd

    parts = [part([0.0, 0.5, 1.0], eta=0.1 * (i + 1)) for i in range(4)]
    execute._share_indexes(parts[:2])  # the first two share theirs, the others do not
    coords = {"n": np.arange(4)}
    calls = []
    real = pd.Index.equals

    def counted(self, other):  # type: ignore[no-untyped-def]
        calls.append(self.name)
        return real(self, other)

    monkeypatch.setattr(pd.Index, "equals", counted)
    fast = combine_mod._stack_uniform(parts, coords)
    assert fast is not None
    assert sorted(calls) == ["alpha", "alpha", "student", "student"]  # parts 3 and 4
    monkeypatch.setattr(pd.Index, "equals", real)
    xr.testing.assert_identical(fast, combine_mod._combine_outer(parts, coords))
    other = [*parts[:3], part([0.0, 0.5, 2.0])]
    assert combine_mod._stack_uniform(other, coords) is None


# -- batch files flushed to disk in the background ------------------------------------------
@pytest.fixture
def synced(monkeypatch) -> list[tuple[int, str]]:
    """(inode, thread name) of every ``os.fsync`` call while the test runs."""
    import os
    import threading

    calls: list[tuple[int, str]] = []
    real = os.fsync

    def record(fd: int) -> None:
        calls.append((os.fstat(fd).st_ino, threading.current_thread().name))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def test_batch_files_are_flushed_to_disk_in_the_background_after_the_rename(tmp_path,
                                                                          synced):
    prepare(tmp_path)
    with storage.PointWriter(tmp_path) as writer:
        writer.add(KEYS[0], point({"eta": 0.1}, {}), acquire(tmp_path, KEYS[0]))
    again = acquire(tmp_path, KEYS[0])
    assert again is not None  # released once renamed
    again.release()
    storage.wait_synced()
    (path,) = (tmp_path / POINTS_DIR).glob(f"*{storage.POINTS_SUFFIX}")
    assert (path.stat().st_ino, "symphase-fsync") in synced
    assert all(name == "symphase-fsync" for _, name in synced)  # not by the writer
    assert list(storage.read_points(path)) == [KEYS[0]]


def test_the_combined_file_is_flushed_to_disk_in_the_background(tmp_path, synced):
    prepare(tmp_path)
    ds = point({"eta": 0.1}, {"units": "1"})
    path = storage.store_combined(tmp_path, "toy", ds)
    storage.wait_synced()
    assert (path.stat().st_ino, "symphase-fsync") in synced
    assert all(name == "symphase-fsync" for _, name in synced)
    xr.testing.assert_identical(framework.load(path), ds)
    assert not list(tmp_path.glob(".*.tmp"))
