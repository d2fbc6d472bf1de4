"""FUSE message codec: whole requests, replies and notifications, derived from spec/fuse.py.

`decode_request(buf)` and `decode_reply(buf, request)` raise only `DecodeError`.
Replies carry only `unique`, so decoding one needs the request (or its opcode).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import DecodeError
from .spec import fuse as spec
from .spec.types import Notify, Opcode, Part
from .structs import Record, Snapped, StructCodec, build_codecs

CODECS: dict[str, StructCodec] = build_codecs(spec.REGISTRY)
IN_HEADER = CODECS["fuse_in_header"]
OUT_HEADER = CODECS["fuse_out_header"]
_DIRENT = CODECS["fuse_dirent"]
_DIRENTPLUS = CODECS["fuse_direntplus"]
_EXT_HEADER = CODECS["fuse_ext_header"]
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_in_hdr_unpack = IN_HEADER.struct.unpack_from
_out_hdr_unpack = OUT_HEADER.struct.unpack_from
_new = tuple.__new__
_InHeader = IN_HEADER.cls
_OutHeader = OUT_HEADER.cls
IN_HEADER_SIZE = IN_HEADER.size
_MAX = spec.MAX_MESSAGE
OUT_HEADER_SIZE = OUT_HEADER.size
ALL_INIT_FLAGS = 0
for _n, _v in spec.INIT_FLAGS.bits:
    ALL_INIT_FLAGS |= _v


@dataclass(frozen=True)
class FuseContext:
    """What INIT negotiated; decoding some layouts depends on it."""

    minor: int = spec.KERNEL_MINOR_VERSION
    flags: int = ALL_INIT_FLAGS  # combined flags | flags2 << 32 (the intersection both sides set)
    strict_names: bool = False  # reject names that are not UTF-8 (Linux allows any bytes but '/' and NUL)

    @property
    def setxattr_ext(self) -> bool:
        return bool(self.flags & spec.INIT_FLAGS.by_name()["SETXATTR_EXT"])

    @classmethod
    def from_init(cls, init_in: Any, init_out: Any | None) -> FuseContext:
        flags_in = init_in.flags | (init_in.flags2 << 32)
        if init_out is None:
            return cls(init_in.minor, flags_in)
        flags_out = init_out.flags | (init_out.flags2 << 32)
        return cls(min(init_in.minor, init_out.minor), flags_in & flags_out)


DEFAULT_CONTEXT = FuseContext()


class Message:
    """Common surface of requests, replies and notifications (used by filters and the UI).

    `raw_len` is the length on the wire (the header's `len`); `captured` is how much of it the capture
    holds, smaller only for a snapped record, whose last variable part is then cut.
    """

    __slots__ = ("args", "captured", "header", "raw_len")
    header: Record
    args: dict[str, Any]
    raw_len: int
    captured: int

    @property
    def unique(self) -> int:
        return self.header.unique

    @property
    def cut(self) -> bool:
        return self.captured < self.raw_len

    def get(self, path: str, default: Any = None) -> Any:
        """Dotted access into args: 'entry.attr.flags', 'name'."""
        cur: Any = self.args
        for part in path.split("."):
            if isinstance(cur, dict):
                if part not in cur:
                    return default
                cur = cur[part]
            elif isinstance(cur, Record) and part in cur._fields:
                cur = getattr(cur, part)
            else:
                return default
        return cur


class Request(Message):
    __slots__ = ("ext", "op")

    def __init__(self, header: Record, op: Opcode, args: dict[str, Any], ext: list[Any] | None = None,
                 raw_len: int = 0, captured: int | None = None) -> None:
        self.header = header
        self.op = op
        self.args = args
        self.ext = ext or []
        self.raw_len = raw_len
        self.captured = raw_len if captured is None else captured

    @property
    def opcode(self) -> int:
        return self.op.value

    @property
    def opname(self) -> str:
        return self.op.name

    @property
    def nodeid(self) -> int:
        return self.header.nodeid

    def __repr__(self) -> str:
        from .render import summary

        return f"<Request {self.op.name} unique={self.unique} nodeid={self.nodeid} {summary(self)}>"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Request) and self.header == other.header and self.args == other.args
                and self.ext == other.ext)

    __hash__ = None  # type: ignore[assignment]


class Reply(Message):
    __slots__ = ("op",)

    def __init__(self, header: Record, op: Opcode, args: dict[str, Any], raw_len: int = 0,
                 captured: int | None = None) -> None:
        self.header = header
        self.op = op
        self.args = args
        self.raw_len = raw_len
        self.captured = raw_len if captured is None else captured

    @property
    def error(self) -> int:
        """Positive errno, 0 on success."""
        return -self.header.error

    @property
    def errname(self) -> str | None:
        e = self.error
        return None if e == 0 else spec.ERRNO.render(e)

    @property
    def opname(self) -> str:
        return self.op.name

    def __repr__(self) -> str:
        from .render import summary

        return f"<Reply {self.op.name} unique={self.unique} error={self.errname or 0} {summary(self)}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reply) and self.header == other.header and self.args == other.args

    __hash__ = None  # type: ignore[assignment]


class Notification(Message):
    """Server-initiated message: out header with unique 0 and the notify code in `error`."""

    __slots__ = ("notify",)

    def __init__(self, header: Record, notify: Notify, args: dict[str, Any], raw_len: int = 0,
                 captured: int | None = None) -> None:
        self.header = header
        self.notify = notify
        self.args = args
        self.raw_len = raw_len
        self.captured = raw_len if captured is None else captured

    @property
    def opname(self) -> str:
        return "NOTIFY_" + self.notify.name

    def __repr__(self) -> str:
        from .render import summary

        return f"<Notification {self.notify.name} {summary(self)}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Notification) and self.header == other.header and self.args == other.args

    __hash__ = None  # type: ignore[assignment]


# ------------------------------------------------------------------------------------------------
# Part decoders.  Each takes (buf, off, end, args, ctx, request) and returns the new offset.
# ------------------------------------------------------------------------------------------------
PartDecoder = Callable[[Any, int, int, dict[str, Any], FuseContext, Any], int]


def _name_bytes(buf: Any, off: int, end: int, what: str, ctx: FuseContext) -> tuple[bytes, int]:
    nul = buf.find(b"\0", off, end) if isinstance(buf, (bytes, bytearray)) else bytes(buf[off:end]).find(b"\0")
    if nul < 0:
        raise DecodeError(f"{what}: missing NUL terminator", off)
    if not isinstance(buf, (bytes, bytearray)):
        nul += off
    raw = bytes(buf[off:nul])
    if len(raw) > spec.PATH_MAX:
        raise DecodeError(f"{what}: {len(raw)} bytes is longer than PATH_MAX", off)
    if ctx.strict_names:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DecodeError(f"{what}: not UTF-8 ({e.reason} at byte {e.start})", off + e.start) from None
    return raw, nul + 1


def _struct_part(part: Part, cut: bool) -> PartDecoder:
    codec = CODECS[part.ref or part.name]
    size = codec.size
    dec = codec.decode
    key = part.name
    optional = part.optional
    compat = codec.compat_sizes

    def decode(buf: Any, off: int, end: int, args: dict[str, Any], ctx: FuseContext, req: Any) -> int:
        avail = end - off
        if avail >= size:
            args[key] = dec(buf, off)
            return off + size
        if optional and avail == 0:
            args[key] = None
            return off
        if avail in compat and not cut:
            args[key] = codec.decode_compat(buf, off, avail)
            return off + avail
        if cut:
            raise DecodeError(f"{codec.name}: cut by the capture ({avail} of its {size} bytes captured)", off)
        raise DecodeError(f"{codec.name}: need {size} bytes, {avail} left", off)

    if key != "setxattr":
        return decode

    def decode_setxattr(buf: Any, off: int, end: int, args: dict[str, Any], ctx: FuseContext, req: Any) -> int:
        # Without FUSE_SETXATTR_EXT the struct is the 8-byte compat layout, then the name.
        if not ctx.setxattr_ext and end - off >= 8:
            args[key] = codec.decode_compat(buf, off, 8)
            return off + 8
        return decode(buf, off, end, args, ctx, req)

    return decode_setxattr


def _str_part(part: Part, cut: bool) -> PartDecoder:
    key = part.name

    def decode(buf: Any, off: int, end: int, args: dict[str, Any], ctx: FuseContext, req: Any) -> int:
        if off >= end and part.optional and not cut:
            args[key] = b""
            return off
        try:
            args[key], off = _name_bytes(buf, off, end, key, ctx)
        except DecodeError as e:
            if cut and "NUL" in str(e):
                raise DecodeError(f"{key}: cut by the capture", e.offset) from None
            raise
        return off

    return decode


def _data_part(part: Part, cut: bool) -> PartDecoder:
    key = part.name

    def decode(buf: Any, off: int, end: int, args: dict[str, Any], ctx: FuseContext, req: Any) -> int:
        args[key] = bytes(buf[off:end])
        return end

    return decode


def _text_part(part: Part, cut: bool) -> PartDecoder:
    """READLINK reply: the target without a NUL."""
    key = part.name

    def decode(buf: Any, off: int, end: int, args: dict[str, Any], ctx: FuseContext, req: Any) -> int:
        raw = bytes(buf[off:end])
        if b"\0" in raw:
            raise DecodeError(f"{key}: NUL inside the link target", off + raw.index(b"\0"))
        args[key] = raw
        return end

    return decode


def _array_part(part: Part, cut: bool) -> PartDecoder:
    key = part.name
    if part.ref == "u64":
        item_size = 8
        dec_item: Callable[[Any, int], Any] = lambda b, o: _U64.unpack_from(b, o)[0]  # noqa: E731
    else:
        codec = CODECS[part.ref or ""]
        item_size = codec.size
        dec_item = codec.decode
    count_path = part.count_from.split(".") if part.count_from else None

    def decode(buf: Any, off: int, end: int, args: dict[str, Any], ctx: FuseContext, req: Any) -> int:
        if count_path is not None:
            count = getattr(args[count_path[0]], count_path[1])
            need = count * item_size
            if need > end - off:
                if not cut:
                    raise DecodeError(f"{key}: count {count} needs {need} bytes, {end - off} left", off)
                count = (end - off) // item_size  # the items the capture holds
        elif cut:
            count = (end - off) // item_size
        else:
            if (end - off) % item_size:
                raise DecodeError(f"{key}: {end - off} bytes is not a multiple of {item_size}", off)
            count = (end - off) // item_size
        args[key] = [dec_item(buf, off + i * item_size) for i in range(count)]
        return off + count * item_size

    return decode


def _dirents_part(part: Part, plus: bool, cut: bool) -> PartDecoder:
    key = part.name
    codec = _DIRENTPLUS if plus else _DIRENT
    head = codec.size
    dec = codec.decode

    def decode(buf: Any, off: int, end: int, args: dict[str, Any], ctx: FuseContext, req: Any) -> int:
        out = []
        while off < end:
            if end - off < head:
                if cut:
                    break  # the capture ends inside this record: list the complete ones
                raise DecodeError(f"{key}: truncated {codec.name} record", off)
            rec = dec(buf, off)
            d = rec.dirent if plus else rec
            namelen = d.namelen
            if namelen == 0 or namelen > spec.NAME_MAX:
                raise DecodeError(f"{key}: bad namelen {namelen}", off)
            rec_end = off + head + namelen
            if rec_end > end:
                if cut:
                    break
                raise DecodeError(f"{key}: name runs past the end", off + head)
            nm = bytes(buf[off + head:rec_end])
            if b"\0" in nm or b"/" in nm:
                raise DecodeError(f"{key}: '/' or NUL in an entry name", off + head)
            if ctx.strict_names:
                _name_bytes(nm + b"\0", 0, len(nm) + 1, key, ctx)
            out.append((rec, nm))
            off = min(off + spec.dirent_align(head + namelen), end)
        args[key] = out
        return off

    return decode


def _strs_part(part: Part, cut: bool) -> PartDecoder:
    key = part.name

    def decode(buf: Any, off: int, end: int, args: dict[str, Any], ctx: FuseContext, req: Any) -> int:
        raw = bytes(buf[off:end])
        if cut:
            raw = raw[:raw.rfind(b"\0") + 1]  # the names the capture holds whole
        if raw and not raw.endswith(b"\0"):
            raise DecodeError(f"{key}: list not NUL-terminated", end)
        args[key] = raw.split(b"\0")[:-1] if raw else []
        return end

    return decode


def _xattr_part(part: Part, cut: bool) -> PartDecoder:
    codec = CODECS["fuse_getxattr_out"]

    def decode(buf: Any, off: int, end: int, args: dict[str, Any], ctx: FuseContext, req: Any) -> int:
        size_query = False
        if isinstance(req, Request):
            gi = req.args.get("getxattr")
            size_query = gi is not None and gi.size == 0
        elif end - off == codec.size:
            size_query = True  # without the request, an 8-byte reply is the size answer
        if size_query:
            if end - off != codec.size:
                raise DecodeError(f"fuse_getxattr_out: need {codec.size} bytes, {end - off} left", off)
            args["xattr"] = codec.decode(buf, off)
            return end
        args["value"] = bytes(buf[off:end])
        return end

    return decode


def _compile(parts: Iterable[Part], cut: bool = False) -> tuple[PartDecoder, ...]:
    """The part decoders of one body; with `cut`, for a capture that ends inside the message."""
    out: list[PartDecoder] = []
    simple = {"struct": _struct_part, "str": _str_part, "text": _text_part, "data": _data_part,
              "array": _array_part, "strs": _strs_part, "xattr": _xattr_part}
    for p in parts:
        if p.kind in simple:
            out.append(simple[p.kind](p, cut))
        elif p.kind in ("dirents", "direntplus"):
            out.append(_dirents_part(p, p.kind == "direntplus", cut))
        else:  # pragma: no cover - spec error
            raise ValueError(f"unknown part kind {p.kind}")
    return tuple(out)


def _check_len(buf: Any, declared: int, head: int) -> None:
    n = len(buf)
    if declared > spec.MAX_MESSAGE:
        raise DecodeError(f"length {declared} exceeds the maximum {spec.MAX_MESSAGE}", 0)
    if declared < head:
        raise DecodeError(f"length {declared} is shorter than the {head}-byte header", 0)
    if declared > n:
        raise DecodeError(f"truncated: header says {declared} bytes, {n} present", n)
    if declared < n:
        raise DecodeError(f"length mismatch: header says {declared} bytes, {n} present", declared)


BodyDecoder = Callable[[Any, int, int, FuseContext, Any], dict[str, Any]]


def _body(decoders: tuple[PartDecoder, ...]) -> BodyDecoder:
    """One function per opcode that runs its part decoders and checks nothing is left over."""
    if not decoders:
        def run0(buf: Any, off: int, end: int, ctx: FuseContext, req: Any) -> dict[str, Any]:
            if off != end:
                raise DecodeError(f"{end - off} trailing bytes after the body", off)
            return {}
        return run0
    if len(decoders) == 1:
        (d1,) = decoders

        def run1(buf: Any, off: int, end: int, ctx: FuseContext, req: Any) -> dict[str, Any]:
            args: dict[str, Any] = {}
            off = d1(buf, off, end, args, ctx, req)
            if off != end:
                raise DecodeError(f"{end - off} trailing bytes after the body", off)
            return args
        return run1

    def run(buf: Any, off: int, end: int, ctx: FuseContext, req: Any) -> dict[str, Any]:
        args: dict[str, Any] = {}
        for d in decoders:
            off = d(buf, off, end, args, ctx, req)
        if off != end:
            raise DecodeError(f"{end - off} trailing bytes after the body", off)
        return args
    return run


def _cut_body(decoders: tuple[PartDecoder, ...]) -> BodyDecoder:
    """A body the capture cut at `end`: the parts run up to the cut, and nothing counts as trailing."""
    def run(buf: Any, off: int, end: int, ctx: FuseContext, req: Any) -> dict[str, Any]:
        args: dict[str, Any] = {}
        for d in decoders:
            off = d(buf, off, end, args, ctx, req)
        return args
    return run


_REQ_DECODERS: dict[int, tuple[Opcode, BodyDecoder]] = {
    o.value: (o, _body(_compile(o.request))) for o in spec.OPCODES
}
_REPLY_DECODERS: dict[int, BodyDecoder] = {
    o.value: _body(_compile(o.reply)) for o in spec.OPCODES if o.reply is not None
}
_NOTIFY_DECODERS: dict[int, tuple[Notify, BodyDecoder]] = {
    n.value: (n, _body(_compile(n.body))) for n in spec.NOTIFIES
}
_REQ_CUT: dict[int, BodyDecoder] = {o.value: _cut_body(_compile(o.request, True)) for o in spec.OPCODES}
_REPLY_CUT: dict[int, BodyDecoder] = {
    o.value: _cut_body(_compile(o.reply, True)) for o in spec.OPCODES if o.reply is not None
}
_NOTIFY_CUT: dict[int, BodyDecoder] = {n.value: _cut_body(_compile(n.body, True)) for n in spec.NOTIFIES}


def _cut_len(buf: Any, declared: int, wire: int | None, head: int) -> int | None:
    """For a capture that holds only the first bytes of a message, where the capture ends (else None).

    The header's `len` must then be the message's length on the wire, as the capture reported it.
    """
    n = len(buf)
    if wire is None or wire <= n:
        return None
    if declared != wire:
        raise DecodeError(f"length mismatch: header says {declared} bytes, the message is {wire} "
                          f"({n} captured)", 0)
    if declared > spec.MAX_MESSAGE:
        raise DecodeError(f"length {declared} exceeds the maximum {spec.MAX_MESSAGE}", 0)
    return n


def _mark_cut(args: dict[str, Any], missing: int) -> dict[str, Any]:
    """The body's last part is the one the capture cut: a payload keeps its length on the wire."""
    if missing > 0 and args:
        key = next(reversed(args))
        v = args[key]
        if isinstance(v, bytes):
            args[key] = Snapped(v, len(v) + missing)
    return args


def decode_request(buf: bytes | bytearray | memoryview, ctx: FuseContext = DEFAULT_CONTEXT, *,
                   wire_len: int | None = None) -> Request:
    """Decode one request (fuse_in_header + body + extensions).

    `wire_len` is the message's length on the wire when `buf` holds only its first bytes (a snapped
    capture): the header is kept as sent, the last part holds what was captured (a `Snapped` payload, or
    the whole entries of a list), and extensions past the cut are not decoded.
    """
    try:
        if len(buf) < IN_HEADER_SIZE:
            raise DecodeError(f"truncated: {len(buf)} bytes, a fuse_in_header needs {IN_HEADER_SIZE}", len(buf))
        header = _new(_InHeader, _in_hdr_unpack(buf, 0))
        cut = None if wire_len is None or wire_len <= len(buf) else _cut_len(buf, header[0], wire_len, IN_HEADER_SIZE)
        if cut is None and (header[0] != len(buf) or header[0] > _MAX):
            _check_len(buf, header[0], IN_HEADER_SIZE)
        entry = _REQ_DECODERS.get(header[1])
        if entry is None:
            raise DecodeError(f"unknown opcode {header[1]}", 4)
        op, body = entry
        end = header[0]
        ext = None
        if header[7]:  # total_extlen, in 8-byte units
            ext_start = end - header[7] * 8
            if ext_start < IN_HEADER_SIZE:
                raise DecodeError(f"total_extlen {header[7]} runs past the header", 36)
            if cut is None:
                ext = _decode_extensions(buf, ext_start, end)
            end = ext_start
        if cut is not None and cut < end:
            args = _mark_cut(_REQ_CUT[header[1]](buf, IN_HEADER_SIZE, cut, ctx, None), end - cut)
            return Request(header, op, args, ext, header[0], len(buf))
        return Request(header, op, body(buf, IN_HEADER_SIZE, end, ctx, None), ext, header[0],
                       header[0] if cut is None else len(buf))
    except DecodeError:
        raise
    except (struct.error, ValueError, IndexError, TypeError, OverflowError, AttributeError, KeyError) as e:
        raise DecodeError(f"malformed request: {e}", 0) from None


def _decode_extensions(buf: Any, off: int, end: int) -> list[Any]:
    out: list[Any] = []
    while off < end:
        if end - off < _EXT_HEADER.size:
            raise DecodeError("truncated fuse_ext_header", off)
        eh = _EXT_HEADER.decode(buf, off)
        size = eh.size
        if size < _EXT_HEADER.size or size % 8 or off + size > end:
            raise DecodeError(f"bad extension size {size}", off)
        body = bytes(buf[off + _EXT_HEADER.size:off + size])
        value: Any = body
        if eh.type == 32:  # FUSE_EXT_GROUPS
            if len(body) < 4:
                raise DecodeError("truncated fuse_supp_groups", off + 8)
            (n,) = _U32.unpack_from(body, 0)
            if 4 + 4 * n > len(body):
                raise DecodeError(f"fuse_supp_groups: {n} groups do not fit", off + 8)
            value = list(struct.unpack_from(f"<{n}I", body, 4))
        out.append((eh, value))
        off += size
    return out


def decode_reply(buf: bytes | bytearray | memoryview, request: Request | int | str | None,
                 ctx: FuseContext = DEFAULT_CONTEXT, *, wire_len: int | None = None) -> Reply | Notification:
    """Decode one reply (or, with unique 0, a notification).  `request` gives the opcode.

    `wire_len`: as for decode_request, the length on the wire of a message captured in part.
    """
    try:
        if len(buf) < OUT_HEADER_SIZE:
            raise DecodeError(f"truncated: {len(buf)} bytes, a fuse_out_header needs {OUT_HEADER_SIZE}", len(buf))
        header = _new(_OutHeader, _out_hdr_unpack(buf, 0))
        cut = None if wire_len is None or wire_len <= len(buf) else _cut_len(buf, header[0], wire_len, OUT_HEADER_SIZE)
        if cut is None and (header[0] != len(buf) or header[0] > _MAX):
            _check_len(buf, header[0], OUT_HEADER_SIZE)
        if header[2] == 0:
            return _decode_notify(buf, header, ctx, cut)
        if type(request) is Request:
            op = request.op
        elif isinstance(request, Request):
            op = request.op
        elif isinstance(request, int):
            op = spec.OPCODE_BY_VALUE.get(request)  # type: ignore[assignment]
        elif isinstance(request, str):
            op = spec.OPCODE_BY_NAME.get(request.upper().removeprefix("FUSE_"))  # type: ignore[assignment]
        else:
            raise DecodeError("a reply can't be decoded without its request's opcode", 8)
        if op is None:
            raise DecodeError(f"unknown opcode {request!r} for the reply", 8)
        err = header[1]
        if err > 0 or err < -4095:
            raise DecodeError(f"error field {err} is not a negated errno", 4)
        if err:
            if header[0] != OUT_HEADER_SIZE:
                raise DecodeError(f"error reply carries {header[0] - OUT_HEADER_SIZE} body bytes", OUT_HEADER_SIZE)
            return Reply(header, op, {}, header[0])
        rbody = _REPLY_DECODERS.get(op.value)
        if rbody is None:
            raise DecodeError(f"{op.name} has no reply by design", 8)
        if cut is not None:
            args = _mark_cut(_REPLY_CUT[op.value](buf, OUT_HEADER_SIZE, cut, ctx, request), header[0] - cut)
            return Reply(header, op, args, header[0], cut)
        return Reply(header, op, rbody(buf, OUT_HEADER_SIZE, header[0], ctx, request), header[0])
    except DecodeError:
        raise
    except (struct.error, ValueError, IndexError, TypeError, OverflowError, AttributeError, KeyError) as e:
        raise DecodeError(f"malformed reply: {e}", 0) from None


def _decode_notify(buf: Any, header: Record, ctx: FuseContext, cut: int | None) -> Notification:
    code = header[1]
    entry = _NOTIFY_DECODERS.get(code)
    if entry is None:
        raise DecodeError(f"unknown notify code {code}", 4)
    notify, body = entry
    if cut is not None:
        args = _mark_cut(_NOTIFY_CUT[code](buf, OUT_HEADER_SIZE, cut, ctx, None), header[0] - cut)
        return Notification(header, notify, args, header[0], cut)
    return Notification(header, notify, body(buf, OUT_HEADER_SIZE, header[0], ctx, None), header[0])


def peek_header(buf: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(len, opcode, unique) of a request without decoding the body: the cheap path for routing."""
    if len(buf) < IN_HEADER_SIZE:
        raise DecodeError(f"truncated: {len(buf)} bytes, a fuse_in_header needs {IN_HEADER_SIZE}", len(buf))
    h = _in_hdr_unpack(buf, 0)
    return h[0], h[1], h[2]


# ------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------
def _as_record(codec: StructCodec, v: Any) -> Record:
    if isinstance(v, codec.cls):
        return v
    if isinstance(v, dict):
        return codec.make(**v)
    if v is None:
        return codec.make()
    raise TypeError(f"{codec.name}: expected a record or dict, got {type(v).__name__}")


def _encode_parts(parts: Iterable[Part], args: dict[str, Any], ctx: FuseContext) -> list[bytes]:
    out: list[bytes] = []
    for p in parts:
        v = args.get(p.name)
        if p.kind == "struct":
            if v is None and p.optional:
                continue
            codec = CODECS[p.ref or p.name]
            raw = codec.encode(_as_record(codec, v))
            if p.name == "setxattr" and not ctx.setxattr_ext:
                raw = raw[:8]
            out.append(raw)
        elif p.kind == "str":
            v = v if v is not None else b""
            v = v.encode("utf-8", "surrogateescape") if isinstance(v, str) else bytes(v)
            out.append(v + b"\0")
        elif p.kind == "text":
            out.append(v.encode("utf-8", "surrogateescape") if isinstance(v, str) else bytes(v or b""))
        elif p.kind == "data":
            out.append(bytes(v or b""))
        elif p.kind == "array":
            if p.ref == "u64":
                out.append(b"".join(_U64.pack(x) for x in (v or [])))
            else:
                codec = CODECS[p.ref or ""]
                out.append(b"".join(codec.encode(_as_record(codec, x)) for x in (v or [])))
        elif p.kind in ("dirents", "direntplus"):
            out.append(encode_dirents(v or [], plus=p.kind == "direntplus"))
        elif p.kind == "strs":
            out.append(b"".join(bytes(s) + b"\0" for s in (v or [])))
        elif p.kind == "xattr":
            if args.get("xattr") is not None:
                out.append(CODECS["fuse_getxattr_out"].encode(_as_record(CODECS["fuse_getxattr_out"], args["xattr"])))
            else:
                out.append(bytes(args.get("value") or b""))
    return out


def encode_dirents(entries: Iterable[tuple[Any, bytes]], *, plus: bool = False) -> bytes:
    """READDIR/READDIRPLUS body; namelen is taken from the name, records padded to 8 bytes."""
    codec = _DIRENTPLUS if plus else _DIRENT
    chunks = []
    for rec, nm in entries:
        rec = _as_record(codec, rec)
        if plus:
            rec = rec._replace(dirent=rec.dirent._replace(namelen=len(nm)))
        else:
            rec = rec._replace(namelen=len(nm))
        body = codec.encode(rec) + nm
        chunks.append(body + b"\0" * (spec.dirent_align(len(body)) - len(body)))
    return b"".join(chunks)


def _opcode(op: Opcode | int | str) -> Opcode:
    if isinstance(op, Opcode):
        return op
    if isinstance(op, int):
        return spec.OPCODE_BY_VALUE[op]
    return spec.OPCODE_BY_NAME[op.upper().removeprefix("FUSE_")]


def encode_request(op: Opcode | int | str, args: dict[str, Any] | None = None, *, unique: int = 1,
                   nodeid: int = 0, uid: int = 0, gid: int = 0, pid: int = 0, ext: bytes = b"",
                   ctx: FuseContext = DEFAULT_CONTEXT) -> bytes:
    o = _opcode(op)
    body = b"".join(_encode_parts(o.request, args or {}, ctx))
    if len(ext) % 8:
        raise ValueError("extensions must be a multiple of 8 bytes")
    total = IN_HEADER_SIZE + len(body) + len(ext)
    return IN_HEADER.struct.pack(total, o.value, unique, nodeid, uid, gid, pid, len(ext) // 8, 0) + body + ext


def encode_request_obj(req: Request, ctx: FuseContext = DEFAULT_CONTEXT) -> bytes:
    """Re-encode a decoded request byte for byte."""
    h = req.header
    ext = b"".join(
        _EXT_HEADER.encode(eh) + (struct.pack(f"<I{len(v)}I", len(v), *v) if isinstance(v, list) else v)
        for eh, v in req.ext
    )
    # Pad the groups extension to its declared size (8-byte units).
    return encode_request(req.op, req.args, unique=h.unique, nodeid=h.nodeid, uid=h.uid,
                          gid=h.gid, pid=h.pid, ext=_pad8(ext), ctx=ctx)


def _pad8(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 8)


def encode_reply(op: Opcode | int | str, args: dict[str, Any] | None = None, *, unique: int = 1,
                 error: int = 0, ctx: FuseContext = DEFAULT_CONTEXT) -> bytes:
    """A reply; `error` is a positive errno (sent negated), and then the body is empty."""
    o = _opcode(op)
    if error:
        return OUT_HEADER.struct.pack(OUT_HEADER_SIZE, -abs(error), unique)
    if o.reply is None:
        raise ValueError(f"{o.name} has no reply")
    body = b"".join(_encode_parts(o.reply, args or {}, ctx))
    return OUT_HEADER.struct.pack(OUT_HEADER_SIZE + len(body), 0, unique) + body


def encode_notify(code: Notify | int | str, args: dict[str, Any] | None = None,
                  ctx: FuseContext = DEFAULT_CONTEXT) -> bytes:
    if isinstance(code, Notify):
        n = code
    elif isinstance(code, int):
        n = spec.NOTIFY_BY_VALUE[code]
    else:
        n = spec.NOTIFY_BY_NAME[code.upper().removeprefix("FUSE_NOTIFY_")]
    body = b"".join(_encode_parts(n.body, args or {}, ctx))
    return OUT_HEADER.struct.pack(OUT_HEADER_SIZE + len(body), n.value, 0) + body


def encode_message(msg: Request | Reply | Notification, ctx: FuseContext = DEFAULT_CONTEXT) -> bytes:
    if isinstance(msg, Request):
        return encode_request_obj(msg, ctx)
    if isinstance(msg, Notification):
        return encode_notify(msg.notify, msg.args, ctx)
    return encode_reply(msg.op, msg.args, unique=msg.unique, error=msg.error, ctx=ctx)


def make(struct_name: str, **fields: Any) -> Record:
    """A spec struct record with the given fields, zero elsewhere: make('fuse_attr', ino=2, mode=0o40755)."""
    return CODECS[struct_name].make(**fields)
