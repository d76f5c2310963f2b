"""Storage: atomic netCDF writes, lossless round trips, experiments rebuilt from attrs."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import framework
from framework import Experiment, OrderParameters, TeacherStudent
from framework.results import finalize

# -- strategies -------------------------------------------------------------------------
names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
attr_values = st.one_of(text, st.integers(-(2**62), 2**62), finite)


@st.composite
def datasets(draw):
    ndims = draw(st.integers(0, 3))
    dims = draw(st.lists(names, min_size=ndims, max_size=ndims, unique=True))
    sizes = {d: draw(st.integers(1, 4)) for d in dims}
    coords = {}
    for d in dims:
        kind = draw(st.sampled_from(["none", "float", "str"]))
        if kind == "float":
            coords[d] = (d, np.arange(sizes[d], dtype=float) * draw(
                st.floats(0.1, 10)), {"long_name": d, "units": "1"})
        elif kind == "str":
            coords[d] = (d, np.array([f"{d}{i}" for i in range(sizes[d])], dtype=object))
    data_vars = {}
    var_names = draw(st.lists(names.filter(lambda n: n not in dims), min_size=1, max_size=4,
                              unique=True))
    for name in var_names:
        vdims = tuple(d for d in dims if draw(st.booleans()))
        shape = tuple(sizes[d] for d in vdims)
        kind = draw(st.sampled_from(["float", "int", "bool", "str"]))
        n = int(np.prod(shape, dtype=int))
        if kind == "float":
            values = np.array(draw(st.lists(
                st.floats(allow_infinity=False, width=64), min_size=n, max_size=n)),
                dtype=float).reshape(shape)
        elif kind == "int":
            values = np.array(draw(st.lists(st.integers(-(2**40), 2**40), min_size=n,
                                            max_size=n)), dtype=np.int64).reshape(shape)
        elif kind == "bool":
            values = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)),
                              dtype=bool).reshape(shape)
        else:
            values = np.array(draw(st.lists(st.text(
                st.characters(blacklist_categories=("Cs", "Cc")), max_size=6),
                min_size=n, max_size=n)), dtype=object).reshape(shape)
        attrs = draw(st.dictionaries(names, attr_values, max_size=3))
        attrs.update(long_name=draw(text), units="1")
        data_vars[name] = (vdims, values, attrs)
    attrs = draw(st.dictionaries(names, attr_values, max_size=4))
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


@st.composite
def experiments(draw):
    K = draw(st.integers(1, 3))
    M = draw(st.integers(1, 3))
    model = TeacherStudent(K, M, noise=draw(st.floats(0, 1)))
    init = "random"
    if draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 100)))
        J, B = rng.standard_normal((K, 20)), rng.standard_normal((M, 20))
        B = np.linalg.qr(B.T)[0].T * np.sqrt(20)  # T = B B^T / N = identity
        init = OrderParameters(J @ J.T / 20, J @ B.T / 20, np.eye(M))
        init = OrderParameters(init.Q, init.R, np.eye(M))
    return Experiment(
        model,
        normalization=draw(st.sampled_from(framework.list_normalizations())),
        eta=draw(st.floats(0, 5)),
        batch_size=draw(st.integers(1, 64)),
        init=init,
        init_scale=draw(st.floats(0.01, 3)),
        init_N=draw(st.integers(K + M, 5000)),
        seed=draw(st.integers(0, 2**31)),
    )


class _Null(framework.Analyzer):
    name = "null"
    description = "nothing"


# -- properties -------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ds=datasets(), experiment=experiments())
def test_save_load_round_trip_is_identical(ds, experiment):
    ds = finalize(ds, experiment, _Null())
    with tempfile.TemporaryDirectory() as folder:
        path = framework.save(ds, Path(folder) / "r.nc")
        back = framework.load(path)
        xr.testing.assert_identical(back, ds)
        for name in ds.variables:
            assert back[name].dtype.kind == ds[name].dtype.kind or (
                ds[name].dtype == object and back[name].dtype.kind in "OU")
        assert framework.load_experiment(path) == experiment
        with xr.open_dataset(path) as plain:  # plain xarray opens every file
            plain.load()
        # save(load(x)) is a fixed point
        again = framework.save(back, Path(folder) / "r2.nc")
        xr.testing.assert_identical(framework.load(again), ds)


# -- details ----------------------------------------------------------------------------
def test_attrs_are_flattened_to_strings_and_numbers(tmp_path):
    ds = xr.Dataset({"x": ("i", [1.0, 2.0], {"opts": {"a": 1, "b": [1, 2]}, "flag": True})},
                    attrs={"nested": {"k": {"m": 0.5}}, "none": None, "arr": np.arange(3)})
    back = framework.load(framework.save(ds, tmp_path / "a.nc"))
    assert back.attrs == {"nested.k.m": 0.5, "none": "None", "arr": "[0, 1, 2]"}
    assert back["x"].attrs == {"opts.a": 1, "opts.b": "[1, 2]", "flag": 1}


def test_save_is_atomic_on_failure(tmp_path):
    path = tmp_path / "r.nc"
    good = xr.Dataset({"x": ("i", [1.0])})
    framework.save(good, path)
    with mock.patch.object(xr.Dataset, "to_netcdf", side_effect=KeyboardInterrupt), \
            pytest.raises(KeyboardInterrupt):
        framework.save(xr.Dataset({"x": ("i", [2.0])}), path)
    xr.testing.assert_identical(framework.load(path), good)  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.nc"]  # no temp file left


def test_save_gives_normal_permissions_and_overwrites_its_source(tmp_path):
    path = tmp_path / "r.nc"
    framework.save(xr.Dataset({"x": ("i", [1.0, 2.0])}), path)
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
    with xr.open_dataset(path) as lazy:  # lazily backed by the file it replaces
        framework.save(lazy.assign(y=lazy["x"] * 2), path)
    assert framework.load(path)["y"].values.tolist() == [2.0, 4.0]


def test_load_experiment_errors(tmp_path):
    path = framework.save(xr.Dataset({"x": ((), 1.0)}), tmp_path / "r.nc")
    with pytest.raises(ValueError, match="no 'symphase_spec_json' attr"):
        framework.load_experiment(path)
    bad = xr.Dataset(attrs={"symphase_spec_json": "{not json"})
    with pytest.raises(ValueError, match="not valid JSON"):
        framework.load_experiment(bad)


def test_run_and_sweep_results_carry_full_provenance(tmp_path):
    exp = Experiment(TeacherStudent(2, 2), analyzers=[
        {"name": "dynamics", "alpha_max": 2.0, "n_points": 4, "rtol": 1e-6, "atol": 1e-8}])
    single = exp.run()["dynamics"]
    swept = exp.sweep(eta=[0.1, 0.2], scheduler="synchronous", results_dir=tmp_path)["dynamics"]
    for ds in (single, swept):
        assert framework.load_experiment(ds) == exp
        assert json.loads(ds.attrs["symphase_plugins"])
        assert ds.attrs["symphase_version"] == framework.__version__
        assert ds.attrs["spec.model.K"] == 2
    stored = framework.load(tmp_path / "dynamics.nc")
    xr.testing.assert_identical(stored, swept)
    assert json.loads(stored.attrs["symphase_sweep_grid_json"]) == {"eta": [0.1, 0.2]}
    assert framework.point_experiment(stored, eta=0.2) == exp.evolve(eta=0.2)
    for f in tmp_path.rglob("*.nc"):
        with xr.open_dataset(f) as plain:
            plain.load()


def test_experiment_from_dataset_round_trip(tmp_path):
    exp = Experiment(TeacherStudent(2, 3), normalization="batchnorm", eta=0.3, seed=7,
                     init_N=40, analyzers=[{"name": "dynamics", "alpha_max": 2.0,
                                            "n_points": 4}])
    ds = finalize(xr.Dataset({"x": ("i", [1.0, 2.0])}), exp, exp.analyzers[0])
    assert Experiment.from_dataset(ds) == exp
    stored = framework.load(framework.save(ds, tmp_path / "r.nc"))
    assert Experiment.from_dataset(stored) == exp
    assert framework.load_experiment(tmp_path / "r.nc") == exp  # load_experiment uses it
    assert Experiment.from_dataset(stored).to_json() == exp.to_json()


def test_experiment_from_dataset_errors():
    with pytest.raises(ValueError, match="no 'symphase_spec_json' attr"):
        Experiment.from_dataset(xr.Dataset())
    with pytest.raises(ValueError, match="'symphase_spec_json' must be a JSON string, got 3"):
        Experiment.from_dataset(xr.Dataset(attrs={"symphase_spec_json": 3}))
    with pytest.raises(ValueError, match="'symphase_spec_json' must hold a JSON object"):
        Experiment.from_dataset(xr.Dataset(attrs={"symphase_spec_json": "[1]"}))
    with pytest.raises(TypeError, match=r"'dataset' must be an xarray\.Dataset, got str"):
        Experiment.from_dataset("r.nc")
