"""Provenance and attrs for result datasets (the attrs survive netCDF).

Every dataset an experiment returns carries:

- ``symphase_spec_json``: a JSON copy of the full :class:`~framework.Experiment`;
- ``spec.<path>`` attrs: the same specification flattened to strings and numbers;
- ``symphase_analyzer``: the analyzer's name, ``symphase_analyzer_json`` its options;
- ``symphase_plugins``: JSON of plugin name -> source (built-in or distribution version);
- ``symphase_version``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import xarray as xr

    from framework.analyzer import Analyzer
    from framework.experiment import Experiment

__all__ = ["convention_attrs", "finalize", "flatten_attrs", "symphase_version"]


@functools.cache
def symphase_version() -> str:
    """The installed package's version (looked up once per process)."""
    from importlib import metadata

    try:
        return metadata.version("symphase")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def _attr_value(value: Any) -> str | int | float:
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value)
    if isinstance(value, str):
        return value
    if value is None:
        return "None"
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return json.dumps(value, sort_keys=True)


def flatten_attrs(data: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float]:
    """Flatten nested mappings to ``{"a.b.c": str | int | float}``.

    Lists become JSON strings, booleans integers, None the string ``"None"``.
    """
    out: dict[str, str | int | float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_attrs(value, prefix=f"{name}."))
        else:
            out[name] = _attr_value(value)
    return out


CONVENTIONS = {
    "convention_learning_rate": "J <- J - eta * grad_J eps: step eta/sqrt(N) along xi on weights "
    "with O(1) components (gradient descent with rate eta in W = J/sqrt(N))",
    "convention_time": "alpha = number of SGD steps / N",
    "convention_output": "sum over hidden units, second-layer weights fixed to 1 "
    "(no 1/K or 1/sqrt(K) factor)",
    "convention_activation_input": "x = J xi / sqrt(N), xi ~ N(0, I_N)",
    "convention_loss": "eps = (zeta - sigma)^2 / 2; eps_g = E[eps] including noise variance / 2",
    "convention_minibatch": "gradient averaged over the batch (eta^2 term divided by batch size)",
}


def convention_attrs(experiment: Experiment) -> dict[str, str | int | float]:
    """The shared conventions plus the experiment's training parameters, as attrs.

    A model whose second layers are not the soft committee machine's (:meth:`Model.layers`)
    states them: ``convention_output`` describes the outputs, and ``c_student``,
    ``c_teacher``, ``readout_trained``, ``eta_v``, ``weight_decay`` and
    ``weight_decay_v`` are stored (the readouts themselves are in the specification).
    """
    layers = experiment.model.layers()
    extra: dict[str, str | int | float] = {}
    if not layers.committee_machine:
        extra = {
            "convention_output": layers.describe(),
            "c_student": layers.c_student, "c_teacher": layers.c_teacher,
            "readout_trained": int(layers.readout_trained), "eta_v": layers.eta_v,
            "weight_decay": layers.weight_decay, "weight_decay_v": layers.weight_decay_v,
        }
    inputs = experiment.model.input_distribution()
    if not inputs.isotropic:  # the input covariance's spectrum and what Q means then
        extra.update({
            "inputs": inputs.describe(),
            "input_eigenvalues": ", ".join(f"{v:.17g}" for v in inputs.eigenvalues),
            "input_fractions": ", ".join(f"{v:.17g}" for v in inputs.fractions),
            "convention_inputs": (
                "xi ~ N(0, Sigma); Q_space[l] = J^(l) J^(l)^T / N, R_space[l] = J^(l) "
                "B^(l)^T / N per eigenspace l of Sigma; Q, R are the pre-activation "
                "covariances sum_l lambda_l Q_space[l] (= J Sigma J^T / N); teacher "
                "T_l = f_l T; learning rate not rescaled by Sigma"),
        })
        if not inputs.centred:
            extra["convention_inputs"] = (
                "xi ~ N(m u, Sigma) with |u| = 1, u in eigenspace input_mean_space of "
                "Sigma, m = input_mean (each coordinate of the mean O(m / sqrt(N))); "
                "pre-activation means m r (student, r = mean_overlap = J u / sqrt(N)) and "
                "m s (teacher, teacher_mean_overlap = B u / sqrt(N)); Q, R the "
                "pre-activation covariances; "
                + str(extra["convention_inputs"]).replace("xi ~ N(0, Sigma); ", ""))
    return {
        **CONVENTIONS,
        **extra,
        "eta": experiment.eta,
        "batch_size": experiment.batch_size,
        "K": experiment.model.K,
        "M": experiment.model.M,
        "activation": experiment.model.activation,
        "noise_variance": experiment.model.noise,
        "normalization": experiment.normalization.name,
        "init": experiment.init if isinstance(experiment.init, str) else "order_parameters",
        "init_scale": experiment.init_scale,
        "init_N": experiment.init_N,
        "seed": experiment.seed,
    }


def provenance_attrs(experiment: Experiment, analyzer: Analyzer) -> dict[str, str | int | float]:
    """The provenance attrs of a result of ``analyzer`` within ``experiment``.

    ``symphase_version``, ``symphase_analyzer`` (+ ``_json``), ``symphase_normalization``,
    ``symphase_spec_json`` (the full experiment), ``symphase_plugins`` and the flattened
    ``spec.*`` copy. Sweeps use the same attrs for their base experiment.
    """
    from framework.manager import plugin_versions

    spec = experiment.to_dict()
    attrs: dict[str, Any] = {
        "symphase_version": symphase_version(),
        "symphase_analyzer": analyzer.name,
        "symphase_analyzer_json": json.dumps(analyzer.to_dict(), sort_keys=True),
        "symphase_normalization": experiment.normalization.name,
        "symphase_spec_json": json.dumps(spec, sort_keys=True),
        "symphase_plugins": json.dumps(plugin_versions(), sort_keys=True),
    }
    attrs.update(flatten_attrs(spec, prefix="spec."))
    return attrs


def finalize(dataset: xr.Dataset, experiment: Experiment, analyzer: Analyzer) -> xr.Dataset:
    """Attach provenance attrs and fire ``symphase_dataset_created``."""
    from framework.manager import plugin_manager

    attrs = provenance_attrs(experiment, analyzer)
    for key, value in attrs.items():
        dataset.attrs.setdefault(key, value)
    dataset.attrs.update({k: _attr_value(v) for k, v in dataset.attrs.items()})
    plugin_manager().hook.symphase_dataset_created(
        dataset=dataset, experiment=experiment, analyzer=analyzer
    )
    return dataset
