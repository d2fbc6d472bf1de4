"""Shared by the recording commands: open a recording with one-line errors, run the analysis."""

from __future__ import annotations

import sys

from ..analysis import Analyzer
from ..errors import UserError
from ..recording.reader import RecordingError, RecordingReader
from ..recording.replay import analyze

RECORDING_HELP = ("an fsinspect recording (.pcapng); a rotated one by its first part, a glob (quoted) or its "
                  "directory: the parts read as one")


def open_recording(path: str) -> RecordingReader:
    try:
        return RecordingReader(path)
    except RecordingError as e:
        raise UserError(str(e)) from None


def analyze_file(path: str, *, keep_exchanges: bool = True) -> tuple[RecordingReader, Analyzer]:
    r = open_recording(path)
    try:
        an = analyze(r, Analyzer(keep_exchanges=keep_exchanges))
    except RecordingError as e:
        raise UserError(str(e)) from None
    finally:
        r.close()
    if r.truncated:
        print(f"fsinspect: warning: {path}: {r.truncated}; read up to there", file=sys.stderr)
    return r, an
