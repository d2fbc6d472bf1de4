"""Append-only pcapng writer for FUSE traffic (see recordings/FORMAT.md).

Crash safety: blocks are assembled in memory and handed to the kernel only as whole blocks, with one
write per flush, so a `kill -9` leaves a file that reads cleanly up to the last flushed block (a torn
final write is reported by the reader as a truncated tail).  Flushes happen when the buffer passes
`flush_bytes`, or on the first record `flush_interval` seconds after the previous flush, so a live
capture is never far behind; a capturer that may sit idle calls `flush()` from its own timer.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from dissectors.spec import fuse as fspec

from .. import __version__, privfile
from . import format as fmt
from . import scan
from .indexfile import CHECK, IndexFile, content_check, try_lock
from .parts import ANALYSIS_SUFFIX, INDEX_SUFFIX, part_path, side_file

_OP_INIT = fspec.OPCODE_BY_NAME["INIT"].value
_OP_READ = fspec.OPCODE_BY_NAME["READ"].value
_OP_WRITE = fspec.OPCODE_BY_NAME["WRITE"].value
_WRITE_HEAD = fspec.IN_HEADER_SIZE + fspec.REGISTRY.sizeof("fuse_write_in")
_READ_HEAD = fspec.OUT_HEADER_SIZE

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_EPB_HEAD_SIZE = 28  # type, total length, iface, ts high, ts low, caplen, origlen
_META = fmt.META_RECORD_STRUCT.format.lstrip("<")
# The fixed options of every record: epb_flags and META_RECORD, then either more options or the end.
_EPB_FLAGS_META = struct.Struct("<HHI" + "HH" + _META)
_EPB_END = struct.Struct("<HHI")
_OPT_HDR = struct.Struct("<HH")
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")
# Fast path (no layout, no notes): the padding, both options, end of options and trailing length in one
# pack, indexed by caplen % 4.
_TAILS = tuple(struct.Struct(f"<{(4 - r) % 4}xHHIHH{_META}HHI") for r in range(4))
_TAIL_SIZE = tuple(t.size for t in _TAILS)
# The same with the exchange number (META_NUMBER) between META_RECORD and the end: the live stream's records.
_META_N = fmt.META_NUMBER_STRUCT.format.lstrip("<")
_TAILS_N = tuple(struct.Struct(f"<{(4 - r) % 4}xHHIHH{_META}HH{_META_N}HHI") for r in range(4))
_TAIL_N_SIZE = tuple(t.size for t in _TAILS_N)


def _option(code: int, value: bytes) -> bytes:
    return _OPT_HDR.pack(code, len(value)) + value + b"\0" * (-len(value) % 4)


def _options(opts: Iterable[tuple[int, bytes]]) -> bytes:
    body = b"".join(_option(c, v) for c, v in opts)
    return body + _OPT_HDR.pack(fmt.OPT_ENDOFOPT, 0) if body else b""


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", btype, total) + body + struct.pack("<I", total)


def _custom_json(obj: dict[str, Any]) -> tuple[int, bytes]:
    return fmt.OPT_CUSTOM_STR, struct.pack("<I", fmt.PEN) + json.dumps(obj, sort_keys=True).encode()


def _exp_pdu_prefix(dissector: str, p2p_dir: int) -> bytes:
    name = dissector.encode()
    name += b"\0" * (-len(name) % 4)
    return (struct.pack(">HH", fmt.EXP_PDU_TAG_DISSECTOR_NAME, len(name)) + name
            + struct.pack(">HHi", fmt.EXP_PDU_TAG_P2P_DIRECTION, 4, p2p_dir)
            + struct.pack(">HH", fmt.EXP_PDU_TAG_END_OF_OPT, 0))


_LAYOUT_OPTS: dict[tuple[tuple[int, int], ...], bytes] = {}  # a guest sends few chain shapes: pack each once


def _layout_option(layout: tuple[tuple[int, int], ...]) -> bytes:
    opt = _LAYOUT_OPTS.get(layout)
    if opt is None:
        lay = struct.pack("<IHH", fmt.PEN, fmt.META_LAYOUT, 0) + b"".join(
            fmt.LAYOUT_ITEM.pack(ln, fl, 0) for ln, fl in layout)
        opt = _option(fmt.OPT_CUSTOM_BIN, lay)
        if len(_LAYOUT_OPTS) < 4096:
            _LAYOUT_OPTS[layout] = opt
    return opt


_PREFIX: dict[tuple[str, int], bytes] = {
    (fmt.DISSECTOR_FUSE, fmt.DIR_INBOUND): _exp_pdu_prefix(fmt.DISSECTOR_FUSE, fmt.P2P_DIR_RECV),
    (fmt.DISSECTOR_FUSE, fmt.DIR_OUTBOUND): _exp_pdu_prefix(fmt.DISSECTOR_FUSE, fmt.P2P_DIR_SENT),
    (fmt.DISSECTOR_VHOST_USER, fmt.DIR_INBOUND): _exp_pdu_prefix(fmt.DISSECTOR_VHOST_USER, fmt.P2P_DIR_RECV),
    (fmt.DISSECTOR_VHOST_USER, fmt.DIR_OUTBOUND): _exp_pdu_prefix(fmt.DISSECTOR_VHOST_USER, fmt.P2P_DIR_SENT),
}


def host_info() -> dict[str, str]:
    u = platform.uname()
    return {"host": socket.gethostname(), "kernel": f"{u.system} {u.release} {u.machine}"}


_NO_MAX = 1 << 62  # (the writer snapped what it snaps before framing)


class RecordingWriter:
    """Writes one recording (and its rotated continuations).  Not thread-safe: feed it from one thread.

    `source` is "virtio" (alias "vhost-user": one interface per virtqueue) or "fusedev" (one interface
    for /dev/fuse).
    The INIT epoch is counted here (every INIT request starts a new one) unless the caller passes it.
    `init` puts an INIT met before the first record in the section header (as a rotated part has it).
    `rotate_mb` > 0 continues in FILE.001.pcapng, … once a part holds that much (a part ends on a block
    boundary, so each is a complete recording); `rotate_keep` > 0 deletes the oldest parts beyond that
    many, so a recorder that runs for weeks uses at most about rotate_keep x rotate_mb on disk.
    `stream` writes to an fd the caller owns (stdout piped into tshark, an extcap FIFO) instead of creating
    `path`: the same blocks, no rotation, and the fd is left open.  `sink` gets each flush's bytes instead
    of any fd (BlockEncoder: the control hub's live stream).
    """

    def __init__(self, path: str | os.PathLike[str], *, source: str = "virtio", backend: str = "",
                 comments: Sequence[str] = (), snaplen: int = fmt.DEFAULT_SNAPLEN, rotate_mb: float = 0,
                 flush_bytes: int = 1 << 18, flush_interval: float = 0.2, mode: int = privfile.DEFAULT_MODE,
                 init: dict[str, Any] | None = None, rotate_keep: int = 0, stream: int | None = None,
                 sink: Callable[[bytes], None] | None = None, index: bool = True) -> None:
        if source == "vhost-user":  # a vhost-user back-end's traffic is virtqueue traffic
            source = "virtio"
        if source not in ("virtio", "fusedev"):
            raise ValueError(f"source must be virtio (or vhost-user) or fusedev, not {source!r}")
        if snaplen < 0:
            raise ValueError("snaplen must be >= 0")
        if rotate_mb < 0 or rotate_keep < 0:
            raise ValueError("rotate_mb and rotate_keep must be >= 0")
        if (stream is not None or sink is not None) and rotate_mb:
            raise ValueError("a stream cannot rotate")
        self.stream = stream
        self._sink = sink
        # Frames each FUSE packet block in one call (recording/scan.py: C, or its twin) where it can, the same
        # bytes as _epb's Python below (None: always that; the tests' reference).
        self.framer: scan.Frame | None = scan.frame
        self.base = Path(path)
        self.source = source
        self.backend = backend
        self.comments = list(comments)
        self.snaplen = snaplen
        self.mode = mode  # every part is created with it (0600: the guest's file names and data)
        self.rotate_bytes = int(rotate_mb * 1024 * 1024)
        self.rotate_keep = rotate_keep
        self.id = uuid.uuid4().hex  # in every part's header: the parts of this run, not an older one's
        self.removed: list[Path] = []  # parts deleted for rotate_keep
        self.flush_bytes = flush_bytes
        self.flush_interval = flush_interval
        self.paths: list[Path] = []
        self.epoch = 0
        self.records = 0
        self._fd = -1
        self._buf: list[bytes] = []
        self._buffered = 0
        self._written = 0
        self._last_flush = time.monotonic()
        self._ifaces: dict[tuple[str, int], int] = {}
        self._fuse_ifaces: dict[int, int] = {}  # queue -> its FUSE interface (the framer's)
        # Per queue: (interface id, exported-PDU prefix + struct for the head, direction) for the hot path.
        self._req_chan: dict[int, tuple[int, struct.Struct, bytes, int]] = {}
        self._rep_chan: dict[int, tuple[int, struct.Struct, bytes, int]] = {}
        self._reads: set[tuple[int, int]] = set()  # READ requests in flight, for snapping their replies
        self._init_key: tuple[int, int] | None = None
        self._init: dict[str, Any] | None = init  # an INIT from before this file's first record (export)
        # The current part's section header and interface blocks, in order: what a reader joining the blocks
        # mid-way needs first (the control hub's binary clients, start_tee).
        self.section: list[bytes] = []
        # start_tee(): the FUSE packet blocks made since the last take_tee(), as the parts _buf got, and the
        # section header and interface blocks among them (kept apart, in order: see take_tee).
        self._tee: list[bytes] | None = None
        self._tee_out: list[tuple[bool, bytes, int]] = []
        self._tee_records = 0
        # Later parts are created (and old ones removed) relative to the directory as it is now: the daemon's
        # sandbox may have moved the thread that rotates to another root meanwhile (daemon/sandbox.py).
        self._dir_fd = -1 if stream is not None or sink is not None or not rotate_mb else \
            os.open(self.base.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._base = 0  # offset of the current part in the parts back to back
        self._index: IndexFile | None = None
        self._check_head = b""  # the first and last CHECK bytes written: the index's content check
        self._check_tail = b""
        self._indexed = index and stream is None and sink is None
        # One index for the parts back to back, beside part 0; with rotate_keep, whose oldest parts go (and
        # with them the offsets of the rest), one per part, from that part's start: a reader opening the
        # recording at the oldest part kept takes that part's index and extends it over the later ones.
        self._index_per_part = bool(rotate_keep)
        self._index_base = 0  # the index's offset 0 in the parts back to back
        if self._indexed and not self._index_per_part:
            self._open_index(part_path(self.base, 0))
        self._open_part()

    # -- public API ------------------------------------------------------------------------------
    def request(self, raw: bytes | bytearray | memoryview, queue: int = 0, head: int | None = None,
                ts_ns: int | None = None, *, epoch: int | None = None, layout: Sequence[tuple[int, int]] = (),
                flags: int = 0, notes: Sequence[str] = (), orig_len: int | None = None, n: int | None = None) -> None:
        """Record a request (guest/kernel -> FUSE server).  `head` is the descriptor head index.

        `orig_len` is the message's length on the wire when `raw` holds only its first bytes (the proxy
        captures at most a snap length of each chain); it becomes the EPB original length.  `n`: the
        source's exchange number, as a META_NUMBER option (the live stream).
        """
        if raw.__class__ is not bytes:
            raw = bytes(raw)
        orig = len(raw) if orig_len is None else max(orig_len, len(raw))
        opcode = _U32.unpack_from(raw, 4)[0] if orig >= 8 else 0
        if epoch is not None:
            self.epoch = epoch
        if opcode == _OP_READ:
            self._reads.add((queue, head if head is not None else self._unique(raw)))
        elif opcode == _OP_WRITE:
            if self.snaplen and len(raw) > _WRITE_HEAD + self.snaplen:
                raw = raw[:_WRITE_HEAD + self.snaplen]
                flags |= fmt.RF_SNAPPED
        elif opcode == _OP_INIT:
            if epoch is None:
                self.epoch += 1
            self._init_key = (queue, head if head is not None else self._unique(raw))
            self._init = {"epoch": self.epoch, "request": raw.hex(), "reply": None}
        if flags & fmt.RF_DEBUGGER:
            notes = [*notes, fmt.debugger_comment(flags)]
        chan = self._req_chan.get(queue) or self._channel(fmt.DISSECTOR_FUSE, fmt.DIR_INBOUND, queue)
        if self._index is not None:
            self._index.packet(self._base - self._index_base + self._written + self._buffered, True, queue, head,
                               self.epoch, raw)
        self._epb(chan, queue, raw, orig, head, ts_ns, flags, layout, notes, n, True, not flags & fmt.RF_DECODE_ERROR)

    def reply(self, raw: bytes | bytearray | memoryview, queue: int = 0, head: int | None = None,
              ts_ns: int | None = None, *, epoch: int | None = None, layout: Sequence[tuple[int, int]] = (),
              flags: int = 0, notes: Sequence[str] = (), orig_len: int | None = None, n: int | None = None) -> None:
        """Record a reply or notification (FUSE server -> guest/kernel); `orig_len` and `n` as for request()."""
        if raw.__class__ is not bytes:
            raw = bytes(raw)
        if epoch is not None:
            self.epoch = epoch
        orig = len(raw) if orig_len is None else max(orig_len, len(raw))
        if self._reads or self._init_key is not None:
            key = (queue, head if head is not None else self._unique(raw))
            if key == self._init_key and self._init is not None:
                self._init["reply"] = raw.hex()
                self._init_key = None
            if key in self._reads:
                self._reads.discard(key)
                if self.snaplen and len(raw) > _READ_HEAD + self.snaplen:
                    raw = raw[:_READ_HEAD + self.snaplen]
                    flags |= fmt.RF_SNAPPED
        if flags & fmt.RF_DEBUGGER:
            notes = [*notes, fmt.debugger_comment(flags)]
        chan = self._rep_chan.get(queue) or self._channel(fmt.DISSECTOR_FUSE, fmt.DIR_OUTBOUND, queue)
        if self._index is not None:
            self._index.packet(self._base - self._index_base + self._written + self._buffered, False, queue, head,
                               self.epoch, raw)
        self._epb(chan, queue, raw, orig, head, ts_ns, flags, layout, notes, n, True, True)

    @staticmethod
    def _unique(raw: bytes) -> int:
        return _U64.unpack_from(raw, 8)[0] if len(raw) >= 16 else 0

    def control(self, raw: bytes | bytearray | memoryview, *, from_frontend: bool, ts_ns: int | None = None,
                notes: Sequence[str] = ()) -> None:
        """Record a vhost-user message (front-end = QEMU side, inbound; back-end side, outbound)."""
        raw = bytes(raw)
        direction = fmt.DIR_INBOUND if from_frontend else fmt.DIR_OUTBOUND
        self._epb(self._channel(fmt.DISSECTOR_VHOST_USER, direction, 0), 0, raw, len(raw), None, ts_ns, 0, (),
                  notes)

    def start_tee(self) -> None:
        """From now on keep the FUSE packet blocks this writer makes (request/reply: not control messages) for
        take_tee() too, as well as the section header and interface blocks among them: the same bytes go to
        the recording and to the control hub's binary clients, built once."""
        if self._tee is None:
            self._tee = []

    def take_tee(self) -> list[tuple[bool, bytes, int]]:
        """What start_tee() kept since the last call, in order: (True, one section header or interface block,
        1) for a block every reader must get, and (False, packet blocks back to back, how many)."""
        tee = self._tee
        if tee is None:
            return []
        out = self._tee_out
        if tee:
            out.append((False, b"".join(tee), self._tee_records))
            tee.clear()
            self._tee_records = 0
        if not out:
            return out
        self._tee_out = []
        return out

    def _tee_header(self, blk: bytes) -> None:
        """A section header or interface block: after the packet blocks kept so far, before those that follow."""
        tee = self._tee
        if tee is not None:
            if tee:
                self._tee_out.append((False, b"".join(tee), self._tee_records))
                tee.clear()
                self._tee_records = 0
            self._tee_out.append((True, blk, 1))

    def append_blocks(self, data: bytes,
                      packets: Iterable[tuple[int, bool, int, int | None, int, bytes]] = ()) -> None:
        """Whole blocks made elsewhere (the live stream's own, copied), after everything written so far.
        `packets`: the FUSE packet blocks among them as (offset in `data`, inbound, queue, head, epoch, PDU),
        which the side index takes as it takes the writer's own (else a reader finds none of them)."""
        if self._index is not None:
            at = self._base - self._index_base + self._written + self._buffered
            for off, inbound, queue, head, epoch, pdu in packets:
                self._index.packet(at + off, inbound, queue, head, epoch, pdu)
        self._buf.append(data)
        self._buffered += len(data)
        self.flush()

    def flush(self) -> None:
        """Hand every complete buffered block to the kernel in one write; rotate once a part is full."""
        if not self._buf:
            return
        self._write_out()
        if self.rotate_bytes and self._written >= self.rotate_bytes:
            self._checkpoint(last=True)  # (a part's own index ends with it)
            os.close(self._fd)
            self._fd = -1
            self._base += self._written
            self._open_part()
        self._checkpoint()

    def _write_out(self) -> None:
        data = b"".join(self._buf)
        self._buf.clear()
        self._buffered = 0
        if self._sink is not None:
            self._sink(data)
            view = memoryview(b"")
        else:
            view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        if self._index is not None:
            if len(self._check_head) < CHECK:
                self._check_head += data[:CHECK - len(self._check_head)]
            self._check_tail = (self._check_tail + data[-CHECK:])[-CHECK:]
        self._written += len(data)
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._fd < 0:
            return
        self.flush()
        self._checkpoint(last=True)
        self._close_index()
        if self.stream is None and self._sink is None:
            os.close(self._fd)
        self._fd = -1
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------
    def _open_index(self, part: Path) -> None:
        """The side index beside `part`, written as the recording is (recording/indexfile.py), locked while it
        is: a reader that opens the recording meanwhile indexes it on its own.  Without it the recording still
        records."""
        path = side_file(part, INDEX_SUFFIX)
        self._index_base = self._base
        self._check_head = self._check_tail = b""
        try:
            fd = privfile.create(path.name if self._dir_fd >= 0 else path, self.mode,
                                 dir_fd=self._dir_fd if self._dir_fd >= 0 else None)
        except OSError:
            return
        os.close(fd)
        fd = os.open(path.name if self._dir_fd >= 0 else path, os.O_RDWR | os.O_CLOEXEC,
                     dir_fd=self._dir_fd if self._dir_fd >= 0 else None)
        try_lock(fd)
        self._index = IndexFile(fd)

    def _checkpoint(self, *, last: bool = False) -> None:
        """The index accounts for everything written so far (called after each write of whole blocks)."""
        if self._index is not None and not self._buf:
            self._index.checkpoint(self._base - self._index_base + self._written,
                                   content_check(self._check_head, self._check_tail), last=last)

    def _close_index(self) -> None:
        if self._index is not None:
            assert self._index.fd is not None
            os.close(self._index.fd)  # (and its lock)
            self._index = None

    def _open_part(self) -> None:
        """Start the next part with its section header, written at once and never counted towards
        rotation (a threshold below a header's size rotated again from inside the rotation)."""
        n = len(self.paths)
        path = part_path(self.base, n)
        self.paths.append(path)
        if self._sink is not None:
            self._fd = 0  # not used: flushes go to the sink
        elif self.stream is not None:
            self._fd = self.stream
        elif self._dir_fd >= 0:
            self._fd = privfile.create(path.name, self.mode, append=True, dir_fd=self._dir_fd)
        else:
            self._fd = privfile.create(path, self.mode, append=True)
        self._written = 0
        if self._indexed and self._index_per_part:
            self._close_index()
            self._open_index(path)
        self._ifaces = {}
        self._fuse_ifaces = {}
        self._req_chan = {}
        self._rep_chan = {}
        info = host_info()
        meta: dict[str, Any] = {"format": fmt.FORMAT_VERSION, "tool": f"fsinspect {__version__}",
                                "source": self.source, "backend": self.backend, "snaplen": self.snaplen,
                                "part": n, "recording": self.id, **info}
        if self._init is not None:
            meta["init"] = self._init
        opts = [(fmt.SHB_USERAPPL, f"fsinspect {__version__}".encode()), (fmt.SHB_OS, info["kernel"].encode()),
                (fmt.SHB_HARDWARE, info["host"].encode())]
        opts += [(fmt.OPT_COMMENT, c.encode()) for c in self.comments]
        opts.append(_custom_json(meta))
        body = struct.pack("<IHHq", fmt.BYTE_ORDER_MAGIC, fmt.PCAPNG_MAJOR, fmt.PCAPNG_MINOR, -1) + _options(opts)
        shb = _block(fmt.BT_SHB, body)
        self.section = [shb]
        self._tee_header(shb)
        self._buf.append(shb)
        self._write_out()
        if self.rotate_keep:
            while len(self.paths) - len(self.removed) > self.rotate_keep:
                old = self.paths[len(self.removed)]
                for gone in (old, side_file(old, INDEX_SUFFIX), side_file(old, ANALYSIS_SUFFIX)):
                    try:  # its index and analysis were made stale by the deletion
                        os.unlink(gone.name, dir_fd=self._dir_fd)
                    except FileNotFoundError:
                        pass
                self.removed.append(old)

    def _iface(self, dissector: str, queue: int) -> int:
        key = (dissector, queue)
        idx = self._ifaces.get(key)
        if idx is not None:
            return idx
        if dissector == fmt.DISSECTOR_VHOST_USER:
            name, desc, kind = "vhost-user", "vhost-user control messages", fmt.IF_KIND_VHOST_USER
        elif self.source == "fusedev":
            name, desc, kind = "fusedev", "/dev/fuse", fmt.IF_KIND_FUSEDEV
        else:
            role = "hiprio" if queue == 0 else "request"
            name, desc, kind = f"vq{queue}", f"virtqueue {queue} ({role})", fmt.IF_KIND_VIRTQUEUE
        opts = [(fmt.IF_NAME, name.encode()), (fmt.IF_DESCRIPTION, desc.encode()), (fmt.IF_TSRESOL, b"\x09"),
                _custom_json({"kind": kind, "queue": queue})]
        body = struct.pack("<HHI", fmt.LINKTYPE_WIRESHARK_UPPER_PDU, 0, 0) + _options(opts)
        blk = _block(fmt.BT_IDB, body)
        self.section.append(blk)
        self._tee_header(blk)
        self._buf.append(blk)
        self._buffered += len(blk)
        idx = self._ifaces[key] = len(self._ifaces)
        if dissector == fmt.DISSECTOR_FUSE:
            self._fuse_ifaces[queue] = idx
        return idx

    def _channel(self, dissector: str, direction: int, queue: int) -> tuple[int, struct.Struct, bytes, int]:
        iface = self._ifaces.get((dissector, queue))
        if iface is None:
            iface = self._iface(dissector, queue)
        prefix = _PREFIX[(dissector, direction)]
        chan = (iface, struct.Struct(f"<7I{len(prefix)}s"), prefix, direction)
        if dissector == fmt.DISSECTOR_FUSE:
            (self._req_chan if direction == fmt.DIR_INBOUND else self._rep_chan)[queue] = chan
        return chan

    def _epb(self, chan: tuple[int, struct.Struct, bytes, int], queue: int, raw: bytes, orig: int,
             head: int | None, ts_ns: int | None, flags: int, layout: Sequence[tuple[int, int]],
             notes: Sequence[str], n: int | None = None, fuse: bool = False, tee: bool = False) -> None:
        iface, head_struct, prefix, direction = chan
        if ts_ns is None:
            ts_ns = time.time_ns()
        framer = self.framer
        if fuse and framer is not None:  # one call to the framer (C), which leaves odd records to the code below
            blocks, done = framer([(direction == fmt.DIR_INBOUND, raw, queue, head, ts_ns, orig,
                                    notes if notes.__class__ is list else list(notes), flags, n or 0,
                                    layout if layout.__class__ is tuple else tuple(layout))],
                                  0, self._fuse_ifaces, self.epoch, _NO_MAX)
            if done:
                blk = blocks[0]
                self._buf.append(blk)
                self._end_record(len(blk), (blk,) if tee else ())
                return
        plen = len(prefix)
        caplen = plen + len(raw)
        r = caplen & 3
        if head is None:
            head = fmt.NO_HEAD
        parts = self._buf
        if not layout and not notes:
            meta = (fmt.EPB_FLAGS, 4, direction, fmt.OPT_CUSTOM_BIN, fmt.META_RECORD_STRUCT.size, fmt.PEN,
                    fmt.META_RECORD, 0, queue, flags, head, self.epoch)
            total = _EPB_HEAD_SIZE + caplen + (_TAIL_SIZE[r] if n is None else _TAIL_N_SIZE[r])
            parts.append(head_struct.pack(fmt.BT_EPB, total, iface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, caplen,
                                          plen + orig, prefix))
            parts.append(raw)
            if n is None:
                parts.append(_TAILS[r].pack(*meta, fmt.OPT_ENDOFOPT, 0, total))
            else:
                parts.append(_TAILS_N[r].pack(*meta, fmt.OPT_CUSTOM_BIN, fmt.META_NUMBER_STRUCT.size, fmt.PEN,
                                              fmt.META_NUMBER, 0, n, fmt.OPT_ENDOFOPT, 0, total))
        else:
            extra = _layout_option(layout if layout.__class__ is tuple else tuple(layout)) if layout else b""
            if n is not None:
                extra += _option(fmt.OPT_CUSTOM_BIN, fmt.META_NUMBER_STRUCT.pack(fmt.PEN, fmt.META_NUMBER, 0, n))
            for note in notes:
                extra += _option(fmt.OPT_COMMENT, note.encode())
            pad = _PADS[r]
            total = _EPB_HEAD_SIZE + caplen + len(pad) + _EPB_FLAGS_META.size + len(extra) + _EPB_END.size
            parts.append(head_struct.pack(fmt.BT_EPB, total, iface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, caplen,
                                          plen + orig, prefix))
            parts.append(raw)
            parts.append(pad + _EPB_FLAGS_META.pack(fmt.EPB_FLAGS, 4, direction, fmt.OPT_CUSTOM_BIN,
                                                    fmt.META_RECORD_STRUCT.size, fmt.PEN, fmt.META_RECORD, 0,
                                                    queue, flags, head, self.epoch)
                         + extra + _EPB_END.pack(fmt.OPT_ENDOFOPT, 0, total))
        self._end_record(total, parts[-3:] if tee else ())

    def _end_record(self, total: int, tee: Sequence[bytes]) -> None:
        """A record of `total` bytes is buffered (its parts `tee` go to start_tee()'s list too): flush if due."""
        self.records += 1
        if tee and self._tee is not None:  # (before a flush takes them)
            self._tee += tee
            self._tee_records += 1
        self._buffered += total
        if (self._buffered >= self.flush_bytes or time.monotonic() - self._last_flush >= self.flush_interval
                or (self.rotate_bytes and self._written + self._buffered >= self.rotate_bytes)):
            self.flush()


class BlockEncoder(RecordingWriter):
    """A recording's blocks in memory: the control hub's binary live stream (one encoder for every client).

    `header` holds the section header and every interface block so far, in order: what a reader that joins
    now needs before the blocks `take()` returns from then on.  A new interface block is not in what
    `take()` returns but in `fresh` (the caller hands it to every reader, even one that misses the packets
    around it, and clears it).  `custom_block(obj)` wraps a control-protocol message, which a recording
    never holds.
    """

    def __init__(self, *, source: str = "virtio", snaplen: int = 0, comments: Sequence[str] = ()) -> None:
        self._out: list[bytes] = []
        self.header: list[bytes] = []
        self.fresh: list[bytes] = []
        # frame() takes messages no longer than this: the writer never snaps them
        self._frame_max = _READ_HEAD + snaplen if snaplen else 1 << 62
        super().__init__("-", source=source, snaplen=snaplen, comments=comments, sink=self._out.append,
                         flush_bytes=1 << 62, flush_interval=float("inf"))
        self.header.append(self.take())

    def _iface(self, dissector: str, queue: int) -> int:
        known = len(self._ifaces)
        idx = super()._iface(dissector, queue)
        if len(self._ifaces) > known:
            blk = self._buf.pop()
            self._buffered -= len(blk)
            self.header.append(blk)
            self.fresh.append(blk)
        return idx

    def frame(self, items: list[scan.Item]) -> list[bytes]:
        """One packet block per capture (inbound, data, queue, head, ts_ns, orig_len, notes, flags, n[, layout]; n 0
        for none), the bytes request()/reply() make, in bulk (scan.frame: C, or its twin); the captures the
        framer leaves (an INIT, a debugger flag, a queue's first message: its interface) go through
        request()/reply().  For messages cut at the snap length already (the live stream): none is snapped
        here, so the READs in flight are not tracked."""
        out: list[bytes] = []
        i = 0
        while i < len(items):
            blocks, i = scan.frame(items, i, self._fuse_ifaces, self.epoch, self._frame_max)
            out += blocks
            if i < len(items):
                inbound, data, queue, head, ts, orig, notes, flags, n = items[i][:9]
                layout = items[i][9] if len(items[i]) > 9 else None
                (self.request if inbound else self.reply)(data, queue, head, ts, orig_len=orig, notes=notes,
                                                          flags=flags, n=n or None, layout=layout or ())
                self._reads.clear()
                out.append(self.take())
                i += 1
        return out

    def take(self) -> bytes:
        """Every block encoded since the last call."""
        if self._out:  # a section header went out through the sink
            self.flush()
            data = b"".join(self._out)
            self._out.clear()
            return data
        buf = self._buf  # the packet blocks, taken without the file's flush bookkeeping (once per message)
        data = b"".join(buf)
        buf.clear()
        self._buffered = 0
        return data


def custom_block(obj: dict[str, Any]) -> bytes:
    """One control-protocol message as a custom block (PEN + compact JSON, padded with spaces to 4 bytes)."""
    body = struct.pack("<I", fmt.PEN) + json.dumps(obj, default=str, separators=(",", ":")).encode()
    return _block(fmt.BT_CB, body + b" " * (-len(body) % 4))
