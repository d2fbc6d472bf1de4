"""A recording's exchanges read on demand through the side index, in bounded memory whatever its size.

`IndexedRecording` is the store a replay needs for a recording of any size: `len()` and `rec[i]` (the
exchange numbered i + 1, decoded from its two records when asked, a bounded LRU of them kept), and
`scan(pred)` for a whole-file filter that yields matches as it finds them and reports progress.  The
whole-recording analysis (stats, lints, submounts, SYNCFS, the final inode paths, each INIT) is built
in one pass the first time and saved beside the index as FILE.fsana (JSON, stamped like the index), so
a second open reads it instead; a changed recording rebuilds both.

Memory: the index is mmap'd (16 bytes per exchange, paged by the kernel, not held); the LRU holds
`cache_size` decoded exchanges (about 2 KiB each); the decoder's own state is dropped every
`DECODER_RESET` exchanges.  The analysis pass keeps, like `fsinspect stats`, one latency per replied
exchange until it has its percentiles (O(n): ~36 bytes each), and the lints.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, overload

from dissectors.spec import fuse as spec

from .. import privfile
from ..analysis import Analyzer, Exchange
from ..analysis.exchange import LazyExchange, Lint, LintLog
from ..analysis.filter import DECODE, FULL, HEADER, ROWS
from ..analysis.inodes import Announcement, Inode, SyncfsRecord
from ..analysis.render import submounts_json, syncfs_json
from ..analysis.stats import SecondRates, Stats
from .index import MappedHeads, RecordingIndex, recording_stamp
from .parts import ANALYSIS_SUFFIX, ROWS_SUFFIX, side_file
from .reader import Record, RecordingError, RecordingReader
from .replay import feed_record, prime_from_header

CACHE_SIZE = 4096
DECODER_RESET = 50_000  # decodes between fresh decoders (its inode map and stats would grow otherwise)
ANALYSIS_VERSION = 3
CONTROL_KEEP = 50_000  # vhost-user control records the analysis remembers (offsets) for the control panel
RELEASE_EVERY = 1 << 16  # records between handing the mapped pages read or written back to the kernel
YIELD_EVERY = 256  # records a whole pass (build_analysis) applies between GIL hand-offs (as live.feed.BATCH)

ERROR, LINT, SNAPPED, SUBMOUNT = 1, 2, 4, 8  # a row's flags


def analysis_path(recording: Path) -> Path:
    return side_file(recording, ANALYSIS_SUFFIX)


def rows_path(recording: Path) -> Path:
    return side_file(recording, ROWS_SUFFIX)


_ROWS_HEAD = struct.Struct("<8sQQQ")  # magic, recording size, recording mtime_ns, count
_ROWS_MAGIC = b"FSROW\x00\x00\x01"
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_IN = struct.Struct("<IIQQ")  # fuse_in_header: len, opcode, unique, nodeid
_OUT = struct.Struct("<IiQ")  # fuse_out_header: len, error, unique
_OP_INIT = spec.OPCODE_BY_NAME["INIT"].value
_FLAG_RE = {bit: re.compile(b"[" + b"".join(re.escape(bytes([v])) for v in range(256) if v & bit) + b"]")
            for bit in (ERROR, LINT, SNAPPED)}


class Rows:
    """Per exchange, fixed-size, in a file beside the index (FILE.fsrow) read through mmap: the path its
    nodeid had when the request came (an id into the analysis' path table, u32), its latency + 1 (u64, 0:
    none) and its flags (u8: ERROR, LINT, SNAPPED, SUBMOUNT).  13 bytes an exchange on disk, none of it held: what
    the UI needs for paths, `e`/`l` jumps and the latency sort without decoding a single record."""

    def __init__(self, mm: mmap.mmap, count: int, *, anonymous: bool = False) -> None:
        self.mm = mm
        self.count = count  # rows there is room for (a build that does not know the total yet grows them)
        self.anonymous = anonymous  # a read-only directory: the rows live in memory (DONTNEED would zero them)
        self.ids_at = _ROWS_HEAD.size
        self.lat_at = self.ids_at + 4 * count
        self.flags_at = self.lat_at + 8 * count

    def resized(self, tmp: Path, count: int, mode: int) -> Rows:
        """These rows' first `count` (all, and zeroed room after them) in a new `tmp` (or in memory)."""
        new = Rows.create(tmp, count, mode)
        n = min(count, self.count)
        for src, dst, width in ((self.ids_at, new.ids_at, 4), (self.lat_at, new.lat_at, 8),
                                (self.flags_at, new.flags_at, 1)):
            new.mm[dst:dst + width * n] = self.mm[src:src + width * n]
        return new

    @staticmethod
    def size(count: int) -> int:
        return _ROWS_HEAD.size + 13 * count

    @classmethod
    def create(cls, tmp: Path, count: int, mode: int) -> Rows:
        """Rows to fill (zeroed), in `tmp` (renamed into place by `commit`) or in memory if it cannot be written."""
        try:
            os.close(privfile.create(tmp, mode))
            fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return cls(mmap.mmap(-1, cls.size(count)), count, anonymous=True)
        try:
            os.ftruncate(fd, cls.size(count))
            return cls(mmap.mmap(fd, cls.size(count)), count)
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path: Path, stamp: tuple[int, ...], count: int) -> Rows | None:
        """The rows saved for this recording (None if missing, stale or the wrong size)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size != cls.size(count):
                return None
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        magic, size, mtime, n = _ROWS_HEAD.unpack_from(mm)
        if magic != _ROWS_MAGIC or (size, mtime) != stamp or n != count:
            mm.close()
            return None
        return cls(mm, count)

    def commit(self, tmp: Path, path: Path, stamp: tuple[int, ...]) -> bool:
        """Stamp the rows and move them into place; False if they live in memory only."""
        _ROWS_HEAD.pack_into(self.mm, 0, _ROWS_MAGIC, stamp[0], stamp[1], self.count)
        if self.anonymous:
            return False
        self.mm.flush()
        os.replace(tmp, path)
        return True

    def set_path(self, i: int, path_id: int) -> None:
        if i < self.count:
            _U32.pack_into(self.mm, self.ids_at + 4 * i, path_id)

    def set_done(self, i: int, flags: int, latency: int | None) -> None:
        if i < self.count:
            self.mm[self.flags_at + i] |= flags
            if latency is not None:
                _U64.pack_into(self.mm, self.lat_at + 8 * i, max(0, latency) + 1)

    def path_id(self, i: int) -> int:
        return int(_U32.unpack_from(self.mm, self.ids_at + 4 * i)[0])

    def latency(self, i: int) -> int | None:
        v = int(_U64.unpack_from(self.mm, self.lat_at + 8 * i)[0])
        return v - 1 if v else None

    def flags(self, i: int) -> int:
        return self.mm[self.flags_at + i]

    def find(self, bit: int, start: int, step: int, limit: int) -> int | None:
        """The nearest row from `start` on (or back, step -1), below `limit`, with `bit` set (a C regex over
        the mapped flags: millions of rows a second)."""
        pat, base = _FLAG_RE[bit], self.flags_at
        limit = min(limit, self.count)
        if step > 0:
            m = pat.search(self.mm, base + start, base + limit) if 0 <= start < limit else None
            return m.start() - base if m else None
        end = min(start + 1, limit)
        while end > 0:
            lo = max(0, end - (1 << 20))
            last = None
            for last in pat.finditer(self.mm, base + lo, base + end):  # noqa: B007 - the last one is wanted
                pass
            if last is not None:
                return last.start() - base
            end = lo
        return None

    def release(self) -> None:
        """Hand the pages touched so far back (a file's dirty pages stay in the page cache): RSS stays flat."""
        if not self.anonymous:
            self.mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.mm.close()


def _head(heads: MappedHeads, reader: RecordingReader, off: int) -> tuple[int, int, int, int, int, int | None, int,
                                                                          bytes | mmap.mmap]:
    """A record's header fields as MappedHeads.at gives them, through the reader for a record in another layout."""
    got = heads.at(off)
    if got is not None:
        return got
    r = reader.record_at(off)
    return r.ts_ns, r.orig_len, 0, len(r.data), r.queue, r.head, r.epoch, r.data


class AnalysisBuild:
    """One pass over a recording that builds its analysis (inode map, lints, stats, SYNCFS, submounts) and
    its rows.  The caller's feed loop (fsinspect/live/feed.py in the UI) calls `apply` for each record in
    file order, then `finish` saves both beside the index.  Memory: the analyzer's state (bounded by the
    live inodes, the analyzer's bounded lints and the stats' histograms), never anything per exchange."""

    def __init__(self, rec: IndexedRecording, analyzer: Analyzer) -> None:
        self.rec = rec
        self.an = analyzer
        first = rec.parts[0]
        self.mode = os.stat(first).st_mode & 0o666
        self.tmp = rows_path(first).with_name(f".{rows_path(first).name}.tmp{os.getpid()}")
        # room for every exchange, or (the index still growing with this pass) for a first guess, doubled as needed
        room = len(rec) if rec.index.complete else max(len(rec), 1024, rec.index.total // 512)
        self.rows = Rows.create(self.tmp, room, self.mode)
        rec.rows, rec.path_table, rec.analysed = self.rows, [""], 0
        self._ids: dict[str, int] = {"": 0}
        self.records = 0
        self.snapped = 0
        self.first_ts = 0
        self.control: list[int] = []
        self.rates = SecondRates()  # the newest capture seconds' exchanges and bytes (the stats panel's rates)
        prime_from_header(analyzer, rec.reader)
        analyzer.listeners.append(self._done)

    def apply(self, r: Record) -> None:
        self.records += 1
        if not self.first_ts:
            self.first_ts = r.ts_ns
        if self.records % RELEASE_EVERY == 0:
            self.rows.release()
        if not r.is_fuse:
            if len(self.control) < CONTROL_KEEP:
                self.control.append(r.offset)
            return
        index = self.rec.index
        if not index.complete:  # the same pass indexes what the index does not hold yet
            index.add(r.offset, r.inbound, r.queue, r.head, r.epoch, r.data)
        an = self.an
        if an.count >= self.rows.count:
            self._grow()
        hint = ""
        if r.inbound and len(r.data) >= 24:  # the nodeid's path now: a FORGET or UNLINK changes it
            nodeid = int.from_bytes(r.data[16:24], "little")
            if nodeid in an.inodes.nodes:
                hint = an.inodes.path(nodeid)
        ex = feed_record(an, r)
        if ex is not None and hint:
            pid = self._ids.get(hint)
            if pid is None:
                pid = self._ids[hint] = len(self.rec.path_table)
                self.rec.path_table.append(hint)
            self.rows.set_path(ex.index, pid)
        self.rec.analysed = min(an.count, self.rows.count)

    def _grow(self) -> None:
        self._resize(2 * self.rows.count)

    def _resize(self, count: int) -> None:
        """Room for `count` rows (the old map stays valid for a reader that holds it: it is not closed)."""
        tmp = self.tmp.with_name(self.tmp.name + "+")
        rows = self.rows.resized(tmp, count, self.mode)
        if not rows.anonymous:
            os.replace(tmp, self.tmp)
        self.rows = self.rec.rows = rows

    def _done(self, ex: Exchange) -> None:
        flags = ((ERROR if ex.error else 0) | (LINT if ex.lints else 0) | (SNAPPED if ex.snapped else 0)
                 | (SUBMOUNT if ex.submount else 0))
        self.snapped += ex.snapped
        if ex.ts_ns:
            self.rates.add(ex.ts_ns, ex.req_len + ex.reply_len)
        self.rows.set_done(ex.index, flags, ex.latency_ns)

    def finish(self, end: int | None = None, error: str | None = None) -> dict[str, Any]:
        """End the pass (no-reply lints), save the rows and the analysis, and let the recording use them.
        `end`: where reading stopped (the end, or a truncated tail); `error`: a bad block stopped it."""
        an, rec = self.an, self.rec
        if not rec.index.complete:
            if error is not None:
                rec.index.fail(error)
            elif end is not None:
                rec.index.finish(end)
        an.finish()
        if self.rows.count != an.count:  # the room guessed: exactly the rows there are
            self._resize(an.count)
        an.listeners.remove(self._done)
        for lint in an.lints:
            self.rows.set_done(lint.exchange, LINT, None)
        stamp = rec._stamp()
        inodes = an.inodes.nodes.values()
        data: dict[str, Any] = {
            "version": ANALYSIS_VERSION, "stamp": stamp, "count": an.count, "records": self.records,
            "first_ts": self.first_ts, "snapped": self.snapped, "lints_dropped": an.lints.dropped(),
            "lint_counts": dict(an.lints.counts),
            "stats": an.stats.as_dict(),
            "lints": [[x.name, x.exchange, x.message] for x in an.lints],
            "submounts": submounts_json(an),
            "syncfs": syncfs_json(an),
            "path_table": rec.path_table, "control": self.control,
            "rates": self.rates.rows(),
            "state": {"inodes": [[n.nodeid, n.parent, None if n.name is None else n.name.hex(), n.ino, n.generation,
                                  n.nlookup, n.attr_flags] for n in inodes],
                      "announced": [[a.nodeid, a.parent, a.name.hex(), a.exchange, a.ino]
                                    for a in an.submounts.announced.values()],
                      "syncfs": [[s.exchange, s.nodeid, s.latency_ns, s.is_root, s.error, s.path]
                                 for s in an.submounts.syncfs],
                      "stats": an.stats.state(), "last_ts": an.last_ts},
        }
        first = rec.parts[0]
        try:
            if self.rows.commit(self.tmp, rows_path(first), tuple(stamp)):
                privfile.write_file(analysis_path(first), json.dumps(data), os.stat(first).st_mode & 0o666)
        except OSError:  # a read-only directory: it stays in memory for this session
            pass
        rec.analysed = self.rows.count
        rec.analysis = data
        rec._adopt(data)
        return data

    def abort(self) -> None:
        """A pass given up (the UI closed): no half-built rows left behind."""
        self.an.listeners.remove(self._done)
        self.tmp.unlink(missing_ok=True)


class IndexedRecording:
    """Random access to a recording's exchanges by number, through its side index."""

    def __init__(self, path: str | os.PathLike[str], *, cache_size: int = CACHE_SIZE,
                 progress: Callable[[float], None] | None = None, lazy_index: bool = False) -> None:
        self.reader = RecordingReader(path)  # validates the header: RecordingError for a bad file
        self.parts = self.reader.parts
        # progress: of an index being built; lazy_index: open with what is indexed so far, the analysis pass
        # indexes the rest (len() grows meanwhile)
        self.index = RecordingIndex(path, progress=progress, lazy=lazy_index)
        self.records_end = 0
        self.cache_size = cache_size
        self._cache: OrderedDict[int, Exchange] = OrderedDict()
        self._lock = threading.Lock()  # the reader's handle seeks: one user at a time
        self._decoded = 0
        self._inits: dict[int, tuple[bytes, bytes]] = {}  # INITs met while decoding, for the next decoder
        self._decoder = self._new_decoder()
        self.rows: Rows | None = None  # per-exchange path, latency and flags (rows_path), once analysed
        self.path_table: list[str] = [""]
        self.analysed = 0  # exchanges the analysis has covered (all of them once it is saved)
        self.analysis: dict[str, Any] | None = self._load_analysis()
        self._lints: dict[int, list[str]] = {}
        if self.analysis is not None:
            self._adopt(self.analysis)

    def __len__(self) -> int:
        return len(self.index)

    # -- exchanges on demand -------------------------------------------------------------------------
    @overload
    def __getitem__(self, i: int) -> Exchange: ...

    @overload
    def __getitem__(self, i: slice) -> list[Exchange]: ...

    def __getitem__(self, i: int | slice) -> Exchange | list[Exchange]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        with self._lock:
            ex = self._cache.get(i)
            if ex is not None:
                self._cache.move_to_end(i)
                return ex
            ex = self._decode(i)
            if ex.replied or not ex.expects_reply or self.index.complete:  # (else its reply may be indexed yet)
                self._cache[i] = ex
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return ex

    def _new_decoder(self) -> Analyzer:
        an = Analyzer(keep_exchanges=False)
        init = self.reader.section.meta.get("init")
        if isinstance(init, dict) and init.get("request"):
            try:
                an.prime_init(int(init.get("epoch", 0)), bytes.fromhex(init["request"]),
                              bytes.fromhex(init["reply"]) if init.get("reply") else None)
            except (TypeError, ValueError):
                pass
        for epoch, (req, rep) in self._inits.items():
            an.prime_init(epoch, req, rep)
        return an

    def _decode(self, i: int) -> Exchange:
        req_off, rep_off = self.index.offsets(i)
        self._decoded += 1
        if self._decoded % DECODER_RESET == 0:
            self._decoder = self._new_decoder()
        an = self._decoder
        req = self.reader.record_at(req_off) if req_off is not None else None
        rep = self.reader.record_at(rep_off) if rep_off is not None else None
        ex = feed_record(an, req) if req is not None else None
        if rep is not None:
            got = feed_record(an, rep)
            if ex is None:  # a reply whose request the recording does not hold
                ex = got
        assert ex is not None  # an index entry has at least one side
        if ex.opname == "INIT" and req is not None and rep is not None:
            self._remember_init(req, rep)
        ex.index, ex.n = i, i + 1
        if self.analysis is not None:  # the whole recording's lints, not what this one exchange shows alone
            ex.lints = list(self._lints.get(i, ()))
        if self.rows is not None and i < self.analysed and self.rows.flags(i) & SUBMOUNT:
            ex.submount = True  # its nodeid was announced as a submount earlier in the recording
        return ex

    def _remember_init(self, req: Record, rep: Record) -> None:
        self._inits[req.epoch] = (req.data, rep.data)

    # -- a whole-file filter -------------------------------------------------------------------------
    def scan(self, pred: Callable[[Exchange], bool], *, start: int = 0,
             progress: Callable[[int, int], None] | None = None,
             stop: threading.Event | None = None, costs: frozenset[int] | None = None) -> Iterator[int]:
        """The numbers (indexes) of the exchanges `pred` keeps, from `start` on, as they are found;
        `progress(done, total)` every 1024 exchanges; ends at the next exchange once `stop` is set.

        `costs` (filter_costs of the expression) lets the pass read no more of an exchange than the
        expression needs: its records' headers (HEADER), plus the saved analysis' rows (ROWS), plus a message
        body decoded when the predicate first reads it (DECODE).  Without it, or with FULL, every exchange is
        decoded whole, as `rec[i]` gives it; the answers are the same."""
        light = self._light_level(costs)
        reader = RecordingReader(self.parts[0]) if light is not None else None  # its own handle: no lock
        heads = MappedHeads(self.parts) if light is not None else None
        index = self.index
        try:
            total = index.settled()
            i = start - 1
            while True:
                i += 1
                if i >= total:  # an index still growing: the rest as it arrives (and its replies with it)
                    total = index.settled()
                    while i >= total and not index.complete and index.error is None:
                        if stop is not None and stop.wait(0.05):
                            return
                        if stop is None:
                            time.sleep(0.05)
                        total = index.settled()
                    if i >= total:
                        break
                if stop is not None and stop.is_set():
                    return
                if i & 1023 == 0:
                    if progress is not None:
                        progress(i, total)
                    if i & 0xFFFF == 0:
                        self.index.release()
                        if self.rows is not None:
                            self.rows.release()
                        if heads is not None:
                            heads.release()
                ex = None
                if light is not None:
                    assert heads is not None and reader is not None
                    ex = self._light(heads, reader, i, light)
                if pred(ex if ex is not None else self[i]):
                    yield i
            if progress is not None:
                progress(total, total)
        finally:
            if reader is not None:
                reader.close()
            if heads is not None:
                heads.close()

    def _light_level(self, costs: frozenset[int] | None) -> int | None:
        """HEADER or DECODE: how a pass reads exchanges for an expression of these costs; None: whole."""
        if costs is None or FULL in costs or (ROWS in costs and self.analysis is None):
            return None  # (without the saved analysis, lints are what one exchange shows: rec[i]'s)
        return DECODE if DECODE in costs else HEADER

    def _light(self, heads: MappedHeads, reader: RecordingReader, i: int, level: int) -> Exchange | None:
        """Exchange i from its records' headers, its bodies undecoded (DECODE: a LazyExchange that decodes a
        side when the predicate first reads it), with the saved analysis' lints and submount flag.  None
        where only the analyzer's own reading is exact: no request header (orphans, notifications, a short
        request), an INIT (it changes how later bodies decode), an error field that is no errno."""
        req_off, rep_off = self.index.offsets(i)
        if req_off is None:
            return None
        req = _head(heads, reader, req_off)
        ts, orig, p, ln, queue, head, epoch, buf = req
        if ln < _IN.size:
            return None
        _l, opcode, unique, nodeid = _IN.unpack_from(buf, p)
        if opcode == _OP_INIT and level == DECODE:
            return None
        lazy = level == DECODE
        ex = (LazyExchange if lazy else Exchange)(i, queue, head, epoch, unique, opcode, nodeid, req_ts=ts,
                                                  req_len=orig, n=i + 1)
        ex.snapped = orig > ln
        if lazy:
            assert isinstance(ex, LazyExchange)
            with self._lock:  # the contexts the whole-exchange decoder has (INITs met so far)
                ex.ctx = self._decoder.contexts.get(epoch)
            ex.req_raw, ex.wire_req, ex.req_todo = bytes(buf[p:p + ln]), orig, True
        if rep_off is not None:
            ts, orig, p, ln, _q, _h, _e, buf = _head(heads, reader, rep_off)
            if ln < _OUT.size:
                return None
            err = _OUT.unpack_from(buf, p)[1]
            if err > 0:
                return None
            ex.reply_ts, ex.reply_len, ex.replied, ex.error = ts, orig, True, -err
            ex.snapped = ex.snapped or orig > ln
            if lazy:
                assert isinstance(ex, LazyExchange)
                ex.reply_raw, ex.wire_reply, ex.reply_todo = bytes(buf[p:p + ln]), orig, True
        ex.lints = list(self._lints.get(i, ()))
        if self.rows is not None and i < self.analysed and self.rows.flags(i) & SUBMOUNT:
            ex.submount = True
        return ex

    # -- per-exchange facts of the whole recording, on disk ------------------------------------------
    def path(self, i: int) -> str | None:
        """The path exchange i's nodeid had when its request came (None: the analysis has not got there)."""
        rows = self.rows
        if rows is None or i >= self.analysed:
            return None
        try:
            return self.path_table[rows.path_id(i)]
        except IndexError:
            return ""

    def find(self, bit: int, start: int, step: int) -> int | None:
        """The nearest exchange from `start` on (step 1) or back (step -1) whose row has `bit` (ERROR, LINT),
        within what the analysis has covered; None if there is none."""
        if self.rows is None:
            return None
        found = self.rows.find(bit, start, step, self.analysed)
        self.rows.release()  # the flags the search read leave RSS again
        return found

    # -- the analysis, built once ----------------------------------------------------------------------
    def _stamp(self) -> list[int]:
        return list(recording_stamp(self.parts))

    def _load_analysis(self) -> dict[str, Any] | None:
        try:
            data = json.loads(analysis_path(self.parts[0]).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("version") != ANALYSIS_VERSION or data.get("stamp") != self._stamp():
            return None
        rows = Rows.open(rows_path(self.parts[0]), tuple(self._stamp()), len(self))
        if rows is None:
            return None
        self.rows = rows
        self.path_table = [str(x) for x in data.get("path_table", [""])]
        self.analysed = len(self)
        return data

    def analysis_build(self, analyzer: Analyzer | None = None) -> AnalysisBuild:
        """Start building the analysis: feed it every record (`records()`), then `finish()` it."""
        return AnalysisBuild(self, analyzer if analyzer is not None else Analyzer(keep_exchanges=False))

    def records(self) -> Iterator[Record]:
        """Every record of the recording in file order (its own handle: the UI's reads do not move it);
        `records_end` then says where they stopped (the end, or a truncated tail)."""
        with RecordingReader(self.parts[0]) as r:
            yield from r.records()
            self.records_end = r.end

    def build_analysis(self, analyzer: Analyzer | None = None) -> dict[str, Any]:
        """Analyse the whole recording once (seconds per million exchanges) and save it beside the index; an
        index still growing (`lazy_index`) is completed by the same pass.

        Run in a background thread beside a UI that decodes rows as the index grows: the pass hands the GIL
        over every YIELD_EVERY records, as the UI's own feed loop does.  Holding it for the whole pass, each
        of the UI thread's reads (which release the GIL) waited a switch interval (5 ms) to get it back: the
        first screen of 60 rows took over a second under load instead of ~10 ms."""
        build = self.analysis_build(analyzer)
        k = 0
        try:
            for rec in self.records():
                build.apply(rec)
                k += 1
                if k == YIELD_EVERY:
                    k = 0
                    time.sleep(0)  # hand the GIL to another thread if it is waiting for it
        except RecordingError as e:
            self.index.fail(str(e))
            raise
        return build.finish(self.records_end)

    def restore(self, an: Analyzer) -> None:
        """Put the saved analysis into `an` (inode map, submounts, SYNCFS, lints, stats): what the UI's
        panels show, without reading the recording again."""
        d = self.analysis
        assert d is not None
        st = d["state"]
        an.inodes.nodes.clear()
        for nodeid, parent, name, ino, gen, nlookup, attr_flags in st["inodes"]:
            an.inodes.nodes[int(nodeid)] = Inode(int(nodeid), parent, None if name is None else bytes.fromhex(name),
                                                 int(ino), int(gen), int(nlookup), int(attr_flags))
        for nodeid, parent, name, exchange, ino in st["announced"]:
            an.submounts.announce(Announcement(int(nodeid), int(parent), bytes.fromhex(name), int(exchange), int(ino)))
        for exchange, nodeid, lat, is_root, error, path in st["syncfs"]:
            an.submounts.syncfs.append(SyncfsRecord(int(exchange), int(nodeid), lat, bool(is_root), error, str(path)))
        an.lints = LintLog(Lint(str(name), int(index), str(msg)) for name, index, msg in d["lints"])
        an.lints.restore({str(k): int(v) for k, v in d.get("lint_counts", {}).items()})
        an.stats = Stats.from_state(st["stats"])
        an.count = int(d["count"])
        an.last_ts = int(st["last_ts"])

    def _adopt(self, data: dict[str, Any]) -> None:
        lints: dict[int, list[str]] = {}
        for name, index, _msg in data.get("lints", ()):
            lints.setdefault(int(index), []).append(str(name))
        self._lints = lints
        with self._lock:
            for i, ex in self._cache.items():
                ex.lints = list(lints.get(i, ()))
                if self.rows is not None and self.rows.flags(i) & SUBMOUNT:
                    ex.submount = True

    def close(self) -> None:
        self.index.close()
        self.reader.close()
        if self.rows is not None:
            self.rows.close()

    def __enter__(self) -> IndexedRecording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
