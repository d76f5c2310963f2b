"""``import framework`` stays cheap: heavy dependencies load on first use (issue 16).

No timings are asserted; the import time is measured by ``bench/startup.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("scipy", "dask", "numba", "matplotlib", "xarray", "pandas")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=ROOT)
    return out.stdout


def test_import_framework_loads_no_heavy_dependency():
    code = ("import framework, json, sys; print(json.dumps(sorted(m for m in sys.modules "
            f"if m.split('.')[0] in {set(HEAVY)!r})))")
    assert json.loads(_run(code)) == []


@pytest.mark.parametrize("name", ["theory", "datasets", "io", "sweep"])
def test_heavy_submodules_are_not_imported_eagerly(name):
    code = (f"import framework, sys; print('framework.{name}' in sys.modules)")
    assert _run(code).strip() == "False"


def test_public_names_resolve_lazily():
    code = """
import json, sys
import framework
names = {}
for n in framework.__all__:
    names[n] = getattr(framework, n) is not None
from framework import theory, datasets, Sweep, load, save, load_experiment, spec_hash
from framework.sweep import Sweep as S2
from framework.io import load as l2
import framework.theory as th
checks = [
    theory is th, theory is framework.theory, Sweep is S2, load is l2,
    callable(framework.load_sweep), callable(framework.point_experiment),
    hasattr(framework.datasets, "trajectory_dataset"), hasattr(theory, "Quadrature"),
    set(framework.__all__) <= set(dir(framework)),
]
print(json.dumps({"names": names, "checks": checks}))
"""
    out = json.loads(_run(code))
    assert all(out["names"].values()), [n for n, ok in out["names"].items() if not ok]
    assert all(out["checks"]), out["checks"]


def test_unknown_attribute_raises_attribute_error():
    import framework

    with pytest.raises(AttributeError, match="no_such_name"):
        framework.no_such_name  # noqa: B018
    assert not hasattr(framework, "no_such_name")


def test_theory_does_not_import_scipy_stats():
    code = ("import framework.theory, sys; "
            "print(sorted(m for m in sys.modules if m.startswith('scipy.stats')))")
    assert _run(code).strip() == "[]"


def test_compile_notice_only_for_own_disk_cached_dispatchers(capsys):
    pytest.importorskip("numba")
    import numba

    from framework import _numba_notice
    from framework.theory import _kernels

    assert _numba_notice._is_own_cached(_kernels._asin_nb)  # cache=True, in framework
    uncached = numba.njit(lambda x: x)  # defined here: not symphase's, not disk-cached
    assert not _numba_notice._is_own_cached(uncached)
    assert not _numba_notice._is_own_cached(None)
    _numba_notice.install()  # idempotent
    assert capsys.readouterr().err == ""


def test_compile_notice_on_cold_cache(tmp_path):
    """A cold disk cache (an empty ``NUMBA_CACHE_DIR``) prints the notice once, before
    the first compile; a warm one prints nothing."""
    pytest.importorskip("numba")
    code = ("import numpy as np; from framework.theory import _kernels; "
            "_kernels._asin_nb(0.5); _kernels._asin_nb(np.float32(0.5))")
    env = {**__import__("os").environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def stderr() -> str:
        return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                              text=True, cwd=ROOT, env=env).stderr

    from framework._numba_notice import MESSAGE

    assert stderr().count(MESSAGE) == 1
    assert MESSAGE not in stderr()


def test_stale_integrator_cache_is_dropped_when_the_kernels_change(tmp_path):
    # the compiled integrator inlines _kernels' functions; numba keys its cache on
    # _dop853.py only, so a changed _kernels.py must remove _dop853's cache files
    from framework.theory import _dop853

    cache = tmp_path / "__pycache__"
    cache.mkdir()
    kernels = tmp_path / "_kernels.py"
    kernels.write_text("x = 1\n")
    stale = [cache / "_dop853._dop853_nb-1.py311.nbi", cache / "_dop853._dop853_nb-1.py311.1.nbc"]
    other = cache / "_kernels._rhs_nb-1.py311.nbi"
    for f in (*stale, other):
        f.write_text("")
    _dop853._drop_stale_cache(cache, kernels)  # no marker yet: dropped, marker written
    assert not any(f.exists() for f in stale) and other.exists()
    for f in stale:
        f.write_text("")
    _dop853._drop_stale_cache(cache, kernels)  # same kernels: kept
    assert all(f.exists() for f in stale)
    kernels.write_text("x = 2\n")
    _dop853._drop_stale_cache(cache, kernels)  # changed kernels: dropped
    assert not any(f.exists() for f in stale)
