"""Side index: exchange number -> file offsets of its request and reply records.

It lets the TUI open a 1M-exchange recording and jump to any exchange without loading the file.
Stored next to the recording as FILE.fsidx, stamped with the recording's size and mtime, and rebuilt
whenever it is missing or stale.  Entries are fixed-size and read through mmap, never all at once.
The numbering equals the Analyzer's (same pairing rule); a test holds the two together.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from dissectors.spec import fuse as spec

from .. import privfile
from . import format as fmt
from .parts import INDEX_SUFFIX, resolve, side_file
from .reader import RecordingError, RecordingReader
from .writer import _PREFIX

RELEASE_EVERY = 32 << 20  # bytes of a mapped file read between handing its pages back
MAGIC = b"FSIDX\x00\x00\x01"
_HEAD = struct.Struct("<8sQQQ")  # magic, recording size, recording mtime_ns, count
_ENTRY = struct.Struct("<QQ")  # request offset, reply offset
NONE = 0xFFFFFFFFFFFFFFFF
_NO_REPLY = frozenset(o.value for o in spec.OPCODES if o.reply is None)


def index_path(recording: str | os.PathLike[str]) -> Path:
    return side_file(Path(recording), INDEX_SUFFIX)


_BLK = struct.Struct("<II")
_EPB = struct.Struct("<IIIII")  # iface, ts high, ts low, caplen, origlen
_OPT = struct.Struct("<HH")
_TAG = struct.Struct(">HH")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_META = struct.Struct("<IHHHHII")
# fsinspect's own writer always puts the same 20-byte exported-PDU prefix and the same two options first:
# one compare and one unpack read a record; anything else takes the general path.
_PREFIX_IN = _PREFIX[(fmt.DISSECTOR_FUSE, fmt.DIR_INBOUND)]
_PREFIX_OUT = _PREFIX[(fmt.DISSECTOR_FUSE, fmt.DIR_OUTBOUND)]
_PLEN = len(_PREFIX_IN)
_FIXED_OPTS = struct.Struct("<HHIHHIHHHHII")
_EPB7 = struct.Struct("<IIIIIII")  # type, total, iface, ts high, ts low, caplen, origlen


def scan(buf: bytes | mmap.mmap, *, fast: bool = True) -> Iterator[tuple[int, bool, int, int | None, int, bytes]]:
    """(offset, inbound, queue, head, epoch, first 16 PDU bytes) of every FUSE packet, without building
    Records: the fast path that lets the index cover 1M exchanges in seconds.  Stops at a truncated tail.

    A packet block too short for its fixed part, or whose captured bytes run past it, is refused as the
    reader refuses it (RecordingError); tags and options are read only inside their block."""
    n = len(buf)
    off = 0
    while off + 12 <= n:
        btype, total = _BLK.unpack_from(buf, off)
        if total < 12 or total % 4 or off + total > n:
            return
        if btype == fmt.BT_EPB:
            if total < 12 + _EPB.size:
                raise RecordingError(f"packet block at offset {off} has {total - 12} body bytes, fewer than its "
                                     f"fixed {_EPB.size}")
            caplen = _EPB.unpack_from(buf, off + 8)[3]
            data = off + 28
            if data + caplen > off + total - 4:
                raise RecordingError(f"packet block at offset {off} claims {caplen} captured bytes, its block holds "
                                     f"{total - 12 - _EPB.size}")
            pre = buf[data:data + _PLEN]
            if fast and (pre == _PREFIX_IN or pre == _PREFIX_OUT) and caplen >= _PLEN:
                o = data + caplen + (-caplen % 4)
                if o + _FIXED_OPTS.size <= off + total:
                    c1, l1, fl, c2, l2, pen, kind, _r, q, _f, h, ep = _FIXED_OPTS.unpack_from(buf, o)
                    if (c1, l1, c2, l2, pen, kind) == (fmt.EPB_FLAGS, 4, fmt.OPT_CUSTOM_BIN, 20, fmt.PEN,
                                                        fmt.META_RECORD):
                        p = data + _PLEN
                        yield (off, (fl & 3) == fmt.DIR_INBOUND, q, None if h == fmt.NO_HEAD else h, ep,
                               bytes(buf[p:min(p + 16, data + caplen)]))
                        off += total
                        continue
            p, end_data = data, data + caplen
            fuse = False
            p2p = -1
            while p + 4 <= end_data:
                tag, ln = _TAG.unpack_from(buf, p)
                if p + 4 + ln > end_data:
                    break
                if tag == fmt.EXP_PDU_TAG_DISSECTOR_NAME:
                    fuse = buf[p + 4:p + 4 + ln].rstrip(b"\0") == b"fuse"
                elif tag == fmt.EXP_PDU_TAG_P2P_DIRECTION and ln == 4:
                    p2p = struct.unpack_from(">i", buf, p + 4)[0]
                p += 4 + ln
                if tag == fmt.EXP_PDU_TAG_END_OF_OPT:
                    break
            if fuse:
                inbound = p2p == fmt.P2P_DIR_RECV
                queue, head, epoch = 0, None, 0
                o = data + caplen + (-caplen % 4)
                end = off + total - 4
                while o + 4 <= end:
                    code, ln = _OPT.unpack_from(buf, o)
                    if code == fmt.OPT_ENDOFOPT or o + 4 + ln > end:
                        break
                    if code == fmt.EPB_FLAGS and ln == 4:
                        d = _U32.unpack_from(buf, o + 4)[0] & 3
                        if d:
                            inbound = d == fmt.DIR_INBOUND
                    elif code == fmt.OPT_CUSTOM_BIN and ln >= 20:
                        pen, kind, _r, q, _f, h, ep = _META.unpack_from(buf, o + 4)
                        if pen == fmt.PEN and kind == fmt.META_RECORD:
                            queue, head, epoch = q, (None if h == fmt.NO_HEAD else h), ep
                    o += 4 + ln + (-ln % 4)
                yield off, inbound, queue, head, epoch, bytes(buf[p:min(p + 16, end_data)])
        off += total


def scan_parts(parts: list[Path]) -> Iterator[tuple[int, bool, int, int | None, int, bytes]]:
    """`scan` over a rotated recording's parts, with offsets in their concatenation (the reader's)."""
    base = 0
    for part in parts:
        with open(part, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if not size:  # an empty file cannot be mapped
                continue
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            done = 0
            for off, *rest in scan(mm):
                yield (base + off, *rest)  # type: ignore[misc]
                if off - done >= RELEASE_EVERY:  # the pages read so far leave our RSS (the page cache keeps them)
                    done = off - off % mmap.PAGESIZE
                    mm.madvise(mmap.MADV_DONTNEED, 0, done)
        finally:
            mm.close()
        base += size


class MappedHeads:
    """The header fields of records at given offsets, read straight from the mapped parts (a filter pass's
    HEADER reads: no Record built, no syscall).  `at(off)` gives (ts_ns, orig_len, pdu start, pdu length,
    queue, head, epoch, buffer) for a record in fsinspect's own canonical layout, None for any other (the
    caller reads that one through RecordingReader)."""

    def __init__(self, parts: list[Path]) -> None:
        self.maps: list[mmap.mmap] = []
        self.bases: list[int] = []
        self.ends: list[int] = []
        base = 0
        for part in parts:
            with open(part, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size:
                    self.maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
                    self.bases.append(base)
                    self.ends.append(base + size)
            base += size

    def at(self, off: int) -> tuple[int, int, int, int, int, int | None, int, mmap.mmap] | None:
        k = bisect.bisect_right(self.bases, off) - 1
        if k < 0 or off >= self.ends[k]:
            return None
        buf = self.maps[k]
        o = off - self.bases[k]
        if o + 28 + _PLEN > len(buf):
            return None
        btype, total, _if, hi, lo, caplen, origlen = _EPB7.unpack_from(buf, o)
        if btype != fmt.BT_EPB or caplen < _PLEN or o + total > len(buf):
            return None
        data = o + 28
        pre = buf[data:data + _PLEN]
        if pre != _PREFIX_IN and pre != _PREFIX_OUT:
            return None
        t = data + caplen + (-caplen % 4)
        if t + _FIXED_OPTS.size > o + total:
            return None
        c1, l1, _fl, c2, l2, pen, kind, _r, q, rf, h, ep = _FIXED_OPTS.unpack_from(buf, t)
        if (c1, l1, c2, l2, pen, kind) != (fmt.EPB_FLAGS, 4, fmt.OPT_CUSTOM_BIN, 20, fmt.PEN, fmt.META_RECORD):
            return None
        orig, plen = origlen - _PLEN, caplen - _PLEN
        if rf & fmt.RF_SNAPPED and orig == plen >= 4:  # as the reader takes it (a snap that kept the origlen)
            orig = max(orig, _U32.unpack_from(buf, data + _PLEN)[0])
        return (hi << 32) | lo, orig, data + _PLEN, plen, q, None if h == fmt.NO_HEAD else h, ep, buf

    def release(self) -> None:
        """Hand the pages read so far back to the kernel (the page cache keeps them)."""
        for mm in self.maps:
            mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        for mm in self.maps:
            mm.close()
        self.maps.clear()


class _Entries:
    """The index's entries as they are paired, written to `fd` (after the header) through a tail buffer,
    so building an index of any size takes a few MiB; a reply for an entry already written is patched
    in place.  With no fd they stay in `buf` (a read-only directory)."""

    FLUSH = 1 << 22

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.base = 0  # entries already written to fd
        self.count = 0

    def append(self, req: int, rep: int) -> int:
        self.buf += _ENTRY.pack(req, rep)
        n = self.count
        self.count += 1
        if self.fd is not None and len(self.buf) >= self.FLUSH:
            self.flush()
        return n

    def set_reply(self, n: int, offset: int) -> None:
        if n >= self.base:
            _U64.pack_into(self.buf, (n - self.base) * _ENTRY.size + 8, offset)
        else:
            assert self.fd is not None
            os.pwrite(self.fd, _U64.pack(offset), _HEAD.size + n * _ENTRY.size + 8)

    def flush(self) -> None:
        if self.fd is None or not self.buf:
            return
        view = memoryview(self.buf)
        pos = _HEAD.size + self.base * _ENTRY.size
        while view:
            pos += (k := os.pwrite(self.fd, view, pos))
            view = view[k:]
        self.base = self.count
        self.buf = bytearray()


def recording_stamp(parts: list[Path]) -> tuple[int, int]:
    """(total size, newest mtime) of a recording's parts: what an index or analysis cache is valid for."""
    sts = [os.stat(p) for p in parts]
    return sum(st.st_size for st in sts), max(st.st_mtime_ns for st in sts)


def _pair(packets: Iterator[tuple[int, bool, int, int | None, int, bytes]], entries: _Entries) -> None:
    pending: dict[tuple[int, int, int], int] = {}
    for offset, inbound, queue, head, epoch, d in packets:
        if inbound:
            n = entries.append(offset, NONE)
            opcode = _U32.unpack_from(d, 4)[0] if len(d) >= 8 else -1
            if opcode in _NO_REPLY:
                continue
            unique = _U64.unpack_from(d, 8)[0] if len(d) >= 16 else 0
            pending[(epoch, queue, head) if head is not None else (epoch, -1, unique)] = n
        else:
            unique = _U64.unpack_from(d, 8)[0] if len(d) >= 16 else -1
            n = -1
            if unique != 0:
                for ep in (epoch, epoch - 1):
                    n = pending.pop((ep, queue, head) if head is not None else (ep, -1, unique), -1)
                    if n >= 0:
                        break
            if n >= 0:
                entries.set_reply(n, offset)
            else:
                entries.append(NONE, offset)


class RecordingIndex:
    """Random access by exchange number; `rebuilt` tells whether opening had to scan the recording."""

    def __init__(self, recording: str | os.PathLike[str], *, rebuild: bool = False,
                 progress: Callable[[float], None] | None = None) -> None:
        self.progress = progress  # told how far (0..1) a build has got, now and then
        self.parts = resolve(recording)
        self.recording = self.parts[0]
        self.path = index_path(self.recording)
        self._stamp = recording_stamp(self.parts)
        self.rebuilt = False
        self.error: str | None = None  # a bad block the index stops at (the reader says the same)
        self._mm: mmap.mmap | None = None
        self._mem: bytes | None = None
        if rebuild or not self._load():
            self._build()

    def _load(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            size = os.fstat(fd).st_size
            if size < _HEAD.size:
                return False
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        magic, rsize, mtime, count = _HEAD.unpack_from(mm)
        if magic != MAGIC or (rsize, mtime) != self._stamp or size != _HEAD.size + count * _ENTRY.size:
            mm.close()
            return False
        self._mm = mm
        self.count = count
        return True

    def _build_in_memory(self) -> None:
        """The index kept in memory only: a read-only directory, or a recording with a bad block (indexed up
        to it, as the reader reads it, and scanned again at the next open rather than saved)."""
        entries = _Entries(None)
        try:
            _pair(self._packets(), entries)
        except RecordingError as e:
            self.error = f"{self.recording}: {e}"
        self.count = entries.count
        self._mem = _HEAD.pack(MAGIC, *self._stamp, entries.count) + bytes(entries.buf)

    def _build(self) -> None:
        """Pair the whole recording into the index file (written beside it, replaced whole when done)."""
        RecordingReader(self.recording).close()  # the header is valid: RecordingError otherwise
        self.rebuilt = True
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:  # readable by whoever may read the recording, no more
            fd = privfile.create(tmp, os.stat(self.recording).st_mode & 0o666)
        except OSError:  # a read-only directory: keep the index in memory
            self._build_in_memory()
            return
        try:
            entries = _Entries(fd)
            try:
                _pair(self._packets(), entries)
            except RecordingError:
                os.close(fd)
                fd = -1
                tmp.unlink(missing_ok=True)
                self._build_in_memory()
                return
            entries.flush()
            os.pwrite(fd, _HEAD.pack(MAGIC, *self._stamp, entries.count), 0)
            os.close(fd)
            fd = -1
            os.replace(tmp, self.path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self.count = entries.count
        if not self._load():  # pragma: no cover - we just wrote it
            raise OSError(f"{self.path}: the index just written does not read back")

    def _packets(self) -> Iterator[tuple[int, bool, int, int | None, int, bytes]]:
        """scan_parts, telling `progress` how far it has got every 64k packets."""
        total = max(1, self._stamp[0])
        for k, pkt in enumerate(scan_parts(self.parts)):
            if self.progress is not None and k & 0xFFFF == 0:
                self.progress(pkt[0] / total)
            yield pkt

    def __len__(self) -> int:
        return self.count

    def offsets(self, i: int) -> tuple[int | None, int | None]:
        """(request offset, reply offset) of exchange i; None where that side is absent."""
        if not 0 <= i < self.count:
            raise IndexError(f"exchange {i} out of range (0..{self.count - 1})")
        buf = self._mm if self._mm is not None else self._mem
        assert buf is not None
        a, b = _ENTRY.unpack_from(buf, _HEAD.size + i * _ENTRY.size)
        return (None if a == NONE else a), (None if b == NONE else b)

    def release(self) -> None:
        """Hand the index pages read so far back to the kernel: a pass over every entry stays out of RSS."""
        if self._mm is not None:
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
