"""`fsinspect diff A B`: compare two recordings of the same workload, request by request."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import UserError
from ..rerun import report
from ..rerun.align import diff_exchanges
from ..rerun.plan import PlanError, load


def register(sub: Any) -> None:
    p = sub.add_parser("diff", help="compare two recordings of one workload, reply by reply",
                       description="Align two recordings (for example the same guest workload through the "
                                   "proxy in front of two back-ends, or one back-end with two options) by "
                                   "request sequence, map B's nodeids, file handles and directory cookies onto "
                                   "A's, and compare each reply as `fsinspect rerun` does.  Exit status: 0 "
                                   "equal, 1 different, 2 error.")
    p.add_argument("a", metavar="A", help="the reference recording (.pcapng)")
    p.add_argument("b", metavar="B", help="the recording compared with it")
    p.add_argument("--strict", action="store_true", help="compare volatile fields too (ino, times, blocks)")
    p.add_argument("--format", choices=("text", "jsonl"), default="text")
    p.add_argument("--first", type=int, default=10, metavar="K", help="differences shown in full (default 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plans = []
    for path in (args.a, args.b):
        try:
            plan = load(path, allow_truncated=True, allow_snapped=True)
        except PlanError as e:
            raise UserError(str(e)) from None
        if plan.truncated:
            print(f"fsinspect diff: warning: {path}: {plan.truncated}; compared up to there", file=sys.stderr)
        if plan.sessions > 1:
            print(f"fsinspect diff: warning: {path}: {plan.sessions} FUSE sessions; the first is compared",
                  file=sys.stderr)
        plans.append(plan)
    t = diff_exchanges(plans[0].exchanges, plans[1].exchanges, strict=args.strict)
    if args.format == "jsonl":
        lines = list(report.jsonl(t))
    else:
        lines = list(report.text(t, first=args.first, header=f"A: {args.a}\nB: {args.b}"))
    print("\n".join(lines))
    return 0 if t.equal else 1
