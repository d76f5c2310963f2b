"""The ``dynamics`` analyzer: grids, labels, conventions, divergence, invariances."""

from __future__ import annotations

import numpy as np
import pytest

import framework
from framework import Experiment, OrderParameters, TeacherStudent, theory


def _run(**kwargs: object) -> object:
    options = kwargs.pop("options", {})
    e = Experiment(TeacherStudent(2, 2), analyzers=[{"name": "dynamics", **options}], **kwargs)
    return e.run()["dynamics"]


def test_dataset_is_labelled_and_states_its_conventions() -> None:
    ds = _run(eta=0.5, options={"alpha_max": 50.0, "n_points": 11})
    assert ds.eps_g.dims == ("alpha",)
    assert ds.Q.dims == ("alpha", "student", "student_")
    assert ds.R.dims == ("alpha", "student", "teacher")
    np.testing.assert_allclose(ds.alpha[1:], np.geomspace(0.01, 50.0, 10))
    for name, var in ds.variables.items():
        if name in ds.data_vars or name == "alpha":
            assert var.attrs.get("long_name") and var.attrs.get("units"), name
    assert ds.attrs["eta"] == 0.5 and ds.attrs["batch_size"] == 1
    assert "alpha = number of SGD steps / N" in ds.attrs["convention_time"]
    assert "eta/sqrt(N)" in ds.attrs["convention_learning_rate"]
    assert framework.load_experiment(ds) == Experiment.from_json(ds.attrs["symphase_spec_json"])
    assert not bool(ds.diverged)
    assert "Q_norm" not in ds  # plain: the activation sees Q itself


def test_explicit_grid_and_exact_init() -> None:
    op = OrderParameters(np.diag([0.3, 0.2]), [[0.1, 0.0], [0.0, 0.05]])
    ds = _run(eta=0.3, init=op, options={"alpha": [0.0, 1.0, 2.5]})
    np.testing.assert_array_equal(ds.alpha, [0.0, 1.0, 2.5])
    np.testing.assert_allclose(ds.Q[0], op.Q, rtol=0, atol=0)
    model = TeacherStudent(2, 2)
    eps0 = theory.generalization_error(model, framework.get_normalization("plain"), op)
    assert float(ds.eps_g[0]) == pytest.approx(eps0, rel=1e-14)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"alpha": [0.0, 2.0, 1.0]}, r"'alpha' must be a strictly increasing grid"),
        ({"alpha_max": -1.0}, r"'alpha_max' must be > 0.0, got -1.0"),
        ({"n_points": 1}, r"'n_points' must be >= 2, got 1"),
        ({"method": "euler"}, r"'method' must be one of 'DOP853', .*got 'euler'"),
        ({"alpha_max": 1.0, "alpha_min": 2.0}, r"'alpha_min' must be < alpha_max = 1.0, got 2.0"),
        ({"tol": 1e-3}, r"unknown option\(s\) 'tol' for analyzer 'dynamics'"),
    ],
)
def test_bad_options_name_the_option(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        framework.get_analyzer("dynamics", **options)


def test_divergence_is_marked_and_the_computed_part_kept() -> None:
    ds = _run(eta=8.0, options={"alpha_max": 200.0, "n_points": 50, "max_value": 100.0})
    assert bool(ds.diverged)
    reached = np.isfinite(ds.eps_g.values)
    assert 0 < reached.sum() < ds.sizes["alpha"]
    assert np.all(reached[: reached.sum()])  # a prefix, then NaN
    assert float(ds.alpha_diverged) >= float(ds.alpha[reached][-1])


def test_batchnorm_weight_norm_grows_only_through_the_eta2_term() -> None:
    grid = {"alpha": [0.0, 5.0, 20.0]}
    flow = _run(eta=0.5, normalization="batchnorm", options={**grid, "second_order": False})
    diag = np.diagonal(flow.Q.values, axis1=1, axis2=2)
    np.testing.assert_allclose(diag, np.broadcast_to(diag[0], diag.shape), rtol=1e-8)
    sgd = _run(eta=0.5, normalization="batchnorm", options=grid)
    diag = np.diagonal(sgd.Q.values, axis1=1, axis2=2)
    assert np.all(np.diff(diag, axis=0) > 0)
    q_norm = np.diagonal(sgd.Q_norm.values, axis1=1, axis2=2)
    np.testing.assert_allclose(q_norm, 1.0, rtol=1e-12)


def test_batchnorm_trajectory_is_scale_invariant_in_the_gradient_flow_limit() -> None:
    base = OrderParameters([[1.0, 0.1], [0.1, 0.8]], [[0.2, 0.05], [0.0, 0.1]])
    d = np.array([2.0, 0.5])
    scaled = OrderParameters(base.Q * np.outer(d, d), base.R * d[:, None])
    # in gradient flow, rescaling J_i by d_i rescales time per unit by 1/d_i^2; eps_g at
    # alpha = 0 must agree exactly and the normalized overlaps are identical
    a = _run(eta=0.1, normalization="batchnorm", init=base, options={"alpha": [0.0, 1.0]})
    b = _run(eta=0.1, normalization="batchnorm", init=scaled, options={"alpha": [0.0, 1.0]})
    assert float(a.eps_g[0]) == pytest.approx(float(b.eps_g[0]), rel=1e-13)
    np.testing.assert_allclose(a.Q_norm[0], b.Q_norm[0], rtol=1e-13)


def test_plain_reaches_the_saad_solla_plateau_then_learns() -> None:
    ds = _run(
        eta=0.1, init_N=100_000, init_scale=0.5,  # a small initial asymmetry: a long plateau
        options={"alpha_max": 5000.0, "n_points": 301, "second_order": False},
    )
    eps = ds.eps_g.values
    K = 2
    plateau = (K / np.pi) * (np.pi / 6 - K * np.arcsin(1 / (2 * K)))
    # the trajectory lingers near the symmetric fixed point's error ...
    near = np.abs(eps / plateau - 1) < 0.02
    assert near.sum() >= 20
    # ... and then escapes to perfect learning
    assert eps[-1] < 1e-6
