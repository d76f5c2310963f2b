"""Combining labelled parts: one dataset per grid point into one sweep dataset.

Parts are aligned by label with xarray's outer join (``xr.combine_nested(...,
join="outer", fill_value=...)``): along every analyzer dimension the result has the
union of the parts' labels (sorted when they are sortable, e.g. two ``alpha`` grids
of different resolution, or ``student = 0..K-1`` for different ``K``), and an entry a
part does not have is *missing*. A missing entry holds the fill value of its variable's
dtype (:func:`fill_value`):

- floating point: ``NaN`` (complex: ``NaN + NaN j``; datetimes: ``NaT``);
- integers and booleans: the variable becomes ``float64`` and missing entries are
  ``NaN`` (booleans as ``0.0``/``1.0``). No integer or boolean value can mark "missing"
  without being mistaken for data (a count of -1 enters sums, ``False`` claims that
  nothing happened);
- strings: ``""``, the netCDF string fill value.

Only variables that do have a missing entry are converted and filled; each of them
gets the attrs ``symphase_fill`` (what the fill value means) and, when its dtype
changed, ``symphase_fill_from_dtype`` (the analyzer's dtype). Every variable of a part
that failed is missing at that point.

Parts of one structure (the same variables, dims, shapes, dtypes, coordinates and
analyzer labels: the common case) have nothing missing; they are stacked directly
(:func:`_stack_uniform`, ~8x faster than the join for small points), with a result
identical to the join's (tested).

Alignment needs an index coordinate on every dimension. A dimension an analyzer left
without one gets ``arange(size)`` here, on the fly, with the attr
``symphase_positional`` saying so: such parts are aligned by position, which is right
for positions (``student``, ``teacher``) and only as meaningful as the analyzer's
ordering otherwise. Analyzers should label their dimensions themselves.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from framework.validators import SpecificationError

__all__ = ["combine_parts", "combine_sweep", "fill_value", "label_dimensions"]

POSITIONAL = ("the analyzer gave this dimension no coordinate; the sweep labelled it by "
              "position (0, 1, ...) to align the grid points")
_WHERE = ("the entry does not exist at this sweep point (the point failed, or its "
          "analyzer returned no such label along a dimension, e.g. a smaller K)")


def fill_value(dtype: np.dtype) -> tuple[Any, np.dtype, str]:
    """``(fill value, dtype of the filled variable, meaning)`` for a variable of ``dtype``.

    See the module docstring for the choices.
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.nan, dtype, f"NaN: {_WHERE}; NaN may also be a value the analyzer computed"
    if dtype.kind == "c":
        return complex(np.nan, np.nan), dtype, f"NaN+NaNj: {_WHERE}"
    if dtype.kind in "mM":
        return np.array("NaT", dtype=dtype)[()], dtype, f"NaT: {_WHERE}"
    if dtype.kind in "iub":
        what = "0.0 false, 1.0 true" if dtype.kind == "b" else "integers as float64"
        return (np.nan, np.dtype(np.float64),
                f"NaN: {_WHERE}; converted to float64 so that missing can be NaN ({what})")
    if dtype.kind in "OUS":
        return "", np.dtype(object), f"'' (the netCDF string fill value): {_WHERE}"
    raise SpecificationError(
        f"cannot combine sweep points: no fill value for a variable of dtype {dtype}"
    )


def label_dimensions(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with ``arange(size)`` as coordinate of each dimension that has no index."""
    indexes = ds.indexes  # built on every access
    missing = [d for d in ds.dims if d not in indexes]
    if not missing:
        return ds
    return ds.assign_coords({
        d: (d, np.arange(ds.sizes[d]), {"long_name": f"position along {d}", "units": "1",
                                        "symphase_positional": POSITIONAL})
        for d in missing
    })


def _union(indexes: list[pd.Index]) -> pd.Index:
    return functools.reduce(pd.Index.union, indexes)


def _to_fill(parts: Sequence[xr.Dataset | None]) -> dict[str, np.dtype]:
    """``{variable: dtype}`` of the variables that will have a missing entry."""
    present = [p for p in parts if p is not None]
    unions = {}
    for dim in {d for p in present for d in p.indexes}:
        unions[dim] = _union([p.indexes[dim] for p in present if dim in p.indexes])
    names: dict[str, np.dtype] = {}
    for p in present:
        for name, var in p.variables.items():
            if name not in p.dims:
                names.setdefault(str(name), var.dtype)
    out = {}
    for name, dtype in names.items():
        missing = any(p is None or name not in p.variables for p in parts)
        missing = missing or any(
            not p.indexes[d].equals(unions[d])
            for p in present if name in p.variables for d in p[name].dims
        )
        if missing:
            out[name] = dtype
    return out


def _cast(ds: xr.Dataset, casts: Mapping[str, tuple[np.dtype, str]]) -> xr.Dataset:
    """``ds`` with the variables of ``casts`` converted to their filled dtype."""
    for name, (out_dtype, _) in casts.items():
        if name in ds.variables:
            var = ds[name].astype(out_dtype)
            ds = ds.assign_coords({name: var}) if name in ds.coords else ds.assign({name: var})
    return ds


def _blank(ds: xr.Dataset, fills: Mapping[str, Any]) -> xr.Dataset:
    """A missing part shaped like ``ds``: every variable but the indexes is fill."""
    out = ds.copy()
    for name, var in ds.variables.items():
        if name not in ds.indexes:
            new = var.copy(data=np.full(var.shape, fills[str(name)], dtype=var.dtype))
            out = (out.assign_coords({name: new}) if name in ds.coords
                   else out.assign({name: new}))
    return out


def combine_parts(
    parts: Sequence[xr.Dataset | None], coords: Mapping[str, np.ndarray]
) -> xr.Dataset:
    """Combine one dataset per grid point (C order; ``None``: missing) into one dataset.

    Parameters
    ----------
    parts : sequence of Dataset or None
        ``prod(len(c) for c in coords.values())`` parts in C order over the grid.
    coords : mapping
        ``{dimension: labels}``: the grid, leading dimensions of the result.

    Returns
    -------
    Dataset
        The outer join of the parts along every analyzer dimension (see the module
        docstring for the fill values), with the grid dimensions first.
    """
    dims = list(coords)
    shape = tuple(len(c) for c in coords.values())
    if len(parts) != int(np.prod(shape, dtype=int)):
        raise ValueError(f"'parts' must have {int(np.prod(shape, dtype=int))} entries for "
                         f"a grid of shape {shape}, got {len(parts)}")
    labelled = [None if p is None else label_dimensions(p) for p in parts]
    if dims and all(p is not None for p in labelled):
        stacked = _stack_uniform(labelled, coords)  # type: ignore[arg-type]
        if stacked is not None:
            return stacked
    return _combine_outer(labelled, coords)


def _combine_outer(labelled: Sequence[xr.Dataset | None],
                   coords: Mapping[str, np.ndarray]) -> xr.Dataset:
    """:func:`combine_parts` of labelled parts with xarray's outer join (the general case)."""
    dims = list(coords)
    shape = tuple(len(c) for c in coords.values())
    filled = _to_fill(labelled)
    fills, meanings, casts = {}, {}, {}
    for name, dtype in filled.items():
        fills[name], out_dtype, meanings[name] = fill_value(dtype)
        if out_dtype != dtype:
            casts[name] = (out_dtype, str(dtype))
    cast = [None if p is None else _cast(p, casts) for p in labelled]
    template = xr.Dataset()  # a failed point: every variable missing
    if any(p is None for p in cast):
        template = next((_blank(p, fills) for p in cast if p is not None), template)
    expanded = []
    for index, part in zip(itertools.product(*(range(n) for n in shape)), cast,
                           strict=True):
        ds = template if part is None else part
        expanded.append(ds.expand_dims({k: [coords[k][i]] for k, i in zip(dims, index,
                                                                           strict=True)}))
    if not dims:
        combined = expanded[0]
    else:
        nested: Any = np.empty(shape, dtype=object)
        for flat, ds in enumerate(expanded):
            nested.flat[flat] = ds
        combined = xr.combine_nested(
            nested.tolist(), concat_dim=dims, data_vars="all", coords="different",
            compat="equals", join="outer", fill_value=fills,
            combine_attrs="drop_conflicts",
        )
    for name in filled:
        if name in combined.variables:
            var = combined[name]
            if name in casts and var.dtype != casts[name][0]:
                var = var.astype(casts[name][0])
            var.attrs["symphase_fill"] = meanings[name]
            if name in casts:
                var.attrs["symphase_fill_from_dtype"] = casts[name][1]
            combined = (combined.assign_coords({name: var}) if name in combined.coords
                        else combined.assign({name: var}))
    return combined


def _attrs_merger() -> Any:
    """xarray's own attrs merge (``merge_attrs``), or None where it cannot be imported."""
    for module in ("xarray.structure.merge", "xarray.core.merge"):
        try:
            return importlib.import_module(module).merge_attrs
        except (ImportError, AttributeError):
            continue
    return None  # pragma: no cover - a layout of xarray we do not know: no fast path


#: Attr value types for which xarray's ``equivalent(a, b)`` is ``a == b or both NaN``.
_PLAIN = frozenset({str, int, float, bool})


def _drop_conflicts(attrs: Sequence[Mapping[Any, Any]], merge_attrs: Any) -> dict[Any, Any]:
    """``merge_attrs(attrs, combine_attrs="drop_conflicts")``, faster for plain values.

    The same loop as xarray's (a key's first value is kept unless a later one is not
    equivalent to it; then the key is dropped, also for later parts), with its
    ``equivalent`` written out for pairs of :data:`_PLAIN` values; any other pair (an
    array, a list, a numpy scalar) makes it hand the whole merge to xarray.
    """
    head = attrs[0]
    if all(a is head for a in attrs[1:]):
        return dict(head)
    result: dict[Any, Any] = {}
    dropped: set[Any] = set()
    for part in attrs:
        for key, value in part.items():
            if key in dropped:
                continue
            if key not in result:
                result[key] = value
                continue
            kept = result[key]
            if kept is value:
                continue
            if type(kept) not in _PLAIN or type(value) not in _PLAIN:
                return dict(merge_attrs(list(attrs), combine_attrs="drop_conflicts"))
            if not (kept == value or (kept != kept and value != value)):
                del result[key]
                dropped.add(key)
    return result


def _stack_uniform(parts: Sequence[xr.Dataset],
                   coords: Mapping[str, np.ndarray]) -> xr.Dataset | None:
    """:func:`combine_parts` of parts of one structure by stacking arrays; None if not.

    The common case of a sweep (every point has the same variables, shapes, dtypes and
    analyzer labels): nothing is missing, so the outer join is a stack. The result is
    identical to :func:`_combine_outer`'s (tested): grid dimensions first, every data
    variable stacked, coordinates equal across the parts (None otherwise), attrs of
    stacked variables and of the dataset combined with ``drop_conflicts``, the other
    coordinates' attrs from the first part; string grid labels are objects.
    """
    merge_attrs = _attrs_merger()
    if merge_attrs is None:  # pragma: no cover
        return None

    def drop_conflicts(attrs: list[Mapping[Any, Any]]) -> dict[Any, Any]:
        return _drop_conflicts(attrs, merge_attrs)

    first = parts[0]
    layout = {name: (var.dims, var.shape, var.dtype) for name, var in first.variables.items()}
    coord_names = set(first.coords)
    if any(d in layout for d in coords):
        return None
    first_indexes = first.indexes
    # the indexes found equal to the first part's (the parts of one Dask batch share
    # theirs, execute._share_indexes): compared once each, not once per part
    equal = {id(index) for index in first_indexes.values()}
    alive = []  # the indexes of `equal`, kept alive (an id is only unique meanwhile)
    for part in parts[1:]:
        if set(part.coords) != coord_names or len(part.variables) != len(layout):
            return None
        for name, var in part.variables.items():
            if layout.get(name) != (var.dims, var.shape, var.dtype):
                return None
        indexes = part.indexes  # built on every access
        for dim, index in first_indexes.items():
            other = indexes.get(dim)
            if other is None:
                return None
            if id(other) not in equal:
                if not other.equals(index):
                    return None
                equal.add(id(other))
                alive.append(other)
    dims = tuple(coords)
    shape = tuple(len(c) for c in coords.values())
    grid = {}
    for dim, labels in coords.items():
        labels = np.asarray(labels)
        grid[dim] = xr.Variable((dim,), labels.astype(object) if labels.dtype.kind == "U"
                                else labels)
    data_vars: dict[str, xr.Variable] = {}
    out_coords: dict[str, xr.Variable] = dict(grid)
    for name, var in first.variables.items():
        key = str(name)
        is_coord = name in coord_names
        if name in first_indexes:
            out_coords[key] = var.copy(deep=False)
            continue
        if is_coord:
            if not all(p.variables[name].equals(var) for p in parts[1:]):
                return None  # xarray orders such a coordinate's grid dimensions oddly
            out_coords[key] = var.copy(deep=False)
            continue
        values = np.stack([np.asarray(p.variables[name].values) for p in parts])
        stacked = xr.Variable(dims + var.dims, values.reshape(shape + var.shape),
                              drop_conflicts([p.variables[name].attrs for p in parts]))
        data_vars[key] = stacked
    return xr.Dataset(data_vars, coords=out_coords,
                      attrs=drop_conflicts([p.attrs for p in parts]))


def combine_sweep(
    sweep: Any, analyzer: Any, datasets: list[xr.Dataset], keys: list[str]
) -> xr.Dataset:
    """The result of ``analyzer`` over ``sweep`` from its task datasets (grid C order).

    Adds ``sweep_failed``, ``sweep_error`` and ``sweep_sha256`` and the sweep's
    provenance attrs (see :mod:`framework.sweep`).
    """
    from framework.results import flatten_attrs, provenance_attrs
    from framework.sweep.storage import is_failure

    failed = np.array([is_failure(ds) for ds in datasets], dtype=bool)
    errors = np.array(
        [str(ds.attrs.get("symphase_error", "")) if f else "" for ds, f in
         zip(datasets, failed, strict=True)], dtype=object)
    dims = sweep.dims
    parts: list[xr.Dataset | None] = []
    for ds, f in zip(datasets, failed, strict=True):
        if f:
            parts.append(None)
            continue
        for key in dims:
            if key in ds.variables:
                if ds[key].ndim or key in ds.dims:
                    raise SpecificationError(
                        f"analyzer {analyzer.name!r} returns a variable {key!r} with "
                        f"dimensions {ds[key].dims}, which collides with the sweep "
                        f"dimension {key!r}"
                    )
                ds = ds.drop_vars(key)
        parts.append(ds)
    combined = combine_parts(parts, sweep.coords())
    extra = sweep.value_coords()  # exact values behind abbreviated labels (inputs)
    if extra:
        combined = combined.assign_coords(extra)
    shape = sweep.shape
    for key in dims:
        combined[key].attrs.update({"long_name": f"sweep parameter {key}", "units": "1"})
    combined = combined.assign({  # one merge for the three (not one each)
        "sweep_failed": (dims, failed.reshape(shape), {
            "long_name": "the analyzer raised an exception at this sweep point",
            "units": "1"}),
        "sweep_error": (dims, errors.reshape(shape), {
            "long_name": "exception raised at this sweep point ('' if none)",
            "units": "1"}),
        "sweep_sha256": (dims, np.array(keys, dtype=object).reshape(shape), {
            "long_name": "sha256 of the point specification (its key in points/)",
            "units": "1"}),
    })
    attrs_ = {k: v for k, v in combined.attrs.items()
              if not k.startswith(("spec.", "symphase_", "sweep."))}
    attrs_.update(provenance_attrs(sweep.experiment, analyzer))
    attrs_["symphase_sweep_grid_json"] = sweep.grid_json()
    attrs_["symphase_sweep_dims"] = json.dumps(list(dims))
    attrs_.update(flatten_attrs({"grid": sweep.to_dict()["grid"]}, prefix="sweep."))
    combined.attrs = attrs_
    return combined
