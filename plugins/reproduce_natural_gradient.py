"""``symphase reproduce natural_gradient``: natural gradient beside batch normalization.

Amari's natural gradient (Neural Comput. 10, 1998; for the soft committee machine
Rattray, Saad & Amari, PRL 81, 5461, 1998) is the reparametrization-invariant cure of the
symmetric plateau; batch normalization changes the Fisher's largest eigenvalue (Karakida,
Akaho & Amari, NeurIPS 2019). Here both side by side, on the order-parameter ODE (``N ->
infinity``, closed-form erf engine), ``K = M`` in ``Ks``, ``T = I``, for the rules
``sgd``, ``natural_gradient`` (damping 0) and ``natural_gradient`` (damping
``DAMPED``), each with ``plain`` and ``batchnorm`` (population statistics, gamma = 1
fixed, beta = 0), over ``eta`` in ``etas``:

* the plateau: the symmetric plateau branch of ``fixedpoint`` *under the rule* at that
  ``eta`` (batchnorm at weight norm 1): ``eps_plateau`` and its ``unstable_rate`` (the
  largest real part of the rule's ODE Jacobian, per ``eta alpha``), and the largest
  eigenvalue ``fisher_lambda_max`` of the population Fisher there (``fisher`` at those
  order parameters; ``W = J / sqrt(N)``, unit output-noise variance; its multiplicity
  at ``N = init_N`` in ``fisher_lambda_max_multiplicity``).
* ``alpha_escape``: the escape time from one start for every rule: SGD's plateau at
  that ``eta`` perturbed by ``1e-3`` along its most unstable direction (the ``escape``
  analyzer's start, ``start="fixedpoint"`` under ``sgd``); the first ``alpha`` with
  ``eps_g < eps_threshold / 2`` (linear interpolation in ``eps_g``), ``eps_threshold``
  the ``eta -> 0`` plateau's ``eps_g`` (``escape`` with ``start="init"``,
  ``plateau="gradient_flow"``), which does not depend on the rule (the fixed points of
  gradient flow are the critical points of ``eps_g`` under every preconditioner; tested),
  so the threshold too is common to the three rules. For ``sgd`` the ``escape``
  analyzer's own run; for the natural gradient the same integration and rule
  (:func:`framework.theory.integrate` under the rule, ``stop_below`` the threshold),
  which saves the analyzer's repeated plateau search under the rule (tested equal to the
  analyzer's run). Runs stop when an entry of ``|Q|, |R|`` exceeds ``MAX_VALUE`` (the
  weight norm runs away).
* ``alpha_target``: the time to ``eps_g = TARGET`` from the random initialization of
  seed 0 (``init_N = 1000``, ``init_scale = 1``; the same state for every rule and
  normalization at a ``K``): :func:`framework.theory.integrate` under the rule (the
  ``dynamics`` analyzer's integration) with ``stop_below = TARGET``, the crossing
  interpolated linearly in ``log eps_g`` between the two grid points around it.

An entry that cannot be computed is NaN with the reason in ``status`` (e.g. no unstable
symmetric plateau under the rule at that ``eta``). Writes ``natural_gradient.nc``,
``natural_gradient.png`` and ``natural_gradient.md`` (the table) into ``out`` and prints
the table.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from framework import (
    Experiment,
    OrderParameters,
    TeacherStudent,
    convention_attrs,
    hookimpl,
    theory,
)
from framework.io import write_atomic
from plugins._pool import run_jobs, save_run

NORMALIZATIONS = ("plain", "batchnorm")
#: The damping of the damped natural gradient.
DAMPED = 0.1
#: (label, learning_rule specification) of the rules compared.
RULES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("sgd", {"name": "sgd"}),
    ("natural_gradient", {"name": "natural_gradient", "damping": 0.0}),
    ("natural_gradient_damped", {"name": "natural_gradient", "damping": DAMPED}),
)
#: eps_g of the convergence time alpha_target.
TARGET = 1e-3
#: Relative size of the perturbation of SGD's plateau (the common escape start).
PERTURBATION = 1e-3
#: An entry of |Q| or |R| beyond this ends a run (diverged): the weight norm runs away
#: (the undamped natural gradient with batch norm at larger eta, whose Fisher vanishes
#: along the scale modes).
MAX_VALUE = 100.0
#: Integrator tolerances of the natural-gradient runs (scipy's DOP853 through the rule's
#: rates; SGD's runs keep the defaults, 1e-10 / 1e-12, on the compiled integrator).
RTOL_NG, ATOL_NG = 1e-8, 1e-10
#: An unstable rate beyond this (per eta alpha) is flagged in ``status``: the inverse
#: Fisher is (nearly) singular there.
SINGULAR_RATE = 1e6
COMMAND = "symphase reproduce natural_gradient --out datasets"
_FIELDS = ("alpha_escape", "alpha_target", "eps_plateau", "unstable_rate",
           "fisher_lambda_max", "fisher_lambda_max_multiplicity", "weight_norm_plateau",
           "seconds")


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"Ks": (2,), "etas": (0.1,), "span_sgd": 3000.0, "span_ng": 400.0,
                "n_alpha": 2001}
    return {"Ks": (2, 3), "etas": (0.05, 0.1, 0.2, 0.5, 1.0), "span_sgd": 3000.0,
            "span_ng": 400.0, "n_alpha": 4001}


def _span(rule: dict[str, Any], cfg: dict[str, Any]) -> float:
    """The horizon in eta alpha of a rule's runs (SGD is slower and cheaper)."""
    return cfg["span_sgd"] if rule["name"] == "sgd" else cfg["span_ng"]


def _var(data: Any, dims: tuple[str, ...], long_name: str, units: str = "1") -> xr.DataArray:
    return xr.DataArray(data, dims=dims, attrs={"long_name": long_name, "units": units})


def _crossing(alpha: np.ndarray, eps: np.ndarray, level: float, log: bool = True) -> float:
    """First alpha with eps_g < level, linear in log eps_g (``log``; else in eps_g, the
    escape analyzer's rule) between the grid points around it (NaN if never)."""
    below = np.nonzero(eps < level)[0]
    if not below.size:
        return math.nan
    j = int(below[0])
    if j == 0:
        return float(alpha[0])
    f = (lambda x: math.log(max(x, 1e-300))) if log else (lambda x: x)
    e0, e1 = f(float(eps[j - 1])), f(float(eps[j]))
    return float(alpha[j - 1] + (e0 - f(level)) * (alpha[j] - alpha[j - 1]) / (e0 - e1))


def _grid(span: float, n: int) -> np.ndarray:
    """0, then ``n - 1`` log-spaced times from 0.01 to ``span`` (relative spacing ~
    ``log(100 span) / n``: the same resolution for a fast and a slow rule)."""
    return np.concatenate([[0.0], np.geomspace(0.01, span, n - 1)])


def _sgd_start(K: int, norm: str, eta: float, cfg: dict[str, Any]
               ) -> tuple[OrderParameters, dict[str, float]]:
    """SGD's plateau at ``eta`` perturbed along its most unstable direction (the escape
    analyzer's start, its first row), the threshold of the gradient-flow plateau and
    SGD's escape from that start (the escape analyzer, ``start="init"``,
    ``plateau="gradient_flow"``)."""
    model = TeacherStudent(K, K)
    e = Experiment(model, normalization=norm, eta=eta, seed=0, analyzers=[{
        "name": "escape", "perturbation": PERTURBATION, "alpha": [0.0, 1e-6]}])
    ds = e.run()["escape"]
    start = OrderParameters(ds.Q.values[0], ds.R.values[0], model.T)
    grid = _grid(cfg["span_sgd"] / eta, cfg["n_alpha"])
    esc = e.evolve(init=start, analyzers=[{
        "name": "escape", "start": "init", "plateau": "gradient_flow", "alpha": grid.tolist(),
        "stop_at_escape": True, "max_value": MAX_VALUE}]).run()["escape"]
    return start, {"eps_threshold": float(esc.eps_plateau),
                   "alpha_escape": float(esc.alpha_escape)}


def _rule_entry(K: int, norm: str, rule: dict[str, Any], eta: float,
                start: OrderParameters, escape: dict[str, float],
                cfg: dict[str, Any]) -> dict[str, Any]:
    """One (K, normalization, rule, eta): plateau, rate, Fisher, escape, target time."""
    out: dict[str, Any] = {k: math.nan for k in _FIELDS}
    out["status"] = "ok"
    t0 = time.time()
    model = TeacherStudent(K, K)
    exp = Experiment(model, normalization=norm, eta=eta, seed=0, learning_rule=rule)
    problems = []
    try:  # the plateau under the rule at eta, its rate and the Fisher there
        fp = exp.evolve(analyzers=["fixedpoint"]).run()["fixedpoint"]
        b = int(fp.attrs["plateau_branch"])
        if b < 0:
            sym = [f"eps_g {float(fp.eps_g[j]):.4g} with {int(fp.n_unstable[j])} unstable"
                   for j in range(fp.sizes["branch"]) if not bool(fp.specialized[j])]
            raise RuntimeError("no unstable symmetric plateau under this rule at this eta "
                               f"(symmetric branches: {'; '.join(sym) or 'none'})")
        p = fp.isel(branch=b)
        out["eps_plateau"] = float(p.eps_g)
        out["unstable_rate"] = float(p.jacobian_eigenvalue_real.max())
        out["weight_norm_plateau"] = float(np.mean(np.diag(p.Q.values)))
        if out["unstable_rate"] > SINGULAR_RATE:
            problems.append(
                f"plateau: unstable rate {out['unstable_rate']:.3g} per eta alpha: the Fisher "
                "is (nearly) singular at this branch (the inverse keeps eigenvalues of F + "
                "damping I down to rcond x its largest), not a time scale of the escape")
        at = OrderParameters(p.Q.values, p.R.values, model.T)
        f = exp.evolve(analyzers=[{"name": "fisher", "at": at}]).run()["fisher"]
        out["fisher_lambda_max"] = float(np.ravel(f.lambda_max.values)[0])
        out["fisher_lambda_max_multiplicity"] = float(
            np.ravel(f.lambda_max_multiplicity.values)[0])
    except Exception as exc:  # recorded: the table shows why
        problems.append(f"plateau: {type(exc).__name__}: {str(exc)[:160]}")
    out["eps_threshold"] = escape["eps_threshold"]
    try:  # escape from SGD's perturbed plateau, the common threshold
        grid = _grid(_span(rule, cfg) / eta, cfg["n_alpha"])
        message = ""
        if rule["name"] == "sgd":  # the escape analyzer's run (_sgd_start)
            out["alpha_escape"] = escape["alpha_escape"]
        else:  # the escape analyzer's rule on the same integration, without its search
            level = 0.5 * escape["eps_threshold"]
            tr = theory.integrate(model, exp.normalization, start, eta=eta, alpha=grid,
                                  stop_below=level, rule=exp.learning_rule,
                                  max_value=MAX_VALUE, rtol=RTOL_NG, atol=ATOL_NG)
            out["alpha_escape"] = _crossing(tr.alpha, tr.eps_g, level, log=False)
            message = f" (stopped: {tr.message})" if tr.diverged else ""
        if not math.isfinite(out["alpha_escape"]):
            problems.append(f"escape: none within alpha = {grid[-1]:g}{message}")
    except Exception as exc:
        problems.append(f"escape: {type(exc).__name__}: {str(exc)[:160]}")
    try:  # time to eps_g = TARGET from the random init
        grid = _grid(_span(rule, cfg) / eta, cfg["n_alpha"])
        sgd = rule["name"] == "sgd"
        tr = theory.integrate(model, exp.normalization, exp.initial_order_parameters(),
                              eta=eta, alpha=grid, stop_below=TARGET, rule=exp.learning_rule,
                              max_value=MAX_VALUE, rtol=1e-10 if sgd else RTOL_NG,
                              atol=1e-12 if sgd else ATOL_NG)
        out["alpha_target"] = _crossing(tr.alpha, tr.eps_g, TARGET)
        if not math.isfinite(out["alpha_target"]):
            why = f" (stopped: {tr.message})" if tr.diverged else ""
            problems.append(f"target: eps_g > {TARGET:g} up to alpha = {tr.alpha[-1]:g}{why}")
    except Exception as exc:
        problems.append(f"target: {type(exc).__name__}: {str(exc)[:160]}")
    if problems:
        out["status"] = "; ".join(problems)
    out["seconds"] = time.time() - t0
    return out


def _entry(K: int, norm: str, eta: float, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rule at one (K, normalization, eta), from SGD's perturbed plateau."""
    try:
        start, escape = _sgd_start(K, norm, eta, cfg)
    except Exception as exc:
        why = f"no common start (SGD's plateau): {type(exc).__name__}: {str(exc)[:160]}"
        return [{**{k: math.nan for k in _FIELDS}, "eps_threshold": math.nan,
                 "status": why} for _ in RULES]
    return [_rule_entry(K, norm, spec, eta, start, escape, cfg) for _, spec in RULES]


def natural_gradient(out: Path, quick: bool = False, workers: int = 2) -> int:
    """Run the comparison (entries in ``workers`` processes); write
    ``natural_gradient.nc``/``.png``/``.md`` into ``out``."""
    t0 = time.time()
    cfg = _settings(quick)
    Ks, etas = cfg["Ks"], cfg["etas"]
    shape = (len(RULES), len(NORMALIZATIONS), len(Ks), len(etas))
    res = {k: np.full(shape, np.nan) for k in (*_FIELDS, "eps_threshold")}
    status = np.full(shape, "", dtype=object)
    jobs = [(n, k, j) for n in range(len(NORMALIZATIONS)) for k in range(len(Ks))
            for j in range(len(etas))]
    jobs.sort(key=lambda q: (-Ks[q[1]], etas[q[2]]))  # long ones (K = 3, small eta) first

    def on_result(key: tuple, rows: Any) -> None:
        n, k, j = key
        for r, row in enumerate(rows):
            for f in res:
                res[f][r, n, k, j] = row[f]
            status[r, n, k, j] = row["status"]
        print(f"{NORMALIZATIONS[n]} K={Ks[k]} eta={etas[j]:g}: "
              f"{sum(row['seconds'] for row in rows):.1f} s, "
              + ", ".join(f"{RULES[r][0]} {row['status'][:40]}" for r, row in enumerate(rows)),
              flush=True)

    interrupted = run_jobs([((n, k, j), _entry, (Ks[k], NORMALIZATIONS[n], etas[j], cfg))
                            for n, k, j in jobs], workers, on_result)
    if interrupted:
        status[status == ""] = "not computed: interrupted (Ctrl-C)"
    ds = _dataset(res, status, cfg, quick, t0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if save_run(ds, out / "natural_gradient.nc", interrupted):  # no figure or table then
        return 130
    _figure(ds, out / "natural_gradient.png")
    table = _table(ds)
    write_atomic(out / "natural_gradient.md", [_markdown(ds, table).encode()])
    print(table)
    print(f"wrote {out / 'natural_gradient.nc'}, .png and .md in {time.time() - t0:.0f} s")
    return 0


def _dataset(res: dict[str, np.ndarray], status: np.ndarray, cfg: dict[str, Any],
             quick: bool, t0: float) -> xr.Dataset:
    dims = ("rule", "normalization", "K", "eta")
    base = Experiment(TeacherStudent(2, 2))
    return xr.Dataset(
        {
            "alpha_escape": _var(res["alpha_escape"], dims, "escape time from SGD's plateau "
                                 "at eta perturbed by 1e-3 along its most unstable direction "
                                 "(the same start for every rule): first alpha with eps_g < "
                                 "eps_threshold / 2"),
            "eps_threshold": _var(res["eps_threshold"], dims, "eps_g of the gradient-flow "
                                  "(eta -> 0) plateau whose half defines the escape "
                                  "(rule-independent)"),
            "alpha_target": _var(res["alpha_target"], dims, f"first alpha with eps_g < "
                                 f"{TARGET:g} from the random init (seed 0), linear in log "
                                 "eps_g between grid points"),
            "eps_plateau": _var(res["eps_plateau"], dims, "eps_g of the symmetric plateau "
                                "fixed point of the rule's ODE at eta (batchnorm: weight "
                                "norm 1)"),
            "unstable_rate": _var(res["unstable_rate"], dims, "largest real part of the "
                                  "rule's ODE Jacobian eigenvalues at that plateau",
                                  "1/(eta alpha)"),
            "fisher_lambda_max": _var(res["fisher_lambda_max"], dims, "largest eigenvalue "
                                      "of the population Fisher of the output in W = "
                                      "J/sqrt(N) (unit noise variance) at that plateau"),
            "fisher_lambda_max_multiplicity": _var(
                res["fisher_lambda_max_multiplicity"], dims, "multiplicity of "
                "fisher_lambda_max at N = init_N"),
            "weight_norm_plateau": _var(res["weight_norm_plateau"], dims, "Q_ii at that "
                                        "plateau (mean over students)"),
            "entry_seconds": _var(res["seconds"], dims, "wall time of the entry", "s"),
            "status": _var(status.astype(str), dims, "ok, or why (part of) the entry is "
                           "missing"),
        },
        coords={
            "rule": ("rule", [r for r, _ in RULES], {"long_name": "learning rule (label)",
                                                     "units": "1"}),
            "learning_rule": ("rule", [s["name"] for _, s in RULES],
                              {"long_name": "registered learning rule name", "units": "1"}),
            "damping": ("rule", [float(s.get("damping", math.nan)) for _, s in RULES],
                        {"long_name": "natural-gradient damping lambda in (F + lambda I)^+ "
                         "(NaN: not a natural gradient)", "units": "1"}),
            "normalization": ("normalization", list(NORMALIZATIONS),
                              {"long_name": "normalization", "units": "1"}),
            "K": ("K", list(cfg["Ks"]), {"long_name": "student units K (= teacher units M)",
                                         "units": "1"}),
            "eta": ("eta", list(cfg["etas"]), {"long_name": "learning rate", "units": "1"}),
        },
        attrs={
            **convention_attrs(base),
            "title": "Natural gradient beside batch normalization: escape from the "
            "symmetric plateau and convergence, sgd vs natural_gradient, plain vs batchnorm",
            "command": COMMAND + (" --quick" if quick else ""),
            "quick": int(quick),
            "teacher": "T = I, K = M, erf, readout v = 1 fixed (soft committee machine)",
            "eta_scaling": "J <- J - eta P grad_J eps per sample (dW = -(eta/N) P grad_W "
            "eps, W = J/sqrt(N)); P = I (sgd) or (F + damping I)^+ (natural_gradient); "
            "time alpha = steps / N; rates per eta alpha",
            "natural_gradient": "F the population Fisher of the output in W = J/sqrt(N), "
            "unit output-noise variance, population statistics, the gradient the "
            "normalization passes; pseudo-inverse with rcond 1e-10",
            "damping_values": f"0 and {DAMPED:g} (coordinate damping)",
            "batchnorm": "population statistics, gamma = 1 (fixed), beta = 0, eps = 0; "
            "fixed points at weight norm 1",
            "escape_start": "SGD's plateau at eta (the escape analyzer's start='fixedpoint' "
            f"under sgd), perturbed by {PERTURBATION:g} (relative) along its most unstable "
            "Jacobian direction; the same state for the three rules",
            "escape_rule": "first alpha with eps_g < eps_threshold / 2 (escape analyzer, "
            "start='init', plateau='gradient_flow')",
            "span_sgd": cfg["span_sgd"],
            "span_natural_gradient": cfg["span_ng"],
            "target_eps_g": TARGET,
            "horizons": "escape and target runs up to alpha = span / eta (span_sgd, "
            "span_natural_gradient; grids: 0, then log-spaced from 0.01); each stops at its "
            "threshold",
            "tolerances_natural_gradient": "rtol 1e-8, atol 1e-10 (sgd: 1e-10, 1e-12)",
            "max_value": MAX_VALUE,
            "max_value_meaning": "a run stops (diverged, status says so) when an entry of "
            "|Q| or |R| exceeds it: the weight norm runs away",
            "target_init": "random, seed 0, init_N = 1000, init_scale = 1 (the same for "
            "every rule and normalization at a K)",
            "engine": "closed form (erf), scipy DOP853 under the natural gradient",
            "runtime_seconds": float(time.time() - t0),
        },
    )


def _cell(x: float, spec: str) -> str:
    return "n/a" if not np.isfinite(x) else format(x, spec)


def _table(ds: xr.Dataset) -> str:
    """One markdown table: a row per (K, normalization, rule), a column group per eta."""
    etas = [float(e) for e in ds.eta.values]
    lines = ["| K | normalization | rule | eps_plateau / rate / lambda_max_F (eta = "
             + ", ".join(f"{e:g}" for e in etas) + ") | "
             + " | ".join(f"alpha_esc, eta={e:g}" for e in etas) + " | "
             + " | ".join(f"alpha(eps<{TARGET:g}), eta={e:g}" for e in etas) + " |",
             "|" + "---|" * (4 + 2 * len(etas))]
    for K in ds.K.values:
        for norm in ds.normalization.values:
            for rule in ds.rule.values:
                s = ds.sel(K=K, normalization=norm, rule=rule)
                plat = "; ".join(
                    f"{_cell(float(s.eps_plateau[j]), '.4g')} / "
                    f"{_cell(float(s.unstable_rate[j]), '.3g')} / "
                    f"{_cell(float(s.fisher_lambda_max[j]), '.3g')}" for j in range(len(etas)))
                esc = [_cell(float(v), ".1f") for v in s.alpha_escape.values]
                tgt = [_cell(float(v), ".1f") for v in s.alpha_target.values]
                lines.append(f"| {int(K)} | {norm} | {_rule_label(ds, rule)} | {plat} | "
                             + " | ".join(esc) + " | " + " | ".join(tgt) + " |")
    return "\n".join(lines)


def _rule_label(ds: xr.Dataset, rule: Any) -> str:
    d = float(ds.damping.sel(rule=rule))
    name = str(ds.learning_rule.sel(rule=rule).values)
    return name if not np.isfinite(d) else f"{name} (damping {d:g})"


def _markdown(ds: xr.Dataset, table: str) -> str:
    reasons = sorted({f"{r!s} {n!s} K={int(k)} eta={float(e):g}: {v!s}"
                      for r in ds.rule.values for n in ds.normalization.values
                      for k in ds.K.values for e in ds.eta.values
                      if (v := ds.status.sel(rule=r, normalization=n, K=k, eta=e).values)
                      != "ok"})
    return (
        "# Natural gradient beside batch normalization\n\n"
        f"Generated by `{ds.attrs['command']}` in {ds.attrs['runtime_seconds']:.0f} s. "
        "K = M, T = I, erf, fixed readout. Per entry: the rule's symmetric plateau at eta "
        "(`eps_plateau`), its unstable rate per eta alpha, the Fisher's largest eigenvalue "
        "there (W = J/sqrt(N)); `alpha_esc`: escape time from SGD's perturbed plateau (the "
        "same start for every rule; threshold half the gradient-flow plateau's eps_g); "
        f"`alpha(eps<{TARGET:g})`: time to eps_g = {TARGET:g} from the seed-0 random "
        "init. n/a: see the list below.\n\n"
        + table + "\n\n### Entries with a missing value\n\n"
        + ("\n".join(f"* {r}" for r in reasons) or "none") + "\n"
    )


def _figure(ds: xr.Dataset, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ks = [int(K) for K in ds.K.values]
    panels = (("alpha_escape", "escape time alpha_esc (same start)"),
              ("alpha_target", f"time to eps_g = {TARGET:g} (random init)"),
              ("fisher_lambda_max", "Fisher lambda_max at the plateau"))
    fig, axes = plt.subplots(len(Ks), len(panels), figsize=(4.2 * len(panels), 3.4 * len(Ks)),
                             squeeze=False)
    colors = {"sgd": "C0", "natural_gradient": "C3", "natural_gradient_damped": "C2"}
    for a, K in enumerate(Ks):
        for b, (var, title) in enumerate(panels):
            ax = axes[a, b]
            for rule in ds.rule.values:
                for norm, style in zip(ds.normalization.values, ("-o", "--s"), strict=True):
                    y = ds[var].sel(K=K, rule=rule, normalization=norm).values
                    ax.plot(ds.eta.values, y, style, color=colors.get(str(rule), "k"),
                            fillstyle="full" if norm == "plain" else "none",
                            label=f"{_rule_label(ds, rule)}, {norm}")
            ax.set_xscale("log")
            if var != "fisher_lambda_max":
                ax.set_yscale("log")
            ax.set_xlabel("eta")
            ax.set_ylabel("alpha" if var != "fisher_lambda_max" else "lambda_max")
            ax.set_title(f"K = M = {K}: {title}", fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0.0, 0.1, 1.0, 1.0))
    fig.savefig(path, dpi=100)
    plt.close(fig)


@hookimpl
def symphase_register_reproductions(registry: Any) -> None:
    registry.add_reproduction(
        "natural_gradient", natural_gradient,
        "escape and convergence times vs eta, sgd vs natural gradient, plain vs batchnorm, "
        "and the Fisher's largest eigenvalue at each plateau",
    )
