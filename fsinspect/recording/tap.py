"""Adapter from the daemon's tap hook to a RecordingWriter: `Server(fs, tap=RecordingTap(writer))`."""

from __future__ import annotations

import threading

from . import format as fmt
from .writer import RecordingWriter

# The engine's tap directions with a debugger verdict (daemon/server.py Tap) -> record flags.
_DEBUGGER_FLAGS = {"request:held": fmt.RF_HELD, "reply:held": fmt.RF_HELD, "reply:answered": fmt.RF_INJECTED,
                   "reply:rewritten": fmt.RF_REWRITTEN}


class RecordingTap:
    """tap(direction, queue, unique, ts_ns, raw) -> writer; thread-safe (pool threads send replies).

    A timer thread flushes every `flush_every` seconds, so records reach the file (and survive a kill -9)
    even when traffic stops.  The daemon's /dev/fuse transport has no descriptor head, so records carry
    none and pairing falls back to (epoch, unique).
    """

    def __init__(self, writer: RecordingWriter, *, flush_every: float = 0.2) -> None:
        self.writer = writer
        self._held: dict[tuple[int, int], bytes] = {}  # held replies' headers, for the rewritten one's note
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._flusher, args=(flush_every,), daemon=True,
                                       name="recording-flush")
        self._timer.start()

    def __call__(self, direction: str, queue: int, unique: int, ts_ns: int, raw: bytes) -> None:
        if ":" not in direction:
            with self._lock:
                if direction == "request":
                    self.writer.request(raw, queue, None, ts_ns)
                else:
                    self.writer.reply(raw, queue, None, ts_ns)
                    self._held.pop((queue, unique), None)
            return
        # A debugger verdict.  A held reply is recorded once, as the guest gets it (as the proxy does).
        flags = _DEBUGGER_FLAGS.get(direction, 0)
        with self._lock:
            if direction == "request:held":
                self.writer.request(raw, queue, None, ts_ns, flags=flags, notes=["held by the debugger"])
            elif direction == "reply:held":
                self._held[(queue, unique)] = raw[:16]
            elif direction == "reply:safety":
                self.writer.reply(raw, queue, None, ts_ns, flags=fmt.RF_PROXY_REPLY,
                                  notes=["EIO from fsinspect: the daemon stopped while the request was held"])
            elif direction == "reply:answered":
                self.writer.reply(raw, queue, None, ts_ns, flags=flags | fmt.RF_PROXY_REPLY,
                                  notes=["answered by the debugger: the back-end never saw the request"])
            else:
                orig = self._held.pop((queue, unique), None)
                self.writer.reply(raw, queue, None, ts_ns, flags=flags, notes=[
                    "rewritten by the debugger; the back-end replied "
                    + (fmt.out_header_note(orig) if orig else "(not captured)")])

    def _flusher(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                self.writer.flush()

    def close(self) -> None:
        self._stop.set()
        self._timer.join()
        with self._lock:
            self.writer.close()
