"""The generic-engine path of fixedpoint / hessian / escape (issue #7, second pass)."""

from __future__ import annotations

import numpy as np
import pytest

import framework
from framework import Experiment, TeacherStudent
from framework.theory import equilibrium as eq

Z = 5.0  # standard errors


def _plateau(name: str, K: int = 2, eta: float = 0.1):
    model = TeacherStudent(K, K)
    norm = framework.get_normalization(name)
    fps = eq.find_fixed_points(model, norm, eta=eta)
    fp = [f for f in fps if np.ptp(f.R) < 1e-6 or abs(f.R[0, 0] - f.R[0, 1]) < 1e-6]
    fp = next(f for f in fp if eq.psd_margin(f.Q, f.R, model.T) > 1e-6)
    return model, norm, fp


@pytest.mark.parametrize("name", ["plain", "batchnorm"])
def test_generic_hessian_matches_closed_form(name: str) -> None:
    model, norm, fp = _plateau(name)
    exact = eq.weight_space_hessian(model, norm, fp.Q, fp.R)
    gen = eq.weight_space_hessian(model, norm, fp.Q, fp.R, engine="generic")
    assert abs(gen.lambda_min - exact.lambda_min) <= Z * gen.lambda_min_error
    np.testing.assert_array_less(np.abs(gen.complement - exact.complement),
                                 Z * gen.complement_error)
    np.testing.assert_array_less(np.abs(gen.span - exact.span[: gen.span.size]),
                                 Z * gen.span_error + 1e-12)


def test_stopgrad_landscape_hessian_is_batchnorms() -> None:
    """Same forward map, so the same eps_g landscape: the Hessian of eps_g agrees with
    batchnorm's closed form although the stop-gradient drift is not its gradient."""
    model, bn, fp = _plateau("batchnorm")
    sg = framework.get_normalization("batchnorm_stopgrad")
    exact = eq.weight_space_hessian(model, bn, fp.Q, fp.R)
    gen = eq.weight_space_hessian(model, sg, fp.Q, fp.R, engine="generic")
    assert gen.landscape_only
    assert abs(gen.lambda_min - exact.lambda_min) <= Z * gen.lambda_min_error


@pytest.mark.parametrize("name", ["weightnorm", "batchnorm_affine"])
def test_complement_decouples_from_trainable_parameters(name: str) -> None:
    """d^2 eps_g / d(complement) d(theta) = 0: theta only joins the span block."""
    model = TeacherStudent(2, 2)
    norm = framework.get_normalization(name)
    Q = np.array([[0.9, 0.2], [0.2, 0.7]])
    R = np.array([[0.5, 0.1], [0.2, 0.4]])
    params = {k: np.array([0.8, 1.2]) for k in norm.trainable if k != "beta"}
    gen = eq.weight_space_hessian(model, norm, Q, R, params)
    assert gen.theta_names == tuple(norm.trainable)
    assert gen.coupling_complement_theta <= Z * gen.coupling_complement_theta_error + 1e-12
    assert gen.coupling_complement_span <= Z * gen.coupling_complement_span_error + 1e-12
    assert gen.span.size == 2 * gen.dim_span + 2 * len(norm.trainable)


def test_weightnorm_analyzers_include_the_gain() -> None:
    exp = Experiment(TeacherStudent(2, 2), normalization="weightnorm", eta=0.1,
                     analyzers=[{"name": "hessian"}])
    h = exp.run()["hessian"]
    b = h.attrs["plateau_branch"]
    assert b >= 0
    assert "param_g" in h and "lambda_min_error" in h and "eigenvalue_error" in h
    assert h.attrs["engine"] == "closed_form"  # erf + a scale parameter: exact engine
    assert "theta = g" in h.attrs["trainable_parameters_included"]
    assert float(h.lambda_min[b]) < -5 * float(h.lambda_min_error[b])
    for v in h.data_vars.values():
        assert "long_name" in v.attrs and "units" in v.attrs


def test_generic_fixed_points_refuse_gradient_flow_by_name() -> None:
    with pytest.raises(framework.SpecificationError, match=r"'eta' must be > 0.*weightnorm"):
        eq.find_fixed_points(TeacherStudent(2, 2, activation="tanh"),
                                     framework.get_normalization("weightnorm"), eta=0.0)


def test_generic_hessian_raises_accuracy_error_rather_than_noise() -> None:
    model, norm, fp = _plateau("plain")
    with pytest.raises(framework.theory.AccuracyError, match="lambda_min"):
        eq.weight_space_hessian(
            model, norm, fp.Q, fp.R, quadrature={"samples": 16, "replicates": 2},
            accuracy=1e-9, engine="generic")


def test_scale_invariance_probe() -> None:
    model = TeacherStudent(3, 3)
    got = {n: eq.scale_invariance(model, framework.get_normalization(n))
           for n in ("plain", "batchnorm", "batchnorm_affine", "layernorm",
                     "batchnorm_stopgrad")}
    assert got == {"plain": "none", "batchnorm": "unit", "batchnorm_affine": "unit",
                   "layernorm": "common", "batchnorm_stopgrad": "none"}


def test_analyzers_write_the_same_variables_whichever_engine() -> None:
    """plain with erf runs on the closed-form engine, plain with tanh on the quadrature:
    fixedpoint, hessian, escape and dynamics datasets have the same variables and dims,
    the error fields are 0 exactly when the engine is exact, and attrs name the engine."""
    out = {}
    for act in ("erf", "tanh"):
        exp = Experiment(TeacherStudent(2, 2, activation=act), eta=0.5, seed=0, analyzers=[
            {"name": "fixedpoint"}, {"name": "hessian"},
            {"name": "dynamics", "alpha": [0.0, 1.0, 5.0], "rtol": 1e-6},
            {"name": "escape", "alpha_max": 50.0, "n_points": 11, "rtol": 1e-6,
             "stop_at_escape": True}])
        out[act] = exp.run()
    for name in ("fixedpoint", "hessian", "dynamics", "escape"):
        exact, quad = out["erf"][name], out["tanh"][name]
        assert exact.attrs["engine"] == "closed_form" and quad.attrs["engine"] == "generic"
        assert exact.attrs["engine_exact"] == 1 and quad.attrs["engine_exact"] == 0
        assert set(exact.data_vars) == set(quad.data_vars), name
        for v in exact.data_vars:
            assert exact[v].dims == quad[v].dims, (name, v)
    for name, var in (("fixedpoint", "eps_g_error"), ("fixedpoint", "rate_error"),
                      ("dynamics", "eps_g_error")):
        assert np.all(out["erf"][name][var].values == 0), (name, var)
        assert np.all(out["tanh"][name][var].values > 0), (name, var)
    assert np.all(out["tanh"]["hessian"].lambda_min_error.values > 0)
