"""`fsinspect info FILE`: the section header, the interfaces, the negotiated INIT and record counts."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from dissectors.spec import fuse as spec

from ..analysis import Analyzer
from ..analysis.render import wrap_items
from ..errors import UserError
from ..recording.reader import RecordingError
from ..recording.replay import feed_records, prime_from_header
from ._recording import RECORDING_HELP, open_recording


def register(sub: Any) -> None:
    p = sub.add_parser("info", help="header, interfaces, INIT and counts of a recording",
                       description="Show what a recording's header says (tool, format version, host, kernel, "
                                   "backend, comments), its interfaces, the negotiated FUSE_INIT and counts.")
    p.add_argument("file", metavar="FILE", help=RECORDING_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _init_json(an: Analyzer) -> list[dict[str, Any]]:
    out = []
    for epoch, (req, rep) in sorted(an.init.items()):
        i = req.args["init"]
        d: dict[str, Any] = {"epoch": epoch, "kernel": f"{i.major}.{i.minor}",
                             "kernel_flags": spec.INIT_FLAGS.names(i.flags | (i.flags2 << 32))}
        if rep is not None and not rep.error:
            o = rep.args["init_out"]
            d.update({"server": f"{o.major}.{o.minor}",
                      "negotiated_flags": spec.INIT_FLAGS.names(an.contexts[epoch].flags),
                      "max_write": o.max_write, "max_readahead": o.max_readahead, "max_pages": o.max_pages,
                      "max_background": o.max_background, "time_gran": o.time_gran})
        elif rep is not None:
            d["error"] = rep.errname
        out.append(d)
    return out


def run(args: argparse.Namespace) -> int:
    r = open_recording(args.file)
    per_iface: Counter[str] = Counter()  # by name: each part of a rotated recording declares its own
    kinds: Counter[str] = Counter()

    def counted() -> Any:
        for rec in r.records():
            ifaces = r.sections[-1].interfaces
            per_iface[ifaces[rec.iface].name if rec.iface < len(ifaces) else str(rec.iface)] += 1
            if rec.is_fuse:
                kinds["requests" if rec.inbound else "replies"] += 1
            else:
                kinds["control"] += 1
            if rec.snapped:
                kinds["snapped"] += 1
            yield rec

    an = Analyzer(keep_exchanges=False)
    prime_from_header(an, r)
    try:
        feed_records(an, counted())
    except RecordingError as e:
        raise UserError(str(e)) from None
    finally:
        r.close()
    an.finish()
    sec = r.section
    ifaces: dict[str, Any] = {}
    for s in r.sections:
        for i in s.interfaces:
            ifaces.setdefault(i.name, i)
    d: dict[str, Any] = {
        "file": args.file, "size": r.size, "parts": [str(p) for p in r.parts], "format": sec.format_version,
        "tool": sec.meta.get("tool") or sec.userappl, "host": sec.meta.get("host") or sec.hardware,
        "kernel": sec.meta.get("kernel") or sec.os, "backend": sec.meta.get("backend", ""),
        "source": sec.meta.get("source", ""), "snaplen": sec.meta.get("snaplen"), "part": sec.meta.get("part", 0),
        "comments": sec.comments,
        "interfaces": [{"index": i.index, "name": i.name, "kind": i.kind, "queue": i.queue,
                        "description": i.description, "records": per_iface[i.name]} for i in ifaces.values()],
        "init": _init_json(an),
        "counts": {"records": sum(per_iface.values()), "requests": kinds["requests"], "replies": kinds["replies"],
                   "control": kinds["control"], "snapped": kinds["snapped"], "exchanges": an.count,
                   "lints": an.lints.total},
        "truncated": r.truncated,
    }
    if args.json:
        print(json.dumps(d))
        return 0
    parts = f" in {len(r.parts)} parts ({r.parts[0].name} … {r.parts[-1].name})" if len(r.parts) > 1 else ""
    print(f"{d['file']}: {d['size']} bytes{parts}, fsinspect recording format {d['format']}")
    print(f"  written by {d['tool']} on {d['host']} ({d['kernel']})")
    print(f"  source {d['source']}, backend {d['backend'] or '-'}, snaplen {d['snaplen']}"
          f"{', part ' + str(d['part']) if d['part'] else ''}")
    for c in d["comments"]:
        print(f"  comment: {c}")
    print("interfaces:")
    for i in d["interfaces"]:
        print(f"  {i['index']}: {i['name']:<12} {i['kind']:<11} queue {i['queue']}  {i['records']} records"
              f"  ({i['description']})")
    if d["init"]:
        print("INIT:")
        for i in d["init"]:
            print(f"  epoch {i['epoch']}: kernel {i['kernel']}, server {i.get('server', '?')}"
                  + (f", max_write {i['max_write']}, max_pages {i['max_pages']}" if "max_write" in i else "")
                  + (f", error {i['error']}" if "error" in i else ""))
            if "negotiated_flags" in i:  # a long list wraps between names, never inside one
                head = "    negotiated: "
                flags = wrap_items(i["negotiated_flags"] or ["0"], width=100, indent=" " * len(head), sep="|")
                flags[0] = head + flags[0].lstrip()
                print("\n".join(flags))
    else:
        print("INIT: not in this recording")
    c = d["counts"]
    print(f"counts: {c['records']} records ({c['requests']} requests, {c['replies']} replies, "
          f"{c['control']} vhost-user, {c['snapped']} snapped), {c['exchanges']} exchanges, {c['lints']} lints")
    if d["truncated"]:
        print(f"warning: {d['truncated']}; read up to there")
    return 0
