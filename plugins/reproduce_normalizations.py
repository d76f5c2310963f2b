"""``symphase reproduce normalizations``: the symmetric plateau of every built-in
normalization.

For each normalization (plain, batchnorm, weightnorm, batchnorm_affine, meanonly,
layernorm, batchnorm_stopgrad), ``K = M`` in ``Ks`` and ``eta`` in ``etas``, from the
same random initialization (seed 0): the plateau branch of ``fixedpoint`` at that
``eta``, the smallest Hessian eigenvalue ``lambda_min`` there (``hessian``; with the
trainable parameters where the normalization has them, at the weight norm and gain of
the fixed point, stored as coordinates) and the escape time of the ODE from the
plateau (``escape``). Normalizations without a closed form use the generic engine
(error estimates stored as ``*_error``); an entry that cannot be computed accurately
(e.g. layernorm: the ``eta^2`` term is infinite for ``K <= 3``; ``K = 2`` output is
``+-1``) is NaN with the reason in ``status``. Writes ``normalizations.nc`` and
``normalizations.png`` into ``out``, ``docs/normalizations.md`` when ``docs`` is given,
and prints a table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from framework import Experiment, TeacherStudent, convention_attrs, hookimpl, save

NORMALIZATIONS = ("plain", "batchnorm", "weightnorm", "batchnorm_affine", "meanonly",
                  "layernorm", "batchnorm_stopgrad")
COMMAND = "symphase reproduce normalizations"


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"Ks": (2,), "etas": (0.5,), "alpha_max": 400.0, "n_alpha": 81,
                "normalizations": ("plain", "batchnorm", "meanonly", "batchnorm_stopgrad",
                                   "layernorm")}
    return {"Ks": (2, 3), "etas": (0.05, 0.1, 0.5, 1.0), "alpha_max": 4000.0, "n_alpha": 401,
            "normalizations": NORMALIZATIONS}


def _var(data: Any, dims: tuple[str, ...], long_name: str, units: str = "1") -> xr.DataArray:
    return xr.DataArray(data, dims=dims, attrs={"long_name": long_name, "units": units})


def _entry(name: str, K: int, eta: float, cfg: dict[str, Any]) -> dict[str, Any]:
    out = {"lambda_min": np.nan, "lambda_min_error": 0.0, "rate": np.nan,
           "alpha_escape": np.nan, "eps_plateau": np.nan, "weight_norm": np.nan,
           "gain": np.nan, "status": "ok"}
    exp = Experiment(TeacherStudent(K, K), normalization=name, eta=eta, seed=0, analyzers=[
        {"name": "hessian"},
        {"name": "escape", "alpha_max": cfg["alpha_max"] / eta, "n_points": cfg["n_alpha"]},
    ])
    try:
        h = exp.run()["hessian"]
        b = int(h.attrs["plateau_branch"])
        if b < 0:
            raise RuntimeError("no plateau branch identified")
        hb = h.isel(branch=b)
        out["lambda_min"] = float(hb.lambda_min)
        if "lambda_min_error" in hb:
            out["lambda_min_error"] = float(hb.lambda_min_error)
        out["eps_plateau"] = float(hb.eps_g)
        out["weight_norm"] = float(np.mean(np.diagonal(hb.Q.values)))
        gains = [k for k in ("param_g", "param_gamma") if k in hb]
        out["gain"] = float(np.mean(hb[gains[0]].values)) if gains else np.nan
        e = exp.evolve(analyzers=[{"name": "escape", "alpha_max": cfg["alpha_max"] / eta,
                                   "n_points": cfg["n_alpha"]}]).run()["escape"]
        out["alpha_escape"] = float(e.alpha_escape)
        out["rate"] = float(e.unstable_rate)
    except Exception as exc:  # recorded per entry: the table shows why
        out["status"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    return out


def normalizations(out: Path, quick: bool = False, docs: Path | None = None) -> int:
    """Run the comparison; write ``normalizations.nc``/``.png`` into ``out``."""
    t0 = time.time()
    cfg = _settings(quick)
    names, Ks, etas = cfg["normalizations"], cfg["Ks"], cfg["etas"]
    shape = (len(names), len(Ks), len(etas))
    res = {k: np.full(shape, np.nan) for k in ("lambda_min", "lambda_min_error", "rate",
                                               "alpha_escape", "eps_plateau", "weight_norm",
                                               "gain")}
    status = np.full(shape, "", dtype=object)
    for a, name in enumerate(names):
        for b, K in enumerate(Ks):
            for c, eta in enumerate(etas):
                r = _entry(name, K, eta, cfg)
                for k in res:
                    res[k][a, b, c] = r[k]
                status[a, b, c] = r["status"]
    dims = ("normalization", "K", "eta")
    ds = xr.Dataset(
        {
            "lambda_min": _var(res["lambda_min"], dims, "smallest Hessian eigenvalue of eps_g "
                               "over (W, theta) at the plateau fixed point at eta"),
            "lambda_min_error": _var(res["lambda_min_error"], dims, "error estimate of "
                                     "lambda_min (0: closed form)"),
            "unstable_rate": _var(res["rate"], dims, "largest real part of the ODE Jacobian "
                                  "eigenvalues at the plateau", "1/(eta alpha)"),
            "alpha_escape": _var(res["alpha_escape"], dims, "first alpha with eps_g < "
                                 "eps_plateau / 2 from the perturbed plateau"),
            "eps_plateau": _var(res["eps_plateau"], dims, "eps_g at the plateau"),
            "status": _var(status.astype(str), dims, "ok, or why the entry is missing"),
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
            "(relative size 1e-3)",
            "runtime_seconds": float(time.time() - t0),
        },
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save(ds, out / "normalizations.nc")
    _figure(ds, out / "normalizations.png")
    table = _table(ds)
    print(table)
    if docs is None and not quick and (out.resolve().parent / "docs").is_dir():
        docs = out.resolve().parent / "docs" / "normalizations.md"
    if docs is not None:
        _docs(ds, table, Path(docs))
    return 0


def _table(ds: xr.Dataset) -> str:
    lines = ["| normalization | K | eta | weight norm | gain | eps_plateau | lambda_min | "
             "alpha_escape | status |", "|---|---|---|---|---|---|---|---|---|"]
    for n in ds.normalization.values:
        for K in ds.K.values:
            for eta in ds.eta.values:
                s = ds.sel(normalization=n, K=K, eta=eta)
                lam = float(s.lambda_min)
                err = float(s.lambda_min_error)
                lam_s = "nan" if not np.isfinite(lam) else (
                    f"{lam:.4f} ± {err:.1e}" if err > 0 else f"{lam:.4f}")
                st = str(s.status.values)
                lines.append(
                    f"| {n} | {K} | {eta:g} | {float(s.weight_norm):.3f} | "
                    f"{float(s.gain):.3f} | {float(s.eps_plateau):.4f} | {lam_s} | "
                    f"{float(s.alpha_escape):.0f} | {st if st == 'ok' else st[:60]} |")
    return "\n".join(lines)


def _figure(ds: xr.Dataset, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for n in ds.normalization.values:
        for K in ds.K.values:
            s = ds.sel(normalization=n, K=K)
            axes[0].plot(ds.eta, s.lambda_min, "o-", label=f"{n} K={K}")
            axes[1].plot(ds.eta, s.alpha_escape, "o-", label=f"{n} K={K}")
    axes[0].set(xscale="log", xlabel="eta", ylabel="lambda_min at the plateau")
    axes[1].set(xscale="log", yscale="log", xlabel="eta", ylabel="alpha_escape")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _docs(ds: xr.Dataset, table: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# The symmetric plateau of every built-in normalization\n\n"
        f"Generated by `{ds.attrs['command']}` (writes datasets/normalizations.nc and "
        "datasets/normalizations.png). K = M, T = I, erf; the Hessian is of eps_g over "
        "W = J/sqrt(N) and the trainable parameters, at the plateau fixed point at each eta, "
        "at the weight norm and gain listed; lambda_min errors are the generic engine's "
        "estimates (none: closed form).\n\n" + table + "\n"
    )


@hookimpl
def symphase_register_reproductions(registry):  # type: ignore[no-untyped-def]
    registry.add_reproduction(
        "normalizations", normalizations,
        "lambda_min at the symmetric plateau and escape time vs eta for every built-in "
        "normalization",
    )
