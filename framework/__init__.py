"""symphase: executable statistical mechanics of online learning in two-layer
teacher-student networks, with normalizations as plugins.

The public API is what this module exports; everything else is private.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from framework import streams, validators
from framework.activation import Activation
from framework.analyzer import Analyzer
from framework.experiment import Experiment
from framework.inputs import InputDistribution
from framework.learning_rule import LearningRule
from framework.manager import (
    DEFAULT_PLUGINS,
    SymphasePluginWarning,
    get_activation,
    get_analyzer,
    get_learning_rule,
    get_model,
    get_normalization,
    get_plugin_manager,
    get_registry,
    list_analyzers,
    list_learning_rules,
    list_models,
    list_normalizations,
    refresh_plugins,
    register_plugin,
    unregister_plugin,
)
from framework.model import Forward, Layers, Model, OrderParameters, TeacherStudent
from framework.normalization import Backward, Normalization, ScaleKernels
from framework.plugin import hookimpl
from framework.registry import PluginError, Registry, UnknownNameError
from framework.results import convention_attrs, symphase_version
from framework.streams import STREAM_INIT, STREAM_SIMULATION
from framework.validators import SpecificationError

if TYPE_CHECKING:
    from framework import datasets, theory
    from framework.io import load, load_experiment, save
    from framework.sweep import Sweep, load_sweep, point_experiment, spec_hash

# Heavy parts of the public API (xarray, scipy, numba) are imported on first use, so that
# ``import framework`` stays cheap: name -> (module, attribute or None for the module).
_LAZY: dict[str, tuple[str, str | None]] = {
    "datasets": ("framework.datasets", None),
    "theory": ("framework.theory", None),
    "load": ("framework.io", "load"),
    "load_experiment": ("framework.io", "load_experiment"),
    "save": ("framework.io", "save"),
    "Sweep": ("framework.sweep", "Sweep"),
    "load_sweep": ("framework.sweep", "load_sweep"),
    "point_experiment": ("framework.sweep", "point_experiment"),
    "spec_hash": ("framework.sweep", "spec_hash"),
    "interrupt_of": ("framework.cli", "interrupt_of"),
}


def __getattr__(name: str) -> Any:
    """Import a lazily exported name of the public API on first access (PEP 562)."""
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, including the lazily imported ones."""
    return sorted(set(globals()) | set(_LAZY))


__version__ = symphase_version()

__all__ = [
    "DEFAULT_PLUGINS",
    "STREAM_INIT",
    "STREAM_SIMULATION",
    "Activation",
    "Analyzer",
    "Backward",
    "Experiment",
    "Forward",
    "InputDistribution",
    "Layers",
    "LearningRule",
    "Model",
    "Normalization",
    "OrderParameters",
    "PluginError",
    "Registry",
    "ScaleKernels",
    "SpecificationError",
    "Sweep",
    "SymphasePluginWarning",
    "TeacherStudent",
    "UnknownNameError",
    "__version__",
    "convention_attrs",
    "datasets",
    "get_activation",
    "get_analyzer",
    "get_learning_rule",
    "get_model",
    "get_normalization",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "interrupt_of",
    "list_analyzers",
    "list_learning_rules",
    "list_models",
    "list_normalizations",
    "load",
    "load_experiment",
    "load_sweep",
    "point_experiment",
    "refresh_plugins",
    "register_plugin",
    "save",
    "spec_hash",
    "streams",
    "theory",
    "unregister_plugin",
    "validators",
]
