"""Specification validation and the realize / from_weights round trip."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import framework
from framework import Experiment, OrderParameters, SpecificationError, TeacherStudent
from framework.testing import strategies as sst


def test_teacher_student_defaults() -> None:
    m = TeacherStudent(K=3, M=2)
    np.testing.assert_array_equal(m.T, np.eye(2))
    assert (m.activation, m.noise, m.second_layer) == ("erf", 0.0, "fixed")
    assert m == TeacherStudent(3, 2) and hash(m) == hash(TeacherStudent(3, 2))
    assert TeacherStudent.from_dict(m.to_dict()) == m


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"K": 0, "M": 2}, r"'K' must be >= 1, got 0"),
        ({"K": 2, "M": -1}, r"'M' must be >= 1, got -1"),
        ({"K": 2, "M": 2, "noise": -0.1}, r"'noise' must be >= 0.0, got -0.1"),
        ({"K": 2, "M": 2, "T": np.eye(3)}, r"'T' must have shape \(2, 2\), got \(3, 3\)"),
        ({"K": 2, "M": 2, "T": [[1, 0.5], [0, 1]]}, r"'T' must be symmetric"),
        ({"K": 2, "M": 2, "T": [[1, 2], [2, 1]]}, r"'T' must be positive definite"),
        ({"K": 2, "M": 2, "second_layer": "trained"}, r"'second_layer' must be one of 'fixed'"),
    ],
)
def test_teacher_student_errors_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TeacherStudent(**kwargs)


def test_integer_fields_reject_non_integers() -> None:
    with pytest.raises(TypeError, match=r"'K' must be an integer, got 2.5"):
        TeacherStudent(K=2.5, M=2)


def test_spec_is_frozen() -> None:
    m = TeacherStudent(2, 2)
    with pytest.raises(AttributeError):
        m.K = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        m.T[0, 0] = 2.0


@given(sst.order_parameters(), st.integers(0, 2**32 - 1), st.integers(0, 30))
def test_realize_from_weights_round_trip(op: OrderParameters, seed: int, extra: int) -> None:
    N = op.K + op.M + extra
    J, B = op.realize(N, seed)
    assert J.shape == (op.K, N) and B.shape == (op.M, N)
    back = OrderParameters.from_weights(J, B)
    for a, b in [(back.Q, op.Q), (back.R, op.R), (back.T, op.T)]:
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(5, 40), st.integers(0, 1000))
def test_from_weights_realize_round_trip(K: int, M: int, N: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    J, B = rng.standard_normal((K, N)), rng.standard_normal((M, N))
    op = OrderParameters.from_weights(J, B)
    again = OrderParameters.from_weights(*op.realize(N, rng))
    np.testing.assert_allclose(again.covariance, op.covariance, rtol=1e-10, atol=1e-12)


def test_realize_rank_deficient_in_small_dimension() -> None:
    op = OrderParameters.symmetric(3, 1 / 5, 1 / 5, 1 / np.sqrt(15), 1 / np.sqrt(15))
    assert op.rank == 3  # the student vectors lie in the teacher span
    J, B = op.realize(3, 0)
    np.testing.assert_allclose(OrderParameters.from_weights(J, B).Q, op.Q, atol=1e-12)
    message = r"'N' must be >= 3 \(the rank of the joint covariance\), got 2"
    with pytest.raises(ValueError, match=message):
        op.realize(2, 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([[1, 0], [0, 1]], [[1, 0]]), r"'R' must have shape \(2, M\), got \(1, 2\)"),
        (([[1, 0.2], [0.1, 1]], np.zeros((2, 2))), r"'Q' must be symmetric"),
        (([[1, 0], [0, 1]], [[1.5, 0], [0, 0]]), r"joint covariance .* positive semi-definite"),
        (([[1, 0], [0, 1]], [[np.nan, 0], [0, 0]]), r"'R' must have finite entries"),
    ],
)
def test_order_parameter_errors(args: tuple, message: str) -> None:
    with pytest.raises(SpecificationError, match=message):
        OrderParameters(*args)


def test_experiment_validation_and_round_trip() -> None:
    e = Experiment(TeacherStudent(2, 2), normalization="batchnorm", eta=0.5, seed=3)
    assert Experiment.from_json(e.to_json()) == e
    op = e.initial_order_parameters()
    assert op == e.initial_order_parameters()  # deterministic from the seed
    np.testing.assert_allclose(op.T, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(np.diag(op.Q), 1.0, atol=0.15)  # init_scale = 1
    with pytest.raises(ValueError, match=r"'eta' must be >= 0.0, got -1.0"):
        e.evolve(eta=-1)
    with pytest.raises(ValueError, match=r"'init_N' must be >= K \+ M = 4, got 3"):
        e.evolve(init_N=3)
    with pytest.raises(ValueError, match=r"unknown normalization 'bn'; installed "
                       r"normalizations: .*'batchnorm'.*'plain'"):
        e.evolve(normalization="bn")
    with pytest.raises(ValueError, match=r"unknown activation 'relu6'"):
        Experiment(TeacherStudent(2, 2, activation="relu6"))
    with pytest.raises(ValueError, match=r"unknown field\(s\) 'etaa' for Experiment"):
        Experiment.from_dict({"model": {"K": 2, "M": 2}, "etaa": 1})


def test_experiment_init_must_match_the_model() -> None:
    op = OrderParameters(np.eye(3), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"'init' must have K=2, M=2 like the model, got K=3"):
        Experiment(TeacherStudent(2, 2), init=op)
    exact = OrderParameters(0.5 * np.eye(2), 0.1 * np.eye(2))
    e = Experiment(TeacherStudent(2, 2), init=exact)
    assert e.initial_order_parameters() is exact
    assert Experiment.from_json(e.to_json()) == e


def test_public_api_is_exported() -> None:
    for name in framework.__all__:
        assert hasattr(framework, name), name
