"""The specification behaviour shared by plugin classes (normalizations, analyzers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import attrs

from framework.validators import SpecificationError

__all__ = ["Named"]

_T = TypeVar("_T", bound="Named")


class Named:
    """A registered plugin class whose attrs fields are its options.

    ``to_dict`` gives ``{"name": ..., **options}`` (JSON compatible) and ``from_dict``
    rebuilds an instance after checking the option names against the fields.
    """

    #: Registry name.
    name: ClassVar[str] = ""
    #: What kind of plugin this is, for error messages ("normalization", "analyzer").
    kind: ClassVar[str] = "plugin"

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **options}``, JSON compatible."""
        fields = attrs.asdict(self) if attrs.has(type(self)) else {}  # type: ignore[arg-type]
        return {"name": self.name, **fields}

    @classmethod
    def from_dict(cls: type[_T], data: Mapping[str, Any]) -> _T:
        """Build an instance from options (a ``name`` entry must match the class)."""
        data = dict(data)
        name = data.pop("name", cls.name)
        if name != cls.name:
            raise SpecificationError(
                f"'name' must be {cls.name!r} for {cls.__name__}, got {name!r}"
            )
        kind = cls.kind  # read before attrs.has() narrows the type of cls
        if attrs.has(cls):
            allowed = [f.name for f in attrs.fields(cls) if f.init]
            unknown = sorted(set(data) - set(allowed))
            if unknown:
                valid = ", ".join(map(repr, allowed)) or "none"
                raise SpecificationError(
                    f"unknown option(s) {', '.join(map(repr, unknown))} for {kind} "
                    f"{name!r}; valid options: {valid}"
                )
        return cls(**data)
