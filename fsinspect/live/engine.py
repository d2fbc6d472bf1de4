"""The daemon engine as a live source: its tap and hold point into a Pipeline of addons.

The engine (daemon/server.py) calls `tap(direction, queue, unique, ts_ns, raw)` from its reader and pool
threads, over vhost-user and /dev/fuse alike, and its hold point calls `on_held`; the daemon package
imports nothing from fsinspect, so the adapter lives here.  The engine has no descriptor head: records
carry none, the analysis pairs by unique, and a held exchange is named by (queue, unique).

Assembled as the proxy's session is: recorder (--record), then with --control the analysis, summary and
hub, then the debugger (add_debugger).  Like the proxy's capture, the analysis sees the first
LIVE_SNAPLEN bytes of each message (1 MiB WRITEs are neither decoded nor kept whole for the clients);
the recording gets them whole (its own snap length applies).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ..analysis.analyzer import DEFAULT_STUCK_NS
from ..analysis.render import snapshot_json
from ..errors import UserError
from ..recording import format as fmt
from ..recording.writer import RecordingWriter
from .addons import Analysis, Publisher, Recorder, Summary, ticker
from .hub import LIVE_SNAPLEN, Hub
from .pipeline import Pipeline

STUCK_CHECK_S = 0.1  # how often pending requests are checked against the stuck threshold
FLUSH_EVERY_S = 0.2  # the recording reaches the file this often even when traffic stops (kill -9 safe)

# The engine's tap directions with a debugger verdict (daemon/hold.py) -> (record flags, note).
_VERDICTS = {
    "request:held": (fmt.RF_HELD, "held by the debugger"),
    "reply:held": (fmt.RF_HELD, "held by the debugger: the guest has not seen it"),
    "reply:answered": (fmt.RF_INJECTED | fmt.RF_PROXY_REPLY,
                       "answered by the debugger: the back-end never saw the request"),
    "reply:rewritten": (fmt.RF_REWRITTEN, "rewritten by the debugger; the back-end replied "),
    "reply:safety": (fmt.RF_PROXY_REPLY, "EIO from fsinspect: the daemon stopped while the request was held"),
}


class EngineSource:
    """tap(direction, queue, unique, ts_ns, raw) -> the pipeline; thread-safe (pool threads send replies)."""

    def __init__(self, *, control: str | None = None, stuck_ns: int | None = None,
                 writer: RecordingWriter | None = None, capture_source: str = "virtio",
                 accept_clients: bool = True) -> None:
        self.pipeline = Pipeline()
        self.lock = self.pipeline.lock
        self.hub: Hub | None = None
        self.analysis: Analysis | None = None
        self.counts: Summary | None = None
        self._held_replies: dict[tuple[int, int], bytes] = {}  # held replies' headers, for the rewritten note
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if writer is not None:
            self.pipeline.add(Recorder(writer, flush_every=FLUSH_EVERY_S, lock=self.lock))
        if control:
            self.analysis = Analysis(keep_raw=True, snaplen=LIVE_SNAPLEN,
                                     stuck_ns=DEFAULT_STUCK_NS if stuck_ns is None else stuck_ns)
            try:
                self.hub = Hub(control, self.snapshot, feed_lock=self.lock, source="daemon",
                               capture_source=capture_source,  # the binary stream's interface: virtio | fusedev
                               accept_clients=accept_clients)
            except OSError as e:
                self.pipeline.emit("close")
                raise UserError(e.strerror or str(e)) from None
            self.counts = Summary(self.analysis, self.hub)
            self.pipeline.add(self.analysis)
            self.pipeline.add(self.counts)
            self.pipeline.add(Publisher(self.hub, self.analysis, flush_timeout=2.0))
            self._ticker = ticker(self.pipeline, STUCK_CHECK_S, self._stop)

    @property
    def tap(self) -> EngineSource | None:
        """What to give the engine as its tap: None when no addon wants captures (the engine then pays
        nothing per request)."""
        return self if self.analysis is not None or self.pipeline.find(Recorder) is not None else None

    def __call__(self, direction: str, queue: int, unique: int, ts_ns: int, raw: bytes) -> None:
        p = self.pipeline
        if direction == "request":
            with self.lock:
                p.request(raw, queue, None, ts_ns, len(raw), (), [], 0)
            return
        if direction == "reply":
            with self.lock:
                if self._held_replies:
                    self._held_replies.pop((queue, unique), None)
                p.reply(raw, queue, None, ts_ns, len(raw), (), [], 0)
            return
        flags, note = _VERDICTS.get(direction, (0, ""))
        with self.lock:
            if direction == "reply:held":
                self._held_replies[(queue, unique)] = raw[:16]
            elif direction == "reply:rewritten":
                orig = self._held_replies.pop((queue, unique), None)
                note += fmt.out_header_note(orig) if orig else "(not captured)"
            notes = [note] if note else []
            if direction.startswith("request"):
                p.request(raw, queue, None, ts_ns, len(raw), (), notes, flags)
            else:
                p.reply(raw, queue, None, ts_ns, len(raw), (), notes, flags)

    # -- the debugger ----------------------------------------------------------------------------
    def exchange_of(self, queue: int, unique: int, direction: int) -> Any:
        """The analyzer's exchange for a capture the engine just held (Intercept.exchange_of)."""
        if self.analysis is None:
            return None
        with self.lock:
            return self.analysis.exchange_of(queue, unique, direction)

    def on_debugger(self, ev: dict[str, Any]) -> None:
        """Intercept events: a verdict moves the analyzer's exchange on (the hub publishes the event)."""
        if ev.get("type") == "resumed" and self.analysis is not None:
            with self.lock:
                an = self.analysis.analyzer
                if ev.get("auto") and ev["how"] == "released":  # the prefilter held it, no rule wanted it
                    an.set_held(ev["n"], None)
                else:
                    an.resume(ev["n"], ev["how"])

    # -- what clients and the summary read -------------------------------------------------------
    @property
    def analyzer(self) -> Any:
        return self.analysis.analyzer if self.analysis is not None else None

    @property
    def requests(self) -> int:
        return self.counts.requests if self.counts is not None else 0

    def snapshot(self) -> dict[str, Any]:
        """What a newly attached client gets first (called with self.lock held)."""
        assert self.analysis is not None
        return snapshot_json(self.analysis.analyzer, time.time_ns(), time.monotonic_ns())

    def summary(self) -> dict[str, Any]:
        """The exchanges' part of the end-of-run summary, shaped as the proxy's ({} without --control)."""
        if self.counts is None:
            return {}
        with self.lock:
            return self.counts.summary()

    def close(self, reason: str = "front-end closed") -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self.lock:
            self.pipeline.emit("done", reason)
        self.pipeline.emit("close")
