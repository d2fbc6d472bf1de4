"""Where the UI's exchanges come from: a recording (ReplaySource) or a proxy's control socket (AttachSource).

Both feed one Store from a worker thread, in batches under `Store.lock`, so the UI thread never waits on
I/O or decoding: it only reads what is there (lists grow by append) and takes the lock briefly to look at
the inode map or stats.  No textual import here: the sources are tested and benchmarked without a screen.
"""

from __future__ import annotations

import bisect
import collections
import gc
import heapq
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..analysis import Exchange
from ..live.feed import BATCH, CommandError, ControlFeed, LiveState
from ..recording.export import Exported, export_recording, write_pcapng
from ..recording.reader import Record, RecordingError, RecordingReader
from ..recording.replay import prime_from_header
from .control import ControlState
from .render import number

FREEZE_EVERY = 5_000  # exchanges between gc.freeze() calls (see Store.settle)
LIVE_KEEP = 500_000  # exchanges a live session keeps (~0.9 GB); older ones are forgotten
__all__ = ["AttachSource", "CommandError", "ReplaySource", "Source", "Store"]


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
    ops_buckets: collections.Counter[int] = field(default_factory=collections.Counter)  # second -> exchanges
    bytes_buckets: collections.Counter[int] = field(default_factory=collections.Counter)  # second -> bytes
    kind: str = ""  # the source's kind: "replay" or "attach"
    base: int = 0  # Exchange.index of exchanges[0]: a live session forgets its oldest exchanges (trim)
    clock: Callable[[], int] = time.time_ns  # a live source's "now" for ages (tests fix it)
    _frozen_at: int = 0

    def __post_init__(self) -> None:
        self.analyzer.listeners.append(self._count)

    @property
    def features(self) -> dict[str, Any]:
        """Features, regions and vrings, shaped like the proxy's ControlPlane.snapshot()."""
        return self.ctl.f

    @property
    def exchanges(self) -> list[Exchange]:
        return self.analyzer.exchanges

    def _count(self, ex: Exchange) -> None:
        ts = ex.ts_ns
        if ts:
            sec = ts // 1_000_000_000
            self.ops_buckets[sec] += 1
            self.bytes_buckets[sec] += ex.req_len + ex.reply_len

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

    def now_ns(self) -> int:
        """What a pending request's age is measured against: the clock live, the last capture in a replay."""
        return self.analyzer.last_ts if self.kind == "replay" else self.clock()

    def held(self) -> list[Exchange]:
        """The exchanges a breakpoint holds now, oldest first."""
        return sorted((ex for ex in self.open.values() if ex.held is not None), key=lambda e: e.n)

    @property
    def end(self) -> int:
        """One past the newest exchange's index."""
        return self.base + len(self.analyzer.exchanges)

    def get(self, index: int) -> Exchange | None:
        """Exchange `index`, or None if it is not (or no longer) kept.  Safe against a concurrent trim."""
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
        exs = self.exchanges
        k = bisect.bisect_left(exs, n, key=number)
        if k < len(exs) and number(exs[k]) == n:
            return exs[k].index
        return next((ex.index for ex in exs if number(ex) == n), None)

    def find_time(self, ts_ns: int, among: list[int] | None = None) -> int | None:
        """The index of the first exchange (of `among`, if given) at or after `ts_ns`; the last if none is."""
        if among is not None:
            kept = [i for i in among if self.get(i) is not None]
            k = bisect.bisect_left(kept, ts_ns, key=lambda i: self.get(i).ts_ns)  # type: ignore[union-attr]
            return kept[min(k, len(kept) - 1)] if kept else None
        exs = self.exchanges
        k = bisect.bisect_left(exs, ts_ns, key=lambda ex: ex.ts_ns)
        return exs[min(k, len(exs) - 1)].index if exs else None

    def trim(self, keep: int) -> int:
        """Forget the oldest exchanges beyond `keep` (call with the lock held); returns how many went.

        A live session runs for hours: every exchange kept costs ~1.7 KB, so the attach source keeps a
        bounded window.  Trimming takes a fifth more than needed so that it happens rarely.
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
        """Move what the feed built so far out of the cyclic GC's reach (gc.freeze).

        Millions of long-lived exchanges would otherwise make every full collection walk them all:
        pauses of hundreds of ms that stop the UI thread too.  Exchanges are kept for the session anyway.
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
        p = i - self.base
        try:
            return self.paths[p] if p >= 0 else ""
        except IndexError:
            return ""

    def rates(self, seconds: int = 60) -> tuple[list[float], list[float]]:
        """ops/s and bytes/s of the last `seconds` seconds that hold exchanges (capture time), oldest first.

        Seconds without exchanges are left out, as in Stats.ops_per_second: a lying timestamp far from the
        rest costs one point, not a window of empty seconds."""
        with self.lock:
            secs = heapq.nlargest(seconds, self.ops_buckets)[::-1]
            return ([float(self.ops_buckets[s]) for s in secs], [float(self.bytes_buckets.get(s, 0)) for s in secs])


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


class ReplaySource(Source):
    """A recording, analysed front to back in the background with progress (by file offset)."""

    kind = "replay"

    def __init__(self, store: Store, path: str) -> None:
        super().__init__(store)
        self.path = path
        self.reader = RecordingReader(path)  # raises RecordingError: the command turns it into one line
        self._random = RecordingReader(path)  # the UI thread's own handle for record_at
        self._random_lock = threading.Lock()
        store.title = f"replay {os.path.basename(path)}"
        store.progress = 0.0

    def run(self) -> None:
        st = self.store
        an = st.analyzer
        r = self.reader
        st.status = ""
        prime_from_header(an, r)
        size = max(1, r.size)
        batch: list[Record] = []
        try:
            for rec in r.records():
                batch.append(rec)
                if len(batch) >= BATCH:
                    self._feed(batch)
                    st.progress = rec.offset / size
                    batch = []
                    if self._stop.is_set():
                        return
                    time.sleep(0)  # hand the GIL to the UI thread if it is waiting for it
            self._feed(batch)
        except RecordingError as e:
            st.error = str(e)
        with st.lock:
            an.finish()
        st.progress = None
        st.status = f"replayed {len(st.exchanges)} exchanges" + (f" ({r.truncated})" if r.truncated else "")
        r.close()

    def _feed(self, batch: list[Record]) -> None:
        st = self.store
        an = st.analyzer
        with st.lock:
            if batch and not st.first_ts:
                st.first_ts = batch[0].ts_ns
            for rec in batch:
                st.received += 1
                if not rec.is_fuse:
                    st.control.append({"type": "control", "direction": _direction(rec), "ts_ns": rec.ts_ns,
                                       "summary": st.ctl.record(rec.data, rec.inbound, rec.notes)})
                elif rec.inbound:
                    st.feed_request(rec.data, rec.queue, rec.head, rec.ts_ns, epoch=rec.epoch,
                                    orig_len=rec.orig_len, notes=rec.notes, ref=rec.offset)
                else:
                    an.feed_reply(rec.data, rec.queue, rec.head, rec.ts_ns, epoch=rec.epoch,
                                  orig_len=rec.orig_len, notes=rec.notes, ref=rec.offset)
                if len(st.paths) < len(an.exchanges):
                    st.sync_paths()  # name nodeids now: a later FORGET removes them from the map
            st.settle()

    def export(self, dest: str, indexes: list[int], note: str) -> Exported:
        """The exchanges' own records and the recording's control plane and INIT, read back from the file."""
        offsets = {ref for i in indexes if (ex := self.store.get(i)) is not None
                   for ref in (ex.req_ref, ex.reply_ref) if isinstance(ref, int)}
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
