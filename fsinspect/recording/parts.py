"""A rotated recording read as one: which files are its parts, and one stream over all of them.

The writer names part 0 FILE.pcapng and continues in FILE.001.pcapng, FILE.002.pcapng, …; each part
starts with its own section header.  pcapng allows sections back to back, so the parts concatenated
are one valid pcapng stream: the reader walks that stream, and a record's offset is its offset in the
concatenation (what the index and the export keep).  Parts of one run carry the same `recording` id in
their section header, so a stale FILE.005.pcapng left by an older, longer run is not taken for a part.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
from pathlib import Path

from . import format as fmt

_PART = re.compile(r"^(?P<stem>.+?)\.(?P<n>\d{3,})(?P<suffix>\.[^.]*)?$")
SUFFIXES = (".pcapng", ".pcap")


class PartsError(Exception):
    """No recording where the user pointed (the reader turns it into its RecordingError)."""


def part_key(path: Path) -> tuple[str, int]:
    """(the recording's base name, this part's number): FILE.003.pcapng -> (FILE.pcapng, 3)."""
    m = _PART.match(path.name)
    if m is None:
        return path.name, 0
    return m["stem"] + (m["suffix"] or ""), int(m["n"])


def part_path(base: Path, n: int) -> Path:
    """The file name of part `n` of the recording whose part 0 is `base`."""
    if n == 0:
        return base
    return base.with_name(f"{base.stem}.{n:03d}{base.suffix}")


INDEX_SUFFIX = ".fsidx"  # the side index (index.py)
ANALYSIS_SUFFIX = ".fsana"  # the saved analysis (indexed.py)
ROWS_SUFFIX = ".fsrow"  # per-exchange paths, latencies and flags (indexed.py)
SIDE_SUFFIXES = (INDEX_SUFFIX, ANALYSIS_SUFFIX, ROWS_SUFFIX)  # never parts, whatever a glob matches


def side_file(part: Path, suffix: str) -> Path:
    """A file kept beside a recording's first part: its index or its saved analysis."""
    return part.with_name(part.name + suffix)


def recording_id(path: Path) -> str | None:
    """The `recording` id in a part's section header (None for older files or anything unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            btype, total = struct.unpack("<II", head)
            if btype != fmt.BT_SHB or not 28 <= total <= 1 << 20:
                return None
            body = f.read(total - 8)
    except OSError:
        return None
    off = 16  # after the magic, the version and the section length
    while off + 4 <= len(body) - 4:
        code, ln = struct.unpack_from("<HH", body, off)
        if code == fmt.OPT_ENDOFOPT:
            break
        val = body[off + 4:off + 4 + ln]
        if code == fmt.OPT_CUSTOM_STR and len(val) > 4:
            try:
                obj = json.loads(val[4:].decode())
            except (UnicodeDecodeError, ValueError):
                obj = None
            if isinstance(obj, dict) and "format" in obj:
                rid = obj.get("recording")
                return rid if isinstance(rid, str) else None
        off += 4 + ln + (-ln % 4)
    return None


def _continuations(base: Path, after: int) -> list[Path]:
    """Parts of `base`'s recording numbered above `after`, in order."""
    stem = glob.escape(base.stem)
    found = []
    for p in base.parent.glob(f"{stem}.[0-9][0-9][0-9]*{glob.escape(base.suffix)}"):
        b, n = part_key(p)
        if b == base.name and n > after and p.is_file():
            found.append((n, p))
    return [p for _, p in sorted(found)]


def _one_recording(files: list[Path], where: str) -> list[Path]:
    groups: dict[tuple[Path, str], list[tuple[int, Path]]] = {}
    for p in files:
        b, n = part_key(p)
        groups.setdefault((p.parent, b), []).append((n, p))
    if not groups:
        raise PartsError(f"{where}: no recording there (no {' or '.join('*' + s for s in SUFFIXES)} file)")
    if len(groups) > 1:
        names = ", ".join(sorted(str(d / b) for d, b in groups)[:4])
        raise PartsError(f"{where}: holds {len(groups)} recordings ({names}{', …' if len(groups) > 4 else ''}); "
                         "name one of them")
    return [p for _, p in sorted(next(iter(groups.values())))]


def _same_run(parts: list[Path]) -> list[Path]:
    """Stop at the first part written by another run (a different `recording` id) or missing one."""
    rid = recording_id(parts[0])
    if rid is None:
        return parts[:1]  # written before parts carried an id: only what was named
    out = [parts[0]]
    for p in parts[1:]:
        if recording_id(p) != rid:
            break
        out.append(p)
    return out


def resolve(spec: str | os.PathLike[str]) -> list[Path]:
    """The parts of the recording `spec` names, in order: a file (it and its later parts), a glob, or a
    directory holding one recording.  A part 0 deleted by --rotate-keep still names its recording."""
    text = os.fspath(spec)
    path = Path(text)
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.suffix in SUFFIXES and p.is_file()]
        return _same_run(_one_recording(files, text))
    if path.is_file():
        base, n = part_key(path)
        return _same_run([path, *_continuations(path.with_name(base), n)])
    if glob.has_magic(text):
        files = [Path(p) for p in sorted(glob.glob(text)) if Path(p).is_file() and Path(p).suffix not in SIDE_SUFFIXES]
        if not files:
            raise PartsError(f"{text}: no file matches")
        return _same_run(_one_recording(files, text))
    rest = _continuations(path, 0) if path.suffix else []
    if rest:
        return _same_run(rest)
    raise PartsError(f"{text}: {os.strerror(2)}")


class Concat:
    """A read-only binary stream over several files back to back (seek, read, tell, close).

    Every part but the last has its size fixed when opened; the last is read to its current end, so a
    recording still being written keeps growing as the reader follows it.
    """

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self._files = []
        try:
            for p in paths:
                self._files.append(open(p, "rb"))
        except BaseException:
            self.close()
            raise
        self.bases: list[int] = []
        base = 0
        for f in self._files:
            self.bases.append(base)
            base += os.fstat(f.fileno()).st_size
        self._pos = 0

    @property
    def size(self) -> int:
        return self.bases[-1] + os.fstat(self._files[-1].fileno()).st_size

    def part_of(self, offset: int) -> int:
        """Which part holds the stream offset `offset`."""
        i = len(self.bases) - 1
        while i > 0 and self.bases[i] > offset:
            i -= 1
        return i

    def seek(self, pos: int) -> int:
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        out = []
        want = n
        while want != 0:
            i = self.part_of(self._pos)
            f = self._files[i]
            f.seek(self._pos - self.bases[i])
            last = i == len(self._files) - 1
            limit = want if last else (self.bases[i + 1] - self._pos if want < 0 else
                                      min(want, self.bases[i + 1] - self._pos))
            chunk = f.read(limit)
            out.append(chunk)
            self._pos += len(chunk)
            if want > 0:
                want -= len(chunk)
            if last or (not chunk and self._pos < self.bases[i + 1]):
                break  # the end of the last part (or a part that shrank under us)
        return b"".join(out)

    def close(self) -> None:
        for f in self._files:
            f.close()
