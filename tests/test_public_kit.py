"""A model and an analyzer written outside ``plugins/`` with the public kit only.

Everything here comes from ``import framework`` and the documented public modules
(``framework.validators``, ``framework.datasets``, ``framework.streams``,
``framework.docs``); no underscore module is imported.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np
import pytest
import xarray as xr

import framework
from framework import Analyzer, Experiment, Forward, Model, OrderParameters, datasets, hookimpl
from framework.cli import main as cli_main
from framework.validators import SpecificationError, ge, gt, integer

ROOT = Path(__file__).resolve().parents[1]
#: This plugin's own random stream (not one of framework.streams.STREAMS).
STREAM_LINEAR_SGD = 7_000_001


@attrs.frozen
class LinearTeacherStudent(Model):
    """Linear committee machines: ``sigma = sum_i x~_i``, ``zeta = sum_n y_n + noise``.

    Parameters
    ----------
    K, M : int
        Student and teacher units (>= 1).
    noise : float
        Output noise variance (>= 0).
    """

    name: ClassVar[str] = "linear_committee"
    description: ClassVar[str] = "linear student and teacher: outputs are sums of units"
    activation: ClassVar[str] = "linear"

    K: int = attrs.field(validator=integer(minimum=1))
    M: int = attrs.field(validator=integer(minimum=1))
    noise: float = attrs.field(default=0.0, converter=float, validator=ge(0.0))

    @property
    def T(self) -> np.ndarray:
        return np.eye(self.M)

    def to_dict(self) -> dict[str, Any]:
        return {"K": self.K, "M": self.M, "noise": self.noise}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LinearTeacherStudent:
        data = dict(data)
        if data.pop("name", cls.name) != cls.name:
            raise SpecificationError(f"'name' must be {cls.name!r}")
        unknown = sorted(set(data) - {"K", "M", "noise"})
        if unknown:
            raise SpecificationError(f"unknown field(s) {unknown} for {cls.__name__}")
        return cls(**data)

    def state_layout(self) -> dict[str, tuple[int, ...]]:
        return {"Q": (self.K, self.K), "R": (self.K, self.M)}

    def random_state(self, N: int, scale: float, rng: np.random.Generator) -> OrderParameters:
        frame, _ = np.linalg.qr(rng.standard_normal((N, self.M)))
        B = math.sqrt(N) * frame.T  # B B^T / N = I exactly
        J = scale * rng.standard_normal((self.K, N))
        return self.order_parameters(J, B)

    def generalization_error(
        self, engine: Any, Q: Any, R: Any, params: Mapping[str, Any] | None = None
    ) -> tuple[float, float]:
        """Exact for a linear network, no engine needed: ``E[(zeta - sigma)^2] / 2``."""
        Q, R = np.asarray(Q), np.asarray(R)
        return 0.5 * (self.M - 2 * R.sum() + Q.sum()) + 0.5 * self.noise, 0.0

    def forward(self, W: np.ndarray, xi: np.ndarray, noise: np.ndarray | None = None) -> Forward:
        pre = np.matmul(xi, np.swapaxes(W, -1, -2)) / math.sqrt(W.shape[-1])
        zeta = pre[..., self.K:].sum(axis=-1)
        if noise is not None:
            zeta = zeta + math.sqrt(self.noise) * noise
        return Forward(pre[..., : self.K], zeta)

    def readout(self, xt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return xt.sum(axis=-1), np.ones_like(xt)


@attrs.frozen
class LinearSGD(Analyzer):
    """Finite-N online SGD of any model, through its simulation step (no statistics).

    Parameters
    ----------
    N : int
        Input dimension (>= 1).
    alpha_max : float
        Last time (> 0); steps = alpha_max * N.
    n_points : int
        Number of recorded times, evenly spaced from 0 (>= 2).
    """

    name: ClassVar[str] = "linear_sgd"
    description: ClassVar[str] = "online SGD through the model's forward and readout"

    N: int = attrs.field(default=400, validator=integer(minimum=1))
    alpha_max: float = attrs.field(default=2.0, converter=float, validator=gt(0.0))
    n_points: int = attrs.field(default=5, validator=integer(minimum=2))

    def check(self, experiment: Experiment) -> None:
        if experiment.normalization.statistics_names:
            raise ValueError(f"'normalization' must use no statistics for {self.name!r}, got "
                             f"{experiment.normalization.name!r}")

    def run(self, experiment: Experiment) -> xr.Dataset:
        model, norm, N = experiment.model, experiment.normalization, self.N
        K, Bsz, eta = model.K, experiment.batch_size, experiment.eta
        rng = experiment.rng(STREAM_LINEAR_SGD, 0)
        J, B = model.realize(experiment.initial_order_parameters(), N, rng)
        W = np.concatenate([J, B])
        params = {k: np.asarray(v, dtype=float) for k, v in norm.parameters(K).items()}
        total = round(self.alpha_max * N)
        record = np.linspace(0, total, self.n_points).round().astype(int)
        Qs, Rs, eps = [], [], []
        step = 0
        for target in record:
            while step < target:
                xi = rng.standard_normal((Bsz, N))
                noise = rng.standard_normal(Bsz) if model.noise > 0 else None
                out = model.forward(W, xi, noise)
                xt = norm.forward(out.x, {}, params)
                sigma, dsigma = model.readout(xt)
                grad_out = -(out.zeta - sigma)[:, None] * dsigma
                dx = norm.backward(out.x, {}, params, grad_out).x
                W[:K] -= eta * (dx.T @ xi) / (math.sqrt(N) * Bsz)
                step += 1
            op = model.order_parameters(W[:K], W[K:])
            Qs.append(op.Q)
            Rs.append(op.R)
            eps.append(model.generalization_error(None, op.Q, op.R)[0])
        return datasets.dataset(
            {
                **datasets.order_parameter_variables(np.array(Qs), np.array(Rs)),
                "eps_g": datasets.variable(eps, "alpha", "generalization error"),
                "step": datasets.variable(record, "alpha", "number of SGD steps"),
            },
            coords={"alpha": datasets.coordinate(record / N, "alpha", "time alpha = steps / N")},
            experiment=experiment,
            attrs={"N": N, "method": {"kind": "online SGD", "stream": STREAM_LINEAR_SGD}},
        )


class KitPlugin:
    """A plugin object registered at run time, as from a notebook."""

    @hookimpl
    def symphase_register_models(self, registry: Any) -> None:
        registry.add_model(LinearTeacherStudent)

    @hookimpl
    def symphase_register_analyzers(self, registry: Any) -> None:
        registry.add_analyzer(LinearSGD)


@pytest.fixture()
def kit() -> Iterator[KitPlugin]:
    plugin = KitPlugin()
    framework.register_plugin(plugin)
    try:
        yield plugin
    finally:
        framework.unregister_plugin(plugin)
    assert "linear_committee" not in framework.list_models()


def test_this_file_uses_the_public_api_only() -> None:
    tree = ast.parse(Path(__file__).read_text())
    modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    modules += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    framework_modules = [m for m in modules if m.split(".")[0] in ("framework", "plugins")]
    assert framework_modules, modules
    assert not [m for m in framework_modules if m.startswith("plugins") or "._" in m
                or m.split(".")[-1].startswith("_")]


def test_public_kit_modules_are_exported() -> None:
    for name in ("Model", "Forward", "datasets", "streams", "validators", "theory",
                 "get_model", "list_models", "STREAM_INIT", "STREAM_SIMULATION"):
        assert name in framework.__all__, name
    from framework import experiment, streams

    assert experiment.STREAM_INIT is streams.STREAM_INIT == framework.STREAM_INIT == 0
    assert experiment.STREAM_SIMULATION is streams.STREAM_SIMULATION == 1
    assert STREAM_LINEAR_SGD not in streams.STREAMS.values()
    import importlib

    shim = importlib.import_module("framework." + "_validation")  # the old private name
    for name in framework.validators.__all__:
        assert getattr(shim, name) is getattr(framework.validators, name)


def test_registered_model_and_analyzer_are_listed(kit: KitPlugin,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert "linear_committee" in framework.list_models()
    assert "linear_sgd" in framework.list_analyzers()
    assert framework.get_model("linear_committee", K=2, M=1) == LinearTeacherStudent(2, 1)
    assert framework.get_analyzer("linear_sgd", N=10) == LinearSGD(N=10)
    assert cli_main(["plugins"]) == 0
    out = capsys.readouterr().out
    models = out.split("normalizations:")[0]
    assert "linear_committee" in models and "[runtime]" in models
    with pytest.raises(framework.PluginError, match=r"model 'linear_committee' from "
                       r"runtime is already registered by runtime"):
        framework.get_registry().add_model(LinearTeacherStudent)


def test_experiment_with_the_plugins_round_trips(kit: KitPlugin) -> None:
    e = Experiment(LinearTeacherStudent(2, 1), analyzers=["linear_sgd"], eta=0.2, seed=5,
                   init_N=200)
    data = e.to_dict()
    assert data["model"] == {"name": "linear_committee", "K": 2, "M": 1, "noise": 0.0}
    assert Experiment.from_dict(data) == e
    assert Experiment.from_json(e.to_json()) == e
    with pytest.raises(ValueError, match=r"'normalization' must use no statistics for "
                       r"'linear_sgd', got 'batchnorm'"):
        e.evolve(normalization="batchnorm")
    with pytest.raises(SpecificationError, match=r"'init.R' must have shape \(2, 1\), "
                       r"got \(2, 2\)"):
        e.evolve(init=OrderParameters(np.eye(2), np.zeros((2, 2))))


def test_experiment_runs_them_and_the_result_is_right(kit: KitPlugin) -> None:
    K, eta, N = 2, 0.2, 400
    e = Experiment(LinearTeacherStudent(K, 1), analyzers=[{"name": "linear_sgd", "N": N}],
                   eta=eta, seed=5, init_N=200, init_scale=0.5)
    ds = e.run()["linear_sgd"]
    assert ds.sizes == {"alpha": 5, "student": K, "student_": K, "teacher": 1}
    np.testing.assert_allclose(ds.alpha, np.linspace(0, 2, 5))
    for name in ("Q", "R", "eps_g", "step"):
        assert ds[name].attrs["long_name"] and ds[name].attrs["units"] == "1"
    assert ds.attrs["symphase_analyzer"] == "linear_sgd"
    assert ds.attrs["spec.model.name"] == "linear_committee"
    assert ds.attrs["method.kind"] == "online SGD" and ds.attrs["N"] == N
    assert ds.attrs["K"] == K and ds.attrs["activation"] == "linear"
    assert Experiment.from_json(ds.attrs["symphase_spec_json"]) == e

    # alpha = 0: the realized weights carry the experiment's initial order parameters
    op = e.initial_order_parameters()
    np.testing.assert_allclose(ds.Q[0], op.Q, atol=1e-10)
    np.testing.assert_allclose(ds.R[0], op.R, atol=1e-10)
    eps0 = 0.5 * (1 - 2 * op.R.sum() + op.Q.sum())
    assert ds.eps_g[0] == pytest.approx(eps0, rel=1e-10)
    # Every SGD step adds the same vector to each student, so the error direction
    # v = (sum_i J_i - B) / sqrt(N) obeys dE|v|^2/dalpha = -(2 K eta - K^2 eta^2) |v|^2.
    rate = 2 * K * eta - (K * eta) ** 2
    expected = eps0 * np.exp(-rate * ds.alpha.values)
    np.testing.assert_allclose(ds.eps_g, expected, rtol=0.25)
    assert ds.eps_g[-1] < 0.4 * eps0
    # Deterministic: the plugin's own stream, seeded by the experiment.
    again = e.run()["linear_sgd"]
    np.testing.assert_array_equal(again.Q, ds.Q)
    assert not np.array_equal(e.evolve(seed=6).run()["linear_sgd"].Q, ds.Q)


def test_simulation_step_matches_the_theory_of_the_model(kit: KitPlugin) -> None:
    """Monte Carlo over the model's forward/readout equals its eps_g (noise included)."""
    model = LinearTeacherStudent(2, 1, noise=0.3)
    op = OrderParameters([[0.6, 0.1], [0.1, 0.4]], [[0.2], [0.3]])
    N, n = 30, 200_000
    J, B = model.realize(op, N, 0)
    rng = np.random.default_rng(1)
    out = model.forward(np.concatenate([J, B]), rng.standard_normal((n, N)),
                        rng.standard_normal(n))
    sigma, dsigma = model.readout(out.x)
    loss = 0.5 * (out.zeta - sigma) ** 2
    eps, err = model.generalization_error(None, op.Q, op.R)
    assert err == 0.0
    assert abs(loss.mean() - eps) < 4 * loss.std() / math.sqrt(n)
    np.testing.assert_array_equal(dsigma, 1.0)


def test_datasets_helpers_enforce_the_conventions() -> None:
    v = datasets.variable([1.0, 2.0], "alpha", "time", units="s", note="x")
    assert v.dims == ("alpha",) and v.attrs == {"long_name": "time", "units": "s", "note": "x"}
    with pytest.raises(ValueError, match=r"'long_name' must be a non-empty string, got ''"):
        datasets.variable([1.0], "alpha", "")
    bare = xr.Dataset({"a": ("alpha", [1.0])})
    with pytest.raises(ValueError, match=r"missing on 'a'"):
        datasets.check_dataset(bare)
    with pytest.raises(ValueError, match=r"strings or numbers .*'bad'=\[1\]"):
        datasets.check_dataset(xr.Dataset(attrs={"bad": [1]}))
    ds = datasets.dataset({"a": v}, attrs={"nested": {"x": 1, "y": [1, 2]}})
    assert ds.attrs == {"nested.x": 1, "nested.y": "[1, 2]"}
    assert set(datasets.DIMENSIONS) >= {"alpha", "student", "student_", "teacher", "replica"}


# -- docs/analyzers.md -------------------------------------------------------------------
def test_docs_analyzers_page_is_up_to_date() -> None:
    """Regenerate with ``python -m framework.docs analyzers > docs/analyzers.md``."""
    from framework import docs

    committed = (ROOT / "docs" / "analyzers.md").read_text()
    assert committed == docs.analyzers_markdown(), (
        "docs/analyzers.md is stale: run `python -m framework.docs analyzers > "
        "docs/analyzers.md`"
    )


def test_docs_analyzers_page_lists_every_option_of_every_analyzer() -> None:
    from framework import docs

    page = docs.analyzers_markdown()
    registry = framework.get_registry()
    for entry in registry.entries("analyzer"):
        if entry.source != "built-in":
            continue
        section = page.split(f"## `{entry.name}`\n")[1].split("\n## ")[0]
        for field in attrs.fields(entry.obj):
            assert f"| `{field.name}` |" in section, (entry.name, field.name)


def test_numpydoc_parameters_reader() -> None:
    from framework import docs

    parsed = docs.numpydoc_parameters(LinearSGD.__doc__ or "")
    assert parsed["N"] == ("int", "Input dimension (>= 1).")
    assert docs.numpydoc_parameters(LinearTeacherStudent.__doc__ or "")["M"] == (
        "int", "Student and teacher units (>= 1).")
    rows = {r["name"]: r for r in docs.analyzer_options(LinearSGD)}
    assert rows["alpha_max"] == {"name": "alpha_max", "type": "float", "default": "`2.0`",
                                 "description": "Last time (> 0); steps = alpha_max * N."}
