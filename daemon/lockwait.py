"""Blocking lock waits (SETLKW: fcntl F_SETLKW and flock) on their own bounded threads, and FUSE_INTERRUPT.

A lock wait can last forever, and any user can start one: on the engine's pool, eight waiters took every
thread and an unrelated root `dd` waited 17-47 s.  So waits run on threads of their own, at most `limit`
at once, and at most a quarter of them for one non-root uid (so one user can't take the others' locks
either); past that a SETLKW is refused with ENOLCK ("no locks available"), which fcntl(2) and flock(2)
callers already handle.  The Rust virtiofsd refuses every blocking lock; this keeps them working.

FUSE_INTERRUPT (the waiter got a signal, or was killed) ends the wait: the waiting thread is signalled
(SIGURG, with a no-op handler, so the blocking fcntl/flock returns EINTR) and the request is answered
EINTR; the kernel then restarts or fails the caller's call as the signal asks.  When the session ends,
the waits still running are answered ENOLCK.  A spurious EINTR (any
other signal) just waits again: answering EINTR without an INTERRUPT would surface as ERESTARTSYS.
"""

from __future__ import annotations

import errno
import logging
import signal
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger("fsinspect.daemon.locks")

KICK = signal.SIGURG  # default action: ignore, so a stray one is harmless
KICK_EVERY = 0.02  # re-signal until the waiter notices (a signal landing just before the syscall is lost)
EARLY_MAX = 1024  # INTERRUPTs remembered for requests not registered yet (several reader threads)
T = TypeVar("T")

_tls = threading.local()
_handler_lock = threading.Lock()
_handler_installed = False


def _install_handler() -> bool:
    """A Python-level handler (no SA_RESTART) makes blocking fcntl/flock return EINTR on KICK.  Only the
    main thread may install it; without it waits still work but can't be interrupted."""
    global _handler_installed
    with _handler_lock:
        if not _handler_installed:
            try:
                if signal.getsignal(KICK) in (signal.SIG_DFL, signal.SIG_IGN, None):
                    signal.signal(KICK, lambda _s, _f: None)
                _handler_installed = True
            except ValueError:  # not the main thread
                return False
        return True


class _Wait:
    __slots__ = ("cancelled", "done", "thread", "uid")

    def __init__(self, uid: int) -> None:
        self.uid = uid
        self.thread: int | None = None
        self.cancelled = 0  # the errno that ends the wait
        self.done = False


class LockWaiters:
    """Runs SETLKW requests on at most `limit` threads; `interrupt(unique)` ends one."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = max(1, limit)
        self.per_uid = max(1, self.limit // 4)
        self._by_uid: Counter[int] = Counter()
        self.interruptible = _install_handler()
        self._pool = ThreadPoolExecutor(max_workers=self.limit, thread_name_prefix="fuse-lockwait")
        self._lock = threading.Lock()
        self._waits: dict[int, _Wait] = {}
        self._early: OrderedDict[int, None] = OrderedDict()
        self.refused = 0
        self.interrupted = 0

    def submit(self, unique: int, uid: int, serve: Callable[[], None], refuse: Callable[[int], None]) -> None:
        """Serve `unique` (a request from `uid`) on a waiter thread, or call refuse(errno) now (all busy,
        this uid's share busy, interrupted already, or shutting down)."""
        with self._lock:
            if unique in self._early:
                del self._early[unique]
                err = errno.EINTR
            elif len(self._waits) >= self.limit or (uid != 0 and self._by_uid[uid] >= self.per_uid):
                err = errno.ENOLCK
                self.refused += 1
            else:
                err = 0
                w = self._waits[unique] = _Wait(uid)
                self._by_uid[uid] += 1
        if err:
            refuse(err)
            return
        try:
            self._pool.submit(self._run, unique, w, serve)
        except RuntimeError:  # shut down
            self._forget(unique, w)
            refuse(errno.ENOLCK)

    def _run(self, unique: int, w: _Wait, serve: Callable[[], None]) -> None:
        with self._lock:
            w.thread = threading.get_ident()
        _tls.wait = w
        try:
            serve()
        finally:
            _tls.wait = None
            self._forget(unique, w)

    def _forget(self, unique: int, w: _Wait) -> None:
        with self._lock:
            w.done = True
            if self._waits.pop(unique, None) is not None:
                self._by_uid[w.uid] -= 1
                if not self._by_uid[w.uid]:
                    del self._by_uid[w.uid]

    def interrupt(self, unique: int) -> None:
        """FUSE_INTERRUPT: end the wait of `unique` (an unknown unique is remembered for a moment, in case
        its request is still on its way through another reader thread)."""
        with self._lock:
            w = self._waits.get(unique)
            if w is None:
                self._early[unique] = None
                while len(self._early) > EARLY_MAX:
                    self._early.popitem(last=False)
                return
            w.cancelled = errno.EINTR
            self.interrupted += 1
        self._start_kick(w)

    def _start_kick(self, w: _Wait) -> None:
        if self.interruptible:
            threading.Thread(target=self._kick, args=(w,), name="fuse-lockkick", daemon=True).start()

    def _kick(self, w: _Wait) -> None:
        done = threading.Event()
        while True:
            with self._lock:
                if w.done:
                    return
                tid = w.thread
            if tid is not None:
                try:
                    signal.pthread_kill(tid, KICK)
                except (ProcessLookupError, OSError):
                    return
            done.wait(KICK_EVERY)

    def busy(self) -> int:
        with self._lock:
            return len(self._waits)

    def shutdown(self) -> None:
        """End every wait (the session is over) with ENOLCK, and join the threads.  Not EINTR: the caller
        has no signal pending, and the kernel would turn EINTR into ERESTARTSYS, which then leaks out."""
        with self._lock:
            waits = list(self._waits.values())
            for w in waits:
                w.cancelled = w.cancelled or errno.ENOLCK
        for w in waits:
            self._start_kick(w)
        self._pool.shutdown(wait=True, cancel_futures=True)


def interruptible(call: Callable[[], T]) -> T:
    """Run a blocking lock call that returns EINTR on a signal (a raw ctypes call: Python's own wrappers
    retry EINTR); give up with EINTR only when this wait was interrupted."""
    while True:
        w: _Wait | None = getattr(_tls, "wait", None)
        if w is not None and w.cancelled:
            raise OSError(w.cancelled, "interrupted" if w.cancelled == errno.EINTR else "the session is ending")
        try:
            return call()
        except InterruptedError:
            continue
