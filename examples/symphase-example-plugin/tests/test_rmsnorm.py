"""rmsnorm passes symphase's published normalization contract, and runs in symphase."""

from __future__ import annotations

import numpy as np
import pytest
from symphase_rmsnorm import RMSNorm

import framework
from framework import theory
from framework.testing import NormalizationContract


class TestRMSNorm(NormalizationContract):
    @pytest.fixture(params=[{}, {"g": 0.5, "eps": 0.0}])
    def normalization(self, request: pytest.FixtureRequest) -> RMSNorm:
        return RMSNorm(**request.param)


def test_ode_through_the_generic_engine() -> None:
    """No closed form for rmsnorm: symphase's generic engine integrates its ODE."""
    model = framework.TeacherStudent(3, 2)
    e = framework.Experiment(model, normalization={"name": "rmsnorm", "g": 0.8}, eta=0.5)
    traj = theory.integrate(model, e.normalization, e.initial_order_parameters(),
                            eta=e.eta, alpha=[0.0, 0.5, 1.0])
    assert traj.engine == "generic" and not traj.diverged
    assert np.all(np.isfinite(traj.eps_g)) and np.all(traj.eps_g_error < 5e-3)
    assert traj.params["g"].shape == (3, 3)  # the trained gain, per reported time
