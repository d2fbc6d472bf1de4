"""pcapng reader for fsinspect recordings: validates, iterates records, reports a truncated tail.

Refuses (with `RecordingError`, one clear line) anything that is not pcapng, a big-endian or
non-1.x section, an interface whose link type is not 252, and a format version newer than this code.
A file that lies is refused the same way, never with a traceback: a block body shorter than its fixed
part, captured bytes past the end of their block, or a JSON option whose value has the wrong type
(an interface's `queue`, the section's `init`).  A tail cut by a crash is not an error: iteration
stops at the last complete block and `truncated` says where and why.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import format as fmt
from .parts import Concat, PartsError, resolve
from .scan import Row, epb_row, layout_items, scan

_U32 = struct.Struct("<I")
_BLOCK_HEAD = struct.Struct("<II")
_EPB_FIXED = struct.Struct("<IIIII")
_OPT_HDR = struct.Struct("<HH")
_EXP_TAG = struct.Struct(">HH")
_META_BODY = struct.Struct("<HHII")  # queue, flags, head, epoch (after PEN, kind, reserved)
_IDB_FIXED = struct.Struct("<HHI")  # link type, reserved, snaplen
_SHB_FIXED = struct.Struct("<IHHq")  # byte-order magic, major, minor, section length
MAX_BLOCK = 64 * 1024 * 1024
MAX_QUEUE = 0xFFFF  # META_RECORD carries the queue as a u16


class RecordingError(Exception):
    """A file that this reader refuses; the message names the file problem in one line."""


@dataclass(frozen=True, slots=True)
class Interface:
    index: int
    name: str
    description: str
    linktype: int
    kind: str
    queue: int
    tsresol: int = 9


@dataclass(slots=True)
class Record:
    """One captured message: the PDU bytes (exported-PDU tags removed) and its metadata."""

    offset: int  # file offset of the EPB, for random access
    iface: int
    dissector: str
    inbound: bool  # request / front-end message
    ts_ns: int
    data: bytes
    orig_len: int  # PDU length before snapping
    queue: int
    head: int | None
    epoch: int
    flags: int
    layout: list[tuple[int, int]] | None = None
    notes: list[str] = field(default_factory=list)
    n: int = 0  # the source's exchange number (META_NUMBER: the live stream), 0 when absent

    @property
    def is_fuse(self) -> bool:
        return self.dissector == fmt.DISSECTOR_FUSE

    @property
    def snapped(self) -> bool:
        return self.orig_len > len(self.data)

    @property
    def debugger(self) -> list[str]:
        """What the debugger did to this message (format 2): held, injected, rewritten."""
        return [name for bit, name in fmt.DEBUGGER_FLAG_NAMES if self.flags & bit]


@dataclass
class Section:
    """What a section header says: tool, format version, host, kernel, backend, comments, INIT."""

    offset: int
    meta: dict[str, Any]
    userappl: str = ""
    os: str = ""
    hardware: str = ""
    comments: list[str] = field(default_factory=list)
    interfaces: list[Interface] = field(default_factory=list)
    init: tuple[int, bytes, bytes | None] | None = None  # (epoch, INIT request, reply): a rotated part's start

    @property
    def format_version(self) -> int:
        return int(self.meta.get("format", 0))


def _header_init(meta: dict[str, Any]) -> tuple[int, bytes, bytes | None] | None:
    """The section header's `init` (epoch, request, reply), type-checked; ValueError names what is wrong."""
    init = meta.get("init")
    if init is None:
        return None
    if not isinstance(init, dict):
        raise ValueError(f"`init` is {type(init).__name__}, not an object")
    epoch, req, rep = init.get("epoch", 0), init.get("request"), init.get("reply")
    if type(epoch) is not int or not 0 <= epoch <= 0xFFFFFFFF:
        raise ValueError(f"`init.epoch` is {epoch!r}, not a u32")
    if not isinstance(req, str) or (rep is not None and not isinstance(rep, str)):
        raise ValueError("`init.request` and `init.reply` must be hex strings")
    try:
        return epoch, bytes.fromhex(req), bytes.fromhex(rep) if rep else None
    except ValueError:
        raise ValueError("`init.request` or `init.reply` is not hex") from None


def _parse_options(buf: bytes, off: int, end: int) -> Iterator[tuple[int, bytes]]:
    while off + 4 <= end:
        code, ln = _OPT_HDR.unpack_from(buf, off)
        if code == fmt.OPT_ENDOFOPT:
            return
        val = buf[off + 4:off + 4 + ln]
        if len(val) < ln:
            raise RecordingError(f"option {code} runs past its block")
        yield code, val
        off += 4 + ln + (-ln % 4)


def _custom_json(val: bytes) -> dict[str, Any] | None:
    if len(val) < 4 or _U32.unpack_from(val)[0] != fmt.PEN:
        return None
    try:
        obj = json.loads(val[4:].decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def strip_exported_pdu(data: bytes) -> tuple[str, int | None, bytes]:
    """(dissector name, p2p direction or None, PDU bytes) from an exported-PDU payload."""
    off = 0
    name = ""
    p2p: int | None = None
    n = len(data)
    while off + 4 <= n:
        tag, ln = _EXP_TAG.unpack_from(data, off)
        off += 4
        if tag == fmt.EXP_PDU_TAG_END_OF_OPT:
            return name, p2p, data[off:]
        if off + ln > n:
            raise RecordingError(f"exported PDU tag {tag} runs past the captured bytes ({ln} bytes, {n - off} left)")
        val = data[off:off + ln]
        if tag == fmt.EXP_PDU_TAG_DISSECTOR_NAME:
            name = val.rstrip(b"\0").decode("utf-8", "replace")
        elif tag == fmt.EXP_PDU_TAG_P2P_DIRECTION and ln == 4:
            p2p = struct.unpack(">i", val)[0]
        off += ln
    raise RecordingError("exported PDU tags have no end tag")


def _fast_epb(offset: int, body: bytes) -> Record | None:
    """A packet block in the writer's own canonical layout (no notes), or None."""
    r = epb_row(body, offset)
    return None if r is None else _row_record(r)


def _row_record(r: Row) -> Record:
    return Record(r.offset, r.iface, fmt.DISSECTOR_FUSE, r.inbound, r.ts_ns, r.data, r.orig_len, r.queue, r.head,
                  r.epoch, r.flags, None if r.layout is None else layout_items(r.layout), [], r.n)


class _BlockParser:
    """What a recording's blocks mean (section, interfaces, packets): shared by the file reader and the
    live stream's reader; `path` names the source in errors, `sections` grows as section headers come."""

    path: Path | str
    sections: list[Section]

    def _section(self, offset: int, body: bytes) -> Section:
        if len(body) < _SHB_FIXED.size:
            raise RecordingError(f"{self.path}: section header at offset {offset} is too short")
        magic, major, minor, _length = _SHB_FIXED.unpack_from(body)
        if magic != fmt.BYTE_ORDER_MAGIC:
            if magic == 0x4D3C2B1A:
                raise RecordingError(f"{self.path}: big-endian pcapng sections are not supported")
            raise RecordingError(f"{self.path}: bad byte-order magic 0x{magic:08x} at offset {offset + 8}")
        if major != fmt.PCAPNG_MAJOR:
            raise RecordingError(f"{self.path}: pcapng version {major}.{minor} is not supported (need 1.x)")
        sec = Section(offset, {})
        for code, val in _parse_options(body, 16, len(body)):
            if code == fmt.OPT_COMMENT:
                sec.comments.append(val.decode("utf-8", "replace"))
            elif code == fmt.SHB_USERAPPL:
                sec.userappl = val.decode("utf-8", "replace")
            elif code == fmt.SHB_OS:
                sec.os = val.decode("utf-8", "replace")
            elif code == fmt.SHB_HARDWARE:
                sec.hardware = val.decode("utf-8", "replace")
            elif code == fmt.OPT_CUSTOM_STR:
                obj = _custom_json(val)
                if obj is not None and "format" in obj:
                    sec.meta = obj
        if not sec.meta:
            raise RecordingError(f"{self.path}: a pcapng file, but not an fsinspect recording "
                                 f"(no fsinspect option in the section header"
                                 f"{', written by ' + repr(sec.userappl) if sec.userappl else ''})")  # the file's text, quoted
        v = sec.meta.get("format")
        if not isinstance(v, int) or v < 1:
            raise RecordingError(f"{self.path}: bad recording format version {v!r}")
        if v > fmt.FORMAT_VERSION:
            raise RecordingError(f"{self.path}: recording format version {v} is newer than this fsinspect "
                                 f"reads (up to {fmt.FORMAT_VERSION}); upgrade fsinspect")
        try:
            sec.init = _header_init(sec.meta)
        except ValueError as e:
            raise RecordingError(f"{self.path}: section header at offset {offset}: {e}") from None
        self.sections.append(sec)
        return sec

    def _interface(self, offset: int, body: bytes) -> None:
        sec = self.sections[-1]
        idx = len(sec.interfaces)
        if len(body) < _IDB_FIXED.size:
            raise RecordingError(f"{self.path}: interface block {idx} at offset {offset} has {len(body)} body "
                                 f"bytes, fewer than its fixed {_IDB_FIXED.size}")
        linktype, _, _snap = _IDB_FIXED.unpack_from(body)
        if linktype != fmt.LINKTYPE_WIRESHARK_UPPER_PDU:
            raise RecordingError(f"{self.path}: interface {idx} has link type {linktype}, expected "
                                 f"{fmt.LINKTYPE_WIRESHARK_UPPER_PDU} (WIRESHARK_UPPER_PDU)")
        name = desc = kind = ""
        queue = 0
        tsresol = 6
        for code, val in _parse_options(body, 8, len(body)):
            if code == fmt.IF_NAME:
                name = val.decode("utf-8", "replace")
            elif code == fmt.IF_DESCRIPTION:
                desc = val.decode("utf-8", "replace")
            elif code == fmt.IF_TSRESOL and val:
                tsresol = val[0]
            elif code == fmt.OPT_CUSTOM_STR:
                obj = _custom_json(val)
                if obj is not None:
                    kind, queue = obj.get("kind", ""), obj.get("queue", 0)
                    if not isinstance(kind, str) or type(queue) is not int or not 0 <= queue <= MAX_QUEUE:
                        raise RecordingError(f"{self.path}: interface {idx} at offset {offset}: kind {kind!r} / "
                                             f"queue {queue!r} (need a string and an integer 0..{MAX_QUEUE})")
        if tsresol != 9:
            raise RecordingError(f"{self.path}: interface {idx} has if_tsresol {tsresol}; fsinspect writes 9 (ns)")
        sec.interfaces.append(Interface(idx, name, desc, linktype, kind, queue, tsresol))

    def _parse_epb(self, offset: int, body: bytes, check: bool = True) -> Record:
        fast = _fast_epb(offset, body)
        if fast is not None:
            if check and fast.iface >= len(self.sections[-1].interfaces):
                self._no_iface(offset, fast.iface)
            return fast
        if len(body) < _EPB_FIXED.size:
            raise RecordingError(f"{self.path}: packet block at offset {offset} has {len(body)} body bytes, "
                                 f"fewer than its fixed {_EPB_FIXED.size}")
        iface, ts_hi, ts_lo, caplen, origlen = _EPB_FIXED.unpack_from(body)
        if _EPB_FIXED.size + caplen > len(body):
            raise RecordingError(f"{self.path}: packet block at offset {offset} claims {caplen} captured bytes, "
                                 f"its block holds {len(body) - _EPB_FIXED.size}")
        data = body[20:20 + caplen]
        try:
            dissector, p2p, pdu = strip_exported_pdu(data)
        except RecordingError as e:
            raise RecordingError(f"{self.path}: packet block at offset {offset}: {e}") from None
        orig = origlen - (len(data) - len(pdu))
        inbound = p2p == fmt.P2P_DIR_RECV
        queue = 0
        head: int | None = None
        epoch = 0
        flags = 0
        number = 0
        layout = None
        notes: list[str] = []
        for code, val in _parse_options(body, 20 + caplen + (-caplen % 4), len(body)):
            if code == fmt.EPB_FLAGS and len(val) == 4:
                d = _U32.unpack(val)[0] & 3
                if d:
                    inbound = d == fmt.DIR_INBOUND
            elif code == fmt.OPT_CUSTOM_BIN and len(val) >= 8 and _U32.unpack_from(val)[0] == fmt.PEN:
                kind = struct.unpack_from("<H", val, 4)[0]
                if kind == fmt.META_RECORD and len(val) >= 20:
                    queue, flags, h, epoch = _META_BODY.unpack_from(val, 8)
                    head = None if h == fmt.NO_HEAD else h
                elif kind == fmt.META_NUMBER and len(val) >= fmt.META_NUMBER_STRUCT.size:
                    number = fmt.META_NUMBER_STRUCT.unpack_from(val)[3]
                elif kind == fmt.META_LAYOUT:
                    layout = [(ln, fl) for ln, fl, _ in fmt.LAYOUT_ITEM.iter_unpack(val[8:8 + (len(val) - 8) // 8 * 8])]
            elif code == fmt.OPT_COMMENT:
                note = val.decode("utf-8", "replace")
                if not note.startswith(fmt.DEBUGGER_COMMENT):  # Wireshark's copy of the flags: see `debugger`
                    notes.append(note)
        if check and iface >= len(self.sections[-1].interfaces):
            self._no_iface(offset, iface)
        if flags & fmt.RF_SNAPPED and orig == len(pdu) >= 4 and dissector == fmt.DISSECTOR_FUSE:
            # Older proxies recorded the captured length as the original length of a chain they cut: the
            # message's own header still says how long it was.
            orig = max(orig, _U32.unpack_from(pdu)[0])
        return Record(offset, iface, dissector, inbound, (ts_hi << 32) | ts_lo, pdu, orig, queue, head, epoch,
                      flags, layout, notes, number)

    def _no_iface(self, offset: int, iface: int) -> None:
        raise RecordingError(f"{self.path}: packet at offset {offset} names interface {iface}, "
                             f"but only {len(self.sections[-1].interfaces)} are defined")


class RecordingReader(_BlockParser):
    """Sequential and random access to one recording: a file, or all the parts of a rotated one.

    `path` names a file (read with its later parts), a glob or a directory (see `parts.resolve`); the
    parts read as one stream and offsets are offsets in it.  `one_file` reads just the file named.  Opening reads and validates the first
    section header and the interfaces met while iterating.
    """

    def __init__(self, path: str | os.PathLike[str], *, one_file: bool = False) -> None:
        try:
            self.parts = [Path(path)] if one_file else resolve(path)
        except PartsError as e:
            raise RecordingError(str(e)) from None
        self.path = self.parts[0]
        try:
            self._f = Concat(self.parts)
        except OSError as e:
            raise RecordingError(f"{e.filename or self.path}: {e.strerror}") from None
        self.size = self._f.size
        self.sections: list[Section] = []
        self.truncated: str | None = None
        self.count = 0
        self.end = 0  # where the last pass over the records stopped: the end, or a truncated tail
        head = self._f.read(12)
        if len(head) < 12:
            self.close()
            raise RecordingError(f"{self.path}: not a pcapng file ({len(head)} bytes, too short for a header)")
        btype, _ = _BLOCK_HEAD.unpack_from(head)
        if btype != fmt.BT_SHB:
            self.close()
            what = "a pcap (libpcap) file" if head[:4] in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4",
                                                          b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else \
                f"starts with {head[:4].hex()}, not the pcapng section header 0a0d0d0a"
            raise RecordingError(f"{self.path}: not a pcapng file ({what})")
        self._f.seek(0)
        try:
            first = self._read_block(0)
        except RecordingError:
            self.close()
            raise
        if first is None:
            self.close()
            raise RecordingError(f"{self.path}: the section header is incomplete ({self.truncated})")
        self._section(0, first[1])

    # -- header ----------------------------------------------------------------------------------
    @property
    def section(self) -> Section:
        return self.sections[0]

    @property
    def interfaces(self) -> list[Interface]:
        """Interfaces of the first section, complete once the file was iterated (IDBs may come late)."""
        return self.sections[0].interfaces

    # -- blocks ----------------------------------------------------------------------------------
    def _read_block(self, offset: int) -> tuple[int, bytes, int] | None:
        """(type, body, total length) of the block at offset, or None at a clean end / truncated tail."""
        f = self._f
        head = f.read(8)
        if not head:
            return None
        if len(head) < 8:
            self.truncated = f"truncated tail at offset {offset}: {len(head)} stray bytes"
            return None
        btype, total = _BLOCK_HEAD.unpack(head)
        if total < 12 or total % 4 or total > MAX_BLOCK:
            self.truncated = f"corrupt block at offset {offset}: length {total}"
            return None
        rest = f.read(total - 8)
        if len(rest) < total - 8:
            self.truncated = (f"truncated tail at offset {offset}: block needs {total} bytes, "
                              f"{len(rest) + 8} present")
            return None
        if _U32.unpack_from(rest, total - 12)[0] != total:
            self.truncated = f"corrupt block at offset {offset}: trailing length does not match {total}"
            return None
        return btype, rest[:-4], total

    def __iter__(self) -> Iterator[Record]:
        return self.records()

    def records(self) -> Iterator[Record]:
        """Every record in file order; stops cleanly at a truncated tail (see `truncated`)."""
        f = self._f
        f.seek(0)
        self.truncated = None
        self.sections = []
        offset = 0
        count = 0
        while True:
            blk = self._read_block(offset)
            if blk is None:
                break
            btype, body, total = blk
            if btype == fmt.BT_EPB:
                count += 1
                yield self._parse_epb(offset, body)
            elif btype == fmt.BT_IDB:
                self._interface(offset, body)
            elif btype == fmt.BT_SHB:
                self._section(offset, body)
            offset += total
        self.count = count
        self.end = offset

    def record_at(self, offset: int) -> Record:
        """The EPB at a file offset (from the side index), read without scanning the file."""
        self._f.seek(offset)
        blk = self._read_block(offset)
        if blk is None or blk[0] != fmt.BT_EPB:
            raise RecordingError(f"{self.path}: no packet block at offset {offset}")
        return self._parse_epb(offset, blk[1], check=False)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RecordingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamError(RecordingError):
    """A live stream that breaks the framing (a block that lies about its length, no section header
    first, a custom block that is not JSON): one line naming the stream offset."""


STREAM_MAX_BLOCK = 16 << 20  # a live stream's block: a packet is at most LIVE_SNAPLEN, a message a held list


class StreamReader(_BlockParser):
    """The control socket's binary stream: the blocks of a recording as they arrive, in any chunks.

    `feed(data)` returns what the complete blocks carried, in order: a Record per packet block, a dict per
    fsinspect custom block (a control-protocol message); section headers and interfaces are taken in as
    they come, unknown block types skipped (as pcapng allows).  Anything that breaks the framing raises
    StreamError; the stream cannot be resynchronised after that, so the caller ends the connection.  The
    blocks before the bad one are returned first: the error is kept in `failed` and raised by the next call.
    """

    def __init__(self, name: str = "control stream", *, rows: bool = False) -> None:
        self.path = name
        self.rows = rows  # packet blocks in the writer's canonical layout come as scan.Row tuples, not Records
        self.sections = []
        self._buf = b""
        self.offset = 0  # stream offset of _buf[0]
        self.max_block = STREAM_MAX_BLOCK
        self.failed: StreamError | None = None
        # Set to a list to get every block but the custom ones as (type, bytes), in order: a pcapng copy.
        self.copy: list[tuple[int, bytes]] | None = None

    @property
    def pending(self) -> int:
        """Bytes of a block not complete yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Record | Row | dict[str, Any]]:
        if self.failed is not None:
            raise self.failed
        buf = self._buf + data if self._buf else bytes(data)
        out: list[Record | Row | dict[str, Any]] = []
        pos = off = 0
        end = len(buf)
        unpack = _BLOCK_HEAD.unpack_from
        try:
            while end - pos >= 8:
                if self.sections:  # the run of canonical packet blocks, in one call
                    rows, stop = scan(buf, pos, self.offset, len(self.sections[-1].interfaces), self.max_block)
                    if rows:
                        out.extend(rows if self.rows else map(_row_record, rows))
                        if self.copy is not None:  # (each block's bytes: from its offset to the next one's)
                            ends = [r.offset - self.offset for r in rows[1:]]
                            ends.append(stop)
                            self.copy.extend((fmt.BT_EPB, buf[r.offset - self.offset:e]) for r, e in zip(rows, ends))
                        pos = stop
                        if end - pos < 8:
                            break
                btype, total = unpack(buf, pos)
                if total < 12 or total % 4 or total > self.max_block:
                    raise StreamError(f"{self.path}: bad block at stream offset {self.offset + pos}: type "
                                      f"0x{btype:08x}, length {total} (need a multiple of 4, 12..{self.max_block})")
                if end - pos < total:
                    break
                if _U32.unpack_from(buf, pos + total - 4)[0] != total:
                    raise StreamError(f"{self.path}: bad block at stream offset {self.offset + pos}: its trailing "
                                      f"length is not {total}")
                off = self.offset + pos
                body = buf[pos + 8:pos + total - 4]
                if self.copy is not None and btype != fmt.BT_CB:
                    self.copy.append((btype, buf[pos:pos + total]))
                pos += total
                if btype == fmt.BT_EPB:
                    if not self.sections:
                        raise StreamError(f"{self.path}: a packet block at stream offset {off} before any section "
                                          "header")
                    out.append(self._parse_epb(off, body))
                elif btype == fmt.BT_CB:
                    msg = self._custom(off, body)
                    if msg is not None:
                        out.append(msg)
                elif btype == fmt.BT_IDB:
                    if not self.sections:
                        raise StreamError(f"{self.path}: an interface block at stream offset {off} before any "
                                          "section header")
                    self._interface(off, body)
                elif btype == fmt.BT_SHB:
                    self._section(off, body)
                elif not self.sections:
                    raise StreamError(f"{self.path}: the stream starts with block type 0x{btype:08x}, not a "
                                      "pcapng section header")
        except RecordingError as e:  # what the recording reader says, with the stream's name and offset
            why = str(e)
            if not why.startswith(f"{self.path}: "):
                why = f"{self.path}: block at stream offset {off}: {why}"
            self.failed = e if isinstance(e, StreamError) else StreamError(why)
            if not out:
                raise self.failed from None
        self._buf = buf[pos:]
        self.offset += pos
        return out

    def _custom(self, offset: int, body: bytes) -> dict[str, Any] | None:
        if len(body) < 4 or _U32.unpack_from(body)[0] != fmt.PEN:
            return None  # someone else's custom block
        try:
            obj = json.loads(body[4:])
        except (UnicodeDecodeError, ValueError) as e:
            raise StreamError(f"{self.path}: custom block at stream offset {offset} is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise StreamError(f"{self.path}: custom block at stream offset {offset} holds a "
                              f"{type(obj).__name__}, not a message object")
        return obj
