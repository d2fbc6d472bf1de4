"""The control socket: any number of clients get a snapshot, then the live stream, as JSON lines.

Protocol (version 1), one JSON object per line, server to client:
  {"type": "hello", "version": 1, "source": "proxy", "tool": "fsinspect x.y"}
  {"type": "snapshot", "exchanges": [...last N...], "inodes": [...], "stats": {...}, "lints": [...],
   "submounts": [...], "syncfs": [...], "control": [...recent vhost-user messages...], "events": [...],
   "pending": [...every request still waiting, with "age_ms"...], "held": [...those a breakpoint holds...]}
  {"type": "request", ...exchange_json...}         a request as soon as it is captured ("state": "pending" or
                                                   "held", "age_ms"); sent again, same "n", when it changes
                                                   while open (held, resumed, linted "stuck")
  {"type": "exchange", ...exchange_json...}        every finished FUSE exchange (completes request "n")
  {"type": "control", "direction": "...", "summary": "..."}   every vhost-user message
  {"type": "event", "kind": "...", "detail": {...}}          control-plane events (backend-lost, ...)
  {"type": "overflow", "missed": N}                 this client fell behind and N messages were dropped
Clients send nothing (lines they send are ignored).  A slow or stuck client never blocks the proxy:
each has a bounded queue, and its overflow is counted and told to it once it drains.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import __version__

PROTOCOL_VERSION = 1
BACKLOG_EXCHANGES = 500
CLIENT_QUEUE = 4096


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.queue: collections.deque[bytes] = collections.deque()
        self.pending = b""
        self.missed = 0
        self.reported_missed = 0
        self.sent = 0


class Hub:
    """Publishes to every attached client; publish_* never block (called from the proxy's threads)."""

    def __init__(self, path: str, snapshot: Callable[[], dict[str, Any]], *, queue_len: int = CLIENT_QUEUE,
                 source: str = "proxy", feed_lock: Any = None) -> None:
        self.path = path
        self.snapshot_fn = snapshot
        # Held by whoever feeds publish_exchange: taking it while a client joins means no exchange falls
        # between its snapshot and its live stream.
        self.feed_lock = feed_lock if feed_lock is not None else threading.Lock()
        self.queue_len = queue_len
        self.source = source
        self.clients: list[_Client] = []
        self.lock = threading.Lock()
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=BACKLOG_EXCHANGES)
        self.recent_control: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)
        self.events: list[dict[str, Any]] = []
        self.total_overflow = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        if os.path.exists(path):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # the socket is created 0600: traffic may contain file names and data
        try:
            self.listener.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.listener.listen(16)
        self._stop = threading.Event()
        self._closing_by: float | None = None
        self.thread = threading.Thread(target=self._loop, name="fsinspect-hub", daemon=True)
        self.thread.start()

    # -- publishing (any thread) -------------------------------------------------------------------
    def _broadcast(self, obj: dict[str, Any]) -> None:
        if not self.clients:  # nobody to encode for (a joining client gets `recent` in its snapshot)
            return
        line = (json.dumps(obj, default=str) + "\n").encode()
        with self.lock:
            for c in self.clients:
                if len(c.queue) >= self.queue_len:
                    c.missed += 1
                    self.total_overflow += 1
                else:
                    c.queue.append(line)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def publish_exchange(self, ex: Any) -> None:
        from ..analysis.render import exchange_json

        obj = {"type": "exchange", **exchange_json(ex, raw=True)}
        self.recent.append(obj)
        self._broadcast(obj)

    def publish_request(self, ex: Any) -> None:
        """A request in flight (new, or changed while open); the snapshot lists the open ones instead."""
        from ..analysis.render import exchange_json

        if self.clients:
            self._broadcast({"type": "request", **exchange_json(ex, raw=True, now_ns=time.time_ns())})

    def publish_control(self, direction: str, summary: str) -> None:
        obj = {"type": "control", "direction": direction, "summary": summary}
        self.recent_control.append(obj)
        self._broadcast(obj)

    def publish_event(self, kind: str, detail: dict[str, Any]) -> None:
        obj = {"type": "event", "kind": kind, "detail": detail}
        self.events.append(obj)
        self._broadcast(obj)

    # -- the sender thread ------------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        c = _Client(sock)
        hello = {"type": "hello", "version": PROTOCOL_VERSION, "source": self.source, "tool": f"fsinspect {__version__}"}
        with self.feed_lock:
            snap = {"type": "snapshot", **self.snapshot_fn(), "exchanges": list(self.recent),
                    "control": list(self.recent_control), "events": list(self.events)}
            c.pending = (json.dumps(hello) + "\n" + json.dumps(snap, default=str) + "\n").encode()
            with self.lock:
                self.clients.append(c)

    def _drop(self, c: _Client) -> None:
        with self.lock:
            if c in self.clients:
                self.clients.remove(c)
        c.sock.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                clients = list(self.clients)
                if self._closing_by is not None and (time.monotonic() > self._closing_by or not any(
                        c.pending or c.queue or c.missed > c.reported_missed for c in clients)):
                    return  # closing: everything queued went out (or the grace time ran out)
            wants_write = [c.sock for c in clients if c.pending or c.queue or c.missed > c.reported_missed]
            readers: list[Any] = [self.listener, self._wake_r, *[c.sock for c in clients]]
            try:
                r, w, _ = select.select(readers, wants_write, [], 0.5)
            except (OSError, ValueError):
                continue
            if self._wake_r in r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            if self.listener in r:
                self._accept()
            for c in clients:
                if c.sock in r:
                    try:
                        if not c.sock.recv(4096):
                            self._drop(c)
                            continue
                    except BlockingIOError:
                        pass
                    except OSError:
                        self._drop(c)
                        continue
                if c.sock in w:
                    self._send(c)

    def _send(self, c: _Client) -> None:
        while True:
            if not c.pending:
                with self.lock:
                    if c.missed > c.reported_missed:
                        c.pending = (json.dumps({"type": "overflow", "missed": c.missed}) + "\n").encode()
                        c.reported_missed = c.missed
                    elif c.queue:
                        batch: list[bytes] = []
                        while c.queue and len(batch) < 256:
                            batch.append(c.queue.popleft())
                        c.pending = b"".join(batch)
                        c.sent += len(batch)
                    else:
                        return
            try:
                n = c.sock.send(c.pending)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.ECONNRESET):
                    self._drop(c)
                    return
                raise
            c.pending = c.pending[n:]
            if c.pending:
                return

    def client_stats(self) -> list[dict[str, int]]:
        with self.lock:
            return [{"queued": len(c.queue), "missed": c.missed, "sent": c.sent} for c in self.clients]

    def close(self, flush_timeout: float = 3.0) -> None:
        """Send what is still queued (the end of the run matters most), then disconnect everyone."""
        self._closing_by = time.monotonic() + flush_timeout
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self.thread.join(flush_timeout + 1)
        self._stop.set()
        self.thread.join(1)
        for c in list(self.clients):
            self._drop(c)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._wake_r)
        os.close(self._wake_w)
