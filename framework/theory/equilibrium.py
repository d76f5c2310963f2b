"""Equilibria of the order-parameter ODE and the exact weight-space Hessian.

Written once against :class:`framework.theory.Engine`: every function takes the model
and the normalization and an ``engine`` (a name for :func:`framework.theory.select_engine`,
or an engine object already chosen), and uses only the engine's ``rates``,
``generalization_error``, ``weight_moments`` and ``held_hessian``. Results carry the
trainable parameters and error estimates whichever engine ran (errors 0 when exact,
``params`` empty without trainable parameters). It knows no particular normalization.

Conventions (DESIGN.md, "Mathematics")
--------------------------------------
* ``eps_g(Q, R) = E[(zeta - sigma)^2] / 2`` including ``noise / 2``; learning rate
  ``eta`` on ``J`` with step ``eta / sqrt(N)``, time ``alpha = steps / N`` -- i.e. plain
  gradient descent with rate ``eta`` on ``W = J / sqrt(N)``, so that ``Q = W W^T``,
  ``R = W Btilde^T`` (``Btilde = B / sqrt(N)``) and ``F(W) = eps_g(W W^T, W Btilde^T)``.
* *Scaled right-hand side* ``r(Q, R) = (d(Q, R)/d alpha) / eta``: the first-order drift
  (``-`` the push-forward of ``grad F``) plus ``(eta / B) E[a a^T]`` when the
  ``eta^2`` term is kept. ``eta = 0`` means the gradient-flow limit (``eta^2`` term
  dropped); rates derived from ``r`` are per unit of ``eta * alpha``.
* Weight norm: ``Q_ii = |W_i|^2`` (the squared norm of a student vector in the
  ``W = J / sqrt(N)`` coordinates; ``|J_i|^2 / N``).

Scale-invariant normalizations (``normalization.scale_invariant``)
------------------------------------------------------------------
The output depends on ``W_i`` only through ``W_i / |W_i|``: only the *angles*
``Q_ik / sqrt(Q_ii Q_kk)`` and ``R_in / sqrt(Q_ii)`` matter, and the weight norms
``Q_ii`` change only through the ``eta^2`` term. A fixed point "at weight norm
``q``" is a point with ``Q_ii = q`` for all ``i`` at which the *angular* part of the
flow vanishes: ``dQ_ik - Q_ik (dQ_ii / 2Q_ii + dQ_kk / 2Q_kk) = 0`` and
``dR_in - R_in dQ_ii / 2Q_ii = 0`` (:func:`angular_rhs`), i.e. the angles are
stationary while the norms may grow. For ``eta = 0`` this is an ordinary fixed point
(the norms are conserved); for ``eta > 0`` it depends on ``eta / q`` (the effective
learning rate of the angles).

Symmetric subspaces (:class:`SymmetricSubspace`)
------------------------------------------------
``"matched"`` (``K = M``, ``T`` invariant under permuting teachers, e.g. ``T = I``):
``Q_ii = Q, Q_ik = C, R_ii = R, R_in = S`` (coordinates ``Q, C, R, S``).
``"exchangeable"`` (any ``K, M, T``): students interchangeable,
``Q_ii = Q, Q_ik = C, R_in = r_n`` (coordinates ``Q, C, R[0] ... R[M-1]``).
Both are invariant under the ODE (by the permutation symmetry of the students,
and for ``"matched"`` of students and teachers together).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
from scipy import optimize

from framework.activation import Activation
from framework.model import Model, OrderParameters
from framework.normalization import Normalization
from framework.theory import MEAN_OVERLAP, AccuracyError, Engine, Quadrature, select_engine
from framework.theory.ruled import RuleEngine
from framework.validators import SpecificationError, check_int, check_real

__all__ = [
    "BRANCH_KINDS",
    "FixedPoint",
    "HessianSpectrum",
    "SymmetricSubspace",
    "angular_rhs",
    "canonical_mode",
    "classify_direction",
    "common_angular_rhs",
    "constant_predictor_error",
    "default_starts",
    "escape_start",
    "find_fixed_points",
    "is_dead",
    "jacobian_coordinates",
    "mode_matrices",
    "ode_jacobian",
    "parameters_attrs",
    "plateau_branch",
    "psd_margin",
    "realize_mode",
    "rescale_weight_norm",
    "scale_invariance",
    "sorted_eigen",
    "specialized",
    "symmetric_subspace",
    "teacher_overlaps",
    "to_order_parameters",
    "unstable_vector",
    "weight_norm_of",
    "weight_space_hessian",
]

#: Relative tolerance under which a covariance eigenvalue counts as zero (rank).
RANK_TOL = 1e-10
#: Branch searches reject roots with a weight norm above this many teacher norms: the
#: right-hand side of a saturating activation decays towards |W|^2 -> infinity, where a
#: solver's tolerance is met without a fixed point.
SATURATED_NORM = 1e4
#: A root is accepted when ``max |r|`` (scaled right-hand side) is below this.
RESIDUAL_TOL = 1e-10
#: Two roots closer than this (max abs difference of Q, R) are the same branch.
DEDUPE_TOL = 1e-6

EngineArg = str | Engine


def _engine(
    model: Model, normalization: Normalization, engine: EngineArg,
    quadrature: Quadrature | Mapping[str, Any] | None = None,
    activation: Activation | None = None,
) -> Engine:
    """``engine`` itself if it is an engine object, else :func:`select_engine`."""
    if isinstance(engine, Engine):
        return engine
    return select_engine(model, normalization, activation, engine=engine,
                         quadrature=quadrature)


# --------------------------------------------------------------------------------------
# Right-hand sides
# --------------------------------------------------------------------------------------


def _unit_norms(Q: np.ndarray, spaces: bool) -> np.ndarray:
    """``Q_ii`` (the squared weight norms); with ``spaces`` (axis -3 the input
    eigenspace) their sum over the eigenspaces, ``|J_i|^2 / N``, kept on axis -3."""
    d = np.diagonal(Q, axis1=-2, axis2=-1)
    return d.sum(axis=-2, keepdims=True) if spaces else d


def angular_rhs(
    Q: np.ndarray, R: np.ndarray, dQ: np.ndarray, dR: np.ndarray, *, spaces: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Project a flow ``(dQ, dR)`` on the angles (norm changes removed).

    ``dQ_ik - Q_ik (dQ_ii / 2Q_ii + dQ_kk / 2Q_kk)`` (zero on the diagonal) and
    ``dR_in - R_in dQ_ii / 2Q_ii``: ``q`` times the rate of change of the angles
    ``Q_ik / sqrt(Q_ii Q_kk)``, ``R_in / sqrt(Q_ii)`` when ``Q_ii = q``. ``spaces``: the
    state is per input eigenspace (axis -3, :mod:`framework.inputs`) and the norms are
    ``sum_l Q_l,ii`` (what a scale-invariant normalization's gradient conserves).
    """
    rate = _unit_norms(dQ, spaces) / (2.0 * _unit_norms(Q, spaces))
    aQ = dQ - Q * (rate[..., :, None] + rate[..., None, :])
    aR = dR - R * rate[..., :, None]
    return aQ, aR


def rescale_weight_norm(
    Q: np.ndarray, R: np.ndarray, weight_norm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rescale each student vector to ``Q_ii = weight_norm`` (angles kept); a state per
    input eigenspace (``Q (L, K, K)``) to ``sum_l Q_l,ii = weight_norm``."""
    c = np.sqrt(weight_norm / _unit_norms(Q, Q.ndim == 3))
    return Q * c[..., :, None] * c[..., None, :], R * c[..., :, None]


# --------------------------------------------------------------------------------------
# Symmetric subspaces
# --------------------------------------------------------------------------------------


@attrs.frozen
class SymmetricSubspace:
    """A linear subspace of order parameters ``(Q, R) = sum_a theta_a (A_a, B_a)``.

    Each coordinate is the common value of ``Q`` or ``R`` on a set of entries
    (disjoint supports), so :meth:`project` is the mean over each support.

    Attributes
    ----------
    kind : "matched" or "exchangeable" (see the module docstring)
    names : coordinate names, e.g. ``("Q", "C", "R", "S")``
    masks_Q, masks_R : 0/1 arrays (p, K, K) and (p, K, M), the supports
    """

    kind: str
    K: int
    M: int
    names: tuple[str, ...]
    masks_Q: np.ndarray = attrs.field(eq=False)
    masks_R: np.ndarray = attrs.field(eq=False)
    #: number of input eigenspaces of a state per eigenspace (0: isotropic inputs); the
    #: coordinates are then ``name[l]`` and the masks ``(p, L, K, K)``, ``(p, L, K, M)``
    spaces: int = 0

    @property
    def size(self) -> int:
        return len(self.names)

    def embed(self, theta: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        coef = np.asarray(theta, dtype=float)
        return (np.tensordot(coef, self.masks_Q, axes=1),
                np.tensordot(coef, self.masks_R, axes=1))

    def project(self, Q: np.ndarray, R: np.ndarray) -> np.ndarray:
        """Coordinates of the orthogonal projection (means over each support)."""
        axes = tuple(range(1, self.masks_Q.ndim))
        back = list(range(-len(axes), 0))
        count = self.masks_Q.sum(axis=axes) + self.masks_R.sum(axis=axes)
        total = np.tensordot(self.masks_Q, Q, axes=(list(axes), back)) + np.tensordot(
            self.masks_R, R, axes=(list(axes), back)
        )
        return np.moveaxis(total, 0, -1) / count

    def symmetric_fraction(self, dQ: np.ndarray, dR: np.ndarray) -> float:
        """``|P (dQ, dR)| / |(dQ, dR)|`` (Frobenius) for the orthogonal projector P."""
        pQ, pR = self.embed(self.project(dQ, dR))
        total = math.sqrt(float(np.sum(dQ**2) + np.sum(dR**2)))
        if total == 0.0:
            return float("nan")
        return math.sqrt(float(np.sum(pQ**2) + np.sum(pR**2))) / total


def _matched_allowed(model: Model) -> bool:
    if model.K != model.M:
        return False
    T = model.T
    off = T[~np.eye(model.M, dtype=bool)]
    return bool(np.allclose(np.diag(T), T[0, 0], rtol=1e-12, atol=0)
                and (off.size == 0 or np.allclose(off, off[0], rtol=1e-12, atol=0)))


def symmetric_subspace(model: Model, kind: str = "auto") -> SymmetricSubspace:
    """The symmetric subspace of ``model``: ``"matched"``, ``"exchangeable"`` or ``"auto"``.

    ``"auto"`` is ``"matched"`` when ``K = M`` and ``T`` is invariant under permuting
    the teachers (``T = t0 I + t1 (1 1^T - I)``), else ``"exchangeable"``.
    """
    if kind not in ("auto", "matched", "exchangeable"):
        raise SpecificationError(
            f"'subspace' must be one of 'auto', 'matched', 'exchangeable', got {kind!r}"
        )
    K, M = model.K, model.M
    if kind == "auto":
        kind = "matched" if _matched_allowed(model) else "exchangeable"
    if kind == "matched" and not _matched_allowed(model):
        raise SpecificationError(
            "'subspace' 'matched' needs K == M and T invariant under permuting teachers, "
            f"got K={K}, M={M}, T={model.T.tolist()}"
        )
    eyeK = np.eye(K)
    offK = 1.0 - eyeK
    zQ, zR = np.zeros((K, K)), np.zeros((K, M))
    names, mQ, mR = ["Q"], [eyeK], [zR]
    if K > 1:
        names.append("C")
        mQ.append(offK)
        mR.append(zR)
    if kind == "matched":
        names.append("R")
        mQ.append(zQ)
        mR.append(np.eye(K, M))
        if K > 1:
            names.append("S")
            mQ.append(zQ)
            mR.append(offK)
    else:
        for n in range(M):
            names.append(f"R[{n}]")
            mQ.append(zQ)
            col = np.zeros((K, M))
            col[:, n] = 1.0
            mR.append(col)
    inputs = model.input_distribution()
    if inputs.isotropic:
        return SymmetricSubspace(kind, K, M, tuple(names), np.array(mQ), np.array(mR))
    # per input eigenspace: every coordinate once per eigenspace, "name@l"
    L, p = inputs.L, len(names)
    bQ, bR = np.zeros((L * p, L, K, K)), np.zeros((L * p, L, K, M))
    for ell in range(L):
        bQ[ell * p:(ell + 1) * p, ell] = mQ
        bR[ell * p:(ell + 1) * p, ell] = mR
    return SymmetricSubspace(kind, K, M, tuple(f"{n}@{ell}" for ell in range(L) for n in names),
                             bQ, bR, L)


def _mean_overlap_start(model: Model, R: np.ndarray) -> np.ndarray:
    """Inputs with a mean: the overlaps ``r = R_mu T_mu^{-1} s`` with the mean direction of
    students in the teacher span with overlaps ``R`` (per eigenspace, ``R_mu`` in the
    mean's eigenspace): where a start with teacher overlaps ``R`` puts ``r``."""
    inputs = model.input_distribution()
    R = np.asarray(R, dtype=float)
    T_l = inputs.lift(model.T)
    l = inputs.mean_space
    R_mu, T_mu = (R[l], T_l[l]) if R.ndim == 3 else (R * inputs.fractions[l], T_l[l])
    return R_mu @ np.linalg.solve(T_mu, inputs.teacher_overlap(model.M))


def default_starts(
    model: Model, subspace: SymmetricSubspace
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The documented starting points of :func:`find_fixed_points` as ``(label, Q, R)``.

    With ``u = sum_n Btilde_n`` (the teachers' sum) and
    ``a0 = 1 / sqrt(K (2K - 1) u.u / K)`` (Saad & Solla's plateau scale for ``T = I``):

    * ``unspecialized(a)``: all students ``W_i = a u`` for ``a`` in
      ``a0 * (1, 0.5, 2, -1)``, and the same plus an independent orthogonal part of
      squared norm 0.3 per student;
    * ``matched`` subspace only: ``specialized``: ``W_i = c Btilde_i`` for ``c`` in
      ``(1, 0.7, -1)``, and ``mixed``: ``W_i = 0.5 Btilde_i + 0.5 a0 u``;
    * ``exchangeable`` subspace only: ``W_i = a0 sqrt(K) Btilde_n`` for each teacher
      ``n`` (every student on one teacher).

    Each start is projected on the subspace (scale-invariant normalizations rescale
    it to the requested weight norm afterwards). With structured inputs the above are
    the pre-activation covariances (``T`` replaced by the teacher's, ``mean_eigenvalue *
    T``), spread over the eigenspaces in proportion to their size: ``Q_l = f_l Q /
    mean_eigenvalue`` (so that ``sum_l lambda_l Q_l = Q``).
    """
    K, M = model.K, model.M
    inputs = model.input_distribution()
    # the scales of the pre-activations: with structured inputs the teacher's covariance
    # is mean_eigenvalue * T (and the starts below are pre-activation covariances)
    T = inputs.teacher_covariance(model.T)
    one = np.ones(M)
    uu = float(one @ T @ one)
    a0 = 1.0 / math.sqrt((2 * K - 1) * uu)
    starts = []

    def add(label: str, coef: np.ndarray, orth: float = 0.0) -> None:
        # rows of coef: W_i = sum_n coef[i, n] Btilde_n + orthogonal part
        Q = coef @ T @ coef.T + orth * np.eye(K)
        R = coef @ T
        starts.append((label, Q, R))

    for factor in (1.0, 0.5, 2.0, -1.0):
        coef = np.full((K, M), factor * a0)
        add(f"unspecialized a={factor:g}*a0", coef)
        add(f"unspecialized a={factor:g}*a0 + orthogonal 0.3", coef, 0.3)
    if subspace.kind == "matched":
        for c in (1.0, 0.7, -1.0):
            add(f"specialized c={c:g}", c * np.eye(K))
        add("mixed", 0.5 * np.eye(K) + 0.5 * a0)
    else:
        for n in range(M):
            coef = np.zeros((K, M))
            coef[:, n] = a0 * math.sqrt(K)
            add(f"teacher {n}", coef)
    if not inputs.isotropic:  # Q_l = f_l Q / mean_eigenvalue: sum_l lambda_l Q_l = Q
        mean = inputs.mean_eigenvalue
        starts = [(label, inputs.lift(Q / mean), inputs.lift(R / mean))
                  for label, Q, R in starts]
    return starts



# --------------------------------------------------------------------------------------
# Fixed points
# --------------------------------------------------------------------------------------


@attrs.frozen
class FixedPoint:
    """A fixed point of the ODE restricted to a symmetric subspace.

    Attributes
    ----------
    Q, R : ndarray
        The order parameters (norm-conserving normalizations: ``Q_ii = weight_norm``).
    theta : ndarray
        Its coordinates in :attr:`subspace` (names ``subspace.names``).
    residual : float
        ``max |r|`` of the full scaled right-hand side (angular part for norm-conserving
        normalizations), per unit of ``eta * alpha``.
    eps_g : float
    weight_norm : float
        Mean ``Q_ii``.
    start : str
        Label of the first start that converged to it.
    subspace : SymmetricSubspace
    params : dict
        Trainable (and held) parameter name -> value per unit (K,); empty without.
    rate_error : float
        Largest error estimate of the scaled right-hand side there (0: exact engine).
    eps_g_error : float
        Error estimate of ``eps_g`` (0: exact engine).
    """

    Q: np.ndarray = attrs.field(eq=False)
    R: np.ndarray = attrs.field(eq=False)
    theta: np.ndarray = attrs.field(eq=False)
    residual: float
    eps_g: float
    weight_norm: float
    start: str
    subspace: SymmetricSubspace
    params: dict = attrs.field(factory=dict, eq=False)
    rate_error: float = 0.0
    eps_g_error: float = 0.0
    kind: str = "symmetric"


#: Kinds of :class:`FixedPoint` (attr ``branch_kinds`` of the ``fixedpoint`` dataset).
BRANCH_KINDS = (
    "symmetric: a fixed point of the ODE restricted to the symmetric subspace (all "
    "students interchangeable); 'dead unit': the last student has readout v = 0 and a "
    "weight vector J = 0 (or orthogonal to the teachers and the other students where a "
    "normalization needs |J| > 0), the others interchangeable; 'duplicated units': the "
    "last two students are identical (same J and v), the others interchangeable "
    "(K >= 3). The last two exist only with a trained readout (a dead or duplicated "
    "unit is invariant under the ODE there; with a fixed readout v = 1 it is not a "
    "fixed point); their symmetric_coordinate is the projection on the symmetric "
    "subspace"
)


def weight_norm_of(Q: np.ndarray) -> float:
    """Mean ``|W_i|^2`` (``Q_ii``; summed over the input eigenspaces of ``Q (L, K, K)``)."""
    return float(np.mean(_unit_norms(Q, Q.ndim == 3)))


def psd_margin(Q: np.ndarray, R: np.ndarray, T: np.ndarray) -> float:
    """Smallest eigenvalue of ``[[Q, R], [R^T, T]]`` relative to ``max(1, largest)``; for
    a state per input eigenspace (``Q (L, K, K)``, ``T (L, M, M)``, e.g.
    :func:`teacher_overlaps`) the smallest over the eigenspaces."""
    if Q.ndim == 3:
        return min(psd_margin(q, r, t) for q, r, t in zip(Q, R, T, strict=True))
    cov = np.block([[Q, R], [R.T, T]])
    lam = np.linalg.eigvalsh(cov)
    return float(lam[0] / max(1.0, lam[-1]))


def state_margin(model: Model, Q: np.ndarray, R: np.ndarray, params: Mapping[str, Any]
                 ) -> float:
    """:func:`psd_margin` of a state, with an input mean also of eigenspace ``mean_space``'s
    Gram matrix augmented by the mean direction ``u``: ``[[Q_mu, R_mu, r], [R_mu^T, T_mu,
    s], [r^T, s^T, 1]]`` (weights exist with these overlaps iff it is positive
    semi-definite: the residual ``Q_mu - r r^T`` etc. is its Schur complement)."""
    T = teacher_overlaps(model)
    margin = psd_margin(Q, R, T)
    inputs = model.input_distribution()
    if inputs.centred or params.get(MEAN_OVERLAP) is None or Q.ndim != 3:
        return margin
    ell = inputs.mean_space
    r = np.asarray(params[MEAN_OVERLAP], dtype=float).reshape(-1, 1)
    s = inputs.teacher_overlap(model.M).reshape(-1, 1)
    top = np.concatenate([Q[ell], R[ell], r], axis=1)
    mid = np.concatenate([R[ell].T, T[ell], s], axis=1)
    bottom = np.concatenate([r.T, s.T, np.ones((1, 1))], axis=1)
    lam = np.linalg.eigvalsh(np.concatenate([top, mid, bottom], axis=0))
    return min(margin, float(lam[0] / max(1.0, lam[-1])))


def teacher_overlaps(model: Model) -> np.ndarray:
    """``T`` of the state: the model's ``T``, or ``T_l = f_l T`` per input eigenspace
    (structured inputs, :mod:`framework.inputs`)."""
    inputs = model.input_distribution()
    T = np.asarray(model.T, dtype=float)
    return T if inputs.isotropic else inputs.lift(T)


def to_order_parameters(Q: np.ndarray, R: np.ndarray, T: np.ndarray) -> OrderParameters:
    """OrderParameters of a point on (or within rounding of) the PSD cone's boundary."""
    cov = np.block([[Q, R], [R.T, T]])
    lam, vec = np.linalg.eigh(cov)
    if lam[0] < 0:  # clip rounding-level negatives so that the constructor accepts it
        cov = (vec * np.clip(lam, 0.0, None)) @ vec.T
        K = Q.shape[0]
        cov[K:, K:] = T
        cov = 0.5 * (cov + cov.T)
        try:
            return OrderParameters(cov[:K, :K], cov[:K, K:], T)
        except SpecificationError:
            pass
    return OrderParameters(0.5 * (Q + Q.T), R, T)


def _newton_polish(fun, x: np.ndarray, steps: int = 8) -> np.ndarray | None:
    """A few Newton steps with a Richardson Jacobian; None if it does not converge."""
    x = np.asarray(x, dtype=float)
    f = fun(x)
    if not np.all(np.isfinite(x)) or np.max(np.abs(f)) > 1e-4:
        return None
    for _ in range(steps):
        if np.max(np.abs(f)) < 1e-15:
            break
        jac = _richardson_jacobian(fun, x, 1e-4 * (1.0 + np.abs(x)))
        try:
            dx = np.linalg.lstsq(jac, -f, rcond=None)[0]
        except np.linalg.LinAlgError:
            break
        x_new = x + dx
        f_new = fun(x_new)
        if np.max(np.abs(f_new)) >= np.max(np.abs(f)):
            break
        x, f = x_new, f_new
    return x


def _damped_newton(raw, x: np.ndarray, steps: int = 20) -> np.ndarray | None:
    """Newton's method with backtracking (the step halved until the residual is finite
    and smaller): for a root on the boundary of the PSD cone (identical students), where
    an engine of estimates has no values beyond it and ``hybr`` stalls. Central
    differences ``1e-6 max(1, |x|)`` (the estimate is smooth: common random numbers),
    kept between full steps by Broyden's rank-one update and recomputed after a step that
    needed backtracking or failed."""
    def fun(y: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(raw(y), dtype=float)
        except AccuracyError:  # a state where the estimate is too noisy: not a step
            return np.full(y.size, np.inf)

    def fd_jacobian(y: np.ndarray) -> np.ndarray:
        h = 1e-6 * np.maximum(1.0, np.abs(y))
        return np.array([(fun(y + e) - fun(y - e)) / (2.0 * e[j])
                         for j, e in enumerate(np.diag(h))]).T

    f = fun(x)
    if not np.all(np.isfinite(f)):
        return None
    jac, fresh, jacobians = None, False, 0
    for _ in range(4 * steps):  # at most ``steps`` Jacobians, Broyden steps in between
        if np.max(np.abs(f)) < 1e-13:
            break
        if jac is None:
            if jacobians == steps:
                break
            jac, fresh = fd_jacobian(x), True
            jacobians += 1
        try:
            dx = np.linalg.lstsq(jac, -f, rcond=None)[0]
        except np.linalg.LinAlgError:
            break
        t = 1.0
        while t > 1e-9:
            f_new = fun(x + t * dx)
            if np.all(np.isfinite(f_new)) and np.max(np.abs(f_new)) < np.max(np.abs(f)):
                break
            t *= 0.5
            if not fresh:  # a stale Jacobian: recompute it before backtracking further
                break
        if not (np.all(np.isfinite(f_new)) and np.max(np.abs(f_new)) < np.max(np.abs(f))):
            if fresh:
                break
            jac = None
            continue
        step = t * dx
        if t == 1.0:  # Broyden: jac s = f_new - f along the step
            jac = jac + np.outer(f_new - f - jac @ step, step) / float(step @ step)
            fresh = False
        else:
            jac = None
        x, f = x + step, f_new
    return x


def _directional_derivative(fun, x: np.ndarray, d: np.ndarray, h: float,
                            one_sided: bool = False, f0: np.ndarray | None = None
                            ) -> np.ndarray:
    """``d/dt fun(x + t d)`` at ``t = 0`` from steps ``h, h/2, h/4``: central differences
    with two Richardson levels (error ``O(h^6)``), or forward ones (``one_sided``; ``t >=
    0`` only, error ``O(h^3)``; ``f0 = fun(x)`` if given)."""
    if one_sided:
        base = fun(x) if f0 is None else f0
        lv = [(fun(x + (h / 2**k) * d) - base) / (h / 2**k) for k in range(3)]
        a1 = [2 * lv[1] - lv[0], 2 * lv[2] - lv[1]]
        return (4 * a1[1] - a1[0]) / 3
    lv = [(fun(x + (h / 2**k) * d) - fun(x - (h / 2**k) * d)) / (2 * h / 2**k)
          for k in range(3)]
    d1 = [(4 * lv[1] - lv[0]) / 3, (4 * lv[2] - lv[1]) / 3]
    return (16 * d1[1] - d1[0]) / 15


def _richardson_jacobian(fun, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Jacobian of ``fun`` (vector -> vector) by central differences, Richardson x2."""
    eye = np.eye(x.size)  # unit directions: the same arithmetic as per-coordinate steps
    return np.array([_directional_derivative(fun, x, eye[j], float(h[j]))
                     for j in range(x.size)]).T  # a handful of coordinates


#: :func:`ode_jacobian` of an engine of estimates at a state whose pre-activation
#: covariance has eigenvalues within ``BOUNDARY_NULL`` (relative) of 0: the boundary
#: scheme (:func:`_boundary_jacobian`) with steps ``BOUNDARY_STEP``.
BOUNDARY_NULL = 1e-9
BOUNDARY_STEP = 1e-4


def _boundary_jacobian(fun, cov, x: np.ndarray, null: np.ndarray, h: float) -> np.ndarray:
    """Jacobian of ``fun`` at a point ``x`` on the PSD cone's boundary, for an estimate
    defined only in the cone (inside :meth:`~framework.theory.Engine.boundary_estimates`:
    smooth up to the boundary, and a state beyond it by ``O(h^2)`` taken as on it).

    ``cov(x)``: the pre-activation covariance (linear in ``x``), ``null`` ``(P, k)``: an
    orthonormal basis of its null space at ``x``. A coordinate's covariance perturbation
    ``S_j`` has the null-space part ``N_j = null^T S_j null``; directions with ``N = 0``
    stay on the boundary to first order (beyond it by ``O(t^2)``) and are differentiated
    centrally. The others are written, per coordinate, as such a tangent direction plus
    a combination of *inward* directions ``d_a`` whose null-space parts are the rank-one
    ``b b^T`` (``b``: the basis vectors and their normalized pairwise sums, spanning the
    symmetric ``k x k`` matrices; one new direction of the realization each, so a single
    small eigenvalue appears, no degenerate pair), differentiated from inside by forward
    differences. The Jacobian is linear, so ``J e_j = J t_j + sum_a c_ja J d_a``."""
    n, k = x.size, null.shape[1]
    S0 = cov(x)
    eye = np.eye(n)
    parts = np.array([null.T @ (cov(x + eye[j]) - S0) @ null for j in range(n)])
    iu = np.triu_indices(k)
    rho = parts[:, iu[0], iu[1]]  # (n, m): the null-space parts, upper triangles
    targets = []
    for a in range(k):
        for b in range(a, k):
            v = np.zeros(k)
            v[a] = v[b] = 1.0
            targets.append(np.outer(v, v)[iu] / float(v @ v))
    dirs, reach = [], []
    for tau in targets:  # the inward direction with null-space part tau (min. norm)
        w = np.linalg.lstsq(rho.T, tau, rcond=None)[0]
        if np.max(np.abs(rho.T @ w - tau)) > 1e-8 or not np.any(w):
            continue  # not reachable by these coordinates (then no coordinate needs it)
        c = float(np.max(np.abs(w)))
        dirs.append(w / c)
        reach.append(tau / c)
    base = np.array(reach).T if reach else np.zeros((rho.shape[1], 0))
    coef = np.linalg.lstsq(base, rho.T, rcond=None)[0].T if reach \
        else np.zeros((n, 0))  # (n, a)
    if np.max(np.abs(coef @ base.T - rho), initial=0.0) > 1e-8:
        raise AccuracyError(
            "ode_jacobian at a state on the PSD cone's boundary: the coordinates move the "
            "pre-activation covariance out of its null space in directions that no "
            "inward direction reaches; the Jacobian of the estimate is not defined there")
    f0 = fun(x)
    inward = [_directional_derivative(fun, x, d, h, one_sided=True, f0=f0) for d in dirs]
    cols = []
    for j in range(n):
        t = eye[j] - (coef[j] @ np.array(dirs) if dirs else 0.0)
        col = _directional_derivative(fun, x, t, h)
        for a, ja in enumerate(inward):
            col = col + coef[j, a] * ja
        cols.append(col)
    jac = np.array(cols).T
    if not np.all(np.isfinite(jac)):
        raise AccuracyError(
            "ode_jacobian at a state on the PSD cone's boundary: the estimate is not "
            f"finite at steps of {h:g} (the state is beyond the cone by more than the "
            "engine's boundary tolerance)")
    return jac


def _order_parameter_coordinates(
    K: int, M: int, norms_held: bool, spaces: int = 0
) -> list[tuple[str, int, int]]:
    """``("Q", i, k)`` (``i <= k``; ``i < k`` when the norms are held) and ``("R", i, n)``.

    A state per input eigenspace (``spaces = L > 0``): ``("Q@l", i, k)`` and ``("R@l", i,
    n)`` per eigenspace; held norms ``sum_l Q_l,ii`` leave out the diagonal of ``Q@0``."""
    if not spaces:
        first = 1 if norms_held else 0
        coords = [("Q", i, k) for i in range(K) for k in range(i + first, K)]
        coords += [("R", i, n) for i in range(K) for n in range(M)]
        return coords
    out = []
    for ell in range(spaces):
        first = 1 if norms_held and ell == 0 else 0
        out += [(f"Q@{ell}", i, k) for i in range(K) for k in range(i + first, K)]
        out += [(f"R@{ell}", i, n) for i in range(K) for n in range(M)]
    return out


def _space_of(kind: str) -> int:
    """The input eigenspace of a coordinate name (``"Q@2"`` -> 2; ``"Q"`` -> 0)."""
    return int(kind.split("@", 1)[1]) if "@" in kind else 0


def canonical_mode(
    values: np.ndarray, vectors: np.ndarray, reference: np.ndarray, rtol: float = 1e-6
) -> np.ndarray:
    """A reproducible vector in the (possibly degenerate) eigenspace of ``values[0]``.

    ``values`` are sorted with the eigenvalue of interest first; the eigenspace is
    spanned by the (real parts of the) columns whose eigenvalue lies within
    ``rtol * max(1, |values[0]|)``. Returns the unit projection of ``reference`` on it
    (so that symmetric degeneracies resolve the same way at every ``eta``), or the
    first column if ``reference`` is orthogonal to it.
    """
    tol = rtol * max(1.0, abs(values[0]))
    chosen = vectors[:, np.abs(values - values[0]) <= tol]
    # a degenerate real eigenvalue may come with complex eigenvectors: both parts lie in
    # the real eigenspace; an SVD gives an orthonormal basis of their span
    U, sv, _ = np.linalg.svd(np.concatenate([chosen.real, chosen.imag], axis=1),
                             full_matrices=False)
    basis = U[:, sv > 1e-8 * sv[0]][:, : chosen.shape[1]]
    v = basis @ (basis.T @ reference)
    norm = np.linalg.norm(v)
    if norm < 1e-8 * np.linalg.norm(reference):
        v = np.real(vectors[:, 0])
        norm = np.linalg.norm(v)
    return v / norm


def sorted_eigen(jac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of ``jac``, by decreasing real part."""
    lam, vec = np.linalg.eig(jac)
    order = np.lexsort((-lam.imag, -lam.real))
    return lam[order], vec[:, order]


@attrs.frozen
class HessianSpectrum:
    """The exact spectrum of the Hessian of ``F(W) = eps_g(W W^T, W Btilde^T)``.

    For every ``N >= dim_span`` the ``K N`` eigenvalues are ``span`` (each once) and
    ``complement`` (each ``N - dim_span`` times). With structured inputs the span is that
    of the projections of the weights on every input eigenspace (``dim_span = sum_l
    rank_l``), and each eigenspace ``l`` has its complement block ``lambda_l (G + G^T)``
    with multiplicity ``N_l - rank_l`` (:meth:`complement_multiplicity`). With an input
    mean the span also holds the mean direction ``u`` (counted in
    ``space_ranks[mean_space]``).

    Attributes
    ----------
    span : ndarray (K * dim_span + K * len(theta_names),)
        Eigenvalues of the block on ``{dW : each dW_i in S}`` (``S`` the span of the rows
        of ``W`` and ``Btilde``) and the parameters, ascending.
    complement : ndarray (K,)
        Eigenvalues of ``G + G^T`` (``G = d eps_g / dQ``), ascending.
    dim_span : int
    lambda_min : float
    escape_block : "span" or "complement"
    escape_dW : ndarray (K, D)
        The unit escape mode in the realization's coordinates (span modes; within a
        degenerate eigenspace the direction that most increases ``sum_i R_ii``) or the
        coefficients ``v`` of ``dW_i = v_i z`` with ``z`` orthogonal to ``S``.
    escape_dQ, escape_dR : ndarray
        First-order change of ``(Q, R)`` along the unit escape mode (zero for a
        complement mode, which changes ``Q`` by ``v v^T`` at second order only).
    X, Bt : ndarray
        The realization ``W`` (K x D) and ``Btilde`` (M x D) in ``D = K + M`` dimensions,
        columns ordered so that the first ``dim_span`` span ``S``.
    G : ndarray (K, K)
    span_matrix : ndarray
        The span block itself, coordinates ``(i, d)`` = component ``d`` of ``dW_i``
        (row-major) in the realization's basis, then the trainable parameters.
    span_error, complement_error : ndarray
        Error estimates of the eigenvalues (standard error of replicate Hessians plus
        the finite-difference truncation estimate; only the latter for an exact engine).
    lambda_min_error : float
    escape_dtheta : dict
        Components of the unit escape mode along each parameter (K,).
    theta_names : tuple of str
        Parameters in the span block (trainable, then held).
    params : dict
        Their values at the point.
    coupling_complement_theta, coupling_complement_span : float
        Largest measured cross-derivatives between the complement direction and theta /
        the span (exactly zero in theory), with their ``*_error``.
    landscape_only : bool
        True for a normalization with ``statistics_gradient = False``: the Hessian of
        the loss landscape ``eps_g``, not of the SGD drift.
    gradient_norm : float
        Norm of the gradient of ``eps_g`` over ``(W, theta)`` at the point.
    engine : str
        Name of the engine that computed it.
    """

    span: np.ndarray = attrs.field(eq=False)
    complement: np.ndarray = attrs.field(eq=False)
    dim_span: int
    lambda_min: float
    escape_block: str
    escape_dW: np.ndarray = attrs.field(eq=False)
    escape_dQ: np.ndarray = attrs.field(eq=False)
    escape_dR: np.ndarray = attrs.field(eq=False)
    X: np.ndarray = attrs.field(eq=False)
    Bt: np.ndarray = attrs.field(eq=False)
    G: np.ndarray = attrs.field(eq=False)
    span_matrix: np.ndarray = attrs.field(eq=False)
    span_error: np.ndarray = attrs.field(factory=lambda: np.zeros(0), eq=False)
    complement_error: np.ndarray = attrs.field(factory=lambda: np.zeros(0), eq=False)
    lambda_min_error: float = 0.0
    escape_dtheta: dict = attrs.field(factory=dict, eq=False)
    theta_names: tuple = ()
    params: dict = attrs.field(factory=dict, eq=False)
    coupling_complement_theta: float = 0.0
    coupling_complement_theta_error: float = 0.0
    coupling_complement_span: float = 0.0
    coupling_complement_span_error: float = 0.0
    landscape_only: bool = False
    gradient_norm: float = float("nan")
    engine: str = ""
    #: Structured inputs: the input eigenspace of each complement eigenvalue (``(L K,)``,
    #: ``lambda_l`` times the eigenvalues of ``G + G^T``), the rank of each eigenspace's
    #: realization and the input distribution; isotropic: zeros, ``[dim_span]``, None.
    complement_space: np.ndarray = attrs.field(factory=lambda: np.zeros(0, dtype=int),
                                               eq=False)
    space_ranks: np.ndarray = attrs.field(factory=lambda: np.zeros(0, dtype=int), eq=False)
    inputs: Any = attrs.field(default=None, eq=False)
    #: Structured inputs, a complement escape mode: its input eigenspace.
    escape_space: int = 0
    #: Inputs with a mean: the first-order change of the mean overlaps ``r`` (K,) along
    #: the unit escape mode (the component of ``dW`` along ``u``); None when centred.
    escape_dr: Any = attrs.field(default=None, eq=False)

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue (span or complement): it bounds the stable learning
        rate of gradient descent on ``F``."""
        return float(max(np.max(self.span, initial=-np.inf),
                         np.max(self.complement, initial=-np.inf)))

    def complement_multiplicity(self, N: int) -> np.ndarray:
        """Multiplicity of each complement eigenvalue at input dimension ``N``: ``N -
        dim_span``; with structured inputs ``N_l - rank_l`` for eigenspace ``l`` (``N_l``
        its directions, :meth:`framework.InputDistribution.block_sizes`)."""
        if self.inputs is None:
            N = check_int("N", N, minimum=self.dim_span)
            return np.full(self.complement.size, N - self.dim_span, dtype=np.int64)
        free = self.inputs.block_sizes(N) - self.space_ranks
        if np.any(free < 0):
            raise SpecificationError(
                f"'N' must give every input eigenspace at least its rank "
                f"{self.space_ranks.tolist()} of directions, got N = {N} (directions "
                f"{self.inputs.block_sizes(N).tolist()})")
        return free[self.complement_space].astype(np.int64)

    def full(self, N: int) -> np.ndarray:
        """All ``K N`` eigenvalues at input dimension ``N``, ascending."""
        mult = self.complement_multiplicity(N)
        return np.sort(np.concatenate([self.span, np.repeat(self.complement, mult)]))


def _realize(Q: np.ndarray, R: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    cov = np.block([[Q, R], [R.T, T]])
    cov = 0.5 * (cov + cov.T)
    lam, vec = np.linalg.eigh(cov)
    lam, vec = lam[::-1], vec[:, ::-1]
    keep = lam > RANK_TOL * max(1.0, lam[0]) * lam.size
    rank = int(np.sum(keep))
    L = vec * np.sqrt(np.where(keep, lam, 0.0))  # rounding-level eigenvalues -> exactly 0
    K = Q.shape[0]
    return L[:K], L[K:], rank


def classify_direction(
    subspace: SymmetricSubspace,
    dQ: np.ndarray,
    dR: np.ndarray,
    Q: np.ndarray,
    R: np.ndarray,
    *,
    block: str = "span",
    scale_invariant: bool = False,
) -> tuple[str, float]:
    """Classify a direction ``(dQ, dR)`` at ``(Q, R)``: ``(label, symmetric fraction)``.

    Labels: ``"complement (out of span; second order in Q only)"``;
    ``"norm (scale mode)"`` if ``(dQ, dR)`` is a pure change of the weight norms
    (``dQ = D Q + Q D``, ``dR = D R`` with ``D`` diagonal; the zero modes of a
    scale-invariant normalization); ``"symmetric"`` if at least 99% of its norm lies in
    the symmetric subspace; ``"symmetry-breaking"`` if at most 1%; else ``"mixed"``.
    """
    if block == "complement":
        return "complement (out of span; second order in Q only)", float("nan")
    total = math.sqrt(float(np.sum(dQ**2) + np.sum(dR**2)))
    if total < 1e-12:
        return "null (no first-order change of Q, R)", float("nan")
    # least-squares fit of a pure norm change
    K = Q.shape[-1]
    basis = []
    for i in range(K):
        e = np.zeros(K)
        e[i] = 1.0
        # outer products (per input eigenspace for a state of shape (L, K, K))
        bQ = np.einsum("a,...b->...ab", e, Q[..., i, :]) + \
            np.einsum("...a,b->...ab", Q[..., i, :], e)
        bR = np.einsum("a,...b->...ab", e, R[..., i, :])
        basis.append(np.concatenate([bQ.ravel(), bR.ravel()]))
    A = np.array(basis).T
    v = np.concatenate([dQ.ravel(), dR.ravel()])
    coef = np.linalg.lstsq(A, v, rcond=None)[0]
    if np.linalg.norm(A @ coef - v) < 1e-6 * total:
        return "norm (scale mode)", subspace.symmetric_fraction(dQ, dR)
    frac = subspace.symmetric_fraction(dQ, dR)
    if frac >= 0.99:
        return "symmetric", frac
    if frac <= 0.01:
        return "symmetry-breaking", frac
    return "mixed", frac


def parameters_attrs(model: Model, normalization: Normalization) -> dict[str, Any]:
    """The normalization's parameter values as attrs (``normalization_param_<name>``).

    A parameter equal across units is stored as a number, otherwise as a JSON list.
    """
    out: dict[str, Any] = {}
    for name, value in normalization.parameters(model.K).items():
        value = np.asarray(value, dtype=float).ravel()
        if value.size and np.all(value == value[0]):
            out[f"normalization_param_{name}"] = float(value[0])
        else:
            out[f"normalization_param_{name}"] = json.dumps(value.tolist())
    out["normalization_trainable"] = json.dumps(list(normalization.trainable))
    out["normalization_scale_invariant"] = int(bool(normalization.scale_invariant))
    return out


def scale_invariance(model: Model, normalization: Normalization) -> str:
    """How the first-order flow conserves weight norms: ``"unit"``, ``"common"``, ``"none"``.

    ``"unit"``: ``normalization.scale_invariant``, or a forward map invariant under
    rescaling each student vector separately (``x_i -> c_i x_i`` with the statistics at
    ``c Q c``) with gradients through the statistics (then the update of ``W_i`` is
    orthogonal to ``W_i`` and each ``Q_ii`` changes only through the ``eta^2`` term).
    ``"common"``: invariant only under a common rescaling (``tr Q`` conserved to first
    order). Probed numerically at the normalization's initial parameters.
    """
    if normalization.scale_invariant:
        return "unit"
    if not normalization.statistics_gradient:
        return "none"
    K = model.K
    rng = np.random.default_rng(12345)
    A = rng.standard_normal((K, K))
    Q = A @ A.T / K + 0.5 * np.eye(K)
    x = rng.standard_normal((64, K)) @ np.linalg.cholesky(Q).T
    params = normalization.parameters(K)

    def out(c: np.ndarray) -> np.ndarray:
        Qc = Q * np.outer(c, c)
        stats = normalization.population_statistics(Qc) if normalization.statistics_names \
            else {}
        with np.errstate(all="ignore"):
            return np.asarray(normalization.forward(x * c, stats, params), dtype=float)

    base = out(np.ones(K))
    for kind, c in (("unit", np.linspace(0.6, 1.7, K)), ("common", np.full(K, 1.7))):
        if np.allclose(out(c), base, rtol=1e-9, atol=1e-12):
            return kind
    return "none"


def common_angular_rhs(
    Q: np.ndarray, R: np.ndarray, dQ: np.ndarray, dR: np.ndarray, *, spaces: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Remove a common rescaling: ``dQ - Q tr(dQ) / tr(Q)``, ``dR - R tr(dQ) / 2 tr(Q)``
    (``spaces``: traces summed over the input eigenspaces, axis -3)."""
    rate = _unit_norms(dQ, spaces).sum(axis=-1) / (2.0 * _unit_norms(Q, spaces).sum(axis=-1))
    return dQ - 2.0 * Q * rate[..., None, None], dR - R * rate[..., None, None]


def _scaled_flow(eng, invariance, Q, R, params, eta, batch_size, second_order):
    """Scaled flow ``(dQ, dR, dtheta) / eta`` (angular part where norms are conserved) and
    the largest error estimate. ``eta = 0`` or ``second_order=False``: the first-order
    drift alone (gradient-flow limit)."""
    gf = eta == 0.0 or not second_order
    r = eng.rates(Q, R, params, eta=1.0 if gf else eta, batch_size=batch_size,
                  second_order=not gf, check=False)
    scale = 1.0 if gf else eta
    dQ, dR = r.dQ / scale, r.dR / scale
    spaces = np.ndim(Q) == 3  # a state per input eigenspace
    if invariance == "unit":
        dQ, dR = angular_rhs(Q, R, dQ, dR, spaces=spaces)
    elif invariance == "common":
        dQ, dR = common_angular_rhs(Q, R, dQ, dR, spaces=spaces)
    dth = {k: v / scale for k, v in r.dparams.items()}
    err = max([float(np.max(r.dQ_error)), float(np.max(r.dR_error))]
              + [float(np.max(v)) for v in r.dparams_error.values()]) / scale
    return dQ, dR, dth, err


def _gradient_flow_refused(normalization: Normalization, eta: float) -> SpecificationError:
    return SpecificationError(
        f"'eta' must be > 0 (with the eta^2 term) for the generic engine's fixed points, "
        f"got eta={eta} for normalization {normalization.name!r}: the gradient-flow plateau "
        "lies on the boundary of the positive semi-definite cone (identical students), "
        "where the quadrature is not differentiable; use a small eta > 0"
    )


def find_fixed_points(
    model: Model,
    normalization: Normalization,
    *,
    eta: float,
    batch_size: int = 1,
    second_order: bool = True,
    subspace: str = "auto",
    weight_norm: float | None = None,
    quadrature: Any = None,
    starts: Sequence[tuple] | None = None,
    engine: EngineArg = "auto",
    partition_starts: bool | None = None,
) -> list[FixedPoint]:
    """All distinct fixed points in the symmetric subspace reached from ``starts``.

    The scaled right-hand side (per unit of ``eta alpha``; ``eta = 0``: gradient flow)
    is restricted to the subspace (it stays there by symmetry), with the trainable
    parameters as extra coordinates (one common value per parameter), and solved by
    Powell's hybrid method from each start. Norm-conserving normalizations
    (:func:`scale_invariance`: per unit, ``Q_ii``; common, ``tr Q / K``) are held at
    ``weight_norm`` (default 1) and their angular flow is solved; otherwise
    ``weight_norm`` must be None. Sorted by ``eps_g`` (descending).

    With an exact engine (:attr:`Engine.exact`): every start of :func:`default_starts`;
    roots polished by Newton steps, kept on the cone's boundary (identical students,
    the plateau of gradient flow; outside it by more than ``1e-9``: discarded),
    accepted if ``max |r| < 1e-10`` (the full right-hand side: this also checks the
    subspace's invariance), merged when closer than ``1e-6``; ``eta = 0`` allowed.
    With an engine of estimates (not differentiable across the cone's boundary): the
    starts inside the cone in the symmetric phase (``unspecialized ... + orthogonal``),
    roots within ``1e-9`` of the boundary discarded; then the same starts again within
    the invariant set of identical students (``C@l = Q@l``, ``S@l = R@l``; labels
    ``"identical students: ..."``), whose roots lie on the boundary and are kept there
    (margin ``-1e-9``; the Jacobian by :func:`ode_jacobian`'s boundary scheme; a root
    where the estimate is too noisy to be accepted is dropped). A root is accepted if
    its residual is below ``max(1e-10, 10 * rate_error)``, merged when closer than
    ``1e-4``; it needs ``eta > 0`` with the ``eta^2`` term (else
    :class:`~framework.SpecificationError`). ``params`` of the result includes the held
    parameters (0).

    ``starts``: ``(label, Q, R)`` or ``(label, Q, R, params)`` with ``params`` a mapping
    of trainable parameters' starting values (default: their initial values). The
    default starts are taken with the trainable parameters at their initial values and
    again at ``1/sqrt(2K-1)`` times them (the plain plateau's pre-activation scale: a
    trained gain tends to it, e.g. weightnorm's ``g``, batchnorm_affine's ``gamma``).

    Trained readout (``"v"`` among the engine's trainable parameters; fixed points carry
    ``v`` in ``params``): ``partition_starts`` (default: when ``starts`` is None) adds
    the branches outside the symmetric subspace with a dead unit (``v_i = 0`` and ``J_i
    = 0``, or ``J_i`` orthogonal to everything where the normalization needs ``|J_i| >
    0``) and, for ``K >= 3``, with two duplicated units (:data:`BRANCH_KINDS`;
    ``FixedPoint.kind``), found in their own invariant subspaces (students in groups) and
    accepted by the same test on the full right-hand side. Not for normalizations that
    conserve only ``tr Q``, nor (yet) with structured inputs.

    Structured inputs (:mod:`framework.inputs`): the state is per input eigenspace
    (``FixedPoint.Q`` of shape ``(L, K, K)``), the symmetric subspace has every
    coordinate once per eigenspace (``Q@l, C@l, R@l, S@l``), the starts are spread over
    the eigenspaces (``Q_l = f_l Q``), and a held weight norm is ``sum_l Q_l,ii``.
    """
    eta = check_real("eta", eta, minimum=0.0)
    eng = _engine(model, normalization, engine, quadrature)
    exact = bool(eng.exact)
    if (eta == 0.0 or not second_order) and not exact:
        raise _gradient_flow_refused(normalization, eta)
    sub = symmetric_subspace(model, subspace)
    invariance = scale_invariance(model, normalization)
    if invariance == "none" and weight_norm is not None:
        raise SpecificationError(
            f"'weight_norm' applies only to norm-conserving normalizations "
            f"({normalization.name!r} is not), got {weight_norm!r}")
    norm_q = 1.0 if weight_norm is None else check_real(
        "weight_norm", weight_norm, minimum=0.0, strict=True)  # held where conserved
    trainable = tuple(eng.trainable)
    p0 = eng.params()
    if partition_starts is None:
        partition_starts = starts is None
    if starts is None:
        starts = [s for s in default_starts(model, sub)
                  if exact or (s[0].startswith("unspecialized") and "orthogonal" in s[0])]
        if trainable:  # also with the parameters at Saad & Solla's plateau scale
            f = 1.0 / math.sqrt(2 * model.K - 1)
            starts = starts + [(f"{s[0]}, parameters x 1/sqrt(2K-1)", s[1], s[2],
                                {k: f * p0[k] for k in trainable}) for s in starts]
    free = np.arange(sub.size) if invariance == "none" else np.arange(1, sub.size)
    nf = free.size
    # the diagonal coordinates Q (per input eigenspace Q@l): a held norm fixes their sum
    diag_idx = np.arange(max(1, sub.spaces)) * (sub.size // max(1, sub.spaces))

    def full_theta(x: np.ndarray) -> np.ndarray:
        theta = np.empty(sub.size)
        theta[free] = x[:nf]
        if invariance != "none":
            theta[0] = norm_q - float(np.sum(theta[diag_idx[1:]]))
        return theta

    def embed(x: np.ndarray):
        Q, R = sub.embed(full_theta(x))
        params = dict(p0)
        for j, k in enumerate(trainable):
            params[k] = np.full(model.K, x[nf + j])
        return Q, R, params

    def flow(x: np.ndarray):
        Q, R, params = embed(x)
        with np.errstate(all="ignore"):
            return (Q, R, params, *_scaled_flow(eng, invariance, Q, R, params, eta,
                                                 batch_size, second_order))

    def residual(x: np.ndarray) -> np.ndarray:
        _, _, _, dQ, dR, dth, _ = flow(x)
        out = np.concatenate([sub.project(dQ, dR)[free],
                              [float(np.mean(dth[k])) for k in trainable]])
        return np.where(np.isfinite(out), out, 1e6)

    found: list[FixedPoint] = []
    # an engine of estimates: the same starts again with the students identical (C = Q,
    # S = R), searched in that invariant set, whose roots lie on the cone's boundary
    identical = _identical_students(sub, free, diag_idx, invariance, norm_q,
                                    len(trainable)) \
        if not exact and "C" in {n.split("@")[0] for n in sub.names} else None
    runs = [(s, False) for s in starts] + ([(s, True) for s in starts] if identical else [])
    tied_starts: list[np.ndarray] = []
    for start, tied in runs:
        label, Q0, R0 = start[:3]
        ps = dict(p0)
        if len(start) > 3 and start[3] is not None:  # optional parameter start
            ps.update({k: np.broadcast_to(np.asarray(v, dtype=float), (model.K,))
                       for k, v in start[3].items()})
        Q0, R0 = np.asarray(Q0, dtype=float), np.asarray(R0, dtype=float)
        if invariance != "none":
            c = math.sqrt(norm_q * model.K / float(np.sum(_unit_norms(Q0, Q0.ndim == 3)))) \
                if invariance == "common" \
                else None
            Q0, R0 = (Q0 * c * c, R0 * c) if c is not None else \
                rescale_weight_norm(Q0, R0, norm_q)
        if MEAN_OVERLAP in trainable and not (len(start) > 3 and start[3] is not None
                                              and MEAN_OVERLAP in start[3]):
            ps[MEAN_OVERLAP] = _mean_overlap_start(model, R0)
        x0 = np.concatenate([sub.project(Q0, R0)[free],
                             [float(np.mean(ps[k])) for k in trainable]])
        if tied and identical is not None:  # in the reduced coordinates (identical students)
            to_x, keep = identical
            y0 = x0[keep]
            if any(np.array_equal(y0, y) for y in tied_starts):
                continue  # starts that differ only in C or S tie to the same one
            tied_starts.append(y0)
            # a start that converges does so in < 60 evaluations here; one that wanders
            # (to where the estimate is too noisy to be accepted) is cut short
            y = optimize.root(lambda y, to_x=to_x, keep=keep: residual(to_x(y))[keep],
                              y0, method="hybr",
                              options={"xtol": 1e-12, "maxfev": TIED_MAXFEV * (y0.size + 1)}).x
            x, fallback = to_x(y), False
            label = f"identical students: {label}"
        else:
            sol = optimize.root(residual, x0, method="hybr",
                                options={"xtol": 1e-14 if exact else 1e-12})
            x = _newton_polish(residual, sol.x) if exact else sol.x
            # inputs with a mean: a root near the cone's boundary, where hybr stalls
            fallback = not exact and not sol.success and MEAN_OVERLAP in trainable
            if fallback:
                x = _damped_newton(residual, x0)
        try:
            root = _accepted_root(eng, flow, x, teacher_overlaps(model), found, trainable,
                                  eta=eta, batch_size=batch_size, second_order=second_order,
                                  model=model, boundary=tied)
        except AccuracyError:
            if not (fallback or tied):
                raise
            root = None  # the search wandered where the estimate is too noisy
        if root is None or x is None:
            continue
        Q, R, params, res, err, eps, eps_err = root
        found.append(FixedPoint(
            Q, R, full_theta(x), res, float(eps), weight_norm_of(Q), label, sub,
            params={k: np.asarray(params[k], dtype=float).copy()
                    for k in (*trainable, *eng.held)}, rate_error=float(err),
            eps_g_error=float(eps_err)))
    if partition_starts and eng.model_trainable and model.K >= 2 \
            and invariance in ("none", "unit") and not sub.spaces:
        found += _partition_branches(model, eng, sub, invariance, norm_q, eta, batch_size,
                                     second_order, found)
    found.sort(key=lambda fp: -fp.eps_g)
    return found


#: :func:`find_fixed_points` in the identical students' set: at most ``TIED_MAXFEV *
#: (n + 1)`` evaluations per start (``n`` reduced coordinates).
TIED_MAXFEV = 30


def _identical_students(sub: SymmetricSubspace, free: np.ndarray, diag_idx: np.ndarray,
                        invariance: str, norm_q: float, n_params: int):
    """The students identical within the symmetric subspace (``C@l = Q@l``; matched:
    ``S@l = R@l``), an invariant set (the fixed set of the students' transpositions),
    as ``(to_x, keep)``: ``keep`` indexes the reduced coordinates in the search's ``x``
    (the free representatives of the tied pairs, then the ``n_params`` trainable
    parameters), ``to_x(y)`` maps values of them to ``x`` (the tied coordinates and a
    held norm's ``Q@0`` filled in)."""
    names = [n.split("@") for n in sub.names]
    index = {tuple(n): i for i, n in enumerate(names)}
    tie = {"C": "Q", "S": "R"}
    source = np.array([index.get((tie.get(n[0], n[0]), *n[1:]), i)
                       for i, n in enumerate(names)])  # the representative of each
    rep_free = np.array([int(c) for c in free if source[c] == c], dtype=int)
    nf = free.size
    keep = np.concatenate([np.flatnonzero(source[free] == free),
                           np.arange(nf, nf + n_params)]).astype(int)

    def to_x(y: np.ndarray) -> np.ndarray:
        theta = np.zeros(sub.size)
        theta[rep_free] = y[:rep_free.size]
        if invariance != "none":
            theta[0] = norm_q - float(np.sum(theta[diag_idx[1:]]))
        return np.concatenate([theta[source][free], y[rep_free.size:]])

    return to_x, keep


@attrs.frozen
class _Partition:
    """An invariant subspace of (Q, R, params) with the students in groups.

    ``coords``: per coordinate, the 0/1 supports ``(mask_Q (K, K), mask_R (K, M))``;
    ``pcoords``: per (trainable parameter, group), the units ``(name, mask (K,))``;
    ``Q0, R0``: the fixed entries (the dead unit); ``held``: coordinates held at the
    weight norm (the groups' ``Q_ii`` for a per-unit norm-conserving normalization);
    ``zero``: units whose model parameters (the readout) are 0.
    """

    kind: str
    coords: tuple = attrs.field(eq=False)
    pcoords: tuple = attrs.field(eq=False)
    Q0: np.ndarray = attrs.field(eq=False)
    R0: np.ndarray = attrs.field(eq=False)
    held: tuple = ()
    zero: tuple = ()


def _partition(model: Model, eng: Engine, kind: str, invariance: str, norm_q: float
               ) -> _Partition:
    """``"dead unit"`` (students ``0..K-2`` interchangeable, ``K-1`` dead) or
    ``"duplicated units"`` (``0..K-3`` interchangeable, ``K-2`` and ``K-1`` identical)."""
    K, M = model.K, model.M
    Q0, R0 = np.zeros((K, K)), np.zeros((K, M))
    if kind == "dead unit":
        zero: tuple[int, ...] = (K - 1,)
        groups, dup = [list(range(K - 1))], [False]
        if invariance == "unit" or not eng.semidefinite:
            # |J| > 0 needed: orthogonal to everything, readout 0 (still invariant)
            Q0[K - 1, K - 1] = norm_q if invariance == "unit" else 1.0
    else:
        groups, dup, zero = [list(range(K - 2)), [K - 2, K - 1]], [False, True], ()
        groups, dup = ([g for g in groups if g], [d for g, d in zip(groups, dup,
                                                                     strict=True) if g])
    coords: list[tuple[np.ndarray, np.ndarray]] = []
    held: list[int] = []

    def q_mask(a: list[int], b: list[int]) -> np.ndarray:
        m = np.zeros((K, K))
        m[np.ix_(a, b)] = 1.0
        m[np.ix_(b, a)] = 1.0
        return m

    zR = np.zeros((K, M))
    for g, d in zip(groups, dup, strict=True):
        diag = np.zeros((K, K))
        diag[g, g] = 1.0
        if d:  # the whole block is one coordinate (identical students)
            diag = q_mask(g, g)
        if invariance == "unit":
            held.append(len(coords))
        coords.append((diag, zR))
        if len(g) > 1 and not d:
            coords.append((q_mask(g, g) - diag, zR))
    for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
            coords.append((q_mask(groups[a], groups[b]), zR))
    for g in groups:
        for n in range(M):
            mR = np.zeros((K, M))
            mR[g, n] = 1.0
            coords.append((np.zeros((K, K)), mR))
    pcoords = []
    for k in eng.trainable:
        for g in groups:
            m = np.zeros(K)
            m[g] = 1.0
            pcoords.append((k, m))
    return _Partition(kind, tuple(coords), tuple(pcoords), Q0, R0, tuple(held), zero)


#: Evaluations per coordinate (plus one) allowed to the root finder of a partition branch.
PARTITION_MAXFEV = 20


def _partition_branches(model, eng, sub, invariance, norm_q, eta, batch_size,
                        second_order, found):
    """The branches with a dead unit and (``K >= 3``) with two duplicated units, for a
    trained readout (:data:`BRANCH_KINDS`): Powell's hybrid method in the
    :class:`_Partition` coordinates from a few starts, accepted like the symmetric ones
    (the full right-hand side below the tolerance), merged with ``found``."""
    K, M, T = model.K, model.M, model.T
    exact = bool(eng.exact)
    p0 = eng.params()
    model_params = set(eng.model_trainable)
    one = np.ones(M)
    a0 = 1.0 / math.sqrt((2 * K - 1) * float(one @ T @ one))
    out: list[FixedPoint] = []
    kinds = ["dead unit"] + (["duplicated units"] if K >= 3 else [])
    for kind in kinds:
        part = _partition(model, eng, kind, invariance, norm_q)
        free = [j for j in range(len(part.coords)) if j not in part.held]
        mQ = np.array([c[0] for c in part.coords])
        mR = np.array([c[1] for c in part.coords])
        count = mQ.sum(axis=(1, 2)) + mR.sum(axis=(1, 2))
        pm = np.array([m for _, m in part.pcoords]).reshape(-1, K)
        nf = len(free)

        def embed(x, part=part, mQ=mQ, mR=mR, pm=pm, free=free, nf=nf):
            theta = np.zeros(len(part.coords))
            theta[list(part.held)] = norm_q
            theta[free] = x[:nf]
            Q = part.Q0 + np.tensordot(theta, mQ, axes=1)
            R = part.R0 + np.tensordot(theta, mR, axes=1)
            params = {k: np.array(v, dtype=float) for k, v in p0.items()}
            for j, (k, m) in enumerate(part.pcoords):
                params[k] = np.where(m > 0, x[nf + j], params[k])
            for k in model_params:
                params[k][list(part.zero)] = 0.0
            return Q, R, params

        def flow(x, embed=embed):
            Q, R, params = embed(x)
            with np.errstate(all="ignore"):
                return (Q, R, params, *_scaled_flow(eng, invariance, Q, R, params, eta,
                                                     batch_size, second_order))

        def residual(x, flow=flow, mQ=mQ, mR=mR, count=count, pm=pm, free=free,
                     part=part):
            _, _, _, dQ, dR, dth, _ = flow(x)
            proj = (np.tensordot(mQ, dQ, axes=([1, 2], [0, 1]))
                    + np.tensordot(mR, dR, axes=([1, 2], [0, 1]))) / count
            pr = [float(m @ dth[k] / m.sum()) for k, m in part.pcoords]
            r = np.concatenate([proj[free], pr])
            return np.where(np.isfinite(r), r, 1e6)

        alive = [i for i in range(K) if i not in part.zero]
        starts = []
        for factor in (1.0, 2.0):
            for orth in (0.0, 0.3):
                coef = np.zeros((K, M))
                coef[alive] = factor * a0
                starts.append((f"{kind}: others along the teachers' sum a={factor:g}*a0"
                               + (f" + orthogonal {orth:g}" if orth else ""), coef, orth))
        for n in range(1 if sub.kind == "matched" else M):  # matched: teachers alike
            coef = np.zeros((K, M))
            coef[alive, n] = 1.0
            starts.append((f"{kind}: others on teacher {n}", coef, 0.0))
        for label, coef, orth in starts:
            Qs = coef @ T @ coef.T + orth * np.diag([1.0 if i in alive else 0.0
                                                     for i in range(K)])
            Rs = coef @ T
            if invariance == "unit":
                d = np.sqrt(np.maximum(np.diagonal(Qs), 1e-300))
                c = np.sqrt(norm_q) / d
                Qs, Rs = Qs * np.outer(c, c), Rs * c[:, None]
            theta = (np.tensordot(mQ, Qs, axes=([1, 2], [0, 1]))
                     + np.tensordot(mR, Rs, axes=([1, 2], [0, 1]))) / count
            # the readout at its initial value, and twice it where a unit is dead (the
            # others make up for it)
            for scale in (1.0, 2.0) if kind == "dead unit" else (1.0,):
                xp = [scale * float(m @ p0[k] / m.sum()) if k in model_params
                      else float(m @ p0[k] / m.sum()) for k, m in part.pcoords]
                x0 = np.concatenate([theta[free], xp])
                # capped evaluations: a start that has not converged by then is dropped
                # (a redundant gain and readout, e.g. weightnorm's g and v, make the
                # roots a line on which hybr crawls)
                sol = optimize.root(residual, x0, method="hybr",
                                    options={"xtol": 1e-14 if exact else 1e-12,
                                             "maxfev": PARTITION_MAXFEV * (x0.size + 1)})
                x = _newton_polish(residual, sol.x) if exact else sol.x
                root = _accepted_root(eng, flow, x, T, [*found, *out], tuple(eng.trainable),
                                      eta=eta, batch_size=batch_size,
                                      second_order=second_order)
                if root is None:
                    continue
                Q, R, params, res, err, eps, eps_err = root
                out.append(FixedPoint(
                    Q, R, sub.project(Q, R), res, float(eps),
                    float(np.mean(np.diagonal(Q))), f"{label}, readout x {scale:g}", sub,
                    params={k: np.asarray(params[k], dtype=float).copy()
                            for k in (*eng.trainable, *eng.held)},
                    rate_error=float(err), eps_g_error=float(eps_err), kind=kind))
    return out


def _accepted_root(
    eng: Engine, flow: Any, x: np.ndarray | None, T: np.ndarray, found: Any,
    trainable: tuple[str, ...], *, eta: float, batch_size: int, second_order: bool,
    model: Model | None = None, boundary: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict, float, float, float, float] | None:
    """The fixed point at the root ``x`` of a branch search, or None if it is rejected:
    not finite, outside the PSD cone (``-1e-9``; ``+1e-9`` for an engine of estimates
    unless ``boundary``: a root of the identical students' search; with ``model``,
    :func:`state_margin`: the cone with the input mean's direction), a
    weight norm ``Q_ii`` (summed over input eigenspaces) above ``SATURATED_NORM`` times
    ``max(1, max T)`` (where a saturating activation's flow vanishes without a fixed point),
    a residual of the full right-hand side above ``max(RESIDUAL_TOL, 10 * its error)``,
    or a duplicate of one in ``found`` (``DEDUPE_TOL``; ``1e-4`` for estimates).
    Returns ``(Q, R, params, residual, rate error, eps_g, eps_g error)``; an estimate
    too noisy there raises :class:`AccuracyError`."""
    if x is None:
        return None
    exact = bool(eng.exact)
    Q, R, params, dQ, dR, dth, err = flow(x)
    margin = -1e-9 if exact or boundary else 1e-9
    if not np.all(np.isfinite(Q)) or (psd_margin(Q, R, T) if model is None else
                                       state_margin(model, Q, R, params)) < margin:
        return None
    if float(np.max(np.diagonal(Q, axis1=-2, axis2=-1).sum(axis=0) if Q.ndim == 3
                    else np.diagonal(Q))) > SATURATED_NORM * max(1.0, float(np.max(T))):
        return None  # the flow of a saturating activation vanishing at |W|^2 -> infinity
    res = float(max(np.max(np.abs(dQ)), np.max(np.abs(dR)),
                    *[np.max(np.abs(v)) for v in dth.values()]))
    if not res < max(RESIDUAL_TOL, 10.0 * err):
        return None
    dedupe = DEDUPE_TOL if exact else 1e-4
    if any(max(np.max(np.abs(fp.Q - Q)), np.max(np.abs(fp.R - R)),
               *[np.max(np.abs(fp.params[k] - params[k])) for k in trainable]) < dedupe
           for fp in found):
        return None
    eng.rates(Q, R, params, eta=eta, batch_size=batch_size,
              second_order=second_order)  # AccuracyError if the estimate is too noisy
    eps, eps_err = eng.generalization_error(Q, R, params)
    return Q, R, params, res, float(err), float(eps), float(eps_err)


def jacobian_coordinates(
    model: Model, normalization: Normalization, engine: EngineArg = "auto"
) -> list[tuple[str, int, int]]:
    """Coordinates of :func:`ode_jacobian`: ``("Q", i, k)`` (``i <= k``; ``i < k`` for
    per-unit norm-conserving normalizations, whose norms are held fixed), ``("R", i,
    n)``, then ``("theta:<name>", i, 0)`` per trainable and held parameter and unit."""
    inv = scale_invariance(model, normalization)
    inputs = model.input_distribution()
    coords = _order_parameter_coordinates(model.K, model.M, inv == "unit",
                                          0 if inputs.isotropic else inputs.L)
    eng = _engine(model, normalization, engine)
    for k in (*eng.trainable, *eng.held):
        coords += [(f"theta:{k}", i, 0) for i in range(model.K)]
    return coords


def ode_jacobian(
    model: Model,
    normalization: Normalization,
    Q: np.ndarray,
    R: np.ndarray,
    params: Any = None,
    *,
    eta: float,
    batch_size: int = 1,
    second_order: bool = True,
    quadrature: Any = None,
    engine: EngineArg = "auto",
) -> np.ndarray:
    """Jacobian of the scaled (angular) flow including the trainable parameters, per unit
    ``eta alpha``, in the coordinates :func:`jacobian_coordinates`, by central
    differences with two Richardson levels (error ``O(h^6)``): step ``1e-3`` with an
    exact engine (the closed forms are analytic a little beyond the cone), ``min(1e-3,
    psd margin / 4)`` for an engine of estimates (its estimate is smooth in the state:
    common random numbers) and for a learning rule whose rates are not analytic beyond
    the cone (:attr:`framework.LearningRule.analytic_beyond_cone`). Such an engine at a
    state on the cone's boundary (the pre-activation covariance ``sum_l lambda_l [[Q_l,
    R_l], [R_l^T, T_l]]`` singular within ``BOUNDARY_NULL``; identical students) is
    differentiated inside :meth:`~framework.theory.Engine.boundary_estimates` by
    :func:`_boundary_jacobian` (steps ``BOUNDARY_STEP``: central along the boundary,
    forward inward; :class:`~framework.AccuracyError` if the estimate is not finite
    there). Held parameters
    contribute the decoupled block ``-held_hessian`` (their drift is ``-eta`` times
    their gradient, no ``eta^2`` term; coordinates last). For a per-unit norm-conserving
    normalization at ``eta = 0`` its eigenvalues are those of the full ODE without the
    ``K`` zeros of the conserved norms."""
    eng = _engine(model, normalization, engine, quadrature)
    inv = scale_invariance(model, normalization)
    K = model.K
    coords = jacobian_coordinates(model, normalization, eng)
    p = eng.params(params)
    trainable = tuple(eng.trainable)
    Q, R = np.asarray(Q, dtype=float), np.asarray(R, dtype=float)
    spaces = Q.ndim == 3  # a state per input eigenspace: coordinates "Q@l", "R@l"
    Q3, R3 = (Q, R) if spaces else (Q[None], R[None])
    iq = np.array([(_space_of(v), i, k) for v, i, k in coords if v[0] == "Q"],
                  dtype=int).reshape(-1, 3)
    ir = np.array([(_space_of(v), i, k) for v, i, k in coords if v[0] == "R"],
                  dtype=int).reshape(-1, 3)
    nq, nr = len(iq), len(ir)
    held_norms = np.diagonal(Q3.sum(axis=0)) if spaces and inv == "unit" else None
    x0 = np.concatenate([Q3[iq[:, 0], iq[:, 1], iq[:, 2]], R3[ir[:, 0], ir[:, 1], ir[:, 2]],
                         *[p[k] for k in trainable]])

    def state(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        Qx = np.array(Q3, dtype=float)
        Qx[iq[:, 0], iq[:, 1], iq[:, 2]] = x[:nq]
        Qx[iq[:, 0], iq[:, 2], iq[:, 1]] = x[:nq]
        if held_norms is not None:  # sum_l Q_l,ii held: the diagonal of Q@0 follows
            d = np.arange(K)
            Qx[0, d, d] = held_norms - Qx[1:, d, d].sum(axis=0)
        Rx = np.array(R3, dtype=float)
        Rx[ir[:, 0], ir[:, 1], ir[:, 2]] = x[nq:nq + nr]
        px = dict(p)
        for j, k in enumerate(trainable):
            px[k] = x[nq + nr + j * K: nq + nr + (j + 1) * K]
        return Qx, Rx, px

    lam_in = model.input_distribution().eigenvalues if spaces else np.ones(1)
    T3 = teacher_overlaps(model) if spaces else np.asarray(model.T, dtype=float)[None]

    def cov(x: np.ndarray) -> np.ndarray:  # the pre-activation covariance (linear in x)
        Qx, Rx, _ = state(x)
        return sum(lam_in[ell] * np.block([[Qx[ell], Rx[ell]], [Rx[ell].T, T3[ell]]])
                   for ell in range(len(lam_in)))

    def fun(x: np.ndarray) -> np.ndarray:
        Qx, Rx, px = state(x)
        dQ, dR, dth, _ = _scaled_flow(eng, inv, Qx if spaces else Qx[0],
                                      Rx if spaces else Rx[0], px, eta, batch_size,
                                      second_order)
        dQ3, dR3 = (dQ, dR) if spaces else (dQ[None], dR[None])
        return np.concatenate([dQ3[iq[:, 0], iq[:, 1], iq[:, 2]],
                               dR3[ir[:, 0], ir[:, 1], ir[:, 2]],
                               *[dth[k] for k in trainable]])

    analytic = eng.exact and (not isinstance(eng, RuleEngine) or eng.analytic_beyond_cone)
    lam_c, vec_c = np.linalg.eigh(cov(x0))
    null = vec_c[:, lam_c < BOUNDARY_NULL * max(1.0, float(lam_c[-1]))]
    if not analytic and null.shape[1]:  # on the cone's boundary (identical students)
        with eng.boundary_estimates():
            jac = _boundary_jacobian(fun, cov, x0, null, BOUNDARY_STEP)
    else:
        h = 1e-3 if analytic else min(
            1e-3, max(psd_margin(Q, R, teacher_overlaps(model)), 1e-8) / 4.0)
        jac = _richardson_jacobian(fun, x0, np.full(x0.size, h))
    held = eng.held_hessian(Q, R, p)
    if held.size:
        n, m = jac.shape[0], held.shape[0]
        full = np.zeros((n + m, n + m))
        full[:n, :n] = jac
        full[n:, n:] = -held
        jac = full
    return jac


def _replicate_error(values: np.ndarray) -> np.ndarray:
    """Standard error of the mean over the leading (replicate) axis; 0 for one value."""
    reps = values.shape[0]
    if reps < 2:
        return np.zeros(values.shape[1:])
    return values.std(axis=0, ddof=1) / math.sqrt(reps)


def weight_space_hessian(
    model: Model,
    normalization: Normalization,
    Q: Any,
    R: Any,
    params: Any = None,
    *,
    quadrature: Any = None,
    accuracy: float | None = None,
    engine: EngineArg = "auto",
) -> HessianSpectrum:
    """Hessian of ``F(W, theta) = eps_g(W W^T, W Btilde^T; theta)``, exact for every ``N``.

    Coordinates ``W = J / sqrt(N)`` (DESIGN.md, "Weight-space Hessian"); the Hessian is
    taken at the normalization's parameter values ``params`` (default: its own, e.g.
    batchnorm's fixed ``gamma``), trainable ones joining the span block.

    ``W`` is realized in ``D = K + M`` dimensions plus one extra dimension orthogonal to
    ``W`` and ``Btilde`` (the complement). The per-replicate weight gradients
    (:meth:`ExpectationEngine.weight_moments`, smooth in ``(W, theta)`` with common
    random numbers) are differentiated by central differences (relative step ``1e-2``
    of each row's norm, ``1e-2 max(1, |theta|)``, one Richardson level, ``O(h^4)``;
    ``1e-3`` with the exact engine, whose gradients are exact);
    the replicate Hessians give the error estimates (an exact engine has one
    "replicate": the truncation estimate only). Trainable parameters join the span
    block; the complement block is read off the extra dimension. For a normalization
    with ``statistics_gradient = False`` this is the Hessian of ``eps_g`` (the loss
    landscape; its SGD drift is not a gradient), ``landscape_only = True``.

    A trained readout ``v`` (the engine parameter ``"v"``, last in ``theta``) joins the
    span block in the coordinates ``(W, v)``: both move at ``O(1)`` rates per ``alpha``,
    ``dW/dalpha = -eta grad_W eps_g`` and ``dv/dalpha = -eta_v grad_v eps_g`` (small-eta
    drift), so its block is the plain second derivative ``d^2 eps_g / dv_i dv_k`` (no
    factor ``N``), alongside ``Hess_W = N Hess_J``; the Hessian is the drift's
    linearization (up to ``-eta``) for ``eta_v = eta``, otherwise ``diag(eta, eta_v)``
    times it.

    Inputs with a mean (``xi ~ N(m u, Sigma)``, :mod:`framework.inputs`): ``eps_g``
    depends on ``W`` through ``Q_l``, ``R_l`` and the overlaps ``r = W u`` with the mean
    direction, the state entry ``"mean_overlap"`` of ``params`` (default 0). The mean
    direction is one more coordinate of the span block: eigenspace ``mean_space`` is
    realized as ``[u | residual | complement]`` (``u``'s column holds ``r`` and ``s``, the
    residual realizes ``Q_mu - r r^T``, ``R_mu - r s^T``, ``T_mu - s s^T``), so its rank
    and ``dim_span`` count ``u`` and its complement eigenvalues have multiplicity ``N_mu -
    rank_mu``; ``r`` is state, not a parameter (no theta block), and the escape mode's
    change of ``r`` is ``escape_dr``. Checked against the Monte Carlo Hessian in all
    ``K N`` coordinates (tests/test_hessian_input_mean.py).

    Raises :class:`~framework.theory.AccuracyError` if ``lambda_min``'s error estimate
    exceeds ``accuracy`` (default: the quadrature's) times ``max(1, |lambda_min|)``
    (engines of estimates only).
    """
    eng = _engine(model, normalization, engine, quadrature)
    if accuracy is not None:
        acc = float(accuracy)
    else:
        acc = (getattr(eng, "quadrature", None) or Quadrature()).accuracy
    Q = np.asarray(Q, dtype=float)
    R = np.asarray(R, dtype=float)
    K, M = model.K, model.M
    inputs = model.input_distribution()
    if not inputs.isotropic and Q.ndim == 2:  # J J^T / N spread over the eigenspaces
        Q, R = inputs.lift(Q), inputs.lift(R)
    spaces = Q.ndim == 3  # structured inputs: one realization per input eigenspace
    p = eng.params(params)
    has_mean = MEAN_OVERLAP in eng.trainable  # the student's overlaps r with u: state
    names = tuple(k for k in eng.trainable if k != MEAN_OVERLAP)
    parts, X, Bt, lead_slot = _realize_spaces(model, Q, R, p.get(MEAN_OVERLAP), has_mean)
    width = X.shape[1] // len(parts)  # per eigenspace: [u,] realization, complement
    D = X.shape[1]
    ranks = np.array([r for _, _, r in parts], dtype=int)
    rank = int(ranks.sum())
    span_cols = np.concatenate([ell * width + np.arange(r) + (
        0 if has_mean and ell == inputs.mean_space else lead_slot)
        for ell, r in enumerate(ranks)])
    comp_cols = np.arange(len(parts)) * width + width - 1
    X0, Bt0 = (X, Bt) if spaces else (parts[0][0], parts[0][1])
    nW = K * D
    nT = K * len(names)
    n = nW + nT
    v0 = np.concatenate([X.ravel(), *[p[k] for k in names]])
    rows = np.linalg.norm(X0, axis=1)
    rel = 1e-3 if eng.exact else 1e-2  # exact gradients: a smaller step, O(h^4) ~ 1e-12
    hW = np.repeat(rel * np.clip(np.minimum(rows, 1.0), 1e-3, None), D)
    hT = np.concatenate([np.full(K, rel * max(1.0, float(np.max(np.abs(p[k]))))) for k in names]) \
        if names else np.zeros(0)
    h = np.concatenate([hW, hT])

    def grad(v: np.ndarray) -> np.ndarray:
        Xv = v[:nW].reshape(K, D)
        pv = dict(p)
        for j, k in enumerate(names):
            pv[k] = v[nW + j * K: nW + (j + 1) * K]
        _, gX, gT = eng.weight_moments(Xv, Bt, pv, landscape=True)
        return np.concatenate([gX.reshape(gX.shape[0], -1), *[gT[k] for k in names]], axis=1)

    _, g0X, g0T = eng.weight_moments(X, Bt, p, landscape=True)
    gnorm = float(np.sqrt(np.sum(g0X.mean(0) ** 2)
                          + sum(np.sum(g0T[k].mean(0) ** 2) for k in names)))
    reps = g0X.shape[0]  # 1 for the exact engine
    d_h = np.empty((reps, n, n))
    d_h2 = np.empty((reps, n, n))
    # the weight coordinates: the perturbed realizations (levels h, h/2; signs +, -) of a
    # block of 64 coordinates in one stacked call, at the common parameters p
    x0 = X.reshape(-1)
    offsets = np.array([1.0, -1.0, 0.5, -0.5])
    for j0 in range(0, nW, 64):
        cols = np.arange(j0, min(j0 + 64, nW))
        Xs = np.repeat(x0[None, None, :], 4, axis=0).repeat(cols.size, axis=1)  # (4, c, nW)
        Xs[:, np.arange(cols.size), cols] += offsets[:, None] * hW[cols][None, :]
        _, gXs, gTs = eng.weight_moments_stack(Xs.reshape(-1, K, D), Bt, p, landscape=True)
        gs = np.concatenate([gXs.reshape(4, cols.size, reps, -1),
                             *[gTs[k].reshape(4, cols.size, reps, K) for k in names]], axis=-1)
        for level, out, a in ((1.0, d_h, 0), (0.5, d_h2, 2)):
            diff = (gs[a] - gs[a + 1]) / (2.0 * level * hW[cols][:, None, None])
            out[:, cols, :] = np.swapaxes(diff, 0, 1)
    for j in range(nW, n):  # the parameter coordinates, one at a time (a handful)
        e = np.zeros(n)
        for level, out in ((1.0, d_h), (0.5, d_h2)):
            e[j] = h[j] * level
            out[:, j, :] = (grad(v0 + e) - grad(v0 - e)) / (2.0 * e[j])
    hr = (4.0 * d_h2 - d_h) / 3.0  # per replicate, rows: perturbed coordinate
    hr = 0.5 * (hr + np.swapaxes(hr, 1, 2))
    trunc = np.abs(d_h2 - d_h).mean(axis=0) / 3.0 * 0.25  # O(h^2) term -> O(h^4) left
    held = eng.held_hessian(Q, R, p)  # exact, decoupled from (W, theta)
    if held.size:
        nh = held.shape[0]
        grow = np.zeros((reps, n + nh, n + nh))
        grow[:, :n, :n] = hr
        grow[:, n:, n:] = held
        hr = grow
        trunc = np.pad(trunc, ((0, nh), (0, nh)))
        names = (*names, *eng.held)
        nT += nh
        n += nh
    hess = hr.mean(axis=0)
    hess_err = _replicate_error(hr) + trunc

    idx = np.arange(nW).reshape(K, D)
    span_idx = np.concatenate([idx[:, span_cols].ravel(), nW + np.arange(nT)])
    comp_idx = idx[:, comp_cols].T.ravel()  # eigenspace-major
    theta_idx = nW + np.arange(nT)
    block = hess[np.ix_(span_idx, span_idx)]
    block_r = hr[:, span_idx][:, :, span_idx]

    def eig_err(mat, mats, extra):
        vals, vecs = np.linalg.eigh(mat)
        per = np.einsum("ia,rij,ja->ra", vecs, mats, vecs)
        err = _replicate_error(per) + np.sqrt(
            np.einsum("ia,ij,ja->a", vecs**2, extra**2, vecs**2))
        return vals, vecs, err

    span_vals, span_vecs, span_err = eig_err(block, block_r, trunc[np.ix_(span_idx, span_idx)])
    comp_parts = []
    for ell in range(len(parts)):  # one complement block per input eigenspace
        ci = idx[:, comp_cols[ell]]
        comp_parts.append(eig_err(hess[np.ix_(ci, ci)], hr[:, ci][:, :, ci],
                                  trunc[np.ix_(ci, ci)]))
    comp_vals = np.concatenate([v for v, _, _ in comp_parts])
    comp_err = np.concatenate([e for _, _, e in comp_parts])
    comp_space = np.repeat(np.arange(len(parts)), K)
    first_comp = int(np.argmin(comp_vals))
    comp_vec0 = comp_parts[first_comp // K][1][:, first_comp % K]
    ci0 = idx[:, comp_cols[0]]
    lam0 = float(model.input_distribution().eigenvalues[0]) if spaces else 1.0
    G = 0.5 * hess[np.ix_(ci0, ci0)] / lam0  # only G + G^T is meaningful

    def coupling(a, b):
        if a.size == 0 or b.size == 0:
            return 0.0, 0.0
        sub_ = np.abs(hess[np.ix_(a, b)])
        j = np.unravel_index(int(np.argmax(sub_)), sub_.shape)
        return float(sub_[j]), float(hess_err[np.ix_(a, b)][j])

    c_t, c_te = coupling(comp_idx, theta_idx)
    c_s, c_se = coupling(comp_idx, idx[:, span_cols].ravel())

    dim_span = rank
    lead = (len(parts),) if spaces else ()
    escape_dr = np.zeros(K) if has_mean else None  # complement modes leave r unchanged
    if comp_vals[first_comp] < span_vals[0]:
        lam_min, lam_err = float(comp_vals[first_comp]), float(comp_err[first_comp])
        block_name = "complement"
        dW = comp_vec0.reshape(K, 1)
        dQ, dR = np.zeros((*lead, K, K)), np.zeros((*lead, K, M))
        dth = {k: np.zeros(K) for k in names}
    else:
        lam_min, lam_err, block_name = float(span_vals[0]), float(span_err[0]), "span"
        reference = np.zeros((K, rank))
        L = min(K, M)
        reference[:L] = Bt[:L, span_cols]
        ref = np.concatenate([reference.ravel(), np.zeros(nT)])
        mode = canonical_mode(span_vals, span_vecs, ref, rtol=max(1e-8, 3 * lam_err))
        dW = np.zeros((K, D if spaces else D - 1))
        dW[:, span_cols] = mode[: K * rank].reshape(K, rank)
        if spaces:  # per input eigenspace: Q_l = W_l W_l^T, R_l = W_l Bt_l^T
            blocks = np.arange(D).reshape(len(parts), width)
            dQ = np.array([X[:, c] @ dW[:, c].T + dW[:, c] @ X[:, c].T for c in blocks])
            dR = np.array([dW[:, c] @ Bt[:, c].T for c in blocks])
        else:
            dQ = X0 @ dW.T + dW @ X0.T
            dR = dW @ Bt0.T
        dth = {k: mode[K * rank + j * K: K * rank + (j + 1) * K] for j, k in enumerate(names)}
        if has_mean:  # the mean direction's column: the first-order change of r
            escape_dr = dW[:, inputs.mean_space * width].copy()
    if not lam_err <= acc * max(1.0, abs(lam_min)) and not eng.exact:
        raise AccuracyError(
            f"Hessian: the error estimate of lambda_min is {lam_err:.3g} (value "
            f"{lam_min:.6g}), above accuracy={acc:g} * max(1, |value|), with "
            f"{eng.describe()} for normalization {normalization.name!r} and activation "
            f"{model.activation!r}; increase 'samples' or relax 'accuracy' (or the "
            "integrand has infinite variance here)"
        )
    return HessianSpectrum(
        span_vals, comp_vals, int(dim_span), lam_min, block_name, dW, dQ, dR, X0, Bt0, G,
        block, span_error=span_err, complement_error=comp_err, lambda_min_error=lam_err,
        escape_dtheta=dth, theta_names=names, params={k: p[k].copy() for k in names},
        engine=eng.name,
        coupling_complement_theta=c_t, coupling_complement_theta_error=c_te,
        coupling_complement_span=c_s, coupling_complement_span_error=c_se,
        landscape_only=not normalization.statistics_gradient, gradient_norm=gnorm,
        complement_space=comp_space, space_ranks=ranks,
        inputs=model.input_distribution() if spaces else None,
        escape_space=int(comp_space[first_comp]) if block_name == "complement" else 0,
        escape_dr=escape_dr,
    )


def _realize_spaces(model: Model, Q: np.ndarray, R: np.ndarray, r: Any, has_mean: bool
                    ) -> tuple[list[tuple[np.ndarray, np.ndarray, int]], np.ndarray,
                               np.ndarray, int]:
    """The weight-space realization of :func:`weight_space_hessian`: per eigenspace
    ``(X_l, Bt_l, rank_l)`` and the assembled ``X (K, D)``, ``Bt (M, D)`` with one
    complement column per eigenspace (last of its block), and the width of the leading
    mean slot (1 with an input mean, else 0). With a mean every block starts with the
    mean direction's slot: in eigenspace ``mean_space`` the column ``u`` itself (entries
    ``r``, ``s``; the remaining columns realize the residual ``Q_mu - r r^T``, ``R_mu - r
    s^T``, ``T_mu - s s^T``, counted in its rank), elsewhere an unused zero column (the
    blocks keep one width, :meth:`SpectralEngine.column_scale`)."""
    K, M = model.K, model.M
    inputs = model.input_distribution()
    # one realization (isotropic: the state itself) per input eigenspace
    states = zip(Q, R, teacher_overlaps(model), strict=True) if Q.ndim == 3 \
        else [(Q, R, np.asarray(model.T, dtype=float))]
    parts = []
    for ell, (q, rr, t) in enumerate(states):
        if not (has_mean and ell == inputs.mean_space):
            x, b, rank = _realize(q, rr, t)
            if has_mean:  # the unused mean slot
                x = np.concatenate([np.zeros((K, 1)), x], axis=1)
                b = np.concatenate([np.zeros((M, 1)), b], axis=1)
            parts.append((x, b, rank))
            continue
        rv = np.asarray(r, dtype=float).reshape(K)
        s = inputs.teacher_overlap(M)
        res = (q - np.outer(rv, rv), rr - np.outer(rv, s), t - np.outer(s, s))
        lam_min = float(np.linalg.eigvalsh(np.block([[res[0], res[1]], [res[1].T, res[2]]]))[0])
        if lam_min < -1e-9 * max(1.0, float(np.max(np.abs(q)))):
            raise SpecificationError(
                f"weight_space_hessian: the mean overlaps r = {rv.tolist()} do not fit the "
                f"state of input eigenspace {ell} (the residual Gram matrix of [Q_l, R_l; "
                f"R_l^T, T_l] minus the u components must be positive semi-definite; its "
                f"smallest eigenvalue is {lam_min:.3g})")
        x, b, rank = _realize(*res)
        parts.append((np.concatenate([rv[:, None], x], axis=1),
                      np.concatenate([s[:, None], b], axis=1), rank + 1))
    X = np.concatenate([np.concatenate([x, np.zeros((K, 1))], axis=1) for x, _, _ in parts],
                       axis=1)
    Bt = np.concatenate([np.concatenate([b, np.zeros((M, 1))], axis=1) for _, b, _ in parts],
                        axis=1)
    return parts, X, Bt, int(has_mean)


# --------------------------------------------------------------------------------------
# The plateau and the escape geometry
# --------------------------------------------------------------------------------------


def specialized(R: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Per branch: does ``R_in`` differ between students by more than ``tol`` (broken
    student symmetry)? ``R`` of shape ``(..., K, M)``."""
    return np.max(np.abs(R - R.mean(axis=-2, keepdims=True)), axis=(-2, -1)) > tol


def constant_predictor_error(engine: Engine) -> float:
    """``eps_g`` of the best input-independent student output: ``Var(zeta) / 2 +
    noise / 2``, the teacher output's variance over its fields ``y ~ N(m s, T)`` (``m s``
    the teachers' pre-activation means with non-centred inputs, else 0) by Gauss-Hermite
    quadrature, tensor grid of 80 points per teacher for ``M <= 3``, exact for the erf
    to ~1e-12; a fixed-seed Monte Carlo of 2^18 points beyond. Cached per (activation,
    T, mean, noise)."""
    T = np.asarray(engine.T, dtype=float)  # the teacher's pre-activation covariance
    mu = engine.model.input_distribution().teacher_mean(T.shape[0])
    key = (engine.activation.name, T.shape, T.tobytes(), mu.tobytes(),
           float(engine.model.noise))
    if key not in _CONSTANT_PREDICTOR:
        _CONSTANT_PREDICTOR[key] = _constant_predictor_error(engine.activation, T, mu,
                                                             float(engine.model.noise))
    return _CONSTANT_PREDICTOR[key]


_CONSTANT_PREDICTOR: dict[tuple, float] = {}


def _constant_predictor_error(activation: Activation, T: np.ndarray, mu: np.ndarray,
                              noise: float) -> float:
    x, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    L = np.linalg.cholesky(T)
    M = T.shape[0]
    if M <= 3:  # tensor grid over the teachers' M Gaussian coordinates
        grids = np.meshgrid(*([x] * M), indexing="ij")
        z = np.stack([g_.ravel() for g_ in grids], axis=-1)
        wz = np.prod(np.meshgrid(*([w] * M), indexing="ij"), axis=0).ravel()
    else:
        z = np.random.default_rng(0).standard_normal((1 << 18, M))
        wz = np.full(z.shape[0], 1.0 / z.shape[0])
    zeta = np.sum(activation.g(z @ L.T + mu), axis=-1)
    mean = float(wz @ zeta)
    return 0.5 * float(wz @ (zeta - mean) ** 2) + 0.5 * noise


def is_dead(engine: Engine, fp: FixedPoint) -> bool:
    """A dead branch: ``eps_g`` within ``5 eps_g_error`` (at least 1e-9) of the best
    constant predictor's (:func:`constant_predictor_error`): the student output does not
    depend on the input (e.g. a gain collapsed to 0)."""
    tol = max(1e-9, 5.0 * float(fp.eps_g_error))
    return bool(fp.eps_g >= constant_predictor_error(engine) - tol)


#: How :func:`plateau_branch` chooses (stored in attrs).
PLATEAU_RULE = (
    "among the unstable branches of the symmetric subspace in the symmetric phase (R_in "
    "equal across students within max(1e-6, 30 rate errors)) that are not dead (eps_g "
    "within 5 error estimates of the best constant predictor's), the one with the fewest "
    "unstable directions, then the lowest eps_g, then non-negative trainable parameters "
    "(mirror images)"
)


def plateau_branch(
    engine: Engine, points: Sequence[FixedPoint], eigenvalues: Sequence[np.ndarray]
) -> int:
    """Index of the plateau among ``points`` (:data:`PLATEAU_RULE`), -1 if none.

    ``eigenvalues[b]`` are the ODE Jacobian's eigenvalues at branch ``b`` (a generic
    trajectory lingers at a saddle of low unstable dimension: at ``eta > 0`` the point
    of identical students lies next to the plateau but is unstable in more directions).
    Cost: no integration and nothing that grows faster than polynomially in ``K``.
    """
    cand = []
    for b, fp in enumerate(points):
        if fp.kind != "symmetric":
            continue
        n_unstable = int(np.sum(np.real(eigenvalues[b]) > 1e-9))
        if not n_unstable or np.any(specialized(fp.R, max(1e-6, 30.0 * fp.rate_error))):
            continue
        if is_dead(engine, fp):
            continue
        mirror = any(float(np.mean(v)) < 0 for v in fp.params.values())
        cand.append(((n_unstable, round(fp.eps_g, 10), mirror), b))
    return min(cand)[1] if cand else -1


def mode_matrices(
    model: Model, coords: Sequence[tuple[str, int, int]], vec: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``(dQ, dR, dtheta)`` of a vector in the Jacobian coordinates ``coords``
    (:func:`jacobian_coordinates`; real part)."""
    K, M = model.K, model.M
    inputs = model.input_distribution()
    lead = () if inputs.isotropic else (inputs.L,)  # per input eigenspace: (L, K, K)
    dQ, dR = np.zeros((*lead, K, K)), np.zeros((*lead, K, M))
    dth: dict[str, np.ndarray] = {}
    for value, (kind, i, k) in zip(np.real(vec), coords, strict=True):  # a few dozen
        at = (_space_of(kind),) if lead else ()
        if kind.split("@")[0] == "Q":
            dQ[(*at, i, k)] = dQ[(*at, k, i)] = value
        elif kind.split("@")[0] == "R":
            dR[(*at, i, k)] = value
        else:
            dth.setdefault(kind[len("theta:"):], np.zeros(K))[i] = value
    return dQ, dR, dth


def unstable_vector(
    coords: Sequence[tuple[str, int, int]], values: np.ndarray, vectors: np.ndarray
) -> np.ndarray:
    """The most unstable Jacobian eigenvector; in a degenerate eigenspace the one that
    most increases ``sum_i R_ii`` (every student towards its own teacher: the escape
    inside the matched subspace), the same at every ``eta``."""
    reference = np.array([1.0 if c[0].split("@")[0] == "R" and c[1] == c[2] else 0.0
                          for c in coords])
    return canonical_mode(np.real(values), vectors, reference)


def realize_mode(
    coords: Sequence[tuple[str, int, int]], vec: np.ndarray, X: np.ndarray, Bt: np.ndarray
) -> np.ndarray | None:
    """``dW`` (shape of ``X``) whose first-order change of the Jacobian coordinates
    (``Q_ik``, ``R_in``; norms free where they are not coordinates) is the ``(Q, R)``
    part of ``vec``; None if no ``dW`` reproduces it to 1e-6 (relative)."""
    K, D = X.shape
    pairs = [(v, c) for v, c in zip(np.real(vec), coords, strict=True) if c[0] in ("Q", "R")]
    target = np.array([v for v, _ in pairs])
    basis = np.eye(K * D).reshape(K * D, K, D)
    dQ = X[None] @ np.swapaxes(basis, 1, 2) + basis @ X.T[None]  # (K D, K, K)
    dR = basis @ Bt.T[None]  # (K D, K, M)
    A = np.stack([dQ[:, i, k] if v == "Q" else dR[:, i, k] for _, (v, i, k) in pairs], axis=0)
    sol, *_ = np.linalg.lstsq(A, target, rcond=None)
    if np.linalg.norm(A @ sol - target) > 1e-6 * max(float(np.linalg.norm(target)), 1e-300):
        return None
    return sol.reshape(K, D)


def _escape_start_spaces(model: Model, spec: HessianSpectrum, size: float
                         ) -> tuple[OrderParameters, str, dict[str, np.ndarray]]:
    """:func:`escape_start`'s last resort with structured inputs: the Hessian's escape
    mode added to the realization (``L`` blocks of ``K + M + 1`` coordinates, the last of
    each its eigenspace's complement; with an input mean one more leading column per block,
    in eigenspace ``mean_space`` the mean direction), the order parameters read off block by
    block (with a mean, the change of ``r`` too)."""
    X, Bt = spec.X.copy(), spec.Bt
    dW = spec.escape_dW
    dth = {k: np.asarray(v, dtype=float) for k, v in spec.escape_dtheta.items()}
    step = size * np.linalg.norm(X) / math.sqrt(
        float(np.sum(dW**2)) + sum(float(np.sum(v**2)) for v in dth.values()))
    L = model.input_distribution().L
    width = X.shape[1] // L  # [mean slot,] K + M realization columns, one complement
    if spec.escape_block == "span":
        X = X + step * dW
    else:
        X[:, spec.escape_space * width + width - 1] = step * dW[:, 0]
    cols = np.arange(L * width).reshape(L, width)
    Q = np.array([X[:, c] @ X[:, c].T for c in cols])
    R = np.array([X[:, c] @ Bt[:, c].T for c in cols])
    moved = {k: step * v for k, v in dth.items()}
    if spec.escape_dr is not None:  # the mean overlaps r: the u column's change
        moved[MEAN_OVERLAP] = step * np.asarray(spec.escape_dr, dtype=float)
    return OrderParameters(0.5 * (Q + np.swapaxes(Q, 1, 2)), R, teacher_overlaps(model)), \
        f"Hessian escape mode in weight space ({spec.escape_block} block)", moved


def escape_start(
    model: Model,
    fp: FixedPoint,
    coords: Sequence[tuple[str, int, int]],
    vec: np.ndarray,
    spec: HessianSpectrum,
    size: float,
) -> tuple[OrderParameters, str, dict[str, np.ndarray]]:
    """The plateau ``fp`` moved along its escape direction: ``(start, description,
    dtheta)``.

    The direction is the Jacobian eigenvector ``vec`` (coordinates ``coords``),
    including the trainable parameters (``dtheta``, empty without them): the step is
    ``size`` times ``|(Q, R)|`` over the norm of the whole vector ``(dQ, dR, dtheta)``,
    either sign. Where that leaves the PSD cone (a plateau of identical students on its
    boundary), the same eigenvector is realized in weight space (:func:`realize_mode`,
    the realization ``spec.X``, ``spec.Bt``), so the start moves along the ODE's unstable
    direction and stays realizable. Last resort: the Hessian's escape mode in weight
    space (step ``size |W|`` over ``|(dW, dtheta)|``).
    """
    dQ, dR, dth = mode_matrices(model, coords, vec)
    extra = sum(float(np.sum(v**2)) for v in dth.values())
    total = math.sqrt(float(np.sum(fp.Q**2) + np.sum(fp.R**2)))
    scale = size * total / math.sqrt(float(np.sum(dQ**2) + np.sum(dR**2)) + extra)
    T = teacher_overlaps(model)  # per input eigenspace with structured inputs
    for sign in (1.0, -1.0):
        Q, R = fp.Q + sign * scale * dQ, fp.R + sign * scale * dR
        moved = {k: np.asarray(fp.params.get(k, 0.0)) + sign * scale * v
                 for k, v in dth.items()}
        if state_margin(model, Q, R, moved) > 1e-12:
            try:
                return OrderParameters(Q, R, T), (
                    f"ODE Jacobian's most unstable eigenvector, sign {sign:+g}"), \
                    {k: sign * scale * v for k, v in dth.items()}
            except ValueError:
                pass
    X, Bt = spec.X, spec.Bt
    if fp.Q.ndim == 3:  # structured inputs: the Hessian's escape mode, per eigenspace
        return _escape_start_spaces(model, spec, size)
    realized = realize_mode(coords, vec, X, Bt)
    if realized is not None:
        Xp = X + scale * realized
        op = to_order_parameters(Xp @ Xp.T, Xp @ Bt.T, model.T)
        return op, ("ODE Jacobian's most unstable eigenvector realized in weight space "
                    "(first order)"), {k: scale * v for k, v in dth.items()}
    dW = spec.escape_dW
    dth = {k: np.asarray(v, dtype=float) for k, v in spec.escape_dtheta.items()}
    step = size * np.linalg.norm(X) / math.sqrt(
        float(np.sum(dW**2)) + sum(float(np.sum(v**2)) for v in dth.values()))
    if spec.escape_block == "span":
        Xp, Btp = X + step * dW, Bt
    else:
        Xp = np.concatenate([X, step * dW], axis=1)
        Btp = np.concatenate([Bt, np.zeros((Bt.shape[0], 1))], axis=1)
    op = to_order_parameters(Xp @ Xp.T, Xp @ Btp.T, model.T)
    return op, f"Hessian escape mode in weight space ({spec.escape_block} block)", \
        {k: step * v for k, v in dth.items()}
