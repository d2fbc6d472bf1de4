"""Append-only pcapng writer for FUSE traffic (see recordings/FORMAT.md).

Crash safety: blocks are assembled in memory and handed to the kernel only as whole blocks, with one
write per flush, so a `kill -9` leaves a file that reads cleanly up to the last flushed block (a torn
final write is reported by the reader as a truncated tail).  Flushes happen when the buffer passes
`flush_bytes` or `flush_interval` seconds after the previous one, so a live capture is never far behind.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dissectors.spec import fuse as fspec

from .. import __version__
from . import format as fmt

_OP_INIT = fspec.OPCODE_BY_NAME["INIT"].value
_OP_READ = fspec.OPCODE_BY_NAME["READ"].value
_OP_WRITE = fspec.OPCODE_BY_NAME["WRITE"].value
_WRITE_HEAD = fspec.IN_HEADER_SIZE + fspec.REGISTRY.sizeof("fuse_write_in")
_READ_HEAD = fspec.OUT_HEADER_SIZE

_EPB_HEAD = struct.Struct("<IIIIIII")  # type, total length, iface, ts high, ts low, caplen, origlen
# epb_flags option, META_RECORD option, (variable options go before) end of options, trailing length.
_EPB_FLAGS_META = struct.Struct("<HHI" + "HH" + fmt.META_RECORD_STRUCT.format.lstrip("<"))
_EPB_END = struct.Struct("<HHI")
_OPT_HDR = struct.Struct("<HH")
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")


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


_PREFIX = {
    (fmt.DISSECTOR_FUSE, fmt.DIR_INBOUND): _exp_pdu_prefix(fmt.DISSECTOR_FUSE, fmt.P2P_DIR_RECV),
    (fmt.DISSECTOR_FUSE, fmt.DIR_OUTBOUND): _exp_pdu_prefix(fmt.DISSECTOR_FUSE, fmt.P2P_DIR_SENT),
    (fmt.DISSECTOR_VHOST_USER, fmt.DIR_INBOUND): _exp_pdu_prefix(fmt.DISSECTOR_VHOST_USER, fmt.P2P_DIR_RECV),
    (fmt.DISSECTOR_VHOST_USER, fmt.DIR_OUTBOUND): _exp_pdu_prefix(fmt.DISSECTOR_VHOST_USER, fmt.P2P_DIR_SENT),
}


def host_info() -> dict[str, str]:
    u = platform.uname()
    return {"host": socket.gethostname(), "kernel": f"{u.system} {u.release} {u.machine}"}


class RecordingWriter:
    """Writes one recording (and its rotated continuations).  Not thread-safe: feed it from one thread.

    `source` is "virtio" (one interface per virtqueue) or "fusedev" (one interface for /dev/fuse).
    The INIT epoch is counted here (every INIT request starts a new one) unless the caller passes it.
    """

    def __init__(self, path: str | os.PathLike[str], *, source: str = "virtio", backend: str = "",
                 comments: Sequence[str] = (), snaplen: int = fmt.DEFAULT_SNAPLEN, rotate_mb: float = 0,
                 flush_bytes: int = 1 << 18, flush_interval: float = 0.2) -> None:
        if source not in ("virtio", "fusedev"):
            raise ValueError(f"source must be virtio or fusedev, not {source!r}")
        if snaplen < 0:
            raise ValueError("snaplen must be >= 0")
        self.base = Path(path)
        self.source = source
        self.backend = backend
        self.comments = list(comments)
        self.snaplen = snaplen
        self.rotate_bytes = int(rotate_mb * 1024 * 1024)
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
        self._reads: set[tuple[int, int]] = set()  # READ requests in flight, for snapping their replies
        self._init_key: tuple[int, int] | None = None
        self._init: dict[str, Any] | None = None
        self._open_part()

    # -- public API ------------------------------------------------------------------------------
    def request(self, raw: bytes | bytearray | memoryview, queue: int = 0, head: int | None = None,
                ts_ns: int | None = None, *, epoch: int | None = None, layout: Sequence[tuple[int, int]] = (),
                flags: int = 0, notes: Sequence[str] = ()) -> None:
        """Record a request (guest/kernel -> FUSE server).  `head` is the descriptor head index."""
        raw = bytes(raw)
        opcode = int.from_bytes(raw[4:8], "little") if len(raw) >= 8 else 0
        key = (queue, head if head is not None else int.from_bytes(raw[8:16], "little"))
        if opcode == _OP_INIT and epoch is None:
            self.epoch += 1
        elif epoch is not None:
            self.epoch = epoch
        if opcode == _OP_INIT:
            self._init_key = key
            self._init = {"epoch": self.epoch, "request": raw.hex(), "reply": None}
        orig = len(raw)
        if opcode == _OP_READ:
            self._reads.add(key)
        elif opcode == _OP_WRITE and self.snaplen and orig > _WRITE_HEAD + self.snaplen:
            raw = raw[:_WRITE_HEAD + self.snaplen]
            flags |= fmt.RF_SNAPPED
        self._epb(fmt.DISSECTOR_FUSE, queue, fmt.DIR_INBOUND, raw, orig, head, ts_ns, flags, layout, notes)

    def reply(self, raw: bytes | bytearray | memoryview, queue: int = 0, head: int | None = None,
              ts_ns: int | None = None, *, epoch: int | None = None, layout: Sequence[tuple[int, int]] = (),
              flags: int = 0, notes: Sequence[str] = ()) -> None:
        """Record a reply or notification (FUSE server -> guest/kernel)."""
        raw = bytes(raw)
        if epoch is not None:
            self.epoch = epoch
        key = (queue, head if head is not None else int.from_bytes(raw[8:16], "little"))
        orig = len(raw)
        if key == self._init_key and self._init is not None:
            self._init["reply"] = raw.hex()
            self._init_key = None
        if self._reads and key in self._reads:
            self._reads.discard(key)
            if self.snaplen and orig > _READ_HEAD + self.snaplen:
                raw = raw[:_READ_HEAD + self.snaplen]
                flags |= fmt.RF_SNAPPED
        self._epb(fmt.DISSECTOR_FUSE, queue, fmt.DIR_OUTBOUND, raw, orig, head, ts_ns, flags, layout, notes)

    def control(self, raw: bytes | bytearray | memoryview, *, from_frontend: bool, ts_ns: int | None = None,
                notes: Sequence[str] = ()) -> None:
        """Record a vhost-user message (front-end = QEMU side, inbound; back-end side, outbound)."""
        raw = bytes(raw)
        direction = fmt.DIR_INBOUND if from_frontend else fmt.DIR_OUTBOUND
        self._epb(fmt.DISSECTOR_VHOST_USER, 0, direction, raw, len(raw), None, ts_ns, 0, (), notes)

    def flush(self) -> None:
        """Hand every complete buffered block to the kernel in one write."""
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._buffered = 0
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._written += len(data)
        self._last_flush = time.monotonic()
        if self.rotate_bytes and self._written >= self.rotate_bytes:
            os.close(self._fd)
            self._fd = -1
            self._open_part()

    def close(self) -> None:
        if self._fd < 0:
            return
        self.flush()
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------
    def _part_path(self, n: int) -> Path:
        if n == 0:
            return self.base
        return self.base.with_name(f"{self.base.stem}.{n:03d}{self.base.suffix}")

    def _open_part(self) -> None:
        n = len(self.paths)
        path = self._part_path(n)
        self.paths.append(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._written = 0
        self._ifaces = {}
        info = host_info()
        meta: dict[str, Any] = {"format": fmt.FORMAT_VERSION, "tool": f"fsinspect {__version__}",
                                "source": self.source, "backend": self.backend, "snaplen": self.snaplen,
                                "part": n, **info}
        if self._init is not None:
            meta["init"] = self._init
        opts = [(fmt.SHB_USERAPPL, f"fsinspect {__version__}".encode()), (fmt.SHB_OS, info["kernel"].encode()),
                (fmt.SHB_HARDWARE, info["host"].encode())]
        opts += [(fmt.OPT_COMMENT, c.encode()) for c in self.comments]
        opts.append(_custom_json(meta))
        body = struct.pack("<IHHq", fmt.BYTE_ORDER_MAGIC, fmt.PCAPNG_MAJOR, fmt.PCAPNG_MINOR, -1) + _options(opts)
        self._buf.append(_block(fmt.BT_SHB, body))
        self.flush()

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
        self._buf.append(blk)
        self._buffered += len(blk)
        idx = self._ifaces[key] = len(self._ifaces)
        return idx

    def _epb(self, dissector: str, queue: int, direction: int, raw: bytes, orig: int, head: int | None,
             ts_ns: int | None, flags: int, layout: Sequence[tuple[int, int]], notes: Sequence[str]) -> None:
        key = (dissector, queue)
        iface = self._ifaces.get(key)
        if iface is None:
            iface = self._iface(dissector, queue)
        if ts_ns is None:
            ts_ns = time.time_ns()
        prefix = _PREFIX[(dissector, direction)]
        caplen = len(prefix) + len(raw)
        pad = _PADS[caplen & 3]
        extra = b""
        if layout:
            lay = struct.pack("<IHH", fmt.PEN, fmt.META_LAYOUT, 0) + b"".join(
                fmt.LAYOUT_ITEM.pack(ln, fl, 0) for ln, fl in layout)
            extra += _option(fmt.OPT_CUSTOM_BIN, lay)
        for note in notes:
            extra += _option(fmt.OPT_COMMENT, note.encode())
        total = 28 + caplen + len(pad) + _EPB_FLAGS_META.size + len(extra) + _EPB_END.size
        parts = self._buf
        parts.append(_EPB_HEAD.pack(fmt.BT_EPB, total, iface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, caplen,
                                    len(prefix) + orig))
        parts.append(prefix)
        parts.append(raw)
        if pad:
            parts.append(pad)
        parts.append(_EPB_FLAGS_META.pack(fmt.EPB_FLAGS, 4, direction, fmt.OPT_CUSTOM_BIN, fmt.META_RECORD_STRUCT.size, fmt.PEN,
                                          fmt.META_RECORD, 0, queue, flags,
                                          fmt.NO_HEAD if head is None else head, self.epoch))
        if extra:
            parts.append(extra)
        parts.append(_EPB_END.pack(fmt.OPT_ENDOFOPT, 0, total))
        self.records += 1
        self._buffered += total
        if self._buffered >= self.flush_bytes or time.monotonic() - self._last_flush >= self.flush_interval:
            self.flush()
