"""Side index: exchange number -> file offsets of its request and reply records.

It lets the TUI open a 1M-exchange recording and jump to any exchange without loading the file.
Stored next to the recording as FILE.fsidx, stamped with the recording's size and mtime, and rebuilt
whenever it is missing or stale.  Entries are fixed-size and read through mmap, never all at once.
The numbering equals the Analyzer's (same pairing rule); a test holds the two together.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from dissectors.spec import fuse as spec

from .reader import RecordingReader

MAGIC = b"FSIDX\x00\x00\x01"
_HEAD = struct.Struct("<8sQQQ")  # magic, recording size, recording mtime_ns, count
_ENTRY = struct.Struct("<QQ")  # request offset, reply offset
NONE = 0xFFFFFFFFFFFFFFFF
_NO_REPLY = frozenset(o.value for o in spec.OPCODES if o.reply is None)
_OP_INIT = spec.OPCODE_BY_NAME["INIT"].value


def index_path(recording: str | os.PathLike[str]) -> Path:
    p = Path(recording)
    return p.with_name(p.name + ".fsidx")


def build_entries(reader: RecordingReader) -> list[tuple[int, int]]:
    """Pair records as the Analyzer does: (epoch, queue, head), or (epoch, unique) without a head."""
    entries: list[tuple[int, int]] = []
    pending: dict[tuple[int, int, int], int] = {}
    for rec in reader.records():
        if not rec.is_fuse:
            continue
        d = rec.data
        if rec.inbound:
            n = len(entries)
            entries.append((rec.offset, NONE))
            opcode = int.from_bytes(d[4:8], "little") if len(d) >= 8 else -1
            if opcode in _NO_REPLY:
                continue
            unique = int.from_bytes(d[8:16], "little") if len(d) >= 16 else 0
            key = (rec.epoch, rec.queue, rec.head) if rec.head is not None else (rec.epoch, -1, unique)
            pending[key] = n
        else:
            unique = int.from_bytes(d[8:16], "little") if len(d) >= 16 else -1
            n = -1
            if unique != 0:
                for ep in (rec.epoch, rec.epoch - 1):
                    key = (ep, rec.queue, rec.head) if rec.head is not None else (ep, -1, unique)
                    n = pending.pop(key, -1)
                    if n >= 0:
                        break
            if n >= 0:
                entries[n] = (entries[n][0], rec.offset)
            else:
                entries.append((NONE, rec.offset))
    return entries


class RecordingIndex:
    """Random access by exchange number; `rebuilt` tells whether opening had to scan the recording."""

    def __init__(self, recording: str | os.PathLike[str], *, rebuild: bool = False) -> None:
        self.recording = Path(recording)
        self.path = index_path(recording)
        st = os.stat(self.recording)
        self._stamp = (st.st_size, st.st_mtime_ns)
        self.rebuilt = False
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

    def _build(self) -> None:
        with RecordingReader(self.recording) as r:
            entries = build_entries(r)
        blob = _HEAD.pack(MAGIC, *self._stamp, len(entries)) + b"".join(_ENTRY.pack(*e) for e in entries)
        self.count = len(entries)
        self.rebuilt = True
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        try:
            tmp.write_bytes(blob)
            os.replace(tmp, self.path)
        except OSError:  # a read-only directory: keep the index in memory
            tmp.unlink(missing_ok=True)
            self._mem = blob
            return
        if not self._load():  # pragma: no cover - we just wrote it
            self._mem = blob

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

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
