"""Standalone mode: the engine and the passthrough filesystem over raw /dev/fuse on the host.

The kernel's plain FUSE client never offers FUSE_SUBMOUNTS nor sends FUSE_SYNCFS (those are virtio-fs
only), so in this mode those two features stay idle; everything else is the same code the vhost-user
transport uses.

With `Options.passthrough` (FUSE 7.40, Linux 6.9+) the files it opens are passed through: the kernel
reads and writes the host file itself (passthrough/backing.py); the mounted /dev/fuse registers the
backing files, and a debugger rule that can stop READ/WRITE keeps new opens out of it.

If the daemon is killed (SIGKILL), the mount stays behind as a dead FUSE mount ("Transport endpoint is
not connected"); remove it with `fusermount3 -u MOUNTPOINT` (or `umount -l MOUNTPOINT` as root).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import cast

from daemon.hold import EngineHoldPoint
from daemon.passthrough import Options, PassthroughFS
from daemon.passthrough.backing import BackingFiles
from daemon.sandbox import SandboxError
from daemon.sandbox import enter as enter_sandbox
from daemon.server import OP, Buffer, Server, Tap
from daemon.transport import uring
from daemon.transport.fusedev import (
    FUSECTL,
    FuseDev,
    FuseDevError,
    MountOptions,
    abort_connection,
    unmount,
)

from .mainloop import StopSignals, serve_until_signal

log = logging.getLogger("fsinspect.daemon.standalone")
# What a debugger rule must be able to stop for a file to be opened in passthrough: never these.
PASSTHROUGH_HIDES = frozenset((OP["READ"], OP["WRITE"]))
# How long a mount still busy after the (then lazy) unmount gets to let go before its connection is aborted.
ABORT_GRACE = 1.0


def _may_allow_other() -> bool:
    """Other users may use the mount when we are root, or when /etc/fuse.conf lets fusermount3 allow it."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def _reader(dev: FuseDev, server: Server, queue: int, after_reply: Callable[[], None] | None = None) -> None:
    """Serve requests until the unmount; a reply goes to the fd its request came from (`dev`).
    `after_reply` runs after each reply (the rings start once FUSE_INIT is answered)."""
    write = cast(Callable[[Sequence[Buffer]], None], dev.write)  # os.writev takes any buffers
    if after_reply is not None:
        dev_write = write

        def write(parts: Sequence[Buffer]) -> None:
            dev_write(parts)
            after_reply()
    handle = server.handle
    for request in dev.requests():
        handle(request, write, queue)


def check_outside(mountpoint: str, shared_dir: str) -> None:
    """Refuse a mountpoint inside the shared directory (through any path or bind mount): listing it
    would look the mount up through itself, and the daemon would wait on its own reply forever."""
    try:
        shared = os.stat(shared_dir)
    except OSError:
        return  # PassthroughFS reports it
    d = os.path.dirname(os.path.realpath(mountpoint))
    while True:
        try:
            if os.path.samestat(os.stat(d), shared):
                raise FuseDevError(errno.EINVAL, f"mountpoint {mountpoint} is inside --shared-dir {shared_dir}: "
                                                 "the daemon would serve its own mount (and hang); mount it "
                                                 "outside the shared directory")
        except FileNotFoundError:
            pass
        if d == "/":
            return
        d = os.path.dirname(d)


class Standalone:
    """A mounted session: `serve()` blocks until unmounted or stopped; `stop()` from any thread."""

    def __init__(self, mountpoint: str, opts: Options, *, readers: int = 1, clone_fd: bool = False,
                 pool_size: int = 8, dispatch: str = "inline+pool", tap: Tap | None = None,
                 hold: EngineHoldPoint | None = None, sandbox: str = "none", seccomp: str = "none",
                 use_uring: bool = False, pin: bool = True) -> None:
        check_outside(mountpoint, opts.shared_dir)
        self.sandbox = sandbox
        self.seccomp = seccomp
        self.error: OSError | None = None  # why serving stopped early (the sandbox could not be entered)
        self.fs = PassthroughFS(dataclasses.replace(opts, proc_groups=True))
        self.server = Server(self.fs, tap=tap, pool_size=pool_size, dispatch=dispatch, hold=hold)
        self.readers = max(1, readers)
        self.clone_fd = clone_fd
        self.clones: list[FuseDev] = []  # per-reader fds (FUSE_DEV_IOC_CLONE), opened before the sandbox
        try:
            self.dev = FuseDev.mount(mountpoint, MountOptions(fsname=opts.shared_dir, default_permissions=True,
                                                              allow_other=_may_allow_other()))
        except BaseException:
            self.fs.close()
            raise
        if opts.passthrough:
            allowed = None if hold is None else (lambda: not hold.may_hold(PASSTHROUGH_HIDES))
            self.fs.backing = BackingFiles(self.dev, raise_cap=sandbox != "none", allowed=allowed)
        self.mountpoint = self.dev.mountpoint
        # FUSE over io_uring: the rings exist before the sandbox; they serve once FUSE_INIT agreed.
        self.uring: uring.UringQueues | None = None
        if use_uring:
            try:
                self.uring = uring.UringQueues(self.dev.fd, self.server, first_queue=self.readers, pin=pin,
                                               on_failure=self._ring_failed)
            except BaseException:
                self.dev.unmount(lazy=True)
                self.fs.close()
                raise
        self._wake = threading.Event()
        self._readers_ended = threading.Event()
        self._close_lock = threading.Lock()
        self._closed = False
        log.info("serving %s at %s", opts.shared_dir, self.mountpoint)

    def serve(self) -> None:
        """Read and serve until the filesystem is unmounted; always unmounts and cleans up.

        The readers run under the sandbox, on a thread of their own: this one stays outside, where the
        mount point is, to unmount (the mount was made before the sandbox, so the host sees it).
        """
        confined = threading.Thread(target=self._read_confined, name="fuse-reader-0")
        try:
            confined.start()
            self._wake.wait()  # the readers ended, or a ring failed: unmount from out here
            if confined.is_alive():
                self.stop()
            confined.join()
        finally:
            self.close()

    def _read_confined(self) -> None:
        try:
            self._read_confined_until_unmounted()
        finally:
            self._readers_ended.set()
            self._wake.set()

    def _read_confined_until_unmounted(self) -> None:
        try:
            # /dev/fuse is out of reach in the sandbox: the clones are opened first.
            if self.clone_fd:
                self.clones = [self.dev.clone() for _ in range(1, self.readers)]
            enter_sandbox(self.sandbox, self.fs, self.seccomp, uring.SYSCALLS if self.uring is not None else ())
        except (SandboxError, FuseDevError) as e:
            self.error = e
            return
        self.server.start_pool()
        devs = self.clones or [self.dev] * (self.readers - 1)
        # Whichever reader gets FUSE_INIT starts the rings once it has answered it.
        after = None if self.uring is None else self.uring.start_if_agreed
        threads = [threading.Thread(target=_reader, args=(dev, self.server, q, after), daemon=True,
                                    name=f"fuse-reader-{q}") for q, dev in enumerate(devs, 1)]
        for t in threads:
            t.start()
        _reader(self.dev, self.server, 0, after)

    def _ring_failed(self, e: OSError) -> None:
        """A ring thread is confined (no unmount in there): the serve thread unmounts."""
        if self.error is None:
            self.error = e
        self._wake.set()

    def stop(self) -> None:
        """Unmount; the readers see ENODEV and return.

        A request held by the debugger keeps its caller in the mount, so the unmount goes lazy and the
        connection (and its readers) lives until that caller returns: it is let go at once (EIO), not
        after the main loop's 30 s join.  Whatever else keeps the mount busy (a working directory, an
        open file, a request the filesystem never finishes) gets ABORT_GRACE, then the connection is
        aborted, or the readers would wait in the kernel for ever."""
        lazy = False
        if self.dev.mounted:
            try:
                self.dev.mounted = False
                unmount(self.mountpoint, via_fusermount=self.dev.via_fusermount)
            except FuseDevError as e:
                log.warning("%s; detaching lazily", e)
                unmount(self.mountpoint, lazy=True, via_fusermount=self.dev.via_fusermount)
                lazy = True
        if self.server.hold is not None:
            self.server.hold.flush()
        if lazy and not self._readers_ended.wait(ABORT_GRACE):
            self._abort()

    def _abort(self) -> None:
        """End a connection that a lazy unmount left alive: its readers get ECONNABORTED and return."""
        conn = self.dev.conn
        try:
            if conn is None:
                raise FuseDevError(0, f"{self.mountpoint} was not in /proc/self/mountinfo after the mount")
            abort_connection(conn)
        except FuseDevError as e:
            log.warning("the mount is still busy and its FUSE connection could not be aborted (%s): the daemon "
                        "ends when what uses the mount lets go", e.strerror)
            return
        log.warning("the mount was still busy %.0f s after the unmount (a process has its working directory or a "
                    "file open in it, or waits for a reply): aborted the FUSE connection (%s/%d); what still uses "
                    "it gets ENOTCONN", ABORT_GRACE, FUSECTL, conn)

    def close(self) -> None:
        """Unmount and release everything (idempotent; the serve thread and a signal may both get here)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self.server.hold is not None:
            self.server.hold.flush()  # nothing held may outlive the mount
        self.stop()
        self.server.end_lock_waits()  # answered while the connection's fds are still open
        if self.uring is not None:
            self.uring.close()
        for dev in self.clones:
            dev.close()
        self.dev.close()
        self.server.shutdown()
        self.fs.close()


def run(mountpoint: str, opts: Options, *, readers: int = 1, clone_fd: bool = False, pool_size: int = 8,
        dispatch: str = "inline+pool", ready: Callable[[Standalone], None] | None = None, tap: Tap | None = None,
        hold: EngineHoldPoint | None = None, sandbox: str = "none", seccomp: str = "none",
        stops: StopSignals | None = None, use_uring: bool = False) -> int:
    """The `fsinspect daemon --standalone` main loop: unmounts cleanly on SIGINT/SIGTERM.

    The readers run on threads; the main thread only waits for a signal or the end of the session,
    so a signal never lands in the middle of a reply.
    """
    session = Standalone(mountpoint, opts, readers=readers, clone_fd=clone_fd, pool_size=pool_size,
                         dispatch=dispatch, tap=tap, hold=hold, sandbox=sandbox, seccomp=seccomp,
                         use_uring=use_uring)
    serve_until_signal(session, "fuse-serve",
                       on_signal=lambda sig: log.info("%s: unmounting %s", sig, session.mountpoint),
                       ready=None if ready is None else lambda: ready(session), stops=stops)
    if session.error is not None:
        raise session.error
    return 0
