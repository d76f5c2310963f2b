"""``symphase reproduce bn_speedup``: when does batch normalization speed learning up?
(issue 14, item 5)

Plain against batch normalization, its stop-gradient variant ``batchnorm_stopgrad`` and
``batchnorm_affine`` (trainable ``gamma``; ``beta`` stays 0 for the odd erf with centred
inputs) for ``K = M`` in ``Ks``, on the Gaussian inputs of :data:`SETTINGS` (centred in
(a)-(c), with a mean in (d)); each setting has a plan (:func:`plan`: its Ks,
normalizations and eta grid; :data:`NORMALIZATIONS` says why the other built-ins are not
in (a)-(c)):

(a) ``isotropic``: ``Sigma = I``;
(b) ``two_level_10``, ``two_level_100``: two eigenvalues in the ratio 1:10 and 1:100,
    half of the directions each, mean eigenvalue 1
    (:meth:`framework.InputDistribution.two_level`);
(c) ``power_law_4``: 4 equally large eigenspaces, ``lambda_l ~ l^-1``, mean 1
    (:meth:`framework.InputDistribution.power_law`);
(d) ``mean_2``: non-centred inputs ``xi ~ N(m u, I)``, ``|u| = 1``, ``m`` =
    :data:`MEAN_SIZE`, the teacher's overlaps with ``u`` ``s_n = B_n . u / sqrt(N)`` =
    :data:`MEAN_DIRECTION` (``framework.InputDistribution(mean=..., direction=...)``):
    the pre-activation means are ``m r_i`` (student, ``r_i = J_i . u / sqrt(N)``, starts
    at 0) and ``m s_n = 1`` (teacher), equal to the teacher's pre-activation standard
    deviation. Only K = 2, on the coarser grid ``mean["etas"]``, on the quadrature engine
    (:data:`QUADRATURE_MEAN`; there is no closed form with a mean), with the horizon rule
    :data:`HORIZON_CLIP_MEAN`. Normalizations (``mean["normalizations"]``): plain,
    batchnorm, batchnorm_affine (trainable ``gamma``, ``beta``), meanonly and weightnorm
    (trainable gain; its statistic ``|J_i|^2 / N`` is of the weights, blind to the mean,
    so its pre-activations keep their mean ``g m r_i / |J_i|``). Population
    statistics that centre subtract ``m r_i``; then a normalization without a trainable
    shift (batchnorm, batchnorm_stopgrad, meanonly) has an output of mean zero, while the
    teacher's output has mean ``sum_n E g(y_n)`` with ``y_n ~ N(m s_n, T_nn)``, so its
    ``eps_g >= (sum_n erf(m s_n / sqrt(2 (1 + T_nn))))^2 / 2`` at every alpha (variable
    ``eps_g_floor``: 0.542 here) and it never reaches the target; batchnorm_affine's
    trainable ``beta`` can represent the mean.

Definitions (also stored as attrs of the dataset)
--------------------------------------------------
* Initial condition, common to every entry of a setting: the Experiment's random init
  (seed 0, ``init_N = 1000``, ``init_scale = 1``), i.e. the same ``(Q, R)`` for every
  normalization and every setting, spread over the eigenspaces in proportion to their
  size (:meth:`InputDistribution.lift`).
* ``t_target(eta)``: the first ``alpha`` with ``eps_g < TARGET = 1e-3`` (log-linear
  interpolation on the report grid) of the ``dynamics`` ODE from that init at ``eta``.
  A run is *stable* when it reaches the target within its horizon ``alpha_horizon``
  (:func:`horizon`: ``600 / eta`` clipped to ``[1000, 4800]``, cut to the report grid),
  is neither ``diverged`` nor ``runaway``, and still has ``eps_g < TARGET`` there.
* The ``t_target`` curves come from one :class:`framework.sweep.Sweep` per setting (and
  horizon) over ``K x normalization x eta`` (grid ``etas``) on a Dask ``LocalCluster``;
  each entry's further runs (below) are a Dask job submitted as soon as its setting's
  sweeps are done, so that they fill the workers while the next setting's sweeps run.
* ``eta_max`` (largest stable learning rate): the largest grid eta that is stable, and
  if the next grid eta is not, refined by ``bisection_steps`` bisections in ``log eta``
  between the two (each a ``dynamics`` run); an upper bound is then ``eta_max_upper``.
  If every grid eta is stable, ``eta_max`` is the grid's largest eta and
  ``eta_max_bounded`` is False (a lower bound: batch normalization's weight norm grows
  through the ``eta^2`` term, so its effective rate ``eta / |W|^2`` falls and it does not
  diverge).
* ``eta_best``: the grid eta minimizing ``t_target`` among the stable ones (resolution:
  the grid's ratio).
* ``alpha_escape``: the ``escape`` analyzer from the same init (``start="init"``) at
  that eta (the run stops at the first grid point below the threshold,
  ``stop_at_escape``): the first alpha with ``eps_g < eps_plateau / 2``, ``eps_plateau`` the
  gradient-flow plateau's (``plateau="gradient_flow"``), or, where gradient flow has no
  plateau (batchnorm_stopgrad, whose plateau's weight norm is proportional to eta),
  the plateau at that eta (``plateau="eta"``); which one is in ``escape_plateau``.
* ``lambda_min``, ``lambda_max``: the smallest and largest eigenvalue of the exact
  weight-space Hessian of ``eps_g`` (``hessian`` analyzer, coordinates ``W = J /
  sqrt(N)``) at the plateau fixed point of the SGD ODE at ``eta = ETA_SAME`` (scale-
  invariant normalizations at weight norm ``|W_i|^2 = 1``; their Hessian scales as
  ``1 / weight norm``). Computed through the public analyzers for every setting; an
  entry that an analyzer refuses is NaN with the reason in ``hessian_status``.

Writes ``bn_speedup.nc``, ``bn_speedup.md`` (the table) and the figures
``bn_speedup_time.png`` and ``bn_speedup_eps_g.png`` into ``out`` and prints the table.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from framework import Experiment, InputDistribution, TeacherStudent, convention_attrs, hookimpl
from framework.sweep import Sweep
from plugins._pool import save_run

NAME = "bn_speedup"
COMMAND = "symphase reproduce bn_speedup --out datasets"
#: The normalizations of the centred settings (a)-(c). The other built-ins are left out
#: there because they add nothing or cost too much: ``meanonly`` is ``plain`` with centred
#: inputs; ``weightnorm`` is ``batchnorm_affine`` under isotropic inputs (the same ODE
#: with population statistics), and under a spread spectrum its statistic is of the
#: weights (``sum_l Q_l,ii``), so it runs on the quadrature engine at ~40 ms per unit of
#: alpha (batchnorm_affine's closed form: ~1 ms), too slow for a sweep of horizons up to
#: 4800; its structured plateau is checked in tests/test_boundary_equilibrium.py. Both are
#: in setting (d), where every normalization runs on the quadrature engine.
NORMALIZATIONS = ("plain", "batchnorm", "batchnorm_stopgrad", "batchnorm_affine")
#: The normalizations of setting (d) besides :data:`NORMALIZATIONS`' (non-centred inputs:
#: centring alone; weight norm, whose statistic does not see the mean).
MEAN_NORMALIZATIONS = ("meanonly", "weightnorm")
#: The normalizations whose output has mean zero with population statistics: they centre
#: the pre-activations and have no trainable shift (:func:`eps_g_floor`).
CENTRING_WITHOUT_SHIFT = ("batchnorm", "batchnorm_stopgrad", "meanonly")
#: The common learning rate of comparison (i).
ETA_SAME = 0.5
#: The target generalization error of the time to learn.
TARGET = 1e-3
#: Relative size of the first positive alpha of the report grid.
ALPHA_MIN = 0.01
#: Setting (d): the size ``m = |mu|`` of the input mean and the teacher's overlaps ``s``
#: with its direction (``m s = 1``: the teacher's pre-activation mean equals its standard
#: deviation).
MEAN_SIZE = 2.0
MEAN_DIRECTION = 0.5
#: Setting (d) runs on the generic engine: its randomized-QMC quadrature (8 x 512 points,
#: 16 times fewer than the default; the t_1e-3 of plain at eta = 2 moves by ~1-2% between
#: quadrature seeds, README). The check runs (``t_target_*_check``) use seed 1.
QUADRATURE_MEAN: dict[str, Any] = {"samples": 512, "replicates": 8, "seed": 0}
#: (key, label) of the input settings; the spectra are built by :func:`inputs_of`.
SETTINGS: tuple[tuple[str, str], ...] = (
    ("isotropic", "(a) isotropic, Sigma = I"),
    ("two_level_10", "(b) two levels 1:10, half the directions each, mean 1"),
    ("two_level_100", "(b) two levels 1:100, half the directions each, mean 1"),
    ("power_law_4", "(c) power law, 4 levels, lambda_l ~ l^-1, mean 1"),
    ("mean_2", f"(d) non-centred, Sigma = I, mean of size m = {MEAN_SIZE:g} along u, "
     f"teacher overlaps s = {MEAN_DIRECTION:g}"),
)
SETTING_D = (f"(d) non-centred inputs xi ~ N(m u, I), m = {MEAN_SIZE:g}, teacher overlaps "
             f"s_n = B_n.u/sqrt(N) = {MEAN_DIRECTION:g} (pre-activation means m r_i and "
             f"m s_n = {MEAN_SIZE * MEAN_DIRECTION:g}), K = 2, generic (quadrature) engine. "
             "batchnorm_affine has a trainable shift beta; meanonly and weightnorm "
             "(trainable gain, statistic of the weights, blind to the mean) are added. "
             "batchnorm with beta = 0, batchnorm_stopgrad and meanonly centre the "
             "pre-activations "
             "and have no trainable shift, so their output has mean 0 while the "
             "teacher's has mean sum_n E erf(y_n/sqrt 2); eps_g >= eps_g_floor at every "
             "alpha and the target is not reached.")


def inputs_of(key: str) -> InputDistribution:
    """The input distribution of a setting of :data:`SETTINGS`."""
    if key == "isotropic":
        return InputDistribution()
    if key == "two_level_10":
        return InputDistribution.two_level(10.0, 0.5, 1.0)
    if key == "two_level_100":
        return InputDistribution.two_level(100.0, 0.5, 1.0)
    if key == "power_law_4":
        return InputDistribution.power_law(4, 1.0, 1.0)
    if key == "mean_2":
        return InputDistribution(mean=MEAN_SIZE, direction=MEAN_DIRECTION)
    raise ValueError(f"'setting' must be one of {[k for k, _ in SETTINGS]}, got {key!r}")


def eps_g_floor(key: str, M: int) -> float:
    """Lower bound of ``eps_g`` for a student output of mean zero (a normalization that
    centres and has no trainable shift) with ``K = M``, ``T = I``, erf units, no noise:
    ``(E zeta)^2 / 2``, ``E zeta = sum_n E erf(y_n / sqrt 2) = sum_n erf(m s_n / 2)``
    (``y_n ~ N(m s_n, 1)``); 0 for centred inputs."""
    from scipy import special

    mean = float(np.sum(special.erf(inputs_of(key).teacher_mean(M) / 2.0)))
    return 0.5 * mean * mean


def _settings(quick: bool) -> dict[str, Any]:
    """The run's configuration; ``mean`` holds the Ks, normalizations, etas and bisection
    steps of the non-centred setting(s)."""
    if quick:
        return {"Ks": (2,), "settings": ("isotropic", "two_level_100", "mean_2"),
                "normalizations": ("plain", "batchnorm"), "etas": (0.5, 2.0, 8.0),
                "n_alpha": 801, "bisection_steps": 1,
                "mean": {"Ks": (2,), "normalizations": ("plain", "batchnorm",
                                                        "batchnorm_affine"),
                         "etas": (0.5, 4.0), "bisection_steps": 0, "check": False,
                         "hessian": False}}
    return {"Ks": (2, 3), "settings": tuple(k for k, _ in SETTINGS),
            "normalizations": NORMALIZATIONS,
            "etas": (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
            "n_alpha": 1201, "bisection_steps": 3,
            "mean": {"Ks": (2,), "normalizations": ("plain", "batchnorm",
                                                    "batchnorm_affine", "meanonly",
                                                    "weightnorm"),
                     "etas": (0.5, 1.0, 2.0, 4.0, 8.0), "bisection_steps": 1,
                     "check": True}}


def plan(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    """``Ks``, ``normalizations``, ``etas``, ``bisection_steps``, ``check`` (re-run
    t_target with another quadrature seed) and ``hessian`` (run the hessian analyzer;
    default True) of setting ``key``: the centred settings' (top level of ``cfg``) or the
    non-centred ones' (``cfg["mean"]``)."""
    src = cfg if inputs_of(key).centred else cfg["mean"]
    return {"Ks": tuple(src["Ks"]), "normalizations": tuple(src["normalizations"]),
            "etas": tuple(src["etas"]), "bisection_steps": int(src["bisection_steps"]),
            "check": bool(src.get("check", False)), "hessian": bool(src.get("hessian", True))}


#: ``hessian_status`` of an entry whose plan skips the Hessian (--quick, non-centred: its
#: fixed-point searches on the quadrature cost ~20-60 s per normalization).
HESSIAN_SKIPPED = ("not computed: the Hessian with an input mean is skipped by --quick "
                   "(the full run computes it)")


#: The horizon of a run at eta: ``clip(HORIZON_ETA_ALPHA / eta, *HORIZON_CLIP)`` (the
#: slowest stable runs seen reach the target by ~1/3 of it); non-centred inputs:
#: ``HORIZON_CLIP_MEAN`` (their quadrature costs ~100 times more per step; the slowest
#: stable run seen, batchnorm_affine at eta = 1, reaches the target at ~1/2 of it).
HORIZON_ETA_ALPHA = 600.0
HORIZON_CLIP = (1000.0, 4800.0)
HORIZON_CLIP_MEAN = (600.0, 1200.0)


def horizon(eta: float, setting: str | None = None) -> float:
    """The alpha horizon of a run at ``eta`` in ``setting`` (None: a centred one), before
    cutting it to the report grid."""
    clip = HORIZON_CLIP if setting is None or inputs_of(setting).centred else \
        HORIZON_CLIP_MEAN
    return float(np.clip(HORIZON_ETA_ALPHA / eta, *clip))


def full_grid(cfg: dict[str, Any]) -> np.ndarray:
    """The common report grid: 0, then ``n_alpha - 1`` log-spaced values from
    :data:`ALPHA_MIN` to the largest horizon."""
    return np.concatenate([[0.0], np.geomspace(ALPHA_MIN, HORIZON_CLIP[1], cfg["n_alpha"] - 1)])


def alpha_grid(cfg: dict[str, Any], eta: float, setting: str | None = None) -> list[float]:
    """The report grid of a run at ``eta`` in ``setting``: the points of :func:`full_grid`
    up to :func:`horizon` (so that every run's grid is a prefix of the common one)."""
    g = full_grid(cfg)
    return g[g <= horizon(eta, setting) * (1 + 1e-12)].tolist()


def experiment(setting: str, K: int, normalization: str, eta: float,
               analyzers: list[Any]) -> Experiment:
    """The experiment of an entry: ``K = M``, the setting's inputs, the common init."""
    return Experiment(TeacherStudent(K, K, inputs=inputs_of(setting)),
                      normalization=normalization, eta=eta, seed=0, analyzers=analyzers)


def quadrature_of(setting: str, seed: int = 0) -> dict[str, Any]:
    """The ``quadrature`` option of the setting's analyzers (empty: closed form)."""
    if inputs_of(setting).centred:
        return {}
    return {"quadrature": {**QUADRATURE_MEAN, "seed": seed}}


def dynamics_spec(setting: str, grid: list[float], seed: int = 0) -> dict[str, Any]:
    """The ``dynamics`` analyzer of a run of ``setting`` on ``grid``."""
    return {"name": "dynamics", "alpha": list(grid), **quadrature_of(setting, seed)}


def time_to_target(alpha: np.ndarray, eps: np.ndarray, target: float = TARGET) -> float:
    """First alpha with ``eps < target``: log-linear interpolation between the grid points
    around the crossing; NaN if never."""
    eps = np.asarray(eps, dtype=float)
    below = np.nonzero(eps < target)[0]
    if below.size == 0:
        return float("nan")
    j = int(below[0])
    if j == 0:
        return float(alpha[0])
    e0, e1 = float(eps[j - 1]), float(eps[j])
    if not (e0 > 0 and e1 > 0):
        return float(alpha[j])
    w = (math.log(e0) - math.log(target)) / (math.log(e0) - math.log(e1))
    return float(alpha[j - 1] + w * (alpha[j] - alpha[j - 1]))


def stable_run(eps: np.ndarray, diverged: bool, runaway: bool) -> bool:
    """The stability rule of the module docstring on one trajectory."""
    eps = np.asarray(eps, dtype=float)
    return bool(not diverged and not runaway and np.any(eps < TARGET)
                and np.isfinite(eps[-1]) and eps[-1] < TARGET)


def outcome(eps: np.ndarray, diverged: bool, runaway: bool) -> str:
    """Why a run is or is not stable: ``stable``, ``diverged``, ``runaway``, ``left the
    target`` (reached it, above it at the horizon) or ``not reached`` (never below it)."""
    eps = np.asarray(eps, dtype=float)
    if diverged or runaway:
        return "diverged" if diverged else "runaway"
    if stable_run(eps, diverged, runaway):
        return "stable"
    return "left the target" if np.any(eps < TARGET) else "not reached"


def _dynamics_run(setting: str, K: int, norm: str, eta: float, grid: list[float],
                  seed: int = 0) -> tuple[float, bool]:
    """``(t_target, stable)`` of one ``dynamics`` run (the bisection's step; ``seed``:
    the quadrature's, non-centred inputs)."""
    ds = experiment(setting, K, norm, eta, [dynamics_spec(setting, grid, seed)]).run()[
        "dynamics"]
    eps = ds.eps_g.values
    return (time_to_target(ds.alpha.values, eps),
            stable_run(eps, bool(ds.diverged), bool(ds.runaway)))


def _hessian(setting: str, K: int, norm: str) -> dict[str, Any]:
    out: dict[str, Any] = {"lambda_min": np.nan, "lambda_max": np.nan,
                           "eps_plateau_hessian": np.nan, "hessian_status": "ok"}
    try:
        h = experiment(setting, K, norm, ETA_SAME, [{"name": "hessian"}]).run()["hessian"]
        b = int(h.attrs["plateau_branch"])
        if b < 0:
            eps = ", ".join(f"{float(e):.4g}" for e in h.eps_g.values)
            raise RuntimeError(f"no plateau branch among the {h.sizes['branch']} fixed "
                               f"points found at eta = {ETA_SAME} (eps_g {eps}; the best "
                               f"constant predictor's {float(h.attrs['eps_g_constant']):.4g})")
        hb = h.isel(branch=b)
        out["lambda_min"] = float(hb.lambda_min)
        out["lambda_max"] = (float(hb.lambda_max) if "lambda_max" in hb
                             else float(np.nanmax(hb.eigenvalue.values)))
        out["eps_plateau_hessian"] = float(hb.eps_g)
    except Exception as exc:  # recorded per entry: the table shows why
        out["hessian_status"] = f"not computed: {type(exc).__name__}: {str(exc)[:400]}"
    return out


#: The escape analyzer's refusals that mean "no gradient-flow plateau to take the
#: threshold from": then the plateau at that eta is used.
_NO_GRADIENT_FLOW_PLATEAU = ("no unstable symmetric fixed point",
                             "for the generic engine's fixed points")


def _escape(setting: str, K: int, norm: str, eta: float, grid: list[float]
            ) -> tuple[float, str, str]:
    """``(alpha_escape, threshold plateau, status)`` from the common init at ``eta``."""
    why = ""
    for plateau in ("gradient_flow", "eta"):
        # only alpha_escape is used: the run stops at the first grid point below the
        # threshold (the rows before it are those of the full run)
        spec = {"name": "escape", "start": "init", "plateau": plateau, "alpha": grid,
                "stop_at_escape": True, **quadrature_of(setting)}
        try:
            e = experiment(setting, K, norm, eta, [spec]).run()["escape"]
        except Exception as exc:
            why = f"{type(exc).__name__}: {str(exc)[:400]}"
            if plateau == "gradient_flow" and any(m in why for m in _NO_GRADIENT_FLOW_PLATEAU):
                continue  # gradient flow has no plateau here: the plateau at eta
            return np.nan, plateau, f"not computed: {why}"
        a = float(e.alpha_escape)
        status = "ok" if np.isfinite(a) else (
            f"no escape within alpha = {grid[-1]:g}" + (" (diverged)" if bool(e.diverged)
                                                         else ""))
        return a, plateau, status
    return np.nan, "", f"not computed: {why}"


def _case(setting: str, K: int, norm: str, etas: list[float], t_target: list[float],
          stable: list[bool], cfg: dict[str, Any]) -> dict[str, Any]:
    """Everything of one (setting, K, normalization) after the sweep: the Hessian, the
    eta_max bisection, eta_best and the escape times at ETA_SAME and eta_best; for
    non-centred inputs (``check``) t_target at ETA_SAME and eta_best again with
    quadrature seed 1."""
    t0 = time.time()
    p = plan(cfg, setting)
    out: dict[str, Any] = _hessian(setting, K, norm) if p["hessian"] else {
        "lambda_min": np.nan, "lambda_max": np.nan, "eps_plateau_hessian": np.nan,
        "hessian_status": HESSIAN_SKIPPED}
    # eta_max: the largest stable grid eta, refined towards the first unstable one above
    ok = [j for j, s in enumerate(stable) if s]
    out.update({"eta_max": np.nan, "eta_max_upper": np.nan, "eta_max_bounded": False,
                "eta_best": np.nan, "t_target_best": np.nan,
                "t_target_same_check": np.nan, "t_target_best_check": np.nan})
    if ok:
        j = ok[-1]
        lo = etas[j]
        if j + 1 < len(etas):
            hi = etas[j + 1]
            for _ in range(p["bisection_steps"]):
                mid = math.sqrt(lo * hi)
                if _dynamics_run(setting, K, norm, mid, alpha_grid(cfg, mid, setting))[1]:
                    lo = mid
                else:
                    hi = mid
            out["eta_max_upper"], out["eta_max_bounded"] = hi, True
        out["eta_max"] = lo
        best = min(ok, key=lambda i: t_target[i])
        out["eta_best"], out["t_target_best"] = etas[best], t_target[best]
    same = etas.index(ETA_SAME) if ETA_SAME in etas else -1
    out["t_target_same"] = t_target[same] if same >= 0 and stable[same] else np.nan
    if p["check"]:  # the quadrature's effect on t_target: another seed
        for name, eta in (("same", ETA_SAME), ("best", out["eta_best"])):
            if name == "best" and eta == ETA_SAME:
                out["t_target_best_check"] = out["t_target_same_check"]
            elif np.isfinite(out[f"t_target_{name}"]):
                out[f"t_target_{name}_check"] = _dynamics_run(
                    setting, K, norm, float(eta), alpha_grid(cfg, float(eta), setting),
                    seed=1)[0]
    a, p_, s = _escape(setting, K, norm, ETA_SAME, alpha_grid(cfg, ETA_SAME, setting))
    out.update(alpha_escape_same=a, escape_plateau_same=p_, escape_status_same=s)
    if np.isfinite(out["eta_best"]):
        a, p_, s = _escape(setting, K, norm, float(out["eta_best"]),
                           alpha_grid(cfg, float(out["eta_best"]), setting))
    else:
        a, p_, s = np.nan, "", "not computed: no stable eta on the grid"
    out.update(alpha_escape_best=a, escape_plateau_best=p_, escape_status_best=s)
    out["seconds"] = time.time() - t0
    return out


_CASE_FLOATS = ("lambda_min", "lambda_max", "eps_plateau_hessian", "eta_max", "eta_max_upper",
                "eta_best", "t_target_same", "t_target_best", "t_target_same_check",
                "t_target_best_check", "alpha_escape_same", "alpha_escape_best", "seconds")
_CASE_STRINGS = ("hessian_status", "escape_plateau_same", "escape_status_same",
                 "escape_plateau_best", "escape_status_best")


def _cluster(workers: int) -> tuple[Any, Any]:
    """A Dask LocalCluster of single-threaded worker processes (as the sweeps' own,
    :mod:`framework.sweep.execute`), shared by every sweep and job of the run."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=":0", silence_logs=logging.CRITICAL,
                           preload=["framework.sweep._worker"])
    try:
        return Client(cluster), cluster
    except BaseException:
        cluster.close()
        raise


def bn_speedup(out: Path, quick: bool = False, workers: int = 2,
               config: dict[str, Any] | None = None) -> int:
    """Run the comparison on a Dask cluster of ``workers`` processes; write the dataset,
    the table and the figures into ``out``. ``config`` overrides entries of the settings
    (tests)."""
    t0 = time.time()
    cfg = {**_settings(quick), **(config or {})}
    keys = tuple(cfg["settings"])
    plans = {key: plan(cfg, key) for key in keys}
    Ks = tuple(sorted({K for p in plans.values() for K in p["Ks"]}))
    used = {n for p in plans.values() for n in p["normalizations"]}
    names = tuple(n for n in (*NORMALIZATIONS, *MEAN_NORMALIZATIONS) if n in used) + tuple(
        sorted(used - {*NORMALIZATIONS, *MEAN_NORMALIZATIONS}))
    etas = tuple(sorted({e for p in plans.values() for e in p["etas"]}))
    grid = full_grid(cfg)
    nS, nK, nN, nE = len(keys), len(Ks), len(names), len(etas)
    eps = np.full((nS, nK, nN, nE, len(grid)), np.nan)
    t_target = np.full((nS, nK, nN, nE), np.nan)
    stable = np.zeros((nS, nK, nN, nE), dtype=bool)
    outcomes = np.full((nS, nK, nN, nE), "not computed", dtype=object)
    eps_end = np.full((nS, nK, nN, nE), np.nan)
    case = {k: np.full((nS, nK, nN), np.nan) for k in _CASE_FLOATS}
    case_s = {k: np.full((nS, nK, nN), "not computed", dtype=object) for k in _CASE_STRINGS}
    bounded = np.zeros((nS, nK, nN), dtype=bool)
    computed = np.zeros((nS, nK, nN), dtype=bool)
    interrupted = False
    client, cluster = _cluster(workers)
    futures: dict[tuple[int, int, int], Any] = {}
    try:
        # 1. t_target(eta): one Sweep per setting and horizon over K x normalization x
        # eta (the setting's plan), on Dask, one point per Dask task; 2. as soon as a
        # setting's sweeps are done, its entries (Hessian, eta_max, eta_best, escapes)
        # are submitted as Dask jobs, which fill the workers while the next setting's
        # sweeps run. The expensive non-centred settings first.
        for s in sorted(range(nS), key=lambda i: inputs_of(keys[i]).centred):
            key = keys[s]
            ts = time.time()
            p = plans[key]
            ks = [Ks.index(K) for K in p["Ks"]]
            ns = [names.index(n) for n in p["normalizations"]]
            for k, n in ((k, n) for k in ks for n in ns):
                computed[s, k, n] = True
                for j, e in enumerate(etas):
                    if e not in p["etas"]:
                        outcomes[s, k, n, j] = "not computed: eta not on this setting's grid"
            groups: dict[int, list[int]] = {}
            for eta in p["etas"]:
                groups.setdefault(len(alpha_grid(cfg, eta, key)), []).append(etas.index(eta))
            for n_grid, js in groups.items():
                sub = grid[:n_grid]
                base = experiment(key, p["Ks"][0], p["normalizations"][0], etas[js[0]],
                                  [dynamics_spec(key, sub.tolist())])
                res = Sweep(base, {"K": list(p["Ks"]), "normalization": list(p["normalizations"]),
                                   "eta": [etas[j] for j in js]}).run(
                    scheduler=client, progress=False, points_per_task=1)
                d = res["dynamics"].transpose("K", "normalization", "eta", "alpha", ...)
                failed = d.sweep_failed.values.astype(bool)
                for idx in np.ndindex(len(ks), len(ns), len(js)):
                    at = (s, ks[idx[0]], ns[idx[1]], js[idx[2]])
                    if failed[idx]:
                        outcomes[at] = f"failed: {d.sweep_error.values[idx]}"
                        continue
                    e = d.eps_g.values[idx]
                    eps[at][:n_grid] = e
                    eps_end[at] = e[-1]
                    t_target[at] = time_to_target(sub, e)
                    outcomes[at] = outcome(e, bool(d.diverged.values[idx]),
                                           bool(d.runaway.values[idx]))
                    stable[at] = outcomes[at] == "stable"
            n_points = len(p["Ks"]) * len(p["normalizations"]) * len(p["etas"])
            print(f"sweep {key}: {n_points} points in {time.time() - ts:.1f} s "
                  f"({len(futures)} entries submitted before it)", flush=True)
            je = [etas.index(e) for e in p["etas"]]
            for k, n in ((k, n) for k in ks for n in ns):
                futures[(s, k, n)] = client.submit(
                    _case, key, Ks[k], names[n], [etas[j] for j in je],
                    t_target[s, k, n, je].tolist(), stable[s, k, n, je].tolist(), cfg,
                    pure=False, priority=-1)  # after the sweeps' points already queued
        from distributed import as_completed

        where = {f.key: idx for idx, f in futures.items()}
        for fut in as_completed(list(futures.values())):
            s, k, n = where[fut.key]
            r = fut.result()
            for name in _CASE_FLOATS:
                case[name][s, k, n] = r[name]
            for name in _CASE_STRINGS:
                case_s[name][s, k, n] = r[name]
            bounded[s, k, n] = r["eta_max_bounded"]
            print(f"{keys[s]} K={Ks[k]} {names[n]}: {r['seconds']:.1f} s "
                  f"(hessian {r['hessian_status'][:60]})", flush=True)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        client.close()
        cluster.close()
    ds = _dataset(cfg, keys, Ks, names, etas, grid, eps, t_target, stable,
                  (outcomes, eps_end), case, case_s, (bounded, computed), quick,
                  time.time() - t0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if save_run(ds, out / "bn_speedup.nc", interrupted):
        return 130
    table = table_markdown(ds)
    from framework.io import write_atomic

    write_atomic(out / "bn_speedup.md", [_markdown(ds, table).encode()])
    _figures(ds, out)
    print(table)
    print(f"wrote {out / 'bn_speedup.nc'}, bn_speedup.md and figures in "
          f"{time.time() - t0:.0f} s")
    return 0


def _var(data: Any, dims: tuple[str, ...], long_name: str, units: str = "1") -> xr.DataArray:
    return xr.DataArray(data, dims=dims, attrs={"long_name": long_name, "units": units})


def _dataset(cfg: dict[str, Any], keys: tuple[str, ...], Ks: tuple[int, ...],
             names: tuple[str, ...], etas: tuple[float, ...], grid: np.ndarray,
             eps: np.ndarray, t_target: np.ndarray, stable: np.ndarray,
             runs: tuple[np.ndarray, np.ndarray], case: dict[str, np.ndarray],
             case_s: dict[str, np.ndarray], flags: tuple[np.ndarray, np.ndarray],
             quick: bool, seconds: float) -> xr.Dataset:
    bounded, computed = flags
    dims = ("setting", "K", "normalization")
    dims_e = (*dims, "eta")
    levels = max(inputs_of(k).L for k in keys)
    lam = np.full((len(keys), levels), np.nan)
    frac = np.full((len(keys), levels), np.nan)
    for s, k in enumerate(keys):
        inp = inputs_of(k)
        lam[s, :inp.L], frac[s, :inp.L] = inp.eigenvalues, inp.fractions
    label = dict(SETTINGS)
    v = case
    curves = np.full((*eps.shape[:3], 2, eps.shape[-1]), np.nan)
    for idx in np.ndindex(*eps.shape[:3]):
        if ETA_SAME in etas:
            curves[(*idx, 0)] = eps[(*idx, etas.index(ETA_SAME))]
        if np.isfinite(case["eta_best"][idx]):
            curves[(*idx, 1)] = eps[(*idx, etas.index(float(case["eta_best"][idx])))]
    data = {
        "eps_g": _var(curves, (*dims, "run", "alpha"), "generalization error of the "
                      f"dynamics (ODE) run from the common init at eta = {ETA_SAME} (run "
                      "'same') and at eta_best (run 'best'); NaN: no such run"),
        "t_target": _var(t_target, dims_e, f"first alpha with eps_g < {TARGET:g} "
                         "(log-linear interpolation; NaN: not reached within "
                         "alpha_horizon)"),
        "stable": _var(stable, dims_e, f"eps_g < {TARGET:g} reached within alpha_horizon, "
                       "no divergence or runaway, and still below it at alpha_horizon"),
        "alpha_horizon": _var([[alpha_grid(cfg, e, k)[-1] for e in etas] for k in keys],
                              ("setting", "eta"), "last alpha of the runs at eta (their "
                              "horizon)"),
        "outcome": _var(runs[0].astype(str), dims_e, "stable, diverged, runaway, left the "
                        "target (reached, above it at the horizon), not reached, "
                        "failed: the sweep point's error, or not computed (not in the "
                        "setting's plan)"),
        "eps_g_horizon": _var(runs[1], dims_e, "eps_g at the run's horizon"),
        "lambda_min": _var(v["lambda_min"], dims, "smallest eigenvalue of the weight-space "
                           f"Hessian of eps_g at the plateau fixed point at eta = {ETA_SAME}"),
        "lambda_max": _var(v["lambda_max"], dims, "largest eigenvalue of the weight-space "
                           f"Hessian of eps_g at the plateau fixed point at eta = {ETA_SAME}"),
        "eps_plateau": _var(v["eps_plateau_hessian"], dims, "eps_g at that plateau"),
        "hessian_status": _var(case_s["hessian_status"].astype(str), dims,
                               "ok, or why lambda_min/lambda_max are missing"),
        "eta_max": _var(v["eta_max"], dims, "largest stable learning rate: largest stable "
                        "eta found (grid, then bisection in log eta); a lower bound where "
                        "eta_max_bounded is False"),
        "eta_max_upper": _var(v["eta_max_upper"], dims, "smallest unstable eta found above "
                              "eta_max (NaN: every grid eta is stable)"),
        "eta_max_bounded": _var(bounded, dims, "an unstable eta was found above eta_max"),
        "eta_best": _var(v["eta_best"], dims, "stable grid eta with the smallest t_target"),
        "t_target_same": _var(v["t_target_same"], dims, f"t_target at eta = {ETA_SAME}"),
        "t_target_best": _var(v["t_target_best"], dims, "t_target at eta_best"),
        "t_target_same_check": _var(v["t_target_same_check"], dims, "t_target_same "
                                    "again with quadrature seed 1 (generic engine: its "
                                    "difference to t_target_same estimates the "
                                    "quadrature's effect; NaN: closed form or no run)"),
        "t_target_best_check": _var(v["t_target_best_check"], dims, "the same for "
                                    "t_target_best"),
        "computed": _var(computed, dims, "the entry is in its setting's plan (K, "
                         "normalization); False: every value of it is NaN / not computed"),
        "alpha_escape_same": _var(v["alpha_escape_same"], dims, "escape time from the "
                                  f"common init at eta = {ETA_SAME}: first alpha with eps_g "
                                  "< eps_plateau / 2 (escape analyzer, start='init')"),
        "alpha_escape_best": _var(v["alpha_escape_best"], dims, "the same at eta_best"),
        "escape_plateau_same": _var(case_s["escape_plateau_same"].astype(str), dims,
                                    "plateau defining the escape threshold: gradient_flow "
                                    "or eta (where gradient flow has none)"),
        "escape_plateau_best": _var(case_s["escape_plateau_best"].astype(str), dims,
                                    "the same at eta_best"),
        "escape_status_same": _var(case_s["escape_status_same"].astype(str), dims,
                                   "ok, or why alpha_escape_same is missing"),
        "escape_status_best": _var(case_s["escape_status_best"].astype(str), dims,
                                   "ok, or why alpha_escape_best is missing"),
        "entry_seconds": _var(v["seconds"], dims, "wall time of the entry's Hessian, "
                              "bisection and escape runs", "s"),
        "input_eigenvalue": _var(lam, ("setting", "level"), "eigenvalues of the input "
                                 "covariance (NaN: padding)"),
        "input_fraction": _var(frac, ("setting", "level"), "fraction of the N directions "
                               "in each eigenspace (NaN: padding)"),
        "input_mean": _var([inputs_of(k).mean for k in keys], ("setting",), "size m = |mu| "
                           "of the input mean (0: centred)"),
        "input_mean_direction": _var([float(inputs_of(k).direction[0]) if not
                                      inputs_of(k).centred else 0.0 for k in keys],
                                     ("setting",), "teacher overlap s_n = B_n.u/sqrt(N) "
                                     "with the mean direction u (every unit)"),
        "eps_g_floor": _var([[eps_g_floor(k, int(K)) for K in Ks] for k in keys],
                            ("setting", "K"), "lower bound of eps_g for a student output "
                            "of mean zero (normalizations that centre without a trainable "
                            "shift: batchnorm, batchnorm_stopgrad, meanonly): (sum_n "
                            "erf(m s_n / 2))^2 / 2"),
        "engine": _var(["generic (quadrature): " + str(QUADRATURE_MEAN) if not
                        inputs_of(k).centred else "closed form" for k in keys],
                       ("setting",), "theory engine of the setting's runs"),
    }
    coords = {
        "setting": ("setting", list(keys), {"long_name": "input setting", "units": "1"}),
        "setting_label": ("setting", [label[k] for k in keys],
                          {"long_name": "input setting (description)", "units": "1"}),
        "K": ("K", list(Ks), {"long_name": "student units K (= teacher units M)",
                              "units": "1"}),
        "normalization": ("normalization", list(names),
                          {"long_name": "normalization", "units": "1"}),
        "eta": ("eta", list(etas), {"long_name": "learning rate of the sweep", "units": "1"}),
        "alpha": ("alpha", grid, {"long_name": "examples per input dimension (report grid)",
                                  "units": "1"}),
        "run": ("run", ["same", "best"], {"long_name": f"eta of the eps_g curve: eta = "
                                          f"{ETA_SAME} or eta_best", "units": "1"}),
        "level": ("level", np.arange(levels), {"long_name": "input eigenspace", "units": "1"}),
    }
    attrs = {
        **convention_attrs(Experiment(TeacherStudent(2, 2))),
        "command": COMMAND + (" --quick" if quick else ""),
        "quick": int(quick),
        "init": "Experiment random init, seed 0, init_N 1000, init_scale 1: the same (Q, R) "
        "for every normalization and setting, spread over the eigenspaces in proportion "
        "to their size (InputDistribution.lift)",
        "target": TARGET,
        "eta_same": ETA_SAME,
        "alpha_horizon_rule": f"a run at eta ends at the last report-grid point <= "
        f"clip({HORIZON_ETA_ALPHA:g} / eta, {HORIZON_CLIP[0]:g}, {HORIZON_CLIP[1]:g}), "
        f"non-centred inputs clip({HORIZON_ETA_ALPHA:g} / eta, {HORIZON_CLIP_MEAN[0]:g}, "
        f"{HORIZON_CLIP_MEAN[1]:g}) (variable alpha_horizon)",
        "stability_rule": f"eps_g < {TARGET:g} within alpha_horizon, not diverged, "
        "not runaway, and eps_g < target at alpha_horizon",
        "eta_max_rule": "largest stable grid eta; if the next grid eta is unstable, "
        f"{cfg['bisection_steps']} bisection steps in log eta between them "
        f"({cfg['mean']['bisection_steps']} for non-centred inputs)",
        "eta_best_rule": "the stable grid eta minimizing t_target",
        "escape_rule": "escape analyzer, start='init', plateau='gradient_flow' (or 'eta' "
        "where gradient flow has no plateau or the generic engine refuses its fixed "
        "points): first alpha with eps_g < eps_plateau / 2 (stop_at_escape: the run "
        "ends at the first grid point below it)",
        "quadrature_mean": f"non-centred inputs: generic engine with quadrature "
        f"{QUADRATURE_MEAN}; t_target_*_check: the same runs with quadrature seed 1",
        "hessian_rule": f"hessian analyzer at the plateau fixed point at eta = {ETA_SAME}; "
        "W = J / sqrt(N); scale-invariant normalizations at weight norm 1 (lambda ~ 1 / "
        "weight norm)",
        "sweep": "t_target from one framework.sweep.Sweep per setting and horizon over K "
        "x normalization x eta on a Dask LocalCluster (one point per Dask task); the "
        "per-entry runs as Dask jobs, submitted when their setting's sweeps are done",
        "setting_d": SETTING_D,
        "etas_centred": np.asarray(cfg["etas"], dtype=float),
        "etas_mean": np.asarray(cfg["mean"]["etas"], dtype=float),
        "runtime_seconds": float(seconds),
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.{digits}g}"


def _with_check(value: float, check: float) -> str:
    """``value`` and, where a check run exists, ``± |value - check|``."""
    if not np.isfinite(value) or not np.isfinite(check):
        return _fmt(value, 4)
    return f"{value:.4g} ± {abs(value - check):.2g}"


def _not_reached(r: xr.Dataset) -> str:
    """The note of an entry that reaches the target at no eta: eps_g at the horizons."""
    ran = [(float(e), float(x)) for e, x, o in zip(r.eta.values, r.eps_g_horizon.values,
                                                     r.outcome.values, strict=True)
           if np.isfinite(x) and str(o) == "not reached"]
    if not ran:
        return ""
    lo = min(ran, key=lambda t: t[1])
    return (f"eps_g < {TARGET:g} not reached at any eta; eps_g at the horizon "
            + ", ".join(f"{x:.3g} (eta={e:g})" for e, x in ran)
            + f"; lowest {lo[1]:.3g}")


def table_markdown(ds: xr.Dataset) -> str:
    """One row per computed (setting, K, normalization)."""
    head = ("| setting | K | normalization | lambda_min | lambda_max | eta_max | "
            f"alpha_esc (eta={ETA_SAME:g}) | t_1e-3 (eta={ETA_SAME:g}) | eta_best | "
            "alpha_esc (eta_best) | t_1e-3 (eta_best) | notes |")
    lines = [head, "|" + "---|" * 12]
    for key in ds.setting.values:
        for K in ds.K.values:
            for n in ds.normalization.values:
                r = ds.sel(setting=key, K=K, normalization=n)
                if not bool(r.computed):
                    continue
                em = float(r.eta_max)
                eta_max = ("n/a" if not np.isfinite(em) else
                           f"{em:.3g}" if bool(r.eta_max_bounded) else f">= {em:.3g}")
                notes = list(dict.fromkeys(  # distinct, in order
                    str(r[k].values) for k in ("hessian_status", "escape_status_same",
                                               "escape_status_best")
                    if str(r[k].values) != "ok"))
                if any(str(r[f"escape_plateau_{w}"].values) == "eta"
                       and np.isfinite(float(r[f"alpha_escape_{w}"]))
                       for w in ("same", "best")):  # of an escape time in the row
                    notes.append("escape threshold: plateau at eta")
                if not np.isfinite(em) and _not_reached(r):
                    notes.insert(0, _not_reached(r))
                    if float(r.eps_g_floor) > 0 and n in CENTRING_WITHOUT_SHIFT:
                        notes.insert(1, f"output of mean 0: eps_g >= "
                                     f"{float(r.eps_g_floor):.3g}")
                lines.append(
                    f"| {key} | {int(K)} | {n} | {_fmt(float(r.lambda_min), 4)} | "
                    f"{_fmt(float(r.lambda_max), 4)} | {eta_max} | "
                    f"{_fmt(float(r.alpha_escape_same), 4)} | "
                    f"{_with_check(float(r.t_target_same), float(r.t_target_same_check))} | "
                    f"{_fmt(float(r.eta_best))} | "
                    f"{_fmt(float(r.alpha_escape_best), 4)} | "
                    f"{_with_check(float(r.t_target_best), float(r.t_target_best_check))} | "
                    + "; ".join(x[:160] for x in notes) + " |")
    return "\n".join(lines)


def _markdown(ds: xr.Dataset, table: str) -> str:
    a = ds.attrs
    return (
        "# Batch normalization with structured inputs (issue 14, item 5)\n\n"
        f"Generated by `{a['command']}` in {a['runtime_seconds']:.0f} s. "
        f"Initial condition: {a['init']}. t_1e-3: first alpha with eps_g < {TARGET:g}. "
        f"Stable: {a['stability_rule']} ({a['alpha_horizon_rule']}). "
        f"eta_max: {a['eta_max_rule']} ('>=': every grid eta stable, a lower bound). "
        f"eta_best: {a['eta_best_rule']} (grid {_etas(a['etas_centred'])}; non-centred "
        f"inputs {_etas(a['etas_mean'])})."
        f" alpha_esc: {a['escape_rule']}. lambda_min, lambda_max: {a['hessian_rule']}. "
        f"{a['setting_d']} {a['quadrature_mean']} (± in the table: the difference).\n\n"
        + table + "\n")


def _etas(values: Any) -> str:
    return ", ".join(f"{float(e):g}" for e in np.atleast_1d(values))


def _figures(ds: xr.Dataset, out: Path) -> None:
    """t_target against eta per setting, and eps_g(alpha) at ETA_SAME and eta_best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    nS = ds.sizes["setting"]
    styles = ("-", "--", ":")
    fig, axes = plt.subplots(1, nS, figsize=(4.2 * nS, 4.2), squeeze=False, sharey=True)
    for s, key in enumerate(ds.setting.values):
        ax = axes[0, s]
        for n, name in enumerate(ds.normalization.values):
            for k, K in enumerate(ds.K.values):
                r = ds.sel(setting=key, normalization=name, K=K)
                if not bool(r.computed):
                    continue
                t = np.where(r.stable.values, r.t_target.values, np.nan)
                ran = np.isfinite(t)  # a line through the stable etas of the plan
                ax.plot(ds.eta.values[ran], t[ran], color=f"C{n}", ls=styles[k % 3],
                        marker="o", ms=3, label=f"{name} K={int(K)}")
                if np.isfinite(float(r.eta_max)) and bool(r.eta_max_bounded):
                    ax.axvline(float(r.eta_max), color=f"C{n}", ls=styles[k % 3], lw=0.7)
        ax.set(xscale="log", yscale="log", xlabel="eta", title=str(key))
        ax.legend(fontsize=7)
        ax.set_xticks([float(e) for e in ds.eta.values],
                      [f"{float(e):g}" for e in ds.eta.values])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes[0, 0].set_ylabel(f"alpha to eps_g < {TARGET:g} (stable runs)")
    fig.suptitle("time to learn against eta (vertical lines: eta_max where bounded)")
    fig.tight_layout()
    fig.savefig(out / "bn_speedup_time.png", dpi=100)
    plt.close(fig)

    K = ds.K.values[0]
    fig, axes = plt.subplots(1, nS, figsize=(4.2 * nS, 4.2), squeeze=False, sharey=True)
    alpha = ds.alpha.values
    for s, key in enumerate(ds.setting.values):
        ax = axes[0, s]
        for n, name in enumerate(ds.normalization.values):
            r = ds.sel(setting=key, normalization=name, K=K)
            if not bool(r.computed):
                continue
            if ETA_SAME in ds.eta.values:
                ax.plot(alpha[1:], r.eps_g.sel(run="same").values[1:], color=f"C{n}",
                        label=f"{name}, eta={ETA_SAME:g}")
            eb = float(r.eta_best)
            if np.isfinite(eb):
                ax.plot(alpha[1:], r.eps_g.sel(run="best").values[1:], color=f"C{n}",
                        ls="--", label=f"{name}, eta_best={eb:.3g}")
        ax.axhline(TARGET, color="k", lw=0.5)
        floor = float(ds.eps_g_floor.sel(setting=key, K=K))
        if floor > 0:
            ax.axhline(floor, color="k", lw=0.5, ls=":",
                       label="floor without a shift")
        ax.set(xscale="log", yscale="log", xlabel="alpha", title=f"{key}, K = {int(K)}",
               ylim=(1e-6, 1.0))
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("eps_g")
    fig.tight_layout()
    fig.savefig(out / "bn_speedup_eps_g.png", dpi=100)
    plt.close(fig)


@hookimpl
def symphase_register_reproductions(registry: Any) -> None:
    registry.add_reproduction(
        NAME, bn_speedup,
        "issue 14: plain vs batch normalization on isotropic and structured input spectra "
        "(Hessian at the plateau, largest stable eta, escape and time to eps_g = 1e-3 at "
        "the same and at the best eta)",
    )
