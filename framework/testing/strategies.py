"""Hypothesis strategies for symphase specifications and order parameters."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from framework.model import OrderParameters, TeacherStudent

__all__ = ["covariances", "models", "order_parameters"]

_ELEMENTS = st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=False)


@st.composite
def covariances(draw: Any, size: int, *, ridge: float = 0.05) -> np.ndarray:
    """A symmetric positive-definite ``size x size`` matrix ``A A^T / size + ridge I``."""
    A = draw(hnp.arrays(float, (size, size), elements=_ELEMENTS))
    return A @ A.T / size + ridge * np.eye(size)


@st.composite
def models(draw: Any, *, max_K: int = 4, max_M: int = 4, noise: bool = True) -> TeacherStudent:
    """Soft committee machines with random K, M, a random teacher overlap T and noise."""
    K = draw(st.integers(1, max_K))
    M = draw(st.integers(1, max_M))
    T = draw(covariances(M, ridge=0.2))
    sigma2 = draw(st.floats(0.0, 0.5)) if noise else 0.0
    return TeacherStudent(K=K, M=M, T=T, noise=sigma2)


@st.composite
def order_parameters(
    draw: Any, K: int | None = None, M: int | None = None, *, max_size: int = 4
) -> OrderParameters:
    """Valid order parameters: the joint covariance is drawn positive definite."""
    K = draw(st.integers(1, max_size)) if K is None else K
    M = draw(st.integers(1, max_size)) if M is None else M
    cov = draw(covariances(K + M))
    return OrderParameters(cov[:K, :K], cov[:K, K:], cov[K:, K:])
