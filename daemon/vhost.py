"""vhost-user mode: the engine and the passthrough filesystem served to a QEMU guest (virtiofsd's job).

The sibling of standalone.py.  It listens on --socket-path (or an inherited --fd), serves exactly one
QEMU connection, and returns when QEMU disconnects, as virtiofsd does.  READ is zero-copy: `preadv`
straight from the host file into the request's guest buffers (GuestPassthroughFS).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, cast

from daemon.hold import EngineHoldPoint
from daemon.passthrough import Options, PassthroughFS
from daemon.passthrough.fs import fast_twin
from daemon.sandbox import SandboxError
from daemon.sandbox import enter as enter_sandbox
from daemon.server import OUT_HEADER_SIZE, Buffer, Context, Server, Tap
from daemon.transport.vhost_user import DEFAULT_QUEUES, InPlace, VhostUserSession, accept_one, data_views

from .mainloop import StopSignals, serve_until_signal

log = logging.getLogger("fsinspect.daemon.vhost")


class GuestPassthroughFS(PassthroughFS):
    """PassthroughFS whose READ fills the guest's buffers directly (preadv), without a bytes copy.

    `chain_for(unique)` names the descriptor chain a request came in; None (e.g. a recording tap needs the
    bytes) falls back to the plain pread.
    """

    chain_for: Callable[[int], Any] | None = None
    in_place = InPlace  # what read() answers for bytes already in the chain's buffers (the C fast path too)

    # Submount points carry generation 0.  Linux 6.1 creates the inode of an automount point without setting
    # i_generation (fuse_iget's submount branch), so a revalidating LOOKUP that returns any other generation
    # looks stale: the dentry is invalidated and the submount mounted on it detached.  With cache=none every
    # path walk revalidates, so /mnt/sub lost its own st_dev; the C virtiofsd always answers generation 0.
    zero_submount_generation = True

    @fast_twin
    def read(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        lookup = self.chain_for
        chain = lookup(ctx.unique) if lookup is not None else None
        if chain is None:
            return super().read(ctx, nodeid, fh, offset, size)
        views = data_views(chain, OUT_HEADER_SIZE, size)
        with self._using(fh) as h:
            n = os.preadv(h.fd, views, offset) if views else 0
        return cast(bytes, InPlace(n))  # the engine only takes its len(); the sink knows it is in place


class VhostDaemon:
    """Listen, serve one front-end, clean up.  `stop()` from any thread (or a signal) ends it."""

    def __init__(self, listener: socket.socket, opts: Options, *, pool_size: int = 8,
                 dispatch: str = "inline+pool", tap: Tap | None = None, queues: int = DEFAULT_QUEUES,
                 socket_path: str | None = None, hold: EngineHoldPoint | None = None, sandbox: str = "none",
                 seccomp: str = "none") -> None:
        self.listener = listener
        self.sandbox = sandbox
        self.seccomp = seccomp
        self.error: OSError | None = None  # why serving stopped early (the sandbox could not be entered)
        self.socket_path = socket_path
        self.fs = GuestPassthroughFS(opts)
        self.server = Server(self.fs, tap=tap, pool_size=pool_size, dispatch=dispatch, hold=hold)
        self.queues = queues
        self.session: VhostUserSession | None = None
        self._stop = threading.Event()
        self._final: dict[str, Any] | None = None

    def serve(self) -> None:
        """Accept one connection and serve it until QEMU closes it; always releases everything."""
        try:
            conn = accept_one(self.listener, self._stop)
            self._close_listener()
            if conn is None:
                return
            try:
                # This thread starts every thread that serves the guest.
                enter_sandbox(self.sandbox, self.fs, self.seccomp)
            except SandboxError as e:
                self.error = e
                conn.close()
                return
            self.server.start_pool()
            log.info("front-end connected; serving %s", self.fs.opts.shared_dir)
            self.session = VhostUserSession(conn, self.server, queues=self.queues)
            if self.server.tap is None and self.server.hold is None:  # a held reply needs its bytes
                self.fs.chain_for = self.session.chains.get
            self.session.serve()
        finally:
            self.close()

    def stop(self) -> None:
        """End the session: before QEMU connected, stop waiting; after, shut the connection down."""
        self._stop.set()
        s = self.session
        if s is not None and not s.closed:
            try:
                s.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _close_listener(self) -> None:
        if self.socket_path is not None:
            from dissectors.transport.unixsock import release_socket_path

            release_socket_path(self.socket_path, self.listener)  # only if the path is still our socket
            self.socket_path = None
            return
        try:
            self.listener.close()
        except OSError:
            pass

    def close(self) -> None:
        if self._final is not None:
            return
        self._close_listener()
        if self.session is not None:
            self.session.close()
        self.server.shutdown()
        self._final = self.counters()
        self.fs.chain_for = None
        self.fs.close()

    def counters(self) -> dict[str, Any]:
        """The engine's counters (per opcode, syncfs per host st_dev) plus the transport's."""
        if self._final is not None:
            return self._final
        out = self.server.counters()
        if self.session is not None:
            out.update(self.session.counters())
        return out


def run(listener: socket.socket, opts: Options, *, pool_size: int = 8, dispatch: str = "inline+pool",
        tap: Tap | None = None, socket_path: str | None = None,
        ready: Callable[[VhostDaemon], None] | None = None, hold: EngineHoldPoint | None = None,
        sandbox: str = "none", seccomp: str = "none", stops: StopSignals | None = None) -> VhostDaemon:
    """The `fsinspect daemon --socket-path` main loop: returns when QEMU disconnects or on SIGINT/SIGTERM."""
    d = VhostDaemon(listener, opts, pool_size=pool_size, dispatch=dispatch, tap=tap, socket_path=socket_path,
                    hold=hold, sandbox=sandbox, seccomp=seccomp)
    serve_until_signal(d, "vhost-user-control", on_signal=lambda sig: log.info("%s: stopped", sig),
                       ready=None if ready is None else lambda: ready(d), stops=stops)
    if d.error is not None:
        raise d.error
    return d


__all__ = ["Buffer", "GuestPassthroughFS", "VhostDaemon", "run"]
