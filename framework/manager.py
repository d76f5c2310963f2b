"""Plugin discovery: the plugin manager, the cached registry and name look-ups.

Built-in plugins (``DEFAULT_PLUGINS``) are registered first, exactly like
third-party ones, then entry points of the ``symphase`` group, then plugins given
at run time with :func:`register_plugin`. A plugin that fails to import or to
register warns with its name and the reason (also one that calls ``sys.exit`` while
importing or registering); the rest keeps working.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import pluggy

from framework import _numba_notice, hookspecs
from framework.activation import Activation
from framework.analyzer import Analyzer
from framework.learning_rule import LearningRule
from framework.model import Model
from framework.normalization import Normalization
from framework.plugin import PROJECT
from framework.registry import BUILTIN, Registry

__all__ = [
    "DEFAULT_PLUGINS",
    "SymphasePluginWarning",
    "get_activation",
    "get_analyzer",
    "get_learning_rule",
    "get_model",
    "get_normalization",
    "get_plugin_manager",
    "get_registry",
    "list_analyzers",
    "list_learning_rules",
    "list_models",
    "list_normalizations",
    "refresh_plugins",
    "register_plugin",
]

#: Built-in plugin modules, registered in this order before any entry point.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "plugins.models",
    "plugins.activations",
    "plugins.normalizations",
    "plugins.normalizations_extra",
    "plugins.learning_rules",
    "plugins.simulation",
    "plugins.dynamics",
    "plugins.equilibrium",
    "plugins.reproduce",
    "plugins.reproduce_normalizations",
    "plugins.reproduce_goldt",
    "plugins.reproduce_natural_gradient",
    "plugins.reproduce_bn_speedup",
)

_REGISTRATION_HOOKS = (
    "symphase_register_models",
    "symphase_register_activations",
    "symphase_register_normalizations",
    "symphase_register_learning_rules",
    "symphase_register_analyzers",
    "symphase_register_reproductions",
)

_runtime_plugins: list[Any] = []


class SymphasePluginWarning(UserWarning):
    """A plugin could not be loaded or registered; it is skipped."""


def _warn(name: str, source: str, reason: BaseException | str) -> None:
    warnings.warn(
        f"symphase plugin {name!r} ({source}) was skipped: {reason}",
        SymphasePluginWarning,
        stacklevel=3,
    )


def _entry_point_source(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "entry point"
    return f"{dist.name} {dist.version}"


def get_plugin_manager(
    *, entry_points: bool = True, plugins: Iterable[Any] = ()
) -> pluggy.PluginManager:
    """Build a fresh plugin manager.

    Parameters
    ----------
    entry_points : bool
        Also load plugins advertised under the ``symphase`` entry-point group.
    plugins : iterable
        Extra plugin objects (modules, classes or instances with hook
        implementations), registered last.

    The source of each plugin (``"built-in"``, ``"<distribution> <version>"`` or
    ``"runtime"``) is kept in ``pm.symphase_sources`` (plugin name -> source).
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    sources: dict[str, str] = {}

    def add(obj: Any, name: str, source: str) -> None:
        try:
            pm.register(obj, name=name)
        except Exception as exc:
            _warn(name, source, exc)
        else:
            sources[name] = source

    for module_name in DEFAULT_PLUGINS:
        add(importlib.import_module(module_name), module_name, BUILTIN)
    if entry_points:
        for ep in metadata.entry_points(group=PROJECT):
            source = _entry_point_source(ep)
            try:
                obj = ep.load()
            except SystemExit as exc:  # a plugin must not end the process that loads it
                _warn(ep.name, source, f"import failed: it called sys.exit({exc.code!r})")
                continue
            except Exception as exc:
                _warn(ep.name, source, f"import failed: {type(exc).__name__}: {exc}")
                continue
            add(obj, ep.name, source)
    for i, obj in enumerate(plugins):
        add(obj, getattr(obj, "__name__", f"runtime-{i}"), "runtime")
    pm.symphase_sources = sources  # type: ignore[attr-defined]
    _numba_notice.install_if_numba_loaded()  # plugins with numba kernels: see that module
    return pm


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Call every registration hook plugin by plugin, in registration order.

    Each plugin is called on its own so that its entries carry its source and so that
    an exception in one plugin only skips that plugin (with a warning).
    """
    registry = Registry()
    sources: dict[str, str] = getattr(pm, "symphase_sources", {})
    for name, plugin in pm.list_name_plugin():
        registry.source = sources.get(name, "runtime")
        others = [p for p in pm.get_plugins() if p is not plugin]
        for hook in _REGISTRATION_HOOKS:
            caller = pm.subset_hook_caller(hook, remove_plugins=others)
            try:
                caller(registry=registry)
            except SystemExit as exc:
                _warn(name, registry.source, f"{hook} called sys.exit({exc.code!r})")
            except Exception as exc:
                _warn(name, registry.source, f"{hook} failed: {type(exc).__name__}: {exc}")
    registry.source = "runtime"
    return registry


@functools.lru_cache(maxsize=1)
def _cached() -> tuple[pluggy.PluginManager, Registry]:
    pm = get_plugin_manager(plugins=tuple(_runtime_plugins))
    return pm, build_registry(pm)


def get_registry() -> Registry:
    """The process-wide registry (built on first use, cached; see :func:`refresh_plugins`)."""
    return _cached()[1]


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager behind :func:`get_registry`."""
    return _cached()[0]


def refresh_plugins() -> None:
    """Forget the cached plugin manager and registry; the next look-up rediscovers."""
    _cached.cache_clear()


def register_plugin(plugin: Any) -> None:
    """Register a plugin object at run time (e.g. from a notebook) and refresh."""
    _runtime_plugins.append(plugin)
    refresh_plugins()


def unregister_plugin(plugin: Any) -> None:
    """Undo :func:`register_plugin` and refresh."""
    _runtime_plugins.remove(plugin)
    refresh_plugins()


def get_normalization(name: str, **params: Any) -> Normalization:
    """An instance of the normalization registered as ``name`` with hyper-parameters."""
    cls = get_registry().get("normalization", name)
    return cls.from_dict(params)


def get_learning_rule(name: str, **options: Any) -> LearningRule:
    """An instance of the learning rule registered as ``name`` with its options."""
    cls = get_registry().get("learning_rule", name)
    return cls.from_dict(options)


def get_model(name: str, **spec: Any) -> Model:
    """An instance of the model registered as ``name`` built from its specification.

    ``get_model("teacher_student", K=2, M=2)`` is ``TeacherStudent(K=2, M=2)`` (through
    ``cls.from_dict(spec)``, so unknown fields are an error naming the valid ones).
    """
    cls = get_registry().get("model", name)
    return cls.from_dict(spec)


def get_analyzer(name: str, **options: Any) -> Analyzer:
    """An instance of the analyzer registered as ``name`` with its options."""
    cls = get_registry().get("analyzer", name)
    return cls.from_dict(options)


def get_activation(name: str) -> Activation:
    """The activation registered as ``name``."""
    return get_registry().get("activation", name)


def list_normalizations() -> list[str]:
    """Names of the installed normalizations, sorted."""
    return get_registry().names("normalization")


def list_learning_rules() -> list[str]:
    """Names of the installed learning rules, sorted."""
    return get_registry().names("learning_rule")


def list_models() -> list[str]:
    """Names of the installed models, sorted."""
    return get_registry().names("model")


def list_analyzers() -> list[str]:
    """Names of the installed analyzers, sorted."""
    return get_registry().names("analyzer")


def plugin_versions() -> dict[str, str]:
    """Plugin name -> source (``built-in`` or ``distribution version``)."""
    return dict(getattr(plugin_manager(), "symphase_sources", {}))
