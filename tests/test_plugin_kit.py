"""The plugin-author kit: the example plugin package under examples/ installs offline,
is discovered through its entry point, passes the published contract with its own
tests, and runs through the theory (generic engine) and the analyzers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

import framework
from framework import Experiment, TeacherStudent, theory

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "symphase-example-plugin"


def install_into(target: Path, project: Path) -> None:
    """Install a pure-Python ``src/``-layout project into ``target`` the way a wheel
    would: its packages plus a ``*.dist-info`` with ``METADATA`` and
    ``entry_points.txt``, read from its ``pyproject.toml``. Needs no network, no build
    backend and no ``wheel`` package (``pip install --no-build-isolation`` would need
    ``wheel`` with this setuptools), and leaves the environment untouched."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    for pkg in (project / "src").iterdir():
        if (pkg / "__init__.py").exists():
            shutil.copytree(pkg, target / pkg.name)
    dist = target / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
    )
    groups = meta.get("entry-points", {})
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
        for group, eps in groups.items()
    ))
    (dist / "INSTALLER").write_text("symphase-tests\n")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The example installed into a temporary directory put on ``sys.path``."""
    target = tmp_path_factory.mktemp("site")
    install_into(target, EXAMPLE)
    sys.path.insert(0, str(target))
    framework.refresh_plugins()
    yield target
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m.startswith("symphase_rmsnorm")]:
        del sys.modules[name]
    framework.refresh_plugins()


def test_example_declares_its_entry_point() -> None:
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["symphase"] == {"rmsnorm": "symphase_rmsnorm.plugin"}
    assert "build-backend" in meta["build-system"]


def _env(target: Path) -> dict[str, str]:
    path = os.pathsep.join([str(target), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def test_discovered_through_the_entry_point(installed) -> None:  # type: ignore[no-untyped-def]
    assert "rmsnorm" in framework.list_normalizations()
    sources = framework.manager.plugin_versions()
    assert sources["rmsnorm"] == "symphase-example-plugin 0.1.0"
    norm = framework.get_normalization("rmsnorm", g=0.8)
    assert not norm.is_diagonal_scale() and norm.trainable == ("g",)


def test_listed_by_the_cli(installed) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run([sys.executable, "-m", "framework.cli", "plugins"],
                          capture_output=True, text=True, env=_env(installed), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "rmsnorm" in proc.stdout
    assert "symphase-example-plugin 0.1.0" in proc.stdout


def test_its_own_tests_pass(installed) -> None:  # type: ignore[no-untyped-def]
    """The example's tests subclass framework.testing.NormalizationContract."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(EXAMPLE / "tests")],
        capture_output=True, text=True, env=_env(installed), timeout=600, cwd=EXAMPLE,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_runs_through_the_generic_engine(installed) -> None:  # type: ignore[no-untyped-def]
    model = TeacherStudent(3, 2)
    e = Experiment(model, normalization={"name": "rmsnorm", "g": 0.8}, eta=0.5)
    assert not theory.has_closed_form(model, e.normalization)
    traj = theory.integrate(model, e.normalization, e.initial_order_parameters(), eta=0.5,
                            alpha=[0.0, 0.5, 1.0])
    assert traj.engine == "generic" and not traj.diverged
    assert traj.params["g"].shape == (3, 3)
    assert traj.eps_g[-1] < traj.eps_g[0]


def test_runs_through_the_dynamics_analyzer(installed) -> None:  # type: ignore[no-untyped-def]
    e = Experiment(TeacherStudent(3, 2), normalization={"name": "rmsnorm"}, eta=0.5,
                   analyzers=[{"name": "dynamics", "alpha": [0.0, 0.5]}])
    ds = e.run()["dynamics"]
    assert np.all(np.isfinite(ds.eps_g.values))


@pytest.mark.slow
def test_runs_through_the_hessian_analyzer(installed) -> None:  # type: ignore[no-untyped-def]
    """A plugin written only against the public API gets ``hessian`` (generic engine,
    trainable gain included in the span block, with error estimates)."""
    exp = Experiment(TeacherStudent(2, 2), normalization={"name": "rmsnorm"}, eta=0.5,
                     analyzers=["hessian"])
    assert not theory.has_closed_form(exp.model, exp.normalization)
    ds = exp.run()["hessian"]
    assert ds.attrs["engine"] == "generic"
    assert "param_g" in ds
    lam, err = ds.lambda_min.values, ds.lambda_min_error.values
    assert np.all(np.isfinite(lam)) and np.all(err >= 0)
    assert np.all(err < 0.05 * np.maximum(np.abs(lam), 1e-2))  # an accurate spectrum
    assert np.any(lam + 5 * err < 0)  # a saddle: the symmetric phase has an escape direction
