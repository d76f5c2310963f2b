"""Built-in normalizations: ``plain`` (identity) and ``batchnorm`` (population statistics)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import attrs
import numpy as np

from framework import Backward, Normalization, ScaleKernels, hookimpl
from framework.validators import ge, gt, to_float
from plugins._scale_kernels import gain_kernels

Arrays = Mapping[str, np.ndarray]


@attrs.frozen
class Plain(Normalization):
    """No normalization: ``x~ = x`` (Saad & Solla's soft committee machine)."""

    name: ClassVar[str] = "plain"
    description: ClassVar[str] = "no normalization, x~ = x (Saad & Solla)"
    supports_diagonal_scale: ClassVar[bool] = True

    def forward(self, x: np.ndarray, stats: Arrays, params: Arrays) -> np.ndarray:
        return np.array(x, dtype=float, copy=True)

    def backward(
        self, x: np.ndarray, stats: Arrays, params: Arrays, grad_out: np.ndarray
    ) -> Backward:
        return Backward(x=np.array(grad_out, dtype=float, copy=True))

    def scale(self, Q: np.ndarray, params: Arrays) -> np.ndarray:
        return np.ones(np.shape(Q)[:-1])

    def scale_jacobian(self, Q: np.ndarray, params: Arrays) -> np.ndarray:
        shape = np.shape(Q)
        return np.zeros((*shape, shape[-1]))

    def scale_kernels(self) -> ScaleKernels | None:
        return gain_kernels((), (), 0.0, True)  # s = 1


@attrs.frozen
class BatchNorm(Normalization):
    """Batch normalization ``x~_i = gamma (x_i - mean_i) / sqrt(var_i + eps) + beta``.

    Under population statistics (the ODE limit) ``mean_i = 0`` and ``var_i = Q_ii``,
    so ``x~_i = gamma x_i / sqrt(Q_ii + eps) + beta``: with ``beta = 0`` a diagonal
    scale, and with ``eps = 0`` invariant under rescaling each student vector.
    The gradient flows through the statistics as well as through ``x``.

    Parameters
    ----------
    gamma : float
        Gain, fixed (not trained) in this plugin; default 1.
    beta : float
        Shift, fixed; default 0.
    eps : float
        Added to the variance (>= 0); default 0 (exact scale invariance).
    """

    name: ClassVar[str] = "batchnorm"
    description: ClassVar[str] = "batch normalization with population statistics, fixed gamma/beta"
    statistics_names: ClassVar[tuple[str, ...]] = ("mean", "var")
    supports_diagonal_scale: ClassVar[bool] = True

    gamma: float = attrs.field(default=1.0, converter=to_float, validator=gt(0.0))
    beta: float = attrs.field(default=0.0, converter=to_float, validator=ge(-np.inf))
    eps: float = attrs.field(default=0.0, converter=to_float, validator=ge(0.0))

    @property
    def scale_invariant(self) -> bool:  # type: ignore[override]
        return self.eps == 0.0

    def is_diagonal_scale(self) -> bool:
        return self.beta == 0.0

    def parameters(self, K: int) -> dict[str, np.ndarray]:
        return {"gamma": np.full(K, self.gamma), "beta": np.full(K, self.beta)}

    # statistics
    def population_statistics(self, Q: np.ndarray) -> dict[str, np.ndarray]:
        var = np.diagonal(Q, axis1=-2, axis2=-1).copy()
        return {"mean": np.zeros_like(var), "var": var}

    def population_statistics_vjp(self, Q: np.ndarray, grad: Arrays) -> np.ndarray:
        out = np.zeros(np.shape(Q))
        idx = np.arange(np.shape(Q)[-1])
        out[..., idx, idx] = grad["var"]
        return out

    def population_statistics_with_mean(self, Q: np.ndarray, mean: np.ndarray
                                        ) -> dict[str, np.ndarray]:
        """Inputs with a mean: ``mean_i`` the pre-activation mean, ``var_i = Q_ii`` (``Q``
        the covariance)."""
        var = np.diagonal(Q, axis1=-2, axis2=-1).copy()
        return {"mean": np.broadcast_to(np.asarray(mean, dtype=float), var.shape).copy(),
                "var": var}

    def population_statistics_with_mean_vjp(self, Q: np.ndarray, mean: np.ndarray,
                                            grad: Arrays) -> tuple[np.ndarray, np.ndarray]:
        return (self.population_statistics_vjp(Q, grad),
                np.asarray(grad["mean"], dtype=float).copy())

    def batch_statistics(self, x: np.ndarray) -> dict[str, np.ndarray]:
        mean = x.mean(axis=-2, keepdims=True)
        var = np.square(x - mean).mean(axis=-2, keepdims=True)
        return {"mean": mean, "var": var}

    def batch_statistics_vjp(self, x: np.ndarray, grad: Arrays) -> np.ndarray:
        B = x.shape[-2]
        mean = x.mean(axis=-2, keepdims=True)
        return grad["mean"] / B + grad["var"] * 2.0 * (x - mean) / B

    # the map
    def forward(self, x: np.ndarray, stats: Arrays, params: Arrays) -> np.ndarray:
        inv = 1.0 / np.sqrt(stats["var"] + self.eps)
        return params["gamma"] * (x - stats["mean"]) * inv + params["beta"]

    def backward(
        self, x: np.ndarray, stats: Arrays, params: Arrays, grad_out: np.ndarray
    ) -> Backward:
        inv = 1.0 / np.sqrt(stats["var"] + self.eps)
        centred = x - stats["mean"]
        gx = grad_out * params["gamma"] * inv
        shape = np.broadcast_shapes(np.shape(x), np.shape(gx))
        return Backward(
            x=np.broadcast_to(gx, shape).copy(),
            stats={
                "mean": np.broadcast_to(-gx, shape).copy(),
                "var": np.broadcast_to(-0.5 * gx * centred * inv**2, shape).copy(),
            },
            params={
                "gamma": np.broadcast_to(grad_out * centred * inv, shape).copy(),
                "beta": np.broadcast_to(grad_out, shape).copy(),
            },
        )

    # diagonal-scale fast path
    def scale(self, Q: np.ndarray, params: Arrays) -> np.ndarray:
        return params["gamma"] / np.sqrt(np.diagonal(Q, axis1=-2, axis2=-1) + self.eps)

    def scale_jacobian(self, Q: np.ndarray, params: Arrays) -> np.ndarray:
        shape = np.shape(Q)
        K = shape[-1]
        out = np.zeros((*shape[:-2], K, K, K))
        idx = np.arange(K)
        diag = np.diagonal(Q, axis1=-2, axis2=-1) + self.eps
        out[..., idx, idx, idx] = -0.5 * params["gamma"] * diag**-1.5
        return out

    def scale_kernels(self) -> ScaleKernels | None:
        """Compiled ``scale``/``jacobian``/``parameter_jacobian`` (rows ``gamma``,
        ``beta``; ``beta`` a shift, so the compiled simulation also covers ``beta != 0``)."""
        return gain_kernels(("gamma", "beta"), ("beta",), self.eps, True)


@hookimpl
def symphase_register_normalizations(registry):
    registry.add_normalization(Plain)
    registry.add_normalization(BatchNorm)
