"""``rmsnorm``: x~_i = g_i x_i / sqrt(mean_k x_k^2 + eps), with a trainable gain g.

Everything symphase needs from a normalization is here: a frozen attrs class with
``name``/``description``, its hyper-parameters as fields, ``parameters``/``trainable``,
``forward`` and ``backward`` (per sample, shapes ``(..., K)``), and a registration
hook. No statistics (it normalizes each sample on its own), so no
``population_statistics``; not a diagonal scale, so symphase's generic engine gives
its dynamics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import attrs
import numpy as np

from framework import Backward, Normalization, SpecificationError, hookimpl


def _positive(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise SpecificationError(f"{attribute.name!r} must be > 0, got {value!r}")


def _non_negative(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0:
        raise SpecificationError(f"{attribute.name!r} must be >= 0, got {value!r}")


@attrs.frozen
class RMSNorm(Normalization):
    """RMS normalization across the K hidden units, trainable gain.

    Parameters
    ----------
    g : float
        Initial gain (> 0), trained by SGD.
    eps : float
        Added to the mean square (>= 0).
    """

    name: ClassVar[str] = "rmsnorm"
    description: ClassVar[str] = "RMS normalization across hidden units with a trainable gain"

    g: float = attrs.field(default=1.0, converter=float, validator=_positive)
    eps: float = attrs.field(default=0.1, converter=float, validator=_non_negative)

    def parameters(self, K: int) -> dict[str, np.ndarray]:
        return {"g": np.full(K, self.g)}

    @property
    def trainable(self) -> tuple[str, ...]:
        return ("g",)

    def forward(self, x: np.ndarray, stats: Mapping, params: Mapping) -> np.ndarray:
        inv = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + self.eps)
        return params["g"] * x * inv

    def backward(
        self, x: np.ndarray, stats: Mapping, params: Mapping, grad_out: np.ndarray
    ) -> Backward:
        K = x.shape[-1]
        inv = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + self.eps)
        gg = grad_out * params["g"]  # d loss / d (x * inv)
        # d(x_j inv)/dx_i = delta_ij inv - x_j x_i inv^3 / K
        gx = gg * inv - x * inv**3 * np.sum(gg * x, axis=-1, keepdims=True) / K
        return Backward(x=gx, params={"g": grad_out * x * inv})


@hookimpl
def symphase_register_normalizations(registry):  # type: ignore[no-untyped-def]
    registry.add_normalization(RMSNorm)
