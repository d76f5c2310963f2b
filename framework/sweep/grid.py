"""Parameter sweeps: a grid of experiments run on Dask, stored point by point.

A sweep is a base :class:`~framework.Experiment` and a grid ``{key: [values...]}``;
its points are the Cartesian product of the values, in the grid's key order. Grid
keys are

- experiment fields: ``eta``, ``batch_size``, ``seed``, ``init_scale``, ``init_N``,
  ``normalization`` (a name, a ``{"name": ..., **hyper-parameters}`` mapping or an
  instance);
- model fields: ``K``, ``M``, ``noise``, ``activation`` (also spelled ``model.K``, ...).
  When ``K`` is swept and ``M`` is not, ``M`` follows ``K`` if the base model has
  ``M == K`` (the symmetric teacher-student setting) and stays fixed otherwise. When
  ``M`` changes, the base teacher overlap ``T`` must be the identity and becomes the
  identity of the new size;
- analyzer options: ``"ANALYZER.OPTION"``, e.g. ``"dynamics.alpha_max"``, for an
  analyzer of the base experiment.

Every point is validated before anything is computed; an invalid value is reported
with the key, the value and its grid position.

Work unit and storage. One task is one (grid point, analyzer) pair: the point's
experiment restricted to that analyzer. Its key is :func:`spec_hash` of that
experiment, the sha256 of its canonical JSON. With ``results_dir``, each task's
dataset is written atomically to ``results_dir/points/<key>.nc`` as soon as it
completes, and a re-run loads the stored tasks instead of recomputing them, so a
sweep killed at any moment resumes where it stopped (a task that was running is
recomputed; no file is ever partial). At the end the combined datasets are written
to ``results_dir/<analyzer>.nc``. The key covers the specification only, not the
symphase version: delete ``results_dir`` to recompute after changing the code.

Combined results. :meth:`Sweep.run` returns ``{analyzer name: xarray.Dataset}``;
each dataset has the grid keys as leading dimensions (named exactly like the keys,
e.g. ``eta``, ``normalization``, ``dynamics.alpha_max``) with coordinates equal to the
values (numbers as numbers; strings, such as normalization names, as string
coordinates; anything else as canonical JSON strings). Analyzer dimensions whose size
changes across the grid (``student``/``teacher`` when ``K`` or ``M`` is swept) are
padded at the end with NaN (``False`` for booleans, ``""`` for strings; integers
become floats); indexed dimensions are outer-joined. Variables added by the sweep:

- ``sweep_failed`` (bool): the analyzer raised an exception at that point; its
  variables there are NaN. ``sweep_error`` holds ``"ExceptionType: message"`` ("" if
  it succeeded). The other points complete regardless. A failure is stored like a
  result, so a re-run does not retry it unless ``retry_failed=True``. Divergence that
  an analyzer detects itself is *not* a failure: it is the analyzer's own variable
  (e.g. ``diverged``), combined like any other;
- ``sweep_sha256`` (str): the task key, i.e. the stored file ``points/<key>.nc``.

The attrs are those of :func:`framework.results.provenance_attrs` for the *base*
experiment (``symphase_spec_json``, ``spec.*``, plugins, version; sweep coordinates
override the swept fields) plus ``symphase_sweep_grid_json`` (the grid),
``symphase_sweep_dims`` (JSON list of the grid keys) and the flattened ``sweep.grid.*``.
:func:`framework.load_experiment` rebuilds the base experiment,
:func:`point_experiment` the experiment of one point, :func:`load_sweep` the sweep.

Execution (``scheduler``): ``None`` or ``"processes"`` starts an embedded
``dask.distributed.LocalCluster`` of single-threaded worker processes (``workers`` of
them; default: one per CPU, at most one per task) and closes it afterwards;
``"threads"`` the same with threads in this process; ``"synchronous"`` runs the tasks
here one after another (no Dask needed); any other string is the address of an
existing ``dask.distributed`` scheduler (e.g. ``"tcp://10.0.0.1:8786"``), and a
``distributed.Client`` is used as is. Plugins registered at run time with
:func:`framework.register_plugin` are shipped with each task and registered on the
workers; modules must be importable there. Worker processes are spawned, so a script
that sweeps with processes needs the usual ``if __name__ == "__main__":`` guard.
Results are stored by the process that calls :meth:`Sweep.run`, so remote workers
need no shared file system.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import xarray as xr

from framework._validation import SpecificationError
from framework.analyzer import Analyzer
from framework.experiment import Experiment
from framework.model import TeacherStudent
from framework.normalization import Normalization

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

#: Experiment fields a grid may sweep.
EXPERIMENT_KEYS: tuple[str, ...] = (
    "eta",
    "batch_size",
    "seed",
    "init_scale",
    "init_N",
    "normalization",
)
#: Model fields a grid may sweep (also spelled ``model.<field>``).
MODEL_KEYS: tuple[str, ...] = ("K", "M", "noise", "activation")

POINTS_DIR = "points"

_log = logging.getLogger(__name__)


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
    if isinstance(value, Normalization):
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


def _label(value: Any) -> Any:
    """The coordinate label of a grid value."""
    if isinstance(value, bool | int | float | str):
        return value
    return json.dumps(_plain(value), sort_keys=True)


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
        values = tuple(_plain(v) if not isinstance(v, Normalization) else v for v in values)
        labels = [_label(v) for v in values]
        for i, lab in enumerate(labels):
            if lab in labels[:i]:
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
        from framework._validation import check_int

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
        changes["model"] = TeacherStudent.from_dict(data)
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
    ) -> dict[str, xr.Dataset]:
        """Validate every point, run every (point, analyzer) task, combine per analyzer.

        Parameters
        ----------
        results_dir : path, optional
            Store each task in ``results_dir/points/<spec_hash>.nc`` when it completes,
            reuse stored tasks, and write the combined ``results_dir/<analyzer>.nc``.
        scheduler : None, "processes", "threads", "synchronous", address or Client
            Where to run (see the module docstring); default: an embedded local cluster
            of worker processes.
        workers : int, optional
            Number of workers of an embedded cluster (default: CPUs, at most one per
            task).
        progress : bool, optional
            Show a tqdm progress bar on stderr; default: when stderr is a terminal.
        retry_failed : bool
            Recompute tasks stored as failed instead of reusing the failure.

        Returns
        -------
        dict
            ``{analyzer name: xarray.Dataset}`` with the grid keys as leading dimensions.
        """
        experiments = self.validate()
        if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
            raise SpecificationError(f"'workers' must be >= 1, got {workers!r}")
        folder = Path(results_dir) if results_dir is not None else None
        if folder is not None:
            (folder / POINTS_DIR).mkdir(parents=True, exist_ok=True)

        # One task per (point, analyzer); identical specifications share a task.
        tasks: dict[str, Experiment] = {}
        keys: dict[str, list[str]] = {a.name: [] for a in self.experiment.analyzers}
        for exp in experiments:
            for analyzer in exp.analyzers:
                task = attrs.evolve(exp, analyzers=(analyzer,))
                key = spec_hash(task)
                tasks.setdefault(key, task)
                keys[analyzer.name].append(key)

        results: dict[str, xr.Dataset] = {}
        if folder is not None:
            for key in tasks:
                stored = _load_point(folder, key)
                if stored is not None and (not retry_failed or not _is_failure(stored)):
                    results[key] = stored
        todo = {k: t for k, t in tasks.items() if k not in results}
        show = sys.stderr.isatty() if progress is None else bool(progress)
        _execute(todo, results, folder, scheduler, workers, show, len(tasks))

        out = {}
        for analyzer in self.experiment.analyzers:
            combined = self._combine(analyzer, [results[k] for k in keys[analyzer.name]],
                                     keys[analyzer.name])
            if folder is not None:
                from framework.io import save

                save(combined, folder / f"{analyzer.name}.nc")
            out[analyzer.name] = combined
        return out

    # -- combining ---------------------------------------------------------------------
    def _combine(
        self, analyzer: Analyzer, datasets: list[xr.Dataset], keys: list[str]
    ) -> xr.Dataset:
        from framework.results import flatten_attrs, provenance_attrs

        failed = np.array([_is_failure(ds) for ds in datasets], dtype=bool)
        errors = np.array(
            [str(ds.attrs.get("symphase_error", "")) if f else "" for ds, f in
             zip(datasets, failed, strict=True)], dtype=object)
        good = [ds for ds, f in zip(datasets, failed, strict=True) if not f]
        if good:
            template = _blank(good[0])
            parts = [template if f else ds for ds, f in zip(datasets, failed, strict=True)]
            parts = _conform(parts)
        else:
            parts = [xr.Dataset() for _ in datasets]
        coords = self.coords()
        dims = self.dims
        expanded = []
        for index, ds in zip(itertools.product(*(range(n) for n in self.shape)), parts,
                             strict=True):
            for key in dims:
                if key in ds.variables:
                    if ds[key].ndim or key in ds.dims:
                        raise SpecificationError(
                            f"analyzer {analyzer.name!r} returns a variable {key!r} with "
                            f"dimensions {ds[key].dims}, which collides with the sweep "
                            f"dimension {key!r}"
                        )
                    ds = ds.drop_vars(key)
            ds = ds.expand_dims({k: [coords[k][i]] for k, i in zip(dims, index,
                                                                    strict=True)})
            expanded.append(ds)
        if dims:
            nested: Any = np.empty(self.shape, dtype=object)
            for flat, ds in enumerate(expanded):
                nested.flat[flat] = ds
            combined = xr.combine_nested(
                nested.tolist(), concat_dim=list(dims), data_vars="all",
                coords="different", compat="equals", join="outer",
                combine_attrs="drop_conflicts",
            )
        else:
            combined = expanded[0]
        shape = self.shape
        for key in dims:
            combined[key].attrs.update(
                {"long_name": f"sweep parameter {key}", "units": "1"})
        combined["sweep_failed"] = (dims, failed.reshape(shape), {
            "long_name": "the analyzer raised an exception at this sweep point",
            "units": "1"})
        combined["sweep_error"] = (dims, errors.reshape(shape), {
            "long_name": "exception raised at this sweep point ('' if none)",
            "units": "1"})
        combined["sweep_sha256"] = (dims, np.array(keys, dtype=object).reshape(shape), {
            "long_name": "sha256 of the point specification (stored as points/<key>.nc)",
            "units": "1"})
        attrs_ = {k: v for k, v in combined.attrs.items()
                  if not k.startswith(("spec.", "symphase_", "sweep."))}
        attrs_.update(provenance_attrs(self.experiment, analyzer))
        attrs_["symphase_sweep_grid_json"] = self.grid_json()
        attrs_["symphase_sweep_dims"] = json.dumps(list(dims))
        attrs_.update(flatten_attrs({"grid": self.to_dict()["grid"]}, prefix="sweep."))
        combined.attrs = attrs_
        return combined


def _blank(template: xr.Dataset) -> xr.Dataset:
    """``template`` with every data variable missing (NaN, False, '')."""
    out = template.copy(deep=True)
    for name, var in template.data_vars.items():
        out[name] = var.copy(data=np.full(var.shape, *_fill(var.dtype)))
    return out


def _fill(dtype: np.dtype) -> tuple[Any, Any]:
    """``(fill value, dtype)`` for missing entries of a variable of ``dtype``."""
    if dtype.kind == "b":
        return False, bool
    if dtype.kind in "OUS":
        return "", object
    if dtype.kind == "c":
        return np.nan, dtype
    if dtype.kind == "f":
        return np.nan, dtype
    return np.nan, float


def _conform(datasets: list[xr.Dataset]) -> list[xr.Dataset]:
    """Pad dimensions whose size varies (NaN/False/''), outer-join indexed ones."""
    sizes: dict[str, int] = {}
    for ds in datasets:
        for dim, n in ds.sizes.items():
            sizes[str(dim)] = max(sizes.get(str(dim), 0), n)
    indexed: dict[str, list[Any]] = {}
    for ds in datasets:
        for dim in ds.dims:
            if dim in ds.indexes:
                union = indexed.setdefault(str(dim), [])
                for v in ds.indexes[dim]:
                    if v not in union:
                        union.append(v)
    for dim, union in indexed.items():
        if all(ds.indexes[dim].is_monotonic_increasing for ds in datasets if dim in ds.indexes):
            union.sort()  # e.g. alpha grids of different resolution
    out = []
    for ds in datasets:
        for dim, union in indexed.items():
            if dim in ds.indexes and list(ds.indexes[dim]) != union:
                ds = _reindex(ds, dim, union)
        for dim, n in sizes.items():
            if dim in ds.dims and dim not in indexed and ds.sizes[dim] < n:
                ds = _pad(ds, dim, n)
        out.append(ds)
    return out


def _reindex(ds: xr.Dataset, dim: str, union: list[Any]) -> xr.Dataset:
    fills = {}
    for name, var in ds.variables.items():
        if dim in var.dims and name != dim:
            value, dtype = _fill(var.dtype)
            if dtype != var.dtype:
                ds[name] = ds[name].astype(dtype)
            fills[name] = value
    return ds.reindex({dim: union}, fill_value=fills)


def _pad(ds: xr.Dataset, dim: str, n: int) -> xr.Dataset:
    new = {}
    for name, var in ds.variables.items():
        if dim not in var.dims:
            continue
        value, dtype = _fill(var.dtype)
        axis = var.dims.index(dim)
        widths = [(0, 0)] * var.ndim
        widths[axis] = (0, n - var.shape[axis])
        data = np.pad(np.asarray(var.values, dtype=dtype), widths, constant_values=value)
        new[name] = xr.Variable(var.dims, data, var.attrs)
    coords = {k: v for k, v in new.items() if k in ds.coords}
    data_vars = {k: v for k, v in new.items() if k not in ds.coords}
    ds = ds.drop_vars(list(new))
    return ds.assign_coords(coords).assign(data_vars)


# -- execution ------------------------------------------------------------------------
def _is_failure(ds: xr.Dataset) -> bool:
    return bool(int(ds.attrs.get("symphase_failed", 0)))


def _point_path(folder: Path, key: str) -> Path:
    return folder / POINTS_DIR / f"{key}.nc"


def _load_point(folder: Path, key: str) -> xr.Dataset | None:
    from framework.io import load

    path = _point_path(folder, key)
    if not path.exists():
        return None
    try:
        ds = load(path)
    except Exception as exc:
        warnings.warn(f"recomputing unreadable sweep result {path.name}: {exc}",
                      RuntimeWarning, stacklevel=3)
        return None
    if ds.attrs.get("symphase_spec_sha256") != key:
        warnings.warn(f"recomputing {path.name}: its specification hash does not match",
                      RuntimeWarning, stacklevel=3)
        return None
    return ds


_plugin_lock = threading.Lock()


def _plugin_key(obj: Any) -> str:
    name = getattr(obj, "__name__", None)
    module = getattr(obj, "__module__", None)
    if name is None:
        name, module = type(obj).__qualname__, type(obj).__module__
    return f"{module}:{name}"


def _ensure_plugins(plugins: Sequence[Any]) -> None:
    """Register on this worker the run-time plugins of the submitting process."""
    from framework import manager

    with _plugin_lock:
        have = {_plugin_key(p) for p in manager._runtime_plugins}
        for plugin in plugins:
            if _plugin_key(plugin) not in have:
                manager.register_plugin(plugin)
                have.add(_plugin_key(plugin))


def _compute(spec_json: str, key: str, plugins: Sequence[Any] = ()) -> xr.Dataset:
    """Run one task (on a worker): an experiment with exactly one analyzer.

    An exception raised by the analyzer is returned as a failure record (a dataset
    without variables, ``symphase_failed = 1``, ``symphase_error``), so that the other
    points complete and the failure is stored like a result.
    """
    from framework.results import finalize, provenance_attrs

    _ensure_plugins(plugins)
    experiment = Experiment.from_json(spec_json)
    (analyzer,) = experiment.analyzers
    try:
        ds = finalize(analyzer.run(experiment), experiment, analyzer)
        ds.attrs["symphase_failed"] = 0
    except Exception as exc:
        ds = xr.Dataset(attrs=provenance_attrs(experiment, analyzer))
        ds.attrs["symphase_failed"] = 1
        ds.attrs["symphase_error"] = f"{type(exc).__name__}: {_describe(exc)}"
    ds.attrs["symphase_spec_sha256"] = key
    return ds


def _store(folder: Path | None, key: str, ds: xr.Dataset) -> xr.Dataset:
    if folder is None:
        return ds
    from framework.io import load, save

    path = save(ds, _point_path(folder, key))
    return load(path)  # what a resumed sweep would see, byte for byte


def _execute(
    todo: dict[str, Experiment],
    results: dict[str, xr.Dataset],
    folder: Path | None,
    scheduler: Any,
    workers: int | None,
    show: bool,
    total: int,
) -> None:
    from framework import manager

    if not todo:
        return
    plugins = tuple(manager._runtime_plugins)
    bar = _progress(show, total, total - len(todo))
    try:
        if scheduler == "synchronous":
            for key, task in todo.items():
                results[key] = _store(folder, key, _compute(task.to_json(), key, plugins))
                bar.update(1)
            return
        client, owned = _client(scheduler, workers, len(todo))
        try:
            from distributed import as_completed

            futures = {
                client.submit(_compute, task.to_json(), key, plugins, key=f"symphase-{key}",
                              pure=False): key
                for key, task in todo.items()
            }
            try:
                for future in as_completed(futures):
                    key = futures[future]
                    results[key] = _store(folder, key, future.result())
                    bar.update(1)
            finally:
                client.cancel(list(futures))
        finally:
            for thing in owned:
                thing.close()
    finally:
        bar.close()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(show: bool, total: int, done: int) -> Any:
    if not show:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the 'sweep' extra
        return _NoBar()
    return tqdm(total=total, initial=done, desc="sweep", unit="task", file=sys.stderr)


def _client(scheduler: Any, workers: int | None, n_tasks: int) -> tuple[Any, list[Any]]:
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - dask is in the 'sweep' extra
        raise SpecificationError(
            "'scheduler' needs dask.distributed (pip install 'symphase[sweep]'); "
            "use scheduler='synchronous' without it"
        ) from None
    if isinstance(scheduler, Client):
        return scheduler, []
    if scheduler in (None, "processes", "threads"):
        n = workers or max(1, min(os.cpu_count() or 1, n_tasks))
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=scheduler != "threads",
            dashboard_address=":0", silence_logs=logging.ERROR,
        )
        client = Client(cluster)
        return client, [client, cluster]
    if not isinstance(scheduler, str):
        raise TypeError(
            "'scheduler' must be None, 'processes', 'threads', 'synchronous', a scheduler "
            f"address or a distributed.Client, got {scheduler!r}"
        )
    try:
        client = Client(scheduler)  # timeout: dask config distributed.comm.timeouts.connect
    except (OSError, TimeoutError) as exc:
        raise SpecificationError(
            f"'scheduler' {scheduler!r}: cannot connect ({_describe(exc)})"
        ) from None
    return client, [client]


# -- public helpers -------------------------------------------------------------------
def sweep(
    experiment: Experiment,
    grid: Mapping[str, Sequence[Any]] | None = None,
    /,
    *,
    results_dir: str | os.PathLike[str] | None = None,
    scheduler: Any = None,
    workers: int | None = None,
    progress: bool | None = None,
    retry_failed: bool = False,
    **more: Sequence[Any],
) -> dict[str, xr.Dataset]:
    """Sweep ``experiment`` over ``grid`` (and/or keyword grid keys); see :meth:`Sweep.run`."""
    full = dict(grid or {})
    for key, values in more.items():
        if key in full:
            raise SpecificationError(f"sweep key {key!r} given twice")
        full[key] = values
    return Sweep(experiment, full).run(
        results_dir=results_dir, scheduler=scheduler, workers=workers, progress=progress,
        retry_failed=retry_failed,
    )


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
    return Sweep(load_experiment(ds), json.loads(text))


def point_experiment(path_or_dataset: Any, *index: int, **coords: Any) -> Experiment:
    """The experiment of one grid point of a stored sweep.

    ``point_experiment("dynamics.nc", eta=0.5, normalization="batchnorm")`` or by grid
    index ``point_experiment(ds, 2, 1)``; see :meth:`Sweep.point`.
    """
    return load_sweep(path_or_dataset).point(*index, **coords)


# -- TOML -----------------------------------------------------------------------------
#: Top-level keys of an experiment TOML file (see docs/toml.md).
TOML_KEYS: tuple[str, ...] = (
    "model", "normalization", "analyzers", "eta", "batch_size", "init", "init_scale",
    "init_N", "seed", "sweep", "run",
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
        Invalid TOML, an unknown key, or an invalid value; the message starts with the
        file name and names the field (``[sweep] 'eta'[2] = -1.0: ...``).
    """
    import tomllib

    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise SpecificationError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecificationError(f"{path}: invalid TOML: {exc}") from None

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
    try:
        experiment = Experiment.from_dict(spec)
    except (ValueError, TypeError, LookupError) as exc:
        raise fail(_describe(exc)) from None
    grid = data.get("sweep", {})
    if not isinstance(grid, Mapping):
        raise fail(f"[sweep] must be a table of key = [values], got {grid!r}")
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
    return sweep_, options
