"""The escape analyzer starts from the plateau for every weight norm and eta, or says why it
cannot (issue 12, item 5): batch norm at weight norm 1/(2K-1) with eta / weight norm >= 2.5
has a *stable* symmetric branch at the held weight norm, and the error says so."""

from __future__ import annotations

import pytest

from framework import Experiment, SpecificationError, TeacherStudent


def _escape(K: int, eta: float, weight_norm: float):
    return Experiment(TeacherStudent(K, K), normalization="batchnorm", eta=eta,
                      analyzers=[{"name": "escape", "weight_norm": weight_norm}]).run()


def test_stable_symmetric_phase_is_explained():
    with pytest.raises(SpecificationError) as info:
        _escape(2, 1.0, 1.0 / 3.0)
    msg = str(info.value)
    assert "eta / weight norm = 3" in msg and "0 unstable direction(s)" in msg
    assert "a symmetric branch is stable here" in msg


def test_escape_from_the_plateau_where_it_exists():
    ds = _escape(2, 0.5, 1.0 / 3.0)["escape"]  # eta / weight norm = 1.5: a plateau exists
    assert bool(ds.escaped) and 0.0 < float(ds.alpha_escape) < 2000.0
