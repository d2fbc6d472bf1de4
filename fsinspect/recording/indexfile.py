"""The side index's file, FILE.fsidx (format 2), and the pairing that fills it: shared by the recorder, which
writes it while it records, and the reader, which builds or extends it.

    header   magic, covered, count, content check, pending count, pending check, where the pending list is
    entries  count x (request offset, reply offset), u64 each, NONE where a side is absent
    pending  the requests still waiting for a reply at `covered` (epoch, queue or -1, head or unique, number)

`covered` is the byte offset in the recording (its parts back to back) up to which the entries account for
every record: always a block boundary.  Nothing a writer does overwrites what the header names: entries are
only appended, and never over the pending list the header points at (a list the entries would reach is
first copied further on, and the header pointed there); a checkpoint writes its pending list where no
named byte lies, then the header, in one pwrite, then trims the file.  So a writer killed at any point
(SIGKILL, OOM) leaves its last checkpoint or the new one, never a torn file: the reader resumes instead of
rebuilding.  While a recording grows the list sits at least GAP past the entries (a hole in a sparse file),
so appends rarely have to move it; the last checkpoint puts it right after them.

A reader trusts an index only if the recording still holds the same bytes where the index says it stopped
(the content check: CRC-32 of the first and the last 4 KiB before `covered`), then extends it from
`covered` with the saved pending requests, so the numbering is the one a whole rebuild gives; anything else
(another format, a check that fails, a power cut's torn pages) is rebuilt from the start.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from dissectors.spec import fuse as spec

MAGIC = b"FSIDX\x00\x00\x03"
# magic, covered, count, content check, pending count, pending check, (padding), the pending list's offset
HEAD = struct.Struct("<8sQQIII4xQ")
ENTRY = struct.Struct("<QQ")  # request offset, reply offset
PEND = struct.Struct("<IiQQ")  # epoch, queue (-1: no head), head (or unique), exchange index
NONE = 0xFFFFFFFFFFFFFFFF
CHECK = 4096  # bytes at each end of the covered span that the content check reads
GAP = 1 << 24  # how far past the entries a growing index keeps its pending list (> FLUSH: appends miss it)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_NO_REPLY = frozenset(o.value for o in spec.OPCODES if o.reply is None)
Key = tuple[int, int, int]


def content_check(head: bytes, tail: bytes) -> int:
    """The check of a covered span from its first and last CHECK bytes (the same bytes when it is short)."""
    return zlib.crc32(tail, zlib.crc32(head))


def read_span(parts: Sequence[Path], start: int, n: int) -> bytes:
    """`n` bytes at `start` of the parts back to back (fewer at the end)."""
    out = bytearray()
    base = 0
    for part in parts:
        try:
            size = os.stat(part).st_size
        except OSError:
            return bytes(out)
        if start < base + size and len(out) < n:
            with open(part, "rb") as f:
                f.seek(max(0, start + len(out) - base))
                out += f.read(n - len(out))
        base += size
    return bytes(out)


def recording_check(parts: Sequence[Path], covered: int) -> int:
    return content_check(read_span(parts, 0, min(CHECK, covered)),
                         read_span(parts, max(0, covered - CHECK), min(CHECK, covered)))


class IndexFile:
    """Entries being paired into an index file (or memory: `fd` None), readable while they grow.

    The pairing is the Analyzer's: a request opens an exchange unless its op has no reply; a reply (unique
    != 0) closes the one pending on its (epoch, queue, head) or, without a head, (epoch, unique), else that
    of the previous epoch, else it stands alone.  New entries wait in a tail buffer; a reply for one
    already written is patched in place."""

    FLUSH = 1 << 22  # bytes of entries buffered before they are written

    def __init__(self, fd: int | None, *, count: int = 0, pending: dict[Key, int] | None = None,
                 saved: Loaded | None = None) -> None:
        self.fd = fd
        # The checkpoint the header names (a loaded index's, then each new one): a list the entries would
        # reach is copied on with it, so the header is never left pointing at overwritten bytes.
        self.saved = saved
        self.buf = bytearray()
        self.base = count  # entries already in the file
        self.count = count
        self.pending: dict[Key, int] = pending if pending is not None else {}
        # Replies for entries already written, put in at the next checkpoint: a recorder pairs a reply before
        # its bytes reach the recording, and the file must never point past what the recording holds.
        self.patches: dict[int, int] = {}
        self.lock = threading.Lock()  # a reader of entries against the thread that adds them

    # -- pairing -----------------------------------------------------------------------------------------
    def packet(self, offset: int, inbound: bool, queue: int, head: int | None, epoch: int,
               d: bytes | bytearray | memoryview) -> None:
        """One FUSE record at `offset`; `d` is its PDU (or at least the first 16 bytes of it)."""
        n = len(d)
        if inbound:
            opcode = _U32.unpack_from(d, 4)[0] if n >= 8 else -1
            with self.lock:
                i = self._append(offset, NONE)
            if opcode in _NO_REPLY:
                return
            unique = _U64.unpack_from(d, 8)[0] if n >= 16 else 0
            self.pending[(epoch, queue, head) if head is not None else (epoch, -1, unique)] = i
            return
        unique = _U64.unpack_from(d, 8)[0] if n >= 16 else -1
        i = -1
        if unique != 0:
            pending = self.pending
            if head is not None:
                i = pending.pop((epoch, queue, head), -1)
                if i < 0:
                    i = pending.pop((epoch - 1, queue, head), -1)
            else:
                i = pending.pop((epoch, -1, unique), -1)
                if i < 0:
                    i = pending.pop((epoch - 1, -1, unique), -1)
        with self.lock:
            if i >= 0:
                self._set_reply(i, offset)
            else:
                self._append(NONE, offset)

    def _append(self, req: int, rep: int) -> int:
        self.buf += ENTRY.pack(req, rep)
        n = self.count
        self.count += 1
        if self.fd is not None and len(self.buf) >= self.FLUSH:
            self._flush()
        return n

    def _set_reply(self, n: int, offset: int) -> None:
        if n >= self.base:
            _U64.pack_into(self.buf, (n - self.base) * ENTRY.size + 8, offset)
        else:
            self.patches[n] = offset

    def _flush(self) -> None:
        if self.fd is None or not self.buf:
            return
        end = HEAD.size + self.count * ENTRY.size
        s = self.saved
        if s is not None and end > s.pend_at and s.pending:  # move the named list out of the way first
            at = max(_zone(end), s.pend_at + len(s.pending))
            _pwrite_all(self.fd, s.pending, at)
            self.saved = s = s._replace(pend_at=at)
            os.pwrite(self.fd, s.head(), 0)
        _pwrite_all(self.fd, self.buf, HEAD.size + self.base * ENTRY.size)
        self.base = self.count
        self.buf = bytearray()

    # -- reading -----------------------------------------------------------------------------------------
    def entry(self, i: int) -> tuple[int, int]:
        """(request offset, reply offset) of entry i < count, NONE where absent."""
        with self.lock:
            if i >= self.base:
                a, b = ENTRY.unpack_from(self.buf, (i - self.base) * ENTRY.size)
                return a, b
            assert self.fd is not None
            raw = os.pread(self.fd, ENTRY.size, HEAD.size + i * ENTRY.size)
            patched = self.patches.get(i)
        a, b = ENTRY.unpack(raw)
        return a, (b if patched is None else patched)

    def memory(self) -> bytes:
        """The whole index as bytes (an index kept in memory)."""
        return HEAD.pack(MAGIC, 0, self.count, 0, 0, 0, HEAD.size + len(self.buf)) + bytes(self.buf)

    # -- checkpoints -------------------------------------------------------------------------------------
    def checkpoint(self, covered: int, check: int, *, last: bool = False) -> None:
        """Make the file say: the entries account for the recording up to `covered` (a block boundary).
        `last`: no entries follow for now (a recording closed, an index complete), so the pending list goes
        right after the entries and the file has no hole."""
        if self.fd is None:
            return
        with self.lock:
            self._flush()
            for n, off in self.patches.items():
                os.pwrite(self.fd, _U64.pack(off), HEAD.size + n * ENTRY.size + 8)
            self.patches.clear()
            pend = b"".join(PEND.pack(e, q, h, n) for (e, q, h), n in self.pending.items())
            end = HEAD.size + self.count * ENTRY.size
            at = end if last or not pend else _zone(end)  # (an empty list is nowhere to overwrite)
            s = self.saved
            if s is not None and at < s.pend_at + len(s.pending) and at + len(pend) > s.pend_at:
                at = s.pend_at + len(s.pending)  # not over the list the header names until the header moves
            _pwrite_all(self.fd, pend, at)
            self.saved = s = Loaded(covered, self.count, self.pending.copy(), check, at, pend)
            os.pwrite(self.fd, s.head(), 0)
            os.ftruncate(self.fd, at + len(pend))


def _pwrite_all(fd: int, data: bytes | bytearray, pos: int) -> None:
    view = memoryview(data)
    while view:
        k = os.pwrite(fd, view, pos)
        pos += k
        view = view[k:]


def _zone(end: int) -> int:
    """Where a growing index puts its pending list: at least GAP past the entries' `end`, on a GAP boundary
    (so consecutive checkpoints take turns at it and just after the list there, not a list per checkpoint)."""
    return -(-(end + GAP) // GAP) * GAP


class Loaded(NamedTuple):
    """A checkpoint as its header and pending list say it."""

    covered: int
    entries: int
    table: dict[Key, int]
    check: int
    pend_at: int
    pending: bytes  # the list's bytes as stored

    def head(self) -> bytes:
        return HEAD.pack(MAGIC, self.covered, self.entries, self.check, len(self.pending) // PEND.size,
                         zlib.crc32(self.pending), self.pend_at)


def load(fd: int, parts: Sequence[Path], total: int) -> Loaded | None:
    """The checkpoint of the index file open on `fd` if it can be trusted for this recording (its parts,
    `total` bytes now), else None: another format, torn, or the recording changed where it stopped."""
    size = os.fstat(fd).st_size
    if size < HEAD.size:
        return None
    magic, covered, count, check, npend, pcheck, at = HEAD.unpack(os.pread(fd, HEAD.size, 0))
    end = HEAD.size + count * ENTRY.size
    if magic != MAGIC or covered > total or at < end or size < at + npend * PEND.size:
        return None
    pend = os.pread(fd, npend * PEND.size, at)
    if len(pend) != npend * PEND.size or zlib.crc32(pend) != pcheck or recording_check(parts, covered) != check:
        return None
    table = {(e, q, h): n for e, q, h, n in PEND.iter_unpack(pend)}
    if len(table) != npend:  # a key twice: not a list this module wrote
        return None
    return Loaded(covered, count, table, check, at, pend)


def try_lock(fd: int) -> bool:
    """An exclusive lock on an index file for whoever writes it (a recorder, or a reader extending it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
