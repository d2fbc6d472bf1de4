"""The daemon's main-thread loop, shared by standalone (/dev/fuse) and vhost-user mode."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol


class Servable(Protocol):
    def serve(self) -> object: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


class StopSignals:
    """SIGINT/SIGTERM caught from the moment the daemon has something to clean up (its socket, its mount),
    not only once it serves: one that came in between killed it with the socket or the mount left behind.

    A context manager on the main thread; serve_until_signal acts on what it caught.
    """

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.got: list[str] = []
        self._old: dict[signal.Signals, Any] = {}

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        self.got.append(signal.Signals(signum).name)
        self.wake.set()

    def __enter__(self) -> StopSignals:
        self._old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *_exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def serve_until_signal(target: Servable, thread_name: str, *, on_signal: Callable[[str], None],
                       ready: Callable[[], None] | None = None, stops: StopSignals | None = None) -> None:
    """Serve on a thread until it ends or SIGINT/SIGTERM arrives; then stop, join and close.

    The main thread only waits, so a signal never lands in the middle of a reply.  `on_signal` gets
    the signal's name before anything is stopped.  `stops` catches signals from earlier on (a signal
    caught before serving ends it before it starts); without it they are caught from here.
    """
    if stops is None:
        with StopSignals() as own:
            serve_until_signal(target, thread_name, on_signal=on_signal, ready=ready, stops=own)
        return
    serving = threading.Thread(target=target.serve, name=thread_name)
    try:
        if not stops.got:
            serving.start()
            if ready is not None:
                ready()
            while serving.is_alive() and not stops.wake.wait(0.2):
                pass
        if stops.got:
            on_signal(stops.got[0])
    finally:
        target.stop()
        if serving.ident is not None:
            serving.join(30)
        target.close()
