"""The registry that registration hooks fill: the one place that validates plugin
classes and rejects duplicate names."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import attrs

from framework.activation import Activation
from framework.analyzer import Analyzer
from framework.learning_rule import LearningRule
from framework.model import Model
from framework.normalization import Normalization

__all__ = ["Entry", "PluginError", "Registry"]

BUILTIN = "built-in"


class PluginError(ValueError):
    """A plugin tried to register something invalid."""


class UnknownNameError(LookupError, ValueError):
    """A look-up by name found nothing; the message lists what is installed."""


@attrs.frozen
class Entry:
    """A registered object and where it came from."""

    kind: str
    name: str
    obj: Any
    description: str
    source: str  # "built-in", "<distribution> <version>", or "runtime"


class Registry:
    """Models, normalizations, learning rules, analyzers, activations and reproductions
    by name.

    Registration hooks receive an instance; the plugin manager sets
    :attr:`source` before calling each plugin so that every entry records where it
    came from.
    """

    KINDS = ("model", "normalization", "learning_rule", "analyzer", "activation", "reproduction")

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in self.KINDS}
        self.source = BUILTIN

    # -- adding ---------------------------------------------------------------------
    def _add(self, kind: str, name: Any, obj: Any, description: Any) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise PluginError(f"{kind} name must be a Python identifier, got {name!r} ({obj!r})")
        if not isinstance(description, str) or not description.strip():
            raise PluginError(f"{kind} {name!r} must have a non-empty one-line 'description'")
        table = self._entries[kind]
        if name in table:
            raise PluginError(
                f"{kind} {name!r} from {self.source} is already registered by "
                f"{table[name].source}"
            )
        summary = description.strip().splitlines()[0]
        table[name] = Entry(kind, name, obj, summary, self.source)

    def _check_class(self, kind: str, cls: Any, base: type, methods: tuple[str, ...]) -> None:
        if not (inspect.isclass(cls) and issubclass(cls, base)):
            raise PluginError(f"{kind} must be a subclass of {base.__name__}, got {cls!r}")
        if inspect.isabstract(cls):
            missing_abstract = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
            raise PluginError(
                f"{kind} class {cls.__name__} is abstract: it must implement {missing_abstract}"
            )
        missing = [m for m in methods if getattr(cls, m) is getattr(base, m)]
        if missing:
            raise PluginError(
                f"{kind} class {cls.__name__} must implement {', '.join(missing)}"
            )

    def add_model(self, cls: type[Model]) -> None:
        """Register a :class:`~framework.Model` subclass under ``cls.name``.

        The class must be a concrete subclass of ``Model`` (every abstract method
        implemented) with an identifier ``name`` and a one-line ``description``; a name
        already registered is refused.
        """
        self._check_class("model", cls, Model, ())
        self._add("model", cls.name, cls, cls.description)

    def add_normalization(self, cls: type[Normalization]) -> None:
        """Register a :class:`~framework.Normalization` subclass under ``cls.name``."""
        self._check_class("normalization", cls, Normalization, ("forward", "backward"))
        if cls.supports_diagonal_scale:
            self._check_class(
                "normalization", cls, Normalization, ("scale", "scale_jacobian")
            )
        self._add("normalization", cls.name, cls, cls.description)

    def add_learning_rule(self, cls: type[LearningRule]) -> None:
        """Register a :class:`~framework.LearningRule` subclass under ``cls.name``."""
        self._check_class("learning_rule", cls, LearningRule, ("rates", "direction"))
        self._add("learning_rule", cls.name, cls, cls.description)

    def add_analyzer(self, cls: type[Analyzer]) -> None:
        """Register an :class:`~framework.Analyzer` subclass under ``cls.name``."""
        self._check_class("analyzer", cls, Analyzer, ("run",))
        self._add("analyzer", cls.name, cls, cls.description)

    def add_activation(self, activation: Activation) -> None:
        """Register an :class:`~framework.Activation` instance."""
        if not isinstance(activation, Activation):
            raise PluginError(f"activation must be an Activation instance, got {activation!r}")
        self._add("activation", activation.name, activation, activation.description)

    def add_reproduction(
        self, name: str, function: Callable[..., int], description: str
    ) -> None:
        """Register ``symphase reproduce NAME``; ``function(out, quick) -> exit code``."""
        if not callable(function):
            raise PluginError(f"reproduction {name!r} must be callable, got {function!r}")
        self._add("reproduction", name, function, description)

    # -- looking up ------------------------------------------------------------------
    def entries(self, kind: str) -> list[Entry]:
        """Entries of one kind, sorted by name."""
        return [self._entries[kind][k] for k in sorted(self._entries[kind])]

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def get(self, kind: str, name: str) -> Any:
        """The registered object, or :class:`UnknownNameError` listing what is installed."""
        try:
            return self._entries[kind][name].obj
        except KeyError:
            installed = ", ".join(repr(n) for n in self.names(kind)) or "none"
            raise UnknownNameError(
                f"unknown {kind} {name!r}; installed {kind}s: {installed}"
            ) from None
