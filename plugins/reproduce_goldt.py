"""``symphase reproduce goldt2019``: final generalization error against student width.

Goldt, Advani, Saxe, Krzakala & Zdeborova, "Dynamics of stochastic gradient descent for
two-layer neural networks in the teacher-student setup" (NeurIPS 2019): an erf teacher
with ``M = 2`` units, ``T = I``, readout ``v* = 1``, output noise of variance
``sigma^2``; students of width ``K = M .. M + 4`` trained by online SGD, either the first
layer only (the soft committee machine, ``v = 1`` fixed) or both layers (readout ``v``
trained with ``eta_v = eta``). Their finding: the final error grows with ``K`` when only
the first layer learns and does not when both learn.

What is computed (the order-parameter ODE, N -> infinity, closed-form erf engine):

* ``eps_final``: ``eps_g`` (noise term ``sigma^2 / 2`` included) at ``alpha_max = 5e4 /
  eta`` from Goldt et al.'s initial condition (their ODE code, ``sgoldt/nn2pp``
  ``scmpp_ode.cpp``, ``--init 1``: ``Q = I`` plus a symmetric perturbation, ``R`` small,
  ``v = 1`` plus a perturbation; we take perturbations of size ``1e-6``, seed 0; theirs,
  ``1e-9``, gives the same final states and ``eps_final`` within 1 % for the first layer,
  K = 2..6 at (sigma^2, eta) = (0.1, 0.5) and (0.01, 0.1); not checked for both layers).
  ``eps_final_error`` is the change of ``eps_g`` over the last decade of alpha
  (``alpha_max / 10 .. alpha_max``);
  ``converged`` when that is below ``1e-3`` of ``eps_final - sigma^2 / 2``; ``state`` says
  what the student's units do at the end.
* ``asymptote``: the small-``eta`` limit derived below, ``sigma^2 / 2 + c(K, M) eta
  sigma^2`` with ``c(K, M) = (L + M / sqrt 3) / (2 pi)``, ``L = K - M``.
* ``ratio_small_eta``: ``(eps* - sigma^2/2) / (eta sigma^2)`` from the ODE at small
  ``eta`` started next to the configuration of the derivation (``M`` units on the
  teacher, ``L`` units at ``|W|^2 = 1e-3``), to be compared with ``c(K, M)``.

The small-eta asymptotic (first layer only)
-------------------------------------------
Write ``W = J / sqrt(N)`` and split each student vector into its teacher part and the
rest: ``Q = R T^{-1} R^T + P`` with ``P`` positive semidefinite (here ``T = I``). With
``G = d eps_g / dQ`` and ``H = d eps_g / dR`` the ODE is ``dR/dalpha = -eta (2 G R + H)``
and ``dQ/dalpha = -eta (2 G Q + H R^T + transpose) + eta^2 S``, ``S_ik = E[delta_i
delta_k]``, so that ``dP/dalpha = -2 eta (G P + P G) + eta^2 S``.  The noise-free
perfect solution ``s0`` (``M`` units equal to the teachers, ``L`` units dead, ``P = 0``)
has ``d eps_g / dR|_P = 0``; there the error ``zeta - sigma`` is the output noise alone,
so ``S = sigma^2 Phi`` and ``G = Phi / 2`` with ``Phi_ik = E[g'(x_i) g'(x_k)]`` (Price's
theorem; the second-derivative term is multiplied by the vanishing noise-free error).
The fixed point to first order in ``eta`` solves ``Phi P + P Phi = eta sigma^2 Phi``,
i.e. ``P = (eta sigma^2 / 2) I``: every unit carries an orthogonal, noise-driven
component of squared norm ``eta sigma^2 / 2``.  The excess error is ``tr(G P) + O(eta^2)
= (eta sigma^2 / 4) sum_i Phi_ii`` with ``Phi_ii = (2 / pi) / sqrt(1 + 2 Q_ii)``: ``2 /
(pi sqrt 3)`` for a unit on a teacher (``Q_ii = 1``) and ``2 / pi`` for a dead one, so::

    eps_g* - sigma^2 / 2 = eta sigma^2 (L + M / sqrt 3) / (2 pi) + O(eta^2).

(Our ``eps_g`` includes ``sigma^2 / 2``; Goldt et al.'s excludes it.) The ODE confirms it
for ``L = 0, 1`` (the ratio tends to ``c`` with an ``O(eta)`` correction, tested). With
``L >= 2`` the fixed point is marginal: on the dead units ``Phi = (2 / pi) 1 1^T`` has
rank one, so differences of dead units feel no restoring force at this order. In the
ODE, for ``L = 2`` and ``4`` they grow into cancelling pairs (``W_a ~ -W_b``, ``g(x_a) +
g(x_b) ~ 0``) whose norm grows without bound under the ``eta^2`` noise and whose error
keeps decreasing slowly, so ``eps_final`` is not converged (``state``, ``converged``);
for ``L = 3`` the run started at the dead configuration stayed there up to ``alpha =
5e4 / eta`` (ratio within 0.5 % of ``c``), while from Goldt et al.'s initial condition
two of the three surplus units pair up.
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
    TeacherStudent,
    convention_attrs,
    get_normalization,
    hookimpl,
    theory,
)
from plugins._pool import run_jobs, save_run

M_TEACHER = 2
COMMAND = "symphase reproduce goldt2019 --out datasets"
INIT_PERTURBATION = 1e-6
ETA_ALPHA_MAX = 5e4  # integrate up to alpha = ETA_ALPHA_MAX / eta
CONVERGED = 1e-3  # relative change over the last decade below which a run is converged
DEAD_Q0 = 1e-3  # |W|^2 of the surplus units at the start of the small-eta runs
RTOL, ATOL = 1e-8, 1e-11


def asymptotic_coefficient(K: int, M: int) -> float:
    """``c(K, M) = (L + M / sqrt 3) / (2 pi)``, ``L = K - M``: ``eps_g* - sigma^2 / 2 =
    c eta sigma^2 + O(eta^2)`` for the soft committee machine (first layer only, ``T =
    I``, ``v = v* = 1``) at the perfect solution with ``L`` dead units (module docstring)."""
    if K < M:
        raise ValueError(f"'K' must be >= M = {M} (surplus units L = K - M), got {K}")
    return (K - M + M / math.sqrt(3.0)) / (2.0 * math.pi)


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"Ks": (2, 3), "noises": (0.1,), "etas": (0.5,), "n_alpha": 161,
                "small_etas": (0.01, 0.02), "small_Ks": (2, 3)}
    return {"Ks": (2, 3, 4, 5, 6), "noises": (0.01, 0.1), "etas": (0.1, 0.5), "n_alpha": 301,
            "small_etas": (0.01, 0.02, 0.04), "small_Ks": (2, 3, 4, 5, 6)}


def _model(K: int, noise: float, layers: str, eta: float) -> TeacherStudent:
    if layers == "first":
        return TeacherStudent(K, M_TEACHER, noise=noise, second_layer="fixed")
    return TeacherStudent(K, M_TEACHER, noise=noise, second_layer="trained", eta_v=eta)


def goldt_initial_state(K: int, M: int, seed: int = 0,
                        size: float = INIT_PERTURBATION) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """Goldt et al.'s initial condition (``nn2pp`` ``--init 1``): ``Q = I + size X``
    (``X`` symmetric, standard normal upper triangle), ``R = size Z``, ``v = 1 + size
    z`` (only used when the readout is trained)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((K, K))
    Q = np.eye(K) + size * (np.triu(X) + np.triu(X, 1).T)
    R = size * rng.standard_normal((K, M))
    v = 1.0 + size * rng.standard_normal(K)
    return Q, R, v


def _state(Q: np.ndarray, v: np.ndarray | None) -> str:
    """Units at the end: dead (``Q_ii < 0.2``), in cancelling pairs (``Q_ii > 3`` with a
    partner at correlation ``Q_ij / sqrt(Q_ii Q_jj) < -0.99``), other large ones, active."""
    q = np.diag(Q)
    dead = q < 0.2
    big = q > 3.0
    corr = Q / np.sqrt(np.outer(np.maximum(q, 1e-300), np.maximum(q, 1e-300)))
    paired = big & np.any((corr < -0.99) & big[None, :], axis=1)
    n_other = int(np.sum(big & ~paired))
    out = (f"{int(np.sum(~dead & ~big))} active, {int(dead.sum())} dead, "
           f"{int(paired.sum())} in cancelling pairs")
    if n_other:
        out += f", {n_other} large without a cancelling partner"
    if big.any():
        out += f" (|W_i|^2 up to {q.max():.3g}, growing)"
    if v is not None:
        out += f"; readout v = {', '.join(f'{x:.3f}' for x in v)}"
    return out


def final_error(K: int, noise: float, eta: float, layers: str, n_alpha: int = 301,
                seed: int = 0) -> dict[str, Any]:
    """Integrate from :func:`goldt_initial_state` to ``alpha = ETA_ALPHA_MAX / eta``;
    ``eps_g`` at the end, its change over the last decade, the final state."""
    t0 = time.time()
    model = _model(K, noise, layers, eta)
    eng = theory.select_engine(model, get_normalization("plain"))
    Q0, R0, v0 = goldt_initial_state(K, M_TEACHER, seed)
    params = {"v": v0} if layers == "both" else None
    alpha_max = ETA_ALPHA_MAX / eta
    alpha = np.concatenate([[0.0], np.geomspace(1.0, alpha_max, n_alpha - 1)])
    tr = eng.integrate(Q0, R0, eta=eta, alpha=alpha, params=params, rtol=RTOL, atol=ATOL)
    out: dict[str, Any] = {"eps_final": math.nan, "eps_final_error": math.nan,
                           "converged": False, "state": "", "seconds": 0.0,
                           "alpha_final": alpha_max}
    if tr.diverged or tr.alpha.size < alpha.size:
        out["state"] = f"integration stopped at alpha = {tr.alpha[-1]:.4g}: {tr.message}"
        out["seconds"] = time.time() - t0
        return out
    j = int(np.searchsorted(tr.alpha, alpha_max / 10.0))
    eps = tr.eps_g
    change = abs(float(eps[-1] - eps[j]))
    out["eps_final"] = float(eps[-1])
    out["eps_final_error"] = change
    out["converged"] = bool(change < CONVERGED * (float(eps[-1]) - noise / 2.0))
    v = tr.params["v"][-1] if layers == "both" else None
    out["state"] = _state(tr.Q[-1], v)
    out["seconds"] = time.time() - t0
    return out


def small_eta_ratio(K: int, eta: float, noise: float = 0.1) -> tuple[float, float]:
    """``((eps* - sigma^2/2) / (eta sigma^2), its change over the last decade)`` of the
    first-layer-only ODE started next to the perfect solution with ``K - M`` units at
    ``|W|^2 = DEAD_Q0`` (a ``1e-6`` symmetric perturbation), integrated to ``alpha =
    ETA_ALPHA_MAX / eta``."""
    M = M_TEACHER
    model = _model(K, noise, "first", eta)
    eng = theory.select_engine(model, get_normalization("plain"))
    rng = np.random.default_rng(0)
    d = np.r_[np.ones(M), np.full(K - M, DEAD_Q0)]
    X = rng.standard_normal((K, K))
    Q0 = np.diag(d) + 1e-6 * (np.triu(X) + np.triu(X, 1).T) * np.sqrt(np.outer(d, d))
    R0 = np.zeros((K, M))
    R0[:M, :M] = np.eye(M)
    alpha_max = ETA_ALPHA_MAX / eta
    alpha = np.concatenate([[0.0], np.geomspace(1.0, alpha_max, 201)])
    tr = eng.integrate(Q0, R0, eta=eta, alpha=alpha, rtol=1e-10, atol=1e-13)
    if tr.diverged:
        raise RuntimeError(f"small-eta run K={K} eta={eta} stopped: {tr.message}")
    j = int(np.searchsorted(tr.alpha, alpha_max / 10.0))
    excess = (tr.eps_g - noise / 2.0) / (eta * noise)
    return float(excess[-1]), float(abs(excess[-1] - excess[j]))


def _var(data: Any, dims: tuple[str, ...], long_name: str, units: str = "1") -> xr.DataArray:
    return xr.DataArray(data, dims=dims, attrs={"long_name": long_name, "units": units})


def goldt2019(out: Path, quick: bool = False, workers: int = 2) -> int:
    """Run the reproduction; write ``goldt2019.nc`` and ``goldt2019.png`` into ``out``."""
    t0 = time.time()
    cfg = _settings(quick)
    Ks, noises, etas = cfg["Ks"], cfg["noises"], cfg["etas"]
    layers = ("first", "both")
    shape = (len(Ks), len(noises), len(etas), len(layers))
    res = {k: np.full(shape, np.nan) for k in ("eps_final", "eps_final_error", "seconds")}
    conv = np.zeros(shape, dtype=bool)
    state = np.full(shape, "", dtype=object)
    jobs = [(a, b, c, d) for a in range(len(Ks)) for b in range(len(noises))
            for c in range(len(etas)) for d in range(len(layers))]
    jobs.sort(key=lambda j: (layers[j[3]] == "first", etas[j[2]], -Ks[j[0]]))  # long first
    ratio = np.full((len(cfg["small_Ks"]), len(cfg["small_etas"])), np.nan)
    ratio_change = np.full_like(ratio, np.nan)

    def on_result(key: tuple, r: Any) -> None:
        if key[0] == "small":
            ratio[key[1], key[2]], ratio_change[key[1], key[2]] = r
            return
        a, b, c, d = key[1:]
        print(f"K={Ks[a]} noise={noises[b]:g} eta={etas[c]:g} {layers[d]}: "
              f"{r['seconds']:.1f} s, eps_g={r['eps_final']:.5g}, {r['state']}", flush=True)
        for k in res:
            res[k][a, b, c, d] = r[k]
        conv[a, b, c, d] = r["converged"]
        state[a, b, c, d] = r["state"]

    interrupted = run_jobs(
        [(("final", a, b, c, d), final_error,
          (Ks[a], noises[b], etas[c], layers[d], cfg["n_alpha"])) for a, b, c, d in jobs]
        + [(("small", i, j), small_eta_ratio, (K, e))
           for i, K in enumerate(cfg["small_Ks"]) for j, e in enumerate(cfg["small_etas"])],
        workers, on_result)
    if interrupted:
        state[state == ""] = "not computed (interrupted)"
    c_KM = np.array([asymptotic_coefficient(K, M_TEACHER) for K in Ks])
    noise_arr = np.asarray(noises)[None, :, None]
    eta_arr = np.asarray(etas)[None, None, :]
    asym = noise_arr / 2 + c_KM[:, None, None] * eta_arr * noise_arr
    dims = ("K", "noise", "eta", "layers")
    ds = xr.Dataset(
        {
            "eps_final": _var(res["eps_final"], dims, "generalization error eps_g (noise "
                              "variance / 2 included) at alpha = alpha_final"),
            "eps_final_error": _var(res["eps_final_error"], dims, "error estimate of "
                                    "eps_final: |change of eps_g| over the last decade of "
                                    "alpha (alpha_final / 10 .. alpha_final)"),
            "converged": _var(conv, dims, f"eps_final_error below {CONVERGED:g} of "
                              "eps_final - noise / 2"),
            "state": _var(state.astype(str), dims, "the student's units at alpha_final "
                          "(dead: |W_i|^2 < 0.2; cancelling pairs: |W_i|^2 > 3 with a partner "
                          "at correlation < -0.99)"),
            "entry_seconds": _var(res["seconds"], dims, "wall time of the entry", "s"),
            "asymptote": _var(asym, ("K", "noise", "eta"), "small-eta asymptotic of the "
                              "first-layer-only final error: noise / 2 + c(K, M) eta noise"),
            "c_KM": _var(c_KM, ("K",), "c(K, M) = (K - M + M / sqrt 3) / (2 pi)"),
            "ratio_small_eta": _var(ratio, ("K_small", "eta_small"), "(eps_g* - noise/2) / "
                                    "(eta noise) of the first-layer-only ODE (noise 0.1) "
                                    "started at the perfect solution with K - M units at "
                                    f"|W|^2 = {DEAD_Q0:g}, at alpha = {ETA_ALPHA_MAX:g} / eta"),
            "ratio_small_eta_error": _var(ratio_change, ("K_small", "eta_small"), "change "
                                          "of ratio_small_eta over the last decade of alpha"),
            "c_KM_small": _var(np.array([asymptotic_coefficient(K, M_TEACHER)
                                         for K in cfg["small_Ks"]]), ("K_small",),
                               "c(K, M) at K_small"),
        },
        coords={
            "K": ("K", list(Ks), {"long_name": "student hidden units K", "units": "1"}),
            "noise": ("noise", list(noises), {"long_name": "output noise variance sigma^2",
                                              "units": "1"}),
            "eta": ("eta", list(etas), {"long_name": "learning rate eta (both layers: "
                                        "eta_v = eta)", "units": "1"}),
            "layers": ("layers", list(layers), {"long_name": "trained layers: first (soft "
                                                "committee machine, v = 1 fixed) or both "
                                                "(readout v trained)", "units": "1"}),
            "alpha_final": ("eta", [ETA_ALPHA_MAX / e for e in etas],
                            {"long_name": "end of the integration", "units": "1"}),
            "K_small": ("K_small", list(cfg["small_Ks"]),
                        {"long_name": "student hidden units K (small-eta runs)",
                         "units": "1"}),
            "eta_small": ("eta_small", list(cfg["small_etas"]),
                          {"long_name": "learning rate of the small-eta runs", "units": "1"}),
        },
        attrs={
            **{k: v for k, v in convention_attrs(Experiment(TeacherStudent(2, 2))).items()
               if k not in ("eta", "K", "noise_variance", "seed")},
            "M": M_TEACHER,
            "teacher": "erf, M = 2 units, T = I, readout v* = 1, output noise variance "
            "sigma^2 (coordinate noise)",
            "student_readout": "first: v = 1 fixed; both: v trained with eta_v = eta "
            "(dv/dalpha = -eta_v d eps_g / dv), initial v = 1 + 1e-6 z",
            "init": "Goldt et al. (sgoldt/nn2pp scmpp_ode.cpp, --init 1): Q = I + 1e-6 X "
            "(X symmetric, standard normal), R = 1e-6 Z, seed 0 (nn2pp: 1e-9)",
            "reference": "Goldt, Advani, Saxe, Krzakala & Zdeborova, NeurIPS 2019 "
            "(arXiv:1906.08632)",
            "convention_eps_g_goldt": "Goldt et al.'s eps_g excludes the noise: theirs = "
            "ours - sigma^2 / 2",
            "engine": "closed_form (exact erf integrals); DOP853 with rtol 1e-8, atol 1e-11 "
            "(first layer: the compiled integrator; both: scipy's); small-eta runs: rtol "
            "1e-10, atol 1e-13",
            "command": COMMAND + (" --quick" if quick else ""),
            "quick": int(quick),
            "runtime_seconds": float(time.time() - t0),
        },
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if save_run(ds, out / "goldt2019.nc", interrupted):  # no figure of a partial result
        return 130
    _figure(ds, out / "goldt2019.png")
    print(table(ds))
    return 0


def table(ds: xr.Dataset) -> str:
    """Markdown table: eps_final - noise/2 per K (rows) and (noise, eta) (columns)."""
    cols = [(float(n), float(e)) for n in ds.noise.values for e in ds.eta.values]
    head = "| K | " + " | ".join(
        f"σ²={n:g} η={e:g}: first / both / asymptote" for n, e in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    for K in ds.K.values:
        cells = []
        for n, e in cols:
            s = ds.sel(K=K, noise=n, eta=e)
            f, b = (float(s.eps_final.sel(layers=x)) - n / 2 for x in ("first", "both"))
            mark = ["" if bool(s.converged.sel(layers=x)) else "*" for x in ("first", "both")]
            cells.append(f"{f:.3e}{mark[0]} / {b:.3e}{mark[1]} / "
                         f"{float(s.asymptote) - n / 2:.3e}")
        lines.append(f"| {int(K)} | " + " | ".join(cells) + " |")
    lines.append("(eps_g - σ²/2; * not converged: still changing by more than "
                 f"{CONVERGED:g} relative over the last decade of alpha)")
    return "\n".join(lines)


def _figure(ds: xr.Dataset, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nn, ne = ds.sizes["noise"], ds.sizes["eta"]
    fig, axes = plt.subplots(nn, ne + 1, figsize=(4 * (ne + 1), 3.3 * nn), squeeze=False)
    Ks = ds.K.values
    for i, n in enumerate(ds.noise.values):
        for j, e in enumerate(ds.eta.values):
            ax = axes[i, j]
            s = ds.sel(noise=n, eta=e)
            for layer, color, marker in (("first", "C0", "o"), ("both", "C1", "s")):
                y = s.eps_final.sel(layers=layer).values - n / 2
                ok = s.converged.sel(layers=layer).values.astype(bool)
                ax.plot(Ks, y, color=color, label=f"{layer} layer{'s' if layer == 'both' else ''}")
                ax.plot(Ks[ok], y[ok], marker, color=color)
                ax.plot(Ks[~ok], y[~ok], marker, color=color, mfc="none")
            ax.plot(Ks, s.asymptote.values - n / 2, "k--", label="c(K, M) η σ²")
            ax.set(yscale="log", xlabel="student width K (M = 2)",
                   ylabel="final eps_g − σ²/2", title=f"σ² = {n:g}, η = {e:g}")
            ax.set_xticks(Ks)
        axes[i, 0].legend(fontsize=7, title="open: not converged", title_fontsize=7)
    ax = axes[0, ne]
    for k, K in enumerate(ds.K_small.values):
        ax.plot(ds.eta_small, ds.ratio_small_eta.isel(K_small=k), "o-", color=f"C{k}",
                label=f"K = {int(K)}")
        ax.axhline(float(ds.c_KM_small.isel(K_small=k)), color=f"C{k}", ls="--", lw=0.8)
    ax.set(xlabel="η (first layer only, σ² = 0.1)", ylabel="(eps* − σ²/2) / (η σ²)",
           title="ODE vs c(K, M) (dashed)", xlim=(0, None))
    ax.legend(fontsize=7)
    for i in range(1, nn):
        axes[i, ne].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@hookimpl
def symphase_register_reproductions(registry: Any) -> None:
    registry.add_reproduction(
        "goldt2019", goldt2019,
        "final eps_g vs student width K, first layer vs both layers trained (Goldt et al. "
        "2019), with the small-eta asymptotic of the first-layer error",
    )
