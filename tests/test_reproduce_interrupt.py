"""An interrupted reproduction saves what it finished (issue 12, item 7): Ctrl-C during
``symphase reproduce NAME`` writes NAME.nc with the finished entries, NaN for the rest
and attr ``status`` saying so, draws no figure, and exits 130 without a traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import framework


def _interrupted(name: str, out: Path, after_entry: bool, marker: str = " s, ") -> xr.Dataset:
    """Run ``symphase reproduce name``, send SIGINT mid-run (8 s in, or 1 s after the first
    finished entry whose line contains ``marker`` is printed), check the exit and return
    the stored dataset."""
    proc = subprocess.Popen([sys.executable, "-m", "framework.cli", "reproduce", name,
                             "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if after_entry:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if " s, " in line and marker in line and not line.rstrip().endswith(
                    ("not computed", "not defined")) and ": 0.0 s, not" not in line:
                break
        time.sleep(1.0)
    else:
        time.sleep(8.0)  # imports, compilation from cache, the first entries (~20 s in all)
    if proc.poll() is not None:
        pytest.fail(f"the reproduction ended before the interrupt: {proc.stderr.read()}")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    ds = framework.load(out / f"{name}.nc")
    assert ds.attrs["status"].startswith("interrupted")
    return ds


@pytest.mark.slow
def test_ctrl_c_saves_the_finished_part(tmp_path):
    ds = _interrupted("takagi2020", tmp_path / "out", after_entry=False)
    assert np.isfinite(ds.eps_plateau.values).any()
    assert not np.isfinite(ds.alpha_escape_init.values).all()
    assert not (tmp_path / "out" / "takagi2020_eps_g.png").exists()  # no partial figures


@pytest.mark.slow
@pytest.mark.parametrize("name, variable, marker", [
    ("normalizations", "alpha_escape", "fixed readout: "),  # the entries with an escape
    ("goldt2019", "eps_final", " s, ")])
def test_ctrl_c_saves_the_finished_part_of_the_pooled_reproductions(tmp_path, name, variable,
                                                                    marker):
    # the entries run on a pool of worker processes, which ignore SIGINT: only the
    # submitting process handles Ctrl-C, terminates them and saves what finished
    ds = _interrupted(name, tmp_path / "out", after_entry=True, marker=marker)
    values = np.isfinite(ds[variable].values)
    assert values.any() and not values.all()
    assert not (tmp_path / "out" / f"{name}.png").exists()
