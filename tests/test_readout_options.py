"""The two-layer options in sweeps, TOML files and stored results (issue 13, item 7):
``eta_v``, ``weight_decay``, ``output_scale``, ``teacher_readout`` are sweep keys and
TOML ``[model]`` fields; bad values are refused naming the field and the value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from framework import Experiment, TeacherStudent, load
from framework.cli import main


def _base(**model) -> Experiment:
    return Experiment(TeacherStudent(2, 2, **model), eta=0.5,
                      analyzers=[{"name": "dynamics", "alpha_max": 50.0, "n_points": 11}])


def test_sweep_over_eta_v_with_a_trained_readout():
    ds = _base(second_layer="trained", eta_v=0.5).sweep(
        eta_v=[0.1, 1.0], scheduler="synchronous")["dynamics"]
    assert list(ds.eta_v.values) == [0.1, 1.0]
    assert "param_v" in ds and ds.param_v.dims[:1] == ("eta_v",)
    assert "readout" in ds.param_v.attrs["long_name"]
    # a faster readout moves v further from its start (ones) at the same alpha
    moved = np.abs(ds.param_v.isel(alpha=-1) - 1.0).max("student")
    assert float(moved.sel(eta_v=1.0)) > float(moved.sel(eta_v=0.1))
    assert ds.attrs["readout_trained"] == 1


def test_sweep_over_weight_decay_output_scale_and_teacher_readout():
    ds = _base().sweep(weight_decay=[0.0, 0.1], output_scale=["sum", "mean"],
                       scheduler="synchronous")["dynamics"]
    assert ds.eps_g.dims[:2] == ("weight_decay", "output_scale")
    q = ds.Q.isel(alpha=-1).sel(student=0, student_=0)
    assert float(q.sel(weight_decay=0.1, output_scale="sum")) < \
        float(q.sel(weight_decay=0.0, output_scale="sum"))  # decay shrinks the weights
    ds2 = _base().sweep(teacher_readout=[[1.0, 1.0], [1.0, 0.5]],
                        scheduler="synchronous")["dynamics"]
    assert ds2.sizes["teacher_readout"] == 2
    e0 = ds2.eps_g.isel(teacher_readout=0, alpha=0)
    e1 = ds2.eps_g.isel(teacher_readout=1, alpha=0)
    assert float(e0) != float(e1)


def test_fixed_unit_readout_results_are_unchanged_by_the_options():
    a = _base().run()["dynamics"]
    b = _base(output_scale="sum", student_readout=[1.0, 1.0], teacher_readout=[1.0, 1.0],
              weight_decay=0.0).run()["dynamics"]
    xr.testing.assert_identical(a.eps_g, b.eps_g)
    assert a.attrs["symphase_spec_json"] == b.attrs["symphase_spec_json"]
    assert "readout_trained" not in a.attrs  # the committee machine states its convention
    assert "unit second-layer weights" in a.attrs["convention_output"] or \
        "second-layer weights fixed to 1" in a.attrs["convention_output"]


def test_trained_readout_round_trips_through_netcdf(tmp_path: Path):
    exp = _base(second_layer="trained", eta_v=0.3, output_scale="sqrt",
                teacher_readout=[1.0, 0.5], weight_decay=0.01, weight_decay_v=0.02)
    ds = exp.run()["dynamics"]
    path = tmp_path / "d.nc"
    ds.to_netcdf(path)
    back = load(path)
    assert back.attrs["eta_v"] == 0.3 and back.attrs["c_student"] == pytest.approx(2**-0.5)
    spec = Experiment.from_dict(__import__("json").loads(back.attrs["symphase_spec_json"]))
    assert spec.model == exp.model


def _toml(tmp_path: Path, model: str, sweep: str = "") -> Path:
    path = tmp_path / "exp.toml"
    path.write_text("eta = 0.5\n[model]\nK = 2\nM = 2\n" + model
                    + "[analyzers.dynamics]\nalpha_max = 20.0\nn_points = 5\n" + sweep)
    return path


def test_toml_trained_readout_with_a_sweep(tmp_path: Path, capsys):
    path = _toml(tmp_path, 'second_layer = "trained"\neta_v = 0.5\noutput_scale = "mean"\n'
                 'teacher_readout = [1.0, 0.5]\n', "[sweep]\nweight_decay = [0.0, 0.05]\n")
    out = tmp_path / "o"
    code = main(["run", str(path), "--out", str(out), "--scheduler", "synchronous"])
    capsys.readouterr()
    assert code == 0
    ds = load(out / "dynamics.nc")
    assert ds.sizes["weight_decay"] == 2 and "param_v" in ds
    assert ds.attrs["c_student"] == 0.5


@pytest.mark.parametrize("model, message", [
    ('second_layer = "trained"\neta_v = -0.1\n', "'eta_v' must be >= 0.0, got -0.1"),
    ('second_layer = "trained"\neta_v = "0.5"\n', "'eta_v' must be a real number, got '0.5'"),
    ('second_layer = "trained"\n', "'eta_v' must be a positive number"),
    ('teacher_readout = [1.0, 1.0, 1.0]\n', "'teacher_readout' must have shape (2,), got (3,)"),
    ('student_readout = ["a", "b"]\n', "'student_readout' must be an array of real numbers"),
    ('output_scale = "average"\n', "'output_scale' must be one of 'sum', 'mean', 'sqrt'"),
    ('weight_decay = -1.0\n', "'weight_decay' must be >= 0.0, got -1.0"),
    ('weight_decay_v = 0.1\n', "'weight_decay_v' applies only with second_layer='trained'"),
])
def test_toml_bad_layer_options_are_one_line(tmp_path: Path, capsys, model, message):
    path = _toml(tmp_path, model)
    code = main(["run", str(path), "--out", str(tmp_path / "o"), "--scheduler", "synchronous"])
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


def test_sweep_bad_layer_values_name_key_and_position():
    with pytest.raises(Exception, match=r"eta_v.*-1"):
        _base(second_layer="trained", eta_v=0.5).sweep(eta_v=[0.5, -1.0],
                                                       scheduler="synchronous")
    with pytest.raises(Exception, match="teacher_readout"):
        _base().sweep(teacher_readout=[[1.0, 1.0], [1.0]], scheduler="synchronous")
