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

:class:`ClosedFormEngine` implements :class:`framework.theory.base.Engine` with zero
error estimates. Without trainable parameters (``plain``, ``batchnorm`` with a fixed
``gamma``, ...) it integrates on the compiled DOP853 where it can (the plain network;
normalizations that provide :meth:`~framework.Normalization.scale_kernels`), else on
scipy's solver with the same tolerances.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from framework.activation import Activation
from framework.model import Model
from framework.normalization import Normalization
from framework.theory import _kernels as _theory
from framework.theory._erf import J2
from framework.theory._tail import TAIL_MAX_K, TAIL_THRESHOLD, refine_tail
from framework.theory.base import Drift, Engine, Rates, Trajectory, check_horizon
from framework.validators import SpecificationError

if TYPE_CHECKING:
    from framework.learning_rule import LearningRule

__all__ = ["ClosedFormEngine"]


class ClosedFormEngine(Engine):
    """Exact rates, ``eps_g`` and weight gradients for the erf activation with a
    diagonal-scale normalization; trainable scale parameters as state.

    ``trainable`` lists the scale parameters (state of the ODE); ``held`` the shift
    parameters, fixed at 0 (module docstring). Error estimates are zero.
    """

    name = "closed_form"
    exact = True
    #: The closed forms are analytic on the cone's boundary: states of identical
    #: students (rank-deficient ``Q``, an invariant set of the ODE, e.g. the trained-gain
    #: plateau) are legitimate.
    semidefinite = True

    def __init__(
        self,
        model: Model,
        normalization: Normalization,
        activation: Activation,
        quadrature: Any = None,
    ) -> None:
        why = self.supports(model, normalization, activation)
        if why is not None:
            raise SpecificationError(
                f"no closed form for normalization {normalization.name!r} with activation "
                f"{activation.name!r}: {why}"
            )
        super().__init__(model, normalization, activation, quadrature)
        names = tuple(normalization.trainable)
        self.trainable = (*(k for k in names if k in normalization.scale_parameters),
                          *self.model_trainable)
        self.held = tuple(k for k in names if k in normalization.shift_parameters)
        #: the normalization's trainable scale parameters (``trainable`` without ``"v"``)
        self.scale_trainable = tuple(k for k in self.trainable if k not in self.model_trainable)

    @classmethod
    def supports(
        cls,
        model: Model,
        normalization: Normalization,
        activation: Activation,
        params: Mapping[str, Any] | None = None,
        rule: LearningRule | None = None,
    ) -> str | None:
        """The erf activation and a diagonal-scale normalization whose trainable
        parameters (if any) are ``scale_parameters`` or ``shift_parameters`` at 0, with
        gradients through its statistics; a learning rule that accepts this engine
        (:meth:`~framework.theory.Engine.supports_rule`)."""
        if activation.closed_form != "erf":
            return f"activation {activation.name!r} has no closed form (needs 'erf')"
        if not normalization.is_diagonal_scale():
            return f"normalization {normalization.name!r} is not of the diagonal-scale family"
        trainable = tuple(normalization.trainable)
        allowed = set(normalization.scale_parameters) | set(normalization.shift_parameters)
        if not set(trainable) <= allowed:
            return (f"normalization {normalization.name!r} has trainable parameters that are "
                    "neither scale_parameters nor shift_parameters")
        if trainable and not normalization.statistics_gradient:
            return (f"normalization {normalization.name!r} trains parameters but passes no "
                    "gradient through its statistics")
        for k, v in (params or {}).items():
            if k in normalization.shift_parameters and np.any(np.asarray(v, dtype=float) != 0):
                return f"its shift parameter {k!r} is nonzero"
        return cls.supports_rule(rule, model, normalization, activation)

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
        p = self.norm_params(p)
        s = np.asarray(norm.scale(Q, p), dtype=float)
        ds = np.asarray(norm.scale_jacobian(Q, p), dtype=float)
        dth = {k: np.asarray(v, dtype=float)
               for k, v in norm.scale_parameter_jacobian(Q, p).items()}
        return s, ds, dth

    def _landscape_jacobian(self, Q: np.ndarray, p: Mapping[str, np.ndarray]) -> np.ndarray:
        """``ds/dQ`` by central differences of :meth:`Normalization.scale` (for a
        normalization whose ``scale_jacobian`` is zero by design: stop-gradient)."""
        K = self.K
        p = self.norm_params(p)
        h = 1e-6 * max(1.0, float(np.max(np.abs(Q))))
        out = np.zeros((K, K, K))
        for j in range(K):  # K^2 evaluations of a cheap deterministic map
            for k in range(K):
                E = np.zeros((K, K))
                E[j, k] = h
                out[:, j, k] = (np.asarray(self.normalization.scale(Q + E, p))
                                - np.asarray(self.normalization.scale(Q - E, p))) / (2 * h)
        return out

    # -- the Engine interface -------------------------------------------------------------
    def generalization_error(
        self, Q: Any, R: Any, params: Mapping[str, Any] | None = None, *, check: bool = True,
        mean: Any = None, weights_gram: Any = None,
    ) -> tuple[float, float]:
        """``(eps_g, 0.0)`` at ``(Q, R)`` and the parameters (noise term included); centred
        pre-activations only."""
        self._centred_only(mean)
        self._preactivation_statistics_only(weights_gram)
        Q, R = np.asarray(Q, dtype=float), np.asarray(R, dtype=float)
        p = self._checked(params)
        s = np.asarray(self.normalization.scale(Q, self.norm_params(p)), dtype=float)
        return _theory.scale_moments(Q, R, self.T, s, self.noise, self.error_weights(p))[0], 0.0

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
    ) -> Rates:
        """``dQ/dalpha``, ``dR/dalpha``, ``dtheta/dalpha`` (scale parameters) and
        ``eps_g``, exact (errors 0)."""
        K, M = self.K, self.M
        Q, R = np.asarray(Q, dtype=float), np.asarray(R, dtype=float)
        Q = 0.5 * (Q + Q.T)
        p = self._checked(params)
        s, ds, dth = self._scale(Q, p)
        w = self.error_weights(p)
        dQ, dR = _theory.ode_rhs(Q, R, self.T, s, ds, eta, batch_size=batch_size,
                                 noise_var=self.noise, second_order=second_order, w=w)
        eps, edx = _theory.scale_moments(Q, R, self.T, s, self.noise, w)  # E[delta~_i x_i]
        edx = -w[:K] * edx  # the readout factor a_i of the per-sample gradient
        dp = {k: eta * edx @ dth[k] for k in self.scale_trainable}
        dE_da = _theory.readout_gradient(Q, R, self.T, s, w) if self.model_trainable else None
        dQ, dR, dv = self.layer_rates(Q, R, p, dQ, dR, dE_da)
        dp.update(dv)
        zero = {k: np.zeros(K) for k in self.trainable}
        return Rates(dQ, dR, dp, float(eps), np.zeros((K, K)), np.zeros((K, M)), zero, 0.0)

    def drift(
        self,
        Q: Any,
        R: Any,
        params: Mapping[str, Any] | None = None,
        *,
        eta: float,
        second_order: bool = True,
        check: bool = True,
        mean: Any = None,
        weights_gram: Any = None,
    ) -> Drift:
        """The exact expectations of the per-sample gradient (one "replicate";
        :class:`~framework.theory.Drift`, :func:`framework.theory._kernels.drift_terms`);
        centred pre-activations only."""
        self._centred_only(mean)
        self._preactivation_statistics_only(weights_gram)
        Q, R = np.asarray(Q, dtype=float), np.asarray(R, dtype=float)
        Q = 0.5 * (Q + Q.T)
        p = self._checked(params)
        s, ds, dth = self._scale(Q, p)
        w = self.error_weights(p)
        au, C, aa, A = _theory.drift_terms(Q, R, self.T, s, ds, self.noise, second_order, w)
        eps, edx = _theory.scale_moments(Q, R, self.T, s, self.noise, w)
        edx = -w[:self.K] * edx
        dp = {k: (eta * edx @ dth[k])[None] for k in self.scale_trainable}
        dE_da = (_theory.readout_gradient(Q, R, self.T, s, w)[None]
                 if self.model_trainable else None)
        return Drift(au[None], A[None], C[None], aa[None], dp, dE_da,
                     np.array([float(eps)]))

    def weight_moments(
        self,
        X: Any,
        Bt: Any,
        params: Mapping[str, Any] | None = None,
        *,
        landscape: bool = True,
        shift: Any = None,
        weights_metric: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``eps_g``, ``dF/dX`` and ``dF/dtheta`` (scale parameters) in weight space, exact,
        as one "replicate": ``(eps (1,), dF/dX (1, K, D), {name: (1, K)})``.

        ``landscape=True`` with ``statistics_gradient = False``: ``ds/dQ`` is taken by
        central differences of the scale (the gradient of ``eps_g``, not the drift).
        A stack of one for :meth:`weight_moments_stack`.
        """
        self._centred_only(shift)
        self._preactivation_statistics_only(weights_metric)
        eps, gX, gT = self.weight_moments_stack(np.asarray(X, dtype=float)[None], Bt, params,
                                                landscape=landscape)
        return eps[0], gX[0], {k: v[0] for k, v in gT.items()}

    def weight_moments_stack(
        self,
        Xs: Any,
        Bt: Any,
        params: Mapping[str, Any] | None = None,
        *,
        landscape: bool = True,
        shift: Any = None,
        weights_metric: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """:meth:`weight_moments` over a stack ``Xs (S, K, D)``, vectorized (chunks of
        256 realizations, so that memory stays ``O(256 (K + M)^2)``): the closed forms
        take stacked order parameters. For a stop-gradient normalization's landscape the
        scale Jacobian is taken by differences, realization by realization."""
        self._centred_only(shift)
        self._preactivation_statistics_only(weights_metric)
        Xs = np.asarray(Xs, dtype=float)
        Bt = np.asarray(Bt, dtype=float)
        p = self._checked(params)
        w = self.error_weights(p)
        p = self.norm_params(p)
        norm = self.normalization
        S = Xs.shape[0]
        eps = np.empty((S, 1))
        gX = np.empty((S, 1, *Xs.shape[1:]))
        gT = {k: np.empty((S, 1, self.K)) for k in self.trainable}
        for a in range(0, S, 256):
            X = Xs[a:a + 256]
            Q = X @ np.swapaxes(X, -1, -2)
            R = X @ Bt.T
            s = np.asarray(norm.scale(Q, p), dtype=float)
            if landscape and not norm.statistics_gradient:
                ds = np.stack([self._landscape_jacobian(q, p) for q in Q])
            else:
                ds = np.asarray(norm.scale_jacobian(Q, p), dtype=float)
            e, G, H, dE_ds = _theory.eps_g_gradient(Q, R, self.T, s, ds, self.noise, w)
            eps[a:a + 256, 0] = e
            gX[a:a + 256, 0] = (G + np.swapaxes(G, -1, -2)) @ X + H @ Bt
            if self.scale_trainable:
                dth = norm.scale_parameter_jacobian(Q, p)
                for k in self.scale_trainable:
                    gT[k][a:a + 256, 0] = np.einsum("...i,...ij->...j", dE_ds,
                                                    np.asarray(dth[k], dtype=float))
            if self.model_trainable:  # d eps_g / d v = c_K d eps_g / d a
                gT["v"][a:a + 256, 0] = self.layers.c_student * _theory.readout_gradient(
                    Q, R, self.T, s, w)
        return eps, gX, gT

    def held_hessian(
        self, Q: Any, R: Any, params: Mapping[str, Any] | None = None
    ) -> np.ndarray:
        """Hessian of ``eps_g`` over the held shift parameters at 0, ``(K h, K h)`` for
        ``h = len(held)`` (parameter-major), decoupled from ``(W, theta)``: ``a_i a_k
        E[g'(x~_i) g'(x~_k)] + delta_ik a_i E[delta~_i x~_i]`` with the effective output
        weights ``a``."""
        h = len(self.held)
        if not h:
            return np.zeros((0, 0))
        Q, R = np.asarray(Q, dtype=float), np.asarray(R, dtype=float)
        p = self._checked(params)
        w = self.error_weights(p)
        a = -w[:self.K]  # effective student output weights
        s = np.asarray(self.normalization.scale(Q, self.norm_params(p)), dtype=float)
        _, edx = _theory.scale_moments(Q, R, self.T, s, self.noise, w)  # E[delta~_i x_i]
        St = _theory.effective_covariance(Q, R, self.T, s)
        block = np.outer(a, a) * J2(St, np.arange(self.K)) + np.diag(a * s * edx)
        return np.kron(np.eye(h), block)

    def integrate(self, Q0: Any, R0: Any, **kwargs: Any) -> Trajectory:
        """See :meth:`Engine.integrate`. Without trainable parameters: the compiled
        DOP853 for the plain network (or a normalization with ``scale_kernels``), else
        scipy's solver. With trainable parameters: the ODE over ``(Q, R, theta)``
        through :meth:`rates`. ``stop_below`` keeps the rows up to the first one below it
        (the semantics of every engine). A nonzero shift is refused before anything
        runs."""
        p = self._checked(kwargs.get("params"))
        if self.trainable or not self.layers.committee_machine:
            return super().integrate(Q0, R0, **kwargs)
        check_horizon(kwargs["alpha"], kwargs["eta"])
        norm = self.normalization
        kernels = norm.scale_kernels()

        def scale(Q: np.ndarray) -> np.ndarray:
            return norm.scale(Q, p)

        def jacobian(Q: np.ndarray) -> np.ndarray:
            return norm.scale_jacobian(Q, p)

        Q0 = np.asarray(Q0, dtype=float)
        plain = not norm.scale_invariant and _is_identity(scale, jacobian, Q0)
        traj = _theory.integrate_diagonal_scale(
            Q0, np.asarray(R0, dtype=float), self.T, None if plain else scale,
            None if plain else jacobian, eta=kwargs["eta"],
            batch_size=kwargs.get("batch_size", 1), noise_var=self.noise,
            alpha=np.asarray(kwargs["alpha"]), rtol=kwargs.get("rtol", 1e-10),
            atol=kwargs.get("atol", 1e-12), method=kwargs.get("method", "DOP853"),
            second_order=kwargs.get("second_order", True),
            max_value=kwargs.get("max_value", 1e8),
            kernels=None if plain else kernels,
            kernel_params=None if plain or kernels is None else kernels.pack(p, self.K),
        )
        # rows reported: up to the first below stop_below (judged on the closed form at
        # (Q, R), accurate to ~1e-8 relative above 1e-7), then the converged ones refined
        n = traj.alpha.size
        stop = kwargs.get("stop_below")
        if stop is not None and np.any(traj.eps_g < stop):
            n = int(np.argmax(traj.eps_g < stop)) + 1
        Qs, Rs, eps = traj.Q[:n], traj.R[:n], traj.eps_g[:n]
        why = ("a normalization" if not plain else "output noise" if self.noise
               else "K != M" if self.K != self.M else f"K > {TAIL_MAX_K}"
               if self.K > TAIL_MAX_K else "")
        eps_method = ("closed form at the integrated (Q, R) (the converged phase is not "
                      f"refined in deviation variables with {why})")
        if not why:
            tail = refine_tail(traj.alpha[:n], Qs, Rs, eps, self.T, eta=kwargs["eta"],
                               batch_size=kwargs.get("batch_size", 1),
                               second_order=kwargs.get("second_order", True),
                               rtol=kwargs.get("rtol", 1e-10))
            if isinstance(tail, str):
                eps_method = f"closed form at the integrated (Q, R) ({tail})"
            else:
                j = tail.start
                Qs = np.concatenate([Qs[:j], tail.Q])
                Rs = np.concatenate([Rs[:j], tail.R])
                eps = np.concatenate([eps[:j], tail.eps_g])
                eps_method = (
                    f"closed form up to alpha = {tail.alpha_start:.6g}; from there (eps_g < "
                    f"{TAIL_THRESHOLD:g}, students matched to teachers) the deviation "
                    f"(J - B) integrated without cancellation at rtol = "
                    f"{kwargs.get('rtol', 1e-10):g} per component "
                    "(framework.theory._tail): " + tail.message)
        cut = n < traj.alpha.size  # stopped below the threshold before any failure
        return Trajectory(
            alpha=traj.alpha[:n], Q=Qs[:n], R=Rs[:n], eps_g=eps[:n],
            diverged=traj.diverged and not cut,
            alpha_diverged=np.nan if cut else traj.alpha_diverged, nfev=traj.nfev,
            message="integration successful" if cut else traj.message,
            engine=self.name, params={}, eps_g_error=np.zeros(n),
            integrator=traj.engine, description=self.describe(), exact=True,
            eps_g_method=eps_method,
        )

    def describe(self) -> str:
        """One line for attrs."""
        committee = self.layers.committee_machine
        out = "closed-form erf integrals" + ("" if committee else " weighted by the readouts")
        if self.trainable:
            out += f" with trainable parameters {', '.join(self.trainable)} as state"
        if self.held:
            out += f"; {', '.join(self.held)} held at 0 (odd activation)"
        return out if committee else out + "; " + self.layers.describe()


def _is_identity(scale: Any, jac: Any, Q: np.ndarray) -> bool:
    """True if ``s(Q) == 1`` with zero Jacobian at a probe point (the plain fast path)."""
    probe = Q + np.eye(Q.shape[0])
    return bool(np.all(scale(probe) == 1.0) and np.all(jac(probe) == 0.0))
