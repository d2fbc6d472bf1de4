"""Where the UI's exchanges come from: a recording (ReplaySource) or a proxy's control socket (AttachSource).

Both feed one Store from a worker thread, in batches under `Store.lock`, so the UI thread never waits on
I/O or decoding: it only reads what is there (lists grow by append) and takes the lock briefly to look at
the inode map or stats.  No textual import here: the sources are tested and benchmarked without a screen.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from ..analysis import Analyzer, Exchange
from ..analysis.stats import RATE_SECONDS, SecondRates
from ..live.feed import BATCH, CommandError, ControlFeed, Feed, LiveState
from ..recording.export import Exported, export_recording, write_pcapng
from ..recording.indexed import AnalysisBuild, IndexedRecording
from ..recording.reader import Record, RecordingError, RecordingReader
from .control import ControlState
from .render import number

FREEZE_EVERY = BATCH  # exchanges between gc.freeze() calls (see Store.settle): one batch of the feed loop
LIVE_KEEP = 500_000  # exchanges a live session keeps (~0.9 GB); older ones are forgotten
__all__ = ["RATE_SECONDS", "AttachSource", "CommandError", "ReplaySource", "Source", "Store"]


@dataclass
class Store(LiveState):
    """Everything the UI shows, fed by one source thread.

    `exchanges` (the analyzer's list) and `paths` only grow; the UI reads indexes below `len()` freely.
    Everything else (inode map, submounts, stats, buckets) is read under `lock`.
    """

    paths: list[str] = field(default_factory=list)  # nodeid -> path as it was when the request came
    title: str = ""
    progress: float | None = None  # 0..1 while a replay is still being analysed
    done: bool = False
    error: str | None = None
    ctl: ControlState = field(default_factory=ControlState)
    second_rates: SecondRates = field(default_factory=SecondRates)  # the newest seconds' ops and bytes
    kind: str = ""  # the source's kind: "replay" or "attach"
    base: int = 0  # Exchange.index of exchanges[0]: a live session forgets its oldest exchanges (trim)
    rec: IndexedRecording | None = None  # a replay's exchanges, read on demand through the side index
    snapped: int = 0  # a replay's exchanges cut to the snap length (the analysis counts them)
    _frozen_at: int = 0

    def __post_init__(self) -> None:
        self.analyzer.listeners.append(self._count)

    @property
    def features(self) -> dict[str, Any]:
        """Features, regions and vrings, shaped like the proxy's ControlPlane.snapshot()."""
        return self.ctl.f

    @property
    def exchanges(self) -> Sequence[Exchange]:
        """Every exchange kept: a live session's list, or a replay's recording (each decoded when asked)."""
        # (IndexedRecording has len() and [i], all a Sequence is used for here: bisect, slices, iteration)
        return cast(Sequence[Exchange], self.rec) if self.rec is not None else self.analyzer.exchanges

    def _count(self, ex: Exchange) -> None:
        if ex.ts_ns:
            self.second_rates.add(ex.ts_ns, ex.req_len + ex.reply_len)

    def feed_request(self, raw: bytes, *args: Any, **kw: Any) -> Exchange:
        """Feed a request, naming its nodeid first (FORGET removes it from the map, UNLINK detaches it)."""
        inodes = self.analyzer.inodes
        nodeid = int.from_bytes(raw[16:24], "little") if len(raw) >= 24 else 0
        hint = inodes.path(nodeid) if nodeid in inodes.nodes else ""
        ex = self.analyzer.feed_request(raw, *args, **kw)
        self.sync_paths(ex.index, hint)
        return ex

    def on_control(self, obj: dict[str, Any]) -> None:
        self.ctl.summary(str(obj.get("direction", "")), str(obj.get("summary", "")))

    def on_event(self, kind: str, detail: dict[str, Any]) -> None:
        self.ctl.event(kind, detail)

    def seed_features(self, features: dict[str, Any]) -> None:
        self.ctl.seed(features)

    def now(self) -> tuple[int, int | None]:
        """What a pending request's age is measured against, (wall, monotonic): the source's clocks live
        (LiveState.source_now), the last capture in a replay."""
        return (self.analyzer.last_ts, None) if self.kind == "replay" else self.source_now()

    def held(self) -> list[Exchange]:
        """The exchanges a breakpoint holds now, oldest first."""
        return sorted((ex for ex in self.open.values() if ex.held is not None), key=lambda e: e.n)

    @property
    def end(self) -> int:
        """One past the newest exchange's index."""
        return self.base + len(self.exchanges)

    def get(self, index: int) -> Exchange | None:
        """Exchange `index`, or None if it is not (or no longer) kept.  Safe against a concurrent trim."""
        rec = self.rec
        if rec is not None:
            if not 0 <= index < len(rec):
                return None
            try:
                return rec[index]
            except RecordingError:  # the file changed under us: the row shows blank, the status says why
                return None
        try:
            ex = self.analyzer.exchanges[index - self.base] if index >= self.base else None
        except IndexError:
            return None
        return ex if ex is not None and ex.index == index else None

    def number_of(self, index: int) -> int:
        """The `#N` shown for exchange `index` (its source-assigned number when it is still kept)."""
        ex = self.get(index)
        return number(ex) if ex is not None else index + 1

    def find_number(self, n: int) -> int | None:
        """The index of the kept exchange numbered `n` (numbers grow along the list; a scan if they do not)."""
        if self.rec is not None:  # a recording numbers its exchanges from 1 in order
            return n - 1 if 1 <= n <= len(self.rec) else None
        exs = self.exchanges
        k = bisect.bisect_left(exs, n, key=number)
        if k < len(exs) and number(exs[k]) == n:
            return exs[k].index
        return next((ex.index for ex in exs if number(ex) == n), None)

    def find_time(self, ts_ns: int, among: Sequence[int] | None = None) -> int | None:
        """The index of the first exchange (of `among`, if given) at or after `ts_ns`; the last if none is.
        A binary search: a replay decodes a few dozen exchanges, whatever its size."""
        if among is not None:
            kept = among if self.rec is not None else [i for i in among if self.get(i) is not None]
            k = bisect.bisect_left(kept, ts_ns, key=lambda i: self.get(i).ts_ns)  # type: ignore[union-attr]
            return kept[min(k, len(kept) - 1)] if kept else None
        exs = self.exchanges
        k = bisect.bisect_left(exs, ts_ns, key=lambda ex: ex.ts_ns)
        return exs[min(k, len(exs) - 1)].index if exs else None

    def trim(self, keep: int) -> int:
        """Forget the oldest exchanges beyond `keep` (call with the lock held); returns how many went.

        A live session runs for hours: every exchange kept costs ~1.7 KB, so the attach source keeps a
        bounded window (the rate buckets bound themselves).  Trimming takes a fifth more than needed so
        that it happens rarely.
        """
        exs = self.analyzer.exchanges
        if len(exs) <= keep:
            return 0
        cut = len(exs) - keep + keep // 5
        del exs[:cut]
        del self.paths[:cut]
        self.base += cut
        return cut

    def settle(self) -> None:
        """Move what the feed built so far out of the cyclic GC's reach (gc.freeze, O(1)).

        Millions of long-lived exchanges would otherwise make every full collection walk them all:
        pauses of hundreds of ms that stop the UI thread too.  Exchanges are kept for the session anyway.
        Frozen after every batch, a live feed's objects are not walked by the older generations' collections
        either (measured: 6% less CPU per exchange ingested than freezing every 5,000).
        """
        n = len(self.analyzer.exchanges)
        if n - self._frozen_at >= FREEZE_EVERY:
            self._frozen_at = n
            gc.freeze()

    def sync_paths(self, index: int = -1, hint: str = "") -> None:
        """Name every new exchange's nodeid with the path it has right now (call right after feeding)."""
        exs = self.analyzer.exchanges
        paths = self.paths
        inodes = self.analyzer.inodes
        while len(paths) < len(exs):
            ex = exs[len(paths)]
            if ex.index == index:
                paths.append(hint)
            else:
                paths.append(inodes.path(ex.nodeid) if ex.opcode >= 0 and ex.nodeid in inodes.nodes else "")

    def path(self, i: int) -> str:
        if self.rec is not None:
            return self.rec.path(i) or ""
        p = i - self.base
        try:
            return self.paths[p] if p >= 0 else ""
        except IndexError:
            return ""

    def flags_of(self, i: int) -> int | None:
        """A replay's row flags for exchange i (ERROR, LINT, SNAPPED) without decoding it; None if unknown."""
        rec = self.rec
        if rec is None or rec.rows is None or not 0 <= i < rec.analysed:
            return None
        return rec.rows.flags(i)

    def latency_of(self, i: int) -> int | None:
        """Exchange i's latency (a replay reads it from its rows, not from the record)."""
        rec = self.rec
        if rec is not None and rec.rows is not None and 0 <= i < rec.analysed:
            return rec.rows.latency(i)
        ex = self.get(i)
        return ex.latency_ns if ex is not None else None

    def snapped_recent(self) -> int:
        """Exchanges cut to the snap length: a replay's all (counted by its analysis), a live session's
        among its newest 100,000."""
        if self.rec is not None:
            return self.snapped
        exs = self.analyzer.exchanges
        return sum(1 for e in exs[-100_000:] if e.snapped)

    def rates(self, seconds: int = 60) -> tuple[list[float], list[float]]:
        """ops/s and bytes/s of the last `seconds` seconds that hold exchanges (capture time), oldest first.

        Seconds without exchanges are left out, as in Stats.ops_per_second: a lying timestamp far from the
        rest costs one point, not a window of empty seconds."""
        with self.lock:
            return self.second_rates.newest(seconds)


class Source:
    """A feeder thread; `raw(ex)` gives the captured bytes (and descriptor layout) of an exchange."""

    kind = "source"

    def __init__(self, store: Store) -> None:
        self.store = store
        store.kind = self.kind
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run_guarded, name=f"fsinspect-{self.kind}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def _run_guarded(self) -> None:
        try:
            self.run()
        except Exception as e:  # the UI shows it; a source never takes the app down
            self.store.error = f"{type(e).__name__}: {e}"
            self.store.status = f"error: {e}"
        finally:
            self.store.done = True

    def run(self) -> None:
        raise NotImplementedError

    def raw(self, ex: Exchange) -> tuple[Record | None, Record | None]:
        return None, None

    def export(self, dest: str, indexes: list[int], note: str) -> Exported:
        """Write exchanges `indexes` to `dest` as a pcapng recording, with the INIT exchanges kept (live:
        the control socket carries no vhost-user bytes, so the file says the control plane is missing)."""
        st = self.store
        inits = [ex.index for ex in st.exchanges if ex.opname == "INIT"]
        chosen = set(indexes)
        recs: list[tuple[Record, bool]] = []
        for i in sorted(chosen.union(inits)):
            ex = st.get(i)
            if ex is None:
                continue
            for rec in self.raw(ex):
                if rec is not None:
                    recs.append((rec, i in chosen))
        recs.sort(key=lambda rc: rc[0].ts_ns)
        return write_pcapng(dest, recs, meta={"source": "virtio"},
                            comments=[note, "from a live session: no vhost-user control messages (the control "
                                            "socket sends summaries, not bytes)"])

    def command(self, cmd: str, on_reply: Callable[[dict[str, Any]], None] | None = None, **args: Any) -> None:
        """Send a debugger command (control protocol v2); `on_reply` gets its reply, from the feed thread."""
        raise CommandError("breakpoints need a live source: `fsinspect attach` to a proxy or daemon --control")


class ReplaySource(Feed, Source):
    """A recording read through its side index (recording/indexed.py): the list shows every exchange as
    soon as the index is there, each decoded when it is drawn.  The analysis (inode map, lints, stats) is
    read back from beside the index, or built once in the background by the shared feed loop, with
    progress, and saved for the next open.  Memory does not grow with the recording's size."""

    kind = "replay"

    def __init__(self, store: Store, path: str) -> None:
        Source.__init__(self, store)
        store.analyzer = Analyzer(keep_exchanges=False)  # exchanges are read on demand, never all kept
        store.analyzer.listeners.append(store._count)
        Feed.__init__(self, store)
        self.path = path
        self.reader = RecordingReader(path)  # raises RecordingError: the command turns it into one line
        self._random = RecordingReader(path)  # the UI thread's own handle for record_at
        self._random_lock = threading.Lock()
        self.build: AnalysisBuild | None = None
        self.rec: IndexedRecording | None = None
        self.opened_s: float | None = None  # seconds from run() to the first rows (the bench reads it)
        store.title = f"replay {os.path.basename(path)}"
        store.progress = 0.0

    def run(self) -> None:
        st = self.store
        t0 = time.perf_counter()
        # At once, with what the side index holds (all of it, for a recording fsinspect made): the analysis pass
        # below indexes the rest, and the list grows with it.
        rec = IndexedRecording(self.path, lazy_index=True)
        self.rec = rec
        with st.lock:
            st.first_ts = rec.analysis["first_ts"] if rec.analysis is not None else self._first_ts(rec)
            st.rec = rec  # the list shows every row from here on
        self.opened_s = time.perf_counter() - t0
        st.status = ""
        if rec.analysis is not None:
            self._restore(rec)
        else:
            self._analyse(rec)
        if self._stop.is_set():
            return
        st.progress = None
        truncated = self.reader.truncated
        st.status = f"replayed {len(rec)} exchanges" + (f" ({truncated})" if truncated else "")

    @staticmethod
    def _first_ts(rec: IndexedRecording) -> int:
        """The first record's time, of any kind (tshark's zero for relative times)."""
        first = next(rec.records(), None)
        return first.ts_ns if first is not None else 0

    def _analyse(self, rec: IndexedRecording) -> None:
        """Build the analysis through the feed loop: a batch of records at a time under the store's lock."""
        st = self.store
        self.build = rec.analysis_build(st.analyzer)
        st.status = ""
        st.progress = 0.0
        size = max(1, self.reader.size)
        last: list[int] = [0]

        def chunks() -> Iterator[list[Record]]:
            it = rec.records()
            while chunk := list(itertools.islice(it, BATCH)):
                last[0] = chunk[-1].offset
                yield chunk

        def progress() -> None:
            st.progress = last[0] / size

        error = None
        try:
            if not self.feed(chunks(), self._stop, progress):
                self.build.abort()
                return
        except RecordingError as e:
            st.error = error = str(e)
        with st.lock:
            data = self.build.finish(rec.records_end, error)
            st.snapped = int(data["snapped"])

    def apply(self, item: Any) -> None:
        rec: Record = item
        st = self.store
        assert self.build is not None
        st.received += 1
        if not rec.is_fuse:
            st.control.append({"type": "control", "direction": _direction(rec), "ts_ns": rec.ts_ns,
                               "summary": st.ctl.record(rec.data, rec.inbound, rec.notes)})
        self.build.apply(rec)

    def batch_done(self) -> None:
        self.store.settle()

    def _restore(self, rec: IndexedRecording) -> None:
        """The saved analysis into the store: what the panels show, without reading the recording again."""
        st = self.store
        data = rec.analysis
        assert data is not None
        with st.lock:
            rec.restore(st.analyzer)
            st.received = int(data["records"])
            st.snapped = int(data["snapped"])
            st.second_rates.load(data.get("rates", ()))
        for off in data.get("control", ()):  # the control plane, from its own records (a few hundred)
            try:
                with self._random_lock:  # (the recording's own reader belongs to its decoder)
                    r = self._random.record_at(int(off))
            except RecordingError:
                continue
            with st.lock:
                st.control.append({"type": "control", "direction": _direction(r), "ts_ns": r.ts_ns,
                                   "summary": st.ctl.record(r.data, r.inbound, r.notes)})

    def export(self, dest: str, indexes: list[int], note: str) -> Exported:
        """The exchanges' own records and the recording's control plane and INIT, read back from the file."""
        rec = self.rec
        if rec is None:
            return export_recording(self.path, dest, set(), comment=note)
        offsets = {off for i in indexes if 0 <= i < len(rec) for off in rec.index.offsets(i) if off is not None}
        return export_recording(self.path, dest, offsets, comment=note)

    def raw(self, ex: Exchange) -> tuple[Record | None, Record | None]:
        out: list[Record | None] = []
        with self._random_lock:
            for ref in (ex.req_ref, ex.reply_ref):
                try:
                    out.append(self._random.record_at(ref) if isinstance(ref, int) else None)
                except RecordingError:
                    out.append(None)
        return out[0], out[1]


def _direction(rec: Record) -> str:
    """The hub's direction names: frontend, backend, proxy->backend, proxy->frontend."""
    from .control import FORWARDED, SENT_TO_QEMU

    if FORWARDED in rec.notes:
        return "proxy->backend"
    if SENT_TO_QEMU in rec.notes:
        return "proxy->frontend"
    return "frontend" if rec.inbound else "backend"


class AttachSource(ControlFeed, Source):
    """A proxy's or daemon's control socket, read in a worker thread by the shared ControlFeed
    (fsinspect/live/feed.py); this adds the UI's paths, its bounded window and its status line."""

    kind = "attach"

    def __init__(self, store: Store, ctrl_path: str, *, connect_timeout: float = 5.0,
                 keep: int = LIVE_KEEP, stream_format: str = "pcapng") -> None:
        Source.__init__(self, store)
        ControlFeed.__init__(self, store, ctrl_path, connect_timeout=connect_timeout, stream_format=stream_format)
        store.analyzer.lazy = True  # decode what is shown or filtered on, not every message as it comes
        store.analyzer.keep_raw = True  # the bytes for the hex dump and export stay with each exchange
        self.keep = keep
        store.title = store.title or f"attach {ctrl_path}"

    def stop(self) -> None:
        Source.stop(self)
        self.shutdown()

    def run(self) -> None:
        if self.sock is None:
            self.connect()
        st = self.store
        st.status = "connected"
        self.pump(self._stop)
        if not self._stop.is_set():
            st.status = "the proxy closed the control socket" + (f": {self.refused}" if self.refused else "")

    def applied(self) -> None:
        st = self.store
        if len(st.paths) < len(st.analyzer.exchanges):
            st.sync_paths()

    def batch_done(self) -> None:
        st = self.store
        if st.trim(self.keep):
            base = st.base
            self._raw = {k: v for k, v in self._raw.items() if k >= base}
        st.settle()
