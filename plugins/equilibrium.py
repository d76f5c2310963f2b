"""Analyzers of the symmetric (plateau) equilibrium: ``fixedpoint``, ``hessian``, ``escape``.

They work for any normalization of the diagonal-scale family with the erf activation
(closed forms); the mathematics is in :mod:`framework.equilibrium`.

Shared conventions (stored as dataset attrs)
--------------------------------------------
* Learning rate and time as in :func:`framework.convention_attrs`; rates derived from
  the ODE (``jacobian_eigenvalue_*``) are per unit of ``eta * alpha``.
* ``eta`` option: ``None`` means the Experiment's ``eta``; ``eta = 0`` is the
  gradient-flow limit (``eta^2`` term dropped). ``second_order=False`` drops the
  ``eta^2`` term at any ``eta``. Attr ``eta_squared_term`` says whether it was kept.
* Hessian coordinates ``W = J / sqrt(N)`` (so ``Q = W W^T``); weight norm
  ``Q_ii = |W_i|^2``. For scale-invariant normalizations (batchnorm) the Hessian scales
  as ``lambda(c W) = lambda(W) / c^2``, i.e. ``lambda`` is proportional to
  ``1 / weight_norm``; the weight norm is always a coordinate and the normalization's
  parameters (e.g. ``gamma``) are attrs ``normalization_param_*``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import numpy as np
import xarray as xr

from framework import (
    Analyzer,
    Experiment,
    OrderParameters,
    SpecificationError,
    convention_attrs,
    hookimpl,
    theory,
)
from framework import get_activation as framework_get_activation
from framework._validation import check_real, gt, integer, one_of
from framework.theory import equilibrium as eq
from plugins.dynamics import _alpha_tuple, order_parameter_variables, trajectory_dataset

# --------------------------------------------------------------------------------------
# option converters
# --------------------------------------------------------------------------------------


def _optional_eta(value: Any) -> float | None:
    if value is None:
        return None
    return check_real("eta", value, minimum=0.0)


def _optional_positive(name: str):  # type: ignore[no-untyped-def]
    def convert(value: Any) -> float | None:
        if value is None:
            return None
        return check_real(name, value, minimum=0.0, strict=True)

    return convert


def _weight_norms(value: Any) -> float | tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(f"'weight_norm' must be a number or a sequence of numbers, got {value!r}")
    if np.ndim(value) == 0:
        return check_real("weight_norm", value, minimum=0.0, strict=True)
    out = tuple(check_real("weight_norm", v, minimum=0.0, strict=True) for v in np.ravel(value))
    if not out:
        raise SpecificationError("'weight_norm' must not be an empty sequence, got []")
    return out


def _optional_op(value: Any) -> OrderParameters | None:
    if value is None or isinstance(value, OrderParameters):
        return value
    if isinstance(value, Mapping):
        return OrderParameters.from_dict(value)
    raise TypeError(f"'at' must be OrderParameters, a mapping or None, got {value!r}")


def _optional_quadrature(value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"'quadrature' must be a mapping of Quadrature options or None, "
                        f"got {value!r}")
    theory.Quadrature.from_dict(value)  # validates (names the option and value)
    return dict(value)


def _optional_int(name: str, minimum: int):  # type: ignore[no-untyped-def]
    def validate(instance: Any, attribute: Any, value: Any) -> None:
        if value is not None:
            integer(minimum=minimum)(instance, attribute, value)

    return validate


def _var(data: Any, dims: tuple[str, ...], long_name: str, units: str = "1") -> xr.DataArray:
    return xr.DataArray(data, dims=dims, attrs={"long_name": long_name, "units": units})


def _resolve_eta(option: float | None, experiment: Experiment) -> float:
    return experiment.eta if option is None else option


def _check_weight_norm(experiment: Experiment, weight_norm: Any) -> None:
    model, norm = experiment.model, experiment.normalization
    conserving = norm.scale_invariant or (
        eq.needs_generic(model, norm) and eq.scale_invariance(model, norm) != "none")
    if weight_norm is not None and not conserving:
        raise SpecificationError(
            "'weight_norm' applies only to scale-invariant normalizations "
            f"({experiment.normalization.name!r} is not), got {weight_norm!r}"
        )


def _common_attrs(experiment: Experiment, eta: float, second_order: bool) -> dict[str, Any]:
    kept = bool(second_order and eta > 0)
    return {
        **convention_attrs(experiment),
        "eta": eta,
        "eta_experiment": experiment.eta,
        "eta_squared_term": int(kept),
        "eta_meaning": "eta = 0 is the gradient-flow limit (eta^2 term dropped)",
        "rate_units": "rates per unit of eta * alpha (ODE divided by eta)",
        **eq.parameters_attrs(experiment.model, experiment.normalization),
    }


# --------------------------------------------------------------------------------------
# fixed points shared by the three analyzers
# --------------------------------------------------------------------------------------


@attrs.frozen
class _Branches:
    points: list[eq.FixedPoint]
    jacobians: list[np.ndarray]
    eigvals: list[np.ndarray]
    eigvecs: list[np.ndarray]
    plateau: int
    plateau_distance: float


def _branches(
    experiment: Experiment,
    eta: float,
    second_order: bool,
    subspace: str,
    weight_norm: float | None,
    flag_plateau: bool,
    horizon: float,
    quadrature: Any = None,
) -> _Branches:
    model, norm = experiment.model, experiment.normalization
    if eq.needs_generic(model, norm):
        return _branches_generic(experiment, eta, second_order, subspace, weight_norm,
                                 flag_plateau, quadrature)
    points = eq.find_fixed_points(
        model, norm, eta=eta, batch_size=experiment.batch_size, second_order=second_order,
        subspace=subspace, weight_norm=weight_norm,
    )
    jacs, vals, vecs = [], [], []
    for fp in points:  # a handful of branches
        jac = eq.ode_jacobian(model, norm, fp.Q, fp.R, eta=eta,
                              batch_size=experiment.batch_size, second_order=second_order)
        lam, vec = eq.sorted_eigen(jac)
        jacs.append(jac)
        vals.append(lam)
        vecs.append(vec)
    plateau, distance = -1, float("nan")
    if flag_plateau and points:
        unstable = [int(np.sum(lam.real > 1e-9)) for lam in vals]
        plateau, distance = eq.plateau_index(
            model, norm, points, unstable, experiment.initial_order_parameters(), eta=eta,
            batch_size=experiment.batch_size, second_order=second_order, horizon=horizon,
        )
    return _Branches(points, jacs, vals, vecs, plateau, distance)


def _coords(model: Any, invariant: Any) -> list:
    """Jacobian coordinates: ``invariant`` is a bool (closed form) or the normalization
    (generic engine: the invariance is probed and trainable parameters are included)."""
    if isinstance(invariant, (bool, np.bool_)):
        return eq.jacobian_coordinates(model.K, model.M, bool(invariant))
    return eq.generic_jacobian_coordinates(model, invariant)


def _mode_matrices(model: Any, invariant: Any, vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    K, M = model.K, model.M
    coords = _coords(model, invariant)
    dQ, dR = np.zeros((K, K)), np.zeros((K, M))
    v = np.real(vec)
    for value, (kind, i, k) in zip(v, coords, strict=True):  # a few dozen coordinates
        if kind == "Q":
            dQ[i, k] = dQ[k, i] = value
        elif kind == "R":
            dR[i, k] = value
    return dQ, dR


def _unstable_vector(model: Any, invariant: bool, values: np.ndarray,
                     vectors: np.ndarray) -> np.ndarray:
    """The most unstable Jacobian eigenvector; in a degenerate eigenspace the one that
    most increases ``sum_i R_ii`` (every student towards its own teacher: the escape
    inside the matched subspace), the same at every ``eta``."""
    coords = _coords(model, invariant)
    reference = np.array([1.0 if c[0] == "R" and c[1] == c[2] else 0.0 for c in coords])
    return eq.canonical_mode(values.real, vectors, reference)


def _specialized(R: np.ndarray) -> np.ndarray:
    """Per branch: does ``R_in`` differ between students (broken student symmetry)?"""
    return np.max(np.abs(R - R.mean(axis=-2, keepdims=True)), axis=(-2, -1)) > 1e-6


MODE_CLASSES = (
    "classes relative to the students' permutation symmetry (the exchangeable subspace "
    "Q_ii = Q, Q_ik = C, R_in = r_n): symmetric (>= 99% of |(dQ, dR)| inside), "
    "symmetry-breaking (<= 1% inside: students become distinguished, i.e. specialize), "
    "mixed, norm (pure change of the weight norms: zero modes of scale invariance), "
    "complement (out of the span of W and B: changes Q only at second order)"
)


def _no_branches(experiment: Experiment) -> SpecificationError:
    return SpecificationError(
        f"no fixed point found in the symmetric subspace for K={experiment.model.K}, "
        f"M={experiment.model.M}, normalization {experiment.normalization.name!r}"
    )


def _branches_generic(
    experiment: Experiment, eta: float, second_order: bool, subspace: str,
    weight_norm: float | None, flag_plateau: bool, quadrature: Any = None,
) -> _Branches:
    """Fixed points, Jacobians and the plateau with the generic engine.

    The plateau is the unstable branch in the symmetric phase (``R_in`` equal across
    students within 30 times the rate error estimate, bounded below by 1e-6) that is not
    *dead* (:func:`_dead`: ``eps_g`` within 5 error estimates of the best constant
    predictor's, i.e. the student output does not depend on the input, e.g. a gain
    collapsed to 0), with the lowest ``eps_g`` (no trajectory is integrated: that would
    cost a full generic ODE run); among mirror images of equal ``eps_g`` the one with
    non-negative trainable parameters."""
    model, norm = experiment.model, experiment.normalization
    q = quadrature
    points = eq.find_fixed_points_generic(
        model, norm, eta=eta, batch_size=experiment.batch_size, second_order=second_order,
        subspace=subspace, weight_norm=weight_norm, quadrature=q)
    jacs, vals, vecs = [], [], []
    for fp in points:  # a handful of branches
        jac = eq.ode_jacobian_generic(model, norm, fp.Q, fp.R, fp.params, eta=eta,
                                      batch_size=experiment.batch_size,
                                      second_order=second_order, quadrature=q)
        lam, vec = eq.sorted_eigen(jac)
        jacs.append(jac)
        vals.append(lam)
        vecs.append(vec)
    plateau = -1
    if flag_plateau:
        cand = [b for b, fp in enumerate(points)
                if np.max(np.abs(fp.R - fp.R.mean(axis=0))) < max(1e-6, 30.0 * fp.rate_error)
                and vals[b][0].real > 1e-9 and not _dead(model, fp)]
        if cand:  # ties (mirror images, e.g. (g, W) -> (-g, -W)): non-negative parameters
            plateau = min(cand, key=lambda b: (
                round(points[b].eps_g, 10),
                any(float(np.mean(v)) < 0 for v in getattr(points[b], "params", {}).values())))
    return _Branches(points, jacs, vals, vecs, plateau, float("nan"))


def _constant_predictor_error(model: Any) -> float:
    """``eps_g`` of the best input-independent student output: ``Var(zeta) / 2 +
    noise / 2`` (teacher output variance by Gauss-Hermite quadrature, exact for the
    erf's closed form to ~1e-12)."""
    act = framework_get_activation(model.activation)
    x, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    L = np.linalg.cholesky(model.T)
    M = model.M
    if M <= 3:  # tensor grid over the teachers' M Gaussian coordinates
        grids = np.meshgrid(*([x] * M), indexing="ij")
        z = np.stack([g_.ravel() for g_ in grids], axis=-1)
        wz = np.prod(np.meshgrid(*([w] * M), indexing="ij"), axis=0).ravel()
    else:  # fixed-seed Monte Carlo
        z = np.random.default_rng(0).standard_normal((1 << 18, M))
        wz = np.full(z.shape[0], 1.0 / z.shape[0])
    zeta = np.sum(act.g(z @ L.T), axis=-1)
    mean = float(wz @ zeta)
    return 0.5 * float(wz @ (zeta - mean) ** 2) + 0.5 * model.noise


def _dead(model: Any, fp: Any) -> bool:
    """A dead branch: ``eps_g`` within ``5 eps_g_error`` (at least 1e-9) of the best
    constant predictor's (:func:`_constant_predictor_error`)."""
    tol = max(1e-9, 5.0 * float(getattr(fp, "eps_g_error", 0.0)))
    return bool(fp.eps_g >= _constant_predictor_error(model) - tol)


def _engine_attrs(experiment: Experiment, br: Any = None, quadrature: Any = None
                  ) -> dict[str, Any]:
    model, norm = experiment.model, experiment.normalization
    if not eq.needs_generic(model, norm):
        return {"engine": "closed_form"}
    eng = theory.expectation_engine(model, norm, quadrature)
    return {
        "engine": eng.name,
        "engine_description": eng.describe(),
        **({"quadrature": eng.quadrature.describe()} if eng.quadrature is not None else {}),
        "norm_invariance": eq.scale_invariance(model, norm),
        "plateau_rule_generic": "unstable branch in the symmetric phase with the lowest eps_g, "
        "excluding dead branches (eps_g within 5 error estimates of the best constant "
        "predictor's: the output does not depend on the input, e.g. a gain collapsed to 0)",
    }


def _generic_fixedpoint_variables(experiment: Experiment, br: _Branches) -> dict[str, Any]:
    norm = experiment.normalization
    out = {
        "eps_g_error": _var([fp.eps_g_error for fp in br.points], ("branch",),
                            "error estimate of eps_g (generic engine; 0: exact)"),
        "rate_error": _var([fp.rate_error for fp in br.points], ("branch",),
                           "largest error estimate of the scaled right-hand side at the "
                           "fixed point (generic engine; 0: exact)", "1/(eta alpha)"),
    }
    for k in norm.trainable:
        out[f"param_{k}"] = _var(np.array([fp.params[k] for fp in br.points]),
                                 ("branch", "student"),
                                 f"trainable normalization parameter {k} at the fixed point")
    return out


# --------------------------------------------------------------------------------------
# fixedpoint
# --------------------------------------------------------------------------------------


@attrs.frozen
class FixedPointAnalyzer(Analyzer):
    """Fixed points of the order-parameter ODE in the symmetric subspace.

    The ODE restricted to the symmetric subspace (``"matched"``: ``Q_ii = Q,
    Q_ik = C, R_ii = R, R_in = S`` when ``K = M`` and ``T`` is permutation invariant;
    ``"exchangeable"``: ``Q_ii = Q, Q_ik = C, R_in = r_n`` otherwise) is solved from the
    documented starts of :func:`framework.equilibrium.default_starts` (all students
    along the teachers' sum at Saad & Solla's scale and multiples of it, with and
    without an orthogonal part; students on single teachers; specialized and mixed
    points). Every distinct root is a ``branch``, with its residual (the full,
    unrestricted scaled ODE), ``eps_g`` and the eigenvalues of the ODE Jacobian in the
    *full* order-parameter space (so that symmetry-breaking unstable directions show),
    per unit of ``eta * alpha``.

    Scale-invariant normalizations (batchnorm): only the angles are fixed. A fixed point
    "at weight norm q" has ``Q_ii = q`` and a stationary *angular* flow
    ``dQ_ik - Q_ik (dQ_ii/2Q_ii + dQ_kk/2Q_kk) = 0``, ``dR_in - R_in dQ_ii/2Q_ii = 0``
    (for ``eta > 0`` the norms still grow through the ``eta^2`` term; the angles' fixed
    point then depends on ``eta / q``). Its Jacobian is that of the angular flow at
    fixed norms.

    Parameters
    ----------
    eta : float, optional
        Learning rate (None: the Experiment's); 0 is the gradient-flow limit.
    second_order : bool
        Keep the ``eta^2`` term (when ``eta > 0``).
    subspace : {"auto", "matched", "exchangeable"}
    weight_norm : float, optional
        ``Q_ii`` at which scale-invariant normalizations are solved (default 1); must be
        None otherwise (the norm is then an outcome, reported as the ``weight_norm``
        coordinate).
    flag_plateau : bool
        Integrate the ODE from the Experiment's initial condition (same ``eta``, up to
        ``eta * alpha = horizon``) and flag as ``is_plateau`` the unstable branch it comes
        closest to.
    horizon : float
        See ``flag_plateau``.
    """

    name: ClassVar[str] = "fixedpoint"
    description: ClassVar[str] = "fixed points of the ODE in the symmetric subspace (branches)"

    eta: float | None = attrs.field(default=None, converter=_optional_eta)
    second_order: bool = attrs.field(default=True, converter=bool)
    subspace: str = attrs.field(
        default="auto", validator=one_of("auto", "matched", "exchangeable"))
    weight_norm: float | None = attrs.field(
        default=None, converter=_optional_positive("weight_norm"))
    flag_plateau: bool = attrs.field(default=True, converter=bool)
    horizon: float = attrs.field(default=2000.0, converter=float, validator=gt(0.0))

    def check(self, experiment: Experiment) -> None:
        experiment.normalization.parameters(experiment.model.K)
        _check_weight_norm(experiment, self.weight_norm)
        eq.symmetric_subspace(experiment.model, self.subspace)

    def run(self, experiment: Experiment) -> xr.Dataset:
        eta = _resolve_eta(self.eta, experiment)
        br = _branches(experiment, eta, self.second_order, self.subspace, self.weight_norm,
                       self.flag_plateau, self.horizon)
        return fixedpoint_dataset(experiment, br, eta, self.second_order)


def fixedpoint_dataset(
    experiment: Experiment, br: _Branches, eta: float, second_order: bool
) -> xr.Dataset:
    model, norm = experiment.model, experiment.normalization
    if not br.points:
        raise _no_branches(experiment)
    invariant = bool(norm.scale_invariant)
    generic = eq.needs_generic(model, norm)
    key = norm if generic else invariant
    sub = br.points[0].subspace
    ref = eq.symmetric_subspace(model, "exchangeable")
    nb = len(br.points)
    Q = np.array([fp.Q for fp in br.points])
    R = np.array([fp.R for fp in br.points])
    lam = np.array(br.eigvals)
    kinds, fracs = [], []
    for fp, lam_b, vec in zip(br.points, br.eigvals, br.eigvecs, strict=True):
        dQ, dR = _mode_matrices(model, key, _unstable_vector(model, key, lam_b, vec))
        kind, frac = eq.classify_direction(ref, dQ, dR, fp.Q, fp.R)
        kinds.append(kind)
        fracs.append(frac)
    data = {
        **order_parameter_variables(Q, R, dims=("branch",)),
        "symmetric_coordinate": _var(
            np.array([fp.theta for fp in br.points]), ("branch", "coordinate"),
            "coordinates in the symmetric subspace (Q_ii, Q_ik, R entries)"),
        "residual": _var([fp.residual for fp in br.points], ("branch",),
                         "max |d(Q, R)/d(eta alpha)| of the full ODE at the fixed point "
                         "(angular part for scale-invariant normalizations)", "1"),
        "eps_g": _var([fp.eps_g for fp in br.points], ("branch",), "generalization error"),
        "jacobian_eigenvalue_real": _var(
            lam.real, ("branch", "eigen"),
            "real part of an eigenvalue of the ODE Jacobian (full order-parameter space)",
            "1/(eta alpha)"),
        "jacobian_eigenvalue_imag": _var(
            lam.imag, ("branch", "eigen"), "imaginary part of an eigenvalue of the ODE Jacobian",
            "1/(eta alpha)"),
        "n_unstable": _var(np.sum(lam.real > 1e-9, axis=1), ("branch",),
                           "number of Jacobian eigenvalues with positive real part"),
        "unstable_mode": _var(np.array(kinds, dtype=object), ("branch",),
                              "class of the most unstable Jacobian eigenvector (symmetric, "
                              "symmetry-breaking, mixed, norm)"),
        "unstable_mode_symmetric_fraction": _var(
            fracs, ("branch",),
            "fraction of the most unstable eigenvector's norm inside the symmetric subspace"),
        "is_plateau": _var(np.arange(nb) == br.plateau, ("branch",),
                           "the branch the dynamics from the Experiment's init lingers at"),
        "specialized": _var(_specialized(R), ("branch",),
                            "students distinguished (R_in not the same for all students i)"),
        "start": _var(np.array([fp.start for fp in br.points], dtype=object), ("branch",),
                      "first start that converged to this branch"),
    }
    if generic:
        data.update(_generic_fixedpoint_variables(experiment, br))
    elif invariant or not np.allclose(
        [norm.scale(fp.Q, norm.parameters(model.K)) for fp in br.points], 1.0, rtol=0, atol=0
    ):
        params = norm.parameters(model.K)
        s = np.array([norm.scale(fp.Q, params) for fp in br.points])
        data["Q_norm"] = _var(s[:, :, None] * Q * s[:, None, :], ("branch", "student", "student_"),
                              "normalized overlap s_i Q_ik s_k (what the activation sees)")
        data["R_norm"] = _var(s[:, :, None] * R, ("branch", "student", "teacher"),
                              "normalized overlap s_i R_in")
    coords = _coords(model, key)
    ds = xr.Dataset(
        data,
        coords={
            "branch": ("branch", np.arange(nb), {"long_name": "fixed-point branch", "units": "1"}),
            "weight_norm": ("branch", [fp.weight_norm for fp in br.points],
                            {"long_name": "weight norm Q_ii = |W_i|^2 (mean over students)",
                             "units": "1"}),
            "coordinate": ("coordinate", list(sub.names),
                           {"long_name": "symmetric-subspace coordinate", "units": "1"}),
            "eigen": np.arange(lam.shape[1]),
            "student": np.arange(model.K), "student_": np.arange(model.K),
            "teacher": np.arange(model.M),
        },
        attrs={
            **_common_attrs(experiment, eta, second_order),
            "subspace": sub.kind,
            "plateau_branch": int(br.plateau),
            "plateau_distance": float(br.plateau_distance),
            "plateau_rule": "unstable branch closest (max-abs, over student permutations; angles "
            "for scale-invariant normalizations) to the ODE trajectory from the Experiment's init",
            "jacobian_coordinates": ", ".join(f"{v}[{i},{k}]" for v, i, k in coords),
            "jacobian_method": "central differences, two Richardson levels (h = 1e-3)",
            "mode_classes": MODE_CLASSES,
            "fixed_point_definition": (
                "Q_ii = weight_norm and stationary angular flow (norms may grow through the "
                "eta^2 term)" if invariant else "zero of the full ODE right-hand side"),
            **_engine_attrs(experiment, br),
        },
    )
    return ds


# --------------------------------------------------------------------------------------
# hessian
# --------------------------------------------------------------------------------------


@attrs.frozen
class HessianAnalyzer(Analyzer):
    """Exact spectrum of the Hessian of ``eps_g`` in the student weights ``W = J / sqrt(N)``.

    At every branch of :class:`FixedPointAnalyzer` (the plateau flagged) or at given
    order parameters ``at``. The spectrum is the span block (each eigenvalue once;
    ``K dim S`` of them, ``S`` the span of the rows of ``W`` and ``B / sqrt(N)``) and the
    complement block ``G + G^T`` (``G = d eps_g / dQ``; each eigenvalue ``N - dim S``
    times), exact for every ``N`` (:func:`framework.equilibrium.weight_space_hessian`).
    The escape mode is the eigenvector of the most negative eigenvalue, described by the
    first-order change ``(escape_dQ, escape_dR)`` of the order parameters along it (unit
    ``|dW|``) and classified (symmetric / symmetry-breaking / mixed / norm / complement).

    Trainable normalization parameters join the span block (Hessian over ``(W,
    theta)``; their values are stored as ``param_<name>``): exactly for scale
    parameters with the erf activation (weightnorm's ``g``, batchnorm_affine's
    ``gamma``; its ``beta`` held at 0 contributes an exact decoupled block), otherwise by
    the generic engine with error estimates (attr ``engine``). Fixed parameters (e.g.
    batchnorm's ``gamma``) are stored in the attrs.

    Parameters
    ----------
    eta, second_order, subspace, flag_plateau, horizon
        As for ``fixedpoint`` (which branches; ``eta = 0``: gradient-flow fixed points).
    weight_norm : float or sequence of float, optional
        Scale-invariant normalizations only: the weight norm(s) ``Q_ii`` at which the
        Hessian is evaluated (default 1). A sequence adds a ``weight_norm`` dimension
        (each evaluated at the fixed point solved at that norm). The Hessian obeys
        ``lambda(c W) = lambda(W) / c^2``, i.e. ``lambda`` is proportional to ``1/weight_norm``.
    N : int, optional
        Input dimension for ``multiplicity`` (default: the Experiment's ``init_N``);
        ``multiplicity_formula`` gives it symbolically.
    at : OrderParameters, optional
        Evaluate at these order parameters instead (one branch, no fixed-point search).
    """

    name: ClassVar[str] = "hessian"
    description: ClassVar[str] = "exact weight-space Hessian spectrum of eps_g (any N)"

    eta: float | None = attrs.field(default=None, converter=_optional_eta)
    second_order: bool = attrs.field(default=True, converter=bool)
    subspace: str = attrs.field(
        default="auto", validator=one_of("auto", "matched", "exchangeable"))
    weight_norm: float | tuple[float, ...] | None = attrs.field(
        default=None, converter=_weight_norms)
    N: int | None = attrs.field(default=None, validator=_optional_int("N", 1))
    at: OrderParameters | None = attrs.field(default=None, converter=_optional_op)
    flag_plateau: bool = attrs.field(default=True, converter=bool)
    horizon: float = attrs.field(default=2000.0, converter=float, validator=gt(0.0))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["at"] = None if self.at is None else self.at.to_dict()
        out["weight_norm"] = (list(self.weight_norm) if isinstance(self.weight_norm, tuple)
                              else self.weight_norm)
        return out

    def check(self, experiment: Experiment) -> None:
        experiment.normalization.parameters(experiment.model.K)
        _check_weight_norm(experiment, self.weight_norm)
        if self.at is not None and (self.at.K, self.at.M) != (experiment.model.K,
                                                             experiment.model.M):
            raise SpecificationError(
                f"'at' must have K={experiment.model.K}, M={experiment.model.M}, got "
                f"K={self.at.K}, M={self.at.M}"
            )
        if self.at is None:
            eq.symmetric_subspace(experiment.model, self.subspace)

    def run(self, experiment: Experiment) -> xr.Dataset:
        eta = _resolve_eta(self.eta, experiment)
        N = experiment.init_N if self.N is None else int(self.N)
        norms = self.weight_norm
        if isinstance(norms, tuple):
            parts = [self._one(experiment, eta, N, q) for q in norms]
            ds = xr.concat(parts, dim="weight_norm", data_vars="all", coords="minimal",
                           compat="override", combine_attrs="override", join="outer")
            ds["weight_norm"].attrs = parts[0]["weight_norm"].attrs
            return ds
        return self._one(experiment, eta, N, norms)

    def _one(self, experiment: Experiment, eta: float, N: int, q: float | None) -> xr.Dataset:
        model, norm = experiment.model, experiment.normalization
        invariant = bool(norm.scale_invariant)
        if self.at is not None:
            Q, R = np.array(self.at.Q), np.array(self.at.R)
            if invariant and q is not None:
                Q, R = eq.rescale_weight_norm(Q, R, q)
            points = [(Q, R)]
            point_params = [None]
            plateau = -1
            eps = [theory.generalization_error(model, norm,
                                               eq.to_order_parameters(Q, R, model.T))]
            source = "given order parameters ('at')"
        else:
            br = _branches(experiment, eta, self.second_order, self.subspace, q,
                           self.flag_plateau, self.horizon)
            if not br.points:
                raise _no_branches(experiment)
            points = [(fp.Q, fp.R) for fp in br.points]
            point_params = [getattr(fp, "params", None) for fp in br.points]
            plateau = br.plateau
            eps = [fp.eps_g for fp in br.points]
            source = "fixed points of the symmetric subspace ('fixedpoint' branches)"
        generic = eq.hessian_needs_generic(model, norm)
        if generic:
            specs = [eq.weight_space_hessian_generic(model, norm, Q, R, pp)
                     for (Q, R), pp in zip(points, point_params, strict=True)]
        else:
            specs = [eq.weight_space_hessian(model, norm, Q, R) for Q, R in points]
        ref = eq.symmetric_subspace(model, "exchangeable")
        K, M = model.K, model.M
        n_eigen = max(s.span.size for s in specs) + K
        nb = len(specs)
        values = np.full((nb, n_eigen), np.nan)
        mult = np.zeros((nb, n_eigen), dtype=np.int64)
        block = np.full((nb, n_eigen), "", dtype=object)
        kinds, fracs = [], []
        for b, (spec, (Q, R)) in enumerate(zip(specs, points, strict=True)):
            if N < spec.dim_span:
                raise SpecificationError(
                    f"'N' must be >= dim S = {spec.dim_span} (the span of the weights), got {N}")
            ns = spec.span.size
            values[b, :ns] = spec.span
            values[b, ns:ns + K] = spec.complement
            mult[b, :ns] = 1
            mult[b, ns:ns + K] = N - spec.dim_span
            block[b, :ns] = "span"
            block[b, ns:ns + K] = "complement"
            kind, frac = eq.classify_direction(
                ref, spec.escape_dQ, spec.escape_dR, Q, R, block=spec.escape_block)
            kinds.append(kind)
            fracs.append(frac)
        lam_min = np.array([s.lambda_min for s in specs])
        tol = 1e-9 * np.maximum(1.0, np.abs(lam_min))
        lam_min_mult = np.where(np.abs(values - lam_min[:, None]) <= tol[:, None], mult, 0).sum(1)
        data = {
            **order_parameter_variables(np.array([p[0] for p in points]),
                                        np.array([p[1] for p in points]), dims=("branch",)),
            "eigenvalue": _var(values, ("branch", "eigen"),
                               "Hessian eigenvalue of eps_g w.r.t. W = J/sqrt(N) (NaN: padding)"),
            "multiplicity": _var(mult, ("branch", "eigen"),
                                 f"multiplicity at N = {N} (span: 1, complement: N - dim S)"),
            "block": _var(block, ("branch", "eigen"),
                          "block of the eigenvalue: span of W and B, or its complement"),
            "dim_span": _var([s.dim_span for s in specs], ("branch",),
                             "dim S, S = span of the rows of W and B/sqrt(N)"),
            "lambda_min": _var(lam_min, ("branch",), "most negative (smallest) Hessian eigenvalue"),
            "lambda_min_multiplicity": _var(lam_min_mult, ("branch",),
                                            f"multiplicity of lambda_min at N = {N}"),
            "escape_block": _var(np.array([s.escape_block for s in specs], dtype=object),
                                 ("branch",), "block of the escape (lambda_min) mode"),
            "escape_mode": _var(np.array(kinds, dtype=object), ("branch",),
                                "class of the escape mode (symmetric, symmetry-breaking, mixed, "
                                "norm, complement)"),
            "escape_symmetric_fraction": _var(
                fracs, ("branch",), "fraction of |(dQ, dR)| of the escape mode inside the "
                "symmetric subspace"),
            "escape_dQ": _var(np.array([s.escape_dQ for s in specs]),
                              ("branch", "student", "student_"),
                              "first-order change of Q along the unit escape mode dW"),
            "escape_dR": _var(np.array([s.escape_dR for s in specs]),
                              ("branch", "student", "teacher"),
                              "first-order change of R along the unit escape mode dW"),
            "eps_g": _var(eps, ("branch",), "generalization error"),
            "is_plateau": _var(np.arange(nb) == plateau, ("branch",),
                               "the branch the dynamics from the Experiment's init lingers at"),
        }
        if generic:
            data.update(_generic_hessian_variables(specs, norm, n_eigen))
        wn = [float(np.mean(np.diagonal(p[0]))) for p in points]
        ds = xr.Dataset(
            data,
            coords={
                "branch": ("branch", np.arange(nb), {"long_name": "fixed-point branch",
                                                      "units": "1"}),
                "eigen": np.arange(n_eigen),
                "student": np.arange(K), "student_": np.arange(K), "teacher": np.arange(M),
            },
            attrs={
                **_common_attrs(experiment, eta, self.second_order),
                "N": N,
                "multiplicity_formula": "span eigenvalues: 1; complement eigenvalues: N - dim S "
                "(dim S = dim_span)",
                "hessian_coordinates": "W = J / sqrt(N) (Q = W W^T, R = W B^T / sqrt(N)); "
                "eps_g as a function of the K x N entries of W",
                "hessian_method": "exact split span + complement; span block from the analytic "
                "gradient by central differences with two Richardson levels (~1e-11)",
                "hessian_scaling": "scale-invariant normalization: lambda(c W) = lambda(W) / c^2 "
                "with weight_norm = Q_ii = |W_i|^2, so lambda is proportional to 1/weight_norm",
                "evaluated_at": source,
                "plateau_branch": int(plateau),
                "mode_classes": MODE_CLASSES,
                "trainable_parameters_included": "none (normalization has no trainable "
                "parameters)",
                **_generic_hessian_attrs(experiment, generic),
            },
        )
        if invariant and (q is not None or self.at is None):
            ds = ds.assign_coords(weight_norm=((), 1.0 if q is None else float(q), {
                "long_name": "weight norm Q_ii = |W_i|^2 at which the Hessian is evaluated",
                "units": "1"}))
        else:
            ds = ds.assign_coords(weight_norm=("branch", wn, {
                "long_name": "weight norm Q_ii = |W_i|^2 (mean over students) of the point",
                "units": "1"}))
        return ds


def _generic_hessian_variables(specs: list, norm: Any, n_eigen: int) -> dict[str, Any]:
    nb = len(specs)
    K = specs[0].complement.size
    err = np.full((nb, n_eigen), np.nan)
    for b, sp in enumerate(specs):
        err[b, :sp.span.size] = sp.span_error
        err[b, sp.span.size:sp.span.size + K] = sp.complement_error
    out = {
        "eigenvalue_error": _var(err, ("branch", "eigen"),
                                 "error estimate of the eigenvalue (generic engine: standard "
                                 "error of replicate Hessians + finite-difference truncation)"),
        "lambda_min_error": _var([sp.lambda_min_error for sp in specs], ("branch",),
                                 "error estimate of lambda_min"),
        "gradient_norm": _var([sp.gradient_norm for sp in specs], ("branch",),
                              "norm of the gradient of eps_g over (W, theta) at the point "
                              "(nonzero away from critical points of eps_g)"),
        "coupling_complement_theta": _var(
            [sp.coupling_complement_theta for sp in specs], ("branch",),
            "largest |d^2 eps_g / d(complement) d(theta)| measured (zero in theory)"),
        "coupling_complement_theta_error": _var(
            [sp.coupling_complement_theta_error for sp in specs], ("branch",),
            "error estimate of coupling_complement_theta"),
        "coupling_complement_span": _var(
            [sp.coupling_complement_span for sp in specs], ("branch",),
            "largest |d^2 eps_g / d(complement) d(span)| measured (zero in theory)"),
        "coupling_complement_span_error": _var(
            [sp.coupling_complement_span_error for sp in specs], ("branch",),
            "error estimate of coupling_complement_span"),
    }
    for k in norm.trainable:
        out[f"param_{k}"] = _var(np.array([sp.params[k] for sp in specs]), ("branch", "student"),
                                 f"value of the trainable parameter {k} at which the Hessian "
                                 "is evaluated")
        out[f"escape_d{k}"] = _var(np.array([sp.escape_dtheta[k] for sp in specs]),
                                   ("branch", "student"),
                                   f"component of the unit escape mode along {k}")
    return out


def _generic_hessian_attrs(experiment: Experiment, generic: bool,
                           quadrature: Any = None) -> dict[str, Any]:
    model, norm = experiment.model, experiment.normalization
    if not generic:
        return {"engine": "closed_form"}
    eng = theory.expectation_engine(model, norm, quadrature)
    held = (f"; shift parameters {', '.join(eng.held)} at 0: their block (exact closed "
            "form) is decoupled from (W, theta) by the odd symmetry") if eng.held else ""
    out = {
        "engine": eng.name,
        "engine_description": eng.describe(),
        "hessian_method": (
            "exact weight gradients (closed form with the trainable parameters) "
            if eng.exact else "generic engine: per-replicate weight gradients (randomized "
            "QMC, common random numbers) ") + "differentiated by central differences with one "
        "Richardson level; realization in K + M dimensions plus one orthogonal (complement) "
        "dimension" + held,
        "trainable_parameters_included": (
            "Hessian over (W, theta), theta = " + ", ".join(norm.trainable)
            + " (theta joins the span block; its coupling to the complement is zero)")
        if norm.trainable else "none (normalization has no trainable parameters)",
    }
    if eng.quadrature is not None:
        out["quadrature"] = eng.quadrature.describe()
    if not norm.statistics_gradient:
        out["hessian_meaning"] = (
            "Hessian of the loss landscape eps_g (gradient through the statistics taken by "
            "finite differences); the SGD drift of this normalization is NOT the gradient of "
            "eps_g, so lambda_min is not an escape rate")
    return out


# --------------------------------------------------------------------------------------
# escape
# --------------------------------------------------------------------------------------


@attrs.frozen
class EscapeAnalyzer(Analyzer):
    """Escape from the symmetric plateau: when ``eps_g`` falls below half its plateau value.

    ``start="fixedpoint"``: the plateau branch (of ``fixedpoint`` at the same ``eta``;
    for scale-invariant normalizations at ``weight_norm``) perturbed along the most
    unstable eigenvector of its ODE Jacobian, ``|d(Q, R)| = perturbation * |(Q, R)|``
    (Frobenius; in a degenerate eigenspace, e.g. ``K >= 3``, the direction that most
    increases ``sum_i R_ii``: all students specialize at once), the trainable
    parameters moved along with it; if that leaves the positive semi-definite cone (the
    plateau of gradient flow, and the trained-gain plateau, sit on its boundary) the
    opposite sign is tried, then the same eigenvector realized in weight space (the
    displacement of the weights whose first-order change of (Q, R) it is), then the
    Hessian's escape mode in weight space (always feasible); attr ``perturbation_mode``
    says which. ``start="init"``: the Experiment's
    initial condition. The ODE (:func:`framework.theory.integrate`, ``eta^2`` term kept
    unless ``second_order=False``) runs to ``alpha_max``; ``alpha_escape`` is the first
    ``alpha`` with ``eps_g < eps_plateau / 2`` (linear interpolation on the grid), NaN
    with ``escaped = False`` if it never happens. ``eps_plateau`` is, with
    ``plateau="eta"`` (default), the plateau branch's ``eps_g`` at the same ``eta``
    (scale-invariant normalizations: at the weight norm of the start); with
    ``plateau="gradient_flow"`` that of the ``eta -> 0`` plateau (for scale-invariant
    normalizations independent of the weight norm: robust when the norm changes a lot
    during the run, e.g. a small initial norm with a large ``eta``). The starting fixed
    point is always the one at ``eta``. ``weight_norm(alpha)`` (mean ``Q_ii``) records
    the growth of the norms (batchnorm: through the ``eta^2`` term only).

    Parameters
    ----------
    start : {"fixedpoint", "init"}
    perturbation : float
        Relative size of the initial displacement (``start="fixedpoint"``).
    eta : float, optional
        Learning rate (> 0; None: the Experiment's).
    weight_norm : float, optional
        Scale-invariant normalizations, ``start="fixedpoint"``: the weight norm of the
        starting fixed point (default 1).
    alpha_max, n_points
        Linear report grid ``0 ... alpha_max``.
    alpha : sequence of float, optional
        Explicit report grid (strictly increasing, from the start); overrides the above.
    plateau : {"eta", "gradient_flow"}
        Which plateau value defines the threshold (see above).
    quadrature : mapping, optional
        Generic engine only: the :class:`framework.theory.Quadrature` options used for
        the fixed point, its Jacobian and Hessian and the integration (None: defaults).
        A coarser one (e.g. ``{"samples": 1024, "replicates": 8}``) makes the escape run
        several times cheaper; the fixed point is re-solved with it, so the start is a
        fixed point of the integrated ODE. Stored as attr ``quadrature``.
    stop_at_escape : bool
        Generic engine only: stop integrating at the first grid point below the
        threshold (later grid points are NaN).
    rtol, atol, method, second_order, max_value
        As for ``dynamics``.
    """

    name: ClassVar[str] = "escape"
    description: ClassVar[str] = "escape time from the symmetric plateau (ODE)"

    start: str = attrs.field(default="fixedpoint", validator=one_of("fixedpoint", "init"))
    perturbation: float = attrs.field(default=1e-3, converter=float, validator=gt(0.0))
    eta: float | None = attrs.field(default=None, converter=_optional_eta)
    weight_norm: float | None = attrs.field(
        default=None, converter=_optional_positive("weight_norm"))
    alpha_max: float = attrs.field(default=10000.0, converter=float, validator=gt(0.0))
    n_points: int = attrs.field(default=2001, validator=integer(minimum=2))
    alpha: tuple[float, ...] | None = attrs.field(default=None, converter=_alpha_tuple)
    rtol: float = attrs.field(default=1e-10, converter=float, validator=gt(0.0))
    atol: float = attrs.field(default=1e-12, converter=float, validator=gt(0.0))
    method: str = attrs.field(
        default="DOP853", validator=one_of("DOP853", "RK45", "LSODA", "Radau", "BDF"))
    second_order: bool = attrs.field(default=True, converter=bool)
    max_value: float = attrs.field(default=1e8, converter=float, validator=gt(0.0))
    subspace: str = attrs.field(
        default="auto", validator=one_of("auto", "matched", "exchangeable"))
    horizon: float = attrs.field(default=2000.0, converter=float, validator=gt(0.0))
    plateau: str = attrs.field(default="eta", validator=one_of("eta", "gradient_flow"))
    quadrature: dict | None = attrs.field(default=None, converter=_optional_quadrature)
    stop_at_escape: bool = attrs.field(default=False, converter=bool)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["alpha"] = None if self.alpha is None else list(self.alpha)
        out["quadrature"] = None if self.quadrature is None else dict(self.quadrature)
        return out

    def check(self, experiment: Experiment) -> None:
        experiment.normalization.parameters(experiment.model.K)
        _check_weight_norm(experiment, self.weight_norm)
        eta = _resolve_eta(self.eta, experiment)
        if not eta > 0:
            raise SpecificationError(f"'eta' must be > 0 for the escape analyzer, got {eta}")

    def run(self, experiment: Experiment) -> xr.Dataset:
        eta = _resolve_eta(self.eta, experiment)
        model, norm = experiment.model, experiment.normalization
        invariant = bool(norm.scale_invariant)
        exp_eta = experiment if eta == experiment.eta else experiment.evolve(eta=eta)
        if self.start == "init":
            initial = experiment.initial_order_parameters()
            q = float(np.mean(np.diag(initial.Q))) if invariant else None
        else:
            q = (1.0 if self.weight_norm is None else self.weight_norm) if invariant else None
        if self.plateau == "gradient_flow":
            ref = _branches(experiment, 0.0, False, self.subspace, q, True, self.horizon)
            if ref.plateau < 0:
                raise SpecificationError(
                    f"no unstable symmetric fixed point (plateau) of gradient flow found for "
                    f"K={model.K}, M={model.M}, normalization {norm.name!r}")
            eps_plateau = ref.points[ref.plateau].eps_g
        if self.plateau == "gradient_flow" and self.start == "init":
            br = ref  # lambda_min, rate and weight_norm_plateau of the eta -> 0 plateau
        else:
            br = _branches(experiment, eta, self.second_order, self.subspace, q, True,
                           self.horizon, self.quadrature)
        if br.plateau < 0:
            raise SpecificationError(
                f"no unstable symmetric fixed point (plateau) found for K={model.K}, "
                f"M={model.M}, normalization {norm.name!r}, eta={eta}")
        fp = br.points[br.plateau]
        if self.plateau == "eta":
            eps_plateau = fp.eps_g
        if eq.hessian_needs_generic(model, norm):
            spec = eq.weight_space_hessian_generic(model, norm, fp.Q, fp.R,
                                                   getattr(fp, "params", None),
                                                   quadrature=self.quadrature)
        else:
            spec = eq.weight_space_hessian(model, norm, fp.Q, fp.R)
        how = "experiment init"
        if self.start == "fixedpoint":
            key = norm if eq.needs_generic(model, norm) else invariant
            vec = _unstable_vector(model, key, br.eigvals[br.plateau],
                                   br.eigvecs[br.plateau])
            initial, how, dparams = _perturbed(model, norm, fp, vec, spec, self.perturbation,
                                               key)
        grid = (np.linspace(0.0, self.alpha_max, self.n_points) if self.alpha is None
                else np.asarray(self.alpha))
        params = getattr(fp, "params", None) if self.start == "fixedpoint" else None
        if params:  # the trainable parameters move along the mode too
            params = {k: np.asarray(v, dtype=float) + dparams.get(k, 0.0)
                      for k, v in params.items()}
        traj = theory.integrate(
            model, norm, initial, eta=eta, batch_size=experiment.batch_size, alpha=grid,
            rtol=self.rtol, atol=self.atol, method=self.method,
            second_order=self.second_order, max_value=self.max_value,
            params=params or None, quadrature=self.quadrature,
            stop_below=0.5 * eps_plateau if self.stop_at_escape else None,
        )
        ds = trajectory_dataset(exp_eta, traj, grid, self)
        eps = ds.eps_g.values
        threshold = 0.5 * eps_plateau
        below = np.nonzero(eps < threshold)[0]
        if below.size and below[0] > 0:
            j = below[0]
            a0, a1, e0, e1 = grid[j - 1], grid[j], eps[j - 1], eps[j]
            alpha_escape = float(a0 + (e0 - threshold) * (a1 - a0) / (e0 - e1))
        elif below.size:
            alpha_escape = 0.0
        else:
            alpha_escape = float("nan")
        escaped = bool(np.isfinite(alpha_escape))
        wn = np.mean(np.diagonal(ds.Q.values, axis1=1, axis2=2), axis=1)
        wn_escape = float(np.interp(alpha_escape, grid, wn)) if escaped else float("nan")
        rate = float(br.eigvals[br.plateau][0].real)
        ds["weight_norm"] = _var(wn, ("alpha",), "weight norm Q_ii = |W_i|^2 (mean over students)")
        ds["alpha_escape"] = _var(alpha_escape, (), "first alpha with eps_g < eps_plateau / 2 "
                                  "(NaN if not within alpha_max)")
        ds["escaped"] = _var(escaped, (),
                             "eps_g fell below half the plateau value within alpha_max")
        ds["eps_plateau"] = _var(eps_plateau, (), "eps_g of the symmetric plateau fixed point "
                                 "defining the threshold (see attr plateau)")
        ds["weight_norm_plateau"] = _var(fp.weight_norm, (),
                                         "weight norm Q_ii of the plateau fixed point")
        ds["weight_norm_at_escape"] = _var(wn_escape, (), "weight norm Q_ii at alpha_escape")
        ds["lambda_min"] = _var(spec.lambda_min, (), "most negative Hessian eigenvalue at the "
                                "plateau fixed point (W = J/sqrt(N) coordinates; eta -> 0 "
                                "plateau if start='init' and plateau='gradient_flow')")
        ds["unstable_rate"] = _var(rate, (), "largest real part of the ODE Jacobian eigenvalues "
                                   "at the plateau", "1/(eta alpha)")
        ds.attrs.update({
            **_common_attrs(exp_eta, eta, self.second_order),
            "start": self.start,
            "perturbation": self.perturbation if self.start == "fixedpoint" else 0.0,
            "perturbation_mode": how,
            "escape_rule": "first alpha with eps_g < eps_plateau / 2, linear interpolation",
            "plateau": self.plateau,
            "plateau_branch": int(br.plateau),
            "stop_at_escape": int(self.stop_at_escape),
        })
        if eq.needs_generic(model, norm):
            ds.attrs.update(_engine_attrs(experiment, quadrature=self.quadrature))
        return ds


def _theta_parts(coords: list, vec: np.ndarray, K: int) -> dict[str, np.ndarray]:
    """The trainable-parameter components ``("theta:<name>", i, 0)`` of a Jacobian vector."""
    out: dict[str, np.ndarray] = {}
    v = np.real(vec)
    for value, (kind, i, _) in zip(v, coords, strict=True):
        if kind.startswith("theta:"):
            out.setdefault(kind[len("theta:"):], np.zeros(K))[i] = value
    return out


def _realize_mode(model: Any, invariant: Any, vec: np.ndarray, X: np.ndarray,
                  Bt: np.ndarray) -> np.ndarray | None:
    """``dW`` (shape of ``X``) whose first-order change of the Jacobian coordinates
    (``Q_ik``, ``R_in``; norms free where they are not coordinates) is the ``(Q, R)``
    part of ``vec``; None if no ``dW`` reproduces it to 1e-6 (relative)."""
    K, D = X.shape
    pairs = [(v, c) for v, c in zip(np.real(vec), _coords(model, invariant), strict=True)
             if c[0] in ("Q", "R")]
    coords = [c for _, c in pairs]
    target = np.array([v for v, _ in pairs])
    basis = np.eye(K * D).reshape(K * D, K, D)
    dQ = X[None] @ np.swapaxes(basis, 1, 2) + basis @ X.T[None]  # (K D, K, K)
    dR = basis @ Bt.T[None]  # (K D, K, M)
    A = np.stack([dQ[:, i, k] if v == "Q" else dR[:, i, k] for v, i, k in coords], axis=0)
    sol, *_ = np.linalg.lstsq(A, target, rcond=None)
    if np.linalg.norm(A @ sol - target) > 1e-6 * max(np.linalg.norm(target), 1e-300):
        return None
    return sol.reshape(K, D)


def _perturbed(
    model: Any, norm: Any, fp: eq.FixedPoint, vec: np.ndarray, spec: eq.HessianSpectrum,
    size: float, invariant: Any,
) -> tuple[OrderParameters, str, dict[str, np.ndarray]]:
    """The plateau moved along its escape direction: ``(start, description, dtheta)``.

    The direction includes the trainable parameters (``dtheta``, zero without them):
    the step is ``size`` times ``|(Q, R)|`` over the norm of the whole vector ``(dQ, dR,
    dtheta)`` (Jacobian eigenvector). Where that leaves the PSD cone (a plateau of
    identical students on its boundary), the same eigenvector is realized in weight
    space: the displacement ``dW`` of the realization whose first-order change of the
    Jacobian's coordinates is the eigenvector (least squares, accepted if it reproduces
    it to 1e-6), so the start moves along the ODE's unstable direction and stays
    realizable. Last resort: the Hessian's escape mode in weight space (step ``size
    |W|`` over ``|(dW, dtheta)|``).
    """
    dQ, dR = _mode_matrices(model, invariant, vec)
    dth = {} if isinstance(invariant, (bool, np.bool_)) else \
        _theta_parts(_coords(model, invariant), vec, model.K)
    extra = sum(float(np.sum(v**2)) for v in dth.values())
    total = math.sqrt(float(np.sum(fp.Q**2) + np.sum(fp.R**2)))
    scale = size * total / math.sqrt(float(np.sum(dQ**2) + np.sum(dR**2)) + extra)
    for sign in (1.0, -1.0):
        Q, R = fp.Q + sign * scale * dQ, fp.R + sign * scale * dR
        if eq.psd_margin(Q, R, model.T) > 1e-12:
            try:
                return OrderParameters(Q, R, model.T), (
                    f"ODE Jacobian's most unstable eigenvector, sign {sign:+g}"), \
                    {k: sign * scale * v for k, v in dth.items()}
            except ValueError:
                pass
    X, Bt = spec.X, spec.Bt
    realized = _realize_mode(model, invariant, vec, X, Bt)
    if realized is not None:
        dWr = realized
        step = scale
        Xp = X + step * dWr
        op = eq.to_order_parameters(Xp @ Xp.T, Xp @ Bt.T, model.T)
        return op, ("ODE Jacobian's most unstable eigenvector realized in weight space "
                    "(first order)"), {k: step * v for k, v in dth.items()}
    dW = spec.escape_dW
    dth = {k: np.asarray(v, dtype=float)
           for k, v in getattr(spec, "escape_dtheta", {}).items()}
    step = size * np.linalg.norm(X) / math.sqrt(
        float(np.sum(dW**2)) + sum(float(np.sum(v**2)) for v in dth.values()))
    if spec.escape_block == "span":
        Xp, Btp = X + step * dW, Bt
    else:
        Xp = np.concatenate([X, step * dW], axis=1)
        Btp = np.concatenate([Bt, np.zeros((Bt.shape[0], 1))], axis=1)
    op = eq.to_order_parameters(Xp @ Xp.T, Xp @ Btp.T, model.T)
    return op, f"Hessian escape mode in weight space ({spec.escape_block} block)", \
        {k: step * v for k, v in dth.items()}


@hookimpl
def symphase_register_analyzers(registry):  # type: ignore[no-untyped-def]
    registry.add_analyzer(FixedPointAnalyzer)
    registry.add_analyzer(HessianAnalyzer)
    registry.add_analyzer(EscapeAnalyzer)
