"""A client of the control socket (protocols 1 and 2): its lines become Exchanges in an Analyzer.

The one reader of fsinspect/live/hub.py's protocol: the UI's AttachSource and the headless clients (attach
--format, extcap) subclass ControlFeed and only add what they do with the exchanges.  Exchanges carry their
raw bytes, which the local Analyzer re-decodes, so filters, the inode map and pcapng output work as on a
replay.  The snapshot seeds the inode map and submounts known before we joined.  Exchanges keep the
source's numbers (`n`): a request is opened when it is captured and its reply completes it in place; the
source's own verdicts (`stuck`, held) are taken as they come.  Debugger commands go back on the same socket
(`command`), each answered by one `reply` with its id.

When the hub offers it (`"streams"` in its hello), the feed asks for the binary stream (`stream_format`
"pcapng", the default): after the JSON snapshot, captured messages come as a recording's pcapng blocks,
read by the recording layer's StreamReader, and only their headers are looked at unless the analyzer
needs more (`Analyzer(lazy=True)`: a UI decodes what it shows or filters on).  "jsonl" keeps the JSON
lines, which an older hub always sends.
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dissectors.spec import fuse as fspec

from ..analysis import Analyzer, Exchange
from ..analysis import exchange as X
from ..analysis.inodes import Announcement, Inode, SyncfsRecord
from ..recording import format as rfmt
from ..recording.reader import Record, RecordingError, StreamReader
from ..recording.scan import Row, layout_items

BATCH = 256  # lines applied per lock hold (~25 ms of decoding), then the thread yields the GIL
LAYOUTS_SHARED = 4096  # distinct descriptor layouts a feed shares between exchanges (the rest are kept as they come)
_OP_BY_NAME = {o.name: o.value for o in fspec.OPCODES}
_ERRNO = fspec.ERRNO.by_name()


class CommandError(Exception):
    """A debugger command that cannot be sent (no live source, or the connection is gone)."""


EVENTS_KEEP = 2000  # control-plane events kept (the newest): a source spewing bad lines must not grow memory


@dataclass
class LiveState:
    """What a feed keeps of a live source; the UI's Store extends it with what it shows."""

    analyzer: Analyzer = field(default_factory=lambda: Analyzer(keep_exchanges=True))
    lock: threading.Lock = field(default_factory=threading.Lock)
    status: str = "starting"
    overflow: int = 0  # live messages the source dropped for this client
    received: int = 0  # protocol lines received
    first_ts: int = 0  # the first record's time (any kind): tshark's zero for relative times
    open: dict[int, Exchange] = field(default_factory=dict)  # the source's n -> its pending or held exchange
    control: collections.deque[dict[str, Any]] = field(default_factory=lambda: collections.deque(maxlen=2000))
    events: collections.deque[dict[str, Any]] = field(default_factory=lambda: collections.deque(maxlen=EVENTS_KEEP))
    remote_lints: list[dict[str, Any]] = field(default_factory=list)  # lints from before we attached
    capture: dict[str, Any] = field(default_factory=dict)
    # The source's clocks as it last told them (wall, CLOCK_MONOTONIC) and our monotonic clock then: requests
    # are aged on the source's monotonic clock, not on ours (another clock, or one stepped meanwhile).
    source_clock: tuple[int, int, int] | None = None
    clock: Callable[[], int] = time.time_ns  # our wall clock, for a source that tells none (tests fix it)

    def source_now(self) -> tuple[int, int | None]:
        """Now on the source's clocks, (wall, monotonic): as it last told them, advanced by our own monotonic
        clock since; our wall clock (and no monotonic one) for a source that never told them."""
        c = self.source_clock
        if c is None:
            return self.clock(), None
        since = time.monotonic_ns() - c[2]
        return c[0] + since, c[1] + since

    def source_mono(self, ts_ns: int) -> int | None:
        """A capture stamp (the source's wall clock) on the source's monotonic clock."""
        c = self.source_clock
        return None if c is None or not ts_ns else ts_ns + c[1] - c[0]

    def feed_request(self, raw: bytes, *args: Any, **kw: Any) -> Exchange:
        return self.analyzer.feed_request(raw, *args, **kw)

    def on_control(self, obj: dict[str, Any]) -> None:
        """A vhost-user message summary arrived (after it is appended to `control`)."""

    def on_event(self, kind: str, detail: dict[str, Any]) -> None:
        """A control-plane event arrived (after it is appended to `events`)."""

    def seed_features(self, features: dict[str, Any]) -> None:
        """The snapshot's features, regions and vrings."""

    def find_n(self, n: int, depth: int = 4096) -> Exchange | None:
        """A recent exchange by the source's number (the newest `depth` are searched)."""
        exs = self.analyzer.exchanges
        for k in range(len(exs) - 1, max(-1, len(exs) - 1 - depth), -1):
            if exs[k].n == n:
                return exs[k]
        return None


class Feed:
    """The one feed loop of every source that fills a LiveState from a thread: the UI's attach and replay
    sources and the headless clients.  Items (protocol messages, recording records) are applied in batches
    of at most BATCH, each under the state's lock, and the thread yields the GIL between batches, so the UI
    thread never waits longer than one batch.  Subclasses say what one item does (`apply`)."""

    def __init__(self, state: LiveState) -> None:
        self.state = state
        self._due: list[tuple[Callable[[dict[str, Any]], None], dict[str, Any]]] = []  # replies to hand on

    def feed(self, chunks: Iterable[Sequence[Any]], stop: threading.Event | None = None,
             progress: Callable[[], None] | None = None) -> bool:
        """Apply every chunk the source yields (a chunk: what it had without blocking), in batches; False if
        `stop` was set first.  `progress` is called after each batch."""
        for chunk in chunks:
            for k in range(0, len(chunk), BATCH):
                self.apply_batch(chunk[k:k + BATCH])
                if progress is not None:
                    progress()
                if stop is not None and stop.is_set():
                    return False
                time.sleep(0)  # hand the GIL to another thread (the UI's) if it is waiting for it
        return True

    def apply_batch(self, items: Sequence[Any]) -> None:
        """Apply a batch of items (one lock hold per batch); command replies are handed on after it."""
        st = self.state
        self._due = []
        with st.lock:
            for item in items:
                self.apply(item)
                self.applied()
            self.batch_done()
        for cb, obj in self._due:  # outside the lock: a callback may wait for the UI thread
            cb(obj)

    def apply(self, item: Any) -> None:
        raise NotImplementedError

    def applied(self) -> None:
        """Called (under the lock) after each item: the UI names new exchanges' paths here."""

    def batch_done(self) -> None:
        """Called (under the lock) after each batch: the UI trims its window, the headless client prints."""


class ControlFeed(Feed):
    """Reads one control socket into `state` (call pump() from one thread; command() from any)."""

    keep_raw_bytes = True  # keep each exchange's bytes by index for raw() (the UI's hex dump and export)

    def __init__(self, state: LiveState, ctrl_path: str, *, connect_timeout: float = 5.0,
                 stream_format: str = "pcapng") -> None:
        self.state = state
        self.ctrl_path = ctrl_path
        self.connect_timeout = connect_timeout
        self.sock: socket.socket | None = None
        self.closed = False
        self._raw: dict[int, tuple[bytes | None, bytes | None]] = {}
        self._replies: dict[int, Callable[[dict[str, Any]], None] | None] = {}
        self._next_id = 0
        self._send_lock = threading.Lock()
        self.version = 1
        self.refused: str | None = None  # the hub's last word before it closed on us (too many clients, ...)
        self.stream_format = stream_format  # what to ask for when the hub offers streams
        self.streaming = "jsonl"  # what the hub sends now
        self._stream_id: int | None = None  # the `stream` command's id, until its reply switches the stream
        self.reader: StreamReader | None = None
        self.blocks = 0  # packet blocks received (the binary stream)
        # Each descriptor layout once (a guest makes few chain shapes): a kept exchange holds a shared one.
        self._layouts: dict[bytes, bytes] = {}
        state.analyzer.stuck_ns = 0  # the source lints `stuck` with its own threshold and clock

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

    def pump(self, stop: threading.Event) -> None:
        """Read until the source closes the socket (or `stop` is set and shutdown() called); the socket is
        closed on return."""
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        buf = b""
        sock = self.sock
        try:
            while not stop.is_set():
                try:
                    chunk = sock.recv(1 << 20)
                except OSError:
                    break
                if not chunk:
                    break
                if self.reader is not None:
                    self.feed_blocks(chunk)
                    continue
                buf += chunk
                if b"\n" not in chunk:
                    continue
                if self._stream_id is not None:  # the switch to binary may come at any line: one at a time
                    buf = self._lines_until_switch(buf)
                    if self.reader is not None:
                        self.feed_blocks(buf)
                        buf = b""
                    continue
                lines = buf.split(b"\n")
                buf = lines.pop()
                for k in range(0, len(lines), BATCH):
                    self.feed_lines(lines[k:k + BATCH])
                    time.sleep(0)  # hand the GIL to another thread (the UI's) if it is waiting for it
                    if self._stream_id is not None:  # the hello offered the binary stream: asked for it
                        buf = b"\n".join([*lines[k + BATCH:], buf])
                        break
        except RecordingError as e:  # the binary stream broke its framing: nothing after it can be trusted
            self.state.status = f"error: {e}"
            self.broken = str(e)
        finally:
            self.closed = True
            sock.close()

    broken: str | None = None  # why the binary stream was given up

    def _lines_until_switch(self, buf: bytes) -> bytes:
        """Apply whole lines until the `stream` reply; what follows it is binary (the reader takes it)."""
        while self._stream_id is not None:
            nl = buf.find(b"\n")
            if nl < 0:
                return buf
            line, buf = buf[:nl], buf[nl + 1:]
            self.feed_lines([line])
        return buf

    def feed_blocks(self, chunk: bytes) -> None:
        """Apply what a chunk of the binary stream completes, in batches (one lock hold each)."""
        assert self.reader is not None
        self.feed([self.reader.feed(chunk)])
        if self.reader.failed is not None:  # after what came before it
            raise self.reader.failed

    def shutdown(self) -> None:
        """Make pump() return soon (from another thread)."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def feed_lines(self, lines: list[bytes]) -> None:
        """Apply a batch of protocol lines (one lock hold per batch)."""
        objs: list[dict[str, Any] | Record] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                with self.state.lock:
                    self.state.events.append({"type": "event", "kind": "bad-line", "detail": {
                        "line": line[:200].decode("utf-8", "replace")}})
                continue
            objs.append(obj)
        self.apply_batch(objs)

    def apply(self, item: Any) -> None:
        """One message: a JSON object, or a record of the binary stream."""
        self.state.received += 1
        cls = item.__class__
        if cls is Row:
            self._packet(item.inbound, item.data, item.orig_len, item.queue, item.head, item.ts_ns, item.flags,
                         item.n, [], item.layout)
        elif cls is Record:
            self._record(item)
        else:
            self._apply(item)

    def _ask_stream(self, offered: list[Any]) -> None:
        """The hello offered streams: ask for ours (from the feed thread, before any other command)."""
        want = self.stream_format
        if want == "jsonl" or want not in offered or self.sock is None:
            return
        with self._send_lock:
            self._next_id += 1
            self._stream_id = self._next_id
            try:
                self.sock.sendall((json.dumps({"id": self._stream_id, "cmd": "stream", "format": want}) + "\n")
                                  .encode())
            except OSError:
                self._stream_id = None

    def _record(self, rec: Record) -> None:
        """A packet block of the binary stream (read by the general parser: it may carry notes)."""
        if rec.is_fuse:
            self._packet(rec.inbound, rec.data, rec.orig_len, rec.queue, rec.head, rec.ts_ns, rec.flags, rec.n,
                         rec.notes, rec.layout)

    def _packet(self, inbound: bool, data: bytes, orig_len: int, queue: int, head: int | None, ts_ns: int,
                flags: int, number: int, notes: list[str], layout: Any = None) -> None:
        """A FUSE message of the binary stream: a request opens exchange `n`, a reply completes it; `layout`, its
        descriptor chain (a scanner row's bytes, a record's list).  (Run for every message a live UI ingests:
        kept lean.)"""
        st = self.state
        if not st.first_ts:
            st.first_ts = ts_ns
        if layout.__class__ is bytes:
            shared = self._layouts.get(layout)
            if shared is not None:
                layout = shared
            elif len(self._layouts) < LAYOUTS_SHARED:
                self._layouts[layout] = layout
        n = number or None
        self.blocks += 1
        an = st.analyzer
        keep = self.keep_raw_bytes and not an.keep_raw  # (an analyzer that keeps them has them already)
        if inbound:
            ex = st.open.get(n) if n is not None else None
            if ex is not None:  # listed already (the snapshot, or JSON lines before the switch)
                if flags & rfmt.RF_HELD and ex.held is None:
                    an.set_held(ex.n, X.HELD_REQUEST)
                return
            c = st.source_clock  # (its capture time on the source's monotonic clock: what it is aged from)
            ex = st.feed_request(data, queue, head, ts_ns, orig_len=orig_len, notes=notes, n=n,
                                 held=bool(flags & rfmt.RF_HELD), mono_ns=None if c is None else ts_ns + c[1] - c[0])
            if layout:
                ex.req_layout = layout
            if keep:
                self._raw[ex.index] = (data, None)
            if n is not None and ex.state != X.DONE:
                st.open[n] = ex
            return
        opened = st.open.pop(n, None) if n is not None else None
        if opened is not None:
            an.feed_reply(data, queue, head, ts_ns, orig_len=orig_len, n=n,
                          notes=[x for x in notes if x not in opened.notes] if notes else ())
            ex = opened
            req = self._raw.get(ex.index, (None, None))[0] if keep else None
        else:  # a reply of its own, with the source's number (n); or unnumbered: the source did not know
            # its request, paired here by its chain, as a replay does
            ex = an.feed_reply(data, queue, head, ts_ns, orig_len=orig_len, notes=notes, n=n)
            if n is None and st.open.get(ex.n) is ex:
                del st.open[ex.n]
            req = None
        if layout:
            ex.reply_layout = layout
        if keep:
            self._raw[ex.index] = (req, data)

    def switched(self) -> None:
        """Called (under the lock) when the binary stream starts: what follows is blocks."""

    def command(self, cmd: str, on_reply: Callable[[dict[str, Any]], None] | None = None, **args: Any) -> None:
        sock = self.sock
        if sock is None or self.closed:
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
        st = self.state
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
            if obj.get("id") == self._stream_id and self._stream_id is not None:
                self._stream_id = None
                if obj.get("ok") and obj.get("format") == "pcapng":
                    self.streaming = "pcapng"
                    self.reader = StreamReader(f"{self.ctrl_path} (binary stream)", rows=True)
                    self.switched()
            else:
                self._reply(obj)
        elif t == "lints":  # the source's verdicts on an exchange the binary stream completed
            # (or is about to: a source that analyses at once publishes them before the reply's capture)
            ex = st.open.get(obj.get("n", -1)) or st.find_n(obj.get("n", -1))
            if ex is not None:
                self._source_lints(ex, obj)
        elif t == "control":
            st.control.append(obj)
            st.on_control(obj)
        elif t == "event":
            st.events.append(obj)
            if isinstance(obj.get("detail"), dict):
                st.on_event(str(obj.get("kind", "")), obj["detail"])
        elif t == "clock":
            self._clock(obj)
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
                if isinstance(obj.get("clock"), dict):
                    self._clock(obj["clock"])
                st.status = f"attached to {obj.get('source', '?')} ({obj.get('tool', '?')})"
                streams = obj.get("streams")
                if isinstance(streams, list):
                    self._ask_stream(streams)

    def _clock(self, d: dict[str, Any]) -> None:
        """The source's clocks, read together (the hello, and a `clock` message when its wall clock moved)."""
        wall, mono = d.get("wall_ns"), d.get("mono_ns")
        if isinstance(wall, int) and isinstance(mono, int):
            self.state.source_clock = (wall, mono, time.monotonic_ns())

    def _snapshot(self, snap: dict[str, Any]) -> None:
        st = self.state
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
        st.seed_features(dict(snap.get("features") or {}))
        st.capture = dict(snap.get("capture") or {})
        for c in snap.get("control", ()):
            if not st.first_ts and isinstance(c.get("ts_ns"), int):
                st.first_ts = c["ts_ns"]
            st.control.append(c)  # the source's state already counts these: no on_control
        st.events.extend(snap.get("events", ()))
        # Finished and still open exchanges, in the source's order (numbered by it).
        finished = list(snap.get("exchanges", ()))
        opened = list(snap.get("pending", ()))
        still_open = {id(d) for d in opened}
        # A request waiting since before we attached is aged from its age then, on the source's monotonic clock
        # (its wall stamp would be off by any step of the source's wall clock since its capture).
        told = st.source_clock[1] if st.source_clock is not None else None
        for d in sorted(finished + opened, key=lambda d: int(d.get("n") or 0)):
            if id(d) in still_open:
                age = d.get("age_ms")
                self._request(d, told - int(age * 1e6) if told is not None and isinstance(age, (int, float))
                              else None)
            else:
                self._exchange(d)

    def _request(self, d: dict[str, Any], mono_ns: int | None = None) -> None:
        """A request in flight, new or changed (held, resumed, linted `stuck` by the source); `mono_ns`, its
        capture on the source's monotonic clock, if known better than from its stamp."""
        st = self.state
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
            ts = int(d.get("ts_ns") or 0)
            ex = st.feed_request(bytes.fromhex(req_hex), int(d.get("queue") or 0), d.get("head"), ts,
                                 orig_len=d.get("request_len"), notes=list(d.get("notes", ())), n=n,
                                 mono_ns=mono_ns if mono_ns is not None else st.source_mono(ts))
            self._keep_raw(ex, bytes.fromhex(req_hex), None)
            ex.req_layout = _json_layout(d.get("request_layout"))
            if ex.state == X.DONE:  # no reply expected (FORGET): complete already
                return
            st.open[n] = ex
        self._source_lints(ex, d)
        rep_hex = d.get("reply_raw")
        if held == X.HELD_REPLY and isinstance(rep_hex, str) and ex.reply_ts is None:
            # The reply the breakpoint holds: decoded now, so `x` can edit it.
            st.analyzer.feed_reply(bytes.fromhex(rep_hex), ex.queue, ex.head, int(d.get("reply_ts_ns") or 0),
                                   orig_len=d.get("reply_len"), n=n, held=True)
            ex.reply_layout = _json_layout(d.get("reply_layout"))
            self._keep_raw(ex, self._raw.get(ex.index, (None, None))[0], bytes.fromhex(rep_hex))
        elif held != ex.held:
            st.analyzer.set_held(n, held)

    def _source_lints(self, ex: Exchange, d: dict[str, Any]) -> None:
        """Lints only the source can tell (it has the clock and the threshold)."""
        for name in d.get("lints", ()):
            if name == X.STUCK and name not in ex.lints:
                self.state.analyzer.add_lint(ex, name, f"{ex.opname} unique {ex.unique} (#{ex.n}) waited longer "
                                                       "than the source's stuck threshold")

    def _exchange(self, d: dict[str, Any]) -> None:
        an = self.state.analyzer
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
        req_layout, rep_layout = _json_layout(d.get("request_layout")), _json_layout(d.get("reply_layout"))
        notes = list(d.get("notes", ()))
        n = d.get("n") if isinstance(d.get("n"), int) else None
        opened = self.state.open.pop(n, None) if n is not None else None
        if opened is not None:  # its request is listed already: the reply completes it in place
            ex = opened
            if rep_hex is not None:
                an.feed_reply(bytes.fromhex(rep_hex), queue, head, int(rts or ts), orig_len=d.get("reply_len"),
                              n=n, notes=[x for x in notes if x not in ex.notes])
            self._source_lints(ex, d)
            self._keep_raw(ex, self._raw.get(ex.index, (None, None))[0], bytes.fromhex(rep_hex) if rep_hex else None)
            ex.reply_layout = rep_layout or ex.reply_layout
            return
        if req_hex is not None:
            ex = self.state.feed_request(bytes.fromhex(req_hex), queue, head, ts, orig_len=d.get("request_len"),
                                         notes=notes, n=n)
            if rep_hex is not None:
                an.feed_reply(bytes.fromhex(rep_hex), queue, head, int(rts or ts), orig_len=d.get("reply_len"),
                              n=n)
            self._source_lints(ex, d)
        else:
            assert rep_hex is not None
            ex = an.feed_reply(bytes.fromhex(rep_hex), queue, head, int(rts or ts), orig_len=d.get("reply_len"),
                               notes=notes)
        self._keep_raw(ex, bytes.fromhex(req_hex) if req_hex else None, bytes.fromhex(rep_hex) if rep_hex else None)
        ex.req_layout = req_layout or ex.req_layout
        ex.reply_layout = rep_layout or ex.reply_layout

    def _bare(self, d: dict[str, Any]) -> None:
        """An exchange without raw bytes (an older proxy): list it with what the JSON says."""
        an = self.state.analyzer
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
        if an.keep_exchanges:
            an.exchanges.append(ex)
        an.stats.add(ex)
        for cb in an.listeners:
            cb(ex)

    def _keep_raw(self, ex: Exchange, req: bytes | None, rep: bytes | None) -> None:
        if self.keep_raw_bytes and not self.state.analyzer.keep_raw:
            self._raw[ex.index] = (req, rep)

    def raw(self, ex: Exchange) -> tuple[Record | None, Record | None]:
        """The exchange's captured bytes: its own (an analyzer that keeps them), else those kept by index."""
        req, rep = self._raw.get(ex.index) or (ex.req_raw, ex.reply_raw)
        return (_live_record(req, True, ex) if req is not None else None,
                _live_record(rep, False, ex) if rep is not None else None)


def _live_record(data: bytes, inbound: bool, ex: Exchange) -> Record:
    """The live bytes in the same shape a recording gives, with the descriptor layout the source sent."""
    return Record(-1, -1, "fuse", inbound, (ex.req_ts if inbound else ex.reply_ts) or 0, data,
                  (ex.req_len if inbound else ex.reply_len) or len(data), ex.queue, ex.head, ex.epoch, 0,
                  layout_list(ex.req_layout if inbound else ex.reply_layout))


def layout_list(layout: Any) -> list[tuple[int, int]] | None:
    """An exchange's layout as a reader Record has it ((len, flags) per descriptor): from the binary stream's
    bytes (decoded only when shown), or the tuples the JSON lines or the source itself gave."""
    if not layout:
        return None
    return layout_items(layout) if isinstance(layout, bytes) else [(int(ln), int(fl)) for ln, fl in layout]


def _json_layout(v: Any) -> tuple[tuple[int, int], ...] | None:
    """A JSON layout ([[len, flags], ...]) as tuples; None for anything else (a source's bad line loses it)."""
    if not isinstance(v, list) or not v:
        return None
    try:
        return tuple((int(ln), int(fl)) for ln, fl in v)
    except (TypeError, ValueError):
        return None
