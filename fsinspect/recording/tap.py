"""Adapter from the daemon's tap hook to a RecordingWriter: `Server(fs, tap=RecordingTap(writer))`."""

from __future__ import annotations

import threading

from .writer import RecordingWriter


class RecordingTap:
    """tap(direction, queue, unique, ts_ns, raw) -> writer; thread-safe (pool threads send replies).

    The daemon's transports have no descriptor head to report (/dev/fuse) or report it elsewhere, so
    records carry no head and pairing falls back to (epoch, unique).
    """

    def __init__(self, writer: RecordingWriter) -> None:
        self.writer = writer
        self._lock = threading.Lock()

    def __call__(self, direction: str, queue: int, unique: int, ts_ns: int, raw: bytes) -> None:
        with self._lock:
            if direction == "request":
                self.writer.request(raw, queue, None, ts_ns)
            else:
                self.writer.reply(raw, queue, None, ts_ns)

    def close(self) -> None:
        with self._lock:
            self.writer.close()
