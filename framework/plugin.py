"""The marker for symphase hook implementations.

A minimal third-party normalization plugin, in a module ``mynorm/plugin.py``::

    import attrs
    import numpy as np
    from framework import Backward, Normalization, hookimpl

    @attrs.frozen
    class Scaled(Normalization):
        name = "scaled"
        description = "x~ = c x with a fixed constant c"
        supports_diagonal_scale = True
        c: float = 2.0

        def forward(self, x, stats, params):
            return self.c * x

        def backward(self, x, stats, params, grad_out):
            return Backward(x=self.c * grad_out)

        def scale(self, Q, params):
            return np.full(Q.shape[:-1], self.c)

        def scale_jacobian(self, Q, params):
            return np.zeros(Q.shape + Q.shape[-1:])

    @hookimpl
    def symphase_register_normalizations(registry):
        registry.add_normalization(Scaled)

and in the distribution's ``pyproject.toml``::

    [project.entry-points.symphase]
    mynorm = "mynorm.plugin"

In a notebook, ``framework.register_plugin(module_or_object)`` does the same without
packaging. Models (``symphase_register_models``, ``registry.add_model``) and analyzers
(``symphase_register_analyzers``, ``registry.add_analyzer``) are registered the same way;
``docs/plugins.md`` describes the interfaces and the public kit (``framework.validators``,
``framework.datasets``, ``framework.streams``).
"""

from __future__ import annotations

import pluggy

__all__ = ["PROJECT", "hookimpl"]

#: The pluggy project name and the entry-point group.
PROJECT = "symphase"

#: Decorator marking a function as an implementation of a symphase hook.
hookimpl = pluggy.HookimplMarker(PROJECT)
