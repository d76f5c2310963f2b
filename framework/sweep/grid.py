"""The sweep specification: a base experiment and a grid of values.

:class:`Sweep` holds the grid, validates every point before anything runs, builds the
experiment of any point (:meth:`Sweep.point`) and describes itself as JSON. This
module knows nothing about execution, storage or file formats: :meth:`Sweep.run`
hands the validated sweep to :mod:`framework.sweep.execute`. See :mod:`framework.sweep`
for the grid keys.

The input distribution (``inputs``, also spelled ``model.inputs``) is swept like any
model field: each value is an :class:`~framework.InputDistribution` or a mapping
``{"eigenvalues": [...], "fractions": [...]}`` (``fractions`` optional: equal), turned
into an ``InputDistribution`` when the sweep is built (an invalid value is an error
naming the key, its grid position, the value and the constraint). Its coordinate label
is :func:`inputs_label`: ``"isotropic"`` for ``Sigma = I``, else
``"eigenvalues [0.181818, 1.81818], fractions [0.5, 0.5]"`` (6 significant digits;
two distinct values of one grid with the same label are refused). The exact values are
kept in the combined result as the coordinates ``<key>_eigenvalues`` and
``<key>_fractions`` on the dimensions ``(<key>, <key>_eigenspace)``, NaN beyond a
point's number of eigenspaces ``L`` (:meth:`Sweep.value_coords`), and in the grid JSON.
A point's specification hashes as the model with that ``InputDistribution``: given as an
object or a mapping alike, and the isotropic one as a model without inputs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import xarray as xr

from framework._named import Named
from framework.experiment import Experiment
from framework.inputs import InputDistribution
from framework.validators import SpecificationError

__all__ = [
    "EXPERIMENT_KEYS",
    "MODEL_KEYS",
    "Sweep",
    "inputs_label",
    "load_sweep",
    "point_experiment",
    "spec_hash",
]

#: Experiment fields a grid may sweep.
EXPERIMENT_KEYS: tuple[str, ...] = (
    "eta",
    "batch_size",
    "seed",
    "init_scale",
    "init_N",
    "normalization",
    "learning_rule",
)
#: Model fields a grid may sweep (also spelled ``model.<field>``).
MODEL_KEYS: tuple[str, ...] = (
    "K", "M", "noise", "activation", "second_layer", "output_scale", "eta_v", "weight_decay",
    "weight_decay_v", "student_readout", "teacher_readout", "inputs",
)
#: The grid keys of the input distribution (values: :class:`~framework.InputDistribution`).
_INPUTS_KEYS = ("inputs", "model.inputs")


# -- keys and labels ------------------------------------------------------------------
def _canonical(value: Any) -> Any:
    """JSON-ready copy where integral floats equal ints (1.0 and 1 hash alike)."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        f = float(value)
        if not np.isfinite(f):
            raise SpecificationError(f"specification values must be finite, got {f}")
        return int(f) if f.is_integer() and abs(f) < 2**53 else f
    return value


def spec_hash(experiment: Experiment) -> str:
    """sha256 (hex) of the canonical JSON of ``experiment`` (sorted keys, no spaces).

    Stable across processes, machines and symphase versions; ``1`` and ``1.0`` hash
    alike. Used as the file name of a sweep task's stored result.
    """
    text = json.dumps(
        _canonical(experiment.to_dict()), sort_keys=True, separators=(",", ":"),
        allow_nan=False,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    """A JSON-compatible copy of a grid value (numpy scalars to Python)."""
    if isinstance(value, Named | InputDistribution):  # an instance with a dict form
        return value.to_dict()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def inputs_label(inputs: InputDistribution) -> str:
    """The sweep coordinate label of an input distribution (6 significant digits).

    ``"isotropic"`` for ``Sigma = I``, else its :meth:`~framework.InputDistribution.to_dict`
    fields in order, e.g. ``"eigenvalues [0.181818, 1.81818], fractions [0.5, 0.5]"`` for
    ``InputDistribution.two_level(10)``.
    """
    if inputs.isotropic:
        return "isotropic"

    def text(value: Any) -> str:
        if isinstance(value, list | tuple | np.ndarray):
            return "[" + ", ".join(text(v) for v in value) + "]"
        if isinstance(value, float | np.floating):
            return f"{float(value):.6g}"
        return str(value)

    return ", ".join(f"{k} {text(v)}" for k, v in inputs.to_dict().items())


def _label(value: Any) -> Any:
    """The coordinate label of a grid value."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, InputDistribution):
        return inputs_label(value)
    return json.dumps(_plain(value), sort_keys=True)


def _inputs_value(key: str, value: Any, where: str) -> InputDistribution:
    """``value`` (an InputDistribution or its mapping form) as an InputDistribution.

    Anything else is a TypeError, an invalid mapping a SpecificationError, each naming
    ``key``, ``where`` (the grid position) and the value.
    """
    if isinstance(value, InputDistribution):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(
            f"sweep {key!r}{where} = {value!r}: must be an InputDistribution or a mapping "
            f"{{'eigenvalues': [...], 'fractions': [...]}}, got {type(value).__name__}"
        )
    try:
        return InputDistribution.from_dict(value)
    except TypeError as exc:
        raise TypeError(f"sweep {key!r}{where} = {value!r}: {_describe(exc)}") from exc
    except ValueError as exc:
        raise SpecificationError(f"sweep {key!r}{where} = {value!r}: {_describe(exc)}"
                                 ) from exc


def _coordinate(values: Sequence[Any]) -> np.ndarray:
    labels = [_label(v) for v in values]
    if all(isinstance(v, bool) for v in labels):
        return np.array(labels, dtype=bool)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in labels):
        return np.array(labels)
    return np.array([str(v) for v in labels], dtype=object)


# -- the grid -------------------------------------------------------------------------
def _to_grid(value: Any) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if value is None:
        return ()
    if isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        value = dict(value)
    if not isinstance(value, Mapping):
        raise TypeError(f"'grid' must be a mapping of key -> list of values, got {value!r}")
    out = []
    for key, values in value.items():
        if not isinstance(key, str):
            raise TypeError(f"sweep keys must be strings, got {key!r}")
        if isinstance(values, np.ndarray):
            values = values.tolist()
        if isinstance(values, str | bytes | Mapping) or not isinstance(values, Sequence):
            raise SpecificationError(
                f"sweep {key!r} must be a list of values, got {values!r}"
                f" (write [{values!r}] for a single value)"
            )
        if len(values) == 0:
            raise SpecificationError(f"sweep {key!r} must have at least one value, got []")
        if key in _INPUTS_KEYS:
            values = tuple(_inputs_value(key, v, f"[{i}]") for i, v in enumerate(values))
        else:
            values = tuple(_plain(v) if not isinstance(v, Named) else v for v in values)
        labels = [_label(v) for v in values]
        for i, lab in enumerate(labels):
            if lab in labels[:i]:
                j = labels.index(lab)
                if key in _INPUTS_KEYS and values[i] != values[j]:
                    raise SpecificationError(
                        f"sweep {key!r}[{i}] = {values[i]!r} and [{j}] = {values[j]!r} "
                        f"differ only beyond the 6 significant digits of their label "
                        f"{lab!r}; the values of a sweep must have distinct labels"
                    )
                raise SpecificationError(
                    f"sweep {key!r}[{i}] = {values[i]!r} repeats an earlier value"
                )
        out.append((key, values))
    return tuple(out)


def _check_key(base: Experiment, key: str) -> None:
    if key in EXPERIMENT_KEYS or key in MODEL_KEYS:
        return
    if key.startswith("model.") and key[6:] in MODEL_KEYS:
        return
    names = [a.name for a in base.analyzers]
    if "." in key:
        name, option = key.split(".", 1)
        if name in names:
            analyzer = base.analyzers[names.index(name)]
            cls: Any = type(analyzer)
            fields = [f.name for f in attrs.fields(cls)] if attrs.has(cls) else []
            if option in fields:
                return
            raise SpecificationError(
                f"unknown sweep key {key!r}: analyzer {name!r} has no option {option!r}; "
                f"its options: {', '.join(map(repr, fields)) or 'none'}"
            )
    valid = ", ".join(map(repr, EXPERIMENT_KEYS + MODEL_KEYS))
    extra = (
        f", or 'ANALYZER.OPTION' for analyzers {', '.join(map(repr, names))}"
        if names else ""
    )
    raise SpecificationError(f"unknown sweep key {key!r}; valid keys: {valid}{extra}")


def _apply(base: Experiment, assignment: Mapping[str, Any]) -> Experiment:
    """The experiment ``base`` with the grid values of ``assignment``."""
    changes: dict[str, Any] = {}
    model_changes: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {}
    for key, value in assignment.items():
        if key in EXPERIMENT_KEYS:
            changes[key] = value
        elif key in MODEL_KEYS:
            model_changes[key] = value
        elif key.startswith("model."):
            model_changes[key[6:]] = value
        else:
            name, option = key.split(".", 1)
            options.setdefault(name, {})[option] = value
    if "batch_size" in changes or "seed" in changes or "init_N" in changes:
        from framework.validators import check_int

        for k in ("batch_size", "seed", "init_N"):
            if k in changes:
                changes[k] = check_int(k, changes[k], minimum=0 if k == "seed" else 1)
    if model_changes:
        model = base.model
        data = model.to_dict()
        if "K" in model_changes and "M" not in model_changes and model.M == model.K:
            model_changes["M"] = model_changes["K"]
        if "M" in model_changes and model_changes["M"] != model.M:
            if not np.array_equal(model.T, np.eye(model.M)):
                raise SpecificationError(
                    f"'M' can only change in a sweep when the base teacher overlap 'T' is "
                    f"the identity, got M={model_changes['M']!r} with a non-identity T"
                )
            data["T"] = None
        data.update(model_changes)
        changes["model"] = type(model).from_dict(data)  # keeps the model plugin's class
    if options:
        analyzers = []
        for a in base.analyzers:
            if a.name in options:
                a = type(a).from_dict({**a.to_dict(), **options[a.name]})
            analyzers.append(a)
        changes["analyzers"] = tuple(analyzers)
    return attrs.evolve(base, **changes)


def _describe(exc: BaseException) -> str:
    return str(exc) if str(exc) else type(exc).__name__


@attrs.frozen(eq=True, hash=False)
class Sweep:
    """A base experiment and a grid of values to sweep (see the module docstring).

    Parameters
    ----------
    experiment : Experiment
        The base experiment; its analyzers run at every point.
    grid : mapping
        ``{key: [values...]}``; the keys, in order, become the result's leading
        dimensions.
    """

    experiment: Experiment = attrs.field(
        validator=attrs.validators.instance_of(Experiment)
    )
    _grid: tuple[tuple[str, tuple[Any, ...]], ...] = attrs.field(
        default=(), converter=_to_grid, alias="grid"
    )

    def __attrs_post_init__(self) -> None:
        for key, _ in self._grid:
            _check_key(self.experiment, key)

    # -- the grid ----------------------------------------------------------------------
    @property
    def grid(self) -> dict[str, tuple[Any, ...]]:
        """``{key: values}`` in dimension order."""
        return dict(self._grid)

    @property
    def dims(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self._grid)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(v) for _, v in self._grid)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=int))

    def coords(self) -> dict[str, np.ndarray]:
        """The coordinate of each dimension (numbers, or strings for anything else)."""
        return {k: _coordinate(v) for k, v in self._grid}

    def value_coords(self) -> dict[str, tuple[tuple[str, ...], np.ndarray, dict[str, str]]]:
        """Non-index coordinates holding the exact grid values the labels abbreviate.

        For an ``inputs`` (or ``model.inputs``) dimension ``key``: ``<key>_eigenspace``
        (``0 .. L_max - 1``) and ``<key>_eigenvalues``, ``<key>_fractions`` of dimensions
        ``(key, <key>_eigenspace)``, NaN beyond a point's ``L``. ``{name: (dims, values,
        attrs)}``, for ``Dataset.assign_coords``; empty without such a dimension.
        """
        out: dict[str, tuple[tuple[str, ...], np.ndarray, dict[str, str]]] = {}
        for key, values in self._grid:
            if key not in _INPUTS_KEYS:
                continue
            level = f"{key}_eigenspace"
            size = max(v.L for v in values)
            out[level] = ((level,), np.arange(size), {
                "long_name": f"eigenspace of the input covariance of sweep parameter {key}",
                "units": "1"})
            for field, what in (("eigenvalues", "eigenvalue of the input covariance"),
                                ("fractions", "fraction of the input directions")):
                table = np.full((len(values), size), np.nan)
                for i, v in enumerate(values):
                    table[i, :v.L] = getattr(v, field)
                out[f"{key}_{field}"] = ((key, level), table, {
                    "long_name": f"{what} per eigenspace (sweep parameter {key})",
                    "units": "1",
                    "symphase_fill": "NaN: the point's input distribution has fewer "
                                     "eigenspaces"})
        return out

    def _assignment(self, index: tuple[int, ...]) -> dict[str, Any]:
        return {k: v[i] for (k, v), i in zip(self._grid, index, strict=True)}

    def _where(self, index: tuple[int, ...]) -> str:
        values = ", ".join(f"{k}={v[i]!r}" for (k, v), i in zip(self._grid, index,
                                                                strict=True))
        return f"sweep point ({values}) at grid index {index}"

    def point(self, *index: int, **coords: Any) -> Experiment:
        """The experiment at a grid index (``point(0, 2)``) or coordinates (``point(eta=0.5)``).

        Coordinates are matched against the labels of :meth:`coords`; keys with dots
        can be given as ``point(**{"dynamics.alpha_max": 50})``.
        """
        if index and coords:
            raise TypeError("give a grid index or coordinates, not both")
        if coords:
            unknown = sorted(set(coords) - set(self.dims))
            if unknown:
                raise SpecificationError(
                    f"unknown sweep dimension(s) {', '.join(map(repr, unknown))}; "
                    f"dimensions: {', '.join(map(repr, self.dims))}"
                )
            missing = [k for k in self.dims if k not in coords]
            if missing:
                raise SpecificationError(
                    f"missing sweep coordinate(s) {', '.join(map(repr, missing))}"
                )
            found = []
            for key, values in self._grid:
                labels = [_label(v) for v in values]
                want = coords[key]
                want = want.item() if isinstance(want, np.generic) else want
                if key in _INPUTS_KEYS and not isinstance(want, str):
                    want = _label(_inputs_value(key, want, ""))
                try:
                    found.append(labels.index(want if not isinstance(want, Mapping)
                                              else _label(want)))
                except ValueError:
                    raise SpecificationError(
                        f"{key!r} = {want!r} is not a value of the sweep; values: {labels}"
                    ) from None
            index = tuple(found)
        if len(index) != len(self.shape):
            raise SpecificationError(
                f"grid index must have {len(self.shape)} entries, got {index!r}"
            )
        for i, (n, key) in enumerate(zip(self.shape, self.dims, strict=True)):
            if not 0 <= index[i] < n:
                raise SpecificationError(
                    f"grid index of {key!r} must be in [0, {n - 1}], got {index[i]}"
                )
        return _apply(self.experiment, self._assignment(tuple(index)))

    def points(self) -> Iterator[tuple[tuple[int, ...], Experiment]]:
        """``(grid index, experiment)`` for every point, in C order (unvalidated order)."""
        for index in itertools.product(*(range(n) for n in self.shape)):
            yield index, _apply(self.experiment, self._assignment(index))

    def validate(self) -> list[Experiment]:
        """Build and validate every point's experiment; return them in C order.

        Raises
        ------
        SpecificationError
            At the first invalid point (C order), naming the key, the value and its grid
            position: ``sweep 'eta'[2] = -1.0: ...`` when that value is invalid on its own
            (with the base experiment), else the whole point and its grid index.
        """
        out = []
        for index in itertools.product(*(range(n) for n in self.shape)):
            assignment = self._assignment(index)
            try:
                out.append(_apply(self.experiment, assignment))
            except (ValueError, TypeError, LookupError) as exc:
                for i, (key, value) in zip(index, assignment.items(), strict=True):
                    try:
                        _apply(self.experiment, {key: value})
                    except (ValueError, TypeError, LookupError) as alone:
                        raise SpecificationError(
                            f"sweep {key!r}[{i}] = {value!r}: {_describe(alone)}"
                        ) from alone
                raise SpecificationError(f"{self._where(index)}: {_describe(exc)}") from exc
        return out

    # -- specification -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"experiment": Experiment.to_dict(), "grid": {key: [values...]}}``."""
        return {
            "experiment": self.experiment.to_dict(),
            "grid": {k: [_plain(v) for v in values] for k, values in self._grid},
        }

    def grid_json(self) -> str:
        """The grid as JSON (keys in dimension order)."""
        return json.dumps(self.to_dict()["grid"])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sweep:
        unknown = sorted(set(data) - {"experiment", "grid"})
        if unknown:
            raise SpecificationError(
                f"unknown field(s) {', '.join(map(repr, unknown))} for Sweep; "
                "valid fields: 'experiment', 'grid'"
            )
        experiment = data["experiment"]
        if not isinstance(experiment, Experiment):
            experiment = Experiment.from_dict(experiment)
        return cls(experiment, data.get("grid", {}))

    # -- running -----------------------------------------------------------------------
    def run(
        self,
        *,
        results_dir: str | os.PathLike[str] | None = None,
        scheduler: Any = None,
        workers: int | None = None,
        progress: bool | None = None,
        retry_failed: bool = False,
        points_per_task: int | None = None,
    ) -> dict[str, xr.Dataset]:
        """Validate every point, run every (point, analyzer) task, combine per analyzer.

        Parameters
        ----------
        results_dir : path, optional
            Store each task (a record keyed by its spec_hash, under ``results_dir/points/``)
            when it completes,
            reuse stored tasks, and write the combined ``results_dir/<analyzer>.nc``.
        scheduler : None, "processes", "threads", "synchronous", address or Client
            Where to run (see :mod:`framework.sweep`); default: an embedded local
            cluster of worker processes.
        workers : int, optional
            Number of workers of an embedded cluster (default: CPUs, at most one per
            task).
        progress : bool, optional
            Show a tqdm progress bar on stderr; default: when stderr is a terminal.
        retry_failed : bool
            Recompute tasks stored as failed instead of reusing the failure.
        points_per_task : int, optional
            At most this many tasks per Dask task (>= 1): a worker runs them one after
            another, storing each as it completes. Default: about 2 batches per worker,
            at most 32 tasks each (:func:`framework.sweep.execute.default_points_per_task`),
            interleaving the grid. Results and resumption do not depend on it; ignored
            by ``"synchronous"``.

        Returns
        -------
        dict
            ``{analyzer name: xarray.Dataset}`` with the grid keys as leading dimensions.
        """
        from framework.sweep.execute import run

        return run(self, results_dir=results_dir, scheduler=scheduler, workers=workers,
                   progress=progress, retry_failed=retry_failed,
                   points_per_task=points_per_task)


# -- stored sweeps --------------------------------------------------------------------
def _dataset(path_or_dataset: Any) -> xr.Dataset:
    if isinstance(path_or_dataset, xr.Dataset):
        return path_or_dataset
    from framework.io import load

    return load(path_or_dataset)


def load_sweep(path_or_dataset: Any) -> Sweep:
    """Rebuild the :class:`Sweep` (base experiment and grid) of a stored sweep result."""
    from framework.io import load_experiment

    ds = _dataset(path_or_dataset)
    text = ds.attrs.get("symphase_sweep_grid_json")
    if not isinstance(text, str):
        raise ValueError("dataset has no 'symphase_sweep_grid_json' attr: it is not a sweep")
    grid = json.loads(text)
    _check_stored_sizes(ds, grid)
    return Sweep(load_experiment(ds), grid)


def _check_stored_sizes(ds: xr.Dataset, grid: Any) -> None:
    """Refuse a stored sweep whose largest point cannot fit in memory, before building it."""
    from framework._resources import check_memory

    try:
        spec = json.loads(ds.attrs.get("symphase_spec_json", ""))
    except (ValueError, TypeError, RecursionError):
        return  # load_experiment reports it
    if isinstance(spec, Mapping) and isinstance(grid, Mapping):
        check_memory(spec, grid, what="the stored sweep")


def point_experiment(path_or_dataset: Any, *index: int, **coords: Any) -> Experiment:
    """The experiment of one grid point of a stored sweep.

    ``point_experiment("dynamics.nc", eta=0.5, normalization="batchnorm")`` or by grid
    index ``point_experiment(ds, 2, 1)``; see :meth:`Sweep.point`.
    """
    return load_sweep(path_or_dataset).point(*index, **coords)

