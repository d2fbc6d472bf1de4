"""`fsinspect stats FILE`: per-opcode counts, errors by errno, latency percentiles, bytes, ops/s, lints."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..analysis.inodes import group_syncfs
from ..analysis.render import fmt_ns, rate_line, submounts_json, syncfs_json
from ._recording import RECORDING_HELP, analyze_file


def register(sub: Any) -> None:
    p = sub.add_parser("stats", help="statistics of a recording",
                       description="Per-opcode counts, errors by errno, latency p50/p90/p99/max, bytes, "
                                   "ops/s over time and lint counts of a recording.")
    p.add_argument("file", metavar="FILE", help=RECORDING_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    _r, an = analyze_file(args.file, keep_exchanges=False)
    d = an.stats.as_dict()
    d["lints"] = dict(an.lints.counts.most_common())  # exact, whatever the lint log kept
    d["syncfs"] = syncfs_json(an)
    d["submounts"] = submounts_json(an)
    if args.json:
        print(json.dumps(d))
        return 0
    print(f"{d['total']} exchanges over {fmt_ns(d['duration_ns'])}; request bytes {d['bytes']['request']}, "
          f"reply bytes {d['bytes']['reply']}")
    print()
    print(f"{'opcode':<20} {'count':>7} {'errors':>7} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} "
          f"{'req bytes':>10} {'reply bytes':>11}")
    for name, o in d["ops"].items():
        lat = o["latency_ns"]
        print(f"{name:<20} {o['count']:>7} {sum(o['errors'].values()):>7} {fmt_ns(lat['p50']):>8} "
              f"{fmt_ns(lat['p90']):>8} {fmt_ns(lat['p99']):>8} {fmt_ns(lat['max']):>8} "
              f"{o['request_bytes']:>10} {o['reply_bytes']:>11}")
    if d["errors"]:
        print()
        print("errors by errno: " + ", ".join(f"{k} {v}" for k, v in d["errors"].items()))
        per_op = [f"{name} {e} {n}" for name, o in d["ops"].items() for e, n in o["errors"].items()]
        print("  by opcode: " + ", ".join(per_op))
    rates = d["ops_per_second"]
    if rates:
        print()
        print(rate_line(d["total"], d["rate"]))
        print(f"  per {fmt_ns(d['rate']['bucket_ns'])} bucket with traffic: " + " ".join(f"{int(r)}" for _, r in rates[:60])
              + (" …" if len(rates) > 60 else ""))
    if d["submounts"] or d["syncfs"]:
        print()
        for s in d["submounts"]:
            print(f"submount announced: nodeid {s['nodeid']} ({s['name']} in {s['parent']})")
        if d["syncfs"]:
            print(f"SYNCFS: {len(d['syncfs'])} calls, per superblock:")
            for g in group_syncfs(d["syncfs"]):
                print(f"  {g.line()}")
    print()
    lints = an.lints.counts
    print("lints: " + (", ".join(f"{k} {v}" for k, v in lints.most_common()) if lints else "none"))
    return 0
