"""Exchanges as JSON-ready dicts and one-line text, built on dissectors.render (no I/O)."""

from __future__ import annotations

from typing import Any

from dissectors import fuse as F
from dissectors.render import message_json, summary

from .exchange import Exchange


def exchange_json(ex: Exchange, *, raw: bool = False, now_ns: int | None = None) -> dict[str, Any]:
    """One exchange: number, state, opcode name, unique, nodeid, queue, decoded request and reply, errno
    name, latency; `age_ms` (at `now_ns`) while it is pending or held.

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
    age = ex.age_ns(now_ns) if now_ns is not None else None
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
    return d


def inflight_json(pending: list[Exchange], now_ns: int) -> dict[str, list[dict[str, Any]]]:
    """The snapshot's `pending` (every open exchange, oldest first) and `held` (those a breakpoint holds)."""
    rows = [exchange_json(ex, raw=True, now_ns=now_ns) for ex in pending]
    return {"pending": rows, "held": [r for r in rows if r["state"] == "held"]}


def _fmt_ns(ns: int | None) -> str:
    if ns is None:
        return "-"
    if ns < 10_000:
        return f"{ns}ns"
    if ns < 10_000_000:
        return f"{ns / 1000:.0f}µs"
    if ns < 10_000_000_000:
        return f"{ns / 1_000_000:.1f}ms"
    return f"{ns / 1e9:.2f}s"


fmt_ns = _fmt_ns


def exchange_line(ex: Exchange, t0: int = 0) -> str:
    """`#12 +0.004512 q0 LOOKUP u=8 n=1 name="x" -> ENOENT 52µs [lint]`."""
    t = (ex.ts_ns - t0) / 1e9 if t0 else ex.ts_ns / 1e9
    req = summary(ex.request) if ex.request is not None else ""
    if not ex.replied:
        out = "(no reply)" if ex.expects_reply else ""
    elif ex.error:
        out = f"-> {ex.errname}"
    elif isinstance(ex.reply, F.Reply | F.Notification):
        out = "-> " + (summary(ex.reply) or "ok")
    else:
        out = "-> ?"
    nodeid = f" n={ex.nodeid}" if ex.opcode >= 0 else ""
    parts = [f"#{ex.index}", f"+{t:.6f}", f"q{ex.queue}", ex.opname, f"u={ex.unique}{nodeid}"]
    if req:
        parts.append(req)
    if out:
        parts.append(out)
    if ex.latency_ns is not None:
        parts.append(_fmt_ns(ex.latency_ns))
    if ex.lints:
        parts.append("[" + ",".join(ex.lints) + "]")
    if ex.decode_error:
        parts.append(f"<{ex.decode_error}>")
    return " ".join(parts)
