# Regenerate with:  python scripts/sim_vs_ode.py [--case readout]
# (writes datasets/sim_vs_ode[_readout].nc and .png; a few minutes on 2 cores per case)
"""Convergence study: finite-N online SGD approaches the order-parameter ODE like 1/sqrt(N).

Case ``committee`` (default; ``datasets/sim_vs_ode.*``): soft committee machine K = M = 2,
erf, no normalization, eta = 0.5, batch size 1, the Experiment's random initial condition
(seed 0), alpha in [0, 20] (the descent onto the symmetric plateau and the plateau itself).

Case ``readout`` (``datasets/sim_vs_ode_readout.*``, issue 13): the two-layer network
K = M = 2 with a trained readout (eta_v = eta = 0.5, readout starting at ones), output
noise 0.01, first-layer weight decay 1e-3, for ``plain`` and ``batchnorm``; the deviation
includes the readout ``v``.

For each N in {250, 500, 1000, 2000, 4000}, 16 replicas are simulated from the ODE's
initial order parameters (realised exactly in dimension N).

Deviation of replica r: d_r = sqrt(mean over alpha in (0, 20] of
|Q_r - Q_ode|_F^2 + |R_r - R_ode|_F^2 (+ |v_r - v_ode|^2)); D(N) = sqrt(mean_r d_r^2),
with a bootstrap (over replicas) standard error. The slope b of log D = a + b log N
(weighted least squares, errors scaled by sqrt(chi^2/dof) when that exceeds 1) should be
-1/2.
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
    convention_attrs,
    get_analyzer,
    list_analyzers,
    save,
    theory,
)

CASES = {
    "committee": {"model": {}, "normalizations": ("plain",), "stem": "sim_vs_ode",
                  "title": "K = M = 2, plain"},
    "readout": {"model": {"second_layer": "trained", "eta_v": 0.5, "noise": 0.01,
                          "weight_decay": 1e-3},
                "normalizations": ("plain", "batchnorm"), "stem": "sim_vs_ode_readout",
                "title": "K = M = 2, trained readout"},
}
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


def study(ex: Experiment, rng: np.random.Generator) -> dict:
    """Simulations at every N against the ODE of ``ex``: deviations and the fitted slope."""
    ref = ode(ex)
    trained = "param_v" in ref
    rows = []
    for N in NS:
        t = time.perf_counter()
        ds = get_analyzer("simulation", N=N, alpha=list(ALPHA), replicas=REPLICAS).run(ex)
        later = slice(1, None)
        sq = (((ds["Q"].values - ref["Q"].values) ** 2).sum(axis=(2, 3))
              + ((ds["R"].values - ref["R"].values) ** 2).sum(axis=(2, 3)))
        if trained:
            sq = sq + ((ds["param_v"].values - ref["param_v"].values) ** 2).sum(axis=2)
        sq = sq[:, later].mean(axis=1)
        sq_eps = ((ds["eps_g"].values - ref["eps_g"].values) ** 2)[:, later].mean(axis=1)
        D, sd = rms_with_bootstrap(sq, rng)
        De, sde = rms_with_bootstrap(sq_eps, rng)
        rows.append((N, D, sd, De, sde, ds["eps_g_mean"].values, ds["eps_g_sem"].values,
                     ds.attrs["backend"]))
        print(f"{ex.normalization.name}, N = {N:5d}: D = {D:.5f} (+-{sd * D:.5f}), eps_g RMS "
              f"deviation = {De:.2e}  [{time.perf_counter() - t:.1f} s]", flush=True)
    Ns = np.array([r[0] for r in rows], dtype=float)
    out = {"N": Ns, "D": np.array([r[1] for r in rows]), "sdD": np.array([r[2] for r in rows]),
           "De": np.array([r[3] for r in rows]), "sdDe": np.array([r[4] for r in rows]),
           "eps_mean": np.array([r[5] for r in rows]), "eps_sem": np.array([r[6] for r in rows]),
           "eps_ode": ref["eps_g"].values, "backend": rows[0][7], "trained": trained}
    out["fit"] = fit_slope(Ns, out["D"], out["sdD"])
    out["fit_e"] = fit_slope(Ns, out["De"], out["sdDe"])
    fit, fit_e = out["fit"], out["fit_e"]
    out["consistent"] = abs(fit["slope"] + 0.5) <= 2.0 * fit["slope_err"]
    print(f"{ex.normalization.name}: order parameters: slope = {fit['slope']:.3f} +- "
          f"{fit['slope_err']:.3f} (chi2 = {fit['chi2']:.2f} / {fit['dof']}); consistent "
          f"with -1/2 (2 sigma): {out['consistent']}; eps_g: slope = {fit_e['slope']:.3f} "
          f"+- {fit_e['slope_err']:.3f}")
    return out


def main(case: str = "committee") -> None:
    t0 = time.perf_counter()
    cfg = CASES[case]
    command = "python scripts/sim_vs_ode.py" + ("" if case == "committee" else f" --case {case}")
    rng = np.random.default_rng(12345)  # bootstrap only
    results, experiments = [], []
    for name in cfg["normalizations"]:
        ex = Experiment(TeacherStudent(2, 2, **cfg["model"]), normalization=name, eta=0.5,
                        seed=0)
        experiments.append(ex)
        results.append(study(ex, rng))
    single = len(results) == 1

    def stack(key: str) -> np.ndarray:
        return results[0][key] if single else np.stack([r[key] for r in results])

    lead = () if single else ("normalization",)
    what = "(Q, R)" if not results[0]["trained"] else "(Q, R, v)"
    data = {
        "deviation": ((*lead, "N"), stack("D"), {
            "long_name": f"RMS deviation of {what} from the ODE over replicas and alpha in "
                         "(0, 20]", "units": "1"}),
        "deviation_log_sd": ((*lead, "N"), stack("sdD"),
                             {"long_name": "bootstrap sd of log(deviation)", "units": "1"}),
        "eps_g_deviation": ((*lead, "N"), stack("De"),
                            {"long_name": "RMS deviation of eps_g from the ODE", "units": "1"}),
        "eps_g_deviation_log_sd": ((*lead, "N"), stack("sdDe"), {
            "long_name": "bootstrap sd of log(eps_g_deviation)", "units": "1"}),
        "eps_g_mean": ((*lead, "N", "alpha"), stack("eps_mean"),
                       {"long_name": "replica mean of the simulated eps_g", "units": "1"}),
        "eps_g_sem": ((*lead, "N", "alpha"), stack("eps_sem"),
                      {"long_name": "standard error of eps_g_mean", "units": "1"}),
        "eps_g_ode": ((*lead, "alpha"), stack("eps_ode"),
                      {"long_name": "eps_g of the ODE", "units": "1"}),
    }
    coords = {"N": ("N", results[0]["N"].astype(int),
                    {"long_name": "input dimension", "units": "1"}),
              "alpha": ("alpha", ALPHA, {"long_name": "alpha = steps / N", "units": "1"})}
    attrs = {
        "title": "simulation vs ODE: convergence in N" + ("" if single else " (" + cfg["title"]
                                                            + ")"),
        "command": command,
        **{k: v for k, v in convention_attrs(experiments[0]).items()
           if k.startswith("convention") or k in ("c_student", "c_teacher", "readout_trained",
                                                 "eta_v", "weight_decay", "weight_decay_v")},
        "K": 2, "M": 2, "activation": "erf", "eta": 0.5, "batch_size": 1, "seed": 0,
        "replicas": REPLICAS,
        "init": "Experiment.initial_order_parameters() (init='random', init_N=1000)",
        "fit": "weighted least squares of log(deviation) on log(N), weights from "
               "bootstrap over replicas; slope error scaled by max(1, sqrt(chi2/dof))",
        "simulation_backend": results[0]["backend"],
        "symphase_spec_json": experiments[0].to_json(),
    }
    if single:
        fit, fit_e = results[0]["fit"], results[0]["fit_e"]
        attrs.update({
            "normalization": experiments[0].normalization.name,
            "slope": fit["slope"], "slope_err": fit["slope_err"],
            "intercept": fit["intercept"], "fit_chi2": fit["chi2"], "fit_dof": fit["dof"],
            "slope_consistent_with_minus_half_2sigma": int(results[0]["consistent"]),
            "eps_g_slope": fit_e["slope"], "eps_g_slope_err": fit_e["slope_err"],
        })
    else:
        coords["normalization"] = ("normalization", list(cfg["normalizations"]))
        for key, long_name in (("slope", "fitted slope of log(deviation) on log(N)"),
                               ("slope_err", "its standard error"),
                               ("eps_g_slope", "fitted slope of log(eps_g_deviation)"),
                               ("eps_g_slope_err", "its standard error")):
            src, field = ("fit_e" if key.startswith("eps") else "fit"), key.replace(
                "eps_g_", "")
            data[key] = (("normalization",), [r[src][field] for r in results],
                         {"long_name": long_name, "units": "1"})
    out = xr.Dataset(data, coords=coords, attrs=attrs)
    save(out, ROOT / "datasets" / f"{cfg['stem']}.nc")

    fig, axes = plt.subplots(1, len(results) + 1, figsize=(5 * (len(results) + 1) + 2.5, 4))
    for ax1, r, ex in zip(axes[:-1], results, experiments, strict=True):
        for N, m, e in zip(r["N"], r["eps_mean"], r["eps_sem"], strict=True):
            ax1.errorbar(ALPHA, m, yerr=e, fmt=".-", ms=3, lw=0.8, label=f"N = {int(N)}")
        ax1.plot(ALPHA, r["eps_ode"], "k-", lw=1.5, label="ODE")
        ax1.set_yscale("log")
        ax1.set_xlabel(r"$\alpha$")
        ax1.set_ylabel(r"$\epsilon_g$ (replica mean)")
        ax1.set_title(f"{cfg['title']}, {ex.normalization.name}, $\\eta$ = 0.5", fontsize=9)
        ax1.legend(fontsize=8)
    ax2 = axes[-1]
    for j, (r, ex) in enumerate(zip(results, experiments, strict=True)):
        Ns, D, sdD, De, sdDe, fit = r["N"], r["D"], r["sdD"], r["De"], r["sdDe"], r["fit"]
        tag = "" if single else f"{ex.normalization.name}: "
        ax2.errorbar(Ns, D, yerr=sdD * D, fmt="o", color=f"C{2 * j}",
                     label=f"{tag}{what} deviation")
        ax2.errorbar(Ns, De, yerr=sdDe * De, fmt="s", color=f"C{2 * j + 1}",
                     label=tag + r"$\epsilon_g$ deviation")
        grid = np.geomspace(Ns[0], Ns[-1], 50)
        ax2.plot(grid, np.exp(fit["intercept"]) * grid ** fit["slope"], "-", color=f"C{2 * j}",
                 label=f"{tag}fit slope {fit['slope']:.3f} $\\pm$ {fit['slope_err']:.3f}")
    Ns, D0 = results[0]["N"], results[0]["D"][0]
    ax2.plot(Ns, D0 * (Ns / Ns[0]) ** -0.5, "k--", lw=0.8, label=r"$N^{-1/2}$")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xticks(Ns, [str(int(n)) for n in Ns])
    ax2.minorticks_off()
    ax2.set_xlabel("N")
    ax2.set_ylabel("RMS deviation from the ODE")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(ROOT / "datasets" / f"{cfg['stem']}.png", dpi=120)
    print(f"wrote datasets/{cfg['stem']}.nc and datasets/{cfg['stem']}.png "
          f"[{time.perf_counter() - t0:.0f} s total]")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), default="committee")
    main(parser.parse_args().case)
