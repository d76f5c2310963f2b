"""Deprecated private name of :mod:`framework.validators` (kept so old imports work)."""

from __future__ import annotations

from framework.validators import (  # noqa: F401
    SpecificationError,
    _name,
    check_finite,
    check_int,
    check_real,
    ge,
    gt,
    integer,
    one_of,
)
from framework.validators import __all__ as __all__
