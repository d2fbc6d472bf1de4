"""`fsinspect stats FILE`: per-opcode counts, errors by errno, latency percentiles, bytes, ops/s, lints."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from ..analysis.render import fmt_ns
from ._recording import analyze_file


def register(sub: Any) -> None:
    p = sub.add_parser("stats", help="statistics of a recording",
                       description="Per-opcode counts, errors by errno, latency p50/p90/p99/max, bytes, "
                                   "ops/s over time and lint counts of a recording.")
    p.add_argument("file", metavar="FILE", help="an fsinspect recording (.pcapng)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    _r, an = analyze_file(args.file, keep_exchanges=False)
    d = an.stats.as_dict()
    lints = Counter(lint.name for lint in an.lints)
    d["lints"] = dict(lints.most_common())
    d["syncfs"] = [{"nodeid": s.nodeid, "latency_ns": s.latency_ns, "superblock_root": s.is_root,
                    "error": s.error} for s in an.submounts.syncfs]
    d["submounts"] = [{"nodeid": a.nodeid, "parent": a.parent, "name": a.name.decode("utf-8", "backslashreplace")}
                      for a in an.submounts.announced.values()]
    if args.json:
        print(json.dumps(d))
        return 0
    dur = d["duration_ns"] / 1e9
    print(f"{d['total']} exchanges over {dur:.3f} s; request bytes {d['bytes']['request']}, "
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
        peak = max(r for _, r in rates)
        mean = d["total"] / max(dur, 1e-9) if dur else float(d["total"])
        print()
        print(f"ops/s: mean {mean:.1f}, peak {peak:.0f} (per second: "
              + " ".join(f"{int(r)}" for _, r in rates[:60]) + (" …" if len(rates) > 60 else "") + ")")
    if d["submounts"] or d["syncfs"]:
        print()
        for s in d["submounts"]:
            print(f"submount announced: nodeid {s['nodeid']} ({s['name']} in {s['parent']})")
        for s in d["syncfs"]:
            print(f"SYNCFS nodeid {s['nodeid']}: {fmt_ns(s['latency_ns'])}"
                  f"{'' if s['superblock_root'] else ' (not a superblock root)'}")
    print()
    print("lints: " + (", ".join(f"{k} {v}" for k, v in lints.most_common()) if lints else "none"))
    return 0
