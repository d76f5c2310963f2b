"""Learning rules as plugins: the registry and hook, option validation, ``sgd`` as
today's behaviour, and the natural-gradient ODE against an explicit finite-N network
(one-step increments) and against the simulation (trajectories)."""

from __future__ import annotations

from typing import ClassVar

import attrs
import numpy as np
import pytest
from scipy.special import erf

from framework import (
    Analyzer,
    Experiment,
    LearningRule,
    OrderParameters,
    PluginError,
    Registry,
    SpecificationError,
    TeacherStudent,
    UnknownNameError,
    get_learning_rule,
    get_normalization,
    hookimpl,
    list_learning_rules,
    register_plugin,
    theory,
    unregister_plugin,
)
from framework.cli import main
from framework.sweep import spec_hash
from framework.theory.fisher import weight_space_fisher
from plugins.learning_rules import SGD, Momentum, NaturalGradient
from plugins.simulation import HAVE_NUMBA

MODEL = TeacherStudent(K=2, M=2)
STATE = OrderParameters(Q=[[0.6, 0.15], [0.15, 0.45]], R=[[0.3, 0.1], [0.05, 0.25]],
                        T=np.eye(2))


# -- registry, hook, listing ------------------------------------------------------------
def test_builtin_rules_are_registered_and_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert list_learning_rules() == ["momentum", "natural_gradient", "sgd"]
    assert isinstance(get_learning_rule("sgd"), SGD)
    assert get_learning_rule("natural_gradient", damping=0.5) == NaturalGradient(damping=0.5)
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    block = out.split("learning_rules:\n")[1].split(":\n")[0]
    assert "natural_gradient" in block and "sgd" in block and "momentum" in block
    assert "[built-in]" in block


def test_unknown_rule_lists_the_installed_ones() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown learning_rule 'adam'; installed "
                       r"learning_rules: 'momentum', 'natural_gradient', 'sgd'"):
        get_learning_rule("adam")
    with pytest.raises(UnknownNameError, match="unknown learning_rule 'adam'"):
        Experiment(model=MODEL, learning_rule="adam")


def test_registry_validates_rule_classes() -> None:
    reg = Registry()
    with pytest.raises(PluginError, match="must be a subclass of LearningRule"):
        reg.add_learning_rule(object)  # type: ignore[arg-type]

    class NoDirection(LearningRule):
        name = "nodirection"
        description = "missing direction"

        def rates(self, engine, Q, R, params=None, **kw):  # type: ignore[override]
            return engine.rates(Q, R, params, **kw)

    with pytest.raises(PluginError, match="must implement direction"):
        reg.add_learning_rule(NoDirection)
    reg.add_learning_rule(SGD)
    with pytest.raises(PluginError, match=r"'sgd' .* is already registered"):
        reg.add_learning_rule(SGD)


@attrs.frozen
class _NoExactEngine(LearningRule):
    """A runtime rule that refuses exact engines (plain SGD otherwise)."""

    name: ClassVar[str] = "sgd_no_exact"
    description: ClassVar[str] = "plain SGD that refuses exact engines (test)"

    def supports(self, engine, model, normalization, activation):  # type: ignore[override]
        return "exact engines refused (test)" if engine.exact else None

    def rates(self, engine, Q, R, params=None, **kw):  # type: ignore[override]
        return engine.rates(Q, R, params, **kw)

    def direction(self, model, normalization, J, grad, state):  # type: ignore[override]
        return grad


class _RulePlugin:
    @staticmethod
    @hookimpl
    def symphase_register_learning_rules(registry: Registry) -> None:
        registry.add_learning_rule(_NoExactEngine)


def test_runtime_rule_through_the_hook_and_engine_fallback() -> None:
    register_plugin(_RulePlugin)
    try:
        assert "sgd_no_exact" in list_learning_rules()
        rule = get_learning_rule("sgd_no_exact")
        norm = get_normalization("plain")
        eng = theory.select_engine(MODEL, norm, rule=rule)  # closed form refused: generic
        assert eng.name == "generic" and isinstance(eng, theory.RuleEngine)
        with pytest.raises(theory.ClosedFormUnavailable,
                           match=r"under learning rule 'sgd_no_exact'.*exact engines refused"):
            theory.select_engine(MODEL, norm, rule=rule, engine="closed_form")
        exp = Experiment(model=MODEL, learning_rule="sgd_no_exact")
        assert exp.to_dict()["learning_rule"] == {"name": "sgd_no_exact"}
    finally:
        unregister_plugin(_RulePlugin)


def test_natural_gradient_supports_asks_for_the_exact_fisher() -> None:
    act = MODEL.activation_function()
    ng = NaturalGradient()
    layernorm = get_normalization("layernorm")
    assert "diagonal-scale" in ng.supports(theory.ClosedFormEngine, MODEL, layernorm, act)
    assert ng.supports(theory.ExpectationEngine, MODEL, layernorm, act) is None
    assert ng.supports(theory.ClosedFormEngine, MODEL, get_normalization("batchnorm"),
                       act) is None


# -- options and the specification ---------------------------------------------------------
@pytest.mark.parametrize(("options", "error", "match"), [
    ({"damping": "0.1"}, TypeError, r"'damping' must be a real number, got '0.1' \(str\)"),
    ({"damping": True}, TypeError, r"'damping' must be a real number, got True \(bool\)"),
    ({"damping": -1.0}, SpecificationError, r"'damping' must be >= 0.0, got -1.0"),
    ({"damping": float("inf")}, SpecificationError, r"'damping' must be finite"),
    ({"rcond": 0.0}, SpecificationError, r"'rcond' must be > 0.0, got 0.0"),
    ({"rcond": 1.0}, SpecificationError, r"'rcond' must be < 1, got 1.0"),
    ({"rcond": None}, TypeError, r"'rcond' must be a real number, got None"),
    ({"lr": 1.0}, SpecificationError,
     r"unknown option\(s\) 'lr' for learning_rule 'natural_gradient'; valid options: "
     r"'damping', 'rcond'"),
])
def test_natural_gradient_options_are_strict(options, error, match) -> None:
    with pytest.raises(error, match=match):
        get_learning_rule("natural_gradient", **options)


@pytest.mark.parametrize(("beta", "error", "match"), [
    (1.0, SpecificationError, r"'beta' must be < 1, got 1.0"),
    (-0.1, SpecificationError, r"'beta' must be >= 0.0, got -0.1"),
    ("0.9", TypeError, r"'beta' must be a real number, got '0.9' \(str\)"),
])
def test_momentum_options_are_strict(beta, error, match) -> None:
    with pytest.raises(error, match=match):
        get_learning_rule("momentum", beta=beta)


def test_sgd_has_no_options() -> None:
    with pytest.raises(SpecificationError, match=r"unknown option\(s\) 'momentum' for "
                       r"learning_rule 'sgd'; valid options: none"):
        get_learning_rule("sgd", momentum=0.9)


def test_default_rule_leaves_the_specification_and_its_hash_unchanged() -> None:
    base = Experiment(model=MODEL, analyzers=["dynamics"])
    explicit = Experiment(model=MODEL, analyzers=["dynamics"], learning_rule="sgd")
    assert "learning_rule" not in base.to_dict()
    assert base.to_dict() == explicit.to_dict()
    assert spec_hash(base) == spec_hash(explicit)
    ng = base.evolve(learning_rule={"name": "natural_gradient", "damping": 0.1})
    d = ng.to_dict()
    assert d["learning_rule"] == {"name": "natural_gradient", "damping": 0.1, "rcond": 1e-10}
    assert spec_hash(ng) != spec_hash(base)
    assert Experiment.from_json(ng.to_json()) == ng
    with pytest.raises(SpecificationError, match="'learning_rule' mapping needs a 'name'"):
        Experiment(model=MODEL, learning_rule={"damping": 0.1})
    with pytest.raises(TypeError, match="'learning_rule' must be a name, a mapping or a "
                       "LearningRule, got 3"):
        Experiment(model=MODEL, learning_rule=3)


def test_natural_gradient_refuses_trainable_parameters() -> None:
    with pytest.raises(SpecificationError, match=r"'natural_gradient' does not train "
                       r"parameters: normalization 'batchnorm_affine' trains \('gamma', "
                       r"'beta'\)"):
        Experiment(model=MODEL, normalization="batchnorm_affine",
                   learning_rule="natural_gradient")
    trained = TeacherStudent(K=2, M=2, second_layer="trained", eta_v=0.1)
    with pytest.raises(SpecificationError, match="the model's readout is trained"):
        Experiment(model=trained, learning_rule="natural_gradient")
    with pytest.raises(SpecificationError, match="does not train parameters"):
        theory.select_engine(trained, get_normalization("plain"), rule=NaturalGradient())


# -- sgd is today's behaviour ---------------------------------------------------------------
@pytest.mark.parametrize("norm", ["plain", "batchnorm", "layernorm"])
def test_sgd_is_the_engine_itself(norm: str) -> None:
    n = get_normalization(norm)
    assert theory.select_engine(MODEL, n, rule=SGD()) is theory.select_engine(MODEL, n)
    g = np.ones((1, 2, 5))
    assert SGD().direction(MODEL, n, g, g, {}) is g


def test_sgd_results_bit_for_bit() -> None:
    analyzers = [{"name": "dynamics", "alpha": [0, 1, 2]},
                 {"name": "simulation", "N": 60, "alpha": [0, 0.5], "replicas": 2,
                  "backend": "numpy"}]
    a = Experiment(model=MODEL, normalization="batchnorm", analyzers=analyzers).run()
    b = Experiment(model=MODEL, normalization="batchnorm", analyzers=analyzers,
                   learning_rule=SGD()).run()
    for name in a:
        for v in ("Q", "R", "eps_g"):
            assert np.array_equal(a[name][v].values, b[name][v].values)
        assert a[name].attrs["learning_rule"] == "sgd"
    assert a["dynamics"].attrs["integrator_backend"] == "numba"


# -- natural gradient: F -> identity, engines, reduction ---------------------------------------
@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_large_damping_scaled_back_is_sgd(norm: str) -> None:
    """(F + lambda)^-1 -> 1/lambda: eta * lambda with damping lambda is SGD at eta."""
    n = get_normalization(norm)
    lam, eta = 1e5, 0.3
    sgd = theory.select_engine(MODEL, n).rates(STATE.Q, STATE.R, eta=eta)
    ng = theory.select_engine(MODEL, n, rule=NaturalGradient(damping=lam)).rates(
        STATE.Q, STATE.R, eta=eta * lam)
    np.testing.assert_allclose(ng.dQ, sgd.dQ, rtol=0, atol=1e-4 * np.abs(sgd.dQ).max())
    np.testing.assert_allclose(ng.dR, sgd.dR, rtol=0, atol=1e-4 * np.abs(sgd.dR).max())
    assert ng.eps_g == sgd.eps_g


def test_large_damping_on_the_generic_engine_any_activation() -> None:
    model = TeacherStudent(K=2, M=2, activation="tanh")
    n = get_normalization("batchnorm")
    lam, eta = 1e5, 0.3
    sgd = theory.select_engine(model, n).rates(STATE.Q, STATE.R, eta=eta)
    ng = theory.select_engine(model, n, rule=NaturalGradient(damping=lam)).rates(
        STATE.Q, STATE.R, eta=eta * lam)
    assert ng.dQ_error.max() > 0  # estimates
    assert np.all(np.abs(ng.dQ - sgd.dQ) <= 5 * (ng.dQ_error + sgd.dQ_error) + 1e-12)
    assert np.all(np.abs(ng.dR - sgd.dR) <= 5 * (ng.dR_error + sgd.dR_error) + 1e-12)


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_closed_form_and_generic_agree(norm: str) -> None:
    n = get_normalization(norm)
    rule = NaturalGradient()
    cf = theory.select_engine(MODEL, n, rule=rule).rates(STATE.Q, STATE.R, eta=0.5)
    ge = theory.select_engine(MODEL, n, rule=rule, engine="generic").rates(
        STATE.Q, STATE.R, eta=0.5)
    assert cf.dQ_error.max() == 0 and cf.dR_error.max() == 0
    assert np.all(np.abs(cf.dQ - ge.dQ) <= 5 * ge.dQ_error)
    assert np.all(np.abs(cf.dR - ge.dR) <= 5 * ge.dR_error)


def _full_pseudo_inverse(F: np.ndarray, damping: float, rcond: float = 1e-10) -> np.ndarray:
    lam, vec = np.linalg.eigh(F + damping * np.eye(F.shape[0]))
    keep = lam > rcond * lam[-1]
    return (vec[:, keep] / lam[keep]) @ vec[:, keep].T


@pytest.mark.parametrize(("norm", "damping"), [("plain", 0.0), ("batchnorm", 0.0),
                                               ("batchnorm", 0.3)])
def test_direction_is_the_full_inverse_fisher(norm: str, damping: float) -> None:
    """The O(N K) span/complement reduction equals (F + lambda)^+ of the whole K N x K N
    Fisher applied to an arbitrary gradient."""
    n = get_normalization(norm)
    N, rng = 150, np.random.default_rng(3)
    J = np.stack([MODEL.realize(STATE, N, rng)[0] for _ in range(2)])
    grad = rng.standard_normal(J.shape)
    rule = NaturalGradient(damping=damping)
    out = rule.direction(MODEL, n, J, grad, {})
    for i in range(2):
        W = J[i] / np.sqrt(N)
        Finv = _full_pseudo_inverse(weight_space_fisher(MODEL, n, W @ W.T).matrix(W), damping)
        ref = (Finv @ grad[i].ravel()).reshape(grad[i].shape)
        np.testing.assert_allclose(out[i], ref, rtol=0, atol=1e-9 * np.abs(ref).max())


# -- one-step increments of an explicit network -----------------------------------------------
def _g(u: np.ndarray) -> np.ndarray:
    return erf(u / np.sqrt(2.0))


def _gp(u: np.ndarray) -> np.ndarray:
    return np.sqrt(2.0 / np.pi) * np.exp(-0.5 * u * u)


def _increments(norm: str, damping: float, eta: float, N: int, S: int, seed: int):
    """``N (Q' - Q)``, ``N (R' - R)`` of one natural-gradient step of the explicit
    network (gradient by hand, the whole K N x K N Fisher inverted), per sample."""
    rng = np.random.default_rng(seed)
    J, B = MODEL.realize(STATE, N, rng)
    W, Bt = J / np.sqrt(N), B / np.sqrt(N)
    K, Q, R = 2, W @ W.T, W @ Bt.T
    n = get_normalization(norm)
    Finv = _full_pseudo_inverse(weight_space_fisher(MODEL, n, Q).matrix(W), damping)
    dQ, dR = [], []
    for _ in range(S // 2000):
        xi = rng.standard_normal((2000, N))
        x, y = xi @ W.T, xi @ Bt.T
        zeta = _g(y).sum(axis=1)
        if norm == "plain":
            err = zeta - _g(x).sum(axis=1)
            grad = -err[:, None, None] * _gp(x)[:, :, None] * xi[:, None, :]
        else:  # x~_i = x_i / sqrt(Q_ii), the gradient through Q_ii = |W_i|^2
            q = np.diag(Q)
            xt = x / np.sqrt(q)
            err = zeta - _g(xt).sum(axis=1)
            dxt = xi[:, None, :] / np.sqrt(q)[None, :, None] - (x / q**1.5)[:, :, None] * W
            grad = -err[:, None, None] * _gp(xt)[:, :, None] * dxt
        W2 = W - (eta / N) * (grad.reshape(len(xi), K * N) @ Finv).reshape(len(xi), K, N)
        dQ.append(N * (W2 @ np.swapaxes(W2, 1, 2) - Q))
        dR.append(N * (W2 @ Bt.T - R))
    return Q, R, np.concatenate(dQ), np.concatenate(dR)


@pytest.mark.parametrize(("norm", "damping"), [("plain", 0.0), ("batchnorm", 0.0),
                                               ("plain", 0.1)])
def test_one_step_increments_match_the_rates(norm: str, damping: float) -> None:
    """Monte Carlo of N * (one-step increment) at N = 500 over 10^4 samples, against
    dQ/dalpha and dR/dalpha (eta^2 term included), within 5 standard errors.
    (Measured: |z| <= 3.0 over seeds 1-4 with damping 0.)"""
    eta = 0.5
    Q, R, dQ, dR = _increments(norm, damping, eta, N=500, S=10_000, seed=1)
    rule = NaturalGradient(damping=damping)
    r = theory.select_engine(MODEL, get_normalization(norm), rule=rule).rates(Q, R, eta=eta)
    for mc, th in ((dQ, r.dQ), (dR, r.dR)):
        se = mc.std(axis=0, ddof=1) / np.sqrt(mc.shape[0])
        z = (mc.mean(axis=0) - th) / se
        assert np.all(np.abs(z) < 5.0), (mc.mean(axis=0), se, th)


# -- the ODE against the simulation --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_ode_matches_the_simulation(norm: str) -> None:
    """K = M = 2, N = 500, 16 replicas, eta = 0.2, alpha = 0.5 and 1: the replica means
    of Q and R within 5 standard errors of the ODE (measured |z| <= 2.3)."""
    exp = Experiment(
        model=MODEL, normalization=norm, learning_rule="natural_gradient", eta=0.2,
        init=STATE, analyzers=[
            {"name": "dynamics", "alpha": [0, 0.5, 1.0], "rtol": 1e-8, "atol": 1e-10},
            {"name": "simulation", "N": 500, "alpha": [0, 0.5, 1.0], "replicas": 16}])
    out = exp.run()
    ode, sim = out["dynamics"], out["simulation"]
    assert sim.attrs["backend"] == "numpy"
    assert ode.attrs["learning_rule"] == sim.attrs["learning_rule"] == "natural_gradient"
    for v in ("Q", "R"):
        z = (sim[f"{v}_mean"].values[1:] - ode[v].values[1:]) / sim[f"{v}_sem"].values[1:]
        assert np.all(np.abs(z) < 5.0), z


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
def test_compiled_kernel_refuses_other_rules() -> None:
    with pytest.raises(SpecificationError, match=r"'backend' must be 'auto' or 'numpy' here "
                       r"\(learning rule 'natural_gradient' is not in the compiled kernel"):
        Experiment(model=MODEL, learning_rule="natural_gradient",
                   analyzers=[{"name": "simulation", "backend": "numba"}]).run()


@attrs.frozen
class _BlindAnalyzer(Analyzer):
    """An analyzer that does not declare supports_learning_rules (test)."""

    name: ClassVar[str] = "blind_to_rules"
    description: ClassVar[str] = "computes under the plain gradient step only (test)"

    def run(self, experiment):  # type: ignore[override]
        raise NotImplementedError


class _BlindPlugin:
    @staticmethod
    @hookimpl
    def symphase_register_analyzers(registry: Registry) -> None:
        registry.add_analyzer(_BlindAnalyzer)


def test_analyzers_blind_to_the_rule_are_refused() -> None:
    register_plugin(_BlindPlugin)
    try:
        with pytest.raises(SpecificationError, match=r"analyzer\(s\) 'blind_to_rules' "
                           r"compute under the plain gradient step only, not under "
                           r"learning_rule 'natural_gradient'"):
            Experiment(model=MODEL, learning_rule="natural_gradient",
                       analyzers=["dynamics", "blind_to_rules"])
        Experiment(model=MODEL, analyzers=["dynamics", "blind_to_rules"])  # sgd: any
    finally:
        unregister_plugin(_BlindPlugin)
    # the built-in analyzers all take a rule (the equilibrium ones through their engine)
    Experiment(model=MODEL, learning_rule="natural_gradient",
               analyzers=["dynamics", "fixedpoint", "hessian", "escape", "fisher"])


# -- momentum in the online limit ------------------------------------------------------------
def test_momentum_rates_are_sgd_at_the_effective_rate() -> None:
    n = get_normalization("batchnorm")
    rule = Momentum(beta=0.75)
    r = theory.select_engine(MODEL, n, rule=rule).rates(STATE.Q, STATE.R, eta=0.1)
    s = theory.select_engine(MODEL, n).rates(STATE.Q, STATE.R, eta=0.4)
    assert np.array_equal(r.dQ, s.dQ) and np.array_equal(r.dR, s.dR)
    with pytest.raises(SpecificationError, match="'momentum' does not train parameters"):
        Experiment(model=MODEL, normalization="batchnorm_affine", learning_rule="momentum")


def test_momentum_velocity_is_kept_over_the_run() -> None:
    rule, state = Momentum(beta=0.5), {}
    g = np.ones((1, 2, 3))
    assert np.array_equal(rule.direction(MODEL, None, g, g, state), g)
    assert np.array_equal(rule.direction(MODEL, None, g, 2 * g, state), 2.5 * g)


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_momentum_ode_matches_the_simulation(norm: str) -> None:
    """Heavy ball at beta = 0.8, eta = 0.1 (SGD at 0.5 in the online limit), N = 1000,
    16 replicas: the replica means of Q and R within 5 standard errors of the ODE. (The
    finite-N deviation of Q_11 at alpha = 2 was 3 SE at N = 250 and 2 SE at N = 1000 with
    64 replicas: an O(1 / ((1 - beta) N)) effect of the velocity's memory.)"""
    exp = Experiment(
        model=MODEL, normalization=norm, learning_rule={"name": "momentum", "beta": 0.8},
        eta=0.1, init=STATE, analyzers=[
            {"name": "dynamics", "alpha": [0, 1.0, 2.0], "rtol": 1e-8, "atol": 1e-10},
            {"name": "simulation", "N": 1000, "alpha": [0, 1.0, 2.0], "replicas": 16}])
    out = exp.run()
    ode, sim = out["dynamics"], out["simulation"]
    for v in ("Q", "R"):
        z = (sim[f"{v}_mean"].values[1:] - ode[v].values[1:]) / sim[f"{v}_sem"].values[1:]
        assert np.all(np.abs(z) < 5.0), z


def test_learning_rule_in_toml_and_sweeps(tmp_path):
    """TOML takes ``learning_rule`` (a name or a table) and a sweep grids over it."""
    from framework._toml import read_toml

    f = tmp_path / "x.toml"
    f.write_text('[model]\nK = 2\nM = 2\n[learning_rule]\nname = "momentum"\nbeta = 0.5\n'
                 '[analyzers.dynamics]\nalpha_max = 2.0\n')
    sweep, _ = read_toml(f)
    assert sweep.experiment.learning_rule.to_dict() == {"name": "momentum", "beta": 0.5}
    f.write_text('learning_rule = 1\n[model]\nK = 2\nM = 2\n')
    with pytest.raises(Exception, match="learning_rule"):
        read_toml(f)
    exp = Experiment(TeacherStudent(K=2, M=2), eta=0.3,
                     analyzers=[{"name": "dynamics", "alpha_max": 2.0, "n_points": 5}])
    ds = exp.sweep(learning_rule=["sgd", {"name": "momentum", "beta": 0.5}],
                   scheduler="synchronous", progress=False)["dynamics"]
    assert ds.sizes["learning_rule"] == 2
    # momentum at beta is SGD at eta / (1 - beta) in the online limit
    ref = Experiment(TeacherStudent(K=2, M=2), eta=0.6,
                     analyzers=[{"name": "dynamics", "alpha_max": 2.0, "n_points": 5}]).run()
    np.testing.assert_allclose(ds.eps_g.isel(learning_rule=1).values,
                               ref["dynamics"].eps_g.values, rtol=1e-6)


# -- the joint cone of (Q, R, T): converged natural-gradient runs ----------------------------
def test_converged_natural_gradient_run_never_reports_a_negative_error() -> None:
    """The defect: with damping 0.1 at eta = 0.5 the run converged (eps_g ~ 1e-13), then
    left the joint cone with Q still PSD (only Q was checked) and eps_g went to -2e-9,
    -2e-3 before the run stopped ('step size became too small'): near the optimum, a
    corner of the joint cone, a state crossed by the integrator's error is on a line of
    fixed points of the rule's extension beyond the cone (Z = sqrt(T - Y Y^T) clipped at
    0: a teacher the student matches) and drifted out. Now either the run converges
    cleanly or it stops at the joint cone with a message saying so; every reported row
    is inside the joint cone and no eps_g is negative."""
    exp = Experiment(model=MODEL, normalization="plain", eta=0.5, seed=0,
                     learning_rule={"name": "natural_gradient", "damping": 0.1})
    grid = np.concatenate([[0.0], np.geomspace(0.01, 2000.0, 200)])
    tr = theory.integrate(MODEL, exp.normalization, exp.initial_order_parameters(), eta=0.5,
                          alpha=grid, rule=exp.learning_rule)
    assert np.all(tr.eps_g >= 0.0), tr.eps_g.min()
    joint = [np.linalg.eigvalsh(np.block([[Q, R], [R.T, np.eye(2)]]))[0]
             for Q, R in zip(tr.Q, tr.R, strict=True)]
    assert min(joint) >= 0.0
    assert tr.eps_g[-1] < 1e-10  # converged
    if tr.diverged:
        assert "leads out of the joint cone" in tr.message, tr.message
        assert "eps_g = " in tr.message and tr.alpha[-1] > 100.0
    else:
        assert tr.alpha[-1] == 2000.0


def test_leaving_the_joint_cone_stops_with_a_message() -> None:
    """A state that leaves the joint cone while Q stays PSD stops the run under a rule,
    the rows reached kept, with a message naming the cause; an initial state outside is
    refused."""
    from framework.theory.ruled import RuleEngine

    @attrs.frozen
    class Outward(LearningRule):  # R grows along itself: |R_ii| > 1 = sqrt(Q_ii T_ii) soon
        name: ClassVar[str] = "outward_test"
        description: ClassVar[str] = "test rule: dR = R"

        def rates(self, engine, Q, R, params=None, *, eta, batch_size=1, second_order=True,
                  check=True):
            eps, _ = engine.generalization_error(Q, R, params, check=False)
            return theory.Rates(np.zeros_like(Q), np.asarray(R, dtype=float), {}, eps,
                                np.zeros_like(Q), np.zeros_like(R), {}, 0.0)

        def direction(self, model, normalization, J, grad, state):
            return grad

    base = theory.select_engine(MODEL, get_normalization("plain"))
    engine = RuleEngine(base, Outward())
    tr = engine.integrate(np.eye(2), 0.9 * np.eye(2), eta=0.1,
                          alpha=np.linspace(0.0, 1.0, 101))
    assert tr.diverged and "leads out of the joint cone" in tr.message, tr.message
    # R = 0.9 e^alpha reaches the boundary R = 1 at alpha = ln(1/0.9) = 0.1054
    assert tr.alpha[-1] == pytest.approx(0.1) and abs(tr.alpha_diverged - 0.1054) < 1e-3
    assert "alpha = 0.105" in tr.message
    assert tr.eps_g.min() >= 0.0
    with pytest.raises(SpecificationError, match="initial state is outside the joint cone"):
        engine.integrate(np.eye(2), 1.2 * np.eye(2), eta=0.1, alpha=np.linspace(0, 1, 3))
