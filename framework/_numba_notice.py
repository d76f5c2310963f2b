"""One line on stderr before the numba kernels of symphase are compiled.

The kernels of :mod:`framework.theory` and of the built-in plugins are compiled with
``cache=True``: the first run of a fresh clone (or the first run after their source
changed) compiles them, which takes ~30 s of CPU, and every later process loads them from
numba's on-disk cache (``__pycache__`` next to the source, or ``NUMBA_CACHE_DIR``).

So that the first run is never silently slow, :func:`install` registers a listener for
numba's ``"numba:compile"`` event. Numba fires that event only after the dispatcher has
failed to load the signature from its disk cache, right before compiling it; the listener
prints :data:`MESSAGE` once per process, on the first such event of an on-disk cached
dispatcher defined in ``framework`` or ``plugins``. Dispatchers without a disk cache
(``cache=False``, e.g. closures built at run time) compile in every process and are
ignored, so a warm cache stays silent. The listener runs only when numba compiles, never
on a call of a compiled kernel.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["MESSAGE", "install", "install_if_numba_loaded"]

MESSAGE = "symphase: compiling numba kernels (first run, ~30 s; cached afterwards)"

_OWN_PACKAGES = frozenset({"framework", "plugins"})
_installed = False


def _is_own_cached(dispatcher: Any) -> bool:
    """True if ``dispatcher`` is defined in symphase and is cached on disk."""
    py_func = getattr(dispatcher, "py_func", None)
    module = getattr(py_func, "__module__", None) or ""
    if module.split(".")[0] not in _OWN_PACKAGES:
        return False
    cache = getattr(dispatcher, "_cache", None)
    return cache is not None and type(cache).__name__ != "NullCache"


def install() -> None:
    """Register the compile notice with numba (idempotent; nothing without numba)."""
    global _installed
    if _installed:
        return
    try:
        from numba.core import event
    except ImportError:  # pragma: no cover - exercised only without numba
        return

    class _CompileNotice(event.Listener):
        announced = False

        def on_start(self, ev: Any) -> None:
            if self.announced:
                return
            data = ev.data if isinstance(ev.data, dict) else {}
            if _is_own_cached(data.get("dispatcher")):
                self.announced = True
                print(MESSAGE, file=sys.stderr, flush=True)

        def on_end(self, ev: Any) -> None:
            pass

    event.register("numba:compile", _CompileNotice())
    _installed = True


def install_if_numba_loaded() -> None:
    """:func:`install` if numba is already imported (never imports numba itself)."""
    if "numba" in sys.modules:
        install()
