"""Side index: exchange number -> file offsets of its request and reply records.

It lets the replay open a recording of any size at once and jump to any exchange without loading the file.
Stored next to the recording as FILE.fsidx (recording/indexfile.py: the format, and why it can be trusted),
written by the recorder as it records, else built or extended by the reader: at once (`scan`, seconds per
million exchanges) or, `lazy`, by the pass that reads the records anyway (the replay's analysis), growing as
it goes.  Entries are fixed-size and read through mmap once complete, never all at once.  The numbering
equals the Analyzer's (same pairing rule); a test holds the two together.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Generator
from pathlib import Path

from .. import privfile
from . import format as fmt
from .indexfile import ENTRY, HEAD, NONE, IndexFile, load, recording_check, try_lock
from .parts import INDEX_SUFFIX, resolve, side_file
from .reader import RecordingError, RecordingReader
from .writer import _PREFIX

STALE = 1 << 16  # exchanges after which a request still waiting no longer holds a growing index's filter back
RELEASE_EVERY = 32 << 20  # bytes of a mapped file read between handing its pages back


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


Packet = tuple[int, bool, int, int | None, int, bytes]


def scan(buf: bytes | mmap.mmap, *, fast: bool = True, start: int = 0) -> Generator[Packet, None, int]:
    """(offset, inbound, queue, head, epoch, first 16 PDU bytes) of every FUSE packet, without building
    Records: the fast path that lets the index cover 1M exchanges in seconds.  Stops at a truncated tail.

    A packet block too short for its fixed part, or whose captured bytes run past it, is refused as the
    reader refuses it (RecordingError); tags and options are read only inside their block."""
    n = len(buf)
    off = start
    while off + 12 <= n:
        btype, total = _BLK.unpack_from(buf, off)
        if total < 12 or total % 4 or off + total > n:
            return off
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
    return off


def scan_parts(parts: list[Path], start: int = 0) -> Generator[Packet, None, int]:
    """`scan` over a rotated recording's parts from offset `start` on, with offsets in their concatenation
    (the reader's); returns where the scan stopped (the end, or the start of a truncated tail)."""
    base = 0
    stopped = start
    for part in parts:
        with open(part, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if not size or base + size <= start:  # (an empty file cannot be mapped)
                base += size
                continue
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            done = 0
            gen = scan(mm, start=max(0, start - base))
            while True:
                try:
                    off, *rest = next(gen)
                except StopIteration as e:
                    stopped = base + e.value
                    break
                yield (base + off, *rest)  # type: ignore[misc]
                if off - done >= RELEASE_EVERY:  # the pages read so far leave our RSS (the page cache keeps them)
                    done = off - off % mmap.PAGESIZE
                    mm.madvise(mmap.MADV_DONTNEED, 0, done)
        finally:
            mm.close()
        base += size
    return stopped


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


def recording_stamp(parts: list[Path]) -> tuple[int, int]:
    """(total size, newest mtime) of a recording's parts: what an index or analysis cache is valid for."""
    sts = [os.stat(p) for p in parts]
    return sum(st.st_size for st in sts), max(st.st_mtime_ns for st in sts)


class RecordingIndex:
    """Random access by exchange number.

    Opening trusts the index file beside the recording if it is this recording's (indexfile.load): a
    complete one is mapped and used as it is; one that stops short (a recorder killed mid-write, a recording
    that grew) is extended from where it stopped.  `lazy=True` returns at once with what is indexed so far
    (`len()` grows, `complete` says when it is all there) and leaves the rest to whoever reads the records:
    `add(record)` for each, then `finish(end)`; otherwise the rest is scanned now.  `rebuilt` tells whether
    anything had to be scanned, `resumed_at` from where (0: the start)."""

    def __init__(self, recording: str | os.PathLike[str], *, rebuild: bool = False,
                 progress: Callable[[float], None] | None = None, lazy: bool = False) -> None:
        self.progress = progress  # told how far (0..1) a build has got, now and then
        self.parts = resolve(recording)
        self.recording = self.parts[0]
        self.path = index_path(self.recording)
        self.total = sum(os.stat(p).st_size for p in self.parts)
        self.rebuilt = False
        self.complete = False
        self.error: str | None = None  # a bad block the index stops at (the reader says the same)
        self._mm: mmap.mmap | None = None
        self._fd = -1
        self._file = self._open(rebuild)
        self.resumed_at = self.covered
        self._next_checkpoint = self._file.count + (IndexFile.FLUSH // ENTRY.size)
        if self.covered >= self.total and self.error is None:
            self._complete()
        elif not lazy:
            self._scan_rest()

    def _open(self, rebuild: bool) -> IndexFile:
        """The index file to trust and extend, locked; or a private one (another process is writing the index
        beside the recording: a live recorder, another reader extending it; or its directory is read-only)."""
        RecordingReader(self.recording).close()  # the header is valid: RecordingError otherwise
        self.covered = 0
        try:
            fd = privfile.open_rw(self.path, os.stat(self.recording).st_mode & 0o666)
        except OSError:
            fd = -1
        if fd < 0 or not try_lock(fd):
            if fd >= 0:
                os.close(fd)
                fd = -1
            try:  # someone else writes it: trust what it says so far only if it is complete
                rfd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                rfd = -1
            if rfd >= 0:
                got = None if rebuild else load(rfd, self.parts, self.total)
                if got is not None and got.covered >= self.total:
                    self._fd, self.covered = rfd, got.covered
                    return IndexFile(None, count=got.entries)
                os.close(rfd)
        if fd < 0:  # a private index, never saved
            fd = _private(self.path.parent)
            if fd < 0:
                return IndexFile(None)
            self._fd = fd
            return IndexFile(fd)
        self._fd = fd
        got = None if rebuild else load(fd, self.parts, self.total)
        if got is None:
            os.ftruncate(fd, 0)
            return IndexFile(fd)
        self.covered = got.covered
        return IndexFile(fd, count=got.entries, pending=dict(got.table), saved=got)

    # -- building ------------------------------------------------------------------------------------------
    def add(self, offset: int, inbound: bool, queue: int, head: int | None, epoch: int,
            data: bytes | bytearray | memoryview) -> None:
        """One FUSE record read at `offset` (in file order); ignored below what is indexed already."""
        if offset < self.covered:
            return
        f = self._file
        if f.count >= self._next_checkpoint:  # every record before this one is in: a resumable point
            self._checkpoint(offset)
            self._next_checkpoint = f.count + IndexFile.FLUSH // ENTRY.size
        self.rebuilt = True
        f.packet(offset, inbound, queue, head, epoch, data)

    def _checkpoint(self, covered: int, *, last: bool = False) -> None:
        self._file.checkpoint(covered, recording_check(self.parts, covered), last=last)

    def finish(self, end: int) -> None:
        """Every record up to `end` (where reading stopped: the end, or a truncated tail) has been added."""
        self._checkpoint(end, last=True)
        self.rebuilt = self.rebuilt or end > self.covered
        self.covered = max(self.covered, end)
        self._complete()

    def fail(self, error: str) -> None:
        """A bad block stops the index there (the next open scans on from the last checkpoint again)."""
        self.error = error

    def _scan_rest(self) -> None:
        """Scan the recording from where the index stops to its end."""
        total = max(1, self.total)
        self.rebuilt = True
        gen = scan_parts(self.parts, self.covered)
        k = 0
        try:
            while True:
                try:
                    off, inbound, queue, head, epoch, d = next(gen)
                except StopIteration as e:
                    end: int = e.value
                    break
                if self.progress is not None and k & 0xFFFF == 0:
                    self.progress(off / total)
                k += 1
                self.add(off, inbound, queue, head, epoch, d)
        except RecordingError as e:
            self.fail(f"{self.recording}: {e}")
            return
        self.finish(end)

    def _complete(self) -> None:
        """All there: read the entries through a read-only map from now on."""
        self.complete = True
        fd = self._file.fd if self._file.fd is not None else self._fd
        if fd < 0 or self._file.count == 0:
            return  # (entries kept in memory, or none)
        self._mm = mmap.mmap(fd, HEAD.size + self._file.count * ENTRY.size, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return self._file.count

    def settled(self) -> int:
        """How many exchanges are final: all once complete; while the index grows, those before the oldest
        request still waiting for its reply (one waiting longer than STALE exchanges is taken as unanswered)."""
        f = self._file
        count = f.count
        if self.complete:
            return count
        waiting = [n for n in list(f.pending.values()) if n >= count - STALE]
        return min(waiting, default=count)

    @property
    def count(self) -> int:
        return self._file.count

    def offsets(self, i: int) -> tuple[int | None, int | None]:
        """(request offset, reply offset) of exchange i; None where that side is absent."""
        if not 0 <= i < self._file.count:
            raise IndexError(f"exchange {i} out of range (0..{self._file.count - 1})")
        mm = self._mm
        if mm is not None:
            a, b = ENTRY.unpack_from(mm, HEAD.size + i * ENTRY.size)
        else:
            a, b = self._file.entry(i)
        return (None if a == NONE else a), (None if b == NONE else b)

    def release(self) -> None:
        """Hand the index pages read so far back to the kernel: a pass over every entry stays out of RSS."""
        if self._mm is not None:
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _private(directory: Path) -> int:
    """An unnamed file for an index nobody else will read (the one beside the recording is someone else's)."""
    for d in (directory, Path(tempfile.gettempdir())):
        try:
            return os.open(d, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
    return -1
