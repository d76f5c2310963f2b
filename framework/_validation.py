"""Deprecated private name of :mod:`framework.validators` (kept so old imports work)."""

from __future__ import annotations

from framework.validators import *  # noqa: F403
from framework.validators import __all__ as __all__
from framework.validators import _name  # noqa: F401
