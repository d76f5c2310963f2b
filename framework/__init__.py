"""symphase: executable statistical mechanics of online learning in two-layer
teacher-student networks, with normalizations as plugins.

The public API is what this module exports; everything else is private.
"""

from __future__ import annotations

from framework._validation import SpecificationError
from framework.activation import Activation
from framework.analyzer import Analyzer
from framework.experiment import Experiment
from framework.io import load, load_experiment, save
from framework.manager import (
    DEFAULT_PLUGINS,
    SymphasePluginWarning,
    get_activation,
    get_analyzer,
    get_normalization,
    get_plugin_manager,
    get_registry,
    list_analyzers,
    list_normalizations,
    refresh_plugins,
    register_plugin,
    unregister_plugin,
)
from framework.model import OrderParameters, TeacherStudent
from framework.normalization import Backward, Normalization, ScaleKernels
from framework.plugin import hookimpl
from framework.registry import PluginError, Registry, UnknownNameError
from framework.results import convention_attrs, symphase_version
from framework.sweep import Sweep, load_sweep, point_experiment, spec_hash

__version__ = symphase_version()

__all__ = [
    "DEFAULT_PLUGINS",
    "Activation",
    "Analyzer",
    "Backward",
    "Experiment",
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
    "get_activation",
    "get_analyzer",
    "get_normalization",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "list_analyzers",
    "list_normalizations",
    "load",
    "load_experiment",
    "load_sweep",
    "point_experiment",
    "refresh_plugins",
    "register_plugin",
    "save",
    "spec_hash",
    "unregister_plugin",
]
