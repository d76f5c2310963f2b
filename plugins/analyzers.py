"""Built-in analyzers (registered below as they land)."""

from __future__ import annotations

from framework import hookimpl


@hookimpl
def symphase_register_analyzers(registry):  # type: ignore[no-untyped-def]
    pass
