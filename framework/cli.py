"""The ``symphase`` command line.

Bad input exits with status 2 and one line on stderr naming the field and the
problem (no traceback).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["main"]


class UsageError(Exception):
    """Bad command-line input; reported in one line with exit status 2."""


def _cmd_plugins(args: argparse.Namespace) -> int:
    from framework.manager import get_registry

    registry = get_registry()
    for kind in registry.KINDS:
        entries = registry.entries(kind)
        print(f"{kind}s:")
        if not entries:
            print("  (none)")
        width = max((len(e.name) for e in entries), default=0)
        for e in entries:
            print(f"  {e.name:<{width}}  {e.description}  [{e.source}]")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from framework.manager import get_registry

    registry = get_registry()
    try:
        # reproductions are registered as identifiers: "natural-gradient" names
        # "natural_gradient"
        function = registry.get("reproduction", args.name.replace("-", "_"))
    except LookupError as exc:
        raise UsageError(str(exc)) from None
    from framework._commands import out_folder

    out = out_folder(args.out if args.out else "out", "--out", UsageError)
    return int(function(out=out, quick=args.quick))


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line (``symphase run: error: argument --workers: ...``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} "
                     f"(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="symphase",
        description="Online learning in teacher-student networks, with normalizations as plugins.",
    )
    from framework.results import symphase_version

    parser.add_argument("--version", action="version", version=f"symphase {symphase_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "plugins", help="list installed models, normalizations, analyzers, activations"
    )
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("reproduce", help="reproduce a published result (e.g. takagi2020)")
    p.add_argument("name", help="what to reproduce (`-` and `_` alike, natural-gradient = "
                   "natural_gradient); `symphase plugins` lists them")
    p.add_argument("--out", default=None,
                   help="output folder (default: out/, untracked; the shipped results in "
                        "datasets/ are regenerated with --out datasets)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster version")
    p.set_defaults(func=_cmd_reproduce)

    _extend(sub)
    return parser


def _extend(sub: argparse._SubParsersAction) -> None:
    """Attach the commands defined in ``framework._commands`` (run, show, plot), if present."""
    try:
        from framework import _commands
    except ImportError:
        return
    _commands.add_commands(sub, UsageError)


def interrupt_of(exc: BaseException | None) -> KeyboardInterrupt | None:
    """``exc`` if it is a KeyboardInterrupt, else the one it was raised because of (an
    interrupt during compiled code reaches Python as ``SystemError`` caused by it), else
    None. Public as ``framework.interrupt_of``: code that saves partial results on Ctrl-C
    catches ``(KeyboardInterrupt, SystemError)`` and asks this."""
    for _ in range(20):
        if exc is None or isinstance(exc, KeyboardInterrupt):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a run stops its workers and keeps its results."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or _one_line(exc)}"


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    print(f"symphase: warning: {_one_line(Exception(message))}", file=sys.stderr)


def _exit_now(status: int) -> None:
    """End the process at once after an interruption (the `symphase` command only).

    Points still running in threads of this process (``--scheduler threads``) cannot be
    stopped, and the interpreter would wait for them at exit; everything stored is whole
    on disk already (stores are atomic), so nothing is lost by not waiting.
    """
    if threading.active_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``symphase`` command; returns the exit status.

    Bad input and environment problems (an unwritable folder, too little memory) are one
    line on stderr and exit status 2; Ctrl-C or SIGTERM stops a run (exit 130 or 143),
    keeping every result stored so far.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args))
    except (UsageError, ValueError, TypeError, LookupError) as exc:
        print(f"symphase: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"symphase: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        print(f"symphase: error: out of memory{': ' + str(exc) if str(exc) else ''}; "
              "reduce the sizes", file=sys.stderr)
        return 2
    except RecursionError:
        print("symphase: error: the input is nested too deeply", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemError) as caught:
        interrupt = interrupt_of(caught)  # numba wraps an interrupt in a SystemError
        if interrupt is None:
            raise
        status = 143 if isinstance(interrupt, _Terminated) else 130
        print(f"symphase: {'terminated' if status == 143 else 'interrupted'}; results "
              "stored so far are kept", file=sys.stderr)
        if argv is None:  # the `symphase` command itself: end now (see _exit_now)
            _exit_now(status)
        return status
    finally:
        warnings.showwarning = shown
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
