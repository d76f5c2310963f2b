"""Refuse specifications whose arrays cannot fit in this machine's memory, before allocating.

:func:`check_memory` estimates a *lower bound* of the memory an experiment needs from its
specification mapping (the JSON form, before any object is built) and raises
:class:`~framework.validators.SpecificationError` if it exceeds the memory available
(``MemAvailable`` of ``/proc/meminfo``, else ``psutil``; no check where neither is known).
The bound, in bytes, is

    8 * (M**2 + (K**2 + K*M) * P + (K * R + M) * N)

the teacher overlap ``T`` (M x M), one (K x K) and one (K x M) overlap per stored point of
a trajectory, and the weights of a finite-N network. ``P`` is the largest of the
analyzers' options declared ``"trajectory"`` in their class's
:attr:`~framework.Analyzer.size_options` (at least 1); ``N`` the largest of ``init_N``
and the options declared ``"system"``; ``R`` the largest declared ``"replicas"`` (at
least 1). Other options (iteration counts, seeds) are not sizes and are not counted; an
analyzer not installed counts nothing. It only refuses what certainly does not fit; an
analyzer can still need more.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from framework.validators import SpecificationError

__all__ = ["available_memory", "check_memory", "estimate_bytes"]

_GIB = 2.0**30


def _size_options(name: Any) -> dict[str, str]:
    """The :attr:`~framework.Analyzer.size_options` of the analyzer registered as
    ``name`` (empty if it is not installed or ``name`` is not a string)."""
    if not isinstance(name, str):
        return {}
    from framework.manager import get_registry

    try:
        cls = get_registry().get("analyzer", name)
    except Exception:  # an unknown analyzer is reported where it is built
        return {}
    return dict(getattr(cls, "size_options", {}) or {})


def available_memory() -> int | None:
    """Bytes of memory available to new allocations, or None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with dask.distributed
        return None
    return int(psutil.virtual_memory().available)


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _largest(values: Iterable[Any], default: int) -> int:
    ints = [v for v in (_int(x) for x in values) if v is not None]
    return max(ints, default=default)


def estimate_bytes(spec: Mapping[str, Any], grid: Mapping[str, Any] | None = None) -> tuple[
        float, str]:
    """Lower bound of the bytes that ``spec`` (an experiment's JSON form) needs; and why.

    With ``grid`` (a sweep's ``{key: [values]}``), each size takes its largest swept value
    (the grid is a Cartesian product, so the largest values occur together).
    """
    grid = grid or {}
    model = spec.get("model")
    model = model if isinstance(model, Mapping) else {}

    def size(base: Any, keys: tuple[str, ...], default: int) -> int:
        values = [base]
        for key in keys:
            swept = grid.get(key)
            if isinstance(swept, list | tuple):
                values += list(swept)
        return max(_largest(values, default), 0)

    K = size(model.get("K"), ("K", "model.K"), 1)
    M = size(model.get("M", model.get("K")), ("M", "model.M", "K", "model.K"), 1)
    init_N = size(spec.get("init_N"), ("init_N",), 1000)
    sizes = {"trajectory": (1, ""), "system": (init_N, ""), "replicas": (1, "")}
    analyzers = spec.get("analyzers")
    for analyzer in analyzers if isinstance(analyzers, list | tuple) else ():
        if not isinstance(analyzer, Mapping):
            continue
        name = analyzer.get("name")
        declared = _size_options(name)
        for option, value in analyzer.items():
            kind = declared.get(option)
            if kind not in sizes:
                continue
            swept = grid.get(f"{name}.{option}")
            n = _largest([value, *(swept if isinstance(swept, list | tuple) else [])], 1)
            if n > sizes[kind][0]:
                sizes[kind] = (n, f"{name}.{option} = {n}")
    P, N, R = (sizes[k][0] for k in ("trajectory", "system", "replicas"))
    total = 8.0 * (M * M + (K * K + K * M) * P + (K * R + M) * N)
    why = ", ".join([f"K = {K}", f"M = {M}", f"init_N = {init_N}",
                     *(w for _, w in sizes.values() if w)])
    return total, why


def check_memory(spec: Mapping[str, Any], grid: Mapping[str, Any] | None = None, *,
                 what: str = "the experiment") -> None:
    """Raise :class:`SpecificationError` if ``spec`` certainly needs more memory than is free.

    The message names the sizes, the estimate and the available memory. Set
    ``SYMPHASE_NO_MEMORY_CHECK=1`` to skip the check.
    """
    if os.environ.get("SYMPHASE_NO_MEMORY_CHECK"):
        return
    available = available_memory()
    if available is None:
        return
    need, why = estimate_bytes(spec, grid)
    if need > available:
        raise SpecificationError(
            f"{what} needs at least {need / _GIB:.3g} GiB ({why}) but {available / _GIB:.3g} "
            "GiB of memory is available; reduce the sizes"
        )
