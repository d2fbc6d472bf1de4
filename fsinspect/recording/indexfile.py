"""The side index's file, FILE.fsidx (format 2), and the pairing that fills it: shared by the recorder, which
writes it while it records, and the reader, which builds or extends it.

    header   magic, covered, count, content check, pending count, pending check   (HEAD)
    entries  count x (request offset, reply offset), u64 each, NONE where a side is absent
    pending  the requests still waiting for a reply at `covered` (epoch, queue or -1, head or unique, number)

`covered` is the byte offset in the recording (its parts back to back) up to which the entries account for
every record: always a block boundary.  A writer checkpoints by writing the entries, then the pending list
after them, then the header, so a writer killed at any point leaves either its previous checkpoint or one
whose pending list fails its check.  A reader trusts an index only if the recording still holds the same
bytes where the index says it stopped (the content check: CRC-32 of the first and the last 4 KiB before
`covered`), then extends it from `covered` with the saved pending requests, so the numbering is the one a
whole rebuild gives; anything else is rebuilt from the start.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

from dissectors.spec import fuse as spec

MAGIC = b"FSIDX\x00\x00\x02"
HEAD = struct.Struct("<8sQQIII4x")  # magic, covered, count, content check, pending count, pending check
ENTRY = struct.Struct("<QQ")  # request offset, reply offset
PEND = struct.Struct("<IiQQ")  # epoch, queue (-1: no head), head (or unique), exchange index
NONE = 0xFFFFFFFFFFFFFFFF
CHECK = 4096  # bytes at each end of the covered span that the content check reads
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

    def __init__(self, fd: int | None, *, count: int = 0, pending: dict[Key, int] | None = None) -> None:
        self.fd = fd
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
        return HEAD.pack(MAGIC, 0, self.count, 0, 0, 0) + bytes(self.buf)

    # -- checkpoints -------------------------------------------------------------------------------------
    def checkpoint(self, covered: int, check: int) -> None:
        """Make the file say: the entries account for the recording up to `covered` (a block boundary)."""
        if self.fd is None:
            return
        with self.lock:
            self._flush()
            for n, off in self.patches.items():
                os.pwrite(self.fd, _U64.pack(off), HEAD.size + n * ENTRY.size + 8)
            self.patches.clear()
            pend = b"".join(PEND.pack(e, q, h, n) for (e, q, h), n in self.pending.items())
            _pwrite_all(self.fd, pend, HEAD.size + self.count * ENTRY.size)
            os.ftruncate(self.fd, HEAD.size + self.count * ENTRY.size + len(pend))
            os.pwrite(self.fd, HEAD.pack(MAGIC, covered, self.count, check, len(self.pending), zlib.crc32(pend)), 0)


def _pwrite_all(fd: int, data: bytes | bytearray, pos: int) -> None:
    view = memoryview(data)
    while view:
        k = os.pwrite(fd, view, pos)
        pos += k
        view = view[k:]


def load(fd: int, parts: Sequence[Path], total: int) -> tuple[int, int, dict[Key, int]] | None:
    """(covered, count, pending) of the index file open on `fd` if it can be trusted for this recording (its
    parts, `total` bytes now), else None: another format, torn, or the recording changed where it stopped."""
    size = os.fstat(fd).st_size
    if size < HEAD.size:
        return None
    magic, covered, count, check, npend, pcheck = HEAD.unpack(os.pread(fd, HEAD.size, 0))
    end = HEAD.size + count * ENTRY.size
    if magic != MAGIC or covered > total or size != end + npend * PEND.size:
        return None
    pend = os.pread(fd, npend * PEND.size, end)
    if zlib.crc32(pend) != pcheck or recording_check(parts, covered) != check:
        return None
    return covered, count, {(e, q, h): n for e, q, h, n in PEND.iter_unpack(pend)}


def try_lock(fd: int) -> bool:
    """An exclusive lock on an index file for whoever writes it (a recorder, or a reader extending it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
