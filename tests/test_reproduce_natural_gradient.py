"""``symphase reproduce natural_gradient``: the quick run through the CLI, its table
against the analyzers run independently, the physics (the natural gradient leaves the
plateau sooner than SGD from the same start) and labelled outputs."""

from __future__ import annotations

import numpy as np
import pytest

import framework
from framework import Experiment, OrderParameters, Registry, TeacherStudent
from framework.cli import main
from framework.manager import get_registry, register_plugin, unregister_plugin
from plugins import reproduce_natural_gradient as rng_module


def test_hook_registers_the_reproduction() -> None:
    reg = Registry()
    rng_module.symphase_register_reproductions(reg)
    assert reg.names("reproduction") == ["natural_gradient"]
    assert reg.get("reproduction", "natural_gradient") is rng_module.natural_gradient


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The --quick run through the CLI (K = 2, eta = 0.1)."""
    out = tmp_path_factory.mktemp("natural_gradient")
    added = "natural_gradient" not in get_registry().names("reproduction")
    if added:  # until the module is listed among the built-in plugins
        register_plugin(rng_module)
    try:
        code = main(["reproduce", "natural_gradient", "--quick", "--out", str(out)])
    finally:
        if added:
            unregister_plugin(rng_module)
    assert code == 0
    return out, framework.load(out / "natural_gradient.nc")


def test_quick_run_writes_labelled_outputs(quick) -> None:
    out, ds = quick
    assert (out / "natural_gradient.png").stat().st_size > 0
    text = (out / "natural_gradient.md").read_text()
    assert "| K | normalization | rule |" in text and "natural_gradient (damping 0.1)" in text
    for name in (*ds.data_vars, *ds.coords):
        assert "long_name" in ds[name].attrs and "units" in ds[name].attrs, name
    assert list(ds.rule.values) == ["sgd", "natural_gradient", "natural_gradient_damped"]
    assert list(ds.learning_rule.values) == ["sgd", "natural_gradient", "natural_gradient"]
    np.testing.assert_array_equal(ds.damping.values[1:], [0.0, 0.1])
    assert list(ds.normalization.values) == ["plain", "batchnorm"]
    for key in ("eta_scaling", "damping_values", "batchnorm", "escape_start",
                "convention_time"):
        assert key in ds.attrs, key
    assert "gamma = 1" in ds.attrs["batchnorm"] and ds.attrs["status"] == "complete"
    assert ds.attrs["command"].endswith("--quick")
    # every entry computed at eta = 0.1
    assert set(ds.status.values.ravel()) == {"ok"}
    for name in ("alpha_escape", "alpha_target", "eps_plateau", "unstable_rate",
                 "fisher_lambda_max"):
        assert np.all(np.isfinite(ds[name].values)), name


def test_table_equals_the_analyzers_run_independently(quick) -> None:
    _, ds = quick
    model = TeacherStudent(2, 2)
    rule = {"name": "natural_gradient", "damping": 0.0}
    s = ds.sel(K=2, normalization="plain", eta=0.1, rule="natural_gradient")
    exp = Experiment(model, normalization="plain", eta=0.1, seed=0, learning_rule=rule)
    # the plateau, its rate and the Fisher at every fixedpoint branch (the plateau flagged)
    fp = exp.evolve(analyzers=["fixedpoint"]).run()["fixedpoint"]
    p = fp.isel(branch=int(np.argmax(fp.is_plateau.values)))
    assert float(s.eps_plateau) == pytest.approx(float(p.eps_g), rel=1e-10)
    assert float(s.unstable_rate) == pytest.approx(
        float(p.jacobian_eigenvalue_real.max()), rel=1e-8)
    fi = exp.evolve(analyzers=["fisher"]).run()["fisher"]
    b = int(np.argmax(fi.is_plateau.values))
    assert float(s.fisher_lambda_max) == pytest.approx(float(fi.lambda_max[b]), rel=1e-8)
    # escape from SGD's perturbed plateau (the escape analyzer's own start, full run)
    sgd = Experiment(model, normalization="plain", eta=0.1, seed=0, analyzers=[
        {"name": "escape", "alpha_max": 2000.0, "n_points": 1001}]).run()["escape"]
    start = OrderParameters(sgd.Q.values[0], sgd.R.values[0], model.T)
    grid = np.linspace(0.0, 100.0, 1001)  # finer than the reproduction's
    esc = exp.evolve(init=start, analyzers=[{"name": "escape", "start": "init",
                                              "plateau": "gradient_flow",
                                              "alpha": list(grid)}]).run()["escape"]
    assert float(s.alpha_escape) == pytest.approx(float(esc.alpha_escape), rel=5e-3)
    assert float(s.eps_threshold) == pytest.approx(float(esc.eps_plateau), rel=1e-10)
    # SGD's own escape time: the analyzer's start='fixedpoint' run
    s_sgd = ds.sel(K=2, normalization="plain", eta=0.1, rule="sgd")
    assert float(s_sgd.eps_plateau) == pytest.approx(float(sgd.eps_plateau), rel=1e-10)
    # the time to eps_g = 1e-3: a dynamics run (no stop) from the same random init
    dyn = exp.evolve(analyzers=[{"name": "dynamics", "alpha": list(grid)}]).run()["dynamics"]
    first = grid[np.nonzero(dyn.eps_g.values < rng_module.TARGET)[0][0]]
    assert first - (grid[1] - grid[0]) <= float(s.alpha_target) <= first


def test_natural_gradient_escapes_sooner_than_sgd(quick) -> None:
    """The physics (Rattray, Saad & Amari 1998): at equal eta and from the same start the
    natural gradient, damped or not, leaves the plateau sooner than SGD, with a larger
    unstable rate; batch normalization does not close the gap."""
    _, ds = quick
    esc = ds.alpha_escape
    for norm in ("plain", "batchnorm"):
        sgd = esc.sel(rule="sgd", normalization=norm, K=2).values
        for rule in ("natural_gradient", "natural_gradient_damped"):
            ng = esc.sel(rule=rule, normalization=norm, K=2).values
            assert np.all(ng < 0.5 * sgd), (norm, rule, ng, sgd)
        rate_ng = ds.unstable_rate.sel(rule="natural_gradient_damped", normalization=norm)
        rate_sgd = ds.unstable_rate.sel(rule="sgd", normalization=norm)
        assert np.all(rate_ng.values > 2 * rate_sgd.values)
    # batchnorm under SGD stays slower than the natural gradient on the plain network
    assert np.all(esc.sel(rule="sgd", normalization="batchnorm").values
                  > esc.sel(rule="natural_gradient", normalization="plain").values)
