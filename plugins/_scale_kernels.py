"""Compiled scale functions shared by the built-in normalization plugins.

A helper module (not a plugin: it registers nothing); both ``plugins.normalizations``
and ``plugins.normalizations_extra`` build their :class:`framework.ScaleKernels` here.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from framework import ScaleKernels

try:  # numba is optional (extra "fast"): without it there are no compiled scale kernels
    import numba
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None  # type: ignore[assignment]

__all__ = ["gain_kernels"]


@functools.cache
def gain_kernels(names: tuple[str, ...], shift: tuple[str, ...], eps: float,
                 gradient: bool) -> ScaleKernels | None:
    """``s_i = p[0, i] / sqrt(Q_ii + eps)`` (row 0 the gain ``names[0]``; further rows
    have no effect on ``s``); ``gradient=False``: ``ds/dQ = 0`` (stop-gradient).
    ``names=()``: ``s = 1``. One object per argument tuple (compile-time constants)."""
    if numba is None:  # pragma: no cover - exercised only without numba
        return None
    gain = bool(names)

    @numba.njit
    def scale(Q, p):
        K = Q.shape[0]
        out = np.ones(K)
        if gain:
            for i in range(K):
                out[i] = p[0, i] / math.sqrt(Q[i, i] + eps)
        return out

    @numba.njit
    def jacobian(Q, p):
        K = Q.shape[0]
        out = np.zeros((K, K, K))
        if gain and gradient:
            for i in range(K):
                v = Q[i, i] + eps
                out[i, i, i] = -0.5 * p[0, i] / (v * math.sqrt(v))
        return out

    @numba.njit
    def parameter_jacobian(Q, p):
        K = Q.shape[0]
        out = np.zeros((p.shape[0], K, K))
        if gain:
            for i in range(K):
                out[0, i, i] = 1.0 / math.sqrt(Q[i, i] + eps)
        return out

    return ScaleKernels(names=names, scale=scale, jacobian=jacobian,
                        parameter_jacobian=parameter_jacobian, shift=shift)
