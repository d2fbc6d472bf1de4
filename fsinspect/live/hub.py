"""The control socket: clients get a snapshot, then the live stream, as JSON lines.

Protocol (version 1), one JSON object per line, server to client:
  {"type": "hello", "version": 1, "source": "proxy", "tool": "fsinspect x.y",
   "clock": {"wall_ns": W, "mono_ns": M}}        the source's wall clock and CLOCK_MONOTONIC, read together
  {"type": "snapshot", "exchanges": [...last N...], "inodes": [...], "stats": {...}, "lints": [...],
   "submounts": [...], "syncfs": [...], "control": [...recent vhost-user messages...], "events": [...],
   "pending": [...every request still waiting, with "age_ms"...], "held": [...those a breakpoint holds...]}
    (`"backlog_dropped": K` when the K oldest backlog exchanges did not fit the client's byte budget)
  {"type": "request", ...exchange_json...}         a request still open when its batch goes out (at most
                                                   FAN_OUT_EVERY after its capture: "state": "pending" or
                                                   "held", "age_ms" at capture); sent again, same "n", when it
                                                   changes while open (held, resumed, linted "stuck"); one
                                                   answered by then comes only as its exchange
  {"type": "exchange", ...exchange_json...}        every finished FUSE exchange (completes request "n"; raw
                                                   bytes cut at LIVE_SNAPLEN, "request_len"/"reply_len" whole)
  {"type": "control", "direction": "...", "summary": "..."}   every vhost-user message
  {"type": "event", "kind": "...", "detail": {...}}          control-plane events (backend-lost, ...)
  {"type": "overflow", "missed": N}                 this client fell behind and N messages were dropped
  {"type": "clock", "wall_ns": W, "mono_ns": M}     before a batch, when the source's wall clock moved against
                                                   its monotonic one (a step, or CLOCK_SLACK of slewing):
                                                   clients age requests on the source's monotonic clock
                                                   (capture stamp + M - W, now = M + their own monotonic time
                                                   since), so neither their clock nor a step of the source's
                                                   makes a waiting request look young or old
  {"type": "error", "error": "..."}                 then the server closes: too many clients, a line too long
Client to server: one JSON object a line (at most MAX_LINE bytes).  Each goes to the owner's
`command_handler(client_id, obj) -> reply dict` (fsinspect/intercept/control.py); without one, a command
with an "id" gets `{"type": "reply", "id": ..., "ok": false, "error": ...}` and anything else is ignored.

Version 2 (a source with the debugger: `--control` on `fsinspect proxy`/`daemon`): the hello says
`"version": 2, "versions": [1, 2]`; version-1 clients send nothing and get what they always got, plus:
  {"type": "held", "n": N, "direction": "request"|"reply", ...exchange_json, "rule_id": R}  a breakpoint holds it
  {"type": "resumed", "n": N, "how": "released"|"answered"|"delayed"|"rewritten"|"dropped"}  it went on
and commands `{"id": I, "cmd": "held"|"release"|"answer"|"delay"|"rewrite"|"drop"|"continue-all"|"rules"|
"add-rule"|"remove-rule"|"counters", ...}`, each answered by exactly one `{"type": "reply", "id": I, "ok":
true, ...}` or `{..., "ok": false, "error": "<reason>"}` (the commands' arguments: intercept/control.py;
a client for scripts: intercept/client.py).

Binary stream (any version): the hello lists `"streams": ["jsonl", "pcapng"]`.  A client that sends
`{"id": I, "cmd": "stream", "format": "pcapng"}` gets `{"type": "reply", "id": I, "ok": true, "format":
"pcapng"}` as its last JSON line; every byte after that line's newline is a pcapng stream, the same blocks
as a recording (recordings/FORMAT.md): a section header and the interfaces so far, then one EPB per
captured message, each carrying the source's exchange number `n` (META_NUMBER).  From a source that
publishes its captures (`take_captures`: the proxy and the daemon, through live.addons.Publisher) the EPBs
are the captures themselves, in capture order, with the batch they were captured in, numbered at capture
(a reply the source could not number has none: the client pairs it by its chain, as a replay does).
Otherwise (a hub fed exchanges only) a request's EPB goes in capture order, with the batch it was captured
in (as it was captured, even if answered since), its reply's with the finished exchange (an exchange whose
request was not streamed yet gets both, in order).
Every other message of this protocol (control, event, held, resumed, reply, overflow, error, and
`request` updates of an exchange already streamed and still open: state, held, lints; no raw bytes)
travels as a custom block (BT_CB: PEN + the same JSON object).  The snapshot came before, as JSON.  `"format": "jsonl"` keeps
the JSON lines (the reply says so); anything else is refused with `"ok": false`.  The blocks are encoded
once per batch for every binary client, and the bytes are what `fsinspect attach --format pcapng` writes.

Nothing a client does can exhaust the process or slow the data path:
- publish_* only append to one bounded outbox (the Exchange itself, or the capture: nothing is rendered on
  the source's thread) and wake the hub thread (once per burst: while traffic flows the hub thread comes
  back every FAN_OUT_EVERY by itself, or once WAKE_AT messages wait, or at once for a rare message: held,
  resumed, a control-plane event); rendering, encoding and the fan-out to clients happen there, once per
  batch and only in the forms the clients read (JSON for JSON clients, packet blocks for binary ones; each
  encoded batch is shared by every client's queue).  A full outbox drops and counts, for every client;
- the snapshot's backlog keeps the last exchanges themselves, rendered when a client attaches: a source
  nobody watches pays two appends per exchange;
- each client's queue is bounded in bytes (its snapshot counts too); what does not fit is dropped and
  counted, and the client is told how much it missed once it drains;
- the hub thread sleeps in epoll (selectors) until something happens, so idle clients cost no CPU (its
  FAN_OUT_EVERY rounds stop with the traffic) and
  any fd number works; at most `max_clients` are attached, the rest get an error line and are closed;
- a client whose replies pile up is not read until it drains, and a line over MAX_LINE drops the client.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import itertools
import json
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from dissectors.transport.unixsock import claim_socket_path, release_socket_path

from .. import __version__
from ..analysis.exchange import DONE, HELD_REQUEST, STUCK, Exchange, Kept, keep, revive
from ..analysis.render import exchange_json
from ..recording import format as rfmt
from ..recording.writer import BlockEncoder, custom_block
from . import registry

log = logging.getLogger("fsinspect.hub")

PROTOCOL_VERSION = 1
BACKLOG_EXCHANGES = 500
BACKLOG_BYTES = 8 << 20  # the snapshot's exchange backlog, estimated from its raw hex
LIVE_SNAPLEN = 16 * 1024  # raw bytes of each message an exchange line carries (what the proxy captures)
CLIENT_QUEUE = 4096  # messages a client may have queued, on top of the byte budget
CLIENT_BYTES = 8 << 20  # a client's queue, snapshot included
TOTAL_BYTES = 64 << 20  # every client's queue together: past this, a client gets at most ...
MIN_CLIENT_BYTES = 256 << 10  # ... this much (the worst case is TOTAL + MAX_CLIENTS * MIN_CLIENT bytes)
MAX_CLIENTS = 256
MAX_LINE = 64 << 10  # a client->server line
OUTBOX = 16384  # messages published but not yet fanned out (the hub thread is behind)
FAN_OUT_DELAY = 0.01  # seconds the first batch of a burst gathers before it goes out to the clients
# While traffic flows: seconds between rounds.  Each round costs the process ~250 us whatever it carries
# (the hub thread's wake-up and its GIL hand-offs with the capture thread, a send) and the client as much
# (its wake-up, parse and write): at a guest's pace (~1000 exchanges/s, bench/live_publish.py --rate 1000,
# one pcapng client, us per exchange) 10 ms rounds cost the hub thread 21.6 and the client 24.9, 50 ms 6.9
# and 8.7, 100 ms 4.7 and 5.1.  A live view refreshes 10 times a second: 100 ms is what it shows anyway.
FAN_OUT_EVERY = 0.1
# Messages waiting that make a round at once (a fast source: a round brings a client no more than half what
# its queue may hold, CLIENT_QUEUE; 10 ms of 100k exchanges/s).
WAKE_AT = 2048
CLOSE_STALL = 0.3  # closing: seconds without any client taking bytes before the rest is given up
EVENTS = 1000  # control-plane events a snapshot repeats
ACCEPT_PAUSE = 0.5  # seconds the listener is not watched after accept() ran out of fds
_BATCH = 256
CLOCK_SLACK = 1_000_000  # ns the source's wall clock may move against its monotonic one before clients are told
_RECV = 64 << 10
STREAMS = ("jsonl", "pcapng")  # what a client may ask for with the `stream` command
OPENED = 1 << 16  # requests streamed (binary) whose reply has not come yet, remembered at most
# What an outbox item carries: a message, a finished exchange, a request, a capture (take_captures()).
_MSG, _EXCHANGE, _REQUEST, _CAPTURE = 0, 1, 2, 3
# ... packet blocks a recorder made (take_blocks), and a section header or interface block among them
_BLOCKS, _HEADER = 4, 5

CommandHandler = Callable[[int, dict[str, Any]], dict[str, Any]]
_Form = tuple[list[int], list[bytes], bytes, list[int]]  # a batch in one form (_encoded)


class _Client:
    def __init__(self, sock: socket.socket, cid: int) -> None:
        self.sock = sock
        self.id = cid
        self.queue: collections.deque[tuple[bytes, int]] = collections.deque()  # (lines, how many)
        self.head: memoryview | None = None  # what is being sent now, from its offset
        self.queued = 0  # bytes in queue + head, the snapshot included
        self.queued_msgs = 0  # messages in queue
        self.start_seq = 0  # outbox messages before this one are already in its snapshot
        self.missed = 0
        self.reported_missed = 0
        self.sent = 0
        self.inbuf = bytearray()
        self.blocked = False  # the socket said EAGAIN: wait for EVENT_WRITE
        self.closing = False  # send what is queued (an error line), then close
        self.binary = False  # switched to the pcapng stream: messages go as blocks
        self.header_seq = 0  # outbox messages before this one: their section/interface blocks are in its header

    def encode(self, obj: dict[str, Any]) -> bytes:
        """One protocol message as this client reads it: a JSON line, or a custom block once binary."""
        return custom_block(obj) if self.binary else _line(obj)

    @property
    def has_output(self) -> bool:
        return bool(self.head is not None or self.queue or self.missed > self.reported_missed)


class Hub:
    """Publishes to every attached client; publish_* never block (called from the data path's threads)."""

    def __init__(self, path: str, snapshot: Callable[[], dict[str, Any]], *, queue_len: int = CLIENT_QUEUE,
                 source: str = "proxy", feed_lock: Any = None, client_bytes: int = CLIENT_BYTES,
                 total_bytes: int = TOTAL_BYTES, max_clients: int = MAX_CLIENTS, max_line: int = MAX_LINE,
                 command_handler: CommandHandler | None = None, capture_source: str = "virtio",
                 accept_clients: bool = True) -> None:
        self.path = path
        self.snapshot_fn = snapshot
        # Held by whoever feeds publish_exchange: taking it while a client joins means no exchange falls
        # between its snapshot and its live stream.
        self.feed_lock = feed_lock if feed_lock is not None else threading.Lock()
        self.queue_len = queue_len
        # Not fanned out yet is never a tighter bound than what one client may have queued (a hub made for
        # a deep client queue dropped at the outbox instead: CI's ingest test, 13k overflow).
        self.outbox_len = max(OUTBOX, queue_len)
        self.client_bytes = client_bytes
        self.total_bytes = total_bytes
        self.max_clients = max_clients
        self.max_line = max_line
        self.command_handler = command_handler
        self.protocol_version = PROTOCOL_VERSION
        self.source = source
        self.clients: list[_Client] = []
        self.json_clients = 0  # clients that read JSON lines (not switched to the binary stream)
        # The binary stream's packet blocks come from the captures themselves (publish_capture) once the
        # source says it publishes them (take_captures); else they are made from the exchanges.
        self.tee = False
        self.lock = threading.Lock()
        # The snapshot's backlog: the newest finished exchanges, kept without their decoded messages (Kept)
        self.recent: collections.deque[Kept | Exchange] = collections.deque(maxlen=BACKLOG_EXCHANGES)
        # The source's FUSE contexts by epoch (what revives a kept exchange's messages), if it has an analysis
        self.contexts: Callable[[], dict[int, Any]] = dict
        self._recent_sizes: collections.deque[int] = collections.deque()
        self._recent_bytes = 0
        # Finished exchanges not in `recent` yet (listen(): while only binary clients watch, the source's
        # thread only appends here; the hub thread moves them into `recent`, sized, in its next round).
        self._fresh: collections.deque[Exchange] = collections.deque(maxlen=BACKLOG_EXCHANGES)
        self._recent_lock = threading.Lock()  # `recent` and its sizes change under it (settle, _remember)
        self._listeners: list[Callable[[Exchange], None]] | None = None  # the source's (listen)
        # take_blocks(): the recorder's packet blocks (what it made since: take) and its section so far
        self._take: Callable[[], list[tuple[bool, bytes, int]]] | None = None
        self._section: Callable[[], list[bytes]] | None = None
        self._listening_fresh = False
        self.recent_control: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS)
        self.total_overflow = 0
        self.total_queued = 0  # bytes in every client's queue
        self.refused = 0
        self._outbox: collections.deque[tuple[int, int, Any, Any]] = collections.deque()  # (seq, kind, x, pub)
        # The binary stream's encoder (one for every binary client: interfaces are numbered once) and the
        # exchanges whose request it streamed, by n -> how many notes went with the request.
        self.encoder = BlockEncoder(source=capture_source, snaplen=LIVE_SNAPLEN,
                                    comments=[f"live stream from an fsinspect {source} control socket"])
        self._opened: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._seq = 0
        self._outbox_dropped = 0
        self.wake_at = max(1, min(WAKE_AT, queue_len // 2))
        self._woken = False  # the hub thread will look at the outbox without being woken (or is woken already)
        self._nudged = False  # the wake pipe is written and not read yet
        self._ticking = False  # traffic flows: the hub thread comes back every FAN_OUT_EVERY by itself
        self.rounds = 0  # fan-out rounds that carried messages (what a client costs the source is per round)
        self._next_id = 0
        self._clock_offset = time.monotonic_ns() - time.time_ns()  # what the clients were last told
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # 0600: the traffic holds file names and data.  Only a stale socket is replaced.
        self.listener = claim_socket_path(path, backlog=64, mode=0o600, what="--control")
        self._registered = registry.register(path)  # `fsinspect extcap` lists it as a Wireshark interface
        self.listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        # A source that assembles its addons after making the hub (the debugger's command handler makes the
        # protocol version 2) says accept_clients=False and calls open_clients() once assembled: a client
        # that connects before waits in the backlog, so its hello never promises less than it gets.
        self._open = threading.Event()
        self._listening = False
        if accept_clients:
            self._open.set()
            self.sel.register(self.listener, selectors.EVENT_READ, None)
            self._listening = True
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._closing_by: float | None = None
        self._progress = 0.0  # when a client last took bytes
        self._accept_paused_until: float | None = None  # out of fds: the pending clients wait in the backlog
        self.thread = threading.Thread(target=self._loop, name="fsinspect-hub", daemon=True)
        self.thread.start()

    # -- publishing (any thread) -------------------------------------------------------------------
    def _broadcast(self, kind: int, payload: Any, pub: Any = None) -> None:
        """Queue a message for every client: `payload` is a protocol message (_MSG), or the Exchange behind
        an exchange/request message, rendered by the hub thread in each form its clients read."""
        if not self.clients:  # nobody to encode for (a joining client gets `recent` in its snapshot)
            return
        with self.lock:
            if len(self._outbox) >= self.outbox_len:
                self._outbox_dropped += 1
            else:
                self._outbox.append((self._seq, kind, payload, pub))
                self._seq += 1
            # While the hub thread comes back by itself, only a rare message (_MSG: held, resumed, an event)
            # or a batch as big as WAKE_AT calls it in early.
            if self._nudged or (self._woken and kind != _MSG and len(self._outbox) < self.wake_at):
                return
            self._woken = self._nudged = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def publish_exchange(self, ex: Exchange) -> None:
        """A finished exchange: kept for the next snapshot and queued as it is (nothing is rendered here:
        the data path's thread pays two appends)."""
        if self._fresh:  # (listen(): a JSON client joined since; the older ones go first)
            self.settle()
        with self._recent_lock:
            self._remember(ex)
        if self.tee and not self.json_clients and STUCK not in ex.lints:
            return  # binary clients only: its packet blocks went with its captures
        if self._take is not None and self.clients:
            self.pull()  # (its packet blocks first)
        self._broadcast(_EXCHANGE, ex)

    def listen(self, listeners: list[Callable[[Exchange], None]]) -> None:
        """Hear about finished exchanges through the source's listener list (an Analyzer's `listeners`), at
        the least cost to the source's thread: while only binary clients watch a source that publishes its
        captures (take_captures), the listener is the bare append of `_fresh` (no Python frame, nothing
        sized: their packet blocks went with the captures), and the hub thread keeps the snapshot's backlog
        (settle) in its rounds; otherwise publish_exchange.  The hub swaps the two under the feed lock when a
        client joins or switches streams (the source calls its listeners only while holding that lock)."""
        self._listeners = listeners
        self._listening_fresh = self._fresh_mode()
        listeners.append(self._fresh.append if self._listening_fresh else self.publish_exchange)

    def _fresh_mode(self) -> bool:
        return self.tee and not self.json_clients and bool(self.clients)

    def _relisten(self) -> None:
        """Put the listener that fits the clients now in the source's list (with the feed lock held; a mode
        that outlives its reason is only slower: a client leaving changes nothing)."""
        lst = self._listeners
        fresh = self._fresh_mode()
        if lst is None or fresh == self._listening_fresh:
            return
        old = self._fresh.append if self._listening_fresh else self.publish_exchange
        for k, cb in enumerate(lst):
            if cb == old:
                lst[k] = self._fresh.append if fresh else self.publish_exchange
                break
        self._listening_fresh = fresh

    def nudge(self) -> None:
        """The source went quiet: if it finished exchanges the hub thread has not settled yet (listen), call
        the hub thread in for a round (it stops coming by itself once traffic stops)."""
        if self._fresh and self.clients and not self._nudged:
            with self.lock:
                self._woken = self._nudged = True
            self._wake()

    def settle(self) -> int:
        """Move the finished exchanges the source only appended (listen) into the snapshot's backlog, sized
        and bounded; those the source linted `stuck` at completion go to the binary clients (the one thing
        their packet blocks cannot say).  Any thread (the hub thread's rounds, a joining client's snapshot)."""
        fresh = self._fresh
        moved = 0
        stuck: list[Exchange] = []
        with self._recent_lock:
            while fresh:
                try:
                    ex = fresh.popleft()
                except IndexError:  # (taken by another settle meanwhile)
                    break
                self._remember(ex)
                if STUCK in ex.lints:
                    stuck.append(ex)
                moved += 1
        if stuck and self._take is not None:
            with self.feed_lock:
                self.pull()  # (their packet blocks first)
        for ex in stuck:
            self._broadcast(_EXCHANGE, ex)
        return moved

    def publish_request(self, ex: Exchange) -> None:
        """A request in flight (new, or changed while open); the snapshot lists the open ones instead.  Sent
        only if it is still open when its batch goes out: one answered by then comes as its exchange."""
        if self.clients:  # what the request's packet block says is taken now (its notes only grow)
            if self.tee and not self.json_clients and ex.held is None and STUCK not in ex.lints:
                return  # binary clients only: its packet block went with its capture; nothing else to say
            if self._take is not None:
                self.pull()  # (its packet block first)
            self._broadcast(_REQUEST, ex, ((time.time_ns(), time.monotonic_ns()), ex.held, len(ex.notes)))

    def take_captures(self) -> None:
        """The source publishes every FUSE capture (publish_capture) with its exchange number: binary clients
        get their packet blocks from those, not from the exchanges (which then only add what the source alone
        knows: held, `stuck`), and a source watched only by binary clients may keep its analysis back."""
        self.tee = True

    def take_blocks(self, take: Callable[[], list[tuple[bool, bytes, int]]],
                    section: Callable[[], list[bytes]]) -> None:
        """The binary stream's packet blocks are a recorder's own (live.addons.Recorder.tee: numbered at
        capture, the recording's bytes): `take()` gives what it made since it was last asked, in order, as
        (True, a section header or interface block, 1) or (False, packet blocks, how many), and `section()`
        the section header and interface blocks a binary client needs first.  Both are called with the feed
        lock held (a reentrant one: the recorder's source hands its blocks over through pull())."""
        self.take_captures()
        self._take = take
        self._section = section

    def pull(self) -> None:
        """Take the recorder's blocks into the outbox, in order (with the feed lock held: the recorder's source
        calls it as it goes, and the hub before anything it publishes could name an exchange not streamed yet)."""
        take = self._take
        if take is None:
            return
        items = take()
        if items and self.clients:  # (nobody watches: a client joining gets the section so far)
            for header, data, count in items:
                self._broadcast(_HEADER if header else _BLOCKS, data, count)

    def publish_capture(self, inbound: bool, data: bytes, queue: int, head: int | None, ts_ns: int,
                        orig_len: int, notes: list[str], flags: int, n: int, layout: Any = None) -> None:
        """A captured FUSE message (take_captures), as the recording has it, with the source's exchange number
        (0: unknown): one packet block for binary clients, in capture order.  `data` is cut at LIVE_SNAPLEN
        by the caller; `layout` is its descriptor chain ((len, flags) per descriptor, a tuple), if any.  JSON
        clients skip it (their exchange lines say it)."""
        self._broadcast(_CAPTURE, (inbound, data, queue, head, ts_ns, orig_len, notes, flags, n, layout))

    def _remember(self, ex: Exchange) -> None:
        """Keep `ex` for the snapshot's backlog, bounded in count and in bytes (what it holds, and its JSON's
        raw hex, which is cut at LIVE_SNAPLEN).  Under _recent_lock: on the source's thread (publish_exchange)
        or on the hub thread (settle: a finished exchange's raw bytes no longer change)."""
        size = 512
        for raw in (ex.req_raw, ex.reply_raw):
            if raw is not None:
                k = len(raw)
                size += 3 * k if k <= LIVE_SNAPLEN else k + 2 * LIVE_SNAPLEN
        kept = keep(ex)  # (what the collector walks: one object, not the exchange's couple of dozen)
        recent, sizes = self.recent, self._recent_sizes
        total = self._recent_bytes + size
        if len(recent) == recent.maxlen:
            total -= sizes.popleft()  # (the deque's maxlen drops its oldest exchange)
        recent.append(kept)
        sizes.append(size)
        while total > BACKLOG_BYTES and len(recent) > 1:
            recent.popleft()
            total -= sizes.popleft()
        self._recent_bytes = total

    def backlog(self) -> list[dict[str, Any]]:
        """The exchanges a client attaching now gets in its snapshot, as JSON (under the feed lock: the
        source's thread changes exchanges only while it holds that lock)."""
        with self.feed_lock:
            self.settle()
            with self._recent_lock:
                recent = list(self.recent)
            contexts = self.contexts()
            return [_exchange_obj(revive(k, contexts)) for k in recent]

    def publish_control(self, direction: str, summary: str) -> None:
        obj = {"type": "control", "direction": direction, "summary": summary}
        with self.lock:
            self.recent_control.append(obj)
        self._broadcast(_MSG, obj)

    def publish_event(self, kind: str, detail: dict[str, Any]) -> None:
        obj = {"type": "event", "kind": kind, "detail": detail}
        with self.lock:
            self.events.append(obj)
        self._broadcast(_MSG, obj)

    def publish_message(self, obj: dict[str, Any]) -> None:
        """Any other live message (control v2: `held`, `resumed`), to every client."""
        self._broadcast(_MSG, obj)

    def send_to(self, client_id: int, obj: dict[str, Any]) -> bool:
        """Queue `obj` to one client (a command's late answer); False when that client is gone."""
        with self.lock:
            c = next((c for c in self.clients if c.id == client_id), None)
        if c is None:
            return False
        with self.lock:
            self._enqueue(c, c.encode(obj), force=True)
            self._woken = self._nudged = True
        self._wake()
        return True

    # -- budgets (called with self.lock held) ------------------------------------------------------
    def _room(self, c: _Client) -> int:
        """Bytes `c` may still queue: its own budget, and a share of what every client holds together."""
        room = self.client_bytes - c.queued
        if self.total_queued + room > self.total_bytes:
            room = max(self.total_bytes - self.total_queued, MIN_CLIENT_BYTES - c.queued)
        return room

    def _fits(self, c: _Client, size: int, count: int) -> bool:
        return size <= self._room(c) and c.queued_msgs + count <= self.queue_len

    def _enqueue(self, c: _Client, data: bytes, count: int = 1, *, force: bool = False) -> None:
        if not force and not self._fits(c, len(data), count):
            c.missed += count
            self.total_overflow += count
            return
        c.queue.append((data, count))
        c.queued += len(data)
        c.queued_msgs += count
        self.total_queued += len(data)

    # -- the hub thread -----------------------------------------------------------------------------
    def _fan_out(self) -> None:
        """Encode what was published since the last round, once, and queue it to every client."""
        if self._fresh:
            self.settle()
        with self.lock:
            items = list(self._outbox)
            self._outbox.clear()
            # While traffic flows the loop comes back in FAN_OUT_EVERY by itself, so publishing wakes nobody
            # (a write to the wake pipe, and the other CPU's wake-up, per batch); a round that finds nothing
            # goes back to sleeping until woken.
            self._ticking = bool(items)
            self._woken = self._ticking or self._nudged
            self.rounds += bool(items)
            dropped, self._outbox_dropped = self._outbox_dropped, 0
            clients = list(self.clients)
        if dropped:
            with self.lock:
                for c in clients:
                    c.missed += dropped
                    self.total_overflow += dropped
        if items:
            wall, mono = time.time_ns(), time.monotonic_ns()
            if abs(mono - wall - self._clock_offset) >= CLOCK_SLACK:  # before the batch its stamps are read with
                self._clock_offset = mono - wall
                items.insert(0, (items[0][0], _MSG, {"type": "clock", "wall_ns": wall, "mono_ns": mono}, None))
        text = any(not c.binary for c in clients)
        binary = any(c.binary for c in clients)
        run: list[tuple[int, int, Any, Any]] = []
        for item in items:
            if item[1] != _HEADER:
                run.append(item)
                continue
            self._fan_out_run(run, clients, text, binary)  # (what came before it, first)
            run = []
            with self.lock:  # every binary reader must have it, but one whose own header has it already
                for c in clients:
                    if c.binary and item[0] >= c.header_seq:
                        self._enqueue(c, item[2], force=True)
        self._fan_out_run(run, clients, text, binary)
        for c in clients:
            if not c.blocked and c.has_output:
                self._send(c)

    def _fan_out_run(self, items: list[tuple[int, int, Any, Any]], clients: list[_Client], text: bool,
                     binary: bool) -> None:
        for k in range(0, len(items), _BATCH):
            chunk = items[k:k + _BATCH]
            objs = self._render(chunk)
            # Each message once per form: JSON lines, and pcapng blocks (one bytes per message, so that each
            # form counts and cuts whole messages).
            forms = {False: self._text_form(chunk, objs) if text else None,
                     True: self._binary_form(chunk, objs) if binary else None}
            fresh = b"".join(self.encoder.fresh)  # new interfaces: every binary reader gets them, first
            self.encoder.fresh.clear()
            with self.lock:
                for c in clients:
                    if fresh and c.binary:
                        self._enqueue(c, fresh, force=True)
                    form = forms[c.binary]
                    assert form is not None
                    seqs, lines, whole, ends = form
                    skip = bisect.bisect_left(seqs, c.start_seq)  # joined mid-batch: its snapshot holds these
                    if skip >= len(lines):
                        continue
                    if not skip and self._fits(c, len(whole), len(lines)):
                        self._enqueue(c, whole, len(lines))
                        continue
                    # What fits, in order; the rest is missed (O(1) for a client already full).
                    before = ends[skip - 1] if skip else 0
                    fit = bisect.bisect_right(ends, before + max(0, self._room(c)), lo=skip) - skip
                    fit = min(fit, max(0, self.queue_len - c.queued_msgs))
                    if fit:
                        self._enqueue(c, b"".join(lines[skip:skip + fit]), fit, force=True)
                    rest = len(lines) - skip - fit
                    c.missed += rest
                    self.total_overflow += rest

    def _render(self, items: list[tuple[int, int, Any, Any]]) -> list[Any]:
        """The protocol message of each outbox item, or None: a request's is made here if it is still open
        (under the feed lock, once a batch: the source changes an open exchange only while holding it), else
        it is None (the exchange is published already); a finished exchange's is made only for JSON clients
        (None here), a capture has none; any other message is as it was published."""
        # (A finished exchange stays finished: the lock is taken only if some request may still be open.)
        if not any(kind == _REQUEST and payload.state != DONE for _, kind, payload, _ in items):
            return [payload if kind == _MSG else None for _, kind, payload, _ in items]
        out: list[Any] = []
        with self.feed_lock:
            for _, kind, payload, pub in items:
                obj = payload if kind == _MSG else None
                if kind == _REQUEST and payload.state != DONE:
                    wall, mono = pub[0]  # (ages on CLOCK_MONOTONIC: a wall-clock step changes none)
                    obj = {"type": "request", **exchange_json(payload, raw=True, now_ns=wall, mono_ns=mono)}
                    _cut_raw(obj)
                out.append(obj)
        return out

    @staticmethod
    def _text_form(chunk: list[tuple[int, int, Any, Any]], objs: list[Any]) -> _Form:
        """A batch as JSON lines: every message, finished exchange and request still open (not captures)."""
        seqs: list[int] = []
        lines: list[bytes] = []
        for (seq, kind, payload, _), obj in zip(chunk, objs):
            if obj is not None or kind == _EXCHANGE:
                seqs.append(seq)
                lines.append(_line(obj if obj is not None else _exchange_obj(payload)))
        return _encoded(seqs, lines)

    def _binary_form(self, chunk: list[tuple[int, int, Any, Any]], objs: list[Any]) -> _Form:
        """A batch as pcapng blocks; the captures' packet blocks are framed in one go (take_captures)."""
        if all(item[1] == _BLOCKS for item in chunk):  # (a recorder's blocks only: the common case)
            return _encoded([item[0] for item in chunk], [item[2] for item in chunk])
        caps = [payload for _, kind, payload, _ in chunk if kind == _CAPTURE]
        framed = self.encoder.frame(caps) if caps else []
        if len(caps) == len(chunk):  # (captures only: the common case without a recorder)
            return _encoded([item[0] for item in chunk], framed)
        blocks = iter(framed)
        seqs: list[int] = []
        out: list[bytes] = []
        for (seq, kind, payload, pub), obj in zip(chunk, objs):
            data = next(blocks) if kind == _CAPTURE else self._blocks(kind, obj, payload, pub)
            if data:
                seqs.append(seq)
                out.append(data)
        return _encoded(seqs, out)

    def _blocks(self, kind: int, obj: Any, ex: Any, pub: Any) -> bytes:
        """A message as binary-stream blocks (hub thread): packet blocks for a captured request and a finished
        exchange, a custom block for everything else (and for what a request's packet block cannot say)."""
        if kind == _BLOCKS:
            return bytes(ex)  # (a recorder's packet blocks, as they are)
        enc = self.encoder
        opened = self._opened
        if self.tee:  # what the captures' blocks cannot say: held and resumed requests, the `stuck` lint
            if kind == _REQUEST:
                return b"" if obj is None else custom_block(_update(obj))
            if kind == _EXCHANGE:
                return custom_block({"type": "lints", "n": ex.n, "lints": [STUCK]}) if STUCK in ex.lints else b""
            return custom_block(obj)
        if kind == _REQUEST:
            n = ex.n
            if n in opened or ex.req_raw is None:  # an update of one already streamed: its state, no bytes
                if obj is None:  # ... stale: it finished since
                    return b""
                return custom_block(_update(obj))
            # Its packet block as it was captured (in capture order, even if it finished since).
            _now, held, nnotes = pub
            self._request_block(ex, ex.notes[:nnotes], rfmt.RF_HELD if held == HELD_REQUEST else 0)
            opened[n] = nnotes
            if len(opened) > OPENED:
                opened.popitem(last=False)
            return enc.take()
        if kind == _EXCHANGE:
            if ex.req_raw is None and ex.reply_raw is None:
                return custom_block(_exchange_obj(ex))
            notes = list(ex.notes)
            sent = opened.pop(ex.n, None)
            if sent is None and ex.req_raw is not None:
                self._request_block(ex, notes, 0)
                sent = len(notes)
            if ex.reply_raw is not None:
                enc.reply(ex.reply_raw[:LIVE_SNAPLEN], ex.queue, ex.head, ex.reply_ts or 0, epoch=ex.epoch,
                          orig_len=ex.reply_len, notes=notes[sent or 0:], n=ex.n, layout=ex.reply_layout or ())
            data = enc.take()
            if STUCK in ex.lints:  # the source's clock and threshold: the client's analyzer cannot tell
                data += custom_block({"type": "lints", "n": ex.n, "lints": [STUCK]})
            return data
        return custom_block(obj)

    def _request_block(self, ex: Any, notes: list[str], flags: int) -> None:
        self.encoder.request(ex.req_raw[:LIVE_SNAPLEN], ex.queue, ex.head, ex.req_ts or 0, epoch=ex.epoch,
                             orig_len=ex.req_len, notes=notes, flags=flags, n=ex.n, layout=ex.req_layout or ())

    def _stream(self, c: _Client, obj: dict[str, Any]) -> None:
        """The `stream` command: switch this client to the pcapng stream (or keep JSON lines)."""
        want = obj.get("format", "pcapng")
        cid = obj.get("id")
        if want not in STREAMS:
            self._reply(c, {"type": "reply", "id": cid, "ok": False,
                            "error": f"unknown stream format {want!r} (this hub streams {', '.join(STREAMS)})"})
            return
        if c.binary and want != "pcapng":
            self._reply(c, {"type": "reply", "id": cid, "ok": False, "error": "already streaming pcapng"})
            return
        self._reply(c, {"type": "reply", "id": cid, "ok": True, "format": want})
        if want == "pcapng" and not c.binary:
            with self.feed_lock:  # (the source calls its listeners only while holding it: _relisten)
                self.pull()
                header = self.encoder.header if self._section is None else self._section()
                with self.lock:  # after the reply line: the section header and every interface so far
                    c.binary = True
                    c.header_seq = self._seq
                    self.json_clients -= 1
                    self._enqueue(c, b"".join(header), force=True)
                self._relisten()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The listener stays readable: watching it now would spin.  Look again a bit later.
                    if self._accept_paused_until is None:
                        log.warning("control hub: cannot accept a client: %s; retrying in %.1f s",
                                    e.strerror, ACCEPT_PAUSE)
                        self.sel.unregister(self.listener)
                    self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
                return  # EAGAIN: nobody else is waiting
            sock.setblocking(False)
            if len(self.clients) >= self.max_clients:
                self.refused += 1
                with contextlib.suppress(OSError):
                    sock.send(_line({"type": "error", "error": f"too many control clients ({self.max_clients} "
                                                                 "attached): try again later"}))
                sock.close()
                continue
            self._next_id += 1
            c = _Client(sock, self._next_id)
            with self.feed_lock:
                self.pull()  # (what the recorder made before: to the clients already here)
                try:
                    snap = {"type": "snapshot", **self.snapshot_fn()}
                except Exception as e:  # a bug in the owner's snapshot must not end the hub for everyone
                    log.error("control hub: snapshot failed: %s: %s", type(e).__name__, e)
                    with contextlib.suppress(OSError):
                        sock.send(_line({"type": "error", "error": f"no snapshot: {type(e).__name__}: {e}"}))
                    sock.close()
                    continue
                self.settle()  # (what the source only appended: its `stuck` lints go to the others first)
                with self._recent_lock:
                    recent = list(self.recent)
                contexts = self.contexts()  # (the source waits for the lock meanwhile)
                snap["exchanges"] = [_exchange_obj(revive(k, contexts)) for k in recent]
                with self.lock:
                    snap["control"] = list(self.recent_control)
                    snap["events"] = list(self.events)
                    c.start_seq = self._seq
                    self.clients.append(c)
                    self.json_clients += 1
                self._relisten()  # a JSON client: every exchange goes out as it finishes
            self.sel.register(sock, selectors.EVENT_READ, c)
            hello: dict[str, Any] = {"type": "hello", "version": self.protocol_version}
            if self.protocol_version > 1:
                hello["versions"] = list(range(1, self.protocol_version + 1))
            hello.update(source=self.source, tool=f"fsinspect {__version__}", streams=list(STREAMS),
                         clock={"wall_ns": time.time_ns(), "mono_ns": time.monotonic_ns()})
            data = _line(hello) + self._encode_snapshot(c, snap)
            with self.lock:  # first in its queue: live messages queued meanwhile go after it
                busy = len(data) > self._room(c) and self.total_queued > c.queued
                if not busy:
                    c.queue.appendleft((data, 1))
                    c.queued += len(data)
                    c.queued_msgs += 1
                    self.total_queued += len(data)
            if busy:  # its snapshot alone is over what the clients that do not read have left
                self.refused += 1
                self._refuse(c, f"the control hub is full ({self.total_queued >> 20} MiB queued to clients "
                                "that do not read): try again later")
            self._send(c)

    def _encode_snapshot(self, c: _Client, snap: dict[str, Any]) -> bytes:
        """The snapshot counts against the client's budget: the oldest backlog exchanges go if it is over."""
        exchanges = snap.pop("exchanges")
        core = json.dumps(snap, default=str)
        with self.lock:
            room = self._room(c) - len(core) - 256
        lines: list[str] = []  # the newest that fit, newest first
        for e in reversed(exchanges):
            line = json.dumps(e, default=str)
            room -= len(line) + 2
            if room < 0:
                break
            lines.append(line)
        cut = len(exchanges) - len(lines)
        lines.reverse()
        tail = f', "exchanges": [{", ".join(lines)}]'
        if cut:
            tail += f', "backlog_dropped": {cut}'
        return (core[:-1] + tail + "}\n").encode()

    def _drop(self, c: _Client) -> None:
        with self.lock:
            if c in self.clients:
                self.clients.remove(c)
                self.json_clients -= not c.binary
            c.queue.clear()
            c.queued_msgs = 0
            c.head = None
            self.total_queued -= c.queued
            c.queued = 0
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)
        c.sock.close()

    def open_clients(self) -> None:
        """Start accepting clients (see accept_clients): the hello then says what the source can do."""
        self._open.set()
        self._wake()

    def _loop(self) -> None:
        while not self._stop.is_set():
            timeout: float | None = None
            if not self._listening and self._open.is_set():
                self.sel.register(self.listener, selectors.EVENT_READ, None)
                self._listening = True
            if self._accept_paused_until is not None:
                timeout = self._accept_paused_until - time.monotonic()
                if timeout <= 0:
                    self._accept_paused_until = None
                    timeout = None
                    self.sel.register(self.listener, selectors.EVENT_READ, None)
            if self._ticking:
                timeout = FAN_OUT_EVERY if timeout is None else min(timeout, FAN_OUT_EVERY)
            if self._closing_by is not None:
                with self.lock:
                    waiting = bool(self._outbox) or any(c.has_output for c in self.clients)
                now = time.monotonic()
                if not waiting or now > self._closing_by or now - self._progress > CLOSE_STALL:
                    return  # closing: all went out, or the grace time ran out, or the rest go to no reader
                timeout = 0.05 if timeout is None else min(timeout, 0.05)
            try:
                events = self.sel.select(timeout)
            except OSError as e:
                if e.errno != errno.EINTR:
                    log.error("control hub: %s", e)
                    return
                continue
            for key, mask in events:
                if key.fileobj is self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    with self.lock:
                        self._nudged = False
                    if self._closing_by is None and not self._ticking:
                        # Let a batch gather: the cost per client is then paid once for many messages.
                        self._stop.wait(FAN_OUT_DELAY)
                elif key.fileobj is self.listener:
                    self._accept()
                else:
                    c = key.data
                    if mask & selectors.EVENT_READ and not self._read(c):
                        continue
                    if mask & selectors.EVENT_WRITE:
                        c.blocked = False
                        self._send(c)
            self._fan_out()

    def _read(self, c: _Client) -> bool:
        """Read and handle what the client sent; False when it is gone."""
        try:
            data = c.sock.recv(_RECV)
        except BlockingIOError:
            return True
        except OSError:
            self._drop(c)
            return False
        if not data:
            self._drop(c)
            return False
        if c.closing:
            return True
        c.inbuf += data
        while not c.closing:
            nl = c.inbuf.find(b"\n")
            if nl < 0:
                break
            line = bytes(c.inbuf[:nl])
            del c.inbuf[:nl + 1]
            self._command(c, line)
        if len(c.inbuf) > self.max_line:
            self._refuse(c, f"a line longer than {self.max_line} bytes: disconnecting")
        if c.has_output and not c.blocked:
            self._send(c)
        else:
            self._update_interest(c)
        return c.sock.fileno() >= 0

    def _command(self, c: _Client, line: bytes) -> None:
        if len(line) > self.max_line:
            self._refuse(c, f"a line longer than {self.max_line} bytes: disconnecting")
            return
        if not line.strip() or c.closing:
            return
        try:
            obj = json.loads(line, parse_constant=_not_json)
        except ValueError as e:
            self._reply(c, {"type": "error", "error": f"not JSON: {e}"})
            return
        if not isinstance(obj, dict):
            self._reply(c, {"type": "error", "error": "a command is a JSON object"})
            return
        if obj.get("cmd") == "stream":
            self._stream(c, obj)
            return
        handler = self.command_handler
        if handler is None:
            if "id" in obj:
                self._reply(c, {"type": "reply", "id": obj["id"], "ok": False,
                                "error": f"this {self.source} takes no commands"})
            return
        try:
            reply = handler(c.id, obj)
        except Exception as e:  # a handler bug must not end the hub: the client hears about it
            log.error("control command %.200r: %s: %s", obj, type(e).__name__, e)
            reply = {"type": "reply", "id": obj.get("id"), "ok": False, "error": f"internal error: {e}"}
        if reply is not None:
            self._reply(c, reply)

    def _reply(self, c: _Client, obj: dict[str, Any]) -> None:
        with self.lock:
            self._enqueue(c, c.encode(obj), force=True)  # replies are never dropped: reading pauses instead

    def _refuse(self, c: _Client, why: str) -> None:
        c.inbuf.clear()
        self._reply(c, {"type": "error", "error": why})
        c.closing = True

    def _update_interest(self, c: _Client) -> None:
        """Read a client only while its queue has room (its replies are backpressure); write when blocked."""
        with self.lock:
            reading = not c.closing and self._room(c) > 0
        events = (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if c.blocked else 0)
        if c.closing and not c.blocked:
            events |= selectors.EVENT_WRITE
        if not events:  # keep hearing about a hang-up
            events = selectors.EVENT_WRITE
        with contextlib.suppress(KeyError, ValueError):
            if self.sel.get_key(c.sock).events != events:
                self.sel.modify(c.sock, events, c)

    def _send(self, c: _Client) -> None:
        if c.sock.fileno() < 0:
            return
        while True:
            if c.head is None:
                with self.lock:
                    if c.missed > c.reported_missed:
                        data = c.encode({"type": "overflow", "missed": c.missed})
                        c.reported_missed = c.missed
                        c.queued += len(data)
                        self.total_queued += len(data)
                    elif c.queue:
                        batch: list[bytes] = []
                        size = 0
                        while c.queue and len(batch) < _BATCH and size < _RECV:
                            b, count = c.queue.popleft()
                            batch.append(b)
                            size += len(b)
                            c.queued_msgs -= count
                            c.sent += count
                        data = batch[0] if len(batch) == 1 else b"".join(batch)
                    else:
                        break
                c.head = memoryview(data)
            try:
                n = c.sock.send(c.head)
            except BlockingIOError:
                c.blocked = True
                break
            except OSError:
                self._drop(c)
                return
            self._progress = time.monotonic()
            with self.lock:
                c.queued -= n
                self.total_queued -= n
            if n < len(c.head):
                c.head = c.head[n:]  # a view: the rest is not copied
                c.blocked = True
                break
            c.head = None
        if c.closing and not c.has_output:
            self._drop(c)
            return
        self._update_interest(c)

    def client_stats(self) -> list[dict[str, int]]:
        with self.lock:
            return [{"queued": c.queued_msgs + (c.head is not None), "queued_bytes": c.queued, "missed": c.missed,
                     "sent": c.sent} for c in self.clients]

    def close(self, flush_timeout: float = 3.0) -> None:
        """Send what is still queued (the end of the run matters most), then disconnect everyone.

        Clients that read get up to `flush_timeout`; one that does not read holds the exit CLOSE_STALL.
        Closing again does nothing.
        """
        if self._stop.is_set():
            return
        self._progress = time.monotonic()
        self._closing_by = self._progress + flush_timeout
        self._wake()
        self.thread.join(flush_timeout + 1)
        self._stop.set()
        self._wake()
        self.thread.join(1)
        for c in list(self.clients):
            self._drop(c)
        self.sel.close()
        registry.unregister(self._registered, self.path)
        release_socket_path(self.path, self.listener)
        os.close(self._wake_r)
        os.close(self._wake_w)


def _cut_raw(obj: dict[str, Any]) -> None:
    """Cut the raw hex an exchange line carries to LIVE_SNAPLEN bytes."""
    for k in ("request_raw", "reply_raw"):
        h = obj.get(k)
        if h is not None and len(h) > 2 * LIVE_SNAPLEN:
            obj[k] = h[:2 * LIVE_SNAPLEN]
            obj["snapped"] = True


def _exchange_obj(ex: Exchange) -> dict[str, Any]:
    """A finished exchange's message (its raw bytes cut at LIVE_SNAPLEN)."""
    obj = {"type": "exchange", **exchange_json(ex, raw=True)}
    _cut_raw(obj)
    return obj


def _update(obj: dict[str, Any]) -> dict[str, Any]:
    """A request message for a binary client that has its packet block: its state, without the bytes (but the
    reply a breakpoint holds, which no block carries)."""
    update = {k: v for k, v in obj.items() if k != "request_raw"}
    if obj.get("held") != "reply":
        update.pop("reply_raw", None)
    return update


def _not_json(name: str) -> Any:
    """Python's json reads NaN and Infinity; RFC 8259 has neither, and echoing one back (an id) would make
    the reply unreadable to strict clients (jq, JSON.parse)."""
    raise ValueError(f"{name} is not a JSON value (RFC 8259 has no NaN or Infinity)")


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, default=str) + "\n").encode()


def _encoded(seqs: list[int], data: list[bytes]) -> _Form:
    """Messages (their seqs, their bytes) as: their seqs, the messages, all of them joined, and the bytes up
    to each one's end (to cut a batch at a budget)."""
    return seqs, data, b"".join(data), list(itertools.accumulate(map(len, data)))
