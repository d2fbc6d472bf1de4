"""The proxy's one I/O module: sockets, fds, mappings, the native shadow paths and capture draining.

Threads:
- the control thread (run()) moves vhost-user messages and executes the control plane's commands;
  QEMU blocks on every reply it waits for, so this thread never waits on anything but the two sockets;
- one native thread per queue (dissectors.ring.ShadowPath) forwards kicks and calls without the GIL;
- the capture thread drains the capture buffer: decoding, pairing, recording and publishing happen
  there, off the guest's critical path.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import select
import shlex
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dissectors import fuse as F
from dissectors import ring
from dissectors import vhost_user as V
from dissectors.errors import DecodeError
from dissectors.spec import vhost_user as vspec
from dissectors.spec import virtio as vio
from dissectors.transport.unixsock import connect_when_listening
from dissectors.transport.wire import (
    Cancelled,
    FdRefused,
    PeerClosed,
    WireError,
    check_eventfd,
    check_region_fd,
    recv_message,
    sealed_memfd,
    send_message,
    shrink_sealed,
)

from .. import children
from . import control as C

log = logging.getLogger("fsinspect.proxy")

REGION_SIZE = 4 * 1024 * 1024
CAPTURE_BATCH = 256  # fewer captures than this per read: linger before the next read
CAPTURE_LINGER = 0.005  # seconds; the live view lags by at most this much more
CAPTURE_NICE = 10
BACKEND_STOP_GRACE = 0.5  # seconds a back-end we started gets to follow SIGTERM when we were stopped
EIO = 5
_EFD_NONBLOCK = 0o4000
_EFD_CLOEXEC = 0o2000000


@dataclass
class ProxyConfig:
    backend: str | None = None  # the real back-end's socket path
    backend_cmd: str | None = None  # spawn the back-end (it must create `backend`)
    lossless: bool = False
    snaplen: int = 0  # bytes of each chain to capture (0: whole chain)
    capture_bytes: int = 64 * 1024 * 1024
    backend_wait: float = 15.0
    spin_us: int = 0  # the native path busy-polls the rings this long after activity (0: sleeps in poll())


@dataclass
class QueueRuntime:
    setup: C.QueueSetup | None = None
    kick_fd: int | None = None  # QEMU's fds (ours to close)
    call_fd: int | None = None
    backend_kick: int = -1  # the proxy's own eventfds handed to the back-end; constant per queue
    backend_call: int = -1
    path: Any = None  # ring.ShadowPath
    local: Any = None  # ring.SplitQueue when the back-end is gone

    def ensure_backend_fds(self) -> None:
        """The eventfds the back-end gets for this queue: made once, kept for the connection's life."""
        if self.backend_kick < 0:
            self.backend_kick, self.backend_call = _eventfd(), _eventfd()


@dataclass
class ProxyStats:
    started_ns: int = field(default_factory=time.time_ns)
    vhost_messages: int = 0
    decode_errors: int = 0
    backend_lost_ns: int | None = None
    eio_answered: int = 0
    unsealed_regions: int = 0  # guest memory the front-end could shrink under us (SIGBUS): trusted
    end_reason: str = ""


CaptureSink = Callable[[Any], None]
MessageSink = Callable[[str, bytes, list[int], Any], None]


class Proxy:
    """One QEMU connection, one back-end."""

    def __init__(self, cfg: ProxyConfig, *, on_capture: CaptureSink | None = None,
                 on_vhost_message: MessageSink | None = None, on_event: Callable[[C.Event], None] | None = None,
                 on_idle: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.on_capture = on_capture
        self.on_idle = on_idle  # capture thread, after a read that found nothing: the guest is quiet
        self.on_vhost_message = on_vhost_message
        self.on_event = on_event
        self.stats = ProxyStats()
        self.queues: dict[int, QueueRuntime] = {}
        self.mem = ring.MemoryMap()
        self.capture = ring.CaptureBuffer(capacity=cfg.capture_bytes, policy="lossless" if cfg.lossless else "drop")
        self._maps: list[mmap.mmap] = []  # kept alive: memoryviews of them may still exist
        self._old_maps: list[mmap.mmap] = []
        self.region_fd = sealed_memfd("fsinspect-shadow-rings", REGION_SIZE)  # the back-end maps it: sized for good
        self.region_map = mmap.mmap(self.region_fd, REGION_SIZE)
        self.mem.add_region(C.PROXY_REGION_GPA, REGION_SIZE, self.region_map, uva=C.PROXY_REGION_UVA)
        self.cp = C.ControlPlane(self.region_fd, REGION_SIZE)
        self.frontend: socket.socket | None = None
        self.backend_sock: socket.socket | None = None
        self.backend_proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._shut = False
        self._stop_requested = False  # stop() was called (a signal): shutdown must be quick
        self._capture_thread: threading.Thread | None = None
        self._local_thread: threading.Thread | None = None
        # Kick-fd changes wake the EIO loop (back-end gone); an eventfd, so any number of them is one read.
        self._local_wake = _eventfd()
        self._retired_kicks: list[int] = []  # old kick fds the EIO loop closes (see _queue_fd)
        self._retired_lock = threading.Lock()
        # stop() (a signal handler too) makes this readable; every wait of the control thread watches it.
        self._stop_fd = _eventfd()
        self._passthrough_reply = False
        self._inflight: dict[int, set[int]] = {}
        self._inflight_lock = threading.Lock()
        self.hold_rules: tuple[ring.HoldRule, ...] = ()  # the debugger's native table, on every queue's path
        self._hold_lock = threading.Lock()  # hold_rules vs. paths being made

    # -- setup -----------------------------------------------------------------------------------
    def start_backend(self) -> None:
        """Run the back-end we own; it gets SIGTERM when the proxy dies, even by SIGKILL (no orphan virtiofsd).

        PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so this must be called from a
        thread that lives as long as the proxy: the CLI calls it from the main thread.
        """
        if self.cfg.backend_cmd:
            self.backend_proc = subprocess.Popen(shlex.split(self.cfg.backend_cmd), stdin=subprocess.DEVNULL,
                                                 preexec_fn=children.die_with_parent(os.getpid()))

    def connect_backend(self) -> socket.socket:
        """The back-end's socket, once it listens (within --backend-wait); Cancelled by stop(); else a
        ConnectError (an OSError) that says why in a sentence."""
        assert self.cfg.backend

        def gone() -> str | None:
            if self._stop.is_set():
                raise Cancelled("stopped while connecting to the back-end")
            if self.backend_proc is not None and self.backend_proc.poll() is not None:
                return f"the back-end command exited with {self.backend_proc.returncode}"
            return None

        return connect_when_listening(self.cfg.backend, self.cfg.backend_wait, gone=gone, wait=self._stop.wait)

    def accept_frontend(self, listener: socket.socket) -> socket.socket | None:
        """Wait for QEMU; None when stop() comes first (SIGTERM while nobody has connected)."""
        p = select.poll()
        p.register(listener, select.POLLIN)
        p.register(self._stop_fd, select.POLLIN)
        while not self._stop.is_set():
            if any(fd == listener.fileno() for fd, _ in p.poll()):
                conn, _ = listener.accept()
                conn.set_inheritable(False)
                return conn
        return None

    # -- main loop -------------------------------------------------------------------------------
    def serve(self, frontend: socket.socket, backend: socket.socket) -> str:
        """Run until QEMU disconnects (or stop()).  Returns why it ended."""
        self.frontend, self.backend_sock = frontend, backend
        self._capture_thread = threading.Thread(target=self._capture_loop, name="fsinspect-capture", daemon=True)
        self._capture_thread.start()
        reason = "stopped"
        try:
            while not self._stop.is_set():
                fds = [frontend.fileno(), self._stop_fd] + ([backend.fileno()] if self.cp.backend_alive else [])
                r, _, _ = select.select(fds, [], [], 0.5)
                if self.cp.backend_alive and backend.fileno() in r:
                    self._backend_readable()
                if frontend.fileno() in r:
                    try:
                        raw, mfds = recv_message(frontend, self._stop_fd)
                    except PeerClosed:
                        reason = "QEMU disconnected"
                        break
                    except WireError as e:
                        reason = f"garbage from QEMU: {e}"
                        break
                    self._frontend_message(raw, mfds)
        except C.ProtocolViolation as e:
            reason = f"protocol violation: {e}"
        except Cancelled:
            reason = "stopped"
        except _FrontendGone as e:
            reason = f"QEMU disconnected: {e}"
        finally:
            self.stats.end_reason = reason
            self.shutdown()
        return reason

    def stop(self) -> None:
        """End the run from any thread or a signal handler: every wait of the control thread wakes."""
        self._stop_requested = True
        self._stop.set()
        if self._stop_fd >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._stop_fd, 1)

    def _frontend_message(self, raw: bytes, fds: list[int]) -> None:
        self.stats.vhost_messages += 1
        try:
            msg = V.decode_message(raw, fds)
        except DecodeError as e:
            # Unknown to us: forward untouched (the back-end may know it) and flag it.
            self.stats.decode_errors += 1
            self._record_vhost("frontend", raw, fds, None, note=str(e))
            if self.cp.backend_alive and self.backend_sock is not None:
                try:
                    send_message(self.backend_sock, raw, fds)
                    self._passthrough_reply = True  # whatever the back-end answers goes back verbatim
                except OSError as e:
                    self._backend_gone(f"send failed: {e}")
            self._close_fds(fds)
            return
        self._record_vhost("frontend", raw, fds, msg)
        try:
            self._check_fds(msg)
        except FdRefused as e:
            self._close_fds(fds)
            raise C.ProtocolViolation(f"{msg.name} refused: {e}") from None
        try:
            cmds = self.cp.from_frontend(msg)
        except C.ProtocolViolation:
            self._close_fds(fds)
            raise
        self._execute(cmds, fds)

    @staticmethod
    def _check_fds(msg: V.VhostUserMessage) -> None:
        """The fds QEMU sends must be what the message says, before anything is mapped, polled or forwarded.

        A kick fd that is not an eventfd would spin the native path (poll says readable forever), a call or
        err fd that is not one would lose completions, and a region fd that cannot be mapped read-write
        over mmap_offset + size would fail in mmap or fault (SIGBUS) later.  A message with the REPLY flag
        has its reply's layout (a SET_MEM_TABLE's is a u64, not regions): the control plane refuses it.
        """
        if msg.is_reply:
            return
        if msg.name in ("SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR"):
            for fd in msg.fds:
                check_eventfd(fd, f"vring {msg.payload.u64 & vspec.VRING_IDX_MASK} {msg.name[9:].lower()} fd")
        elif msg.name == "SET_MEM_TABLE":
            for r, fd in zip(msg.payload, msg.fds, strict=False):
                if V.region_problem(r, []) is None:  # else the control plane names the region's own problem
                    check_region_fd(fd, r.mmap_offset + r.size, f"region gpa {r.guest_address:#x}")

    def _backend_readable(self) -> None:
        assert self.backend_sock is not None
        try:
            raw, fds = recv_message(self.backend_sock)
        except (PeerClosed, WireError) as e:
            self._backend_gone(str(e))
            return
        if self._passthrough_reply and self.frontend is not None:
            # The answer to a request we could not decode: forward it untouched, fds included.
            self._passthrough_reply = False
            self._record_vhost("backend", raw, fds, None, note="reply to an undecodable request (forwarded)")
            send_message(self.frontend, raw, fds)
            self._close_fds(fds)
            return
        self._close_fds(fds)
        self._record_vhost("backend", raw, [], None, note="unsolicited message from the back-end (dropped)")

    def _read_backend_reply(self) -> None:
        assert self.backend_sock is not None
        try:
            r, _, _ = select.select([self.backend_sock.fileno(), self._stop_fd], [], [], 30)
            if not r:
                raise PeerClosed("the back-end did not reply within 30 s")
            raw, fds = recv_message(self.backend_sock, self._stop_fd)
        except (PeerClosed, WireError, OSError) as e:
            self._backend_gone(str(e))
            return
        self._close_fds(fds)
        try:
            msg = V.decode_message(raw, [])
        except DecodeError as e:
            self._backend_gone(f"undecodable reply: {e}")
            return
        self._record_vhost("backend", raw, [], msg)
        self._execute(self.cp.from_backend(msg), [])

    def _backend_gone(self, why: str) -> None:
        if not self.cp.backend_alive:
            return
        log.warning("back-end lost: %s", why)
        self.stats.backend_lost_ns = time.time_ns()
        self._go_local()
        self._execute(self.cp.backend_lost(), [])

    # -- command execution ------------------------------------------------------------------------
    def _execute(self, cmds: list[C.Command], msg_fds: list[int]) -> None:
        keep: set[int] = set()
        try:
            for c in cmds:
                if isinstance(c, C.SendBackend):
                    self._send_backend(c, keep)
                elif isinstance(c, C.SendFrontend):
                    assert self.frontend is not None
                    msg = self._vring_base_consumed(c.msg)
                    raw = V.encode_message(msg)
                    self._record_vhost("proxy->frontend", raw, [], msg)
                    self._send_frontend(raw)
                elif isinstance(c, C.MapRegion):
                    self._map_region(c)
                elif isinstance(c, C.UnmapAll):
                    self._unmap_all()
                elif isinstance(c, C.QueueSetup):
                    self.queues.setdefault(c.index, QueueRuntime()).setup = c
                    self._init_shadow(c)
                elif isinstance(c, C.QueueFd):
                    self._queue_fd(c, keep)
                elif isinstance(c, C.QueueStart):
                    self._queue_start(c.index)
                elif isinstance(c, C.QueueStop):
                    self._queue_stop(c.index)
                elif isinstance(c, C.QueueDrain):
                    self._queue_drain(c.index)
                elif isinstance(c, C.ReplyVringBase):
                    self._reply_vring_base(c.index)
                elif isinstance(c, C.Event):
                    if self.on_event is not None:
                        self.on_event(c)
        finally:  # a command may raise ProtocolViolation half-way: the fds not taken are still ours to close
            self._close_fds([fd for fd in msg_fds if fd not in keep])

    def _send_frontend(self, raw: bytes) -> None:
        assert self.frontend is not None
        try:
            send_message(self.frontend, raw)
        except OSError as e:
            raise _FrontendGone(f"sending a reply failed: {e.strerror}") from None

    def _send_backend(self, c: C.SendBackend, keep: set[int]) -> None:
        assert self.backend_sock is not None
        msg = c.msg
        fds = list(msg.fds)
        if msg.name in ("SET_VRING_KICK", "SET_VRING_CALL") and not fds and not msg.nofd():
            q = self.queues.setdefault(msg.vring_index() or 0, QueueRuntime())
            q.ensure_backend_fds()
            fds = [q.backend_kick if msg.name == "SET_VRING_KICK" else q.backend_call]
        raw = V.encode_message(msg)
        self._record_vhost("proxy->backend", raw, fds, msg)
        try:
            send_message(self.backend_sock, raw, fds)
        except OSError as e:
            self._backend_gone(f"send failed: {e}")
            return
        if c.expect_reply:
            self._read_backend_reply()

    def _map_region(self, c: C.MapRegion) -> None:
        try:
            m = mmap.mmap(c.fd, c.size + c.mmap_offset, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            raise C.ProtocolViolation(f"region gpa {c.gpa:#x} size {c.size:#x} cannot be mapped: {e}") from None
        self._maps.append(m)
        try:
            self.mem.add_region(c.gpa, c.size, m, uva=c.uva, mmap_offset=c.mmap_offset)
        except (ring.RingError, ValueError) as e:
            raise C.ProtocolViolation(f"region gpa {c.gpa:#x} size {c.size:#x}: {e}") from None
        if not shrink_sealed(c.fd):
            # Trusted-front-end assumption (libvhost-user's): see README, "Malformed input".
            self.stats.unsealed_regions += 1

    def _unmap_all(self) -> None:
        for q in self.queues.values():
            if q.path is not None and q.path.running:
                raise C.ProtocolViolation("a new memory table while queues run")
        for gpa, _size, _uva in list(self.mem.regions):
            if gpa != C.PROXY_REGION_GPA:
                self.mem.remove_region(gpa)
        self._old_maps += self._maps
        self._maps = []

    def _init_shadow(self, c: C.QueueSetup) -> None:
        # The back-end reads used->idx at SET_VRING_ADDR: start the shadow rings from the guest's.
        self.region_map[c.shadow_used_off:c.shadow_used_off + C.AVAIL_OFF] = bytes(C.AVAIL_OFF)
        self.region_map[c.shadow_avail_off:c.shadow_avail_off + (C.QUEUE_SLOT - C.AVAIL_OFF)] = bytes(
            C.QUEUE_SLOT - C.AVAIL_OFF)
        used_gpa = self.mem.uva_to_gpa(c.used_uva)
        guest_used_idx = struct.unpack_from("<H", self.mem.view(used_gpa, 4), 2)[0]
        struct.pack_into("<H", self.region_map, c.shadow_used_off + 2, guest_used_idx)
        struct.pack_into("<H", self.region_map, c.shadow_avail_off + 2, c.base)

    def _queue_fd(self, c: C.QueueFd, keep: set[int]) -> None:
        q = self.queues.setdefault(c.index, QueueRuntime())
        if c.which == "err":
            return  # forwarded with the message itself
        old = q.kick_fd if c.which == "kick" else q.call_fd
        if c.which == "kick":
            q.kick_fd = c.fd
        else:
            q.call_fd = c.fd
        if c.fd is not None:
            keep.add(c.fd)
        if q.path is not None:
            (q.path.set_kick_fd if c.which == "kick" else q.path.set_call_fd)(-1 if c.fd is None else c.fd)
        if old is not None and old != c.fd:
            if c.which == "kick" and self._local_thread is not None:
                # The EIO loop may be reading it right now: it closes it itself, so the number is not
                # reused under its read (a blocking eventfd from QEMU would then hang that read).
                with self._retired_lock:
                    self._retired_kicks.append(old)
            else:
                os.close(old)
        if c.which == "kick" and self._local_thread is not None:
            os.eventfd_write(self._local_wake, 1)  # the EIO loop selects on the old kick fd: rebuild its set

    def _queue_start(self, index: int) -> None:
        q = self.queues[index]
        s = q.setup
        assert s is not None
        q.ensure_backend_fds()
        if not self.cp.backend_alive:
            return
        try:
            path = ring.ShadowPath(
                self.mem, index, s.num, self.mem.uva_to_gpa(s.desc_uva), self.mem.uva_to_gpa(s.avail_uva),
                self.mem.uva_to_gpa(s.used_uva), C.PROXY_REGION_GPA + s.shadow_avail_off,
                C.PROXY_REGION_GPA + s.shadow_used_off, self.capture,
                kick_fd=-1 if q.kick_fd is None else q.kick_fd, call_fd=-1 if q.call_fd is None else q.call_fd,
                backend_kick_fd=q.backend_kick, backend_call_fd=q.backend_call, avail_base=s.base,
                snaplen=self.cfg.snaplen, event_idx=self._event_idx, spin_us=self.cfg.spin_us)
        except ring.RingError as e:
            # The rings were inside the memory table at SET_VRING_ADDR; a later table moved it away.
            raise C.ProtocolViolation(f"vring {index} cannot start: its rings are not in the memory table ({e})") \
                from None
        with self._hold_lock:
            if self.hold_rules:
                path.set_hold_rules(self.hold_rules)
            q.path = path
        path.start()

    # -- hold points (the debugger) ------------------------------------------------------------
    def set_hold_rules(self, rules: Any) -> None:
        """Replace the native rule table on every queue, now and for queues started later (any thread)."""
        table = ring.check_hold_rules(rules)
        with self._hold_lock:
            self.hold_rules = table
            for q in list(self.queues.values()):
                if q.path is not None:
                    q.path.set_hold_rules(table)

    def path_of(self, queue: int, head: int) -> Any:
        """The shadow path holding (queue, head), for a verdict; RingError "not_held" if there is none."""
        q = self.queues.get(queue)
        if q is None or q.path is None or not self.cp.backend_alive:
            raise ring.RingError("not_held", head)
        return q.path

    def _queue_stop(self, index: int) -> None:
        q = self.queues.get(index)
        if q is None or q.path is None:
            return
        q.path.stop()
        q.path.drain()  # what already completed goes to the guest now; the rest after the back-end stops

    def _queue_drain(self, index: int) -> None:
        q = self.queues.get(index)
        if q is not None and q.path is not None:
            q.path.drain()

    def _vring_base_consumed(self, msg: Any) -> Any:
        """GET_VRING_BASE reply: the back-end counts the shadow entries it took, but the guest's ring also
        lost the requests the path consumed without forwarding (held, then answered or still queued):
        report the guest's index less what the back-end left untaken."""
        if msg.name != "GET_VRING_BASE" or not msg.is_reply:
            return msg
        q = self.queues.get(msg.payload.index)
        if q is None or q.path is None:
            return msg
        idx = q.path.indices
        untaken = (idx["shadow_avail_idx"] - msg.payload.num) & 0xFFFF
        base = (idx["next_avail"] - untaken) & 0xFFFF
        if base == msg.payload.num:
            return msg
        return V.build("GET_VRING_BASE", V.make("vhost_vring_state", index=msg.payload.index, num=base), reply=True)

    def _reply_vring_base(self, index: int) -> None:
        q = self.queues.get(index)
        base = 0
        if q is not None:
            if q.local is not None:
                base = q.local.last_avail_idx
            elif q.path is not None:
                base = q.path.indices["next_avail"]
        assert self.frontend is not None
        msg = V.build("GET_VRING_BASE", V.make("vhost_vring_state", index=index, num=base), reply=True)
        self._send_frontend(V.encode_message(msg))

    # -- the back-end is gone: answer the guest ourselves -------------------------------------------
    def _go_local(self) -> None:
        """Stop every shadow path, fail what the back-end held, and serve new requests with EIO."""
        for q in self.queues.values():
            if q.path is not None:
                q.path.stop()
                q.path.drain()
        with self._inflight_lock:
            for cap in self.capture.read_captures(max=1 << 20, timeout=0):
                self._capture_one(cap)
        for index, q in self.queues.items():
            if q.path is None or q.setup is None:
                continue
            s = q.setup
            idx = q.path.indices
            try:
                q.local = ring.SplitQueue(self.mem, s.num, self.mem.uva_to_gpa(s.desc_uva),
                                          self.mem.uva_to_gpa(s.avail_uva), self.mem.uva_to_gpa(s.used_uva))
            except ring.RingError:
                continue  # a stopped queue whose rings a later memory table dropped: nothing to serve there
            q.local.last_avail_idx = idx["next_avail"]
            q.local.used_idx = idx["guest_used_idx"]
            self._ask_for_kicks(q)
            self._fail_inflight(index, q, sorted(self._inflight.get(index, set())))
        self._local_thread = threading.Thread(target=self._local_loop, name="fsinspect-eio", daemon=True)
        self._local_thread.start()

    def _fail_inflight(self, index: int, q: QueueRuntime, heads: list[int]) -> None:
        """Complete chains the dead back-end held with an EIO reply (hiprio FORGETs: used.len 0).

        The heads are listed in the (now unused) shadow avail ring so that a SplitQueue walks their
        chains, with the same bounds checks as any other chain.
        """
        if not heads:
            return
        assert q.setup is not None and q.local is not None
        s = q.setup
        struct.pack_into("<HH", self.region_map, s.shadow_avail_off, 0, len(heads))
        for i, h in enumerate(heads):
            struct.pack_into("<H", self.region_map, s.shadow_avail_off + 4 + 2 * i, h)
        walker = ring.SplitQueue(self.mem, s.num, self.mem.uva_to_gpa(s.desc_uva),
                                 C.PROXY_REGION_GPA + s.shadow_avail_off, C.PROXY_REGION_GPA + s.shadow_used_off)
        walker.last_avail_idx = 0
        try:
            chains = walker.pop_chains(len(heads))
        except ring.RingError as e:
            chains = e.chains
        q.local.push_used([(ch.head, self._answer_eio(index, ch)) for ch in chains])
        self._inflight[index] = set()
        self._signal(q)

    def _answer_eio(self, index: int, ch: Any) -> int:
        """Write an EIO fuse_out_header into the chain's writable part; returns used.len."""
        if index == vio.FS_HIPRIO_QUEUE:
            return 0
        unique = struct.unpack_from("<Q", ch.readable, 8)[0] if len(ch.readable) >= 16 else 0
        reply = F.encode_reply("GETATTR", unique=unique, error=EIO)
        self.stats.eio_answered += 1
        if self.on_capture is not None:
            self.on_capture(("local-reply", index, ch.head, time.time_ns(), reply))
        return int(ch.write(reply))

    def _local_loop(self) -> None:
        """Kicks after the back-end died: pop new requests and answer them with EIO."""
        while not self._stop.is_set():
            with self._retired_lock:
                retired, self._retired_kicks = self._retired_kicks, []
            self._close_fds(retired)
            fds = [self._local_wake] + [q.kick_fd for q in self.queues.values() if q.kick_fd is not None]
            try:
                r, _, _ = select.select(fds, [], [], 0.2)
            except (OSError, ValueError):
                continue  # an fd was swapped underneath us; rebuild the set
            for fd in r:
                with contextlib.suppress(OSError):
                    os.eventfd_read(fd)
            for index, q in list(self.queues.items()):
                if q.local is None:
                    continue
                try:
                    chains = q.local.pop_chains(q.setup.num if q.setup else 256)
                except ring.RingError as e:
                    chains = e.chains
                self._ask_for_kicks(q)
                if not chains:
                    continue
                used = []
                for ch in chains:
                    if self.on_capture is not None:
                        self.on_capture(("local-request", index, ch.head, time.time_ns(), bytes(ch.readable)))
                    used.append((ch.head, self._answer_eio(index, ch)))
                q.local.push_used(used)
                self._signal(q)

    @property
    def _event_idx(self) -> bool:
        """QEMU acked VIRTIO_RING_F_EVENT_IDX (the proxy forwards it, so the back-end has it too)."""
        return bool((self.cp.neg.features_acked or 0) & C.F_BIT["VIRTIO_RING_F_EVENT_IDX"])

    def _ask_for_kicks(self, q: QueueRuntime) -> None:
        """EVENT_IDX: avail_event in the guest's used ring = the next entry we will pop (else the guest
        stops kicking once the shadow path is gone)."""
        if q.local is None or q.setup is None or not self._event_idx:
            return
        s = q.setup
        at = self.mem.uva_to_gpa(s.used_uva) + vio.split_ring_layout(s.num).avail_event_off
        self.mem.view(at, 2)[:] = struct.pack("<H", q.local.last_avail_idx & 0xFFFF)

    @staticmethod
    def _signal(q: QueueRuntime) -> None:
        if q.call_fd is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(q.call_fd, 1)

    # -- captures --------------------------------------------------------------------------------
    def _capture_loop(self) -> None:
        # Decoding, recording and publishing may lag; the guest's vCPUs and the native forwarding
        # threads must not: run this thread at a lower priority (the capture buffer absorbs bursts).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CAPTURE_NICE)
        while not self._stop.is_set():
            with self._inflight_lock:
                if not self.cp.backend_alive:
                    return
                caps = self.capture.read_captures(max=4096, timeout=0.05)
                for cap in caps:
                    self._capture_one(cap)
            if not caps:
                if self.on_idle is not None:
                    self.on_idle()
            elif len(caps) < CAPTURE_BATCH:
                # Let captures pile up a little: one wake-up per batch instead of one per exchange keeps
                # this thread's CPU (and GIL traffic) off the cores the guest needs.
                self._stop.wait(CAPTURE_LINGER)

    def _capture_one(self, cap: Any) -> None:
        """Track which heads the back-end holds (for EIO on loss), then hand the capture on."""
        if cap.kind == "request":
            self._inflight.setdefault(cap.queue, set()).add(cap.head)
        elif cap.kind == "reply":
            self._inflight.get(cap.queue, set()).discard(cap.head)
        if self.on_capture is not None:
            self.on_capture(cap)

    def _record_vhost(self, direction: str, raw: bytes, fds: list[int], msg: Any, note: str | None = None) -> None:
        if self.on_vhost_message is not None:
            self.on_vhost_message(direction, raw, fds, note or msg)

    # -- teardown --------------------------------------------------------------------------------
    def path_counters(self) -> dict[int, dict[str, int]]:
        return {i: dict(q.path.counters) for i, q in self.queues.items() if q.path is not None}

    def shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        self._stop.set()
        with contextlib.suppress(OSError):  # the capture thread waits on this eventfd: wake it to see the stop
            os.eventfd_write(self.capture.fileno(), 1)
        for q in self.queues.values():
            if q.path is not None:
                with contextlib.suppress(Exception):
                    q.path.stop()
        if self._capture_thread is not None:
            self._capture_thread.join(2)
            # Whatever is still buffered belongs to the recording too.
            with self._inflight_lock:
                for cap in self.capture.read_captures(max=1 << 20, timeout=0):
                    self._capture_one(cap)
        if self._local_thread is not None:
            self._local_thread.join(2)
            with self._retired_lock:  # taken as the EIO loop takes them: one of us closes each, once
                retired, self._retired_kicks = self._retired_kicks, []
            self._close_fds(retired)
        for q in self.queues.values():
            self._close_fds([fd for fd in (q.kick_fd, q.call_fd, q.backend_kick, q.backend_call)
                             if fd is not None and fd >= 0])
            q.kick_fd = q.call_fd = None
            q.backend_kick = q.backend_call = -1
        self._release_session()
        for s in (self.frontend, self.backend_sock):
            if s is not None:
                s.close()
        stop_fd, self._stop_fd = self._stop_fd, -1
        region_fd, self.region_fd = self.region_fd, -1  # its mapping stays: memoryviews of it may live on
        self._close_fds([fd for fd in (self._local_wake, stop_fd, region_fd) if fd >= 0])
        self._local_wake = -1
        if self.backend_proc is not None and self.backend_proc.poll() is None:
            self.backend_proc.terminate()
            try:
                # Stopped by a signal, the whole run has a second: a back-end that does not follow its
                # SIGTERM at once (SIGSTOPped, hung) is killed; at a normal end it gets its time.
                self.backend_proc.wait(BACKEND_STOP_GRACE if self._stop_requested else 5)
            except subprocess.TimeoutExpired:
                self.backend_proc.kill()
                self.backend_proc.wait()

    def _release_session(self) -> None:
        """Give back what the session's objects hold, now rather than when this Proxy goes (whoever keeps
        it for its counters -- the summary, a UI, a loop of sessions -- must not keep a session's fds): each
        path's thread, fd dups and wake-up eventfd, the capture buffer's eventfd, and the mappings (each
        keeps a dup of its memfd, and QEMU's keeps the guest's RAM allocated after QEMU exits)."""
        for q in self.queues.values():
            if q.path is not None:
                q.path.close()
        if any(t is not None and t.is_alive() for t in (self._capture_thread, self._local_thread)):
            return  # a thread that did not stop in time may still use them: they go with this object
        for q in self.queues.values():
            q.local = None
        self.capture.close()
        for gpa, _size, _uva in list(self.mem.regions):
            self.mem.remove_region(gpa)
        kept = []
        for m in (*self._maps, *self._old_maps, self.region_map):
            try:
                m.close()
            except BufferError:  # a memoryview of it is still alive: the mapping goes with the last one
                kept.append(m)
        self._maps, self._old_maps = [], kept

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


class _FrontendGone(Exception):
    """QEMU's socket failed while the proxy was answering it."""


def _eventfd() -> int:
    return os.eventfd(0, _EFD_NONBLOCK | _EFD_CLOEXEC)
