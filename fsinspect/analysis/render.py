"""Exchanges as JSON-ready dicts and one-line text, built on dissectors.render (no I/O)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dissectors import fuse as F
from dissectors.render import message_json, safe_name, summary

from .exchange import HELD_REPLY, HELD_REQUEST, Exchange

if TYPE_CHECKING:
    from .analyzer import Analyzer


def exchange_json(ex: Exchange, *, raw: bool = False, now_ns: int | None = None,
                  mono_ns: int | None = None) -> dict[str, Any]:
    """One exchange: number, state, opcode name, unique, nodeid, queue, decoded request and reply, errno
    name, latency; `age_ms` (at `now_ns`, or on CLOCK_MONOTONIC at `mono_ns` for a live capture) while it
    is pending or held.

    With `raw`, the captured bytes (hex) and original lengths come along whenever the exchange kept them
    (`Analyzer(keep_raw=True)`): a live UI re-analyses them for its hex dump and inode map.
    """
    req = message_json(ex.request) if ex.request is not None else None
    rep = message_json(ex.reply) if ex.reply is not None else None
    d: dict[str, Any] = {
        "n": ex.n,
        "state": ex.state,
        "index": ex.index,
        "opcode": ex.opname,
        "unique": ex.unique,
        "nodeid": ex.nodeid if ex.opcode >= 0 else None,
        "queue": ex.queue,
        "head": ex.head,
        "epoch": ex.epoch,
        "ts_ns": ex.ts_ns,
        "request": req,
        "reply": rep,
        "error": ex.errname,
        "latency_ns": ex.latency_ns,
        "lints": list(ex.lints),
    }
    if ex.held is not None:
        d["held"] = ex.held
    age = ex.age_ns(now_ns, mono_ns) if now_ns is not None else None
    if age is not None:
        d["age_ms"] = round(age / 1e6, 1)
    if ex.submount:
        d["submount"] = True
    if ex.snapped:
        d["snapped"] = True
    if ex.notes:
        d["notes"] = list(ex.notes)
    if ex.decode_error:
        d["decode_error"] = ex.decode_error
    if ex.decode_error or raw:
        d["request_raw"] = ex.req_raw.hex() if ex.req_raw is not None else None
        d["reply_raw"] = ex.reply_raw.hex() if ex.reply_raw is not None else None
    if raw:
        d["request_len"] = ex.req_len
        d["reply_len"] = ex.reply_len if ex.replied else None
        d["reply_ts_ns"] = ex.reply_ts
        for key, layout in (("request_layout", ex.req_layout), ("reply_layout", ex.reply_layout)):
            if isinstance(layout, (tuple, list)) and layout:  # the chain as captured: [len, flags] per descriptor
                d[key] = [list(desc) for desc in layout]
    return d


def inflight_json(pending: list[Exchange], now_ns: int, mono_ns: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """The snapshot's `pending` (every open exchange, oldest first) and `held` (those a breakpoint holds)."""
    rows = [exchange_json(ex, raw=True, now_ns=now_ns, mono_ns=mono_ns) for ex in pending]
    return {"pending": rows, "held": [r for r in rows if r["state"] == "held"]}


# -- the analysis state as JSON: one serialisation for the live snapshot, the summaries and `stats` ------
# The proxy, the daemon's live source, `fsinspect stats --json` and the recording's cached analysis all use
# these, so a client sees the same shape whatever it is attached to.


def inodes_json(an: Analyzer) -> list[dict[str, Any]]:
    return [{"nodeid": n.nodeid, "parent": n.parent, "name": safe_name(n.name) if n.name else None,
             "ino": n.ino, "generation": n.generation, "nlookup": n.nlookup, "attr_flags": n.attr_flags,
             "submount": n.submount} for n in an.inodes.nodes.values()]


def lints_json(an: Analyzer) -> list[dict[str, Any]]:
    """The kept lints, then one line per kind past its cap: how many more were counted, not kept."""
    return [{"kind": lint.name, "message": lint.message} for lint in an.lints] + \
        [{"kind": kind, "message": f"{n} more not kept (the {an.lints.per_kind} most recent are)", "not_kept": n}
         for kind, n in an.lints.not_kept()]


def submounts_json(an: Analyzer) -> list[dict[str, Any]]:
    """Announced submounts; names escaped by safe_name (a control byte in a name cannot fake a line)."""
    return [{"nodeid": a.nodeid, "parent": a.parent, "name": safe_name(a.name), "ino": a.ino}
            for a in an.submounts.announced.values()]


def syncfs_json(an: Analyzer) -> list[dict[str, Any]]:
    """Every SYNCFS with the path of its nodeid (group_syncfs groups them per superblock)."""
    return [{"nodeid": r.nodeid, "path": r.path, "latency_ns": r.latency_ns, "superblock_root": r.is_root,
             "error": r.error} for r in an.submounts.syncfs]


def snapshot_json(an: Analyzer, now_ns: int, mono_ns: int | None = None) -> dict[str, Any]:
    """What every source's control socket sends a client first (the source adds its own keys); ages on
    CLOCK_MONOTONIC at `mono_ns` (a live source's)."""
    return {**inflight_json(an.pending, now_ns, mono_ns), "inodes": inodes_json(an), "stats": an.stats.as_dict(),
            "lints": lints_json(an), "submounts": submounts_json(an), "syncfs": syncfs_json(an)}


def exchanges_summary(an: Analyzer, requests: int, replies: int, opcodes: dict[str, int]) -> dict[str, Any]:
    """The source-agnostic part of an end-of-run summary (the proxy's and the daemon's)."""
    return {"requests": requests, "replies": replies, "opcodes": opcodes,
            "latency": {name: o.latency() for name, o in an.stats.ops.items() if o.replied},
            "errors": dict(an.stats.errors.most_common()), "lints": lints_json(an),
            "submounts": submounts_json(an), "syncfs": syncfs_json(an)}


_UNITS = ((1_000_000_000, "s"), (1_000_000, "ms"), (1_000, "µs"))


def fmt_ns(ns: int | float | None) -> str:
    """The one duration format: ns, µs, ms or s chosen by magnitude, three significant digits.

    `52µs`, `3.98ms`, `17.1ms`, `1.25s`, `870ns`; "-" for none.
    """
    if ns is None:
        return "-"
    for scale, unit in _UNITS:
        if abs(ns) >= scale * 0.9995:  # what would round up to 1000 of the smaller unit
            v = ns / scale
            a = abs(v)
            return (f"{v:.2f}" if a < 9.995 else f"{v:.1f}" if a < 99.95 else f"{v:.0f}") + unit
    return f"{ns:.0f}ns"


def rate_line(total: int, rate: dict[str, Any]) -> str:
    """ops/s with its time base: `ops/s: mean 123.8 over the recording's 590ms span; peak 73 in a 1.00s bucket`."""
    mean = rate.get("mean_ops_per_s")
    span = rate.get("span_ns") or 0
    bucket = rate.get("bucket_ns") or 1_000_000_000
    head = (f"ops/s: mean {mean:.1f} ({total} exchanges over the recording's {fmt_ns(span)} span)" if mean
            else f"ops/s: {total} exchanges at one instant (no span to average over)")
    per_s = rate.get("peak_ops_per_s", 0)
    peak = f"; peak {rate.get('peak_ops_per_bucket', 0)} exchanges in one {fmt_ns(bucket)} bucket"
    if bucket != 1_000_000_000:
        peak += f" ({per_s:.0f}/s)"
    if span < bucket:
        peak += " (the recording is shorter than a bucket)"
    return head + peak


def opcode_counts(counts: dict[str, int]) -> list[str]:
    """`LOOKUP 1234` for every opcode that occurred, most frequent first."""
    return [f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def wrap_items(items: list[str], width: int = 100, indent: str = "  ", sep: str = ", ") -> list[str]:
    """Lines of `items` joined by `sep`, broken between items, never inside one."""
    lines: list[str] = []
    cur = ""
    for it in items:
        if cur and len(indent) + len(cur) + len(sep) + len(it) > width:
            lines.append(indent + cur + sep.rstrip())
            cur = it
        else:
            cur = f"{cur}{sep}{it}" if cur else it
    if cur:
        lines.append(indent + cur)
    return lines


def exchange_line(ex: Exchange, t0: int = 0) -> str:
    """`#12 +0.004512 q0 LOOKUP u=8 n=1 name="x" -> ENOENT 52µs [lint]`."""
    t = (ex.ts_ns - t0) / 1e9 if t0 else ex.ts_ns / 1e9
    req = summary(ex.request) if ex.request is not None else ""
    if ex.held == HELD_REQUEST:
        out = "(held)"
    elif not ex.replied and ex.held is None:
        out = "(no reply)" if ex.expects_reply else ""
    elif ex.error:
        out = f"-> {ex.errname}"
    elif isinstance(ex.reply, F.Reply | F.Notification):
        out = "-> " + (summary(ex.reply) or "ok")
    else:
        out = "-> ?"
    nodeid = f" n={ex.nodeid}" if ex.opcode >= 0 else ""
    parts = [f"#{ex.n}", f"+{t:.6f}", f"q{ex.queue}", ex.opname, f"u={ex.unique}{nodeid}"]
    if req:
        parts.append(req)
    if out:
        parts.append(out)
    if ex.held == HELD_REPLY:
        parts.append("(reply held)")
    if ex.latency_ns is not None:
        parts.append(fmt_ns(ex.latency_ns))
    if ex.lints:
        parts.append("[" + ",".join(ex.lints) + "]")
    if ex.decode_error:
        parts.append(f"<{ex.decode_error}>")
    return " ".join(parts)
