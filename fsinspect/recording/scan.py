"""Packet blocks in the recording writer's canonical layout, taken in bulk: a C scanner or its pure-Python twin.

The live stream's reader gets a chunk of blocks at a time; nearly all of them are packet blocks exactly as
the writer's fast path lays them out (a FUSE message after its exported-PDU tags, then epb_flags,
META_RECORD, optionally the descriptor layout (META_LAYOUT) and META_NUMBER, end of options).  `scan(buf, pos, base, n_ifaces, max_block)` takes the run of
such blocks that starts at `pos`, each as a `Row` tuple, and stops in front of anything else (another
block type, a packet with notes, a block not complete yet, one that breaks the
framing, an interface not defined yet): the caller reads that block with the general parser, which also
says what is wrong with it.  `epb_row` reads one block body the same way (the file reader's fast path).

The other way, `frame(items, start, ifaces, epoch, max_len)` makes the packet blocks of captures in that
layout (with their notes), the bytes the writer's request()/reply() make, from `start` until an item the
writer must make itself (a debugger flag: its note; an INIT request: a new epoch; a queue without its
interface block yet; a message longer than `max_len`, which the writer may snap; anything unusual): the
live stream's blocks, two per exchange on the control hub's thread (writer.BlockEncoder.frame).

`BACKEND` says which scanner runs ("c" or "python"); FSINSPECT_SCAN=python forces the twin (the tests run
on both).  The C scanner (scan_core.c) is given the layout's constants from recording/format.py here.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from . import format as fmt


class Row(NamedTuple):
    """A canonical packet block: the fields of a reader Record without dissector (always FUSE) and notes (never
    present); the descriptor layout as its META_LAYOUT items' bytes (u32 len, u16 flags, u16 0 each), None
    when the block has none (layout_items() reads them)."""

    offset: int
    iface: int
    inbound: bool
    ts_ns: int
    data: bytes
    orig_len: int
    queue: int
    head: int | None
    epoch: int
    flags: int
    n: int
    layout: bytes | None = None


def layout_items(raw: bytes) -> list[tuple[int, int]]:
    """A Row's layout bytes as the reader's Record.layout: (len, flags) per descriptor."""
    return [(ln, fl) for ln, fl, _ in fmt.LAYOUT_ITEM.iter_unpack(raw)]


_U32 = struct.Struct("<I")
_BLOCK_HEAD = struct.Struct("<II")
_EPB_FIXED = struct.Struct("<IIIII")
_EXP_TAG = struct.Struct(">HH")


def _prefix(p2p: int) -> bytes:
    """The exported-PDU tags the writer puts in front of a FUSE message in direction `p2p`."""
    tag = fmt.DISSECTOR_FUSE.encode()
    tag += b"\0" * (-len(tag) % 4)
    return (_EXP_TAG.pack(fmt.EXP_PDU_TAG_DISSECTOR_NAME, len(tag)) + tag
            + struct.pack(">HHi", fmt.EXP_PDU_TAG_P2P_DIRECTION, 4, p2p) + _EXP_TAG.pack(fmt.EXP_PDU_TAG_END_OF_OPT, 0))


PREFIX_IN, PREFIX_OUT = _prefix(fmt.P2P_DIR_RECV), _prefix(fmt.P2P_DIR_SENT)
PREFIXES = {PREFIX_IN: True, PREFIX_OUT: False}  # -> inbound
PREFIX_LEN = len(PREFIX_IN)
_META_FMT = fmt.META_RECORD_STRUCT.format.lstrip("<")
# The options after the (padded) packet: epb_flags, META_RECORD, optionally META_NUMBER, end of options.
TAIL = struct.Struct(f"<HHIHH{_META_FMT}HH")
TAIL_N = struct.Struct(f"<HHIHH{_META_FMT}HH{fmt.META_NUMBER_STRUCT.format.lstrip('<')}HH")
_TAIL_KEY = (fmt.EPB_FLAGS, 4, fmt.OPT_CUSTOM_BIN, fmt.META_RECORD_STRUCT.size, fmt.PEN, fmt.META_RECORD)
_NUMBER_KEY = (fmt.OPT_CUSTOM_BIN, fmt.META_NUMBER_STRUCT.size, fmt.PEN, fmt.META_NUMBER)
_LAYOUT_HEAD = struct.Struct("<HHIH")  # option code, size, PEN, kind (the items follow a reserved u16)
_DIR_MASK = 3


def epb_row(body: bytes, offset: int, start: int = 0, stop: int | None = None) -> Row | None:
    """The packet block whose body is `body[start:stop]`, if it is in the canonical layout; else None."""
    if stop is None:
        stop = len(body)
    blen = stop - start
    if blen < 20 + PREFIX_LEN:
        return None
    iface, ts_hi, ts_lo, caplen, origlen = _EPB_FIXED.unpack_from(body, start)
    pre = PREFIXES.get(body[start + 20:start + 20 + PREFIX_LEN])
    if pre is None or caplen < PREFIX_LEN:
        return None
    end = 20 + caplen
    tail = end + (-caplen % 4)
    rest = blen - tail
    layout = None
    at = start + tail  # the options after epb_flags and META_RECORD (32 bytes)
    if rest >= TAIL.size + 12 and (lh := _LAYOUT_HEAD.unpack_from(body, at + 32))[0] == fmt.OPT_CUSTOM_BIN \
            and lh[1] >= 8 and lh[2:] == (fmt.PEN, fmt.META_LAYOUT):
        size = lh[1]
        if (size - 8) % 8 or rest < TAIL.size + 4 + size:
            return None
        layout = body[at + 44:at + 36 + size]
        body = body[:at + 32] + body[at + 36 + size:start + blen]  # (what follows is as without it)
        rest -= 4 + size
    if rest == TAIL.size:
        t = TAIL.unpack_from(body, start + tail)
        number = 0
        if t[12] != fmt.OPT_ENDOFOPT:
            return None
    elif rest == TAIL_N.size:
        t = TAIL_N.unpack_from(body, start + tail)
        if t[12:16] != _NUMBER_KEY or t[18] != fmt.OPT_ENDOFOPT:
            return None
        number = t[17]
    else:
        return None
    if (t[0], t[1], t[3], t[4], t[5], t[6]) != _TAIL_KEY:
        return None
    d = t[2] & _DIR_MASK
    flags = t[9]
    pdu = body[start + 20 + PREFIX_LEN:start + end]
    orig = origlen - PREFIX_LEN
    if flags & fmt.RF_SNAPPED and orig == len(pdu) >= 4:
        # Older proxies recorded the captured length as the original length of a chain they cut: the
        # message's own header still says how long it was.
        orig = max(orig, _U32.unpack_from(pdu)[0])
    h = t[10]
    return Row(offset, iface, d == fmt.DIR_INBOUND if d else pre, (ts_hi << 32) | ts_lo, pdu, orig, t[8],
               None if h == fmt.NO_HEAD else h, t[11], flags, number, layout)


def scan_python(buf: bytes, pos: int, base: int, n_ifaces: int, max_block: int) -> tuple[list[Row], int]:
    """The twin of the C scanner: the run of canonical packet blocks from `pos`, and where it stopped."""
    out: list[Row] = []
    end = len(buf)
    unpack = _BLOCK_HEAD.unpack_from
    while end - pos >= 8:
        btype, total = unpack(buf, pos)
        if (btype != fmt.BT_EPB or total < 12 or total % 4 or total > max_block or end - pos < total
                or _U32.unpack_from(buf, pos + total - 4)[0] != total):
            break
        row = epb_row(buf, base + pos, pos + 8, pos + total - 4)
        if row is None or row.iface >= n_ifaces:
            break
        out.append(row)
        pos += total
    return out, pos


Scan = Callable[[bytes, int, int, int, int], tuple[list[Row], int]]
# A capture to frame: (inbound, data, queue, head, ts_ns, orig_len, notes, flags, n[, layout]); n 0 for none,
# layout a tuple of (len, flags) per descriptor (or None).
Item = tuple[Any, ...]
Frame = Callable[[list[Item], int, dict[int, int], int, int], tuple[list[bytes], int]]
_OP_INIT = 26  # (fuse.h FUSE_INIT; checked against the spec by the tests)
_EPB_HEAD = struct.Struct(f"<7I{PREFIX_LEN}s")
_FLAGS_META = struct.Struct(f"<HHIHH{_META_FMT}")
_NUMBER = struct.Struct(f"<HH{fmt.META_NUMBER_STRUCT.format.lstrip('<')}")
_OPT = struct.Struct("<HH")
_END = struct.Struct("<HHI")
_LAYOUT_OPT = struct.Struct("<HHIHH")
_MAX_NOTES = 16
_MAX_DESCS = 64
_U16, _U32_MAX, _U64_MAX = 0xFFFF, 0xFFFFFFFF, (1 << 64) - 1
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")


def _framable(item: object, ifaces: dict[int, int], max_len: int) -> tuple[int, list[bytes]] | None:
    """(interface, the notes as UTF-8) if the twin frames this item, else None (the writer makes it)."""
    if type(item) is not tuple or len(item) not in (9, 10):
        return None
    inbound, data, queue, head, ts, orig, notes, flags, n = item[:9]
    if (type(data) is not bytes or len(data) > max_len or type(notes) is not list or len(notes) > _MAX_NOTES
            or type(queue) is not int or not 0 <= queue <= _U16 or type(flags) is not int or not 0 <= flags <= _U16
            or flags & fmt.RF_DEBUGGER or type(ts) is not int or not 0 <= ts <= _U64_MAX or type(n) is not int
            or not 0 <= n <= _U64_MAX or type(orig) is not int
            or (head is not None and (type(head) is not int or not 0 <= head <= _U32_MAX))):
        return None
    if inbound and len(data) >= 8 and _U32.unpack_from(data, 4)[0] == _OP_INIT:
        return None
    iface = ifaces.get(queue)
    if type(iface) is not int or not 0 <= iface <= _U32_MAX:
        return None
    texts = []
    for note in notes:
        if type(note) is not str:
            return None
        try:
            text = note.encode()
        except UnicodeEncodeError:
            return None
        if len(text) > _U16:
            return None
        texts.append(text)
    if len(item) == 10 and item[9] is not None and _packed_layout(item[9]) is None:
        return None
    return iface, texts


def _packed_layout(layout: object) -> bytes | None:
    """A layout tuple as its META_LAYOUT items, or None if the twin does not frame it."""
    if type(layout) is not tuple or len(layout) > _MAX_DESCS:
        return None
    out = []
    for d in layout:
        if type(d) is not tuple or len(d) != 2:
            return None
        ln, fl = d
        if type(ln) is not int or not 0 <= ln <= _U32_MAX or type(fl) is not int or not 0 <= fl <= _U16:
            return None
        out.append(fmt.LAYOUT_ITEM.pack(ln, fl, 0))
    return b"".join(out)


def frame_python(items: list[Item], start: int, ifaces: dict[int, int], epoch: int,
                 max_len: int) -> tuple[list[bytes], int]:
    """The twin of the C framer: the packet blocks of items[start:] up to the first the writer must make."""
    out: list[bytes] = []
    i = max(start, 0)
    while i < len(items):
        ok = _framable(items[i], ifaces, max_len)
        if ok is None:
            break
        iface, texts = ok
        inbound, data, queue, head, ts, orig, _notes, flags, n = items[i][:9]
        lay = _packed_layout(items[i][9]) if len(items[i]) == 10 and items[i][9] is not None else b""
        caplen = PREFIX_LEN + len(data)
        pad = _PADS[caplen & 3]
        opts = b"".join(_OPT.pack(fmt.OPT_COMMENT, len(t)) + t + _PADS[len(t) & 3] for t in texts)
        lay_opt = _LAYOUT_OPT.pack(fmt.OPT_CUSTOM_BIN, 8 + len(lay), fmt.PEN, fmt.META_LAYOUT, 0) + lay if lay else b""
        total = (_EPB_HEAD.size + len(data) + len(pad) + _FLAGS_META.size + len(lay_opt) + (_NUMBER.size if n else 0)
                 + len(opts) + _END.size)
        orig = max(orig, len(data))
        if total > _U32_MAX or PREFIX_LEN + orig > _U32_MAX:
            break
        out.append(b"".join((
            _EPB_HEAD.pack(fmt.BT_EPB, total, iface, ts >> 32, ts & _U32_MAX, caplen, PREFIX_LEN + orig,
                           PREFIX_IN if inbound else PREFIX_OUT),
            data, pad,
            _FLAGS_META.pack(fmt.EPB_FLAGS, 4, fmt.DIR_INBOUND if inbound else fmt.DIR_OUTBOUND, fmt.OPT_CUSTOM_BIN,
                             fmt.META_RECORD_STRUCT.size, fmt.PEN, fmt.META_RECORD, 0, queue, flags,
                             fmt.NO_HEAD if head is None else head, epoch),
            lay_opt,
            _NUMBER.pack(fmt.OPT_CUSTOM_BIN, fmt.META_NUMBER_STRUCT.size, fmt.PEN, fmt.META_NUMBER, 0, n) if n else b"",
            opts, _END.pack(fmt.OPT_ENDOFOPT, 0, total))))
        i += 1
    return out, i


def _load() -> tuple[str, Scan, Frame]:
    """The C scanner and framer, configured (the tests compare them with the twins even when
    FSINSPECT_SCAN=python)."""
    try:
        from . import _scan  # type: ignore[attr-defined]
    except ImportError:
        return "python", scan_python, frame_python
    _scan.configure(prefix_in=PREFIX_IN, prefix_out=PREFIX_OUT, bt_epb=fmt.BT_EPB,
                    opt_epb_flags=fmt.EPB_FLAGS, opt_custom_bin=fmt.OPT_CUSTOM_BIN, opt_end=fmt.OPT_ENDOFOPT,
                    meta_record=fmt.META_RECORD, meta_number=fmt.META_NUMBER,
                    meta_record_size=fmt.META_RECORD_STRUCT.size, meta_number_size=fmt.META_NUMBER_STRUCT.size,
                    pen=fmt.PEN, no_head=fmt.NO_HEAD, dir_mask=_DIR_MASK, dir_inbound=fmt.DIR_INBOUND,
                    rf_snapped=fmt.RF_SNAPPED, tail=TAIL.size, tail_n=TAIL_N.size, row_type=Row,
                    dir_outbound=fmt.DIR_OUTBOUND, opt_comment=fmt.OPT_COMMENT, rf_debugger=fmt.RF_DEBUGGER,
                    op_init=_OP_INIT, meta_layout=fmt.META_LAYOUT)
    if os.environ.get("FSINSPECT_SCAN", "").lower() == "python":
        return "python", scan_python, frame_python
    return "c", _scan.scan, _scan.frame


BACKEND, scan, frame = _load()
