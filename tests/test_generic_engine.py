"""The generic expectation engine (framework/_generic.py through framework.theory).

Tolerances are the engine's own error estimates (standard errors of independent
randomized-QMC replicates): agreement within 6 of them, which a correct engine
misses with probability ~1e-5 per entry (Student t, 15 degrees of freedom), plus
floating-point rounding where the reference is exact.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import framework
from framework import Experiment, OrderParameters, TeacherStudent, theory
from framework.testing import strategies as fst
from framework.theory import _kernels as _theory

Z = 6.0  # standard errors


def engine(model, norm, **quad):  # type: ignore[no-untyped-def]
    """The generic (quadrature) engine, also where an exact one exists."""
    return theory.expectation_engine(model, framework.get_normalization(norm) if
                                     isinstance(norm, str) else norm, quad or None,
                                     engine="generic")


def within(value, reference, error, rounding=1e-12):  # type: ignore[no-untyped-def]
    value, reference, error = map(np.asarray, (value, reference, error))
    bad = np.abs(value - reference) > Z * error + rounding
    assert not np.any(bad), (
        f"generic {value[bad]} vs reference {reference[bad]}: "
        f"{(np.abs(value - reference) / error)[bad]} standard errors"
    )


@st.composite
def model_and_state(draw, *, max_K=3, max_M=3):  # type: ignore[no-untyped-def]
    model = draw(fst.models(max_K=max_K, max_M=max_M))
    op = draw(fst.order_parameters(model.K, model.M))
    # the model's teacher overlaps must be those of the state
    cov = op.covariance.copy()
    return TeacherStudent(model.K, model.M, T=cov[model.K:, model.K:], noise=model.noise), op


# ---------------------------------------------------------------------------------------
# agreement with the closed forms
# ---------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None, derandomize=True)
@given(ms=model_and_state(), norm=st.sampled_from(["plain", "batchnorm"]),
       eta=st.floats(0.05, 2.0), batch=st.integers(1, 4))
def test_generic_matches_closed_form(ms, norm, eta, batch) -> None:  # type: ignore[no-untyped-def]
    model, op = ms
    n = framework.get_normalization(norm)
    r = engine(model, n).rates(op.Q, op.R, eta=eta, batch_size=batch)
    dQ, dR = theory.ode_rhs(model, n, op.Q, op.R, eta, batch, engine="closed_form")
    eps = theory.generalization_error(model, n, op, engine="closed_form")
    within(r.dQ, dQ, r.dQ_error)
    within(r.dR, dR, r.dR_error)
    within(r.eps_g, eps, r.eps_g_error)
    # and the facade's engine="generic" returns the same numbers
    gQ, gR = theory.ode_rhs(model, n, op.Q, op.R, eta, batch, engine="generic")
    np.testing.assert_array_equal(gQ, r.dQ)
    np.testing.assert_array_equal(gR, r.dR)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(ms=model_and_state(), eta=st.floats(0.05, 2.0))
def test_linear_activation_is_exact(ms, eta) -> None:  # type: ignore[no-untyped-def]
    """g(u) = u: e = 1.y - 1.x and a = e 1, so every expectation is a covariance."""
    model, op = ms
    model = TeacherStudent(model.K, model.M, T=model.T, noise=model.noise, activation="linear")
    Q, R, T = op.Q, op.R, op.T
    Ee2 = T.sum() - 2 * R.sum() + Q.sum()
    Eex = R.sum(axis=1) - Q.sum(axis=0)  # E[e x_k]
    Eey = T.sum(axis=0) - R.sum(axis=0)  # E[e y_n]
    K = model.K
    dQ = eta * (np.outer(np.ones(K), Eex) + np.outer(Eex, np.ones(K))) \
        + eta**2 * (Ee2 + model.noise) * np.ones((K, K))
    dR = eta * np.outer(np.ones(K), Eey)
    r = engine(model, "plain").rates(Q, R, eta=eta)
    within(r.dQ, dQ, r.dQ_error, rounding=1e-10)
    within(r.dR, dR, r.dR_error, rounding=1e-10)
    within(r.eps_g, 0.5 * (Ee2 + model.noise), r.eps_g_error, rounding=1e-10)


def _relu_kernel(a, b, c):  # type: ignore[no-untyped-def]
    """E[relu(u) relu(v)] for (u, v) with variances a, b and covariance c."""
    s = np.sqrt(a * b)
    theta = np.arccos(np.clip(c / s, -1, 1))
    return s / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * np.cos(theta))


@settings(max_examples=10, deadline=None, derandomize=True)
@given(ms=model_and_state())
def test_relu_generalization_error_matches_arc_cosine_kernel(ms) -> None:  # type: ignore[no-untyped-def]
    model, op = ms
    model = TeacherStudent(model.K, model.M, T=model.T, noise=model.noise, activation="relu")
    C = op.covariance
    d = np.diag(C)
    w = np.concatenate([-np.ones(model.K), np.ones(model.M)])
    eps = 0.5 * w @ _relu_kernel(d[:, None], d[None, :], C) @ w + 0.5 * model.noise
    value, error = engine(model, "plain").generalization_error(op.Q, op.R)
    within(value, eps, error)


@pytest.mark.parametrize("norm", ["weightnorm", "batchnorm_affine"])
@pytest.mark.parametrize("activation", ["erf", "tanh"])
def test_parameter_rates_are_minus_eta_gradient_of_eps_g(norm, activation) -> None:
    """dtheta/dalpha = -eta d eps_g / d theta; with common random numbers the engine's
    eps_g is a smooth function of theta whose derivative is its own estimate of
    E[d eps / d theta], so a central difference must agree to O(h^2)."""
    rng = np.random.default_rng(3)
    K, M = 3, 2
    A = rng.standard_normal((K + M, K + M + 2))
    C = A @ A.T / (K + M + 2) + 0.2 * np.eye(K + M)
    model = TeacherStudent(K, M, T=C[K:, K:], activation=activation)
    eng = engine(model, norm)
    params = {k: v + rng.uniform(-0.2, 0.2, K) for k, v in eng.params().items()}
    eta, h = 0.7, 1e-5
    r = eng.rates(C[:K, :K], C[:K, K:], params, eta=eta)
    for name in eng.trainable:
        for i in range(K):
            up, down = dict(params), dict(params)
            up[name] = params[name].copy()
            down[name] = params[name].copy()
            up[name][i] += h
            down[name][i] -= h
            fd = (eng.generalization_error(C[:K, :K], C[:K, K:], up)[0]
                  - eng.generalization_error(C[:K, :K], C[:K, K:], down)[0]) / (2 * h)
            assert r.dparams[name][i] == pytest.approx(-eta * fd, rel=1e-6, abs=1e-8)


def test_weightnorm_gain_rate_matches_closed_form_gradient() -> None:
    """For erf the same gradient has a closed form: eps_g(s = g / sqrt(diag Q))."""
    rng = np.random.default_rng(5)
    K, M = 2, 3
    A = rng.standard_normal((K + M, K + M + 1))
    C = A @ A.T / (K + M + 1) + 0.2 * np.eye(K + M)
    Q, R, T = C[:K, :K], C[:K, K:], C[K:, K:]
    model = TeacherStudent(K, M, T=T, noise=0.1)
    g = np.array([0.7, 1.6])
    r = engine(model, "weightnorm").rates(Q, R, {"g": g}, eta=1.0)

    def eps(gain):  # type: ignore[no-untyped-def]
        return _theory.generalization_error(Q, R, T, gain / np.sqrt(np.diag(Q)), noise_var=0.1)

    h = 1e-6
    grad = np.array([(eps(g + h * e) - eps(g - h * e)) / (2 * h) for e in np.eye(K)])
    within(r.dparams["g"], -grad, r.dparams_error["g"], rounding=1e-8)


# ---------------------------------------------------------------------------------------
# accuracy control, smoothness, dispatch
# ---------------------------------------------------------------------------------------
def test_inaccurate_estimates_raise_instead_of_returning_noise() -> None:
    model = TeacherStudent(3, 2)
    op = OrderParameters(np.eye(3) * 0.5 + 0.1, np.full((3, 2), 0.2))
    with pytest.raises(theory.AccuracyError,
                       match=r"error estimate of .* above accuracy=1e-09 \* max\(1, \|value\|\)"):
        engine(model, "plain", accuracy=1e-9).rates(op.Q, op.R, eta=0.5)
    # layer norm with K = 3: E[a a^T] ~ E[1 / std_k(x)^2] is infinite
    with pytest.raises(theory.AccuracyError, match=r"E\[a a\^T\].*'layernorm'"):
        engine(model, "layernorm").rates(op.Q, op.R, eta=0.5)
    # ... while the gradient-flow part is finite
    r = engine(model, "layernorm", accuracy=0.05).rates(op.Q, op.R, eta=0.5, second_order=False)
    assert np.all(np.isfinite(r.dQ))


def test_rates_are_deterministic_and_smooth_in_the_state() -> None:
    """Common random numbers: a fixed, smooth function of (Q, R) an integrator can use."""
    eng = engine(TeacherStudent(2, 2, activation="tanh"),
                 framework.get_normalization("batchnorm", beta=0.3))
    Q = np.array([[0.8, 0.1], [0.1, 0.6]])
    R = np.array([[0.3, 0.0], [0.1, 0.2]])
    A = np.random.default_rng(0).standard_normal((2, 2))
    dQ = 0.5 * (A + A.T)

    def f(t):  # type: ignore[no-untyped-def]
        return eng.rates(Q + t * dQ, R, eta=0.5).dQ

    np.testing.assert_array_equal(f(0.0), f(0.0))
    h = 1e-3
    second = f(h) - 2 * f(0.0) + f(-h)
    first = f(h) - f(-h)
    assert np.abs(second).max() < 1e-2 * np.abs(first).max()  # O(h^2) against O(h)


def test_engine_option_and_dispatch() -> None:
    model = TeacherStudent(3, 2)
    op = OrderParameters(np.eye(3) * 0.5, np.full((3, 2), 0.1))
    plain = framework.get_normalization("plain")
    with pytest.raises(ValueError, match=r"'engine' must be one of 'auto', 'closed_form', "
                                         r"'generic', got 'fast'"):
        theory.ode_rhs(model, plain, op.Q, op.R, 0.5, engine="fast")
    ln = framework.get_normalization("layernorm")
    with pytest.raises(theory.ClosedFormUnavailable, match=r"'layernorm'.*engine='generic'"):
        theory.generalization_error(model, ln, op, engine="closed_form")
    assert theory.has_closed_form(model, framework.get_normalization("weightnorm"))
    assert not theory.has_closed_form(model, ln)
    assert theory.has_closed_form(model, framework.get_normalization("batchnorm_stopgrad"))
    # auto: closed form for plain (exactly), generic for layer norm
    assert theory.generalization_error(model, plain, op) == theory.generalization_error(
        model, plain, op, engine="closed_form")
    value, _ = engine(model, ln).generalization_error(op.Q, op.R)
    assert theory.generalization_error(model, ln, op) == value
    stack = theory.generalization_error_batch(model, ln, np.stack([op.Q, op.Q]),
                                              np.stack([op.R, op.R]))
    np.testing.assert_array_equal(stack, [value, value])
    with pytest.raises(ValueError, match=r"'K' must be >= 2 for normalization 'layernorm'"):
        theory.expectation_engine(TeacherStudent(1, 1), ln)
    with pytest.raises(ValueError, match=r"'samples' must be a power of 2 with "
                                         r"method='sobol', got 1000"):
        theory.Quadrature(samples=1000)
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'n' for quadrature"):
        theory.Quadrature.from_dict({"n": 3})
    assert theory.Quadrature(method="montecarlo", samples=1000).samples == 1000


def test_closed_form_is_refused_with_the_reason() -> None:
    """engine='closed_form' raises naming the pair and why; 'auto' falls back."""
    for norm, act, why in [("layernorm", "erf", "diagonal-scale"),
                           ("batchnorm", "relu", "no closed form")]:
        model = TeacherStudent(3, 2, activation=act)
        normalization = framework.get_normalization(norm)
        with pytest.raises(theory.ClosedFormUnavailable, match=f"'{norm}'.*{why}"):
            theory.select_engine(model, normalization, engine="closed_form")
        assert theory.select_engine(model, normalization).name == "generic"
    eng = theory.select_engine(TeacherStudent(3, 2), framework.get_normalization("batchnorm"))
    assert eng.name == "closed_form" and eng.exact and eng.trainable == ()
    rates = eng.rates(2.0 * np.eye(3), np.zeros((3, 2)), eta=0.5)
    assert rates.dparams == {} and np.all(rates.dQ_error == 0) and rates.eps_g_error == 0


# ---------------------------------------------------------------------------------------
# integration
# ---------------------------------------------------------------------------------------
def test_generic_integration_matches_closed_form_within_seed_spread() -> None:
    """Integrate with several independent quadrature seeds: the closed-form trajectory
    lies within Z standard errors of their mean."""
    model = TeacherStudent(2, 2, noise=0.05)
    norm = framework.get_normalization("batchnorm")
    op = OrderParameters([[0.9, 0.2], [0.2, 0.5]], [[0.3, 0.1], [0.0, 0.2]])
    alpha = [0.0, 1.0, 3.0]
    exact = theory.integrate(model, norm, op, eta=0.8, alpha=alpha)
    runs = [theory.integrate(model, norm, op, eta=0.8, alpha=alpha, engine="generic",
                             quadrature={"seed": s, "samples": 1024, "replicates": 4})
            for s in range(6)]
    assert all(r.engine == "generic" and not r.diverged for r in runs)
    for field in ("Q", "R", "eps_g"):
        vals = np.stack([getattr(r, field) for r in runs])
        sem = vals.std(axis=0, ddof=1) / np.sqrt(len(runs))
        # 6 runs: a t(5) tail beyond 6 standard errors has probability ~2e-3 per entry
        within(vals.mean(axis=0)[1:], getattr(exact, field)[1:], sem[1:])


def test_generic_integration_carries_trainable_parameters() -> None:
    model = TeacherStudent(2, 2)
    op = OrderParameters([[0.9, 0.2], [0.2, 0.5]], [[0.3, 0.1], [0.0, 0.2]])
    traj = theory.integrate(model, framework.get_normalization("weightnorm", g=0.5), op,
                            eta=0.8, alpha=[0.0, 0.5, 2.0], engine="generic")
    assert traj.engine == "generic" and set(traj.params) == {"g"}
    assert traj.params["g"].shape == (3, 2)
    np.testing.assert_array_equal(traj.params["g"][0], [0.5, 0.5])
    assert np.all(np.abs(traj.params["g"][-1] - 0.5) > 1e-3)  # the gain is trained
    assert traj.eps_g[-1] < traj.eps_g[0] and np.all(traj.eps_g_error < 1e-3)


@pytest.mark.parametrize("activation", ["erf", "relu", "tanh", "linear"])
@pytest.mark.parametrize("norm", sorted(framework.list_normalizations()))
def test_integrate_runs_for_every_normalization_and_activation(norm, activation) -> None:
    K = 4 if norm == "layernorm" else 2
    model = TeacherStudent(K, 2, activation=activation)
    e = Experiment(model, normalization=norm, eta=0.5, init_scale=0.7)
    # layer norm: E[a a^T] has infinite variance for K <= 5 (see LayerNorm's docstring);
    # relu: a piecewise-smooth quadrature right-hand side needs a loose tolerance
    traj = theory.integrate(model, e.normalization, e.initial_order_parameters(), eta=0.5,
                            alpha=[0.0, 0.1], second_order=norm != "layernorm",
                            rtol=1e-4 if activation == "relu" else 1e-10)
    assert not traj.diverged, traj.message
    assert np.all(np.isfinite(traj.eps_g)) and traj.Q.shape == (2, K, K)
    exact = theory.has_closed_form(model, e.normalization)
    assert (traj.engine == "generic") == (not exact)


@pytest.mark.parametrize(("norm", "activation"), [("layernorm", "erf"), ("batchnorm", "relu"),
                                                  ("weightnorm", "tanh")])
def test_dynamics_analyzer_with_the_generic_engine(norm, activation) -> None:
    K = 4 if norm == "layernorm" else 2
    options = {"alpha": [0.0, 0.2, 0.5], "second_order": norm != "layernorm",
               "rtol": 1e-4 if activation == "relu" else 1e-10}
    e = Experiment(TeacherStudent(K, 2, activation=activation), normalization=norm,
                   analyzers=[{"name": "dynamics", **options}], eta=0.5, init_scale=0.7)
    ds = e.run()["dynamics"]
    assert not bool(ds.diverged), ds.attrs["status"]
    assert np.all(np.isfinite(ds.eps_g.values))
    assert "generic expectation engine" in ds.attrs["theory"]
    assert np.all(ds.eps_g_error.values < 5e-3)
