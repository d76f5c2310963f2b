"""Built-in activations: ``erf`` (closed-form theory), ``relu``, ``tanh`` and ``linear``
(generic expectation engine)."""

from __future__ import annotations

import numpy as np
from scipy import special

from framework import Activation, hookimpl

_SQRT2 = np.sqrt(2.0)
_SQRT_2_OVER_PI = np.sqrt(2.0 / np.pi)


def _erf(u: np.ndarray) -> np.ndarray:
    return special.erf(u / _SQRT2)


def _erf_prime(u: np.ndarray) -> np.ndarray:
    return _SQRT_2_OVER_PI * np.exp(-0.5 * np.square(u))


ERF = Activation(
    name="erf",
    g=_erf,
    gprime=_erf_prime,
    description="g(u) = erf(u / sqrt 2); closed-form Saad-Solla integrals",
    closed_form="erf",
)


def _relu(u: np.ndarray) -> np.ndarray:
    return np.maximum(u, 0.0)


def _relu_prime(u: np.ndarray) -> np.ndarray:
    return (np.asarray(u) > 0.0).astype(float)


def _tanh_prime(u: np.ndarray) -> np.ndarray:
    return 1.0 / np.square(np.cosh(u))


def _linear(u: np.ndarray) -> np.ndarray:
    return np.array(u, dtype=float, copy=True)


def _linear_prime(u: np.ndarray) -> np.ndarray:
    return np.ones(np.shape(u))


RELU = Activation(
    name="relu",
    g=_relu,
    gprime=_relu_prime,
    description="g(u) = max(u, 0) (g'(0) = 0); generic engine",
)

TANH = Activation(
    name="tanh",
    g=np.tanh,
    gprime=_tanh_prime,
    description="g(u) = tanh(u); generic engine",
)

LINEAR = Activation(
    name="linear",
    g=_linear,
    gprime=_linear_prime,
    description="g(u) = u (deep linear network of width K); generic engine",
)


@hookimpl
def symphase_register_activations(registry):
    registry.add_activation(ERF)
    registry.add_activation(RELU)
    registry.add_activation(TANH)
    registry.add_activation(LINEAR)
