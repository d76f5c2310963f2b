"""The input distribution of a teacher-student model: Gaussian inputs with a structured
covariance.

Inputs ``xi ~ N(0, Sigma)`` in dimension ``N``, where ``Sigma`` has ``L`` distinct
eigenvalues ``lambda_l``, the ``l``-th holding the fraction ``f_l`` of the ``N``
directions (``sum_l f_l = 1``; at finite ``N`` the eigenspace ``l`` has ``N_l = f_l N``
directions, rounded by :meth:`InputDistribution.block_sizes`). The default, one
eigenvalue 1, is the isotropic problem of Saad & Solla (``Sigma = I``) and changes
nothing, bit for bit.

Order parameters per eigenspace (DESIGN.md, "Structured inputs")
------------------------------------------------------------------
With ``P_l`` the projector on eigenspace ``l`` and ``J^(l) = P_l J``::

    Q_l = J^(l) J^(l)^T / N,   R_l = J^(l) B^(l)^T / N,   T_l = B^(l) B^(l)^T / N
    Q = sum_l Q_l (= J J^T / N),   and the pre-activation covariances
    Qt = E[x x^T] = sum_l lambda_l Q_l,  Rt = sum_l lambda_l R_l,  Tt = sum_l lambda_l T_l

The generalization error and every normalization's population statistics depend on
``(Qt, Rt, Tt)`` only (the pre-activations are ``N(0, [[Qt, Rt], [Rt^T, Tt]])``). The
teacher is spread over the eigenspaces in proportion to their size, ``T_l = f_l T``
(what a random teacher gives at large ``N``), so ``Tt = mean_eigenvalue * T``. A random
student initialization gives ``Q_l = f_l Q`` and ``R_l = f_l R`` in the same way, and an
explicit initial state ``(Q, R)`` is lifted so (:meth:`InputDistribution.lift`).

The learning rate keeps its meaning (the step ``eta / sqrt(N)`` on ``J`` along the
per-sample gradient): no rescaling by ``Sigma``. For ``Sigma = c I`` the problem is the
isotropic one in the weights ``sqrt(c) J``, ``sqrt(c) B`` at the rate ``c eta``
(``tests/test_structured_inputs.py`` checks this map exactly).

Input mean (non-centred inputs)
--------------------------------
``xi ~ N(mu, Sigma)`` with ``mu = m u``: a unit vector ``u`` (``|u| = 1``) in eigenspace
``mean_space`` of ``Sigma`` (``Sigma u = lambda_mu u``) and a size ``m = |mu| >= 0``, so
each coordinate of the mean is ``O(m / sqrt(N))``. The scaling is the one under which the
pre-activation means are of order one and the ``N -> infinity`` ODE exists: with ``r_i =
J_i . u / sqrt(N)`` (the student's overlap with the mean direction, an order parameter of
order one once ``J`` has a macroscopic component along ``u``) and ``s_n = B_n . u /
sqrt(N)`` (the teacher's), the pre-activations are ``x ~ N(m r, Qt)``, ``y ~ N(m s, Tt)``.
The direction is given by the teacher's overlaps ``s`` (``direction``; one value for every
teacher unit or one per unit): it carries signal exactly when ``s != 0``; ``Q_l``, ``R_l``
and ``T_l`` include the component along ``u``, so ``f_mu T - s s^T`` must be positive
semi-definite. (A mean of order one *per coordinate*, ``|mu| ~ sqrt(N)``, gives the loss a
curvature of order ``N`` along ``u``: at fixed ``eta`` there is no ``N -> infinity`` ODE
for plain SGD -- the ill-conditioning batch normalization removes -- so it is not offered.)
A random student initialization has ``r = O(1 / sqrt(N)) -> 0``; the ODE starts at ``r =
0`` and the simulation realizes ``r = 0`` exactly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from framework.validators import SpecificationError, check_int, check_real

__all__ = ["ISOTROPIC", "InputDistribution"]


def _real_vector(name: str, value: Any) -> np.ndarray:
    """A finite float vector of at least one entry; a non-number is a TypeError."""
    if isinstance(value, (str, bytes)) or isinstance(value, Mapping):
        raise TypeError(f"{name!r} must be a sequence of real numbers, got {value!r} "
                        f"({type(value).__name__})")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = [value]
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{name!r} must be a sequence of real numbers, got {value!r} "
                        f"({type(value).__name__})") from None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Real):
            raise TypeError(f"{name!r} must hold real numbers, got {item!r} "
                            f"({type(item).__name__}) in {items!r}")
    out = np.array(items, dtype=float).reshape(-1)
    if out.size == 0:
        raise SpecificationError(f"{name!r} must have at least one entry, got {items!r}")
    if not np.all(np.isfinite(out)):
        raise SpecificationError(f"{name!r} must have finite entries, got {out.tolist()}")
    out.setflags(write=False)
    return out


class InputDistribution:
    """Gaussian inputs ``N(m u, Sigma)`` whose covariance is given by its spectrum.

    Parameters
    ----------
    eigenvalues : sequence of float
        The ``L`` eigenvalues ``lambda_l > 0`` of ``Sigma``.
    fractions : sequence of float, optional
        The fraction ``f_l > 0`` of the ``N`` directions in eigenspace ``l``; they sum to
        1 (to 1e-12). Default: equal fractions ``1 / L``.
    mean : float, optional
        The size ``m = |mu| >= 0`` of the input mean (default 0: centred inputs). The
        pre-activation means are ``m r_i`` and ``m s_n`` (module docstring).
    direction : float or sequence of float, optional
        The mean direction ``u``, given by the teacher vectors' overlaps ``s_n = B_n . u /
        sqrt(N)`` with it: one value for every teacher unit or one per unit (checked
        against the model's ``M`` and ``T``). Default 0 (``u`` orthogonal to the
        teacher). Only with ``mean > 0``.
    mean_space : int, optional
        The eigenspace of ``Sigma`` that holds ``u`` (default 0). Only with ``mean > 0``.

    The default ``InputDistribution()`` is ``Sigma = I`` (:data:`ISOTROPIC`). See the
    module docstring for the order parameters per eigenspace and the conventions.
    Helpers: :meth:`power_law`, :meth:`two_level`.
    """

    __slots__ = ("direction", "eigenvalues", "fractions", "mean", "mean_space")

    eigenvalues: np.ndarray
    fractions: np.ndarray
    mean: float
    direction: np.ndarray
    mean_space: int

    def __init__(self, eigenvalues: Any = (1.0,), fractions: Any = None, mean: Any = 0.0,
                 direction: Any = None, mean_space: Any = None) -> None:
        lam = _real_vector("eigenvalues", eigenvalues)
        if np.any(lam <= 0.0):
            raise SpecificationError(
                f"'eigenvalues' must be > 0 (a covariance with a zero or negative "
                f"eigenvalue), got {lam.tolist()}")
        if fractions is None:
            frac = np.full(lam.size, 1.0 / lam.size)
            frac.setflags(write=False)
        else:
            frac = _real_vector("fractions", fractions)
            if frac.size != lam.size:
                raise SpecificationError(
                    f"'fractions' must have one entry per eigenvalue ({lam.size}), got "
                    f"{frac.size}: {frac.tolist()}")
            if np.any(frac <= 0.0):
                raise SpecificationError(f"'fractions' must be > 0, got {frac.tolist()}")
            if abs(float(frac.sum()) - 1.0) > 1e-12:
                raise SpecificationError(
                    f"'fractions' must sum to 1 (to 1e-12), got sum {float(frac.sum())!r} "
                    f"for {frac.tolist()}")
        m = check_real("mean", mean, minimum=0.0)
        if m == 0.0 and (direction is not None or mean_space is not None):
            given = "direction" if direction is not None else "mean_space"
            raise SpecificationError(
                f"{given!r} describes the input mean and applies only with 'mean' > 0, "
                f"got mean = {m!r}")
        s_dir = _real_vector("direction", 0.0 if direction is None else direction)
        space = 0 if mean_space is None else check_int("mean_space", mean_space, minimum=0)
        if space >= lam.size:
            raise SpecificationError(
                f"'mean_space' must name an eigenspace, 0 <= mean_space < L = {lam.size}, "
                f"got {space}")
        object.__setattr__(self, "eigenvalues", lam)
        object.__setattr__(self, "fractions", frac)
        object.__setattr__(self, "mean", float(m))
        object.__setattr__(self, "direction", s_dir)
        object.__setattr__(self, "mean_space", int(space))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"InputDistribution is immutable (cannot set {name!r})")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled (and copied) through the constructor, which re-validates."""
        if self.centred:
            return (InputDistribution, (self.eigenvalues.tolist(), self.fractions.tolist()))
        return (InputDistribution, (self.eigenvalues.tolist(), self.fractions.tolist(),
                                    self.mean, self.direction.tolist(), self.mean_space))

    # -- helpers -----------------------------------------------------------------------
    @classmethod
    def power_law(cls, levels: int, exponent: float, mean: float = 1.0) -> InputDistribution:
        """``levels`` equally large eigenspaces with ``lambda_l`` proportional to
        ``l^(-exponent)`` (``l = 1 .. levels``), scaled so that the mean eigenvalue
        ``sum_l f_l lambda_l`` is ``mean``."""
        levels = check_int("levels", levels, minimum=1)
        exponent = check_real("exponent", exponent)
        mean = check_real("mean", mean, minimum=0.0, strict=True)
        raw = np.arange(1, levels + 1, dtype=float) ** (-exponent)
        return cls(mean * raw / raw.mean())

    @classmethod
    def two_level(cls, ratio: float, fraction: float = 0.5, mean: float = 1.0
                  ) -> InputDistribution:
        """Two eigenvalues ``lambda_1 < lambda_2 = ratio * lambda_1`` (``ratio >= 1``),
        the first holding ``fraction`` of the directions, scaled to mean eigenvalue
        ``mean``."""
        ratio = check_real("ratio", ratio, minimum=1.0)
        fraction = check_real("fraction", fraction)
        mean = check_real("mean", mean, minimum=0.0, strict=True)
        if not 0.0 < fraction < 1.0:
            raise SpecificationError(f"'fraction' must be in (0, 1), got {fraction!r}")
        low = mean / (fraction + (1.0 - fraction) * ratio)
        return cls((low, ratio * low), (fraction, 1.0 - fraction))

    # -- properties --------------------------------------------------------------------
    @property
    def L(self) -> int:
        """Number of eigenspaces."""
        return int(self.eigenvalues.size)

    @property
    def isotropic(self) -> bool:
        """``Sigma = I`` (one eigenvalue, equal to 1) and centred: today's problem, bit for
        bit."""
        return self.L == 1 and float(self.eigenvalues[0]) == 1.0 and self.centred

    @property
    def centred(self) -> bool:
        """Zero input mean (``mean == 0``)."""
        return self.mean == 0.0

    @property
    def mean_eigenvalue_of_direction(self) -> float:
        """``lambda_mu``: the input variance along the mean direction ``u``."""
        return float(self.eigenvalues[self.mean_space])

    def teacher_overlap(self, M: int) -> np.ndarray:
        """``s (M,)``: the teacher's overlaps ``B_n . u / sqrt(N)`` with the mean direction
        (``direction`` broadcast to ``M`` units); a wrong length is an error."""
        M = check_int("M", M, minimum=1)
        if self.direction.size not in (1, M):
            raise SpecificationError(
                f"'inputs.direction' must have one value or one per teacher unit (M = {M}), "
                f"got {self.direction.size}: {self.direction.tolist()}")
        return np.broadcast_to(self.direction, (M,)).copy()

    def teacher_mean(self, M: int) -> np.ndarray:
        """``m s (M,)``: the teachers' pre-activation means (zeros for centred inputs)."""
        s = self.teacher_overlap(M)
        return self.mean * s if not self.centred else np.zeros_like(s)

    def check_teacher(self, T: Any) -> None:
        """Refuse a mean direction the teacher ``T`` cannot hold: ``f_mu T - s s^T`` must be
        positive semi-definite (the component along ``u`` is part of ``T_mu = f_mu
        T``)."""
        if self.centred:
            return
        T = np.asarray(T, dtype=float)
        s = self.teacher_overlap(T.shape[0])
        lam_min = float(np.linalg.eigvalsh(self.fractions[self.mean_space] * T
                                           - np.outer(s, s))[0])
        if lam_min < -1e-12:
            raise SpecificationError(
                f"'inputs.direction' s = {s.tolist()} is too long for the teacher: "
                f"f_mu T - s s^T (f_mu = {self.fractions[self.mean_space]:.6g}, the "
                f"fraction of eigenspace mean_space = {self.mean_space}) must be positive "
                f"semi-definite, got smallest eigenvalue {lam_min:.6g}")

    def mean_coordinate(self, N: int) -> int:
        """The coordinate of the mean direction ``u`` in the eigenbasis at dimension ``N``
        (the first of eigenspace ``mean_space``'s block)."""
        return int(np.sum(self.block_sizes(N)[:self.mean_space]))

    @property
    def mean_eigenvalue(self) -> float:
        """``sum_l f_l lambda_l = tr(Sigma) / N``."""
        return float(self.fractions @ self.eigenvalues)

    def teacher_covariance(self, T: Any) -> np.ndarray:
        """``Tt = sum_l lambda_l T_l = mean_eigenvalue * T`` (``T_l = f_l T``); ``T``
        itself when isotropic."""
        T = np.asarray(T, dtype=float)
        return T if self.isotropic else self.mean_eigenvalue * T

    def lift(self, X: Any) -> np.ndarray:
        """``X_l = f_l X`` per eigenspace, shape ``(L, *X.shape)``: an overlap of weights
        spread over the eigenspaces in proportion to their size."""
        X = np.asarray(X, dtype=float)
        return self.fractions.reshape((-1,) + (1,) * X.ndim) * X

    def total(self, X_l: Any) -> np.ndarray:
        """``sum_l lambda_l X_l`` over the leading eigenspace axis (``X_l`` of shape
        ``(..., L, a, b)``): the pre-activation covariance of per-eigenspace overlaps."""
        X_l = np.asarray(X_l, dtype=float)
        return np.einsum("l,...lab->...ab", self.eigenvalues, X_l)

    def block_sizes(self, N: int) -> np.ndarray:
        """Directions per eigenspace at dimension ``N``: ``f_l N`` rounded by largest
        remainders (they sum to ``N``); each must be >= 1."""
        N = check_int("N", N, minimum=1)
        exact = self.fractions * N
        sizes = np.floor(exact).astype(np.int64)
        short = N - int(sizes.sum())
        if short:
            order = np.argsort(-(exact - sizes), kind="stable")
            sizes[order[:short]] += 1
        if np.any(sizes < 1):
            raise SpecificationError(
                f"'N' must give every eigenspace at least one direction (fractions "
                f"{self.fractions.tolist()}), got N = {N} (sizes {sizes.tolist()})")
        return sizes

    def coordinate_eigenvalues(self, N: int) -> np.ndarray:
        """``(N,)``: the eigenvalue of each coordinate in the eigenbasis (eigenspace
        ``l`` is the ``l``-th block of :meth:`block_sizes`)."""
        return np.repeat(self.eigenvalues, self.block_sizes(N))

    def realize(self, model: Any, state: Any, N: int, rng: Any, r: Any = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Weights ``(J (K, N), B (M, N))`` in the eigenbasis (eigenspace ``l`` is the
        ``l``-th block of :meth:`block_sizes`) with the state ``state``
        (:class:`~framework.OrderParameters`) spread over the eigenspaces: each block is
        ``model.realize(state, N_l, rng)`` scaled by ``sqrt(N_l / N)``, so that ``Q_l =
        (N_l / N) Q``, ``R_l = (N_l / N) R``, ``T_l = (N_l / N) T`` exactly (``f_l``
        rounded to ``N_l / N``) and ``J J^T / N = Q`` (a block realizes ``J_l J_l^T /
        N_l = Q``). A state per eigenspace (``state.Q`` of shape ``(L, K, K)``) is realized
        block by block: ``Q_l`` exactly.

        With an input mean the mean direction ``u`` is the coordinate
        :meth:`mean_coordinate`: ``B[:, c] = sqrt(N) s`` and ``J[:, c] = sqrt(N) r``
        (``r``: the student's overlaps ``J_i . u / sqrt(N)``, default 0), and the rest of
        the block realizes ``Q_mu - r r^T``, ``R_mu - r s^T``, ``T_mu - s s^T`` exactly."""
        sizes = self.block_sizes(N)
        from framework.model import OrderParameters

        if getattr(state, "per_eigenspace", False):  # its own block per eigenspace
            blocks = [(q, rr, t) for q, rr, t in zip(state.Q, state.R, state.T, strict=True)]
        else:
            blocks = [(state.Q * (n / N), state.R * (n / N), state.T * (n / N))
                      for n in sizes]
        widths = [int(n) for n in sizes]
        col = None
        if not self.centred:
            K, M = np.shape(blocks[0][1])
            rv = np.zeros(K) if r is None else np.asarray(r, dtype=float).reshape(K)
            sv = self.teacher_overlap(M)
            q, rr, t = blocks[self.mean_space]
            blocks[self.mean_space] = (q - np.outer(rv, rv), rr - np.outer(rv, sv),
                                       t - np.outer(sv, sv))
            widths[self.mean_space] -= 1
            if widths[self.mean_space] < K + M:
                raise SpecificationError(
                    f"'N' must give eigenspace mean_space = {self.mean_space} at least K + M "
                    f"+ 1 = {K + M + 1} directions with an input mean, got N = {N} "
                    f"({sizes[self.mean_space]} directions)")
            col = math.sqrt(N) * np.concatenate([rv, sv])
        parts = []
        for l, ((q, rr, t), n) in enumerate(zip(blocks, widths, strict=True)):
            c = N / n  # a block realizes J_l J_l^T / n = c Q_l, i.e. J_l J_l^T / N = Q_l
            j, b = model.realize(OrderParameters(q * c, rr * c, t * c), n, rng)
            if col is not None and l == self.mean_space:
                j = np.concatenate([col[:j.shape[0], None], j], axis=1)
                b = np.concatenate([col[j.shape[0]:, None], b], axis=1)
            parts.append((j, b))
        return (np.concatenate([j for j, _ in parts], axis=1),
                np.concatenate([b for _, b in parts], axis=1))

    def space_overlaps(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """``X^(l) Y^(l)^T / N`` per eigenspace for weights in the eigenbasis, ``X (...,
        a, N)``, ``Y (..., b, N)`` -> ``(..., L, a, b)``."""
        N = X.shape[-1]
        edges = np.cumsum(self.block_sizes(N))[:-1]
        return np.stack([x @ np.swapaxes(y, -1, -2) / N for x, y in
                         zip(np.split(X, edges, axis=-1), np.split(Y, edges, axis=-1),
                             strict=True)], axis=-3)

    # -- specification -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"eigenvalues": self.eigenvalues.tolist(),
                               "fractions": self.fractions.tolist()}
        if not self.centred:  # omitted when centred: specifications as before
            out.update(mean=self.mean, direction=self.direction.tolist(),
                       mean_space=self.mean_space)
        return out

    #: The fields of :meth:`to_dict` / :meth:`from_dict`.
    FIELDS: tuple[str, ...] = ("eigenvalues", "fractions", "mean", "direction", "mean_space")

    @classmethod
    def from_dict(cls, data: Any) -> InputDistribution:
        """From :meth:`to_dict` output (or an ``InputDistribution``); unknown keys are an
        error."""
        if isinstance(data, InputDistribution):
            return data
        if not isinstance(data, Mapping):
            raise TypeError(f"'inputs' must be an InputDistribution or a mapping with "
                            f"'eigenvalues' and 'fractions', got {data!r} "
                            f"({type(data).__name__})")
        unknown = sorted(set(data) - set(cls.FIELDS))
        if unknown:
            raise SpecificationError(
                f"unknown field(s) {', '.join(map(repr, unknown))} for inputs; valid "
                f"fields: {', '.join(map(repr, cls.FIELDS))}")
        if "eigenvalues" not in data:
            raise SpecificationError("'inputs' must give 'eigenvalues'")
        return cls(data["eigenvalues"], data.get("fractions"), data.get("mean", 0.0),
                   data.get("direction"), data.get("mean_space"))

    def describe(self) -> str:
        if self.isotropic:
            return "isotropic Gaussian inputs N(0, I)"
        if self.L == 1 and float(self.eigenvalues[0]) == 1.0:
            cov = "covariance I"
        else:
            cov = "covariance eigenvalues " + ", ".join(
                f"{lam:.6g} (fraction {f:.6g})"
                for lam, f in zip(self.eigenvalues, self.fractions, strict=True))
        if self.centred:
            return f"centred Gaussian inputs, {cov}"
        return (f"Gaussian inputs, {cov}; mean of size {self.mean:.6g} along a direction in "
                f"eigenspace {self.mean_space} with teacher overlaps "
                f"{[float(f'{v:.6g}') for v in self.direction]}")

    def _key(self) -> tuple[Any, ...]:
        return (self.eigenvalues.tolist(), self.fractions.tolist(), self.mean,
                self.direction.tolist() if not self.centred else None,
                self.mean_space if not self.centred else None)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InputDistribution):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(repr(self._key()))

    def __repr__(self) -> str:
        if self.isotropic:
            return "InputDistribution()"
        extra = "" if self.centred else (
            f", mean={self.mean!r}, direction={self.direction.tolist()}, "
            f"mean_space={self.mean_space}")
        return (f"InputDistribution(eigenvalues={self.eigenvalues.tolist()}, "
                f"fractions={self.fractions.tolist()}{extra})")


#: ``Sigma = I``.
ISOTROPIC = InputDistribution()

