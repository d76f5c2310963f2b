"""The built-in model plugin: the soft committee machine ``teacher_student``.

The class itself lives in :mod:`framework.model` (``framework.TeacherStudent``) because the
framework's engines, sweeps and the loading of datasets stored before models were plugins
need it; this module registers it exactly like a third-party model.
"""

from __future__ import annotations

from typing import Any

from framework import TeacherStudent, hookimpl


@hookimpl
def symphase_register_models(registry: Any) -> None:
    registry.add_model(TeacherStudent)
