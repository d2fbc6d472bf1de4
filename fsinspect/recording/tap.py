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
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._flusher, args=(flush_every,), daemon=True,
                                       name="recording-flush")
        self._timer.start()

    def __call__(self, direction: str, queue: int, unique: int, ts_ns: int, raw: bytes) -> None:
        flags = _DEBUGGER_FLAGS.get(direction, 0) if ":" in direction else 0
        with self._lock:
            if direction.startswith("request"):
                self.writer.request(raw, queue, None, ts_ns, flags=flags)
            else:
                self.writer.reply(raw, queue, None, ts_ns, flags=flags)

    def _flusher(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                self.writer.flush()

    def close(self) -> None:
        self._stop.set()
        self._timer.join()
        with self._lock:
            self.writer.close()
