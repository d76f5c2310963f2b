"""Reading experiment TOML files for the ``symphase run`` command (schema: docs/toml.md).

A TOML file describes an :class:`~framework.Experiment`, an optional ``[sweep]`` grid
and ``[run]`` options; :func:`read_toml` turns it into a :class:`~framework.Sweep`
(a single point when there is no grid) and the options. Only the CLI reads TOML;
:mod:`framework.sweep` knows nothing about files of this kind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from framework._resources import check_memory
from framework.experiment import Experiment
from framework.sweep import Sweep
from framework.validators import SpecificationError

__all__ = ["RUN_KEYS", "TOML_KEYS", "read_toml"]


def _describe(exc: BaseException) -> str:
    return str(exc) if str(exc) else type(exc).__name__


#: Top-level keys of an experiment TOML file (see docs/toml.md).
TOML_KEYS: tuple[str, ...] = (
    "model", "normalization", "learning_rule", "analyzers", "eta", "batch_size", "init",
    "init_scale", "init_N", "seed", "sweep", "run",
)
#: Keys of the ``[run]`` table.
RUN_KEYS: tuple[str, ...] = ("out", "scheduler", "workers", "progress", "retry_failed")


def read_toml(path: str | os.PathLike[str]) -> tuple[Sweep, dict[str, Any]]:
    """Read an experiment TOML file (schema: docs/toml.md).

    Returns the :class:`Sweep` (an empty ``[sweep]`` is a single point) and the
    ``[run]`` options (``out`` resolved relative to the file's folder).

    Raises
    ------
    SpecificationError
        Unreadable file (missing, a folder, not UTF-8, nested too deeply), invalid TOML,
        an unknown key, an invalid value, no analyzer, or sizes that cannot fit in this
        machine's memory (estimated before anything is allocated:
        :func:`framework._resources.check_memory`); the message starts with the file
        name and names the field (``[sweep] 'eta'[2] = -1.0: ...``).
    """
    import tomllib

    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise SpecificationError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SpecificationError(f"{path}: is a folder, not a TOML file") from None
    except OSError as exc:
        raise SpecificationError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise SpecificationError(f"{path}: invalid TOML: not UTF-8 ({exc.reason} at byte "
                                 f"{exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecificationError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise SpecificationError(f"{path}: invalid TOML: nested too deeply") from None

    def fail(message: str) -> SpecificationError:
        return SpecificationError(f"{path.name}: {message}")

    unknown = sorted(set(data) - set(TOML_KEYS))
    if unknown:
        raise fail(f"unknown key(s) {', '.join(map(repr, unknown))}; valid top-level keys: "
                   f"{', '.join(map(repr, TOML_KEYS))}")
    if "model" not in data:
        raise fail("the [model] table is required (with at least K and M)")
    spec = {k: v for k, v in data.items() if k not in ("sweep", "run")}
    analyzers = spec.get("analyzers", [])
    if isinstance(analyzers, Mapping):
        items = []
        for name, options in analyzers.items():
            if not isinstance(options, Mapping):
                raise fail(f"[analyzers.{name}] must be a table of options, got {options!r}")
            items.append({"name": name, **options})
        spec["analyzers"] = items
    grid = data.get("sweep", {})
    if not isinstance(grid, Mapping):
        raise fail(f"[sweep] must be a table of key = [values], got {grid!r}")
    check_memory(spec, grid, what=f"{path.name}: the experiment")  # before allocating
    try:
        experiment = Experiment.from_dict(spec)
    except (ValueError, TypeError, LookupError) as exc:
        raise fail(_describe(exc)) from None
    try:
        sweep_ = Sweep(experiment, grid)
        sweep_.validate()
    except (ValueError, TypeError, LookupError) as exc:
        raise fail(f"[sweep] {_describe(exc)}") from None
    run = data.get("run", {})
    if not isinstance(run, Mapping):
        raise fail(f"[run] must be a table, got {run!r}")
    unknown = sorted(set(run) - set(RUN_KEYS))
    if unknown:
        raise fail(f"unknown [run] key(s) {', '.join(map(repr, unknown))}; valid keys: "
                   f"{', '.join(map(repr, RUN_KEYS))}")
    options = dict(run)
    if "out" in options:
        if not isinstance(options["out"], str):
            raise fail(f"[run] 'out' must be a string, got {options['out']!r}")
        options["out"] = path.parent / options["out"]
    if "workers" in options and (
        isinstance(options["workers"], bool) or not isinstance(options["workers"], int)
        or options["workers"] < 1
    ):
        raise fail(f"[run] 'workers' must be an integer >= 1, got {options['workers']!r}")
    for key in ("progress", "retry_failed"):
        if key in options and not isinstance(options[key], bool):
            raise fail(f"[run] {key!r} must be true or false, got {options[key]!r}")
    if "scheduler" in options and not isinstance(options["scheduler"], str):
        raise fail(f"[run] 'scheduler' must be a string, got {options['scheduler']!r}")
    if not experiment.analyzers:
        raise fail("no analyzer: nothing to run; add a table such as [analyzers.dynamics] "
                   "(`symphase plugins` lists the analyzers)")
    return sweep_, options
