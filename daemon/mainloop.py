"""The daemon's main-thread loop, shared by standalone (/dev/fuse) and vhost-user mode."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Protocol


class Servable(Protocol):
    def serve(self) -> object: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


def serve_until_signal(target: Servable, thread_name: str, *, on_signal: Callable[[str], None],
                       ready: Callable[[], None] | None = None) -> None:
    """Serve on a thread until it ends or SIGINT/SIGTERM arrives; then stop, join and close.

    The main thread only waits, so a signal never lands in the middle of a reply.  `on_signal` gets
    the signal's name before anything is stopped.
    """
    wake = threading.Event()
    got: list[str] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        got.append(signal.Signals(signum).name)
        wake.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    serving = threading.Thread(target=target.serve, name=thread_name)
    try:
        serving.start()
        if ready is not None:
            ready()
        while serving.is_alive() and not wake.wait(0.2):
            pass
        if got:
            on_signal(got[0])
    finally:
        target.stop()
        serving.join(30)
        target.close()
        for s, h in old.items():
            signal.signal(s, h)
