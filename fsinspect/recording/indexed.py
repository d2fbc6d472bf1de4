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
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import privfile
from ..analysis import Analyzer, Exchange
from ..analysis.render import submounts_json, syncfs_json
from .index import RecordingIndex, recording_stamp
from .parts import ANALYSIS_SUFFIX, side_file
from .reader import Record, RecordingReader
from .replay import analyze

CACHE_SIZE = 4096
DECODER_RESET = 50_000  # decodes between fresh decoders (its inode map and stats would grow otherwise)
ANALYSIS_VERSION = 2


def analysis_path(recording: Path) -> Path:
    return side_file(recording, ANALYSIS_SUFFIX)


class IndexedRecording:
    """Random access to a recording's exchanges by number, through its side index."""

    def __init__(self, path: str | os.PathLike[str], *, cache_size: int = CACHE_SIZE) -> None:
        self.reader = RecordingReader(path)  # validates the header: RecordingError for a bad file
        self.parts = self.reader.parts
        self.index = RecordingIndex(path)
        self.cache_size = cache_size
        self._cache: OrderedDict[int, Exchange] = OrderedDict()
        self._lock = threading.Lock()  # the reader's handle seeks: one user at a time
        self._decoded = 0
        self._inits: dict[int, tuple[bytes, bytes]] = {}  # INITs met while decoding, for the next decoder
        self._decoder = self._new_decoder()
        self.analysis: dict[str, Any] | None = self._load_analysis()
        self._lints: dict[int, list[str]] = {}
        if self.analysis is not None:
            self._adopt(self.analysis)

    def __len__(self) -> int:
        return len(self.index)

    # -- exchanges on demand -------------------------------------------------------------------------
    def __getitem__(self, i: int) -> Exchange:
        if i < 0:
            i += len(self)
        with self._lock:
            ex = self._cache.get(i)
            if ex is not None:
                self._cache.move_to_end(i)
                return ex
            ex = self._decode(i)
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
        ex: Exchange | None = None
        if req is not None:
            ex = an.feed_request(req.data, req.queue, req.head, req.ts_ns, epoch=req.epoch, orig_len=req.orig_len,
                                 notes=req.notes, ref=req.offset)
        if rep is not None:
            got = an.feed_reply(rep.data, rep.queue, rep.head, rep.ts_ns, epoch=rep.epoch, orig_len=rep.orig_len,
                                notes=rep.notes, ref=rep.offset)
            if ex is None:  # a reply whose request the recording does not hold
                ex = got
        assert ex is not None  # an index entry has at least one side
        if ex.opname == "INIT" and req is not None and rep is not None:
            self._remember_init(req, rep)
        ex.index, ex.n = i, i + 1
        if self.analysis is not None:  # the whole recording's lints, not what this one exchange shows alone
            ex.lints = list(self._lints.get(i, ()))
        return ex

    def _remember_init(self, req: Record, rep: Record) -> None:
        self._inits[req.epoch] = (req.data, rep.data)

    # -- a whole-file filter -------------------------------------------------------------------------
    def scan(self, pred: Callable[[Exchange], bool], *, start: int = 0,
             progress: Callable[[int, int], None] | None = None,
             stop: threading.Event | None = None) -> Iterator[int]:
        """The numbers (indexes) of the exchanges `pred` keeps, from `start` on, as they are found;
        `progress(done, total)` every 1024 exchanges; ends at the next exchange once `stop` is set."""
        total = len(self)
        for i in range(start, total):
            if stop is not None and stop.is_set():
                return
            if i & 1023 == 0:
                if progress is not None:
                    progress(i, total)
                if i & 0xFFFF == 0:
                    self.index.release()
            if pred(self[i]):
                yield i
        if progress is not None:
            progress(total, total)

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
        return data

    def build_analysis(self, analyzer: Analyzer | None = None) -> dict[str, Any]:
        """Analyse the whole recording once (seconds per million exchanges) and save it beside the index."""
        with RecordingReader(self.parts[0]) as r:
            an = analyze(r, analyzer if analyzer is not None else Analyzer(keep_exchanges=False))
        data: dict[str, Any] = {
            "version": ANALYSIS_VERSION, "stamp": self._stamp(), "count": an.count,
            "stats": an.stats.as_dict(),
            "lints": [[x.name, x.exchange, x.message] for x in an.lints],
            "submounts": submounts_json(an),
            "syncfs": syncfs_json(an),
            "paths": {str(n): an.inodes.path(n) for n in an.inodes.nodes},
        }
        try:
            privfile.write_file(analysis_path(self.parts[0]), json.dumps(data),
                                os.stat(self.parts[0]).st_mode & 0o666)
        except OSError:  # a read-only directory: it stays in memory for this session
            pass
        self.analysis = data
        self._adopt(data)
        return data

    def _adopt(self, data: dict[str, Any]) -> None:
        lints: dict[int, list[str]] = {}
        for name, index, _msg in data.get("lints", ()):
            lints.setdefault(int(index), []).append(str(name))
        self._lints = lints
        with self._lock:
            for i, ex in self._cache.items():
                ex.lints = list(lints.get(i, ()))

    def close(self) -> None:
        self.index.close()
        self.reader.close()

    def __enter__(self) -> IndexedRecording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
