"""Built-in reproductions for ``symphase reproduce NAME``.

``takagi2020``
    Takagi, Yoshida & Okada, "The Effect of Batch Normalization in the Symmetric Phase"
    (ICANN 2020): the symmetric plateau of the soft committee machine (``K = M``,
    ``T = I``), plain versus batch normalization (population statistics, ``gamma = 1``).
    For each ``K``: the gradient-flow plateau (``fixedpoint`` with ``eta = 0``), the
    exact weight-space Hessian there (``hessian``; batchnorm at weight norm 1, at the
    plain plateau's ``Q_ii`` and as a curve over the weight norm), and escape times
    (``escape``) for several ``eta`` from the same random initialization (same seed;
    two initial weight scales in the full run) and from the plateau itself.
    The trained-readout column (``*_trained`` variables): the same plateau, Hessian over
    ``(W, v)`` and escape from the plateau with the readout ``v`` trained at ``eta_v =
    eta`` (v as state; at the gradient-flow plateau ``eta_v / eta = 1``).
    Writes ``takagi2020.nc`` and PNG figures into ``out`` and prints a table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from framework import Experiment, TeacherStudent, convention_attrs, hookimpl
from plugins._pool import save_run

NORMALIZATIONS = ("plain", "batchnorm")
COMMAND = "symphase reproduce takagi2020 --out datasets"


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "Ks": (2,), "etas": (0.1, 0.5), "init_scales": (1.0,),
            "curve": np.geomspace(0.05, 20.0, 9), "alpha_max": 4000.0, "n_alpha": 800,
        }
    return {
        "Ks": (2, 3), "etas": (0.05, 0.1, 0.5, 1.0), "init_scales": (1.0, 0.3),
        "curve": np.geomspace(0.05, 20.0, 41), "alpha_max": 20000.0, "n_alpha": 2500,
    }


def _var(data: Any, dims: tuple[str, ...], long_name: str, units: str = "1") -> xr.DataArray:
    return xr.DataArray(data, dims=dims, attrs={"long_name": long_name, "units": units})


def _plateau(ds: xr.Dataset) -> xr.Dataset:
    b = int(ds.attrs["plateau_branch"])
    if b < 0:
        raise RuntimeError("no plateau branch was identified")
    return ds.isel(branch=b)


def _trained(K: int, eta_v: float) -> TeacherStudent:
    """K = M, the readout trained with rate ``eta_v`` (initial v = 1)."""
    return TeacherStudent(K, K, second_layer="trained", eta_v=eta_v)


def _first(experiment: Experiment | None) -> Experiment:
    """The first experiment of the run (set in the loop: there is always one)."""
    if experiment is None:
        raise RuntimeError("takagi2020: no experiment ran")
    return experiment


def takagi2020(out: Path, quick: bool = False) -> int:
    """Run the reproduction; write ``takagi2020.nc`` and figures into ``out``."""
    t0 = time.time()
    cfg = _settings(quick)
    Ks, etas, scales, curve = cfg["Ks"], cfg["etas"], cfg["init_scales"], cfg["curve"]
    grid = np.concatenate([[0.0], np.geomspace(0.01, cfg["alpha_max"], cfg["n_alpha"] - 1)])
    nN, nK, nE, nS = len(NORMALIZATIONS), len(Ks), len(etas), len(scales)
    shape_nk = (nN, nK)
    eps_plateau = np.full(shape_nk, np.nan)
    q_plateau = np.full(shape_nk, np.nan)
    c_over_q = np.full(shape_nk, np.nan)
    lam_min = np.full(shape_nk, np.nan)
    rate = np.full(shape_nk, np.nan)
    escape_mode = np.full(shape_nk, "", dtype=object)
    lam_bn_plain_norm = np.full(nK, np.nan)
    lam_curve = np.full((nK, curve.size), np.nan)
    a_init = np.full((nS, nN, nK, nE), np.nan)
    q_init_esc = np.full((nS, nN, nK, nE), np.nan)
    q_init0 = np.full((nS, nK), np.nan)
    eps_eta = np.full((nS, nN, nK, nE), np.nan)
    a_fp = np.full((nN, nK, nE), np.nan)
    # the trained readout (eta_v = eta): plateau, Hessian over (W, v), escape
    tr = {k: np.full(shape_nk, np.nan) for k in ("eps", "q", "v", "lam", "rate")}
    tr_mode = np.full(shape_nk, "", dtype=object)
    a_fp_t = np.full((nN, nK, nE), np.nan)
    eps_traj = np.full((nS, nN, nK, nE, grid.size), np.nan)
    q_traj = np.full((nS, nN, nK, nE, grid.size), np.nan)
    base = None

    interrupted = False  # Ctrl-C: keep what is finished (the rest stays NaN)
    try:
        for k, K in enumerate(Ks):
            model = TeacherStudent(K, K)
            for n, norm in enumerate(NORMALIZATIONS):
                e = Experiment(model, normalization=norm, eta=0.1, seed=0, analyzers=[
                    {"name": "fixedpoint", "eta": 0.0},
                    {"name": "hessian", "eta": 0.0},
                ])
                base = base or e
                res = e.run()
                fp, hs = _plateau(res["fixedpoint"]), _plateau(res["hessian"])
                eps_plateau[n, k] = float(fp.eps_g)
                Q = fp.Q.values
                q_plateau[n, k] = float(np.mean(np.diag(Q)))
                c_over_q[n, k] = float(Q[0, 1] / Q[0, 0])
                lam_min[n, k] = float(hs.lambda_min)
                rate[n, k] = float(fp.jacobian_eigenvalue_real[0])
                escape_mode[n, k] = str(hs.escape_mode.values)
                # trained readout at the gradient-flow plateau: eta_v / eta = 1 in the scaled
                # flow, whose eta = 0 limit is evaluated at eta = 1 (so eta_v = 1 there)
                et = Experiment(_trained(K, 1.0), normalization=norm, eta=0.1, seed=0, analyzers=[
                    {"name": "fixedpoint", "eta": 0.0}, {"name": "hessian", "eta": 0.0}])
                rt = et.run()
                fpt, hst = _plateau(rt["fixedpoint"]), _plateau(rt["hessian"])
                tr["eps"][n, k] = float(fpt.eps_g)
                tr["q"][n, k] = float(np.mean(np.diag(fpt.Q.values)))
                tr["v"][n, k] = float(np.mean(fpt.param_v.values))
                tr["lam"][n, k] = float(hst.lambda_min)
                tr["rate"][n, k] = float(fpt.jacobian_eigenvalue_real[0])
                tr_mode[n, k] = str(hst.escape_mode.values)
                if norm == "batchnorm":
                    from framework import OrderParameters

                    at = OrderParameters(Q, fp.R.values, model.T)
                    e2 = Experiment(model, normalization=norm, analyzers=[{
                        "name": "hessian", "at": at,
                        "weight_norm": [q_plateau[0, k], *curve.tolist()]}])
                    lm = e2.run()["hessian"].lambda_min.values[:, 0]
                    lam_bn_plain_norm[k] = lm[0]
                    lam_curve[k] = lm[1:]
                for j, eta in enumerate(etas):
                    for s, scale in enumerate(scales):
                        ex = Experiment(model, normalization=norm, eta=eta, seed=0, init="random",
                                        init_scale=scale, analyzers=[{
                                            "name": "escape", "start": "init",
                                            "plateau": "gradient_flow",
                                            "alpha": grid.tolist(), "rtol": 1e-9, "atol": 1e-11}])
                        ds = ex.run()["escape"]
                        q_init0[s, k] = float(np.mean(np.diag(ex.initial_order_parameters().Q)))
                        a_init[s, n, k, j] = float(ds.alpha_escape)
                        q_init_esc[s, n, k, j] = float(ds.weight_norm_at_escape)
                        eps_eta[s, n, k, j] = float(ds.eps_plateau)
                        eps_traj[s, n, k, j] = ds.eps_g.values
                        q_traj[s, n, k, j] = ds.weight_norm.values
                    ex = Experiment(model, normalization=norm, eta=eta, seed=0, analyzers=[{
                        "name": "escape", "start": "fixedpoint", "perturbation": 1e-3,
                        "alpha": grid.tolist(), "rtol": 1e-9, "atol": 1e-11}])
                    a_fp[n, k, j] = float(ex.run()["escape"].alpha_escape)
                    ex = Experiment(_trained(K, eta), normalization=norm, eta=eta, seed=0,
                                    analyzers=[{"name": "escape", "start": "fixedpoint",
                                                "perturbation": 1e-3, "alpha": grid.tolist(),
                                                "rtol": 1e-9, "atol": 1e-11,
                                                "stop_at_escape": True}])
                    a_fp_t[n, k, j] = float(ex.run()["escape"].alpha_escape)
    except (KeyboardInterrupt, SystemError) as exc:
        # Ctrl-C inside compiled code reaches Python as a SystemError caused by it
        from framework import interrupt_of

        if base is None or interrupt_of(exc) is None:  # nothing finished, or a bug
            raise
        interrupted = True

    crossover = lam_min[1] / lam_min[0]  # batchnorm at weight norm 1 over plain
    dims_nk = ("normalization", "K")
    dims_e = ("init_scale", "normalization", "K", "eta")
    ds = xr.Dataset(
        {
            "eps_plateau": _var(eps_plateau, dims_nk, "eps_g of the gradient-flow (eta -> 0) "
                                "symmetric plateau"),
            "weight_norm_plateau": _var(q_plateau, dims_nk, "Q_ii at the plateau (batchnorm: "
                                        "the reference weight norm 1; only angles are fixed)"),
            "cos_students_plateau": _var(c_over_q, dims_nk, "Q_12 / Q_11 at the plateau (cosine "
                                         "between student vectors)"),
            "lambda_min": _var(lam_min, dims_nk, "most negative eigenvalue of the Hessian of eps_g "
                               "in W = J/sqrt(N) at the plateau (batchnorm: weight norm 1)"),
            "unstable_rate": _var(rate, dims_nk, "largest Jacobian eigenvalue at the plateau, "
                                  "eta -> 0 (equals -lambda_min)", "1/(eta alpha)"),
            "escape_mode": _var(escape_mode, dims_nk, "class of the Hessian escape mode"),
            "lambda_min_batchnorm_at_plain_norm": _var(
                lam_bn_plain_norm, ("K",), "batchnorm lambda_min at the plain plateau's Q_ii"),
            "lambda_min_batchnorm": _var(
                lam_curve, ("K", "weight_norm"), "batchnorm lambda_min at the plateau versus "
                "weight norm (exactly lambda(1) / weight_norm)"),
            "weight_norm_crossover": _var(
                crossover, ("K",), "weight norm below which batchnorm's |lambda_min| exceeds "
                "plain's: lambda_bn(1) / lambda_plain"),
            "weight_norm_init": _var(q_init0, ("init_scale", "K"),
                                     "initial weight norm Q_ii (mean over students)"),
            "alpha_escape_init": _var(a_init, dims_e, "escape time from the random init: first "
                                      "alpha with eps_g < eps_plateau / 2 (gradient-flow "
                                      "plateau of the same normalization; NaN: none)"),
            "weight_norm_at_escape": _var(q_init_esc, dims_e, "weight norm Q_ii at alpha_escape "
                                          "(from the random init)"),
            "eps_plateau_threshold": _var(eps_eta, dims_e, "plateau eps_g whose half defines "
                                          "the escape from the random init (eta -> 0 plateau)"),
            "alpha_escape_fixedpoint": _var(
                a_fp, ("normalization", "K", "eta"), "escape time from the plateau at this eta "
                "perturbed by 1e-3 along its unstable direction (batchnorm: weight norm 1); "
                "threshold: half that plateau's eps_g"),
            "eps_plateau_trained": _var(tr["eps"], dims_nk, "eps_g of the gradient-flow "
                                        "symmetric plateau with the readout v trained"),
            "weight_norm_plateau_trained": _var(tr["q"], dims_nk, "Q_ii at the plateau, "
                                                "trained readout (batchnorm: 1)"),
            "readout_plateau_trained": _var(tr["v"], dims_nk, "readout v at the plateau "
                                            "(mean over students), trained readout"),
            "lambda_min_trained": _var(tr["lam"], dims_nk, "most negative eigenvalue of the "
                                       "Hessian of eps_g in (W, v) at the plateau, trained "
                                       "readout (batchnorm: weight norm 1)"),
            "unstable_rate_trained": _var(tr["rate"], dims_nk, "largest Jacobian eigenvalue "
                                          "at the plateau with v in the state, eta -> 0 with "
                                          "eta_v / eta = 1", "1/(eta alpha)"),
            "escape_mode_trained": _var(tr_mode, dims_nk, "class of the Hessian escape mode, "
                                        "trained readout"),
            "alpha_escape_fixedpoint_trained": _var(
                a_fp_t, ("normalization", "K", "eta"), "escape time from the plateau at this "
                "eta perturbed by 1e-3 along its unstable direction, readout trained with "
                "eta_v = eta (batchnorm: weight norm 1)"),
            "eps_g": _var(eps_traj, (*dims_e, "alpha"), "generalization error along the ODE from "
                          "the random init"),
            "weight_norm_trajectory": _var(q_traj, (*dims_e, "alpha"), "weight norm Q_ii (mean) "
                                           "along the ODE from the random init"),
        },
        coords={
            "normalization": ("normalization", list(NORMALIZATIONS),
                              {"long_name": "normalization", "units": "1"}),
            "K": ("K", list(Ks), {"long_name": "student = teacher units K = M", "units": "1"}),
            "eta": ("eta", list(etas), {"long_name": "learning rate", "units": "1"}),
            "init_scale": ("init_scale", list(scales),
                           {"long_name": "std of the random initial weight components",
                            "units": "1"}),
            "weight_norm": ("weight_norm", curve,
                            {"long_name": "weight norm Q_ii = |W_i|^2", "units": "1"}),
            "alpha": ("alpha", grid, {"long_name": "time alpha = steps / N", "units": "1"}),
        },
        attrs={
            **{k: v for k, v in convention_attrs(_first(base)).items()
               if k.startswith("convention_") or k in ("activation", "noise_variance",
                                                       "batch_size", "init_N", "seed")},
            "title": "Takagi, Yoshida & Okada (ICANN 2020): batch normalization in the "
            "symmetric phase",
            "command": COMMAND + (" --quick" if quick else ""),
            "teacher": "T = I, K = M",
            "batchnorm": "population statistics, gamma = 1 (fixed), beta = 0, eps = 0",
            "hessian_coordinates": "W = J / sqrt(N); weight_norm = Q_ii = |W_i|^2; "
            "lambda(c W) = lambda(W) / c^2 for batchnorm",
            "hessian_eta": "Hessians and rates at the gradient-flow (eta -> 0) plateau; eta^2 "
            "term excluded there",
            "escape_eta_squared_term": "included (escape runs)",
            "init": "random, seed 0, same for plain and batchnorm (init_N = 1000)",
            "readout": "variables without suffix: readout v = 1 fixed (soft committee "
            "machine); *_trained: the readout v trained (initial 1) with eta_v = eta, v a "
            "state variable of the ODE and a coordinate of the Hessian (block d^2 eps_g / "
            "dv^2 next to Hess_W = N Hess_J)",
        },
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if save_run(ds, out / "takagi2020.nc", interrupted):  # no figures of a partial result
        return 130
    _figures(ds, out)
    print(_table(ds))
    print(f"wrote {out / 'takagi2020.nc'} and figures in {time.time() - t0:.0f} s")
    return 0


def _fmt(x: float, spec: str = ".0f") -> str:
    return "   n/e" if not np.isfinite(x) else format(x, spec)


def _plateau_row(K: Any, norm: Any, r: xr.Dataset, suffix: str, middle: str) -> str:
    """One line of the plateau table: Q_ii, ``middle`` (cos or v), eps, lambda_min, rate
    and escape mode of the variables with ``suffix`` ("" or "_trained")."""
    return (f"{K:>2} {norm:<14} {float(r[f'weight_norm_plateau{suffix}']):7.4f} {middle} "
            f"{float(r[f'eps_plateau{suffix}']):12.6f} {float(r[f'lambda_min{suffix}']):11.6f} "
            f"{float(r[f'unstable_rate{suffix}']):8.5f}  {r[f'escape_mode{suffix}'].values}")


def _table(ds: xr.Dataset) -> str:
    lines = ["Plateau (eta -> 0) and Hessian, K = M, T = I:",
             f"{'K':>2} {'normalization':<14} {'Q_ii':>7} {'cos':>6} {'eps_plateau':>12} "
             f"{'lambda_min':>11} {'rate':>8}  escape mode"]
    for K in ds.K.values:
        for norm in ds.normalization.values:
            r = ds.sel(K=K, normalization=norm)
            lines.append(_plateau_row(K, norm, r, "", f"{float(r.cos_students_plateau):6.3f}"))
        r = ds.sel(K=K)
        qp = float(r.weight_norm_plateau.sel(normalization="plain"))
        lines.append(
            f"{K:>2} {'batchnorm':<14} {qp:7.4f} {'':>6} {'':>12} "
            f"{float(r.lambda_min_batchnorm_at_plain_norm):11.6f}   (at plain's Q_ii)")
        lines.append(f"   crossover weight norm (equal |lambda_min|): "
                     f"{float(r.weight_norm_crossover):.4f}")
    if "lambda_min_trained" in ds:
        lines.append("")
        lines.append("Trained readout (eta_v = eta), plateau (eta -> 0) and Hessian in (W, v):")
        lines.append(f"{'K':>2} {'normalization':<14} {'Q_ii':>7} {'v':>7} {'eps_plateau':>12} "
                     f"{'lambda_min':>11} {'rate':>8}  escape mode")
        for K in ds.K.values:
            for norm in ds.normalization.values:
                r = ds.sel(K=K, normalization=norm)
                lines.append(_plateau_row(K, norm, r, "_trained",
                                          f"{float(r.readout_plateau_trained):7.4f}"))
    etas = ds.eta.values
    head = " ".join(f"{'eta=' + format(e, 'g'):>10}" for e in etas)
    for start, var in (("random init (same seed); threshold: eta->0 plateau",
                        "alpha_escape_init"),
                       ("plateau at eta + 1e-3 (batchnorm at Q_ii = 1)",
                        "alpha_escape_fixedpoint"),
                       ("plateau at eta + 1e-3, trained readout (eta_v = eta)",
                        "alpha_escape_fixedpoint_trained")):
        if var not in ds:
            continue
        lines.append("")
        lines.append(f"Escape alpha (eps_g < eps_plateau/2), start: {start}")
        scales = ds.init_scale.values if var == "alpha_escape_init" else [None]
        for s in scales:
            if s is not None:
                q0 = ds.weight_norm_init.sel(init_scale=s)
                lines.append(f" init_scale = {s:g}  (initial Q_ii ~ "
                             + ", ".join(f"K={K}: {float(q0.sel(K=K)):.3f}"
                                         for K in ds.K.values) + ")")
            lines.append(f"{'K':>2} {'normalization':<14} {head}  ratio bn/plain")
            for K in ds.K.values:
                row = {}
                for norm in ds.normalization.values:
                    sel = ds[var].sel(K=K, normalization=norm)
                    if s is not None:
                        sel = sel.sel(init_scale=s)
                    row[norm] = sel.values
                    cells = " ".join(f"{_fmt(v):>10}" for v in row[norm])
                    lines.append(f"{K:>2} {norm:<14} {cells}")
                ratio = " ".join(f"{_fmt(v, '.2f'):>10}" for v in row["batchnorm"] / row["plain"])
                lines.append(f"{'':>2} {'bn / plain':<14} {ratio}")
                if s is not None:
                    q = ds.weight_norm_at_escape.sel(K=K, normalization="batchnorm",
                                                     init_scale=s).values
                    lines.append(f"{'':>2} {'bn Q_ii@esc':<14} "
                                 + " ".join(f"{_fmt(v, '.3f'):>10}" for v in q))
    return "\n".join(lines)


def _figures(ds: xr.Dataset, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ks, etas = ds.K.values, ds.eta.values
    fig, axes = plt.subplots(len(Ks), len(etas), figsize=(3.2 * len(etas), 2.8 * len(Ks)),
                             squeeze=False, sharex=True)
    styles = {1.0: "-", 0.3: "--"}
    for a, K in enumerate(Ks):
        for b, eta in enumerate(etas):
            ax = axes[a, b]
            for norm, color in zip(ds.normalization.values, ("C0", "C1"), strict=True):
                for s in ds.init_scale.values:
                    y = ds.eps_g.sel(K=K, eta=eta, normalization=norm, init_scale=s)
                    ax.plot(ds.alpha[1:], y[1:], styles.get(float(s), ":"), color=color,
                            label=f"{norm}, init scale {s:g}")
                ax.axhline(float(ds.eps_plateau.sel(K=K, normalization=norm)), color=color,
                           lw=0.6, alpha=0.6)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(1e-4, 2.0)
            ax.set_title(f"K = M = {K}, eta = {eta:g}", fontsize=9)
            if b == 0:
                ax.set_ylabel("eps_g")
            if a == len(Ks) - 1:
                ax.set_xlabel("alpha")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle("Escape from the symmetric plateau: plain vs batch norm (ODE, same init; "
                 "thin lines: eta->0 plateau eps_g)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "takagi2020_eps_g.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for K, color in zip(Ks, ("C2", "C3", "C4"), strict=False):
        ax.loglog(ds.weight_norm, -ds.lambda_min_batchnorm.sel(K=K), color=color,
                  label=f"batchnorm, K = {K}")
        lp = -float(ds.lambda_min.sel(K=K, normalization="plain"))
        qp = float(ds.weight_norm_plateau.sel(K=K, normalization="plain"))
        ax.axhline(lp, color=color, ls="--", lw=0.8, label=f"plain plateau, K = {K}")
        ax.plot([qp], [lp], "o", color=color)
        ax.axvline(float(ds.weight_norm_crossover.sel(K=K)), color=color, ls=":", lw=0.8)
    ax.set_xlabel("weight norm Q_ii = |W_i|^2")
    ax.set_ylabel("-lambda_min (Hessian of eps_g in W)")
    ax.set_title("Escape curvature at the plateau (dotted: crossover)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "takagi2020_lambda_min.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(Ks), figsize=(4.2 * len(Ks), 3.2), squeeze=False)
    for a, K in enumerate(Ks):
        ax = axes[0, a]
        for eta in etas:
            for s in ds.init_scale.values:
                y = ds.weight_norm_trajectory.sel(K=K, eta=eta, normalization="batchnorm",
                                                  init_scale=s)
                ax.plot(ds.alpha[1:], y[1:], styles.get(float(s), ":"),
                        label=f"eta = {eta:g}, init scale {s:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"batchnorm weight norm, K = M = {K}", fontsize=9)
        ax.set_xlabel("alpha")
        ax.set_ylabel("Q_ii (mean)")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "takagi2020_weight_norm.png", dpi=120)
    plt.close(fig)


@hookimpl
def symphase_register_reproductions(registry):
    registry.add_reproduction(
        "takagi2020", takagi2020,
        "Takagi et al. 2020: Hessian at the symmetric plateau and escape, plain vs batchnorm",
    )
