"""Validators for plugin specifications (public: part of the plugin author's kit).

Every error names the parameter, the constraint and the value
(``'K' must be >= 1, got 0``); a wrong type raises :class:`TypeError` and is never
coerced (an integral float such as ``2.0`` is accepted where an integer is asked for).

Two flavours:

- attrs validators with the ``validator(instance, attribute, value)`` signature, for
  ``attrs.field(validator=...)``: :func:`integer`, :func:`ge`, :func:`gt`, :func:`one_of`;
- ``check_*`` helpers for plain functions, which return the checked value:
  :func:`check_int`, :func:`check_real`, :func:`check_finite`.

Example, the options of an analyzer plugin::

    import attrs
    from framework import Analyzer
    from framework.validators import gt, integer, one_of

    @attrs.frozen
    class Probe(Analyzer):
        name = "probe"
        description = "..."
        samples: int = attrs.field(default=1000, validator=integer(minimum=1))
        tolerance: float = attrs.field(default=1e-6, converter=float, validator=gt(0.0))
        method: str = attrs.field(default="qmc", validator=one_of("qmc", "mc"))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "SpecificationError",
    "alpha_grid_option",
    "check_finite",
    "check_int",
    "check_real",
    "ge",
    "gt",
    "integer",
    "one_of",
]


class SpecificationError(ValueError):
    """A specification value violates a constraint (a ``ValueError``)."""


def _name(attribute: Any) -> str:
    return getattr(attribute, "name", str(attribute))


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """Return ``value`` as an int, or raise naming ``name`` and the constraint."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        if isinstance(value, float | np.floating) and float(value).is_integer():
            value = int(value)
        else:
            raise TypeError(f"{name!r} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise SpecificationError(f"{name!r} must be >= {minimum}, got {value}")
    return value


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    strict: bool = False,
) -> float:
    """Return ``value`` as a finite float, or raise naming ``name`` and the constraint.

    ``minimum`` is inclusive unless ``strict`` is true.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name!r} must be a real number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name!r} must be a real number, got {value!r}") from None
    if not math.isfinite(out):
        raise SpecificationError(f"{name!r} must be finite, got {out}")
    if minimum is not None:
        if strict and not out > minimum:
            raise SpecificationError(f"{name!r} must be > {minimum}, got {out}")
        if not strict and not out >= minimum:
            raise SpecificationError(f"{name!r} must be >= {minimum}, got {out}")
    return out


def check_finite(name: str, array: np.ndarray) -> np.ndarray:
    """Raise if ``array`` has a non-finite entry."""
    if not np.all(np.isfinite(array)):
        raise SpecificationError(f"{name!r} must have finite entries, got {array!r}")
    return array


def integer(minimum: int | None = None) -> Callable[[Any, Any, Any], None]:
    """attrs validator: an integer, optionally ``>= minimum``."""

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        check_int(_name(attribute), value, minimum=minimum)

    return validate


def ge(minimum: float) -> Callable[[Any, Any, Any], None]:
    """attrs validator: a finite real ``>= minimum``."""

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        check_real(_name(attribute), value, minimum=minimum)

    return validate


def gt(minimum: float) -> Callable[[Any, Any, Any], None]:
    """attrs validator: a finite real ``> minimum``."""

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        check_real(_name(attribute), value, minimum=minimum, strict=True)

    return validate


def one_of(*choices: Any, hint: str = "") -> Callable[[Any, Any, Any], None]:
    """attrs validator: ``value`` is one of ``choices``."""

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            extra = f" ({hint})" if hint else ""
            raise SpecificationError(
                f"{_name(attribute)!r} must be one of {allowed}, got {value!r}{extra}"
            )

    return validate


def alpha_grid_option(value: Any) -> tuple[float, ...] | None:
    """attrs converter of an explicit report grid ``alpha``: None, or a strictly
    increasing sequence of >= 2 finite values >= 0 (returned as a tuple of floats)."""
    if value is None:
        return None
    items = np.atleast_1d(np.asarray(value, dtype=object)).ravel()
    if isinstance(value, str | bytes) or not all(
            isinstance(a, int | float | np.integer | np.floating) and not isinstance(a, bool)
            for a in items):
        raise TypeError(f"'alpha' must be a sequence of real numbers, got {value!r}")
    out = tuple(float(a) for a in items)
    if len(out) < 2 or not np.all(np.isfinite(out)) or np.any(np.diff(out) <= 0) or out[0] < 0:
        raise SpecificationError(
            f"'alpha' must be a strictly increasing grid of >= 2 finite values >= 0, got "
            f"{value!r}"
        )
    return out

