"""More built-in normalizations, registered exactly like a third-party plugin.

``weightnorm``
    Weight normalization ``w_i = g_i v_i / |v_i|`` with a trainable gain ``g``: the
    student weights are ``v = J`` and ``x~_i = g_i x_i / sqrt(Q_ii)`` exactly, at any
    batch size (its statistic is the weight norm, not a batch statistic).
``batchnorm_affine``
    Batch normalization with trainable ``gamma`` and ``beta``.
``meanonly``
    Mean-only batch normalization ``x~ = x - mean``: under population statistics the
    mean is 0, so its ODE is the plain one; minibatch statistics differ.
``layernorm``
    Normalization across the K hidden units of each sample, ``x~ = (x - mean_k x) /
    std_k x`` (no statistics; needs K >= 2).
``batchnorm_stopgrad``
    Batch normalization whose statistics are constants in the backward pass: under
    population statistics ``x~_i = x_i / sqrt(Q_ii)`` but no gradient flows through
    ``Q`` (``C = 0``), so the norms ``Q_ii`` drift.

Only the public API of :mod:`framework` is used. Two class attributes of the
normalization contract appear here (see docs/plugins.md): ``statistics_gradient =
False`` (the statistics' vector-Jacobian products are zero by design: gradients do
not flow through them) and ``supports_batch_statistics = False`` (no minibatch
statistics exist; use population statistics, which are exact).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import attrs
import numpy as np

from framework import Backward, Normalization, ScaleKernels, SpecificationError, hookimpl
from framework.validators import ge, gt, to_float
from plugins._scale_kernels import gain_kernels

Arrays = Mapping[str, np.ndarray]


def _diag(Q: np.ndarray) -> np.ndarray:
    return np.diagonal(Q, axis1=-2, axis2=-1).copy()


def _diag_vjp(Q: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Pull a gradient on ``diag(Q)`` back to ``Q`` (entries independent)."""
    out = np.zeros(np.broadcast_shapes(np.shape(Q), (*np.shape(grad), np.shape(grad)[-1])))
    idx = np.arange(np.shape(Q)[-1])
    out[..., idx, idx] = grad
    return out


def _diag_scale_jacobian(Q: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """``ds_i / dQ_jk`` for ``s_i = f(Q_ii)`` with ``coef = f'(Q_ii)``."""
    shape = np.shape(Q)
    K = shape[-1]
    out = np.zeros((*np.broadcast_shapes(shape[:-2], np.shape(coef)[:-1]), K, K, K))
    idx = np.arange(K)
    out[..., idx, idx, idx] = coef
    return out


def _diag_parameter_jacobian(coef: np.ndarray) -> np.ndarray:
    """``ds_i / dtheta_j = delta_ij coef_i`` as ``(..., K, K)``."""
    return coef[..., :, None] * np.eye(np.shape(coef)[-1])


def _full(shape: tuple[int, ...], value: np.ndarray) -> np.ndarray:
    return np.broadcast_to(value, shape).copy()


# ======================================================================================
# Weight normalization
# ======================================================================================
@attrs.frozen
class WeightNorm(Normalization):
    """Weight normalization ``w_i = g_i v_i / |v_i|`` with a trainable gain ``g``.

    With ``v = J`` the student weights, ``x~_i = g_i (v_i . xi) / |v_i| = g_i x_i /
    sqrt(Q_ii)``: the statistic ``sqnorm = Q_ii = |v_i|^2 / N`` is a property of the
    weights, exact at any batch size (there are no minibatch statistics). The gradient
    flows through ``sqnorm`` (the update of ``v_i`` is orthogonal to ``v_i``).

    Parameters
    ----------
    g : float
        Initial gain (> 0), the same for every unit; trained by SGD.
    """

    name: ClassVar[str] = "weightnorm"
    description: ClassVar[str] = "weight normalization w = g v / |v| with a trainable gain g"
    statistics_names: ClassVar[tuple[str, ...]] = ("sqnorm",)
    supports_diagonal_scale: ClassVar[bool] = True
    supports_batch_statistics: ClassVar[bool] = False
    weight_statistics: ClassVar[bool] = True  # |v_i|^2 / N, not a pre-activation moment
    scale_invariant: ClassVar[bool] = True
    scale_parameters: ClassVar[tuple[str, ...]] = ("g",)

    g: float = attrs.field(default=1.0, converter=to_float, validator=gt(0.0))

    def parameters(self, K: int) -> dict[str, np.ndarray]:
        return {"g": np.full(K, self.g)}

    @property
    def trainable(self) -> tuple[str, ...]:
        return ("g",)

    def population_statistics(self, Q: np.ndarray) -> dict[str, np.ndarray]:
        return {"sqnorm": _diag(Q)}

    def population_statistics_vjp(self, Q: np.ndarray, grad: Arrays) -> np.ndarray:
        return _diag_vjp(Q, grad["sqnorm"])

    def batch_statistics(self, x: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError(
            "normalization 'weightnorm' has no minibatch statistics: its statistic is the "
            "weight norm |v_i|^2 / N = Q_ii, exact at every batch size; use "
            "statistics='population'"
        )

    def batch_statistics_vjp(self, x: np.ndarray, grad: Arrays) -> np.ndarray:
        self.batch_statistics(x)
        return np.zeros_like(x)  # pragma: no cover - unreachable

    def forward(self, x: np.ndarray, stats: Arrays, params: Arrays) -> np.ndarray:
        return params["g"] * x / np.sqrt(stats["sqnorm"])

    def backward(
        self, x: np.ndarray, stats: Arrays, params: Arrays, grad_out: np.ndarray
    ) -> Backward:
        inv = 1.0 / np.sqrt(stats["sqnorm"])
        shape = np.broadcast_shapes(np.shape(x), np.shape(grad_out), np.shape(inv))
        gx = grad_out * params["g"] * inv
        return Backward(
            x=_full(shape, gx),
            stats={"sqnorm": _full(shape, -0.5 * gx * x * inv**2)},
            params={"g": _full(shape, grad_out * x * inv)},
        )

    def scale(self, Q: np.ndarray, params: Arrays) -> np.ndarray:
        return params["g"] / np.sqrt(_diag(Q))

    def scale_jacobian(self, Q: np.ndarray, params: Arrays) -> np.ndarray:
        return _diag_scale_jacobian(Q, -0.5 * params["g"] * _diag(Q) ** -1.5)

    def scale_parameter_jacobian(self, Q: np.ndarray, params: Arrays) -> dict[str, np.ndarray]:
        g = np.broadcast_to(params["g"], np.shape(Q)[:-1])
        return {"g": _diag_parameter_jacobian(np.ones_like(g) / np.sqrt(_diag(Q)))}

    def scale_kernels(self) -> ScaleKernels | None:
        return gain_kernels(("g",), (), 0.0, True)


# ======================================================================================
# Batch-norm family (population statistics mean = 0, var = Q_ii)
# ======================================================================================
class _BatchStatistics(Normalization):
    """Shared statistics of the batch-norm family: per-unit mean and variance."""

    statistics_names: ClassVar[tuple[str, ...]] = ("mean", "var")

    def population_statistics(self, Q: np.ndarray) -> dict[str, np.ndarray]:
        var = _diag(Q)
        return {"mean": np.zeros_like(var), "var": var}

    def population_statistics_vjp(self, Q: np.ndarray, grad: Arrays) -> np.ndarray:
        return _diag_vjp(Q, grad["var"])

    def population_statistics_with_mean(self, Q: np.ndarray, mean: np.ndarray
                                        ) -> dict[str, np.ndarray]:
        """Inputs with a mean: the pre-activation mean and ``var_i = Q_ii``."""
        var = _diag(Q)
        return {"mean": np.broadcast_to(np.asarray(mean, dtype=float), var.shape).copy(),
                "var": var}

    def population_statistics_with_mean_vjp(self, Q: np.ndarray, mean: np.ndarray,
                                            grad: Arrays) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray(self.population_statistics_vjp(Q, grad), dtype=float),
                np.asarray(grad["mean"], dtype=float).copy())

    def batch_statistics(self, x: np.ndarray) -> dict[str, np.ndarray]:
        mean = x.mean(axis=-2, keepdims=True)
        return {"mean": mean, "var": np.square(x - mean).mean(axis=-2, keepdims=True)}

    def batch_statistics_vjp(self, x: np.ndarray, grad: Arrays) -> np.ndarray:
        B = x.shape[-2]
        mean = x.mean(axis=-2, keepdims=True)
        return grad["mean"] / B + grad["var"] * 2.0 * (x - mean) / B

    # x~ = gamma (x - mean) / sqrt(var + eps) + beta
    def _eps(self) -> float:
        return float(getattr(self, "eps", 0.0))

    def forward(self, x: np.ndarray, stats: Arrays, params: Arrays) -> np.ndarray:
        inv = 1.0 / np.sqrt(stats["var"] + self._eps())
        return params["gamma"] * (x - stats["mean"]) * inv + params["beta"]

    def backward(
        self, x: np.ndarray, stats: Arrays, params: Arrays, grad_out: np.ndarray
    ) -> Backward:
        inv = 1.0 / np.sqrt(stats["var"] + self._eps())
        centred = x - stats["mean"]
        gx = grad_out * params["gamma"] * inv
        shape = np.broadcast_shapes(np.shape(x), np.shape(gx))
        return Backward(
            x=_full(shape, gx),
            stats={"mean": _full(shape, -gx), "var": _full(shape, -0.5 * gx * centred * inv**2)},
            params={"gamma": _full(shape, grad_out * centred * inv),
                    "beta": _full(shape, grad_out)},
        )

    def scale(self, Q: np.ndarray, params: Arrays) -> np.ndarray:
        return params["gamma"] / np.sqrt(_diag(Q) + self._eps())

    def scale_jacobian(self, Q: np.ndarray, params: Arrays) -> np.ndarray:
        return _diag_scale_jacobian(Q, -0.5 * params["gamma"] * (_diag(Q) + self._eps()) ** -1.5)


@attrs.frozen
class BatchNormAffine(_BatchStatistics):
    """Batch normalization ``gamma (x - mean) / sqrt(var + eps) + beta`` with trainable
    ``gamma`` and ``beta`` (population statistics: ``mean = 0``, ``var = Q_ii``).

    Parameters
    ----------
    gamma, beta : float
        Initial values of the trained gain (> 0) and shift.
    eps : float
        Added to the variance (>= 0); default 0.
    """

    name: ClassVar[str] = "batchnorm_affine"
    description: ClassVar[str] = "batch normalization with trainable gamma and beta"
    supports_diagonal_scale: ClassVar[bool] = True
    scale_parameters: ClassVar[tuple[str, ...]] = ("gamma",)
    shift_parameters: ClassVar[tuple[str, ...]] = ("beta",)

    gamma: float = attrs.field(default=1.0, converter=to_float, validator=gt(0.0))
    beta: float = attrs.field(default=0.0, converter=to_float, validator=ge(-np.inf))
    eps: float = attrs.field(default=0.0, converter=to_float, validator=ge(0.0))

    def is_diagonal_scale(self) -> bool:
        return self.beta == 0.0  # at the initial parameters; beta moves when trained

    def parameters(self, K: int) -> dict[str, np.ndarray]:
        return {"gamma": np.full(K, self.gamma), "beta": np.full(K, self.beta)}

    @property
    def trainable(self) -> tuple[str, ...]:
        return ("gamma", "beta")

    def scale_parameter_jacobian(self, Q: np.ndarray, params: Arrays) -> dict[str, np.ndarray]:
        gamma = np.broadcast_to(params["gamma"], np.shape(Q)[:-1])
        return {"gamma": _diag_parameter_jacobian(
            np.ones_like(gamma) / np.sqrt(_diag(Q) + self._eps()))}

    def scale_kernels(self) -> ScaleKernels | None:
        """Compiled scale functions, rows ``gamma`` (gain) and ``beta`` (a shift): the
        compiled simulation trains both, at any ``beta``."""
        return gain_kernels(("gamma", "beta"), ("beta",), self.eps, True)


@attrs.frozen
class BatchNormStopGrad(_BatchStatistics):
    """Batch normalization with the statistics treated as constants in the backward
    pass (``statistics_gradient = False``): the forward map is batch norm's, but no
    gradient flows through the mean and variance. Under population statistics
    ``x~_i = gamma x_i / sqrt(Q_ii + eps)`` with ``C = 0``: the update of ``J_i`` is no
    longer orthogonal to ``J_i`` and ``Q_ii`` drifts.

    Parameters
    ----------
    gamma : float
        Fixed gain (> 0).
    eps : float
        Added to the variance (>= 0).
    """

    name: ClassVar[str] = "batchnorm_stopgrad"
    description: ClassVar[str] = "batch normalization, no gradient through the statistics"
    supports_diagonal_scale: ClassVar[bool] = True
    statistics_gradient: ClassVar[bool] = False

    gamma: float = attrs.field(default=1.0, converter=to_float, validator=gt(0.0))
    eps: float = attrs.field(default=0.0, converter=to_float, validator=ge(0.0))

    def parameters(self, K: int) -> dict[str, np.ndarray]:
        return {"gamma": np.full(K, self.gamma), "beta": np.zeros(K)}

    # the statistics are constants for the gradient: their pull-backs vanish
    def population_statistics_vjp(self, Q: np.ndarray, grad: Arrays) -> np.ndarray:
        return np.zeros(np.broadcast_shapes(np.shape(Q), (*np.shape(grad["var"]),
                                                          np.shape(grad["var"])[-1])))

    def population_statistics_with_mean_vjp(self, Q: np.ndarray, mean: np.ndarray,
                                            grad: Arrays) -> tuple[np.ndarray, np.ndarray]:
        return (self.population_statistics_vjp(Q, grad),
                np.zeros(np.shape(np.asarray(grad["mean"]))))

    def batch_statistics_vjp(self, x: np.ndarray, grad: Arrays) -> np.ndarray:
        return np.zeros(np.shape(x))

    def scale_jacobian(self, Q: np.ndarray, params: Arrays) -> np.ndarray:
        """Zero: the gradient does not flow through the statistics (``C = 0``)."""
        shape = np.shape(Q)
        return np.zeros((*shape, shape[-1]))

    def scale_kernels(self) -> ScaleKernels | None:
        return gain_kernels(("gamma", "beta"), ("beta",), self.eps, False)


# ======================================================================================
# Mean-only batch normalization
# ======================================================================================
@attrs.frozen
class MeanOnly(Normalization):
    """Mean-only batch normalization ``x~ = x - mean`` (Salimans & Kingma 2016).

    Under population statistics of centred inputs the mean is 0, so ``x~ = x`` and the
    ODE is the plain network's; with an input mean the pre-activation mean ``m r_i`` is
    subtracted (:mod:`framework.inputs`); with minibatch statistics
    (``simulation(statistics="batch")``) the batch mean is subtracted and the gradient
    flows through it.
    """

    name: ClassVar[str] = "meanonly"
    description: ClassVar[str] = "mean-only batch normalization x~ = x - mean (ODE = plain)"
    statistics_names: ClassVar[tuple[str, ...]] = ("mean",)
    supports_diagonal_scale: ClassVar[bool] = True

    def population_statistics(self, Q: np.ndarray) -> dict[str, np.ndarray]:
        return {"mean": np.zeros(np.shape(Q)[:-1])}

    def population_statistics_with_mean(self, Q: np.ndarray, mean: np.ndarray
                                        ) -> dict[str, np.ndarray]:
        """Inputs with a mean: the pre-activation mean, which is then subtracted."""
        return {"mean": np.broadcast_to(np.asarray(mean, dtype=float),
                                        np.shape(Q)[:-1]).copy()}

    def population_statistics_with_mean_vjp(self, Q: np.ndarray, mean: np.ndarray,
                                            grad: Arrays) -> tuple[np.ndarray, np.ndarray]:
        return (np.zeros(np.broadcast_shapes(np.shape(Q), (*np.shape(grad["mean"]),
                                                           np.shape(grad["mean"])[-1]))),
                np.asarray(grad["mean"], dtype=float).copy())

    def population_statistics_vjp(self, Q: np.ndarray, grad: Arrays) -> np.ndarray:
        return np.zeros(np.broadcast_shapes(np.shape(Q), (*np.shape(grad["mean"]),
                                                          np.shape(grad["mean"])[-1])))

    def batch_statistics(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"mean": x.mean(axis=-2, keepdims=True)}

    def batch_statistics_vjp(self, x: np.ndarray, grad: Arrays) -> np.ndarray:
        return np.broadcast_to(grad["mean"] / x.shape[-2], np.shape(x)).copy()

    def forward(self, x: np.ndarray, stats: Arrays, params: Arrays) -> np.ndarray:
        return x - stats["mean"]

    def backward(
        self, x: np.ndarray, stats: Arrays, params: Arrays, grad_out: np.ndarray
    ) -> Backward:
        shape = np.broadcast_shapes(np.shape(x), np.shape(grad_out))
        return Backward(x=_full(shape, grad_out), stats={"mean": _full(shape, -grad_out)})

    def scale(self, Q: np.ndarray, params: Arrays) -> np.ndarray:
        return np.ones(np.shape(Q)[:-1])

    def scale_jacobian(self, Q: np.ndarray, params: Arrays) -> np.ndarray:
        shape = np.shape(Q)
        return np.zeros((*shape, shape[-1]))

    def scale_kernels(self) -> ScaleKernels | None:
        """``s = 1`` (population mean 0); the minibatch mode runs the numpy path."""
        return gain_kernels((), (), 0.0, True)


# ======================================================================================
# Layer normalization
# ======================================================================================
def _check_layernorm_K(K: int) -> None:
    if K < 2:
        raise SpecificationError(
            f"'K' must be >= 2 for normalization 'layernorm' (it normalizes across the K "
            f"hidden units of each sample), got {K}"
        )


@attrs.frozen
class LayerNorm(Normalization):
    """Layer normalization across the K hidden units of each sample,
    ``x~ = (x - mean_k x) / sqrt(var_k x + eps)`` (no statistics, no parameters).

    Not of the diagonal-scale family: the generic engine computes its ODE. Invariant
    under a common rescaling of all student vectors, not under per-unit ones. With
    ``K = 2`` the output is ``+-1`` and the gradient vanishes (eps = 0). Needs
    ``K >= 2``.

    The gradient scales as ``1 / std_k(x)``, whose density near 0 goes as
    ``std^(K-2)``: with ``eps = 0`` the ``eta^2`` term ``E[a a^T]`` of the ODE is
    *infinite* for ``K <= 3`` (there is no ``N -> infinity`` limit at finite ``eta``;
    the generic engine reports it as an accuracy failure) and its integrand has
    infinite variance for ``K <= 5``. Use ``eps > 0``, ``second_order=False`` or a
    larger ``K``.

    Parameters
    ----------
    eps : float
        Added to the variance across units (>= 0); default 0.
    """

    name: ClassVar[str] = "layernorm"
    description: ClassVar[str] = "layer normalization across the K hidden units (K >= 2)"

    eps: float = attrs.field(default=0.0, converter=to_float, validator=ge(0.0))

    def parameters(self, K: int) -> dict[str, np.ndarray]:
        _check_layernorm_K(K)
        return {}

    def forward(self, x: np.ndarray, stats: Arrays, params: Arrays) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        _check_layernorm_K(x.shape[-1])
        c = x - x.mean(axis=-1, keepdims=True)
        return c / np.sqrt(np.square(c).mean(axis=-1, keepdims=True) + self.eps)

    def backward(
        self, x: np.ndarray, stats: Arrays, params: Arrays, grad_out: np.ndarray
    ) -> Backward:
        x = np.asarray(x, dtype=float)
        _check_layernorm_K(x.shape[-1])
        c = x - x.mean(axis=-1, keepdims=True)
        inv = 1.0 / np.sqrt(np.square(c).mean(axis=-1, keepdims=True) + self.eps)
        xt = c * inv
        g = np.broadcast_to(grad_out, np.broadcast_shapes(x.shape, np.shape(grad_out)))
        gx = inv * (g - g.mean(axis=-1, keepdims=True)
                    - xt * (g * xt).mean(axis=-1, keepdims=True))
        return Backward(x=gx)


@hookimpl
def symphase_register_normalizations(registry):
    registry.add_normalization(WeightNorm)
    registry.add_normalization(BatchNormAffine)
    registry.add_normalization(MeanOnly)
    registry.add_normalization(LayerNorm)
    registry.add_normalization(BatchNormStopGrad)
