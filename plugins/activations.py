"""Built-in activations."""

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


@hookimpl
def symphase_register_activations(registry):  # type: ignore[no-untyped-def]
    registry.add_activation(ERF)
