"""The converged phase of a realizable erf committee machine, without cancellation.

Why
---
Near the teacher the generalization error is a difference of ``O(1)`` arcsine terms
that cancel to ``eps_g ~ d^2`` (``d`` the size of ``J - B``), and the order parameters
``Q, R`` hold the deviation only in their last digits: ``D = Q - R - R^T + T`` is
``O(d^2)`` but is stored in ``O(1)`` numbers. In double precision this limits
``eps_g`` to ~1e-6 relative at ``eps_g ~ 1e-10`` however the ODE is integrated (and
the sum may come out slightly negative), and an integrator controlling its error
relative to ``|Q|`` lets the deviation's decay rate drift (measured: 5e-3 relative at
``eps_g = 1e-8`` with ``rtol = 1e-10``).

What
----
For the plain erf soft committee machine with ``K = M`` unit readouts, each student
matched to one teacher (permutation ``pi``, teachers renumbered so that ``pi`` is the
identity), the state is integrated in the deviation variables

    E_in = (J_i - B_i) . B_n / N = R_in - T_in          (K, M), O(d)
    D_ij = (J_i - B_i) . (J_j - B_j) / N                 (K, K), O(d^2)

(``Q = T + E + E^T + D``, ``R = T + E``), with right-hand sides and ``eps_g`` written
so that no term cancels. With ``eps_i = h_i - u_i`` (the deviation's field) the
output error is ``zeta - sigma = -sum_k eps_k int_0^1 g'(u_k + t eps_k) dt`` (plus the
output noise), so with ``g'(z) = sqrt(2 / pi) exp(-z^2 / 2)`` every expectation is a
Gauss-Legendre sum over ``t`` of the Gaussian moment

    Psi(v; x, y) = E[exp(-|v|^2 / 2) x y]
                 = det(I + C_v)^(-1/2) (C_xy - C_xv (I + C_v)^(-1) C_vy)

for jointly Gaussian ``(v, x, y)`` (``v`` the arguments of the ``g'`` factors): its
small factors (``C_xy = D``, ``C_xv ~ E + D``) are entries of the state, not
differences. Then (``alpha = steps / N``, step ``eta / sqrt(N)``, batch ``b``)::

    dE_in / dalpha = eta E[delta_i u_n]
    dD_ij / dalpha = eta (E[delta_i eps_j] + E[delta_j eps_i]) + (eta^2 / b) E[delta_i delta_j]
    eps_g          = E[(zeta - sigma)^2] / 2        (noise term included)

with ``delta_i = g'(h_i) (zeta - sigma)``: exactly the ODE of
:func:`framework.theory._kernels.ode_rhs` in other coordinates (tested to rounding
against it), and ``eps_g >= 0`` by construction (a sum of squares' expectation, here
``(1/2) w^T C w`` with ``C`` a Gram matrix of the ``t``-nodes).

:func:`refine_tail` re-integrates the rows of a trajectory from the first one with
``eps_g < TAIL_THRESHOLD`` in these variables (scipy's DOP853, one solve per report
interval, tolerance ``rtol`` relative to each deviation component) and returns the
refined ``Q, R, eps_g``. Below ``TAIL_FLOOR`` (1e-20, ``|J - B| ~ 1e-10``) the flow is
its leading-order part, linear in ``(E, E (x) E, D)`` (:class:`_LinearTail`), propagated
exactly in the eigenbasis of its two blocks (matrix exponentials where a basis is
ill-conditioned) with a separate exponent: ``eps_g`` is then correctly rounded down to
the smallest double and 0 below it, never negative (against 600-digit arithmetic: 6e-13
relative at 1e-185, 2e-11 at 6e-314).

Where it runs: :class:`framework.theory.ClosedFormEngine` applies it to the plain
network (no normalization) with ``K = M <= TAIL_MAX_K``, no output noise, unit readouts,
on its compiled path; the dataset attr ``eps_g_method`` says whether and from where.
Measured (tests/test_eps_tail.py): rates and ``eps_g`` equal 50-digit arithmetic to
1e-13 relative at ``eps_g ~ 1e-11`` and ``1e-13`` (the closed form at ``(Q, R)`` is off
by 1e-7 and 1e-4 there); the default ``rtol = 1e-10`` tail equals a ``rtol = 1e-13``
one integrated ten decades further to 1.5e-8 relative on every row down to 1e-233.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.integrate import solve_ivp

from framework.theory._kernels import HAVE_NUMBA, _njit

__all__ = ["TAIL_FLOOR", "TAIL_MAX_K", "TAIL_THRESHOLD", "TailRefinement",
           "deviation_eps_g", "deviation_rhs", "match_teachers", "refine_tail"]

#: ``eps_g`` below which the converged phase is integrated in deviation variables.
TAIL_THRESHOLD = 1e-5
#: Largest K = M refined (the linear tail's state has K^4 + 2 K^2 components).
TAIL_MAX_K = 4
#: ``eps_g`` below which the deviation follows its leading-order linear flow
#: (:class:`_LinearTail`; what that neglects is ``O(|J - B|) ~ sqrt(TAIL_FLOOR)``
#: relative).
TAIL_FLOOR = 1e-20
#: Report rows per solve of the deviation tail (fewer where eps_g falls faster).
_CHUNK = 64
#: Decades by which the linear tail's state is renormalized (it decays without bound).
_RENORMALIZE = 100.0
#: Gauss-Legendre nodes on [0, 1] for the ``t``-integrals (the integrand varies with
#: ``t`` only through ``t eps_k``: analytic, and nearly constant once ``d`` is small;
#: 4 nodes reproduce 8 to rounding for ``|J - B| / |B| <= 0.01``, 4e-13 at 0.1).
_N_NODES = 4
_T_NODES, _T_WEIGHTS = np.polynomial.legendre.leggauss(_N_NODES)
_T_NODES = 0.5 * (_T_NODES + 1.0)
_T_WEIGHTS = 0.5 * _T_WEIGHTS


def _psi(Cv: np.ndarray, Cxv: np.ndarray, Cvy: np.ndarray, Cxy: np.ndarray) -> np.ndarray:
    """``E[exp(-|v|^2/2) x y]`` for stacks: ``Cv (..., m, m)``, ``Cxv (..., m)``, ``Cvy
    (..., m)``, ``Cxy (...)``."""
    m = Cv.shape[-1]
    A = np.eye(m) + Cv
    sol = np.linalg.solve(A, Cvy[..., None])[..., 0]
    return (Cxy - np.einsum("...a,...a->...", Cxv, sol)) / np.sqrt(np.linalg.det(A))


def _basis(T: np.ndarray, E: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Covariance of ``z = (u_1..u_M, eps_1..eps_K)``: ``[[T, E^T], [E, D]]``."""
    return np.block([[T, E.T], [E, D]])


def _vectors(K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coefficient vectors in the basis ``z``: ``U[n] = u_n``, ``Eps[k] = eps_k``,
    ``H[i] = h_i = u_i + eps_i`` (K = M)."""
    eye = np.eye(2 * K)
    U, Eps = eye[:K], eye[K:]
    return U, Eps, U + Eps


def _moments_reference(T: np.ndarray, E: np.ndarray, D: np.ndarray, noise_var: float,
                       second_order: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(E[delta u^T] (K, M), E[delta eps^T] (K, K), E[delta delta^T] (K, K), eps_g)``,
    readable numpy (vectorized over every index and node): the specification of
    :func:`_moments_nb`, which the integration uses."""
    K = E.shape[0]
    S = _basis(T, E, D)
    U, Eps, H = _vectors(K)
    t, wt = _T_NODES, _T_WEIGHTS
    # G[k, a] = u_k + t_a eps_k: the argument of the k-th g' of the output error
    G = U[:, None, :] + t[None, :, None] * Eps[:, None, :]          # (K, nt, 2K)
    two_pi = 2.0 / math.pi
    # first order: v = (h_i, G[k, a]); x = eps_k; y = u_n or eps_j
    V = np.stack(np.broadcast_arrays(H[:, None, None, :], G[None, :, :, :]), axis=-2)
    # V: (i, k, a, 2, 2K)
    Cv = V @ S @ np.swapaxes(V, -1, -2)                               # (i, k, a, 2, 2)
    Cxv = np.einsum("kz,zw,ikavw->ikav", Eps, S, V)                   # (i, k, a, 2)
    Y = np.concatenate([U, Eps])                                      # y: u_n then eps_j
    Cvy = np.einsum("ikavw,wz,yz->ikayv", V, S, Y)                    # (i, k, a, y, 2)
    Cxy = Eps @ S @ Y.T                                               # (k, y)
    psi = _psi(Cv[:, :, :, None], Cxv[:, :, :, None], Cvy,
               np.broadcast_to(Cxy[None, :, None, :], Cvy.shape[:-1]))
    first = -two_pi * np.einsum("a,ikay->iy", wt, psi)                # E[delta_i y]
    du, deps = first[:, :K], first[:, K:]
    # eps_g = (1/2) E[err^2]: v = (G[k, a], G[l, b]); x = eps_k, y = eps_l
    V2 = np.stack(np.broadcast_arrays(G[:, :, None, None, :], G[None, None, :, :, :]),
                  axis=-2)                                            # (k, a, l, b, 2, 2K)
    Cv2 = V2 @ S @ np.swapaxes(V2, -1, -2)
    Cxv2 = np.einsum("kz,zw,kalbvw->kalbv", Eps, S, V2)
    Cvy2 = np.einsum("kalbvw,wz,lz->kalbv", V2, S, Eps)
    Cxy2 = np.broadcast_to((Eps @ S @ Eps.T)[:, None, :, None], Cv2.shape[:-2])
    err2 = two_pi * np.einsum("a,b,kalb->", wt, wt, _psi(Cv2, Cxv2, Cvy2, Cxy2))
    eps_g = 0.5 * float(err2) + 0.5 * noise_var
    dd = np.zeros((K, K))
    if second_order:
        # E[delta_i delta_j] = E[g'(h_i) g'(h_j) err^2] + noise E[g'(h_i) g'(h_j)]
        hh = np.stack(np.broadcast_arrays(H[:, None, :], H[None, :, :]), axis=-2)  # (i, j, 2, 2K)
        V4 = np.concatenate(np.broadcast_arrays(
            hh[:, :, None, None, None, None], V2[None, None]), axis=-2)  # (i,j,k,a,l,b,4,2K)
        Cv4 = V4 @ S @ np.swapaxes(V4, -1, -2)
        Cxv4 = np.einsum("kz,zw,ijkalbvw->ijkalbv", Eps, S, V4)
        Cvy4 = np.einsum("ijkalbvw,wz,lz->ijkalbv", V4, S, Eps)
        Cxy4 = np.broadcast_to((Eps @ S @ Eps.T)[None, None, :, None, :, None],
                               Cv4.shape[:-2])
        dd = two_pi**2 * np.einsum("a,b,ijkalb->ij", wt, wt, _psi(Cv4, Cxv4, Cvy4, Cxy4))
        if noise_var:
            Chh = hh @ S @ np.swapaxes(hh, -1, -2)
            dd = dd + noise_var * two_pi / np.sqrt(np.linalg.det(np.eye(2) + Chh))
    return du, deps, dd, eps_g


@_njit
def _psi_nb(C, cx, cy, cxy, m, L, zx, zy):
    """``E[exp(-|v|^2/2) x y]`` from ``C = Cov(v)`` (m x m), ``cx = Cov(x, v)``, ``cy =
    Cov(v, y)``, ``cxy = Cov(x, y)``: Cholesky of ``I + C`` (positive definite);
    ``L (4, 4)``, ``zx``, ``zy (4,)`` are workspace."""
    for j in range(m):
        acc = 1.0 + C[j, j]
        for r in range(j):
            acc -= L[j, r] * L[j, r]
        L[j, j] = math.sqrt(acc)
        for i in range(j + 1, m):
            acc = C[i, j]
            for r in range(j):
                acc -= L[i, r] * L[j, r]
            L[i, j] = acc / L[j, j]
    det_root = 1.0
    quad = 0.0
    for j in range(m):
        ax = cx[j]
        ay = cy[j]
        for r in range(j):
            ax -= L[j, r] * zx[r]
            ay -= L[j, r] * zy[r]
        zx[j] = ax / L[j, j]
        zy[j] = ay / L[j, j]
        quad += zx[j] * zy[j]
        det_root *= L[j, j]
    return (cxy - quad) / det_root


@_njit
def _moments_nb(T, E, D, noise_var, second_order, t, wt, du, deps, dd):
    """:func:`_moments_reference` compiled: fills ``du``, ``deps``, ``dd``; returns
    ``eps_g``. Covariances of ``h_i = u_i + eps_i``, ``G_k(t) = u_k + t eps_k``:
    ``Cov(u_a, eps_b) = E_ba``, ``Cov(eps_a, eps_b) = D_ab``."""
    K = E.shape[0]
    nt = t.size
    two_pi = 2.0 / math.pi
    C2 = np.empty((2, 2))
    C4 = np.empty((4, 4))
    cx = np.empty(4)
    cy = np.empty(4)
    L = np.empty((4, 4))
    zx = np.empty(4)
    zy = np.empty(4)
    for i in range(K):
        for n in range(K):
            du[i, n] = 0.0
            deps[i, n] = 0.0
    for i in range(K):
        hii = T[i, i] + 2.0 * E[i, i] + D[i, i]
        for k in range(K):
            for a in range(nt):
                ta = t[a]
                C2[0, 0] = hii
                C2[0, 1] = T[i, k] + ta * E[k, i] + E[i, k] + ta * D[i, k]
                C2[1, 0] = C2[0, 1]
                C2[1, 1] = T[k, k] + 2.0 * ta * E[k, k] + ta * ta * D[k, k]
                cx[0] = E[k, i] + D[k, i]
                cx[1] = E[k, k] + ta * D[k, k]
                for n in range(K):
                    cy[0] = T[i, n] + E[i, n]
                    cy[1] = T[k, n] + ta * E[k, n]
                    du[i, n] -= two_pi * wt[a] * _psi_nb(C2, cx, cy, E[k, n], 2, L, zx, zy)
                for j in range(K):
                    cy[0] = E[j, i] + D[i, j]
                    cy[1] = E[j, k] + ta * D[k, j]
                    deps[i, j] -= two_pi * wt[a] * _psi_nb(C2, cx, cy, D[k, j], 2, L, zx, zy)
    err2 = 0.0
    for k in range(K):
        for a in range(nt):
            ta = t[a]
            for m in range(K):
                for b in range(nt):
                    tb = t[b]
                    C2[0, 0] = T[k, k] + 2.0 * ta * E[k, k] + ta * ta * D[k, k]
                    C2[1, 1] = T[m, m] + 2.0 * tb * E[m, m] + tb * tb * D[m, m]
                    C2[0, 1] = T[k, m] + tb * E[m, k] + ta * E[k, m] + ta * tb * D[k, m]
                    C2[1, 0] = C2[0, 1]
                    cx[0] = E[k, k] + ta * D[k, k]
                    cx[1] = E[k, m] + tb * D[k, m]
                    cy[0] = E[m, k] + ta * D[k, m]
                    cy[1] = E[m, m] + tb * D[m, m]
                    err2 += two_pi * wt[a] * wt[b] * _psi_nb(C2, cx, cy, D[k, m], 2, L, zx, zy)
    if second_order:
        for i in range(K):
            for j in range(i, K):
                hij = T[i, j] + E[i, j] + E[j, i] + D[i, j]
                acc = 0.0
                for k in range(K):
                    for a in range(nt):
                        ta = t[a]
                        for m in range(K):
                            for b in range(nt):
                                tb = t[b]
                                idx = (i, j)
                                for p in range(2):
                                    q = idx[p]
                                    for r in range(2):
                                        C4[p, r] = (T[q, idx[r]] + E[q, idx[r]] + E[idx[r], q]
                                                    + D[q, idx[r]])
                                    C4[p, 2] = T[q, k] + ta * E[k, q] + E[q, k] + ta * D[q, k]
                                    C4[p, 3] = T[q, m] + tb * E[m, q] + E[q, m] + tb * D[q, m]
                                    C4[2, p] = C4[p, 2]
                                    C4[3, p] = C4[p, 3]
                                C4[2, 2] = T[k, k] + 2.0 * ta * E[k, k] + ta * ta * D[k, k]
                                C4[3, 3] = T[m, m] + 2.0 * tb * E[m, m] + tb * tb * D[m, m]
                                C4[2, 3] = (T[k, m] + tb * E[m, k] + ta * E[k, m]
                                            + ta * tb * D[k, m])
                                C4[3, 2] = C4[2, 3]
                                cx[0] = E[k, i] + D[k, i]
                                cx[1] = E[k, j] + D[k, j]
                                cx[2] = E[k, k] + ta * D[k, k]
                                cx[3] = E[k, m] + tb * D[k, m]
                                cy[0] = E[m, i] + D[i, m]
                                cy[1] = E[m, j] + D[j, m]
                                cy[2] = E[m, k] + ta * D[k, m]
                                cy[3] = E[m, m] + tb * D[m, m]
                                acc += wt[a] * wt[b] * _psi_nb(C4, cx, cy, D[k, m], 4, L, zx, zy)
                val = two_pi * two_pi * acc
                if noise_var:
                    det = (1.0 + T[i, i] + 2.0 * E[i, i] + D[i, i]) * (
                        1.0 + T[j, j] + 2.0 * E[j, j] + D[j, j]) - hij * hij
                    val += noise_var * two_pi / math.sqrt(det)
                dd[i, j] = val
                dd[j, i] = val
    return 0.5 * err2 + 0.5 * noise_var


def _moments(T: np.ndarray, E: np.ndarray, D: np.ndarray, noise_var: float,
             second_order: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The moments (:func:`_moments_reference`) by the compiled kernel when numba is
    available."""
    if not HAVE_NUMBA:
        return _moments_reference(T, E, D, noise_var, second_order)
    K = E.shape[0]
    du, deps, dd = np.empty((K, K)), np.empty((K, K)), np.zeros((K, K))
    eps = _moments_nb(np.ascontiguousarray(T), np.ascontiguousarray(E),
                      np.ascontiguousarray(D), float(noise_var), bool(second_order),
                      _T_NODES, _T_WEIGHTS, du, deps, dd)
    return du, deps, dd, float(eps)


def deviation_rhs(
    T: Any, E: Any, D: Any, *, eta: float, batch_size: int = 1, noise_var: float = 0.0,
    second_order: bool = True,
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(dE/dalpha, dD/dalpha, eps_g)`` at the deviation state ``(E, D)`` (module
    docstring; teachers renumbered so that student ``i`` matches teacher ``i``)."""
    T, E, D = (np.asarray(a, dtype=float) for a in (T, E, D))
    du, deps, dd, eps = _moments(T, E, 0.5 * (D + D.T), noise_var, second_order)
    dE = eta * du
    dD = eta * (deps + deps.T) + (eta**2 / batch_size) * 0.5 * (dd + dd.T)
    return dE, dD, eps


def deviation_eps_g(T: Any, E: Any, D: Any, noise_var: float = 0.0) -> float:
    """``eps_g`` at the deviation state ``(E, D)``, without cancellation, ``>= 0``."""
    T, E, D = (np.asarray(a, dtype=float) for a in (T, E, D))
    return _moments(T, E, 0.5 * (D + D.T), noise_var, False)[3]


def match_teachers(Q: np.ndarray, R: np.ndarray, T: np.ndarray, tol: float = 0.05
                   ) -> np.ndarray | None:
    """The teacher matched to each student (a permutation), or None if the state is not
    within ``tol`` of a student-teacher matching (``max |D| <= tol``, ``D = Q - R_pi -
    R_pi^T + T_pi``)."""
    K, M = R.shape
    if K != M:
        return None
    pi = np.argmax(R / np.sqrt(np.outer(np.abs(np.diag(Q)), np.diag(T)) + 1e-300), axis=1)
    if np.unique(pi).size != K:
        return None
    Rp, Tp = R[:, pi], T[np.ix_(pi, pi)]
    D = Q - Rp - Rp.T + Tp
    return pi if float(np.max(np.abs(D))) <= tol else None


class _LinearTail:
    """The deviation's leading-order dynamics, exactly: with ``(E, D) -> (c E, c^2 D)``
    the flow is homogeneous as ``c -> 0``: ``E' = L_E E``, ``D' = L_D D + B(E, E)``,
    ``eps_g = q(E, E) + l . D`` (noise-free). On ``z = (E, E (x) E, D)`` this is linear,
    ``z' = A z``, propagated by :meth:`propagate` (in eigenmodes, or by ``expm(A
    dalpha)`` report interval by report interval), with the scale of ``z`` kept as a
    separate exponent (no underflow; values below the smallest double round to 0, their
    correctly rounded value). The
    maps are read off :func:`deviation_rhs` at ``c = 1e-20`` (homogeneity makes the
    probes exact to rounding)."""

    def __init__(self, T: np.ndarray, *, eta: float, batch_size: int, second_order: bool
                 ) -> None:
        K = T.shape[0]
        n = K * K
        c = 1e-20
        zero = np.zeros((K, K))

        def rhs(E: np.ndarray, D: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
            dE, dD, _ = deviation_rhs(T, E, D, eta=eta, batch_size=batch_size,
                                      second_order=second_order)
            return dE.ravel(), dD.ravel(), deviation_eps_g(T, E, D)

        eye = np.eye(n)
        L_E = np.empty((n, n))
        L_D = np.empty((n, n))
        l_eps = np.empty(n)
        for m in range(n):
            L_E[:, m] = rhs(c * eye[m].reshape(K, K), zero)[0] / c
            L_D[:, m] = rhs(zero, c * c * eye[m].reshape(K, K))[1] / (c * c)
            l_eps[m] = deviation_eps_g(T, zero, c * c * eye[m].reshape(K, K)) / (c * c)
        B = np.empty((n, n, n))
        q = np.empty((n, n))
        for a in range(n):
            for b in range(a, n):
                plus = rhs(c * (eye[a] + eye[b]).reshape(K, K), zero)
                minus = rhs(c * (eye[a] - eye[b]).reshape(K, K), zero)
                B[:, a, b] = B[:, b, a] = (plus[1] - minus[1]) / (4 * c * c)
                q[a, b] = q[b, a] = (plus[2] - minus[2]) / (4 * c * c)
        size = n + n * n + n
        A = np.zeros((size, size))
        A[:n, :n] = L_E
        A[n:n + n * n, n:n + n * n] = np.kron(L_E, eye) + np.kron(eye, L_E)
        A[n + n * n:, n:n + n * n] = B.reshape(n, n * n)
        A[n + n * n:, n + n * n:] = L_D
        self.A, self.n = A, n
        # D is symmetric: its antisymmetric part is a null direction of the flow (the
        # right-hand side symmetrizes D), kept at 0 by symmetrizing after every step
        l_eps = 0.5 * (l_eps + l_eps.reshape(K, K).T.ravel())
        self.eps_coef = np.concatenate([np.zeros(n), q.ravel(), l_eps])

    def propagate(self, E0: np.ndarray, D0: np.ndarray, alpha: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(E, D, eps_g)`` on ``alpha`` (``alpha[0]`` the start, state ``(E0, D0)``):
        by the eigen-decompositions of the two decoupled blocks where they are well
        conditioned (:meth:`_propagate_modes`), else by matrix exponentials row to row
        (:meth:`_propagate_expm`)."""
        modal = self._propagate_modes(E0, D0, alpha)
        return modal if modal is not None else self._propagate_expm(E0, D0, alpha)

    #: Largest condition number of an eigenvector basis used by _propagate_modes.
    MODE_COND_LIMIT = 1e8

    def _propagate_modes(self, E0: np.ndarray, D0: np.ndarray, alpha: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The flow is block diagonal: ``E' = L_E E`` and the quadratic part ``(E (x) E,
        D)`` on its own. Each block is propagated in the basis of its eigenvectors,
        ``z(t) = V exp(Lambda t) V^-1 z(0)`` at every report time directly (no error
        accumulates over rows; any grid costs the same), with the largest modal term's
        magnitude kept as a separate exponent (values below the smallest double round
        to 0); the null modes (antisymmetric ``D``) are dropped. None (use matrix
        exponentials) if a basis is ill-conditioned (condition
        number above :attr:`MODE_COND_LIMIT`) or does not reconstruct its block to
        1e-9."""
        n, K = self.n, E0.shape[0]
        e = E0.ravel()
        D0 = 0.5 * (D0 + D0.T)
        blocks = ((self.A[:n, :n], e), (self.A[n:, n:], np.concatenate(
            [np.outer(e, e).ravel(), D0.ravel()])))
        t = np.asarray(alpha, dtype=float) - float(alpha[0])
        out = []
        for M_, z0 in blocks:
            lam, V = np.linalg.eig(M_)
            if not np.all(np.isfinite(lam)) or np.linalg.cond(V) > self.MODE_COND_LIMIT:
                return None
            Vi = np.linalg.inv(V)
            scale = max(float(np.max(np.abs(M_))), 1e-300)
            if float(np.max(np.abs((V * lam) @ Vi - M_))) > 1e-9 * scale:
                return None
            w0 = Vi @ z0
            # the null modes are the antisymmetric part of D (the flow symmetrizes D; a
            # symmetric D0 has no component there but rounding's): dropped, like the
            # row-to-row path's symmetrization
            keep = (np.abs(w0) > 0) & (np.abs(lam) > 1e-12 * scale)
            if not np.any(keep):
                out.append((np.zeros((t.size, z0.size)), np.zeros(t.size)))
                continue
            lam_k, logw = lam[keep], np.log(w0[keep].astype(complex))
            expo = t[:, None] * lam_k[None, :] + logw[None, :]  # log of each modal term
            shift = np.max(expo.real, axis=1)  # the largest term's magnitude, per row
            rel = np.real(np.exp(expo - shift[:, None]) @ V[:, keep].T)
            out.append((rel, shift))
        (rel_e, s_e), (rel_q, s_q) = out
        E = rel_e * np.exp(s_e)[:, None]
        D = rel_q[:, n * n:] * np.exp(s_q)[:, None]
        eps = (rel_q @ self.eps_coef[n:]) * np.exp(s_q) + 0.0  # no -0.0 on underflow
        D = D.reshape(-1, K, K)
        return E.reshape(-1, K, K), 0.5 * (D + np.swapaxes(D, -1, -2)), eps

    def _propagate_expm(self, E0: np.ndarray, D0: np.ndarray, alpha: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`propagate` by ``expm(A dalpha)`` row to row (one per distinct spacing)."""
        from scipy.linalg import expm

        n, K = self.n, E0.shape[0]
        e = E0.ravel()
        z = np.concatenate([e, np.outer(e, e).ravel(), D0.ravel()])
        decades = 0.0
        Es, Ds, eps = [], [], []
        steps: dict[float, np.ndarray] = {}  # expm per distinct spacing (linear grids: one)
        for j in range(alpha.size):
            if j:
                h = float(f"{float(alpha[j] - alpha[j - 1]):.13g}")
                if h not in steps:
                    steps[h] = expm(self.A * h)
                z = steps[h] @ z
                Dz = z[n + n * n:].reshape(K, K)
                z[n + n * n:] = (0.5 * (Dz + Dz.T)).ravel()
            big = float(np.max(np.abs(z)))
            if 0.0 < big < 10.0**-_RENORMALIZE:
                # linear: rescale the (E (x) E, D) part by 10^s and E by 10^(s/2)
                z = np.concatenate([z[:n] * 10.0**(_RENORMALIZE / 2), z[n:] * 10.0**_RENORMALIZE])
                decades += _RENORMALIZE
            s2 = 10.0**-decades
            Es.append(z[:n].reshape(K, K) * 10.0**(-decades / 2))
            Ds.append(z[n + n * n:].reshape(K, K) * s2)
            eps.append(float(self.eps_coef @ z) * s2 + 0.0)  # no -0.0 on underflow
        Ds_a = np.array(Ds)
        return np.array(Es), 0.5 * (Ds_a + np.swapaxes(Ds_a, -1, -2)), np.array(eps)


class TailRefinement:
    """Result of :func:`refine_tail`: ``start`` (row index where it begins), ``Q``,
    ``R``, ``eps_g`` (the rows from ``start`` on), ``alpha_start``, ``nfev``,
    ``message``."""

    def __init__(self, start: int, alpha_start: float, Q: np.ndarray, R: np.ndarray,
                 eps_g: np.ndarray, nfev: int, message: str) -> None:
        self.start, self.alpha_start = start, alpha_start
        self.Q, self.R, self.eps_g = Q, R, eps_g
        self.nfev, self.message = nfev, message


def refine_tail(
    alpha: np.ndarray, Q: np.ndarray, R: np.ndarray, eps_g: np.ndarray, T: np.ndarray, *,
    eta: float, batch_size: int = 1, noise_var: float = 0.0, second_order: bool = True,
    rtol: float = 1e-10, threshold: float = TAIL_THRESHOLD, floor: float = TAIL_FLOOR,
) -> TailRefinement | str:
    """Re-integrate the converged rows of a trajectory in deviation variables.

    From the first row with ``eps_g < threshold`` whose state matches each student to
    a teacher (:func:`match_teachers`), integrate ``(E, D)`` with relative tolerance
    ``rtol`` per component (absolute ``rtol * 1e-12 * max|state|`` at the start, so
    that every deviation component is resolved relative to its size). Returns a
    :class:`TailRefinement`, or a string saying why no row qualifies.
    """
    below = np.flatnonzero(eps_g < threshold)
    if below.size == 0:
        return f"eps_g never fell below {threshold:g}"
    j0 = int(below[0])
    pi = match_teachers(Q[j0], R[j0], T)
    if pi is None:
        return (f"at alpha = {alpha[j0]:.6g} (eps_g < {threshold:g}) the students do not "
                "each match a teacher")
    if j0 == alpha.size - 1:
        return "only the last row is below the threshold"
    K = Q.shape[1]
    Tp = T[np.ix_(pi, pi)]
    Rp = R[j0][:, pi]
    E0 = Rp - Tp
    Q0 = 0.5 * (Q[j0] + Q[j0].T)
    D0 = Q0 - Rp - Rp.T + Tp
    D0 = 0.5 * (D0 + D0.T)  # exactly symmetric (its antisymmetric part would not decay)
    y0 = np.concatenate([E0.ravel(), D0.ravel()])
    nfev = 0

    def fun(_t: float, y: np.ndarray) -> np.ndarray:
        nonlocal nfev
        nfev += 1
        E, D = y[:K * K].reshape(K, K), y[K * K:].reshape(K, K)
        dE, dD, _ = deviation_rhs(Tp, E, D, eta=eta, batch_size=batch_size,
                                  noise_var=noise_var, second_order=second_order)
        return np.concatenate([dE.ravel(), dD.ravel()])

    # one solve per report interval, each with absolute tolerances a small fraction of
    # every component's size at its start: the deviation shrinks by orders of magnitude
    # and every component (D ~ E^2) must stay resolved relative to itself
    rows = [y0]
    y = y0
    message = "integration successful"
    j_floor = None
    j = j0
    rate = 0.0  # decay rate of eps_g over the last chunk (0: unknown)
    e_now = deviation_eps_g(Tp, E0, D0)
    while j < alpha.size - 1:
        if e_now < floor:
            j_floor = len(rows) - 1
            break
        # one solve per chunk of report rows, short enough that eps_g falls by at most
        # ~e in it (so that the absolute tolerances, fixed per chunk, stay relative);
        # each component relative to itself, floored at 1e-2 of its block's largest:
        # smaller components weigh at most that much in eps_g, and their rates carry
        # rounding noise relative to the block's scale (a tighter floor stalls the steps)
        stop = min(j + (_CHUNK if rate > 0 else 1), alpha.size - 1)
        if rate > 0:
            stop = max(j + 1, min(stop, int(np.searchsorted(alpha, alpha[j] + 1.0 / rate,
                                                            side="right")) - 1))
        mag = np.abs(y)
        floor_E = 1e-2 * float(np.max(mag[:K * K]))
        floor_D = 1e-2 * float(np.max(mag[K * K:]))
        atol = 1e-3 * rtol * np.maximum(mag, np.repeat([floor_E, floor_D], K * K)) + 1e-300
        sol = solve_ivp(fun, (float(alpha[j]), float(alpha[stop])), y, method="DOP853",
                        t_eval=alpha[j + 1:stop + 1], rtol=rtol, atol=atol)
        if sol.status != 0 or sol.y.shape[1] != stop - j or not np.all(np.isfinite(sol.y)):
            message = f"deviation tail stopped at alpha = {alpha[j]:.6g}: {sol.message}"
            break
        rows.extend(sol.y.T)
        y = sol.y[:, -1]
        e_new = deviation_eps_g(Tp, y[:K * K].reshape(K, K), y[K * K:].reshape(K, K))
        if 0.0 < e_new < e_now:
            rate = math.log(e_now / e_new) / float(alpha[stop] - alpha[j])
        j, e_now = stop, e_new
    ys = np.array(rows)
    Es = ys[:, :K * K].reshape(-1, K, K)
    Ds = ys[:, K * K:].reshape(-1, K, K)
    Ds = 0.5 * (Ds + np.swapaxes(Ds, -1, -2))
    eps = np.array([deviation_eps_g(Tp, Es[j], Ds[j]) for j in range(len(rows))])
    if j_floor is not None:  # the rest of the grid: the leading-order linear flow
        lin = _LinearTail(Tp, eta=eta, batch_size=batch_size, second_order=second_order)
        E_l, D_l, e_l = lin.propagate(Es[j_floor], Ds[j_floor], alpha[j0 + j_floor:])
        Es = np.concatenate([Es[:j_floor], E_l])
        Ds = np.concatenate([Ds[:j_floor], D_l])
        eps = np.concatenate([eps[:j_floor], e_l])
        message += (f"; below eps_g = {floor:g} (from alpha = {alpha[j0 + j_floor]:.6g}) "
                    "the leading-order linear flow of the deviation (relative error "
                    "O(|J - B|) ~ 1e-10)")
    inv = np.argsort(pi)
    Rs = (Tp + Es)[:, :, inv]
    Qs = Tp + Es + np.swapaxes(Es, -1, -2) + Ds
    return TailRefinement(j0, float(alpha[j0]), Qs, Rs, eps, nfev, message)
