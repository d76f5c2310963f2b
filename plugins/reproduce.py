"""Built-in reproductions for ``symphase reproduce NAME``."""

from __future__ import annotations

from framework import hookimpl


@hookimpl
def symphase_register_reproductions(registry):  # type: ignore[no-untyped-def]
    pass
