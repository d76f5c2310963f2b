"""``symphase reproduce normalizations``: the symmetric plateau of every built-in
normalization.

For each normalization (plain, batchnorm, weightnorm, batchnorm_affine, meanonly,
layernorm, batchnorm_stopgrad), ``K = M`` in ``Ks`` and ``eta`` in ``etas``, from the
same random initialization (seed 0): the plateau branch of ``fixedpoint`` at that
``eta``, the smallest Hessian eigenvalue ``lambda_min`` there (``hessian``; with the
trainable parameters where the normalization has them, at the weight norm and gain of
the fixed point, stored as coordinates) and the escape time of the ODE from the
plateau (``escape``). The trained gains (weightnorm ``g``, batchnorm_affine ``gamma``,
its ``beta`` held at 0 by the odd symmetry) use the exact engine with the gain as
state; normalizations without a closed form use the generic engine (error estimates
stored as ``*_error``; the engine of each entry in ``engine``); an entry that cannot
be computed accurately (e.g. layernorm: the ``eta^2`` term is infinite for ``K <= 3``;
``K = 2`` output is ``+-1``) is NaN with the reason in ``status``. The trained-readout
column (``*_trained`` variables; plain, batchnorm, weightnorm, batchnorm_affine): the same
with the readout ``v`` trained at ``eta_v = eta`` (v as state, a Hessian coordinate).
Writes ``normalizations.nc`` and ``normalizations.png`` into ``out``,
``docs/normalizations.md`` when ``docs`` is given (or ``out`` is a ``datasets`` folder
next to a ``docs`` one: the shipped results), and prints a table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from framework import Experiment, TeacherStudent, convention_attrs, hookimpl
from plugins._pool import run_jobs, save_run

NORMALIZATIONS = ("plain", "batchnorm", "weightnorm", "batchnorm_affine", "meanonly",
                  "layernorm", "batchnorm_stopgrad")
COMMAND = "symphase reproduce normalizations --out datasets"
TRAINED_GAIN = ("weightnorm", "batchnorm_affine")  # gains as state (exact engine)
#: Normalizations of the trained-readout column (eta_v = eta; v as state, exact engine).
TRAINED_READOUT = ("plain", "batchnorm", "weightnorm", "batchnorm_affine")
#: Result fields of an entry; the trained-readout column stores them as ``<name>_trained``.
_FIELDS = ("lambda_min", "lambda_min_error", "rate", "alpha_escape", "alpha_escape_error",
           "eps_plateau", "weight_norm", "gain", "readout", "seconds")


#: Coarse quadrature (16 x cheaper than the default 16 x 4096 points) of the second
#: escape run of the generic engine, whose difference to the default run is the stored
#: error estimate of alpha_escape (the fixed point is re-solved with it).
ESCAPE_QUADRATURE = {"samples": 1024, "replicates": 4}


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"Ks": (2,), "etas": (0.5,), "alpha_max": 4000.0, "n_alpha": 801,
                "normalizations": NORMALIZATIONS}
    return {"Ks": (2, 3), "etas": (0.05, 0.1, 0.5, 1.0), "alpha_max": 10000.0, "n_alpha": 4001,
            "normalizations": NORMALIZATIONS}


def _var(data: Any, dims: tuple[str, ...], long_name: str, units: str = "1") -> xr.DataArray:
    return xr.DataArray(data, dims=dims, attrs={"long_name": long_name, "units": units})


def _not_defined(name: str, K: int) -> str | None:
    """Entries without a finite-eta ODE or with a degenerate output, stated up front."""
    if name == "layernorm" and K == 2:
        return ("degenerate: with K = 2 layer norm's output is x~ = +-1 (sign of x_1 - x_2) "
                "and its gradient vanishes almost everywhere (eps = 0); no plateau to analyse")
    if name == "layernorm" and K == 3:
        return ("not defined: with eps = 0 the eta^2 term E[a a^T] of the ODE is infinite "
                "for K <= 3 (gradient ~ 1/std_k(x), density of std near 0 ~ std^(K-2)), so "
                "no finite-eta ODE (no N -> infinity limit) exists")
    return None


def _model(K: int, eta: float, readout: str) -> TeacherStudent:
    """The committee machine (``readout="fixed"``, v = 1) or the two-layer network with
    the readout trained at ``eta_v = eta`` (initial v = 1)."""
    if readout == "trained":
        return TeacherStudent(K, K, second_layer="trained", eta_v=eta)
    return TeacherStudent(K, K)


def _entry(name: str, K: int, eta: float, cfg: dict[str, Any],
           readout: str = "fixed") -> dict[str, Any]:
    out: dict[str, Any] = {"lambda_min": np.nan, "lambda_min_error": 0.0, "rate": np.nan,
           "alpha_escape": np.nan, "alpha_escape_error": 0.0, "eps_plateau": np.nan,
           "weight_norm": np.nan, "gain": np.nan, "readout": np.nan, "seconds": 0.0,
           "status": "ok", "engine": ""}
    t0 = time.time()
    why = _not_defined(name, K)
    if why is None and readout == "trained" and name not in TRAINED_READOUT:
        why = ("not computed: the trained-readout column covers "
               + ", ".join(TRAINED_READOUT))
    if why is not None:
        out["status"] = why
        return out
    exp = Experiment(_model(K, eta, readout), normalization=name, eta=eta, seed=0,
                     analyzers=[{"name": "hessian"}])
    try:
        h = exp.run()["hessian"]
        b = int(h.attrs["plateau_branch"])
        if b < 0:
            gains = [k for k in ("param_g", "param_gamma") if k in h]
            desc = ", ".join(
                f"eps_g={float(h.eps_g[j]):.4g}"
                + (f" gain={float(np.mean(h[gains[0]].values[j])):.3g}" if gains else "")
                for j in range(h.sizes["branch"]))
            raise RuntimeError(f"no plateau: the branches found ({desc}) are dead (output "
                               "independent of the input) or not in the symmetric phase")
        hb = h.isel(branch=b)
        out["engine"] = str(h.attrs.get("engine", ""))
        out["lambda_min"] = float(hb.lambda_min)
        if "lambda_min_error" in hb:
            out["lambda_min_error"] = float(hb.lambda_min_error)
        out["eps_plateau"] = float(hb.eps_g)
        out["weight_norm"] = float(np.mean(np.diagonal(hb.Q.values)))
        gains = [k for k in ("param_g", "param_gamma") if k in hb]
        out["gain"] = float(np.mean(hb[gains[0]].values)) if gains else np.nan
        if "param_v" in hb:
            out["readout"] = float(np.mean(hb.param_v.values))
        # an engine object (generic engine, or the exact one with the gain as state):
        # stop integrating at the escape; the generic engine's escape error is
        # estimated by |difference| to a run with the coarser ESCAPE_QUADRATURE (another
        # base-point seed), whose own error is the larger one
        engine_object = out["engine"] == "generic" or not np.isnan(out["gain"]) \
            or readout == "trained"
        generic = out["engine"] == "generic"
        opts = {"name": "escape", "alpha_max": cfg["alpha_max"] / eta,
                "n_points": cfg["n_alpha"], "stop_at_escape": engine_object}
        e = exp.evolve(analyzers=[opts]).run()["escape"]
        out["alpha_escape"] = float(e.alpha_escape)
        if generic:
            try:
                o = dict(opts, quadrature={**ESCAPE_QUADRATURE, "seed": 1})
                c = exp.evolve(analyzers=[o]).run()["escape"]
                out["alpha_escape_error"] = float(abs(float(c.alpha_escape)
                                                      - out["alpha_escape"]))
            except Exception:  # the coarse run failed: no error estimate
                out["alpha_escape_error"] = np.nan
        out["rate"] = float(e.unstable_rate)
        if bool(e.diverged) and not np.isfinite(out["alpha_escape"]):
            out["status"] = f"escape run stopped: {e.attrs.get('status', 'diverged')}"
        elif not np.isfinite(out["alpha_escape"]):
            out["status"] = (f"no escape within alpha_max = {cfg['alpha_max'] / eta:g} "
                             f"(unstable rate {out['rate']:.3g} per eta alpha)")
    except Exception as exc:  # recorded per entry: the table shows why
        out["status"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    out["seconds"] = time.time() - t0
    return out


def normalizations(out: Path, quick: bool = False, docs: Path | None = None,
                   workers: int = 2) -> int:
    """Run the comparison (entries in ``workers`` processes); write
    ``normalizations.nc``/``.png`` into ``out``."""
    t0 = time.time()
    cfg = _settings(quick)
    names, Ks, etas = cfg["normalizations"], cfg["Ks"], cfg["etas"]
    shape = (len(names), len(Ks), len(etas))
    readouts = ("fixed", "trained")
    results = {ro: {k: np.full(shape, np.nan) for k in _FIELDS} for ro in readouts}
    statuses = {ro: np.full(shape, "", dtype=object) for ro in readouts}
    engine_names = {ro: np.full(shape, "", dtype=object) for ro in readouts}
    jobs = [(a, b, c, ro) for a in range(len(names)) for b in range(len(Ks))
            for c in range(len(etas)) for ro in readouts]
    jobs.sort(key=lambda j: (etas[j[2]], -Ks[j[1]]))  # long ones (small eta) first

    def on_result(key: tuple, r: Any) -> None:
        a, b, c, ro = key
        print(f"{names[a]} K={Ks[b]} eta={etas[c]:g} {ro} readout: "
              f"{r['seconds']:.1f} s, {r['status'][:70]}", flush=True)
        for k in _FIELDS:
            results[ro][k][a, b, c] = r[k]
        statuses[ro][a, b, c] = r["status"]
        engine_names[ro][a, b, c] = r["engine"]

    interrupted = run_jobs([((a, b, c, ro), _entry, (names[a], Ks[b], etas[c], cfg, ro))
                            for a, b, c, ro in jobs], workers, on_result)
    if interrupted:
        for ro in readouts:
            statuses[ro][statuses[ro] == ""] = "not computed: interrupted (Ctrl-C)"
    res, status, engines = results["fixed"], statuses["fixed"], engine_names["fixed"]
    tr, tr_status, tr_engines = (results["trained"], statuses["trained"],
                                 engine_names["trained"])
    dims = ("normalization", "K", "eta")
    ds = xr.Dataset(
        {
            "lambda_min": _var(res["lambda_min"], dims, "smallest Hessian eigenvalue of eps_g "
                               "over (W, theta) at the plateau fixed point at eta"),
            "lambda_min_error": _var(res["lambda_min_error"], dims, "error estimate of "
                                     "lambda_min (generic engine: quadrature; closed form "
                                     "with trained gains: finite-difference truncation; "
                                     "0: closed form)"),
            "unstable_rate": _var(res["rate"], dims, "largest real part of the ODE Jacobian "
                                  "eigenvalues at the plateau", "1/(eta alpha)"),
            "alpha_escape": _var(res["alpha_escape"], dims, "first alpha with eps_g < "
                                 "eps_plateau / 2 from the perturbed plateau"),
            "alpha_escape_error": _var(res["alpha_escape_error"], dims, "error estimate of "
                                       "alpha_escape: |difference| to a run with a coarser "
                                       "quadrature of another seed (0: closed form; NaN: "
                                       "that run failed)"),
            "eps_plateau": _var(res["eps_plateau"], dims, "eps_g at the plateau"),
            "entry_seconds": _var(res["seconds"], dims, "wall time of the entry", "s"),
            "status": _var(status.astype(str), dims, "ok, or why the entry is missing"),
            "engine": _var(engines.astype(str), dims, "theory engine of the entry: "
                           "closed_form (exact; trained gains as state) or generic "
                           "(quadrature); empty: not computed"),
            **_trained_variables(tr, tr_status, tr_engines, dims),
        },
        coords={
            "normalization": ("normalization", list(names),
                              {"long_name": "normalization", "units": "1"}),
            "K": ("K", list(Ks), {"long_name": "student units K (= teacher units M)",
                                  "units": "1"}),
            "eta": ("eta", list(etas), {"long_name": "learning rate", "units": "1"}),
            "weight_norm": (dims, res["weight_norm"], {
                "long_name": "weight norm Q_ii = |W_i|^2 at which the Hessian is evaluated",
                "units": "1"}),
            "gain": (dims, res["gain"], {
                "long_name": "trainable gain (weightnorm g, batchnorm_affine gamma) at which "
                "the Hessian is evaluated (NaN: none trainable)", "units": "1"}),
        },
        attrs={
            **convention_attrs(Experiment(TeacherStudent(2, 2))),
            "command": COMMAND + (" --quick" if quick else ""),
            "quick": int(quick),
            "init": "random, seed 0 (the same for every entry)",
            "hessian_coordinates": "W = J / sqrt(N) plus trainable normalization parameters",
            "escape_start": "plateau perturbed along the most unstable Jacobian eigenvector "
            "(relative size 1e-3; where that leaves the PSD cone, e.g. at a plateau of "
            "identical students, along the Hessian's escape mode in weight space, relative "
            "size 1e-3 of |W|)",
            "alpha_max": cfg["alpha_max"],
            "alpha_max_meaning": "escape runs integrate up to alpha = alpha_max / eta",
            "escape_quadrature_generic": "default Quadrature(); error run: "
            + json.dumps(ESCAPE_QUADRATURE) + ", seed 1",
            "runtime_seconds": float(time.time() - t0),
            "readout_fixed": "the variables without suffix: the soft committee machine "
            "(readout v = 1, fixed)",
            "readout_trained": "the *_trained variables: the same with the readout v "
            "trained (eta_v = eta, initial v = 1, v as state of the ODE and a coordinate "
            "of the Hessian: lambda_min over (W, theta, v)), for "
            + ", ".join(TRAINED_READOUT),
        },
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if save_run(ds, out / "normalizations.nc", interrupted):  # no figure or docs then
        return 130
    _figure(ds, out / "normalizations.png")
    table = _table(ds)
    print(table)
    if docs is None and not quick and out.resolve().name == "datasets" \
            and (out.resolve().parent / "docs").is_dir():  # regenerating the shipped results
        docs = out.resolve().parent / "docs" / "normalizations.md"
    if docs is not None:
        _docs(ds, table, Path(docs))
    return 0


def _trained_variables(res: dict[str, np.ndarray], status: np.ndarray, engines: np.ndarray,
                       dims: tuple[str, ...]) -> dict[str, xr.DataArray]:
    """The trained-readout column (``*_trained``)."""
    what = " (trained readout, eta_v = eta)"
    return {
        "lambda_min_trained": _var(res["lambda_min"], dims, "smallest Hessian eigenvalue of "
                                   "eps_g over (W, theta, v) at the plateau fixed point at "
                                   "eta" + what),
        "lambda_min_error_trained": _var(res["lambda_min_error"], dims, "error estimate of "
                                         "lambda_min_trained (finite-difference "
                                         "truncation)"),
        "unstable_rate_trained": _var(res["rate"], dims, "largest real part of the ODE "
                                      "Jacobian eigenvalues at the plateau, v included"
                                      + what, "1/(eta alpha)"),
        "alpha_escape_trained": _var(res["alpha_escape"], dims, "first alpha with eps_g < "
                                     "eps_plateau / 2 from the perturbed plateau" + what),
        "eps_plateau_trained": _var(res["eps_plateau"], dims, "eps_g at the plateau" + what),
        "readout_plateau_trained": _var(res["readout"], dims, "readout v at the plateau "
                                        "(mean over students)" + what),
        "weight_norm_trained": _var(res["weight_norm"], dims, "weight norm Q_ii at the "
                                    "plateau" + what),
        "gain_trained": _var(res["gain"], dims, "trained gain at the plateau (NaN: none)"
                             + what),
        "entry_seconds_trained": _var(res["seconds"], dims, "wall time of the entry" + what,
                                      "s"),
        "status_trained": _var(status.astype(str), dims, "ok, or why the entry is missing"
                               + what),
        "engine_trained": _var(engines.astype(str), dims, "theory engine of the entry"
                               + what),
    }


def _table(ds: xr.Dataset) -> str:
    lines = ["| normalization | K | eta | weight norm | gain | eps_plateau | lambda_min | "
             "alpha_escape | status |", "|---|---|---|---|---|---|---|---|---|"]
    for n in ds.normalization.values:
        for K in ds.K.values:
            for eta in ds.eta.values:
                s = ds.sel(normalization=n, K=K, eta=eta)
                lam = float(s.lambda_min)
                err = float(s.lambda_min_error) if str(s.engine.values) == "generic" else 0.0
                lam_s = "nan" if not np.isfinite(lam) else (
                    f"{lam:.4f} ± {err:.1e}" if err > 0 else f"{lam:.4f}")
                st = str(s.status.values)
                lines.append(
                    f"| {n} | {K} | {eta:g} | {float(s.weight_norm):.3f} | "
                    f"{float(s.gain):.3f} | {float(s.eps_plateau):.4f} | {lam_s} | "
                    f"{float(s.alpha_escape):.0f} | {st if st == 'ok' else st[:60]} |")
    return "\n".join(lines)


def _figure_series(ds: xr.Dataset) -> tuple[list[dict[str, Any]], list[str]]:
    """The curves of the figure: one per (normalization, K, readout) with data, identical
    curves merged into one labelled ``a = b`` (so that no series hides under another), and
    the names of the entries without any data (with their reason)."""
    series: list[dict[str, Any]] = []
    empty: list[str] = []
    for i, n in enumerate(ds.normalization.values):
        for j, K in enumerate(ds.K.values):
            s = ds.sel(normalization=n, K=K)
            cases = [("", s.lambda_min.values, s.alpha_escape.values)]
            if "alpha_escape_trained" in ds and n in TRAINED_READOUT:
                cases.append((", trained v", s.lambda_min_trained.values,
                              s.alpha_escape_trained.values))
            for tag, lam, esc in cases:
                lam, esc = np.asarray(lam, dtype=float), np.asarray(esc, dtype=float)
                if not (np.any(np.isfinite(lam)) or np.any(np.isfinite(esc))):
                    if not tag:
                        reason = str(s.status.values[0]).split(":")[0]
                        empty.append(f"{n} K={K} ({reason})")
                    continue
                twin = next((c for c in series if c["K"] == K and c["tag"] == tag
                             and np.allclose(c["lam"], lam, rtol=1e-6, equal_nan=True)
                             and np.allclose(c["esc"], esc, rtol=1e-6, equal_nan=True)),
                            None)
                if twin is not None:
                    twin["names"].append(str(n))
                    continue
                series.append({"names": [str(n)], "K": K, "tag": tag, "lam": lam, "esc": esc,
                               "color": f"C{i}", "j": j})
    return series, empty


def _figure(ds: xr.Dataset, path: Path) -> None:
    """lambda_min and escape time against eta: colour = normalization, line style = K,
    circles = fixed readout, open squares = trained readout; curves that coincide are one
    entry ``a = b``; entries without data are listed under the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, empty = _figure_series(ds)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6))
    for c in series:
        trained = bool(c["tag"])
        style = dict(color=c["color"], marker="s" if trained else "o",
                     fillstyle="none" if trained else "full",
                     linestyle=(("-.", ":") if trained else ("-", "--"))[c["j"] % 2])
        label = f"{' = '.join(c['names'])} K={c['K']}{c['tag']}"
        axes[0].plot(ds.eta, c["lam"], label=label, **style)
        axes[1].plot(ds.eta, c["esc"], **style)
    axes[0].set_yscale("symlog", linthresh=0.01)
    axes[0].set(xscale="log", xlabel="eta", ylabel="lambda_min at the plateau (symlog)",
                title="smallest Hessian eigenvalue at the plateau")
    axes[1].set(xscale="log", yscale="log", xlabel="eta", ylabel="alpha_escape",
                title="escape time from the plateau")
    fig.legend(loc="lower center", bbox_to_anchor=(0.5, 0.035), ncol=4, fontsize=7,
               frameon=False)
    note = "open squares: trained readout (eta_v = eta); a = b: identical curves"
    if empty:
        note += "; no data: " + ", ".join(empty)
    fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=7)
    rows = (len(series) + 3) // 4
    fig.tight_layout(rect=(0.0, 0.07 + 0.035 * rows, 1.0, 1.0))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pivot(ds: xr.Dataset, K: int) -> str:
    """Escape time vs eta (rows: normalizations) for one K, with lambda_min."""
    etas = [float(e) for e in ds.eta.values]
    head = ("| normalization | weight norm Q_ii (each eta) | gain (each eta) | "
            + " | ".join(f"lambda_min, eta={e:g}" for e in etas) + " | "
            + " | ".join(f"alpha_esc, eta={e:g}" for e in etas) + " |")
    lines = [head, "|" + "---|" * (3 + 2 * len(etas))]
    for n in ds.normalization.values:
        s = ds.sel(normalization=n, K=K)
        st = [str(v) for v in s.status.values]
        if all(x != "ok" for x in st) and len(set(st)) == 1:
            lines.append(f"| {n} | — | — | " + " | ".join(
                [f"n/a ({st[0].split(':')[0]})"] * 2 * len(etas)) + " |")
            continue
        lam, esc = [], []
        for j in range(len(etas)):
            sj = s.isel(eta=j)
            if st[j].startswith("no escape"):  # computed: slower than the horizon
                lam.append(f"{float(sj.lambda_min):.4f}")
                esc.append(f"> {ds.attrs['alpha_max'] / etas[j]:.0f}")
                continue
            if st[j] != "ok":
                lam.append("n/a")
                esc.append("n/a")
                continue
            err = float(sj.lambda_min_error) if str(sj.engine.values) == "generic" else 0.0
            lam.append(f"{float(sj.lambda_min):.4f}" + (f" ± {err:.0e}" if err > 0 else ""))
            ee = float(sj.alpha_escape_error)
            generic = str(sj.engine.values) == "generic"
            esc.append(f"{float(sj.alpha_escape):.0f}" + (
                "" if not generic else " (± n/a)" if np.isnan(ee) else f" ± {ee:.0f}"))
        wn = ", ".join(f"{v:.3g}" if np.isfinite(v) else "–" for v in s.weight_norm.values)
        gn = ", ".join(f"{v:.3g}" if np.isfinite(v) else "–" for v in s.gain.values) \
            if np.any(np.isfinite(s.gain.values)) or n in TRAINED_GAIN else "none"
        lines.append(f"| {n} | {wn} | {gn} | " + " | ".join(lam) + " | " + " | ".join(esc)
                     + " |")
    return "\n".join(lines)


def _trained_pivot(ds: xr.Dataset, K: int) -> str:
    """The trained-readout column for one K: v at the plateau, lambda_min over (W, theta,
    v) and the escape time per eta, with the escape time of the fixed readout beside."""
    etas = [float(e) for e in ds.eta.values]
    head = ("| normalization | v at the plateau (each eta) | "
            + " | ".join(f"lambda_min, eta={e:g}" for e in etas) + " | "
            + " | ".join(f"alpha_esc, eta={e:g} (fixed v)" for e in etas) + " |")
    lines = [head, "|" + "---|" * (2 + 2 * len(etas))]
    for n in TRAINED_READOUT:
        if n not in ds.normalization.values:
            continue
        s = ds.sel(normalization=n, K=K)
        lam, esc = [], []
        for j in range(len(etas)):
            sj = s.isel(eta=j)
            st = str(sj.status_trained.values)
            if st != "ok":
                lam.append("n/a")
                esc.append(f"> {ds.attrs['alpha_max'] / etas[j]:.0f}"
                           if st.startswith("no escape") else "n/a")
                continue
            lam.append(f"{float(sj.lambda_min_trained):.4f}")
            esc.append(f"{float(sj.alpha_escape_trained):.0f} "
                       f"({float(sj.alpha_escape):.0f})")
        vv = ", ".join(f"{v:.3g}" if np.isfinite(v) else "–"
                       for v in s.readout_plateau_trained.values)
        lines.append(f"| {n} | {vv} | " + " | ".join(lam) + " | " + " | ".join(esc) + " |")
    return "\n".join(lines)


def _docs(ds: xr.Dataset, table: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    K_blocks = "\n\n".join(f"### K = M = {int(K)}\n\n" + _pivot(ds, int(K))
                             for K in ds.K.values)
    trained = ""
    if "lambda_min_trained" in ds:
        trained = ("\n\n## Trained readout (eta_v = eta)\n\n" + TRAINED_INTRO + "\n\n"
                   + "\n\n".join(f"### K = M = {int(K)}, trained readout\n\n"
                                  + _trained_pivot(ds, int(K)) for K in ds.K.values)
                   + "\n\n" + TRAINED_INTERPRETATION)
    reasons = sorted({str(v) for v in ds.status.values.ravel() if str(v) != "ok"})
    path.write_text(
        "# The symmetric plateau of every built-in normalization\n\n"
        f"Generated by `{ds.attrs['command']}` in {ds.attrs['runtime_seconds']:.0f} s on "
        "2 cores (writes `datasets/normalizations.nc` and `datasets/normalizations.png`). "
        "K = M, T = I, erf, seed-0 random initialization for the plateau selection. "
        "`lambda_min` is the smallest eigenvalue of the Hessian of eps_g over W = J/sqrt(N) "
        "(and the trainable parameters, where the normalization has them) at the plateau "
        "fixed point *at that eta*; the 'weight norm' column lists Q_ii = |W_i|^2 and the "
        "'gain' column the trained gain (weightnorm g, batchnorm_affine gamma) at which each "
        "Hessian is evaluated, one value per eta (scale-invariant normalizations are "
        "evaluated at Q_ii = 1). `alpha_esc` is the first alpha with eps_g < eps_plateau/2 "
        "from the plateau perturbed by 1e-3 along its most unstable ODE direction. "
        "± are error estimates of the generic engine (none: exact closed form, also for the "
        "trained gains, which are integrated as state; escape times of the generic engine: "
        "the difference to a run with a 16 times coarser quadrature of another seed; ± n/a: "
        "that coarse run failed its own accuracy check). n/a: not computed, reason in "
        "`status` (below).\n\n"
        + K_blocks + "\n\n" + INTERPRETATION + trained
        + "\n\n### Entries without a value\n\n"
        + "\n".join(f"* {r}" for r in reasons)
        + "\n\n### Full table\n\n" + table + "\n"
    )


INTERPRETATION = """### Reading the numbers

* **meanonly = plain** to every digit: under population statistics the mean is 0 and the
  ODE is the plain one (mean-only BN differs only with minibatch statistics).
* **batchnorm vs plain** (batchnorm at Q_ii = 1): batchnorm's plateau is higher and its
  escape later at every eta (K = 2: 2898 vs 1968 at eta = 0.05, 288 vs 109 at eta = 1; K
  = 3: 5068 vs 2884, 864 vs 214), Takagi et al.'s result; the delay ratio grows with eta
  (README, "Result"). At small eta its escape curvature is flatter (-0.046 vs -0.066 for
  K = 2); at large eta the finite-eta plateau moves and lambda_min there is steeper, yet
  the escape is still later, so at finite eta lambda_min alone does not order the escape
  times (next point but one).
* **weightnorm = batchnorm_affine** (trained gain; the exact engine with the gain as
  state, batchnorm_affine's beta held at 0 where it stays for the odd erf): under
  population statistics both are x~_i = g_i x_i / sqrt(Q_ii), so every digit agrees. The
  plateau is plain's plateau in the effective weights g W_i / |W_i|: identical students
  (on the boundary of the PSD cone), the gain at g = 1/sqrt(2K - 1) (0.577 for K = 2,
  0.447 for K = 3: plain's Q* = 1/(2K - 1)) and eps_plateau -> plain's eps* as eta -> 0
  (tested; 0.0117 / 0.0204 at eta = 0.05). Its unstable ODE rate is plain's times g^2 (K
  = 2: 0.0218 vs 0.0655 per eta alpha; K = 3: 0.00912 vs 0.0457): the weights move with
  step eta on |W_i| = 1, but the function only feels g times that. So the trained gain
  escapes latest of all -- 2.7 to 3.7 times later than plain for K = 2 (5346 vs 1968 at
  eta = 0.05, 405 vs 109 at eta = 1) and 4.4 to 7.5 times for K = 3 (12771 vs 2884, 1605
  vs 214), and later than batchnorm with its fixed gain 1 (1.4 to 1.8 times for K = 2):
  training the gain does not undo batch norm's delay, it lengthens it. eta alpha_escape
  grows with eta (K = 2: 267, 274, 328, 405): the rate drops slightly (0.0218 -> 0.0198)
  and the weight norms grow through the eta^2 term, which slows the angles (a
  scale-invariant parametrization's effective step is eta / |W_i|^2). K = 3 escapes
  through a second, partly specialized plateau (eps_g ~ 0.014), which the threshold
  eps_plateau / 2 lies below. The collapsed branch (gain 0, eps_g = K/6, the best
  constant predictor's) and the mirror image (g, W) -> (-g, -W) are fixed points too;
  the first is excluded as dead, the second by preferring g > 0.
* **lambda_min vs the escape rate at finite eta**: at finite eta the plateau is a fixed
  point of the SGD ODE, not a critical point of eps_g (the eta^2 term balances a
  gradient: |grad eps_g| = 0.0097 for weightnorm K = 3 at eta = 0.05, 0.047 at eta = 1),
  so the Hessian's lambda_min is the curvature of the landscape there, not minus the
  unstable rate (dataset variable `unstable_rate`): -0.0122 vs 0.0091 (K = 3, eta =
  0.05), -0.0593 vs 0.0068 (eta = 1). The two agree as eta -> 0 (weightnorm K = 2:
  -0.0219 and 0.0218; tested), where lambda_min is plain's times g^2 exactly. Escape
  times follow the rate.
* **The escape start at a boundary plateau**: a perturbation along the Jacobian's
  unstable eigenvector in (Q, R) leaves the PSD cone when the students are identical, so
  the start is that eigenvector realized in weight space (first order, gain moved along
  with it): the students' differences then grow at the Jacobian's rate from the start
  (tested). (The previous version of this table, with the generic engine, had escape
  times up to a factor 2.5 off and no plateau for 10 of the 16 trained-gain entries: the
  quadrature is not differentiable on the cone's boundary, and its noise acted as an
  extra symmetry-breaking perturbation.)
* **batchnorm_stopgrad**: its drift is not the gradient of eps_g (no gradient through
  the statistics), so its lambda_min (of the eps_g landscape, which is batchnorm's) is
  not an escape rate. Its plateau has a weight norm proportional to eta (0.0257 / 0.0515
  / 0.257 / 0.515 for K = 2: the update is no longer orthogonal to W_i) and lambda_min
  scales as 1/Q_ii; its escape (86-92 for K = 2, 237-263 for K = 3) hardly depends on
  eta and is the fastest of all.
* **layernorm** has no entry: degenerate at K = 2 (output +-1), and no finite-eta ODE at
  K = 3 with eps = 0 (infinite eta^2 term). With eps = 0.1 (where the ODE exists) the
  symmetric subspace has no plateau either: every fixed point found at eta = 0.1 is
  (nearly) dead, eps_g = 0.3333 (K = 2, = K/6, the best constant predictor's) and 0.504
  (K = 3; K/6 = 0.5) -- subtracting the mean across units removes the students' common
  component, which is what the symmetric phase learns."""


TRAINED_INTRO = """The same plateaus with the second layer trained: `sigma = sum_i v_i
g(x~_i)`, `v` starts at 1 and learns with `eta_v = eta`; it is a state variable of the ODE
(the generic integrator) and a coordinate of the Hessian, whose `lambda_min` is then over
(W, theta, v) (the `v` block is the plain `d^2 eps_g / dv^2`, next to `Hess_W = N Hess_J`).
Same seed, same threshold rule (`eps_g < eps_plateau/2`, the trained plateau's own
`eps_plateau`), the escape start again 1e-3 along the most unstable Jacobian direction (v
included). In brackets: the fixed-readout escape time of the table above. Variables
`*_trained` of `datasets/normalizations.nc`."""

TRAINED_INTERPRETATION = """### Reading the trained-readout numbers

* **plain**: training v hardly moves the escape (K = 2: 1969 vs 1968 at eta = 0.05, 114 vs
  109 at eta = 1; K = 3: 2911 vs 2884, 190 vs 214). The plateau's readout drops below 1
  as eta grows (K = 2: 0.98 -> 0.82) and its eps_g with it, but at the plateau the
  escape mode is a pure first-layer specialization (dR antisymmetric; its v components
  vanish to rounding, dataset `unstable_dv` of `escape`), so the rate is close to the
  fixed-readout one (K = 2, eta = 0.05: 0.0649 vs 0.0655).
* **batchnorm vs plain (the seed's conclusion)**: still later at every eta and K: K = 2
  2580 vs 1969 (eta = 0.05), 1307 vs 992, 290 vs 211, 165 vs 114 (eta = 1), i.e. 1.31
  to 1.45 times plain; K = 3 4258 vs 2911, 2200 vs 1481, 558 vs 332, 354 vs 190 (1.46 to
  1.86 times). The delay is smaller than with v = 1 (1.47 to 2.64 for K = 2, 1.76 to
  4.04 for K = 3): the trained readout acts as the output gain batch norm lacks (v ->
  0.74 for K = 2, 0.65 for K = 3), which lowers batch norm's plateau (eps_g 0.0148 vs
  0.0231 at eta = 0.05, K = 2) and weakens the growth of the delay with eta. At small
  eta its escape curvature is still the flatter one (lambda_min -0.0465 vs -0.0649, K =
  2, eta = 0.05).
* **weightnorm = batchnorm_affine** with v trained: the readout and the gain enter only
  through their product, so the fixed points form a line (g v = 1/sqrt(2K - 1) at eta
  -> 0; a zero Jacobian eigenvalue); the search lands on v = 1, g = 0.577 (K = 2), i.e.
  the fixed-readout point, and the escape is the fixed-readout one within 0.3 to 5%
  (5330 vs 5346, 400 vs 405). lambda_min over (W, g, v) is more negative than over (W,
  g) (-0.0326 vs -0.0281 at eta = 0.5): the extra direction (g, v) curves the landscape
  but does not couple to the escape. On the line the escape rate changes (the first
  layer's updates scale with v g^2, i.e. with g at fixed g v); the point of equal g and
  v, which gradient flow from g = v = 1 keeps (g^2 - v^2 is conserved for eta_v = eta),
  is not tabulated here."""


@hookimpl
def symphase_register_reproductions(registry: Any) -> None:
    registry.add_reproduction(
        "normalizations", normalizations,
        "lambda_min at the symmetric plateau and escape time vs eta for every built-in "
        "normalization",
    )
