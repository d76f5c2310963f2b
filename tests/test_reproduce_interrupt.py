"""An interrupted reproduction saves what it finished (issue 12, item 7): Ctrl-C during
``symphase reproduce takagi2020`` writes takagi2020.nc with the finished entries, NaN for
the rest and attr ``status`` saying so, and exits 130."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import framework


@pytest.mark.slow
def test_ctrl_c_saves_the_finished_part(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "framework.cli", "reproduce", "takagi2020",
                             "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stored = out / "takagi2020.nc"
    time.sleep(8.0)  # imports, compilation from cache, the first entries (~20 s in all)
    if proc.poll() is not None:
        pytest.fail(f"the reproduction ended before the interrupt: {proc.stderr.read()}")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    ds = framework.load(stored)
    assert ds.attrs["status"].startswith("interrupted")
    finished = np.isfinite(ds.eps_plateau.values)
    assert finished.any() and not np.isfinite(ds.alpha_escape_init.values).all()
    assert not (out / "takagi2020_eps_g.png").exists()  # no figures of a partial result


@pytest.mark.slow
@pytest.mark.parametrize("name, variable", [("normalizations", "alpha_escape"),
                                            ("goldt2019", "eps_final")])
def test_ctrl_c_saves_the_finished_part_of_the_pooled_reproductions(tmp_path, name, variable):
    # the entries run on a pool of worker processes, which ignore SIGINT: only the
    # submitting process handles Ctrl-C, terminates them and saves what finished
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "framework.cli", "reproduce", name,
                             "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stored = out / f"{name}.nc"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # until the first entry is done
        line = proc.stdout.readline()
        if " s, " in line:
            break
    time.sleep(1.0)
    if proc.poll() is not None:
        pytest.fail(f"the reproduction ended before the interrupt: {proc.stderr.read()}")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    ds = framework.load(stored)
    assert ds.attrs["status"].startswith("interrupted")
    values = np.isfinite(ds[variable].values)
    assert values.any() and not values.all()
