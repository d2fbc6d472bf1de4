"""The consumers of the live pipeline: recording writer, analysis, summary, control hub, intercept rules.

Each is an `Addon` (pipeline.py); a source (the proxy session, the daemon engine's source) assembles the
ones its command line asks for, in the documented order, and knows nothing else about them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from dissectors import vhost_user as V

from ..analysis import exchange as X
from ..analysis.analyzer import DEFAULT_STUCK_NS, NO_REPLY, Analyzer
from ..analysis.render import exchanges_summary
from ..recording import format as fmt
from ..recording.writer import RecordingWriter
from .hub import LIVE_SNAPLEN, OPENED, Hub
from .pipeline import Addon

BACKLOG_BYTES = 64 << 20  # captures held back for analysis, at most (then the oldest half is analysed)
BACKLOG_CHUNK = 2000  # captures analysed per quiet spell of the guest (~20-40 ms of work)
_BACKLOG_OVERHEAD = 160  # bytes per held-back capture besides its data (tuple, ints, list)
TEE_EVERY = 0.05  # seconds: how often a recorder that tees (Recorder.tee) hands its blocks to the hub, at most
STUCK_CHECK_NS = 100_000_000  # how often pending requests are checked against the stuck threshold
WATCHED_CATCH_UP_NS = STUCK_CHECK_NS  # watched by binary clients only: the backlog is analysed this often

# A held-back capture: (is_request, data, queue, head, ts_ns, orig_len, notes, mono_ns, layout)
_Deferred = tuple[bool, bytes, int, "int | None", int, int, list[str], int, Any]


def _answered(opened: dict[tuple[int, int], int], data: bytes, queue: int, head: int | None) -> int | None:
    """The number of the request a reply completes, or None: the reply stands alone (a notification, unique
    0; an orphan), and takes the next number itself, as the analysis numbers it (Analyzer._lone)."""
    unique = int.from_bytes(data[8:16], "little") if len(data) >= 16 else -1
    if unique == 0:
        return None
    return opened.pop((queue, head if head is not None else unique), None)


def _opened(opened: dict[tuple[int, int], int], n: int, data: bytes, queue: int, head: int | None) -> None:
    """Request `n` is open on its chain (queue, head), or by its unique without a head, until its reply."""
    if head is not None:
        opened[(queue, head)] = n  # (a chain's head is reused only once it is answered: bounded)
    elif len(data) >= 16 and int.from_bytes(data[4:8], "little") not in NO_REPLY:
        if len(opened) >= OPENED:  # requests that never got a reply: their replies go unnumbered
            opened.clear()
        opened[(queue, int.from_bytes(data[8:16], "little"))] = n


class Recorder(Addon):
    """Writes every capture and vhost-user message to the recording (RecordingWriter, crash-safe).

    A held reply is not recorded: the reply the guest gets is (released, rewritten or answered), so a
    replayed recording has one reply per request.  `flush_every` (seconds): a timer thread hands the
    buffered blocks to the kernel even when traffic stops (the daemon's threads never go idle).
    """

    def __init__(self, writer: RecordingWriter, *, flush_every: float | None = None, lock: Any = None) -> None:
        self.writer = writer
        self._lock = lock if lock is not None else threading.RLock()  # the pipeline's lock
        # tee(): FUSE records carry their exchange number, and their blocks go to the hub (on_blocks)
        self.numbered = False
        self.on_blocks: Callable[[], None] | None = None
        self.requests = 0  # exchanges numbered so far (tee): requests, and replies of their own
        self._open: dict[tuple[int, int], int] = {}  # open chains: (queue, head or unique) -> n
        self._tee_due = 0.0
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        if flush_every:
            self._timer = threading.Thread(target=self._flusher, args=(flush_every,), daemon=True,
                                           name="recording-flush")
            self._timer.start()

    def tee(self, on_blocks: Callable[[], None]) -> None:
        """Number every FUSE record as the analysis numbers its exchange (META_NUMBER: requests in capture
        order, a reply takes the number of the request on its chain, or of its unique without a head, and a
        reply that completes none, a notification or an orphan, takes the next number itself),
        and keep its packet block for the control hub (RecordingWriter.start_tee): `on_blocks` (the hub's
        pull) takes them at least every TEE_EVERY while traffic flows, at once for a capture with flags (a
        held request: before the debugger publishes it), and when the source is quiet.  The recording and
        the binary clients then get the same bytes, built once."""
        self.numbered = True
        self.on_blocks = on_blocks
        self.writer.start_tee()

    def request(self, data: bytes, queue: int, head: int | None, ts_ns: int, orig_len: int, layout: Any,
                notes: list[str], flags: int) -> None:
        if not self.numbered:
            self.writer.request(data, queue, head, ts_ns, layout=layout, notes=notes, flags=flags, orig_len=orig_len)
            return
        self.requests = n = self.requests + 1
        _opened(self._open, n, data, queue, head)
        self.writer.request(data, queue, head, ts_ns, layout=layout, notes=notes, flags=flags, orig_len=orig_len, n=n)
        if flags or time.monotonic() >= self._tee_due:
            self.hand_off()

    def reply(self, data: bytes, queue: int, head: int | None, ts_ns: int, orig_len: int, layout: Any,
              notes: list[str], flags: int) -> None:
        if flags & fmt.RF_HELD:
            return
        if not self.numbered:
            self.writer.reply(data, queue, head, ts_ns, layout=layout, notes=notes, flags=flags, orig_len=orig_len)
            return
        n = _answered(self._open, data, queue, head)
        if n is None:  # an exchange of its own: the next number
            self.requests = n = self.requests + 1
        self.writer.reply(data, queue, head, ts_ns, layout=layout, notes=notes, flags=flags, orig_len=orig_len, n=n)
        if flags or time.monotonic() >= self._tee_due:
            self.hand_off()

    def hand_off(self) -> None:
        """The blocks kept since the last hand-off go to the hub (tee; under the pipeline's lock)."""
        self._tee_due = time.monotonic() + TEE_EVERY
        if self.on_blocks is not None:
            self.on_blocks()

    def tick(self, now_ns: int) -> None:
        if self.numbered:
            self.hand_off()

    def error(self, data: bytes, queue: int, head: int | None, ts_ns: int, note: str) -> None:
        self.writer.request(data, queue, head, ts_ns, notes=[note], flags=fmt.RF_DECODE_ERROR)

    def control(self, direction: str, raw: bytes, fds: list[int], msg: Any) -> None:
        notes = [msg] if isinstance(msg, str) else []
        if fds:
            notes.append(f"{len(fds)} fd(s)")
        if direction == "proxy->backend":
            notes.append(fmt.NOTE_TO_BACKEND)
        elif direction == "proxy->frontend":
            notes.append(fmt.NOTE_TO_FRONTEND)
        with self._lock:  # the control thread, beside the capture thread
            self.writer.control(raw, from_frontend=direction == "frontend", notes=notes)

    def _flusher(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                self.writer.flush()

    def done(self, reason: str) -> None:
        self._stop.set()  # (done runs under the lock the flusher takes: it is joined in close)
        if self.numbered:
            self.hand_off()  # (before the hub says "end")
        self.writer.close()

    def close(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join()
        with self._lock:
            self.writer.close()


class Analysis(Addon):
    """Captures -> an Analyzer: paired, numbered Exchanges, the inode map, lints, stats.

    Deferred analysis (`defer`, the proxy's default): while nobody watches (no client on `hub`) the
    captures wait in a bounded backlog; on a small machine decoding during a burst slows the guest
    (bench/proxy_overhead.py).  The backlog is analysed when the source is quiet (`tick`), when a client
    attaches (`catch_up` from the snapshot), when it grows past BACKLOG_BYTES, and at the end; every
    capture carries its own timestamp, so the results are the same.  While only binary clients watch a hub
    that takes the captures (Publisher: their packet blocks come from the captures, numbered at capture),
    the backlog is analysed at least every WATCHED_CATCH_UP_NS of capture time instead of at each capture
    (a batch costs less per capture: the `stuck` lint and the snapshot stay within that of the guest).

    A held capture is analysed at once (the debugger names it by its exchange: `exchange_of`), without
    the recording's notes: its state says it is held, and one the rules let go at once shows no trace.  The
    `stuck` lint is checked at most every STUCK_CHECK_NS against the newest capture's time while traffic
    flows and against the clock in `tick`, only when nothing is held back.  `snaplen`: the analysis sees
    at most this many bytes of each message (the daemon's engine hands over whole 1 MiB WRITEs).
    """

    def __init__(self, *, keep_raw: bool = False, stuck_ns: int = DEFAULT_STUCK_NS, defer: bool = False,
                 snaplen: int | None = None) -> None:
        self.analyzer = Analyzer(keep_exchanges=False, keep_raw=keep_raw, stuck_ns=stuck_ns)
        self.defer = defer
        self.hub: Hub | None = None  # set by the assembly: while it has clients, nothing is held back
        self.snaplen = snaplen
        self.requests = 0  # delivered (analysed or held back), for the summary
        self.replies = 0
        self.opcount: Counter[str] = Counter()
        self._backlog: deque[_Deferred] = deque()
        self._backlog_bytes = 0
        self._stuck_checked = 0  # CLOCK_MONOTONIC of the last check
        self._caught_up_ts = 0  # the capture time of the last catch-up while watched by binary clients only
        self._held: dict[tuple[int, int, int], X.Exchange] = {}  # (queue, head or unique, direction)
        self._held_replies: dict[tuple[int, int], int] = {}  # held replies not yet ended: their exchange n

    # -- hooks -----------------------------------------------------------------------------------
    def request(self, data: bytes, queue: int, head: int | None, ts_ns: int, orig_len: int, layout: Any,
                notes: list[str], flags: int) -> None:
        self.requests += 1
        if self.snaplen is not None and len(data) > self.snaplen:
            data = data[:self.snaplen]
        if flags & fmt.RF_HELD:
            self.catch_up()
            ex = self.analyzer.feed_request(data, queue, head, ts_ns, orig_len=orig_len, held=True,
                                            mono_ns=_mono(ts_ns))
            ex.req_layout = layout or None
            self.opcount[ex.opname] += 1
            self._held[(queue, _key(head, data), 1)] = ex
            return
        self._analyse((True, data, queue, head, ts_ns, orig_len, notes, _mono(ts_ns), layout))
        if not self._backlog:  # analysis held back: nothing to check until it catches up
            self.check_stuck(self.analyzer.last_ts, _mono(self.analyzer.last_ts))

    def reply(self, data: bytes, queue: int, head: int | None, ts_ns: int, orig_len: int, layout: Any,
              notes: list[str], flags: int) -> None:
        if self.snaplen is not None and len(data) > self.snaplen:
            data = data[:self.snaplen]
        if flags & fmt.RF_HELD:  # counted once, as the guest gets it
            self.catch_up()
            ex = self.analyzer.feed_reply(data, queue, head, ts_ns, orig_len=orig_len, held=True)
            ex.reply_layout = layout or None
            self._held[(queue, _key(head, data), 2)] = ex
            self._held_replies[(queue, _key(head, data))] = ex.n
            return
        self.replies += 1
        if self._held_replies:  # the end of a held reply (released, rewritten): it completes that exchange ...
            n = self._held_replies.pop((queue, _key(head, data)), None)
            if n is not None:
                self.catch_up()
                if self.analyzer.find(n) is not None:  # ... unless the debugger completed it already
                    self.analyzer.feed_reply(data, queue, head, ts_ns, orig_len=orig_len, notes=notes).reply_layout = \
                        layout or None
                return
        self._analyse((False, data, queue, head, ts_ns, orig_len, notes, 0, layout))
        if not self._backlog:
            self.check_stuck(self.analyzer.last_ts, _mono(self.analyzer.last_ts))

    def tick(self, now_ns: int) -> None:
        if self._backlog:
            self.catch_up(BACKLOG_CHUNK)
        self.check_stuck(now_ns, time.monotonic_ns())
        if self.hub is not None:
            self.hub.nudge()  # exchanges finished since its last round: their `stuck` lints, while traffic stops

    def done(self, reason: str) -> None:
        self.catch_up()
        self.analyzer.finish()

    # -- now or later ----------------------------------------------------------------------------
    @property
    def backlog(self) -> int:
        """Captures delivered but not analysed yet."""
        return len(self._backlog)

    def _analyse(self, item: _Deferred) -> None:
        hub = self.hub
        if self.defer and (hub is None or not hub.clients or (hub.tee and not hub.json_clients)):
            self._backlog.append(item)
            self._backlog_bytes += len(item[1]) + _BACKLOG_OVERHEAD
            if hub is not None and hub.clients:  # binary clients only: in batches, within WATCHED_CATCH_UP_NS
                if item[4] - self._caught_up_ts >= WATCHED_CATCH_UP_NS:
                    self._caught_up_ts = item[4]
                    self.catch_up()
            elif self._backlog_bytes > BACKLOG_BYTES:
                self.catch_up(len(self._backlog) // 2 + 1)
            return
        if self._backlog:
            self.catch_up()
        self._analyse_one(item)

    def _analyse_one(self, item: _Deferred) -> None:
        is_request, data, queue, head, ts, orig, notes, mono, layout = item
        if is_request:
            ex = self.analyzer.feed_request(data, queue, head, ts, orig_len=orig, notes=notes, mono_ns=mono)
            if layout:
                ex.req_layout = layout
            self.opcount[ex.opname] += 1
        else:
            ex = self.analyzer.feed_reply(data, queue, head, ts, orig_len=orig, notes=notes)
            if layout:
                ex.reply_layout = layout

    def catch_up(self, limit: int | None = None) -> int:
        """Analyse the held-back captures, oldest first (all of them, or at most `limit`); under the lock."""
        n = len(self._backlog) if limit is None else min(limit, len(self._backlog))
        for _ in range(n):
            item = self._backlog.popleft()
            self._backlog_bytes -= len(item[1]) + _BACKLOG_OVERHEAD
            self._analyse_one(item)
        return n

    def check_stuck(self, now_ns: int, mono_ns: int) -> None:
        """Lint pending requests older than the threshold (at most every STUCK_CHECK_NS).

        `now_ns`/`mono_ns` (wall clock, CLOCK_MONOTONIC) must be a time up to which every capture has been
        analysed: the clocks once the source is quiet, the newest capture's time while traffic flows.  Ages
        are measured on the monotonic clock: a wall-clock step changes none.
        """
        if self._backlog or mono_ns - self._stuck_checked < STUCK_CHECK_NS:
            return
        self._stuck_checked = mono_ns
        self.analyzer.check_stuck(now_ns, mono_ns)

    # -- the debugger ----------------------------------------------------------------------------
    def exchange_of(self, queue: int, key: int, direction: int) -> X.Exchange | None:
        """The exchange of a capture just held (Intercept.exchange_of): key = head (proxy) or unique (engine)."""
        return self._held.pop((queue, key, direction), None)


def _mono(ts_ns: int) -> int:
    """A capture's wall-clock stamp (taken a moment ago) on CLOCK_MONOTONIC: what `stuck` ages it from."""
    return ts_ns + time.monotonic_ns() - time.time_ns()


def _key(head: int | None, data: bytes) -> int:
    """A held capture's name at its hold point: the chain's head, or (no head) the FUSE unique."""
    return head if head is not None else int.from_bytes(data[8:16], "little")


class Summary(Addon):
    """The source-agnostic part of the end-of-run summary: what the analysis was given and made of it
    (requests and replies are counted there, so the summary costs no call per capture), and the hub's
    clients."""

    def __init__(self, analysis: Analysis, hub: Hub | None = None) -> None:
        self.analysis = analysis
        self.hub = hub
        self.capture_errors = 0

    def error(self, data: bytes, queue: int, head: int | None, ts_ns: int, note: str) -> None:
        self.capture_errors += 1

    @property
    def requests(self) -> int:
        return self.analysis.requests

    @property
    def replies(self) -> int:
        return self.analysis.replies

    def summary(self) -> dict[str, Any]:
        an = self.analysis
        out = exchanges_summary(an.analyzer, an.requests, an.replies, dict(an.opcount.most_common()))
        out["control_clients"] = self.hub.client_stats() if self.hub else []
        out["control_overflow"] = self.hub.total_overflow if self.hub else 0
        return out


class Publisher(Addon):
    """The control-socket Hub as an addon: exchanges (through the analysis' listeners), vhost-user
    messages, events, and "end" when the source ends.  Publishing never blocks (hub.py).

    With the analysis, every FUSE capture goes to the hub as it comes (Hub.publish_capture: the binary
    stream's packet blocks, as the recording has them) with its exchange number, known at capture: the
    analysis numbers requests in the order they are delivered (held back or not), a reply takes the number of
    the request on its chain (queue, head; unique without a head), and a reply that completes none (a
    notification, an orphan) is an exchange of its own with the next number, as Analyzer._lone numbers it.
    Nothing is published while nobody watches (the map of open chains is kept: a client may come).
    """

    def __init__(self, hub: Hub, analysis: Analysis | None = None, *, flush_timeout: float = 2.0) -> None:
        self.hub = hub
        self.analysis = analysis
        self.flush_timeout = flush_timeout  # closing: how long clients that read may take to get the end
        self._open: dict[tuple[int, int], int] = {}  # open chains: (queue, head or unique) -> n
        self._lone = 0  # replies numbered as exchanges of their own (notifications, orphans)
        if analysis is not None:
            hub.listen(analysis.analyzer.listeners)
            hub.contexts = lambda: analysis.analyzer.contexts
            analysis.analyzer.pending_listeners.append(hub.publish_request)
            hub.take_captures()

    def request(self, data: bytes, queue: int, head: int | None, ts_ns: int, orig_len: int, layout: Any,
                notes: list[str], flags: int) -> None:
        if self.analysis is None:
            return
        n = self.analysis.requests + self._lone  # this request's number (the analysis counted it already)
        _opened(self._open, n, data, queue, head)
        if self.hub.clients:
            self.hub.publish_capture(True, data if len(data) <= LIVE_SNAPLEN else data[:LIVE_SNAPLEN], queue, head,
                                     ts_ns, orig_len, notes, flags, n, layout or None)

    def reply(self, data: bytes, queue: int, head: int | None, ts_ns: int, orig_len: int, layout: Any,
              notes: list[str], flags: int) -> None:
        if self.analysis is None or flags & fmt.RF_HELD:  # held: the guest has not seen it (nor the recording)
            return
        n = _answered(self._open, data, queue, head)
        if n is None:  # an exchange of its own: the next number
            self._lone += 1
            n = self.analysis.requests + self._lone
        if self.hub.clients:
            self.hub.publish_capture(False, data if len(data) <= LIVE_SNAPLEN else data[:LIVE_SNAPLEN], queue, head,
                                     ts_ns, orig_len, notes, flags, n, layout or None)

    def control(self, direction: str, raw: bytes, fds: list[int], msg: Any) -> None:
        if isinstance(msg, V.VhostUserMessage):
            self.hub.publish_control(direction, msg.summary())

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        self.hub.publish_event(kind, detail)

    def done(self, reason: str) -> None:
        self.hub.publish_event("end", {"reason": reason})

    def close(self) -> None:
        self.hub.close(flush_timeout=self.flush_timeout)  # one client that does not read holds nobody


class BlockPublisher(Publisher):
    """The Publisher of a source that records: binary clients get the recorder's own packet blocks (Recorder.tee:
    numbered as the analysis numbers exchanges), the bytes of the recording, built once; so it has no hook per
    capture (the recorder hands its blocks to the hub in bulk)."""

    request = Addon.request  # (not called: Pipeline dispatches only overridden hooks)
    reply = Addon.reply

    def __init__(self, hub: Hub, analysis: Analysis, recorder: Recorder, *, flush_timeout: float = 2.0) -> None:
        super().__init__(hub, analysis, flush_timeout=flush_timeout)
        writer = recorder.writer
        hub.take_blocks(writer.take_tee, lambda: writer.section)
        recorder.tee(hub.pull)


class Debugger(Addon):
    """The intercept rules (fsinspect/intercept): decide on each held capture, hear the source's own
    resolutions, stop their timers at the end.  Last in the pipeline: everyone saw a capture before."""

    def __init__(self, intercept: Any) -> None:
        self.intercept = intercept

    def held(self, queue: int, head: int, direction: int, data: bytes, ts_ns: int) -> None:
        self.intercept.on_held(queue, head, direction, data, ts_ns)

    def resolved(self, queue: int, head: int, direction: int, how: str) -> None:
        self.intercept.on_resolved(queue, head, direction, how)

    def close(self) -> None:
        self.intercept.close()


def ticker(pipeline: Any, every_s: float, stop: threading.Event) -> threading.Thread:
    """A thread that ticks the pipeline (under its lock) every `every_s` until `stop` is set: the sources
    whose threads never go quiet on their own (the daemon's engine)."""
    def run() -> None:
        while not stop.wait(every_s):
            with pipeline.lock:
                pipeline.emit("tick", time.time_ns())
    t = threading.Thread(target=run, name="fsinspect-tick", daemon=True)
    t.start()
    return t


def add_debugger(pipeline: Any, intercept: Any, point: Any, *, exchange_of: Callable[[int, int, int], Any] | None = None,
                 listener: Callable[[dict[str, Any]], None] | None = None, hub: Hub | None = None) -> None:
    """Plug the intercept rules into a source: its HoldPoint takes their native table and verdicts; held
    captures and the holds the source resolved itself reach them through the pipeline (last, after every
    other addon); `exchange_of` names a held capture by the source's numbered exchange; `listener` moves
    that exchange on at each verdict; `hub` takes the debugger's commands (control protocol v2)."""
    from ..intercept.control import Control

    intercept.attach(point)  # installs the rule table (and points on_held at the intercept: re-pointed here)
    point.on_held = pipeline.on_held
    if hasattr(point, "on_resolved"):
        point.on_resolved = pipeline.on_resolved
    intercept.exchange_of = exchange_of
    if listener is not None:
        intercept.listeners.append(listener)
    if hub is not None:
        Control(intercept).install(hub)
    pipeline.add(Debugger(intercept))
