"""The exact population Fisher information matrix in weight space, for every ``N``.

Definition
----------
The Fisher of the network output under Gaussian output noise of *unit* variance::

    F = E_xi[ grad sigma(xi) grad sigma(xi)^T ]

with ``sigma = c_K sum_i v_i g(x~_i)`` the student output (the model's readouts and
output scale included), ``x = W xi``, ``x~ = n(x; stats(Q), theta)`` with the
*population* statistics ``stats(Q)``, ``Q = W W^T``. The model's own ``noise`` does not
rescale it (a noise variance ``s^2`` would divide ``F`` by ``s^2``; it is left out so
that ``F`` is the Gauss-Newton matrix of ``eps_g``), and it depends on the student alone
(not on ``R``, the teacher or the noise).

Coordinates and scaling are those of the weight-space Hessian
(:func:`framework.theory.equilibrium.weight_space_hessian`): ``W = J / sqrt(N)``, so
``F_W = N F_J`` like ``Hess_W = N Hess_J``; trainable parameters ``theta`` (the
normalization's trainable ones, a trained readout ``v``, then the parameters an engine
holds at 0 such as batchnorm_affine's ``beta``) join with their plain derivatives (no
factor ``N``), in the order of the Hessian's ``theta_names``.

Gradient through the statistics. ``d sigma / d W_i = b_i xi + sum_k (G + G^T)_ik W_k``
with ``b = d sigma / d x`` and ``G`` the pull-back of ``d sigma / d stats`` to ``Q``
(:meth:`~framework.Normalization.population_statistics_vjp`). With ``landscape=False``
(default) this is the gradient the normalization passes: through its statistics only
when ``statistics_gradient`` is True (a stop-gradient normalization gives the Fisher of
its SGD update direction). ``landscape=True`` takes the pull-back by central
differences of ``population_statistics`` where the normalization passes none: the
Fisher of the output function itself, the Gauss-Newton part of the Hessian of the loss
landscape (what ``weight_space_hessian`` differentiates).

Gauss-Newton identity. ``Hess eps_g = F + E[(sigma - zeta) Hess sigma]``: at a
realizable point with zero error (``sigma = zeta`` up to the output noise, which is
independent and averages out) the Hessian *is* ``F``; elsewhere they differ.

Reduction (exact for every ``N``)
---------------------------------
Realize ``Q = X X^T`` with ``X`` of shape ``(K, r)``, ``r = rank Q`` (the span ``S`` of
the student vectors; the teacher plays no part), and split ``xi = xi_S + xi_perp``.
``x`` depends on ``xi_S`` only, and ``xi_perp`` is independent with zero mean, so

* on ``{dW : each dW_i in S}`` plus ``theta``: the ``(K r + n_theta)`` matrix
  ``E_z[g(z) g(z)^T]``, ``z ~ N(0, I_r)``, ``g_(i,a) = b_i z_a + ((G + G^T) X)_ia``,
  ``g_theta = d sigma / d theta``: each eigenvalue once;
* on ``dW_i = u_i p`` with ``p`` orthogonal to ``S``: ``E[b b^T] (x) P_perp``, the
  ``K x K`` matrix ``E[b b^T]``, each eigenvalue ``N - r`` times (``b_i`` contains the
  normalization's scale, e.g. ``s_i = gamma / sqrt(Q_ii)``);

``K r + n_theta + K (N - r) = K N + n_theta`` eigenvalues in all. The cross terms vanish
exactly.

The expectations (``method``)
-----------------------------
``"samples"``, for every normalization: the per-sample gradients from the
normalization's ``forward`` / ``backward`` (as the generic engine computes them) averaged
over the ``r``-dimensional ``z`` on :func:`fisher_rule`'s points -- an engine of
estimates' randomized QMC replicates (common random numbers; error: standard error over
replicates, :class:`~framework.theory.AccuracyError` beyond the quadrature's accuracy),
for an exact engine a tensor Gauss-Hermite rule (error: the difference to a coarser one;
~1e-12 for ``rank Q <= 3`` at ``Q ~ 1``, coarser for larger ``rank Q`` or ``Q``) and QMC
beyond ``rank Q = 5``. Cost ``n_points (K r + n_theta)^2``.

``"pairwise"``, the exact engine's default (a diagonal-scale normalization ``x~_i =
s_i(Q, theta) x_i``, shifts at 0): every entry is an expectation over the fields of at
most two units (:func:`_pairwise_moments`), ``K (K + 1) / 2`` two-dimensional integrals.
For the erf the factor ``g'(u) = sqrt(2/pi) exp(-u^2/2)`` is absorbed into the Gaussian
(the closed form: a determinant and an inverse of a 2 x 2 matrix), leaving polynomials,
or the bounded ``g(x~)`` of a readout term, for a 128^2-point Gauss-Hermite rule: exact to
rounding at any ``K`` and ``Q`` (error estimate: the difference to 96^2 points).

Either way the cost is independent of ``N``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, cast

import attrs
import numpy as np

from framework.model import Model
from framework.normalization import Normalization
from framework.theory.base import AccuracyError, Engine
from framework.theory.equilibrium import RANK_TOL, EngineArg, _engine
from framework.theory.quadrature import Quadrature, _base_points, _statistics_vjp_fd
from framework.validators import SpecificationError, check_bool, check_int

__all__ = ["FISHER_DEFINITION", "FisherSpectrum", "fisher_rule", "weight_space_fisher"]

#: One-line definition (stored as the ``fisher_definition`` attr of results).
FISHER_DEFINITION = (
    "F = E_xi[grad sigma grad sigma^T], sigma = c_K sum_i v_i g(x~_i) the student output "
    "with population statistics, Gaussian output noise of unit variance (the model's noise "
    "does not rescale it); coordinates W = J / sqrt(N) (F_W = N F_J, like Hess_W = N "
    "Hess_J) and trainable parameters theta with plain derivatives; independent of R and "
    "the teacher; at a realizable zero-error point F = Hessian of eps_g (Gauss-Newton)"
)

#: Points of the exact engine's tensor Gauss-Hermite rule: at most this many in all and
#: at most ``GH_MAX`` per dimension; with fewer than ``GH_MIN`` per dimension (``rank Q >=
#: 6``) the randomized QMC rule of a default :class:`~framework.theory.Quadrature` is
#: used instead (the product rule would need too many points for its accuracy).
GH_BUDGET = 1 << 18
GH_MAX = 64
GH_MIN = 12
#: Rows of samples per block (memory bound of the per-sample gradients).
CHUNK = 1 << 14


@attrs.frozen
class FisherSpectrum:
    """The exact spectrum of the weight-space Fisher (module docstring), for every ``N``.

    For ``N >= dim_span`` the ``K N + len(theta_names)`` eigenvalues are ``span`` (each
    once) and ``complement`` (each ``N - dim_span`` times); :meth:`full` lists them.

    Attributes
    ----------
    span : ndarray (K * dim_span + K * len(theta_names),)
        Eigenvalues of the block on ``{dW : each dW_i in S}`` (``S`` the span of the
        student vectors) and the parameters, ascending.
    complement : ndarray (K,)
        Eigenvalues of ``E[b b^T]`` (``b = d sigma / d x``), ascending.
    dim_span : int
        ``dim S = rank Q``.
    span_matrix : ndarray
        The span block, coordinates ``(i, a)`` = component ``a`` of ``dW_i`` in the
        realization ``X`` (row-major), then ``theta`` (parameter-major, unit-minor).
    complement_matrix : ndarray (K, K)
        ``E[b b^T]``.
    X : ndarray (K, dim_span)
        The realization, ``X X^T = Q``.
    span_error, complement_error : ndarray
        Error estimates of the eigenvalues (rule difference for the exact engine,
        standard error over replicates otherwise).
    theta_names : tuple of str
    params : dict
        The parameter values at the point (all of the engine's, trainable or not).
    landscape : bool
        The gradient through the statistics was taken by finite differences where the
        normalization passes none (module docstring).
    statistics_gradient_included : bool
        Whether ``d sigma / d W`` includes the dependence of the statistics on ``W``.
    engine : str
    method : str
        The expectation rule, one line.
    """

    span: np.ndarray = attrs.field(eq=False)
    complement: np.ndarray = attrs.field(eq=False)
    dim_span: int
    span_matrix: np.ndarray = attrs.field(eq=False)
    complement_matrix: np.ndarray = attrs.field(eq=False)
    X: np.ndarray = attrs.field(eq=False)
    span_error: np.ndarray = attrs.field(eq=False)
    complement_error: np.ndarray = attrs.field(eq=False)
    theta_names: tuple = ()
    params: dict = attrs.field(factory=dict, eq=False)
    landscape: bool = False
    statistics_gradient_included: bool = True
    engine: str = ""
    method: str = ""

    @property
    def K(self) -> int:
        return int(self.complement.size)

    @property
    def lambda_min(self) -> float:
        """Smallest eigenvalue at any ``N > dim_span`` (span and complement)."""
        return float(min(self.span.min(initial=np.inf), self.complement.min()))

    @property
    def lambda_max(self) -> float:
        """Largest eigenvalue at any ``N > dim_span``."""
        return float(max(self.span.max(initial=-np.inf), self.complement.max()))

    def _error_of(self, value: float) -> float:
        vals = np.concatenate([self.span, self.complement])
        errs = np.concatenate([self.span_error, self.complement_error])
        return float(errs[int(np.argmin(np.abs(vals - value)))])

    @property
    def lambda_min_error(self) -> float:
        return self._error_of(self.lambda_min)

    @property
    def lambda_max_error(self) -> float:
        return self._error_of(self.lambda_max)

    def multiplicities(self, N: int) -> tuple[np.ndarray, np.ndarray]:
        """``(values, multiplicities)`` at input dimension ``N``: span (1 each), then
        complement (``N - dim_span`` each); the multiplicities sum to ``K N + n_theta``."""
        N = check_int("N", N, minimum=self.dim_span)
        values = np.concatenate([self.span, self.complement])
        mult = np.concatenate([np.ones(self.span.size, dtype=np.int64),
                               np.full(self.K, N - self.dim_span, dtype=np.int64)])
        return values, mult

    def full(self, N: int) -> np.ndarray:
        """All ``K N + n_theta`` eigenvalues at input dimension ``N``, ascending."""
        values, mult = self.multiplicities(N)
        return np.sort(np.repeat(values, mult))

    def matrix(self, W: Any) -> np.ndarray:
        """The whole Fisher in another realization ``W (K, D)`` of the same ``Q``
        (``W W^T = Q``; e.g. ``J / sqrt(N)`` itself, or the Hessian's ``X``):
        coordinates ``(i, d)`` row-major, then ``theta``; ``(K D + n_t, K D + n_t)``.

        ``W = X U^T`` with ``U (D, r)`` orthonormal; the block is ``U F_S U^T`` on the
        span plus ``E[b b^T] (x) (I - U U^T)``.
        """
        W = np.asarray(W, dtype=float)
        K, r = self.X.shape
        if W.ndim != 2 or W.shape[0] != K or W.shape[1] < r:
            raise SpecificationError(
                f"'W' must have shape (K={K}, D >= dim_span={r}), got {W.shape}")
        Q = self.X @ self.X.T
        if not np.allclose(W @ W.T, Q, rtol=1e-8, atol=1e-10 * max(1.0, float(np.max(Q)))):
            raise SpecificationError(
                "'W' must realize the Fisher's Q (W W^T = Q within 1e-8), got max "
                f"|W W^T - Q| = {float(np.max(np.abs(W @ W.T - Q))):.3g}")
        D = W.shape[1]
        U = np.linalg.solve(self.X.T @ self.X, self.X.T @ W).T if r else np.zeros((D, 0))
        P = np.eye(D) - U @ U.T
        nW = K * r
        F = self.span_matrix
        FWW = F[:nW, :nW].reshape(K, r, K, r)
        out_WW = np.einsum("da,iajb,eb->idje", U, FWW, U) + np.einsum(
            "ij,de->idje", self.complement_matrix, P)
        nt = F.shape[0] - nW
        out = np.zeros((K * D + nt, K * D + nt))
        out[:K * D, :K * D] = out_WW.reshape(K * D, K * D)
        cross = np.einsum("da,iat->idt", U, F[:nW, nW:].reshape(K, r, nt)).reshape(K * D, nt)
        out[:K * D, K * D:] = cross
        out[K * D:, :K * D] = cross.T
        out[K * D:, K * D:] = F[nW:, nW:]
        return out


def _minimal_realization(Q: np.ndarray) -> np.ndarray:
    """``X (K, r)`` with ``X X^T = Q``, ``r = rank Q`` (relative tolerance RANK_TOL)."""
    lam, vec = np.linalg.eigh(0.5 * (Q + Q.T))
    lam, vec = lam[::-1], vec[:, ::-1]
    keep = lam > RANK_TOL * max(1.0, float(lam[0])) * lam.size
    return vec[:, keep] * np.sqrt(lam[keep])


def fisher_rule(
    eng: Engine, dim: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str, bool]:
    """The expectation rules over ``z ~ N(0, I_dim)``: a list of ``(points (n, dim),
    weights (n,))``, a description, and whether they are replicates.

    Exact engine: two tensor Gauss-Hermite rules (``n`` points per dimension, ``n`` the
    largest with ``n^dim <= GH_BUDGET``, at most ``GH_MAX``, then ``3n/4``); the first is
    the value, the difference the error estimate (``replicates`` False). Where ``n <
    GH_MIN``, and for an engine of estimates: the quadrature's replicates (the engine's
    :class:`~framework.theory.Quadrature`, a default one for an exact engine), each a
    rule of equal weights; the value is their mean and the error their standard error.
    (A natural engine method, ``Engine.field_rule(dim)``, if moved to the interface.)
    """
    n = int(min(GH_MAX, math.floor(GH_BUDGET ** (1.0 / max(dim, 1)) + 1e-9)))
    if eng.exact and n >= GH_MIN:
        rules = [_gauss_hermite(dim, m) for m in (n, (3 * n) // 4)]
        return rules, (f"tensor Gauss-Hermite rule, {n}^{dim} points (error estimate: the "
                       f"difference to {rules[1][1].size} points)"), False
    q = getattr(eng, "quadrature", None) or Quadrature()
    if dim == 0:
        return [(np.zeros((1, 0)), np.ones(1))] * q.replicates, q.describe(), True
    z = _base_points(q.method, dim, q.samples, q.replicates, q.seed)
    return [(z[r], np.full(z.shape[1], 1.0 / z.shape[1])) for r in range(z.shape[0])], \
        q.describe(), True


def _moments(eng: Engine, X: np.ndarray, p: Mapping[str, np.ndarray], names: tuple[str, ...],
             landscape: bool, z: np.ndarray, wts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(E[g g^T], E[b b^T])`` on one rule (module docstring)."""
    K, r = X.shape
    Q = X @ X.T
    norm, act = eng.normalization, eng.activation
    a = -eng.error_weights(p)[:K]  # c_K v
    pn = eng.norm_params(p)
    stats = norm.population_statistics(Q) if norm.statistics_names else {}
    nW, nt = K * r, K * len(names)
    F = np.zeros((nW + nt, nW + nt))
    C = np.zeros((K, K))
    for j0 in range(0, z.shape[0], CHUNK):
        zc, wc = z[j0:j0 + CHUNK], wts[j0:j0 + CHUNK]
        n = zc.shape[0]
        x = zc @ X.T
        xt = norm.forward(x, stats, pn)
        back = norm.backward(x, stats, pn, a * act.gprime(xt))  # d sigma / d .
        b = np.broadcast_to(back.x, x.shape)
        gW = b[:, :, None] * zc[:, None, :]
        if norm.statistics_names:
            gs = {k: np.broadcast_to(back.stats[k], x.shape) for k in norm.statistics_names}
            if landscape and not norm.statistics_gradient:
                Gbar = _statistics_vjp_fd(norm, Q, gs)
            else:
                Gbar = np.asarray(norm.population_statistics_vjp(
                    np.broadcast_to(Q, (n, K, K)), gs), dtype=float)
            gW = gW + (Gbar + np.swapaxes(Gbar, 1, 2)) @ X
        parts = [gW.reshape(n, nW)]
        for k in names:
            if k in eng.model_trainable:  # d sigma / d v_i = c_K g(x~_i)
                parts.append(eng.layers.c_student * act.g(xt))
            else:
                parts.append(np.broadcast_to(back.params[k], x.shape))
        g = np.concatenate(parts, axis=1)
        F += (g * wc[:, None]).T @ g
        C += (b * wc[:, None]).T @ b
    return 0.5 * (F + F.T), 0.5 * (C + C.T)


#: Gauss-Hermite points per dimension of the pairwise rule (and 3/4 of it for the error).
PAIR_GH = 128


@functools.lru_cache(maxsize=16)
def _gauss_hermite(dim: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Tensor Gauss-Hermite rule for ``N(0, I_dim)``: ``(points (m^dim, dim), weights)``
    (cached: never modify them)."""
    if dim == 0:
        return np.zeros((1, 0)), np.ones(1)
    x, w = np.polynomial.hermite_e.hermegauss(m)
    w = w / w.sum()
    grids = np.meshgrid(*([x] * dim), indexing="ij")
    pts = np.stack([g.ravel() for g in grids], axis=-1)
    return pts, np.prod(np.meshgrid(*([w] * dim), indexing="ij"), axis=0).ravel()


def _pairwise_moments(eng: Engine, X: np.ndarray, p: Mapping[str, np.ndarray],
                      names: tuple[str, ...], landscape: bool, m: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(E[g g^T], E[b b^T])`` for a diagonal-scale normalization ``x~_i = s_i(Q,
    theta) x_i`` (shifts at 0), by two-dimensional integrals over pairs of units.

    Per sample ``g = g0 + L psi``: ``g0_(j,d) = b_j z_d`` with ``b_j = a_j s_j g'(x~_j)``
    and ``psi`` the per-unit functions ``h_i = a_i g'(x~_i) x_i`` (through ``ds_i``),
    ``f_i = a_i g'(x~_i)`` (a shift) and ``e_i = c_K g(x~_i)`` (the readout), ``L`` a
    constant map (``ds_i / dW_j = ((S_i + S_i^T) X)_j``, ``ds_i / dtheta_j``). Every
    moment involves at most two units' fields; ``z`` given them is Gaussian (regression
    on the pair's rank-``rho`` part, ``rho <= 2``), so each is an ``m^rho``-point
    Gauss-Hermite sum: exact to rounding for the erf at any ``K`` (``K (K + 1) / 2``
    pairs).
    """
    norm, act = eng.normalization, eng.activation
    K, r = X.shape
    Q = X @ X.T
    a = -eng.error_weights(p)[:K]  # c_K v
    pn = eng.norm_params(p)
    s = np.asarray(norm.scale(Q, pn), dtype=float)
    if landscape and not norm.statistics_gradient:  # ds/dQ by central differences
        S = np.asarray(cast(Any, eng)._landscape_jacobian(Q, p), dtype=np.float64)
    else:
        S = np.asarray(norm.scale_jacobian(Q, pn), dtype=float)
    M = np.einsum("ijk,kd->ijd", S + np.swapaxes(S, 1, 2), X)  # ds_i / dW_j
    nW = K * r
    L = np.zeros((nW + K * len(names), 3 * K))
    L[:nW, :K] = np.transpose(M, (1, 2, 0)).reshape(nW, K)
    dtheta = norm.scale_parameter_jacobian(Q, pn) if norm.scale_parameters else {}
    for t, name in enumerate(names):
        rows = slice(nW + t * K, nW + (t + 1) * K)
        if name in eng.model_trainable:
            L[rows, 2 * K:] = np.eye(K)
        elif name in norm.shift_parameters:
            L[rows, K:2 * K] = np.eye(K)
        else:  # row: parameter of unit j; column: scale of unit i
            L[rows, :K] = np.asarray(dtheta[name], dtype=float).T

    # erf: g'(u) = sqrt(2/pi) exp(-u^2/2) is absorbed into the rule ("tilted" Gaussian,
    # det and inverse of a rho x rho matrix); what is left is polynomial, or the smooth,
    # bounded g(x~) of the readout terms
    erf = act.closed_form == "erf"
    c0 = math.sqrt(2.0 / math.pi)

    def unit(i: int, x: np.ndarray, tilted: bool) -> tuple[np.ndarray, np.ndarray]:
        """``b_i`` and ``psi_i = (h_i, f_i, e_i)`` at ``x``; the g' factor left out if
        ``tilted`` (then ``e_i`` is not used)."""
        gp = np.full_like(x, c0) if tilted else act.gprime(s[i] * x)
        e = np.zeros_like(x) if tilted else eng.layers.c_student * act.g(s[i] * x)
        return a[i] * s[i] * gp, np.stack([a[i] * gp * x, a[i] * gp, e])

    A = np.zeros((K, r, K, r))
    B = np.zeros((K, r, 3, K))
    C = np.zeros((3, K, 3, K))
    Cb = np.zeros((K, K))
    narrow = (True, True, False)  # h, f contain g'(x~); e does not
    # the readout's e = c_K g(x~) only with a trained readout (its columns of L are 0)
    types = (0, 1, 2) if any(k in eng.model_trainable for k in names) else (0, 1)
    for j in range(K):
        for k in range(j, K):
            U, sv, Vt = np.linalg.svd(X[[j, k]], full_matrices=False)
            top = float(sv[0]) if sv.size else 0.0  # Q = 0: no span (r = 0)
            rho = int(np.sum(sv > RANK_TOL * max(1.0, top) * 2))
            V, T = Vt[:rho].T, U[:, :rho] * sv[:rho]  # fields (x_j, x_k) = T w
            perp = np.eye(r) - V @ V.T
            rules: dict[tuple[bool, bool], tuple] = {}

            def rule(tj: bool, tk: bool, j=j, k=k, rho=rho, T=T, rules=rules) -> tuple:
                """Nodes, weights and unit functions with g' absorbed where tilted (erf
                only); tilted on both units the integrand is a polynomial of degree <= 4,
                which 8 points per dimension integrate exactly."""
                tj, tk = tj and erf, tk and erf
                if (tj, tk) not in rules:
                    xi, omega = _gauss_hermite(rho, min(m, 8) if tj and tk else m)
                    D = np.diag([s[j] ** 2 * tj, s[k] ** 2 * tk])
                    Pm = np.eye(rho) + T.T @ D @ T
                    w = xi @ np.linalg.cholesky(np.linalg.inv(Pm)).T if rho else xi
                    u = w @ T.T
                    rules[tj, tk] = (w, omega / math.sqrt(np.linalg.det(Pm)),
                                     *unit(j, u[:, 0], tj), *unit(k, u[:, 1], tk))
                return rules[tj, tk]

            w, wts, bj, _, bk, _ = rule(True, True)
            f2 = wts * bj * bk
            A[j, :, k, :] = A[k, :, j, :] = V @ (w.T * f2) @ w @ V.T + f2.sum() * perp
            Cb[j, k] = Cb[k, j] = f2.sum()
            for t in types:
                w, wts, bj, _, _, pk = rule(True, narrow[t])
                B[j, :, t, k] = V @ (w.T @ (wts * bj * pk[t]))
                w, wts, _, pj, bk, _ = rule(narrow[t], True)
                B[k, :, t, j] = V @ (w.T @ (wts * bk * pj[t]))
                for t2 in types:
                    w, wts, _, pj, _, pk = rule(narrow[t], narrow[t2])
                    C[t, j, t2, k] = C[t2, k, t, j] = float(wts @ (pj[t] * pk[t2]))
    G = np.zeros_like(L @ L.T)
    G[:nW, :nW] = A.reshape(nW, nW)
    Bf = np.zeros_like(L)
    Bf[:nW] = B.reshape(nW, 3 * K)
    F = G + Bf @ L.T + L @ Bf.T + L @ C.reshape(3 * K, 3 * K) @ L.T
    return 0.5 * (F + F.T), Cb


def weight_space_fisher(
    model: Model,
    normalization: Normalization,
    Q: Any,
    params: Any = None,
    *,
    landscape: bool = False,
    quadrature: Any = None,
    accuracy: float | None = None,
    engine: EngineArg = "auto",
    method: str = "auto",
) -> FisherSpectrum:
    """The population Fisher of the student output in ``(W, theta)`` at ``Q``, exact for
    every ``N`` (module docstring: definition, reduction, multiplicities).

    ``params``: the normalization's (and a trained readout's ``v``) values (default:
    the engine's initial ones). ``landscape``: see the module docstring (default False:
    the gradient the normalization passes). ``method``: ``"pairwise"`` (two-dimensional
    integrals over pairs of units; exact engine, diagonal-scale normalization, shifts
    at 0), ``"samples"`` (the per-sample gradients from ``forward`` / ``backward`` on
    :func:`fisher_rule`, any normalization) or ``"auto"`` (pairwise where it applies).
    Raises
    :class:`~framework.theory.AccuracyError` when an engine of estimates gives an
    eigenvalue error above ``accuracy`` (default: the quadrature's) times ``max(1,
    lambda_max)``.
    """
    landscape = check_bool("landscape", landscape)
    eng = _engine(model, normalization, engine, quadrature)
    Q = np.asarray(Q, dtype=float)
    K = model.K
    if Q.shape != (K, K) or not np.all(np.isfinite(Q)):
        raise SpecificationError(f"'Q' must be a finite ({K}, {K}) array, got {Q!r}")
    if np.linalg.eigvalsh(0.5 * (Q + Q.T))[0] < -1e-9 * max(1.0, float(np.max(np.abs(Q)))):
        raise SpecificationError(f"'Q' must be positive semi-definite, got {Q.tolist()}")
    p = eng.params(params)
    names = (*eng.trainable, *eng.held)
    X = _minimal_realization(Q)
    r = X.shape[1]
    if method not in ("auto", "pairwise", "samples"):
        raise SpecificationError(
            f"'method' must be one of 'auto', 'pairwise', 'samples', got {method!r}")
    # the landscape of a stop-gradient normalization needs the engine's finite-difference
    # ds/dQ (ClosedFormEngine._landscape_jacobian)
    pairwise_ok = eng.exact and normalization.is_diagonal_scale() and not any(
        np.any(p[k] != 0.0) for k in normalization.shift_parameters if k in p) and (
        normalization.statistics_gradient or not landscape
        or hasattr(eng, "_landscape_jacobian"))
    if method == "pairwise" and not pairwise_ok:
        raise SpecificationError(
            f"'method' 'pairwise' needs an exact engine and a diagonal-scale normalization "
            f"with its shifts at 0, got engine {eng.name!r} and normalization "
            f"{normalization.name!r}")
    with np.errstate(all="ignore"):
        if pairwise_ok and method != "samples":
            mats = [_pairwise_moments(eng, X, p, names, landscape, m)
                    for m in (PAIR_GH, (3 * PAIR_GH) // 4)]
            rule = (f"pairwise reduction of the diagonal-scale family: K(K+1)/2 "
                    f"two-dimensional Gauss-Hermite rules of {PAIR_GH}^2 points (error "
                    f"estimate: the difference to {(3 * PAIR_GH) // 4}^2)")
            replicates = False
        else:
            rules, rule, replicates = fisher_rule(eng, r)
            mats = [_moments(eng, X, p, names, landscape, z, w) for z, w in rules]
    Fs = np.array([m[0] for m in mats])
    Cs = np.array([m[1] for m in mats])
    if not (np.all(np.isfinite(Fs)) and np.all(np.isfinite(Cs))):
        raise SpecificationError(
            f"the Fisher is not finite at Q={Q.tolist()} for normalization "
            f"{normalization.name!r} (e.g. a normalization dividing by a zero weight norm)")
    if not replicates:
        F, C = Fs[0], Cs[0]
    else:
        F, C = Fs.mean(axis=0), Cs.mean(axis=0)

    def eig_err(mat: np.ndarray, mats_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vals, vecs = np.linalg.eigh(mat)
        per = np.einsum("ia,rij,ja->ra", vecs, mats_, vecs)  # first order, per rule
        if not replicates:  # Weyl's bound on the coarser rule's deviation (conservative)
            err = np.full(vals.size, float(np.linalg.norm(mats_[1] - mat, 2))
                          if mat.size else 0.0)
        else:
            err = per.std(axis=0, ddof=1) / math.sqrt(per.shape[0])
        return vals, err

    span, span_err = eig_err(F, Fs)
    comp, comp_err = eig_err(C, Cs)
    out = FisherSpectrum(
        span, comp, int(r), F, C, X, span_err, comp_err, theta_names=names,
        params={k: np.asarray(v, dtype=float).copy() for k, v in p.items()},
        landscape=landscape,
        statistics_gradient_included=bool(normalization.statistics_names) and (
            landscape or normalization.statistics_gradient),
        engine=eng.name, method=rule)
    if replicates:
        acc = float(accuracy) if accuracy is not None else getattr(
            eng, "quadrature", Quadrature()).accuracy
        scale = max(1.0, out.lambda_max)
        worst = float(max(span_err.max(initial=0.0), comp_err.max()))
        if not worst <= acc * scale:
            raise AccuracyError(
                f"Fisher: an eigenvalue's error estimate is {worst:.3g}, above "
                f"accuracy={acc:g} * max(1, lambda_max={out.lambda_max:.6g}), with "
                f"{eng.describe()} for normalization {normalization.name!r} and "
                f"activation {model.activation!r}; increase 'samples' or relax 'accuracy'")
    return out
