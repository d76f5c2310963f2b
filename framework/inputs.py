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

A non-zero input mean is not implemented yet: it is refused, not ignored.
"""

from __future__ import annotations

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
    """Gaussian inputs ``N(0, Sigma)`` whose covariance is given by its spectrum.

    Parameters
    ----------
    eigenvalues : sequence of float
        The ``L`` eigenvalues ``lambda_l > 0`` of ``Sigma``.
    fractions : sequence of float, optional
        The fraction ``f_l > 0`` of the ``N`` directions in eigenspace ``l``; they sum to
        1 (to 1e-12). Default: equal fractions ``1 / L``.

    The default ``InputDistribution()`` is ``Sigma = I`` (:data:`ISOTROPIC`). See the
    module docstring for the order parameters per eigenspace and the conventions.
    Helpers: :meth:`power_law`, :meth:`two_level`.
    """

    __slots__ = ("eigenvalues", "fractions")

    eigenvalues: np.ndarray
    fractions: np.ndarray

    def __init__(self, eigenvalues: Any = (1.0,), fractions: Any = None) -> None:
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
        object.__setattr__(self, "eigenvalues", lam)
        object.__setattr__(self, "fractions", frac)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"InputDistribution is immutable (cannot set {name!r})")

    def __reduce__(self) -> tuple[Any, tuple[list[float], list[float]]]:
        """Pickled (and copied) through the constructor, which re-validates."""
        return (InputDistribution, (self.eigenvalues.tolist(), self.fractions.tolist()))

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
        """``Sigma = I`` (one eigenvalue, equal to 1): today's problem, bit for bit."""
        return self.L == 1 and float(self.eigenvalues[0]) == 1.0

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

    def realize(self, model: Any, state: Any, N: int, rng: Any) -> tuple[np.ndarray, np.ndarray]:
        """Weights ``(J (K, N), B (M, N))`` in the eigenbasis (eigenspace ``l`` is the
        ``l``-th block of :meth:`block_sizes`) with the state ``state``
        (:class:`~framework.OrderParameters`) spread over the eigenspaces: each block is
        ``model.realize(state, N_l, rng)`` scaled by ``sqrt(N_l / N)``, so that ``Q_l =
        (N_l / N) Q``, ``R_l = (N_l / N) R``, ``T_l = (N_l / N) T`` exactly (``f_l``
        rounded to ``N_l / N``) and ``J J^T / N = Q`` (a block realizes ``J_l J_l^T /
        N_l = Q``). A state per eigenspace (``state.Q`` of shape ``(L, K, K)``) is realized
        block by block: ``Q_l`` exactly."""
        sizes = self.block_sizes(N)
        if getattr(state, "per_eigenspace", False):  # its own block per eigenspace
            from framework.model import OrderParameters

            c = N / sizes  # J_l J_l^T / N_l = Q_l N / N_l
            blocks = [OrderParameters(q * c_l, r * c_l, t * c_l)
                      for q, r, t, c_l in zip(state.Q, state.R, state.T, c, strict=True)]
            parts = [model.realize(b, int(n), rng) for b, n in zip(blocks, sizes, strict=True)]
        else:
            parts = [model.realize(state, int(n), rng) for n in sizes]
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
        return {"eigenvalues": self.eigenvalues.tolist(), "fractions": self.fractions.tolist()}

    @classmethod
    def from_dict(cls, data: Any) -> InputDistribution:
        """From :meth:`to_dict` output (or an ``InputDistribution``); a ``mean`` entry
        is refused (not implemented yet), other unknown keys are an error."""
        if isinstance(data, InputDistribution):
            return data
        if not isinstance(data, Mapping):
            raise TypeError(f"'inputs' must be an InputDistribution or a mapping with "
                            f"'eigenvalues' and 'fractions', got {data!r} "
                            f"({type(data).__name__})")
        if "mean" in data:
            raise SpecificationError(
                "'inputs.mean' (a non-zero input mean) is not implemented yet: only "
                "centred inputs with a structured covariance are")
        allowed = ("eigenvalues", "fractions")
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise SpecificationError(
                f"unknown field(s) {', '.join(map(repr, unknown))} for inputs; valid "
                f"fields: {', '.join(map(repr, allowed))}")
        if "eigenvalues" not in data:
            raise SpecificationError("'inputs' must give 'eigenvalues'")
        return cls(data["eigenvalues"], data.get("fractions"))

    def describe(self) -> str:
        if self.isotropic:
            return "isotropic Gaussian inputs N(0, I)"
        parts = ", ".join(f"{lam:.6g} (fraction {f:.6g})"
                          for lam, f in zip(self.eigenvalues, self.fractions, strict=True))
        return f"centred Gaussian inputs, covariance eigenvalues {parts}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InputDistribution):
            return NotImplemented
        return bool(np.array_equal(self.eigenvalues, other.eigenvalues)
                    and np.array_equal(self.fractions, other.fractions))

    def __hash__(self) -> int:
        return hash((self.eigenvalues.tobytes(), self.fractions.tobytes()))

    def __repr__(self) -> str:
        if self.isotropic:
            return "InputDistribution()"
        return (f"InputDistribution(eigenvalues={self.eigenvalues.tolist()}, "
                f"fractions={self.fractions.tolist()})")


#: ``Sigma = I``.
ISOTROPIC = InputDistribution()

