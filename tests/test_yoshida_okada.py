"""Yoshida & Okada (NeurIPS 2019) checked (issue 14, item 6): the symmetric plateau of the
soft committee machine (erf, K = M, T = I, plain, eta = 0.5 unless said) against the scale
and the spread of the input covariance's eigenvalues.

Their finding (abstract): covariances with small and dispersed eigenvalues make the
plateau inconspicuous. The measures (plateau height ``eps_p``, relative height ``h =
eps_p / eps_g(0)``, length ``ell`` = the alpha-span of the band ``|eps_g / eps_p - 1| <=
0.1``, escape time ``alpha_esc`` at ``eps_p / 2``, flatness ``s_band`` = the mean log-log
slope across the band) are defined in ``bench/yoshida_okada.py`` and imported from there,
so the bench prints what is asserted here.

What is found, and asserted:

* spread at fixed mean eigenvalue 1 (two levels of ratio 1..100, power laws of exponent
  0..2): the plateau height is the same (an exact property: the structured ODE's plateau
  is the isotropic one at the mean eigenvalue, checked below by its rates vanishing),
  but the plateau gets shorter (``ell`` and ``alpha_esc`` fall monotonically) and less
  flat (``s_band`` rises) as the spread grows -- Yoshida & Okada's "dispersed" finding,
  for K = 2 and 3;
* scale, ``Sigma = c I`` (exactly the isotropic problem at teacher ``c T`` and rate ``c
  eta``): at fixed ``c eta`` (the trivial rate effect removed) smaller eigenvalues give a
  *longer* plateau, not a shorter one, and a flatter one in log-log; what makes it
  inconspicuous is its height: ``h`` falls with ``c`` (the plateau holds a smaller
  fraction of the initial error, at the foot of the first drop). At fixed ``eta`` the
  length falls with ``c`` even faster (the rate ``c eta`` adds ``1 / c``). So
  "inconspicuous for small eigenvalues" holds for the height only; the test asserts
  the longer plateau as found;
* the finite-N simulation (N = 500 and 2000) agrees with the ODE's lengths and escape
  times within statistical error and shows the same spread trend (slow).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from framework import InputDistribution, TeacherStudent, theory
from framework.manager import get_normalization
from framework.theory.equilibrium import find_fixed_points

_PATH = Path(__file__).resolve().parents[1] / "bench" / "yoshida_okada.py"
_SPEC = importlib.util.spec_from_file_location("bench_yoshida_okada", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
yo = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = yo  # dataclasses look their module up
_SPEC.loader.exec_module(yo)

ETA = yo.ETA


def _strictly_decreasing(x) -> bool:
    return bool(np.all(np.diff(np.asarray(x, float)) < 0.0))


@pytest.mark.parametrize("inputs", [InputDistribution.two_level(10.0, fraction=0.3),
                                    InputDistribution.power_law(4, 1.0, mean=1.5),
                                    InputDistribution([2.0])])
def test_the_plateau_is_the_isotropic_one_at_the_mean_eigenvalue(inputs):
    """The identical-students fixed point of the isotropic problem at teacher ``m T`` and
    rate ``m eta`` (m = mean eigenvalue), lifted as ``Q_l = f_l Q / m``, ``R_l = f_l R /
    m``, is a fixed point of the structured ODE with the same eps_g (what ``eps_p`` of
    the bench relies on)."""
    K, m = 2, inputs.mean_eigenvalue
    fps = [fp for fp in find_fixed_points(TeacherStudent(K, K, T=m * np.eye(K)),
                                          get_normalization("plain"), eta=m * ETA)
           if np.ptp(fp.Q) < 1e-8 and np.ptp(fp.R) < 1e-8 and fp.eps_g > 1e-12]
    fp = max(fps, key=lambda p: p.eps_g)
    assert fp.eps_g == pytest.approx(yo.plateau_height(K, m, ETA), rel=1e-14)
    eng = theory.select_engine(TeacherStudent(K, K, inputs=inputs),
                               get_normalization("plain"))
    assert isinstance(eng, theory.SpectralEngine)
    r = eng.rates(inputs.lift(fp.Q / m), inputs.lift(fp.R / m), eta=ETA)
    assert np.max(np.abs(r.dQ)) < 1e-12 and np.max(np.abs(r.dR)) < 1e-12
    assert r.eps_g == pytest.approx(fp.eps_g, rel=1e-12)
    # and far from it the rates are not small (the check is not vacuous)
    r0 = eng.rates(inputs.lift(0.5 * fp.Q / m), inputs.lift(fp.R / m), eta=ETA)
    assert max(np.max(np.abs(r0.dQ)), np.max(np.abs(r0.dR))) > 1e-2


def test_the_trajectory_sits_on_that_plateau():
    """The ODE curve of a (mildly) spread spectrum comes within 1e-3 of eps_p."""
    inputs = InputDistribution.two_level(3.0)
    eps_p = yo.plateau_height(2, 1.0, ETA)
    alpha = np.linspace(0.0, 300.0, 1501)
    eps = yo.ode_curve(2, inputs, ETA, alpha)
    assert np.min(np.abs(eps[alpha < 150.0] / eps_p - 1.0)) < 1e-3


def test_measure_on_a_known_curve():
    """The definitions on a piecewise-linear curve whose crossings are known by hand."""
    alpha = np.array([0.0, 10.0, 20.0, 110.0, 120.0])
    eps = np.array([1.0, 0.11, 0.1, 0.09, 0.0])
    p = yo.measure(alpha, eps, eps_p=0.1)
    # 0.11 is reached at alpha = 10, 0.09 at 110, 0.05 at 110 + 10 * 0.04 / 0.09
    assert p.alpha_in == pytest.approx(10.0) and p.alpha_out == pytest.approx(110.0)
    assert p.ell == pytest.approx(100.0) and p.alpha_esc == pytest.approx(110.0 + 40.0 / 9.0)
    assert p.h == pytest.approx(0.1)
    assert p.s_band == pytest.approx(np.log(1.1 / 0.9) / np.log(11.0))
    with pytest.raises(ValueError, match="does not escape"):
        yo.measure(alpha[:4], eps[:4], eps_p=0.1)
    with pytest.raises(ValueError, match="no plateau below the start"):
        yo.measure(alpha, eps, eps_p=0.95)


@pytest.fixture(scope="module")
def spread2():
    eps_p = yo.plateau_height(2, 1.0, ETA)
    return {label: yo.ode_plateau(2, inputs, ETA, alpha_max=260.0, eps_p=eps_p)[0]
            for label, inputs in yo.spectra().items()}


@pytest.mark.parametrize("family, values", [("two_level", yo.RATIOS),
                                            ("power_law", yo.EXPONENTS)])
def test_spread_shortens_and_flattens_less_the_plateau(spread2, family, values):
    """At mean eigenvalue 1 the plateau's height is the same, and its length and escape
    time fall, its flatness rises, monotonically with the spread (Yoshida & Okada's
    'dispersed eigenvalues' finding). Measured: two_level ell 197 -> 51 for ratio 1 ->
    100, power_law ell 197 -> 81 for exponent 0 -> 2 (bench/yoshida_okada.py)."""
    ps = [spread2[f"{family} {v:g}"] for v in values]
    assert np.ptp([p.eps_p for p in ps]) == 0.0
    assert np.ptp([p.h for p in ps]) < 1e-12  # the same start, the same height
    assert _strictly_decreasing([p.ell for p in ps])
    assert _strictly_decreasing([p.alpha_esc for p in ps])
    assert _strictly_decreasing([-p.s_band for p in ps])
    # the effect is large, not a rounding-level monotonicity
    assert ps[-1].ell < 0.6 * ps[0].ell
    # the isotropic end is the same problem in both families (splitting invariance)
    assert ps[0].ell == pytest.approx(spread2["two_level 1"].ell, rel=1e-6)


def test_spread_trend_for_three_hidden_units():
    eps_p = yo.plateau_height(3, 1.0, ETA)
    ps = [yo.ode_plateau(3, InputDistribution.two_level(r), ETA, alpha_max=340.0,
                         eps_p=eps_p)[0]
          for r in (1.0, 10.0, 100.0)]
    assert _strictly_decreasing([p.ell for p in ps])
    assert _strictly_decreasing([p.alpha_esc for p in ps])
    assert _strictly_decreasing([-p.s_band for p in ps])


# integration spans (alpha_max) a little past the escape; ode_plateau doubles a span
# that is too short, so these only save time
SPAN = {("rate", 0.25): 1700.0, ("rate", 0.5): 650.0, ("rate", 1.0): 300.0,
        ("rate", 2.0): 180.0, ("rate", 4.0): 130.0, ("eta", 0.25): 7000.0,
        ("eta", 0.5): 1300.0, ("eta", 1.0): 300.0, ("eta", 2.0): 80.0}


def _scale_runs(cs, fixed):
    eta = {"rate": lambda c: ETA / c, "eta": lambda c: ETA}[fixed]
    return [yo.ode_plateau(2, InputDistribution([c]), eta(c), alpha_max=SPAN[fixed, c])[0]
            for c in cs]


def _check_scale(cs_rate, cs_eta):
    """Sigma = c I at fixed c eta = 0.5 (the rate effect removed): h rises with c (a
    smaller c puts the plateau at a smaller fraction of the initial error: less
    conspicuous, as Yoshida & Okada find), but the length falls with c (a smaller c
    gives a LONGER plateau: the opposite of 'shorter', asserted as found; measured ell
    1174, 435, 197, 110, 75 for c = 0.25 .. 4). At fixed eta = 0.5 the length falls with
    c faster, by the trivial time scale: in the natural time c eta alpha the lengths at
    fixed eta and at fixed c eta agree to within a third (what is left is the eta^2
    term; measured 223 vs 217 at c = 0.5, 47 vs 55 at c = 2)."""
    rate = dict(zip(cs_rate, _scale_runs(cs_rate, "rate"), strict=True))
    ps = list(rate.values())
    assert _strictly_decreasing([-p.h for p in ps])
    assert _strictly_decreasing([p.ell for p in ps])
    assert _strictly_decreasing([p.alpha_esc for p in ps])
    assert ps[0].ell > 2.0 * ps[-1].ell
    eta = dict(zip(cs_eta, _scale_runs(cs_eta, "eta"), strict=True))
    assert _strictly_decreasing([p.ell for p in eta.values()])
    for c, p in eta.items():
        natural = p.ell * c * ETA / (rate[c].ell * ETA)  # both in units of c eta alpha
        assert 0.75 < natural < 1.33, (c, natural)


def test_scale_small_eigenvalues_give_a_lower_but_longer_plateau():
    _check_scale((0.5, 1.0, 2.0, 4.0), (1.0, 2.0))


@pytest.mark.slow
def test_scale_down_to_a_quarter():
    _check_scale((0.25, 0.5, 1.0, 2.0, 4.0), (0.25, 0.5, 1.0, 2.0))


@pytest.mark.slow
def test_simulation_agrees_with_the_ode_and_shows_the_trend():
    """Compiled simulation at N = 500 (8 replicas) and 2000 (6 replicas), isotropic and
    two-level ratio 100: the replica-mean curve's escape time agrees with the ODE's
    (measured on the same grid) within 4 jackknife standard errors, and both the escape
    time and the length of the isotropic plateau exceed the ratio-100 ones by more than
    4 combined standard errors at each N.

    Not asserted, as found: the length ``ell`` of the ratio-100 curve against the ODE.
    That curve creeps along the band's upper edge (slope ~3e-5 per unit alpha at
    alpha_in ~ 57, so 1 % of eps_p moves alpha_in by ~5), the crossing is near-tangent
    and the jackknife of the mean curve's ell is not reliable there: at N = 2000 it gives
    44.3 +- 0.9 against the ODE's 50.8, while the mean of the six replicas' own ell is
    51.4 +- 2.6 (recorded every 2 in alpha; bench/yoshida_okada.py prints the table)."""
    eps_p = yo.plateau_height(2, 1.0, ETA)
    cases = {"isotropic": InputDistribution(), "ratio 100": InputDistribution.two_level(100.0)}
    ode = {k: yo.ode_plateau(2, v, ETA, eps_p=eps_p)[0] for k, v in cases.items()}
    for N, R in ((500, 8), (2000, 6)):
        sim = {}
        for k, inputs in cases.items():
            alpha, eps = yo.simulated_curves(2, inputs, ETA, N, R,
                                             alpha_max=1.2 * ode[k].alpha_esc)
            same = yo.measure(alpha, yo.ode_curve(2, inputs, ETA, alpha), eps_p)
            sim[k] = yo.jackknife(alpha, eps, eps_p)
            v, se = sim[k]["alpha_esc"]
            assert abs(v - same.alpha_esc) < 4.0 * se, (N, k, v, same.alpha_esc, se)
        for f in ("alpha_esc", "ell"):
            (v1, s1), (v2, s2) = sim["isotropic"][f], sim["ratio 100"][f]
            assert v1 - v2 > 4.0 * np.hypot(s1, s2), (N, f, v1, s1, v2, s2)
