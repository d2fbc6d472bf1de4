"""The daemon engine as a live source: its tap -> an Analyzer -> the control-socket Hub.

The engine (daemon/server.py) calls `tap(direction, queue, unique, ts_ns, raw)` from its reader and pool
threads, over vhost-user and /dev/fuse alike; the daemon package imports nothing from fsinspect, so the
adapter lives here, on the fsinspect side.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from ..errors import UserError

STUCK_CHECK_S = 0.1  # how often pending requests are checked against the stuck threshold


class ControlTap:
    """The engine's tap -> an Analyzer -> the control-socket Hub: clients see the daemon's exchanges live.

    The engine's tap has no descriptor head, so the analyzer pairs requests and replies by unique.  A
    request shows as soon as the engine reads it; a thread checks ten times a second for `stuck` ones.
    Like the proxy's capture, it sees the first LIVE_SNAPLEN bytes of each message: 1 MiB WRITEs are
    neither decoded nor kept whole for the clients.
    """

    def __init__(self, path: str, stuck_threshold_ns: int | None = None, capture_source: str = "virtio") -> None:
        from ..analysis import Analyzer
        from ..analysis.analyzer import DEFAULT_STUCK_NS
        from .hub import LIVE_SNAPLEN, Hub

        self.snaplen = LIVE_SNAPLEN

        self.lock = threading.RLock()
        self.analyzer = Analyzer(keep_exchanges=False, keep_raw=True,
                                 stuck_ns=DEFAULT_STUCK_NS if stuck_threshold_ns is None else stuck_threshold_ns)
        self.requests = 0
        self.replies = 0
        self.opcount: Counter[str] = Counter()
        self.held_exchanges: dict[tuple[int, int], Any] = {}
        try:
            self.hub = Hub(path, self.snapshot, feed_lock=self.lock, source="daemon", capture_source=capture_source)
        except OSError as e:
            raise UserError(e.strerror or str(e)) from None
        self.analyzer.listeners.append(self.hub.publish_exchange)
        self.analyzer.pending_listeners.append(self.hub.publish_request)
        self._stop = threading.Event()
        self._checker = threading.Thread(target=self._check_stuck, name="fsinspect-stuck", daemon=True)
        self._checker.start()

    def _check_stuck(self) -> None:
        while not self._stop.wait(STUCK_CHECK_S):
            with self.lock:
                self.analyzer.check_stuck(time.time_ns(), time.monotonic_ns())

    def __call__(self, direction: str, queue: int, unique: int, ts_ns: int, raw: bytes) -> None:
        orig = len(raw)
        if orig > self.snaplen:
            raw = raw[:self.snaplen]
        held = direction.endswith(":held")
        with self.lock:
            if direction.startswith("request"):
                self.requests += 1
                mono = ts_ns + time.monotonic_ns() - time.time_ns()  # `stuck` ages it on CLOCK_MONOTONIC
                ex = self.analyzer.feed_request(raw, queue, None, ts_ns, orig_len=orig, held=held, mono_ns=mono)
                self.opcount[ex.opname] += 1
            else:
                if not held:  # a held reply is counted once, as the guest gets it (as the proxy does)
                    self.replies += 1
                ex = self.analyzer.feed_reply(raw, queue, None, ts_ns, orig_len=orig, held=held)
            if held:  # the debugger evaluates its rules on this very exchange, and names it by its n
                self.held_exchanges[(queue, unique)] = ex

    def exchange_of(self, queue: int, unique: int, direction: int) -> Any:
        """The analyzer's exchange for a capture the engine just held (Intercept.exchange_of)."""
        with self.lock:
            return self.held_exchanges.pop((queue, unique), None)

    def on_debugger(self, ev: dict[str, Any]) -> None:
        """Intercept events: a verdict moves the analyzer's exchange on (the hub publishes the event)."""
        if ev.get("type") == "resumed":
            with self.lock:
                if ev.get("auto") and ev["how"] == "released":  # the prefilter held it, no rule wanted it
                    self.analyzer.set_held(ev["n"], None)
                else:
                    self.analyzer.resume(ev["n"], ev["how"])

    def snapshot(self) -> dict[str, Any]:
        """What a newly attached client gets first (called with self.lock held)."""
        from ..analysis.render import snapshot_json

        return snapshot_json(self.analyzer, time.time_ns())

    def summary(self) -> dict[str, Any]:
        """The exchanges' part of the end-of-run summary, shaped as the proxy's."""
        from ..analysis.render import exchanges_summary

        with self.lock:
            return {**exchanges_summary(self.analyzer, self.requests, self.replies, dict(self.opcount.most_common())),
                    "control_clients": self.hub.client_stats(), "control_overflow": self.hub.total_overflow}

    def close(self, reason: str = "front-end closed") -> None:
        self._stop.set()
        self._checker.join()
        with self.lock:
            self.analyzer.finish()
        self.hub.publish_event("end", {"reason": reason})
        self.hub.close(flush_timeout=2.0)  # clients that read get the end; one that does not holds nobody


def _both(a: Any, b: Any) -> Any:
    def tap(direction: str, queue: int, unique: int, ts_ns: int, raw: bytes) -> None:
        a(direction, queue, unique, ts_ns, raw)
        b(direction, queue, unique, ts_ns, raw)
    return tap
