"""Rows, field trees and hex dumps for the UI, built on dissectors.render (rich only, no textual).

Kept apart from the widgets so the same text shows in tests, the copy command and the screen.
"""

from __future__ import annotations

import datetime
import re
import time
from dataclasses import dataclass
from typing import Any

from rich.style import Style
from rich.text import Text

from dissectors import fuse as F
from dissectors.render import captured_note, payload_text, render_value, safe_name, summary
from dissectors.ring._common import LAYOUT_F_FROM_INDIRECT
from dissectors.spec import fuse as fspec
from dissectors.spec import virtio as vio
from dissectors.structs import Record, iter_fields, wire_len

from ..analysis import Exchange
from ..analysis import exchange as X
from ..analysis.render import fmt_ns

IN_HEADER = F.IN_HEADER.size  # request bodies start after fuse_in_header
OUT_HEADER = F.OUT_HEADER.size  # reply bodies after fuse_out_header
_DESC_WRITE = vio.VRING_DESC_F.by_name()["WRITE"]
_OP_READ = fspec.OPCODE_BY_NAME["READ"].value

# Column widths of the exchanges list at full size (the summary takes what is left); `widths()` narrows
# the path, result and opcode columns on small terminals before the summary drops below MIN_SUMMARY.
COLUMNS: list[tuple[str, int]] = [("", 1), ("#", 6), ("time", 15), ("q", 2), ("unique", 7), ("opcode", 13),
                                  ("nodeid → path", 26), ("summary", 0), ("result", 14), ("latency", 8)]
FIXED = sum(w + 1 for _, w in COLUMNS if w)
MIN_SUMMARY = 16
_SHRINK = (("time", 12), ("nodeid → path", 12), ("result", 8), ("opcode", 10), ("time", 9), ("unique", 0),
           ("q", 0))  # (column, narrowest); 0 hides the column

# How the time column reads (`t` cycles): tshark's -t a / -t r / -t dd.
TIME_MODES = ("relative", "absolute", "delta")
TIME_TITLES = {"relative": ("time (rel)", "t rel"), "absolute": ("time (abs)", "t abs"),
               "delta": ("time (Δ)", "t Δ")}


def number(ex: Exchange) -> int:
    """The exchange number the UI shows and `#N` / go-to names: the source's `n` (1-based, request-capture
    order, the same in every UI attached to one proxy); the local position + 1 where a source has none."""
    return ex.n or ex.index + 1


_UNIT_NS = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "µs": 1_000, "ns": 1}


def goto_target(text: str, t0: int) -> tuple[str, int]:
    """Parse what Ctrl-G was given: ("n", N) for an exchange number (`123`, `#123`), ("ts", ns) for a time:
    relative to the first record (`+1.5`, `1.5`, `250ms`) or absolute (`14:03:07.25`, local time, the first
    record's day).  Raises ValueError with a one-line reason."""
    s = text.strip().replace(" ", "")
    if re.fullmatch(r"#?\d+", s):
        return "n", int(s.lstrip("#"))
    m = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}(?:\.\d{1,9})?))?", s)
    if m:
        if not t0:
            raise ValueError("no record yet to take the day from")
        day = datetime.datetime.fromtimestamp(t0 / 1e9).replace(hour=0, minute=0, second=0, microsecond=0)
        h, mi, sec = int(m.group(1)), int(m.group(2)), float(m.group(3) or 0)
        if h > 23 or mi > 59 or sec >= 60:
            raise ValueError(f"{text.strip()} is no time of day")
        return "ts", int(day.timestamp() * 1e9) + round(((h * 60 + mi) * 60 + sec) * 1e9)
    m = re.fullmatch(r"\+?(\d+(?:\.\d*)?|\.\d+)(s|ms|us|µs|ns)?", s)
    if m:
        return "ts", t0 + round(float(m.group(1)) * _UNIT_NS[m.group(2) or "s"])
    raise ValueError(f"go to what? {text.strip()!r} is neither an exchange number (#123) nor a time "
                     "(+1.5, 250ms, 14:03:07.25)")


def time_text(ts: int, mode: str, t0: int, prev: int | None, width: int) -> str:
    """A timestamp in the list's time mode, as precise as `width` allows (µs like tshark when it fits)."""
    if not ts:
        return ""
    if mode == "absolute":
        secs, ns = divmod(ts, 1_000_000_000)
        hms = time.strftime("%H:%M:%S", time.localtime(secs))
        digits = max(0, min(6, width - 9))
        return hms + (f".{ns // 10 ** (9 - digits):0{digits}d}" if digits else "")
    ref = prev if mode == "delta" else t0
    if not ref:
        return ""
    rel = (ts - ref) / 1e9
    digits = 6
    while digits > 0 and len(f"{rel:.{digits}f}") > width:
        digits -= 1
    return f"{rel:.{digits}f}"


def widths(width: int) -> dict[str, int]:
    """Each column's width for a list `width` cells wide ("summary" included)."""
    w = {name: cw for name, cw in COLUMNS}
    spare = width - FIXED - MIN_SUMMARY
    for name, least in _SHRINK:
        if spare >= 0:
            break
        cut = min(w[name] - least, -spare)
        w[name] -= cut
        spare += cut
    w["summary"] = max(8, width - sum(cw + 1 for name, cw in w.items() if name != "summary" and cw))
    return w


S_ERR = Style(color="red", bold=True)
S_OK = Style(color="green")
S_PENDING = Style(color="yellow")
S_LINT = Style(color="magenta", bold=True)
S_SUBMOUNT = Style(color="cyan", bold=True)
S_DIM = Style(dim=True)
S_OPCODE = Style(bold=True)
S_MARK = Style(color="bright_yellow", bold=True)
S_SYNCFS = Style(color="bright_cyan", bold=True)
S_HELD = Style(color="black", bgcolor="yellow", bold=True)
S_HELD_ROW = Style(bgcolor="#3a2f00")
S_STUCK = Style(color="red", bold=True)


def _fit(s: str, w: int) -> str:
    if len(s) > w:
        return s[:max(0, w - 1)] + "…"
    return s.ljust(w)


def _rfit(s: str, w: int) -> str:
    if len(s) > w:
        return "…" + s[-(w - 1):]
    return s.ljust(w)


def result_text(ex: Exchange) -> tuple[str, Style]:
    if ex.held is not None:
        return f"HELD {'req' if ex.held == X.HELD_REQUEST else 'reply'}", S_HELD
    if ex.error:
        return ex.errname or str(ex.error), S_ERR
    if ex.replied:
        return "ok", S_OK
    if ex.expects_reply:
        return ("(no reply)" if X.NO_REPLY in ex.lints else "pending"), S_PENDING
    return "-", S_DIM


def _short_read(ex: Exchange) -> str:
    """" (short)" when the READ reply's own header carries less data than asked for (never the capture's)."""
    if ex.opcode != _OP_READ or not isinstance(ex.reply, F.Reply) or ex.request is None:
        return ""
    data, ask = ex.reply.args.get("data"), ex.request.args.get("read")
    return " (short)" if data is not None and ask is not None and wire_len(data) < ask.size else ""


def age_text(ex: Exchange, now_ns: int, mono_ns: int | None = None) -> str | None:
    """A pending request's age, ticking (`1.2s…`); `≥1.2s` when the stream ended without its reply;
    None once it is complete.  `mono_ns`: the live source's monotonic now (Exchange.age_ns)."""
    age = ex.age_ns(now_ns, mono_ns) if now_ns else None
    if age is None:
        return None
    return "≥" + fmt_age(age) if X.NO_REPLY in ex.lints else fmt_age(age) + "…"


def fmt_age(ns: int) -> str:
    """An age in at most 6 cells: 850ms, 2.5s, 42s, 3m05s, 2h10m."""
    ms = ns // 1_000_000
    if ms < 1000:
        return f"{ms}ms"
    s = ns / 1e9
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    m = int(s // 60)
    return f"{m}m{int(s % 60):02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def row_key(ex: Exchange, now_ns: int, mono_ns: int | None = None) -> tuple[Any, ...]:
    """What a row's rendering depends on beyond its position: its state, lints and (while open) its age."""
    return (ex.replied, len(ex.lints), ex.held, age_text(ex, now_ns, mono_ns))


def row_text(ex: Exchange, path: str, width: int, t0: int, marked: bool, *, mode: str = "relative",
             prev_ts: int | None = None, now_ns: int = 0, mono_ns: int | None = None) -> Text:
    """One row of the exchanges list, exactly `width` cells wide.  `t0` is the first record's time
    (tshark's reference for relative times), `prev_ts` the previous row's (for delta).  A pending request
    shows its age at `now_ns` (`mono_ns`) in the latency column; a held one is highlighted."""
    w = widths(width)
    sw = w["summary"]
    t = Text(no_wrap=True, overflow="crop", end="")
    t.append("●" if marked else " ", S_MARK)
    t.append(str(number(ex))[-w["#"]:].rjust(w["#"]) + " ", S_DIM)
    t.append(_fit(time_text(ex.ts_ns, mode, t0, prev_ts, w["time"]), w["time"]) + " ", S_DIM)
    if w["q"]:
        t.append(_fit(str(ex.queue), w["q"]) + " ")
    if w["unique"]:
        t.append(_fit(str(ex.unique), w["unique"]) + " ", S_DIM)
    op = ex.opname
    t.append(_fit(op, w["opcode"]) + " ", S_SYNCFS if op == "SYNCFS" else S_OPCODE)
    node = "" if ex.opcode < 0 else f"{ex.nodeid} {path}".rstrip()
    t.append(_rfit(node, w["nodeid → path"]) + " ", S_SUBMOUNT if ex.submount else Style())
    summ = summary(ex.request) if ex.request is not None else ""
    if ex.reply is not None and not ex.error and not isinstance(ex.reply, F.Reply):
        summ = summary(ex.reply)
    elif ex.reply is not None and not ex.error:
        rs = summary(ex.reply) + _short_read(ex)
        if rs:
            summ = f"{summ} → {rs}" if summ else rs
    if ex.lints:
        lint = "[" + ",".join(ex.lints) + "] "
        t.append(_fit(lint, min(len(lint), sw)), S_LINT)
        summ_w = max(0, sw - min(len(lint), sw))
    else:
        summ_w = sw
    if summ_w:
        t.append(_fit(summ, summ_w))
    t.append(" ")
    res, style = result_text(ex)
    t.append(_fit(res, w["result"]) + " ", style)
    age = age_text(ex, now_ns, mono_ns)
    if age is not None:
        t.append(_fit(age, 8), S_STUCK if X.STUCK in ex.lints else S_PENDING)
    else:
        t.append(_fit(fmt_ns(ex.latency_ns), 8), S_DIM)
    t.truncate(width, pad=True)
    if ex.held is not None:
        t.stylize_before(S_HELD_ROW)  # under the cells' own styles: the HELD badge keeps its colours
    return t


def header_text(width: int, mode: str = "relative") -> Text:
    t = Text(no_wrap=True, overflow="crop", end="")
    for name, cw in widths(width).items():
        if not cw:
            continue
        title = name
        if name == "time":
            long, short = TIME_TITLES[mode]
            title = long if len(long) <= cw else short
        title = title.rjust(cw) if name == "#" else title
        t.append(_fit(title, cw) + " ", Style(bold=True, underline=True))
    t.truncate(width, pad=True)
    return t


def exchange_text(ex: Exchange, path: str = "", t0: int = 0) -> str:
    """The plain-text copy of an exchange: a headline and both decoded trees."""
    from dissectors.render import message_lines

    res, _ = result_text(ex)
    lines = [f"exchange #{number(ex)}: {ex.opname} unique={ex.unique} queue={ex.queue} head={ex.head} "
             f"nodeid={ex.nodeid} {path}".rstrip(),
             f"result {res}, latency {fmt_ns(ex.latency_ns)}"
             + (f", lints: {', '.join(ex.lints)}" if ex.lints else "") + (", submount" if ex.submount else "")]
    for n in ex.notes:
        lines.append(f"note: {n}")
    if ex.decode_error:
        lines.append(f"decode error: {ex.decode_error}")
    for m in (ex.request, ex.reply):
        if m is not None:
            lines.extend(message_lines(m))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class FieldLine:
    """One line of the decoded tree; `offset`/`size` locate its bytes in the message, when known.

    `filter` is the filter expression that keeps exchanges with this field's value (apply as filter).
    """

    text: str
    offset: int | None = None
    size: int = 0
    depth: int = 0
    filter: str | None = None


_NAME_ARGS = ("name", "newname", "target")


def _quoted(name: bytes) -> str | None:
    """A name as a filter string, when the language can say it (no quote, backslash or control byte)."""
    s = name.decode("utf-8", "replace")
    return f'"{s}"' if s.isprintable() and '"' not in s and "\\" not in s else None


def _header_filter(msg: F.Message, field: str, v: Any) -> str | None:
    if not isinstance(v, int):
        return None
    if field == "opcode" and isinstance(msg, F.Request):
        return f"op == {msg.op.name}"
    if field == "error":
        return f"error == {fspec.ERRNO.name_of(-v) or -v}" if v else "error == 0"
    if field in ("unique", "nodeid"):
        return f"{field} == {v}"
    if field == "len":
        return f"len == {v}" if isinstance(msg, F.Request) else f"reply_len == {v}"
    return f"header.{field} == {v}" if isinstance(msg, F.Request) else None


def _record_fields(rec: Record, base: int, depth: int, prefix: str = "", key: str | None = None,
                   msg: F.Message | None = None) -> list[FieldLine]:
    """The leaf fields of a struct; `key` is its argument name (filters say `key.path`), `msg` is given
    for the header (its fields filter as the list's columns)."""
    out = []
    for path, f, v, off, size in iter_fields(rec, base, prefix):
        if path.rsplit(".", 1)[-1].startswith("padding") and not v:
            continue
        flt = (_header_filter(msg, path, v) if msg is not None
               else f"{key}.{path} == {v}" if key is not None and isinstance(v, int) else None)
        out.append(FieldLine(f"{path} = {render_value(f, v)}", off, size, depth, flt))
    return out


def field_lines(msg: F.Message) -> list[FieldLine]:
    """Header and argument fields with their byte ranges (struct parts and names are laid out in order)."""
    out: list[FieldLine] = []
    cut = captured_note(msg)
    cut = f" ({cut})" if cut else ""
    if isinstance(msg, F.Request):
        out.append(FieldLine(f"request {msg.op.name} ({msg.op.value}) len={msg.raw_len}{cut}",
                             filter=f"op == {msg.op.name}"))
        base = IN_HEADER
        out.append(FieldLine(f"{msg.header._codec.name}", 0, base, 1))
    elif isinstance(msg, F.Notification):
        out.append(FieldLine(f"notification {msg.notify.name} len={msg.raw_len}{cut}"))
        base = OUT_HEADER
        out.append(FieldLine(f"{msg.header._codec.name}", 0, base, 1))
    else:
        assert isinstance(msg, F.Reply)
        err = f" error={msg.errname}" if msg.error else ""
        out.append(FieldLine(f"reply to {msg.op.name}{err} len={msg.raw_len}{cut}", filter=f"op == {msg.op.name}"))
        base = OUT_HEADER
        out.append(FieldLine(f"{msg.header._codec.name}", 0, base, 1))
    out.extend(_record_fields(msg.header, 0, 2, msg=msg))
    off: int | None = base
    for key, v in msg.args.items():
        if isinstance(v, Record):
            size = v._codec.size
            out.append(FieldLine(f"{key}: {v._codec.name}", off, size, 1))
            if off is not None:
                out.extend(_record_fields(v, off, 2, "", key))
                off += size
            else:
                out.extend(FieldLine(f"{p} = {render_value(f, x)}", None, 0, 2,
                                     f"{key}.{p} == {x}" if isinstance(x, int) else None)
                           for p, f, x, _, _ in iter_fields(v))
        elif isinstance(v, bytes):
            shown = payload_text(v) if key in ("data", "value") or len(v) > 256 else f'"{safe_name(v)}"'
            nul = 0 if key in ("data", "value") else 1
            q = _quoted(v) if key in _NAME_ARGS else None
            by = "name" if isinstance(msg, F.Request) else key  # a request's names are all `name`
            out.append(FieldLine(f"{key} = {shown}", off, len(v) + nul, 1, f"{by} == {q}" if q else None))
            if off is not None:
                off += len(v) + nul
        elif isinstance(v, list):
            out.append(FieldLine(f"{key}: {len(v)} item(s)", None, 0, 1))
            for i, item in enumerate(v[:64]):
                if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], bytes):
                    q = _quoted(item[1])
                    out.append(FieldLine(f'[{i}] "{safe_name(item[1])}"', None, 0, 2, f"name == {q}" if q else None))
                    rec = item[0]
                    if isinstance(rec, Record):
                        out.extend(FieldLine(f"{p} = {render_value(f, x)}", None, 0, 3)
                                   for p, f, x, _, _ in iter_fields(rec))
                elif isinstance(item, Record):
                    out.append(FieldLine(f"[{i}] {item._codec.name}", None, 0, 2))
                    out.extend(FieldLine(f"{p} = {render_value(f, x)}", None, 0, 3) for p, f, x, _, _ in iter_fields(item))
                else:
                    out.append(FieldLine(f"[{i}] {item!r}", None, 0, 2))
            if len(v) > 64:
                out.append(FieldLine(f"… {len(v) - 64} more", None, 0, 2))
            off = None
        elif v is None:
            out.append(FieldLine(f"{key}: (absent)", None, 0, 1))
        else:
            out.append(FieldLine(f"{key} = {v!r}", None, 0, 1))
            off = None
    if isinstance(msg, F.Request):
        for eh, v in msg.ext:
            out.append(FieldLine(f"extension {fspec.EXT_TYPE.render(eh.type)} size={eh.size}: "
                                 f"{v if isinstance(v, list) else v.hex()}", None, 0, 1))
    return out


def hexdump(data: bytes, hl: tuple[int, int] | None = None, *, orig_len: int | None = None,
            per_line: int = 16) -> Text:
    """`per_line` (16 or 8) bytes a line with ASCII; bytes in [hl) reversed (the selected field)."""
    t = Text(no_wrap=True, end="")
    lo, hi = hl if hl is not None else (-1, -1)
    on = Style(reverse=True, bold=True, color="bright_yellow")
    for row in range(0, max(len(data), 1), per_line):
        chunk = data[row:row + per_line]
        t.append(f"{row:04x}  ", S_DIM)
        for i in range(per_line):
            pos = row + i
            if i < len(chunk):
                t.append(f"{chunk[i]:02x}", on if lo <= pos < hi else Style())
            else:
                t.append("  ")
            t.append(" " if i != 7 else "  ")
        t.append(" ")
        for i, b in enumerate(chunk):
            ch = chr(b) if 32 <= b < 127 else "."
            t.append(ch, on if lo <= row + i < hi else S_DIM)
        t.append("\n")
    if orig_len is not None and orig_len > len(data):
        t.append(f"… {orig_len - len(data)} more bytes not captured (snap length)\n", S_DIM)
    return t


def layout_text(layout: list[tuple[int, int]] | None) -> str:
    """The descriptor chain as recorded: one line per vring_desc with its length and flags."""
    if not layout:
        return "descriptor layout: not recorded"
    parts = []
    for i, (ln, fl) in enumerate(layout):
        sub = " (in the indirect table)" if fl & LAYOUT_F_FROM_INDIRECT else ""
        fl &= ~LAYOUT_F_FROM_INDIRECT
        kind = "device-writable" if fl & _DESC_WRITE else "device-readable"
        parts.append(f"  desc[{i}] len={ln} {kind} flags={vio.VRING_DESC_F.render(fl) if fl else '0'}{sub}")
    return "descriptor chain:\n" + "\n".join(parts)


_EVENT_FLAGS = {"features-acked": "VIRTIO_F", "features": "VIRTIO_F", "protocol-features-acked": "PROTOCOL_F",
                "protocol-features": "PROTOCOL_F"}
_ADDR_KEYS = frozenset({"desc", "avail", "used", "log", "guest_address", "user_address", "mmap_offset", "size"})


def _event_value(kind: str, key: str, v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "-"
    if isinstance(v, int):
        if kind in _EVENT_FLAGS and key in ("value", "offered", "masked"):
            return f"{v:#x} ({flags_text(_event_flagset(kind), v)})" if v else "0"
        return f"{v:#x}" if key in _ADDR_KEYS else str(v)
    if isinstance(v, dict):
        return "{" + " ".join(f"{k}={_event_value(kind, k, x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_event_value(kind, key, x) for x in v) + "]"
    return str(v)


def _event_flagset(kind: str) -> Any:
    from dissectors.spec import vhost_user as vspec

    return vio.VIRTIO_F if _EVENT_FLAGS[kind] == "VIRTIO_F" else vspec.PROTOCOL_F


def event_text(e: dict[str, Any]) -> str:
    """A control-plane event as a person reads it: `vring-num: index=1 num=1024`, flags named, addresses hex."""
    kind = str(e.get("kind", "?"))
    d = e.get("detail")
    if isinstance(d, dict):
        body = " ".join(f"{k}={_event_value(kind, k, v)}" for k, v in d.items())
    else:
        body = "" if d is None else str(d)
    return f"{kind}: {body}" if body else kind


def flags_text(fs: Any, v: int) -> str:
    """A flag set's names joined so that a wrapping line breaks between names, never inside one."""
    return fs.render(v).replace("|", " | ")


def features_text(f: dict[str, Any]) -> list[str]:
    """Offered / acked / masked virtio and vhost-user protocol features, named."""
    from dissectors.spec import vhost_user as vspec

    out = []
    for label, key, fs in (("virtio features offered", "features_offered", vio.VIRTIO_F),
                           ("virtio features acked", "features_acked", vio.VIRTIO_F),
                           ("virtio features masked by the proxy", "features_masked", vio.VIRTIO_F),
                           ("protocol features offered", "protocol_offered", vspec.PROTOCOL_F),
                           ("protocol features acked", "protocol_acked", vspec.PROTOCOL_F),
                           ("protocol features masked by the proxy", "protocol_masked", vspec.PROTOCOL_F)):
        v = f.get(key)
        out.append(f"{label}: " + ("unknown" if v is None else (f"0x{v:x} " + (flags_text(fs, v) if v else "none"))))
    return out
