"""Where the UI's exchanges come from: a recording (ReplaySource) or a proxy's control socket (AttachSource).

Both feed one Store from a worker thread, in batches under `Store.lock`, so the UI thread never waits on
I/O or decoding: it only reads what is there (lists grow by append) and takes the lock briefly to look at
the inode map or stats.  No textual import here: the sources are tested and benchmarked without a screen.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import gc
import heapq
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dissectors.spec import fuse as fspec

from ..analysis import Analyzer, Exchange
from ..analysis import exchange as X
from ..analysis.inodes import Announcement, Inode, SyncfsRecord
from ..recording.export import Exported, export_recording, write_pcapng
from ..recording.reader import Record, RecordingError, RecordingReader
from ..recording.replay import prime_from_header
from .control import ControlState
from .render import number

BATCH = 256  # records fed per lock hold (~25 ms of decoding), then the thread yields the GIL to the UI
FREEZE_EVERY = 5_000
LIVE_KEEP = 500_000  # exchanges a live session keeps (~0.9 GB); older ones are forgotten  # exchanges between gc.freeze() calls (see Store.settle)
_OP_BY_NAME = {o.name: o.value for o in fspec.OPCODES}
_ERRNO = fspec.ERRNO.by_name()


@dataclass
class Store:
    """Everything the UI shows, fed by one source thread.

    `exchanges` (the analyzer's list) and `paths` only grow; the UI reads indexes below `len()` freely.
    Everything else (inode map, submounts, stats, buckets) is read under `lock`.
    """

    analyzer: Analyzer = field(default_factory=lambda: Analyzer(keep_exchanges=True))
    paths: list[str] = field(default_factory=list)  # nodeid -> path as it was when the request came
    lock: threading.Lock = field(default_factory=threading.Lock)
    title: str = ""
    status: str = "starting"
    progress: float | None = None  # 0..1 while a replay is still being analysed
    done: bool = False
    error: str | None = None
    overflow: int = 0  # live messages the proxy dropped for this client
    control: collections.deque[dict[str, Any]] = field(default_factory=lambda: collections.deque(maxlen=2000))
    events: list[dict[str, Any]] = field(default_factory=list)
    ctl: ControlState = field(default_factory=ControlState)
    capture: dict[str, Any] = field(default_factory=dict)
    remote_lints: list[dict[str, Any]] = field(default_factory=list)  # lints from before we attached
    ops_buckets: collections.Counter[int] = field(default_factory=collections.Counter)  # second -> exchanges
    bytes_buckets: collections.Counter[int] = field(default_factory=collections.Counter)  # second -> bytes
    received: int = 0  # records read (replay) or protocol lines received (attach)
    kind: str = ""  # the source's kind: "replay" or "attach"
    base: int = 0  # Exchange.index of exchanges[0]: a live session forgets its oldest exchanges (trim)
    first_ts: int = 0  # the first record's time (any kind): tshark's zero for relative times
    open: dict[int, Exchange] = field(default_factory=dict)  # the source's n -> its pending or held exchange
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

    def now_ns(self) -> int:
        """What a pending request's age is measured against: the clock live, the last capture in a replay."""
        return self.analyzer.last_ts if self.kind == "replay" else self.clock()

    def find_n(self, n: int, depth: int = 4096) -> Exchange | None:
        """A recent exchange by the source's number (the newest `depth` are searched)."""
        exs = self.analyzer.exchanges
        for k in range(len(exs) - 1, max(-1, len(exs) - 1 - depth), -1):
            if exs[k].n == n:
                return exs[k]
        return None

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


class CommandError(Exception):
    """A debugger command that cannot be sent (no live source, or the connection is gone)."""


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


class AttachSource(Source):
    """A proxy's control socket (fsinspect/proxy/hub.py, protocols 1 and 2), read in a worker thread.

    Exchanges carry their raw bytes, which a local Analyzer re-decodes: the hex dump, the filters and the
    inode map work as on a replay.  The snapshot seeds the inode map and submounts known before we joined.
    Exchanges keep the source's numbers (`n`): a request is listed when it is captured and its reply
    completes that row; the source's own verdicts (`stuck`, held) are taken as they come.  Debugger
    commands go back on the same socket (`command`), each answered by one `reply` with its id.
    """

    kind = "attach"

    def __init__(self, store: Store, ctrl_path: str, *, connect_timeout: float = 5.0,
                 keep: int = LIVE_KEEP) -> None:
        super().__init__(store)
        self.keep = keep
        self.ctrl_path = ctrl_path
        self.connect_timeout = connect_timeout
        self.sock: socket.socket | None = None
        self._raw: dict[int, tuple[bytes | None, bytes | None]] = {}
        self._replies: dict[int, Callable[[dict[str, Any]], None] | None] = {}
        self._due: list[tuple[Callable[[dict[str, Any]], None], dict[str, Any]]] = []  # replies to hand on
        self._next_id = 0
        self._send_lock = threading.Lock()
        self.version = 1
        self.refused: str | None = None  # the hub's last word before it closed on us (too many clients, ...)
        store.analyzer.stuck_ns = 0  # the source lints `stuck` with its own threshold and clock
        store.title = store.title or f"attach {ctrl_path}"

    def connect(self) -> None:
        """Connect now (the command reports a missing socket as one line before the UI starts)."""
        deadline = time.monotonic() + self.connect_timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.ctrl_path)
            except OSError as e:
                s.close()
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"cannot connect to {self.ctrl_path}: {e.strerror or e}") from None
                time.sleep(0.1)
                continue
            self.sock = s
            return

    def stop(self) -> None:
        super().stop()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        st = self.store
        st.status = "connected"
        buf = b""
        sock = self.sock
        try:
            while not self._stop.is_set():
                try:
                    chunk = sock.recv(1 << 20)
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
                if b"\n" not in chunk:
                    continue
                lines = buf.split(b"\n")
                buf = lines.pop()
                for k in range(0, len(lines), BATCH):
                    self.feed_lines(lines[k:k + BATCH])
                    time.sleep(0)  # hand the GIL to the UI thread if it is waiting for it
        finally:
            sock.close()
        if not self._stop.is_set():
            st.status = "the proxy closed the control socket" + (f": {self.refused}" if self.refused else "")

    def feed_lines(self, lines: list[bytes]) -> None:
        """Apply a batch of protocol lines (one lock hold per batch)."""
        st = self.store
        self._due = []
        with st.lock:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    st.events.append({"type": "event", "kind": "bad-line", "detail": {"line": line[:200].decode(
                        "utf-8", "replace")}})
                    continue
                st.received += 1
                self._apply(obj)
                if len(st.paths) < len(st.analyzer.exchanges):
                    st.sync_paths()
            if st.trim(self.keep):
                base = st.base
                self._raw = {k: v for k, v in self._raw.items() if k >= base}
            st.settle()
        for cb, obj in self._due:  # outside the lock: a callback may wait for the UI thread
            cb(obj)

    def command(self, cmd: str, on_reply: Callable[[dict[str, Any]], None] | None = None, **args: Any) -> None:
        sock = self.sock
        if sock is None or self.store.done:
            raise CommandError("not connected to the control socket")
        if self.version < 2:
            raise CommandError("this source speaks control protocol 1: no debugger commands (update it)")
        with self._send_lock:
            self._next_id += 1
            cid = self._next_id
            self._replies[cid] = on_reply
            line = (json.dumps({"id": cid, "cmd": cmd, **args}) + "\n").encode()
            try:
                sock.sendall(line)
            except OSError as e:
                self._replies.pop(cid, None)
                raise CommandError(f"cannot send {cmd}: {e.strerror or e}") from None

    def _reply(self, obj: dict[str, Any]) -> None:
        cid = obj.get("id")
        cb = self._replies.pop(cid, None) if isinstance(cid, int) else None
        if cb is not None:
            self._due.append((cb, obj))

    def _apply(self, obj: dict[str, Any]) -> None:
        st = self.store
        t = obj.get("type")
        if not st.first_ts and t in ("exchange", "control") and isinstance(obj.get("ts_ns"), int):
            st.first_ts = obj["ts_ns"]
        if t == "exchange":
            self._exchange(obj)
        elif t in ("request", "held"):
            self._request(obj)
        elif t == "resumed":
            how = str(obj.get("how", "released"))
            ex = st.open.get(obj.get("n", -1))
            if ex is not None:
                st.analyzer.resume(ex.n, how)
                if ex.state == X.DONE:
                    st.open.pop(ex.n, None)
            else:  # its reply came first (the source publishes the verdict after the back-end answered)
                done = st.find_n(obj.get("n", -1))
                note = f"{how} by the debugger"
                if done is not None and note not in done.notes:
                    done.notes.append(note)
        elif t == "reply":
            self._reply(obj)
        elif t == "control":
            st.control.append(obj)
            st.ctl.summary(str(obj.get("direction", "")), str(obj.get("summary", "")))
        elif t == "event":
            st.events.append(obj)
            if isinstance(obj.get("detail"), dict):
                st.ctl.event(str(obj.get("kind", "")), obj["detail"])
        elif t == "overflow":
            st.overflow = max(st.overflow, int(obj.get("missed", 0)))
        elif t == "error":
            self.refused = str(obj.get("error", ""))
        elif t == "snapshot":
            self._snapshot(obj)
        elif t == "hello":
            versions = obj.get("versions") or [obj.get("version")]
            if 1 not in versions and 2 not in versions:
                st.status = f"unknown control protocol version {obj.get('version')!r}"
            else:
                self.version = 2 if 2 in versions else 1
                st.status = f"attached to {obj.get('source', '?')} ({obj.get('tool', '?')})"

    def _snapshot(self, snap: dict[str, Any]) -> None:
        st = self.store
        an = st.analyzer
        for n in snap.get("inodes", ()):
            name = n.get("name")
            an.inodes.nodes[int(n["nodeid"])] = Inode(int(n["nodeid"]), n.get("parent"),
                                                      name.encode("utf-8", "surrogateescape") if name else None,
                                                      int(n.get("ino", 0)), int(n.get("generation", 0)),
                                                      int(n.get("nlookup", 0)), int(n.get("attr_flags", 0)))
        for s in snap.get("submounts", ()):
            an.submounts.announce(Announcement(int(s["nodeid"]), int(s.get("parent", 0)),
                                               str(s.get("name", "")).encode(), -1, int(s.get("ino", 0))))
        for s in snap.get("syncfs", ()):
            an.submounts.syncfs.append(SyncfsRecord(-1, int(s["nodeid"]), s.get("latency_ns"),
                                                    bool(s.get("superblock_root")), s.get("error")))
        st.remote_lints = list(snap.get("lints", ()))
        st.ctl.seed(dict(snap.get("features") or {}))
        st.capture = dict(snap.get("capture") or {})
        for c in snap.get("control", ()):
            if not st.first_ts and isinstance(c.get("ts_ns"), int):
                st.first_ts = c["ts_ns"]
            st.control.append(c)  # the proxy's state already counts these: no ctl.summary here
        st.events.extend(snap.get("events", ()))
        # Finished and still open exchanges, in the source's order (numbered by it).
        finished = list(snap.get("exchanges", ()))
        opened = list(snap.get("pending", ()))
        still_open = {id(d) for d in opened}
        for d in sorted(finished + opened, key=lambda d: int(d.get("n") or 0)):
            if id(d) in still_open:
                self._request(d)
            else:
                self._exchange(d)

    def _request(self, d: dict[str, Any]) -> None:
        """A request in flight, new or changed (held, resumed, linted `stuck` by the source)."""
        st = self.store
        n = d.get("n")
        if not isinstance(n, int):
            return
        if d.get("type") == "held":
            held = d.get("direction", X.HELD_REQUEST)
        else:
            held = d.get("held", X.HELD_REQUEST) if d.get("state") == X.HELD else None
        ex = st.open.get(n)
        if ex is None:
            req_hex = d.get("request_raw")
            if not isinstance(req_hex, str):
                return
            ex = st.feed_request(bytes.fromhex(req_hex), int(d.get("queue") or 0), d.get("head"),
                                 int(d.get("ts_ns") or 0), orig_len=d.get("request_len"),
                                 notes=list(d.get("notes", ())), n=n)
            self._raw[ex.index] = (bytes.fromhex(req_hex), None)
            if ex.state == X.DONE:  # no reply expected (FORGET): complete already
                return
            st.open[n] = ex
        self._source_lints(ex, d)
        rep_hex = d.get("reply_raw")
        if held == X.HELD_REPLY and isinstance(rep_hex, str) and ex.reply_ts is None:
            # The reply the breakpoint holds: decoded now, so `x` can edit it.
            st.analyzer.feed_reply(bytes.fromhex(rep_hex), ex.queue, ex.head, int(d.get("reply_ts_ns") or 0),
                                   orig_len=d.get("reply_len"), n=n, held=True)
            self._raw[ex.index] = (self._raw.get(ex.index, (None, None))[0], bytes.fromhex(rep_hex))
        elif held != ex.held:
            st.analyzer.set_held(n, held)

    def _source_lints(self, ex: Exchange, d: dict[str, Any]) -> None:
        """Lints only the source can tell (it has the clock and the threshold)."""
        for name in d.get("lints", ()):
            if name == X.STUCK and name not in ex.lints:
                self.store.analyzer.add_lint(ex, name, f"{ex.opname} unique {ex.unique} (#{ex.n}) waited longer "
                                                       "than the source's stuck threshold")

    def _exchange(self, d: dict[str, Any]) -> None:
        an = self.store.analyzer
        req_hex, rep_hex = d.get("request_raw"), d.get("reply_raw")
        queue = int(d.get("queue") or 0)
        head = d.get("head")
        ts = int(d.get("ts_ns") or 0)
        rts = d.get("reply_ts_ns")
        if rts is None and d.get("latency_ns") is not None:
            rts = ts + int(d["latency_ns"])
        if req_hex is None and rep_hex is None:
            self._bare(d)
            return
        notes = list(d.get("notes", ()))
        n = d.get("n") if isinstance(d.get("n"), int) else None
        opened = self.store.open.pop(n, None) if n is not None else None
        if opened is not None:  # its request is listed already: the reply completes it in place
            ex = opened
            if rep_hex is not None:
                an.feed_reply(bytes.fromhex(rep_hex), queue, head, int(rts or ts), orig_len=d.get("reply_len"),
                              n=n, notes=[x for x in notes if x not in ex.notes])
            self._source_lints(ex, d)
            self._raw[ex.index] = (self._raw.get(ex.index, (None, None))[0],
                                   bytes.fromhex(rep_hex) if rep_hex else None)
            return
        if req_hex is not None:
            ex = self.store.feed_request(bytes.fromhex(req_hex), queue, head, ts, orig_len=d.get("request_len"),
                                         notes=notes, n=n)
            if rep_hex is not None:
                an.feed_reply(bytes.fromhex(rep_hex), queue, head, int(rts or ts), orig_len=d.get("reply_len"),
                              n=n)
            self._source_lints(ex, d)
        else:
            assert rep_hex is not None
            ex = an.feed_reply(bytes.fromhex(rep_hex), queue, head, int(rts or ts), orig_len=d.get("reply_len"),
                               notes=notes)
        self._raw[ex.index] = (bytes.fromhex(req_hex) if req_hex else None,
                               bytes.fromhex(rep_hex) if rep_hex else None)

    def _bare(self, d: dict[str, Any]) -> None:
        """An exchange without raw bytes (an older proxy): list it with what the JSON says."""
        an = self.store.analyzer
        op = _OP_BY_NAME.get(str(d.get("opcode")), -1)
        ex = Exchange(an.count, int(d.get("queue") or 0), d.get("head"), int(d.get("epoch") or 0),
                      int(d.get("unique") or 0), op, int(d.get("nodeid") or 0), req_ts=d.get("ts_ns"),
                      notes=["no raw bytes from the proxy", *d.get("notes", ())], lints=list(d.get("lints", ())),
                      n=d["n"] if isinstance(d.get("n"), int) else an.count + 1)
        err = d.get("error")
        ex.error = _ERRNO.get(err, 0) if isinstance(err, str) else 0
        if d.get("latency_ns") is not None and ex.req_ts is not None:
            ex.reply_ts = ex.req_ts + int(d["latency_ns"])
            ex.replied = True
        ex.submount = bool(d.get("submount"))
        an.count += 1
        an.exchanges.append(ex)
        an.stats.add(ex)
        for cb in an.listeners:
            cb(ex)

    def raw(self, ex: Exchange) -> tuple[Record | None, Record | None]:
        req, rep = self._raw.get(ex.index, (None, None))
        return (_live_record(req, True, ex) if req is not None else None,
                _live_record(rep, False, ex) if rep is not None else None)


def _live_record(data: bytes, inbound: bool, ex: Exchange) -> Record:
    """The live bytes in the same shape a recording gives (no descriptor layout: the stream lacks it)."""
    return Record(-1, -1, "fuse", inbound, (ex.req_ts if inbound else ex.reply_ts) or 0, data,
                  (ex.req_len if inbound else ex.reply_len) or len(data), ex.queue, ex.head, ex.epoch, 0)
