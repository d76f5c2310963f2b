"""Built-in, content-based figures for ``symphase plot``.

Plugins are asked first (the ``symphase_plot`` hook); these figures are the fallback.
They are chosen by variable and dimension names only, never by analyzer or
normalization:

- *spectra*: a variable ``eigenvalue`` over ``eigen`` (with ``multiplicity`` if present)
  as a stem plot of multiplicity against eigenvalue;
- *curves over alpha*: every numeric variable with an ``alpha`` dimension, one panel
  each (scalars such as the generalization error first, then matrices such as order
  parameters), one line per combination of the other dimensions (sweep points, matrix
  entries), all-NaN lines (padding) skipped;
- *sweep curves*: variables defined on the sweep dimensions only (e.g. an escape time
  per ``eta``), against the first numeric sweep dimension, one line per value of the
  others.

The sweep dimensions are read from the ``symphase_sweep_dims`` attr.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import numpy as np
import xarray as xr

__all__ = ["plot_dataset", "sweep_dims"]

#: At most this many panels and lines per panel.
MAX_PANELS = 6
MAX_LINES = 16
_SWEEP_VARS = ("sweep_failed", "sweep_error", "sweep_sha256")


def sweep_dims(ds: xr.Dataset) -> list[str]:
    """The sweep dimensions of a result (empty for a single experiment)."""
    try:
        dims = json.loads(str(ds.attrs.get("symphase_sweep_dims", "[]")))
    except json.JSONDecodeError:
        return []
    return [d for d in dims if d in ds.dims]


def _numeric(var: xr.DataArray) -> bool:
    return var.dtype.kind in "iuf" and var.size > 0 and bool(np.isfinite(var.values).any())


def _label(var: xr.DataArray) -> str:
    """``long_name [units]``, wrapped to lines of 40 characters (axis labels that fit)."""
    import textwrap

    text = str(var.attrs.get("long_name", var.name))
    units = var.attrs.get("units")
    text = f"{text} [{units}]" if units not in (None, "", "1") else text
    return "\n".join(textwrap.wrap(text, 40)) or str(var.name)


def _series(var: xr.DataArray, along: str) -> list[tuple[str, np.ndarray]]:
    """One (label, values) per combination of the dimensions other than ``along``.

    All-NaN combinations are skipped; at most ``MAX_LINES + 1`` are returned (the
    extra one only signals truncation).
    """
    others = [d for d in var.dims if d != along]
    var = var.transpose(*others, along)
    out: list[tuple[str, np.ndarray]] = []
    for index in itertools.product(*(range(var.sizes[d]) for d in others)):
        values = var.values[index]
        if not np.isfinite(values).any():
            continue
        if len(out) > MAX_LINES:
            break
        parts = []
        for d, i in zip(others, index, strict=True):
            coord = var[d].values[i] if d in var.coords else i
            parts.append(f"{d}={coord}")
        out.append((", ".join(parts), values))
    return out


def _spectrum(ax: Any, ds: xr.Dataset) -> None:
    eig = ds["eigenvalue"]
    along = "eigen" if "eigen" in eig.dims else str(eig.dims[-1])
    mult = ds["multiplicity"] if "multiplicity" in ds.data_vars else None
    heights = (mult.broadcast_like(eig) if mult is not None else xr.ones_like(eig))
    # label each series by the other dimensions; pair eigenvalues and multiplicities
    lines = _series(eig, along)[:MAX_LINES]
    others = [d for d in eig.dims if d != along]
    combos = [
        idx for idx in itertools.product(*(range(eig.sizes[d]) for d in others))
        if np.isfinite(eig.transpose(*others, along).values[idx]).any()
    ][:MAX_LINES]
    m_values = heights.transpose(*others, along).values
    for k, ((label, values), idx) in enumerate(zip(lines, combos, strict=True)):
        h = np.asarray(m_values[idx], dtype=float)
        ok = np.isfinite(values) & np.isfinite(h)
        container = ax.stem(values[ok], h[ok], linefmt=f"C{k % 10}-",
                            markerfmt=f"C{k % 10}o", basefmt=" ")
        if label:
            container.set_label(label)
    ax.axvline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel(_label(eig))
    ax.set_ylabel(_label(mult) if mult is not None else "count")
    if mult is not None:
        finite = mult.values[np.isfinite(mult.values) & (mult.values > 0)]
        if finite.size and finite.max() / finite.min() > 100:
            ax.set_yscale("log")
    if 1 < len(lines) <= 8:
        ax.legend(fontsize="x-small")
    ax.set_title("spectrum")


def _scales(ax: Any, x: np.ndarray, ys: list[np.ndarray]) -> None:
    pos = x[np.isfinite(x) & (x > 0)]
    if pos.size and pos.max() / pos.min() > 100:
        if (x[np.isfinite(x)] <= 0).any():
            ax.set_xscale("symlog", linthresh=float(pos.min()))
        else:
            ax.set_xscale("log")
    values = np.concatenate([y[np.isfinite(y)] for y in ys]) if ys else np.array([])
    if values.size and (values > 0).all() and values.max() / values.min() > 100:
        ax.set_yscale("log")


def _curves(ax: Any, var: xr.DataArray, along: str, x: np.ndarray, xlabel: str) -> None:
    lines = _series(var, along)
    more = f" (first {MAX_LINES} lines)" if len(lines) > MAX_LINES else ""
    lines = lines[:MAX_LINES]
    styles = ("-", "--", ":", "-.")
    for i, (label, values) in enumerate(lines):  # colour cycles first, then the dash
        ax.plot(x, values, label=label or None, lw=1.2, color=f"C{i % 10}",
                linestyle=styles[(i // 10) % len(styles)])
    _scales(ax, x, [v for _, v in lines])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_label(var))
    ax.set_title(f"{var.name}{more}", fontsize="medium")
    if len(lines) > 8:  # many lines: the legend beside the panel, not over the data
        ax.legend(fontsize="xx-small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  ncol=1 + len(lines) // 25, frameon=False)
    elif len(lines) > 1:
        ax.legend(fontsize="x-small")


def _panels(ds: xr.Dataset) -> list[tuple[str, Any]]:
    panels: list[tuple[str, Any]] = []
    if "eigenvalue" in ds.data_vars and _numeric(ds["eigenvalue"]):
        panels.append(("spectrum", None))
    sweeps = sweep_dims(ds)
    skip = {"eigenvalue", "multiplicity", *_SWEEP_VARS}
    over_alpha = [
        v for name, v in ds.data_vars.items()
        if name not in skip and "alpha" in v.dims and _numeric(v)
    ]
    over_alpha.sort(key=lambda v: (len(set(v.dims) - {"alpha", *sweeps}), str(v.name)))
    panels += [("alpha", v) for v in over_alpha]
    numeric_sweeps = [d for d in sweeps if d in ds.coords and ds[d].dtype.kind in "iuf"
                      and ds.sizes[d] > 1]
    if numeric_sweeps:
        x = numeric_sweeps[0]
        for name, v in ds.data_vars.items():
            if name in skip or "alpha" in v.dims or not _numeric(v):
                continue
            if x in v.dims and set(v.dims) <= set(sweeps):
                panels.append(("sweep", (v, x)))
    return panels[:MAX_PANELS]


def plot_dataset(ds: xr.Dataset, figure: Any) -> bool:
    """Draw the content-based figures of ``ds`` on ``figure``; False if nothing fits."""
    panels = _panels(ds)
    if not panels:
        return False
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    wide = 1.35 if ds.attrs.get("symphase_sweep_dims") else 1.0  # room for legends
    figure.set_size_inches(6.0 * cols * wide, 4.0 * rows)
    for k, (kind, what) in enumerate(panels):
        ax = figure.add_subplot(rows, cols, k + 1)
        if kind == "spectrum":
            _spectrum(ax, ds)
        elif kind == "alpha":
            if "alpha" in ds.coords:
                x, xlabel = ds["alpha"].values, _label(ds["alpha"])
            else:
                x, xlabel = np.arange(ds.sizes["alpha"]), "alpha (index)"
            _curves(ax, what, "alpha", x, xlabel)
        else:
            var, x = what
            _curves(ax, var, x, ds[x].values, _label(ds[x]))
    title = ds.attrs.get("symphase_analyzer")
    if title:
        figure.suptitle(str(title))
    figure.tight_layout()
    return True
