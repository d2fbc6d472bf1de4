"""`--record FILE [--snaplen N] [--rotate-mb MB]` for any command that captures (daemon, proxy)."""

from __future__ import annotations

import argparse

from .. import privfile
from ..errors import UserError
from . import format as fmt
from .tap import RecordingTap
from .writer import RecordingWriter


def add_record_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recording")
    g.add_argument("--record", metavar="FILE",
                   help="record every request and reply to FILE (pcapng, see recordings/FORMAT.md)")
    g.add_argument("--snaplen", type=int, default=fmt.DEFAULT_SNAPLEN, metavar="N",
                   help=f"READ/WRITE payload bytes kept per record, 0 = all (default {fmt.DEFAULT_SNAPLEN})")
    g.add_argument("--rotate-mb", type=float, default=0, metavar="MB",
                   help="continue in FILE.001.pcapng, … after MB megabytes (default: never)")
    privfile.add_mode_option(g)


def open_tap(args: argparse.Namespace, *, source: str, backend: str) -> RecordingTap | None:
    """A tap recording to args.record, or None without --record; one-line errors for bad options."""
    if not getattr(args, "record", None):
        return None
    if args.snaplen < 0:
        raise UserError("--snaplen must be 0 (everything) or positive")
    if args.rotate_mb < 0:
        raise UserError("--rotate-mb must be 0 (never) or positive")
    try:
        writer = RecordingWriter(args.record, source=source, backend=backend, snaplen=args.snaplen,
                                 rotate_mb=args.rotate_mb, mode=args.record_mode)
    except OSError as e:
        raise UserError(f"--record {args.record}: {e.strerror or e}") from None
    return RecordingTap(writer)
