"""Per-step statistics over several guest runs, for the benchmarks that compare backends.

Guest-side durations (from /proc/uptime) are what the table shows: they time the file system as the
guest sees it, without QEMU start-up or host scheduling of the launcher.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from .console import GuestResult


@dataclass(frozen=True)
class StepStats:
    name: str
    median: float
    min: float
    max: float
    runs: int


def per_step(results: Sequence[GuestResult]) -> list[StepStats]:
    """Median/min/max of each step's duration across runs, in first-seen step order."""
    order: list[str] = []
    durations: dict[str, list[float]] = {}
    for r in results:
        for s in r.steps:
            if s.duration is None:
                continue
            if s.name not in durations:
                order.append(s.name)
                durations[s.name] = []
            durations[s.name].append(s.duration)
    return [StepStats(n, round(statistics.median(durations[n]), 2), min(durations[n]), max(durations[n]),
                      len(durations[n])) for n in order]


def format_table(stats: Sequence[StepStats], extra: dict[str, str] | None = None) -> str:
    """A Markdown table: step | median | min | max (seconds), plus any extra rows."""
    lines = ["| step | median s | min s | max s |", "|---|---:|---:|---:|"]
    for s in stats:
        lines.append(f"| {s.name} | {s.median:.2f} | {s.min:.2f} | {s.max:.2f} |")
    for k, v in (extra or {}).items():
        lines.append(f"| {k} | {v} | | |")
    return "\n".join(lines)
