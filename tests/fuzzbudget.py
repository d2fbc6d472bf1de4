"""Fuzz budgets and rates shared by the fuzz tiers.

CI runs each target's small budget; `./scripts/check --slow` runs the `slow` tier: SLOW_CASES (1M) cases per
target, or FSI_SLOW_CASES=N for a shorter check.  Every slow target prints one line,
`FUZZ <target>: <cases> cases in <s> s = <rate> cases/s`, which scripts/check --slow gathers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

SLOW_CASES = int(os.environ.get("FSI_SLOW_CASES", "1000000"))


def report(target: str, cases: int, seconds: float, note: str = "") -> str:
    line = f"FUZZ {target}: {cases} cases in {seconds:.1f} s = {cases / max(seconds, 1e-9):,.0f} cases/s"
    if note:
        line += f" ({note})"
    print("\n" + line, flush=True)
    return line


def fuzz(target: str, strategy: hs.SearchStrategy[Any], body: Callable[[Any], None], cases: int, *,
         derandomize: bool = False) -> int:
    """Run `body` on `cases` examples of `strategy` (hypothesis: shrinking, replay of failures) and report
    the rate; returns the number of cases run."""
    n = 0

    @settings(max_examples=cases, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=derandomize)
    @given(strategy)
    def prop(case: Any) -> None:
        nonlocal n
        n += 1
        body(case)

    t0 = time.monotonic()
    prop()
    report(target, n, time.monotonic() - t0)
    return n
