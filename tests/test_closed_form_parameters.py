"""The exact engine with trainable normalization parameters as state
(framework.theory.closed.ClosedFormEngine): weightnorm's gain, batchnorm_affine's gamma
(and beta held at 0), checked against the generic quadrature engine, finite
differences, finite-N simulation and the plain network's plateau."""

from __future__ import annotations

import numpy as np
import pytest

import framework
from framework import Experiment, OrderParameters, TeacherStudent, theory
from framework.theory import equilibrium as eq

Z = 5.0  # standard errors
NORMS = ["weightnorm", "batchnorm_affine"]


def _state(rng: np.random.Generator, K: int, M: int) -> tuple[np.ndarray, ...]:
    A = rng.standard_normal((K + M, K + M + 2))
    C = A @ A.T / (K + M + 2) + 0.2 * np.eye(K + M)
    return C[:K, :K], C[:K, K:], C[K:, K:]


def _engines(name: str, K: int = 3, M: int = 2, noise: float = 0.02, seed: int = 0):
    rng = np.random.default_rng(seed)
    Q, R, T = _state(rng, K, M)
    model = TeacherStudent(K, M, T=T, noise=noise)
    norm = framework.get_normalization(name)
    exact = theory.expectation_engine(model, norm)
    p = exact.params()
    for k in exact.trainable:
        p[k] = p[k] * rng.uniform(0.5, 1.5, K)
    return model, norm, exact, Q, R, p


@pytest.mark.parametrize("name", NORMS)
def test_auto_engine_is_exact_and_names_itself(name) -> None:
    model, norm, exact, *_ = _engines(name)
    assert isinstance(exact, theory.ClosedFormEngine) and exact.exact
    assert exact.name == "closed_form" and "quadrature" not in exact.attrs()
    assert exact.trainable == tuple(norm.scale_parameters)
    assert exact.held == tuple(norm.shift_parameters)
    assert theory.has_closed_form(model, norm)
    generic = theory.expectation_engine(model, norm, engine="generic")
    assert generic.name == "generic" and not generic.exact
    tanh = TeacherStudent(model.K, model.M, T=model.T, activation="tanh")
    assert theory.expectation_engine(tanh, norm).name == "generic"
    with pytest.raises(theory.ClosedFormUnavailable, match="tanh"):
        theory.expectation_engine(tanh, norm, engine="closed_form")


@pytest.mark.parametrize("name", NORMS)
def test_parameter_rates_are_minus_eta_gradient_of_exact_eps_g(name) -> None:
    model, _, eng, Q, R, p = _engines(name)
    eta, h = 0.7, 1e-6
    r = eng.rates(Q, R, p, eta=eta)
    assert np.all(r.dQ_error == 0) and r.eps_g_error == 0
    for k in eng.trainable:
        for i in range(model.K):
            up = {**p, k: p[k].copy()}
            down = {**p, k: p[k].copy()}
            up[k][i] += h
            down[k][i] -= h
            fd = (eng.generalization_error(Q, R, up)[0]
                  - eng.generalization_error(Q, R, down)[0]) / (2 * h)
            assert r.dparams[k][i] == pytest.approx(-eta * fd, rel=1e-7, abs=1e-10)


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("K", [2, 3])
def test_exact_rates_agree_with_generic_engine(name, K) -> None:
    model, norm, eng, Q, R, p = _engines(name, K=K, M=2, seed=K)
    gen = theory.expectation_engine(model, norm, {"samples": 8192}, engine="generic")
    a = eng.rates(Q, R, p, eta=0.6)
    g = gen.rates(Q, R, p, eta=0.6)
    for x, y, e in ((a.dQ, g.dQ, g.dQ_error), (a.dR, g.dR, g.dR_error),
                    *((a.dparams[k], g.dparams[k], g.dparams_error[k]) for k in eng.trainable),
                    (a.eps_g, g.eps_g, g.eps_g_error)):
        assert np.all(np.abs(np.asarray(x) - y) <= Z * np.asarray(e) + 1e-12), (x, y, e)
    for k in eng.held:  # beta = 0 is a fixed point of beta's own drift
        assert np.all(np.abs(g.dparams[k]) <= Z * g.dparams_error[k] + 1e-12)


@pytest.mark.parametrize("name", NORMS)
def test_weight_moments_are_the_gradient_of_eps_g(name) -> None:
    model, _, eng, _, _, p = _engines(name)
    rng = np.random.default_rng(7)
    X = rng.standard_normal((model.K, 6)) / np.sqrt(6)
    Bt = rng.standard_normal((model.M, 6)) / np.sqrt(6)
    _, gX, gT = eng.weight_moments(X, Bt, p)

    def F(Xv: np.ndarray, pv: dict) -> float:
        return eng.generalization_error(Xv @ Xv.T, Xv @ Bt.T, pv)[0]

    h = 1e-6
    for _ in range(4):
        V = rng.standard_normal(X.shape)
        fd = (F(X + h * V, p) - F(X - h * V, p)) / (2 * h)
        assert float(np.sum(gX[0] * V)) == pytest.approx(fd, rel=1e-6, abs=1e-9)
    for k in eng.trainable:
        v = rng.standard_normal(model.K)
        fd = (F(X, {**p, k: p[k] + h * v}) - F(X, {**p, k: p[k] - h * v})) / (2 * h)
        assert float(gT[k][0] @ v) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_held_shift_block_agrees_with_generic_engine() -> None:
    """d^2 eps_g / d beta^2 at beta = 0 (closed form) against central differences of the
    generic engine's estimate of -E[d eps / d beta] (smooth in beta: common random
    numbers), and the mixed derivatives d^2 eps_g / d beta d(W, gamma) vanish."""
    model, norm, eng, Q, R, p = _engines("batchnorm_affine", K=2, M=2, noise=0.0)
    gen = theory.expectation_engine(model, norm, {"samples": 16384}, engine="generic")
    H = eng.held_hessian(Q, R, p)
    h = 1e-3
    for j in range(model.K):
        e = np.zeros(model.K)
        e[j] = h
        up = gen.rates(Q, R, {**p, "beta": e}, eta=1.0, second_order=False)
        down = gen.rates(Q, R, {**p, "beta": -e}, eta=1.0, second_order=False)
        col = -(up.dparams["beta"] - down.dparams["beta"]) / (2 * h)
        err = np.hypot(up.dparams_error["beta"], down.dparams_error["beta"]) / (2 * h)
        assert np.all(np.abs(col - H[:, j]) <= Z * err + 1e-9), (col, H[:, j], err)
        # mixed terms: gamma's rate and (Q, R)'s rates are even in beta
        for name, a, b, ea in (("gamma", up.dparams["gamma"], down.dparams["gamma"],
                                up.dparams_error["gamma"]),
                               ("dR", up.dR, down.dR, up.dR_error)):
            assert np.all(np.abs(a - b) / (2 * h) <= Z * np.sqrt(2) * ea / (2 * h) + 1e-9), name


def test_nonzero_shift_goes_to_the_generic_engine() -> None:
    model, norm, eng, Q, R, p = _engines("batchnorm_affine")
    beta = np.array([0.1, 0.0, -0.2])
    with pytest.raises(framework.SpecificationError, match=r"'beta'.*must be 0"):
        eng.rates(Q, R, {**p, "beta": beta}, eta=0.5)
    auto = theory.expectation_engine(model, norm, params={"beta": beta})
    assert auto.name == "generic"
    with pytest.raises(theory.ClosedFormUnavailable):
        theory.expectation_engine(model, framework.get_normalization("batchnorm_affine",
                                                                     beta=0.3),
                                  engine="closed_form")


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("K", [2, 3])
def test_gradient_flow_plateau_is_plains_in_effective_weights(name, K) -> None:
    """eta -> 0: the trained-gain plateau is Saad & Solla's plateau in the effective
    weights g W_i / |W_i| (identical students, g^2 = Q* = 1/(2K-1), eps_g = eps*), and
    the Hessian's escape eigenvalue is plain's times g^2 (tangential directions at
    |W_i| = 1 are plain's directions scaled by g)."""
    model = TeacherStudent(K, K)
    norm = framework.get_normalization(name)
    fps = eq.find_fixed_points(model, norm, eta=0.0)
    live = [f for f in fps if f.eps_g < 0.9 * K / 6 and np.ptp(f.R) < 1e-9
            and np.all(f.params[norm.scale_parameters[0]] > 0)]
    assert live, [(f.eps_g, f.R.tolist()) for f in fps]
    fp = min(live, key=lambda f: f.eps_g)
    g = fp.params[norm.scale_parameters[0]]
    # the gradient-flow Jacobian has zero modes at this root (singular values ~1e-9 of
    # ode_jacobian_generic), along which the residual (< 1e-16 here) is quadratic: the
    # root is located to ~sqrt(residual), 1e-7 relative
    np.testing.assert_allclose(g, 1.0 / np.sqrt(2 * K - 1), rtol=1e-6)
    np.testing.assert_allclose(fp.Q, np.ones((K, K)), atol=1e-6)  # identical students
    plain = framework.get_normalization("plain")
    ref = [f for f in eq.find_fixed_points(model, plain, eta=0.0)
           if np.ptp(f.R) < 1e-9 and abs(f.Q[0, 0] - 1 / (2 * K - 1)) < 1e-9]
    assert ref
    assert fp.eps_g == pytest.approx(ref[0].eps_g, rel=1e-10)
    h = eq.weight_space_hessian(model, norm, fp.Q, fp.R, fp.params)
    hp = eq.weight_space_hessian(model, plain, ref[0].Q, ref[0].R)
    assert h.engine == "closed_form"
    assert h.lambda_min == pytest.approx(hp.lambda_min / (2 * K - 1), rel=1e-6)
    assert h.lambda_min_error < 1e-6 * abs(h.lambda_min)


def test_exact_and_generic_integrations_agree() -> None:
    model = TeacherStudent(2, 2)
    norm = framework.get_normalization("weightnorm", g=0.6)
    op = OrderParameters([[0.9, 0.2], [0.2, 0.5]], [[0.3, 0.1], [0.0, 0.2]])
    alpha = np.array([0.0, 1.0, 3.0])
    exact = theory.integrate(model, norm, op, eta=0.8, alpha=alpha)
    assert exact.engine == "closed_form" and "quadrature" not in exact.description
    assert np.all(exact.eps_g_error == 0) and not exact.diverged
    runs = [theory.integrate(model, norm, op, eta=0.8, alpha=alpha, engine="generic",
                             quadrature={"seed": s, "samples": 1024, "replicates": 4})
            for s in range(6)]
    for field in ("Q", "R", "eps_g"):
        vals = np.stack([getattr(r, field) for r in runs])
        sem = vals.std(axis=0, ddof=1) / np.sqrt(len(runs))
        assert np.all(np.abs(vals.mean(0)[1:] - getattr(exact, field)[1:]) <= 6 * sem[1:]
                      + 1e-12), field
    g = np.stack([r.params["g"] for r in runs])
    sem = g.std(axis=0, ddof=1) / np.sqrt(len(runs))
    assert np.all(np.abs(g.mean(0)[1:] - exact.params["g"][1:]) <= 6 * sem[1:] + 1e-12)


@pytest.mark.parametrize("name", NORMS)
def test_exact_ode_with_gain_agrees_with_simulation(name) -> None:
    """Finite-N SGD (population statistics; gains stepped eta/N) against the exact ODE
    with the gain as state: replica means within 5 standard errors."""
    options = {"g": 0.7} if name == "weightnorm" else {"gamma": 0.7}
    alpha = [0.0, 0.5, 1.0, 2.0]
    e = Experiment(TeacherStudent(2, 2), normalization={"name": name, **options}, eta=0.5,
                   init_scale=0.7, seed=5,
                   analyzers=[{"name": "simulation", "N": 1000, "alpha": alpha,
                               "replicas": 8}])
    sim = e.run()["simulation"]
    traj = theory.integrate(e.model, e.normalization, e.initial_order_parameters(),
                            eta=e.eta, alpha=alpha)
    assert traj.engine == "closed_form"
    for var in ("Q", "R"):
        m, s = sim[f"{var}_mean"].values[1:], sim[f"{var}_sem"].values[1:]
        assert np.all(np.abs(m - getattr(traj, var)[1:]) <= Z * s), var
    for k, v in traj.params.items():
        ps = sim[f"param_{k}"].values
        m, s = ps.mean(0)[1:], ps.std(0, ddof=1)[1:] / np.sqrt(ps.shape[0])
        assert np.all(np.abs(m - v[1:]) <= Z * s), (k, m, v[1:], s)
    assert np.all(np.abs(traj.params[next(iter(traj.params))][-1] - 0.7) > 1e-3)  # trained


@pytest.mark.parametrize("K", [2, 3])
def test_escape_from_boundary_plateau_grows_at_the_unstable_rate(K) -> None:
    """The trained-gain plateau has identical students (boundary of the PSD cone): the
    escape start realizes the Jacobian's unstable eigenvector in weight space, so the
    students' differences grow from the start at the Jacobian's rate (not after the
    decay of a stable component)."""
    eta = 0.1
    e = Experiment(TeacherStudent(K, K), normalization="weightnorm", eta=eta, seed=0,
                   analyzers=[{"name": "escape", "alpha": [0.0, 500.0, 1000.0]}])
    ds = e.run()["escape"]
    assert "realized in weight space" in ds.attrs["perturbation_mode"]
    R = ds.R.values
    spread = np.linalg.norm(R - R.mean(axis=1, keepdims=True), axis=(1, 2))
    rate = float(ds.unstable_rate) * eta  # per unit alpha
    growth = np.log(spread[2] / spread[1]) / 500.0
    assert growth == pytest.approx(rate, rel=0.05), (growth, rate, spread)
    assert spread[1] > spread[0]
