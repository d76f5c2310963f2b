"""Independent jobs of a reproduction on spawned worker processes, interruptible.

:func:`run_jobs` runs ``fn(*args)`` for each ``(key, fn, args)`` on a ``spawn`` process
pool and hands each result to a callback in the calling process as it finishes. Ctrl-C
stops it within a moment: the workers ignore SIGINT (so only the calling process sees it,
and none prints a traceback), the pool is terminated, and :func:`run_jobs` returns True,
so the reproduction can save what finished. A job that raises ends the run with that
exception, as before.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["run_jobs", "save_run"]

Job = tuple[Any, Callable[..., Any], tuple[Any, ...]]


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _call(job: Job) -> tuple[Any, Any]:
    key, fn, args = job
    return key, fn(*args)


def run_jobs(jobs: Iterable[Job], workers: int,
             on_result: Callable[[Any, Any], None]) -> bool:
    """Run the jobs in order on ``workers`` processes; ``on_result(key, result)`` for each
    as it completes. Returns True if interrupted (Ctrl-C), False when every job ran."""
    jobs = list(jobs)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(max(1, min(workers, len(jobs) or 1)), initializer=_ignore_sigint) as pool:
        try:
            for key, result in pool.imap_unordered(_call, jobs):
                on_result(key, result)
        except KeyboardInterrupt:
            pool.terminate()
            return True
    return False


def save_run(ds: Any, path: Any, interrupted: bool) -> bool:
    """Store a reproduction's dataset with attr ``status`` ("complete", or "interrupted
    ...": the entries not computed are NaN) and return ``interrupted``; an interrupted
    run says on stderr what was written (the caller then exits 130, with no figures or
    docs of a partial result)."""
    import sys

    from framework import save

    ds.attrs["status"] = ("interrupted (Ctrl-C): the entries not computed are NaN; run "
                          "again for the full result") if interrupted else "complete"
    save(ds, path)
    if interrupted:
        print(f"interrupted: wrote what was finished to {path} (the rest is NaN, attr "
              "status); no figures", file=sys.stderr)
    return interrupted
