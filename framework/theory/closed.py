"""The exact (erf) theory with trainable normalization parameters as extra state.

A diagonal-scale normalization ``x~_i = s_i(Q, theta) x_i`` whose scale depends on
trainable parameters ``theta`` (``normalization.scale_parameters``, e.g. weight
normalization's gain ``g``, batch norm's ``gamma``) keeps the closed forms of
:mod:`framework.theory._kernels` at every fixed ``theta``; SGD moves ``theta`` with step
``eta / N`` per sample, so (``alpha = steps / N``, no ``eta^2`` term: the parameter
noise is ``O(1/N)`` per unit time)::

    dtheta_j / dalpha = -eta E[d eps / d theta_j]
                      = eta sum_i E[delta~_i x_i] ds_i / dtheta_j

with ``delta~_i = (zeta - sigma) g'(x~_i)``; ``E[delta~_i x_i] = sum_c w_c
I3[i, c, x_i]`` on the joint covariance of ``(x~, y, x)`` (finite as ``s_i -> 0``).

A trainable *shift* ``x~_i = s_i x_i + b_i`` (``normalization.shift_parameters``,
batch norm's ``beta``) is held at ``b = 0``: the activation is odd and the inputs
are symmetric, so ``eps_g`` is even in ``b`` at fixed ``(W, theta)`` -- the drift
of ``b`` vanishes at ``b = 0`` and its second derivatives decouple from ``(W,
theta)``. Their block (:meth:`ClosedFormEngine.held_hessian`) is exact::

    d^2 eps_g / db_i db_k = E[g'(x~_i) g'(x~_k)] + delta_ik E[delta~_i x~_i]

(using ``g'' (u) = -u g'(u)`` for ``g = erf(u / sqrt 2)``). A state with ``b != 0``
has no closed form (:class:`ClosedFormEngine` refuses it; the generic engine takes
it).

:class:`ClosedFormEngine` has the interface of
:class:`framework.theory.quadrature.ExpectationEngine` (``rates``, ``generalization_error``,
``weight_moments``, ``integrate``) with zero error estimates, so every analyzer
written for the generic engine runs on it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from framework._validation import SpecificationError
from framework.activation import Activation
from framework.model import TeacherStudent
from framework.normalization import Normalization
from framework.theory import _kernels as _theory
from framework.theory._erf import J2
from framework.theory.quadrature import ExpectationEngine, GenericRates

__all__ = ["ClosedFormEngine", "supports_closed_form_parameters"]


def supports_closed_form_parameters(normalization: Normalization) -> bool:
    """True if every trainable parameter is a scale or a shift parameter of a
    diagonal-scale normalization (at its initial values) that passes gradients through
    its statistics."""
    trainable = tuple(normalization.trainable)
    allowed = set(normalization.scale_parameters) | set(normalization.shift_parameters)
    return bool(
        trainable
        and normalization.is_diagonal_scale()
        and normalization.statistics_gradient
        and set(trainable) <= allowed
    )


class ClosedFormEngine(ExpectationEngine):
    """Exact rates, ``eps_g`` and weight gradients with trainable parameters as state.

    ``trainable`` lists the scale parameters (state of the ODE); ``held`` the shift
    parameters, fixed at 0 (module docstring). Error estimates are zero; there is no
    quadrature (``quadrature`` is None).
    """

    name = "closed_form"
    exact = True

    def __init__(
        self, model: TeacherStudent, normalization: Normalization, activation: Activation
    ) -> None:
        if activation.closed_form != "erf" or not supports_closed_form_parameters(normalization):
            raise SpecificationError(
                f"no closed form with trainable parameters for normalization "
                f"{normalization.name!r} and activation {activation.name!r}"
            )
        self.model = model
        self.normalization = normalization
        self.activation = activation
        self.quadrature = None  # type: ignore[assignment]  # exact: no quadrature
        self.K, self.M = model.K, model.M
        self.T = np.asarray(model.T, dtype=float)
        self.noise = float(model.noise)
        names = tuple(normalization.trainable)
        self.trainable = tuple(k for k in names if k in normalization.scale_parameters)
        self.held = tuple(k for k in names if k in normalization.shift_parameters)
        self.initial_params = {
            k: np.asarray(v, dtype=float) for k, v in normalization.parameters(self.K).items()
        }

    # -- the scale at the current parameters --------------------------------------------
    def _checked(self, params: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
        p = self.params(params)
        for k in self.held:
            if np.any(p[k] != 0.0):
                raise SpecificationError(
                    f"parameter {k!r} of normalization {self.normalization.name!r} must be 0 "
                    f"for the closed form (a shift; 0 is invariant for the odd activation), "
                    f"got {p[k].tolist()}; use engine='generic'"
                )
        return p

    def _scale(self, Q: np.ndarray, p: Mapping[str, np.ndarray]):
        norm = self.normalization
        s = np.asarray(norm.scale(Q, p), dtype=float)
        ds = np.asarray(norm.scale_jacobian(Q, p), dtype=float)
        dth = {k: np.asarray(v, dtype=float)
               for k, v in norm.scale_parameter_jacobian(Q, p).items()}
        return s, ds, dth

    # -- the interface of ExpectationEngine ---------------------------------------------
    def generalization_error(
        self, Q: Any, R: Any, params: Mapping[str, Any] | None = None, *, check: bool = True
    ) -> tuple[float, float]:
        """``(eps_g, 0.0)`` at ``(Q, R)`` and the parameters (noise term included)."""
        Q, R = np.asarray(Q, dtype=float), np.asarray(R, dtype=float)
        p = self._checked(params)
        s = np.asarray(self.normalization.scale(Q, p), dtype=float)
        return _theory.scale_moments(Q, R, self.T, s, self.noise)[0], 0.0

    def rates(
        self,
        Q: Any,
        R: Any,
        params: Mapping[str, Any] | None = None,
        *,
        eta: float,
        batch_size: int = 1,
        second_order: bool = True,
        check: bool = True,
    ) -> GenericRates:
        """``dQ/dalpha``, ``dR/dalpha``, ``dtheta/dalpha`` (scale parameters) and
        ``eps_g``, exact (errors 0)."""
        K, M = self.K, self.M
        Q, R = np.asarray(Q, dtype=float), np.asarray(R, dtype=float)
        Q = 0.5 * (Q + Q.T)
        p = self._checked(params)
        s, ds, dth = self._scale(Q, p)
        dQ, dR = _theory.ode_rhs(Q, R, self.T, s, ds, eta, batch_size=batch_size,
                                 noise_var=self.noise, second_order=second_order)
        eps, edx = _theory.scale_moments(Q, R, self.T, s, self.noise)  # E[delta~_i x_i]
        dp = {k: eta * edx @ dth[k] for k in self.trainable}
        zero = {k: np.zeros(K) for k in self.trainable}
        return GenericRates(dQ, dR, dp, float(eps), np.zeros((K, K)), np.zeros((K, M)),
                            zero, 0.0)

    def weight_moments(
        self,
        X: Any,
        Bt: Any,
        params: Mapping[str, Any] | None = None,
        *,
        landscape: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``eps_g``, ``dF/dX`` and ``dF/dtheta`` (scale parameters) in weight space, exact.

        Same shapes as :meth:`ExpectationEngine.weight_moments` with one "replicate":
        ``(eps (1,), dF/dX (1, K, D), {name: (1, K)})``.
        """
        X = np.asarray(X, dtype=float)
        Bt = np.asarray(Bt, dtype=float)
        p = self._checked(params)
        Q = X @ X.T
        R = X @ Bt.T
        s, ds, dth = self._scale(Q, p)
        eps, G, H, dE_ds = _theory.eps_g_gradient(Q, R, self.T, s, ds, self.noise)
        gX = (G + G.T) @ X + H @ Bt
        gT = {k: (dE_ds @ dth[k])[None] for k in self.trainable}
        return np.array([eps]), gX[None], gT

    def held_hessian(
        self, Q: Any, R: Any, params: Mapping[str, Any] | None = None
    ) -> np.ndarray:
        """Hessian of ``eps_g`` over the held shift parameters at 0, ``(K h, K h)`` for
        ``h = len(held)`` (parameter-major), decoupled from ``(W, theta)``."""
        h = len(self.held)
        if not h:
            return np.zeros((0, 0))
        Q, R = np.asarray(Q, dtype=float), np.asarray(R, dtype=float)
        p = self._checked(params)
        s = np.asarray(self.normalization.scale(Q, p), dtype=float)
        _, edx = _theory.scale_moments(Q, R, self.T, s, self.noise)  # E[delta~_i x_i]
        St = _theory.effective_covariance(Q, R, self.T, s)
        block = J2(St, np.arange(self.K)) + np.diag(s * edx)  # x~_i = s_i x_i
        return np.kron(np.eye(h), block)

    def _state_status(self, y: np.ndarray, max_value: float) -> int:
        """Like the generic engine's, but ``Q`` need only be positive *semi*-definite
        (smallest eigenvalue above ``-1e-9 max(1, max |Q|)``): the closed forms are
        analytic there, and states of identical students (rank-deficient ``Q``, an
        invariant set of the ODE, e.g. the trained-gain plateau) are legitimate."""
        if not np.all(np.isfinite(y)):
            return 1
        if np.max(np.abs(y)) > max_value:
            return 2
        K = self.K
        Q = y[: K * K].reshape(K, K)
        lam = np.linalg.eigvalsh(0.5 * (Q + Q.T))
        if lam[0] < -1e-9 * max(1.0, float(np.max(np.abs(Q)))):
            return 3
        return 0

    def integrate(self, Q0: Any, R0: Any, **kwargs: Any):
        """As :meth:`ExpectationEngine.integrate` (exact right-hand side); a nonzero
        shift is refused before anything runs."""
        self._checked(kwargs.get("params"))
        return super().integrate(Q0, R0, **kwargs)

    def describe(self) -> str:
        """One line for attrs."""
        extra = f"; {', '.join(self.held)} held at 0 (odd activation)" if self.held else ""
        return ("closed-form erf integrals with trainable parameters "
                f"{', '.join(self.trainable)} as state{extra}")
