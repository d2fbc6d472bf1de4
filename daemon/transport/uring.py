"""FUSE over io_uring for the standalone daemon (`--uring auto|on|off`; Linux 6.14+).

After FUSE_INIT has agreed on FUSE_OVER_IO_URING, each FUSE queue (one per possible CPU: the kernel
sends a request to the queue of the CPU its caller runs on) gets a ring of entries, served by a thread
pinned to that CPU, as libfuse does.  A request then costs one io_uring_enter(2) (commit the last reply
and wait for the next request) instead of a read(2) and a write(2) on /dev/fuse, and the daemon's
thread goes to sleep in the same system call that wakes the caller.  FORGET, INTERRUPT and everything
before the rings are ready still come through /dev/fuse, so its reader keeps running.

The kernel offers FUSE_OVER_IO_URING only when the fuse module's `enable_uring` parameter is on
(/sys/module/fuse/parameters/enable_uring, off by default).  `auto` uses the rings when it is on and
says how to turn it on otherwise; `on` turns it on itself when it may (root), and says so.

The ring mechanics are the C extension _uring (GIL released while waiting) or its pure-Python twin
uring_py (FSINSPECT_URING=python forces it); the engine's op table is the same either way.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from collections.abc import Callable
from typing import Any, Protocol

from daemon.server import INIT_FLAG, MAX_WRITE, OP, Server

from .fusedev import FuseDevError

log = logging.getLogger("fsinspect.daemon.uring")

ENABLE_PARAM = "/sys/module/fuse/parameters/enable_uring"
MODES = ("auto", "on", "off")
OVER_IO_URING = INIT_FLAG["OVER_IO_URING"]
DEPTH = 8  # entries per queue (libfuse's default); a held or slow request keeps one busy
SETLKW = OP["SETLKW"]
_opcode = struct.Struct("=I")  # fuse_in_header.opcode, at offset 4
# The kernel asks each entry's payload buffer for max(FUSE_MIN_READ_BUFFER, max_write, max_pages * 4 KiB).
PAYLOAD_SIZE = MAX_WRITE
SYSCALLS = ("io_uring_enter", "sched_setaffinity")  # what the ring threads add to the seccomp allowlist


class RingLike(Protocol):
    qid: int
    served: int
    depth: int

    def register(self) -> None: ...

    def grow(self) -> bool: ...

    def wait(self) -> tuple[bytes, Callable[[Any], object]] | None: ...

    def close(self) -> None: ...


def ring_class() -> tuple[type, str]:
    """The C Ring, or the twin when the extension is not built or FSINSPECT_URING=python asks for it."""
    if os.environ.get("FSINSPECT_URING") != "python":
        try:
            from . import _uring  # type: ignore[attr-defined]

            return _uring.Ring, "C"
        except ImportError as e:
            log.warning("the C io_uring ring is not built (%s): the slower Python twin runs (run scripts/setup)", e)
    from .uring_py import Ring

    return Ring, "Python"


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> list[int]:
    """The kernel makes one FUSE queue per possible CPU, and uses the rings only once all have entries."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def enabled(param: str = ENABLE_PARAM) -> bool | None:
    """The fuse module's enable_uring: True/False, None when this kernel has no FUSE over io_uring."""
    try:
        with open(param) as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return None


def decide(mode: str, param: str = ENABLE_PARAM) -> bool:
    """Whether to offer the rings, turning the parameter on for `on` when root; a clear error for `on`
    where it cannot be had, one info line for `auto`."""
    if mode == "off":
        return False
    state = enabled(param)
    if state is None:
        if mode == "on":
            raise FuseDevError(errno.EOPNOTSUPP, "--uring on: this kernel has no FUSE over io_uring (Linux 6.14+ "
                                                 "with CONFIG_FUSE_IO_URING=y): use --uring auto or off")
        return False
    if state:
        return True
    if mode == "auto":
        log.info("FUSE over io_uring is off in this kernel (%s is N): serving through /dev/fuse reads and writes; "
                 "'echo Y > %s' (root) or --uring on turns it on", param, param)
        return False
    if os.geteuid() != 0:
        raise FuseDevError(errno.EPERM, f"--uring on: {param} is N and only root may turn it on: run "
                                        f"'echo Y | sudo tee {param}', or use --uring auto")
    try:
        with open(param, "w") as f:
            f.write("Y")
    except OSError as e:
        raise FuseDevError(e.errno or errno.EPERM, f"--uring on: could not turn on {param}: {e.strerror}") from None
    log.warning("--uring on: turned on FUSE over io_uring for every FUSE mount of this host (%s = Y; "
                "'echo N > %s' turns it off again)", param, param)
    return True


class UringQueues:
    """The rings of one mount: made before the sandbox (io_uring_setup is not in its allowlist), started
    by the /dev/fuse reader once FUSE_INIT agreed on FUSE_OVER_IO_URING."""

    def __init__(self, dev_fd: int, server: Server, *, first_queue: int = 1, depth: int = DEPTH,
                 payload_size: int = PAYLOAD_SIZE, pin: bool = True, cpus: list[int] | None = None,
                 on_failure: Callable[[OSError], None] | None = None) -> None:
        cls, self.impl = ring_class()
        self.on_failure = on_failure
        self.server = server
        self.first_queue = first_queue
        self.pin = pin
        self.rings: list[RingLike] = []
        self.depth = depth
        # A lock wait keeps its entry until it ends; room for as many as the engine lets wait at once.
        spare = server.lock_waiter_limit
        try:
            for qid in cpus if cpus is not None else possible_cpus():
                self.rings.append(cls(dev_fd, qid, depth, payload_size, spare))
        except OSError as e:
            self.close()
            raise FuseDevError(e.errno or errno.EIO, f"FUSE over io_uring: {e.strerror or e} (io_uring may be "
                                                     "disabled: sysctl kernel.io_uring_disabled)") from None
        self.threads: list[threading.Thread] = []
        self.started = False
        self._lock = threading.Lock()
        self._lock_waits = [0] * len(self.rings)  # per ring: SETLKW requests holding an entry
        server.transport_flags |= OVER_IO_URING
        log.info("FUSE over io_uring: %d queue(s) of %d entries (%s rings)", len(self.rings), depth, self.impl)

    def start_if_agreed(self) -> None:
        """After a /dev/fuse reply: once FUSE_INIT agreed on the rings, register them and start serving."""
        if self.started or not self.server.negotiated.done:
            return
        with self._lock:
            if self.started:
                return
            self.started = True
        if not self.server.negotiated.has("OVER_IO_URING"):
            log.info("FUSE over io_uring not agreed at FUSE_INIT: serving through /dev/fuse")
            return
        for i, ring in enumerate(self.rings):
            ring.register()
            t = threading.Thread(target=self._serve, args=(i, ring), daemon=True, name=f"fuse-ring-{ring.qid}")
            self.threads.append(t)
            t.start()

    def _serve(self, i: int, ring: RingLike) -> None:
        """One queue's loop: the commit of each reply goes out with the wait for the next request."""
        if self.pin:
            try:
                os.sched_setaffinity(0, {ring.qid})
            except OSError as e:  # a CPU outside our cpuset: serve it from anywhere
                log.debug("queue %d: not pinned to its CPU: %s", ring.qid, e.strerror)
        handle = self.server.handle
        queue = self.first_queue + ring.qid
        wait = ring.wait
        try:
            while (item := wait()) is not None:
                buf, reply = item
                if _opcode.unpack_from(buf, 4)[0] == SETLKW:
                    reply = self._lock_wait(i, ring, reply)
                handle(buf, reply, queue)
        except OSError as e:
            # Once FUSE_INIT agreed on the rings the kernel holds every request until all queues have
            # entries: a queue that fails ends the session rather than leave the mount hanging.
            log.error("FUSE over io_uring queue %d failed: %s; unmounting (--uring off serves through /dev/fuse)",
                      ring.qid, e.strerror or e)
            if self.on_failure is not None:
                self.on_failure(e)

    def _lock_wait(self, i: int, ring: RingLike, reply: Callable[[Any], object]) -> Callable[[Any], object]:
        """A SETLKW keeps its entry until the lock is had (any time later): register one more whenever
        fewer than `depth` entries are left to everything else, or eight waiters on one CPU would park
        every other request of that CPU (a root dd waited behind them until a waiter was killed).  Returns
        the reply sink that gives the count back.  On the queue's own thread (only it submits)."""
        with self._lock:
            self._lock_waits[i] += 1
            short = ring.depth - self._lock_waits[i] < self.depth
        if short and not ring.grow():
            log.debug("queue %d: %d lock waits hold its entries, no spare entry left", ring.qid, self._lock_waits[i])
        done = False

        def answered(parts: Any) -> object:
            nonlocal done
            try:
                return reply(parts)
            finally:
                with self._lock:
                    if not done:
                        done = True
                        self._lock_waits[i] -= 1

        return answered

    def served(self) -> int:
        return sum(r.served for r in self.rings)

    def close(self) -> None:
        """End every queue (the threads return) and wait for them."""
        for ring in self.rings:
            ring.close()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
