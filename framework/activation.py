"""Activation functions ``g`` applied after the normalization."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import numpy as np

__all__ = ["Activation"]


@attrs.frozen
class Activation:
    """A registered activation.

    Parameters
    ----------
    name : str
        Registry name.
    g, gprime : callable
        The function and its derivative, elementwise on arrays.
    description : str
        One line for ``symphase plugins``.
    closed_form : str or None
        The name of a closed-form family the theory engine knows (``"erf"`` for
        ``g(u) = erf(u / sqrt 2)``), or None: expectations are then computed by the
        generic numerical engine.
    """

    name: str
    g: Callable[[np.ndarray], np.ndarray] = attrs.field(eq=False)
    gprime: Callable[[np.ndarray], np.ndarray] = attrs.field(eq=False)
    description: str = ""
    closed_form: str | None = None
