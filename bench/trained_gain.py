"""Benchmark of the exact engine with a trained gain against the generic engine.

Run ``python bench/trained_gain.py``. Prints a table, asserts nothing.

Set-up: weight normalization (trainable gain ``g``), erf, K = M in {2, 3}, T = I,
eta = 0.1. Both engines are :func:`framework.theory.select_engine` objects with
the same interface: the exact ``ClosedFormEngine`` (``engine="auto"``: the gain as
state of the closed-form ODE) and the baseline, the generic randomized-QMC engine at
its default quadrature (16 replicates x 4096 points; ``engine="generic"``), both run in
this process.

(i)   one right-hand side (``rates``) at a random interior state: time per call
      (best of 5 blocks) and its ratio to the baseline;
(ii)  the fixed points of the symmetric subspace (``find_fixed_points_generic``):
      time, and whether the trained-gain plateau (live gain, identical students on the
      boundary of the PSD cone) was found -- the generic engine cannot find it there;
(iii) the weight-space Hessian at the plateau (exact engine's plateau for both):
      time and lambda_min with its error estimate.
"""

from __future__ import annotations

import time

import numpy as np

import framework
from framework import TeacherStudent, theory
from framework.theory import equilibrium as eq

ETA = 0.1


def best_time(fn, repeats: int = 5, inner: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def plateau(points):
    live = [f for f in points if np.ptp(f.R) < 1e-6 and f.eps_g < 0.9 * f.Q.shape[0] / 6
            and np.all(f.params["g"] > 0)]
    return min(live, key=lambda f: f.eps_g) if live else None


def main() -> None:
    norm = framework.get_normalization("weightnorm")
    print(f"weightnorm, erf, eta = {ETA}; baseline: generic engine, default quadrature")
    print(f"{'K':>2} {'quantity':<34} {'exact':>12} {'generic':>12} {'ratio':>8}")
    for K in (2, 3):
        model = TeacherStudent(K, K)
        exact = theory.select_engine(model, norm)
        generic = theory.select_engine(model, norm, engine="generic")
        rng = np.random.default_rng(K)  # a valid state for T = I: teachers e_1 ... e_K
        W = rng.standard_normal((K, 2 * K + 2)) / np.sqrt(2 * K + 2)
        Q, R = W @ W.T, W[:, :K]
        p = {"g": np.full(K, 0.7)}
        te = best_time(lambda e=exact, Q=Q, R=R, p=p: e.rates(Q, R, p, eta=ETA))
        tg = best_time(lambda e=generic, Q=Q, R=R, p=p: e.rates(Q, R, p, eta=ETA),
                       repeats=3, inner=1)
        print(f"{K:>2} {'rates(): s per call':<34} {te:>12.2e} {tg:>12.2e} {tg / te:>8.0f}")

        t0 = time.perf_counter()
        fe = eq.find_fixed_points(model, norm, eta=ETA)
        te = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            fg = eq.find_fixed_points(model, norm, eta=ETA, engine="generic")
        except Exception as exc:  # reported, not hidden
            fg, why = [], f"{type(exc).__name__}"
        else:
            why = ""
        tg = time.perf_counter() - t0
        pe, pg = plateau(fe), plateau(fg)
        print(f"{K:>2} {'fixed points: s':<34} {te:>12.2f} {tg:>12.2f} {tg / te:>8.0f}")
        found_e = f"{pe.params['g'][0]:.4f}" if pe else "no"
        found_g = f"{pg.params['g'][0]:.4f}" if pg else "no " + why
        print(f"{K:>2} {'  plateau found (g)':<34} {found_e:>12} {found_g:>12}")
        if pe is None:
            continue
        t0 = time.perf_counter()
        he = eq.weight_space_hessian(model, norm, pe.Q, pe.R, pe.params)
        te = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            hg = eq.weight_space_hessian(model, norm, pe.Q, pe.R, pe.params,
                                                 engine="generic")
            gtxt = f"{hg.lambda_min:.5f}+-{hg.lambda_min_error:.0e}"
        except Exception as exc:
            gtxt = type(exc).__name__
        tg = time.perf_counter() - t0
        print(f"{K:>2} {'Hessian at the plateau: s':<34} {te:>12.2f} {tg:>12.2f} "
              f"{tg / te:>8.0f}")
        print(f"{K:>2} {'  lambda_min':<34} {he.lambda_min:>12.5f} {gtxt:>12}")


if __name__ == "__main__":
    main()
