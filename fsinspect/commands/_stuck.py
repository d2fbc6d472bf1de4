"""`--stuck-ms`, the same on `fsinspect proxy` and `fsinspect daemon`: when a waiting request is linted `stuck`."""

from __future__ import annotations

from typing import Any

from fsinspect.analysis.analyzer import DEFAULT_STUCK_NS
from fsinspect.errors import UserError

DEFAULT_STUCK_MS = DEFAULT_STUCK_NS // 1_000_000
MAX_STUCK_MS = 86_400_000  # one day


def add_stuck_option(g: Any) -> None:
    """--stuck-ms, the same on `fsinspect proxy` and `fsinspect daemon`."""
    g.add_argument("--stuck-ms", metavar="MS", default=None,
                   help="lint a request `stuck` once it has waited MS milliseconds for its reply, while it still "
                        f"waits (default {DEFAULT_STUCK_MS}; 0 turns the lint off)")


def stuck_ns(value: str | None) -> int:
    """--stuck-ms as nanoseconds; a one-line error for anything but a whole number in range."""
    if value is None:
        return DEFAULT_STUCK_MS * 1_000_000
    try:
        ms = int(value.strip())
    except ValueError:
        raise UserError(f"--stuck-ms {value!r}: give a whole number of milliseconds (0 turns the lint off)") from None
    if not 0 <= ms <= MAX_STUCK_MS:
        raise UserError(f"--stuck-ms {ms}: must be between 0 (off) and {MAX_STUCK_MS} (one day)")
    return ms * 1_000_000
