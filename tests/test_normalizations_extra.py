"""The five extra normalizations: contract, ODE against the expected one-step increment of
finite-N online SGD, special cases, and a short simulation."""

from __future__ import annotations

import numpy as np
import pytest

import framework
from framework import Experiment, OrderParameters, TeacherStudent, theory
from framework.testing import NormalizationContract
from framework.theory import _kernels as _theory

EXTRA = ["weightnorm", "batchnorm_affine", "meanonly", "layernorm", "batchnorm_stopgrad"]
VARIANTS = [
    ("weightnorm", {"g": 1.3}),
    ("batchnorm_affine", {"gamma": 1.2, "beta": 0.3, "eps": 0.1}),
    ("batchnorm_stopgrad", {"gamma": 0.8, "eps": 0.05}),
    ("layernorm", {"eps": 0.1}),
    ("meanonly", {}),
]


def test_registered_right_after_the_basic_normalizations() -> None:
    plugins = framework.DEFAULT_PLUGINS
    assert plugins.index("plugins.normalizations_extra") == \
        plugins.index("plugins.normalizations") + 1
    assert set(EXTRA) <= set(framework.list_normalizations())


class TestVariants(NormalizationContract):
    @pytest.fixture(params=VARIANTS, ids=[v[0] for v in VARIANTS])
    def normalization(self, request: pytest.FixtureRequest) -> framework.Normalization:
        name, options = request.param
        return framework.get_normalization(name, **options)


# ---------------------------------------------------------------------------------------
# ODE against the expected one-step increment of finite-N SGD
# ---------------------------------------------------------------------------------------
def _state(K, M, seed, norms=None):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    A = rng.uniform(-1, 1, (K + M, K + M))
    C = A @ A.T / (K + M) + 0.2 * np.eye(K + M)
    if norms is not None:  # student norms far from 1, so that a scale matters
        D = np.diag(np.concatenate([norms, np.ones(M)]))
        C = D @ C @ D
    return C[:K, :K], C[:K, K:], C[K:, K:]


def _sgd_increments(model, norm, params, Q, R, N, eta, samples, seed):  # type: ignore[no-untyped-def]
    """Per-sample ``N dQ``, ``N dR``, ``N dtheta`` of one online SGD step (population
    statistics of the current weights, gradient through them, as the ``simulation``
    analyzer does) and the known O(1/N) terms of ``E[N dQ]`` in absolute value.

    With ``dJ = (eta / sqrt N) a xi^T + (eta / N) C_s J`` (``a = -d eps/dx``,
    ``C_s = -(G_s + G_s^T)``, ``G_s`` the per-sample ``d eps / d Q``) exactly,
    ``N dQ = eta (a x^T + x a^T + C_s Q + Q C_s^T) + eta^2 a a^T |xi|^2 / N
    + (eta^2 / N) (a x^T C_s^T + C_s x a^T + C_s Q C_s^T)``, ``N dR = eta (a y^T + C_s R)``
    and ``N dtheta = -eta d eps / d theta``. Averaging the out-of-span part of
    ``|xi|^2`` leaves the bias ``(eta^2 / N) E[a a^T (|u|^2 - P) + a x^T C_s^T + C_s x a^T
    + C_s Q C_s^T]`` (``u`` the ``P = K + M`` in-span coordinates), bounded by the mean
    absolute value of the bracket.
    """
    K, M = R.shape
    P = K + M
    act = framework.get_activation(model.activation)
    J, B = OrderParameters(Q, R, model.T).realize(N, np.random.default_rng(seed))
    # realize() may rotate: use the exact overlaps of the realization
    Q, R = J @ J.T / N, J @ B.T / N
    # the in-span coordinates of xi: an orthonormal basis of the rows of (J; B)
    basis = np.linalg.qr(np.vstack([J, B]).T)[0]  # (N, P)
    rng = np.random.default_rng(seed + 1)
    out = {"dQ": [], "dR": [], "bias": [], **{k: [] for k in norm.trainable}}
    chunk = 2000
    stats = norm.population_statistics(Q) if norm.statistics_names else {}
    for _ in range(samples // chunk):
        xi = rng.standard_normal((chunk, N))
        nu = rng.standard_normal(chunk) * np.sqrt(model.noise)
        x, y = xi @ J.T / np.sqrt(N), xi @ B.T / np.sqrt(N)
        xt = norm.forward(x, stats, params)
        e = act.g(y).sum(-1) + nu - act.g(xt).sum(-1)
        bw = norm.backward(x, stats, params, -e[:, None] * act.gprime(xt))
        a = -bw.x
        G = norm.population_statistics_vjp(np.broadcast_to(Q, (chunk, K, K)), bw.stats) \
            if norm.statistics_names else np.zeros((chunk, K, K))
        Cs = -(G + np.swapaxes(G, 1, 2))
        Jn = J[None] + (eta / np.sqrt(N)) * a[:, :, None] * xi[:, None, :] + (eta / N) * Cs @ J
        out["dQ"].append(N * (Jn @ np.swapaxes(Jn, 1, 2) / N - Q))
        out["dR"].append(N * (Jn @ B.T / N - R))
        for k in norm.trainable:
            out[k].append(-eta * bw.params[k])
        u2 = np.sum((xi @ basis) ** 2, axis=1) - P
        aa = a[:, :, None] * a[:, None, :]
        axC = a[:, :, None] * np.einsum("nj,nkj->nk", x, Cs)[:, None, :]
        out["bias"].append(np.abs(aa * u2[:, None, None] + axC + np.swapaxes(axC, 1, 2)
                                  + Cs @ Q @ np.swapaxes(Cs, 1, 2)))
    res = {k: np.concatenate(v) for k, v in out.items()}
    res["bias"] = eta**2 * res["bias"].mean(0) / N
    return res, Q, R


def _mean_sem(v):  # type: ignore[no-untyped-def]
    return v.mean(0), v.std(0, ddof=1) / np.sqrt(v.shape[0])


CASES = [
    ("weightnorm", {"g": 1.3}, "erf", 3, [0.6, 1.5, 2.2]),
    ("batchnorm_affine", {"gamma": 1.2, "beta": 0.3}, "erf", 3, [0.6, 1.5, 2.2]),
    ("batchnorm_stopgrad", {}, "erf", 3, [0.6, 1.5, 2.2]),
    ("meanonly", {}, "erf", 3, None),
    ("layernorm", {"eps": 0.1}, "erf", 4, None),
    ("plain", {}, "tanh", 3, None),
    ("batchnorm", {}, "relu", 3, [0.6, 1.5, 2.2]),
]


@pytest.mark.parametrize(("name", "options", "activation", "K", "norms"), CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_ode_is_the_expected_one_step_sgd_increment(name, options, activation, K, norms) -> None:
    M, N, eta = 2, 400, 0.8
    norm = framework.get_normalization(name, **options)
    model0 = TeacherStudent(K, M, activation=activation)
    Q, R, T = _state(K, M, seed=7, norms=norms)
    model = TeacherStudent(K, M, T=T, noise=0.1, activation=activation)
    params = {k: np.asarray(v, dtype=float) for k, v in norm.parameters(K).items()}
    for k in norm.trainable:  # parameters away from their initial values
        params[k] = params[k] + np.linspace(-0.2, 0.3, K)
    inc, Q, R = _sgd_increments(model, norm, params, Q, R, N, eta, samples=60_000, seed=11)
    eng = theory.expectation_engine(model, norm)
    r = eng.rates(Q, R, params, eta=eta)
    z = 5.0
    mQ, sQ = _mean_sem(inc["dQ"])
    mR, sR = _mean_sem(inc["dR"])
    assert np.all(np.abs(mQ - r.dQ) <= z * (sQ + r.dQ_error) + inc["bias"]), (mQ, r.dQ, sQ)
    assert np.all(np.abs(mR - r.dR) <= z * (sR + r.dR_error)), (mR, r.dR, sR)  # no 1/N term
    for k in norm.trainable:
        m, s = _mean_sem(inc[k])
        assert np.all(np.abs(m - r.dparams[k]) <= z * (s + r.dparams_error[k])), (k, m, r)
    # the check has teeth: the drift is resolved
    assert np.abs(r.dQ).max() > 10 * sQ.max() and np.abs(r.dR).max() > 10 * sR.max()
    # where a closed form exists the facade uses it, and it agrees too
    if theory.has_closed_form(model0, norm):
        dQ, dR = theory.ode_rhs(model, norm, Q, R, eta, params=params)
        assert np.all(np.abs(mQ - dQ) <= z * sQ + inc["bias"])
        assert np.all(np.abs(mR - dR) <= z * sR)


# ---------------------------------------------------------------------------------------
# special cases
# ---------------------------------------------------------------------------------------
def test_meanonly_ode_is_the_plain_ode_but_batch_statistics_differ() -> None:
    model = TeacherStudent(3, 2, noise=0.1)
    Q, R, _ = _state(3, 2, seed=1)
    mo, plain = (framework.get_normalization(n) for n in ("meanonly", "plain"))
    for a, b in zip(theory.ode_rhs(model, mo, Q, R, 0.7), theory.ode_rhs(model, plain, Q, R, 0.7),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).standard_normal((4, 3))
    out = mo.forward(x, mo.batch_statistics(x), {})
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-15)
    assert not np.allclose(out, x)


def test_batchnorm_stopgrad_has_no_c_term_and_its_norms_drift() -> None:
    Q, R, T = _state(3, 2, seed=2, norms=[0.6, 1.5, 2.2])
    model = TeacherStudent(3, 2, T=T)
    sg = framework.get_normalization("batchnorm_stopgrad")
    bn = framework.get_normalization("batchnorm")
    s = 1 / np.sqrt(np.diag(Q))
    dQ, dR = theory.ode_rhs(model, sg, Q, R, 0.5, second_order=False)
    ref = _theory.ode_rhs(Q, R, T, s, None, eta=0.5, second_order=False)  # C = 0
    np.testing.assert_allclose(dQ, ref[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dR, ref[1], rtol=1e-12, atol=1e-14)
    dQ_bn, _ = theory.ode_rhs(model, bn, Q, R, 0.5, second_order=False)
    assert np.abs(np.diag(dQ_bn)).max() < 1e-14  # batch norm: J_i's update is orthogonal
    assert np.abs(np.diag(dQ)).min() > 1e-4  # stop-gradient: the norms drift
    r = theory.expectation_engine(model, sg).rates(Q, R, eta=0.5, second_order=False)
    assert np.all(np.abs(r.dQ - dQ) <= 6 * r.dQ_error + 1e-12)


def test_weightnorm_moves_like_batchnorm_plus_its_gain() -> None:
    """With the same forward map and gradient path, (Q, R) rates equal batch norm's."""
    model = TeacherStudent(3, 2, noise=0.05)
    Q, R, T = _state(3, 2, seed=3, norms=[0.6, 1.5, 2.2])
    model = TeacherStudent(3, 2, T=T, noise=0.05)
    wn = framework.get_normalization("weightnorm", g=1.4)
    r = theory.expectation_engine(model, wn).rates(Q, R, eta=0.6)
    dQ, dR = theory.ode_rhs(model, framework.get_normalization("batchnorm", gamma=1.4),
                            Q, R, 0.6)
    assert np.all(np.abs(r.dQ - dQ) <= 6 * r.dQ_error + 1e-12)
    assert np.all(np.abs(r.dR - dR) <= 6 * r.dR_error + 1e-12)
    assert np.abs(r.dparams["g"]).min() > 10 * r.dparams_error["g"].max()
    with pytest.raises(NotImplementedError, match="use statistics='population'"):
        wn.batch_statistics(np.zeros((4, 3)))


def test_layernorm_needs_two_units() -> None:
    ln = framework.get_normalization("layernorm")
    msg = r"'K' must be >= 2 for normalization 'layernorm' \(it normalizes across the K " \
          r"hidden units of each sample\), got 1"
    with pytest.raises(ValueError, match=msg):
        ln.parameters(1)
    with pytest.raises(ValueError, match=msg):
        Experiment(TeacherStudent(1, 1), normalization="layernorm",
                   analyzers=["dynamics"]).run()
    x = np.random.default_rng(1).standard_normal((5, 4))
    out = ln.forward(x, {}, {})
    np.testing.assert_allclose(out.mean(-1), 0, atol=1e-14)
    np.testing.assert_allclose(out.std(-1), 1, rtol=1e-12)


# ---------------------------------------------------------------------------------------
# against the simulation analyzer
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["weightnorm", "batchnorm_affine", "layernorm"])
def test_ode_agrees_with_a_short_simulation(name) -> None:
    """Finite-N SGD (the ``simulation`` analyzer, population statistics) against the
    generic engine's ODE from the same start: replicate means within 5 standard errors
    (the O(1/N) drift difference is far below them at N = 1000, alpha <= 1)."""
    K = 4 if name == "layernorm" else 2
    options = {"eps": 0.1} if name == "layernorm" else {"g": 0.7} if name == "weightnorm" \
        else {"beta": 0.2}
    alpha = [0.0, 0.5, 1.0]
    e = Experiment(
        TeacherStudent(K, 2), normalization={"name": name, **options}, eta=0.5,
        init_scale=0.7, seed=3,
        analyzers=[{"name": "simulation", "N": 1000, "alpha": alpha, "replicas": 8}],
    )
    sim = e.run()["simulation"]
    traj = theory.integrate(e.model, e.normalization, e.initial_order_parameters(),
                            eta=e.eta, alpha=alpha)
    # weightnorm with erf: the exact engine (gain as state); the others: the generic one
    assert traj.engine == ("closed_form" if name == "weightnorm" else "generic")
    for var in ("Q", "R"):
        m, s = sim[f"{var}_mean"].values[1:], sim[f"{var}_sem"].values[1:]
        d = getattr(traj, var)[1:]
        assert np.all(np.abs(m - d) <= 5 * s), (var, m, d, s)
    for k, v in traj.params.items():
        ps = sim[f"param_{k}"].values  # (replica, alpha, K); deterministic at N -> inf
        m, s = ps.mean(0)[1:], ps.std(0, ddof=1)[1:] / np.sqrt(ps.shape[0])
        assert np.all(np.abs(m - v[1:]) <= 5 * s), (k, m, v, s)
        assert np.all(np.abs(v[-1] - v[0]) > 5 * s[-1])  # and they did move
