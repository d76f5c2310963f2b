"""Sweeping the input distribution (``inputs`` / ``model.inputs``): equality with direct
runs, labels and exact values in the result, hash stability, errors, TOML and resumption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import framework
from framework import Experiment, InputDistribution, SpecificationError, TeacherStudent
from framework._toml import read_toml
from framework.cli import main
from framework.sweep import Sweep, spec_hash
from framework.sweep.grid import inputs_label
from plugins.dynamics import Dynamics

DYNAMICS = {"name": "dynamics", "alpha_max": 5.0, "n_points": 6, "rtol": 1e-6, "atol": 1e-8}
TWO = InputDistribution.two_level(10.0)
TWO_LABEL = "eigenvalues [0.181818, 1.81818], fractions [0.5, 0.5]"


def base(inputs: object = None) -> Experiment:
    return Experiment(TeacherStudent(2, 2, inputs=inputs), analyzers=[DYNAMICS])


def _refuse_computing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any further dynamics computation fail (a reused point is not computed)."""
    def refuse(self, experiment):  # type: ignore[no-untyped-def]
        raise AssertionError("recomputed a stored point")

    monkeypatch.setattr(Dynamics, "run", refuse)


# -- results ------------------------------------------------------------------------------
def test_each_point_equals_the_direct_run_of_its_experiment():
    grid = {"inputs": [InputDistribution(), TWO]}
    ds = base().sweep(grid, scheduler="synchronous")["dynamics"]
    assert ds["inputs"].values.tolist() == ["isotropic", TWO_LABEL]
    assert ds["eps_g"].dims == ("inputs", "alpha")
    assert not ds["sweep_failed"].any()
    sweep = Sweep(base(), grid)
    for label, inputs in zip(["isotropic", TWO_LABEL], [None, TWO], strict=True):
        direct_exp = base(inputs)
        assert sweep.point(inputs=label) == direct_exp
        direct = direct_exp.run()["dynamics"]
        at = ds.sel(inputs=label)
        for name, var in direct.data_vars.items():
            np.testing.assert_array_equal(at[name].sel({d: var[d] for d in var.dims}).values,
                                          var.values, err_msg=f"{label}: {name}")
        for name in set(ds.data_vars) - set(direct.data_vars):
            if not name.startswith("sweep_"):  # variables the point does not have: missing
                assert np.isnan(at[name].values).all(), name
        assert at["sweep_sha256"].item() == spec_hash(direct_exp)
    # the structured point's variables per eigenspace are those of the direct run
    assert "Q_space" in ds and "Q_space" not in base().run()["dynamics"]


def test_exact_values_are_coordinates_and_points_can_be_selected_by_value():
    three = InputDistribution([0.5, 1.0, 2.0], [0.25, 0.25, 0.5])
    sweep = Sweep(base(), {"inputs": [{"eigenvalues": [1.0]}, TWO, three.to_dict()]})
    coords = sweep.value_coords()
    assert coords["inputs_eigenspace"][1].tolist() == [0, 1, 2]
    values = coords["inputs_eigenvalues"][1]
    assert coords["inputs_eigenvalues"][0] == ("inputs", "inputs_eigenspace")
    np.testing.assert_array_equal(values[0], [1.0, np.nan, np.nan])
    np.testing.assert_array_equal(values[1, :2], TWO.eigenvalues)  # exact, not the label
    assert np.isnan(values[1, 2])
    np.testing.assert_array_equal(coords["inputs_fractions"][1][2], [0.25, 0.25, 0.5])
    assert sweep.coords()["inputs"].tolist() == [
        "isotropic", TWO_LABEL, "eigenvalues [0.5, 1, 2], fractions [0.25, 0.25, 0.5]"]
    assert inputs_label(TWO) == TWO_LABEL
    # a point by its label, its InputDistribution or its mapping
    for want in (TWO_LABEL, TWO, TWO.to_dict()):
        assert sweep.point(inputs=want).model.inputs == TWO
    with pytest.raises(SpecificationError, match="is not a value of the sweep"):
        sweep.point(inputs=InputDistribution([2.0]))
    assert Sweep(base(), {"K": [2]}).value_coords() == {}


def test_results_dir_reuses_stored_points_and_the_file_keeps_the_values(tmp_path,
                                                                        monkeypatch):
    grid = {"inputs": [{"eigenvalues": [1.0]}, TWO.to_dict()], "eta": [0.1, 0.2]}
    first = base().sweep(grid, scheduler="synchronous", results_dir=tmp_path)["dynamics"]
    _refuse_computing(monkeypatch)
    again = base().sweep({"inputs": [InputDistribution(), TWO], "eta": [0.1, 0.2]},
                         scheduler="synchronous", results_dir=tmp_path)["dynamics"]
    assert not again["sweep_failed"].any()
    xr.testing.assert_identical(first, again)
    stored = framework.load(tmp_path / "dynamics.nc")
    xr.testing.assert_identical(stored, again)
    np.testing.assert_array_equal(stored["inputs_eigenvalues"].values[1], TWO.eigenvalues)
    assert framework.load_sweep(stored) == Sweep(base(), grid)
    assert framework.point_experiment(stored, inputs=TWO_LABEL, eta=0.2) == \
        base(TWO).evolve(eta=0.2)


# -- hashes ---------------------------------------------------------------------------------
def test_spec_hash_does_not_depend_on_how_the_distribution_is_given():
    given = [TWO, TWO.to_dict(), {"eigenvalues": TWO.eigenvalues.tolist()}]
    hashes = {spec_hash(Sweep(base(), {"inputs": [v]}).point(0)) for v in given}
    assert hashes == {spec_hash(base(TWO))}
    ints = Sweep(base(), {"inputs": [{"eigenvalues": [1, 10], "fractions": [0.5, 0.5]}]})
    assert spec_hash(ints.point(0)) == spec_hash(base({"eigenvalues": [1.0, 10.0]}))
    # the isotropic default hashes as a model without inputs (as before inputs existed)
    for iso in (InputDistribution(), {"eigenvalues": [1.0]}, {"eigenvalues": [1],
                                                              "fractions": [1]}):
        point = Sweep(base(), {"model.inputs": [iso]}).point(0)
        assert spec_hash(point) == spec_hash(base())
        assert "inputs" not in point.to_dict()["model"]
    assert spec_hash(Experiment.from_json(base(TWO).to_json())) == spec_hash(base(TWO))


# -- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value, error, match", [
    ("isotropic", TypeError,
     r"sweep 'inputs'\[1\] = 'isotropic': must be an InputDistribution or a mapping "
     r"\{'eigenvalues': \[...\], 'fractions': \[...\]\}, got str"),
    ([1.0, 10.0], TypeError, r"sweep 'inputs'\[1\] = \[1.0, 10.0\]: must be an "),
    ({"eigenvalues": [1.0], "variance": 2.0}, SpecificationError,
     r"sweep 'inputs'\[1\] = \{'eigenvalues': \[1.0\], 'variance': 2.0\}: unknown "
     r"field\(s\) 'variance' for inputs"),
    ({"eigenvalues": [1.0, 0.0]}, SpecificationError,
     r"sweep 'inputs'\[1\] = \{'eigenvalues': \[1.0, 0.0\]\}: 'eigenvalues' must be > 0 "
     r".*got \[1.0, 0.0\]"),
    ({"eigenvalues": [1.0, -2.0]}, SpecificationError, r"'eigenvalues' must be > 0"),
    ({"eigenvalues": [1.0, 2.0], "fractions": [0.5, 0.6]}, SpecificationError,
     r"sweep 'inputs'\[1\] = .*'fractions' must sum to 1 \(to 1e-12\), got sum 1.1"),
    ({"eigenvalues": ["1"]}, TypeError, r"sweep 'inputs'\[1\] = .*'eigenvalues' must hold "
                                        r"real numbers, got '1'"),
    ({"eigenvalues": [1.0]}, SpecificationError,
     r"sweep 'inputs'\[1\] = InputDistribution\(\) repeats an earlier value"),
    ({"eigenvalues": [1.0, 2.0 + 1e-9]}, SpecificationError,
     r"sweep 'inputs'\[1\] = .* and \[0\] = .* differ only beyond the 6 significant "
     r"digits of their label 'eigenvalues \[1, 2\], fractions \[0.5, 0.5\]'"),
])
def test_bad_values_name_the_key_the_value_and_the_constraint(value, error, match):
    first = InputDistribution([1.0, 2.0]) if "differ" in match else InputDistribution()
    with pytest.raises(error, match=match):
        Sweep(base(), {"inputs": [first, value]})


def test_the_grid_value_must_be_a_list():
    for value in (TWO, TWO.to_dict()):
        with pytest.raises(SpecificationError, match=r"sweep 'inputs' must be a list of "):
            Sweep(base(), {"inputs": value})


# -- TOML and the command line -----------------------------------------------------------
HEAD = "[model]\nK = 2\nM = 2\n[analyzers.dynamics]\nalpha_max = 5.0\nn_points = 6\n" \
       "rtol = 1e-6\natol = 1e-8\n"


def _write(tmp_path: Path, sweep: str) -> Path:
    path = tmp_path / "inputs.toml"
    path.write_text(HEAD + sweep)
    return path


def test_toml_inline_tables_and_arrays_of_tables_give_the_same_sweep(tmp_path):
    inline = _write(tmp_path, "[sweep]\ninputs = [{eigenvalues = [1.0]}, "
                              "{eigenvalues = [1.0, 10.0], fractions = [0.5, 0.5]}]\n")
    sweep, _ = read_toml(inline)
    expected = {"inputs": [InputDistribution(), InputDistribution([1.0, 10.0])]}
    assert sweep == Sweep(base(), expected)
    tables = _write(tmp_path, '[[sweep."model.inputs"]]\neigenvalues = [1.0]\n'
                              '[[sweep."model.inputs"]]\neigenvalues = [1.0, 10.0]\n'
                              'fractions = [0.5, 0.5]\n')
    sweep, _ = read_toml(tables)
    assert sweep == Sweep(base(), {"model.inputs": expected["inputs"]})


def test_cli_runs_an_inputs_sweep_and_resumes_it(tmp_path, capsys, monkeypatch):
    path = _write(tmp_path, '[sweep]\n"model.inputs" = [{eigenvalues = [1.0]}, '
                            '{eigenvalues = [0.5, 1.5]}]\n')
    out = tmp_path / "o"
    argv = ["run", str(path), "--out", str(out), "--scheduler", "synchronous"]
    assert main(argv) == 0
    first = framework.load(out / "dynamics.nc")
    assert first["model.inputs"].values.tolist() == [
        "isotropic", "eigenvalues [0.5, 1.5], fractions [0.5, 0.5]"]
    np.testing.assert_array_equal(first["model.inputs_eigenvalues"].values,
                                  [[1.0, np.nan], [0.5, 1.5]])
    direct = base({"eigenvalues": [0.5, 1.5]}).run()["dynamics"]
    np.testing.assert_array_equal(first["eps_g"].values[1], direct["eps_g"].values)
    _refuse_computing(monkeypatch)
    assert main(argv) == 0  # every point reused (a recomputation would fail: exit 1)
    xr.testing.assert_identical(framework.load(out / "dynamics.nc"), first)
    capsys.readouterr()


@pytest.mark.parametrize("values, message", [
    ('["isotropic"]', "[sweep] sweep 'inputs'[0] = 'isotropic': must be an "
                      "InputDistribution or a mapping"),
    ("[{eigenvalues = [1.0], scale = 2.0}]", "unknown field(s) 'scale' for inputs"),
    ("[{eigenvalues = [-1.0]}]", "'eigenvalues' must be > 0"),
    ("[{eigenvalues = [1.0, 2.0], fractions = [0.3, 0.3]}]", "'fractions' must sum to 1"),
])
def test_cli_bad_inputs_values_are_one_line_exit_2(tmp_path, capsys, values, message):
    path = _write(tmp_path, f"[sweep]\ninputs = {values}\n")
    code = main(["run", str(path), "--out", str(tmp_path / "o"), "--scheduler",
                 "synchronous"])
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("symphase: error: inputs.toml: ") and message in err, err
    assert not (tmp_path / "o").exists()
