"""Figures that can be read (issue 12, item 7): sweep plots have legends (beside the panel
when there are many lines, with distinct dashes beyond ten colours), axis labels wrap, and
the normalizations figure shows every series (coinciding curves merged into one entry
``a = b``) and no legend entry without data."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from framework import Experiment, TeacherStudent
from framework.plotting import plot_dataset
from plugins.reproduce_normalizations import _figure_series


def test_sweep_plot_has_legends_and_distinct_styles():
    ds = Experiment(TeacherStudent(2, 2), analyzers=[{"name": "dynamics", "alpha_max": 20.0,
                                                      "n_points": 9}]).sweep(
        eta=[0.1, 0.3, 0.5, 0.7, 0.9, 1.1], normalization=["plain", "batchnorm"],
        scheduler="synchronous")["dynamics"]
    fig = plt.figure()
    assert plot_dataset(ds, fig)
    eps_ax = next(a for a in fig.axes if a.get_title().startswith("eps_g"))
    legend = eps_ax.get_legend()
    assert legend is not None and len(legend.get_texts()) == 12
    styles = {(line.get_color(), line.get_linestyle()) for line in eps_ax.get_lines()}
    assert len(styles) == 12  # 12 curves, 12 distinguishable styles
    for ax in fig.axes:
        assert all(len(line) <= 40 for line in ax.get_ylabel().splitlines())
    plt.close(fig)


def test_normalizations_figure_series_merge_twins_and_skip_empty():
    eta = np.array([0.1, 1.0])
    base = np.array([-0.05, -0.04])
    lam = np.stack([base, base, base * 2, np.full(2, np.nan)])[:, None, :]  # (norm, K, eta)
    esc = np.stack([[100.0, 10.0], [100.0, 10.0], [200.0, 20.0], [np.nan, np.nan]])[:, None]
    ds = xr.Dataset(
        {"lambda_min": (("normalization", "K", "eta"), lam),
         "alpha_escape": (("normalization", "K", "eta"), esc),
         "status": (("normalization", "K", "eta"),
                    np.array([[["ok"] * 2]] * 3 + [[["degenerate: output +-1"] * 2]],
                             dtype=object))},
        coords={"normalization": ["plain", "meanonly", "batchnorm", "layernorm"], "K": [2],
                "eta": eta})
    series, empty = _figure_series(ds)
    assert [c["names"] for c in series] == [["plain", "meanonly"], ["batchnorm"]]
    assert empty == ["layernorm K=2 (degenerate)"]
