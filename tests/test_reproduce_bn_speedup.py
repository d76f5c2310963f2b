"""``symphase reproduce bn_speedup`` (issue 14, item 5): the --quick run, its labelled
output, and table entries recomputed independently through the analyzers."""

from __future__ import annotations

import numpy as np
import pytest

import framework
from framework import Experiment, InputDistribution, TeacherStudent
from framework.manager import get_registry
from plugins import reproduce_bn_speedup as bn


def test_registered() -> None:
    assert "bn_speedup" in get_registry().names("reproduction")


def test_time_to_target_is_exact_for_an_exponential() -> None:
    alpha = np.linspace(0.0, 100.0, 11)
    eps = 0.1 * np.exp(-alpha / 10.0)  # crosses 1e-3 at 10 ln(100)
    assert bn.time_to_target(alpha, eps) == pytest.approx(10 * np.log(100.0), rel=1e-12)
    assert np.isnan(bn.time_to_target(alpha, np.full(11, 0.5)))
    assert bn.stable_run(eps, False, False)
    assert not bn.stable_run(eps, True, False) and not bn.stable_run(eps, False, True)
    back_up = eps.copy()
    back_up[-1] = 0.3  # reached the target, then left it: not stable
    assert not bn.stable_run(back_up, False, False)
    assert [bn.outcome(eps, False, False), bn.outcome(eps, True, False),
            bn.outcome(eps, False, True), bn.outcome(back_up, False, False),
            bn.outcome(np.full(11, 0.5), False, False)] == [
        "stable", "diverged", "runaway", "left the target", "not reached"]


def test_horizon_and_grids() -> None:
    cfg = bn._settings(quick=False)
    assert bn.horizon(0.125) == 4800.0 and bn.horizon(2.0) == 1000.0
    full = bn.full_grid(cfg)
    for eta in cfg["etas"]:
        g = bn.alpha_grid(cfg, eta)
        assert np.array_equal(g, full[:len(g)]) and g[-1] <= bn.horizon(eta)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bn_speedup")
    assert bn.bn_speedup(out, quick=True) == 0
    return out, framework.load(out / "bn_speedup.nc")


def test_quick_run_writes_labelled_output(quick) -> None:
    out, ds = quick
    for name in ("bn_speedup.md", "bn_speedup_time.png", "bn_speedup_eps_g.png"):
        assert (out / name).exists()
    for v in [*ds.data_vars.values(), *ds.coords.values()]:
        assert "long_name" in v.attrs and "units" in v.attrs, v.name
    assert ds.attrs["status"] == "complete" and ds.attrs["quick"] == 1
    for key in ("init", "stability_rule", "eta_max_rule", "escape_rule", "hessian_rule",
                "setting_d", "alpha_horizon_rule"):
        assert ds.attrs[key]
    assert "not implemented" in ds.attrs["setting_d"]
    # every entry computed (the equilibrium analyzers take structured inputs)
    assert set(ds.hessian_status.values.ravel()) == {"ok"}
    assert set(ds.escape_status_same.values.ravel()) == {"ok"}
    assert np.all(ds.lambda_min.values < 0) and np.all(ds.lambda_max.values > 0)
    # plain diverges at large eta, batch norm does not (its norm grows)
    plain = ds.sel(normalization="plain")
    assert bool(plain.eta_max_bounded.all())
    assert bool((~ds.sel(normalization="batchnorm").eta_max_bounded).all())
    assert str(plain.outcome.sel(setting="isotropic", K=2, eta=8.0).values) == "runaway"
    assert set(ds.outcome.values[ds.stable.values].ravel()) == {"stable"}
    table = (out / "bn_speedup.md").read_text()
    assert "| isotropic | 2 | plain |" in table and "(d) non-centred" in table


def test_entries_recomputed_through_the_analyzers(quick) -> None:
    _, ds = quick
    # t_1e-3 at eta = 0.5, isotropic, plain: a dynamics run on a linear grid of its own
    e = Experiment(TeacherStudent(2, 2), eta=0.5, seed=0, analyzers=[
        {"name": "dynamics", "alpha_max": 400.0, "n_points": 4001}])
    d = e.run()["dynamics"]
    j = int(np.nonzero(d.eps_g.values < 1e-3)[0][0])
    a = d.alpha.values
    ref = float(np.interp(np.log(1e-3), np.log(d.eps_g.values[[j, j - 1]]), a[[j, j - 1]]))
    got = float(ds.t_target_same.sel(setting="isotropic", K=2, normalization="plain"))
    assert got == pytest.approx(ref, rel=2e-3)
    # lambda_max, two levels 1:100 (eigenvalues 2/101 and 200/101), batchnorm: the
    # largest eigenvalue of the hessian analyzer's spectrum at the plateau branch
    inputs = InputDistribution([2 / 101, 200 / 101], [0.5, 0.5])
    h = Experiment(TeacherStudent(2, 2, inputs=inputs), normalization="batchnorm", eta=0.5,
                   seed=0, analyzers=["hessian"]).run()["hessian"]
    hb = h.isel(branch=int(h.attrs["plateau_branch"]))
    got = ds.sel(setting="two_level_100", K=2, normalization="batchnorm")
    assert float(got.lambda_max) == pytest.approx(float(np.nanmax(hb.eigenvalue)), rel=1e-9)
    assert float(got.lambda_min) == pytest.approx(float(np.nanmin(hb.eigenvalue)), rel=1e-9)


def test_shipped_eta_max_brackets_the_divergence() -> None:
    """The shipped full run's eta_max of plain (isotropic, K = 2) is stable and its
    eta_max_upper is not, by direct dynamics runs on the reproduction's grids."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "datasets" / "bn_speedup.nc"
    if not path.exists():
        pytest.skip("no shipped datasets/bn_speedup.nc")
    r = framework.load(path).sel(setting="isotropic", K=2, normalization="plain")
    assert bool(r.eta_max_bounded)
    lo, hi = float(r.eta_max), float(r.eta_max_upper)
    assert 2.0 <= lo < hi <= 2.0 * 2 ** 0.5
    cfg = bn._settings(quick=False)
    for eta, stable in ((lo, True), (hi, False)):
        d = Experiment(TeacherStudent(2, 2), eta=eta, seed=0, analyzers=[
            {"name": "dynamics", "alpha": bn.alpha_grid(cfg, eta)}]).run()["dynamics"]
        assert bn.stable_run(d.eps_g.values, bool(d.diverged), bool(d.runaway)) is stable
