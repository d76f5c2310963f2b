"""Built-in learning rules: ``sgd`` (the default), ``natural_gradient`` and ``momentum``
(heavy ball, online limit: :class:`Momentum`).

Conventions (DESIGN.md): ``W = J / sqrt(N)``, ``Q = W W^T``, ``R = W B^T / sqrt(N)``;
online SGD takes ``J <- J - eta grad_J eps`` per sample, i.e. ``dW = -(eta / N) grad_W
eps``; time ``alpha = steps / N``.

Natural gradient
----------------
``F`` is the population Fisher of the network output in ``W`` coordinates exactly as
:func:`framework.theory.fisher.weight_space_fisher` defines it (``E[grad_W sigma
grad_W sigma^T]``, unit output-noise variance, population statistics, the gradient the
normalization passes); the step is::

    dW = -(eta / N) (F + lambda I)^+ grad_W eps,   i.e.   J <- J - eta (F + lambda I)^+ grad_J eps

(the same linear map acts on ``grad_J = grad_W / sqrt(N)``), so ``F = I, lambda = 0``
is plain SGD and ``lambda -> infinity`` is SGD with rate ``eta / lambda``. ``lambda``
is the option ``damping``; ``^+`` is the pseudo-inverse of the symmetric ``F + lambda
I`` that drops eigenvalues ``<= rcond * (its largest eigenvalue)`` (the option
``rcond``): the scale modes ``dW_i ~ W_i`` of a scale-invariant normalization (batch
norm, where ``F`` vanishes along them and so does every per-sample gradient) are left
out, as by a vanishing damping.

Reduction. ``F`` is the span block ``F_S`` (``K r x K r`` in the coordinates of a
realization ``X`` of ``Q``, ``r = rank Q``, on ``{dW : each dW_i in S}``, ``S`` the span
of the student vectors) plus ``C (x) P_perp`` on the complement, ``C = E[b b^T]``
(``K x K``). Its inverse acts blockwise: per step, with ``U`` an orthonormal basis of
``S`` (``W = X U^T``), the gradient ``G`` (``K x N``) splits into ``G U`` (``K x r``,
solved with ``F_S``) and ``G - G U U^T`` (multiplied by ``C^+`` over the unit index):
``O(N K r)`` work a step, no ``N x N`` solve (:meth:`NaturalGradient.direction`).

Outside the cone. A ``Q`` with a negative eigenvalue is not the state of any network,
but root finders and finite-difference Jacobians probe such states next to the
boundary (identical students: the plateau of gradient flow, the starts of
:func:`framework.theory.equilibrium.find_fixed_points`), where the engines' closed
forms are analytic and the Fisher (which needs a realization ``X X^T = Q``) is not
defined. :meth:`NaturalGradient.rates` takes the Fisher, the realization and the drift
and everything else at the nearest point of the closed PSD cone (negative eigenvalues
of ``Q`` set to 0, the Frobenius projection; ``R`` is projected the same way through
``Z Z^T = T - Y Y^T``): a continuous extension, not analytic across
the boundary (so :func:`~framework.theory.equilibrium.ode_jacobian` keeps its steps
inside the cone for this rule: ``analytic_beyond_cone = False``).

Order-parameter ODE (``N -> infinity``). Realize the state in ``r + M`` dimensions:
``W = [X, 0]``, ``Bt = [Y, Z]`` with ``Y^T = X^+ R`` (``X Y^T = R``) and ``Z Z^T = T - Y
Y^T``. Let ``Gbar = E[grad_W eps]`` in that realization (the engine's
:meth:`~framework.theory.Engine.weight_moments` with ``landscape=False``: the SGD drift,
span part ``Gbar_S``, ``K x r``, and complement part ``Gbar_perp``, ``K x M``), and
``A = E[a a^T]`` with ``a = -d eps / dx`` (the ``eta^2`` moment of SGD). The drift of the
rule is ``Dbar = -(F_S + lambda)^+ Gbar_S`` on the span and ``Pbar = -(C + lambda)^+
Gbar_perp`` on the complement (``F`` depends on ``Q`` only, so it leaves the average);
in the complement each step adds ``(eta / N) (C + lambda)^+ a xi_perp^T`` with
``|xi_perp|^2 / N -> 1``, so::

    dQ/dalpha = eta (Dbar X^T + X Dbar^T) + (eta^2 / B) (C + lambda)^+ A (C + lambda)^+
    dR/dalpha = eta (Dbar Y^T + Pbar Z^T)

(``B`` the minibatch size), plus first-layer weight decay ``-2 lambda_wd Q``, ``-lambda_wd
R`` (not preconditioned). Written out: ``Dbar = (F_S + lambda)^+ (E[a z^T] + C_Q X)`` with
``z = X^+ x`` and ``C_Q = -(Gq + Gq^T)`` the statistics term of DESIGN.md, and ``Pbar
Z^T = (C + lambda)^+ (E[a y^T] - E[a x^T] Q^+ R)``; with ``F = I`` it is Saad & Solla's
system (and DESIGN.md's general ODE). Every piece comes from the engine's public
expectations and the Fisher: exact (to rounding: the Fisher's pairwise Gauss-Hermite
rule) on the closed-form engine (erf, diagonal-scale normalizations), estimates with
errors on the generic engine (any activation and normalization). ``A`` is the
difference of the engine's rates with and without the ``eta^2`` term (common random
numbers on the generic engine). Trainable parameters (normalization parameters, a
trained readout) are refused: their rule is not defined here.

The finite-``N`` simulation (the ``simulation`` analyzer, numpy backend) recomputes the
Fisher at each replica's current ``Q = J J^T / N`` on every step (the engine
:func:`framework.theory.select_engine` picks: closed form ~2 ms at ``K = 2``; the
generic engine's ~20 ms makes that backend slow).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import numpy as np

from framework import LearningRule, SpecificationError, hookimpl, theory
from framework.theory import fisher as fi
from framework.validators import check_real, ge, to_float

__all__ = ["SGD", "Momentum", "NaturalGradient", "pseudo_inverse", "refuse_trainable"]


@attrs.frozen
class SGD(LearningRule):
    """Online SGD, the framework's convention: ``J <- J - eta grad_J eps`` per step (a
    step ``eta / sqrt(N)`` along ``xi``; ``dW = -(eta / N) grad_W eps``). The engines'
    own rates and the compiled kernels are this rule's; no options."""

    name: ClassVar[str] = "sgd"
    description: ClassVar[str] = "online SGD, J <- J - eta grad_J (the default)"
    engine_native: ClassVar[bool] = True

    def rates(self, engine: Any, Q: Any, R: Any, params: Mapping[str, Any] | None = None,
              *, eta: float, batch_size: int = 1, second_order: bool = True,
              check: bool = True) -> theory.Rates:
        """The engine's own rates."""
        return engine.rates(Q, R, params, eta=eta, batch_size=batch_size,
                            second_order=second_order, check=check)

    def direction(self, model: Any, normalization: Any, J: np.ndarray,
                  grad: np.ndarray, state: dict[str, Any]) -> np.ndarray:
        """The gradient itself."""
        return grad


def refuse_trainable(rule: str, model: Any, normalization: Any) -> None:
    """Raise :class:`~framework.SpecificationError` if the pair trains parameters (a
    normalization's, a trained readout): rule ``rule`` moves the weights only."""
    trained = tuple(normalization.trainable)
    if trained:
        raise SpecificationError(
            f"learning rule {rule!r} does not train parameters: normalization "
            f"{normalization.name!r} trains {trained!r}; use a normalization with fixed "
            f"parameters or learning_rule='sgd'")
    if model.layers().readout_trained:
        raise SpecificationError(
            f"learning rule {rule!r} does not train parameters: the model's readout is "
            f"trained (second_layer='trained'); use a fixed readout or learning_rule='sgd'")


def _rcond(instance: Any, attribute: Any, value: Any) -> None:
    check_real(attribute.name, value, minimum=0.0, strict=True)
    if not value < 1.0:
        raise SpecificationError(f"'{attribute.name}' must be < 1, got {value!r}")


def pseudo_inverse(A: np.ndarray, damping: float, rcond: float) -> tuple[np.ndarray, float]:
    """``(A + damping I)^+`` of a symmetric ``A`` (eigenvalues ``<= rcond * largest``
    dropped) and the smallest eigenvalue kept (inf if none)."""
    n = A.shape[0]
    lam, vec = np.linalg.eigh(0.5 * (A + A.T) + damping * np.eye(n))
    top = float(lam[-1]) if n else 0.0
    keep = lam > rcond * top if top > 0.0 else np.zeros(n, dtype=bool)
    inv = (vec[:, keep] / lam[keep]) @ vec[:, keep].T
    return inv, float(lam[keep].min(initial=math.inf))


@attrs.frozen
class NaturalGradient(LearningRule):
    """Natural gradient with the population Fisher of the network output (module
    docstring): ``J <- J - eta (F + damping I)^+ grad_J eps``, ``F`` as
    :func:`framework.theory.fisher.weight_space_fisher` defines it in ``W = J / sqrt(N)``.

    Parameters
    ----------
    damping : float
        ``lambda >= 0`` added to ``F`` (Tikhonov regularization); default 0. Large
        ``lambda`` with ``eta = lambda * eta_sgd`` tends to SGD at ``eta_sgd``.
    rcond : float
        Eigenvalues of ``F + lambda I`` at most ``rcond`` times its largest are dropped
        (pseudo-inverse; ``0 < rcond < 1``); default 1e-10.
    """

    name: ClassVar[str] = "natural_gradient"
    description: ClassVar[str] = (
        "natural gradient, J <- J - eta (F + damping I)^+ grad_J with the population Fisher")

    damping: float = attrs.field(default=0.0, converter=to_float, validator=ge(0.0))
    rcond: float = attrs.field(default=1e-10, converter=to_float, validator=_rcond)
    analytic_beyond_cone: ClassVar[bool] = False  # rates at the projected Q

    def describe(self) -> str:
        return (f"natural gradient dW = -(eta/N) (F + {self.damping:g} I)^+ grad_W eps, F the "
                f"population Fisher of the output (weight_space_fisher, W = J/sqrt(N), unit "
                f"noise variance), eigenvalues <= {self.rcond:g} * max dropped")

    # -- capability ------------------------------------------------------------------
    def check(self, model: Any, normalization: Any) -> None:
        """Refuse trainable parameters (a normalization's, a trained readout)."""
        refuse_trainable(self.name, model, normalization)

    def supports(self, engine: Any, model: Any, normalization: Any,
                 activation: Any) -> str | None:
        """An exact engine needs the exact (pairwise) Fisher: a diagonal-scale
        normalization; an engine of estimates takes every triple."""
        if engine.exact and not normalization.is_diagonal_scale():
            return (f"the exact Fisher needs a diagonal-scale normalization, "
                    f"{normalization.name!r} is not")
        return None

    # -- the Fisher and its inverse ------------------------------------------------------
    def preconditioner(
        self, model: Any, normalization: Any, Q: np.ndarray, params: Any = None,
        engine: Any = "auto",
    ) -> tuple[Any, np.ndarray, np.ndarray, float]:
        """``(FisherSpectrum, (F_S + lambda)^+, (C + lambda)^+, relative error)`` at
        ``Q``: the span block's pseudo-inverse (``K r x K r``, coordinates of the
        spectrum's ``X``), the complement's (``K x K``), and a first-order bound on the
        relative error of the inverses from the Fisher's error estimates."""
        fisher = fi.weight_space_fisher(model, normalization, Q, params, engine=engine)
        K, r = fisher.X.shape
        span_inv, span_min = pseudo_inverse(fisher.span_matrix[:K * r, :K * r],
                                            self.damping, self.rcond)
        comp_inv, comp_min = pseudo_inverse(fisher.complement_matrix, self.damping, self.rcond)
        rel = max(float(fisher.span_error.max(initial=0.0)) / span_min,
                  float(fisher.complement_error.max(initial=0.0)) / comp_min)
        return fisher, span_inv, comp_inv, rel

    # -- the theory ------------------------------------------------------------------
    def rates(self, engine: Any, Q: Any, R: Any, params: Mapping[str, Any] | None = None,
              *, eta: float, batch_size: int = 1, second_order: bool = True,
              check: bool = True) -> theory.Rates:
        """The natural-gradient ODE (module docstring) from ``engine``'s expectations."""
        if engine.trainable:
            raise SpecificationError(
                f"learning rule 'natural_gradient' does not train parameters, got trainable "
                f"{engine.trainable!r}")
        Q, R = np.asarray(Q, dtype=float), np.asarray(R, dtype=float)
        Q = 0.5 * (Q + Q.T)
        lq, vq = np.linalg.eigh(Q)
        if lq[0] < 0.0:  # the nearest point of the closed PSD cone (module docstring)
            Q = (vq * np.clip(lq, 0.0, None)) @ vq.T
        p = engine.params(params)
        fisher, span_inv, comp_inv, rel = self.preconditioner(
            engine.model, engine.normalization, Q, p, engine=engine)
        X = fisher.X
        K, r = X.shape
        M = R.shape[1]
        Yt = np.linalg.pinv(X) @ R  # (r, M): X Y^T = R
        lam, vec = np.linalg.eigh(engine.T - Yt.T @ Yt)
        Z = vec * np.sqrt(np.clip(lam, 0.0, None))  # Z Z^T = T - Y Y^T
        W = np.hstack([X, np.zeros((K, M))])
        Bt = np.hstack([Yt.T, Z])
        _, grad, _ = engine.weight_moments(W, Bt, p, landscape=False)  # (n, K, r + M)
        n = grad.shape[0]
        DS = -(grad[:, :, :r].reshape(n, K * r) @ span_inv).reshape(n, K, r)
        DP = -comp_inv @ grad[:, :, r:]
        dQ = eta * (DS @ X.T + X @ np.swapaxes(DS, 1, 2))
        dR = eta * (DS @ Yt + DP @ Z.T)
        if second_order:  # E[a a^T]: the engine's eta^2 term (rates at eta = 1, B = 1)
            r2 = engine.rates(Q, R, p, eta=1.0, batch_size=1, second_order=True, check=check)
            r1 = engine.rates(Q, R, p, eta=1.0, batch_size=1, second_order=False, check=check)
            noise = (eta**2 / batch_size) * comp_inv @ (r2.dQ - r1.dQ) @ comp_inv
            noise_err = (eta**2 / batch_size) * np.abs(comp_inv) @ (
                r2.dQ_error + r1.dQ_error) @ np.abs(comp_inv)
            eps, eps_err = r2.eps_g, r2.eps_g_error
        else:
            noise = noise_err = np.zeros((K, K))
            eps, eps_err = engine.generalization_error(Q, R, p, check=check)
        dQ_mean, dQ_err = _mean_err(dQ)
        dR_mean, dR_err = _mean_err(dR)
        dQ_mean = dQ_mean + noise
        if not engine.exact:  # the Fisher's error, to first order
            dQ_err = dQ_err + noise_err + rel * (np.abs(dQ_mean) + np.abs(noise))
            dR_err = dR_err + rel * np.abs(dR_mean)
        else:
            dQ_err, dR_err = np.zeros((K, K)), np.zeros((K, M))
        dQ_mean, dR_mean, _ = engine.layer_rates(Q, R, p, dQ_mean, dR_mean)
        return theory.Rates(0.5 * (dQ_mean + dQ_mean.T), dR_mean, {}, float(eps),
                            0.5 * (dQ_err + dQ_err.T), dR_err, {}, float(eps_err))

    # -- the simulation ----------------------------------------------------------------
    def direction(self, model: Any, normalization: Any, J: np.ndarray,
                  grad: np.ndarray, state: dict[str, Any]) -> np.ndarray:
        """``(F + lambda)^+ grad`` per replica at its current ``Q = J J^T / N``, through
        the span/complement reduction (``O(N K r)``, module docstring)."""
        P, K, N = J.shape
        out = np.empty_like(grad)
        for i in range(P):
            W = J[i] / math.sqrt(N)
            fisher, span_inv, comp_inv, _ = self.preconditioner(
                model, normalization, W @ W.T)
            X = fisher.X
            r = X.shape[1]
            U = W.T @ X @ np.linalg.inv(X.T @ X) if r else np.zeros((N, 0))  # W = X U^T
            gS = grad[i] @ U  # (K, r)
            out[i] = ((span_inv @ gS.reshape(K * r)).reshape(K, r) @ U.T
                      + comp_inv @ (grad[i] - gS @ U.T))
        return out


def _beta(instance: Any, attribute: Any, value: Any) -> None:
    check_real(attribute.name, value, minimum=0.0)
    if not value < 1.0:
        raise SpecificationError(f"'{attribute.name}' must be < 1, got {value!r}")


@attrs.frozen
class Momentum(LearningRule):
    """SGD with heavy-ball momentum, in the online limit.

    Per step ``v <- beta v + grad_J eps`` (``v = 0`` at the start), ``J <- J - eta v``.
    With ``beta`` fixed as ``N -> infinity`` the velocity relaxes in ``1 / (1 - beta)``
    steps, ``O(1/N)`` in ``alpha``: each sample's gradient moves ``J`` by ``eta / (1 -
    beta)`` times itself in all (``sum_k beta^k``), so drift *and* the ``eta^2`` term are
    those of SGD at ``eta / (1 - beta)``: ``dQ/dalpha = (eta') (...) + (eta'^2 / B) E[a
    a^T]`` with ``eta' = eta / (1 - beta)`` (the engine's rates at ``eta'``; weight decay
    not accelerated). Trainable parameters are refused (their step has no momentum).

    Parameters
    ----------
    beta : float
        Momentum, ``0 <= beta < 1``; default 0.9.
    """

    name: ClassVar[str] = "momentum"
    description: ClassVar[str] = (
        "heavy-ball momentum v <- beta v + grad_J, J <- J - eta v (online limit: SGD at "
        "eta / (1 - beta))")

    beta: float = attrs.field(default=0.9, converter=to_float, validator=_beta)
    analytic_beyond_cone: ClassVar[bool] = True  # the engine's rates at another eta

    def check(self, model: Any, normalization: Any) -> None:
        """Refuse trainable parameters (a normalization's, a trained readout)."""
        refuse_trainable(self.name, model, normalization)

    def rates(self, engine: Any, Q: Any, R: Any, params: Mapping[str, Any] | None = None,
              *, eta: float, batch_size: int = 1, second_order: bool = True,
              check: bool = True) -> theory.Rates:
        """The engine's rates at ``eta / (1 - beta)``."""
        return engine.rates(Q, R, params, eta=eta / (1.0 - self.beta),
                            batch_size=batch_size, second_order=second_order, check=check)

    def direction(self, model: Any, normalization: Any, J: np.ndarray,
                  grad: np.ndarray, state: dict[str, Any]) -> np.ndarray:
        """The velocity ``v <- beta v + grad`` (kept in ``state["velocity"]``)."""
        v = state.get("velocity")
        v = grad.copy() if v is None else self.beta * v + grad
        state["velocity"] = v
        return v


def _mean_err(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the leading (replicate) axis and its standard error (0 for one)."""
    n = values.shape[0]
    if n < 2:
        return values[0], np.zeros(values.shape[1:])
    return values.mean(axis=0), values.std(axis=0, ddof=1) / math.sqrt(n)


@hookimpl
def symphase_register_learning_rules(registry):
    registry.add_learning_rule(SGD)
    registry.add_learning_rule(NaturalGradient)
    registry.add_learning_rule(Momentum)
