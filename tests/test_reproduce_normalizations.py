"""``symphase reproduce normalizations``."""

from __future__ import annotations

import numpy as np

import framework
from framework.manager import get_registry


def test_registered() -> None:
    assert "normalizations" in get_registry().names("reproduction")


def test_quick_run_writes_labelled_dataset(tmp_path, capsys) -> None:
    from plugins.reproduce_normalizations import normalizations

    assert normalizations(tmp_path, quick=True) == 0
    ds = framework.load(tmp_path / "normalizations.nc")
    assert (tmp_path / "normalizations.png").exists()
    for v in ds.data_vars.values():
        assert "long_name" in v.attrs and "units" in v.attrs
    assert "weight_norm" in ds.coords and "gain" in ds.coords
    ok = ds.status.values == "ok"
    assert np.all(np.isfinite(ds.lambda_min.values[ok]))
    assert np.all(np.isfinite(ds.alpha_escape.values[ok]))
    # the trained gains: the exact engine with the gain as state, every entry computed
    for name in ("weightnorm", "batchnorm_affine"):
        s = ds.sel(normalization=name, K=2)
        assert list(s.status.values) == ["ok"], s.status.values
        assert list(s.engine.values) == ["closed_form"]
        assert np.all(s.gain.values > 0.5) and np.all(s.lambda_min.values < 0)
    assert set(ds.engine.values[ok]) <= {"closed_form", "generic"}
    # layernorm at K = 2 is reported as degenerate, not as a silent NaN
    assert str(ds.status.sel(normalization="layernorm", K=2).values[0]).startswith("degenerate")
    assert "| normalization |" in capsys.readouterr().out
