"""Fixed points, Jacobians and escape under a learning rule (the equilibrium analyzers take
the engine :func:`framework.theory.select_engine` returns for the experiment's rule).

Physics checked: the symmetric plateau is a fixed point of the natural-gradient ODE, its
unstable rate is far larger than SGD's and the escape from the same start far shorter
(Rattray, Saad & Amari 1998); momentum is SGD at ``eta / (1 - beta)`` exactly; the
Jacobian is that of the rule's rates; the escape time is the one of a ``dynamics`` run
under the rule from the same start."""

from __future__ import annotations

import numpy as np
import pytest

from framework import Experiment, OrderParameters, TeacherStudent, theory
from framework.theory import equilibrium as eq
from plugins.learning_rules import NaturalGradient

MODEL = TeacherStudent(K=2, M=2)
ETA = 0.1


def _plateau(ds):
    b = int(np.argmax(ds.is_plateau.values))
    assert ds.is_plateau.values[b]
    return ds.isel(branch=b)


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_natural_gradient_plateau_is_a_fixed_point_and_far_more_unstable(norm: str) -> None:
    runs = {rule: Experiment(model=MODEL, normalization=norm, eta=ETA, learning_rule=rule,
                             analyzers=["fixedpoint"]).run()["fixedpoint"]
            for rule in ("sgd", "natural_gradient")}
    ng, sgd = _plateau(runs["natural_gradient"]), _plateau(runs["sgd"])
    assert runs["natural_gradient"].attrs["learning_rule"] == "natural_gradient"
    assert runs["sgd"].attrs["learning_rule"] == "sgd"
    assert float(ng.residual) < 1e-10
    R, Q = ng.R.values, ng.Q.values
    assert np.allclose(R, R[0, 0], atol=1e-10)  # symmetric: unspecialized students
    assert abs(Q[0, 0] - Q[1, 1]) < 1e-10 and Q[0, 1] < Q[0, 0] - 1e-3  # inside the cone
    # eps_g of the same order as SGD's plateau (a different point: the eta^2 term differs)
    assert 0.5 < float(ng.eps_g) / float(sgd.eps_g) < 2.0
    rate_ng = float(ng.jacobian_eigenvalue_real.max())
    rate_sgd = float(sgd.jacobian_eigenvalue_real.max())
    assert rate_sgd > 0 and rate_ng > 10.0 * rate_sgd


def test_natural_gradient_jacobian_matches_differences_of_the_rule_rates() -> None:
    """ode_jacobian (Richardson, steps inside the cone) against one central difference of
    NaturalGradient.rates on the wrapped engine along each of its eigenvectors."""
    norm = Experiment(model=MODEL).normalization
    rule = NaturalGradient()
    eng = theory.select_engine(MODEL, norm, rule=rule)
    assert isinstance(eng, theory.RuleEngine) and not eng.analytic_beyond_cone
    fps = eq.find_fixed_points(MODEL, norm, eta=ETA, engine=eng)
    fp = fps[int(np.argmax([fp.eps_g for fp in fps]))]
    jac = eq.ode_jacobian(MODEL, norm, fp.Q, fp.R, eta=ETA, engine=eng)
    coords = eq.jacobian_coordinates(MODEL, norm, eng)

    def f(x: np.ndarray) -> np.ndarray:
        Q, R = np.array(fp.Q), np.array(fp.R)
        for (v, i, k), xj in zip(coords, x, strict=True):
            if v == "Q":
                Q[i, k] = Q[k, i] = xj
            else:
                R[i, k] = xj
        r = rule.rates(eng.base, Q, R, eta=ETA)
        return np.array([(r.dQ if v == "Q" else r.dR)[i, k] for v, i, k in coords]) / ETA

    x0 = np.array([(fp.Q if v == "Q" else fp.R)[i, k] for v, i, k in coords])
    lam, vec = np.linalg.eig(jac)
    h = 1e-6
    for j in np.argsort(-lam.real)[:3]:
        v = np.real(vec[:, j])
        fd = (f(x0 + h * v) - f(x0 - h * v)) / (2 * h)
        assert np.allclose(fd, jac @ v, rtol=0, atol=1e-6 * max(1.0, abs(lam[j])))
    assert lam.real.max() > 1.0  # the unstable rate (SGD's: 0.065)


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_momentum_unstable_rate_is_sgd_at_the_effective_eta(norm: str) -> None:
    beta = 0.5
    mom = Experiment(model=MODEL, normalization=norm, eta=ETA,
                     learning_rule={"name": "momentum", "beta": beta},
                     analyzers=["fixedpoint"]).run()["fixedpoint"]
    sgd = Experiment(model=MODEL, normalization=norm, eta=ETA / (1 - beta),
                     analyzers=["fixedpoint"]).run()["fixedpoint"]
    assert mom.attrs["learning_rule"] == "momentum"
    pm, ps = _plateau(mom), _plateau(sgd)
    # rates are per unit of eta alpha: per unit of alpha they are the same
    rate_m = float(pm.jacobian_eigenvalue_real.max()) * ETA
    rate_s = float(ps.jacobian_eigenvalue_real.max()) * ETA / (1 - beta)
    assert rate_s > 0 and abs(rate_m - rate_s) <= 1e-8 * rate_s
    assert np.allclose(pm.Q.values, ps.Q.values, rtol=0, atol=1e-12)
    assert abs(float(pm.eps_g) - float(ps.eps_g)) < 1e-14


def test_hessian_and_fisher_under_a_rule_say_they_do_not_depend_on_it() -> None:
    at = {"Q": [[0.6, 0.15], [0.15, 0.45]], "R": [[0.3, 0.1], [0.05, 0.25]],
          "T": [[1.0, 0.0], [0.0, 1.0]]}
    out = {}
    for rule in ("sgd", "natural_gradient"):
        out[rule] = Experiment(model=MODEL, learning_rule=rule, analyzers=[
            {"name": "hessian", "at": at}, {"name": "fisher", "at": at}]).run()
    for name in ("hessian", "fisher"):
        a, b = out["sgd"][name], out["natural_gradient"][name]
        assert b.attrs["learning_rule"] == "natural_gradient"
        assert "independent of the learning rule" in b.attrs["learning_rule_dependence"]
        np.testing.assert_array_equal(a.eigenvalue.values, b.eigenvalue.values)


@pytest.mark.parametrize("norm", ["plain", "batchnorm"])
def test_natural_gradient_escapes_sooner_from_sgd_start_and_agrees_with_dynamics(
        norm: str) -> None:
    sgd = Experiment(model=MODEL, normalization=norm, eta=ETA, analyzers=[
        {"name": "escape", "alpha_max": 4000.0, "n_points": 2001}]).run()["escape"]
    start = OrderParameters(Q=sgd.Q.values[0], R=sgd.R.values[0], T=np.eye(2))
    grid = np.linspace(0.0, 200.0, 401)
    exp = Experiment(model=MODEL, normalization=norm, eta=ETA, init=start,
                     learning_rule="natural_gradient", analyzers=[
                         {"name": "escape", "start": "init", "alpha": list(grid)},
                         {"name": "dynamics", "alpha": list(grid)}])
    res = exp.run()
    esc, dyn = res["escape"], res["dynamics"]
    assert esc.attrs["learning_rule"] == dyn.attrs["learning_rule"] == "natural_gradient"
    np.testing.assert_allclose(esc.Q.values[0], start.Q, atol=1e-12)
    a_ng, a_sgd = float(esc.alpha_escape), float(sgd.alpha_escape)
    assert bool(esc.escaped) and bool(sgd.escaped)
    assert a_ng < 0.2 * a_sgd
    below = np.nonzero(dyn.eps_g.values < 0.5 * float(esc.eps_plateau))[0]
    assert below.size
    first = grid[below[0]]
    assert first - (grid[1] - grid[0]) <= a_ng <= first
