"""Hypothesis strategies for symphase specifications and order parameters."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from framework.model import OrderParameters, TeacherStudent

__all__ = [
    "activations",
    "covariances",
    "models",
    "normalizations",
    "order_parameters",
    "quadratures",
]

_ELEMENTS = st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=False)


@st.composite
def covariances(draw: Any, size: int, *, ridge: float = 0.05) -> np.ndarray:
    """A symmetric positive-definite ``size x size`` matrix ``A A^T / size + ridge I``."""
    A = draw(hnp.arrays(float, (size, size), elements=_ELEMENTS))
    return A @ A.T / size + ridge * np.eye(size)


@st.composite
def models(
    draw: Any,
    *,
    max_K: int = 4,
    max_M: int = 4,
    noise: bool = True,
    activation: str | st.SearchStrategy[str] = "erf",
    min_K: int = 1,
) -> TeacherStudent:
    """Soft committee machines with random K, M, a random teacher overlap T and noise.

    ``activation`` is a name or a strategy of names (e.g. :func:`activations`).
    """
    K = draw(st.integers(min_K, max_K))
    M = draw(st.integers(1, max_M))
    T = draw(covariances(M, ridge=0.2))
    sigma2 = draw(st.floats(0.0, 0.5)) if noise else 0.0
    act = activation if isinstance(activation, str) else draw(activation)
    return TeacherStudent(K=K, M=M, T=T, noise=sigma2, activation=act)


def activations() -> st.SearchStrategy[str]:
    """Names of the installed activations."""
    from framework.manager import get_registry

    return st.sampled_from(get_registry().names("activation"))


def normalizations(*, names: list[str] | None = None) -> st.SearchStrategy[Any]:
    """Installed normalizations (default hyper-parameters), optionally among ``names``."""
    from framework.manager import get_normalization, list_normalizations

    return st.sampled_from(names or list_normalizations()).map(get_normalization)


def quadratures(*, max_samples_log2: int = 12) -> st.SearchStrategy[Any]:
    """Settings of the generic engine (:class:`framework.theory.Quadrature`)."""
    from framework.theory import Quadrature

    return st.builds(
        Quadrature,
        samples=st.integers(8, max_samples_log2).map(lambda m: 1 << m),
        replicates=st.integers(4, 16),
        seed=st.integers(0, 2**16),
    )


@st.composite
def order_parameters(
    draw: Any, K: int | None = None, M: int | None = None, *, max_size: int = 4
) -> OrderParameters:
    """Valid order parameters: the joint covariance is drawn positive definite."""
    K = draw(st.integers(1, max_size)) if K is None else K
    M = draw(st.integers(1, max_size)) if M is None else M
    cov = draw(covariances(K + M))
    return OrderParameters(cov[:K, :K], cov[:K, K:], cov[K:, K:])
