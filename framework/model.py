"""The teacher-student model and its order parameters.

Conventions (shared by every module, see the README's convention table):
inputs ``xi ~ N(0, I_N)``; teacher ``y = B xi / sqrt(N)`` (M units), student
``x = J xi / sqrt(N)`` (K units); outputs are plain sums over units with unit
second-layer weights. Order parameters ``Q = J J^T / N``, ``R = J B^T / N``,
``T = B B^T / N``; the pair ``(x, y)`` is Gaussian with covariance
``[[Q, R], [R^T, T]]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np

from framework._validation import SpecificationError, check_int, ge, integer, one_of

__all__ = ["OrderParameters", "TeacherStudent", "realize_covariance"]

#: Relative tolerance for symmetry and positive semi-definiteness checks.
_TOL = 1e-10


def _readonly(array: Any) -> np.ndarray:
    out = np.array(array, dtype=float, copy=True)
    out.setflags(write=False)
    return out


def _array_eq(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.shape(a) == np.shape(b) and np.array_equal(a, b))


def _array_field(**kwargs: Any) -> Any:
    return attrs.field(
        converter=_readonly, eq=attrs.cmp_using(eq=_array_eq), hash=False, **kwargs
    )


def _check_square_symmetric(name: str, matrix: np.ndarray, size: int) -> None:
    if matrix.shape != (size, size):
        raise SpecificationError(f"{name!r} must have shape ({size}, {size}), got {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise SpecificationError(f"{name!r} must have finite entries, got {matrix!r}")
    scale = max(1.0, float(np.max(np.abs(matrix))))
    asym = float(np.max(np.abs(matrix - matrix.T))) if size else 0.0
    if asym > _TOL * scale:
        raise SpecificationError(
            f"{name!r} must be symmetric, got max |{name} - {name}^T| = {asym:.3g}"
        )


def _check_psd(name: str, matrix: np.ndarray, hint: str = "") -> None:
    if matrix.size == 0:
        return
    lam = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))
    scale = max(1.0, float(np.max(np.abs(lam))))
    if lam[0] < -_TOL * scale * matrix.shape[0]:
        raise SpecificationError(
            f"{name} must be positive semi-definite, got smallest eigenvalue {lam[0]:.6g}{hint}"
        )


def realize_covariance(
    covariance: np.ndarray, N: int, rng: np.random.Generator | int | None = None
) -> np.ndarray:
    """Rows ``Z`` (P x N) with ``Z Z^T / N == covariance`` exactly (to rounding).

    A factor of the covariance is rotated by a Haar-random orthonormal frame drawn
    from ``rng``; ``N`` must be at least the covariance's rank.
    """
    rng = np.random.default_rng(rng)
    lam, vec = np.linalg.eigh(covariance)
    keep = lam > _TOL * max(1.0, float(lam[-1])) * lam.size
    factor = vec[:, keep] * np.sqrt(lam[keep])  # P x rank
    if N < factor.shape[1]:
        raise SpecificationError(
            f"'N' must be >= {factor.shape[1]} (the rank of the covariance), got {N}"
        )
    frame, r = np.linalg.qr(rng.standard_normal((N, factor.shape[1])))
    frame = frame * np.sign(np.diag(r))  # Haar-distributed orthonormal columns
    return np.sqrt(N) * factor @ frame.T


@attrs.frozen
class TeacherStudent:
    """A two-layer soft-committee teacher-student model.

    Parameters
    ----------
    K : int
        Number of student hidden units (>= 1).
    M : int
        Number of teacher hidden units (>= 1).
    activation : str
        Name of a registered activation (default ``"erf"``: ``g(u) = erf(u / sqrt 2)``).
    T : array_like, optional
        Teacher overlap matrix ``B B^T / N`` (M x M, symmetric positive definite).
        Defaults to the identity.
    noise : float
        Variance ``sigma^2`` of Gaussian output noise added to the teacher output (>= 0).
    second_layer : str
        ``"fixed"``: second-layer weights fixed to one (soft committee machine), the only
        option implemented so far.
    """

    K: int = attrs.field(validator=integer(minimum=1))
    M: int = attrs.field(validator=integer(minimum=1))
    activation: str = attrs.field(default="erf", validator=attrs.validators.instance_of(str))
    T: np.ndarray = _array_field(default=None)
    noise: float = attrs.field(default=0.0, converter=float, validator=ge(0.0))
    second_layer: str = attrs.field(
        default="fixed",
        validator=one_of("fixed", hint="a trained second layer is not implemented yet"),
    )

    @T.validator
    def _check_T(self, attribute: Any, value: np.ndarray) -> None:
        _check_square_symmetric("T", value, self.M)
        lam = np.linalg.eigvalsh(value)
        if lam[0] <= 0:
            raise SpecificationError(
                f"'T' must be positive definite, got smallest eigenvalue {lam[0]:.6g}"
            )

    def __init__(self, K: int, M: int, activation: str = "erf", T: Any = None,
                 noise: float = 0.0, second_layer: str = "fixed") -> None:
        K = check_int("K", K, minimum=1)
        M = check_int("M", M, minimum=1)
        if T is None:
            T = np.eye(M)
        self.__attrs_init__(K, M, activation, T, noise, second_layer)  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible description (``T`` as nested lists)."""
        return {
            "K": self.K,
            "M": self.M,
            "activation": self.activation,
            "T": self.T.tolist(),
            "noise": self.noise,
            "second_layer": self.second_layer,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TeacherStudent:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error."""
        return cls(**_known_keys(cls.__name__, data, ("K", "M", "activation", "T", "noise",
                                                      "second_layer")))


def _known_keys(owner: str, data: Mapping[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise SpecificationError(
            f"unknown field(s) {', '.join(map(repr, unknown))} for {owner}; "
            f"valid fields: {', '.join(map(repr, allowed))}"
        )
    return dict(data)


@attrs.frozen(init=False)
class OrderParameters:
    """Order parameters ``Q = J J^T/N`` (K x K), ``R = J B^T/N`` (K x M), ``T = B B^T/N``.

    Q and T must be symmetric and the joint covariance ``[[Q, R], [R^T, T]]`` of the
    pre-activations ``(x, y)`` positive semi-definite. Arrays are stored read-only.
    """

    Q: np.ndarray = _array_field()
    R: np.ndarray = _array_field()
    T: np.ndarray = _array_field()

    def __init__(self, Q: Any, R: Any, T: Any = None) -> None:
        Q = np.atleast_2d(np.asarray(Q, dtype=float))
        R = np.asarray(R, dtype=float)
        K = Q.shape[0]
        if R.ndim != 2 or R.shape[0] != K:
            raise SpecificationError(f"'R' must have shape ({K}, M), got {R.shape}")
        M = R.shape[1]
        T = np.eye(M) if T is None else np.atleast_2d(np.asarray(T, dtype=float))
        _check_square_symmetric("Q", Q, K)
        _check_square_symmetric("T", T, M)
        if not np.all(np.isfinite(R)):
            raise SpecificationError(f"'R' must have finite entries, got {R!r}")
        joint = np.block([[Q, R], [R.T, T]])
        _check_psd(
            "the joint covariance [[Q, R], [R^T, T]]",
            joint,
            " (|R_in| too large for the norms Q_ii and T_nn?)",
        )
        self.__attrs_init__(Q, R, T)

    @property
    def K(self) -> int:
        return int(self.Q.shape[0])

    @property
    def M(self) -> int:
        return int(self.T.shape[0])

    @property
    def covariance(self) -> np.ndarray:
        """The joint covariance ``[[Q, R], [R^T, T]]`` of ``(x, y)``."""
        return np.block([[self.Q, self.R], [self.R.T, self.T]])

    @classmethod
    def from_weights(cls, J: Any, B: Any) -> OrderParameters:
        """Order parameters of student weights ``J`` (K x N) and teacher ``B`` (M x N)."""
        J = np.atleast_2d(np.asarray(J, dtype=float))
        B = np.atleast_2d(np.asarray(B, dtype=float))
        if J.shape[1] != B.shape[1]:
            raise SpecificationError(
                f"'J' and 'B' must have the same input dimension N, got {J.shape[1]} and "
                f"{B.shape[1]}"
            )
        N = J.shape[1]
        return cls(J @ J.T / N, J @ B.T / N, B @ B.T / N)

    @classmethod
    def symmetric(cls, K: int, Q: float, C: float, R: float, S: float) -> OrderParameters:
        """The symmetric-phase point ``Q_ii=Q, Q_ik=C, R_ii=R, R_in=S`` with ``M=K``, ``T=I``."""
        K = check_int("K", K, minimum=1)
        eye = np.eye(K)
        return cls(C + (Q - C) * eye, S + (R - S) * eye, eye)

    @property
    def rank(self) -> int:
        """Numerical rank of the joint covariance (the dimension of the weights' span)."""
        lam = np.linalg.eigvalsh(self.covariance)
        return int(np.sum(lam > _TOL * max(1.0, float(lam[-1])) * lam.size))

    def realize(
        self, N: int, rng: np.random.Generator | int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Weights ``(J, B)`` in dimension ``N`` with exactly these order parameters.

        The rows of ``[J; B] / sqrt(N)`` are a factor of the joint covariance rotated
        by a uniformly random orthonormal frame (drawn from ``rng``), so
        ``OrderParameters.from_weights(J, B)`` reproduces ``Q, R, T`` to rounding.
        ``N`` must be at least the rank of the joint covariance.
        """
        N = check_int("N", N, minimum=1)
        rank = self.rank
        if N < rank:
            raise SpecificationError(
                f"'N' must be >= {rank} (the rank of the joint covariance), got {N}"
            )
        weights = realize_covariance(self.covariance, N, rng)
        return weights[: self.K], weights[self.K :]

    def to_dict(self) -> dict[str, Any]:
        return {"Q": self.Q.tolist(), "R": self.R.tolist(), "T": self.T.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OrderParameters:
        return cls(**_known_keys(cls.__name__, data, ("Q", "R", "T")))
