"""`fsinspect` entry point: argparse subcommands, one module each under fsinspect.commands.

Errors the user can fix (bad arguments, bad input files) end in one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .errors import UserError
from .workdir import Stopped

__all__ = ["UserError", "build_parser", "main"]

# Subcommand modules, in help order.  A module is listed only once its command works.
COMMANDS = ("decode", "demo", "guest", "daemon", "proxy", "attach", "extcap", "replay", "stats", "info", "export", "rerun", "diff")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Every command's parser, or only the one `argv` names: a command module imports what its options need
    (the daemon's engine, the analysis, lark), and `attach --format` should not pay for all of them."""
    p = _Parser(prog="fsinspect", description="virtio-fs debugger and FUSE protocol inspector")
    p.add_argument("--version", action="version", version=f"fsinspect {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    first = argv[0] if argv else None
    for name in (first,) if first in COMMANDS else COMMANDS:
        mod = importlib.import_module(f"fsinspect.commands.{name}")
        mod.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"fsinspect {args.command}: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
    except Stopped as e:  # cleaned up after: now end by the signal, as its default action would have
        e.die()
        return 128 + e.signum
    except BrokenPipeError:
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
