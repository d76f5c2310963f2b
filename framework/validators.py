"""Validators for plugin specifications (public: part of the plugin author's kit).

Every error names the parameter, the constraint and the value with its type
(``'K' must be >= 1, got 0``, ``'second_order' must be a bool, got 'no' (str)``); a wrong
type raises :class:`TypeError` and is never coerced: a string is never read as a number or
a bool, a bool is not a number and a number is not a bool (an integral float such as
``2.0`` is accepted where an integer is asked for, an int where a real is).

Three flavours:

- attrs validators with the ``validator(instance, attribute, value)`` signature, for
  ``attrs.field(validator=...)``: :func:`real`, :func:`optional_real`, :func:`ge`,
  :func:`gt`, :func:`integer`, :func:`optional_integer`, :func:`boolean`,
  :func:`optional_boolean`, :func:`string`, :func:`one_of`;
- attrs converters that only normalise values of the right type and pass anything else
  through unchanged, for the validator to refuse naming the field: :func:`to_float`
  (a real number to ``float``), :func:`to_bool` (``numpy.bool_`` to ``bool``),
  :func:`alpha_grid_option`;
- ``check_*`` helpers for plain functions, which return the checked value:
  :func:`check_int`, :func:`check_real`, :func:`check_bool`, :func:`check_str`,
  :func:`check_real_array`, :func:`check_finite`.

Do not use ``converter=float`` or ``converter=bool`` on option fields: ``float("1e-3")``
reads a string, ``float(True)`` a bool, ``bool("no")`` is true, and their errors do not
name the field. Example, the options of an analyzer plugin::

    import attrs
    from framework import Analyzer
    from framework.validators import boolean, gt, integer, one_of, to_bool, to_float

    @attrs.frozen
    class Probe(Analyzer):
        name = "probe"
        description = "..."
        samples: int = attrs.field(default=1000, validator=integer(minimum=1))
        tolerance: float = attrs.field(default=1e-6, converter=to_float, validator=gt(0.0))
        method: str = attrs.field(default="qmc", validator=one_of("qmc", "mc"))
        verbose: bool = attrs.field(default=False, converter=to_bool, validator=boolean())
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "SpecificationError",
    "alpha_grid_option",
    "boolean",
    "check_bool",
    "check_finite",
    "check_int",
    "check_real",
    "check_real_array",
    "check_str",
    "ge",
    "gt",
    "integer",
    "one_of",
    "optional_boolean",
    "optional_integer",
    "optional_real",
    "quadrature_option",
    "real",
    "string",
    "to_bool",
    "to_float",
]


class SpecificationError(ValueError):
    """A specification value violates a constraint (a ``ValueError``)."""


def _name(attribute: Any) -> str:
    name = getattr(attribute, "name", None)  # str(attribute) only when needed (it is slow)
    return name if name is not None else str(attribute)


def _got(value: Any) -> str:
    """``'no' (str)``: the value and its type, for error messages."""
    return f"{value!r} ({type(value).__name__})"


def _is_real(value: Any) -> bool:
    """A real number: int, float or a numpy integer/floating scalar; not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def to_float(value: Any) -> Any:
    """attrs converter: a real number (int, float, numpy scalar; not a bool) to ``float``;
    anything else unchanged, for the field's validator (:func:`real`, :func:`gt`, ...) to
    refuse naming the field."""
    return float(value) if _is_real(value) else value


def to_bool(value: Any) -> Any:
    """attrs converter: ``numpy.bool_`` to ``bool``; anything else unchanged, for
    :func:`boolean` to refuse naming the field."""
    return bool(value) if isinstance(value, np.bool_) else value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` as a bool (``bool`` or ``numpy.bool_`` only: ``"no"``,
    ``"false"``, ``0`` and ``1`` are refused), or raise :class:`TypeError` naming
    ``name``."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name!r} must be a bool, got {_got(value)}")
    return bool(value)


def check_str(name: str, value: Any) -> str:
    """Return ``value`` if it is a str, else raise :class:`TypeError` naming ``name``."""
    if not isinstance(value, str):
        raise TypeError(f"{name!r} must be a str, got {_got(value)}")
    return value


def check_real_array(name: str, value: Any) -> np.ndarray:
    """Return ``value`` as a float array (a new array), or raise naming ``name``.

    Entries must be real numbers (int, float, numpy numbers); a string, bools, ``None``
    entries or a ragged nesting raise :class:`TypeError`. Finiteness is not checked
    (see :func:`check_finite`).
    """
    if isinstance(value, str | bytes):
        raise TypeError(f"{name!r} must be an array of real numbers, got {_got(value)}")
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError):
        raw = None
    if raw is not None and raw.dtype.kind == "O":
        items = raw.ravel()
        if all(_is_real(v) for v in items):
            raw = np.asarray(items.tolist(), dtype=float).reshape(raw.shape)
    if raw is None or raw.dtype.kind not in "iuf":
        raise TypeError(f"{name!r} must be an array of real numbers, got {_got(value)}")
    return np.array(raw, dtype=float, copy=True)


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """Return ``value`` as an int, or raise naming ``name`` and the constraint."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        if isinstance(value, float | np.floating) and float(value).is_integer():
            value = int(value)
        else:
            raise TypeError(f"{name!r} must be an integer, got {_got(value)}")
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

    ``value`` must be a real number (int, float, a numpy integer or floating scalar);
    a bool, a string or ``None`` raises :class:`TypeError`. ``minimum`` is inclusive
    unless ``strict`` is true.
    """
    if not _is_real(value):
        raise TypeError(f"{name!r} must be a real number, got {_got(value)}")
    out = float(value)
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


def optional_integer(minimum: int | None = None) -> Callable[[Any, Any, Any], None]:
    """attrs validator: None, or an integer, optionally ``>= minimum``."""

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        if value is not None:
            check_int(_name(attribute), value, minimum=minimum)

    return validate


def real(minimum: float | None = None, *, strict: bool = False
         ) -> Callable[[Any, Any, Any], None]:
    """attrs validator: a finite real number (not a bool or a str), optionally
    ``>= minimum`` (``> minimum`` if ``strict``); pair with ``converter=to_float``."""

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        check_real(_name(attribute), value, minimum=minimum, strict=strict)

    return validate


def optional_real(minimum: float | None = None, *, strict: bool = False
                  ) -> Callable[[Any, Any, Any], None]:
    """attrs validator: None, or what :func:`real` accepts."""

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        if value is not None:
            check_real(_name(attribute), value, minimum=minimum, strict=strict)

    return validate


def boolean() -> Callable[[Any, Any, Any], None]:
    """attrs validator: a ``bool`` or ``numpy.bool_`` (``"no"``, ``"false"``, ``0``,
    ``1`` are refused with :class:`TypeError`); pair with ``converter=to_bool``."""

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        check_bool(_name(attribute), value)

    return validate


def optional_boolean() -> Callable[[Any, Any, Any], None]:
    """attrs validator: None, or what :func:`boolean` accepts."""

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        if value is not None:
            check_bool(_name(attribute), value)

    return validate


def string() -> Callable[[Any, Any, Any], None]:
    """attrs validator: a str (anything else: :class:`TypeError` naming the field)."""

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        check_str(_name(attribute), value)

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
    """attrs validator: ``value`` is one of ``choices``.

    When every choice is a str, a value that is not a str raises :class:`TypeError`
    (another value :class:`SpecificationError`).
    """
    textual = bool(choices) and all(isinstance(c, str) for c in choices)

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        allowed = ", ".join(repr(c) for c in choices)
        extra = f" ({hint})" if hint else ""
        if textual and not isinstance(value, str):
            raise TypeError(
                f"{_name(attribute)!r} must be one of {allowed} (a str), got "
                f"{_got(value)}{extra}"
            )
        if value not in choices:
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


def quadrature_option(value: Any) -> dict[str, Any] | None:
    """attrs converter of an analyzer's ``quadrature`` option: None, or a mapping of
    :class:`framework.theory.Quadrature` options (validated here: an unknown option or a
    bad value names the option and the value), returned as a dict."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"'quadrature' must be a mapping of Quadrature options or None, "
                        f"got {value!r} ({type(value).__name__})")
    from framework.theory import Quadrature  # lazy: the theory imports this module

    Quadrature.from_dict(value)
    return dict(value)
