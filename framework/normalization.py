"""The interface every normalization plugin implements.

A normalization stands between the student pre-activations ``x`` (K units) and the
activation: ``x~ = n(x; stats, params)``. ``stats`` are statistics of the
pre-activations (a mapping of name -> array): in the limit of large batches the
*population* statistics, functions of the pre-activation covariance ``Q`` (centred
inputs: batch norm's mean is 0 and its variance is ``Q_ii``) and, for inputs with a mean,
of the pre-activation mean (:meth:`Normalization.population_statistics_with_mean`); in a
finite minibatch the *batch* statistics. ``params`` are the normalization's own parameters
(for batch norm ``gamma`` and ``beta``), some of which may be trainable.

What a subclass must implement
------------------------------
``name`` and ``description`` (class attributes), :meth:`forward` and
:meth:`backward`. If it uses statistics it also lists them in
``statistics_names`` and implements :meth:`population_statistics`,
:meth:`population_statistics_vjp`, :meth:`batch_statistics` and
:meth:`batch_statistics_vjp`.

What is optional
----------------
The *diagonal-scale fast path*: a normalization of the form ``x~_i = s_i(Q) x_i``
under population statistics sets ``supports_diagonal_scale = True`` (or overrides
:meth:`is_diagonal_scale` when it depends on the parameters) and implements
:meth:`scale` and :meth:`scale_jacobian`; with the erf activation every
expectation of the theory is then a closed form. ``scale_invariant = True``
declares that ``n`` is invariant under rescaling each student vector ``J_i``;
``statistics_gradient = False`` that no gradient flows through the statistics (a
stop-gradient normalization); ``supports_batch_statistics = False`` that it has no
minibatch mode.

Trainable parameters on the fast path: a diagonal-scale normalization whose scale
depends on trainable parameters, ``s_i(Q, theta)``, lists them in
``scale_parameters`` and implements :meth:`scale_parameter_jacobian`; a trainable
*shift*, ``x~_i = s_i x_i + theta_i``, is listed in ``shift_parameters`` (the fast
path then applies at ``theta = 0`` only, where it stays for an odd activation).
When every trainable parameter is one of the two, the closed form treats the
parameters as extra state (:func:`framework.theory.expectation_engine`).

Shapes
------
``x`` has shape ``(..., K)`` (leading axes are samples, batches, replicas).
Statistics arrays broadcast against ``x``. :meth:`backward` returns per-sample
gradients, each broadcast to the shape of ``x``; the caller sums them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import numpy as np

from framework._named import Named

__all__ = ["Backward", "Normalization", "ScaleKernels"]

Stats = Mapping[str, np.ndarray]
Params = Mapping[str, np.ndarray]


@attrs.frozen
class Backward:
    """Per-sample gradients returned by :meth:`Normalization.backward`.

    Attributes
    ----------
    x : ndarray
        ``d loss / d x`` (shape of ``x``).
    stats : dict
        ``d loss / d stats[name]`` per sample, each with the shape of ``x``.
    params : dict
        ``d loss / d params[name]`` per sample, each with the shape of ``x``.
    """

    x: np.ndarray
    stats: dict[str, np.ndarray] = attrs.field(factory=dict)
    params: dict[str, np.ndarray] = attrs.field(factory=dict)


def _names(value: Any) -> tuple[str, ...]:
    """A tuple of parameter names."""
    return tuple(value)


@attrs.frozen
class ScaleKernels:
    """Compiled (numba ``njit``) scale functions of a diagonal-scale normalization.

    Returned by :meth:`Normalization.scale_kernels`; the compiled ODE integrator and
    the compiled simulation kernel call them instead of Python code. ``p`` is a
    C-contiguous ``float64`` array of shape ``(len(names), K)``: the parameter values,
    one row per name in :attr:`names` (the order of ``normalization.parameters(K)``).

    Attributes
    ----------
    names : tuple of str
        Parameter names, the rows of ``p``.
    scale : numba dispatcher, ``(Q float64[:, ::1], p float64[:, ::1]) -> float64[::1]``
        ``s(Q, p)``, shape ``(K,)``.
    jacobian : numba dispatcher, ``(Q, p) -> float64[:, :, ::1]``
        ``ds_i / dQ_jk``, shape ``(K, K, K)`` (``Q`` entries independent).
    parameter_jacobian : numba dispatcher, ``(Q, p) -> float64[:, :, ::1]``
        ``ds_i / dp[a, j]``, shape ``(len(names), K, K)`` (row ``i``: unit ``i``'s
        scale; column ``j``: unit ``j``'s parameter); zero for a shift row.
    shift : tuple of str
        Names (a subset of :attr:`names`) of parameters that enter as a shift: under
        population statistics ``x~_i = s_i(Q, p) x_i + sum_{a in shift} p[a, i]`` at
        every parameter value (default: none, ``x~_i = s_i x_i``). The compiled
        simulation kernel applies and trains them (``d loss / d p[a, i] = d loss / d
        x~_i``); where the theory's diagonal-scale form is needed they must be 0
        (:meth:`Normalization.is_diagonal_scale`).

    The functions are passed to compiled code as first-class numba function types of
    the signatures above, so ``Q`` and ``p`` arrive C-contiguous and the results must
    be C-contiguous ``float64`` arrays (``np.empty``/``np.zeros`` of the shape).
    """

    names: tuple[str, ...]
    scale: object
    jacobian: object
    parameter_jacobian: object
    shift: tuple[str, ...] = attrs.field(default=(), converter=_names)

    def __attrs_post_init__(self) -> None:
        extra = [k for k in self.shift if k not in self.names]
        if extra:
            raise ValueError(
                f"'shift' must be a subset of 'names' {self.names!r}, got {self.shift!r} "
                f"({extra!r} not in names)"
            )

    def pack(self, params: Params, K: int) -> np.ndarray:
        """``p`` from a mapping of parameter values (each broadcast to ``(K,)``)."""
        if not self.names:
            return np.zeros((0, K))
        return np.ascontiguousarray(
            [np.broadcast_to(np.asarray(params[k], dtype=float), (K,)) for k in self.names],
            dtype=np.float64,
        )


class Normalization(Named):
    """Base class of normalizations (see the module docstring for the contract).

    Subclasses are frozen attrs classes whose fields are the hyper-parameters
    (e.g. a fixed ``gamma``); :meth:`to_dict` / :meth:`from_dict` round-trip them.
    """

    #: Registry name, e.g. ``"batchnorm"``.
    name: ClassVar[str] = ""
    kind: ClassVar[str] = "normalization"
    #: One-line description shown by ``symphase plugins``.
    description: ClassVar[str] = ""
    #: Names of the statistics this normalization consumes (empty: none).
    statistics_names: ClassVar[tuple[str, ...]] = ()
    #: True if ``x~_i = s_i(Q) x_i`` under population statistics (fast path).
    supports_diagonal_scale: ClassVar[bool] = False
    #: True if the output is invariant under ``J_i -> c_i J_i`` (c_i > 0).
    scale_invariant: ClassVar[bool] = False
    #: False if no gradient flows through the statistics by design (stop-gradient):
    #: the statistics VJPs and ``scale_jacobian`` then return zeros, and the SGD drift
    #: is not the gradient of ``eps_g`` (no Hessian analysis applies).
    statistics_gradient: ClassVar[bool] = True
    #: False if the normalization cannot use minibatch statistics
    #: (``batch_statistics`` raises with the reason).
    supports_batch_statistics: ClassVar[bool] = True
    #: Trainable parameters the diagonal scale ``s(Q, theta)`` depends on (fast path
    #: with trainable parameters; needs :meth:`scale_parameter_jacobian`).
    scale_parameters: ClassVar[tuple[str, ...]] = ()
    #: Trainable parameters that enter as a shift ``x~_i = s_i x_i + theta_i`` (the fast
    #: path holds them at 0, where :meth:`is_diagonal_scale` must be True).
    shift_parameters: ClassVar[tuple[str, ...]] = ()

    # -- parameters -------------------------------------------------------------
    def parameters(self, K: int) -> dict[str, np.ndarray]:
        """Initial values of the normalization parameters, each of shape ``(K,)``."""
        return {}

    @property
    def trainable(self) -> tuple[str, ...]:
        """Names of the parameters that SGD updates (default: none)."""
        return ()

    # -- statistics -------------------------------------------------------------
    def population_statistics(self, Q: np.ndarray) -> dict[str, np.ndarray]:
        """Population statistics from ``Q`` of shape ``(..., K, K)``; arrays ``(..., K)``."""
        self._no_statistics("population_statistics")
        return {}

    def population_statistics_vjp(self, Q: np.ndarray, grad: Stats) -> np.ndarray:
        """Pull ``grad`` (d loss / d stats, arrays ``(..., K)``) back to ``d loss / d Q``.

        ``Q``'s entries are treated as independent (no symmetrisation).
        """
        self._no_statistics("population_statistics_vjp")
        return np.zeros_like(Q)

    #: True if the statistics are of the *weights* (e.g. weight norm's ``|J_i|^2 / N``),
    #: not of the pre-activations: with structured inputs the two differ (the
    #: pre-activation covariance is ``J Sigma J^T / N``), so an engine passes the
    #: weights' Gram matrix as ``Q`` (:attr:`framework.theory.Engine.
    #: supports_weight_statistics`); they do not depend on an input mean, so
    #: :meth:`population_statistics_with_mean` is :meth:`population_statistics` of that
    #: Gram and its pull-back onto the mean is zero.
    weight_statistics: ClassVar[bool] = False

    def population_statistics_with_mean(self, Q: np.ndarray, mean: np.ndarray
                                        ) -> dict[str, np.ndarray]:
        """Population statistics of pre-activations with covariance ``Q (..., K, K)`` and
        mean ``mean (..., K)`` (inputs with a mean, :mod:`framework.inputs`); arrays
        ``(..., K)``.

        Optional: the default is :meth:`population_statistics` where the mean is zero
        or the statistics are of the weights (:attr:`weight_statistics`: ``Q`` is then the
        weights' Gram and the mean does not enter), and refuses a non-zero mean for
        other statistics (it cannot know how they depend on it). A normalization that
        overrides it also overrides :meth:`population_statistics_with_mean_vjp`.
        """
        if not self.statistics_names:
            return {}
        if np.any(np.asarray(mean) != 0.0) and not self.weight_statistics:
            self._no_mean("population_statistics_with_mean")
        return self.population_statistics(Q)

    def population_statistics_with_mean_vjp(self, Q: np.ndarray, mean: np.ndarray,
                                            grad: Stats) -> tuple[np.ndarray, np.ndarray]:
        """Pull ``grad`` back to ``(d loss / d Q, d loss / d mean)`` (shapes of ``Q`` and
        ``mean``; ``Q``'s entries independent)."""
        mean = np.asarray(mean, dtype=float)
        if not self.statistics_names:
            return np.zeros(np.shape(Q)), np.zeros(np.shape(mean))
        if np.any(mean != 0.0) and not self.weight_statistics:
            self._no_mean("population_statistics_with_mean_vjp")
        return (np.asarray(self.population_statistics_vjp(Q, grad), dtype=float),
                np.zeros(np.broadcast_shapes(np.shape(mean), np.shape(Q)[:-1])))

    @classmethod
    def supports_input_mean(cls) -> str | None:
        """None if the population statistics are defined for non-centred inputs, else
        the reason (a normalization with statistics must override
        :meth:`population_statistics_with_mean`)."""
        if not cls.statistics_names or cls.weight_statistics:
            return None  # statistics of the weights do not see the pre-activation mean
        if cls.population_statistics_with_mean is Normalization.population_statistics_with_mean:
            return (f"normalization {cls.name!r} declares statistics {cls.statistics_names} "
                    f"but does not say how they depend on a non-zero pre-activation mean "
                    f"(it does not implement population_statistics_with_mean)")
        return None

    def _no_mean(self, method: str) -> None:
        raise NotImplementedError(
            f"normalization {self.name!r} declares statistics {self.statistics_names} but "
            f"does not implement {method}() for a non-zero pre-activation mean (inputs "
            f"with a mean)")

    def batch_statistics(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Statistics of a minibatch ``x`` of shape ``(..., B, K)``; arrays ``(..., 1, K)``."""
        self._no_statistics("batch_statistics")
        return {}

    def batch_statistics_vjp(self, x: np.ndarray, grad: Stats) -> np.ndarray:
        """Pull ``grad`` (arrays ``(..., 1, K)``) back to ``d loss / d x``, shape of ``x``."""
        self._no_statistics("batch_statistics_vjp")
        return np.zeros_like(x)

    def _no_statistics(self, method: str) -> None:
        if self.statistics_names:
            raise NotImplementedError(
                f"normalization {self.name!r} declares statistics {self.statistics_names} "
                f"but does not implement {method}()"
            )

    # -- the map ----------------------------------------------------------------
    def forward(self, x: np.ndarray, stats: Stats, params: Params) -> np.ndarray:
        """Return ``x~ = n(x; stats, params)`` with the shape of ``x``."""
        raise NotImplementedError(f"normalization {self.name!r} must implement forward()")

    def backward(
        self, x: np.ndarray, stats: Stats, params: Params, grad_out: np.ndarray
    ) -> Backward:
        """Vector-Jacobian product of :meth:`forward` per sample.

        ``grad_out`` is ``d loss / d x~`` (shape of ``x``). Returns the gradients with
        respect to ``x``, to every statistic and to every parameter.
        """
        raise NotImplementedError(f"normalization {self.name!r} must implement backward()")

    # -- optional diagonal-scale fast path ----------------------------------------
    def is_diagonal_scale(self) -> bool:
        """Whether this instance is of the form ``x~_i = s_i(Q) x_i`` (default: class flag)."""
        return type(self).supports_diagonal_scale

    def scale(self, Q: np.ndarray, params: Params) -> np.ndarray:
        """``s(Q)`` of shape ``(..., K)`` for ``Q`` of shape ``(..., K, K)``."""
        raise NotImplementedError(
            f"normalization {self.name!r} does not provide the diagonal-scale fast path"
        )

    def scale_jacobian(self, Q: np.ndarray, params: Params) -> np.ndarray:
        """``ds_i / dQ_jk`` of shape ``(..., K, K, K)`` (Q entries independent)."""
        raise NotImplementedError(
            f"normalization {self.name!r} does not provide the diagonal-scale fast path"
        )

    def scale_kernels(self) -> ScaleKernels | None:
        """Compiled scale functions (:class:`ScaleKernels`), or None (default).

        Optional. A diagonal-scale normalization that returns them runs on the compiled
        ODE integrator and the compiled simulation kernel; they must agree with
        :meth:`scale`, :meth:`scale_jacobian` and :meth:`scale_parameter_jacobian`
        (``framework.testing.NormalizationContract`` checks it). Return the same object
        on every call (build it once), so that compiled code is reused.
        """
        return None

    def scale_parameter_jacobian(self, Q: np.ndarray, params: Params) -> dict[str, np.ndarray]:
        """``ds_i / dtheta_j`` for each name in ``scale_parameters``: arrays ``(..., K, K)``
        (row ``i``: scale of unit ``i``; column ``j``: parameter of unit ``j``)."""
        if self.scale_parameters:
            raise NotImplementedError(
                f"normalization {self.name!r} declares scale_parameters "
                f"{self.scale_parameters} but does not implement scale_parameter_jacobian()"
            )
        return {}
