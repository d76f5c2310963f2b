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

The integrators are in :mod:`framework.theory._dop853` (the compiled DOP853) and
:mod:`framework.theory._integrate` (:func:`integrate_diagonal_scale`, the scipy grid
solver); ``integrate_diagonal_scale`` and ``TheoryTrajectory`` are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from framework.theory._erf import I2, I3, I4, J2

try:  # optional accelerator
    import numba
    from numba.extending import is_jitted as _numba_is_jitted

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None  # type: ignore[assignment]
    _numba_is_jitted = None  # type: ignore[assignment]
    HAVE_NUMBA = False


def _is_jitted(fn: object) -> bool:
    """True if ``fn`` is a numba-compiled function (False without numba)."""
    return bool(HAVE_NUMBA and _numba_is_jitted(fn))  # type: ignore[arg-type]


__all__ = [
    "HAVE_NUMBA",
    "TheoryTrajectory",  # noqa: F822 - re-exported by __getattr__
    "drift_terms",
    "effective_covariance",
    "eps_g_gradient",
    "error_weights",
    "generalization_error",
    "integrate_diagonal_scale",  # noqa: F822 - re-exported by __getattr__
    "ode_rhs",
    "ode_rhs_reference",
    "pack_state",
    "readout_gradient",
    "scale_moments",
    "unpack_state",
]

Array = NDArray[np.float64]
ScaleFn = Callable[[Array], Array]


# --------------------------------------------------------------------------------------
# Generalization error and effective covariance
# --------------------------------------------------------------------------------------


def error_weights(
    K: int, M: int, student: ArrayLike | None = None, teacher: ArrayLike | None = None
) -> Array:
    """``w = (-a, b)`` so that ``zeta - sigma = w . g(u)`` (noise-free), with the
    effective output weights ``a`` (K,) of the student (``c_K v``) and ``b`` (M,) of the
    teacher (``c_M v*``); default ones (the soft committee machine, ``w = (-1,)*K +
    (+1,)*M``)."""
    a = np.ones(K) if student is None else np.asarray(student, dtype=np.float64).reshape(K)
    b = np.ones(M) if teacher is None else np.asarray(teacher, dtype=np.float64).reshape(M)
    return np.concatenate([-a, b])


def _weights(w: ArrayLike | None, K: int, M: int) -> Array:
    return error_weights(K, M) if w is None else np.ascontiguousarray(w, dtype=np.float64)


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
    Q: ArrayLike, R: ArrayLike, T: ArrayLike, s: ArrayLike | None = None, noise_var: float = 0.0,
    w: ArrayLike | None = None,
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
    w : array_like, shape (K + M,), optional
        Error weights ``(-a, b)`` of :func:`error_weights` (default: unit readouts).

    Returns
    -------
    float
    """
    Q = np.asarray(Q, dtype=np.float64)
    w = _weights(w, Q.shape[0], np.shape(T)[0])
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
    noise_var: float = 0.0, w: ArrayLike | None = None,
) -> tuple[Array, Array, Array, Array]:
    """``eps_g`` and its exact gradient for stacks of order parameters.

    ``Q (..., K, K)``, ``R (..., K, M)``, scale ``s (..., K)`` and its Jacobian
    ``ds_dQ (..., K, K, K)`` (None: ``s`` independent of ``Q``). Returns ``(eps, G, H,
    dE_ds)``: ``G = d eps_g / dQ`` (entries independent, chain rule through ``s(Q)``
    included; only ``G + G^T`` is meaningful on symmetric ``Q``), ``H = d eps_g / dR``
    and ``dE_ds = d eps_g / d s`` at fixed ``(Q, R)`` (for parameters of the scale).
    ``w``: error weights ``(-a, b)`` (:func:`error_weights`; default unit readouts).
    """
    Q, R, T, s = (np.asarray(a, dtype=np.float64) for a in (Q, R, T, s))
    K, M = R.shape[-2:]
    Sig = _stacked_effective_covariance(Q, R, T, s)
    w = _weights(w, K, M)
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
    A[..., idx, idx] = (w * w * d / np.sqrt(1.0 + 2.0 * diag) - cross) / (np.pi * d)
    Ast = A + np.swapaxes(A, -1, -2)
    Ass, Ast_r = A[..., :K, :K], Ast[..., :K, K:]
    G = Ass * s[..., :, None] * s[..., None, :]
    dE_ds = np.sum(Ast[..., :K, :K] * Q * s[..., None, :], axis=-1) + np.sum(Ast_r * R, axis=-1)
    if ds_dQ is not None:
        G = G + np.einsum("...i,...ijk->...jk", dE_ds, np.asarray(ds_dQ, dtype=np.float64))
    H = Ast_r * s[..., :, None]
    return eps, G, H, dE_ds


def readout_gradient(
    Q: ArrayLike, R: ArrayLike, T: ArrayLike, s: ArrayLike | None = None,
    w: ArrayLike | None = None,
) -> Array:
    """``d eps_g / d a_i = -E[(zeta - sigma) g(x~_i)] = -(I2(Sigma~) w)_i`` for the
    effective student output weights ``a`` (``w = (-a, b)``), stacked over leading axes
    of ``Q (..., K, K)``, ``R (..., K, M)``, ``s (..., K)``; returns ``(..., K)``."""
    Q, R, T = (np.asarray(a, dtype=np.float64) for a in (Q, R, T))
    K, M = R.shape[-2:]
    s = np.ones(Q.shape[:-1]) if s is None else np.asarray(s, dtype=np.float64)
    Sig = _stacked_effective_covariance(Q, R, T, s)
    w = _weights(w, K, M)
    d = 1.0 + np.diagonal(Sig, axis1=-2, axis2=-1)
    z = Sig[..., :K, :] / np.sqrt(d[..., :K, None] * d[..., None, :])
    return -(2.0 / np.pi) * np.einsum("...ib,b->...i", np.arcsin(np.clip(z, -1.0, 1.0)), w)


# --------------------------------------------------------------------------------------
# ODE right-hand side: reference numpy implementation
# --------------------------------------------------------------------------------------


def _prepared(Q: ArrayLike, R: ArrayLike, T: ArrayLike, s: ArrayLike | None,
              w: ArrayLike | None) -> tuple[int, int, Array, Array, Array, Array, Any]:
    """``(K, M, s, Sigma~, w, a = -w[:K], arange(K))`` of the arguments of the closed
    forms below."""
    Q, R, T = (np.asarray(x, dtype=np.float64) for x in (Q, R, T))
    K, M = R.shape
    s = _scale(s, K)
    w = _weights(w, K, M)
    return K, M, s, effective_covariance(Q, R, T, s), w, -w[:K], np.arange(K)


def drift_moments(
    Q: ArrayLike,
    R: ArrayLike,
    T: ArrayLike,
    s: ArrayLike | None = None,
    ds_dQ: ArrayLike | None = None,
    noise_var: float = 0.0,
    second_order: bool = True,
    w: ArrayLike | None = None,
) -> tuple[Array, Array, Array]:
    """``(E[a u^T] (K, K + M), C (K, K), E[a a^T] (K, K))`` at ``(Q, R)``: the raw
    pre-activations ``u = (x, y)`` (before the scale), ``a = -d eps / dx``, ``C =
    -(Gbar + Gbar^T)`` the statistics' term (zeros without ``ds_dQ``), ``E[a a^T]`` zeros
    with ``second_order=False``. :func:`ode_rhs_reference` assembles the isotropic ODE
    from them; :mod:`framework.theory.spectral` the ODE per input eigenspace."""
    K, _, s, St, w, a, idx = _prepared(Q, R, T, s, w)
    dv = np.einsum("b,ibc->ic", w, I3(St, idx))  # E[delta~_i u~_c]
    dd = (np.einsum("c,d,ikcd->ik", w, w, I4(St, idx)) + noise_var * J2(St, idx)
          if second_order else None)
    return _drift_of_moments(K, s, a, dv, dd, ds_dQ)


def _drift_of_moments(K: int, s: Array, a: Array, dv: Array, dd: Array | None,
                      ds_dQ: ArrayLike | None) -> tuple[Array, Array, Array]:
    """:func:`drift_moments`' ``(E[a u^T], C, E[a a^T])`` from ``dv = E[delta~ u~^T]``
    (K, P) and ``dd = E[delta~ delta~^T]`` (None: ``second_order=False``)."""
    dv = a[:, None] * dv  # a_i E[delta~_i u~_c]
    au = s[:, None] * dv
    au[:, :K] /= s[None, :]  # E[a_i x_k] = E[a_i x~_k] / s_k
    C = np.zeros((K, K))
    if ds_dQ is not None:
        Gbar = -np.einsum("i,ijk->jk", np.diag(dv[:, :K]) / s,
                          np.asarray(ds_dQ, dtype=np.float64))
        C = -(Gbar + Gbar.T)
    aa = np.zeros((K, K))
    if dd is not None:
        aa = np.outer(s, s) * (np.outer(a, a) * 0.5 * (dd + dd.T))
    return au, C, aa


def stein_matrix(
    Q: ArrayLike,
    R: ArrayLike,
    T: ArrayLike,
    s: ArrayLike | None = None,
    w: ArrayLike | None = None,
) -> Array:
    """``E[grad_u a]`` (K, K + M): the expected derivative of the per-sample gradient
    ``a_i = -d eps / dx_i`` with respect to the raw pre-activations ``u = (x, y)``
    (Stein's lemma: ``E[a u^T] = E[grad_u a] Sigma``), in closed form and without
    inverting ``Sigma`` (analytic across the boundary of the PSD cone)::

        a_i = s_i a_i' g'(x~_i) e,   e = w . g(u~),   a' = -w[:K]
        d a_i / d x_k = s_i a_i' (delta_ik s_i E[g''(x~_i) e] + s_k w_k E[g'(x~_i) g'(x~_k)])
        d a_i / d y_n = s_i a_i' w_n E[g'(x~_i) g'(y_n)]

    with ``g''(u) = -u g'(u)`` (erf): ``E[g''(x~_i) e] = -sum_b w_b I3[i, b, i]``. The
    output noise adds nothing (zero mean, independent). The path through the population
    statistics is not included (the ``C`` of :func:`drift_moments`)."""
    K, M, s, St, w, a, idx = _prepared(Q, R, T, s, w)
    d1 = 1.0 + np.diag(St)
    gg = (2.0 / np.pi) / np.sqrt(np.outer(d1[:K], d1) - St[:K, :] ** 2)  # E[g'(u~_i) g'(u~_c)]
    gpp_e = -np.einsum("b,ib->i", w, I3(St, idx)[idx, :, idx])  # E[g''(x~_i) e]
    scale_c = np.concatenate([s, np.ones(M)])  # d u~_c / d u_c
    A = (s * a)[:, None] * gg * (w * scale_c)[None, :]
    A[idx, idx] += s * a * s * gpp_e
    return A


def drift_terms(Q: ArrayLike, R: ArrayLike, T: ArrayLike, s: ArrayLike | None = None,
                ds_dQ: ArrayLike | None = None, noise_var: float = 0.0,
                second_order: bool = True, w: ArrayLike | None = None,
                ) -> tuple[Array, Array, Array, Array]:
    """``(*drift_moments(...), stein_matrix(...))`` at once: the moments ``E[delta~
    u~^T]``, ``E[delta~ delta~^T]`` and ``E[grad_u a]`` by compiled kernels when numba is
    available (the right-hand side's :func:`_moments_nb`, and :func:`_stein_nb`; agree
    with the numpy functions to rounding, tested), else those numpy functions. Used by
    the closed-form engine's :meth:`~framework.theory.closed.ClosedFormEngine.drift`
    (the structured-input ODE calls it at every right-hand side)."""
    if not HAVE_NUMBA:
        return (*drift_moments(Q, R, T, s, ds_dQ, noise_var, second_order, w),
                stein_matrix(Q, R, T, s, w))
    Q, R, T = (np.ascontiguousarray(x, dtype=np.float64) for x in (Q, R, T))
    K, M = R.shape
    s = np.ascontiguousarray(_scale(s, K))
    w = _weights(w, K, M)
    St = np.empty((K + M, K + M))
    _eff_cov_nb(Q, R, T, s, St)
    dv, dd, A = np.empty((K, K + M)), np.empty((K, K)), np.empty((K, K + M))
    _moments_nb(St, K, w, float(noise_var), bool(second_order), dv, dd)
    _stein_nb(St, K, s, w, A)
    return (*_drift_of_moments(K, s, -w[:K], dv, dd if second_order else None, ds_dQ), A)


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
    w: ArrayLike | None = None,
) -> tuple[Array, Array]:
    """Readable numpy implementation of :func:`ode_rhs` (same signature): the isotropic
    assembly of :func:`drift_moments`."""
    Q, R = np.asarray(Q, dtype=np.float64), np.asarray(R, dtype=np.float64)
    K = Q.shape[0]
    au, C, aa = drift_moments(Q, R, T, s, ds_dQ, noise_var, second_order, w)
    drift_Q = au[:, :K] + C @ Q
    dQ = eta * (drift_Q + drift_Q.T)
    if second_order:
        dQ = dQ + (eta**2 / batch_size) * aa
    return dQ, eta * (au[:, K:] + C @ R)


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
def _unit_weights_nb(K, P):
    """``w = (-1)*K + (+1)*M`` (unit readouts) for ``P = K + M``."""
    w = np.empty(P)
    for a in range(P):
        w[a] = -1.0 if a < K else 1.0
    return w


@_njit
def _eps_g_w_nb(S, w, noise_var):
    """``w^T I2(S) w / 2 + noise_var / 2`` for error weights ``w = (-a, b)``."""
    P = S.shape[0]
    acc = 0.0
    for a in range(P):
        wa = w[a]
        acc += wa * wa * math.asin(S[a, a] / (1.0 + S[a, a]))
        for b in range(a + 1, P):
            z = S[a, b] / math.sqrt((1.0 + S[a, a]) * (1.0 + S[b, b]))
            acc += 2.0 * wa * w[b] * _asin_nb(z)
    return acc / math.pi + 0.5 * noise_var


@_njit
def _eps_g_nb(S, K, noise_var):
    """``w^T I2(S) w / 2 + noise_var / 2`` for ``w = (-1)*K + (+1)*M``."""
    return _eps_g_w_nb(S, _unit_weights_nb(K, S.shape[0]), noise_var)


@_njit
def _scale_moments_nb(Q, R, T, s, w, noise_var, out):
    """``eps_g`` and ``out[i] = E[delta~_i x_i]`` (unscaled ``x_i``; finite as
    ``s_i -> 0``): ``sum_b w_b E[g'(x~_i) g(u_b) x_i]``, the I3 formula with
    ``Cov(x~_i, x_i) = s_i Q_ii`` and ``Cov(u_b, x_i)`` = ``s_b Q_bi`` or ``R_in``;
    ``w = (-a, b)`` the error weights (``delta~_i`` carries no readout factor)."""
    K, M = R.shape
    P = K + M
    S = np.empty((P, P))
    _eff_cov_nb(Q, R, T, s, S)
    for i in range(K):
        one_aa = 1.0 + S[i, i]
        c_ac = s[i] * Q[i, i]
        acc = 0.0
        for b in range(P):
            wb = w[b]
            c_bc = s[b] * Q[b, i] if b < K else R[i, b - K]
            c_ab = S[i, b]
            lam = one_aa * (1.0 + S[b, b]) - c_ab * c_ab
            acc += wb * (c_bc * one_aa - c_ab * c_ac) / (one_aa * math.sqrt(lam))
        out[i] = 2.0 / math.pi * acc
    return _eps_g_w_nb(S, w, noise_var)


def scale_moments(
    Q: ArrayLike, R: ArrayLike, T: ArrayLike, s: ArrayLike, noise_var: float = 0.0,
    w: ArrayLike | None = None,
) -> tuple[float, Array]:
    """``(eps_g, E[delta~_i x_i])`` for ``x~ = s x``: the generalization error and the
    expectation that drives a trainable scale parameter (``x_i`` unscaled, so finite as
    ``s_i -> 0``; ``delta~_i = (zeta - sigma) g'(x~_i)`` without the readout factor
    ``a_i``). ``w``: error weights ``(-a, b)`` (default unit readouts). Compiled when
    numba is available; the numpy fallback evaluates the same I3 formula
    (:func:`framework.theory._erf.I3` on the joint covariance of ``(x~, y, x)``).
    """
    Q, R, T, s = (np.ascontiguousarray(a, dtype=np.float64) for a in (Q, R, T, s))
    K, M = R.shape
    w = _weights(w, K, M)
    if HAVE_NUMBA:
        out = np.empty(K)
        eps = _scale_moments_nb(Q, R, T, s, w, float(noise_var), out)
        return float(eps), out
    SQ = s[:, None] * Q
    cov = np.block([[SQ * s[None, :], s[:, None] * R, SQ],
                    [R.T * s[None, :], T, R.T],
                    [SQ.T, R, Q]])
    i3 = I3(cov, np.arange(K))  # (K, P, P): E[g'(u_i) g(u_b) u_c]
    idx = np.arange(K)
    edx = np.einsum("ib,b->i", i3[idx, : K + M, K + M + idx], w)
    return generalization_error(Q, R, T, s, noise_var, w), edx


@_njit
def _moments_nb(S, K, w, noise_var, second_order, dv, dd):
    """``dv = E[delta~ u^T]`` (K x P) and, if needed, ``dd = E[delta~ delta~^T]`` for
    the error weights ``w`` (``delta~_i`` without the readout factor)."""
    P = S.shape[0]
    two_pi = 2.0 / math.pi
    d1 = np.empty(P)
    for a in range(P):
        d1[a] = 1.0 + S[a, a]
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
def _stein_nb(S, K, s, w, A):
    """Numba twin of :func:`stein_matrix` on ``S = Sigma~``, writing ``E[grad_u a]``
    (K, P) into ``A``."""
    P = S.shape[0]
    two_pi = 2.0 / math.pi
    for i in range(K):
        d1i = 1.0 + S[i, i]
        ai = -w[i]
        gpp_e = 0.0  # E[g''(x~_i) e] = -sum_b w_b I3[i, b, i]
        for c in range(P):
            root = math.sqrt(d1i * (1.0 + S[c, c]) - S[i, c] ** 2)
            scale_c = s[c] if c < K else 1.0
            A[i, c] = s[i] * ai * (two_pi / root) * w[c] * scale_c
            gpp_e -= w[c] * two_pi * (S[c, i] * d1i - S[i, c] * S[i, i]) / (d1i * root)
        A[i, i] += s[i] * ai * s[i] * gpp_e


@_njit
def _rhs_nb(Q, R, T, s, ds_dQ, has_jac, eta, inv_batch, noise_var, second_order, w, dQ, dR):
    """Numba twin of :func:`ode_rhs_reference`, writing into ``dQ`` and ``dR``; ``w`` the
    error weights ``(-a, b)`` (the readout factors ``a_i`` multiply ``delta~_i``; exact
    for unit readouts, a multiplication by 1)."""
    K, M = R.shape
    P = K + M
    S = np.empty((P, P))
    _eff_cov_nb(Q, R, T, s, S)
    dv = np.empty((K, P))
    dd = np.empty((K, K))
    _moments_nb(S, K, w, noise_var, second_order, dv, dd)
    for i in range(K):
        for c in range(P):
            dv[i, c] *= -w[i]
        if second_order:
            for k in range(K):
                dd[i, k] *= w[i] * w[k]
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
    w: ArrayLike | None = None,
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
    w : array_like, shape (K + M,), optional
        Error weights ``(-a, b)`` with the effective output weights ``a = c_K v`` of the
        student and ``b = c_M v*`` of the teacher (:func:`error_weights`); default unit
        readouts. The student's per-sample gradient carries ``a_i``.

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
        return ode_rhs_reference(Q, R, T, s, ds_dQ, eta, batch_size, noise_var, second_order,
                                 w)
    Q, R, T = (np.ascontiguousarray(a, dtype=np.float64) for a in (Q, R, T))
    K, M = R.shape
    s = _scale(s, K)
    w = _weights(w, K, M)
    has_jac = ds_dQ is not None
    jac = np.ascontiguousarray(ds_dQ, dtype=np.float64) if has_jac else np.zeros((1, 1, 1))
    dQ, dR = np.empty((K, K)), np.empty((K, M))
    _rhs_nb(Q, R, T, s, jac, has_jac, float(eta), 1.0 / batch_size, float(noise_var),
            bool(second_order), w, dQ, dR)
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


#: Semidefinite tolerance of the state check, relative to ``max(1, max |Q|)`` (shared with
#: :data:`framework.theory._integrate.SEMIDEFINITE_TOL`).
SEMIDEFINITE_TOL = 1e-9


@_njit
def _state_status(y, K, max_value):
    """0 if valid; 1 non-finite; 2 beyond ``max_value``; 3 ``Q`` not positive
    *semi*-definite: a Cholesky factorization with a pivot below ``-tol`` fails, a pivot in
    ``[-tol, tol]`` (``tol = SEMIDEFINITE_TOL * max(1, max |Q|)``) is a zero column,
    valid only if the rest of its column vanishes to ``sqrt(tol)`` -- identical students
    or a unit with zero weights are valid states (the closed forms are analytic there)."""
    scale = 1.0
    for v in y:
        if not math.isfinite(v):
            return 1
        if abs(v) > max_value:
            return 2
    for j in range(K * K):
        scale = max(scale, abs(y[j]))
    tol = SEMIDEFINITE_TOL * scale
    root = math.sqrt(tol)
    L = np.zeros((K, K))  # Cholesky of Q = y[:K*K]
    for j in range(K):
        acc = y[j * K + j]
        for m in range(j):
            acc -= L[j, m] ** 2
        if acc < -tol:
            return 3
        if acc <= tol:  # a zero pivot: the column below must vanish too
            for i in range(j + 1, K):
                rest = y[i * K + j]
                for m in range(j):
                    rest -= L[i, m] * L[j, m]
                if abs(rest) > root * math.sqrt(max(abs(y[i * K + i]), tol)):
                    return 3
            continue
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
    5: "the right-hand side is not finite at a valid state",
    6: "the engine's estimate lost its accuracy",
}


def _state_status_py(y, K, max_value):
    """:func:`_state_status` from Python (the same code, interpreted without numba)."""
    return int(_state_status(y, K, max_value))


# --------------------------------------------------------------------------------------
# Integrators (re-exported from framework.theory._integrate, imported on first use: it
# imports this module)
# --------------------------------------------------------------------------------------

_REEXPORTED = ("TheoryTrajectory", "integrate_diagonal_scale")


def __getattr__(name: str):
    if name in _REEXPORTED:
        from framework.theory import _integrate

        return getattr(_integrate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
