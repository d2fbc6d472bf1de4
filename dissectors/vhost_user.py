"""vhost-user message codec, derived from spec/vhost_user.py.

A message is a 12-byte header plus `size` payload bytes; file descriptors travel
beside it (SCM_RIGHTS) and are passed in and out as plain ints.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from .errors import DecodeError
from .spec import vhost_user as spec
from .structs import Record, StructCodec, build_codecs

CODECS: dict[str, StructCodec] = build_codecs(spec.REGISTRY)
HEADER = CODECS["vhost_user_header"]
_REGION = CODECS["vhost_user_memory_region"]
_MEMORY = CODECS["vhost_user_memory"]
_CONFIG = CODECS["vhost_user_config"]
_U64 = struct.Struct("<Q")


@dataclass
class VhostUserMessage:
    request: int
    flags: int
    payload: Any = None  # a Record, a list of regions (memory), bytes (raw) or None
    fds: list[int] = field(default_factory=list)
    backend_channel: bool = False  # True: a back-end -> front-end request
    extra: dict[str, Any] = field(default_factory=dict)  # memory: header fields; config: region bytes

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & 0x4)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & 0x8)

    @property
    def spec(self) -> spec.Request | None:
        table = spec.BACKEND_BY_VALUE if self.backend_channel else spec.FRONTEND_BY_VALUE
        return table.get(self.request)

    @property
    def name(self) -> str:
        s = self.spec
        return s.name if s else f"UNKNOWN({self.request})"

    @property
    def layout(self) -> str | None:
        s = self.spec
        if s is None:
            return "raw"
        if self.is_reply:
            # Requests without a reply of their own are acknowledged with a u64 (REPLY_ACK).
            return s.reply or "vhost_user_u64"
        return s.payload

    def vring_index(self) -> int | None:
        """Vring index of KICK/CALL/ERR (u64 with NOFD bit) and of state/addr payloads."""
        p = self.payload
        if isinstance(p, Record):
            if p._codec.name == "vhost_user_u64":
                return p.u64 & spec.VRING_IDX_MASK
            if "index" in p._fields:
                return int(getattr(p, "index"))  # noqa: B009 - tuple.index shadows the field for mypy
        return None

    def nofd(self) -> bool:
        p = self.payload
        return isinstance(p, Record) and p._codec.name == "vhost_user_u64" and bool(
            p.u64 & spec.VRING_NOFD_MASK)

    def summary(self) -> str:
        from .render import record_lines

        p = self.payload
        if isinstance(p, Record):
            body = "; ".join(line.strip() for line in record_lines(p, 0, spec.REGISTRY))
        elif isinstance(p, list):
            body = "; ".join(f"gpa={r.guest_address:#x} size={r.size:#x} uva={r.user_address:#x} "
                             f"off={r.mmap_offset:#x}" for r in p)
        elif isinstance(p, bytes):
            body = p.hex()
        else:
            body = ""
        tag = "reply " if self.is_reply else ""
        fds = f" fds={len(self.fds)}" if self.fds else ""
        return f"{tag}{self.name} {body}{fds}".strip()


def decode_header(buf: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    if len(buf) < spec.HEADER_SIZE:
        raise DecodeError(f"truncated header: {len(buf)} of {spec.HEADER_SIZE} bytes", len(buf), proto="vhost-user")
    req, flags, size = HEADER.struct.unpack_from(buf, 0)
    if flags & spec.VERSION_MASK != spec.VERSION:
        raise DecodeError(f"unsupported version {flags & spec.VERSION_MASK} (flags {flags:#x})", 4,
                          proto="vhost-user")
    if size > spec.MAX_PAYLOAD:
        raise DecodeError(f"payload size {size} exceeds {spec.MAX_PAYLOAD}", 8, proto="vhost-user")
    return req, flags, size


def decode_message(buf: bytes | bytearray | memoryview, fds: list[int] | None = None, *,
                   backend_channel: bool = False) -> VhostUserMessage:
    """Decode header + payload; raises DecodeError only."""
    try:
        req, flags, size = decode_header(buf)
        if len(buf) != spec.HEADER_SIZE + size:
            raise DecodeError(f"length mismatch: header says {size} payload bytes, {len(buf) - 12} present",
                              spec.HEADER_SIZE, proto="vhost-user")
        msg = VhostUserMessage(req, flags, None, list(fds or []), backend_channel)
        layout = msg.layout
        body = memoryview(bytes(buf))[spec.HEADER_SIZE:]
        if msg.spec is None:
            raise DecodeError(f"unknown {'back-end' if backend_channel else 'front-end'} request {req}", 0,
                              proto="vhost-user")
        if layout is None:
            if size:
                raise DecodeError(f"{msg.name} takes no payload, got {size} bytes", 12, proto="vhost-user")
        elif layout == "raw":
            msg.payload = bytes(body)
        elif layout == "memory":
            msg.payload, msg.extra = _decode_memory(body)
        elif layout == "config":
            if size < _CONFIG.size:
                raise DecodeError(f"config payload {size} < {_CONFIG.size}", 12, proto="vhost-user")
            hdr = _CONFIG.decode(body, 0)
            if _CONFIG.size + hdr.size != size:
                raise DecodeError(f"config size {hdr.size} disagrees with payload {size}",
                                  16, proto="vhost-user")
            msg.payload = hdr
            msg.extra["region"] = bytes(body[_CONFIG.size:])
        else:
            codec = CODECS[layout]
            # Replies to GET_* may be shorter in old back-ends: insist on the exact size.
            if size != codec.size:
                raise DecodeError(f"{msg.name}: {layout} needs {codec.size} bytes, got {size}", 12,
                                  proto="vhost-user")
            msg.payload = codec.decode(body, 0)
        return msg
    except DecodeError:
        raise
    except (struct.error, ValueError, IndexError, TypeError) as e:
        raise DecodeError(f"malformed message: {e}", 0, proto="vhost-user") from None


def _decode_memory(body: memoryview) -> tuple[list[Any], dict[str, Any]]:
    if len(body) < _MEMORY.size:
        raise DecodeError("truncated memory table", 12, proto="vhost-user")
    head = _MEMORY.decode(body, 0)
    n = head.num_regions
    if n > spec.MEMORY_BASELINE_NREGIONS:
        raise DecodeError(f"{n} regions exceed {spec.MEMORY_BASELINE_NREGIONS}", 12, proto="vhost-user")
    if len(body) < _MEMORY.size + n * _REGION.size:
        raise DecodeError(f"memory table of {n} regions truncated", 12 + len(body), proto="vhost-user")
    regions = [_REGION.decode(body, _MEMORY.size + i * _REGION.size) for i in range(n)]
    # QEMU sends the full 8-slot array; trailing slots must be present but are ignored.
    return regions, {"num_regions": n, "payload_size": len(body)}


def encode_message(msg: VhostUserMessage) -> bytes:
    layout = msg.layout
    p = msg.payload
    if layout is None or p is None:
        body = b""
    elif layout == "raw":
        body = bytes(p)
    elif layout == "memory":
        regs = b"".join(_REGION.encode(r) for r in p)
        slots = max(len(p), (msg.extra.get("payload_size", 0) - _MEMORY.size) // _REGION.size)
        regs += bytes((slots - len(p)) * _REGION.size)
        body = _MEMORY.struct.pack(len(p), 0) + regs
    elif layout == "config":
        region = msg.extra.get("region", b"")
        body = _CONFIG.struct.pack(p.offset, len(region), p.flags) + region
    else:
        body = CODECS[layout].encode(p)
    return HEADER.struct.pack(msg.request, msg.flags, len(body)) + body


def make(struct_name: str, **fields: Any) -> Record:
    return CODECS[struct_name].make(**fields)


def build(name: str, payload: Any = None, *, flags: int = spec.VERSION, reply: bool = False,
          fds: list[int] | None = None) -> VhostUserMessage:
    """A front-end request (or its reply) by name, e.g. build('SET_VRING_NUM', make('vhost_vring_state', ...))."""
    r = spec.FRONTEND_BY_NAME[name.upper().removeprefix("VHOST_USER_")]
    if reply:
        flags |= 0x4
    return VhostUserMessage(r.value, flags, payload, list(fds or []))


def u64(value: int) -> Record:
    return CODECS["vhost_user_u64"].make(u64=value)


MMAP_LIMIT = 1 << 63  # mmap lengths and file offsets are signed 64-bit (ssize_t, off_t)
_U64_LIMIT = 1 << 64


def region_problem(r: Any, others: list[Any]) -> str | None:
    """Why a memory region cannot be mapped as given (None: it can), checked before any fd is touched.

    A front-end may send anything; libvhost-user trusts it.  These are the checks that need only the
    message: an empty region, ranges that wrap or exceed what mmap can address, and a region that
    overlaps another one in guest-physical or QEMU-virtual space (address translation would be ambiguous).
    """
    where = f"region gpa {r.guest_address:#x} size {r.size:#x}"
    if r.size == 0:
        return f"{where}: zero size"
    for what, start in (("guest address", r.guest_address), ("user address", r.user_address)):
        if start + r.size > _U64_LIMIT:
            return f"{where}: {what} {start:#x} + size wraps past 2^64"
    if r.mmap_offset + r.size >= MMAP_LIMIT:
        return f"{where}: mmap_offset {r.mmap_offset:#x} + size exceeds what mmap can map (2^63)"
    for o in others:
        if r.guest_address < o.guest_address + o.size and o.guest_address < r.guest_address + r.size:
            return f"{where} overlaps region gpa {o.guest_address:#x} size {o.size:#x}"
        if r.user_address < o.user_address + o.size and o.user_address < r.user_address + r.size:
            return f"{where}: user address {r.user_address:#x} overlaps that of region gpa {o.guest_address:#x}"
    return None

