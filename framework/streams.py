"""Labels of symphase's random streams (public: part of the plugin author's kit).

Every random draw of symphase uses ``np.random.default_rng([seed, STREAM, *more])``
through :meth:`framework.Experiment.rng`, so that two analyzers never share a stream and a
result depends only on the experiment's ``seed`` and the stream label::

    rng = experiment.rng(STREAM_SIMULATION, replica)

A plugin that draws random numbers should use a label of its own (any integer not listed
here, e.g. a large constant derived from the plugin's name) rather than reuse one of these.
"""

from __future__ import annotations

__all__ = ["STREAMS", "STREAM_INIT", "STREAM_SIMULATION"]

#: The random initial condition (``init="random"``): teacher realization, then student.
STREAM_INIT = 0
#: Finite-N simulation: replica ``r`` uses ``experiment.rng(STREAM_SIMULATION, r)``.
STREAM_SIMULATION = 1

#: Every stream label used by symphase itself, by name.
STREAMS: dict[str, int] = {"init": STREAM_INIT, "simulation": STREAM_SIMULATION}
