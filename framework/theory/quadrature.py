"""Generic expectation engine: the general order-parameter ODE for *any* normalization
and *any* activation, by randomized quasi-Monte Carlo over the pre-activations.

The closed-form engine (:mod:`framework.theory._kernels`) covers the erf activation with a
normalization of the diagonal-scale family. Everything else -- layer norm, a learnable
shift, weight norm with a trained gain, relu/tanh/linear activations, a user's plugin --
comes here. Only the normalization's per-sample interface is used
(:class:`~framework.Normalization`): ``population_statistics``, ``forward``,
``backward`` and ``population_statistics_vjp``.

Mathematics (DESIGN.md, "General ODE")
--------------------------------------
``(x, y) ~ N(0, Sigma)``, ``Sigma = [[Q, R], [R^T, T]]``; ``stats =
population_statistics(Q)``; ``x~ = forward(x, stats, theta)``; ``e = sum_n g(y_n) -
sum_i g(x~_i)`` (noise-free error); ``b = d sigma / d x`` etc. from ``backward`` with
``grad_out = g'(x~)``. As ``backward`` is a vector-Jacobian product (linear in
``grad_out``), the loss gradients are ``d eps / d . = -(e + nu) d sigma / d .`` with
the output noise ``nu`` (variance ``model.noise``), which is averaged exactly::

    a = -d eps / dx = (e + nu) b
    E[a x^T] = E[e b x^T],  E[a y^T] = E[e b y^T]
    E[a a^T] = E[e^2 b b^T] + noise * E[b b^T]
    Gbar     = population_statistics_vjp(Q, E[d eps / d stats]),  C = -(Gbar + Gbar^T)
    dR/dalpha     = eta (E[a y^T] + C R)
    dQ/dalpha     = eta (E[a x^T] + E[x a^T] + C Q + Q C^T) + (eta^2 / B) E[a a^T]
    dtheta/dalpha = -eta E[d eps / d theta]      (trainable parameters)
    eps_g         = E[e^2] / 2 + noise / 2

The parameter equation matches the ``simulation`` analyzer's update ``theta <- theta -
(eta / N) * (batch mean of d loss / d theta)`` per step: with ``alpha = steps / N``
the parameters move on the same time scale as ``Q`` and ``R`` and their ``eta^2``
term vanishes as ``N -> infinity``.

Quadrature
----------
``Sigma = L L`` with ``L`` the symmetric square root (eigen-decomposition, negative
rounding eigenvalues clipped), which is smooth in ``(Q, R)`` on positive-definite
states. The samples are ``u = z L`` for *fixed* standard-normal base points ``z``
(common random numbers): ``replicates`` independently scrambled Sobol' sequences of
``samples`` points each (method ``"sobol"``, randomized QMC) or pseudo-random points
(``"montecarlo"``), mapped through the normal quantile function. Each estimate is the
mean over replicates and its error estimate is the standard error of the replicate
means (exact error propagation, since every output is linear in the replicate
expectations). With smooth activations the RQMC error decreases roughly as
``1 / samples``; an activation with kinks (relu) converges more slowly, and the
right-hand side is then only piecewise smooth in the state (adaptive integrators
should use a tolerance well above the quadrature error).

If any expectation's error estimate exceeds ``accuracy * max(1, |value|)``,
:class:`AccuracyError` is raised instead of returning noise.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import numpy as np
from scipy import special

from framework.activation import Activation
from framework.model import Model
from framework.normalization import Normalization
from framework.theory.base import AccuracyError, Drift, Engine, Rates, Trajectory, pinv_psd
from framework.validators import SpecificationError, gt, integer, one_of, to_float

if TYPE_CHECKING:
    from framework.learning_rule import LearningRule

__all__ = [
    "AccuracyError",
    "ExpectationEngine",
    "GenericRates",
    "GenericTrajectory",
    "Quadrature",
]



def _power_of_two(instance: Any, attribute: Any, value: int) -> None:
    if instance.method == "sobol" and (value & (value - 1)) != 0:
        raise SpecificationError(
            f"'samples' must be a power of 2 with method='sobol', got {value} "
            f"(e.g. {1 << max(value - 1, 1).bit_length()})"
        )


@attrs.frozen
class Quadrature:
    """Accuracy settings of the generic engine.

    Parameters
    ----------
    samples : int
        Points per replicate (a power of 2 for ``"sobol"``); default 4096.
    replicates : int
        Independent randomizations (>= 2); the error estimate is the standard error
        of their means. Default 16.
    accuracy : float
        Largest acceptable error estimate of any expectation, as
        ``accuracy * max(1, |value|)``; beyond it :class:`AccuracyError` is raised.
        Default 5e-3 (smooth activations reach ~1e-5 with the default samples, relu
        ~1e-3; an integrand of infinite variance fails).
    method : str
        ``"sobol"`` (scrambled Sobol', randomized QMC; default) or ``"montecarlo"``.
    seed : int
        Seed of the base points (fixed: results are deterministic and smooth in the
        state).
    """

    METHODS: ClassVar[tuple[str, ...]] = ("sobol", "montecarlo")

    method: str = attrs.field(default="sobol", validator=one_of("sobol", "montecarlo"))
    samples: int = attrs.field(default=4096, validator=[integer(minimum=16), _power_of_two])
    replicates: int = attrs.field(default=16, validator=integer(minimum=2))
    accuracy: float = attrs.field(default=5e-3, converter=to_float, validator=gt(0.0))
    seed: int = attrs.field(default=0, validator=integer(minimum=0))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Quadrature:
        """Build from a mapping of options (``None``: defaults)."""
        data = dict(data or {})
        allowed = [f.name for f in attrs.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise SpecificationError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for quadrature; "
                f"valid options: {', '.join(map(repr, allowed))}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def describe(self) -> str:
        kind = "randomized quasi-Monte Carlo (scrambled Sobol')" if self.method == "sobol" \
            else "Monte Carlo"
        return (f"{kind}: {self.replicates} replicates x {self.samples} points, seed "
                f"{self.seed}; error = standard error of the replicate means; "
                f"accuracy {self.accuracy:g}")


@functools.lru_cache(maxsize=32)
def _base_points(method: str, dim: int, samples: int, replicates: int, seed: int) -> np.ndarray:
    """Standard-normal base points, shape ``(replicates, samples, dim)`` (shared: never
    modify them)."""
    from scipy.stats import qmc  # lazy: scipy.stats costs ~0.2 s to import

    seeds = np.random.SeedSequence([seed, dim, samples]).spawn(replicates)
    out = np.empty((replicates, samples, dim))
    for r, ss in enumerate(seeds):
        rng = np.random.default_rng(ss)
        if method == "sobol":
            u = qmc.Sobol(d=dim, scramble=True, seed=rng).random_base2(int(math.log2(samples)))
            out[r] = special.ndtri(np.clip(u, 1e-16, 1.0 - 1e-16))
        else:
            out[r] = rng.standard_normal((samples, dim))
    return out  # kept writeable: numpy's matmul is ~20x slower on read-only operands


def _sqrtm_psd(S: np.ndarray) -> np.ndarray | None:
    """Symmetric square root of a PSD matrix; None if clearly indefinite or non-finite.

    Eigenvalues below the numerical-rank tolerance ``dim * eps * max|lambda|`` (those
    ``eigh`` cannot tell from zero) are set to zero rather than square-rooted: the root of
    a rounding-level eigenvalue is ~1e-8 of the scale and would make units with identical
    weights (a singular covariance, an invariant set of the dynamics) differ at 1e-8.
    """
    if not np.all(np.isfinite(S)):
        return None
    S = 0.5 * (S + S.T)
    lam, vec = np.linalg.eigh(S)
    scale = max(float(np.max(np.abs(lam))), 1e-300)
    if lam[0] < -1e-9 * scale:
        return None
    lam = np.where(lam > S.shape[0] * np.finfo(float).eps * scale, lam, 0.0)
    return (vec * np.sqrt(lam)) @ vec.T


#: :meth:`ExpectationEngine.boundary_estimates`: eigenvalues of the pre-activation
#: covariance down to ``-BOUNDARY_CLIP`` times the largest are taken as 0 (a state
#: beyond the cone by rounding or by a finite-difference step's second-order curvature);
#: those in ``(0, BOUNDARY_NEAR)`` times the largest (at most ``BOUNDARY_FLIPS``, the
#: smallest) have their root's column taken with both signs.
BOUNDARY_CLIP = 1e-4
BOUNDARY_NEAR = 1e-2
BOUNDARY_FLIPS = 3


def _boundary_roots(S: np.ndarray) -> list[np.ndarray] | None:
    """Roots ``L`` (``L^T L = S``) for :meth:`ExpectationEngine.boundary_estimates`;
    None if ``S`` is clearly indefinite (below ``-BOUNDARY_CLIP``) or non-finite.

    The eigen-decomposition ``S = V diag(lambda) V^T`` with negative eigenvalues within
    ``BOUNDARY_CLIP`` and rounding-level ones set to 0; each small eigenvalue
    (``0 < lambda < BOUNDARY_NEAR`` of the largest) contributes its column ``sqrt(lambda)
    v`` with both signs: one root ``V diag(+-sqrt(lambda)) V^T`` per sign pattern, whose
    samples the estimate averages. The odd powers of ``sqrt(lambda)`` -- which make a
    sample estimate at a nearly singular covariance behave like ``sqrt(lambda)``, not
    smooth at the boundary, though the expectation is analytic in ``lambda`` -- then
    cancel exactly (for every sample set): the estimate is a smooth function of ``S``
    up to the boundary (a degenerate pair of small eigenvalues excepted: the basis of
    their eigenspace is arbitrary; :func:`~framework.theory.equilibrium.ode_jacobian`
    steps along directions that split them).
    """
    if not np.all(np.isfinite(S)):
        return None
    S = 0.5 * (S + S.T)
    lam, vec = np.linalg.eigh(S)
    scale = max(float(np.max(np.abs(lam))), 1e-300)
    if lam[0] < -BOUNDARY_CLIP * scale:
        return None
    lam = np.where(lam > S.shape[0] * np.finfo(float).eps * scale, lam, 0.0)
    root = np.sqrt(lam)
    small = np.flatnonzero((lam > 0.0) & (lam < BOUNDARY_NEAR * scale))[:BOUNDARY_FLIPS]
    out = []
    for signs in itertools.product((1.0, -1.0), repeat=small.size):
        r = root.copy()
        r[small] *= signs
        out.append((vec * r) @ vec.T)
    return out


#: Former names of the result types (kept for plugin code written against them).
GenericRates = Rates
GenericTrajectory = Trajectory


_NAMES = {
    "eps": "eps_g",
    "ax": "E[a x^T]",
    "ay": "E[a y^T]",
    "aa": "E[a a^T]",
    "gs": "E[d eps / d stats] pulled back to Q",
    "Ea": "E[a]",
    "gm": "E[d eps / d stats] pulled back to the pre-activation mean",
}


def _population_statistics(norm: Normalization, Q: np.ndarray, mean: np.ndarray | None
                           ) -> dict[str, np.ndarray]:
    """The normalization's population statistics at covariance ``Q`` (and mean)."""
    if not norm.statistics_names:
        return {}
    if mean is None:
        return norm.population_statistics(Q)
    return norm.population_statistics_with_mean(Q, mean)


class ExpectationEngine(Engine):
    """The general ODE of one (model, normalization) pair by quadrature (any
    normalization, any activation; :class:`~framework.theory.base.Engine`).

    Parameters
    ----------
    model : Model
    normalization : Normalization
    activation : Activation
        The model's activation (``g`` and ``gprime`` are used).
    quadrature : Quadrature, optional
        Accuracy settings (default :class:`Quadrature()`).
    """

    name = "generic"
    exact = False
    supports_input_mean = True
    supports_weight_statistics = True

    def __init__(
        self,
        model: Model,
        normalization: Normalization,
        activation: Activation,
        quadrature: Quadrature | None = None,
    ) -> None:
        super().__init__(model, normalization, activation, quadrature)
        self.quadrature = quadrature if quadrature is not None else Quadrature()
        q = self.quadrature
        self._z = _base_points(q.method, self.K + self.M, q.samples, q.replicates, q.seed)
        self._boundary = False  # boundary_estimates()

    @contextlib.contextmanager
    def boundary_estimates(self) -> Iterator[None]:
        """Within it the expectations use :func:`_boundary_roots`: states beyond the
        cone within ``BOUNDARY_CLIP`` (relative) are taken as on its boundary, and the
        estimate is smooth up to it (the root's columns of small eigenvalues taken with
        both signs: up to ``2^BOUNDARY_FLIPS`` times the samples). Outside it the
        estimate is unchanged (one symmetric root, :func:`_sqrtm_psd`)."""
        before = self._boundary
        self._boundary = True
        try:
            yield
        finally:
            self._boundary = before

    @classmethod
    def supports(
        cls,
        model: Model,
        normalization: Normalization,
        activation: Activation,
        params: Mapping[str, Any] | None = None,
        rule: LearningRule | None = None,
    ) -> str | None:
        """Every triple (only the per-sample ``forward``/``backward`` are used), under
        any learning rule that accepts this engine
        (:meth:`~framework.theory.Engine.supports_rule`)."""
        return cls.supports_rule(rule, model, normalization, activation)

    def describe(self) -> str:
        """One line for attrs."""
        return "generic expectation engine: " + self.quadrature.describe()

    def attrs(self) -> dict[str, Any]:
        """The base attrs plus ``quadrature`` (its description)."""
        return {**super().attrs(), "quadrature": self.quadrature.describe()}

    # -- the expectations ----------------------------------------------------------------
    def _replicate_moments(
        self, Q: np.ndarray, R: np.ndarray, params: Mapping[str, np.ndarray],
        *, second_order: bool = True, gradients: bool = True, mean: Any = None,
        weights_gram: Any = None,
    ) -> dict[str, Any] | None:
        """Per-replicate expectations (leading axis = replicate); None if invalid state.

        ``weights_gram``: the statistics (and ``gs``, their pull-back) at the weights'
        Gram matrix instead of ``Q`` (a normalization with ``weight_statistics``).

        ``mean``: the pre-activation mean ``(K + M,)`` (None: centred). Then ``ax``,
        ``ay`` are about the centred pre-activations, ``E[a (u - mean)^T]``, and ``Ea =
        E[a]``, ``gm = E[d eps / d mean]`` (through the statistics) are added."""
        K = self.K
        Sigma = np.block([[Q, R], [R.T, self.T]])
        one = None if self._boundary else _sqrtm_psd(Sigma)
        roots = _boundary_roots(Sigma) if self._boundary else (None if one is None else [one])
        if roots is None:
            return None
        z = self._z
        # einsum, not matmul: a threaded BLAS gemm with an inner dimension of K + M is
        # erratic (up to 30x slower) on a loaded machine
        uc = np.concatenate([np.einsum("rnp,pq->rnq", z, L) for L in roots], axis=1) \
            if len(roots) > 1 else np.einsum("rnp,pq->rnq", z, roots[0])  # centred
        Rn, n, _ = uc.shape
        mu = None if mean is None else np.asarray(mean, dtype=float).reshape(K + self.M)
        u = uc if mu is None else uc + mu
        x, y = np.ascontiguousarray(u[..., :K]), np.ascontiguousarray(u[..., K:])
        norm, act = self.normalization, self.activation
        w = self.error_weights(params)
        a = -w[:K]
        params = self.norm_params(params)
        Gs = Q if weights_gram is None else np.asarray(weights_gram, dtype=float)
        stats = _population_statistics(norm, Gs, None if mu is None else mu[:K])
        xt = norm.forward(x, stats, params)
        gxt = act.g(xt)
        e = (act.g(y) * w[K:]).sum(axis=-1) - (gxt * a).sum(axis=-1)  # (R, n)
        out: dict[str, Any] = {"eps": 0.5 * np.mean(e * e, axis=1) + 0.5 * self.noise}
        if not gradients:
            return out
        back = norm.backward(x, stats, params, a * act.gprime(xt))  # d sigma / d .
        b = np.broadcast_to(back.x, x.shape)
        ebT = np.ascontiguousarray(np.swapaxes(e[..., None] * b, 1, 2))  # (R, K, n)
        au = ebT @ uc / n  # E[a (u - mean)^T] per replicate, (R, K, P)
        out["ax"], out["ay"] = au[..., :K], au[..., K:]
        if mu is not None:
            out["Ea"] = ebT.mean(axis=2)
        if second_order:
            aa = ebT @ np.swapaxes(ebT, 1, 2) / n
            if self.noise:
                bT = np.ascontiguousarray(np.swapaxes(b, 1, 2))
                aa = aa + self.noise * (bT @ np.swapaxes(bT, 1, 2)) / n
            out["aa"] = aa
        if norm.statistics_names:
            grad_stats = {
                k: -np.mean(e[..., None] * np.broadcast_to(back.stats[k], x.shape), axis=1)
                for k in norm.statistics_names
            }
            Qr = np.broadcast_to(Gs, (Rn, K, K))
            if mu is None:
                out["gs"] = np.asarray(norm.population_statistics_vjp(Qr, grad_stats),
                                       dtype=float)
            else:
                gQ, gm = norm.population_statistics_with_mean_vjp(
                    Qr, np.broadcast_to(mu[:K], (Rn, K)), grad_stats)
                out["gs"] = np.asarray(gQ, dtype=float)
                out["gm"] = np.broadcast_to(np.asarray(gm, dtype=float), (Rn, K))
        else:
            out["gs"] = np.zeros((Rn, K, K))
            if mu is not None:
                out["gm"] = np.zeros((Rn, K))
        # -E[d eps / d theta] = E[e d sigma / d theta]  (= dtheta/dalpha / eta)
        out["params"] = {
            k: np.mean(e[..., None] * np.broadcast_to(back.params[k], x.shape), axis=1)
            for k in self.trainable if k not in self.model_trainable
        }
        if self.model_trainable:  # -d eps / d a_i = E[e g(x~_i)] (a = c_K v)
            out["readout"] = np.mean(e[..., None] * gxt, axis=1)
        return out

    def _check(self, quantities: Mapping[str, np.ndarray]) -> None:
        """Raise :class:`AccuracyError` if a standard error is beyond the accuracy.

        ``quantities`` maps a readable name to per-replicate values (leading axis);
        the message names the worst offender and lists the others.
        """
        acc = self.quadrature.accuracy
        worst: tuple[float, str, tuple[int, ...], float, float] | None = None
        failing = []
        for name, values in quantities.items():
            values = np.asarray(values)
            mean = values.mean(axis=0)
            err = values.std(axis=0, ddof=1) / math.sqrt(values.shape[0])
            if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(err))):
                continue  # invalid states propagate as NaN; callers decide
            ratio = np.ravel(err / (acc * np.maximum(1.0, np.abs(mean))))
            j = int(np.argmax(ratio))
            if ratio[j] > 1.0:
                failing.append(name)
                idx = tuple(int(i) for i in np.unravel_index(j, np.shape(mean))) \
                    if np.ndim(mean) else ()
                if worst is None or ratio[j] > worst[0]:
                    worst = (float(ratio[j]), name, idx, float(np.ravel(err)[j]),
                             float(np.ravel(mean)[j]))
        if worst is None:
            return
        _, name, idx, err, mean = worst
        q = self.quadrature
        where = f" at entry {idx}" if idx else ""
        others = [f for f in failing if f != name]
        also = f" (also beyond: {', '.join(others)})" if others else ""
        raise AccuracyError(
            f"generic engine: the error estimate of {name}{where} is {err:.3g} "
            f"(value {mean:.6g}), above accuracy={acc:g} * max(1, |value|){also}, with "
            f"{q.replicates} x {q.samples} {q.method} points for normalization "
            f"{self.normalization.name!r} and activation {self.activation.name!r}; "
            f"increase 'samples' or relax 'accuracy' (or the integrand has infinite "
            f"variance here)"
        )

    @staticmethod
    def _mean_err(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values = np.asarray(values)
        return values.mean(axis=0), values.std(axis=0, ddof=1) / math.sqrt(values.shape[0])

    def generalization_error(
        self, Q: Any, R: Any, params: Mapping[str, Any] | None = None, *, check: bool = True,
        mean: Any = None, weights_gram: Any = None,
    ) -> tuple[float, float]:
        """``(eps_g, error estimate)`` at ``(Q, R)`` (noise term included); ``mean``: the
        pre-activation mean ``(K + M,)`` (None: centred); ``weights_gram``: see
        :meth:`~framework.theory.Engine.drift`."""
        Q, R = np.asarray(Q, dtype=float), np.asarray(R, dtype=float)
        mom = self._replicate_moments(Q, R, self.params(params), gradients=False, mean=mean,
                                      weights_gram=weights_gram)
        if mom is None:
            return math.nan, math.nan
        if check:
            self._check({_NAMES["eps"]: mom["eps"]})
        v, err = self._mean_err(mom["eps"])
        return float(v), float(err)

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
        """Per-replicate ``eps_g``, ``dF/dX`` and ``dF/dtheta`` in weight space.

        ``F(X, theta) = eps_g(X X^T, X Bt^T; theta)`` for a realization ``X (K, D)``,
        ``Bt (M, D)`` of the order parameters (``W = J / sqrt(N)`` restricted to ``D``
        dimensions). The samples are ``x = X xi``, ``y = Bt xi`` with ``xi ~ N(0, I_D)``
        (the engine's randomized QMC base points in ``D`` dimensions, common random
        numbers): every per-replicate estimate is a smooth function of ``X`` and
        ``theta`` for a smooth activation, so finite differences of it are accurate.
        ``dF/dX = E[d eps / dx xi^T] + (Gbar + Gbar^T) X`` with ``Gbar`` the pull-back
        of ``E[d eps / d stats]`` to ``Q``. ``shift`` ``(D,)``: inputs with a mean, ``xi ~
        N(shift, I_D)`` (the pre-activation means ``X shift``, ``Bt shift``, which the
        population statistics see; their path adds ``E[d eps / d mean] shift^T`` to
        ``dF/dX``). With ``landscape=True`` and a normalization
        whose ``statistics_gradient`` is False (gradients do not flow through its
        statistics, so its ``population_statistics_vjp`` is zero by design) the pull-back
        is taken by central differences of ``population_statistics`` instead: the result
        is the gradient of ``eps_g`` (the loss landscape), not the SGD drift.
        ``weights_metric`` ``(D,)``: the statistics of a normalization with
        ``weight_statistics`` at ``X diag(weights_metric) X^T`` (their path adds ``(Gbar +
        Gbar^T) X diag(weights_metric)``).
        Returns ``(eps (R,), dF/dX (R, K, D), {name: dF/dtheta (R, K)})``.
        """
        X = np.asarray(X, dtype=float)
        Bt = np.asarray(Bt, dtype=float)
        K, D = X.shape
        q = self.quadrature
        z = _base_points(q.method, D, q.samples, q.replicates, q.seed)
        mu = None if shift is None else np.asarray(shift, dtype=float).reshape(D)
        if mu is not None:
            z = z + mu  # a copy: the base points are shared
        n = z.shape[1]
        x = np.ascontiguousarray(np.einsum("rnd,kd->rnk", z, X))
        y = np.ascontiguousarray(np.einsum("rnd,md->rnm", z, Bt))
        Xs_ = X if weights_metric is None else X * np.asarray(weights_metric, dtype=float)
        Q = X @ Xs_.T  # the statistics' Gram matrix (X X^T without a metric)
        p = self.params(params)
        w = self.error_weights(p)
        a = -w[:K]
        p = self.norm_params(p)
        norm, act = self.normalization, self.activation
        mx = None if mu is None else X @ mu
        stats = _population_statistics(norm, Q, mx)
        xt = norm.forward(x, stats, p)
        gxt = act.g(xt)
        e = (act.g(y) * w[K:]).sum(axis=-1) - (gxt * a).sum(axis=-1)
        eps = 0.5 * np.mean(e * e, axis=1) + 0.5 * self.noise
        back = norm.backward(x, stats, p, a * act.gprime(xt))
        b = np.broadcast_to(back.x, x.shape)
        ebT = np.ascontiguousarray(np.swapaxes(e[..., None] * b, 1, 2))  # (R, K, n)
        gX = -(ebT @ z) / n
        if norm.statistics_names:
            gstats = {k: -np.mean(e[..., None] * np.broadcast_to(back.stats[k], x.shape), axis=1)
                      for k in norm.statistics_names}
            Rn = z.shape[0]
            if mx is not None and mu is not None:  # the statistics of the mean and covariance
                if landscape and not norm.statistics_gradient:
                    Gbar, gm = _statistics_vjp_fd_mean(norm, Q, mx, gstats)
                else:
                    Gq, gm0 = norm.population_statistics_with_mean_vjp(
                        np.broadcast_to(Q, (Rn, K, K)), np.broadcast_to(mx, (Rn, K)), gstats)
                    Gbar, gm = np.asarray(Gq, dtype=float), np.asarray(gm0, dtype=float)
                gX = gX + np.einsum("rk,d->rkd", np.broadcast_to(gm, (Rn, K)), mu)
            elif landscape and not norm.statistics_gradient:
                Gbar = _statistics_vjp_fd(norm, Q, gstats)
            else:
                Gbar = np.asarray(norm.population_statistics_vjp(
                    np.broadcast_to(Q, (Rn, K, K)), gstats), dtype=float)
            gX = gX + (Gbar + np.swapaxes(Gbar, 1, 2)) @ Xs_
        gtheta = {k: -np.mean(e[..., None] * np.broadcast_to(back.params[k], x.shape), axis=1)
                  for k in self.trainable if k not in self.model_trainable}
        if self.model_trainable:  # d eps_g / d v = -c_K E[e g(x~)]
            gtheta["v"] = -self.layers.c_student * np.mean(e[..., None] * gxt, axis=1)
        return eps, gX, gtheta

    def _checked_moments(self, Q: np.ndarray, R: np.ndarray, p: Mapping[str, np.ndarray],
                         second_order: bool, check: bool, mean: Any = None,
                         weights_gram: Any = None) -> dict[str, Any] | None:
        """:meth:`_replicate_moments` with the accuracy check (None: invalid state)."""
        mom = self._replicate_moments(Q, R, p, second_order=second_order, mean=mean,
                                      weights_gram=weights_gram)
        if mom is not None and check:
            self._check({
                **{_NAMES[key]: mom[key] for key in ("eps", "ax", "ay", "aa", "gs", "Ea", "gm")
                   if key in mom},
                **{f"E[d eps / d {k}]": v for k, v in mom["params"].items()},
                **({"E[d eps / d v]": mom["readout"]} if "readout" in mom else {}),
            })
        return mom

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
        """The per-replicate expectations of the per-sample gradient
        (:class:`~framework.theory.Drift`); NaN everywhere at an invalid state. ``mean``:
        the pre-activation mean ``(K + M,)`` (None: centred; then ``Drift.Ea`` and
        ``Drift.b`` are set); ``weights_gram``: the weights' Gram matrix for a
        normalization with ``weight_statistics`` (``Drift.C`` its pull-back)."""
        Q, R = np.asarray(Q, dtype=float), np.asarray(R, dtype=float)
        Q = 0.5 * (Q + Q.T)
        p = self.params(params)
        K, P, r = self.K, self.K + self.M, self.quadrature.replicates
        mom = self._checked_moments(Q, R, p, second_order, check, mean, weights_gram)
        if mom is None:
            nan = np.full((r, K), np.nan)
            return Drift(np.full((r, K, P), np.nan), np.full((r, K, P), np.nan),
                         np.full((r, K, K), np.nan),
                         np.full((r, K, K), np.nan),
                         {k: nan for k in self.trainable if k not in self.model_trainable},
                         nan if self.model_trainable else None, np.full(r, np.nan),
                         None if mean is None else nan, None if mean is None else nan)
        gs = mom["gs"]
        aa = mom["aa"] if second_order else np.zeros((r, K, K))
        au = np.concatenate([mom["ax"], mom["ay"]], axis=-1)
        A = au @ pinv_psd(np.block([[Q, R], [R.T, self.T]]))  # Stein: E[a u^T] = A Sigma
        return Drift(au, A, -(gs + np.swapaxes(gs, 1, 2)), aa,
                     {k: eta * v for k, v in mom["params"].items()},
                     None if "readout" not in mom else -mom["readout"], mom["eps"],
                     mom.get("Ea"), None if "gm" not in mom else -mom["gm"])

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
        """``dQ/dalpha``, ``dR/dalpha``, ``dtheta/dalpha`` and ``eps_g`` with errors."""
        Q, R = np.asarray(Q, dtype=float), np.asarray(R, dtype=float)
        Q = 0.5 * (Q + Q.T)
        p = self.params(params)
        mom = self._checked_moments(Q, R, p, second_order, check)
        if mom is None:
            return self.nan_rates()
        gs = mom["gs"]
        C = -(gs + np.swapaxes(gs, 1, 2))
        ax = mom["ax"]
        CQ = C @ Q
        dQ = eta * (ax + np.swapaxes(ax, 1, 2) + CQ + np.swapaxes(CQ, 1, 2))
        if second_order:
            dQ = dQ + (eta**2 / batch_size) * mom["aa"]
        dR = eta * (mom["ay"] + C @ R)
        Qr = np.broadcast_to(Q, dQ.shape)
        Rr = np.broadcast_to(R, dR.shape)
        # weight decay and the trained readout's rate, per replicate (linear in them)
        dQ, dR, dv = self.layer_rates(Qr, Rr, p, dQ, dR,
                                      None if "readout" not in mom else -mom["readout"])
        dQ, dQe = self._mean_err(dQ)
        dR, dRe = self._mean_err(dR)
        eps, epse = self._mean_err(mom["eps"])
        dp, dpe = {}, {}
        for k, v in mom["params"].items():
            dp[k], dpe[k] = self._mean_err(eta * v)
        for k, v in dv.items():
            dp[k], dpe[k] = self._mean_err(v)
        return Rates(0.5 * (dQ + dQ.T), dR, dp, float(eps), dQe, dRe, dpe, float(epse))

    # -- integration --------------------------------------------------------------------


def _statistics_vjp_fd(
    norm: Normalization, Q: np.ndarray, grad: Mapping[str, np.ndarray]
) -> np.ndarray:
    """Pull-back of ``grad`` (name -> (R, K)) through ``population_statistics`` at ``Q``
    by central differences (symmetric perturbations of ``Q``; ``h = 1e-6 max(1, |Q|)``).

    Used for the loss landscape of normalizations that pass no gradient through their
    statistics. Returns ``(R, K, K)`` with ``Gbar + Gbar^T`` the symmetric gradient.
    """
    K = Q.shape[0]
    h = 1e-6 * max(1.0, float(np.max(np.abs(Q))))
    Rn = next(iter(grad.values())).shape[0]
    out = np.zeros((Rn, K, K))
    for j in range(K):  # K (K + 1) / 2 evaluations of a cheap deterministic map
        for k in range(j, K):
            E = np.zeros((K, K))
            E[j, k] = E[k, j] = h
            plus, minus = norm.population_statistics(Q + E), norm.population_statistics(Q - E)
            d = sum(np.sum(grad[s] * (np.asarray(plus[s]) - np.asarray(minus[s])) / (2 * h),
                           axis=-1) for s in grad)
            if j == k:
                out[:, j, j] = d
            else:
                out[:, j, k] = out[:, k, j] = 0.5 * d
    return out



def _statistics_vjp_fd_mean(
    norm: Normalization, Q: np.ndarray, mean: np.ndarray, grad: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_statistics_vjp_fd` for statistics of a covariance ``Q`` and a mean (inputs
    with a mean): ``(Gbar (R, K, K), d / d mean (R, K))`` by central differences of
    ``population_statistics_with_mean``."""
    K = Q.shape[0]
    h = 1e-6 * max(1.0, float(np.max(np.abs(Q))), float(np.max(np.abs(mean))))
    Rn = next(iter(grad.values())).shape[0]

    def pull(plus: Mapping[str, Any], minus: Mapping[str, Any]) -> np.ndarray:
        return sum(np.sum(grad[s] * (np.asarray(plus[s]) - np.asarray(minus[s])) / (2 * h),
                          axis=-1) for s in grad)

    out = np.zeros((Rn, K, K))
    for j in range(K):
        for k in range(j, K):
            E = np.zeros((K, K))
            E[j, k] = E[k, j] = h
            d = pull(norm.population_statistics_with_mean(Q + E, mean),
                     norm.population_statistics_with_mean(Q - E, mean))
            if j == k:
                out[:, j, j] = d
            else:
                out[:, j, k] = out[:, k, j] = 0.5 * d
    gm = np.zeros((Rn, K))
    for j in range(K):
        e = np.zeros(K)
        e[j] = h
        gm[:, j] = pull(norm.population_statistics_with_mean(Q, mean + e),
                        norm.population_statistics_with_mean(Q, mean - e))
    return out, gm
