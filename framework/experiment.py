"""Experiments: a model, a normalization, analyzers and training parameters."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from framework.analyzer import Analyzer
from framework.learning_rule import LearningRule
from framework.manager import get_analyzer, get_learning_rule, get_model, get_normalization
from framework.model import Model, OrderParameters, TeacherStudent, _known_keys
from framework.normalization import Normalization
from framework.streams import STREAM_INIT, STREAM_SIMULATION
from framework.validators import SpecificationError, check_int, ge, gt, integer, to_float

__all__ = ["STREAM_INIT", "STREAM_SIMULATION", "Experiment"]

#: The model a mapping without a ``name`` means (dicts stored before models were plugins).
DEFAULT_MODEL = TeacherStudent.name
#: The learning rule of an experiment that names none (left out of :meth:`to_dict` when
#: it is this one with its default options, so that stored specifications keep their
#: hashes).
DEFAULT_LEARNING_RULE = "sgd"


def _to_model(value: Any) -> Model:
    if isinstance(value, Model):
        return value
    if isinstance(value, Mapping):
        data = dict(value)
        return get_model(data.pop("name", DEFAULT_MODEL), **data)
    raise TypeError(f"'model' must be a Model or a mapping, got {value!r}")


def _to_plugin(field: str, value: Any, cls: type, get: Any) -> Any:
    """An instance of ``cls`` from itself, a registered name or ``{"name": ...,
    **options}`` (``get(name, **options)`` looks it up)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        return get(value)
    if isinstance(value, Mapping):
        data = dict(value)
        if "name" not in data:
            raise SpecificationError(f"{field!r} mapping needs a 'name', got {value!r}")
        return get(data.pop("name"), **data)
    raise TypeError(
        f"{field!r} must be a name, a mapping or a {cls.__name__}, got {value!r}"
    )


def _to_normalization(value: Any) -> Normalization:
    return _to_plugin("normalization", value, Normalization, get_normalization)


def _to_learning_rule(value: Any) -> LearningRule:
    return _to_plugin("learning_rule", value, LearningRule, get_learning_rule)


def _to_analyzer(value: Any) -> Analyzer:
    if isinstance(value, Analyzer):
        return value
    if isinstance(value, str):
        return get_analyzer(value)
    if isinstance(value, Mapping):
        data = dict(value)
        if "name" not in data:
            raise SpecificationError(f"analyzer mapping needs a 'name', got {value!r}")
        return get_analyzer(data.pop("name"), **data)
    raise TypeError(f"analyzers must be names, mappings or Analyzer instances, got {value!r}")


def _to_analyzers(value: Any) -> tuple[Analyzer, ...]:
    if isinstance(value, str | Analyzer | Mapping):
        value = [value]
    if not isinstance(value, Sequence):
        raise TypeError(f"'analyzers' must be a sequence, got {value!r}")
    out = tuple(_to_analyzer(v) for v in value)
    names = [a.name for a in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecificationError(
            f"'analyzers' must have distinct names, got {', '.join(map(repr, dupes))} twice"
        )
    return out


def _to_init(value: Any) -> str | OrderParameters:
    if isinstance(value, OrderParameters):
        return value
    if isinstance(value, str):
        if value != "random":
            raise SpecificationError(
                f"'init' must be 'random' or OrderParameters, got {value!r}"
            )
        return value
    if isinstance(value, Mapping):
        return OrderParameters.from_dict(value)
    raise TypeError(f"'init' must be 'random' or OrderParameters, got {value!r}")


@attrs.frozen
class Experiment:
    """A model, a normalization, analyzers and the shared training parameters.

    Parameters
    ----------
    model : Model or mapping
        A :class:`~framework.Model` instance (``TeacherStudent(K=2, M=2)``) or
        ``{"name": ..., **specification}`` naming a registered model; a mapping
        without ``name`` is a ``"teacher_student"`` (the form stored before models were
        plugins).
    normalization : str, mapping or Normalization
        A registered name (``"batchnorm"``), ``{"name": ..., **hyper-parameters}`` or an
        instance.
    analyzers : sequence of str, mapping or Analyzer
        What to compute; options go to ``framework.get_analyzer(name, **options)``.
    eta : float
        Learning rate (>= 0). Convention: online SGD ``J <- J - eta grad_J eps`` on
        weights with O(1) components, i.e. a step ``eta / sqrt(N)`` along ``xi``
        (plain gradient descent with rate ``eta`` in ``W = J / sqrt(N)``).
    batch_size : int
        Minibatch size B (>= 1); the gradient is averaged over the batch; time
        ``alpha`` counts steps / N.
    init : "random" or OrderParameters
        ``"random"``: K student vectors with iid ``N(0, init_scale^2)`` components in
        dimension ``init_N`` against a teacher realising ``T`` exactly, drawn from
        ``seed``; the same initial order parameters are used by every analyzer.
    init_scale : float
        Standard deviation of the random initial student components (> 0).
    init_N : int
        Dimension in which the random initial condition is drawn (>= K + M).
    seed : int
        Seed of every random stream (>= 0).
    learning_rule : str, mapping or LearningRule
        How a step is taken from the loss gradient: a registered name (default
        ``"sgd"``, the plain step above), ``{"name": ..., **options}`` (e.g.
        ``{"name": "natural_gradient", "damping": 0.1}``) or an instance; ``symphase
        plugins`` lists them. A rule other than the plain step (one that is not
        ``engine_native``) needs analyzers that declare ``supports_learning_rules =
        True`` (the others compute under the plain gradient step and are refused).
    """

    model: Model = attrs.field(converter=_to_model)
    normalization: Normalization = attrs.field(
        default="plain", converter=_to_normalization  # type: ignore[assignment]
    )
    analyzers: tuple[Analyzer, ...] = attrs.field(default=(), converter=_to_analyzers)
    eta: float = attrs.field(default=0.1, converter=to_float, validator=ge(0.0))
    batch_size: int = attrs.field(default=1, validator=integer(minimum=1))
    init: str | OrderParameters = attrs.field(default="random", converter=_to_init)
    init_scale: float = attrs.field(default=1.0, converter=to_float, validator=gt(0.0))
    init_N: int = attrs.field(default=1000, validator=integer(minimum=1))
    seed: int = attrs.field(default=0, validator=integer(minimum=0))
    learning_rule: LearningRule = attrs.field(
        default=DEFAULT_LEARNING_RULE, converter=_to_learning_rule  # type: ignore[assignment]
    )

    def __attrs_post_init__(self) -> None:
        self.model.check(self)
        self.learning_rule.check(self.model, self.normalization)
        if not self.learning_rule.engine_native:
            self._refuse_blind("supports_learning_rules", (
                f"compute under the plain gradient step only, not under learning_rule "
                f"{self.learning_rule.name!r}"))
        inputs = self.model.input_distribution()
        if not inputs.isotropic:
            self._refuse_blind("supports_structured_inputs", (
                f"compute with isotropic inputs only, not with the model's "
                f"{inputs.describe()}"))
            if not self.learning_rule.engine_native:
                raise SpecificationError(
                    f"'learning_rule' must be the plain gradient step with structured "
                    f"inputs ({inputs.describe()}), got {self.learning_rule.name!r}")
            if not inputs.centred:
                self._refuse_blind("supports_input_mean", (
                    f"compute with centred inputs only, not with the model's "
                    f"{inputs.describe()}"))
        for analyzer in self.analyzers:
            analyzer.check(self)

    def _refuse_blind(self, flag: str, what: str) -> None:
        """Refuse the analyzers that do not declare the capability ``flag``."""
        blind = [a.name for a in self.analyzers if not getattr(a, flag, False)]
        if blind:
            raise SpecificationError(
                f"analyzer(s) {', '.join(map(repr, blind))} {what}; analyzers that do "
                f"declare {flag} = True (e.g. 'dynamics', 'simulation')")

    # -- derived quantities ----------------------------------------------------------
    def rng(self, *stream: int) -> np.random.Generator:
        """The random generator of a labelled stream (see :mod:`framework.streams`)."""
        return np.random.default_rng([self.seed, *stream])

    def initial_order_parameters(self) -> OrderParameters:
        """The initial order parameters every analyzer starts from."""
        if isinstance(self.init, OrderParameters):
            return self.init
        return self.model.random_state(self.init_N, self.init_scale, self.rng(STREAM_INIT))

    # -- running ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run every analyzer; return ``{analyzer name: xarray.Dataset}``.

        Each dataset carries the experiment's provenance in its attrs and has passed
        through the ``symphase_dataset_created`` hook.
        """
        from framework.results import finalize

        return {a.name: finalize(a.run(self), self, a) for a in self.analyzers}

    def sweep(
        self,
        grid: Mapping[str, Sequence[Any]] | None = None,
        /,
        *,
        results_dir: Any = None,
        scheduler: Any = None,
        workers: int | None = None,
        progress: bool | None = None,
        retry_failed: bool = False,
        **more: Sequence[Any],
    ) -> dict[str, Any]:
        """Run every analyzer over a grid; return ``{analyzer name: xarray.Dataset}``.

        ``exp.sweep(eta=[0.1, 0.5], normalization=["plain", "batchnorm"])``, or a mapping
        for keys with dots: ``exp.sweep({"dynamics.alpha_max": [50, 100]})``. The grid
        keys become the leading dimensions. See :mod:`framework.sweep` for the keys,
        storage under ``results_dir`` (resumable), ``scheduler`` and failures.
        """
        from framework.sweep import sweep

        return sweep(
            self, grid, results_dir=results_dir, scheduler=scheduler, workers=workers,
            progress=progress, retry_failed=retry_failed, **more,
        )

    def evolve(self, **changes: Any) -> Experiment:
        """A copy with some fields changed (validated again)."""
        return attrs.evolve(self, **changes)

    # -- specification ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible description that :meth:`from_dict` rebuilds exactly."""
        init = self.init if isinstance(self.init, str) else self.init.to_dict()
        out = {
            "model": {"name": self.model.name, **self.model.to_dict()},
            "normalization": self.normalization.to_dict(),
            "analyzers": [a.to_dict() for a in self.analyzers],
            "eta": self.eta,
            "batch_size": self.batch_size,
            "init": init,
            "init_scale": self.init_scale,
            "init_N": self.init_N,
            "seed": self.seed,
        }
        rule = self.learning_rule.to_dict()
        if rule != get_learning_rule(DEFAULT_LEARNING_RULE).to_dict():
            out["learning_rule"] = rule  # the default is left out: hashes as before
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Experiment:
        """Rebuild from :meth:`to_dict` output (unknown keys are an error)."""
        fields = tuple(f.name for f in attrs.fields(cls))
        data = _known_keys(cls.__name__, data, fields)
        if "model" not in data:
            raise SpecificationError("'model' is required")
        if "batch_size" in data:
            data["batch_size"] = check_int("batch_size", data["batch_size"], minimum=1)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Experiment:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dataset(cls, dataset: Any) -> Experiment:
        """Rebuild the experiment that produced a result, from its attrs.

        Parameters
        ----------
        dataset : xarray.Dataset
            A result of :meth:`run` or :meth:`sweep` (in memory or loaded with
            :func:`framework.load`); its ``symphase_spec_json`` attr holds the
            specification. For a sweep this is the base experiment
            (:func:`framework.point_experiment` rebuilds one grid point's).

        Raises
        ------
        ValueError
            The attr is absent, not a string or not valid JSON.
        SpecificationError
            The stored specification is invalid (e.g. it names a plugin that is not
            installed).
        """
        attrs_ = getattr(dataset, "attrs", None)
        if not isinstance(attrs_, Mapping):
            raise TypeError(f"'dataset' must be an xarray.Dataset, got {type(dataset).__name__}")
        try:
            text = attrs_["symphase_spec_json"]
        except KeyError:
            raise ValueError(
                "dataset has no 'symphase_spec_json' attr: it was not produced by an Experiment"
            ) from None
        if not isinstance(text, str):
            raise ValueError(f"'symphase_spec_json' must be a JSON string, got {text!r}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"'symphase_spec_json' is not valid JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"'symphase_spec_json' must hold a JSON object, got {text!r}")
        return cls.from_dict(data)
