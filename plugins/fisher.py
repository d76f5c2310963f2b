"""The ``fisher`` analyzer: the exact spectrum of the population Fisher in weight space.

At the fixed points of the symmetric subspace (the ``fixedpoint`` branches, the plateau
flagged), at given order parameters (``at``) or along the ODE trajectory from the
Experiment's init (``alpha``). The mathematics is
:func:`framework.theory.fisher.weight_space_fisher` (definition, the span / complement
reduction and its multiplicities); this module only lays the result out like the
``hessian`` analyzer's (dimensions ``eigen`` with a ``multiplicity`` and a ``block``).

Conventions (stored as attrs): ``F = E[grad sigma grad sigma^T]`` of the student output
under unit-variance Gaussian output noise (the model's ``noise`` does not rescale it),
in the Hessian's coordinates ``W = J / sqrt(N)`` (``F_W = N F_J``) plus the trainable
parameters with plain derivatives; at a realizable zero-error point ``F`` equals the
Hessian of ``eps_g`` (Gauss-Newton). For a scale-invariant normalization (batchnorm)
``F(c W) = F(W) / c^2``: the weight norm is a coordinate.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import numpy as np
import xarray as xr

from framework import Experiment, SpecificationError, theory
from framework.datasets import order_parameter_variables, variable
from framework.theory import equilibrium as eq
from framework.theory import fisher as fi
from framework.validators import boolean, to_bool
from plugins.equilibrium import (
    READOUT_SCALING,
    RULE_INDEPENDENT,
    _branches,
    _common_attrs,
    _engine,
    _engine_attrs,
    _landscape_engine,
    _no_branches,
    _option,
    _param_name,
    _PointSpectrum,
    _resolve_eta,
)

MULTIPLICITY_FORMULA = (
    "span eigenvalues: 1 each (K dim_span + K n_theta of them); complement eigenvalues: "
    "N - dim_span each (K of them); dim_span = rank Q (the span of the student vectors; "
    "the teacher plays no part); the multiplicities sum to K N + K n_theta"
)


@attrs.frozen
class FisherAnalyzer(_PointSpectrum):
    """Exact spectrum of the population Fisher of the student output in ``(W, theta)``:
    ``F = E_xi[grad sigma grad sigma^T]`` under unit-variance Gaussian output noise (the
    model's ``noise`` does not rescale it), the span block (each eigenvalue once) and the
    complement ``E[b b^T]`` (each ``N - rank Q`` times), at the fixed points, at ``at``
    or along the trajectory (``alpha``); equal to the Hessian at a realizable zero-error
    point (Gauss-Newton).

    Coordinates ``W = J / sqrt(N)``, trainable parameters and a trained readout with
    plain derivatives, as in ``hessian``; the spectrum is exact for every ``N``
    (:func:`framework.theory.fisher.weight_space_fisher`). Reported: every distinct
    eigenvalue with its multiplicity at ``N`` and its block (``span``: once each;
    ``complement``: ``N - dim_span`` times each), ``lambda_min`` and ``lambda_max`` with
    theirs, and the complement matrix ``E[b b^T]`` (``b = d sigma / d x``).

    Where: at every branch of ``fixedpoint`` (default; the plateau flagged), at the
    order parameters ``at``, or along the ODE trajectory from the Experiment's init on
    the grid ``alpha`` (the ``dynamics`` integration at ``eta``; dimension ``alpha``
    instead of ``branch``).

    Parameters
    ----------
    eta, second_order, subspace, flag_plateau
        As for ``fixedpoint`` (which branches; ``eta = 0``: gradient-flow fixed points);
        ``eta`` and ``second_order`` also set the trajectory's ODE.
    weight_norm : float or sequence of float, optional
        Scale-invariant normalizations only: the weight norm(s) ``Q_ii`` of the fixed
        points (default 1); a sequence adds a ``weight_norm`` dimension.
    N : int, optional
        Input dimension for ``multiplicity`` (default: the Experiment's ``init_N``).
    at : OrderParameters, optional
        Evaluate at these order parameters (one branch, no fixed-point search).
    alpha : sequence of float, optional
        Evaluate along the trajectory on this grid (not with ``at`` or ``weight_norm``).
    landscape : bool
        False (default): the gradient the normalization passes (through its statistics
        only if ``statistics_gradient``); True: the gradient of the output function
        (the Gauss-Newton part of the loss landscape's Hessian) for a stop-gradient
        normalization too.
    rtol, atol : float
        Tolerances of the trajectory's integrator (as ``dynamics``'s).
    quadrature : mapping, optional
        Generic engine only: :class:`framework.theory.Quadrature` options.
    """

    name: ClassVar[str] = "fisher"
    description: ClassVar[str] = "exact weight-space Fisher spectrum of the output (any N)"
    size_options: ClassVar[dict[str, str]] = {}
    #: The Fisher does not depend on the rule; the points where it is evaluated do.
    supports_learning_rules: ClassVar[bool] = True

    alpha: tuple[float, ...] | None = _option("alpha")
    flag_plateau: bool = _option("flag_plateau")
    landscape: bool = attrs.field(default=False, converter=to_bool, validator=boolean())
    rtol: float = _option("rtol")
    atol: float = _option("atol")
    quadrature: dict | None = _option("quadrature")

    def __attrs_post_init__(self) -> None:
        if self.alpha is not None and self.at is not None:
            raise SpecificationError(
                "'alpha' (along the trajectory) and 'at' (one point) exclude each other, "
                f"got alpha={list(self.alpha)!r} and at={self.at!r}")
        if self.alpha is not None and self.weight_norm is not None:
            raise SpecificationError(
                "'weight_norm' applies to fixed points, not along a trajectory ('alpha'), "
                f"got {self.weight_norm!r}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["alpha"] = None if self.alpha is None else list(self.alpha)
        return out

    def check(self, experiment: Experiment) -> None:
        model = experiment.model
        self._check_point(experiment)
        if self.alpha is not None:
            theory.check_horizon(np.asarray(self.alpha), _resolve_eta(self.eta, experiment),
                                 model.layers().eta_v)
        elif self.at is None:
            eq.symmetric_subspace(model, self.subspace)

    def run(self, experiment: Experiment) -> xr.Dataset:
        eta = _resolve_eta(self.eta, experiment)
        N = experiment.init_N if self.N is None else int(self.N)
        if self.alpha is not None:
            return self._trajectory(experiment, eta, N)
        return self._per_weight_norm(lambda q: self._points(experiment, eta, N, q))

    # -- where ----------------------------------------------------------------------------
    def _points(self, experiment: Experiment, eta: float, N: int, q: float | None
                ) -> xr.Dataset:
        model, norm = experiment.model, experiment.normalization
        invariant = eq.scale_invariance(model, norm) == "unit"
        if self.at is not None:
            eng = _engine(experiment, self.quadrature)
            Q, R = np.array(self.at.Q), np.array(self.at.R)
            if invariant and q is not None:
                Q, R = eq.rescale_weight_norm(Q, R, q)
            points, params, plateau = [(Q, R)], [eng.params()], -1
            eps = [eng.generalization_error(Q, R)[0]]
            source = "given order parameters ('at')"
        else:
            br = _branches(experiment, eta, self.second_order, self.subspace, q,
                           self.flag_plateau, self.quadrature)
            if not br.points:
                raise _no_branches(experiment)
            eng = br.engine
            points = [(fp.Q, fp.R) for fp in br.points]
            params = [eng.params(fp.params or None) for fp in br.points]
            plateau, eps = br.plateau, [fp.eps_g for fp in br.points]
            source = "fixed points of the symmetric subspace ('fixedpoint' branches)"
        specs = [fi.weight_space_fisher(model, norm, Q, p, landscape=self.landscape,
                                        engine=_landscape_engine(eng))
                 for (Q, _), p in zip(points, params, strict=True)]
        ds = _spectrum_dataset(experiment, eng, specs, points, eps, N, "branch", np.arange(
            len(specs)), {"long_name": "fixed-point branch", "units": "1"})
        ds["is_plateau"] = variable(np.arange(len(specs)) == plateau, ("branch",),
                                    "the plateau branch (attr plateau_rule)")
        ds.attrs.update({**_common_attrs(experiment, eta, self.second_order),
                         "evaluated_at": source, "plateau_branch": int(plateau),
                         "plateau_rule": eq.PLATEAU_RULE, **_fisher_attrs(experiment, eng,
                                                                          specs, N)})
        wn = [float(np.mean(np.diagonal(Q))) for Q, _ in points]
        if invariant and (q is not None or self.at is None):
            return ds.assign_coords(weight_norm=((), 1.0 if q is None else float(q), {
                "long_name": "weight norm Q_ii = |W_i|^2 at which the Fisher is evaluated",
                "units": "1"}))
        return ds.assign_coords(weight_norm=("branch", wn, {
            "long_name": "weight norm Q_ii = |W_i|^2 (mean over students) of the point",
            "units": "1"}))

    def _trajectory(self, experiment: Experiment, eta: float, N: int) -> xr.Dataset:
        model, norm = experiment.model, experiment.normalization
        eng = _engine(experiment, self.quadrature)
        grid = np.asarray(self.alpha)
        traj = theory.integrate(
            model, norm, experiment.initial_order_parameters(), eta=eta,
            batch_size=experiment.batch_size, alpha=grid, rtol=self.rtol, atol=self.atol,
            second_order=self.second_order, quadrature=self.quadrature,
            rule=experiment.learning_rule)
        n = traj.alpha.size
        params = [eng.params({k: v[j] for k, v in traj.params.items()} or None)
                  for j in range(n)]
        specs = [fi.weight_space_fisher(model, norm, traj.Q[j], params[j],
                                        landscape=self.landscape,
                                        engine=_landscape_engine(eng))
                 for j in range(n)]
        points = [(traj.Q[j], traj.R[j]) for j in range(n)]
        ds = _spectrum_dataset(experiment, eng, specs, points, list(traj.eps_g), N, "alpha",
                               traj.alpha, {"long_name": "alpha = steps / N", "units": "1"})
        ds["weight_norm"] = variable([float(np.mean(np.diagonal(Q))) for Q, _ in points],
                                     ("alpha",), "weight norm Q_ii = |W_i|^2 (mean over "
                                     "students)")
        ds.attrs.update({**_common_attrs(experiment, eta, self.second_order),
                         "evaluated_at": "along the ODE trajectory from the experiment's init "
                         f"(rtol {self.rtol:g}, atol {self.atol:g})",
                         "trajectory_diverged": int(traj.diverged),
                         "trajectory_message": traj.message,
                         **_fisher_attrs(experiment, eng, specs, N)})
        return ds


# --------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------


def _spectrum_dataset(experiment: Experiment, eng: Any, specs: list, points: list,
                      eps: list, N: int, dim: str, coord: Any, coord_attrs: dict
                      ) -> xr.Dataset:
    """The eigenvalues with multiplicities at ``N`` per point (leading dimension ``dim``)."""
    K, M = experiment.model.K, experiment.model.M
    if N < max(s.dim_span for s in specs):
        raise SpecificationError(
            f"'N' must be >= dim_span = {max(s.dim_span for s in specs)} (the rank of Q), "
            f"got {N}")
    n_eigen = max(s.span.size for s in specs) + K
    nb = len(specs)
    values = np.full((nb, n_eigen), np.nan)
    errors = np.full((nb, n_eigen), np.nan)
    mult = np.zeros((nb, n_eigen), dtype=np.int64)
    block = np.full((nb, n_eigen), "", dtype=object)
    lam = {"min": np.empty(nb), "max": np.empty(nb)}
    lam_err = {"min": np.empty(nb), "max": np.empty(nb)}
    lam_mult = {"min": np.zeros(nb, dtype=np.int64), "max": np.zeros(nb, dtype=np.int64)}
    for b, s in enumerate(specs):
        vals, mu = s.multiplicities(N)
        ns = s.span.size
        values[b, :vals.size], mult[b, :vals.size] = vals, mu
        errors[b, :vals.size] = np.concatenate([s.span_error, s.complement_error])
        block[b, :ns], block[b, ns:ns + K] = "span", "complement"
        for which, value, err in (("min", s.lambda_min, s.lambda_min_error),
                                  ("max", s.lambda_max, s.lambda_max_error)):
            lam[which][b], lam_err[which][b] = value, err
            tol = max(1e-9 * max(1.0, abs(value)), 3.0 * err)
            lam_mult[which][b] = int(mu[np.abs(vals - value) <= tol].sum())
    data = {
        **order_parameter_variables(np.array([p[0] for p in points]),
                                    np.array([p[1] for p in points]), dims=(dim,)),
        "eigenvalue": variable(values, (dim, "eigen"),
                               "Fisher eigenvalue w.r.t. (W = J/sqrt(N), theta) (NaN: padding)"),
        "eigenvalue_error": variable(errors, (dim, "eigen"), "error estimate of the "
                                     "eigenvalue (0 up to rounding for the exact engine)"),
        "multiplicity": variable(mult, (dim, "eigen"),
                                 f"multiplicity at N = {N} (span: 1, complement: N - dim_span)"),
        "block": variable(block, (dim, "eigen"),
                          "block: span of the student vectors (with theta), or complement"),
        "dim_span": variable([s.dim_span for s in specs], (dim,),
                             "dim S = rank Q, S = span of the rows of W"),
        "lambda_min": variable(lam["min"], (dim,), "smallest Fisher eigenvalue"),
        "lambda_max": variable(lam["max"], (dim,), "largest Fisher eigenvalue"),
        "lambda_min_error": variable(lam_err["min"], (dim,), "error estimate of lambda_min"),
        "lambda_max_error": variable(lam_err["max"], (dim,), "error estimate of lambda_max"),
        "lambda_min_multiplicity": variable(lam_mult["min"], (dim,),
                                            f"multiplicity of lambda_min at N = {N}"),
        "lambda_max_multiplicity": variable(lam_mult["max"], (dim,),
                                            f"multiplicity of lambda_max at N = {N}"),
        "complement_matrix": variable(np.array([s.complement_matrix for s in specs]),
                                      (dim, "student", "student_"),
                                      "complement block E[b b^T], b = d sigma / d x"),
        "eps_g": variable(eps, (dim,), "generalization error"),
    }
    for k in specs[0].theta_names:
        what = _param_name(k, eng) if k in eng.trainable else f"held parameter {k}"
        data[f"param_{k}"] = variable(np.array([s.params[k] for s in specs]),
                                      (dim, "student"), f"{what} at which the Fisher is "
                                      "evaluated")
    return xr.Dataset(data, coords={
        dim: (dim, np.asarray(coord), coord_attrs), "eigen": np.arange(n_eigen),
        "student": np.arange(K), "student_": np.arange(K), "teacher": np.arange(M)})


def _fisher_attrs(experiment: Experiment, eng: Any, specs: list, N: int) -> dict[str, Any]:
    norm = experiment.normalization
    theta = specs[0].theta_names
    out = {
        **_engine_attrs(experiment, eng),
        "learning_rule_dependence": RULE_INDEPENDENT,
        "N": N,
        "multiplicity_formula": MULTIPLICITY_FORMULA,
        "fisher_definition": fi.FISHER_DEFINITION,
        "fisher_coordinates": "W = J / sqrt(N) (Q = W W^T), as the hessian analyzer's",
        "fisher_method": specs[0].method + "; per-sample gradients from the normalization's "
        "forward/backward in a realization of Q in rank Q dimensions",
        "fisher_statistics_gradient": (
            "included (d sigma / d W through the population statistics)"
            if specs[0].statistics_gradient_included else
            "not included (the normalization passes no gradient through its statistics; "
            "option landscape=True includes it)" if norm.statistics_names else
            "none (no statistics)"),
        "fisher_scaling": "scale-invariant normalization: F(c W) = F(W) / c^2, i.e. "
        "proportional to 1/weight_norm",
        "trainable_parameters_included": (
            "Fisher over (W, theta), theta = " + ", ".join(theta)
            + " (span block; plain derivatives)") if theta else "none",
    }
    if eng.model_trainable:
        out["fisher_readout_scaling"] = READOUT_SCALING.replace("Hessian", "Fisher")
    return out
