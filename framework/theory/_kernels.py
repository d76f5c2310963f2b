"""Exact order-parameter theory of the erf soft committee machine.

Pure array functions (float64, no object model) for the *diagonal-scale*
family of normalizations, ``x~_i = s_i(Q) x_i``, which contains the plain
network (``s = 1``) and population-statistics batch normalization
(``s_i = gamma_i / sqrt(Q_ii)``).

Conventions (DESIGN.md, "Mathematics")
--------------------------------------
* Inputs ``xi ~ N(0, I_N)``; student pre-activations ``x = J xi / sqrt(N)``
  (``K`` units), teacher ``y = B xi / sqrt(N)`` (``M`` units);
  ``Q = J J^T / N``, ``R = J B^T / N``, ``T = B B^T / N``.
* Activation ``g(u) = erf(u / sqrt 2)``; unit second-layer weights:
  ``zeta = sum_n g(y_n) + noise`` (noise variance ``noise_var``),
  ``sigma = sum_i g(x~_i)``, loss ``eps = (zeta - sigma)^2 / 2``.
* The activation sees the covariance ``Sigma~ = [[S Q S, S R], [R^T S, T]]``
  with ``S = diag(s)`` (:func:`effective_covariance`).  With the weight vector
  ``w = (-1, ..., -1, +1, ..., +1)`` (``K`` then ``M``) the noise-free error
  signal is ``zeta - sigma = w . g(u)``.
* Online SGD ``J <- J - eta grad_J eps`` (step ``eta / sqrt(N)`` on weights
  with O(1) components), time ``alpha = steps / N``; a minibatch of size ``B``
  averages the gradient, which divides the ``eta^2`` term by ``B``.
* ``eps_g = E[eps]`` *includes* the output-noise term ``noise_var / 2``.

ODE (``N -> inf``, population statistics), with ``delta~_i = (zeta - sigma)
g'(x~_i)``, per-sample ``a_i = -d eps / d x_i = s_i delta~_i`` and
``Gbar_jk = E[d eps / d Q_jk] = -sum_i E[delta~_i x~_i] / s_i * ds_dQ[i, j, k]``
(``Q_jk`` and ``Q_kj`` independent), ``C = -(Gbar + Gbar^T)``::

    dR/dalpha = eta (E[a y^T] + C R)
    dQ/dalpha = eta (E[a x^T] + E[x a^T] + C Q + Q C^T) + (eta^2 / B) E[a a^T]

where ``E[a x^T]_ik = s_i E[delta~_i x~_k] / s_k``, ``E[a y^T]_in = s_i
E[delta~_i y_n]``, ``E[a a^T]_ik = s_i s_k E[delta~_i delta~_k]`` and, on
``Sigma~``, ``E[delta~_i u_c] = sum_b w_b I3[i, b, c]``,
``E[delta~_i delta~_k] = sum_cd w_c w_d I4[i, k, c, d] + noise_var J2[i, k]``.
With ``s = 1`` this is Saad & Solla's system.

Two implementations of the right-hand side exist: :func:`ode_rhs_reference`
(readable numpy on top of :mod:`framework.theory._erf`) and a numba kernel used by
:func:`ode_rhs` and by the compiled integrator when numba is installed (it is
an optional dependency; without it everything falls back to numpy/scipy).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.integrate import BDF, DOP853, LSODA, RK45, Radau
from scipy.integrate._ivp import dop853_coefficients as _dop

from framework.theory._erf import I2, I3, I4, J2

try:  # optional accelerator
    import numba
    from numba.extending import is_jitted as _is_jitted

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None
    HAVE_NUMBA = False

    def _is_jitted(fn: object) -> bool:
        return False


__all__ = [
    "HAVE_NUMBA",
    "TheoryTrajectory",
    "effective_covariance",
    "eps_g_gradient",
    "error_weights",
    "generalization_error",
    "integrate_diagonal_scale",
    "ode_rhs",
    "ode_rhs_reference",
    "pack_state",
    "scale_moments",
    "unpack_state",
]

Array = NDArray[np.float64]
ScaleFn = Callable[[Array], Array]

_SCIPY_METHODS = {"DOP853": DOP853, "RK45": RK45, "LSODA": LSODA, "Radau": Radau, "BDF": BDF}


# --------------------------------------------------------------------------------------
# Generalization error and effective covariance
# --------------------------------------------------------------------------------------


def error_weights(K: int, M: int) -> Array:
    """``w = (-1,)*K + (+1,)*M`` so that ``zeta - sigma = w . g(u)`` (noise-free)."""
    return np.concatenate([-np.ones(K), np.ones(M)])


def _scale(s: ArrayLike | None, K: int) -> Array:
    return np.ones(K) if s is None else np.asarray(s, dtype=np.float64).reshape(K)


def effective_covariance(
    Q: ArrayLike, R: ArrayLike, T: ArrayLike, s: ArrayLike | None = None
) -> Array:
    """Covariance ``Sigma~ = [[S Q S, S R], [R^T S, T]]`` seen by the activation.

    Parameters
    ----------
    Q : array_like, shape (K, K)
        Student-student overlaps ``J J^T / N``.
    R : array_like, shape (K, M)
        Student-teacher overlaps ``J B^T / N``.
    T : array_like, shape (M, M)
        Teacher-teacher overlaps ``B B^T / N``.
    s : array_like, shape (K,), optional
        Diagonal scale ``x~_i = s_i x_i`` (default: ones, the plain network).

    Returns
    -------
    ndarray, shape (K + M, K + M)
    """
    Q, R, T = (np.asarray(a, dtype=np.float64) for a in (Q, R, T))
    s = _scale(s, Q.shape[0])
    SR = s[:, None] * R
    return np.block([[s[:, None] * Q * s[None, :], SR], [SR.T, T]])


def generalization_error(
    Q: ArrayLike, R: ArrayLike, T: ArrayLike, s: ArrayLike | None = None, noise_var: float = 0.0
) -> float:
    """Generalization error ``eps_g = E[(zeta - sigma)^2] / 2``, noise included.

    ``eps_g = w^T I2(Sigma~) w / 2 + noise_var / 2``: the output noise of the
    teacher (variance ``noise_var``) contributes ``noise_var / 2``, so
    ``eps_g >= noise_var / 2`` even for a perfect student.

    Parameters
    ----------
    Q, R, T : array_like
        Order parameters, shapes (K, K), (K, M), (M, M).
    s : array_like, shape (K,), optional
        Diagonal normalization scale (default: ones).
    noise_var : float
        Variance of the additive output noise.

    Returns
    -------
    float
    """
    Q = np.asarray(Q, dtype=np.float64)
    w = error_weights(Q.shape[0], np.shape(T)[0])
    return float(0.5 * w @ I2(effective_covariance(Q, R, T, s)) @ w + 0.5 * noise_var)


def _stacked_effective_covariance(Q: Array, R: Array, T: Array, s: Array) -> Array:
    """Stacked ``[[S Q S, S R], [R^T S, T]]`` for ``Q (..., K, K)``, ``R (..., K, M)``."""
    lead = Q.shape[:-2]
    M = T.shape[-1]
    SR = s[..., :, None] * R
    top = np.concatenate([s[..., :, None] * Q * s[..., None, :], SR], axis=-1)
    bottom = np.concatenate([np.swapaxes(SR, -1, -2), np.broadcast_to(T, (*lead, M, M))], axis=-1)
    return np.concatenate([top, bottom], axis=-2)


def eps_g_gradient(
    Q: ArrayLike, R: ArrayLike, T: ArrayLike, s: ArrayLike, ds_dQ: ArrayLike | None,
    noise_var: float = 0.0,
) -> tuple[Array, Array, Array, Array]:
    """``eps_g`` and its exact gradient for stacks of order parameters.

    ``Q (..., K, K)``, ``R (..., K, M)``, scale ``s (..., K)`` and its Jacobian
    ``ds_dQ (..., K, K, K)`` (None: ``s`` independent of ``Q``). Returns ``(eps, G, H,
    dE_ds)``: ``G = d eps_g / dQ`` (entries independent, chain rule through ``s(Q)``
    included; only ``G + G^T`` is meaningful on symmetric ``Q``), ``H = d eps_g / dR``
    and ``dE_ds = d eps_g / d s`` at fixed ``(Q, R)`` (for parameters of the scale).
    """
    Q, R, T, s = (np.asarray(a, dtype=np.float64) for a in (Q, R, T, s))
    K, M = R.shape[-2:]
    Sig = _stacked_effective_covariance(Q, R, T, s)
    w = error_weights(K, M)
    ww = np.outer(w, w)
    diag = np.diagonal(Sig, axis1=-2, axis2=-1)
    d = 1.0 + diag
    dd = d[..., :, None] * d[..., None, :]
    root = np.sqrt(dd - Sig**2)
    z = Sig / np.sqrt(dd)
    eps = np.sum(ww * np.arcsin(np.clip(z, -1.0, 1.0)), axis=(-2, -1)) / np.pi + 0.5 * noise_var
    A = ww / root / np.pi  # d E / d Sig_ab for a != b (entries independent)
    cross = np.sum(ww * Sig / root, axis=-1)
    idx = np.arange(K + M)
    A[..., idx, idx] = (d / np.sqrt(1.0 + 2.0 * diag) - cross) / (np.pi * d)
    Ast = A + np.swapaxes(A, -1, -2)
    Ass, Ast_r = A[..., :K, :K], Ast[..., :K, K:]
    G = Ass * s[..., :, None] * s[..., None, :]
    dE_ds = np.sum(Ast[..., :K, :K] * Q * s[..., None, :], axis=-1) + np.sum(Ast_r * R, axis=-1)
    if ds_dQ is not None:
        G = G + np.einsum("...i,...ijk->...jk", dE_ds, np.asarray(ds_dQ, dtype=np.float64))
    H = Ast_r * s[..., :, None]
    return eps, G, H, dE_ds


# --------------------------------------------------------------------------------------
# ODE right-hand side: reference numpy implementation
# --------------------------------------------------------------------------------------


def _assemble(Q, R, s, ds_dQ, dv, dd, eta, batch_size, second_order):
    """Turn ``E[delta~ u^T]`` (``dv``, K x P) and ``E[delta~ delta~^T]`` into (dQ, dR)."""
    K = Q.shape[0]
    dx, dy = dv[:, :K], dv[:, K:]
    Eax = s[:, None] * dx / s[None, :]
    drift_Q = Eax + Eax.T
    drift_R = s[:, None] * dy
    if ds_dQ is not None:
        Gbar = -np.einsum("i,ijk->jk", np.diag(dx) / s, ds_dQ)
        C = -(Gbar + Gbar.T)
        CQ = C @ Q
        drift_Q = drift_Q + CQ + CQ.T
        drift_R = drift_R + C @ R
    dQ = eta * drift_Q
    if second_order:
        dQ = dQ + (eta**2 / batch_size) * np.outer(s, s) * dd
    return dQ, eta * drift_R


def ode_rhs_reference(
    Q: ArrayLike,
    R: ArrayLike,
    T: ArrayLike,
    s: ArrayLike | None = None,
    ds_dQ: ArrayLike | None = None,
    eta: float = 1.0,
    batch_size: int = 1,
    noise_var: float = 0.0,
    second_order: bool = True,
) -> tuple[Array, Array]:
    """Readable numpy implementation of :func:`ode_rhs` (same signature)."""
    Q, R, T = (np.asarray(a, dtype=np.float64) for a in (Q, R, T))
    K, M = R.shape
    s = _scale(s, K)
    ds_dQ = None if ds_dQ is None else np.asarray(ds_dQ, dtype=np.float64)
    St = effective_covariance(Q, R, T, s)
    w = error_weights(K, M)
    idx = np.arange(K)
    dv = np.einsum("b,ibc->ic", w, I3(St, idx))
    dd = np.einsum("c,d,ikcd->ik", w, w, I4(St, idx)) + noise_var * J2(St, idx)
    dd = 0.5 * (dd + dd.T)
    return _assemble(Q, R, s, ds_dQ, dv, dd, eta, batch_size, second_order)


# --------------------------------------------------------------------------------------
# ODE right-hand side: numba kernel
# --------------------------------------------------------------------------------------


def _njit(fn):
    """``numba.njit`` with the options of this module (identity without numba)."""
    if not HAVE_NUMBA:
        return fn
    return numba.njit(cache=True, error_model="numpy")(fn)


@_njit
def _asin_nb(z):
    if 1.0 < abs(z) <= 1.0 + 1e-12:  # same rounding clip as _erf.safe_arcsin
        z = math.copysign(1.0, z)
    return math.asin(z)


@_njit
def _eff_cov_nb(Q, R, T, s, S):
    K, M = R.shape
    for i in range(K):
        for k in range(K):
            S[i, k] = s[i] * Q[i, k] * s[k]
        for n in range(M):
            S[i, K + n] = s[i] * R[i, n]
            S[K + n, i] = S[i, K + n]
    for n in range(M):
        for m in range(M):
            S[K + n, K + m] = T[n, m]


@_njit
def _eps_g_nb(S, K, noise_var):
    """``w^T I2(S) w / 2 + noise_var / 2`` for ``w = (-1)*K + (+1)*M``."""
    P = S.shape[0]
    acc = 0.0
    for a in range(P):
        wa = -1.0 if a < K else 1.0
        acc += math.asin(S[a, a] / (1.0 + S[a, a]))
        for b in range(a + 1, P):
            wb = -1.0 if b < K else 1.0
            z = S[a, b] / math.sqrt((1.0 + S[a, a]) * (1.0 + S[b, b]))
            acc += 2.0 * wa * wb * _asin_nb(z)
    return acc / math.pi + 0.5 * noise_var


@_njit
def _scale_moments_nb(Q, R, T, s, noise_var, out):
    """``eps_g`` and ``out[i] = E[delta~_i x_i]`` (unscaled ``x_i``; finite as
    ``s_i -> 0``): ``sum_b w_b E[g'(x~_i) g(u_b) x_i]``, the I3 formula with
    ``Cov(x~_i, x_i) = s_i Q_ii`` and ``Cov(u_b, x_i)`` = ``s_b Q_bi`` or ``R_in``."""
    K, M = R.shape
    P = K + M
    S = np.empty((P, P))
    _eff_cov_nb(Q, R, T, s, S)
    for i in range(K):
        one_aa = 1.0 + S[i, i]
        c_ac = s[i] * Q[i, i]
        acc = 0.0
        for b in range(P):
            wb = -1.0 if b < K else 1.0
            c_bc = s[b] * Q[b, i] if b < K else R[i, b - K]
            c_ab = S[i, b]
            lam = one_aa * (1.0 + S[b, b]) - c_ab * c_ab
            acc += wb * (c_bc * one_aa - c_ab * c_ac) / (one_aa * math.sqrt(lam))
        out[i] = 2.0 / math.pi * acc
    return _eps_g_nb(S, K, noise_var)


def scale_moments(
    Q: ArrayLike, R: ArrayLike, T: ArrayLike, s: ArrayLike, noise_var: float = 0.0
) -> tuple[float, Array]:
    """``(eps_g, E[delta~_i x_i])`` for ``x~ = s x``: the generalization error and the
    expectation that drives a trainable scale parameter (``x_i`` unscaled, so finite as
    ``s_i -> 0``). Compiled when numba is available; the numpy fallback evaluates the
    same I3 formula (:func:`framework.theory._erf.I3` on the joint covariance of ``(x~, y, x)``).
    """
    Q, R, T, s = (np.ascontiguousarray(a, dtype=np.float64) for a in (Q, R, T, s))
    K, M = R.shape
    if HAVE_NUMBA:
        out = np.empty(K)
        eps = _scale_moments_nb(Q, R, T, s, float(noise_var), out)
        return float(eps), out
    SQ = s[:, None] * Q
    cov = np.block([[SQ * s[None, :], s[:, None] * R, SQ],
                    [R.T * s[None, :], T, R.T],
                    [SQ.T, R, Q]])
    i3 = I3(cov, np.arange(K))  # (K, P, P): E[g'(u_i) g(u_b) u_c]
    idx = np.arange(K)
    edx = np.einsum("ib,b->i", i3[idx, : K + M, K + M + idx], error_weights(K, M))
    return generalization_error(Q, R, T, s, noise_var), edx


@_njit
def _moments_nb(S, K, noise_var, second_order, dv, dd):
    """``dv = E[delta~ u^T]`` (K x P) and, if needed, ``dd = E[delta~ delta~^T]``."""
    P = S.shape[0]
    two_pi = 2.0 / math.pi
    d1 = np.empty(P)
    w = np.empty(P)
    for a in range(P):
        d1[a] = 1.0 + S[a, a]
        w[a] = -1.0 if a < K else 1.0
    # I3 contracted over b: (2/pi)/d1_i sum_b w_b (S_bc d1_i - S_ib S_ic) / sqrt(lam3_ib)
    t = np.empty(P)
    for i in range(K):
        tb = 0.0
        for b in range(P):
            t[b] = w[b] / math.sqrt(d1[i] * d1[b] - S[i, b] ** 2)
            tb += t[b] * S[i, b]
        for c in range(P):
            acc = 0.0
            for b in range(P):
                acc += t[b] * S[b, c]
            dv[i, c] = two_pi * (acc - S[i, c] * tb / d1[i])
    if not second_order:
        return
    # I4 contracted over (c, d), using the symmetries (i, k) and (c, d).
    lam1 = np.empty(P)
    for i in range(K):
        for k in range(i, K):
            lam4 = d1[i] * d1[k] - S[i, k] ** 2
            for c in range(P):
                lam1[c] = (
                    lam4 * d1[c]
                    - S[k, c] ** 2 * d1[i]
                    - S[i, c] ** 2 * d1[k]
                    + 2.0 * S[i, k] * S[i, c] * S[k, c]
                )
            acc = 0.0
            for c in range(P):
                for d in range(c, P):
                    lam0 = (
                        lam4 * S[c, d]
                        - S[k, c] * S[k, d] * d1[i]
                        - S[i, c] * S[i, d] * d1[k]
                        + S[i, k] * (S[i, c] * S[k, d] + S[i, d] * S[k, c])
                    )
                    term = w[c] * w[d] * _asin_nb(lam0 / math.sqrt(lam1[c] * lam1[d]))
                    acc += term if d == c else 2.0 * term
            val = (2.0 * acc / math.pi + noise_var) * two_pi / math.sqrt(lam4)
            dd[i, k] = val
            dd[k, i] = val


@_njit
def _rhs_nb(Q, R, T, s, ds_dQ, has_jac, eta, inv_batch, noise_var, second_order, dQ, dR):
    """Numba twin of :func:`ode_rhs_reference`, writing into ``dQ`` and ``dR``."""
    K, M = R.shape
    P = K + M
    S = np.empty((P, P))
    _eff_cov_nb(Q, R, T, s, S)
    dv = np.empty((K, P))
    dd = np.empty((K, K))
    _moments_nb(S, K, noise_var, second_order, dv, dd)
    C = np.zeros((K, K))
    if has_jac:
        for i in range(K):
            h = dv[i, i] / s[i]
            for j in range(K):
                for k in range(K):
                    C[j, k] += h * ds_dQ[i, j, k]
                    C[k, j] += h * ds_dQ[i, j, k]
    CQ = np.zeros((K, K))
    if has_jac:
        CQ = C @ Q
    for i in range(K):
        for n in range(M):
            acc = s[i] * dv[i, K + n]
            if has_jac:
                for j in range(K):
                    acc += C[i, j] * R[j, n]
            dR[i, n] = eta * acc
        for k in range(i, K):
            val = eta * (s[i] * dv[i, k] / s[k] + s[k] * dv[k, i] / s[i] + CQ[i, k] + CQ[k, i])
            if second_order:
                val += eta * eta * inv_batch * s[i] * s[k] * dd[i, k]
            dQ[i, k] = val
            dQ[k, i] = val


def ode_rhs(
    Q: ArrayLike,
    R: ArrayLike,
    T: ArrayLike,
    s: ArrayLike | None = None,
    ds_dQ: ArrayLike | None = None,
    eta: float = 1.0,
    batch_size: int = 1,
    noise_var: float = 0.0,
    second_order: bool = True,
) -> tuple[Array, Array]:
    """Right-hand side ``(dQ/dalpha, dR/dalpha)`` for a diagonal-scale normalization.

    Parameters
    ----------
    Q, R, T : array_like
        Order parameters, shapes (K, K), (K, M), (M, M).
    s : array_like, shape (K,), optional
        Scale ``s(Q)`` of the normalization ``x~_i = s_i x_i`` at this ``Q``
        (default: ones).
    ds_dQ : array_like, shape (K, K, K), optional
        Jacobian ``ds_dQ[i, j, k] = d s_i / d Q_jk`` with ``Q_jk`` and ``Q_kj``
        treated as independent entries; ``None`` means ``s`` does not depend
        on ``Q`` (no gradient through the statistics).
    eta : float
        Learning rate (step ``eta / sqrt(N)`` on ``J``).
    batch_size : int
        Minibatch size; divides the ``eta^2`` term.
    noise_var : float
        Output-noise variance (enters the ``eta^2`` term).
    second_order : bool
        Keep the ``eta^2`` term; ``False`` gives the gradient-flow limit.

    Returns
    -------
    dQ : ndarray, shape (K, K)
        Symmetric.
    dR : ndarray, shape (K, M)

    Notes
    -----
    Uses the compiled kernel when numba is available, otherwise
    :func:`ode_rhs_reference`; both agree to rounding.
    """
    if not HAVE_NUMBA:
        return ode_rhs_reference(Q, R, T, s, ds_dQ, eta, batch_size, noise_var, second_order)
    Q, R, T = (np.ascontiguousarray(a, dtype=np.float64) for a in (Q, R, T))
    K, M = R.shape
    s = _scale(s, K)
    has_jac = ds_dQ is not None
    jac = np.ascontiguousarray(ds_dQ, dtype=np.float64) if has_jac else np.zeros((1, 1, 1))
    dQ, dR = np.empty((K, K)), np.empty((K, M))
    _rhs_nb(Q, R, T, s, jac, has_jac, float(eta), 1.0 / batch_size, float(noise_var),
            bool(second_order), dQ, dR)
    return dQ, dR


# --------------------------------------------------------------------------------------
# State packing and validity
# --------------------------------------------------------------------------------------


def pack_state(Q: ArrayLike, R: ArrayLike) -> Array:
    """Integrator state: ``concatenate(Q.ravel(), R.ravel())`` (full, symmetric ``Q``)."""
    return np.concatenate([np.ravel(np.asarray(Q, dtype=np.float64)),
                           np.ravel(np.asarray(R, dtype=np.float64))])


def unpack_state(y: ArrayLike, K: int, M: int) -> tuple[Array, Array]:
    """Inverse of :func:`pack_state`; also accepts a stack ``(n, K*K + K*M)``."""
    y = np.asarray(y)
    lead = y.shape[:-1]
    return y[..., : K * K].reshape(*lead, K, K), y[..., K * K :].reshape(*lead, K, M)


@_njit
def _state_status(y, K, max_value):
    """0 if valid; 1 non-finite; 2 beyond ``max_value``; 3 ``Q`` not positive definite."""
    for v in y:
        if not math.isfinite(v):
            return 1
        if abs(v) > max_value:
            return 2
    L = np.zeros((K, K))  # Cholesky of Q = y[:K*K]
    for j in range(K):
        acc = y[j * K + j]
        for m in range(j):
            acc -= L[j, m] ** 2
        if acc <= 0.0:
            return 3
        L[j, j] = math.sqrt(acc)
        for i in range(j + 1, K):
            acc = y[i * K + j]
            for m in range(j):
                acc -= L[i, m] * L[j, m]
            L[i, j] = acc / L[j, j]
    return 0


_STATUS_MESSAGES = {
    0: "integration successful",
    1: "state became non-finite",
    2: "state exceeded max_value",
    3: "Q lost positive definiteness",
    4: "step size became too small",
}


# --------------------------------------------------------------------------------------
# Compiled DOP853 (Hairer's 8(5,3) pair with 7th-order dense output, as in scipy)
# --------------------------------------------------------------------------------------

_N_ST = _dop.N_STAGES
_DOP_A = np.ascontiguousarray(_dop.A, dtype=np.float64)
_DOP_B = np.ascontiguousarray(_dop.B, dtype=np.float64)
_DOP_E3 = np.ascontiguousarray(_dop.E3, dtype=np.float64)
_DOP_E5 = np.ascontiguousarray(_dop.E5, dtype=np.float64)
_DOP_D = np.ascontiguousarray(_dop.D, dtype=np.float64)


# The integrator's argument tuple is ``(T, K, M, eta, inv_batch, noise_var,
# second_order)`` for the plain network, extended by ``(scale_fn, jac_fn,
# has_jac)`` for a Q-dependent scale.  ``_scale_of``/``_jac_of`` resolve the
# scale at compile time from the tuple's length.  The user's functions enter
# as first-class function types (``_SCALED_ARGS``), not as dispatcher types:
# the compiled code is shared by all scale functions and safely cached on disk.
_N_PLAIN_ARGS = 7


def _scale_of(Q, args):  # pragma: no cover - compiled through the overload below
    raise NotImplementedError


def _jac_of(Q, args):  # pragma: no cover - compiled through the overload below
    raise NotImplementedError


if HAVE_NUMBA:
    from numba import types as _nt

    _SCALE_SIG = _nt.float64[::1](_nt.float64[:, ::1])
    _JAC_SIG = _nt.float64[:, :, ::1](_nt.float64[:, ::1])
    _SCALED_ARGS = _nt.Tuple((
        _nt.float64[:, ::1], _nt.int64, _nt.int64, _nt.float64, _nt.float64, _nt.float64,
        _nt.boolean, _nt.FunctionType(_SCALE_SIG), _nt.FunctionType(_JAC_SIG), _nt.boolean,
    ))

    @numba.extending.overload(_scale_of, jit_options={"cache": True})
    def _ol_scale_of(Q, args):
        if len(args) == _N_PLAIN_ARGS:
            return lambda Q, args: np.ones(Q.shape[0])
        return lambda Q, args: args[7](Q)

    @numba.extending.overload(_jac_of, jit_options={"cache": True})
    def _ol_jac_of(Q, args):
        if len(args) == _N_PLAIN_ARGS:
            return lambda Q, args: (np.zeros((1, 1, 1)), False)

        def impl(Q, args):
            if args[9]:
                return args[8](Q), True
            return np.zeros((1, 1, 1)), False

        return impl


@_njit
def _packed_rhs(y, out, args):
    T, K, M, eta, inv_batch, noise_var, second_order = args[:_N_PLAIN_ARGS]
    Q = y[: K * K].reshape((K, K))
    R = y[K * K :].reshape((K, M))
    jac, has_jac = _jac_of(Q, args)
    _rhs_nb(Q, R, T, _scale_of(Q, args), jac, has_jac, eta, inv_batch, noise_var,
            second_order, out[: K * K].reshape((K, K)), out[K * K :].reshape((K, M)))


@_njit
def _rms(v):
    return math.sqrt(np.sum(v * v) / v.size)


@_njit
def _dop853_initial_step(args, y0, f0, t_span, rtol, atol):
    scale = atol + np.abs(y0) * rtol
    d0 = _rms(y0 / scale)
    d1 = _rms(f0 / scale)
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    h0 = min(h0, t_span)
    f1 = np.empty_like(y0)
    _packed_rhs(y0 + h0 * f0, f1, args)
    d2 = _rms((f1 - f0) / scale) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / 8.0)
    return min(100.0 * h0, h1, t_span)


@_njit
def _dop853_dense(args, K, t_old, h, y_old, y_new, f_new, t_eval, j0, j1, out, ytmp):
    """Evaluate the 7th-order interpolant of the last step at ``t_eval[j0:j1]``."""
    n = y_old.size
    for s in range(_N_ST + 1, _DOP_A.shape[0]):
        ytmp[:] = y_old
        for r in range(s):
            ytmp += (h * _DOP_A[s, r]) * K[r]
        _packed_rhs(ytmp, K[s], args)
    F = np.empty((7, n))
    F[0] = y_new - y_old
    F[1] = h * K[0] - F[0]
    F[2] = 2.0 * F[0] - h * (f_new + K[0])
    for m in range(4):
        F[3 + m] = 0.0
        for r in range(K.shape[0]):
            F[3 + m] += (h * _DOP_D[m, r]) * K[r]
    for j in range(j0, j1):
        x = (t_eval[j] - t_old) / h
        yv = np.zeros(n)
        for i in range(7):
            yv += F[6 - i]
            yv *= x if i % 2 == 0 else 1.0 - x
        out[j] = yv + y_old


@_njit
def _dop853_nb(args, y0, t_eval, rtol, atol, Kdim, max_value):
    """Adaptive DOP853 from ``t_eval[0]`` to ``t_eval[-1]``, output on ``t_eval``.

    A line-by-line port of :class:`scipy.integrate.DOP853` (same tableau, error
    norm, step control and dense output).  Returns ``(out, n_out, status,
    t_fail, nfev)``; ``out[:n_out]`` are valid rows, ``status`` as in
    ``_STATUS_MESSAGES``, ``t_fail`` the alpha where the failure was detected.
    """
    n = y0.size
    n_t = t_eval.size
    out = np.full((n_t, n), np.nan)
    out[0] = y0
    t = t_eval[0]
    t_end = t_eval[-1]
    y = y0.copy()
    Kst = np.empty((_DOP_A.shape[0], n))
    _packed_rhs(y, Kst[0], args)
    fcur = Kst[0].copy()
    nfev = 1
    status = _state_status(y, Kdim, max_value)
    if status != 0 or n_t == 1:
        return out, (0 if status != 0 else 1), status, (t if status != 0 else np.nan), nfev
    h_abs = _dop853_initial_step(args, y, fcur, t_end - t, rtol, atol)
    nfev += 1
    j_next = 1
    ytmp = np.empty(n)
    y_new = np.empty(n)
    f_new = np.empty(n)
    while t < t_end:
        min_step = 10.0 * abs(np.nextafter(t, np.inf) - t)
        if not h_abs >= min_step:  # also catches NaN
            h_abs = min_step
        rejected = False
        while True:
            if not h_abs >= min_step:
                return out, j_next, 4, t, nfev
            t_new = min(t + h_abs, t_end)
            h = t_new - t
            Kst[0] = fcur
            for s in range(1, _N_ST):
                ytmp[:] = y
                for r in range(s):
                    ytmp += (h * _DOP_A[s, r]) * Kst[r]
                _packed_rhs(ytmp, Kst[s], args)
            y_new[:] = y
            for r in range(_N_ST):
                y_new += (h * _DOP_B[r]) * Kst[r]
            _packed_rhs(y_new, f_new, args)
            Kst[_N_ST] = f_new
            nfev += _N_ST
            err5 = 0.0
            err3 = 0.0
            for m in range(n):
                sc = atol + max(abs(y[m]), abs(y_new[m])) * rtol
                e5 = 0.0
                e3 = 0.0
                for r in range(_N_ST + 1):
                    e5 += _DOP_E5[r] * Kst[r, m]
                    e3 += _DOP_E3[r] * Kst[r, m]
                err5 += (e5 / sc) ** 2
                err3 += (e3 / sc) ** 2
            if err5 == 0.0 and err3 == 0.0:
                err = 0.0
            else:
                err = h * err5 / math.sqrt((err5 + 0.01 * err3) * n)
            if err < 1.0:  # NaN compares False: rejected below
                factor = 10.0 if err == 0.0 else min(10.0, 0.9 * err ** (-1.0 / 8.0))
                if rejected:
                    factor = min(1.0, factor)
                h_abs *= factor
                break
            factor = 0.9 * err ** (-1.0 / 8.0)
            h_abs *= factor if factor > 0.2 else 0.2  # also for NaN
            rejected = True
        status = _state_status(y_new, Kdim, max_value)
        if status != 0:
            return out, j_next, status, t_new, nfev
        j_stop = j_next
        while j_stop < n_t and t_eval[j_stop] <= t_new:
            j_stop += 1
        if j_stop > j_next:
            _dop853_dense(args, Kst, t, h, y, y_new, f_new, t_eval, j_next, j_stop, out, ytmp)
            nfev += Kst.shape[0] - _N_ST - 1
            if t_new == t_end:
                out[n_t - 1] = y_new
            j_next = j_stop
        t = t_new
        y[:] = y_new
        fcur[:] = f_new
    return out, j_next, 0, np.nan, nfev


@_njit
def _zero_jac(Q):  # stands in for an absent Jacobian (never called)
    K = Q.shape[0]
    return np.zeros((K, K, K))


@_njit
def _eps_g_path_nb(ys, n_rows, args):
    T, K, M, noise_var = args[0], args[1], args[2], args[5]
    eps = np.full(ys.shape[0], np.nan)
    S = np.empty((K + M, K + M))
    for j in range(n_rows):
        Q = ys[j, : K * K].reshape((K, K))
        R = ys[j, K * K :].reshape((K, M))
        _eff_cov_nb(Q, R, T, _scale_of(Q, args), S)
        eps[j] = _eps_g_nb(S, K, noise_var)
    return eps


def _dop853_scaled(args, y0, t_eval, rtol, atol, Kdim, max_value):
    return _dop853_nb(args, y0, t_eval, rtol, atol, Kdim, max_value)


def _eps_g_path_scaled(ys, n_rows, args):
    return _eps_g_path_nb(ys, n_rows, args)


@functools.cache
def _scaled_entry_points():
    """Compiled integrator and eps_g path for user scale functions (typed once)."""
    f64, i64 = numba.types.float64, numba.types.int64
    jit = functools.partial(numba.njit, cache=True, error_model="numpy")
    dop = jit((_SCALED_ARGS, f64[::1], f64[::1], f64, f64, i64, f64))(_dop853_scaled)
    eps = jit((f64[:, ::1], i64, _SCALED_ARGS))(_eps_g_path_scaled)
    return dop, eps


# --------------------------------------------------------------------------------------
# Public integrator
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TheoryTrajectory:
    """Result of :func:`integrate_diagonal_scale`.

    Attributes
    ----------
    alpha : ndarray, shape (n,)
        Output times actually reached (a prefix of the requested grid).
    Q : ndarray, shape (n, K, K)
    R : ndarray, shape (n, K, M)
    eps_g : ndarray, shape (n,)
        Generalization error, output-noise term included.
    diverged : bool
        True if the integration stopped early (see ``message``).
    alpha_diverged : float
        Time at which the failure was detected (NaN if not diverged).
    nfev : int
        Number of right-hand-side evaluations.
    message : str
        Human-readable status.
    engine : str
        ``"numba"`` (compiled DOP853) or ``"scipy"`` (solver class of ``method``).
    """

    alpha: Array
    Q: Array
    R: Array
    eps_g: Array
    diverged: bool
    alpha_diverged: float
    nfev: int
    message: str
    engine: str


def _choose_engine(engine: str, method: str, scale_fn, scale_jac_fn) -> str:
    if engine not in ("auto", "numba", "scipy"):
        raise ValueError(f"engine must be 'auto', 'numba' or 'scipy', got {engine!r}")
    if method not in _SCIPY_METHODS:
        raise ValueError(f"method must be one of {sorted(_SCIPY_METHODS)}, got {method!r}")
    compilable = (
        HAVE_NUMBA
        and method == "DOP853"
        and all(fn is None or _is_jitted(fn) for fn in (scale_fn, scale_jac_fn))
    )
    if engine == "numba" and not compilable:
        raise ValueError(
            "engine='numba' needs numba, method='DOP853' and numba-jitted scale functions"
        )
    if engine == "auto":
        return "numba" if compilable else "scipy"
    return engine


def _run_numba(Q0, R0, T, scale_fn, scale_jac_fn, eta, batch_size, noise_var, alpha,
               rtol, atol, second_order, max_value):
    K, M = R0.shape
    args = (T, K, M, float(eta), 1.0 / batch_size, float(noise_var), bool(second_order))
    dop, eps_path = _dop853_nb, _eps_g_path_nb
    if scale_fn is not None:
        has_jac = scale_jac_fn is not None
        args = (*args, scale_fn, scale_jac_fn if has_jac else _zero_jac, has_jac)
        dop, eps_path = _scaled_entry_points()
    y0 = pack_state(Q0, R0)
    ys, n_rows, status, t_fail, nfev = dop(args, y0, alpha, rtol, atol, K, max_value)
    eps = eps_path(ys, n_rows, args)
    return ys[:n_rows], eps[:n_rows], int(status), float(t_fail), int(nfev)


def _state_status_py(y, K, max_value):
    if HAVE_NUMBA:
        return int(_state_status(y, K, max_value))
    if not np.all(np.isfinite(y)):
        return 1
    if np.max(np.abs(y)) > max_value:
        return 2
    try:
        np.linalg.cholesky(y[: K * K].reshape(K, K))
    except np.linalg.LinAlgError:
        return 3
    return 0


def solve_on_grid(
    fun: Callable[[float, Array], Array],
    y0: Array,
    alpha: Array,
    *,
    method: str,
    rtol: float,
    atol: float,
    status: Callable[[Array], int],
    stop_rows: Callable[[Array, int, int], int | None] | None = None,
) -> tuple[Array, int, int, float]:
    """Step a scipy solver from ``alpha[0]`` and fill the grid ``alpha`` by dense output.

    ``status(y)`` is 0 for a valid state (else a failure code: the run stops there and
    keeps the rows reached); code 4 marks a solver failure. ``stop_rows(out, n_rows,
    j_stop)`` may end the run early after new rows are filled, returning the number of
    rows to keep. Returns ``(out, n_rows, status, t_fail)``; rows past ``n_rows`` are NaN.
    """
    out = np.full((alpha.size, y0.size), np.nan)
    out[0] = y0
    code = status(y0)
    n_rows, t_fail = (0, float(alpha[0])) if code else (1, float("nan"))
    if code or alpha.size < 2:
        return out, n_rows, code, t_fail
    solver = _SCIPY_METHODS[method](fun, alpha[0], y0, alpha[-1], rtol=rtol, atol=atol)
    while solver.status == "running":
        with np.errstate(all="ignore"):
            solver.step()
        if solver.status == "failed":
            return out, n_rows, 4, float(solver.t)
        code = status(solver.y)
        if code:
            return out, n_rows, code, float(solver.t)
        j_stop = int(np.searchsorted(alpha, solver.t, side="right"))
        if j_stop > n_rows:
            out[n_rows:j_stop] = solver.dense_output()(alpha[n_rows:j_stop]).T
            keep = None if stop_rows is None else stop_rows(out, n_rows, j_stop)
            if keep is not None:
                return out, keep, 0, t_fail
            n_rows = j_stop
    out[-1] = solver.y
    return out, n_rows, 0, t_fail


def _run_scipy(Q0, R0, T, scale_fn, scale_jac_fn, eta, batch_size, noise_var, alpha,
               rtol, atol, second_order, max_value, method):
    K, M = R0.shape
    nfev = 0

    def fun(_t, y):
        nonlocal nfev
        nfev += 1
        Q, R = unpack_state(y, K, M)
        s = None if scale_fn is None else scale_fn(Q)
        jac = None if (scale_fn is None or scale_jac_fn is None) else scale_jac_fn(Q)
        with np.errstate(all="ignore"):  # trial stages may leave the valid region
            dQ, dR = ode_rhs(Q, R, T, s, jac, eta, batch_size, noise_var, second_order)
        return pack_state(dQ, dR)

    y0 = pack_state(Q0, R0)
    out, n_rows, status, t_fail = solve_on_grid(
        fun, y0, alpha, method=method, rtol=rtol, atol=atol,
        status=lambda y: _state_status_py(y, K, max_value),
    )
    ys = out[:n_rows]
    Qs, Rs = unpack_state(ys, K, M)
    eps = np.array([
        generalization_error(Q, R, T, None if scale_fn is None else scale_fn(Q), noise_var)
        for Q, R in zip(Qs, Rs, strict=True)
    ])
    return ys, eps, status, float(t_fail), nfev


def integrate_diagonal_scale(
    Q0: ArrayLike,
    R0: ArrayLike,
    T: ArrayLike,
    scale_fn: ScaleFn | None = None,
    scale_jac_fn: ScaleFn | None = None,
    eta: float = 1.0,
    batch_size: int = 1,
    noise_var: float = 0.0,
    alpha: ArrayLike = (0.0, 1.0),
    rtol: float = 1e-10,
    atol: float = 1e-12,
    method: str = "DOP853",
    second_order: bool = True,
    engine: str = "auto",
    max_value: float = 1e10,
) -> TheoryTrajectory:
    """Integrate the order-parameter ODE of a diagonal-scale normalization.

    The packed state is ``concatenate(Q.ravel(), R.ravel())`` with the full
    symmetric ``Q`` (:func:`pack_state`); the right-hand side keeps ``Q``
    exactly symmetric.

    Parameters
    ----------
    Q0, R0 : array_like, shapes (K, K), (K, M)
        Initial order parameters at ``alpha[0]``.
    T : array_like, shape (M, M)
        Teacher overlaps (constant).
    scale_fn : callable ``Q -> s`` (shape (K,)), optional
        Scale of the normalization ``x~_i = s_i(Q) x_i``. ``None``: plain
        network (``s = 1``, fastest path).
    scale_jac_fn : callable ``Q -> ds_dQ`` (shape (K, K, K)), optional
        Its Jacobian, ``ds_dQ[i, j, k] = d s_i / d Q_jk`` (``Q_jk``, ``Q_kj``
        independent). ``None`` with a ``scale_fn``: no gradient flows through
        the statistics (``C = 0``).
    eta : float
        Learning rate (step ``eta / sqrt(N)`` on ``J``, ``alpha = steps / N``).
    batch_size : int
        Minibatch size (divides the ``eta^2`` term).
    noise_var : float
        Output-noise variance (in the ``eta^2`` term and in ``eps_g``).
    alpha : array_like
        Increasing output grid; the integration runs from ``alpha[0]`` to
        ``alpha[-1]``.
    rtol, atol : float
        Tolerances of the adaptive solver.
    method : {"DOP853", "RK45", "LSODA", "Radau", "BDF"}
        Solver; the scipy solver class of that name unless the compiled path
        is used.
    second_order : bool
        Keep the ``eta^2`` term.
    engine : {"auto", "numba", "scipy"}
        ``"auto"`` uses a compiled DOP853 (a port of scipy's, same results to
        rounding) when numba is installed, ``method == "DOP853"`` and the scale
        functions are ``None`` or numba-jitted; otherwise scipy's solver.
        Jitted scale functions must compile as ``float64[::1](float64[:, ::1])``
        and ``float64[:, :, ::1](float64[:, ::1])`` (C-contiguous results); they
        enter as first-class functions, so the integrator is compiled (and
        cached on disk) once for all of them.
    max_value : float
        Any state entry beyond this magnitude counts as divergence.

    Returns
    -------
    TheoryTrajectory
        On divergence (non-finite state, ``|state| > max_value``, ``Q`` not
        positive definite, or step size underflow) the integration stops; the
        result holds the grid points reached before, ``diverged=True`` and
        ``alpha_diverged``.
    """
    Q0, R0, T = (np.ascontiguousarray(a, dtype=np.float64) for a in (Q0, R0, T))
    alpha = np.ascontiguousarray(alpha, dtype=np.float64).reshape(-1)
    if alpha.size == 0 or np.any(np.diff(alpha) <= 0):
        raise ValueError("alpha must be a non-empty, strictly increasing grid")
    if int(batch_size) < 1:
        raise ValueError("batch_size must be a positive integer")
    K, M = R0.shape
    chosen = _choose_engine(engine, method, scale_fn, scale_jac_fn)
    args = (Q0, R0, T, scale_fn, scale_jac_fn, eta, int(batch_size), noise_var, alpha,
            rtol, atol, second_order, max_value)
    if chosen == "numba":
        ys, eps, status, t_fail, nfev = _run_numba(*args)
    else:
        ys, eps, status, t_fail, nfev = _run_scipy(*args, method)
    Qs, Rs = unpack_state(ys, K, M)
    return TheoryTrajectory(
        alpha=alpha[: ys.shape[0]].copy(),
        Q=Qs.copy(),
        R=Rs.copy(),
        eps_g=eps,
        diverged=status != 0,
        alpha_diverged=t_fail if status != 0 else float("nan"),
        nfev=nfev,
        message=_STATUS_MESSAGES[status],
        engine=chosen,
    )
