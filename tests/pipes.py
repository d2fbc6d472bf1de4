"""Reading a child's pipe with a deadline: a test waiting for a line that never comes fails, saying what
it waited for, instead of holding the whole CI run until pytest-timeout ends it."""

from __future__ import annotations

import os
import select
import time
from typing import IO, Any

import pytest


def read_line(f: IO[Any], timeout: float, what: str) -> str:
    """The next line of the pipe `f` without its newline ("" at end of file), read byte by byte from the
    fd, so nothing waits in a Python buffer where select() can't see it: every read of that pipe must
    come through here.  pytest.fail, naming `what`, when no whole line came within `timeout` seconds."""
    fd = f.fileno()
    deadline = time.monotonic() + timeout
    line = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no line from the child within {timeout:g} s: {what} (so far: {bytes(line)!r})")
        if not select.select([fd], [], [], left)[0]:
            continue
        b = os.read(fd, 1)
        if not b or b == b"\n":
            return line.decode(errors="replace")
        line += b


ENGINE_NOTICE = "WARNING ring engine: "


def error_lines(stderr: str) -> list[str]:
    """A child's stderr lines, less the ring engine's start-up notice: under FSINSPECT_RING=python every
    process says once that it runs the slow twin, which is not part of the error a test checks."""
    return [ln for ln in stderr.strip().splitlines() if ENGINE_NOTICE not in ln]
