"""The order-parameter ODE with structured inputs: one block of order parameters per
eigenspace of the input covariance, for any engine that provides :meth:`Engine.drift`.

Mathematics (DESIGN.md, "Structured inputs"; conventions in :mod:`framework.inputs`)
-------------------------------------------------------------------------------------
Inputs ``xi ~ N(0, Sigma)``, ``Sigma = sum_l lambda_l P_l``. The state is ``Q_l = J^(l)
J^(l)^T / N`` and ``R_l = J^(l) B^(l)^T / N`` per eigenspace (``T_l = f_l T`` fixed); the
pre-activations ``u = (x, y)`` are Gaussian with covariance ``St = [[Qt, Rt], [Rt^T,
Tt]]``, ``Qt = sum_l lambda_l Q_l`` etc., so every expectation of the network -- hence
``eps_g``, the normalization's population statistics and the per-sample gradient ``a =
-d eps / dx`` -- is the wrapped (isotropic) engine's at ``(Qt, Rt)``.

One SGD step moves ``J_i`` by ``(eta / sqrt(N)) a_i xi`` plus, through the statistics,
``(eta / N) sum_k C_ik Sigma J_k``. Projected on eigenspace ``l``, ``J_k . P_l xi /
sqrt(N)`` is jointly Gaussian with ``u``, with covariances ``lambda_l [Q_l; R_l^T]`` (its
column ``k``); Gaussian conditioning (Stein's lemma) gives ``E[a_i (J_k . P_l xi) /
sqrt(N)] = (A lambda_l [Q_l; R_l^T])_ik`` with ``A = E[grad_u a]``
(:attr:`Drift.A`: in closed form for the erf engine, ``E[a u^T] St^+`` for the
quadrature, where the pseudo-inverse is exact since the covariance vector lies in the
range of ``St``). With
``|P_l xi|^2 / N -> f_l lambda_l``::

    dQ_l/dalpha = eta lambda_l (A [Q_l; R_l^T] + C Q_l + transpose)
                  + (eta^2 / B) f_l lambda_l E[a a^T]
    dR_l/dalpha = eta lambda_l (A [R_l; T_l] + C R_l)

plus weight decay per eigenspace (``-2 lambda_wd Q_l``, ``-lambda_wd R_l``) and the
parameters' rates (``dtheta/dalpha``, the trained readout's ``dv/dalpha``) of the
wrapped engine at ``(Qt, Rt)``: parameters are not inputs, their step is not
preconditioned by ``Sigma``. For ``L = 1``, ``lambda = 1`` this is the isotropic ODE;
for ``Sigma = c I`` the totals follow the isotropic ODE at rate ``c eta`` (tested).

Inputs with a mean, ``xi ~ N(m u, Sigma)`` (``u`` a unit vector in eigenspace ``mu`` of
``Sigma``, :mod:`framework.inputs`): the state gains the student's overlaps ``r_i = J_i .
u / sqrt(N)`` (the parameter-like entry ``"mean_overlap"`` of the state, ``(K,)``), the
teacher's ``s`` are fixed, and the pre-activations are ``N(m [r; s], St)``; the wrapped
engine's :meth:`~Engine.drift` at that mean gives ``A``, ``C``, ``E[a a^T]`` of the centred
pre-activations, ``E[a]`` and ``b = -E[d eps / d mean]`` (the statistics' dependence on the
mean: ``-E[a]`` for batch norm, which centres). The step moves ``J_i`` along ``u`` by
``(eta / sqrt(N)) m h_i`` on average, ``h = E[a] + b``, so with ``lambda_mu`` the
eigenvalue of ``u``::

    dr/dalpha     = eta lambda_mu (A [r; s] + C r) + eta m h
    dQ_mu/dalpha += eta m (h r^T + r h^T),   dR_mu/dalpha += eta m h s^T

(weight decay adds ``-lambda_wd r``); the ``eta^2`` terms are unchanged (the mean's share
of ``|xi|^2 / N`` is ``m^2 / N -> 0``). A random initialization has ``r = 0``.

A normalization with ``weight_statistics`` (weight norm: ``|J_i|^2 / N``) has statistics
of the weights' Gram matrix ``sum_l Q_l``, not of ``Qt``: the wrapped engine takes it as
``weights_gram`` (:attr:`~framework.theory.Engine.supports_weight_statistics`), ``C`` is
the pull-back onto it, and the step through the statistics is ``(eta / N) sum_k C_ik J_k``
(along ``J``, not ``Sigma J``), so the ``C Q_l``, ``C R_l`` terms lose their factor
``lambda_l``; in weight space the statistics see ``X diag(1 / lambda) X^T`` of the
whitened realization (``weights_metric``).

:class:`SpectralEngine` wraps the engine :func:`~framework.theory.select_engine` chose
for the pre-activation covariances (its ``T`` is ``Tt``) and integrates the blocks
through :meth:`Engine.integrate` (scipy's solver). An exact wrapped engine gives exact
rates, analytic a little beyond the PSD cone (its closed forms are).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from framework.inputs import InputDistribution
from framework.theory._integrate import SEMIDEFINITE_TOL
from framework.theory.base import Engine, Rates, Trajectory, WrappedEngine
from framework.validators import SpecificationError

if TYPE_CHECKING:
    pass

__all__ = ["MEAN_OVERLAP", "SpectralEngine"]

#: The state entry of the student's overlaps with the input-mean direction, ``r_i = J_i .
#: u / sqrt(N)`` (inputs with a mean), carried beside the trainable parameters.
MEAN_OVERLAP = "mean_overlap"


class SpectralEngine(WrappedEngine):
    """``base`` (an engine at the pre-activation covariances) with the order parameters
    per input eigenspace as state (module docstring).

    The state arrays are ``Q (L, K, K)`` and ``R (L, K, M)``; :meth:`rates` returns
    rates of these shapes; :meth:`generalization_error` takes them or the totals ``(Qt,
    Rt)``. ``name``, ``exact`` and ``semidefinite`` are the wrapped engine's.
    """

    def __init__(self, base: Engine, inputs: InputDistribution) -> None:
        super().__init__(base)
        self.inputs = inputs
        self.L = inputs.L
        self.lam = inputs.eigenvalues
        self.frac = inputs.fractions
        #: teacher overlaps per eigenspace, ``T_l = f_l T`` (L, M, M)
        self.T_l = inputs.lift(np.asarray(base.model.T, dtype=float))
        #: inputs with a mean: its size, the teacher's overlaps s (M,), its eigenspace
        self.has_mean = not inputs.centred
        self.m = inputs.mean
        self.s = inputs.teacher_overlap(self.M) if self.has_mean else np.zeros(self.M)
        self.l_mu = inputs.mean_space

        #: the normalization's statistics are of the weights (|J_i|^2 / N = sum_l Q_l,ii),
        #: not of the pre-activations (sum_l lambda_l Q_l,ii): module docstring
        self.weight_stats = bool(base.normalization.weight_statistics)

        if self.has_mean:  # r is state: integrated beside the trainable parameters
            self.trainable = (*self.trainable, MEAN_OVERLAP)
            self.initial_params[MEAN_OVERLAP] = np.zeros(self.K)

    # -- the mean overlap ----------------------------------------------------------------
    def _split(self, p: Mapping[str, np.ndarray]) -> tuple[np.ndarray | None,
                                                         dict[str, np.ndarray]]:
        """``(r or None, the wrapped engine's parameters)``."""
        rest = {k: v for k, v in p.items() if k != MEAN_OVERLAP}
        if not self.has_mean:
            return None, rest
        return np.asarray(p[MEAN_OVERLAP], dtype=float), rest

    def pre_activation_mean(self, r: Any) -> np.ndarray:
        """``m [r; s]`` ``(K + M,)``: the pre-activation means at the student overlaps
        ``r``."""
        return self.m * np.concatenate([np.asarray(r, dtype=float).reshape(self.K), self.s])

    # -- the state ---------------------------------------------------------------------
    def lift(self, Q: Any, R: Any) -> tuple[np.ndarray, np.ndarray]:
        """A state per eigenspace: ``(Q, R)`` of shapes ``(K, K)``, ``(K, M)`` (overlaps
        ``J J^T / N``, ``J B^T / N`` of weights spread over the eigenspaces in proportion
        to their size) lifted to ``Q_l = f_l Q``; arrays already per eigenspace are
        returned as they are."""
        Q, R = np.asarray(Q, dtype=float), np.asarray(R, dtype=float)
        if Q.ndim == 2:
            Q = self.inputs.lift(Q)
        if R.ndim == 2:
            R = self.inputs.lift(R)
        return Q, R

    def totals(self, Q: Any, R: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(Qt, Rt) = (sum_l lambda_l Q_l, sum_l lambda_l R_l)`` (also for stacks
        ``(n, L, ...)``)."""
        return self.inputs.total(Q), self.inputs.total(R)

    def weights_gram(self, Q: Any) -> np.ndarray | None:
        """``J J^T / N = sum_l Q_l`` for a normalization with ``weight_statistics`` (its
        statistics' Gram matrix), None otherwise (the statistics are the pre-activation
        covariance's)."""
        if not self.weight_stats:
            return None
        Q = np.asarray(Q, dtype=float)
        if Q.ndim != 3:
            raise SpecificationError(
                f"normalization {self.base.normalization.name!r} computes its statistics "
                f"from the weights: with structured inputs its state must be given per "
                f"input eigenspace (Q of shape (L, K, K)), got shape {Q.shape}")
        return Q.sum(axis=0)

    def _as_totals(self, Q: Any, R: Any) -> tuple[np.ndarray, np.ndarray]:
        Q, R = np.asarray(Q, dtype=float), np.asarray(R, dtype=float)
        return (self.inputs.total(Q) if Q.ndim == 3 else Q,
                self.inputs.total(R) if R.ndim == 3 else R)

    def pack(self, Q: np.ndarray, R: np.ndarray, params: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[Q_1..Q_L ravelled, R_1..R_L ravelled, theta..., r (inputs with a mean)]``."""
        Q, R = self.lift(Q, R)
        return np.concatenate(
            [np.ravel(Q), np.ravel(R), *(np.ravel(params[k]) for k in self.trainable)])

    def unpack(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        K, M, L = self.K, self.M, self.L
        y = np.asarray(y)
        lead = y.shape[:-1]
        nq, nr = L * K * K, L * K * M
        Q = y[..., :nq].reshape(*lead, L, K, K)
        R = y[..., nq:nq + nr].reshape(*lead, L, K, M)
        off = nq + nr
        params = {k: y[..., off + j * K: off + (j + 1) * K]
                  for j, k in enumerate(self.trainable)}
        return Q, R, params

    def _state_status(self, y: np.ndarray, max_value: float) -> int:
        """As :meth:`Engine._state_status`, with every ``Q_l`` in the closed PSD cone."""
        if not np.all(np.isfinite(y)):
            return 1
        if np.max(np.abs(y)) > max_value:
            return 2
        Q, _, _ = self.unpack(y)
        Qs = 0.5 * (Q + np.swapaxes(Q, -1, -2))
        lam = np.linalg.eigvalsh(Qs)[:, 0]
        tol = SEMIDEFINITE_TOL * np.maximum(1.0, np.max(np.abs(Qs), axis=(-1, -2)))
        return 3 if np.any(lam + tol < 0) else 0

    # -- the expectations --------------------------------------------------------------
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
        """``dQ_l/dalpha (L, K, K)``, ``dR_l/dalpha (L, K, M)``, ``dtheta/dalpha`` and
        ``eps_g`` at the state per eigenspace (module docstring), with the wrapped
        engine's error estimates propagated (standard error over its replicates)."""
        K = self.K
        Q, R = self.lift(Q, R)
        Q = 0.5 * (Q + np.swapaxes(Q, -1, -2))
        r, p = self._split(self.params(params))
        Qt, Rt = self.totals(Q, R)
        mean = None if r is None else self.pre_activation_mean(r)
        d = self.base.drift(Qt, Rt, p, eta=eta, second_order=second_order, check=check,
                            mean=mean, **self._gram_kw(Q))
        A = d.A  # (r, K, P): E[grad_u a]
        X = np.concatenate([Q, np.swapaxes(R, -1, -2)], axis=-2)  # (L, P, K)
        Y = np.concatenate([R, self.T_l], axis=-2)  # (L, P, M)
        lam = self.lam[:, None, None]
        # the statistics' step along Sigma J (pre-activation moments) or J (weight ones)
        cst = (np.ones_like(self.lam) if self.weight_stats else self.lam)[:, None, None]
        AX = lam * np.einsum("rkp,lpj->rlkj", A, X) + cst * np.einsum("rkj,ljm->rlkm", d.C, Q)
        dQ = eta * (AX + np.swapaxes(AX, -1, -2))
        if second_order:
            dQ = dQ + (eta**2 / batch_size) * (self.frac * self.lam)[:, None, None] \
                * d.aa[:, None]
        dR = eta * (lam * np.einsum("rkp,lpm->rlkm", A, Y)
                    + cst * np.einsum("rkj,ljm->rlkm", d.C, R))
        dQ, dR, dv = self.layer_rates(Q, R, p, dQ, dR, d.dE_da)
        dp = {**d.dparams, **dv}
        if r is not None:  # the input mean's drift along its direction (module docstring)
            if d.Ea is None or d.b is None:
                raise SpecificationError(
                    f"engine {self.base.name!r} returned no E[a] and b at a pre-activation "
                    f"mean (inputs with a mean need them)")
            h = d.Ea + d.b  # (rep, K)
            l, m = self.l_mu, self.m
            Ys = np.concatenate([r, self.s])  # (P,)
            dr = eta * (self.lam[l] * np.einsum("rkp,p->rk", A, Ys)
                        + cst[l, 0, 0] * np.einsum("rkj,j->rk", d.C, r)) + eta * m * h
            if self.layers.weight_decay:
                dr = dr - self.layers.weight_decay * r
            hr = np.einsum("rk,j->rkj", h, r)
            dQ = dQ.copy()
            dR = dR.copy()
            dQ[:, l] += eta * m * (hr + np.swapaxes(hr, -1, -2))
            dR[:, l] += eta * m * np.einsum("rk,n->rkn", h, self.s)
            dp[MEAN_OVERLAP] = dr
        dQ, dQe = _mean_err(dQ)
        dR, dRe = _mean_err(dR)
        eps, epse = _mean_err(d.eps)
        dpm, dpe = {}, {}
        for k, v in dp.items():
            dpm[k], dpe[k] = _mean_err(np.broadcast_to(v, (d.eps.shape[0], K)))
        return Rates(0.5 * (dQ + np.swapaxes(dQ, -1, -2)), dR, dpm, float(eps), dQe, dRe,
                     dpe, float(epse))

    def drift(self, Q: Any, R: Any, params: Mapping[str, Any] | None = None, *,
              eta: float, second_order: bool = True, check: bool = True,
              mean: Any = None, weights_gram: Any = None) -> Any:
        """The wrapped engine's :meth:`~Engine.drift` at the totals of ``(Q, R)`` (with an
        input mean: at the pre-activation mean of the state's ``"mean_overlap"``, unless
        ``mean`` is given)."""
        Qt, Rt = self._as_totals(Q, R)
        r, p = self._split(self.params(params))
        if mean is None and r is not None:
            mean = self.pre_activation_mean(r)
        return self.base.drift(Qt, Rt, p, eta=eta, second_order=second_order,
                               check=check, mean=mean, **self._gram_kw(Q, weights_gram))

    def _gram_kw(self, Q: Any, given: Any = None) -> dict[str, Any]:
        """``{"weights_gram": sum_l Q_l}`` for weight statistics (:meth:`weights_gram`;
        ``given`` instead if not None), else nothing (the wrapped engine's statistics at
        the pre-activation covariance)."""
        if not self.weight_stats:
            return {}
        return {"weights_gram": self.weights_gram(Q) if given is None else given}

    def generalization_error(
        self, Q: Any, R: Any, params: Mapping[str, Any] | None = None, *, check: bool = True,
        mean: Any = None, weights_gram: Any = None,
    ) -> tuple[float, float]:
        """``eps_g`` of a state per eigenspace (``Q (L, K, K)``) or of the totals
        (``Qt (K, K)``): the wrapped engine's at ``(Qt, Rt)`` (and, with an input mean, at
        the pre-activation mean ``m [r; s]`` of the entry ``"mean_overlap"`` of
        ``params``, default ``r = 0``, unless ``mean`` is given)."""
        Qt, Rt = self._as_totals(Q, R)
        r, p = self._split(self.params(params))
        if mean is None and r is not None:
            mean = self.pre_activation_mean(r)
        return self.base.generalization_error(Qt, Rt, p, check=check, mean=mean,
                                              **self._gram_kw(Q, weights_gram))

    def held_hessian(self, Q: Any, R: Any, params: Mapping[str, Any] | None = None
                     ) -> np.ndarray:
        """The wrapped engine's block of held parameters at the totals of ``(Q, R)``
        (parameters are not inputs: the input covariance enters only through ``(Qt,
        Rt)``)."""
        Qt, Rt = self._as_totals(Q, R)
        return self.base.held_hessian(Qt, Rt, None if params is None else self._split(
            self.params(params))[1])

    # -- weight space --------------------------------------------------------------------
    def column_scale(self, D: int) -> np.ndarray:
        """``sqrt(lambda_l)`` per coordinate of a realization in ``D = L w`` dimensions laid
        out as ``L`` blocks of ``w`` coordinates, block ``l`` in eigenspace ``l`` (the
        layout of :func:`framework.theory.equilibrium.weight_space_hessian`)."""
        if D % self.L:
            raise SpecificationError(
                f"a realization with structured inputs must have L = {self.L} blocks of "
                f"equal width (one per eigenspace), got {D} coordinates")
        return np.repeat(np.sqrt(self.lam), D // self.L)

    def mean_column(self, D: int) -> int:
        """Inputs with a mean: the coordinate of the mean direction ``u`` in a realization
        of ``D = L w`` coordinates (:meth:`column_scale`): the first of eigenspace
        ``mean_space``'s block."""
        return self.l_mu * (D // self.L)

    def weight_moments(self, X: Any, Bt: Any, params: Mapping[str, Any] | None = None, *,
                       landscape: bool = True, shift: Any = None,
                       weights_metric: Any = None,
                       ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``eps_g``, ``dF/dX`` and ``dF/dtheta`` for a realization ``X (K, D)``, ``Bt (M,
        D)`` in the eigenbasis (:meth:`column_scale`): ``F(X) = F_iso(X Sigma^(1/2))``,
        the wrapped engine's at the whitened weights, so ``dF/dX = (dF_iso/dX')
        Sigma^(1/2)``. With an input mean the realization's coordinate
        :meth:`mean_column` is the mean direction ``u`` (its entries are ``r`` and ``s``),
        and the whitened inputs have the mean ``(m / sqrt(lambda_mu)) u``; ``shift`` is
        not taken (the inputs are the model's)."""
        eps, g, gt = self.weight_moments_stack(np.asarray(X, dtype=float)[None], Bt, params,
                                               landscape=landscape, shift=shift,
                                               weights_metric=weights_metric)
        return eps[0], g[0], {k: v[0] for k, v in gt.items()}

    def weight_moments_stack(self, Xs: Any, Bt: Any, params: Mapping[str, Any] | None = None,
                             *, landscape: bool = True, shift: Any = None,
                             weights_metric: Any = None,
                             ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """:meth:`weight_moments` over a stack ``Xs (S, K, D)``."""
        if shift is not None or weights_metric is not None:
            raise SpecificationError(
                "SpectralEngine.weight_moments takes the model's inputs, not a 'shift' or "
                "'weights_metric'")
        Xs, Bt = np.asarray(Xs, dtype=float), np.asarray(Bt, dtype=float)
        D = Xs.shape[-1]
        c = self.column_scale(D)
        p = None if params is None else {k: v for k, v in params.items() if k != MEAN_OVERLAP}
        kw: dict[str, Any] = {}
        if self.has_mean:
            mu = np.zeros(D)
            mu[self.mean_column(D)] = self.m / math.sqrt(self.lam[self.l_mu])
            kw["shift"] = mu
        if self.weight_stats:  # the statistics of the unwhitened weights X = X' / c
            kw["weights_metric"] = 1.0 / (c * c)
        eps, g, gt = self.base.weight_moments_stack(Xs * c, Bt * c, p, landscape=landscape,
                                                    **kw)
        return eps, g * c, gt

    def integrate(self, Q0: Any, R0: Any, **kwargs: Any) -> Trajectory:
        """:meth:`Engine.integrate` over the blocks; ``Q0, R0`` per eigenspace or
        ``(K, K)``, ``(K, M)`` lifted (:meth:`lift`). The trajectory's ``Q``, ``R`` are
        the pre-activation covariances ``Qt``, ``Rt`` and ``spaces`` holds the blocks."""
        Q0, R0 = self.lift(Q0, R0)
        tr = super().integrate(Q0, R0, **kwargs)
        Qt, Rt = self.totals(tr.Q, tr.R)
        fields = {f: getattr(tr, f) for f in tr.__dataclass_fields__}
        spaces = {"Q": tr.Q, "R": tr.R}
        if self.has_mean:  # the mean overlap is state, not a parameter
            params = dict(tr.params)
            spaces["r"] = params.pop(MEAN_OVERLAP)
            fields["params"] = params
        fields.update(Q=Qt, R=Rt, spaces=spaces,
                      description=self.describe(), eps_g_method=(
                          "the wrapped engine's eps_g at the pre-activation covariances "
                          "(Qt, Rt) of the integrated blocks; in the converged phase it is "
                          "a difference of O(1) terms, accurate to ~1e-11 absolute (values "
                          "below that, of either sign, are rounding): the deviation "
                          "variables of the isotropic tail are not available with "
                          "structured inputs"))
        return Trajectory(**fields)

    # -- description -------------------------------------------------------------------
    def describe(self) -> str:
        return (f"{self.base.describe()}; per input eigenspace ({self.inputs.describe()}, "
                f"Stein reduction through the pseudo-inverse of the pre-activation "
                f"covariance)")

    def attrs(self) -> dict[str, Any]:
        return {**self.base.attrs(), "engine_description": self.describe(),
                "inputs": self.inputs.describe()}


def _mean_err(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the leading replicate axis and its standard error (0 for one)."""
    values = np.asarray(values, dtype=float)
    n = values.shape[0]
    if n < 2:
        return values[0], np.zeros(values.shape[1:])
    return values.mean(axis=0), values.std(axis=0, ddof=1) / math.sqrt(n)
