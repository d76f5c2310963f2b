"""Equilibrium with a trained readout (issue 13, item 4): fixed points with ``v`` in the
state (the plateau of the two-layer network and the branches with a dead or duplicated
unit), the ODE Jacobian with ``v`` coordinates, the Hessian of eps_g in ``(W, v)`` and the
escape from the plateau. References: the explicit erf formula for eps_g written here
(brute-force finite differences), the fixed-readout model with ``v`` frozen at the fixed
point (exact Jacobian block), the smaller network a dead unit leaves behind, and the
integrated ODE (escape times)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from framework import Experiment, TeacherStudent
from framework.manager import get_normalization
from framework.theory import equilibrium as eq
from framework.theory import select_engine

ETA = 0.5


def _trained(K: int, eta_v: float = ETA, **kw) -> TeacherStudent:
    return TeacherStudent(K, K, second_layer="trained", eta_v=eta_v, **kw)


def _engine(model: TeacherStudent, norm: str):
    return select_engine(model, get_normalization(norm), None)


def eps_explicit(X: np.ndarray, Bt: np.ndarray, v: np.ndarray, batchnorm: bool) -> float:
    """eps_g of W = X (K x D), Btilde = Bt (M x D), readout v (sum output scale, unit
    teacher readout), erf: (1/pi) sum_ij w_i w_j arcsin(S_ij / sqrt((1+S_ii)(1+S_jj)))
    with w = (-v, 1) -- written here, independently of the engines."""
    if batchnorm:
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
    U = np.concatenate([X, Bt], axis=0)
    S = U @ U.T
    w = np.concatenate([-np.asarray(v, dtype=float), np.ones(Bt.shape[0])])
    d = 1.0 + np.diag(S)
    return float(np.sum(np.outer(w, w) * np.arcsin(S / np.sqrt(np.outer(d, d)))) / np.pi)


def _fd_hessian(f, x0: np.ndarray, h: float = 1e-4) -> np.ndarray:
    """Central second differences of a scalar function (O(h^2))."""
    n = x0.size
    H = np.empty((n, n))
    E = np.eye(n) * h
    f0 = f(x0)
    for i in range(n):  # a handful of coordinates
        H[i, i] = (f(x0 + E[i]) - 2 * f0 + f(x0 - E[i])) / h**2
        for j in range(i):
            H[i, j] = H[j, i] = (f(x0 + E[i] + E[j]) - f(x0 + E[i] - E[j])
                                 - f(x0 - E[i] + E[j]) + f(x0 - E[i] - E[j])) / (4 * h * h)
    return H


def _branches(norm: str, K: int = 2, eta: float = ETA):
    model = _trained(K)
    ds = Experiment(model, normalization=norm, eta=eta, seed=0,
                    analyzers=[{"name": "fixedpoint"}]).run()["fixedpoint"]
    return model, ds


# --------------------------------------------------------------------------------------
# fixed points
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_fixed_points_carry_v_and_are_zeros_of_the_full_ode(norm: str) -> None:
    model, ds = _branches(norm)
    eng = _engine(model, norm)
    assert "param_v" in ds and ds.param_v.dims == ("branch", "student")
    assert "trained student readout" in ds.param_v.attrs["long_name"]
    for b in range(ds.sizes["branch"]):  # the full ODE, evaluated afresh, vanishes there
        Q, R = ds.Q.values[b], ds.R.values[b]
        r = eng.rates(Q, R, {"v": ds.param_v.values[b]}, eta=ETA)
        dQ, dR = r.dQ, r.dR
        if norm == "batchnorm":  # only the angles are fixed (norms grow via eta^2)
            dQ, dR = eq.angular_rhs(Q, R, dQ, dR)
        assert np.max(np.abs(dQ)) < 1e-9 and np.max(np.abs(dR)) < 1e-9
        assert np.max(np.abs(r.dparams["v"])) < 1e-9
    # at the plateau the readout is stationary: d eps_g / d v = 0 (finite differences
    # of the explicit formula in a realization)
    b = int(ds.attrs["plateau_branch"])
    assert b >= 0 and str(ds.branch_kind.values[b]) == "symmetric"
    assert not bool(ds.specialized.values[b])
    X, Bt, _ = eq._realize(ds.Q.values[b], ds.R.values[b], model.T)
    v = ds.param_v.values[b]
    bn = norm == "batchnorm"
    h = 1e-6
    grad = [(eps_explicit(X, Bt, v + h * e, bn) - eps_explicit(X, Bt, v - h * e, bn)) / (2 * h)
            for e in np.eye(2)]
    assert np.max(np.abs(grad)) < 1e-7
    assert float(ds.eps_g[b]) == pytest.approx(eps_explicit(X, Bt, v, bn), abs=1e-12)


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_dead_unit_branch_is_the_smaller_network_plus_an_idle_unit(norm: str) -> None:
    model, ds = _branches(norm)
    kinds = [str(k) for k in ds.branch_kind.values]
    assert "dead unit" in kinds
    b = kinds.index("dead unit")
    Q, R, v = ds.Q.values[b], ds.R.values[b], ds.param_v.values[b]
    assert v[1] == 0.0 and np.all(R[1] == 0.0) and Q[0, 1] == 0.0
    assert Q[1, 1] == (1.0 if norm == "batchnorm" else 0.0)
    assert not bool(ds.is_plateau.values[b])
    # the surviving unit is a fixed point of the K = 1 network learning the same teacher
    small = TeacherStudent(1, 2, second_layer="trained", eta_v=ETA)
    r = _engine(small, norm).rates(Q[:1, :1], R[:1], {"v": v[:1]}, eta=ETA)
    dQ, dR = r.dQ, r.dR
    if norm == "batchnorm":
        dQ, dR = eq.angular_rhs(Q[:1, :1], R[:1], dQ, dR)
    assert max(np.max(np.abs(dQ)), np.max(np.abs(dR)), np.max(np.abs(r.dparams["v"]))) < 1e-9
    X, Bt, _ = eq._realize(Q, R, model.T)
    assert float(ds.eps_g[b]) == pytest.approx(
        eps_explicit(X[:1], Bt, v[:1], norm == "batchnorm"), abs=1e-12)


def test_duplicated_units_branch_for_three_units() -> None:
    model = _trained(3)
    fps = eq.find_fixed_points(model, get_normalization("plain"), eta=ETA)
    dup = [fp for fp in fps if fp.kind == "duplicated units"]
    assert dup, "no branch with two duplicated units"
    for fp in dup:
        # units 1 and 2 identical (same J and v), unit 0 different
        assert fp.Q[1, 1] == fp.Q[2, 2] == fp.Q[1, 2]
        assert np.all(fp.R[1] == fp.R[2]) and fp.params["v"][1] == fp.params["v"][2]
        r = _engine(model, "plain").rates(fp.Q, fp.R, fp.params, eta=ETA)
        assert max(np.max(np.abs(r.dQ)), np.max(np.abs(r.dR)),
                   np.max(np.abs(r.dparams["v"]))) < 1e-9
    b = eq.plateau_branch(_engine(model, "plain"), fps, [
        eq.sorted_eigen(eq.ode_jacobian(model, get_normalization("plain"), fp.Q, fp.R,
                                        fp.params, eta=ETA))[0] for fp in fps])
    assert fps[b].kind == "symmetric" and not eq.specialized(fps[b].R)


def test_fixed_readout_has_no_partition_branches() -> None:
    fps = eq.find_fixed_points(TeacherStudent(2, 2), get_normalization("plain"), eta=ETA)
    assert {fp.kind for fp in fps} == {"symmetric"}


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_plateau_is_where_the_ode_from_a_random_init_lingers(norm: str) -> None:
    """The ODE from a small random init (v as state) passes closest to the flagged plateau
    (or, for plain at eta = 0.5, to its twin of identical students, eps_g within 1e-3):
    not to the dead-unit branch."""
    model, ds = _branches(norm)
    b = int(ds.attrs["plateau_branch"])
    grid = np.geomspace(1.0, 3000.0, 400)
    dyn = Experiment(model, normalization=norm, eta=ETA, seed=0, init="random",
                     init_scale=0.01, analyzers=[{
                         "name": "dynamics", "alpha": [0.0, *grid.tolist()]}]).run()["dynamics"]
    before = np.cumsum(dyn.eps_g.values < 0.5 * float(ds.eps_g[b])) == 0  # before escape
    Q, R, v = dyn.Q.values[before], dyn.R.values[before], dyn.param_v.values[before]
    if norm == "batchnorm":  # compare angles (the fixed point is stated at Q_ii = 1)
        d = np.sqrt(np.einsum("aii->ai", Q))
        Q, R = Q / d[:, :, None] / d[:, None, :], R / d[:, :, None]
    dist = np.array([np.min(np.sqrt(((Q - ds.Q.values[c]) ** 2).sum((1, 2))
                                    + ((R - ds.R.values[c]) ** 2).sum((1, 2))
                                    + ((v - ds.param_v.values[c]) ** 2).sum(1)))
                     for c in range(ds.sizes["branch"])])
    near = int(np.argmin(dist))
    assert str(ds.branch_kind.values[near]) == "symmetric"
    assert float(ds.eps_g[near]) == pytest.approx(float(ds.eps_g[b]), rel=1e-3)
    dead = [c for c in range(ds.sizes["branch"]) if str(ds.branch_kind.values[c]) == "dead unit"]
    assert dist[b] < 0.2 and all(dist[b] < 0.5 * dist[c] for c in dead)


# --------------------------------------------------------------------------------------
# Jacobian
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_jacobian_without_the_v_block_is_the_fixed_readout_jacobian(norm: str) -> None:
    model, ds = _branches(norm)
    b = int(ds.attrs["plateau_branch"])
    Q, R, v = ds.Q.values[b], ds.R.values[b], ds.param_v.values[b]
    N = get_normalization(norm)
    coords = eq.jacobian_coordinates(model, N)
    assert [c for c in coords if c[0] == "theta:v"] == [("theta:v", 0, 0), ("theta:v", 1, 0)]
    jac = eq.ode_jacobian(model, N, Q, R, {"v": v}, eta=ETA)
    frozen = TeacherStudent(2, 2, student_readout=v)  # v fixed at its fixed-point value
    jac_f = eq.ode_jacobian(frozen, N, Q, R, eta=ETA)
    keep = [i for i, c in enumerate(coords) if not c[0].startswith("theta:")]
    assert eq.jacobian_coordinates(frozen, N) == [coords[i] for i in keep]
    np.testing.assert_allclose(jac[np.ix_(keep, keep)], jac_f, rtol=1e-9, atol=1e-12)
    # the v rows: d(dv/d alpha)/d v = -eta_v / eta * d^2 eps_g / dv^2 (per eta alpha)
    iv = [i for i, c in enumerate(coords) if c[0] == "theta:v"]
    X, Bt, _ = eq._realize(Q, R, model.T)
    Hv = _fd_hessian(lambda u: eps_explicit(X, Bt, u, norm == "batchnorm"), v)
    np.testing.assert_allclose(jac[np.ix_(iv, iv)], -Hv, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("norm", "second_order"), [("plain", True), ("batchnorm", False)])
def test_unstable_eigenvalue_is_the_growth_rate_of_the_integrated_ode(
        norm: str, second_order: bool) -> None:
    """Escape from the plateau pushed by 1e-4 and by 1e-6 along the unstable direction: the
    smaller push costs ln(100) / (eta rate) more time (generic integrator with v as
    state). Batchnorm without the eta^2 term: its weight norms are then conserved, so the
    plateau is a true fixed point (with it the norms grow and slow the angles down)."""
    model = _trained(2)
    out = {}
    for delta in (1e-4, 1e-6):
        out[delta] = Experiment(model, normalization=norm, eta=ETA, seed=0, analyzers=[{
            "name": "escape", "perturbation": delta, "alpha_max": 1500.0, "n_points": 3001,
            "stop_at_escape": True, "second_order": second_order}]).run()["escape"]
    ds = out[1e-4]
    assert bool(ds.escaped) and "param_v" in ds
    assert float(ds.eps_g[0]) == pytest.approx(float(ds.eps_plateau), rel=1e-3)
    rate = float(ds.unstable_rate) * ETA
    extra = float(out[1e-6].alpha_escape - ds.alpha_escape)
    assert extra == pytest.approx(math.log(100) / rate, rel=0.01)
    # the escape mode in both layers: specialization of the first layer, readout idle
    assert np.max(np.abs(ds.unstable_dv.values)) < 1e-9
    dR = ds.unstable_dR.values
    assert dR[0, 0] == pytest.approx(-dR[0, 1]) and dR[0, 0] == pytest.approx(-dR[1, 0])
    assert float(ds.hessian_escape_first_layer_share) == pytest.approx(1.0, abs=1e-9)


# --------------------------------------------------------------------------------------
# Hessian in (W, v)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
@pytest.mark.parametrize("where", ["plateau", "random"])
def test_hessian_in_w_and_v_equals_finite_differences_of_eps_g(norm: str, where: str) -> None:
    model = _trained(2)
    N = get_normalization(norm)
    if where == "plateau":
        _, ds = _branches(norm)
        b = int(ds.attrs["plateau_branch"])
        Q, R, v = ds.Q.values[b], ds.R.values[b], ds.param_v.values[b]
    else:
        rng = np.random.default_rng(3)
        X0 = rng.standard_normal((2, 4)) * 0.6
        Bt0 = np.linalg.qr(rng.standard_normal((4, 2)))[0].T
        Q, R, v = X0 @ X0.T, X0 @ Bt0.T, np.array([0.7, 1.3])
    spec = eq.weight_space_hessian(model, N, Q, R, {"v": v})
    assert spec.theta_names == ("v",) and np.all(spec.params["v"] == v)
    r = spec.dim_span
    X, Bt = spec.X, spec.Bt  # realization in D = K + M dimensions
    K = 2
    bn = norm == "batchnorm"

    def F(z: np.ndarray) -> float:
        Xz = X.copy()
        Xz[:, :r] = z[:K * r].reshape(K, r)
        return eps_explicit(Xz, Bt, z[K * r:], bn)

    z0 = np.concatenate([X[:, :r].ravel(), v])
    H = _fd_hessian(F, z0)
    np.testing.assert_allclose(spec.span_matrix, H, atol=2e-6)
    np.testing.assert_allclose(np.linalg.eigvalsh(H), spec.span, atol=2e-6)
    # the v block is the plain second derivative of eps_g(Q, R, v) (no factor N)
    eng = _engine(model, norm)
    Hv = _fd_hessian(lambda u: eng.generalization_error(Q, R, {"v": u})[0], v)
    np.testing.assert_allclose(spec.span_matrix[K * r:, K * r:], Hv, atol=1e-6)
    # the complement block: G + G^T, G = d eps_g / dQ (a direction orthogonal to S)
    for i in range(K):
        def Fc(t: float, i: int = i) -> float:  # X, Bt plus one orthogonal dimension
            col = np.zeros((K, 1))
            col[i] = t
            return eps_explicit(np.concatenate([X, col], axis=1),
                                np.concatenate([Bt, np.zeros((Bt.shape[0], 1))], axis=1), v, bn)
        h = 1e-4
        curv = (Fc(h) - 2 * Fc(0.0) + Fc(-h)) / h**2
        assert curv == pytest.approx(2 * spec.G[i, i], abs=1e-6)


def test_hessian_analyzer_reports_v_and_states_the_scaling() -> None:
    model = _trained(2)
    h = Experiment(model, eta=ETA, seed=0, analyzers=[{"name": "hessian"}]).run()["hessian"]
    assert "param_v" in h and "escape_dv" in h
    assert "d^2 eps_g / dv_i dv_k" in h.attrs["hessian_readout_scaling"]
    assert "theta = v" in h.attrs["trainable_parameters_included"]
    b = int(h.attrs["plateau_branch"])
    assert str(h.escape_mode.values[b]) == "symmetry-breaking"


@pytest.mark.parametrize("K", [2, 3])
def test_gradient_flow_plateau_with_trained_readout_is_saad_sollas(K: int) -> None:
    """At eta -> 0 the committee plateau Q = C = 1/(2K-1), R = S = 1/sqrt(K(2K-1)) has d
    eps_g / dv = 0 at v = 1, so it is the trained network's plateau too (Saad & Solla's
    published values)."""
    model = _trained(K, eta_v=1.0)
    fps = eq.find_fixed_points(model, get_normalization("plain"), eta=0.0)
    eng = _engine(model, "plain")
    lam = [eq.sorted_eigen(eq.ode_jacobian(model, get_normalization("plain"), fp.Q, fp.R,
                                           fp.params, eta=0.0))[0] for fp in fps]
    fp = fps[eq.plateau_branch(eng, fps, lam)]
    np.testing.assert_allclose(fp.Q, np.full((K, K), 1 / (2 * K - 1)), atol=1e-10)
    np.testing.assert_allclose(fp.R, np.full((K, K), 1 / math.sqrt(K * (2 * K - 1))),
                               atol=1e-10)
    np.testing.assert_allclose(fp.params["v"], 1.0, atol=1e-10)
