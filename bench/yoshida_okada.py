"""Yoshida & Okada (NeurIPS 2019) checked: the symmetric plateau against the scale and the
spread of the input covariance's eigenvalues (issue 14, item 6).

Run ``python bench/yoshida_okada.py [--quick] [--no-simulation]``. Prints tables,
asserts nothing (``tests/test_yoshida_okada.py`` asserts the trends, with these
definitions, imported from here).

Their finding (abstract): "the data whose covariance has small and dispersed eigenvalues
tend to make the plateau phenomenon inconspicuous".

Set-up
------
Soft committee machine, erf, K = M (2, and 3 for the ODE), teacher ``T = I``, plain
network, online SGD, batch size 1, no noise. Inputs ``xi ~ N(0, Sigma)`` with the
teacher spread over the eigenspaces in proportion to their size (``T_l = f_l T``, so the
teacher's pre-activation covariance is ``m T``, ``m`` = mean eigenvalue;
:mod:`framework.inputs`). Initial condition: ``Experiment(init="random", init_scale=0.01,
init_N=1000, seed=1)``, the same ``(Q, R)`` for every spectrum, lifted per eigenspace as
``f_l Q``, ``f_l R``; the simulation realizes it exactly at its own ``N``.

(a) Scale, ``Sigma = c I``. Exact map: this is the isotropic problem in the weights
    ``sqrt(c) J``, ``sqrt(c) B`` at the rate ``c eta`` (teacher ``c T``, start ``c Q0``,
    ``c R0``). So at fixed ``eta`` a part of any change with ``c`` is the trivial one:
    the rate is ``c eta`` and, at small rates, times in ``alpha`` go like ``1 / (c eta)``.
    The table gives every run twice: at fixed ``eta = 0.5`` and at fixed ``c eta = 0.5``;
    what is left at fixed ``c eta`` is the effect of the teacher's (and the start's)
    pre-activation scale ``c`` through the nonlinearity.
(b) Spread at fixed mean eigenvalue 1 (so the plateau's height is fixed, see below),
    ``eta = 0.5``: ``InputDistribution.two_level(ratio)`` (two halves, eigenvalues
    ``lambda_2 / lambda_1 = ratio``) and ``InputDistribution.power_law(4, exponent)``
    (four equal eigenspaces, ``lambda_l ~ l^-exponent``).

Definitions (every quantity from the curve ``eps_g(alpha)``)
-------------------------------------------------------------
* ``eps_p``, the plateau height: ``eps_g`` of the symmetric fixed point with identical
  students (the unspecialized plateau). With ``Q_l = f_l Q``, ``R_l = f_l R`` the
  structured ODE's right-hand side is ``f_l lambda_l`` times the isotropic one at teacher
  ``m T`` and rate ``m eta`` (evaluated at the totals), so this fixed point is the
  isotropic one of ``TeacherStudent(K, K, T=m I)`` at ``eta' = m eta``
  (:func:`framework.theory.equilibrium.find_fixed_points`) for every spectrum of mean
  ``m``; tested in ``tests/test_yoshida_okada.py`` by the spectral rates vanishing there.
* ``h = eps_p / eps_g(0)``: the plateau's height relative to the initial error (the
  fraction of the error still left on the plateau). Conspicuousness measure 1: small
  ``h`` = the plateau sits at the foot of the first drop.
* the band ``|eps_g / eps_p - 1| <= DELTA`` (``DELTA = 0.1``): ``alpha_in`` = the first
  ``alpha`` at which ``eps_g`` falls to ``(1 + DELTA) eps_p``, ``alpha_out`` = the first
  at which it falls to ``(1 - DELTA) eps_p`` (crossings interpolated linearly between
  rows).
* ``ell = alpha_out - alpha_in``, the plateau length: the ``alpha``-span the curve takes
  to cross the band. Also given as ``ell * m * eta`` (the length in the natural time
  ``m eta alpha``) and as ``ell / alpha_in`` (relative to the time taken to reach it).
* ``alpha_esc``: the escape time, the first ``alpha`` at which ``eps_g`` falls to
  ``eps_p / 2``.
* ``s_band = ln((1 + DELTA) / (1 - DELTA)) / ln(alpha_out / alpha_in)``, the flatness:
  the mean slope ``|d ln eps_g / d ln alpha|`` across the band (invariant under a
  rescaling of ``alpha``). Conspicuousness measure 2: small for a long flat plateau
  (0.06 for the isotropic K = 2 one here), 0.3 and more for a curve that only slows
  down.

Simulation (compiled kernel, ``N`` = 500 and 2000): the same measures on the
replica-mean curve of ``eps_g`` (each replica's ``eps_g`` evaluated from its order
parameters, recorded every ``alpha = 1``), with jackknife standard errors over the
replicas (leave one out), and ``z = (simulation - ODE) / SE`` with the ODE measured on
the simulation's grid (linear interpolation between rows biases a crossing by the
curvature; the same grid cancels it); ``eps_p`` is the ODE's (the N -> infinity
plateau). The ODE rows of the tables are measured on a grid of 4000 rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout

import numpy as np

from framework import Experiment, InputDistribution, TeacherStudent
from framework.manager import get_normalization
from framework.theory.equilibrium import find_fixed_points

DELTA = 0.1
ETA = 0.5
INIT_SCALE, INIT_N, SEED = 0.01, 1000, 1
SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
RATIOS = (1.0, 3.0, 10.0, 30.0, 100.0)
EXPONENTS = (0.0, 0.5, 1.0, 2.0)
POWER_LEVELS = 4
ROWS_PER_RUN = 4000
FIELDS = ("ell", "alpha_in", "alpha_esc", "s_band")


def spectra() -> dict[str, InputDistribution]:
    """The spread study's spectra at mean eigenvalue 1, by label."""
    out = {f"two_level {r:g}": InputDistribution.two_level(r) for r in RATIOS}
    out.update({f"power_law {p:g}": InputDistribution.power_law(POWER_LEVELS, p)
                for p in EXPONENTS})
    return out


def plateau_height(K: int, mean: float, eta: float) -> float:
    """``eps_p``: the identical-students symmetric fixed point of the isotropic problem at
    teacher ``mean * I`` and rate ``mean * eta`` (the plateau of every spectrum of that
    mean eigenvalue; module docstring)."""
    fps = find_fixed_points(TeacherStudent(K, K, T=mean * np.eye(K)),
                            get_normalization("plain"), eta=mean * eta)
    same = [fp for fp in fps if np.ptp(fp.Q) < 1e-8 and np.ptp(fp.R) < 1e-8
            and fp.eps_g > 1e-12]
    if not same:
        raise RuntimeError(f"no identical-students plateau found for K={K}, mean={mean}")
    return float(max(fp.eps_g for fp in same))


@dataclass(frozen=True)
class Plateau:
    eps_0: float
    eps_p: float
    h: float
    ell: float
    alpha_in: float
    alpha_out: float
    alpha_esc: float
    s_band: float


def crossing(alpha: np.ndarray, eps: np.ndarray, level: float) -> float:
    """The first ``alpha`` at which ``eps`` falls to ``level``, linear between rows
    (``eps[0] > level``; NaN if it never does)."""
    hit = np.flatnonzero(eps <= level)
    if hit.size == 0:
        return float("nan")
    i = int(hit[0])
    e0, e1 = eps[i - 1], eps[i]
    return float(alpha[i - 1] + (alpha[i] - alpha[i - 1]) * (e0 - level) / (e0 - e1))


def measure(alpha: Any, eps: Any, eps_p: float, delta: float = DELTA) -> Plateau:
    """The plateau measures of one curve (module docstring). The curve must start above
    the band, reach ``eps_p / 2`` and be finite and >= 0 up to there (else ValueError)."""
    alpha, eps = np.asarray(alpha, float), np.asarray(eps, float)
    if eps[0] <= (1.0 + delta) * eps_p:
        raise ValueError(f"no plateau below the start: eps_p = {eps_p:.4g} >= eps_g(0) / "
                         f"(1 + delta) = {eps[0] / (1.0 + delta):.4g}")
    a_esc = crossing(alpha, eps, 0.5 * eps_p)
    if not np.isfinite(a_esc):
        raise ValueError(f"the curve does not escape the plateau (eps_g > eps_p / 2 = "
                         f"{0.5 * eps_p:.4g} up to alpha = {alpha[-1]:g})")
    upto = eps[:int(np.searchsorted(alpha, a_esc)) + 1]
    if not np.all(np.isfinite(upto)) or np.any(upto < 0.0):
        raise ValueError("eps_g is not finite and >= 0 up to the escape")
    a_in = crossing(alpha, eps, (1.0 + delta) * eps_p)
    a_out = crossing(alpha, eps, (1.0 - delta) * eps_p)
    return Plateau(eps_0=float(eps[0]), eps_p=eps_p, h=eps_p / float(eps[0]),
                   ell=a_out - a_in, alpha_in=a_in, alpha_out=a_out, alpha_esc=a_esc,
                   s_band=float(np.log((1.0 + delta) / (1.0 - delta))
                                / np.log(a_out / a_in)))


def _experiment(K: int, inputs: InputDistribution, eta: float,
                analyzers: Sequence[Any]) -> Experiment:
    return Experiment(model=TeacherStudent(K, K, inputs=inputs), normalization="plain",
                      eta=eta, analyzers=list(analyzers), init_scale=INIT_SCALE,
                      init_N=INIT_N, seed=SEED)


def ode_curve(K: int, inputs: InputDistribution, eta: float, grid: np.ndarray
              ) -> np.ndarray:
    """``eps_g`` of the ODE on ``grid``."""
    ds = _experiment(K, inputs, eta, [{"name": "dynamics", "alpha": list(grid)}]).run()
    return np.asarray(ds["dynamics"].eps_g.values)


def ode_plateau(K: int, inputs: InputDistribution, eta: float, alpha_max: float = 500.0,
                eps_p: float | None = None, rows: int = ROWS_PER_RUN,
                cap: float = 1e5) -> tuple[Plateau, float]:
    """The ODE's plateau measures, doubling ``alpha_max`` until the curve escapes;
    returns them and the ``alpha_max`` used."""
    if eps_p is None:
        eps_p = plateau_height(K, inputs.mean_eigenvalue, eta)
    while True:
        alpha = np.linspace(0.0, alpha_max, rows + 1)
        eps = ode_curve(K, inputs, eta, alpha)
        if np.any(eps[np.isfinite(eps)] <= 0.5 * eps_p) or alpha_max >= cap:
            return measure(alpha, eps, eps_p), alpha_max
        alpha_max *= 2.0


def simulated_curves(K: int, inputs: InputDistribution, eta: float, N: int,
                     replicas: int, alpha_max: float, step: float = 1.0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(alpha, eps_g (replicas, alpha))`` of the compiled simulation at dimension
    ``N``, recorded every ``step`` in ``alpha`` up to ``alpha_max``."""
    grid = np.arange(0.0, alpha_max + 0.5 * step, step)
    ds = _experiment(K, inputs, eta, [{"name": "simulation", "N": N, "alpha": list(grid),
                                       "replicas": replicas}]).run()["simulation"]
    return grid, ds.eps_g.values


def jackknife(alpha: np.ndarray, eps: np.ndarray, eps_p: float
              ) -> dict[str, tuple[float, float]]:
    """The measures of the replica-mean curve with their jackknife standard errors
    (leave one replica out): ``{field: (value, se)}``."""
    R = eps.shape[0]
    full = measure(alpha, eps.mean(0), eps_p)
    loo = [measure(alpha, np.delete(eps, r, axis=0).mean(0), eps_p) for r in range(R)]
    out = {}
    for f in FIELDS:
        v = np.array([getattr(p, f) for p in loo])
        out[f] = (getattr(full, f), float(np.sqrt((R - 1) / R * np.sum((v - v.mean())**2))))
    return out


# -- printing ----------------------------------------------------------------------------
def _row(label: str, p: Plateau, rate: float) -> str:
    return (f"{label:<22} {p.eps_p:>9.3e} {p.h:>7.4f} {p.ell:>9.1f} {p.ell * rate:>9.1f} "
            f"{p.ell / p.alpha_in:>7.2f} {p.alpha_in:>8.1f} {p.alpha_esc:>9.1f} "
            f"{p.s_band:>8.1e}")


HEADER = (f"{'':<22} {'eps_p':>9} {'h':>7} {'ell':>9} {'ell*m*eta':>9} {'ell/a_in':>7} "
          f"{'alpha_in':>8} {'alpha_esc':>9} {'s_band':>8}")


def scale_table(K: int, scales: Sequence[float]) -> list[str]:
    lines = [f"(a) Sigma = c I, K = M = {K}", HEADER]
    for label, eta_of in (("eta = 0.5", lambda c: ETA), ("c eta = 0.5", lambda c: ETA / c)):
        for c in scales:
            eta = eta_of(c)
            try:
                p, _ = ode_plateau(K, InputDistribution([c]), eta)
            except ValueError as exc:
                lines.append(f"{f'c={c:g} {label}':<22} {exc}")
                continue
            lines.append(_row(f"c={c:g} {label}", p, c * eta))
    return lines


def spread_table(K: int, which: dict[str, InputDistribution]) -> list[str]:
    lines = [f"(b) spread at mean eigenvalue 1, eta = {ETA}, K = M = {K}", HEADER]
    eps_p = plateau_height(K, 1.0, ETA)
    for label, inputs in which.items():
        p, _ = ode_plateau(K, inputs, ETA, eps_p=eps_p)
        lines.append(_row(label, p, ETA))
    return lines


def simulation_table(K: int, cases: dict[str, tuple[InputDistribution, float]],
                     Ns: Sequence[int], replicas: dict[int, int]) -> list[str]:
    lines = [f"simulation against the ODE, K = M = {K} (replica-mean curve, jackknife SE, "
             f"z = (simulation - ODE) / SE; R replicas)",
             f"{'':<22} {'N':>5} {'R':>3} " + " ".join(f"{f:>24}" for f in FIELDS)]
    for label, (inputs, eta) in cases.items():
        ode, _ = ode_plateau(K, inputs, eta)
        lines.append(f"{label:<22} {'ODE':>5} {'':>3} " + " ".join(
            f"{getattr(ode, f):>24.4g}" for f in FIELDS))
        for N in Ns:
            t0 = time.perf_counter()
            alpha, eps = simulated_curves(K, inputs, eta, N, replicas[N],
                                          alpha_max=1.5 * ode.alpha_esc)
            sim = jackknife(alpha, eps, ode.eps_p)
            same = measure(alpha, ode_curve(K, inputs, eta, alpha), ode.eps_p)
            cells = [f"{v:>9.4g} +-{se:>6.2g} z={(v - getattr(same, f)) / se:>+5.1f}"
                     for f, (v, se) in sim.items()]
            lines.append(f"{'':<22} {N:>5} {replicas[N]:>3} " + " ".join(
                f"{c:>24}" for c in cells) + f"   ({time.perf_counter() - t0:.0f} s)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and replicas")
    parser.add_argument("--no-simulation", action="store_true")
    args = parser.parse_args(argv)
    print(__doc__.split("\n\n", 1)[1])
    t0 = time.perf_counter()
    scales = (0.5, 1.0, 2.0) if args.quick else SCALES
    for K in (2,) if args.quick else (2, 3):
        for line in [*scale_table(K, scales), "", *spread_table(K, spectra()), ""]:
            print(line, flush=True)
    if not args.no_simulation:
        sp = spectra()
        cases = {"two_level 1": (sp["two_level 1"], ETA),
                 "two_level 10": (sp["two_level 10"], ETA),
                 "two_level 100": (sp["two_level 100"], ETA),
                 "c=2 c eta=0.5": (InputDistribution([2.0]), ETA / 2.0)}
        if args.quick:
            cases = {k: cases[k] for k in ("two_level 1", "two_level 100")}
        reps = {500: 8, 2000: 4} if args.quick else {500: 16, 2000: 6}
        for line in simulation_table(2, cases, (500, 2000), reps):
            print(line, flush=True)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
