"""``symphase reproduce goldt2019``: the small-eta asymptotic of the soft committee
machine's final error against the ODE, the qualitative finding of Goldt et al. (2019),
and the quick reproduction."""

from __future__ import annotations

import math

import numpy as np
import pytest

import framework
from framework.manager import get_registry
from plugins.reproduce_goldt import (
    M_TEACHER,
    asymptotic_coefficient,
    final_error,
    goldt2019,
    small_eta_ratio,
)


def test_registered() -> None:
    assert "goldt2019" in get_registry().names("reproduction")


def test_coefficient_closed_form() -> None:
    # K = M: only units on the teacher, each Phi_ii = 2 / (pi sqrt 3)
    assert asymptotic_coefficient(2, 2) == pytest.approx(1.0 / (math.sqrt(3.0) * math.pi))
    # each dead unit adds 1 / (2 pi)
    assert asymptotic_coefficient(5, 2) - asymptotic_coefficient(4, 2) == pytest.approx(
        1.0 / (2.0 * math.pi))
    with pytest.raises(ValueError, match="'K' must be >= M = 2"):
        asymptotic_coefficient(1, 2)


@pytest.mark.parametrize("K", [2, 3])
def test_asymptotic_against_ode(K: int) -> None:
    """(eps* - sigma^2/2) / (eta sigma^2) from the ODE tends to c(K, M) as eta -> 0, with
    a correction linear in eta (halving eta halves the deviation)."""
    c = asymptotic_coefficient(K, M_TEACHER)
    r1, ch1 = small_eta_ratio(K, 0.01)
    r2, ch2 = small_eta_ratio(K, 0.02)
    assert ch1 < 1e-6 and ch2 < 1e-6  # converged fixed points
    assert abs(r1 - c) < 0.01 * c
    assert r1 != c  # the O(eta) correction is visible ...
    assert (r2 - c) / (r1 - c) == pytest.approx(2.0, rel=0.05)  # ... and linear in eta


def test_noise_driven_orthogonal_norm() -> None:
    """The derivation's P = (eta sigma^2 / 2) I: a dead unit's |W|^2 at the fixed point."""
    from framework import TeacherStudent, get_normalization, theory

    eta, noise = 0.01, 0.1
    model = TeacherStudent(3, 2, noise=noise)
    eng = theory.select_engine(model, get_normalization("plain"))
    Q0 = np.diag([1.0, 1.0, 1e-3])
    R0 = np.vstack([np.eye(2), np.zeros((1, 2))])
    tr = eng.integrate(Q0, R0, eta=eta, alpha=np.array([0.0, 1e5, 5e5]), rtol=1e-10,
                       atol=1e-13)
    Q, R = tr.Q[-1], tr.R[-1]
    P = Q - R @ R.T
    assert P[2, 2] == pytest.approx(eta * noise / 2, rel=0.05)
    assert P[0, 0] == pytest.approx(eta * noise / 2, rel=0.05)


def test_finding_first_layer_grows() -> None:
    """K = 2, 3 at sigma^2 = 0.1, eta = 0.5 from Goldt et al.'s initial condition: with
    only the first layer trained the surplus unit dies and adds to the final error."""
    first = [final_error(K, 0.1, 0.5, "first", n_alpha=121) for K in (2, 3)]
    for r in first:
        assert r["converged"], r
    assert first[1]["eps_final"] > first[0]["eps_final"]
    assert "2 active, 1 dead" in first[1]["state"]


@pytest.mark.slow
def test_finding_both_layers_do_not_grow() -> None:
    """The same widths with both layers trained: the final error does not grow with K
    and is below the first-layer-only error."""
    first3 = final_error(3, 0.1, 0.5, "first", n_alpha=121)
    both = [final_error(K, 0.1, 0.5, "both", n_alpha=121) for K in (2, 3)]
    for r in both:
        assert r["converged"], r
    assert both[1]["eps_final"] <= both[0]["eps_final"]
    assert both[1]["eps_final"] < first3["eps_final"]


@pytest.mark.slow
def test_finding_K4() -> None:
    """K = 4: the two-layer error keeps falling; the first layer's stays above K = M's
    (its two surplus units form a cancelling pair, not converged at alpha_final)."""
    f2 = final_error(2, 0.1, 0.5, "first", n_alpha=121)
    f4 = final_error(4, 0.1, 0.5, "first", n_alpha=121)
    b3 = final_error(3, 0.1, 0.5, "both", n_alpha=121)
    b4 = final_error(4, 0.1, 0.5, "both", n_alpha=121)
    assert f4["eps_final"] > f2["eps_final"]
    assert "2 in cancelling pairs" in f4["state"] and not f4["converged"]
    assert b4["eps_final"] < b3["eps_final"]


@pytest.mark.slow
def test_quick_run_writes_labelled_dataset(tmp_path, capsys) -> None:
    assert goldt2019(tmp_path, quick=True) == 0
    ds = framework.load(tmp_path / "goldt2019.nc")
    assert (tmp_path / "goldt2019.png").exists()
    for v in ds.data_vars.values():
        assert "long_name" in v.attrs and "units" in v.attrs
    assert set(ds.eps_final.dims) == {"K", "noise", "eta", "layers"}
    assert list(ds.layers.values) == ["first", "both"]
    assert np.all(np.isfinite(ds.eps_final.values))
    assert "command" in ds.attrs and "init" in ds.attrs
    assert "| K |" in capsys.readouterr().out
