"""No hangs, no lost trajectories, flagged divergence (issue 12, item 4): starts on the
boundary of the PSD cone integrate on every path, non-finite rates stop with a message,
the horizon is bounded, divergence with a non-erf activation keeps the partial
trajectory, and sustained runaway growth is flagged in agreement with the fixed-point
stability verdict."""

from __future__ import annotations

from typing import ClassVar

import attrs
import numpy as np
import pytest

from framework import (
    Backward,
    Experiment,
    Normalization,
    OrderParameters,
    SpecificationError,
    TeacherStudent,
    theory,
)
from framework.datasets import runaway_growth
from framework.manager import get_normalization

IDENTICAL = (np.full((2, 2), 0.2), np.full((2, 2), 0.01))  # identical students
ZERO_UNIT = (np.diag([0.3, 0.0]), np.array([[0.1, 0.0], [0.0, 0.0]]))  # a unit at J = 0
GRID = np.linspace(0.0, 60.0, 13)


def _integrate(model, norm_name, start, **kw):
    eng = theory.select_engine(model, get_normalization(norm_name),
                               quadrature={"samples": 1024, "replicates": 4})
    return eng.integrate(*start, eta=0.5, alpha=GRID, **kw)


# weight normalization divides by a zero norm: its zero-unit start is the non-finite-rates
# case below, not a valid start
BOUNDARY_CASES = [(path, start)
                  for path in ("compiled", "scipy", "trained_readout", "trained_gain", "generic")
                  for start in ("identical", "zero_unit")
                  if (path, start) != ("trained_gain", "zero_unit")]


@pytest.mark.parametrize("path, start", BOUNDARY_CASES)
def test_boundary_starts_integrate_on_every_path(path, start):
    Q0, R0 = IDENTICAL if start == "identical" else ZERO_UNIT
    model, norm, kw = TeacherStudent(2, 2), "plain", {}
    if path == "scipy":
        kw = {"method": "RK45", "rtol": 1e-8, "atol": 1e-10}
    elif path == "trained_readout":
        model = TeacherStudent(2, 2, second_layer="trained", eta_v=0.5)
    elif path == "trained_gain":
        norm = "weightnorm"
    elif path == "generic":
        model = TeacherStudent(2, 2, activation="tanh")
    traj = _integrate(model, norm, (Q0, R0), **kw)
    assert not traj.diverged, traj.message
    assert traj.alpha.size == GRID.size and np.all(np.isfinite(traj.eps_g))
    if start == "identical":  # an invariant set: the students stay identical
        Q = traj.Q[-1]
        assert abs(Q[0, 0] - Q[1, 1]) < 1e-11 * Q[0, 0] and abs(Q[0, 0] - Q[0, 1]) < 1e-11
        assert traj.eps_g[-1] < traj.eps_g[0]  # towards the identical-unit fixed point
    else:
        assert traj.eps_g[-1] < 0.5 * traj.eps_g[0]  # the dead unit is revived


def test_identical_students_reach_the_identical_unit_fixed_point():
    traj = theory.select_engine(TeacherStudent(2, 2), get_normalization("plain")).integrate(
        *IDENTICAL, eta=0.1, alpha=np.linspace(0, 4000, 9))
    Q, R = traj.Q[-1], traj.R[-1]
    r = theory.select_engine(TeacherStudent(2, 2), get_normalization("plain")).rates(
        Q, R, eta=0.1)
    assert np.max(np.abs(r.dQ)) < 1e-6 and np.max(np.abs(r.dR)) < 1e-6  # a fixed point
    assert np.linalg.eigvalsh(Q)[0] < 1e-8  # still identical (rank one)


@attrs.frozen
class Scaled(Normalization):  # the README's plugin example, with c = 0
    name: ClassVar[str] = "scaled_test"
    description: ClassVar[str] = "x~ = c x"
    supports_diagonal_scale: ClassVar[bool] = True
    c: float = 0.0

    def forward(self, x, stats, params):
        return self.c * x

    def backward(self, x, stats, params, grad_out):
        return Backward(x=self.c * grad_out)

    def scale(self, Q, params):
        return np.full(np.shape(Q)[:-1], self.c)

    def scale_jacobian(self, Q, params):
        return np.zeros(np.shape(Q) + np.shape(Q)[-1:])


@pytest.mark.parametrize("case", ["weightnorm_zero_norm", "scaled_c0"])
def test_non_finite_rates_stop_with_a_message(case):
    model = TeacherStudent(2, 2)
    if case == "weightnorm_zero_norm":
        norm, start = get_normalization("weightnorm"), (np.zeros((2, 2)), np.zeros((2, 2)))
    else:
        norm = Scaled()
        start = (np.eye(2) * 0.3, np.full((2, 2), 0.05))
    traj = theory.integrate(model, norm, OrderParameters(*start), eta=0.5,
                            alpha=np.linspace(0, 100, 11))
    assert traj.diverged and traj.alpha.size == 1  # the initial state is kept
    assert "not finite" in traj.message and traj.alpha_diverged == 0.0


def test_horizon_and_grid_bounds_are_clear_errors():
    with pytest.raises(SpecificationError, match=r"'alpha_max' must be <= 1e\+08"):
        Experiment(TeacherStudent(2, 2), analyzers=[{"name": "dynamics", "alpha_max": 1e300}])
    with pytest.raises(SpecificationError, match=r"'n_points' must be <= 1000000"):
        Experiment(TeacherStudent(2, 2), analyzers=[{"name": "dynamics", "n_points": 10**9}])
    with pytest.raises(SpecificationError, match=r"alpha \* max\(eta, eta_v\) must be <= 1e\+07"):
        Experiment(TeacherStudent(2, 2), eta=1.0,
                   analyzers=[{"name": "dynamics", "alpha_max": 5e7}])
    eng = theory.select_engine(TeacherStudent(2, 2), get_normalization("plain"))
    with pytest.raises(SpecificationError, match="finite, strictly increasing"):
        eng.integrate(*IDENTICAL, eta=0.5, alpha=[0.0, np.inf])


@pytest.mark.parametrize("activation, eta", [("linear", 2.5), ("tanh", 50.0)])
def test_divergence_of_a_non_erf_activation_keeps_the_partial_trajectory(activation, eta):
    exp = Experiment(TeacherStudent(2, 2, activation=activation), eta=eta,
                     analyzers=[{"name": "dynamics", "alpha_max": 200.0, "n_points": 41,
                                 "quadrature": {"samples": 2048, "replicates": 8}}])
    ds = exp.run()["dynamics"]
    assert bool(ds.diverged)
    reached = np.isfinite(ds.eps_g.values)
    assert reached.sum() >= 2 and np.all(reached[: reached.sum()])  # a prefix is kept
    assert "alpha" in ds.attrs["status"]
    Qd = np.einsum("aii->ai", ds.Q.values[reached])
    assert Qd.max() > 10.0 * Qd[0].max()  # it stopped because the weights ran away


def test_dynamics_quadrature_option_is_used_and_validated():
    ds = Experiment(TeacherStudent(2, 2, activation="tanh"), eta=0.5,
                    analyzers=[{"name": "dynamics", "alpha_max": 5.0, "n_points": 3,
                                "quadrature": {"samples": 256, "replicates": 4,
                                               "accuracy": 0.05}}]
                    ).run()["dynamics"]
    assert "4 replicates x 256 points" in ds.attrs["engine_description"]
    with pytest.raises(SpecificationError, match="'samples' must be a power of 2"):
        Experiment(TeacherStudent(2, 2), analyzers=[{"name": "dynamics",
                                                     "quadrature": {"samples": 1000}}])
    with pytest.raises(TypeError, match="'quadrature' must be a mapping"):
        Experiment(TeacherStudent(2, 2), analyzers=[{"name": "dynamics", "quadrature": 5}])


@pytest.mark.parametrize("eta, runaway", [(1.0, False), (1.3, True)])
def test_runaway_growth_is_flagged_and_agrees_with_the_fixed_point_verdict(eta, runaway):
    exp = Experiment(TeacherStudent(4, 4), eta=eta,
                     analyzers=[{"name": "dynamics", "alpha_max": 3000.0},
                                {"name": "fixedpoint"}])
    out = exp.run()
    ds, fp = out["dynamics"], out["fixedpoint"]
    assert bool(ds.runaway) is runaway and not bool(ds.diverged)
    assert "runaway" in ds.attrs["runaway_rule"]
    perfect = fp.where(fp.eps_g < 1e-10, drop=True)  # the teacher itself
    assert perfect.sizes["branch"] == 1
    stable = int(perfect.n_unstable.values[0]) == 0
    assert stable is (not runaway)  # the ODE runs away exactly when the teacher is unstable


def test_runaway_rule_on_synthetic_paths():
    T = np.eye(2)
    t = np.linspace(0, 1, 50)[:, None]
    assert runaway_growth(1.0 + 100.0 * t * np.ones((1, 2)), T)  # growing past 10
    assert not runaway_growth(np.ones((50, 2)) * 0.9, T)  # converged
    assert not runaway_growth(np.concatenate([np.linspace(1, 30, 25), np.full(25, 30.0)]
                                             )[:, None] * np.ones((1, 2)), T)  # saturated
    assert not runaway_growth(np.full((1, 2), 50.0), T)  # one point: no growth to judge
