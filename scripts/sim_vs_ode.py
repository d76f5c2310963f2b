# Regenerate with:  python scripts/sim_vs_ode.py
# (writes datasets/sim_vs_ode.nc and datasets/sim_vs_ode.png; a few minutes on 2 cores)
"""Convergence study: finite-N online SGD approaches the order-parameter ODE like 1/sqrt(N).

Setting: soft committee machine K = M = 2, erf, no normalization, eta = 0.5,
batch size 1, the Experiment's random initial condition (seed 0), alpha in [0, 20]
(the descent onto the symmetric plateau and the plateau itself). For each
N in {250, 500, 1000, 2000, 4000}, 16 replicas are simulated from the ODE's initial
order parameters (realised exactly in dimension N).

Deviation of replica r: d_r = sqrt(mean over alpha in (0, 20] of
|Q_r - Q_ode|_F^2 + |R_r - R_ode|_F^2); D(N) = sqrt(mean_r d_r^2), with a bootstrap
(over replicas) standard error. The slope b of log D = a + b log N (weighted least
squares, errors scaled by sqrt(chi^2/dof) when that exceeds 1) should be -1/2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # use this checkout's framework/plugins

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from framework import (  # noqa: E402
    Experiment,
    TeacherStudent,
    get_analyzer,
    list_analyzers,
    save,
    theory,
)

COMMAND = "python scripts/sim_vs_ode.py"
NS = (250, 500, 1000, 2000, 4000)
REPLICAS = 16
ALPHA = np.arange(0.0, 20.0 + 0.5, 1.0)
BOOTSTRAP = 2000


def ode(ex: Experiment) -> xr.Dataset:
    """Q, R, eps_g of the ODE on ALPHA (the dynamics analyzer, or theory.integrate)."""
    if "dynamics" in list_analyzers():
        return get_analyzer("dynamics", alpha=list(ALPHA)).run(ex)
    traj = theory.integrate(ex.model, ex.normalization, ex.initial_order_parameters(),
                            eta=ex.eta, alpha=ALPHA, batch_size=ex.batch_size)
    return xr.Dataset({"Q": (("alpha", "student", "student_"), traj.Q),
                       "R": (("alpha", "student", "teacher"), traj.R),
                       "eps_g": (("alpha",), traj.eps_g)})


def rms_with_bootstrap(sq: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """sqrt(mean(sq)) over replicas and the bootstrap sd of its logarithm."""
    value = float(np.sqrt(sq.mean()))
    idx = rng.integers(0, sq.size, size=(BOOTSTRAP, sq.size))
    boot = np.log(np.sqrt(sq[idx].mean(axis=1)))
    return value, float(boot.std(ddof=1))


def fit_slope(N: np.ndarray, D: np.ndarray, sd_log: np.ndarray) -> dict[str, float]:
    """Weighted least squares of log D on log N."""
    X = np.column_stack([np.ones(N.size), np.log(N)])
    w = 1.0 / sd_log**2
    cov = np.linalg.inv(X.T @ (X * w[:, None]))
    coef = cov @ (X.T @ (w * np.log(D)))
    resid = np.log(D) - X @ coef
    chi2 = float(np.sum(w * resid**2))
    dof = N.size - 2
    scale = max(1.0, np.sqrt(chi2 / dof))
    return {"slope": float(coef[1]), "slope_err": float(np.sqrt(cov[1, 1]) * scale),
            "intercept": float(coef[0]), "chi2": chi2, "dof": dof}


def main() -> None:
    t0 = time.perf_counter()
    ex = Experiment(TeacherStudent(2, 2), normalization="plain", eta=0.5, seed=0)
    ref = ode(ex)
    Q_ode, R_ode, eps_ode = ref["Q"].values, ref["R"].values, ref["eps_g"].values
    rng = np.random.default_rng(12345)  # bootstrap only
    rows = []
    for N in NS:
        t = time.perf_counter()
        ds = get_analyzer("simulation", N=N, alpha=list(ALPHA), replicas=REPLICAS).run(ex)
        later = slice(1, None)
        sq = (((ds["Q"].values - Q_ode) ** 2).sum(axis=(2, 3))
              + ((ds["R"].values - R_ode) ** 2).sum(axis=(2, 3)))[:, later].mean(axis=1)
        sq_eps = ((ds["eps_g"].values - eps_ode) ** 2)[:, later].mean(axis=1)
        D, sd = rms_with_bootstrap(sq, rng)
        De, sde = rms_with_bootstrap(sq_eps, rng)
        rows.append((N, D, sd, De, sde, ds["eps_g_mean"].values, ds["eps_g_sem"].values,
                     ds.attrs["backend"]))
        print(f"N = {N:5d}: D = {D:.5f} (+-{sd * D:.5f}), eps_g RMS deviation = {De:.2e}  "
              f"[{time.perf_counter() - t:.1f} s]", flush=True)

    Ns = np.array([r[0] for r in rows], dtype=float)
    D = np.array([r[1] for r in rows])
    sdD = np.array([r[2] for r in rows])
    De = np.array([r[3] for r in rows])
    sdDe = np.array([r[4] for r in rows])
    fit = fit_slope(Ns, D, sdD)
    fit_e = fit_slope(Ns, De, sdDe)
    consistent = abs(fit["slope"] + 0.5) <= 2.0 * fit["slope_err"]
    print(f"order parameters: slope = {fit['slope']:.3f} +- {fit['slope_err']:.3f} "
          f"(chi2 = {fit['chi2']:.2f} / {fit['dof']}); consistent with -1/2 (2 sigma): "
          f"{consistent}")
    print(f"eps_g:            slope = {fit_e['slope']:.3f} +- {fit_e['slope_err']:.3f}")

    out = xr.Dataset(
        {
            "deviation": ("N", D, {"long_name": "RMS deviation of (Q, R) from the ODE over "
                                                "replicas and alpha in (0, 20]", "units": "1"}),
            "deviation_log_sd": ("N", sdD, {"long_name": "bootstrap sd of log(deviation)",
                                            "units": "1"}),
            "eps_g_deviation": ("N", De, {"long_name": "RMS deviation of eps_g from the ODE",
                                          "units": "1"}),
            "eps_g_deviation_log_sd": ("N", sdDe, {"long_name": "bootstrap sd of "
                                                   "log(eps_g_deviation)", "units": "1"}),
            "eps_g_mean": (("N", "alpha"), np.array([r[5] for r in rows]),
                           {"long_name": "replica mean of the simulated eps_g", "units": "1"}),
            "eps_g_sem": (("N", "alpha"), np.array([r[6] for r in rows]),
                          {"long_name": "standard error of eps_g_mean", "units": "1"}),
            "eps_g_ode": ("alpha", eps_ode, {"long_name": "eps_g of the ODE", "units": "1"}),
        },
        coords={"N": ("N", Ns.astype(int), {"long_name": "input dimension", "units": "1"}),
                "alpha": ("alpha", ALPHA, {"long_name": "alpha = steps / N", "units": "1"})},
        attrs={
            "title": "simulation vs ODE: convergence in N",
            "command": COMMAND,
            "K": 2, "M": 2, "activation": "erf", "normalization": "plain", "eta": ex.eta,
            "batch_size": ex.batch_size, "seed": ex.seed, "replicas": REPLICAS,
            "init": "Experiment.initial_order_parameters() (init='random', init_N=1000)",
            "slope": fit["slope"], "slope_err": fit["slope_err"],
            "intercept": fit["intercept"], "fit_chi2": fit["chi2"], "fit_dof": fit["dof"],
            "slope_consistent_with_minus_half_2sigma": int(consistent),
            "eps_g_slope": fit_e["slope"], "eps_g_slope_err": fit_e["slope_err"],
            "fit": "weighted least squares of log(deviation) on log(N), weights from "
                   "bootstrap over replicas; slope error scaled by max(1, sqrt(chi2/dof))",
            "simulation_backend": rows[0][7],
            "symphase_spec_json": ex.to_json(),
        },
    )
    save(out, ROOT / "datasets" / "sim_vs_ode.nc")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        ax1.errorbar(ALPHA, r[5], yerr=r[6], fmt=".-", ms=3, lw=0.8, label=f"N = {r[0]}")
    ax1.plot(ALPHA, eps_ode, "k-", lw=1.5, label="ODE")
    ax1.set_yscale("log")
    ax1.set_xlabel(r"$\alpha$")
    ax1.set_ylabel(r"$\epsilon_g$ (replica mean)")
    ax1.set_title("K = M = 2, plain, $\\eta$ = 0.5")
    ax1.legend(fontsize=8)
    ax2.errorbar(Ns, D, yerr=sdD * D, fmt="o", label="(Q, R) deviation")
    ax2.errorbar(Ns, De, yerr=sdDe * De, fmt="s", label=r"$\epsilon_g$ deviation")
    grid = np.geomspace(Ns[0], Ns[-1], 50)
    ax2.plot(grid, np.exp(fit["intercept"]) * grid ** fit["slope"], "C0-",
             label=f"fit slope {fit['slope']:.3f} $\\pm$ {fit['slope_err']:.3f}")
    ax2.plot(grid, D[0] * (grid / Ns[0]) ** -0.5, "k--", lw=0.8, label=r"$N^{-1/2}$")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xticks(Ns, [str(int(n)) for n in Ns])
    ax2.minorticks_off()
    ax2.set_xlabel("N")
    ax2.set_ylabel("RMS deviation from the ODE")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "datasets" / "sim_vs_ode.png", dpi=120)
    print(f"wrote datasets/sim_vs_ode.nc and datasets/sim_vs_ode.png "
          f"[{time.perf_counter() - t0:.0f} s total]")


if __name__ == "__main__":
    main()
