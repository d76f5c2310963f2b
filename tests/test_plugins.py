"""Plugin discovery, registration, failure isolation and the hook documentation."""

from __future__ import annotations

import inspect
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import attrs
import numpy as np
import pytest

import framework
from framework import Backward, Normalization, PluginError, Registry, hookimpl
from framework import hookspecs as hookspecs_module
from framework.cli import main as cli_main

THIRD_PARTY = '''
import attrs
import numpy as np
from framework import Backward, Normalization, hookimpl


@attrs.frozen
class Doubled(Normalization):
    name = "doubled"
    description = "x~ = 2 x (a fake third-party normalization)"
    supports_diagonal_scale = True

    def forward(self, x, stats, params):
        return 2.0 * x

    def backward(self, x, stats, params, grad_out):
        return Backward(x=2.0 * grad_out)

    def scale(self, Q, params):
        return np.full(Q.shape[:-1], 2.0)

    def scale_jacobian(self, Q, params):
        return np.zeros(Q.shape + Q.shape[-1:])


@hookimpl
def symphase_register_normalizations(registry):
    registry.add_normalization(Doubled)
'''


def _fake_distribution(root: Path, dist: str, entry_points: dict[str, str]) -> None:
    info = root / f"{dist}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[symphase]\n{lines}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on sys.path where fake distributions are installed."""
    monkeypatch.syspath_prepend(str(tmp_path))
    framework.refresh_plugins()
    yield tmp_path
    for mod in [m for m in sys.modules if m.startswith("fake_symphase_")]:
        del sys.modules[mod]
    monkeypatch.undo()
    framework.refresh_plugins()


def test_third_party_entry_point_is_listed_with_its_distribution(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (site / "fake_symphase_doubled.py").write_text(THIRD_PARTY)
    _fake_distribution(site, "symphase_doubled", {"doubled": "fake_symphase_doubled"})
    framework.refresh_plugins()
    assert "doubled" in framework.list_normalizations()
    norm = framework.get_normalization("doubled")
    np.testing.assert_array_equal(norm.forward(np.ones(2), {}, {}), [2.0, 2.0])
    assert cli_main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "doubled" in out and "[symphase_doubled 1.2.3]" in out
    assert "batchnorm" in out and "[built-in]" in out


def test_broken_plugins_warn_and_the_rest_keeps_working(site: Path) -> None:
    (site / "fake_symphase_raises.py").write_text("raise RuntimeError('boom at import')\n")
    (site / "fake_symphase_badhook.py").write_text(textwrap.dedent('''
        from framework import hookimpl

        @hookimpl
        def symphase_register_normalizations(registry):
            raise KeyError("bad registration")
    '''))
    (site / "fake_symphase_dupe.py").write_text(textwrap.dedent('''
        from framework import hookimpl
        from plugins.normalizations import Plain

        @hookimpl
        def symphase_register_normalizations(registry):
            registry.add_normalization(Plain)
    '''))
    (site / "fake_symphase_doubled.py").write_text(THIRD_PARTY)
    _fake_distribution(site, "symphase_broken", {
        "raises": "fake_symphase_raises",
        "badhook": "fake_symphase_badhook",
        "dupe": "fake_symphase_dupe",
        "missing": "fake_symphase_not_there",
        "doubled": "fake_symphase_doubled",
    })
    framework.refresh_plugins()
    with pytest.warns(framework.SymphasePluginWarning) as record:
        names = framework.list_normalizations()
    messages = "\n".join(str(w.message) for w in record)
    assert "'raises' (symphase_broken 1.2.3) was skipped: import failed: RuntimeError: " \
        "boom at import" in messages
    assert "'badhook' (symphase_broken 1.2.3) was skipped: symphase_register_normalizations " \
        "failed: KeyError" in messages
    assert "normalization 'plain' from symphase_broken 1.2.3 is already registered by " \
        "built-in" in messages
    assert "'missing'" in messages and "ModuleNotFoundError" in messages
    assert {"plain", "batchnorm", "doubled"} <= set(names)


def test_runtime_registration_from_a_notebook() -> None:
    @attrs.frozen
    class Halved(Normalization):
        name = "halved"
        description = "x~ = x / 2"

        def forward(self, x, stats, params):  # type: ignore[no-untyped-def]
            return 0.5 * x

        def backward(self, x, stats, params, grad_out):  # type: ignore[no-untyped-def]
            return Backward(x=0.5 * grad_out)

    class NotebookPlugin:
        @hookimpl
        def symphase_register_normalizations(self, registry: Registry) -> None:
            registry.add_normalization(Halved)

    plugin = NotebookPlugin()
    framework.register_plugin(plugin)
    try:
        assert isinstance(framework.get_normalization("halved"), Halved)
        entry = {e.name: e for e in framework.get_registry().entries("normalization")}["halved"]
        assert entry.source == "runtime"
    finally:
        framework.unregister_plugin(plugin)
    assert "halved" not in framework.list_normalizations()


def test_plugin_manager_without_entry_points_has_the_builtins() -> None:
    pm = framework.get_plugin_manager(entry_points=False)
    names = [name for name, _ in pm.list_name_plugin()]
    assert names == list(framework.DEFAULT_PLUGINS)


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (int, r"normalization must be a subclass of Normalization, got <class 'int'>"),
        (type("NoForward", (Normalization,), {"name": "nf", "description": "d"}),
         r"normalization class NoForward must implement forward, backward"),
        (type("NoName", (Normalization,), {
            "description": "d", "forward": lambda *a: 0, "backward": lambda *a: 0}),
         r"normalization name must be a Python identifier, got ''"),
        (type("NoDoc", (Normalization,), {
            "name": "nodoc", "forward": lambda *a: 0, "backward": lambda *a: 0}),
         r"normalization 'nodoc' must have a non-empty one-line 'description'"),
        (type("NoScale", (Normalization,), {
            "name": "ns", "description": "d", "supports_diagonal_scale": True,
            "forward": lambda *a: 0, "backward": lambda *a: 0}),
         r"must implement scale, scale_jacobian"),
    ],
)
def test_registry_validates_classes(cls: type, message: str) -> None:
    with pytest.raises(PluginError, match=message):
        Registry().add_normalization(cls)


def test_unknown_names_list_what_is_installed() -> None:
    installed = ", ".join(repr(n) for n in framework.list_normalizations())
    assert "'batchnorm'" in installed and "'plain'" in installed
    with pytest.raises(LookupError) as info:
        framework.get_normalization("bn")
    assert str(info.value) == f"unknown normalization 'bn'; installed normalizations: {installed}"
    with pytest.raises(LookupError, match=r"unknown analyzer 'nope'; installed analyzers: "
                       r"'dynamics', .*'hessian'"):
        framework.get_analyzer("nope")


def test_cli_reports_unknown_reproduction_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["reproduce", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("symphase: error: unknown reproduction 'nope'; installed reproductions:")
    assert err.count("\n") == 1


def _hookspecs() -> list[tuple[str, object]]:
    return [
        (name, obj)
        for name, obj in inspect.getmembers(hookspecs_module, inspect.isfunction)
        if name.startswith("symphase_")
    ]


def test_every_hook_is_prefixed_and_documented() -> None:
    specs = _hookspecs()
    assert len(specs) >= 6
    public = [n for n, o in inspect.getmembers(hookspecs_module, inspect.isfunction)
              if o.__module__ == hookspecs_module.__name__]
    assert all(n.startswith("symphase_") for n in public), public
    for name, func in specs:
        doc = inspect.getdoc(func) or ""
        summary = doc.splitlines()[0] if doc else ""
        assert summary.endswith("."), f"{name}: missing summary line"
        for section in ("Parameters", "Returns", "Fires"):
            assert f"\n{section}\n" in doc, f"{name}: missing {section} section"
        for param in inspect.signature(func).parameters:
            assert f"\n{param} :" in doc, f"{name}: parameter {param!r} undocumented"
        opts = getattr(func, "symphase_spec", {})
        if opts.get("firstresult"):
            assert "Stops at first non-None result" in doc, name


# -- models ------------------------------------------------------------------------------
class _HalfModel(framework.Model):
    """A model that forgot most of the interface."""

    name = "half"
    description = "incomplete"

    def to_dict(self):  # type: ignore[no-untyped-def]
        return {}


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (int, r"model must be a subclass of Model, got <class 'int'>"),
        (framework.Normalization, r"model must be a subclass of Model, got "),
        (_HalfModel, r"model class _HalfModel is abstract: it must implement forward, "
                     r"from_dict, random_state, readout, state_layout"),
    ],
)
def test_registry_validates_model_classes(cls: type, message: str) -> None:
    with pytest.raises(PluginError, match=message):
        Registry().add_model(cls)


def test_registry_rejects_a_second_model_of_the_same_name() -> None:
    registry = Registry()
    registry.add_model(framework.TeacherStudent)
    registry.source = "other 1.0"
    renamed = type("Renamed", (framework.TeacherStudent,), {})
    with pytest.raises(PluginError, match=r"model 'teacher_student' from other 1.0 is already "
                       r"registered by built-in"):
        registry.add_model(renamed)
    nameless = type("Nameless", (framework.TeacherStudent,), {"name": "not an identifier"})
    with pytest.raises(PluginError, match=r"model name must be a Python identifier"):
        registry.add_model(nameless)


def test_builtin_model_plugin_registers_teacher_student_first() -> None:
    assert framework.DEFAULT_PLUGINS[0] == "plugins.models"
    entry = {e.name: e for e in framework.get_registry().entries("model")}["teacher_student"]
    assert entry.obj is framework.TeacherStudent and entry.source == "built-in"
    with pytest.raises(LookupError, match=r"unknown model 'nope'; installed models: "
                       r"'teacher_student'"):
        framework.get_model("nope")


def test_cli_lists_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("models:\n  teacher_student  ")
    assert "[built-in]" in out.splitlines()[1]
