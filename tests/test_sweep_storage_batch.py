"""Sweep storage in batch files (issue: per-point overhead of ``results_dir``).

The record codec round-trips every stored dtype exactly; a writer stores one file per
batch, holds the tasks' locks until the file is written and writes on Ctrl-C; damaged
records are dropped and recomputed; folders of the old one-netCDF-file-per-task layout
are reused; the stacking fast path of the combination equals xarray's outer join.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np
import pytest
import xarray as xr

import framework
from framework import Analyzer, Experiment, TeacherStudent, hookimpl
from framework.io import save
from framework.sweep import POINTS_DIR, Sweep, spec_hash
from framework.sweep import combine as combine_mod
from framework.sweep.storage import (
    MAGIC,
    POINTS_SUFFIX,
    PointWriter,
    acquire,
    encode_point,
    load_points,
    point_path,
    prepare,
    read_points,
    remove_points,
    store_point,
)

LOG_ENV = "SYMPHASE_TEST_BATCH_LOG"
INTERRUPT_ENV = "SYMPHASE_TEST_BATCH_INTERRUPT"
KEY = "0" * 63 + "1"


@attrs.frozen
class Logged(Analyzer):
    """Cheap analyzer that logs its eta; Ctrl-C (KeyboardInterrupt) at eta = $INTERRUPT_ENV."""

    name: ClassVar[str] = "logged"
    description: ClassVar[str] = "test-only analyzer for batch storage"
    fail: bool = False

    def run(self, experiment: Experiment) -> xr.Dataset:
        if os.environ.get(INTERRUPT_ENV) == str(experiment.eta):
            raise KeyboardInterrupt
        with open(os.environ[LOG_ENV], "a") as fh:
            fh.write(f"{experiment.eta}\n")
        if self.fail:
            raise ArithmeticError("asked to fail")
        alpha = np.linspace(0.0, 1.0, 4)
        return xr.Dataset(
            {"eps_g": ("alpha", np.exp(-experiment.eta * alpha), {"long_name": "e",
                                                                  "units": "1"}),
             "diverged": ((), False, {"long_name": "d", "units": "1"})},
            coords={"alpha": alpha})


class LoggedPlugin:
    @staticmethod
    @hookimpl
    def symphase_register_analyzers(registry: Any) -> None:
        registry.add_analyzer(Logged)


@pytest.fixture(autouse=True)
def log(tmp_path, monkeypatch):
    framework.register_plugin(LoggedPlugin)
    path = tmp_path / "runs.log"
    monkeypatch.setenv(LOG_ENV, str(path))
    yield lambda: [float(x) for x in path.read_text().split()] if path.exists() else []
    framework.unregister_plugin(LoggedPlugin)


def base(**options: Any) -> Experiment:
    return Experiment(TeacherStudent(2, 2), analyzers=[{"name": "logged", **options}])


def batch_files(folder: Path) -> list[Path]:
    return sorted((folder / POINTS_DIR).glob(f"*{POINTS_SUFFIX}"))


# -- the record codec ---------------------------------------------------------------------
def odd_dataset() -> xr.Dataset:
    return xr.Dataset(
        {"f32": (("a", "b"), np.arange(6, dtype=np.float32).reshape(2, 3), {"u": "1"}),
         "f64": ("a", [np.nan, -np.inf], {"nan": float("nan"), "n": 3}),
         "i8": ("b", np.array([-1, 0, 127], dtype=np.int8)),
         "u64": ((), np.uint64(2**64 - 1)),
         "c": ("a", np.array([1 + 2j, np.nan], dtype=np.complex128)),
         "flag": ("b", np.array([True, False, True])),
         "when": ("a", np.array(["2020-01-01", "NaT"], dtype="datetime64[ns]")),
         "name": ("b", np.array(["x", "", "zéta"])),
         "obj": ("a", np.array(["p", "longer"], dtype=object)),
         "empty": ("e", np.zeros(0)),
         "big_endian": ("a", np.array([1.5, 2.5], dtype=">f8"))},
        coords={"a": [10, 20], "b": ("b", [0.5, 1.0, 2.0], {"long_name": "b"}),
                "e": np.zeros(0, dtype=np.int64), "scalar": ((), "s")},
        attrs={"text": "t", "i": 1, "x": 0.1, "nested": {"k": 2}, "flag": True,
               "array": np.array([1, 2])})


def test_a_record_decodes_to_the_dataset_encode_point_returns():
    ds = odd_dataset()
    record, kept = encode_point(KEY, ds)
    assert kept.attrs["nested.k"] == 2 and kept.attrs["flag"] == 1  # flattened as netCDF
    assert "nested" in ds.attrs  # the input is not modified
    back = read_points_from(record)[KEY]
    xr.testing.assert_identical(back, kept)
    for name in kept.variables:
        assert back[name].dtype == kept[name].dtype, name
        if name not in back.indexes:  # index coordinates are read-only in xarray
            assert back[name].values.flags.writeable, name
    # a dataset whose attrs are already flat is kept as is
    flat = kept.copy()
    assert encode_point(KEY, flat)[1] is flat


def read_points_from(record: bytes) -> dict[str, xr.Dataset]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"x{POINTS_SUFFIX}"
        path.write_bytes(MAGIC + record)
        return read_points(path)


def test_encode_point_refuses_what_it_cannot_store():
    with pytest.raises(ValueError, match=r"'key' must be 64 lowercase hex digits"):
        encode_point("abc", xr.Dataset())
    with pytest.raises(TypeError, match=r"variable 'o': an object array holds a int"):
        encode_point(KEY, xr.Dataset({"o": ("a", np.array([1, "x"], dtype=object))}))


# -- the writer ---------------------------------------------------------------------------
def test_a_writer_holds_the_locks_until_it_writes_one_file(tmp_path):
    prepare(tmp_path)
    keys = [f"{i:064x}" for i in range(5)]
    with PointWriter(tmp_path, flush_seconds=1e9, max_points=3) as writer:
        for key in keys[:2]:
            writer.add(key, xr.Dataset({"x": ((), 1.0)}), acquire(tmp_path, key))
        assert batch_files(tmp_path) == []
        assert acquire(tmp_path, keys[0]) is None  # still held: not written yet
        writer.add(keys[2], xr.Dataset({"x": ((), 2.0)}), acquire(tmp_path, keys[2]))
        (first,) = batch_files(tmp_path)  # max_points reached: written
        assert sorted(read_points(first)) == keys[:3]
        lock = acquire(tmp_path, keys[0])
        assert lock is not None
        lock.release()
        writer.add(keys[3], xr.Dataset({"x": ((), 3.0)}), acquire(tmp_path, keys[3]))
    assert len(batch_files(tmp_path)) == 2  # leaving the writer wrote the rest
    assert sorted(load_points(tmp_path, keys)) == keys[:4]
    assert not list((tmp_path / POINTS_DIR).glob(".*.tmp"))


def test_a_point_slower_than_flush_seconds_is_written_when_it_completes(tmp_path):
    import time

    prepare(tmp_path)
    with PointWriter(tmp_path, flush_seconds=0.2) as writer:
        time.sleep(0.25)  # "computing" the first point
        writer.add(KEY, xr.Dataset({"x": ((), 1.0)}), acquire(tmp_path, KEY))
        assert len(batch_files(tmp_path)) == 1  # written at once, not with the next one
        writer.add(KEY.replace("1", "2"), xr.Dataset({"x": ((), 2.0)}), None)
        assert len(batch_files(tmp_path)) == 1  # a fast one waits for the batch
    assert len(batch_files(tmp_path)) == 2


def test_a_synchronous_sweep_writes_one_file_and_resumes_bit_exact(tmp_path, log):
    grid = {"eta": [0.1, 0.2, 0.3], "seed": [0, 1]}
    first = base().sweep(grid, results_dir=tmp_path, scheduler="synchronous")["logged"]
    (batch,) = batch_files(tmp_path)
    assert len(read_points(batch)) == 6
    again = base().sweep(grid, results_dir=tmp_path, scheduler="synchronous")["logged"]
    assert len(log()) == 6
    xr.testing.assert_identical(first, again)
    xr.testing.assert_identical(first, base().sweep(grid, scheduler="synchronous")["logged"])
    xr.testing.assert_identical(framework.load(tmp_path / "logged.nc"), again)


def test_ctrl_c_in_a_synchronous_sweep_keeps_every_point_computed(tmp_path, log,
                                                                  monkeypatch):
    etas = [0.1, 0.2, 0.3, 0.4]
    monkeypatch.setenv(INTERRUPT_ENV, "0.3")
    with pytest.raises(KeyboardInterrupt):
        base().sweep(eta=etas, results_dir=tmp_path, scheduler="synchronous")
    monkeypatch.delenv(INTERRUPT_ENV)
    assert log() == [0.1, 0.2]
    assert len(stored := load_points(tmp_path, [spec_hash(base().evolve(eta=e))
                                                 for e in etas])) == 2
    assert all(not ds.attrs.get("symphase_failed") for ds in stored.values())
    # the locks were released: a re-run computes the other two only
    base().sweep(eta=etas, results_dir=tmp_path, scheduler="synchronous")
    assert log() == [0.1, 0.2, 0.3, 0.4]


def test_a_retried_failure_is_superseded_by_its_success(tmp_path, log):
    base(fail=True).sweep(eta=[0.1], results_dir=tmp_path, scheduler="synchronous")
    key = spec_hash(base(fail=True).evolve(eta=0.1))
    assert load_points(tmp_path, [key])[key].attrs["symphase_failed"] == 1
    # the same key stored again as a success (another batch file): the success wins
    ds = framework.sweep.execute._compute(base().evolve(eta=0.1), key)
    store_point(tmp_path, key, ds)
    assert len(batch_files(tmp_path)) == 2
    assert load_points(tmp_path, [key])[key].attrs["symphase_failed"] == 0


def test_the_holder_of_a_lock_reuses_what_another_sweep_stored_meanwhile(tmp_path, log):
    exp = base()
    key = spec_hash(exp.evolve(eta=0.2))
    prepare(tmp_path)
    lock = acquire(tmp_path, key)
    done = threading.Event()

    def release_later() -> None:  # the "other sweep": stores the task, then releases
        store_point(tmp_path, key, framework.sweep.execute._compute(exp.evolve(eta=0.2), key))
        lock.release()
        done.set()

    timer = threading.Timer(0.3, release_later)
    timer.start()
    ds = exp.sweep(eta=[0.1, 0.2], results_dir=tmp_path, scheduler="synchronous")["logged"]
    assert done.is_set()
    assert sorted(log()) == [0.1, 0.2]  # 0.2 ran once, in the "other sweep"
    np.testing.assert_allclose(ds["eps_g"].sel(eta=0.2), np.exp(-0.2 * ds.alpha))


# -- damage, foreign files, temporaries, the old layout ---------------------------------
def test_one_damaged_record_is_dropped_and_only_its_task_recomputed(tmp_path, log):
    etas = [0.1, 0.2, 0.3]
    first = base().sweep(eta=etas, results_dir=tmp_path, scheduler="synchronous")["logged"]
    (batch,) = batch_files(tmp_path)
    data = bytearray(batch.read_bytes())
    needle = np.exp(-0.2 * np.linspace(0.0, 1.0, 4))[2].tobytes()
    at = bytes(data).find(needle)
    assert at >= 0
    data[at + 3] ^= 0x10
    batch.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match=r"recomputing 1 damaged sweep result"):
        again = base().sweep(eta=etas, results_dir=tmp_path, scheduler="synchronous")["logged"]
    assert log() == [*etas, 0.2]
    xr.testing.assert_identical(first, again)
    assert len(read_points(batch)) == 2  # rewritten without the damaged record
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        base().sweep(eta=etas, results_dir=tmp_path, scheduler="synchronous")
    assert len(log()) == 4


def test_a_foreign_or_newer_file_is_ignored_with_a_warning(tmp_path, log):
    prepare(tmp_path)
    (tmp_path / POINTS_DIR / f"newer{POINTS_SUFFIX}").write_bytes(b"SYMPHASE-PTS-v9\nxx")
    with pytest.warns(RuntimeWarning, match="written by another version of symphase"):
        base().sweep(eta=[0.1], results_dir=tmp_path, scheduler="synchronous")
    assert (tmp_path / POINTS_DIR / f"newer{POINTS_SUFFIX}").exists()  # not ours to remove
    assert log() == [0.1]


def test_stale_temporaries_go_and_those_being_written_stay(tmp_path):
    import fcntl

    prepare(tmp_path)
    points = tmp_path / POINTS_DIR
    stale = points / f".abc{POINTS_SUFFIX}.x1.tmp"
    stale.write_bytes(b"partial")
    busy = points / f".def{POINTS_SUFFIX}.x2.tmp"
    busy.write_bytes(b"being written")
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer
        prepare(tmp_path)
        assert not stale.exists() and busy.exists()
    finally:
        os.close(fd)
    prepare(tmp_path)
    assert not busy.exists()


def test_a_folder_of_the_old_layout_is_reused(tmp_path, log):
    grid = {"eta": [0.1, 0.2], "seed": [0, 1]}
    sweep = Sweep(base(), grid)
    prepare(tmp_path)
    for _, exp in sweep.points():  # stored as symphase did before batch files
        key = spec_hash(exp)
        save(framework.sweep.execute._compute(exp, key), point_path(tmp_path, key), lock=False)
    assert len(log()) == 4
    ds = sweep.run(results_dir=tmp_path, scheduler="synchronous")["logged"]
    assert len(log()) == 4  # nothing recomputed
    assert batch_files(tmp_path) == []
    assert remove_points(tmp_path, [ds["sweep_sha256"].values[0, 0]]) == 1
    again = sweep.run(results_dir=tmp_path, scheduler="synchronous")["logged"]
    assert len(log()) == 5 and len(batch_files(tmp_path)) == 1
    xr.testing.assert_identical(again, ds)
    xr.testing.assert_identical(ds, sweep.run(scheduler="synchronous")["logged"])


# -- combining: the stacking fast path equals the outer join -----------------------------
def parts_for(n: int, vary_coord: bool = False) -> list[xr.Dataset]:
    return [xr.Dataset(
        {"x": ("a", np.arange(3.0) + i, {"u": "1", "v": i}), "y": ((), 2.0, {"w": i}),
         "s": ((), "abc"[i % 3]), "b": ((), bool(i % 2)),
         "o": ("a", np.array(["p", "q", "r"], dtype=object))},
        coords={"a": ("a", [1, 2, 3], {"ia": i, "ib": 1}), "c": ((), 5.0, {"ca": i}),
                "d": ((), float(i) if vary_coord else 1.0)},
        attrs={"i": i, "same": 1, "nan": float("nan")}) for i in range(n)]


@pytest.mark.parametrize("coords", [
    {"n": np.arange(4)},
    {"eta": np.array([0.1, 0.2]), "norm": np.array(["plain", "batchnorm"])},
])
def test_stacking_equals_the_outer_join(coords):
    parts = [combine_mod.label_dimensions(p) for p in parts_for(4)]
    fast = combine_mod._stack_uniform(parts, coords)
    assert fast is not None
    xr.testing.assert_identical(fast, combine_mod._combine_outer(parts, coords))
    xr.testing.assert_identical(combine_mod.combine_parts(parts, coords),
                                combine_mod._combine_outer(parts, coords))


def test_parts_of_different_structure_take_the_outer_join():
    parts = parts_for(2, vary_coord=True)  # a scalar coordinate that differs: outer join
    assert combine_mod._stack_uniform(parts, {"n": np.arange(2)}) is None
    other = parts_for(2)
    other[1] = other[1].isel(a=[0, 1])  # other labels
    assert combine_mod._stack_uniform(other, {"n": np.arange(2)}) is None
    combined = combine_mod.combine_parts(other, {"n": np.arange(2)})
    assert np.isnan(combined["x"].values[1, 2])


def test_a_real_sweep_combines_identically_by_either_path():
    exp = Experiment(TeacherStudent(2, 2), analyzers=[
        {"name": "dynamics", "alpha_max": 1.0, "n_points": 5}])
    sweep = Sweep(exp, {"eta": [0.1, 0.3], "seed": [0, 1]})
    parts = [combine_mod.label_dimensions(
        framework.sweep.execute._compute(e, spec_hash(e))) for _, e in sweep.points()]
    fast = combine_mod._stack_uniform(parts, sweep.coords())
    assert fast is not None
    xr.testing.assert_identical(fast, combine_mod._combine_outer(parts, sweep.coords()))


def test_two_sweeps_in_opposite_orders_compute_each_point_once(tmp_path, log, monkeypatch):
    """Each writer holds the locks of its pending points; neither waits while holding."""
    import time

    etas = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    real_run = Logged.run

    def slow_run(self: Logged, experiment: Experiment) -> xr.Dataset:
        time.sleep(0.05)
        return real_run(self, experiment)

    monkeypatch.setattr(Logged, "run", slow_run)
    outs: dict[str, xr.Dataset] = {}

    def one(name: str, order: list[float]) -> None:
        outs[name] = base().sweep(eta=order, results_dir=tmp_path,
                                  scheduler="synchronous")["logged"]

    threads = [threading.Thread(target=one, args=("up", etas)),
               threading.Thread(target=one, args=("down", etas[::-1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)  # no deadlock
    assert sorted(log()) == etas  # each point computed exactly once
    xr.testing.assert_identical(outs["up"].drop_attrs(),  # the grids' attrs differ
                                outs["down"].isel(eta=slice(None, None, -1)).drop_attrs())
