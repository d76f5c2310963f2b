from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "symphase",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("SYMPHASE_HYPOTHESIS_PROFILE", "symphase"))
