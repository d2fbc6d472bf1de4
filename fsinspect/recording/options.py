"""`--record FILE [--snaplen N] [--rotate-mb MB [--rotate-keep N]]`: declared once here for every command
that captures (daemon, proxy), with one-line errors for bad values."""

from __future__ import annotations

import argparse
import math
from typing import Any

from .. import privfile
from ..errors import UserError
from . import format as fmt
from .writer import RecordingWriter

MIN_ROTATE_MB = 0.1  # a smaller part would be mostly section and interface headers
MAX_ROTATE_MB = 1 << 20  # 1 TiB: beyond it, rotation is off in all but name


def rotate_mb(text: str) -> float:
    """--rotate-mb's type: a finite size of at least MIN_ROTATE_MB megabytes."""
    try:
        mb = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of megabytes") from None
    if not math.isfinite(mb) or mb <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a size: give megabytes >= {MIN_ROTATE_MB} "
                                         "(leave the option out to never rotate)")
    if mb < MIN_ROTATE_MB:
        raise argparse.ArgumentTypeError(f"{text} MB is below the minimum part size, {MIN_ROTATE_MB} MB")
    if mb > MAX_ROTATE_MB:
        raise argparse.ArgumentTypeError(f"{text} MB is above the maximum part size, {MAX_ROTATE_MB} MB")
    return mb


def rotate_keep(text: str) -> int:
    """--rotate-keep's type: a whole number of parts, at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of parts") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: keep at least 1 part (leave the option out to keep all)")
    return n


def add_record_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recording")
    g.add_argument("--record", metavar="FILE",
                   help="record every request and reply to FILE (pcapng, see recordings/FORMAT.md)")
    g.add_argument("--snaplen", type=int, default=fmt.DEFAULT_SNAPLEN, metavar="N",
                   help=f"READ/WRITE payload bytes kept per record, 0 = all (default {fmt.DEFAULT_SNAPLEN})")
    g.add_argument("--rotate-mb", type=rotate_mb, default=0, metavar="MB",
                   help=f"continue in FILE.001.pcapng, … once a part holds MB megabytes (at least "
                        f"{MIN_ROTATE_MB}; default: one file). Every reader takes the parts as one recording")
    g.add_argument("--rotate-keep", type=rotate_keep, default=0, metavar="N",
                   help="with --rotate-mb: keep only the newest N parts, deleting older ones (default: all)")
    privfile.add_mode_option(g)


def check_record_options(args: argparse.Namespace) -> None:
    """The combinations argparse cannot check, as one-line errors."""
    if args.snaplen < 0:
        raise UserError("--snaplen must be 0 (everything) or positive")
    if not args.record and (args.rotate_mb or args.rotate_keep):
        raise UserError("--rotate-mb and --rotate-keep need --record FILE")
    if args.rotate_keep and not args.rotate_mb:
        raise UserError("--rotate-keep N needs --rotate-mb MB (without rotation there is one part)")


def writer_options(args: argparse.Namespace) -> dict[str, Any]:
    """RecordingWriter keyword arguments from checked options."""
    check_record_options(args)
    return {"snaplen": args.snaplen, "rotate_mb": args.rotate_mb, "rotate_keep": args.rotate_keep,
            "mode": args.record_mode}


def open_writer(args: argparse.Namespace, *, source: str, backend: str) -> RecordingWriter | None:
    """The writer for args.record, or None without --record; one-line errors for bad options."""
    opts = writer_options(args)
    if not getattr(args, "record", None):
        return None
    try:
        return RecordingWriter(args.record, source=source, backend=backend, **opts)
    except OSError as e:
        raise UserError(f"--record {args.record}: {e.strerror or e}") from None
