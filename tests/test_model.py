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
        ({"K": 2, "M": 2, "second_layer": "learned"},
         r"'second_layer' must be one of 'fixed', 'trained'"),
        ({"K": 2, "M": 2, "second_layer": "trained"}, r"'eta_v' must be a positive number"),
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


# -- the Model interface ------------------------------------------------------------------
def test_teacher_student_is_the_registered_model() -> None:
    m = TeacherStudent(K=3, M=2, noise=0.1)
    assert isinstance(m, framework.Model)
    assert framework.get_registry().get("model", "teacher_student") is TeacherStudent
    assert "teacher_student" in framework.list_models()
    assert framework.get_model("teacher_student", K=3, M=2, noise=0.1) == m
    assert m.state_layout() == {"Q": (3, 3), "R": (3, 2)}
    assert TeacherStudent.from_dict({"name": "teacher_student", **m.to_dict()}) == m
    assert "name" not in m.to_dict()  # the model's own dict is unchanged
    with pytest.raises(SpecificationError, match=r"'name' must be 'teacher_student' for "
                       r"TeacherStudent, got 'other'"):
        TeacherStudent.from_dict({"name": "other", "K": 1, "M": 1})


def test_experiment_dict_names_the_model_and_old_dicts_still_load() -> None:
    e = Experiment(TeacherStudent(2, 3, noise=0.01), eta=0.3, seed=4)
    data = e.to_dict()
    assert data["model"] == {"name": "teacher_student", **e.model.to_dict()}
    assert Experiment.from_dict(data) == e
    old = {**data, "model": e.model.to_dict()}  # stored before models were plugins
    assert Experiment.from_dict(old) == e
    with pytest.raises(LookupError, match=r"unknown model 'ts'; installed models: "
                       r".*'teacher_student'"):
        Experiment.from_dict({**data, "model": {"name": "ts", "K": 2, "M": 2}})
    with pytest.raises(TypeError, match=r"'model' must be a Model or a mapping, got 3"):
        Experiment(3)  # type: ignore[arg-type]


def test_random_state_draws_exactly_as_before() -> None:
    """``init="random"``: the same draws as the code it replaced (bit for bit)."""
    e = Experiment(TeacherStudent(3, 2, T=[[1.0, 0.3], [0.3, 0.8]]), init_N=50, seed=7,
                   init_scale=0.4)
    rng = np.random.default_rng([7, framework.STREAM_INIT])
    from framework.model import realize_covariance

    B = realize_covariance(e.model.T, 50, rng)
    J = 0.4 * rng.standard_normal((3, 50))
    expected = OrderParameters.from_weights(J, B)
    got = e.initial_order_parameters()
    for a, b in [(got.Q, expected.Q), (got.R, expected.R), (got.T, expected.T)]:
        np.testing.assert_array_equal(a, b)


def test_check_state_messages() -> None:
    m = TeacherStudent(2, 2)
    with pytest.raises(SpecificationError, match=r"'x' must have K=2, M=2 like the model, "
                       r"got K=1, M=2"):
        m.check_state(OrderParameters([[1.0]], [[0.0, 0.0]]), "x")
    with pytest.raises(SpecificationError, match=r"'x.T' must equal the model's T"):
        m.check_state(OrderParameters(np.eye(2), np.zeros((2, 2)), 2 * np.eye(2)), "x")


def test_forward_and_readout_are_the_soft_committee_machine() -> None:
    m = TeacherStudent(2, 3, activation="tanh", noise=0.25)
    rng = np.random.default_rng(0)
    P, Bsz, N = 2, 4, 30
    W = rng.standard_normal((P, 5, N))
    xi = rng.standard_normal((P, Bsz, N))
    noise = rng.standard_normal((P, Bsz))
    out = m.forward(W, xi, noise)
    assert isinstance(out, framework.Forward)
    x_expected = np.einsum("pbn,pkn->pbk", xi, W[:, :2]) / np.sqrt(N)
    y = np.einsum("pbn,pkn->pbk", xi, W[:, 2:]) / np.sqrt(N)
    np.testing.assert_allclose(out.x, x_expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.zeta, np.tanh(y).sum(-1) + 0.5 * noise, rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(m.forward(W, xi).zeta, np.tanh(y).sum(-1), atol=1e-12)
    sigma, dsigma = m.readout(out.x)
    np.testing.assert_allclose(sigma, np.tanh(out.x).sum(-1), atol=1e-12)
    np.testing.assert_allclose(dsigma, 1 - np.tanh(out.x) ** 2, atol=1e-12)


def test_realize_and_theory_delegate() -> None:
    m = TeacherStudent(2, 2)
    op = OrderParameters(0.5 * np.eye(2), 0.2 * np.eye(2))
    J, B = m.realize(op, 20, 3)
    np.testing.assert_allclose(m.order_parameters(J, B).Q, op.Q, atol=1e-12)

    class Engine:
        def generalization_error(self, Q, R, params=None):  # type: ignore[no-untyped-def]
            return ("eps", Q, R, params)

        def rates(self, Q, R, params=None, *, eta, batch_size=1, second_order=True):  # type: ignore[no-untyped-def]
            return ("rates", Q, R, params, eta, batch_size, second_order)

    assert m.generalization_error(Engine(), 1, 2, {"a": 3}) == ("eps", 1, 2, {"a": 3})
    assert m.rates(Engine(), 1, 2, eta=0.5, batch_size=4, second_order=False) == (
        "rates", 1, 2, None, 0.5, 4, False)
    from framework import theory

    engine = theory.expectation_engine(m, framework.get_normalization("plain"))
    eps, err = m.generalization_error(engine, op.Q, op.R)
    assert (eps, err) == engine.generalization_error(op.Q, op.R)
    assert 0.0 < eps < 1.0 and 0.0 <= err < 1e-3
