"""Symmetric fixed points, the exact weight-space Hessian, ODE Jacobian and escape."""

from __future__ import annotations

import math

import attrs
import numpy as np
import pytest
import xarray as xr

import framework
from framework import Experiment, OrderParameters, SpecificationError, TeacherStudent, theory
from framework.theory import _kernels
from framework.theory import equilibrium as eq
from plugins.normalizations import BatchNorm

PLAIN = framework.get_normalization("plain")
BN = framework.get_normalization("batchnorm")


# --------------------------------------------------------------------------------------
# an independent brute force: eps_g(J) written out in N-dimensional weight space
# --------------------------------------------------------------------------------------


def eps_explicit(J: np.ndarray, B: np.ndarray, batchnorm: bool) -> np.ndarray:
    """eps_g of student weights J (..., K, N) (complex allowed) and teacher B (M, N)."""
    N = J.shape[-1]
    if batchnorm:  # x~_i = x_i / sqrt(Q_ii): J_i -> sqrt(N) J_i / |J_i|
        J = J * np.sqrt(N) / np.sqrt(np.sum(J * J, axis=-1, keepdims=True))
    Bb = np.broadcast_to(B, (*J.shape[:-2], *B.shape)).astype(J.dtype)
    U = np.concatenate([J, Bb], axis=-2)
    S = U @ np.swapaxes(U, -1, -2) / N
    K, M = J.shape[-2], B.shape[0]
    w = np.concatenate([-np.ones(K), np.ones(M)])
    d = 1 + np.diagonal(S, axis1=-2, axis2=-1)
    z = S / np.sqrt(d[..., :, None] * d[..., None, :])
    return np.sum(np.outer(w, w) * np.arcsin(z), axis=(-2, -1)) / np.pi


def brute_force_hessian(J: np.ndarray, B: np.ndarray, batchnorm: bool) -> np.ndarray:
    """Hessian in W = J/sqrt(N): complex-step gradients, central differences (Richardson)."""
    K, N = J.shape
    n = K * N
    E = np.eye(n).reshape(n, K, N)

    def grad(Js: np.ndarray) -> np.ndarray:
        return eps_explicit(Js[..., None, :, :] + 1e-30j * E, B, batchnorm).imag / 1e-30

    levels = []
    for k in range(3):
        h = 1e-3 / 2**k
        levels.append((grad(J[None] + h * E) - grad(J[None] - h * E)) / (2 * h))
    d1 = [(4 * levels[1] - levels[0]) / 3, (4 * levels[2] - levels[1]) / 3]
    H = (16 * d1[1] - d1[0]) / 15
    return N * 0.5 * (H + H.T)


def saad_solla(K: int) -> tuple[float, float, float]:
    q = 1.0 / (2 * K - 1)
    r = 1.0 / math.sqrt(K * (2 * K - 1))
    eps = (K / math.pi) * (math.pi / 6 - K * math.asin(1.0 / (2 * K)))
    return q, r, eps


def plateau(ds):  # type: ignore[no-untyped-def]
    return ds.isel(branch=int(ds.attrs["plateau_branch"]))


# --------------------------------------------------------------------------------------
# fixed points
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [2, 3, 4])
def test_saad_solla_plateau_is_found_and_flagged(K: int) -> None:
    e = Experiment(TeacherStudent(K, K), eta=0.1,
                   analyzers=[{"name": "fixedpoint", "eta": 0.0, "horizon": 1500.0}])
    ds = e.run()["fixedpoint"]
    p = plateau(ds)
    q, r, eps = saad_solla(K)
    np.testing.assert_allclose(p.symmetric_coordinate.values, [q, q, r, r], rtol=0, atol=1e-10)
    assert float(p.eps_g) == pytest.approx(eps, abs=1e-10)
    assert float(p.residual) < 1e-10
    assert bool(p.is_plateau) and int(p.n_unstable) >= 1
    assert str(p.unstable_mode.values) == "symmetry-breaking"
    assert list(ds.coordinate.values) == ["Q", "C", "R", "S"]
    # the perfect student is another branch, stable
    perfect = ds.where(np.abs(ds.eps_g) < 1e-12, drop=True)
    assert perfect.sizes["branch"] >= 1 and np.all(perfect.n_unstable == 0)


def test_fixed_points_at_finite_eta_and_flagged_plateau() -> None:
    """At eta > 0 the point of identical students (Q = C) stays a fixed point but the
    plateau the dynamics reaches is the one with Q > C and a single unstable direction."""
    ds = Experiment(TeacherStudent(2, 2), eta=0.1,
                    analyzers=[{"name": "fixedpoint", "horizon": 1500.0}]).run()["fixedpoint"]
    p = plateau(ds)
    Q, C = p.symmetric_coordinate.values[:2]
    assert Q > C + 1e-3 and int(p.n_unstable) == 1
    assert ds.attrs["eta_squared_term"] == 1
    assert np.all(ds.residual < 1e-10)


def test_batchnorm_fixed_point_is_stated_at_a_weight_norm() -> None:
    res = [
        Experiment(TeacherStudent(2, 2), normalization="batchnorm", eta=0.0, analyzers=[
            {"name": "fixedpoint", "weight_norm": q, "horizon": 1500.0}]).run()["fixedpoint"]
        for q in (0.5, 2.0)
    ]
    p0, p1 = plateau(res[0]), plateau(res[1])
    assert float(p0.weight_norm) == 0.5 and float(p1.weight_norm) == 2.0
    np.testing.assert_allclose(np.diagonal(p0.Q.values), 0.5, rtol=1e-14)
    # gradient flow: the angles and eps_g do not depend on the norm
    np.testing.assert_allclose(p0.Q_norm, p1.Q_norm, atol=1e-10)
    assert float(p0.eps_g) == pytest.approx(float(p1.eps_g), abs=1e-12)
    # and the rates scale as 1 / weight_norm
    assert float(p0.jacobian_eigenvalue_real[0]) == pytest.approx(
        4.0 * float(p1.jacobian_eigenvalue_real[0]), rel=1e-8)


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_fixed_point_eps_g_is_the_plateau_of_dynamics(norm: str) -> None:
    e = Experiment(TeacherStudent(2, 2), normalization=norm, eta=0.1, init_N=100_000,
                   init_scale=0.5, analyzers=[
                       {"name": "fixedpoint", "eta": 0.0, "horizon": 300.0},
                       {"name": "dynamics", "alpha_max": 1500.0, "n_points": 1501,
                        "alpha_min": 1.0, "second_order": False}])
    res = e.run()
    eps_fp = float(plateau(res["fixedpoint"]).eps_g)
    eps = res["dynamics"].eps_g.values
    alpha = res["dynamics"].alpha.values
    assert np.min(np.abs(eps - eps_fp)) < 1e-5
    near = np.abs(eps / eps_fp - 1.0) < 0.01
    assert np.sum(np.diff(alpha)[near[1:]]) > 100.0  # it lingers there: the plateau


@pytest.mark.skipif("simulation" not in framework.list_analyzers(),
                    reason="the simulation analyzer is not installed")
@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_fixed_point_eps_g_matches_simulation_started_there(norm: str) -> None:
    model = TeacherStudent(2, 2)
    fps = eq.find_fixed_points(model, framework.get_normalization(norm), eta=0.05)
    fp = max((f for f in fps if f.eps_g > 1e-3 and abs(f.R[0, 0] - f.R[0, 1]) < 1e-9),
             key=lambda f: -f.eps_g)  # the low unspecialized branch (the plateau)
    op = eq.to_order_parameters(fp.Q, fp.R, model.T)
    sim = Experiment(model, normalization=norm, eta=0.05, analyzers=[{
        "name": "simulation", "N": 2000, "alpha_max": 40.0, "records": 21, "replicas": 4,
        "initial": op}]).run()["simulation"]
    eps = sim.eps_g_mean.sel(alpha=slice(10.0, 40.0)).values
    assert np.mean(eps) == pytest.approx(fp.eps_g, rel=0.05)


def test_exchangeable_subspace_for_k_different_from_m() -> None:
    model = TeacherStudent(3, 2, T=[[1.0, 0.2], [0.2, 0.7]])
    fps = eq.find_fixed_points(model, PLAIN, eta=0.0)
    assert fps and all(fp.subspace.kind == "exchangeable" for fp in fps)
    assert fps[0].subspace.names == ("Q", "C", "R[0]", "R[1]")
    for fp in fps:
        assert fp.residual < 1e-10
        jac = eq.ode_jacobian(model, PLAIN, fp.Q, fp.R, eta=0.0)
        spec = eq.weight_space_hessian(model, PLAIN, fp.Q, fp.R)
        lam = np.linalg.eigvals(jac).real.max()
        if spec.escape_block == "span" and spec.lambda_min < -1e-6:
            assert lam == pytest.approx(-spec.lambda_min, rel=1e-7)
    with pytest.raises(SpecificationError, match=r"'subspace' 'matched' needs K == M"):
        eq.symmetric_subspace(model, "matched")


# --------------------------------------------------------------------------------------
# Hessian
# --------------------------------------------------------------------------------------


def _random_point(model: TeacherStudent, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    J = 0.7 * rng.standard_normal((model.K, 200))
    B = OrderParameters(np.eye(model.K), np.zeros((model.K, model.M)), model.T).realize(200, 1)[1]
    J = J + 0.3 * rng.standard_normal((model.K, model.M)) @ B
    op = OrderParameters.from_weights(J, B)
    return op.Q, op.R


@pytest.mark.parametrize(
    ("norm", "K", "M", "N", "where"),
    [
        ("plain", 2, 2, 20, "plateau"),
        ("batchnorm", 2, 2, 40, "plateau"),
        ("plain", 3, 3, 25, "plateau"),
        ("batchnorm", 3, 3, 25, "plateau"),
        ("plain", 2, 2, 30, "random"),
        ("batchnorm", 3, 2, 24, "random"),
    ],
)
def test_hessian_spectrum_equals_brute_force(norm: str, K: int, M: int, N: int, where: str) -> None:
    model = TeacherStudent(K, M)
    normalization = framework.get_normalization(norm)
    if where == "plateau":
        fps = eq.find_fixed_points(model, normalization, eta=0.0)
        fp = min((f for f in fps if f.eps_g > 1e-6), key=lambda f: f.eps_g)
        Q, R = fp.Q, fp.R
    else:
        Q, R = _random_point(model, seed=K + M)
    spec = eq.weight_space_hessian(model, normalization, Q, R)
    J, B = eq.to_order_parameters(Q, R, model.T).realize(N, 3)
    brute = np.linalg.eigvalsh(brute_force_hessian(J, B, norm == "batchnorm"))
    assert brute.size == K * N
    np.testing.assert_allclose(spec.full(N), brute, rtol=0, atol=1e-8)


def test_hessian_analyzer_dataset() -> None:
    e = Experiment(TeacherStudent(2, 2), eta=0.1, init_N=30, analyzers=[
        {"name": "hessian", "eta": 0.0, "horizon": 1500.0}])
    ds = e.run()["hessian"]
    p = plateau(ds)
    assert bool(p.is_plateau)
    valid = p.multiplicity.values > 0
    assert int(p.multiplicity.sum()) == 2 * 30  # all K N eigenvalues at N = init_N
    assert int(p.dim_span) == 2  # W_i in span(B): Q = C, R = S
    assert set(p.block.values[valid]) == {"span", "complement"}
    assert float(p.lambda_min) == pytest.approx(float(np.nanmin(p.eigenvalue)), abs=0)
    assert str(p.escape_mode.values) == "symmetry-breaking"
    assert str(p.escape_block.values) == "span"
    assert float(p.escape_symmetric_fraction) < 1e-8
    # the escape mode specializes: R_ii moves against R_in
    dR = p.escape_dR.values
    assert dR[0, 0] * dR[0, 1] < 0
    assert "N - dim S" in ds.attrs["multiplicity_formula"]
    assert "W = J / sqrt(N)" in ds.attrs["hessian_coordinates"]
    assert ds.weight_norm.dims == ("branch",)
    _check_conventions(ds)


@pytest.mark.parametrize("K", [2, 3])
def test_unstable_rate_is_minus_eta_lambda_min(K: int) -> None:
    model = TeacherStudent(K, K)
    fps = eq.find_fixed_points(model, PLAIN, eta=0.0)
    fp = min((f for f in fps if f.eps_g > 1e-6 and abs(f.R[0, 0] - f.R[0, 1]) < 1e-9),
             key=lambda f: f.eps_g)
    lam_min = eq.weight_space_hessian(model, PLAIN, fp.Q, fp.R).lambda_min
    # gradient flow: the Jacobian per unit eta has -lambda_min exactly
    jac = eq.ode_jacobian(model, PLAIN, fp.Q, fp.R, eta=0.0)
    assert np.linalg.eigvals(jac).real.max() == pytest.approx(-lam_min, rel=1e-8)
    # small eta: the unstable eigenvalue (per unit alpha) -> -eta lambda_min, error O(eta^2)
    errors = []
    for eta in (1e-2, 1e-3):
        pts = eq.find_fixed_points(model, PLAIN, eta=eta)
        near = min(pts, key=lambda f: np.max(np.abs(f.Q - fp.Q)) + np.max(np.abs(f.R - fp.R)))
        jac = eq.ode_jacobian(model, PLAIN, near.Q, near.R, eta=eta) * eta
        errors.append(abs(np.linalg.eigvals(jac).real.max() - (-eta * lam_min)))
    assert errors[1] < 1e-3 * 1e-3 * 10 and errors[1] < errors[0] / 10


def test_batchnorm_zero_modes_and_inverse_weight_norm_scaling() -> None:
    model = TeacherStudent(2, 2)
    fps = eq.find_fixed_points(model, BN, eta=0.0, weight_norm=1.0)
    for fp in fps:
        spec = eq.weight_space_hessian(model, BN, fp.Q, fp.R)
        # zero eigenvalue along each W_i (scale invariance)
        d = spec.dim_span
        for i in range(model.K):
            v = np.zeros((model.K, d))
            v[i] = spec.X[i, :d]
            np.testing.assert_allclose(spec.span_matrix @ v.ravel(), 0.0, atol=1e-9)
        # lambda(c W) = lambda(W) / c^2 with weight_norm = Q_ii = c^2
        for q in (0.25, 4.0):
            Qs, Rs = eq.rescale_weight_norm(fp.Q, fp.R, q)
            scaled = eq.weight_space_hessian(model, BN, Qs, Rs)
            np.testing.assert_allclose(scaled.span * q, spec.span, atol=1e-9)
            np.testing.assert_allclose(scaled.complement * q, spec.complement, atol=1e-9)
    ds = Experiment(model, normalization="batchnorm", analyzers=[
        {"name": "hessian", "eta": 0.0, "weight_norm": [0.5, 1.0, 2.0],
         "flag_plateau": False}]).run()["hessian"]
    assert ds.lambda_min.dims == ("weight_norm", "branch")
    ratio = ds.lambda_min * ds.weight_norm
    np.testing.assert_allclose(ratio, ratio.isel(weight_norm=0).broadcast_like(ratio), atol=1e-9)
    assert ds.attrs["normalization_param_gamma"] == 1.0


def test_hessian_at_given_order_parameters_and_plain_has_no_zero_scale_mode() -> None:
    Q, R = _random_point(TeacherStudent(2, 2), seed=5)
    op = OrderParameters(Q, R)
    ds = Experiment(TeacherStudent(2, 2), analyzers=[{"name": "hessian", "at": op, "N": 50}]
                    ).run()["hessian"]
    assert ds.sizes["branch"] == 1 and int(ds.multiplicity.sum()) == 100
    np.testing.assert_allclose(ds.Q.isel(branch=0), Q)
    spec = eq.weight_space_hessian(TeacherStudent(2, 2), PLAIN, Q, R)
    np.testing.assert_allclose(np.sort(ds.eigenvalue.values[0][:spec.span.size]), spec.span)
    assert framework.Experiment.from_json(ds.attrs["symphase_spec_json"]).analyzers[0].at == op


def test_trainable_and_stopgrad_normalizations_get_the_same_hessian_fields() -> None:
    """No refusal: a trained parameter outside the closed form's reach joins the span
    block on the quadrature engine; a stop-gradient normalization gets the exact
    Hessian of its loss landscape (flagged), equal to the quadrature's within errors."""
    @attrs.frozen
    class TrainedBN(BatchNorm):
        name = "trained_bn_test"

        @property
        def trainable(self) -> tuple[str, ...]:
            return ("gamma",)

    model = TeacherStudent(2, 2)
    Q, R = np.eye(2) * 0.5, np.full((2, 2), 0.3)
    spec = eq.weight_space_hessian(model, TrainedBN(), Q, R)
    assert spec.engine == "generic" and spec.theta_names == ("gamma",)
    assert spec.span.size == 2 * 4 + 2 and spec.lambda_min_error > 0

    @attrs.frozen
    class FrozenStats(BatchNorm):
        name = "frozen_stats_test"
        statistics_gradient = False

    exact = eq.weight_space_hessian(model, FrozenStats(), Q, R)
    quad = eq.weight_space_hessian(model, FrozenStats(), Q, R, engine="generic")
    assert exact.engine == "closed_form" and exact.landscape_only and quad.landscape_only
    assert exact.theta_names == () and exact.params == {}
    err = quad.span_error + exact.span_error
    assert np.all(np.abs(exact.span - quad.span) <= 6 * err + 1e-9), (exact.span, quad.span)
    # the landscape is batchnorm's eps_g (same forward map): the same Hessian, up to the
    # central differences of the scale (h = 1e-6) that stand in for its zeroed Jacobian
    bn = eq.weight_space_hessian(model, BN, Q, R)
    np.testing.assert_allclose(exact.span, bn.span, atol=1e-7)
    np.testing.assert_allclose(exact.complement, bn.complement, atol=1e-7)


# --------------------------------------------------------------------------------------
# escape
# --------------------------------------------------------------------------------------


def test_escape_time_follows_the_linear_instability() -> None:
    model = TeacherStudent(2, 2)
    out = {}
    for delta in (1e-3, 1e-4):
        out[delta] = Experiment(model, eta=0.2, analyzers=[{
            "name": "escape", "perturbation": delta, "alpha_max": 1500.0, "n_points": 3001,
            "horizon": 1000.0}]).run()["escape"]
    ds = out[1e-3]
    assert bool(ds.escaped) and float(ds.alpha_escape) > 0
    assert float(ds.eps_g[0]) == pytest.approx(float(ds.eps_plateau), rel=1e-2)
    # a ten times smaller push costs ln(10) / (eta * rate) more time
    rate = float(ds.unstable_rate) * 0.2
    extra = float(out[1e-4].alpha_escape - ds.alpha_escape)
    assert extra == pytest.approx(math.log(10) / rate, rel=0.05)
    assert ds.attrs["perturbation_mode"].startswith("ODE Jacobian")
    _check_conventions(ds)


def test_escape_from_init_records_batchnorm_weight_norm_growth_and_flags_no_escape() -> None:
    e = Experiment(TeacherStudent(2, 2), normalization="batchnorm", eta=0.5, analyzers=[
        {"name": "escape", "start": "init", "alpha_max": 600.0, "n_points": 601,
         "horizon": 1000.0}])
    ds = e.run()["escape"]
    assert bool(ds.escaped) and np.isfinite(float(ds.alpha_escape))
    wn = ds.weight_norm.values
    assert np.all(np.diff(wn) > 0)  # norms grow, through the eta^2 term only
    assert float(ds.weight_norm_at_escape) > wn[0]
    short = e.evolve(analyzers=[{"name": "escape", "start": "init", "alpha_max": 20.0,
                                 "n_points": 21, "horizon": 1000.0}]).run()["escape"]
    assert not bool(short.escaped) and np.isnan(float(short.alpha_escape))


# --------------------------------------------------------------------------------------
# options, errors, storage
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "kwargs", "message"),
    [
        ("fixedpoint", {"weight_norm": 2.0}, {},
         r"'weight_norm' applies only to scale-invariant normalizations \('plain' is not\), "
         r"got 2.0"),
        ("fixedpoint", {"eta": -1.0}, {}, r"'eta' must be >= 0.0, got -1.0"),
        ("hessian", {"weight_norm": [1.0, -2.0]}, {"normalization": "batchnorm"},
         r"'weight_norm' must be > 0.0, got -2.0"),
        ("hessian", {"subspace": "diagonal"}, {}, r"'subspace' must be one of 'auto'"),
        ("escape", {"start": "middle"}, {}, r"'start' must be one of 'fixedpoint', 'init'"),
        ("escape", {"eta": 0.0}, {}, r"'eta' must be > 0 for the escape analyzer, got 0.0"),
        ("escape", {"perturbation": 0.0}, {}, r"'perturbation' must be > 0.0, got 0.0"),
    ],
)
def test_bad_options_name_parameter_constraint_value(
    name: str, options: dict, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Experiment(TeacherStudent(2, 2), analyzers=[{"name": name, **options}], **kwargs)


def _check_conventions(ds) -> None:  # type: ignore[no-untyped-def]
    for name, var in ds.data_vars.items():
        assert var.attrs.get("long_name") and var.attrs.get("units"), name
    for key, value in ds.attrs.items():
        assert isinstance(value, str | int | float), key
    assert "eta/sqrt(N)" in ds.attrs["convention_learning_rate"]
    assert ds.attrs["eta_squared_term"] in (0, 1)


def test_fixedpoint_dataset_round_trips_through_netcdf(tmp_path) -> None:  # type: ignore[no-untyped-def]
    e = Experiment(TeacherStudent(2, 2), normalization="batchnorm", eta=0.1, analyzers=[
        {"name": "fixedpoint", "weight_norm": 1.5, "horizon": 500.0}])
    ds = e.run()["fixedpoint"]
    _check_conventions(ds)
    assert set(ds.dims) >= {"branch", "eigen", "student", "student_", "teacher", "coordinate"}
    assert "weight_norm" in ds.coords and np.all(ds.weight_norm == 1.5)
    framework.save(ds, tmp_path / "fp.nc")
    back = framework.load(tmp_path / "fp.nc")
    np.testing.assert_array_equal(back.eps_g, ds.eps_g)
    assert back.is_plateau.dtype == bool
    assert list(back.unstable_mode.values) == list(ds.unstable_mode.values)
    assert framework.load_experiment(back) == e


def test_gradient_is_the_first_order_drift() -> None:
    """d(Q, R)/d(eta alpha) = push-forward of -grad F, for every diagonal-scale norm."""
    model = TeacherStudent(3, 2)
    Q, R = _random_point(model, seed=11)
    for norm in (PLAIN, BN):
        p = norm.parameters(model.K)
        _, G, H, _ = _kernels.eps_g_gradient(Q, R, model.T, norm.scale(Q, p),
                                             norm.scale_jacobian(Q, p), model.noise)
        S = G + G.T
        dQ, dR = theory.ode_rhs(model, norm, Q, R, 1.0, second_order=False)
        np.testing.assert_allclose(dR, -(S @ R + H @ model.T), atol=1e-14)
        np.testing.assert_allclose(dQ, -(S @ Q + Q @ S + H @ R.T + R @ H.T), atol=1e-14)


def test_branch_search_runs_once_per_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    """fixedpoint, hessian and escape of one experiment share one branch search; a
    different eta, normalization class or K searches anew."""
    from plugins import equilibrium as peq

    calls = []
    search = peq._search_branches

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[1:])
        return search(*args, **kwargs)

    monkeypatch.setattr(peq, "_search_branches", counting)
    monkeypatch.setattr(peq, "_BRANCH_CACHE", type(peq._BRANCH_CACHE)())
    e = Experiment(TeacherStudent(2, 2), eta=0.3, seed=0, analyzers=[
        {"name": "fixedpoint"}, {"name": "hessian"},
        {"name": "escape", "alpha_max": 200.0, "n_points": 5}])
    first = e.run()
    assert len(calls) == 1
    again = e.evolve(seed=1).run()  # the search does not read the seed
    assert len(calls) == 1
    for name in ("fixedpoint", "hessian"):
        xr.testing.assert_identical(first[name].drop_attrs(), again[name].drop_attrs())
    e.evolve(eta=0.4).run()
    assert len(calls) == 2
    e.evolve(normalization="batchnorm").run()
    assert len(calls) == 3
