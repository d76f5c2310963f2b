"""Analyzers of the symmetric (plateau) equilibrium: ``fixedpoint``, ``hessian``, ``escape``.

They work for any model, normalization and activation: the engine is chosen once per
run by :func:`framework.theory.select_engine` (exact closed forms where they apply,
quadrature with error estimates otherwise; attr ``engine``) and the mathematics is in
:mod:`framework.theory.equilibrium`, written once against it. Every dataset has the same
variables whichever engine ran (error estimates 0 when exact).

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

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
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
from framework.datasets import (
    add_input_spaces,
    order_parameter_variables,
    trajectory_dataset,
    variable,
)
from framework.theory import Engine
from framework.theory import equilibrium as eq
from framework.validators import (
    alpha_grid_option,
    boolean,
    check_real,
    gt,
    integer,
    one_of,
    optional_integer,
    quadrature_option,
    to_bool,
    to_float,
)

#: How the trained readout's block of the Hessian is scaled (attr
#: ``hessian_readout_scaling``).
READOUT_SCALING = (
    "coordinates (W, v) with W = J / sqrt(N): both move at O(1) rates per alpha, dW/dalpha "
    "= -eta grad_W eps_g and dv/dalpha = -eta_v grad_v eps_g (small-eta drift), so the v "
    "block is the plain second derivative d^2 eps_g / dv_i dv_k (not scaled with N), next "
    "to Hess_W = N Hess_J; the (W, v) Hessian is that of the drift only for eta_v = eta "
    "(otherwise the drift's linearization is diag(eta, eta_v) times it)"
)


# --------------------------------------------------------------------------------------
# option converters
# --------------------------------------------------------------------------------------


def _optional_eta(value: Any) -> float | None:
    if value is None:
        return None
    return check_real("eta", value, minimum=0.0)


def _optional_positive(name: str) -> Callable[[Any], float | None]:
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
    out = tuple(check_real("weight_norm", v, minimum=0.0, strict=True)
                for v in np.ravel(np.asarray(value, dtype=object)))
    if not out:
        raise SpecificationError("'weight_norm' must not be an empty sequence, got []")
    return out


def _optional_op(value: Any) -> OrderParameters | None:
    if value is None or isinstance(value, OrderParameters):
        return value
    if isinstance(value, Mapping):
        return OrderParameters.from_dict(value)
    raise TypeError(f"'at' must be OrderParameters, a mapping or None, got {value!r}")


def _optional_weight_norm(value: Any) -> float | None:
    """None, or a weight norm > 0."""
    return _optional_positive("weight_norm")(value)


# --------------------------------------------------------------------------------------
# options shared by the analyzers
# --------------------------------------------------------------------------------------

#: The options that several analyzers of this module and of :mod:`plugins.fisher` have,
#: each defined once: the keyword arguments of its ``attrs.field`` (default, converter,
#: validator), by key (the field's name, but ``weight_norms``: the ``weight_norm`` that
#: also takes a sequence). A class declares one with :func:`_option` where it lists it
#: (its fields' order is the order of its documented options and of the valid options an
#: error about an unknown option lists); its docstring says what the option means to it.
_OPTIONS: dict[str, dict[str, Any]] = {
    "eta": {"default": None, "converter": _optional_eta},
    "second_order": {"default": True, "converter": to_bool, "validator": boolean()},
    "subspace": {"default": "auto", "validator": one_of("auto", "matched", "exchangeable")},
    "weight_norm": {"default": None, "converter": _optional_weight_norm},
    "weight_norms": {"default": None, "converter": _weight_norms},
    "N": {"default": None, "validator": optional_integer(minimum=1)},
    "at": {"default": None, "converter": _optional_op},
    "flag_plateau": {"default": True, "converter": to_bool, "validator": boolean()},
    "horizon": {"default": 2000.0, "converter": to_float, "validator": gt(0.0)},
    "alpha": {"default": None, "converter": alpha_grid_option},
    "rtol": {"default": 1e-10, "converter": to_float, "validator": gt(0.0)},
    "atol": {"default": 1e-12, "converter": to_float, "validator": gt(0.0)},
    "quadrature": {"default": None, "converter": quadrature_option},
}


def _option(key: str) -> Any:
    """A new ``attrs`` field for the shared option ``key`` of :data:`_OPTIONS`."""
    return attrs.field(**_OPTIONS[key])


def _resolve_eta(option: float | None, experiment: Experiment) -> float:
    return experiment.eta if option is None else option


def _check_weight_norm(experiment: Experiment, weight_norm: Any) -> None:
    model, norm = experiment.model, experiment.normalization
    if weight_norm is not None and eq.scale_invariance(model, norm) == "none":
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
    engine: Engine
    points: list[eq.FixedPoint]
    coords: list[tuple[str, int, int]]
    jacobians: list[np.ndarray]
    eigvals: list[np.ndarray]
    eigvecs: list[np.ndarray]
    plateau: int


def _engine(experiment: Experiment, quadrature: Any = None) -> Engine:
    """The engine of this experiment (the one choice, :func:`theory.select_engine`), for
    its learning rule: the rates (fixed points, Jacobians, escape runs) are the rule's."""
    model = experiment.model
    return theory.select_engine(model, experiment.normalization,
                                model.activation_function(),
                                quadrature=quadrature, rule=experiment.learning_rule)


def _landscape_engine(eng: Engine) -> Engine:
    """The engine of the expectations behind ``eng`` (the wrapped one of a rule's
    :class:`~framework.theory.RuleEngine`): the loss landscape (Hessian, Fisher) does not
    depend on the learning rule."""
    return eng.base if isinstance(eng, theory.RuleEngine) else eng


#: attrs of the analyzers whose quantity is a property of the loss, not of the rule
RULE_INDEPENDENT = (
    "the spectrum is a property of the loss and the network (independent of the learning "
    "rule); the points where it is evaluated (fixed-point branches) are the rule's, and so "
    "is the stability they imply (the ODE Jacobian is the rule's preconditioner times the "
    "Hessian only for small eta)")


#: Branch searches of this process, most recent last: the analyzers of one experiment
#: (and experiments that differ only in what the search does not read: seed, init,
#: other analyzers) share one search. Bounded; the values are never modified.
_BRANCH_CACHE: OrderedDict[tuple[type, type, Any, str], _Branches] = OrderedDict()
_BRANCH_CACHE_SIZE = 32


def _branches(
    experiment: Experiment,
    eta: float,
    second_order: bool,
    subspace: str,
    weight_norm: float | None,
    flag_plateau: bool,
    quadrature: Any = None,
    partition: bool = True,
) -> _Branches:
    """Fixed points, their Jacobians and the plateau (:func:`eq.plateau_branch`), cached
    per (model, normalization, batch size and the search's own options). ``partition``:
    include the branches with a dead or duplicated unit (trained readout; never the
    plateau, so the escape analyzer leaves them out)."""
    model, norm = experiment.model, experiment.normalization
    if weight_norm is None and eq.scale_invariance(model, norm) != "none":
        weight_norm = 1.0  # find_fixed_points' default for norm-conserving normalizations
    partition = bool(partition) or not model.layers().readout_trained  # else no effect

    def cache_key(part: bool) -> tuple:
        return (type(model), type(norm),  # the classes too: two plugins may share a name
                model.activation_function(),
                json.dumps([model.to_dict(), norm.to_dict(), experiment.batch_size,
                            type(experiment.learning_rule).__qualname__,
                            experiment.learning_rule.to_dict(),
                            float(eta), bool(second_order), subspace, weight_norm,
                            bool(flag_plateau), quadrature, part],
                           sort_keys=True, default=repr))

    key = cache_key(partition)
    for k in (key, cache_key(True)):  # a search with the partitions serves both
        if k in _BRANCH_CACHE:
            _BRANCH_CACHE.move_to_end(k)
            return _BRANCH_CACHE[k]
    br = _search_branches(experiment, eta, second_order, subspace, weight_norm,
                          flag_plateau, quadrature, partition)
    _BRANCH_CACHE[key] = br
    while len(_BRANCH_CACHE) > _BRANCH_CACHE_SIZE:
        _BRANCH_CACHE.popitem(last=False)
    return br


def _search_branches(
    experiment: Experiment,
    eta: float,
    second_order: bool,
    subspace: str,
    weight_norm: float | None,
    flag_plateau: bool,
    quadrature: Any,
    partition: bool = True,
) -> _Branches:
    model, norm = experiment.model, experiment.normalization
    eng = _engine(experiment, quadrature)
    points = eq.find_fixed_points(
        model, norm, eta=eta, batch_size=experiment.batch_size, second_order=second_order,
        subspace=subspace, weight_norm=weight_norm, engine=eng, partition_starts=partition)
    coords = eq.jacobian_coordinates(model, norm, eng)
    jacs, vals, vecs = [], [], []
    for fp in points:  # a handful of branches
        jac = eq.ode_jacobian(model, norm, fp.Q, fp.R, fp.params, eta=eta,
                              batch_size=experiment.batch_size, second_order=second_order,
                              engine=eng)
        lam, vec = eq.sorted_eigen(jac)
        jacs.append(jac)
        vals.append(lam)
        vecs.append(vec)
    plateau = eq.plateau_branch(eng, points, vals) if flag_plateau else -1
    return _Branches(eng, points, coords, jacs, vals, vecs, plateau)


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


def _engine_attrs(experiment: Experiment, eng: Engine) -> dict[str, Any]:
    return {
        **eng.attrs(),
        **experiment.learning_rule.attrs(),
        "norm_invariance": eq.scale_invariance(experiment.model, experiment.normalization),
    }


def _parameter_variables(experiment: Experiment, params: list[dict], what: str,
                         eng: Engine) -> dict[str, Any]:
    """``param_<name>`` (branch, student) for each trainable parameter of the engine: the
    normalization's, then a trained readout ``v``."""
    return {
        f"param_{k}": variable(np.array([p[k] for p in params]), ("branch", "student"),
                           _param_name(k, eng) + f" {what}")
        for k in eng.trainable if k != theory.MEAN_OVERLAP  # state: mean_overlap
    }


def _param_name(k: str, eng: Engine) -> str:
    if k in eng.model_trainable:
        return f"trained student readout {k} (second-layer weights, before c_K)"
    return f"trainable normalization parameter {k}"


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
        Flag the plateau as ``is_plateau`` (rule :data:`framework.theory.equilibrium.
        PLATEAU_RULE`, attr ``plateau_rule``: no integration, polynomial in ``K``).
    horizon : float
        No longer used (the plateau is chosen without integrating the ODE); kept so
        that stored specifications load.
    """

    name: ClassVar[str] = "fixedpoint"
    description: ClassVar[str] = "fixed points of the ODE in the symmetric subspace (branches)"
    #: The fixed points and Jacobians are those of the experiment's learning rule.
    supports_learning_rules: ClassVar[bool] = True
    #: Structured inputs: the state per input eigenspace (Q_space, R_space).
    supports_structured_inputs: ClassVar[bool] = True
    #: Inputs with a mean: the overlaps r with the mean direction are state (mean_overlap).
    supports_input_mean: ClassVar[bool] = True

    eta: float | None = _option("eta")
    second_order: bool = _option("second_order")
    subspace: str = _option("subspace")
    weight_norm: float | None = _option("weight_norm")
    flag_plateau: bool = _option("flag_plateau")
    horizon: float = _option("horizon")

    def check(self, experiment: Experiment) -> None:
        experiment.normalization.parameters(experiment.model.K)
        _check_weight_norm(experiment, self.weight_norm)
        eq.symmetric_subspace(experiment.model, self.subspace)

    def run(self, experiment: Experiment) -> xr.Dataset:
        eta = _resolve_eta(self.eta, experiment)
        br = _branches(experiment, eta, self.second_order, self.subspace, self.weight_norm,
                       self.flag_plateau)
        return fixedpoint_dataset(experiment, br, eta, self.second_order)


def fixedpoint_dataset(
    experiment: Experiment, br: _Branches, eta: float, second_order: bool
) -> xr.Dataset:
    model, norm = experiment.model, experiment.normalization
    if not br.points:
        raise _no_branches(experiment)
    invariant = eq.scale_invariance(model, norm) == "unit"
    sub = br.points[0].subspace
    ref = eq.symmetric_subspace(model, "exchangeable")
    nb = len(br.points)
    Q = np.array([fp.Q for fp in br.points])
    R = np.array([fp.R for fp in br.points])
    inputs = model.input_distribution()
    Q_l, R_l = (None, None) if inputs.isotropic else (Q, R)
    if Q_l is not None:  # per input eigenspace: Q, R the pre-activation covariances
        Q, R = inputs.total(Q_l), inputs.total(R_l)
    lam = np.array(br.eigvals)
    kinds, fracs = [], []
    for fp, lam_b, vec in zip(br.points, br.eigvals, br.eigvecs, strict=True):
        dQ, dR, _ = eq.mode_matrices(model, br.coords, eq.unstable_vector(br.coords, lam_b, vec))
        kind, frac = eq.classify_direction(ref, dQ, dR, fp.Q, fp.R)
        kinds.append(kind)
        fracs.append(frac)
    data = {
        **order_parameter_variables(Q, R, dims=("branch",)),
        "symmetric_coordinate": variable(
            np.array([fp.theta for fp in br.points]), ("branch", "coordinate"),
            "coordinates in the symmetric subspace (Q_ii, Q_ik, R entries)"),
        "residual": variable([fp.residual for fp in br.points], ("branch",),
                         "max |d(Q, R)/d(eta alpha)| of the full ODE at the fixed point "
                         "(angular part for scale-invariant normalizations)", "1"),
        "eps_g": variable([fp.eps_g for fp in br.points], ("branch",), "generalization error"),
        "jacobian_eigenvalue_real": variable(
            lam.real, ("branch", "eigen"),
            "real part of an eigenvalue of the ODE Jacobian (full order-parameter space)",
            "1/(eta alpha)"),
        "jacobian_eigenvalue_imag": variable(
            lam.imag, ("branch", "eigen"), "imaginary part of an eigenvalue of the ODE Jacobian",
            "1/(eta alpha)"),
        "n_unstable": variable(np.sum(lam.real > 1e-9, axis=1), ("branch",),
                           "number of Jacobian eigenvalues with positive real part"),
        "unstable_mode": variable(np.array(kinds, dtype=object), ("branch",),
                              "class of the most unstable Jacobian eigenvector (symmetric, "
                              "symmetry-breaking, mixed, norm)"),
        "unstable_mode_symmetric_fraction": variable(
            fracs, ("branch",),
            "fraction of the most unstable eigenvector's norm inside the symmetric subspace"),
        "is_plateau": variable(np.arange(nb) == br.plateau, ("branch",),
                           "the plateau branch (attr plateau_rule)"),
        "dead": variable([eq.is_dead(br.engine, fp) for fp in br.points], ("branch",),
                         "eps_g at the best constant predictor's (attr eps_g_constant): "
                         "the output does not depend on the input; never the plateau"),
        "specialized": variable(
            eq.specialized(R) if R_l is None else np.any(eq.specialized(R_l), axis=-1),
            ("branch",), "students distinguished (R_in not the same for all students i)"),
        "start": variable(np.array([fp.start for fp in br.points], dtype=object), ("branch",),
                      "first start that converged to this branch"),
    }
    data.update({
        "eps_g_error": variable([fp.eps_g_error for fp in br.points], ("branch",),
                            "error estimate of eps_g (0: exact engine)"),
        "rate_error": variable([fp.rate_error for fp in br.points], ("branch",),
                           "largest error estimate of the scaled right-hand side at the "
                           "fixed point (0: exact engine)", "1/(eta alpha)"),
        **_parameter_variables(experiment, [fp.params for fp in br.points],
                               "at the fixed point", br.engine),
        "branch_kind": variable(np.array([fp.kind for fp in br.points], dtype=object),
                                ("branch",), "kind of branch: symmetric, dead unit, "
                                "duplicated units (attr branch_kinds)"),
    })
    if norm.is_diagonal_scale():
        fixed = norm.parameters(model.K)
        s = np.array([norm.scale(q, {**fixed, **fp.params})
                      for q, fp in zip(Q, br.points, strict=True)])
        if invariant or not np.all(s == 1.0):
            data["Q_norm"] = variable(s[:, :, None] * Q * s[:, None, :],
                                  ("branch", "student", "student_"),
                                  "normalized overlap s_i Q_ik s_k (what the activation sees)")
            data["R_norm"] = variable(s[:, :, None] * R, ("branch", "student", "teacher"),
                                  "normalized overlap s_i R_in")
    coords = br.coords
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
            "plateau_rule": eq.PLATEAU_RULE,
            "eps_g_constant": eq.constant_predictor_error(br.engine),
            "branch_kinds": eq.BRANCH_KINDS,
            "jacobian_coordinates": ", ".join(f"{v}[{i},{k}]" for v, i, k in coords),
            "jacobian_method": "central differences, two Richardson levels (h = 1e-3)",
            "mode_classes": MODE_CLASSES,
            "fixed_point_definition": (
                "Q_ii = weight_norm and stationary angular flow (norms may grow through the "
                "eta^2 term)" if invariant else "zero of the full ODE right-hand side"),
            **_engine_attrs(experiment, br.engine),
        },
    )
    if Q_l is not None and R_l is not None:
        add_input_spaces(ds, inputs, Q_l, R_l, ("branch",), r=_mean_overlaps(
            inputs, [fp.params for fp in br.points]))
    return ds


def _mean_overlaps(inputs: Any, params: list[dict]) -> np.ndarray | None:
    """``r (branch, K)`` of the points' states (inputs with a mean; else None)."""
    if inputs.centred:
        return None
    return np.array([p[theory.MEAN_OVERLAP] for p in params])


# --------------------------------------------------------------------------------------
# hessian
# --------------------------------------------------------------------------------------


@attrs.frozen
class _PointSpectrum(Analyzer):
    """The options and the layout shared by ``hessian`` and ``fisher``: a spectrum at the
    fixed-point branches (found as ``fixedpoint`` finds them, at one weight norm or one
    per entry of ``weight_norm``) or at the order parameters ``at``."""

    eta: float | None = _option("eta")
    second_order: bool = _option("second_order")
    subspace: str = _option("subspace")
    weight_norm: float | tuple[float, ...] | None = _option("weight_norms")
    N: int | None = _option("N")
    at: OrderParameters | None = _option("at")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["at"] = None if self.at is None else self.at.to_dict()
        out["weight_norm"] = (list(self.weight_norm) if isinstance(self.weight_norm, tuple)
                              else self.weight_norm)
        return out

    def _check_point(self, experiment: Experiment) -> None:
        """The checks of ``weight_norm`` and ``at`` against the experiment."""
        model = experiment.model
        experiment.normalization.parameters(model.K)
        _check_weight_norm(experiment, self.weight_norm)
        if self.at is not None and (self.at.K, self.at.M) != (model.K, model.M):
            raise SpecificationError(
                f"'at' must have K={model.K}, M={model.M}, got K={self.at.K}, M={self.at.M}")

    def _per_weight_norm(self, one: Callable[[float | None], xr.Dataset]) -> xr.Dataset:
        """``one(weight_norm)``, or for a sequence of weight norms the results of ``one``
        at each, concatenated along a ``weight_norm`` dimension."""
        norms = self.weight_norm
        if not isinstance(norms, tuple):
            return one(norms)
        parts = [one(q) for q in norms]
        ds = xr.concat(parts, dim="weight_norm", data_vars="all", coords="minimal",
                       compat="override", combine_attrs="override", join="outer")
        ds["weight_norm"].attrs = parts[0]["weight_norm"].attrs
        return ds


@attrs.frozen
class HessianAnalyzer(_PointSpectrum):
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
    theta)``; their values are stored as ``param_<name>``): exactly with the closed-form
    engine (weightnorm's ``g``, batchnorm_affine's ``gamma``; its ``beta`` held at 0
    contributes an exact decoupled block), otherwise with the quadrature's error
    estimates (attr ``engine``; ``eigenvalue_error`` is the finite-difference truncation
    estimate alone when exact). Fixed parameters (e.g. batchnorm's ``gamma``) are stored
    in the attrs.

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
        Evaluate at these order parameters instead (one branch, no fixed-point search;
        with an input mean at overlaps ``r = 0`` with its direction).

    Inputs with a mean: the mean direction ``u`` is one more column of the span block
    (``dim_span`` and the rank of eigenspace ``mean_space`` count it); the plateau's
    ``mean_overlap`` is stored, and ``escape_dmean_overlap`` is the escape mode's change
    of ``r``.
    """

    name: ClassVar[str] = "hessian"
    description: ClassVar[str] = "exact weight-space Hessian spectrum of eps_g (any N)"
    #: The Hessian does not depend on the rule; the branches where it is evaluated do.
    supports_learning_rules: ClassVar[bool] = True
    #: Structured inputs: one span block over the eigenspaces and one complement block per
    #: eigenspace (multiplicity N_l - rank_l), at the fixed points per eigenspace.
    supports_structured_inputs: ClassVar[bool] = True
    #: Inputs with a mean: the mean direction joins the span block (``at``: r = 0).
    supports_input_mean: ClassVar[bool] = True

    flag_plateau: bool = _option("flag_plateau")
    horizon: float = _option("horizon")

    def check(self, experiment: Experiment) -> None:
        self._check_point(experiment)
        if self.at is None:
            eq.symmetric_subspace(experiment.model, self.subspace)

    def run(self, experiment: Experiment) -> xr.Dataset:
        eta = _resolve_eta(self.eta, experiment)
        N = experiment.init_N if self.N is None else int(self.N)
        return self._per_weight_norm(lambda q: self._one(experiment, eta, N, q))

    def _one(self, experiment: Experiment, eta: float, N: int, q: float | None) -> xr.Dataset:
        model, norm = experiment.model, experiment.normalization
        invariant = eq.scale_invariance(model, norm) == "unit"
        if self.at is not None:
            eng = _engine(experiment)
            Q, R = np.array(self.at.Q), np.array(self.at.R)
            inputs = model.input_distribution()
            if not inputs.isotropic:  # J J^T / N spread over the input eigenspaces
                Q, R = inputs.lift(Q), inputs.lift(R)
            if invariant and q is not None:
                Q, R = eq.rescale_weight_norm(Q, R, q)
            points = [(Q, R)]
            point_params: list[dict] = [{}]
            plateau = -1
            eps = [eng.generalization_error(Q, R)[0]]
            source = "given order parameters ('at')"
        else:
            br = _branches(experiment, eta, self.second_order, self.subspace, q,
                           self.flag_plateau)
            if not br.points:
                raise _no_branches(experiment)
            eng = br.engine
            points = [(fp.Q, fp.R) for fp in br.points]
            point_params = [fp.params for fp in br.points]
            plateau = br.plateau
            eps = [fp.eps_g for fp in br.points]
            source = "fixed points of the symmetric subspace ('fixedpoint' branches)"
        specs = [eq.weight_space_hessian(model, norm, Q, R, pp or None,
                                         engine=_landscape_engine(eng))
                 for (Q, R), pp in zip(points, point_params, strict=True)]
        ref = eq.symmetric_subspace(model, "exchangeable")
        K, M = model.K, model.M
        n_eigen = max(s.span.size for s in specs) + max(s.complement.size for s in specs)
        nb = len(specs)
        values = np.full((nb, n_eigen), np.nan)
        mult = np.zeros((nb, n_eigen), dtype=np.int64)
        block = np.full((nb, n_eigen), "", dtype=object)
        kinds, fracs = [], []
        for b, (spec, (Q, R)) in enumerate(zip(specs, points, strict=True)):
            if N < spec.dim_span:
                raise SpecificationError(
                    f"'N' must be >= dim S = {spec.dim_span} (the span of the weights), got {N}")
            ns, nc = spec.span.size, spec.complement.size
            values[b, :ns] = spec.span
            values[b, ns:ns + nc] = spec.complement
            mult[b, :ns] = 1
            mult[b, ns:ns + nc] = spec.complement_multiplicity(N)
            block[b, :ns] = "span"
            block[b, ns:ns + nc] = "complement" if spec.inputs is None else \
                [f"complement@{ell}" for ell in spec.complement_space]
            kind, frac = eq.classify_direction(
                ref, spec.escape_dQ, spec.escape_dR, Q, R, block=spec.escape_block)
            kinds.append(kind)
            fracs.append(frac)
        lam_min = np.array([s.lambda_min for s in specs])
        tol = 1e-9 * np.maximum(1.0, np.abs(lam_min))
        lam_min_mult = np.where(np.abs(values - lam_min[:, None]) <= tol[:, None], mult, 0).sum(1)
        inputs = model.input_distribution()
        Qb, Rb = np.array([p[0] for p in points]), np.array([p[1] for p in points])
        spaces = Qb.ndim == 4  # per input eigenspace (structured inputs)
        lead = ("eigenspace",) if spaces else ()
        data = {
            **order_parameter_variables(inputs.total(Qb) if spaces else Qb,
                                        inputs.total(Rb) if spaces else Rb, dims=("branch",)),
            "lambda_max": variable([s.lambda_max for s in specs], ("branch",),
                                   "largest Hessian eigenvalue (bounds the stable learning "
                                   "rate of gradient descent on eps_g)"),
            "eigenvalue": variable(values, ("branch", "eigen"),
                               "Hessian eigenvalue of eps_g w.r.t. W = J/sqrt(N) (NaN: padding)"),
            "multiplicity": variable(mult, ("branch", "eigen"),
                                 f"multiplicity at N = {N} (span: 1, complement: N - dim S)"),
            "block": variable(block, ("branch", "eigen"),
                          "block of the eigenvalue: span of W and B, or its complement"),
            "dim_span": variable([s.dim_span for s in specs], ("branch",),
                             "dim S, S = span of the rows of W and B/sqrt(N)"),
            "lambda_min": variable(lam_min, ("branch",),
                                   "most negative (smallest) Hessian eigenvalue"),
            "lambda_min_multiplicity": variable(lam_min_mult, ("branch",),
                                            f"multiplicity of lambda_min at N = {N}"),
            "escape_block": variable(np.array([s.escape_block for s in specs], dtype=object),
                                 ("branch",), "block of the escape (lambda_min) mode"),
            "escape_mode": variable(np.array(kinds, dtype=object), ("branch",),
                                "class of the escape mode (symmetric, symmetry-breaking, mixed, "
                                "norm, complement)"),
            "escape_symmetric_fraction": variable(
                fracs, ("branch",), "fraction of |(dQ, dR)| of the escape mode inside the "
                "symmetric subspace"),
            "escape_dQ": variable(np.array([s.escape_dQ for s in specs]),
                              ("branch", *lead, "student", "student_"),
                              "first-order change of Q along the unit escape mode dW"
                              + (" (per input eigenspace)" if spaces else "")),
            "escape_dR": variable(np.array([s.escape_dR for s in specs]),
                              ("branch", *lead, "student", "teacher"),
                              "first-order change of R along the unit escape mode dW"
                              + (" (per input eigenspace)" if spaces else "")),
            "eps_g": variable(eps, ("branch",), "generalization error"),
            "is_plateau": variable(np.arange(nb) == plateau, ("branch",),
                               "the plateau branch (attr plateau_rule)"),
        }
        data.update(_hessian_error_variables(specs, eng, n_eigen))
        wn = [eq.weight_norm_of(p[0]) for p in points]
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
                "(dim S = dim_span)" if not spaces else "span eigenvalues: 1; complement "
                "eigenvalues of input eigenspace l (block 'complement@l', lambda_l (G + "
                "G^T)): N_l - rank_l, N_l = the eigenspace's directions (attr "
                "input_block_sizes), rank_l that of its realization (dim_span = sum_l "
                "rank_l)",
                "hessian_coordinates": "W = J / sqrt(N) (Q = W W^T, R = W B^T / sqrt(N)); "
                "eps_g as a function of the K x N entries of W",
                "hessian_scaling": "scale-invariant normalization: lambda(c W) = lambda(W) / c^2 "
                "with weight_norm = Q_ii = |W_i|^2, so lambda is proportional to 1/weight_norm",
                "evaluated_at": source,
                "plateau_branch": int(plateau),
                "eps_g_constant": eq.constant_predictor_error(eng),
                "mode_classes": MODE_CLASSES,
                **_hessian_attrs(experiment, eng),
            },
        )
        if spaces:
            add_input_spaces(ds, inputs, Qb, Rb, ("branch",), N=N, r=_mean_overlaps(
                inputs, [{**eng.params(), **pp} for pp in point_params]))
        if invariant and (q is not None or self.at is None):
            ds = ds.assign_coords(weight_norm=((), 1.0 if q is None else float(q), {
                "long_name": "weight norm Q_ii = |W_i|^2 at which the Hessian is evaluated",
                "units": "1"}))
        else:
            ds = ds.assign_coords(weight_norm=("branch", wn, {
                "long_name": "weight norm Q_ii = |W_i|^2 (mean over students) of the point",
                "units": "1"}))
        return ds


def _hessian_error_variables(specs: list, eng: Engine, n_eigen: int) -> dict[str, Any]:
    nb = len(specs)
    err = np.full((nb, n_eigen), np.nan)
    for b, sp in enumerate(specs):
        err[b, :sp.span.size] = sp.span_error
        err[b, sp.span.size:sp.span.size + sp.complement.size] = sp.complement_error
    out = {
        "eigenvalue_error": variable(err, ("branch", "eigen"),
                                 "error estimate of the eigenvalue (standard error of replicate "
                                 "Hessians + finite-difference truncation)"),
        "lambda_min_error": variable([sp.lambda_min_error for sp in specs], ("branch",),
                                 "error estimate of lambda_min"),
        "gradient_norm": variable([sp.gradient_norm for sp in specs], ("branch",),
                              "norm of the gradient of eps_g over (W, theta) at the point "
                              "(nonzero away from critical points of eps_g)"),
    }
    for block in ("theta", "span"):  # the couplings of the complement (zero in theory)
        name = f"coupling_complement_{block}"
        out[name] = variable([getattr(sp, name) for sp in specs], ("branch",),
                             f"largest |d^2 eps_g / d(complement) d({block})| measured "
                             "(zero in theory)")
        out[f"{name}_error"] = variable([getattr(sp, f"{name}_error") for sp in specs],
                                        ("branch",), f"error estimate of {name}")
    if specs and specs[0].escape_dr is not None:  # inputs with a mean: r is state
        out["escape_dmean_overlap"] = variable(
            np.array([sp.escape_dr for sp in specs]), ("branch", "student"),
            "first-order change of the overlaps r = W u with the input mean's direction "
            "along the unit escape mode dW")
    for k in eng.trainable:
        if k == theory.MEAN_OVERLAP:  # state (mean_overlap), not a parameter
            continue
        what = "trained readout" if k in eng.model_trainable else "trainable parameter"
        out[f"param_{k}"] = variable(np.array([sp.params[k] for sp in specs]),
                                     ("branch", "student"),
                                 f"value of the {what} {k} at which the Hessian "
                                 "is evaluated")
        out[f"escape_d{k}"] = variable(np.array([sp.escape_dtheta[k] for sp in specs]),
                                   ("branch", "student"),
                                   f"component of the unit escape mode along {k}")
    return out


def _hessian_attrs(experiment: Experiment, eng: Engine) -> dict[str, Any]:
    norm = experiment.normalization
    held = (f"; shift parameters {', '.join(eng.held)} at 0: their block (exact closed "
            "form) is decoupled from (W, theta) by the odd symmetry") if eng.held else ""
    # the mean overlap r (inputs with a mean) is state, in the span block's u column
    theta = [k for k in eng.trainable if k != theory.MEAN_OVERLAP]
    out = {
        **_engine_attrs(experiment, eng),
        "learning_rule_dependence": RULE_INDEPENDENT,
        "hessian_method": (
            "exact weight gradients " if eng.exact else "per-replicate weight gradients "
            "(randomized QMC, common random numbers) ") + "differentiated by central "
        "differences with one Richardson level; realization in K + M dimensions plus one "
        "orthogonal (complement) dimension" + held,
        "trainable_parameters_included": (
            "Hessian over (W, theta), theta = " + ", ".join(theta)
            + " (theta joins the span block; its coupling to the complement is zero)")
        if theta else "none (normalization has no trainable parameters)",
    }
    if eng.model_trainable:
        out["hessian_readout_scaling"] = READOUT_SCALING
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
        Where the run starts: the perturbed plateau branch, or the Experiment's initial
        condition (see above).
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
    subspace : {"auto", "matched", "exchangeable"}
        The symmetric subspace of the plateau's fixed-point search (as for
        ``fixedpoint``).
    horizon : float
        No longer used (the plateau is chosen without integrating the ODE); kept so that
        stored specifications load.
    """

    name: ClassVar[str] = "escape"
    description: ClassVar[str] = "escape time from the symmetric plateau (ODE)"
    #: The plateau, its unstable mode and the run are those of the experiment's rule.
    supports_learning_rules: ClassVar[bool] = True
    #: Structured inputs: the plateau and the flow per input eigenspace.
    supports_structured_inputs: ClassVar[bool] = True
    #: Inputs with a mean: the plateau's r moves with the escape mode.
    supports_input_mean: ClassVar[bool] = True
    size_options: ClassVar[dict[str, str]] = {"n_points": "trajectory"}

    start: str = attrs.field(default="fixedpoint", validator=one_of("fixedpoint", "init"))
    perturbation: float = attrs.field(default=1e-3, converter=to_float, validator=gt(0.0))
    eta: float | None = _option("eta")
    weight_norm: float | None = _option("weight_norm")
    alpha_max: float = attrs.field(default=10000.0, converter=to_float, validator=gt(0.0))
    n_points: int = attrs.field(default=2001, validator=integer(minimum=2))
    alpha: tuple[float, ...] | None = _option("alpha")
    rtol: float = _option("rtol")
    atol: float = _option("atol")
    method: str = attrs.field(
        default="DOP853", validator=one_of("DOP853", "RK45", "LSODA", "Radau", "BDF"))
    second_order: bool = _option("second_order")
    max_value: float = attrs.field(default=1e8, converter=to_float, validator=gt(0.0))
    subspace: str = _option("subspace")
    horizon: float = _option("horizon")
    plateau: str = attrs.field(default="eta", validator=one_of("eta", "gradient_flow"))
    quadrature: dict | None = _option("quadrature")
    stop_at_escape: bool = attrs.field(default=False, converter=to_bool, validator=boolean())

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
        invariant = eq.scale_invariance(model, norm) == "unit"
        exp_eta = experiment if eta == experiment.eta else experiment.evolve(eta=eta)
        if self.start == "init":
            initial = experiment.initial_order_parameters()
            q = eq.weight_norm_of(initial.Q) if invariant else None
        else:
            q = (1.0 if self.weight_norm is None else self.weight_norm) if invariant else None
        if self.plateau == "gradient_flow":
            ref = _branches(experiment, 0.0, False, self.subspace, q, True, self.quadrature,
                            partition=False)
            if ref.plateau < 0:
                raise SpecificationError(
                    f"no unstable symmetric fixed point (plateau) of gradient flow found for "
                    f"K={model.K}, M={model.M}, normalization {norm.name!r}")
            eps_plateau = ref.points[ref.plateau].eps_g
        if self.plateau == "gradient_flow" and self.start == "init":
            br = ref  # lambda_min, rate and weight_norm_plateau of the eta -> 0 plateau
        else:
            br = _branches(experiment, eta, self.second_order, self.subspace, q, True,
                           self.quadrature, partition=False)
        if br.plateau < 0:
            raise SpecificationError(_no_plateau(br, model, norm, eta, q))
        fp = br.points[br.plateau]
        if self.plateau == "eta":
            eps_plateau = fp.eps_g
        spec = eq.weight_space_hessian(model, norm, fp.Q, fp.R, fp.params or None,
                                       engine=_landscape_engine(br.engine))
        how = "experiment init"
        dparams: dict[str, np.ndarray] = {}
        if self.start == "fixedpoint":
            vec = eq.unstable_vector(br.coords, br.eigvals[br.plateau], br.eigvecs[br.plateau])
            initial, how, dparams = eq.escape_start(model, fp, br.coords, vec, spec,
                                                    self.perturbation)
        grid = (np.linspace(0.0, self.alpha_max, self.n_points) if self.alpha is None
                else np.asarray(self.alpha))
        params = fp.params if self.start == "fixedpoint" else None
        if params:  # the trainable parameters move along the mode too
            params = {k: np.asarray(v, dtype=float) + dparams.get(k, 0.0)
                      for k, v in params.items()}
        traj = theory.integrate(
            model, norm, initial, eta=eta, batch_size=experiment.batch_size, alpha=grid,
            rtol=self.rtol, atol=self.atol, method=self.method,
            second_order=self.second_order, max_value=self.max_value,
            params=params or None, quadrature=self.quadrature,
            stop_below=0.5 * eps_plateau if self.stop_at_escape else None,
            rule=experiment.learning_rule,
        )
        ds = trajectory_dataset(exp_eta, traj, grid, method=self.method, rtol=self.rtol,
                                atol=self.atol, second_order=self.second_order)
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
        Qe = ds.Q_space.values.sum(axis=1) if "Q_space" in ds else ds.Q.values  # J J^T / N
        wn = np.mean(np.diagonal(Qe, axis1=1, axis2=2), axis=1)
        wn_escape = float(np.interp(alpha_escape, grid, wn)) if escaped else float("nan")
        rate = float(br.eigvals[br.plateau][0].real)
        ds["weight_norm"] = variable(wn, ("alpha",),
                                     "weight norm Q_ii = |W_i|^2 (mean over students)")
        ds["alpha_escape"] = variable(alpha_escape, (), "first alpha with eps_g < eps_plateau / 2 "
                                  "(NaN if not within alpha_max)")
        ds["escaped"] = variable(escaped, (),
                             "eps_g fell below half the plateau value within alpha_max")
        ds["eps_plateau"] = variable(eps_plateau, (), "eps_g of the symmetric plateau fixed point "
                                 "defining the threshold (see attr plateau)")
        ds["weight_norm_plateau"] = variable(fp.weight_norm, (),
                                         "weight norm Q_ii of the plateau fixed point")
        ds["weight_norm_at_escape"] = variable(wn_escape, (), "weight norm Q_ii at alpha_escape")
        ds["lambda_min"] = variable(spec.lambda_min, (), "most negative Hessian eigenvalue at the "
                                "plateau fixed point (W = J/sqrt(N) coordinates; eta -> 0 "
                                "plateau if start='init' and plateau='gradient_flow')")
        ds["unstable_rate"] = variable(rate, (), "largest real part of the ODE Jacobian "
                                       "eigenvalues "
                                   "at the plateau", "1/(eta alpha)")
        ds.update(_escape_mode_variables(experiment, br, spec))
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
        ds.attrs.update(_engine_attrs(experiment, br.engine))
        return ds


def _escape_mode_variables(experiment: Experiment, br: _Branches, spec: Any
                           ) -> dict[str, Any]:
    """The escape direction at the plateau in both layers: the unit most unstable
    Jacobian eigenvector (``unstable_dQ``, ``unstable_dR``, ``unstable_d<param>``) and the
    Hessian's escape mode (unit ``(dW, dtheta)``: ``hessian_escape_d<param>`` and the
    share ``|dW|^2`` of the first layer)."""
    model = experiment.model
    vec = eq.unstable_vector(br.coords, br.eigvals[br.plateau], br.eigvecs[br.plateau])
    dQ, dR, dth = eq.mode_matrices(model, br.coords, vec)
    lead = ("eigenspace",) if dQ.ndim == 3 else ()  # structured inputs: per eigenspace
    out = {
        "unstable_dQ": variable(dQ, (*lead, "student", "student_"), "change of Q along the "
                                "unit most unstable ODE Jacobian eigenvector at the plateau"),
        "unstable_dR": variable(dR, (*lead, "student", "teacher"), "change of R along the "
                                "unit most unstable ODE Jacobian eigenvector at the plateau"),
        "hessian_escape_first_layer_share": variable(
            float(np.sum(spec.escape_dW ** 2)), (), "|dW|^2 of the unit Hessian escape mode "
            "(dW, dtheta): the first layer's share (the rest: the parameters)"),
    }
    for k, v in dth.items():
        out[f"unstable_d{k}"] = variable(v, ("student",), f"component along {k} of the unit "
                                         "most unstable ODE Jacobian eigenvector")
    for k, v in spec.escape_dtheta.items():
        out[f"hessian_escape_d{k}"] = variable(np.asarray(v, dtype=float), ("student",),
                                               f"component along {k} of the unit Hessian "
                                               "escape mode")
    return out


def _no_plateau(br: _Branches, model: Any, norm: Any, eta: float, q: float | None) -> str:
    """Why the escape analyzer has no plateau to start from: the symmetric branches found
    and their unstable directions (a stable symmetric branch: the symmetric phase does not
    decay at this eta and held weight norm)."""
    sym = [(fp, int(np.sum(lam.real > 1e-9))) for fp, lam in zip(br.points, br.eigvals,
                                                                  strict=True)
           if not np.any(eq.specialized(fp.R)) and fp.kind == "symmetric"]
    where = (f"K={model.K}, M={model.M}, normalization {norm.name!r}, eta={eta}"
             + ("" if q is None else f", weight norm {q:g} (eta / weight norm = "
                f"{eta / q:g})"))
    if not sym:
        return f"no symmetric fixed point (plateau) found for {where}"
    dead = [eq.is_dead(br.engine, fp) for fp, _ in sym]
    found = "; ".join(f"eps_g {fp.eps_g:.6g} with {n} unstable direction(s)"
                      + (" (dead)" if d else "") for (fp, n), d in zip(sym, dead, strict=True))
    if all(dead):
        return (f"no plateau to escape from: every symmetric branch found is dead (eps_g "
                f"at or above the best constant predictor's, "
                f"{eq.constant_predictor_error(br.engine):.6g}: the output does not depend "
                f"on the input) for {where}; symmetric branches found: {found}")
    why = ""
    if any(n == 0 for _, n in sym):
        why = (": a symmetric branch is stable here, so the symmetric phase is not left at "
               "this eta" + ("" if q is None else " and held weight norm (batch norm's weight "
                             "norm grows in the full ODE: run 'dynamics' from the init, or "
                             "choose a larger weight_norm / smaller eta)"))
    return (f"no unstable symmetric fixed point (plateau) to escape from for {where}; "
            f"symmetric branches found: {found}{why}")


@hookimpl
def symphase_register_analyzers(registry: Any) -> None:
    registry.add_analyzer(FixedPointAnalyzer)
    registry.add_analyzer(HessianAnalyzer)
    registry.add_analyzer(EscapeAnalyzer)
    from plugins.fisher import FisherAnalyzer  # here: plugins.fisher imports this module

    registry.add_analyzer(FisherAnalyzer)
