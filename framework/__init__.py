"""symphase: executable statistical mechanics of online learning in two-layer
teacher-student networks, with normalizations as plugins.

The public API is what this module exports; everything else is private.
"""

from __future__ import annotations

from framework import datasets, streams, theory, validators
from framework.activation import Activation
from framework.analyzer import Analyzer
from framework.experiment import Experiment
from framework.io import load, load_experiment, save
from framework.manager import (
    DEFAULT_PLUGINS,
    SymphasePluginWarning,
    get_activation,
    get_analyzer,
    get_model,
    get_normalization,
    get_plugin_manager,
    get_registry,
    list_analyzers,
    list_models,
    list_normalizations,
    refresh_plugins,
    register_plugin,
    unregister_plugin,
)
from framework.model import Forward, Model, OrderParameters, TeacherStudent
from framework.normalization import Backward, Normalization, ScaleKernels
from framework.plugin import hookimpl
from framework.registry import PluginError, Registry, UnknownNameError
from framework.results import convention_attrs, symphase_version
from framework.streams import STREAM_INIT, STREAM_SIMULATION
from framework.sweep import Sweep, load_sweep, point_experiment, spec_hash
from framework.validators import SpecificationError

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
    "get_model",
    "get_normalization",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "list_analyzers",
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
