"""Sweeps: grid validation, combination, storage, resumption, failures, Dask execution."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import ClassVar

import attrs
import numpy as np
import pytest
import xarray as xr

import framework
from framework import Analyzer, Experiment, SpecificationError, TeacherStudent, hookimpl
from framework.sweep import Sweep, spec_hash
from framework.sweep.storage import POINTS_SUFFIX, read_points, remove_points
from framework.validators import integer

LOG_ENV = "SYMPHASE_TEST_SWEEP_LOG"
ROOT = Path(__file__).resolve().parents[1]


def stored_keys(folder: Path) -> list[str]:
    """The task keys stored in the batch files of a results folder (each file whole)."""
    return [key for path in sorted((folder / "points").glob(f"*{POINTS_SUFFIX}"))
            for key in read_points(path)]


@attrs.frozen
class Toy(Analyzer):
    """Cheap deterministic analyzer: closed-form 'trajectories' over a short alpha grid.

    ``eta > diverge_above`` sets its ``diverged`` flag; ``eta > fail_above`` raises;
    ``sleep`` seconds of waiting; each run appends its ``eta``/``K``/``seed`` to the file
    named by $SYMPHASE_TEST_SWEEP_LOG (to count computations).
    """

    name: ClassVar[str] = "toy"
    description: ClassVar[str] = "test-only analyzer for sweeps"

    n_alpha: int = attrs.field(default=4, validator=integer(minimum=2))
    diverge_above: float = 1e9
    fail_above: float = 1e9
    sleep: float = 0.0

    def run(self, experiment: Experiment) -> xr.Dataset:
        log = os.environ.get(LOG_ENV)
        if log:
            with open(log, "a") as fh:
                fh.write(json.dumps({"eta": experiment.eta, "K": experiment.model.K,
                                     "seed": experiment.seed,
                                     "norm": experiment.normalization.name}) + "\n")
        if self.sleep:
            time.sleep(self.sleep)
        if experiment.eta > self.fail_above:
            raise FloatingPointError(f"eta={experiment.eta} blew up")
        K, M = experiment.model.K, experiment.model.M
        alpha = np.linspace(0.0, 1.0, self.n_alpha)
        a = alpha[:, None, None]
        Q = (1 + experiment.eta * a) * np.eye(K) + 0.01 * experiment.seed
        R = experiment.eta * a * np.ones((K, M)) / (K + M)
        return xr.Dataset(
            {
                "eps_g": ("alpha", np.exp(-experiment.eta * alpha) / K,
                          {"long_name": "generalization error", "units": "1"}),
                "Q": (("alpha", "student", "student_"), Q,
                      {"long_name": "student-student overlap", "units": "1"}),
                "R": (("alpha", "student", "teacher"), R,
                      {"long_name": "student-teacher overlap", "units": "1"}),
                "diverged": ((), experiment.eta > self.diverge_above,
                             {"long_name": "diverged", "units": "1"}),
                "count": ((), np.int64(K * M), {"long_name": "K M", "units": "1"}),
            },
            coords={"alpha": ("alpha", alpha, {"long_name": "alpha", "units": "1"})},
            attrs={"eta": experiment.eta, "note": "toy"},
        )


class ToyPlugin:
    """A plugin object (a class, so it pickles by reference from this module)."""

    @staticmethod
    @hookimpl
    def symphase_register_analyzers(registry):  # type: ignore[no-untyped-def]
        registry.add_analyzer(Toy)


@pytest.fixture(autouse=True)
def toy_plugin():
    framework.register_plugin(ToyPlugin)
    yield
    framework.unregister_plugin(ToyPlugin)


@pytest.fixture
def log(tmp_path, monkeypatch):
    path = tmp_path / "runs.log"
    monkeypatch.setenv(LOG_ENV, str(path))

    def runs() -> list[dict]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    return runs


def base(**options) -> Experiment:
    return Experiment(TeacherStudent(2, 2), analyzers=[{"name": "toy", **options}], init_N=50)


# -- validation -------------------------------------------------------------------------
def test_invalid_value_names_key_value_and_position_before_any_work(log):
    with pytest.raises(SpecificationError, match=r"sweep 'eta'\[2\] = -1.0: 'eta' must be >= 0"):
        base().sweep(eta=[0.1, 0.2, -1.0], seed=[0, 1], scheduler="synchronous")
    assert log() == []


def test_invalid_combination_names_point_and_index(log):
    exp = Experiment(TeacherStudent(1, 1), analyzers=["toy"], init_N=10)
    with pytest.raises(SpecificationError,
                       match=r"sweep point \(K=3, init_N=4\) at grid index \(1, 0\): 'init_N'"):
        exp.sweep(K=[1, 3], init_N=[4, 10], scheduler="synchronous")
    assert log() == []
    # values invalid only with the base experiment's other fields are fine in the grid
    exp = Experiment(TeacherStudent(1, 1), analyzers=["toy"], init_N=4)
    assert len(Sweep(exp, {"K": [1, 3], "init_N": [10]}).validate()) == 2


@pytest.mark.parametrize(
    ("grid", "match"),
    [
        ({"bogus": [1]}, r"unknown sweep key 'bogus'; valid keys: 'eta'.*'ANALYZER.OPTION'"),
        ({"toy.nope": [1]}, r"analyzer 'toy' has no option 'nope'"),
        ({"eta": 0.1}, r"sweep 'eta' must be a list of values, got 0.1"),
        ({"eta": []}, r"sweep 'eta' must have at least one value"),
        ({"eta": [0.1, 0.1]}, r"sweep 'eta'\[1\] = 0.1 repeats an earlier value"),
        ({"normalization": ["plain", "bn"]}, r"sweep 'normalization'\[1\] = 'bn': unknown "
                                              r"normalization 'bn'; installed"),
        ({"K": [2, 0]}, r"sweep 'K'\[1\] = 0: 'K' must be >= 1, got 0"),
        ({"toy.n_alpha": [3, 2.5]}, r"sweep 'toy.n_alpha'\[1\] = 2.5: 'n_alpha' must be an "
                                    r"integer"),
    ],
)
def test_grid_errors(grid, match):
    with pytest.raises((SpecificationError, TypeError), match=match):
        Sweep(base(), grid).validate()


# -- combination ------------------------------------------------------------------------
def test_sweep_dims_coords_and_provenance(log):
    out = base().sweep(
        {"toy.n_alpha": [3, 5]}, eta=[0.1, 0.5, 1.0], normalization=["plain", "batchnorm"],
        scheduler="synchronous",
    )
    ds = out["toy"]
    assert ds["eps_g"].dims == ("toy.n_alpha", "eta", "normalization", "alpha")
    assert ds["normalization"].values.tolist() == ["plain", "batchnorm"]
    assert ds["eta"].values.tolist() == [0.1, 0.5, 1.0]
    assert ds.sizes["alpha"] == 5  # alpha is indexed: outer join of the two grids
    assert len(log()) == 2 * 3 * 2
    # values at a point equal a plain run of that point's experiment
    point = Sweep(base(), {"toy.n_alpha": [3, 5], "eta": [0.1, 0.5, 1.0],
                           "normalization": ["plain", "batchnorm"]}).point(1, 2, 1)
    single = point.run()["toy"]
    sel = ds.isel({"toy.n_alpha": 1, "eta": 2, "normalization": 1})
    np.testing.assert_array_equal(sel["Q"].values, single["Q"].values)
    assert not sel["sweep_failed"] and sel["sweep_error"] == ""
    assert sel["sweep_sha256"].item() == spec_hash(point)
    # provenance: the base experiment and the grid
    assert framework.load_experiment(ds) == base()
    assert json.loads(ds.attrs["symphase_sweep_grid_json"])["eta"] == [0.1, 0.5, 1.0]
    assert json.loads(ds.attrs["symphase_sweep_dims"])[0] == "toy.n_alpha"
    assert ds.attrs["symphase_analyzer"] == "toy"
    assert "symphase_version" in ds.attrs and "symphase_plugins" in ds.attrs
    assert framework.point_experiment(ds, **{"toy.n_alpha": 5, "eta": 1.0,
                                            "normalization": "batchnorm"}) == point
    assert framework.point_experiment(ds, 1, 2, 1) == point
    assert ds.attrs["note"] == "toy"  # attrs common to every point are kept
    assert "eta" not in ds.attrs  # conflicting ones are dropped


def test_varying_K_pads_student_dims_with_nan_and_M_follows_K():
    ds = base().sweep(K=[1, 3], scheduler="synchronous")["toy"]
    assert ds.sizes["student"] == 3 and ds.sizes["teacher"] == 3  # M followed K (M == K)
    q1 = ds["Q"].sel(K=1).isel(alpha=0).values
    assert q1[0, 0] == 1.0 and np.isnan(q1[1:, :]).all() and np.isnan(q1[:, 1:]).all()
    assert ds["count"].sel(K=3).item() == 9  # nothing missing: stays an integer
    assert ds["count"].dtype == np.int64
    assert ds["diverged"].dtype == bool
    exp = Experiment(TeacherStudent(2, 3), analyzers=["toy"], init_N=50)
    sweep = Sweep(exp, {"K": [1, 4]})
    assert [e.model.M for _, e in sweep.points()] == [3, 3]  # M != K: M stays


def test_combine_with_K_changing_outer_joins_and_documents_the_fill(tmp_path):
    ds = base().sweep(K=[1, 3], scheduler="synchronous", results_dir=tmp_path)["toy"]
    # Toy gives 'student' no coordinate: the sweep labels it by position, and says so
    assert ds["student"].values.tolist() == [0, 1, 2]
    assert "by position" in ds["student"].attrs["symphase_positional"]
    R = ds["R"].sel(K=1).isel(alpha=1)
    assert np.isfinite(R.values[0, 0]) and np.isnan(R.values[1:, :]).all()
    assert np.isnan(R.values[:, 1:]).all()
    for name in ("Q", "R"):
        assert ds[name].attrs["symphase_fill"].startswith("NaN: the entry does not exist")
        assert "symphase_fill_from_dtype" not in ds[name].attrs  # float stays float
    assert ds["count"].dtype == np.int64 and "symphase_fill" not in ds["count"].attrs
    assert ds["eps_g"].attrs.get("symphase_fill") is None  # nothing missing: no fill
    stored = framework.load(tmp_path / "toy.nc")
    xr.testing.assert_identical(stored, ds)


def test_combine_parts_aligns_by_label_with_a_fill_per_dtype():
    from framework.sweep.combine import combine_parts

    def part(K, alpha):
        return xr.Dataset(
            {"q": (("alpha", "student"), np.ones((len(alpha), K))),
             "n": ("student", np.arange(K)), "ok": ("student", np.ones(K, dtype=bool)),
             "tag": ("student", np.array(["a"] * K, dtype=object)),
             "c": ((), np.int64(K))},
            coords={"alpha": alpha, "student": np.arange(K)})

    combined = combine_parts([part(1, [0.0, 1.0]), part(2, [0.0, 0.5, 1.0])],
                             {"K": np.array([1, 2])})
    assert combined["alpha"].values.tolist() == [0.0, 0.5, 1.0]
    q1 = combined["q"].sel(K=1).values  # aligned by label: the gap is in the middle
    assert q1[[0, 2], 0].tolist() == [1.0, 1.0] and np.isnan(q1[1]).all()
    assert np.isnan(q1[:, 1]).all()
    assert combined["n"].dtype == np.float64
    assert combined["n"].values.tolist()[1] == [0.0, 1.0]
    assert np.isnan(combined["n"].values[0, 1])
    assert combined["n"].attrs["symphase_fill_from_dtype"] == "int64"
    assert combined["ok"].dtype == np.float64 and np.isnan(combined["ok"].values[0, 1])
    assert combined["ok"].attrs["symphase_fill_from_dtype"] == "bool"
    assert combined["tag"].values.tolist() == [["a", ""], ["a", "a"]]
    assert combined["tag"].attrs["symphase_fill"].startswith("'' (the netCDF string fill")
    assert combined["c"].dtype == np.int64 and combined["c"].values.tolist() == [1, 2]
    # a missing part (a failed point): every variable is missing there
    failed = combine_parts([part(2, [0.0]), None], {"K": np.array([2, 3])})
    assert np.isnan(failed["q"].sel(K=3)).all() and failed["tag"].sel(K=3).values.tolist() == [
        "", ""]
    assert np.isnan(failed["c"].sel(K=3)) and failed["c"].attrs["symphase_fill_from_dtype"]


def test_sweeping_M_needs_identity_T():
    exp = Experiment(TeacherStudent(2, 2, T=[[1, 0.5], [0.5, 1]]), analyzers=["toy"], init_N=9)
    with pytest.raises(SpecificationError, match=r"'M' can only change in a sweep"):
        Sweep(exp, {"K": [2, 3]}).validate()


def test_failures_and_divergence_are_recorded_and_other_points_complete(tmp_path, log):
    exp = base(diverge_above=0.4, fail_above=0.9)
    ds = exp.sweep(eta=[0.1, 0.5, 1.0], results_dir=tmp_path, scheduler="synchronous")["toy"]
    assert ds["sweep_failed"].values.tolist() == [False, False, True]
    assert ds["sweep_error"].values[2] == "FloatingPointError: eta=1.0 blew up"
    # a failed point has no divergence flag: missing (NaN), not False
    diverged = ds["diverged"].values
    assert diverged.dtype == np.float64 and diverged[:2].tolist() == [0.0, 1.0]
    assert np.isnan(diverged[2])
    assert ds["diverged"].attrs["symphase_fill_from_dtype"] == "bool"
    assert ds["diverged"].attrs["symphase_fill"].startswith("NaN: ")
    assert ds["eps_g"].attrs["symphase_fill"].startswith("NaN: ")
    assert np.isnan(ds["eps_g"].sel(eta=1.0)).all()
    assert np.isfinite(ds["eps_g"].sel(eta=0.5)).all()
    # the combined file reopens, with plain xarray too; the 3 points are in one batch file
    (combined,) = sorted(tmp_path.rglob("*.nc"))
    with xr.open_dataset(combined) as opened:
        opened.load()
    framework.load(combined)
    assert len(list((tmp_path / "points").glob(f"*{POINTS_SUFFIX}"))) == 1
    assert sorted(stored_keys(tmp_path)) == sorted(ds["sweep_sha256"].values.ravel())
    # a failure is stored: not retried unless asked
    n = len(log())
    exp.sweep(eta=[0.1, 0.5, 1.0], results_dir=tmp_path, scheduler="synchronous")
    assert len(log()) == n
    exp.sweep(eta=[0.1, 0.5, 1.0], results_dir=tmp_path, scheduler="synchronous",
              retry_failed=True)
    assert [r["eta"] for r in log()[n:]] == [1.0]


def test_all_points_failing_still_combines():
    ds = base(fail_above=0.0).sweep(eta=[0.1, 0.2], scheduler="synchronous")["toy"]
    assert ds["sweep_failed"].values.all()
    assert set(ds.data_vars) == {"sweep_failed", "sweep_error", "sweep_sha256"}


# -- storage and resumption -------------------------------------------------------------
def test_results_dir_resume_recomputes_only_missing(tmp_path, log):
    exp = base()
    grid = {"eta": [0.1, 0.2], "seed": [0, 1, 2]}
    first = exp.sweep(grid, results_dir=tmp_path, scheduler="synchronous")["toy"]
    assert len(log()) == 6
    # lose two points, as if killed before they were stored
    assert remove_points(tmp_path, first["sweep_sha256"].values.ravel()[[1, 4]]) == 2
    again = exp.sweep(grid, results_dir=tmp_path, scheduler="synchronous")["toy"]
    assert len(log()) == 8
    xr.testing.assert_identical(first, again)
    # the combined file equals the returned dataset
    xr.testing.assert_identical(framework.load(tmp_path / "toy.nc"), again)
    stored = framework.load(tmp_path / "toy.nc")
    assert framework.load_sweep(stored) == Sweep(exp, grid)
    # extending the grid reuses the stored points
    exp.sweep(eta=[0.1, 0.2, 0.3], seed=[0, 1, 2], results_dir=tmp_path,
              scheduler="synchronous")
    assert len(log()) == 11


def test_spec_hash_is_stable_and_canonical():
    a = base()
    assert spec_hash(a) == spec_hash(Experiment.from_json(a.to_json()))
    assert spec_hash(a.evolve(eta=1)) == spec_hash(a.evolve(eta=1.0))
    assert spec_hash(a) != spec_hash(a.evolve(seed=1))
    assert len(spec_hash(a)) == 64


def test_corrupt_point_file_is_recomputed(tmp_path, log):
    exp = base()
    ds = exp.sweep(eta=[0.1], results_dir=tmp_path, scheduler="synchronous")["toy"]
    (batch,) = (tmp_path / "points").glob(f"*{POINTS_SUFFIX}")
    batch.write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="not a symphase batch file"):
        again = exp.sweep(eta=[0.1], results_dir=tmp_path, scheduler="synchronous")["toy"]
    assert len(log()) == 2
    xr.testing.assert_identical(again, ds)
    # a task file of the old layout that is garbage: recomputed too
    batch.unlink()
    for path in (tmp_path / "points").glob(f"*{POINTS_SUFFIX}"):
        path.unlink()
    key = ds["sweep_sha256"].item()
    (tmp_path / "points" / f"{key}.nc").write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="recomputing unreadable"):
        exp.sweep(eta=[0.1], results_dir=tmp_path, scheduler="synchronous")
    assert len(log()) == 3


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import attrs, numpy as np, xarray as xr
    import framework
    from framework import Analyzer, Experiment, TeacherStudent, hookimpl

    @attrs.frozen
    class Slow(Analyzer):
        name = "slow"
        description = "sleeps, then returns a small dataset"
        sleep: float = 0.3

        def run(self, experiment):
            with open(sys.argv[2], "a") as fh:
                fh.write(f"{experiment.eta} {experiment.seed}\\n")
            time.sleep(self.sleep)
            alpha = np.linspace(0, 1, 3)
            return xr.Dataset(
                {"eps_g": ("alpha", experiment.eta * alpha + experiment.seed,
                           {"long_name": "e", "units": "1"})},
                coords={"alpha": alpha})

    class Plugin:
        @staticmethod
        @hookimpl
        def symphase_register_analyzers(registry):
            registry.add_analyzer(Slow)

    if __name__ == "__main__":
        framework.register_plugin(Plugin)
        exp = Experiment(TeacherStudent(2, 2), analyzers=["slow"], init_N=20)
        exp.sweep(eta=[0.1, 0.2, 0.3, 0.4], seed=[0, 1, 2], results_dir=sys.argv[1],
                  scheduler=sys.argv[3], workers=2, progress=False)
        print("done")
    """
)


@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_sigkill_mid_sweep_resumes_without_recomputation(tmp_path, scheduler):
    script = tmp_path / "sweep_script.py"
    script.write_text(KILL_SCRIPT)
    results, log = tmp_path / "results", tmp_path / "runs.log"
    cmd = [sys.executable, str(script), str(results), str(log), scheduler]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # this source tree's framework
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    points = results / "points"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill after a few points are stored
        if points.exists() and len(stored_keys(results)) >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored_before = set(stored_keys(results))  # reads every record: every file is whole
    assert 4 <= len(stored_before) < 12
    started_before = len(log.read_text().splitlines())
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "done" in done.stdout
    runs = log.read_text().splitlines()
    # the resumed run computed exactly the points that were not stored
    assert len(runs) - started_before == 12 - len(stored_before)
    combined = framework.load(results / "slow.nc")
    assert not combined["sweep_failed"].values.any()
    expected = combined["eta"] * combined["alpha"] + combined["seed"]
    np.testing.assert_allclose(combined["eps_g"].values,
                               expected.transpose("eta", "seed", "alpha").values)
    for f in results.rglob("*.nc"):
        with xr.open_dataset(f) as opened:
            opened.load()
    # a write killed mid-way left a temporary; the resumed run removed it with the point
    assert not list(results.rglob("*.tmp"))


# -- Dask -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as c:
        yield c


def test_sweep_on_existing_cluster_by_address(cluster, tmp_path, log):
    exp = base()
    grid = {"eta": [0.1, 0.2, 0.3], "K": [1, 2]}
    remote = exp.sweep(grid, scheduler=cluster.scheduler_address, results_dir=tmp_path)["toy"]
    local = exp.sweep(grid, scheduler="synchronous")["toy"]
    xr.testing.assert_identical(remote, local)
    assert len(stored_keys(tmp_path)) == 6
    assert len(log()) == 6  # only here: the workers started before $SYMPHASE_TEST_SWEEP_LOG


def test_embedded_threads_cluster(log):
    ds = base().sweep(eta=[0.1, 0.2], scheduler="threads", workers=2)["toy"]
    assert ds.sizes["eta"] == 2 and len(log()) == 2


def test_bad_scheduler_address_is_a_specification_error():
    dask = pytest.importorskip("dask")
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), pytest.raises(
        SpecificationError, match=r"'scheduler' 'tcp://127.0.0.1:1': cannot connect"
    ):
        base().sweep(eta=[0.1], scheduler="tcp://127.0.0.1:1")


# -- batching: points_per_task ---------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_points_per_task_is_validated_before_any_work(bad, log):
    with pytest.raises(SpecificationError, match=r"'points_per_task' must be"):
        base().sweep(eta=[0.1, 0.2], scheduler="threads", points_per_task=bad)
    with pytest.raises(SpecificationError, match=r"'points_per_task' must be"):
        Sweep(base(), {"eta": [0.1]}).run(scheduler="synchronous", points_per_task=bad)
    assert log() == []


def test_default_points_per_task():
    from framework.sweep.execute import default_points_per_task

    assert default_points_per_task(6, 2) == 1  # few tasks per worker: not batched
    assert default_points_per_task(64, 2) == 16
    assert default_points_per_task(7, 2) == 1
    assert default_points_per_task(10**6, 2) == 32  # bounded
    assert default_points_per_task(5, 0) == 2  # no worker counts as one


def test_batched_results_equal_unbatched_and_resume_is_exact(tmp_path, log):
    exp = base()
    grid = {"eta": [0.1, 0.2, 0.3], "seed": [0, 1, 2]}
    single = exp.sweep(grid, scheduler="threads", workers=2, points_per_task=1,
                       results_dir=tmp_path / "one")["toy"]
    assert len(log()) == 9
    batched = exp.sweep(grid, scheduler="threads", workers=2, points_per_task=4,
                        results_dir=tmp_path / "four")["toy"]
    assert len(log()) == 18
    xr.testing.assert_identical(single, batched)
    xr.testing.assert_identical(batched, exp.sweep(grid, scheduler="synchronous")["toy"])
    names = stored_keys(tmp_path / "four")
    assert sorted(names) == sorted(stored_keys(tmp_path / "one"))
    assert len(set(names)) == len(names) == 9
    # one file per batch: ceil(9 / 4) batches; unbatched, one file per point
    assert len(list((tmp_path / "four" / "points").glob(f"*{POINTS_SUFFIX}"))) == 3
    assert len(list((tmp_path / "one" / "points").glob(f"*{POINTS_SUFFIX}"))) == 9
    # lose three points: a batched re-run recomputes exactly those
    assert remove_points(tmp_path / "four", batched["sweep_sha256"].values.ravel()[[0, 4, 8]]
                         ) == 3
    n = len(log())
    again = exp.sweep(grid, scheduler="threads", workers=2, points_per_task=2,
                      results_dir=tmp_path / "four")["toy"]
    assert sorted((r["eta"], r["seed"]) for r in log()[n:]) == [(0.1, 0), (0.2, 1),
                                                                  (0.3, 2)]
    xr.testing.assert_identical(again, batched)


def test_batched_sweep_on_worker_processes_stores_in_the_workers(cluster, tmp_path):
    exp = base()
    grid = {"eta": [0.1, 0.2, 0.3, 0.4], "K": [1, 2]}
    local = exp.sweep(grid, scheduler="synchronous")["toy"]
    for size in (1, 3, None):
        out = tmp_path / str(size)
        remote = exp.sweep(grid, scheduler=cluster.scheduler_address, results_dir=out,
                           points_per_task=size)["toy"]
        xr.testing.assert_identical(remote, local)
        assert sorted(stored_keys(out)) == sorted(local["sweep_sha256"].values.ravel())
        xr.testing.assert_identical(framework.load(out / "toy.nc"), local)


def test_workers_that_do_not_see_the_folder_return_results_to_store(tmp_path, monkeypatch):
    from framework.sweep import execute

    monkeypatch.setattr(execute, "sees_folder", lambda folder, token: False)
    exp = base()
    ds = exp.sweep(eta=[0.1, 0.2, 0.3], scheduler="threads", workers=2, points_per_task=2,
                   results_dir=tmp_path)["toy"]
    assert len(stored_keys(tmp_path)) == 3  # stored by this process
    xr.testing.assert_identical(ds, exp.sweep(eta=[0.1, 0.2, 0.3],
                                              scheduler="synchronous")["toy"])


# -- the dynamics analyzer --------------------------------------------------------------
def test_dynamics_sweep_over_K_and_normalization():
    exp = Experiment(TeacherStudent(2, 2), analyzers=[
        {"name": "dynamics", "alpha_max": 5.0, "n_points": 6, "rtol": 1e-6, "atol": 1e-8}])
    ds = exp.sweep(K=[1, 2], normalization=["plain", "batchnorm"],
                   scheduler="synchronous")["dynamics"]
    assert ds["eps_g"].dims == ("K", "normalization", "alpha")
    assert ds["Q"].sizes["student"] == 2
    assert np.isnan(ds["Q"].sel(K=1).values[..., 1, :]).all()
    assert np.isfinite(ds["eps_g"]).all()
    assert ds["diverged"].dtype == bool and not ds["diverged"].any()
    one = framework.point_experiment(ds, K=2, normalization="batchnorm").run()["dynamics"]
    np.testing.assert_allclose(ds["eps_g"].sel(K=2, normalization="batchnorm"), one["eps_g"])
