"""Fixed points of the extra normalizations against finite-N simulation, and the
small-eta relation lambda_min = -rate on the generic engine (issue #7)."""

from __future__ import annotations

import numpy as np
import pytest

import framework
from framework import Experiment, OrderParameters, TeacherStudent

Z = 5.0  # standard errors

# (normalization spec, K, eta): layernorm with eps > 0 (eps = 0 is degenerate at K = 2
# and has no finite-eta ODE at K = 3)
CASES = [
    ("weightnorm", 2, 0.1),
    pytest.param("batchnorm_affine", 2, 0.1, marks=pytest.mark.slow),  # ~20 s
    ("meanonly", 2, 0.1),
    ("batchnorm_stopgrad", 2, 0.1),
    ({"name": "layernorm", "eps": 0.1}, 3, 0.1),
]


def _plateau(norm, K: int, eta: float):
    exp = Experiment(TeacherStudent(K, K), normalization=norm, eta=eta, seed=0,
                     analyzers=[{"name": "fixedpoint"}])
    fp = exp.run()["fixedpoint"]
    flagged = np.flatnonzero(fp.is_plateau.values)
    # no plateau (layernorm, eps > 0, K = 3: every branch is specialized): the branch
    # with the fewest unstable directions
    b = int(flagged[0]) if flagged.size else int(np.argmin(fp.n_unstable.values))
    return exp, fp.isel(branch=b)


@pytest.mark.parametrize("norm,K,eta", CASES,
                         ids=["weightnorm", "batchnorm_affine", "meanonly", "batchnorm_stopgrad",
                              "layernorm"])
def test_simulation_started_at_fixed_point_stays(norm, K: int, eta: float) -> None:
    exp, p = _plateau(norm, K, eta)
    Q, R = p.Q.values, p.R.values
    spec = dict(norm) if isinstance(norm, dict) else {"name": norm}
    for k in ("g", "gamma"):  # a live branch: the gain has not collapsed to 0
        if f"param_{k}" in p:
            assert float(np.mean(p[f"param_{k}"].values)) > 0.1
    for k in ("g", "gamma", "beta"):  # trainable parameters start at the fixed point
        if f"param_{k}" in p:
            spec[k] = float(np.mean(p[f"param_{k}"].values))
    sim = exp.evolve(normalization=spec, analyzers=[{
        "name": "simulation", "N": 1500, "replicas": 6, "alpha_max": 5.0, "records": 6,
        "initial": OrderParameters(Q, R, exp.model.T)}]).run()["simulation"]
    eps = sim.eps_g.values  # (alpha, replica) or (replica, alpha)
    ax = sim.eps_g.dims.index("replica")
    mean = eps.mean(axis=ax)
    se = eps.std(axis=ax, ddof=1) / np.sqrt(eps.shape[ax])
    err = float(p.eps_g_error) if "eps_g_error" in p else 0.0
    if "eps_g_error" in sim:  # the simulation's eps_g from the generic engine's quadrature
        err = err + sim.eps_g_error.values.max(axis=ax)
    dev = np.abs(mean - float(p.eps_g))
    assert np.all(dev <= Z * (se + err) + 1e-12), (dev, se, err, float(p.eps_g))


def _generic_rate_and_lambda(name: str, eta: float):
    """Generic engine forced: the plateau at eta, its unstable Jacobian rate and the
    Hessian's lambda_min there, with error estimates."""
    from framework.theory import equilibrium as eq

    model = TeacherStudent(2, 2)
    norm = framework.get_normalization(name)
    found = eq.find_fixed_points(model, norm, eta=eta, engine="generic")
    # the symmetric phase within the rate error (the analyzers' rule), not dead
    fps = [f for f in found
           if np.max(np.abs(f.R - f.R.mean(axis=0))) < max(1e-6, 30.0 * f.rate_error)
           and f.eps_g < 0.3]
    assert fps, [(f.eps_g, f.R.tolist()) for f in found]
    fp = min(fps, key=lambda f: f.eps_g)
    rates = []
    for seed in (0, 1):  # the rate's error: difference of two quadrature seeds
        jac = eq.ode_jacobian(model, norm, fp.Q, fp.R, fp.params, eta=eta,
                                      quadrature={"seed": seed}, engine="generic")
        rates.append(float(eq.sorted_eigen(jac)[0][0].real))
    h = eq.weight_space_hessian(model, norm, fp.Q, fp.R, fp.params, engine="generic")
    return rates[0], float(h.lambda_min), float(h.lambda_min_error), abs(rates[1] - rates[0])


@pytest.mark.slow
@pytest.mark.parametrize("name,etas", [("batchnorm", (0.05, 0.1)), ("weightnorm", (0.1, 0.2))])
def test_small_eta_limit_lambda_min_equals_minus_rate(name: str, etas) -> None:
    """lambda_min + rate is O(eta): its linear extrapolation to eta = 0 vanishes within
    the propagated error estimates (Hessian: its replicate error; rate: the difference
    between two quadrature seeds)."""
    e1, e2 = etas
    d, err = [], []
    for eta in etas:
        rate, lmin, lerr, rerr = _generic_rate_and_lambda(name, eta)
        d.append(lmin + rate)
        err.append(lerr + rerr)
    d0 = d[0] - e1 * (d[1] - d[0]) / (e2 - e1)
    # linear extrapolation: |d0| error <= (e2 err1 + e1 err2) / (e2 - e1)
    bound = (e2 * err[0] + e1 * err[1]) / (e2 - e1)
    assert abs(d0) <= Z * bound, (d, d0, bound)


@pytest.mark.parametrize("name", ["weightnorm", "batchnorm_affine"])
def test_small_eta_limit_exact_engine(name: str) -> None:
    """The exact engine (gain as state): d(eta) = lambda_min + rate is O(eta); its
    quadratic extrapolation from eta = 0.01, 0.02, 0.04 to eta = 0 vanishes to O(eta^3)
    (|d| ~ 1e-3 eta here)."""
    from framework.theory import equilibrium as eq

    model = TeacherStudent(2, 2)
    norm = framework.get_normalization(name)
    etas = np.array([0.01, 0.02, 0.04])
    d = []
    for eta in etas:
        fps = [f for f in eq.find_fixed_points(model, norm, eta=eta)
               if np.ptp(f.R) < 1e-9 and 0.0 < f.eps_g < 0.3]
        fp = min(fps, key=lambda f: f.eps_g)
        rate = float(eq.sorted_eigen(eq.ode_jacobian(
            model, norm, fp.Q, fp.R, fp.params, eta=eta))[0][0].real)
        h = eq.weight_space_hessian(model, norm, fp.Q, fp.R, fp.params)
        assert h.engine == "closed_form"
        d.append(h.lambda_min + rate)
    d0 = np.polyval(np.polyfit(etas, d, 2), 0.0)
    assert abs(d0) < 1e-3 * etas[0] ** 2, (d, d0)


def test_dead_branch_rule_uses_the_best_constant_predictor() -> None:
    from framework import theory
    from framework.theory import equilibrium as eq

    # erf, T = I: Var(zeta) / 2 = (M / pi) asin(1/2) = M / 6
    for K in (2, 3):
        engine = theory.select_engine(TeacherStudent(K, K), framework.get_normalization("plain"))
        assert abs(eq.constant_predictor_error(engine) - K / 6) < 1e-10


def test_constant_predictor_with_an_input_mean_against_monte_carlo() -> None:
    """With inputs xi ~ N(m u, I) the teachers' fields have means m s_n: the best constant
    output is E zeta and its eps_g Var(zeta) / 2, against finite-N inputs and teachers
    (N = 200, B_n . u / sqrt(N) = s_n, |B_n|^2 = N, so T = I + off-diagonal s_0 s_1)."""
    from scipy import special

    from framework import InputDistribution, theory
    from framework.theory import equilibrium as eq

    m, s, N, P = 2.0, np.array([0.5, -0.3]), 200, 200_000
    rng = np.random.default_rng(1)
    u = np.zeros(N)
    u[0] = 1.0
    rest = np.linalg.qr(rng.standard_normal((N - 1, 2)))[0].T  # orthonormal, orthogonal to u
    B = np.concatenate([s[:, None], rest * np.sqrt(1.0 - s[:, None] ** 2)], axis=1) * np.sqrt(N)
    T = B @ B.T / N
    assert np.allclose(T, [[1.0, s[0] * s[1]], [s[0] * s[1], 1.0]], atol=1e-12)
    model = TeacherStudent(2, 2, T=T.tolist(),
                           inputs=InputDistribution(mean=m, direction=s.tolist()))
    value = eq.constant_predictor_error(
        theory.select_engine(model, framework.get_normalization("batchnorm_affine")))
    zeta = np.zeros(P)
    for lo in range(0, P, 50_000):  # chunks of inputs
        xi = rng.standard_normal((50_000, N)) + m * u
        zeta[lo:lo + 50_000] = special.erf(xi @ B.T / np.sqrt(N) / np.sqrt(2.0)).sum(axis=1)
    var = zeta.var()
    se = np.sqrt(np.mean((zeta - zeta.mean()) ** 4) - var ** 2) / np.sqrt(P)
    assert abs(value - var / 2) < Z * se / 2, (value, var / 2, se / 2)
    # the centred inputs' value (fields of mean 0) is far from it
    centred = eq.constant_predictor_error(theory.select_engine(
        TeacherStudent(2, 2, T=T.tolist()), framework.get_normalization("plain")))
    assert centred - value > 10 * se  # 0.064, ~90 standard errors of eps_g


def test_generic_integration_stops_below_threshold() -> None:
    from framework import theory

    model = TeacherStudent(2, 2)
    exp = Experiment(model, seed=0)
    eng = theory.expectation_engine(model, framework.get_normalization("plain"),
                                    {"samples": 2048, "replicates": 4}, engine="generic")
    op = exp.initial_order_parameters()
    grid = np.linspace(0.0, 400.0, 201)
    full = eng.integrate(op.Q, op.R, eta=1.0, alpha=grid)
    threshold = 0.5 * float(full.eps_g[0])
    cut = eng.integrate(op.Q, op.R, eta=1.0, alpha=grid, stop_below=threshold)
    j = int(np.argmax(full.eps_g < threshold))
    assert full.eps_g[j] < threshold <= full.eps_g[j - 1]
    assert len(cut.alpha) == j + 1 and not cut.diverged
    np.testing.assert_allclose(cut.eps_g, full.eps_g[: j + 1], rtol=1e-6)


def test_escape_quadrature_option_is_validated() -> None:
    with pytest.raises(framework.SpecificationError, match="samples"):
        framework.get_analyzer("escape", quadrature={"samples": 1000})


def test_layernorm_has_no_live_symmetric_plateau() -> None:
    """Mean subtraction across units removes the students' common component: with
    eps = 0.1 (a finite-eta ODE exists) every symmetric fixed point at K = 2 is dead,
    eps_g = K/6 (the best constant predictor's), and none is flagged as the plateau."""
    exp = Experiment(TeacherStudent(2, 2), normalization={"name": "layernorm", "eps": 0.1},
                     eta=0.1, seed=0, analyzers=[{"name": "fixedpoint"}])
    fp = exp.run()["fixedpoint"]
    assert fp.attrs["plateau_branch"] == -1
    err = fp.eps_g_error.values
    assert np.all(np.abs(fp.eps_g.values - 2 / 6) <= Z * err + 1e-4), (fp.eps_g.values, err)
