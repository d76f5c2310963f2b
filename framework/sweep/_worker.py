"""Dask preload of the worker processes of an embedded sweep cluster: die with the client.

:func:`framework.sweep.execute.run` starts its ``LocalCluster`` of worker processes with
``preload=["framework.sweep._worker"]``; Dask imports this module in each worker process
and calls :func:`dask_setup`, which

- asks the kernel (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to kill the worker when
  the process that spawned it ends, however it ends (SIGKILL included) and whatever the
  worker is doing (a compiled kernel holding the GIL included; Dask's own watchdog is a
  thread that needs the GIL); if that process is already gone, the worker exits now;
- ignores SIGINT: Ctrl-C in a terminal reaches the whole process group; the client stops
  the run and kills its workers itself (no tracebacks from every worker).

Elsewhere than Linux only the second applies, and Dask's watchdog remains.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any

__all__ = ["dask_setup", "die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Have the kernel SIGKILL this process when its parent ends; False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl
        os._exit(1)
    return True


def dask_setup(worker: Any = None) -> None:
    """Dask preload hook (runs in the worker process when the worker starts)."""
    die_with_parent()
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
