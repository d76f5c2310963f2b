"""``symphase reproduce takagi2020 --quick``: files, labels and the numbers' consistency."""

from __future__ import annotations

import math

import numpy as np
import pytest

import framework
from framework.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("takagi2020")
    code = main(["reproduce", "takagi2020", "--quick", "--out", str(out)])
    return code, out


def test_registered_and_writes_dataset_and_figures(quick_run, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out = quick_run
    assert code == 0
    assert "takagi2020" in framework.get_registry().names("reproduction")
    assert (out / "takagi2020.nc").is_file()
    for name in ("takagi2020_eps_g.png", "takagi2020_lambda_min.png",
                 "takagi2020_weight_norm.png"):
        assert (out / name).stat().st_size > 1000, name


def test_dataset_is_labelled(quick_run) -> None:  # type: ignore[no-untyped-def]
    ds = framework.load(quick_run[1] / "takagi2020.nc")
    assert set(ds.dims) == {"normalization", "K", "eta", "init_scale", "weight_norm", "alpha"}
    assert list(ds.normalization.values) == ["plain", "batchnorm"]
    for name, var in ds.variables.items():
        assert var.attrs.get("long_name") and var.attrs.get("units"), name
    for value in ds.attrs.values():
        assert isinstance(value, str | int | float | np.integer | np.floating)
    assert "symphase reproduce takagi2020" in ds.attrs["command"]
    assert "W = J / sqrt(N)" in ds.attrs["hessian_coordinates"]


def test_numbers_are_consistent(quick_run) -> None:  # type: ignore[no-untyped-def]
    ds = framework.load(quick_run[1] / "takagi2020.nc").sel(K=2)
    plain, bn = ds.sel(normalization="plain"), ds.sel(normalization="batchnorm")
    # Saad & Solla's plateau
    assert float(plain.eps_plateau) == pytest.approx(
        (2 / math.pi) * (math.pi / 6 - 2 * math.asin(0.25)), abs=1e-10)
    assert float(plain.weight_norm_plateau) == pytest.approx(1 / 3, abs=1e-10)
    # rates are -lambda_min; batchnorm's curvature is lambda(1) / weight_norm
    np.testing.assert_allclose(ds.unstable_rate, -ds.lambda_min, rtol=1e-7)
    np.testing.assert_allclose(ds.lambda_min_batchnorm * ds.weight_norm, bn.lambda_min,
                               rtol=1e-8)
    assert float(ds.lambda_min_batchnorm_at_plain_norm) == pytest.approx(
        float(bn.lambda_min) * 3.0, rel=1e-8)
    assert float(ds.weight_norm_crossover) == pytest.approx(
        float(bn.lambda_min / plain.lambda_min), rel=1e-12)
    # from the same random init (weight norm ~1, above the crossover) batchnorm escapes later
    a = ds.alpha_escape_init.sel(init_scale=1.0)
    assert np.all(np.isfinite(a))
    assert np.all(a.sel(normalization="batchnorm") > a.sel(normalization="plain"))
    assert np.all(ds.weight_norm_at_escape.sel(normalization="batchnorm", init_scale=1.0)
                  > ds.weight_norm_init.sel(init_scale=1.0))
