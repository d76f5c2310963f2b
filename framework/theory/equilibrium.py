"""Equilibria of the order-parameter ODE and the exact weight-space Hessian.

Generic mathematics for any normalization of the *diagonal-scale* family
(``x~_i = s_i(Q) x_i``, erf activation): it uses only the model, a
:class:`~framework.Normalization` instance (its :meth:`scale`,
:meth:`scale_jacobian`, :meth:`parameters`, ``scale_invariant`` and
``trainable``) and :mod:`framework.theory`. It knows no particular normalization.

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

import itertools
import json
import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
from scipy import optimize

from framework import theory
from framework._validation import SpecificationError, check_int, check_real
from framework.model import OrderParameters, TeacherStudent
from framework.normalization import Normalization
from framework.theory import _kernels as _theory

__all__ = [
    "FixedPoint",
    "HessianSpectrum",
    "SymmetricSubspace",
    "angular_rhs",
    "canonical_mode",
    "classify_direction",
    "default_starts",
    "eps_g_gradient",
    "find_fixed_points",
    "jacobian_coordinates",
    "ode_jacobian",
    "parameters_attrs",
    "plateau_index",
    "psd_margin",
    "rescale_weight_norm",
    "scaled_rhs",
    "sorted_eigen",
    "symmetric_subspace",
    "to_order_parameters",
    "weight_gradient",
    "weight_space_hessian",
]

#: Relative tolerance under which a covariance eigenvalue counts as zero (rank).
RANK_TOL = 1e-10
#: A root is accepted when ``max |r|`` (scaled right-hand side) is below this.
RESIDUAL_TOL = 1e-10
#: Two roots closer than this (max abs difference of Q, R) are the same branch.
DEDUPE_TOL = 1e-6


# --------------------------------------------------------------------------------------
# eps_g and its analytic gradient
# --------------------------------------------------------------------------------------


def _require_closed_form(model: TeacherStudent, normalization: Normalization) -> None:
    theory.scale_functions(model, normalization)  # raises ClosedFormUnavailable


def _params(model: TeacherStudent, normalization: Normalization) -> dict[str, np.ndarray]:
    return normalization.parameters(model.K)


def eps_g_gradient(
    model: TeacherStudent, normalization: Normalization, Q: Any, R: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``eps_g`` and its exact gradient ``(G, H) = (d eps_g / dQ, d eps_g / dR)``.

    The normalization enters through ``s(Q)`` and its Jacobian (the chain rule through
    the statistics). ``Q``'s entries are treated as independent (``G`` need not be
    symmetric; only ``G + G^T`` is meaningful on symmetric ``Q``).

    Parameters
    ----------
    model, normalization
        Erf activation and a diagonal-scale normalization (closed form).
    Q, R : array_like, shapes (..., K, K), (..., K, M)
        Stacks of order parameters (any leading shape).

    Returns
    -------
    eps : ndarray (...)
        Generalization error (noise term included).
    G : ndarray (..., K, K)
    H : ndarray (..., K, M)
    """
    _require_closed_form(model, normalization)
    Q = np.asarray(Q, dtype=float)
    R = np.asarray(R, dtype=float)
    params = _params(model, normalization)
    s = np.asarray(normalization.scale(Q, params), dtype=float)
    ds = np.asarray(normalization.scale_jacobian(Q, params), dtype=float)
    eps, G, H, _ = _theory.eps_g_gradient(Q, R, model.T, s, ds, model.noise)
    return eps, G, H


def weight_gradient(
    model: TeacherStudent, normalization: Normalization, X: np.ndarray, Bt: np.ndarray
) -> np.ndarray:
    """``dF/dX`` for ``F(X) = eps_g(X X^T, X Bt^T)``; ``X (..., K, D)``, ``Bt (M, D)``."""
    Q = X @ np.swapaxes(X, -1, -2)
    R = X @ Bt.T
    _, G, H = eps_g_gradient(model, normalization, Q, R)
    return (G + np.swapaxes(G, -1, -2)) @ X + H @ Bt


# --------------------------------------------------------------------------------------
# Right-hand sides
# --------------------------------------------------------------------------------------


def scaled_rhs(
    model: TeacherStudent,
    normalization: Normalization,
    Q: np.ndarray,
    R: np.ndarray,
    eta: float,
    batch_size: int = 1,
    second_order: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``(dQ, dR) / d(eta alpha)``: the ODE per unit of ``eta * alpha``.

    ``eta = 0`` (or ``second_order=False``) gives the first-order drift alone (the
    gradient-flow limit); otherwise the drift plus ``(eta / B) E[a a^T]``.
    """
    if eta == 0.0 or not second_order:
        return theory.ode_rhs(model, normalization, Q, R, 1.0, batch_size, second_order=False)
    dQ, dR = theory.ode_rhs(model, normalization, Q, R, eta, batch_size, second_order=True)
    return dQ / eta, dR / eta


def angular_rhs(
    Q: np.ndarray, R: np.ndarray, dQ: np.ndarray, dR: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Project a flow ``(dQ, dR)`` on the angles (norm changes removed).

    ``dQ_ik - Q_ik (dQ_ii / 2Q_ii + dQ_kk / 2Q_kk)`` (zero on the diagonal) and
    ``dR_in - R_in dQ_ii / 2Q_ii``: ``q`` times the rate of change of the angles
    ``Q_ik / sqrt(Q_ii Q_kk)``, ``R_in / sqrt(Q_ii)`` when ``Q_ii = q``.
    """
    rate = np.diagonal(dQ, axis1=-2, axis2=-1) / (2.0 * np.diagonal(Q, axis1=-2, axis2=-1))
    aQ = dQ - Q * (rate[..., :, None] + rate[..., None, :])
    aR = dR - R * rate[..., :, None]
    return aQ, aR


def _flow(model, normalization, Q, R, eta, batch_size, second_order):
    dQ, dR = scaled_rhs(model, normalization, Q, R, eta, batch_size, second_order)
    if normalization.scale_invariant:
        return angular_rhs(Q, R, dQ, dR)
    return dQ, dR


def rescale_weight_norm(
    Q: np.ndarray, R: np.ndarray, weight_norm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rescale each student vector to ``Q_ii = weight_norm`` (angles kept)."""
    c = np.sqrt(weight_norm / np.diagonal(Q))
    return Q * np.outer(c, c), R * c[:, None]


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

    @property
    def size(self) -> int:
        return len(self.names)

    def embed(self, theta: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        theta = np.asarray(theta, dtype=float)
        return (np.tensordot(theta, self.masks_Q, axes=1),
                np.tensordot(theta, self.masks_R, axes=1))

    def project(self, Q: np.ndarray, R: np.ndarray) -> np.ndarray:
        """Coordinates of the orthogonal projection (means over each support)."""
        count = self.masks_Q.sum(axis=(1, 2)) + self.masks_R.sum(axis=(1, 2))
        total = np.tensordot(self.masks_Q, Q, axes=([1, 2], [-2, -1])) + np.tensordot(
            self.masks_R, R, axes=([1, 2], [-2, -1])
        )
        return np.moveaxis(total, 0, -1) / count

    def symmetric_fraction(self, dQ: np.ndarray, dR: np.ndarray) -> float:
        """``|P (dQ, dR)| / |(dQ, dR)|`` (Frobenius) for the orthogonal projector P."""
        pQ, pR = self.embed(self.project(dQ, dR))
        total = math.sqrt(float(np.sum(dQ**2) + np.sum(dR**2)))
        if total == 0.0:
            return float("nan")
        return math.sqrt(float(np.sum(pQ**2) + np.sum(pR**2))) / total


def _matched_allowed(model: TeacherStudent) -> bool:
    if model.K != model.M:
        return False
    T = model.T
    off = T[~np.eye(model.M, dtype=bool)]
    return bool(np.allclose(np.diag(T), T[0, 0], rtol=1e-12, atol=0)
                and (off.size == 0 or np.allclose(off, off[0], rtol=1e-12, atol=0)))


def symmetric_subspace(model: TeacherStudent, kind: str = "auto") -> SymmetricSubspace:
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
    return SymmetricSubspace(kind, K, M, tuple(names), np.array(mQ), np.array(mR))


def default_starts(
    model: TeacherStudent, subspace: SymmetricSubspace
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
    it to the requested weight norm afterwards).
    """
    K, M, T = model.K, model.M, model.T
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
        The order parameters (for scale-invariant normalizations ``Q_ii = weight_norm``).
    theta : ndarray
        Its coordinates in :attr:`subspace` (names ``subspace.names``).
    residual : float
        ``max |r|`` of the full scaled right-hand side (angular part for scale-invariant
        normalizations), per unit of ``eta * alpha``.
    eps_g : float
    weight_norm : float
        Mean ``Q_ii``.
    start : str
        Label of the first start that converged to it.
    """

    Q: np.ndarray = attrs.field(eq=False)
    R: np.ndarray = attrs.field(eq=False)
    theta: np.ndarray = attrs.field(eq=False)
    residual: float
    eps_g: float
    weight_norm: float
    start: str
    subspace: SymmetricSubspace


def psd_margin(Q: np.ndarray, R: np.ndarray, T: np.ndarray) -> float:
    """Smallest eigenvalue of ``[[Q, R], [R^T, T]]`` relative to ``max(1, largest)``."""
    cov = np.block([[Q, R], [R.T, T]])
    lam = np.linalg.eigvalsh(cov)
    return float(lam[0] / max(1.0, lam[-1]))


def find_fixed_points(
    model: TeacherStudent,
    normalization: Normalization,
    *,
    eta: float,
    batch_size: int = 1,
    second_order: bool = True,
    subspace: str = "auto",
    weight_norm: float | None = None,
    starts: Sequence[tuple[str, np.ndarray, np.ndarray]] | None = None,
) -> list[FixedPoint]:
    """All distinct fixed points in the symmetric subspace reached from ``starts``.

    The scaled right-hand side (:func:`scaled_rhs`, ``eta = 0``: gradient flow) is
    restricted to the subspace (it stays there by symmetry) and solved by Powell's
    hybrid method from each start (:func:`default_starts` unless given), then polished
    by Newton steps. The closed forms are analytic a little beyond the positive
    semi-definite cone, so roots on its boundary (``Q = C``, the plateau of gradient
    flow) are regular; roots outside the cone (joint covariance with an eigenvalue
    below ``-1e-9``) are discarded. A root is kept if ``max |r| < 1e-10`` (the full,
    unrestricted right-hand side: this also checks the subspace's invariance); roots
    closer than ``1e-6`` are merged. Sorted by ``eps_g`` (descending).

    Scale-invariant normalizations: ``Q_ii`` is held at ``weight_norm`` (default 1)
    and the angular flow is solved (module docstring). Otherwise ``weight_norm`` must
    be None.
    """
    _require_closed_form(model, normalization)
    eta = check_real("eta", eta, minimum=0.0)
    sub = symmetric_subspace(model, subspace)
    invariant = bool(normalization.scale_invariant)
    if invariant:
        weight_norm = 1.0 if weight_norm is None else check_real(
            "weight_norm", weight_norm, minimum=0.0, strict=True)
    elif weight_norm is not None:
        raise SpecificationError(
            f"'weight_norm' applies only to scale-invariant normalizations "
            f"({normalization.name!r} is not), got {weight_norm!r}"
        )
    if starts is None:
        starts = default_starts(model, sub)
    free = np.arange(sub.size) if not invariant else np.arange(1, sub.size)

    def embed(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        theta = np.empty(sub.size)
        if invariant:
            theta[0] = weight_norm
        theta[free] = x
        return sub.embed(theta)

    def residual(x: np.ndarray) -> np.ndarray:
        Q, R = embed(x)
        with np.errstate(all="ignore"):
            dQ, dR = _flow(model, normalization, Q, R, eta, batch_size, second_order)
        out = sub.project(dQ, dR)[free]
        return np.where(np.isfinite(out), out, 1e6)

    found: list[FixedPoint] = []
    for label, Q0, R0 in starts:
        if invariant:
            Q0, R0 = rescale_weight_norm(np.asarray(Q0), np.asarray(R0), weight_norm)
        x0 = sub.project(np.asarray(Q0, dtype=float), np.asarray(R0, dtype=float))[free]
        sol = optimize.root(residual, x0, method="hybr", options={"xtol": 1e-14})
        x = _newton_polish(residual, sol.x)
        if x is None:
            continue
        Q, R = embed(x)
        if not np.all(np.isfinite(Q)) or psd_margin(Q, R, model.T) < -1e-9:
            continue
        with np.errstate(all="ignore"):
            dQ, dR = _flow(model, normalization, Q, R, eta, batch_size, second_order)
        res = float(max(np.max(np.abs(dQ)), np.max(np.abs(dR))))
        if not res < RESIDUAL_TOL:
            continue
        if any(
            max(np.max(np.abs(fp.Q - Q)), np.max(np.abs(fp.R - R))) < DEDUPE_TOL for fp in found
        ):
            continue
        eps = theory.generalization_error(
            model, normalization, to_order_parameters(Q, R, model.T)
        )
        theta = np.empty(sub.size)
        theta[free] = x
        if invariant:
            theta[0] = weight_norm
        found.append(FixedPoint(Q, R, theta, res, eps, float(np.mean(np.diagonal(Q))), label, sub))
    found.sort(key=lambda fp: -fp.eps_g)
    return found


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


def _richardson_jacobian(fun, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Jacobian of ``fun`` (vector -> vector) by central differences, Richardson x2."""
    n = x.size
    cols = []
    for j in range(n):  # a handful of coordinates
        e = np.zeros(n)
        levels = []
        for k in range(3):
            e[j] = h[j] / 2**k
            levels.append((fun(x + e) - fun(x - e)) / (2 * e[j]))
        d1 = [(4 * levels[1] - levels[0]) / 3, (4 * levels[2] - levels[1]) / 3]
        cols.append((16 * d1[1] - d1[0]) / 15)
    return np.array(cols).T


# --------------------------------------------------------------------------------------
# ODE Jacobian in the full order-parameter space
# --------------------------------------------------------------------------------------


def jacobian_coordinates(K: int, M: int, scale_invariant: bool) -> list[tuple[str, int, int]]:
    """The coordinates of :func:`ode_jacobian`: ``("Q", i, k)`` (``i <= k``; ``i < k`` for
    scale-invariant normalizations, whose norms are held fixed) and ``("R", i, n)``."""
    first = 1 if scale_invariant else 0
    coords = [("Q", i, k) for i in range(K) for k in range(i + first, K)]
    coords += [("R", i, n) for i in range(K) for n in range(M)]
    return coords


def ode_jacobian(
    model: TeacherStudent,
    normalization: Normalization,
    Q: np.ndarray,
    R: np.ndarray,
    *,
    eta: float,
    batch_size: int = 1,
    second_order: bool = True,
) -> np.ndarray:
    """Jacobian of the scaled flow in the full order-parameter space, per unit ``eta alpha``.

    Coordinates :func:`jacobian_coordinates` (``Q`` perturbed symmetrically). For a
    scale-invariant normalization this is the angular flow at fixed weight norms (for
    ``eta = 0`` its eigenvalues are those of the full ODE without the ``K`` zeros of
    the conserved norms). Central differences with two Richardson levels (error
    ``O(h^6)``, ``h = 1e-3``).
    """
    K, M = model.K, model.M
    coords = jacobian_coordinates(K, M, bool(normalization.scale_invariant))
    x0 = np.array([Q[i, k] if v == "Q" else R[i, k] for v, i, k in coords])
    iq = np.array([(i, k) for v, i, k in coords if v == "Q"], dtype=int).reshape(-1, 2)
    nq = len(iq)

    def fun(x: np.ndarray) -> np.ndarray:
        Qx = np.array(Q, dtype=float)
        Qx[iq[:, 0], iq[:, 1]] = x[:nq]
        Qx[iq[:, 1], iq[:, 0]] = x[:nq]
        Rx = x[nq:].reshape(K, M)
        dQ, dR = _flow(model, normalization, Qx, Rx, eta, batch_size, second_order)
        return np.concatenate([dQ[iq[:, 0], iq[:, 1]], dR.ravel()])

    return _richardson_jacobian(fun, x0, np.full(x0.size, 1e-3))


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


# --------------------------------------------------------------------------------------
# Which branch is the plateau
# --------------------------------------------------------------------------------------


def _angles(Q: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = np.sqrt(np.diagonal(Q, axis1=-2, axis2=-1))
    return Q / (n[..., :, None] * n[..., None, :]), R / n[..., :, None]


def plateau_index(
    model: TeacherStudent,
    normalization: Normalization,
    fixed_points: Sequence[FixedPoint],
    unstable: Sequence[int],
    initial: OrderParameters,
    *,
    eta: float,
    batch_size: int = 1,
    second_order: bool = True,
    horizon: float = 2000.0,
) -> tuple[int, float]:
    """The branch the dynamics from ``initial`` lingers at: ``(index, distance)``.

    Candidates are the *unspecialized* unstable branches (``unstable[b] > 0`` unstable
    directions, and ``R_in`` the same for every student ``i``: the symmetric phase);
    if there is none, every unstable branch. The ODE (``eta``; gradient flow if
    ``eta = 0``) is integrated up to ``eta alpha = horizon`` and, for each candidate, the
    closest approach of the trajectory is measured (max-abs distance of ``(Q, R)``,
    minimized over student permutations; angles for scale-invariant normalizations,
    whose norms drift). Among the candidates within ``2 d_min + 0.02`` of the closest it
    returns the one with the fewest unstable directions (a generic trajectory lingers at
    a saddle of low unstable dimension; e.g. at ``eta > 0`` the point of identical
    students ``Q = C`` lies next to the plateau ``Q > C`` but is unstable in more
    directions), ties broken by distance. ``(-1, nan)`` if no branch is unstable.
    """
    unstable_b = [b for b, u in enumerate(unstable) if u]
    symmetric = [
        b for b in unstable_b
        if np.max(np.abs(fixed_points[b].R - fixed_points[b].R.mean(axis=0))) < 1e-6
    ]
    candidates = symmetric or unstable_b
    if not candidates:
        return -1, float("nan")
    rate = eta if (eta > 0 and second_order) else 1.0
    grid = np.linspace(0.0, horizon / rate, 4001)
    traj = theory.integrate(
        model, normalization, initial, eta=rate, alpha=grid, batch_size=batch_size,
        second_order=bool(second_order and eta > 0), rtol=1e-7, atol=1e-9,
    )
    Qt, Rt = traj.Q, traj.R
    if normalization.scale_invariant:
        Qt, Rt = _angles(Qt, Rt)
    perms = np.array(list(itertools.permutations(range(model.K))))
    dists = {}
    for b in candidates:
        Qb, Rb = fixed_points[b].Q, fixed_points[b].R
        if normalization.scale_invariant:
            Qb, Rb = _angles(Qb, Rb)
        Qp = Qb[perms[:, :, None], perms[:, None, :]]  # (P, K, K)
        Rp = Rb[perms]  # (P, K, M)
        dist = np.maximum(
            np.max(np.abs(Qt[:, None] - Qp[None]), axis=(-2, -1)),
            np.max(np.abs(Rt[:, None] - Rp[None]), axis=(-2, -1)),
        ).min()
        dists[b] = float(dist)
    d_min = min(dists.values())
    near = [b for b in candidates if dists[b] <= 2.0 * d_min + 0.02]
    best = min(near, key=lambda b: (int(unstable[b]), dists[b]))
    return best, dists[best]


# --------------------------------------------------------------------------------------
# Weight-space Hessian
# --------------------------------------------------------------------------------------


@attrs.frozen
class HessianSpectrum:
    """The exact spectrum of the Hessian of ``F(W) = eps_g(W W^T, W Btilde^T)``.

    For every ``N >= dim_span`` the ``K N`` eigenvalues are ``span`` (each once) and
    ``complement`` (each ``N - dim_span`` times).

    Attributes
    ----------
    span : ndarray (K * dim_span,)
        Eigenvalues of the block on ``{dW : each dW_i in S}``, ``S`` the span of the rows
        of ``W`` and ``Btilde``, ascending.
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
    span_matrix : ndarray (K * dim_span, K * dim_span)
        The span block itself, coordinates ``(i, d)`` = component ``d`` of ``dW_i``
        (row-major), in the realization's basis.
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

    def full(self, N: int) -> np.ndarray:
        """All ``K N`` eigenvalues at input dimension ``N``, ascending."""
        N = check_int("N", N, minimum=self.dim_span)
        return np.sort(np.concatenate([self.span, np.repeat(self.complement, N - self.dim_span)]))


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


def weight_space_hessian(
    model: TeacherStudent, normalization: Normalization, Q: Any, R: Any
) -> HessianSpectrum:
    """Exact Hessian spectrum of ``F(W) = eps_g(W W^T, W Btilde^T)`` at ``(Q, R)``.

    Coordinates ``W = J / sqrt(N)`` (DESIGN.md, "Weight-space Hessian"): the order
    parameters are realized in ``D = K + M`` dimensions (a factor of the joint
    covariance, columns by decreasing eigenvalue); the Hessian of ``F`` on that
    ``K x D`` block is computed from the *analytic* gradient
    ``dF/dW = (G + G^T) W + H Btilde`` (chain rule through ``s(Q)`` and its Jacobian)
    by central differences with two Richardson levels (relative step ``1e-2`` of each
    row's norm, error ``O(h^6)``, ~1e-11). Directions orthogonal to the span ``S`` of
    the rows of ``W`` and ``Btilde`` see exactly ``(G + G^T) (x) I``; the block is split
    accordingly (checked numerically) so ``dim_span = dim S``.

    Trainable normalization parameters are not included: a normalization with a
    non-empty ``trainable`` raises ``NotImplementedError`` naming it (``plain`` and
    ``batchnorm`` with fixed ``gamma`` have none; e.g. ``weightnorm`` and
    ``batchnorm_affine`` do). So does a normalization with ``statistics_gradient =
    False`` (e.g. ``batchnorm_stopgrad``), whose ``scale_jacobian`` is zero by design.
    The Hessian is taken at the normalization's own (fixed) parameter values, e.g.
    batchnorm's ``gamma``.
    """
    if normalization.trainable:
        raise NotImplementedError(
            f"the weight-space Hessian does not include trainable normalization parameters "
            f"yet; normalization {normalization.name!r} trains {list(normalization.trainable)}"
        )
    if not normalization.statistics_gradient:
        raise NotImplementedError(
            f"normalization {normalization.name!r} passes no gradient through its statistics "
            "(statistics_gradient = False): its SGD drift is not the gradient of eps_g and its "
            "scale_jacobian is zero by design, so the Hessian of eps_g is not available"
        )
    _require_closed_form(model, normalization)
    Q = np.asarray(Q, dtype=float)
    R = np.asarray(R, dtype=float)
    K, M = model.K, model.M
    X, Bt, rank = _realize(Q, R, model.T)
    D = K + M
    n = K * D
    rows = np.linalg.norm(X, axis=1)
    h_row = 1e-2 * np.clip(np.minimum(rows, 1.0), 1e-3, None)
    h = np.repeat(h_row, D)  # step of coordinate (i, d)
    eye = np.eye(n).reshape(n, K, D)
    steps = np.array([1.0, 0.5, 0.25])
    pert = eye[None] * steps[:, None, None, None] * h[None, :, None, None]  # (3, n, K, D)
    stack = np.concatenate([X + pert, X - pert], axis=0)  # (6, n, K, D)
    grads = weight_gradient(model, normalization, stack, Bt).reshape(6, n, n)
    diffs = (grads[:3] - grads[3:]) / (2.0 * steps[:, None, None] * h[None, :, None])
    d1 = (4.0 * diffs[1:] - diffs[:-1]) / 3.0
    hess = (16.0 * d1[1] - d1[0]) / 15.0  # rows: perturbed coordinate
    hess = 0.5 * (hess + hess.T)
    _, G, _ = eps_g_gradient(model, normalization, Q, R)
    comp_mat = G + G.T
    complement = np.linalg.eigvalsh(comp_mat)

    dim_span = D
    if rank < D:
        idx = np.arange(n).reshape(K, D)
        span_idx = idx[:, :rank].ravel()
        rest_idx = idx[:, rank:].ravel()
        coupling = np.max(np.abs(hess[np.ix_(span_idx, rest_idx)]))
        scale = max(1.0, float(np.max(np.abs(hess))))
        expected = np.kron(comp_mat, np.eye(D - rank))
        rest = hess[np.ix_(rest_idx, rest_idx)]
        if coupling < 1e-8 * scale and np.max(np.abs(rest - expected)) < 1e-8 * scale:
            dim_span = rank
    idx = np.arange(n).reshape(K, D)[:, :dim_span].ravel()
    block = hess[np.ix_(idx, idx)]
    span_vals, span_vecs = np.linalg.eigh(block)

    comp_vals, comp_vecs = np.linalg.eigh(comp_mat)
    if comp_vals[0] < span_vals[0] - 1e-12 * max(1.0, abs(span_vals[0])):
        lam_min, block_name = float(comp_vals[0]), "complement"
        dW = comp_vecs[:, 0].reshape(K, 1)
        dQ, dR = np.zeros((K, K)), np.zeros((K, M))
    else:
        lam_min, block_name = float(span_vals[0]), "span"
        reference = np.zeros((K, dim_span))  # d(sum_i R_ii)/d dW: every student i moves
        L = min(K, M)                         # towards teacher i (reproducible choice)
        reference[:L] = Bt[:L, :dim_span]
        mode = canonical_mode(span_vals, span_vecs, reference.ravel(), rtol=1e-8)
        dW = np.zeros((K, D))
        dW[:, :dim_span] = mode.reshape(K, dim_span)
        dQ = X @ dW.T + dW @ X.T
        dR = dW @ Bt.T
    return HessianSpectrum(
        span_vals, complement, int(dim_span), lam_min, block_name, dW, dQ, dR, X, Bt, G, block
    )


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
    K = Q.shape[0]
    basis = []
    for i in range(K):
        e = np.zeros(K)
        e[i] = 1.0
        bQ = np.outer(e, Q[i]) + np.outer(Q[i], e)
        bR = np.outer(e, R[i])
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


def parameters_attrs(model: TeacherStudent, normalization: Normalization) -> dict[str, Any]:
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


# ======================================================================================
# Generic engine (any normalization, any activation, trainable parameters)
# ======================================================================================
#
# Where no closed form applies (:func:`framework.theory.has_closed_form` is False) or
# the normalization passes no gradient through its statistics, the analyzers use the
# functions below. Their ``engine`` argument ("auto", "closed_form", "generic") is that
# of :func:`framework.theory.expectation_engine`: with "auto" a normalization whose
# trainable parameters are scale (or held shift) parameters gets the exact
# ClosedFormEngine. They call only the normalization's per-sample interface through
# :class:`framework.theory.ExpectationEngine` and report error estimates (standard
# errors of independent randomizations, see :class:`framework.theory.Quadrature`).


def needs_generic(model: TeacherStudent, normalization: Normalization) -> bool:
    """True if the fixed points and the Hessian need the generic engine."""
    return not theory.has_closed_form(model, normalization)


def hessian_needs_generic(model: TeacherStudent, normalization: Normalization) -> bool:
    """The Hessian also needs it when gradients do not flow through the statistics
    (``statistics_gradient = False``: the closed form's ``scale_jacobian`` is zero)."""
    return needs_generic(model, normalization) or not normalization.statistics_gradient


def scale_invariance(model: TeacherStudent, normalization: Normalization) -> str:
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
    Q: np.ndarray, R: np.ndarray, dQ: np.ndarray, dR: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Remove a common rescaling: ``dQ - Q tr(dQ) / tr(Q)``, ``dR - R tr(dQ) / 2 tr(Q)``."""
    rate = np.trace(dQ, axis1=-2, axis2=-1) / (2.0 * np.trace(Q, axis1=-2, axis2=-1))
    return dQ - 2.0 * Q * rate[..., None, None], dR - R * rate[..., None, None]


@attrs.frozen
class GenericFixedPoint(FixedPoint):
    """A :class:`FixedPoint` of the generic engine: also the trainable parameters'
    values and error estimates.

    ``params`` maps each trainable parameter to its (common) value per unit (K,);
    ``residual`` is ``max |r|`` of the *estimated* flow (the root of the smooth
    quadrature estimate); ``rate_error`` is the largest error estimate of the scaled
    right-hand side there, ``eps_g_error`` that of ``eps_g``.
    """

    params: dict = attrs.field(factory=dict, eq=False)
    rate_error: float = float("nan")
    eps_g_error: float = float("nan")


def _generic_flow(eng, invariance, Q, R, params, eta, batch_size, second_order):
    """Scaled flow ``(dQ, dR, dtheta) / eta`` of the generic engine (angular part)."""
    gf = eta == 0.0 or not second_order
    r = eng.rates(Q, R, params, eta=1.0 if gf else eta, batch_size=batch_size,
                  second_order=not gf, check=False)
    scale = 1.0 if gf else eta
    dQ, dR = r.dQ / scale, r.dR / scale
    if invariance == "unit":
        dQ, dR = angular_rhs(Q, R, dQ, dR)
    elif invariance == "common":
        dQ, dR = common_angular_rhs(Q, R, dQ, dR)
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


def find_fixed_points_generic(
    model: TeacherStudent,
    normalization: Normalization,
    *,
    eta: float,
    batch_size: int = 1,
    second_order: bool = True,
    subspace: str = "auto",
    weight_norm: float | None = None,
    quadrature: Any = None,
    starts: Sequence[tuple] | None = None,
    engine: str = "auto",
) -> list[GenericFixedPoint]:
    """Fixed points in the symmetric subspace with the generic engine (any normalization).

    Like :func:`find_fixed_points`, with the trainable parameters as extra coordinates
    (one common value per parameter: the symmetric subspace), the weight norms held at
    ``weight_norm`` (default 1) for norm-conserving normalizations
    (:func:`scale_invariance`: per unit, ``Q_ii``; common, ``tr Q / K``) and the
    starts of :func:`default_starts` inside the cone that lie in the symmetric phase
    (``unspecialized ... + orthogonal``). Roots on the cone's boundary (identical
    students) are discarded: the quadrature is not differentiable there.
    The root of the smooth quadrature estimate is accepted if its
    residual is below ``max(1e-10, 10 * rate_error)``. Needs ``eta > 0`` with the
    ``eta^2`` term (else :class:`~framework.SpecificationError`).

    With the exact engine (:class:`~framework.theory.ClosedFormEngine`: trainable
    scale parameters as state, shifts held at 0) none of the quadrature's limitations
    apply: every start of :func:`default_starts` is used, roots on the cone's boundary
    are kept (outside it by more than ``1e-9``: discarded), roots are polished by
    Newton steps and accepted below ``1e-10``, and ``eta = 0`` (gradient flow) is
    allowed. ``params`` of the result includes the held parameters (0).

    ``starts``: ``(label, Q, R)`` or ``(label, Q, R, params)`` with ``params`` a mapping
    of trainable parameters' starting values (default: their initial values). The
    default starts are taken with the trainable parameters at their initial values and
    again at ``1/sqrt(2K-1)`` times them (the plain plateau's pre-activation scale: a
    trained gain tends to it, e.g. weightnorm's ``g``, batchnorm_affine's ``gamma``).
    """
    eta = check_real("eta", eta, minimum=0.0)
    eng = theory.expectation_engine(model, normalization, quadrature, engine=engine)
    exact = bool(eng.exact)
    if (eta == 0.0 or not second_order) and not exact:
        raise _gradient_flow_refused(normalization, eta)
    sub = symmetric_subspace(model, subspace)
    invariance = scale_invariance(model, normalization)
    if invariance != "none":
        weight_norm = 1.0 if weight_norm is None else check_real(
            "weight_norm", weight_norm, minimum=0.0, strict=True)
    elif weight_norm is not None:
        raise SpecificationError(
            f"'weight_norm' applies only to norm-conserving normalizations "
            f"({normalization.name!r} is not), got {weight_norm!r}")
    trainable = tuple(eng.trainable)
    p0 = eng.params()
    if starts is None:
        starts = [s for s in default_starts(model, sub)
                  if exact or (s[0].startswith("unspecialized") and "orthogonal" in s[0])]
        if trainable:  # also with the parameters at Saad & Solla's plateau scale
            f = 1.0 / math.sqrt(2 * model.K - 1)
            starts = starts + [(f"{s[0]}, parameters x 1/sqrt(2K-1)", s[1], s[2],
                                {k: f * p0[k] for k in trainable}) for s in starts]
    free = np.arange(sub.size) if invariance == "none" else np.arange(1, sub.size)
    nf = free.size

    def embed(x: np.ndarray):
        theta = np.empty(sub.size)
        if invariance != "none":
            theta[0] = weight_norm
        theta[free] = x[:nf]
        Q, R = sub.embed(theta)
        params = dict(p0)
        for j, k in enumerate(trainable):
            params[k] = np.full(model.K, x[nf + j])
        return Q, R, params

    def flow(x: np.ndarray):
        Q, R, params = embed(x)
        with np.errstate(all="ignore"):
            return (Q, R, params, *_generic_flow(eng, invariance, Q, R, params, eta,
                                                 batch_size, second_order))

    def residual(x: np.ndarray) -> np.ndarray:
        _, _, _, dQ, dR, dth, _ = flow(x)
        out = np.concatenate([sub.project(dQ, dR)[free],
                              [float(np.mean(dth[k])) for k in trainable]])
        return np.where(np.isfinite(out), out, 1e6)

    found: list[GenericFixedPoint] = []
    for start in starts:
        label, Q0, R0 = start[:3]
        ps = dict(p0)
        if len(start) > 3 and start[3] is not None:  # optional parameter start
            ps.update({k: np.broadcast_to(np.asarray(v, dtype=float), (model.K,))
                       for k, v in start[3].items()})
        Q0, R0 = np.asarray(Q0, dtype=float), np.asarray(R0, dtype=float)
        if invariance != "none":
            c = math.sqrt(weight_norm * model.K / np.trace(Q0)) if invariance == "common" \
                else None
            Q0, R0 = (Q0 * c * c, R0 * c) if c is not None else \
                rescale_weight_norm(Q0, R0, weight_norm)
        x0 = np.concatenate([sub.project(Q0, R0)[free],
                             [float(np.mean(ps[k])) for k in trainable]])
        sol = optimize.root(residual, x0, method="hybr",
                            options={"xtol": 1e-14 if exact else 1e-12})
        x = _newton_polish(residual, sol.x) if exact else sol.x
        if x is None:
            continue
        Q, R, params, dQ, dR, dth, err = flow(x)
        margin = -1e-9 if exact else 1e-9
        if not np.all(np.isfinite(Q)) or psd_margin(Q, R, model.T) < margin:
            continue
        res = float(max(np.max(np.abs(dQ)), np.max(np.abs(dR)),
                        *[np.max(np.abs(v)) for v in dth.values()]))
        if not res < max(RESIDUAL_TOL, 10.0 * err):
            continue
        dedupe = DEDUPE_TOL if exact else 1e-4
        if any(max(np.max(np.abs(fp.Q - Q)), np.max(np.abs(fp.R - R)),
                   *[np.max(np.abs(fp.params[k] - params[k])) for k in trainable]) < dedupe
               for fp in found):
            continue
        eng.rates(Q, R, params, eta=eta, batch_size=batch_size,
                  second_order=second_order)  # AccuracyError if the estimate is too noisy
        eps, eps_err = eng.generalization_error(Q, R, params)
        theta = np.empty(sub.size)
        theta[free] = x[:nf]
        if invariance != "none":
            theta[0] = weight_norm
        found.append(GenericFixedPoint(
            Q, R, theta, res, float(eps), float(np.mean(np.diagonal(Q))), label, sub,
            params={k: np.asarray(params[k], dtype=float).copy()
                    for k in (*trainable, *eng.held)}, rate_error=float(err),
            eps_g_error=float(eps_err)))
    found.sort(key=lambda fp: -fp.eps_g)
    return found


def generic_jacobian_coordinates(
    model: TeacherStudent, normalization: Normalization, engine: str = "auto"
) -> list[tuple[str, int, int]]:
    """Coordinates of :func:`ode_jacobian_generic`: those of :func:`jacobian_coordinates`
    (norms held for per-unit invariance) plus ``("theta:<name>", i, 0)`` per trainable
    parameter and unit."""
    inv = scale_invariance(model, normalization)
    coords = jacobian_coordinates(model.K, model.M, inv == "unit")
    eng = theory.expectation_engine(model, normalization, engine=engine)
    for k in (*eng.trainable, *eng.held):
        coords += [(f"theta:{k}", i, 0) for i in range(model.K)]
    return coords


def ode_jacobian_generic(
    model: TeacherStudent,
    normalization: Normalization,
    Q: np.ndarray,
    R: np.ndarray,
    params: Any = None,
    *,
    eta: float,
    batch_size: int = 1,
    second_order: bool = True,
    quadrature: Any = None,
    engine: str = "auto",
) -> np.ndarray:
    """Jacobian of the scaled (angular) flow including the trainable parameters, per unit
    ``eta alpha``, by central differences of the smooth quadrature estimate (common
    random numbers; step ``min(1e-3, psd margin / 4)``, two Richardson levels).

    With the exact engine the step is ``1e-3`` (the closed forms are analytic a little
    beyond the cone) and the held shift parameters contribute the decoupled block
    ``-held_hessian`` (their drift is ``-eta`` times their gradient, no ``eta^2`` term;
    coordinates last)."""
    eng = theory.expectation_engine(model, normalization, quadrature, engine=engine)
    inv = scale_invariance(model, normalization)
    K, M = model.K, model.M
    coords = generic_jacobian_coordinates(model, normalization, engine)
    p = eng.params(params)
    trainable = tuple(eng.trainable)
    iq = np.array([(i, k) for v, i, k in coords if v == "Q"], dtype=int).reshape(-1, 2)
    nq = len(iq)
    x0 = np.concatenate([Q[iq[:, 0], iq[:, 1]], np.ravel(R),
                         *[p[k] for k in trainable]])

    def fun(x: np.ndarray) -> np.ndarray:
        Qx = np.array(Q, dtype=float)
        Qx[iq[:, 0], iq[:, 1]] = x[:nq]
        Qx[iq[:, 1], iq[:, 0]] = x[:nq]
        Rx = x[nq:nq + K * M].reshape(K, M)
        px = dict(p)
        for j, k in enumerate(trainable):
            px[k] = x[nq + K * M + j * K: nq + K * M + (j + 1) * K]
        dQ, dR, dth, _ = _generic_flow(eng, inv, Qx, Rx, px, eta, batch_size, second_order)
        return np.concatenate([dQ[iq[:, 0], iq[:, 1]], dR.ravel(),
                               *[dth[k] for k in trainable]])

    h = 1e-3 if eng.exact else min(1e-3, max(psd_margin(Q, R, model.T), 1e-8) / 4.0)
    jac = _richardson_jacobian(fun, x0, np.full(x0.size, h))
    held = eng.held_hessian(Q, R, p)
    if held.size:
        n, m = jac.shape[0], held.shape[0]
        full = np.zeros((n + m, n + m))
        full[:n, :n] = jac
        full[n:, n:] = -held
        jac = full
    return jac


@attrs.frozen
class GenericHessian(HessianSpectrum):
    """:class:`HessianSpectrum` of ``eps_g`` over ``(W, theta)`` by the generic engine.

    The span block includes the trainable parameters (coordinates after the ``K
    dim_span`` weight coordinates, ``theta_names``); the complement block is ``G + G^T``
    measured on an extra dimension orthogonal to ``W`` and ``Btilde``. Errors are
    standard errors of the replicate estimates plus the finite-difference truncation
    estimate. ``coupling_complement_theta`` / ``coupling_complement_span`` are the
    largest measured cross-derivatives between the complement direction and theta /
    the span (exactly zero in theory) with their errors.
    """

    span_error: np.ndarray = attrs.field(factory=lambda: np.zeros(0), eq=False)
    complement_error: np.ndarray = attrs.field(factory=lambda: np.zeros(0), eq=False)
    lambda_min_error: float = float("nan")
    escape_dtheta: dict = attrs.field(factory=dict, eq=False)
    theta_names: tuple = ()
    params: dict = attrs.field(factory=dict, eq=False)
    coupling_complement_theta: float = 0.0
    coupling_complement_theta_error: float = 0.0
    coupling_complement_span: float = 0.0
    coupling_complement_span_error: float = 0.0
    landscape_only: bool = False
    gradient_norm: float = float("nan")
    engine: str = "generic"


def _replicate_error(values: np.ndarray) -> np.ndarray:
    """Standard error of the mean over the leading (replicate) axis; 0 for one value."""
    reps = values.shape[0]
    if reps < 2:
        return np.zeros(values.shape[1:])
    return values.std(axis=0, ddof=1) / math.sqrt(reps)


def weight_space_hessian_generic(
    model: TeacherStudent,
    normalization: Normalization,
    Q: Any,
    R: Any,
    params: Any = None,
    *,
    quadrature: Any = None,
    accuracy: float | None = None,
    engine: str = "auto",
) -> GenericHessian:
    """Hessian of ``F(W, theta) = eps_g(W W^T, W Btilde^T; theta)`` by the generic engine.

    ``W`` is realized in ``D = K + M`` dimensions plus one extra dimension orthogonal to
    ``W`` and ``Btilde`` (the complement). The per-replicate weight gradients
    (:meth:`ExpectationEngine.weight_moments`, smooth in ``(W, theta)`` with common
    random numbers) are differentiated by central differences (relative step ``1e-2``
    of each row's norm, ``1e-2 max(1, |theta|)``, one Richardson level, ``O(h^4)``;
    ``1e-3`` with the exact engine, whose gradients are exact);
    the replicate Hessians give the error estimates. Trainable parameters join the span
    block; the complement block is read off the extra dimension. For a normalization
    with ``statistics_gradient = False`` this is the Hessian of ``eps_g`` (the loss
    landscape; its SGD drift is not a gradient), ``landscape_only = True``.

    Raises :class:`~framework.theory.AccuracyError` if ``lambda_min``'s error estimate
    exceeds ``accuracy`` (default: the quadrature's) times ``max(1, |lambda_min|)``.
    """
    eng = theory.expectation_engine(model, normalization, quadrature, engine=engine)
    if accuracy is not None:
        acc = float(accuracy)
    else:
        acc = eng.quadrature.accuracy if eng.quadrature is not None else \
            theory.Quadrature().accuracy
    Q = np.asarray(Q, dtype=float)
    R = np.asarray(R, dtype=float)
    K, M = model.K, model.M
    X0, Bt0, rank = _realize(Q, R, model.T)
    D = K + M + 1
    X = np.concatenate([X0, np.zeros((K, 1))], axis=1)
    Bt = np.concatenate([Bt0, np.zeros((M, 1))], axis=1)
    p = eng.params(params)
    names = tuple(eng.trainable)
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
    for j in range(n):  # one coordinate at a time (a few dozen)
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
    span_idx = np.concatenate([idx[:, :rank].ravel(), nW + np.arange(nT)])
    comp_idx = idx[:, D - 1]
    theta_idx = nW + np.arange(nT)
    comp = hess[np.ix_(comp_idx, comp_idx)]
    comp_r = hr[:, comp_idx][:, :, comp_idx]
    block = hess[np.ix_(span_idx, span_idx)]
    block_r = hr[:, span_idx][:, :, span_idx]

    def eig_err(mat, mats, extra):
        vals, vecs = np.linalg.eigh(mat)
        per = np.einsum("ia,rij,ja->ra", vecs, mats, vecs)
        err = _replicate_error(per) + np.sqrt(
            np.einsum("ia,ij,ja->a", vecs**2, extra**2, vecs**2))
        return vals, vecs, err

    span_vals, span_vecs, span_err = eig_err(block, block_r, trunc[np.ix_(span_idx, span_idx)])
    comp_vals, comp_vecs, comp_err = eig_err(comp, comp_r, trunc[np.ix_(comp_idx, comp_idx)])
    G = 0.5 * comp  # only G + G^T is meaningful

    def coupling(a, b):
        if a.size == 0 or b.size == 0:
            return 0.0, 0.0
        sub_ = np.abs(hess[np.ix_(a, b)])
        j = np.unravel_index(int(np.argmax(sub_)), sub_.shape)
        return float(sub_[j]), float(hess_err[np.ix_(a, b)][j])

    c_t, c_te = coupling(comp_idx, theta_idx)
    c_s, c_se = coupling(comp_idx, idx[:, :rank].ravel())

    dim_span = rank
    if comp_vals[0] < span_vals[0]:
        lam_min, lam_err, block_name = float(comp_vals[0]), float(comp_err[0]), "complement"
        dW = comp_vecs[:, 0].reshape(K, 1)
        dQ, dR, dth = np.zeros((K, K)), np.zeros((K, M)), {k: np.zeros(K) for k in names}
    else:
        lam_min, lam_err, block_name = float(span_vals[0]), float(span_err[0]), "span"
        reference = np.zeros((K, rank))
        L = min(K, M)
        reference[:L] = Bt0[:L, :rank]
        ref = np.concatenate([reference.ravel(), np.zeros(nT)])
        mode = canonical_mode(span_vals, span_vecs, ref, rtol=max(1e-8, 3 * lam_err))
        dW = np.zeros((K, D - 1))
        dW[:, :rank] = mode[: K * rank].reshape(K, rank)
        dQ = X0 @ dW.T + dW @ X0.T
        dR = dW @ Bt0.T
        dth = {k: mode[K * rank + j * K: K * rank + (j + 1) * K] for j, k in enumerate(names)}
    if not lam_err <= acc * max(1.0, abs(lam_min)) and not eng.exact:
        q = eng.quadrature
        raise theory.AccuracyError(
            f"generic Hessian: the error estimate of lambda_min is {lam_err:.3g} (value "
            f"{lam_min:.6g}), above accuracy={acc:g} * max(1, |value|), with "
            f"{q.replicates} x {q.samples} {q.method} points for normalization "
            f"{normalization.name!r} and activation {model.activation!r}; increase "
            "'samples' or relax 'accuracy' (or the integrand has infinite variance here)"
        )
    return GenericHessian(
        span_vals, comp_vals, int(dim_span), lam_min, block_name, dW, dQ, dR, X0, Bt0, G,
        block, span_error=span_err, complement_error=comp_err, lambda_min_error=lam_err,
        escape_dtheta=dth, theta_names=names, params={k: p[k].copy() for k in names},
        engine=eng.name,
        coupling_complement_theta=c_t, coupling_complement_theta_error=c_te,
        coupling_complement_span=c_s, coupling_complement_span_error=c_se,
        landscape_only=not normalization.statistics_gradient, gradient_norm=gnorm,
    )
