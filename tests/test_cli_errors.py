"""The CLI never prints a traceback for bad input or an environment problem (issue 12,
item 3): one line naming the argument and the problem, exit status 2; sizes beyond the
machine's memory are refused before allocating; a plugin that exits at import is reported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

import framework
from framework import SpecificationError
from framework._resources import available_memory, check_memory, estimate_bytes
from framework.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOOD = "[model]\nK = 2\nM = 2\n[analyzers.dynamics]\nalpha_max = 5.0\nn_points = 5\n"


def run_cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, pattern: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("symphase: error: "), lines[0]
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def files(tmp_path: Path, monkeypatch: Any) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.toml").write_text(GOOD)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    ds = xr.Dataset({"eps_g": ("alpha", np.ones(3), {"long_name": "e", "units": "1"})},
                    coords={"alpha": np.arange(3.0)})
    framework.save(ds, tmp_path / "plain.nc")
    return tmp_path


UNWRITABLE = "/proc/symphase-no-such-folder"  # /proc refuses new entries, even to root


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["run", "good.toml", "--out", "afile"], r"'--out' 'afile': is a file, not a folder"),
        (["run", "good.toml", "--out", "afile/sub"],
         r"'--out' 'afile/sub': '.*afile' is a file, not a folder"),
        (["run", "good.toml", "--out", UNWRITABLE], r"'--out' '/proc/.*': cannot create"),
        (["run", "adir"], r"adir: is a folder, not a TOML file"),
        (["reproduce", "takagi2020", "--quick", "--out", "afile"],
         r"'--out' 'afile': is a file, not a folder"),
        (["reproduce", "takagi2020", "--quick", "--out", UNWRITABLE],
         r"'--out' '/proc/.*': cannot create"),
        (["plot", "plain.nc", "-o", "adir"], r"'-o' 'adir': is a folder; give a file name"),
        (["plot", "plain.nc", "-o", "afile/x.png"],
         r"'-o' 'afile/x.png': '.*afile' is a file, not a folder"),
        (["plot", "plain.nc", "-o", UNWRITABLE + "/x.png"], r"'-o' '/proc/.*': cannot create"),
        (["plot", "adir"], r"adir: is a folder, not a netCDF file"),
        (["show", "adir"], r"adir: is a folder, not a netCDF file"),
        (["run", "good.toml", "--scheduler", "bogus"],
         r"'scheduler' 'bogus' is not a scheduler address"),
    ],
)
def test_bad_paths_and_addresses_are_one_line(files, capsys, argv, pattern):
    code, _, err = run_cli(capsys, *argv)
    one_line_error(code, err, pattern)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("", r"empty.toml: the \[model\] table is required"),
        ("[model]\nK = 2\nM = 2\n", r"empty.toml: no analyzer: nothing to run"),
        (GOOD + "[run]\nscheduler = \"bogus\"\n", r"'scheduler' 'bogus' is not a scheduler"),
        ("a = " + "[" * 3000 + "]" * 3000 + "\n", r"invalid TOML: nested too deeply"),
        ("[model]\nK = 100000\nM = 100000\n[analyzers.dynamics]\n",
         r"needs at least \d.* GiB \(K = 100000, M = 100000.*GiB of memory is available"),
        (GOOD + "[sweep]\nK = [2, 100000]\n", r"needs at least .* \(K = 100000, M = 100000"),
        ("[model]\nK = 2\nM = 2\n[analyzers.dynamics]\nn_points = 1000000000\n",
         r"needs at least .*dynamics.n_points = 1000000000"),
        ("init_N = 100000000000\n[model]\nK = 2\nM = 2\n[analyzers.dynamics]\n",
         r"needs at least .*init_N = 100000000000"),
    ],
)
def test_bad_toml_is_one_line_and_nothing_is_allocated(files, capsys, text, pattern):
    (files / "empty.toml").write_text(text)
    where = [] if "[run]" in text else ["--scheduler", "synchronous"]
    code, _, err = run_cli(capsys, "run", "empty.toml", "--out", "o", *where)
    one_line_error(code, err, pattern)
    assert not list((files / "o").rglob("*.nc"))


def test_non_utf8_toml(files, capsys):
    (files / "latin1.toml").write_bytes(b"[model]\nK = 2\nM = 2 # \xe9\n")
    code, _, err = run_cli(capsys, "run", "latin1.toml")
    one_line_error(code, err, r"latin1.toml: invalid TOML: not UTF-8")


def test_out_checked_before_running(files, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(framework.Sweep, "run", lambda *a, **k: calls.append(1))
    code, _, err = run_cli(capsys, "run", "good.toml", "--out", "afile")
    one_line_error(code, err, r"'--out'")
    assert calls == []  # refused before any point ran


@pytest.mark.parametrize(
    ("spec", "shown"),
    [
        ('{"model": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
        (json.dumps({"model": 5, "normalization": [1], "analyzers": 3}),
         "not a specification"),
        (json.dumps([1, 2]), "not a mapping"),
        (json.dumps({"model": {"K": 2, "T": "identity"}}), 'T="identity"'),
    ],
)
def test_show_survives_any_stored_specification(files, capsys, spec, shown):
    ds = framework.load(files / "plain.nc")
    ds.attrs["symphase_spec_json"] = spec
    ds.to_netcdf(files / "odd.nc")  # not through framework.save: a crafted file
    code, out, err = run_cli(capsys, "show", "odd.nc")
    assert code == 0, err
    assert "Traceback" not in err
    assert shown in out
    assert "eps_g" in out  # the rest of the summary is there


def test_memory_estimate_is_a_lower_bound_of_real_allocations():
    # the teacher overlap alone: 8 M^2 bytes; dynamics keeps Q and R at every point
    need, why = estimate_bytes({"model": {"K": 3, "M": 4}, "init_N": 10,
                                "analyzers": [{"name": "dynamics", "n_points": 7}]})
    assert need == 8.0 * (4 * 4 + (3 * 3 + 3 * 4) * 7 + (3 + 4) * 10)
    assert "dynamics.n_points = 7" in why
    from framework import Experiment, TeacherStudent

    exp = Experiment(TeacherStudent(K=3, M=4), init_N=10,
                     analyzers=[{"name": "dynamics", "n_points": 7, "alpha_max": 1.0}])
    ds = exp.run()["dynamics"]
    held = ds["Q"].nbytes + ds["R"].nbytes + np.asarray(exp.model.T).nbytes
    assert need <= held + 8 * (3 + 4) * 10 + 1e-9
    # options that are not sizes (iteration counts, seeds) are not counted
    small, why = estimate_bytes({"model": {"K": 2, "M": 2},
                                 "analyzers": [{"name": "x", "loops": 3 * 10**9}]})
    assert small < 1e6 and "loops" not in why
    # a simulation holds (K * replicas + M) * N weights at least
    sim, why = estimate_bytes({"model": {"K": 2, "M": 3}, "init_N": 5, "analyzers": [
        {"name": "simulation", "N": 100, "replicas": 4, "records": 11}]})
    assert sim == 8.0 * (9 + (4 + 6) * 11 + (2 * 4 + 3) * 100)
    assert "simulation.N = 100" in why and "simulation.replicas = 4" in why


def test_check_memory_refuses_and_load_experiment_refuses_crafted_file(tmp_path):
    free = available_memory()
    if free is None:
        pytest.skip("available memory unknown here")
    K = int(np.sqrt(free / 8)) * 2  # T alone (8 M^2 bytes) is 4x the free memory
    with pytest.raises(SpecificationError, match=rf"K = {K}, M = {K}"):
        check_memory({"model": {"K": K, "M": K}})
    check_memory({"model": {"K": 2, "M": 2}})  # fits
    ds = xr.Dataset({"eps_g": ("alpha", np.ones(2))}, coords={"alpha": [0.0, 1.0]})
    ds.attrs["symphase_spec_json"] = json.dumps(
        {"model": {"name": "teacher_student", "K": K, "M": K}, "analyzers": []})
    framework.save(ds, tmp_path / "crafted.nc")
    with pytest.raises(SpecificationError, match="the stored experiment needs at least"):
        framework.load_experiment(tmp_path / "crafted.nc")


def test_plugin_that_exits_at_import_is_reported(tmp_path):
    plug = tmp_path / "plug"
    dist = plug / "badplug-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: badplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[symphase]\nbadplug = badplug_mod\n")
    (plug / "badplug_mod.py").write_text("import sys\nsys.exit(3)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(plug)])}
    done = subprocess.run([sys.executable, "-m", "framework.cli", "plugins"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(r"symphase: warning: symphase plugin 'badplug' \(badplug 0.1\) was "
                     r"skipped: import failed: it called sys.exit\(3\)", done.stderr)
    assert "dynamics" in done.stdout  # the others are listed


def test_sigterm_handler_restored_and_warnings_restored(files, capsys):
    import signal
    import warnings

    before = signal.getsignal(signal.SIGTERM), warnings.showwarning
    run_cli(capsys, "show", "plain.nc")
    assert (signal.getsignal(signal.SIGTERM), warnings.showwarning) == before


def test_campaign_script_of_the_issue_runs_without_traceback(files):
    """The issue's cases through the real console entry (a subprocess, no pytest capture)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cases = [
        ["run", "good.toml", "--out", "afile"],
        ["run", "adir"],
        ["plot", "plain.nc", "-o", "adir"],
    ]
    for argv in cases:
        done = subprocess.run([sys.executable, "-m", "framework.cli", *argv], env=env,
                              capture_output=True, text=True, timeout=120, cwd=files)
        assert done.returncode == 2, (argv, done.stderr)
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr



def test_load_sweep_refuses_a_crafted_grid_before_allocating(tmp_path):
    free = available_memory()
    if free is None:
        pytest.skip("available memory unknown here")
    K = int(np.sqrt(free / 8)) * 2
    ds = xr.Dataset({"eps_g": ("alpha", np.ones(2))}, coords={"alpha": [0.0, 1.0]})
    ds.attrs["symphase_spec_json"] = json.dumps(
        {"model": {"name": "teacher_student", "K": 2, "M": 2}, "analyzers": []})
    ds.attrs["symphase_sweep_grid_json"] = json.dumps({"K": [2, K]})
    framework.save(ds, tmp_path / "crafted_sweep.nc")
    with pytest.raises(SpecificationError, match=rf"the stored sweep needs .*K = {K}"):
        framework.point_experiment(tmp_path / "crafted_sweep.nc", K=K)


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["run", "good.toml", "--workers", "abc"],
         r"^symphase run: error: argument --workers: invalid int value: 'abc' \(see symphase "
         r"run --help\)$"),
        (["frobnicate"], r"^symphase: error: argument COMMAND: invalid choice: 'frobnicate'"),
        ([], r"^symphase: error: the following arguments are required: COMMAND"),
    ],
)
def test_argument_errors_are_one_line(files, capsys, argv, pattern):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), lines


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_device_files_are_not_inputs_or_outputs(files, capsys):
    code, _, err = run_cli(capsys, "show", "/dev/null")
    one_line_error(code, err, r"/dev/null: is not a regular file")
    code, _, err = run_cli(capsys, "plot", "plain.nc", "-o", "/dev/null")
    one_line_error(code, err, r"'-o' '/dev/null': is not a regular file")
    code, _, err = run_cli(capsys, "run", "good.toml", "--out", "/dev/null")
    one_line_error(code, err, r"'--out' '/dev/null': is a file, not a folder")
