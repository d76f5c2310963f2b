"""The simulation's Gaussian input stream after its speed-up (issue 16, item 5).

The SIMD two-pass fill (``fill_nb``) must give the same numbers, bit for bit, as the
stream's definition one number at a time (``normal_nb``), whatever the block
boundaries; the kernel's thread pool must not change results.
"""

from __future__ import annotations

import numpy as np
import pytest

from framework import Experiment, SpecificationError, TeacherStudent, get_analyzer
from plugins import simulation as simmod

needs_numba = pytest.mark.skipif(not simmod.HAVE_NUMBA, reason="numba not installed")


@needs_numba
@pytest.mark.parametrize("key", [0, 1, 2**63 + 5, 2**64 - 1])
@pytest.mark.parametrize(("start", "count"), [(0, 200_003), (2**40 + 3, 4097), (5, 1), (9, 0)])
def test_fill_is_bit_identical_to_the_scalar_stream(key: int, start: int, count: int) -> None:
    scalar = simmod.fill_one_at_a_time_nb
    ref = np.full(count, np.nan)
    out = np.full(count, np.nan)
    scalar(np.uint64(key), np.uint64(start), ref)
    simmod.fill_nb(np.uint64(key), np.uint64(start), out)
    np.testing.assert_array_equal(out, ref)
    if count > 100_000:  # the slow path ran: tail values beyond r and wedge values
        assert np.count_nonzero(np.abs(out) > simmod.ZIG_R) > 10
        assert np.all(np.isfinite(out))


@needs_numba
def test_normals_of_several_keys_do_not_depend_on_blocks_and_match_numpy_twin() -> None:
    keys = np.array([3, 2**63 + 7, 11], dtype=np.uint64)
    start, count = 1000, 3 * 4096 + 17  # spans the 4096-number blocks of normals()
    got = simmod.normals(keys, start, count)
    scalar = simmod.fill_one_at_a_time_nb
    for p, key in enumerate(keys):
        ref = np.empty(count)
        scalar(key, np.uint64(start), ref)
        np.testing.assert_array_equal(got[p], ref)
    parts = np.concatenate([simmod.normals(keys, start, 5000),
                            simmod.normals(keys, start + 5000, count - 5000)], axis=1)
    np.testing.assert_array_equal(parts, got)
    # the numpy twin: identical but for rare slow-path values (libm vs numpy by an ulp)
    np.testing.assert_allclose(simmod.normals_numpy(keys, start, count), got, rtol=1e-14,
                               atol=0)


@needs_numba
@pytest.mark.parametrize("model", [TeacherStudent(2, 2, noise=0.01),
                                   TeacherStudent(2, 2, second_layer="trained", eta_v=1.0,
                                                  weight_decay=0.01, noise=0.01)])
def test_threads_do_not_change_results(model: TeacherStudent) -> None:
    import numba

    ex = Experiment(model, normalization="batchnorm_affine", eta=0.5, seed=3)
    sim = get_analyzer("simulation", N=200, alpha=[0.0, 0.5, 1.5], replicas=3,
                       backend="numba")
    most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    previous = numba.get_num_threads()
    runs = []
    try:
        for t in (1, 2):  # one thread; a pool of two (whatever the machine's CPUs)
            numba.set_num_threads(min(t, most))
            runs.append(sim.run(ex))
    finally:
        numba.set_num_threads(previous)
    for other in runs[1:]:
        for name in runs[0].data_vars:
            np.testing.assert_array_equal(other[name].values, runs[0][name].values)
    assert not np.allclose(runs[0]["Q"].isel(alpha=-1), runs[0]["Q"].isel(alpha=0))
    # and the generic numpy path agrees with the pooled kernel step for step
    ref = get_analyzer("simulation", N=200, alpha=[0.0, 0.5, 1.5], replicas=3,
                       backend="numpy").run(ex)
    np.testing.assert_allclose(runs[1]["Q"], ref["Q"], rtol=0, atol=1e-11)
    np.testing.assert_allclose(runs[1]["R"], ref["R"], rtol=0, atol=1e-11)


@needs_numba
def test_default_threads_follow_numba_and_the_usable_cpus() -> None:
    import os

    import numba

    most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        assert simmod.default_threads() == 1
        numba.set_num_threads(most)
        assert simmod.default_threads() == min(most, len(os.sched_getaffinity(0)))
    finally:
        numba.set_num_threads(previous)


@needs_numba
def test_threads_option_gives_the_same_results_and_stays_out_of_default_specs() -> None:
    ex = Experiment(TeacherStudent(3, 2, noise=0.01), normalization="weightnorm", eta=0.5,
                    seed=5)
    runs = [get_analyzer("simulation", N=150, alpha=[0.0, 1.0], replicas=5,
                         backend="numba", threads=t).run(ex) for t in (1, 3)]
    for name in runs[0].data_vars:
        np.testing.assert_array_equal(runs[1][name].values, runs[0][name].values)
    assert "threads" not in get_analyzer("simulation").to_dict()  # hashes as before
    assert get_analyzer("simulation", threads=2).to_dict()["threads"] == 2
    with pytest.raises((SpecificationError, TypeError), match="'threads'"):
        get_analyzer("simulation", threads=0)
