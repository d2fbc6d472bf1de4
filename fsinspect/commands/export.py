"""`fsinspect export FILE --format text|json|jsonl [--filter EXPR]`: one exchange per line or object."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..analysis import Analyzer, FilterError, compile_filter
from ..analysis.render import exchange_json, exchange_line
from ..errors import UserError
from ..recording.reader import RecordingError
from ..recording.replay import analyze
from ._recording import RECORDING_HELP, open_recording


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="export a recording's exchanges as text, JSON or JSON lines",
                       description="Pair a recording's requests and replies into exchanges and print them. "
                                   "JSONL: one exchange per line with opcode, unique, nodeid, queue, request, "
                                   "reply, error (errno name) and latency_ns.")
    p.add_argument("file", metavar="FILE", help=RECORDING_HELP)
    p.add_argument("--format", choices=("text", "json", "jsonl"), default="text")
    p.add_argument("--filter", metavar="EXPR", help='e.g. \'op == LOOKUP and error == ENOENT\', \'latency > 1ms\'')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pred = None
    if args.filter is not None:
        try:
            pred = compile_filter(args.filter)
        except FilterError as e:
            raise UserError(f"--filter: {e}") from None
    r = open_recording(args.file)
    try:
        an = analyze(r, Analyzer())
    except RecordingError as e:
        raise UserError(str(e)) from None
    finally:
        r.close()
    if r.truncated:
        print(f"fsinspect export: warning: {args.file}: {r.truncated}; read up to there", file=sys.stderr)
    exchanges = [x for x in an.exchanges if pred is None or pred(x)]
    out = sys.stdout
    if args.format == "jsonl":
        for x in exchanges:
            out.write(json.dumps(exchange_json(x, now_ns=an.last_ts)) + "\n")
    elif args.format == "json":
        json.dump([exchange_json(x, now_ns=an.last_ts) for x in exchanges], out, indent=1)
        out.write("\n")
    else:
        t0 = min((x.ts_ns for x in an.exchanges if x.ts_ns), default=0)
        for x in exchanges:
            out.write(exchange_line(x, t0) + "\n")
        lints = [lint for lint in an.lints if pred is None or pred(an.exchanges[lint.exchange])]
        if lints:
            out.write(f"\n{len(lints)} lint(s):\n")
            for lint in lints:
                out.write(f"  #{lint.exchange} {lint.name}: {lint.message}\n")
    return 0
