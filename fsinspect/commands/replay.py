"""`fsinspect replay FILE`: the Textual UI over a recording, analysed in the background."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UserError
from ..recording.reader import RecordingError
from ._recording import RECORDING_HELP


def register(sub: Any) -> None:
    p = sub.add_parser("replay", help="browse a recording in the UI",
                       description="Open a recording in the Textual UI: exchanges list, detail with hex dump, "
                                   "filters, inode map, submounts and SYNCFS, stats, control plane.  "
                                   "The list is usable at once; the analysis continues in the background.")
    p.add_argument("file", metavar="FILE", help=RECORDING_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tui.app import run_replay  # textual loads only for the UI commands

    try:
        return run_replay(args.file)
    except RecordingError as e:
        raise UserError(str(e)) from None
