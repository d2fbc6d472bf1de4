"""One timer thread for every delay: a verdict due later never blocks the data path or a client.

A heap of (deadline, seq, callback) and one daemon thread that sleeps until the earliest deadline.
`close()` runs what is still due at once (a delayed request must not be left behind when the source
stops), then stops the thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("fsinspect.intercept")


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def call_later(self, seconds: float, fn: Callable[[], None]) -> int:
        """Run fn on the timer thread after `seconds`; returns a handle for cancel()."""
        with self._cond:
            if self._closed:
                raise RuntimeError("timers are closed")
            seq = next(self._seq)
            heapq.heappush(self._heap, (time.monotonic() + max(0.0, seconds), seq, fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fsinspect-delays", daemon=True)
                self._thread.start()
            self._cond.notify()
            return seq

    def cancel(self, handle: int) -> bool:
        """Forget a timer that has not fired; False if it already ran (or never existed)."""
        with self._cond:
            for i, (_, seq, _) in enumerate(self._heap):
                if seq == handle:
                    self._heap.pop(i)
                    heapq.heapify(self._heap)
                    return True
        return False

    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                if self._closed:
                    return
                _, _, fn = heapq.heappop(self._heap)
            self._fire(fn)

    @staticmethod
    def _fire(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # one failed verdict (the source went away) must not stop the others
            log.exception("a delayed verdict failed")

    def close(self) -> None:
        """Run everything still pending now, in deadline order, then stop the thread."""
        with self._cond:
            self._closed = True
            due = sorted(self._heap)
            self._heap.clear()
            self._cond.notify()
        for _, _, fn in due:
            self._fire(fn)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2)
