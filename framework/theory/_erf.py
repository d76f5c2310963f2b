"""Closed-form Gaussian integrals of the erf activation (Saad & Solla 1995).

Conventions
-----------
The activation is ``g(u) = erf(u / sqrt 2)`` with derivative
``g'(u) = sqrt(2 / pi) * exp(-u**2 / 2)``.  ``u`` is a zero-mean Gaussian
vector of length ``P`` with covariance ``C`` (``P x P``, symmetric positive
semi-definite).  Every function evaluates *all* index tuples at once by
broadcasting; ``a_idx`` selects the indices carrying a ``g'`` factor (usually
the student units ``range(K)``), the remaining indices run over all ``P``.

The formulas are those of Saad & Solla, Phys. Rev. E 52, 4225 (1995) and
Biehl, Riegler & Wöhler, J. Phys. A 29, 4769 (1996), written for this
normalisation of ``g``; ``tests/test_erf_integrals.py`` checks each against
Monte Carlo.

These are pure array functions (float64, no object model).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["I2", "I3", "I4", "J2", "safe_arcsin"]

#: Arguments of arcsin beyond +-1 by at most this (relative) amount are
#: rounding errors and are clipped; anything larger is left to give NaN.
ARCSIN_ROUNDING = 1e-12

_TWO_OVER_PI = 2.0 / np.pi
_FOUR_OVER_PI2 = 4.0 / np.pi**2


def safe_arcsin(z: ArrayLike) -> NDArray[np.float64]:
    """``arcsin(z)`` with ``z`` clipped into [-1, 1] at rounding level only.

    Values with ``1 < |z| <= 1 + ARCSIN_ROUNDING`` are treated as ``sign(z)``;
    larger violations (an invalid covariance) still yield NaN.
    """
    z = np.asarray(z, dtype=np.float64)
    rounding = (np.abs(z) > 1.0) & (np.abs(z) <= 1.0 + ARCSIN_ROUNDING)
    return np.arcsin(np.where(rounding, np.sign(z), z))


def _cov(C: ArrayLike) -> NDArray[np.float64]:
    C = np.asarray(C, dtype=np.float64)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"covariance must be a square matrix, got shape {C.shape}")
    return C


def _idx(C: NDArray[np.float64], a_idx: ArrayLike | None) -> NDArray[np.intp]:
    if a_idx is None:
        return np.arange(C.shape[0])
    return np.asarray(a_idx, dtype=np.intp).reshape(-1)


def I2(C: ArrayLike) -> NDArray[np.float64]:
    """``E[g(u_a) g(u_b)]`` for all pairs.

    Parameters
    ----------
    C : array_like, shape (P, P)
        Covariance of ``u``.

    Returns
    -------
    ndarray, shape (P, P)
        ``(2/pi) arcsin(C_ab / sqrt((1 + C_aa)(1 + C_bb)))``.
    """
    C = _cov(C)
    d1 = 1.0 + np.diag(C)
    return _TWO_OVER_PI * safe_arcsin(C / np.sqrt(np.outer(d1, d1)))


def I3(C: ArrayLike, a_idx: ArrayLike | None = None) -> NDArray[np.float64]:
    """``E[g'(u_a) u_c g(u_b)]`` for ``a`` in ``a_idx`` and all ``b, c``.

    Parameters
    ----------
    C : array_like, shape (P, P)
        Covariance of ``u``.
    a_idx : array_like of int, optional
        Indices carrying ``g'`` (default: all ``P``).

    Returns
    -------
    ndarray, shape (len(a_idx), P, P)
        ``I3[a, b, c] = (2/pi) (C_bc (1 + C_aa) - C_ab C_ac)
        / ((1 + C_aa) sqrt((1 + C_aa)(1 + C_bb) - C_ab**2))``.
    """
    C = _cov(C)
    a = _idx(C, a_idx)
    d1 = 1.0 + np.diag(C)
    one_aa = d1[a][:, None, None]  # (n, 1, 1)
    C_ab = C[a][:, :, None]  # (n, P, 1)
    C_ac = C[a][:, None, :]  # (n, 1, P)
    lam3 = one_aa * d1[None, :, None] - C_ab**2  # (n, P, 1)
    num = C[None, :, :] * one_aa - C_ab * C_ac
    return _TWO_OVER_PI * num / (one_aa * np.sqrt(lam3))


def I4(C: ArrayLike, a_idx: ArrayLike | None = None) -> NDArray[np.float64]:
    """``E[g'(u_a) g'(u_b) g(u_c) g(u_d)]`` for ``a, b`` in ``a_idx``, all ``c, d``.

    Parameters
    ----------
    C : array_like, shape (P, P)
        Covariance of ``u``.
    a_idx : array_like of int, optional
        Indices carrying ``g'`` (default: all ``P``).

    Returns
    -------
    ndarray, shape (len(a_idx), len(a_idx), P, P)
        ``(4/pi**2) Lambda4**-0.5 arcsin(Lambda0 / sqrt(Lambda1 Lambda2))`` with
        ``Lambda4 = (1+C_aa)(1+C_bb) - C_ab**2``,
        ``Lambda0 = Lambda4 C_cd - C_bc C_bd (1+C_aa) - C_ac C_ad (1+C_bb)
        + C_ab C_ac C_bd + C_ab C_ad C_bc``,
        ``Lambda1 = Lambda4 (1+C_cc) - C_bc**2 (1+C_aa) - C_ac**2 (1+C_bb)
        + 2 C_ab C_ac C_bc`` and ``Lambda2`` the same with ``d`` for ``c``.
        The result is symmetric in ``(a, b)`` and in ``(c, d)``.
    """
    C = _cov(C)
    a = _idx(C, a_idx)
    d1 = 1.0 + np.diag(C)
    one_aa = d1[a][:, None, None]  # (n, 1, 1)   indices (a, b, c)
    one_bb = d1[a][None, :, None]  # (1, n, 1)
    C_ab = C[np.ix_(a, a)][:, :, None]  # (n, n, 1)
    C_ac = C[a][:, None, :]  # (n, 1, P)
    C_bc = C[a][None, :, :]  # (1, n, P)
    lam4 = one_aa * one_bb - C_ab**2  # (n, n, 1)
    # Lambda1 over (a, b, c); Lambda2 is the same array over (a, b, d).
    lam1 = (
        lam4 * (1.0 + np.diag(C))
        - C_bc**2 * one_aa
        - C_ac**2 * one_bb
        + 2.0 * C_ab * C_ac * C_bc
    )
    # Lambda0 over (a, b, c, d): indices c -> axis 2, d -> axis 3.
    c_, d_ = (..., slice(None), None), (..., None, slice(None))
    lam0 = (
        lam4[..., None] * C[None, None]
        - C_bc[c_] * C_bc[d_] * one_aa[..., None]
        - C_ac[c_] * C_ac[d_] * one_bb[..., None]
        + C_ab[..., None] * (C_ac[c_] * C_bc[d_] + C_ac[d_] * C_bc[c_])
    )
    arg = lam0 / np.sqrt(lam1[c_] * lam1[d_])
    return _FOUR_OVER_PI2 * safe_arcsin(arg) / np.sqrt(lam4[..., None])


def J2(C: ArrayLike, a_idx: ArrayLike | None = None) -> NDArray[np.float64]:
    """``E[g'(u_a) g'(u_b)]`` for ``a, b`` in ``a_idx``.

    Parameters
    ----------
    C : array_like, shape (P, P)
        Covariance of ``u``.
    a_idx : array_like of int, optional
        Indices (default: all ``P``).

    Returns
    -------
    ndarray, shape (len(a_idx), len(a_idx))
        ``(2/pi) / sqrt(1 + C_aa + C_bb + C_aa C_bb - C_ab**2)``.
    """
    C = _cov(C)
    a = _idx(C, a_idx)
    d1 = 1.0 + np.diag(C)[a]
    return _TWO_OVER_PI / np.sqrt(np.outer(d1, d1) - C[np.ix_(a, a)] ** 2)
