"""The ``symphase`` command line.

Bad input exits with status 2 and one line on stderr naming the field and the
problem (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

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
        function = registry.get("reproduction", args.name)
    except LookupError as exc:
        raise UsageError(str(exc)) from None
    out = Path(args.out) if args.out else Path("out")
    return int(function(out=out, quick=args.quick))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    p.add_argument("name", help="what to reproduce; `symphase plugins` lists them")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"symphase: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, LookupError) as exc:
        print(f"symphase: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("symphase: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
