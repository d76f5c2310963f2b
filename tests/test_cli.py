"""The run / show / plot subcommands: TOML input, summaries, figures, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import attrs
import numpy as np
import pytest
import xarray as xr

import framework
from framework import Analyzer, Experiment, TeacherStudent, hookimpl
from framework._toml import read_toml
from framework.cli import main

ROOT = Path(__file__).resolve().parents[1]


@attrs.frozen
class Curve(Analyzer):
    """Test-only analyzer: eps_g and Q over alpha; raises for eta > fail_above."""

    name: ClassVar[str] = "curve"
    description: ClassVar[str] = "test-only analyzer for the CLI"
    n_alpha: int = 5
    fail_above: float = 1e9

    def run(self, experiment: Experiment) -> xr.Dataset:
        if experiment.eta > self.fail_above:
            raise ArithmeticError("overflow")
        alpha = np.linspace(0.0, 10.0, self.n_alpha)
        K = experiment.model.K
        return xr.Dataset(
            {
                "eps_g": ("alpha", np.exp(-experiment.eta * alpha),
                          {"long_name": "generalization error", "units": "1"}),
                "Q": (("alpha", "student", "student_"),
                      np.ones((self.n_alpha, K, K)) * alpha[:, None, None],
                      {"long_name": "student-student overlap", "units": "1"}),
                "escape_time": ((), 1.0 / max(experiment.eta, 1e-9),
                                {"long_name": "escape time", "units": "1"}),
            },
            coords={"alpha": alpha},
        )


class CurvePlugin:
    @staticmethod
    @hookimpl
    def symphase_register_analyzers(registry):  # type: ignore[no-untyped-def]
        registry.add_analyzer(Curve)


@pytest.fixture(autouse=True)
def curve_plugin():
    framework.register_plugin(CurvePlugin)
    yield
    framework.unregister_plugin(CurvePlugin)


TOML = textwrap.dedent(
    """
    eta = 0.5
    init_N = 50

    [model]
    K = 2
    M = 2

    [analyzers.curve]
    n_alpha = 6

    [sweep]
    eta = [0.1, 0.5, 1.0]
    normalization = ["plain", "batchnorm"]
    """
)


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_show_plot(tmp_path, capsys):
    toml = write(tmp_path, TOML)
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "run", str(toml), "--out", str(out_dir),
                             "--scheduler", "synchronous")
    assert code == 0, err
    assert "curve: 6 point(s)" in out
    ds = framework.load(out_dir / "curve.nc")
    assert ds["eps_g"].dims == ("eta", "normalization", "alpha")
    assert framework.load_sweep(ds) == read_toml(toml)[0]
    from framework.sweep.storage import POINTS_SUFFIX, read_points

    stored = [k for f in (out_dir / "points").glob(f"*{POINTS_SUFFIX}") for k in read_points(f)]
    assert len(stored) == 6  # in batch files (one per batch of points)

    code, out, err = run_cli(capsys, "show", str(out_dir / "curve.nc"))
    assert code == 0, err
    assert "analyzer curve" in out
    assert "model: K=2 M=2 activation=erf" in out
    assert "eta (3): 0.1, 0.5, 1" in out
    assert "normalization (2): plain, batchnorm" in out
    assert "eps_g" in out and "generalization error [1]" in out
    assert "points: 6, failed: 0" in out

    png = tmp_path / "fig.png"
    code, out, err = run_cli(capsys, "plot", str(out_dir / "curve.nc"), "-o", str(png))
    assert code == 0, err
    assert png.stat().st_size > 1000


def test_plot_hook_is_asked_first(tmp_path, capsys):
    calls = []

    class Plotter:
        @staticmethod
        @hookimpl
        def symphase_plot(dataset, figure):  # type: ignore[no-untyped-def]
            calls.append(sorted(dataset.data_vars))
            figure.add_subplot(1, 1, 1).plot([0, 1], [0, 1])
            return True

    ds = Experiment(TeacherStudent(1, 1), analyzers=["curve"], init_N=5).run()["curve"]
    path = framework.save(ds, tmp_path / "one.nc")
    framework.register_plugin(Plotter)
    try:
        code, _, err = run_cli(capsys, "plot", str(path))
    finally:
        framework.unregister_plugin(Plotter)
    assert code == 0, err
    assert calls and "eps_g" in calls[0]
    assert (tmp_path / "one.png").exists()


def test_plot_spectrum_and_sweep_curves(tmp_path, capsys):
    from matplotlib.figure import Figure

    from framework.plotting import plot_dataset

    spectrum = xr.Dataset({
        "eigenvalue": ("eigen", [-0.1, 0.0, 0.3], {"long_name": "eigenvalue", "units": "1"}),
        "multiplicity": ("eigen", [1, 997, 2], {"long_name": "multiplicity", "units": "1"}),
    })
    fig = Figure()
    assert plot_dataset(spectrum, fig) and len(fig.axes) == 1
    ds = Experiment(TeacherStudent(1, 1), analyzers=["curve"], init_N=5).sweep(
        eta=[0.1, 0.2, 0.4], scheduler="synchronous")["curve"]
    fig = Figure()
    assert plot_dataset(ds, fig)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["eps_g", "Q", "escape_time"]
    assert not plot_dataset(xr.Dataset({"x": ("k", ["a", "b"])}), Figure())


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[model\nK = 2", r"exp.toml: invalid TOML"),
        ("[model]\nK = 2\nM = 2\n[analyzers.nope]\n", r"unknown analyzer 'nope'; installed "
                                                      r"analyzers: .*'curve'"),
        ("[model]\nK = 0\nM = 2\n", r"exp.toml: 'K' must be >= 1, got 0"),
        ("eta = -1\n[model]\nK = 1\nM = 1\n", r"exp.toml: 'eta' must be >= 0.0, got -1.0"),
        ("normalization = 'bn'\n[model]\nK = 1\nM = 1\n", r"unknown normalization 'bn'"),
        ("[model]\nK = 1\nM = 1\n[analyzers.curve]\n[sweep]\neta = [0.1, -2.0]\n",
         r"exp.toml: \[sweep\] sweep 'eta'\[1\] = -2.0: 'eta' must be >= 0"),
        ("[model]\nK = 1\nM = 1\n[analyzers.curve]\nbogus = 1\n",
         r"unknown option\(s\) 'bogus' for analyzer 'curve'"),
        ("colour = 1\n[model]\nK = 1\nM = 1\n", r"exp.toml: unknown key\(s\) 'colour'"),
        ("[run]\nworkers = 0\n[model]\nK = 1\nM = 1\n", r"\[run\] 'workers' must be"),
        ("[sweep]\neta = 0.1\n[model]\nK = 1\nM = 1\n",
         r"sweep 'eta' must be a list of values, got 0.1"),
        ("eta = 1\n", r"the \[model\] table is required"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, text, match):
    toml = write(tmp_path, text)
    code, _, err = run_cli(capsys, "run", str(toml), "--out", str(tmp_path / "o"),
                           "--scheduler", "synchronous")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("symphase: error: ")
    import re

    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("cmd", ["show", "plot"])
def test_show_plot_bad_file(tmp_path, capsys, cmd):
    code, _, err = run_cli(capsys, cmd, str(tmp_path / "missing.nc"))
    assert code == 2 and "missing.nc: no such file" in err
    bad = tmp_path / "bad.nc"
    bad.write_text("not netcdf")
    code, _, err = run_cli(capsys, cmd, str(bad))
    assert code == 2 and "not a readable netCDF file" in err and len(err.splitlines()) == 1


def test_failed_point_exits_1_and_is_reported(tmp_path, capsys):
    toml = write(tmp_path, TOML.replace("n_alpha = 6", "n_alpha = 6\nfail_above = 0.7"))
    code, out, _ = run_cli(capsys, "run", str(toml), "--out", str(tmp_path / "o"),
                           "--scheduler", "synchronous")
    assert code == 1
    assert "2 failed" in out
    code, out, _ = run_cli(capsys, "show", str(tmp_path / "o" / "curve.nc"))
    assert "failed: 2" in out


def test_run_out_from_toml_is_relative_to_the_file(tmp_path, capsys, monkeypatch):
    sub = tmp_path / "sub"
    sub.mkdir()
    toml = write(sub, TOML + '\n[run]\nout = "res"\nscheduler = "synchronous"\n')
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "run", str(toml))
    assert code == 0, err
    assert (sub / "res" / "curve.nc").exists()


def test_example_toml_is_valid():
    sweep, options = read_toml(ROOT / "examples" / "sweep.toml")
    assert sweep.size >= 2
    assert options["out"].name == "sweep"


def test_example_toml_runs_with_the_real_cli(tmp_path):
    """`symphase run examples/sweep.toml` end to end, in a subprocess (needs dynamics)."""
    example = (ROOT / "examples" / "sweep.toml").read_text()
    example = example.replace("alpha_max = 200.0", "alpha_max = 20.0").replace(
        "n_points = 101", "n_points = 11")
    toml = write(tmp_path, example, "sweep.toml")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}  # this source tree
    run = subprocess.run(
        [sys.executable, "-m", "framework.cli", "run", str(toml), "--scheduler",
         "synchronous", "--out", str(tmp_path / "res")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert run.returncode == 0, run.stderr
    show = subprocess.run(
        [sys.executable, "-m", "framework.cli", "show", str(tmp_path / "res" / "dynamics.nc")],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert show.returncode == 0 and "analyzer dynamics" in show.stdout
