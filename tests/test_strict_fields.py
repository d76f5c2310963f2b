"""Strict conversion of every specification field (issue 12, item 2).

A string is never read as a number or a bool, a bool is not a number, a number is not a
bool; every refusal is a ``TypeError`` (wrong type) or ``SpecificationError`` (wrong value)
whose message names the field, the expected type and the value.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import framework
from framework import Experiment, SpecificationError, TeacherStudent
from framework.cli import main
from framework.theory import Quadrature
from framework.validators import (
    boolean,
    check_bool,
    check_real,
    check_real_array,
    optional_boolean,
    optional_integer,
    optional_real,
    real,
    string,
    to_bool,
    to_float,
)

MODEL = {"K": 2, "M": 2}


# -- the validators ---------------------------------------------------------------------


@attrs.frozen
class _Options:
    flag: bool = attrs.field(default=True, converter=to_bool, validator=boolean())
    maybe: bool | None = attrs.field(default=None, converter=to_bool,
                                     validator=optional_boolean())
    x: float = attrs.field(default=1.0, converter=to_float, validator=real(0.0, strict=True))
    y: float | None = attrs.field(default=None, converter=to_float,
                                  validator=optional_real(0.0))
    n: int | None = attrs.field(default=None, validator=optional_integer(minimum=1))
    label: str = attrs.field(default="a", validator=string())


@pytest.mark.parametrize("bad", ["no", "false", "true", 0, 1, 1.0, None, "", [True]])
def test_boolean_refuses_everything_but_bools(bad):
    with pytest.raises(TypeError, match=r"^'flag' must be a bool, got "):
        _Options(flag=bad)
    if bad is not None:
        with pytest.raises(TypeError, match=r"^'maybe' must be a bool, got "):
            _Options(maybe=bad)


def test_boolean_message_names_field_type_and_value():
    with pytest.raises(TypeError, match=r"^'flag' must be a bool, got 'no' \(str\)$"):
        _Options(flag="no")


def test_valid_values_are_normalised():
    o = _Options(flag=np.bool_(False), maybe=np.True_, x=2, y=np.float32(0.5), n=3)
    assert o.flag is False and o.maybe is True
    assert type(o.x) is float and o.x == 2.0 and type(o.y) is float and o.y == 0.5
    assert _Options(y=None, maybe=None).y is None
    assert check_bool("b", np.bool_(True)) is True
    assert check_real("r", np.int64(3)) == 3.0
    assert check_real_array("a", [[1, 2.5]]).dtype == float


@pytest.mark.parametrize(
    ("field", "bad", "error", "match"),
    [
        ("x", "1.0", TypeError, r"'x' must be a real number, got '1.0' \(str\)"),
        ("x", True, TypeError, r"'x' must be a real number, got True \(bool\)"),
        ("x", None, TypeError, r"'x' must be a real number, got None \(NoneType\)"),
        ("x", 0, SpecificationError, r"'x' must be > 0.0, got 0.0"),
        ("x", float("nan"), SpecificationError, r"'x' must be finite"),
        ("y", "abc", TypeError, r"'y' must be a real number, got 'abc' \(str\)"),
        ("y", False, TypeError, r"'y' must be a real number, got False \(bool\)"),
        ("y", -1, SpecificationError, r"'y' must be >= 0.0, got -1.0"),
        ("n", "3", TypeError, r"'n' must be an integer, got '3' \(str\)"),
        ("n", True, TypeError, r"'n' must be an integer, got True \(bool\)"),
        ("n", 0, SpecificationError, r"'n' must be >= 1, got 0"),
        ("label", 123, TypeError, r"'label' must be a str, got 123 \(int\)"),
    ],
)
def test_real_integer_string_validators(field, bad, error, match):
    with pytest.raises(error, match=match):
        _Options(**{field: bad})


@pytest.mark.parametrize("bad", ["identity", [[True, False]], [[1, "a"]], [[1], [1, 2]], None])
def test_check_real_array_refuses_non_numbers(bad):
    with pytest.raises(TypeError, match=r"^'T' must be an array of real numbers, got "):
        check_real_array("T", bad)


# -- the reported cases -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["dynamics", "fixedpoint", "hessian", "escape"])
@pytest.mark.parametrize("bad", ["no", "false", 0, 1])
def test_second_order_opposite_meanings_refused(name, bad):
    with pytest.raises(TypeError, match=r"'second_order' must be a bool, got "):
        framework.get_analyzer(name, second_order=bad)


@pytest.mark.parametrize(
    ("name", "field"),
    [("fixedpoint", "flag_plateau"), ("hessian", "flag_plateau"),
     ("escape", "stop_at_escape"), ("simulation", "progress")],
)
def test_other_bool_options_refused(name, field):
    with pytest.raises(TypeError, match=rf"'{field}' must be a bool, got 'false' \(str\)"):
        framework.get_analyzer(name, **{field: "false"})


def test_valid_bool_options_unchanged():
    assert framework.get_analyzer("dynamics", second_order=False).second_order is False
    assert framework.get_analyzer("simulation").progress is None
    assert framework.get_analyzer("simulation", progress=np.True_).progress is True


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eta": True}, r"'eta' must be a real number, got True \(bool\)"),
        ({"eta": "fast"}, r"'eta' must be a real number, got 'fast' \(str\)"),
        ({"eta": None}, r"'eta' must be a real number, got None \(NoneType\)"),
        ({"eta": "0.1"}, r"'eta' must be a real number, got '0.1' \(str\)"),
        ({"init_scale": "1"}, r"'init_scale' must be a real number, got '1' \(str\)"),
        ({"batch_size": "2"}, r"'batch_size' must be an integer, got '2' \(str\)"),
        ({"seed": True}, r"'seed' must be an integer, got True \(bool\)"),
        ({"init_N": 100.5}, r"'init_N' must be an integer, got 100.5 \(float\)"),
    ],
)
def test_experiment_fields(kwargs, match):
    with pytest.raises(TypeError, match=match):
        Experiment(model=MODEL, **kwargs)


def test_experiment_valid_numbers_unchanged():
    e = Experiment(model=MODEL, eta=1, init_scale=np.float32(0.5))
    assert type(e.eta) is float and e.eta == 1.0 and e.init_scale == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise": "abc"}, r"'noise' must be a real number, got 'abc' \(str\)"),
        ({"noise": True}, r"'noise' must be a real number, got True \(bool\)"),
        ({"activation": 123}, r"'activation' must be a str, got 123 \(int\)"),
        ({"T": "identity"}, r"'T' must be an array of real numbers, got 'identity' \(str\)"),
        ({"T": [["1", "0"], ["0", "1"]]}, r"'T' must be an array of real numbers"),
        ({"T": [[True, False], [False, True]]}, r"'T' must be an array of real numbers"),
        ({"K": "2"}, r"'K' must be an integer, got '2' \(str\)"),
    ],
)
def test_teacher_student_fields(kwargs, match):
    with pytest.raises(TypeError, match=match):
        TeacherStudent(**{**MODEL, **kwargs})


def test_teacher_student_valid_unchanged():
    m = TeacherStudent(K=2, M=2, noise=1, T=[[1, 0], [0, 2]])
    assert m.noise == 1.0 and type(m.noise) is float
    np.testing.assert_array_equal(m.T, [[1.0, 0.0], [0.0, 2.0]])


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("batchnorm", {"gamma": "abc"}, r"'gamma' must be a real number, got 'abc' \(str\)"),
        ("batchnorm", {"beta": True}, r"'beta' must be a real number, got True \(bool\)"),
        ("layernorm", {"eps": "0"}, r"'eps' must be a real number, got '0' \(str\)"),
        ("weightnorm", {"g": None}, r"'g' must be a real number, got None \(NoneType\)"),
    ],
)
def test_normalization_fields(name, kwargs, match):
    with pytest.raises(TypeError, match=match):
        framework.get_normalization(name, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"accuracy": "1e-3"}, r"'accuracy' must be a real number, got '1e-3' \(str\)"),
        ({"samples": "4096"}, r"'samples' must be an integer"),
        ({"method": 1}, r"'method' must be one of 'sobol', 'montecarlo' \(a str\), got 1"),
    ],
)
def test_quadrature_fields(kwargs, match):
    with pytest.raises(TypeError, match=match):
        Quadrature(**kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("dynamics", {"rtol": "1e-8"}, r"'rtol' must be a real number, got '1e-8' \(str\)"),
        ("escape", {"perturbation": True}, r"'perturbation' must be a real number"),
        ("fixedpoint", {"eta": True}, r"'eta' must be a real number, got True \(bool\)"),
        ("hessian", {"weight_norm": [1.0, True]}, r"'weight_norm' must be a real number"),
        ("hessian", {"N": "10"}, r"'N' must be an integer, got '10' \(str\)"),
        ("simulation", {"alpha": ["0", "1"]}, r"'alpha' must be an array of real numbers"),
        ("simulation", {"alpha_max": "10"}, r"'alpha_max' must be a real number"),
        ("escape", {"quadrature": {"accuracy": "0.1"}}, r"'accuracy' must be a real number"),
    ],
)
def test_analyzer_numeric_fields(name, kwargs, match):
    with pytest.raises(TypeError, match=match):
        framework.get_analyzer(name, **kwargs)


# -- every registered plugin field --------------------------------------------------------


def _kind(field: attrs.Attribute) -> str:
    """'bool', 'number' or 'str' from the field's annotation, else ''."""
    text = str(field.type).replace(" | None", "")
    if text == "bool":
        return "bool"
    if text == "str":
        return "str"
    if "float" in text or text == "int":
        return "number"
    return ""


def _fields(names: list[str], factory) -> list[tuple[str, str, str]]:
    out = []
    for name in names:
        cls = type(factory(name))
        out += [(name, f.name, _kind(f)) for f in attrs.fields(cls) if _kind(f)]
    return out


ANALYZER_FIELDS = _fields(framework.list_analyzers(), framework.get_analyzer)
NORMALIZATION_FIELDS = _fields(
    framework.list_normalizations(), framework.get_normalization
)


def test_every_plugin_has_its_fields_classified():
    kinds = {kind for *_, kind in ANALYZER_FIELDS + NORMALIZATION_FIELDS}
    assert kinds == {"bool", "number", "str"}
    assert ("dynamics", "second_order", "bool") in ANALYZER_FIELDS
    assert ("batchnorm", "gamma", "number") in NORMALIZATION_FIELDS


def _wrong_value(kind: str) -> st.SearchStrategy:
    texts = st.one_of(st.sampled_from(["no", "false", "true", "1", "0.5", "nan", ""]),
                      st.text(max_size=5))
    numbers = st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, width=32))
    if kind == "number":
        return st.one_of(texts, st.booleans())
    if kind == "bool":
        return st.one_of(texts, numbers)
    return numbers  # str fields


def _check_refused(factory, plugin: str, field: str, value) -> None:
    with pytest.raises((TypeError, SpecificationError)) as info:
        factory(plugin, **{field: value})
    assert f"'{field}'" in str(info.value), str(info.value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_wrong_typed_analyzer_option_is_refused_naming_it(data):
    plugin, field, kind = data.draw(st.sampled_from(ANALYZER_FIELDS))
    _check_refused(framework.get_analyzer, plugin, field, data.draw(_wrong_value(kind)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_wrong_typed_normalization_parameter_is_refused_naming_it(data):
    plugin, field, kind = data.draw(st.sampled_from(NORMALIZATION_FIELDS))
    _check_refused(framework.get_normalization, plugin, field, data.draw(_wrong_value(kind)))


# -- TOML -------------------------------------------------------------------------------


def test_toml_string_false_for_a_bool_is_refused(tmp_path: Path, capsys):
    toml = tmp_path / "exp.toml"
    toml.write_text('eta = 0.1\n[model]\nK = 1\nM = 1\n'
                    '[analyzers.dynamics]\nsecond_order = "false"\n')
    code = main(["run", str(toml), "--out", str(tmp_path / "o"), "--scheduler", "synchronous"])
    _, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("symphase: error: exp.toml: ")
    assert "'second_order' must be a bool, got 'false' (str)" in lines[0]


def test_toml_string_for_a_number_is_refused(tmp_path: Path, capsys):
    toml = tmp_path / "exp.toml"
    toml.write_text('eta = "0.1"\n[model]\nK = 1\nM = 1\n')
    code = main(["run", str(toml), "--out", str(tmp_path / "o"), "--scheduler", "synchronous"])
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert "'eta' must be a real number, got '0.1' (str)" in err
