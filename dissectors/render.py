"""Human and JSON rendering of decoded messages, driven by the spec's flag sets and enums."""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from typing import Any

from .spec import fuse as spec
from .spec.types import Field, Registry
from .structs import Record, Snapped, pyname, wire_len


def safe_name(raw: bytes) -> str:
    """A file name as text: UTF-8 kept, control and undecodable bytes escaped as \\xNN."""
    s = raw.decode("utf-8", "backslashreplace")
    if s.isprintable() and '"' not in s:
        return s
    out = []
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch.isprintable() or ch == "\\":
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
    return "".join(out)


def fmt_mode(v: int) -> str:
    ftype = stat.S_IFMT(v)
    names = {stat.S_IFDIR: "S_IFDIR", stat.S_IFREG: "S_IFREG", stat.S_IFLNK: "S_IFLNK",
             stat.S_IFCHR: "S_IFCHR", stat.S_IFBLK: "S_IFBLK", stat.S_IFIFO: "S_IFIFO",
             stat.S_IFSOCK: "S_IFSOCK"}
    perms = f"0{stat.S_IMODE(v):o}"
    if ftype:
        return f"{names.get(ftype, hex(ftype))}|{perms}"
    return perms


def fmt_oflags(v: int) -> str:
    acc = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR"}.get(v & 3, "O_ACCMODE")
    rest = spec.OPEN_FLAGS.render(v & ~3)
    return acc if rest == "0" else f"{acc}|{rest}"


def fmt_errno(v: int) -> str:
    if v == 0:
        return "0"
    return f"-{spec.ERRNO.render(-v)}" if v < 0 else str(v)


FORMATTERS: dict[str, Callable[[int], str]] = {
    "MODE": fmt_mode,
    "OCTAL": lambda v: f"0{v:o}",
    "HEX": hex,
    "OFLAGS": fmt_oflags,
    "ERRNO": fmt_errno,
}


def render_value(f: Field, v: Any, registry: Registry = spec.REGISTRY) -> str:
    if isinstance(v, bytes):
        return '"' + safe_name(v.rstrip(b"\0")) + '"' if f.ctype == "char" else v.hex()
    if isinstance(v, tuple):
        return "[" + ", ".join(str(x) for x in v) + "]" if any(v) else f"[0 x{len(v)}]"
    if f.flags:
        fmtr = FORMATTERS.get(f.flags)
        if fmtr is not None:
            return fmtr(v)
        fs = registry.flagsets.get(f.flags)
        if fs is not None:
            return fs.render(v) if v else "0"
    if f.enum:
        en = registry.enums.get(f.enum)
        if en is not None:
            n = en.name_of(v)
            return f"{n} ({v})" if n else str(v)
    return str(v)


def record_lines(rec: Record, indent: int = 0, registry: Registry = spec.REGISTRY) -> Iterator[str]:
    pad = "  " * indent
    fields = rec._codec.spec.fields
    width = max((len(pyname(f.name)) for f in fields), default=0)
    for f, v in zip(fields, rec, strict=True):
        key = pyname(f.name)
        if isinstance(v, Record):
            yield f"{pad}{key}: {v._codec.name}"
            yield from record_lines(v, indent + 1, registry)
        else:
            yield f"{pad}{key:<{width}} = {render_value(f, v, registry)}"


def captured_note(msg: Any) -> str:
    """The labelled fact a snapped message carries besides its (wire) fields, or ""."""
    return f"captured {msg.captured} of {msg.raw_len} bytes" if msg.captured < msg.raw_len else ""


def payload_text(v: bytes) -> str:
    """`131072 bytes`, or `131072 bytes (176 captured)` for a payload the capture cut."""
    n = wire_len(v)
    return f"{n} bytes" + (f" ({len(v)} captured)" if n != len(v) else "")


def _value_lines(key: str, v: Any, indent: int) -> Iterator[str]:
    pad = "  " * indent
    if isinstance(v, Record):
        yield f"{pad}{key}: {v._codec.name}"
        yield from record_lines(v, indent + 1)
    elif isinstance(v, bytes):
        if key in ("data", "value") or len(v) > 256:
            more = "…" if len(v) > 32 or wire_len(v) > len(v) else ""
            yield f"{pad}{key}: {payload_text(v)}{(' ' + v[:32].hex() + more) if v else ''}"
        else:
            yield f'{pad}{key} = "{safe_name(v)}"'
    elif isinstance(v, list):
        yield f"{pad}{key}: {len(v)} item(s)"
        for i, item in enumerate(v):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], bytes):
                rec, nm = item
                yield f'{pad}  [{i}] "{safe_name(nm)}"'
                yield from record_lines(rec, indent + 2)
            elif isinstance(item, Record):
                yield f"{pad}  [{i}] {item._codec.name}"
                yield from record_lines(item, indent + 2)
            else:
                yield f"{pad}  [{i}] {item!r}"
    elif v is None:
        yield f"{pad}{key}: (absent)"
    else:
        yield f"{pad}{key} = {v!r}"


def message_lines(msg: Any) -> list[str]:
    """The full decoded tree of a FUSE request/reply/notification, as `fsinspect decode` prints it."""
    from .fuse import Notification, Reply, Request

    lines: list[str] = []
    cut = captured_note(msg)
    cut = f" ({cut})" if cut else ""
    if isinstance(msg, Request):
        lines.append(f"FUSE request {msg.op.name} ({msg.op.value}) unique={msg.unique} nodeid={msg.nodeid} "
                     f"len={msg.raw_len}{cut}")
        lines.append("  fuse_in_header")
        lines.extend(record_lines(msg.header, 2))
        for eh, v in msg.ext:
            lines.append(f"  extension {spec.EXT_TYPE.render(eh.type)} size={eh.size}: "
                         f"{v if isinstance(v, list) else v.hex()}")
    elif isinstance(msg, Notification):
        lines.append(f"FUSE notification {msg.notify.name} ({msg.notify.value}) len={msg.raw_len}{cut}")
        lines.append("  fuse_out_header")
        lines.extend(record_lines(msg.header, 2))
    elif isinstance(msg, Reply):
        err = f" error={msg.errname}" if msg.error else ""
        lines.append(f"FUSE reply to {msg.op.name} unique={msg.unique}{err} len={msg.raw_len}{cut}")
        lines.append("  fuse_out_header")
        lines.extend(record_lines(msg.header, 2))
    for k, v in msg.args.items():
        lines.extend(_value_lines(k, v, 1))
    return lines


def _short(v: Any) -> str:
    if isinstance(v, bytes):
        return f'"{safe_name(v)}"' if len(v) <= 64 else f"<{len(v)} bytes>"
    return str(v)


def summary(msg: Any) -> str:
    """One line of the most telling arguments, for lists and reprs."""
    from .fuse import Notification, Reply, Request

    a = msg.args
    parts: list[str] = []
    if isinstance(msg, Request):
        op = msg.op.name
        for key in ("name", "newname", "target"):
            if key in a:
                parts.append(f"{key}={_short(a[key])}")
        for key in ("read", "write"):
            r = a.get(key)
            if r is not None:
                parts.append(f"fh={r.fh} off={r.offset} size={r.size}")
        if op in ("OPEN", "OPENDIR", "CREATE", "TMPFILE"):
            r = a.get("open") or a.get("create")
            if r is not None:
                parts.append(f"flags={fmt_oflags(r.flags)}")
        if op == "INIT":
            i = a["init"]
            parts.append(f"{i.major}.{i.minor} flags={spec.INIT_FLAGS.render(i.flags | (i.flags2 << 32))}")
        if op == "FORGET":
            parts.append(f"nlookup={a['forget'].nlookup}")
        if op == "BATCH_FORGET":
            parts.append(f"count={len(a['forgets'])}")
        if op == "SETATTR":
            parts.append(f"valid={spec.FATTR.render(a['setattr'].valid)}")
        if op in ("RENAME", "RENAME2"):
            r = a["rename"]
            parts.append(f"newdir={r.newdir}")
            if op == "RENAME2" and r.flags:
                parts.append(f"flags={spec.RENAME_FLAGS.render(r.flags)}")
        if op in ("RELEASE", "RELEASEDIR", "FLUSH", "FSYNC", "FSYNCDIR"):
            r = a.get("release") or a.get("flush") or a.get("fsync")
            if r is not None:
                parts.append(f"fh={r.fh}")
    elif isinstance(msg, Reply):
        if msg.error:
            return msg.errname or str(msg.error)
        e = a.get("entry")
        if e is not None:
            parts.append(f"nodeid={e.nodeid} ino={e.attr.ino} gen={e.generation}")
            if e.attr.flags:
                parts.append(f"attr.flags={spec.ATTR_FLAGS.render(e.attr.flags)}")
        ao = a.get("attr_out")
        if ao is not None:
            parts.append(f"ino={ao.attr.ino} size={ao.attr.size} mode={fmt_mode(ao.attr.mode)}")
        o = a.get("open")
        if o is not None:
            parts.append(f"fh={o.fh}" + (f" {spec.FOPEN.render(o.open_flags)}" if o.open_flags else ""))
        if "data" in a:
            parts.append(f"{wire_len(a['data'])} bytes")
        if "entries" in a:
            ents = a["entries"]
            names = ",".join(safe_name(nm) for _, nm in ents[:4])
            sub = sum(1 for r, _ in ents if hasattr(r, "entry_out") and r.entry_out.attr.flags & 1)
            parts.append(f"{len(ents)} entries [{names}{'…' if len(ents) > 4 else ''}]"
                         + (f" {sub} SUBMOUNT" if sub else ""))
        if "init_out" in a:
            i = a["init_out"]
            flags = i.flags | (i.flags2 << 32) if hasattr(i, "flags2") else i.flags
            parts.append(f"{i.major}.{i.minor} flags={spec.INIT_FLAGS.render(flags)}")
        if "write_out" in a:
            parts.append(f"size={a['write_out'].size}")
        if "target" in a:
            parts.append(f'target="{safe_name(a["target"])}"')
    elif isinstance(msg, Notification):
        for k, v in a.items():
            if isinstance(v, Record):
                parts.append(" ".join(f"{n}={x}" for n, x in zip(v._fields, v, strict=True) if n != "padding"))
            elif isinstance(v, bytes):
                parts.append(f"{k}={_short(v)}")
    return " ".join(parts)


def jsonable(v: Any, f: Field | None = None) -> Any:
    """JSON-safe form: records become dicts, flag fields get a sibling list of names, bytes become text/hex."""
    if isinstance(v, Record):
        out: dict[str, Any] = {}
        for fld, x in zip(v._codec.spec.fields, v, strict=True):
            key = pyname(fld.name)
            out[key] = jsonable(x, fld)
            if fld.flags and isinstance(x, int):
                fs = spec.REGISTRY.flagsets.get(fld.flags)
                if fs is not None:
                    out[key + "_names"] = fs.names(x)
                elif fld.flags in FORMATTERS:
                    out[key + "_text"] = FORMATTERS[fld.flags](x)
            if fld.enum and isinstance(x, int):
                en = spec.REGISTRY.enums.get(fld.enum)
                if en is not None:
                    out[key + "_name"] = en.name_of(x)
        return out
    if isinstance(v, bytes):
        if f is not None and f.ctype == "char":
            return safe_name(v.rstrip(b"\0"))
        if isinstance(v, Snapped):  # a payload cut by the capture: its length on the wire and what was kept
            return {"len": v.wire_len, "captured": len(v), "hex": v.hex()}
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return {"hex": v.hex()}
    if isinstance(v, (list, tuple)):
        if v and isinstance(v[0], tuple) and len(v[0]) == 2 and isinstance(v[0][1], bytes):
            return [{"name": safe_name(nm), **jsonable(rec)} for rec, nm in v]
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    return v


def message_json(msg: Any) -> dict[str, Any]:
    from .fuse import Notification, Reply, Request

    d: dict[str, Any] = {"header": jsonable(msg.header), "args": jsonable(msg.args)}
    if msg.captured < msg.raw_len:
        d["captured"] = msg.captured
    if isinstance(msg, Request):
        d["kind"] = "request"
        d["opcode"] = msg.op.name
        if msg.ext:
            d["ext"] = [{"type": eh.type, "value": v if isinstance(v, list) else v.hex()} for eh, v in msg.ext]
    elif isinstance(msg, Notification):
        d["kind"] = "notification"
        d["notify"] = msg.notify.name
    elif isinstance(msg, Reply):
        d["kind"] = "reply"
        d["opcode"] = msg.op.name
        d["error"] = msg.errname
    return d
