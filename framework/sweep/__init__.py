"""Parameter sweeps (see :mod:`framework.sweep.grid`); becoming a package split by concern."""

from framework.sweep.grid import (
    EXPERIMENT_KEYS,
    MODEL_KEYS,
    Sweep,
    load_sweep,
    point_experiment,
    read_toml,
    spec_hash,
    sweep,
)

__all__ = [
    "EXPERIMENT_KEYS",
    "MODEL_KEYS",
    "Sweep",
    "load_sweep",
    "point_experiment",
    "read_toml",
    "spec_hash",
    "sweep",
]
