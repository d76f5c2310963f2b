"""Sweeps and processes (issue 12, item 1): where a sweep runs, workers that die with their
client, Ctrl-C, locks against double work, checksums, stale temporaries, scheduler errors.

The process tests run the real ``symphase run`` in a subprocess with a plugin (installed
through an entry point on ``PYTHONPATH``) whose analyzer holds the GIL in a C loop, as a
compiled kernel does, and check with ``/proc`` (or psutil) that no worker survives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np
import pytest
import xarray as xr

import framework
from framework import Analyzer, Experiment, SpecificationError, TeacherStudent, hookimpl
from framework.io import ChecksumError, checksum, load, save
from framework.sweep import POINTS_DIR, spec_hash
from framework.sweep.execute import _guarded_lines, default_scheduler
from framework.sweep.storage import POINTS_SUFFIX, point_lock, point_path, read_points

ROOT = Path(__file__).resolve().parents[1]
LOG_ENV = "SYMPHASE_TEST_PROC_LOG"


def stored(folder: Path) -> dict[str, xr.Dataset]:
    """The task datasets in the batch files of a results folder (each file whole)."""
    out: dict[str, xr.Dataset] = {}
    for path in sorted((folder / POINTS_DIR).glob(f"*{POINTS_SUFFIX}")):
        out.update(read_points(path))
    return out

# -- a plugin for subprocesses (entry point), and one for this process ---------------------
SPIN_PLUGIN = textwrap.dedent(
    """
    import itertools, json, os, time
    from typing import Any, ClassVar

    import attrs
    import numpy as np
    import xarray as xr

    from framework import Analyzer, hookimpl


    @attrs.frozen
    class Spin(Analyzer):
        '''Points with eta > slow_above hold the GIL in one C loop of `loops` steps.'''

        name: ClassVar[str] = "spin"
        description: ClassVar[str] = "test-only: holds the GIL"
        slow_above: float = 0.15
        loops: int = 10**11
        nap: float = 0.0  # > 0: slow points sleep (GIL released) instead of the C loop

        def run(self, experiment):
            log = os.environ.get("SPIN_LOG")
            if log:
                with open(log, "a") as fh:
                    fh.write(json.dumps({"pid": os.getpid(), "eta": experiment.eta}) + "\\n")
            if experiment.eta > self.slow_above and self.nap:
                time.sleep(self.nap)
            elif experiment.eta > self.slow_above:
                sum(itertools.repeat(1, self.loops))  # C loop: the GIL is never released
            alpha = np.linspace(0.0, 1.0, 3)
            return xr.Dataset(
                {"eps_g": ("alpha", experiment.eta * alpha, {"long_name": "e", "units": "1"})},
                coords={"alpha": alpha})


    @hookimpl
    def symphase_register_analyzers(registry):
        registry.add_analyzer(Spin)
    """
)


def _install_spin(where: Path) -> dict[str, str]:
    """Write the spin plugin and its entry point under ``where``; the env that sees them."""
    dist = where / "spinplug-0.1.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: spinplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[symphase]\nspin = spinplug_mod\n")
    (where / "spinplug_mod.py").write_text(SPIN_PLUGIN)
    path = os.pathsep.join([str(ROOT), str(where),
                            *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path}


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _descendants(pid: int) -> set[int]:
    """Process ids of every descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _wait_for(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PDEATHSIG")
@pytest.mark.parametrize(("how", "scheduler"), [
    ("SIGKILL", "processes"), ("SIGTERM", "processes"), ("SIGINT-group", "processes"),
    ("SIGINT-group", "threads"),
])
def test_killed_run_leaves_no_worker_and_keeps_stored_points(tmp_path, how, scheduler):
    pytest.importorskip("distributed")
    env = _install_spin(tmp_path / "plug")
    spin_log = tmp_path / "spin.log"
    env["SPIN_LOG"] = str(spin_log)
    toml = tmp_path / "spin.toml"
    toml.write_text(textwrap.dedent(
        """
        [model]
        K = 2
        M = 2
        [analyzers.spin]
        nap = {nap}
        [sweep]
        eta = [0.1, 0.12, 0.2, 0.3]
        """
    ).replace("{nap}", "600.0" if scheduler == "threads" else "0.0"))
    out = tmp_path / "res"
    proc = subprocess.Popen(
        [sys.executable, "-m", "framework.cli", "run", str(toml), "--out", str(out),
         "--scheduler", scheduler, "--workers", "2", "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    workers: set[int] = set()
    try:
        # the fast point is stored, and a slow point is running in a worker
        def started() -> bool:
            slow = [r for r in _log(spin_log) if r["eta"] > 0.15]
            return bool(slow) and len(stored(out)) >= 1

        assert _wait_for(started, 90), proc.communicate()[1] if proc.poll() is not None else ""
        workers = {r["pid"] for r in _log(spin_log)}
        if scheduler == "processes":  # the points run in worker processes
            assert workers and proc.pid not in workers
        else:  # threads of the client: the client must exit although they sleep on
            assert workers == {proc.pid}
        workers |= _descendants(proc.pid)
        if how == "SIGKILL":
            proc.send_signal(signal.SIGKILL)
        elif how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:  # Ctrl-C in a terminal: SIGINT to the whole process group
            os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)  # the client stops within seconds
        assert _wait_for(lambda: not any(_alive(p) for p in workers), 15), (
            f"workers still alive after {how}: {[p for p in workers if _alive(p)]}")
        if how != "SIGKILL":
            assert proc.returncode == (143 if how == "SIGTERM" else 130), err
            assert "Traceback" not in err
            # Python's multiprocessing resource tracker (a child of the client) may warn
            # about semaphores of the killed workers as it exits; that is not our output
            ours = [line for line in err.strip().splitlines()
                    if "resource_tracker" not in line and "warnings.warn(" not in line]
            assert ours == [("symphase: terminated; " if how == "SIGTERM" else
                             "symphase: interrupted; ") + "results stored so far are kept"], err
        # the stored point is whole and verified; it is reused by a re-run
        points = stored(out)  # every record verified
        assert 1 <= len(points) <= 2  # the fast points only
        for ds in points.values():
            assert ds.attrs["spec.eta"] in (0.1, 0.12)
            np.testing.assert_allclose(ds["eps_g"].values,
                                       ds.attrs["spec.eta"] * np.linspace(0, 1, 3))
    finally:
        for pid in workers | {proc.pid}:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# -- the default scheduler --------------------------------------------------------------
def test_guarded_lines_finds_main_blocks():
    source = textwrap.dedent(
        """
        import x
        x.sweep()
        if __name__ == "__main__":
            x.sweep()
            x.other()
        if "__main__" == __name__:
            pass
        if __name__ == "__mp_main__":
            pass
        """
    )
    assert _guarded_lines(source) == [(5, 6), (8, 8)]


def test_default_scheduler_of_one_task_is_synchronous():
    assert default_scheduler(1) == "synchronous"
    assert default_scheduler(0) == "synchronous"


SCRIPT = textwrap.dedent(
    """
    import sys
    from framework import Experiment, TeacherStudent
    from framework.sweep.execute import default_scheduler, spawn_is_safe

    exp = Experiment(TeacherStudent(K=2, M=2),
                     analyzers=[{"name": "dynamics", "alpha_max": 5.0, "n_points": 4}])
    {body}
    """
)
UNGUARDED = """
print("safe", spawn_is_safe(), default_scheduler(4))
r = exp.sweep(eta=[0.1, 0.5], results_dir=sys.argv[1], progress=False)
print("sizes", dict(r["dynamics"].sizes))
"""
GUARDED = """
def main():
    print("safe", spawn_is_safe(), default_scheduler(4))
    r = exp.sweep(eta=[0.1, 0.5], results_dir=sys.argv[1], progress=False, workers=2)
    print("sizes", dict(r["dynamics"].sizes))

if __name__ == "__main__":
    main()
"""
FORCED = """
try:
    exp.sweep(eta=[0.1, 0.5], scheduler="processes")
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def _script(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT.replace("{body}", textwrap.indent(textwrap.dedent(body), "")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, str(script), str(tmp_path / "res")], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_script_without_main_guard_runs_on_threads(tmp_path):
    pytest.importorskip("distributed")
    done = _script(tmp_path, UNGUARDED)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "safe False threads" in done.stdout
    assert "'eta': 2" in done.stdout
    assert len(stored(tmp_path / "res")) == 2


def test_forced_processes_without_main_guard_is_one_clear_error(tmp_path):
    pytest.importorskip("distributed")
    done = _script(tmp_path, FORCED)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "SpecificationError 'scheduler' 'processes'" in done.stdout
    assert "if __name__ == \"__main__\":" in done.stdout


def test_script_with_main_guard_runs_on_processes(tmp_path):
    pytest.importorskip("distributed")
    done = _script(tmp_path, GUARDED)
    assert done.returncode == 0, done.stderr
    assert "safe True processes" in done.stdout
    assert "'eta': 2" in done.stdout


# -- this process: locks, checksums, temporaries, scheduler errors ---------------------
@attrs.frozen
class Counted(Analyzer):
    """Cheap analyzer that appends its eta to $SYMPHASE_TEST_PROC_LOG and may wait."""

    name: ClassVar[str] = "counted"
    description: ClassVar[str] = "test-only analyzer counting its runs"
    wait: float = 0.0

    def run(self, experiment: Experiment) -> xr.Dataset:
        with open(os.environ[LOG_ENV], "a") as fh:
            fh.write(f"{experiment.eta}\n")
        time.sleep(self.wait)
        alpha = np.linspace(0.0, 1.0, 3)
        return xr.Dataset(
            {"eps_g": ("alpha", np.exp(-experiment.eta * alpha),
                       {"long_name": "generalization error", "units": "1"})},
            coords={"alpha": alpha})


class CountedPlugin:
    @staticmethod
    @hookimpl
    def symphase_register_analyzers(registry: Any) -> None:
        registry.add_analyzer(Counted)


@pytest.fixture(autouse=True)
def counted(tmp_path, monkeypatch):
    framework.register_plugin(CountedPlugin)
    path = tmp_path / "counted.log"
    monkeypatch.setenv(LOG_ENV, str(path))
    yield lambda: path.read_text().split() if path.exists() else []
    framework.unregister_plugin(CountedPlugin)


def base(**options: Any) -> Experiment:
    return Experiment(TeacherStudent(2, 2), analyzers=[{"name": "counted", **options}])


def test_two_concurrent_sweeps_into_one_folder_compute_each_point_once(tmp_path, counted):
    etas = [0.1, 0.2, 0.3, 0.4]
    outs: list[xr.Dataset] = []

    def one() -> None:
        outs.append(base(wait=0.2).sweep(eta=etas, results_dir=tmp_path,
                                         scheduler="synchronous")["counted"])

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(float, counted())) == etas  # each point computed exactly once
    assert len(outs) == 2
    xr.testing.assert_identical(outs[0], outs[1])


def test_a_locked_point_is_waited_for_and_reused(tmp_path, counted):
    exp = base()
    key = spec_hash(attrs.evolve(exp, eta=0.2))
    (tmp_path / POINTS_DIR).mkdir(parents=True)
    release = threading.Event()
    holding = threading.Event()

    def other_sweep() -> None:  # holds the lock of eta = 0.2 and stores it, then releases
        with point_lock(tmp_path, key) as held:
            assert held
            holding.set()
            release.wait(30)
            ds = framework.sweep.execute._compute(attrs.evolve(exp, eta=0.2).to_json(), key)
            framework.sweep.storage.store_point(tmp_path, key, ds)

    t = threading.Thread(target=other_sweep)
    t.start()
    assert holding.wait(30)
    timer = threading.Timer(0.5, release.set)
    timer.start()
    ds = exp.sweep(eta=[0.1, 0.2], results_dir=tmp_path, scheduler="synchronous")["counted"]
    t.join()
    # eta = 0.2 ran once, in the "other sweep"; this one waited and reused its file
    assert sorted(map(float, counted())) == [0.1, 0.2]
    np.testing.assert_allclose(ds["eps_g"].sel(eta=0.2).values, np.exp(-0.2 * ds.alpha))


def test_a_flipped_bit_in_a_stored_point_is_detected_and_recomputed(tmp_path, counted):
    exp = base()
    exp.sweep(eta=[0.1], results_dir=tmp_path, scheduler="synchronous")
    (path,) = (tmp_path / POINTS_DIR).glob(f"*{POINTS_SUFFIX}")
    data = bytearray(path.read_bytes())
    (clean,) = read_points(path).values()
    # flip one bit of one stored value: find the float64 bytes of eps_g[1] in the file
    needle = np.float64(clean["eps_g"].values[1]).tobytes()
    at = bytes(data).find(needle)
    assert at >= 0
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged record"):
        read_points(path)
    with pytest.warns(RuntimeWarning, match="damaged"):
        again = exp.sweep(eta=[0.1], results_dir=tmp_path, scheduler="synchronous")["counted"]
    assert counted() == ["0.1", "0.1"]  # recomputed, not reused
    np.testing.assert_array_equal(again["eps_g"].values[0], clean["eps_g"].values)
    (sound,) = stored(tmp_path).values()  # the damaged record is gone, the new one is sound
    xr.testing.assert_identical(sound, clean)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exp.sweep(eta=[0.1], results_dir=tmp_path, scheduler="synchronous")
    assert counted() == ["0.1", "0.1"]  # reused, no warning


def test_a_flipped_bit_in_an_old_layout_point_is_detected_and_recomputed(tmp_path, counted):
    exp = base()
    key = spec_hash(attrs.evolve(exp, eta=0.1))
    (tmp_path / POINTS_DIR).mkdir(parents=True)
    ds = framework.sweep.execute._compute(attrs.evolve(exp, eta=0.1), key)
    path = save(ds, point_path(tmp_path, key), lock=False)  # as symphase stored tasks before
    data = bytearray(path.read_bytes())
    clean = load(path, require_checksum=True)
    needle = np.float64(clean["eps_g"].values[1]).tobytes()
    at = bytes(data).find(needle)
    assert at >= 0
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="does not match"):
        load(path)
    with pytest.warns(RuntimeWarning, match="damaged"):
        again = exp.sweep(eta=[0.1], results_dir=tmp_path, scheduler="synchronous")["counted"]
    assert counted() == ["0.1", "0.1"]  # the run above, and this one: recomputed
    np.testing.assert_array_equal(again["eps_g"].values[0], clean["eps_g"].values)
    with warnings.catch_warnings():  # the batch record wins over the old file from now on
        warnings.simplefilter("error")
        exp.sweep(eta=[0.1], results_dir=tmp_path, scheduler="synchronous")
    assert counted() == ["0.1", "0.1"]


def test_checksum_covers_values_and_attrs_and_survives_the_round_trip(tmp_path):
    ds = xr.Dataset(
        {"x": ("a", np.arange(3.0), {"long_name": "x", "units": "1"}),
         "flag": ((), True), "name": ("a", np.array(["p", "", "q"]))},
        coords={"a": [1, 2, 3]}, attrs={"n": 3, "f": 0.5, "s": "text"})
    path = save(ds, tmp_path / "x.nc")
    with xr.open_dataset(path) as raw:
        raw.load()
        assert raw.attrs["symphase_checksum"] == checksum(raw)
        changed = raw.copy()
        changed.attrs["s"] = "texT"
        assert checksum(changed) != checksum(raw)
        changed = raw.copy(deep=True)
        changed["x"].values[1] = np.nextafter(1.0, 2.0)
        assert checksum(changed) != checksum(raw)
    xr.testing.assert_identical(load(path).drop_attrs(), ds.drop_attrs())


def test_a_point_without_checksum_is_recomputed(tmp_path, counted):
    exp = base()
    exp.sweep(eta=[0.1], results_dir=tmp_path, scheduler="synchronous")
    (batch,) = (tmp_path / POINTS_DIR).glob(f"*{POINTS_SUFFIX}")
    ((key, ds),) = read_points(batch).items()
    batch.unlink()  # as an old-layout task file, written without checksum
    ds.to_netcdf(tmp_path / "plain.nc")
    os.replace(tmp_path / "plain.nc", point_path(tmp_path, key))
    with pytest.warns(RuntimeWarning, match="no 'symphase_checksum'"):
        exp.sweep(eta=[0.1], results_dir=tmp_path, scheduler="synchronous")
    assert counted() == ["0.1", "0.1"]


def test_stale_temporaries_are_removed(tmp_path, counted):
    exp = base()
    key = spec_hash(attrs.evolve(exp, eta=0.1))
    points = tmp_path / POINTS_DIR
    points.mkdir(parents=True)
    stale_point = points / f".{key}.nc.abc123.tmp"  # a kill during a point's save
    stale_point.write_bytes(b"partial")
    stale_combined = tmp_path / ".counted.nc.xyz.tmp"  # a kill during the combined save
    stale_combined.write_bytes(b"partial")
    stale_token = points / ".symphase-folder.old.tmp"
    stale_token.write_text("x")
    os.utime(stale_token, (time.time() - 3600, time.time() - 3600))
    exp.sweep(eta=[0.1], results_dir=tmp_path, scheduler="synchronous")
    assert not stale_point.exists() and not stale_combined.exists()
    assert not stale_token.exists()
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("address", ["bogus", "tcp://", "tcp://:8786", "localhost"])
def test_bad_scheduler_address_is_one_clear_error(address, counted):
    pytest.importorskip("distributed")
    with pytest.raises(SpecificationError,
                       match=rf"'scheduler' {address!r} is not a scheduler address .*"
                             r"'tcp://host:8786'"):
        base().sweep(eta=[0.1, 0.2], scheduler=address)
    assert counted() == []


def test_results_dir_that_cannot_be_created_names_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpecificationError, match=r"'results_dir' .*file/sub.*cannot create"):
        base().sweep(eta=[0.1], results_dir=blocker / "sub", scheduler="synchronous")
