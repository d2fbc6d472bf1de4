"""vhost-user transport: serve the engine to a QEMU guest over a Unix socket, guest memory and virtqueues.

An edge module (it does I/O): the vhost-user control messages arrive on one socket (fds beside them,
dissectors.transport.wire), guest memory regions are mmap-ed from the fds QEMU sends, and each virtqueue
is a `dissectors.ring.SplitQueue` served by one thread that waits on the queue's kick eventfd.

Concurrency (the engine's model): each queue thread hands every popped chain to `Server.handle`;
cheap ops (and every WRITE a kernel sends) are answered inline on that thread, blocking ops (big READs,
fsync, ...) from the engine's pool.  The mechanics are the ring engine's (dissectors.ring, C or its twin): a chain is its own reply
sink (`Chain.reply` scatters the reply into the chain's device-writable guest buffers and completes
it), and the completions made on the queue thread between `begin_batch()` and `end_batch()` are
published with one used->idx store and at most one call; a completion from another thread is
published at once.  READ is zero-copy (the filesystem `preadv`s into the chain's writable views, see
InPlace); WRITE data arrives gathered once by the ring engine (Chain.readable) and is `pwrite`n from there.

What is negotiated, honestly:
- device features VERSION_1, INDIRECT_DESC, EVENT_IDX, PROTOCOL_FEATURES.  With EVENT_IDX (Linux acks
  it) a batch calls only when used->idx passed the driver's used_event, and each pop asks for a kick at
  the next entry only (avail_event), so a driver adding requests while the queue thread drains does not
  kick; without it a completion calls unless the driver set VRING_AVAIL_F_NO_INTERRUPT.  The ring engine
  decides both (SplitQueue.event_idx);
- protocol features MQ, REPLY_ACK, CONFIGURE_MEM_SLOTS (ADD/REM_MEM_REG) and RESET_DEVICE.

Rules from libvhost-user and proxy-notes.md that matter:
- regions are mapped from file offset 0 over mmap_offset + size; a mapping is closed only when no
  memoryview of it is alive (otherwise it is parked and closed later);
- SET_VRING_ADDR carries QEMU user addresses (translated with the regions' user addresses);
- call and kick fds change while traffic flows: a call fd is swapped in the ring engine's queue (which
  never writes it after the swap) before the old one is closed, a kick fd is handed to the queue thread,
  which owns (and closes) it;
- GET_VRING_BASE stops the queue, waits for its in-flight requests, and answers the next avail index;
- FORGET (and any request without a reply) completes with used.len 0;
- QEMU closing the socket ends the session: queue threads joined, engine pool shut down, every fd
  and mapping released.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.server import NO_REPLY_OPS, OP, Buffer, Server
from dissectors import fuse as F
from dissectors import vhost_user as V
from dissectors.errors import DecodeError
from dissectors.ring import Chain, MemoryMap, RingError, SplitQueue
from dissectors.spec import vhost_user as vspec
from dissectors.spec import virtio as vio
from dissectors.transport.wire import (
    FdRefused,
    PeerClosed,
    WireError,
    check_eventfd,
    check_region_fd,
    recv_message,
    send_message,
    shrink_sealed,
)

log = logging.getLogger("fsinspect.daemon.vhost_user")

F_BIT = vio.VIRTIO_F.by_name()
P_BIT = vspec.PROTOCOL_F.by_name()
REQ = {r.name: r.value for r in vspec.FRONTEND_REQUESTS}
REQ_BY_VALUE = {r.value: r for r in vspec.FRONTEND_REQUESTS}

F_EVENT_IDX = F_BIT["VIRTIO_RING_F_EVENT_IDX"]
DEVICE_FEATURES = (F_BIT["VIRTIO_F_VERSION_1"] | F_BIT["VIRTIO_RING_F_INDIRECT_DESC"] | F_EVENT_IDX
                   | F_BIT["VHOST_USER_F_PROTOCOL_FEATURES"])
PROTOCOL_FEATURES = P_BIT["MQ"] | P_BIT["REPLY_ACK"] | P_BIT["CONFIGURE_MEM_SLOTS"] | P_BIT["RESET_DEVICE"]
MAX_MEM_SLOTS = 32  # libvhost-user's VHOST_USER_MAX_RAM_SLOTS
DEFAULT_QUEUES = 2  # hiprio + one request queue, as the C virtiofsd reports
OUT_HEADER_SIZE = F.OUT_HEADER_SIZE
IN_HEADER_SIZE = F.IN_HEADER_SIZE
_peek_header = F.IN_HEADER.struct.unpack_from  # fuse_in_header: len, opcode, unique, ...
FUSE_READ = OP["READ"]
INFLIGHT_WAIT_S = 30.0
EDGE = select.EPOLLIN | select.EPOLLET  # the queue thread's wait (_queue_loop)


class VhostUserError(Exception):
    """The front-end broke the protocol in a way this session cannot continue from."""


class InPlace:
    """A READ payload already written into the chain's guest buffers (zero-copy): only its length travels.

    The engine sees it as the reply's data part (len() is what it sums for out_header.len); the vhost-user
    reply sink recognises it and writes only the header.
    """

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def data_views(chain: Chain, skip: int, size: int) -> list[memoryview]:
    """The chain's writable guest buffers after the first `skip` bytes, `size` bytes at most (for preadv)."""
    out: list[memoryview] = []
    for seg in chain.writable:
        n = len(seg)
        if skip >= n:
            skip -= n
            continue
        part = seg[skip:]
        skip = 0
        if len(part) > size:
            part = part[:size]
        if part:
            out.append(part)
            size -= len(part)
        if size <= 0:
            break
    return out


def _eventfd_write(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except OSError as e:  # a call fd QEMU already dropped: the next SET_VRING_CALL replaces it
        if e.errno not in (errno.EBADF, errno.EAGAIN):
            raise


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass
class Vring:
    """One virtqueue's state (the back-end's half of it)."""

    index: int
    num: int = 0
    base: int = 0
    addr: Any = None
    queue: SplitQueue | None = None
    call_fd: int = -1
    err_fd: int = -1
    enabled: bool = False
    started: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)  # call fd, pending kick fd
    thread: threading.Thread | None = None
    wake_fd: int = -1
    pending_kick: int | None = None  # a new kick fd for the queue thread (which owns the current one)
    stopping: bool = False
    stats_chains: int = 0  # of the queues already retired (the current one counts its own)
    stats_calls: int = 0
    stats_suppressed: int = 0

    def retire(self, q: SplitQueue) -> None:
        """Keep a retired queue's counters."""
        c = q.counters
        self.stats_chains += c["popped"]
        self.stats_calls += c["calls"]
        self.stats_suppressed += c["calls_suppressed"]


class MemoryTable:
    """Guest memory: the ring engine's MemoryMap plus the mmaps behind it, closed only when unexported."""

    def __init__(self) -> None:
        self.map = MemoryMap()
        self._maps: dict[int, tuple[mmap.mmap, Any]] = {}  # gpa -> (mmap, vhost_user_memory_region as sent)
        self._parked: list[mmap.mmap] = []

    def add(self, region: Any, fd: int) -> None:
        """Map from file offset 0 over mmap_offset + size (libvhost-user), then hand it to the ring engine.

        The region and its fd are checked first (wire.check_region_fd), so a bad one is refused by name.
        A front-end that shrinks the file later is trusted not to (libvhost-user's assumption): the
        mapping would fault with SIGBUS; QEMU's memory-backend-memfd seals it (F_SEAL_SHRINK) by default.
        """
        try:
            problem = V.region_problem(region, [r for _mm, r in self._maps.values()])
            if problem is not None:
                raise VhostUserError(problem)
            check_region_fd(fd, region.mmap_offset + region.size, f"region gpa {region.guest_address:#x}")
            if not shrink_sealed(fd):
                log.warning("region gpa %#x is not sealed against shrinking: the front-end is trusted not to "
                            "truncate it", region.guest_address)
            mm = mmap.mmap(fd, region.mmap_offset + region.size, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        try:
            self.map.add_region(region.guest_address, region.size, mm, uva=region.user_address,
                                mmap_offset=region.mmap_offset)
        except BaseException:
            self._release(mm)
            raise
        self._maps[region.guest_address] = (mm, region)
        log.debug("mapped gpa %#x size %#x uva %#x off %#x", region.guest_address, region.size,
                  region.user_address, region.mmap_offset)

    def remove(self, gpa: int, size: int) -> bool:
        ent = self._maps.get(gpa)
        if ent is None or ent[1].size != size:
            return False
        self.map.remove_region(gpa)
        del self._maps[gpa]
        self._release(ent[0])
        return True

    def clear(self) -> None:
        for gpa in list(self._maps):
            mm = self._maps.pop(gpa)[0]
            self.map.remove_region(gpa)
            self._release(mm)
        self.map = MemoryMap()
        self.reap()

    def _release(self, mm: mmap.mmap) -> None:
        try:
            mm.close()
        except BufferError:  # a chain view or the ring engine still points into it
            self._parked.append(mm)

    def reap(self) -> int:
        """Close parked mappings whose views are gone; returns how many are still parked."""
        keep = []
        for mm in self._parked:
            try:
                mm.close()
            except BufferError:
                keep.append(mm)
        self._parked = keep
        return len(keep)

    @property
    def regions(self) -> list[tuple[int, int, int]]:
        return self.map.regions


ChainRegistry = dict[int, Chain]


class VhostUserSession:
    """One vhost-user connection from QEMU, served until QEMU closes it (`serve()` blocks)."""

    def __init__(self, conn: socket.socket, server: Server, *, queues: int = DEFAULT_QUEUES) -> None:
        self.conn = conn
        self.server = server
        self.max_queues = queues
        self.features = 0
        self.protocol_features = 0
        self.mem = MemoryTable()
        self.vrings = [Vring(i) for i in range(queues)]
        self.chains: ChainRegistry = {}  # unique -> chain, for zero-copy READ (see InPlace)
        self.messages = 0
        self.closed = False

    # ------------------------------------------------------------------ control plane
    def serve(self) -> None:
        """Handle control messages until QEMU disconnects; always releases everything.

        Whatever the front-end sends ends in one log line, never a traceback: a message it cannot decode is
        refused (the stream stays framed), bytes that are not a vhost-user header end the session.
        """
        try:
            while True:
                try:
                    raw, fds = recv_message(self.conn)
                except PeerClosed:
                    log.info("front-end closed the connection")
                    return
                self.messages += 1
                try:
                    msg = V.decode_message(raw, fds)
                except DecodeError as e:
                    for fd in fds:
                        _close(fd)
                    self._refuse_undecodable(raw, e)
                    continue
                if msg.is_reply:  # its payload has the reply's layout: no request handler may see it
                    for fd in fds:
                        _close(fd)
                    self._refuse_undecodable(raw, DecodeError("a reply (REPLY flag) where a request belongs", 4,
                                                              proto="vhost-user"))
                    continue
                self._dispatch(msg)
        except (WireError, VhostUserError, OSError) as e:
            log.error("vhost-user session ended: %s", e)
        finally:
            self.close()

    def _refuse_undecodable(self, raw: bytes, e: DecodeError) -> None:
        """A message we cannot decode: refuse it as an unhandled request, or end when it needed an answer."""
        req, flags, _size = V.HEADER.struct.unpack_from(raw)
        spec = REQ_BY_VALUE.get(req)
        if spec is not None and spec.reply is not None:
            raise VhostUserError(f"{spec.name} undecodable and it needs a reply: {e}")
        log.error("vhost-user request %s refused: %s", spec.name if spec else req, e)
        if flags & 0x8 and self.protocol_features & P_BIT["REPLY_ACK"]:
            send_message(self.conn, V.HEADER.struct.pack(req, vspec.VERSION | 0x4, 8) + (1).to_bytes(8, "little"))

    def _reply(self, msg: V.VhostUserMessage, payload: Any) -> None:
        out = V.VhostUserMessage(msg.request, vspec.VERSION | 0x4, payload)
        send_message(self.conn, V.encode_message(out))

    def _ack(self, msg: V.VhostUserMessage, ok: bool) -> None:
        """REPLY_ACK: a u64 status when the front-end asked for one on a request without its own reply."""
        if msg.need_reply and self.protocol_features & P_BIT["REPLY_ACK"]:
            self._reply(msg, V.u64(0 if ok else 1))

    def _dispatch(self, msg: V.VhostUserMessage) -> None:
        name = msg.name
        log.debug("<- %s", msg.summary())
        handler: Callable[[V.VhostUserMessage], Any] | None = getattr(self, f"_on_{name.lower()}", None)
        spec = REQ_BY_VALUE.get(msg.request)
        if spec is not None and not spec.fds and msg.fds:  # this request takes none: a front-end's extras
            log.warning("%s came with %d fds it does not take; closed", name, len(msg.fds))
            for fd in msg.fds:
                _close(fd)
            msg.fds = []
        if handler is None:
            log.warning("unsupported vhost-user request %s", name)
            for fd in msg.fds:
                _close(fd)
            if spec is not None and spec.reply is not None:
                raise VhostUserError(f"{name} needs a reply this back-end cannot give")
            self._ack(msg, False)
            return
        try:
            result = handler(msg)
        except (RingError, OSError, ValueError, VhostUserError) as e:
            log.error("%s failed: %s", name, e)
            if spec is not None and spec.reply is not None:
                raise VhostUserError(f"{name} failed: {e}") from None
            self._ack(msg, False)
            return
        if spec is not None and spec.reply is not None:
            self._reply(msg, result)
        else:
            self._ack(msg, True)

    def _vring(self, index: int) -> Vring:
        if index >= len(self.vrings):
            raise VhostUserError(f"vring {index} out of range (max {len(self.vrings)})")
        return self.vrings[index]

    def _vring_fd(self, msg: V.VhostUserMessage) -> tuple[Vring, int]:
        """The vring a SET_VRING_KICK/CALL/ERR names and its fd; the fd is closed when either is refused."""
        try:
            vr = self._vring(msg.payload.u64 & vspec.VRING_IDX_MASK)
        except VhostUserError:
            for fd in msg.fds:
                _close(fd)
            raise
        return vr, self._one_fd(msg)

    def _one_fd(self, msg: V.VhostUserMessage) -> int:
        """The u64 vring-fd messages: an eventfd unless NOFD (bit 8) is set.

        Anything else is refused on arrival (wire.check_eventfd): /dev/zero as a kick fd would spin the
        queue thread, an epoll fd as call fd would fail every completion's signal.
        """
        if msg.nofd():
            for fd in msg.fds:
                _close(fd)
            return -1
        if len(msg.fds) != 1:
            for fd in msg.fds:
                _close(fd)
            raise VhostUserError(f"{msg.name} without its fd")
        try:
            check_eventfd(msg.fds[0], f"vring {msg.payload.u64 & vspec.VRING_IDX_MASK} fd")
        except FdRefused:
            _close(msg.fds[0])
            raise
        return msg.fds[0]

    def _on_get_features(self, msg: V.VhostUserMessage) -> Any:
        return V.u64(DEVICE_FEATURES)

    def _on_set_features(self, msg: V.VhostUserMessage) -> None:
        f = msg.payload.u64
        if f & ~DEVICE_FEATURES:
            log.warning("front-end set features %#x beyond the offered %#x", f, DEVICE_FEATURES)
        self.features = f
        if not f & F_BIT["VHOST_USER_F_PROTOCOL_FEATURES"]:  # rings start enabled without SET_VRING_ENABLE
            for vr in self.vrings:
                vr.enabled = True
        for vr in self.vrings:  # QEMU sets features before the rings; a late change still reaches them
            if vr.queue is not None:
                vr.queue.event_idx = bool(f & F_EVENT_IDX)

    def _on_get_protocol_features(self, msg: V.VhostUserMessage) -> Any:
        return V.u64(PROTOCOL_FEATURES)

    def _on_set_protocol_features(self, msg: V.VhostUserMessage) -> None:
        self.protocol_features = msg.payload.u64 & PROTOCOL_FEATURES

    def _on_get_queue_num(self, msg: V.VhostUserMessage) -> Any:
        return V.u64(self.max_queues)

    def _on_get_max_mem_slots(self, msg: V.VhostUserMessage) -> Any:
        return V.u64(MAX_MEM_SLOTS)

    def _on_set_owner(self, msg: V.VhostUserMessage) -> None:
        pass

    def _on_reset_owner(self, msg: V.VhostUserMessage) -> None:
        self._reset()

    def _on_reset_device(self, msg: V.VhostUserMessage) -> None:
        self._reset()

    def _reset(self) -> None:
        for vr in self.vrings:
            self._stop_vring(vr)
            self._drop_queue(vr)
            _close(vr.call_fd)
            _close(vr.err_fd)
            vr.call_fd = vr.err_fd = -1
            vr.enabled = False
            vr.num = vr.base = 0
            vr.addr = None
        self.features = 0

    def _on_set_backend_req_fd(self, msg: V.VhostUserMessage) -> None:
        # Never offered (BACKEND_REQ is not negotiated); a front-end sending it anyway gets its fd back closed.
        for fd in msg.fds:
            _close(fd)

    def _on_set_mem_table(self, msg: V.VhostUserMessage) -> None:
        regions = msg.payload
        if len(msg.fds) != len(regions):
            for fd in msg.fds:
                _close(fd)
            raise VhostUserError(f"SET_MEM_TABLE: {len(regions)} regions but {len(msg.fds)} fds")
        running = [vr for vr in self.vrings if vr.started]
        for vr in running:
            self._pause(vr)
        self.mem.clear()
        fds = list(msg.fds)
        try:
            for i, r in enumerate(regions):
                self.mem.add(r, fds[i])
                fds[i] = -1
        finally:
            for fd in fds:
                _close(fd)
        for vr in self.vrings:
            if vr.addr is not None:
                self._make_queue(vr, keep_indices=True)
        for vr in running:
            self._start_thread(vr, None)

    def _on_add_mem_reg(self, msg: V.VhostUserMessage) -> None:
        if len(msg.fds) != 1:
            for fd in msg.fds:
                _close(fd)
            raise VhostUserError(f"ADD_MEM_REG with {len(msg.fds)} fds instead of one")
        self.mem.add(msg.payload.region, msg.fds[0])

    def _on_rem_mem_reg(self, msg: V.VhostUserMessage) -> None:
        for fd in msg.fds:  # QEMU sends the region's fd along; it is not needed to find the region
            _close(fd)
        r = msg.payload.region
        if not self.mem.remove(r.guest_address, r.size):
            raise VhostUserError(f"REM_MEM_REG: no region at gpa {r.guest_address:#x} size {r.size:#x}")

    def _on_set_vring_num(self, msg: V.VhostUserMessage) -> None:
        vr = self._vring(msg.payload.index)
        num = msg.payload.num
        if num == 0 or num > vio.MAX_QUEUE_SIZE or num & (num - 1):
            raise VhostUserError(f"vring {vr.index}: bad size {num}")
        if vr.started:  # the ring's thread serves heads of the size it was made with
            raise VhostUserError(f"vring {vr.index}: SET_VRING_NUM while the ring runs")
        vr.num = num

    def _on_set_vring_base(self, msg: V.VhostUserMessage) -> None:
        vr = self._vring(msg.payload.index)
        vr.base = msg.payload.num & 0xFFFF
        if vr.queue is not None:
            vr.queue.last_avail_idx = vr.base

    def _on_set_vring_addr(self, msg: V.VhostUserMessage) -> None:
        vr = self._vring(msg.payload.index)
        vr.addr = msg.payload
        self._make_queue(vr, keep_indices=False)

    def _make_queue(self, vr: Vring, *, keep_indices: bool) -> None:
        a = vr.addr
        m = self.mem.map
        old = vr.queue
        desc, avail, used = m.uva_to_gpa(a.descriptor), m.uva_to_gpa(a.available), m.uva_to_gpa(a.used)
        q = SplitQueue(m, vr.num, desc, avail, used)
        if keep_indices and old is not None:
            q.last_avail_idx, q.used_idx = old.last_avail_idx, old.used_idx
        else:
            q.last_avail_idx = vr.base
            # libvhost-user: the used index the driver last saw is the one in the ring.
            q.used_idx = int.from_bytes(m.view(used + 2, 2), "little")
        q.event_idx = bool(self.features & F_EVENT_IDX)
        with vr.lock:
            q.call_fd = vr.call_fd
        if old is not None:  # chains still in flight complete on the new ring
            old.handover(q)
            vr.retire(old)
        vr.queue = q
        if vr.started and vr.wake_fd >= 0:  # a queue thread waiting in the old ring's serve_wait moves over
            _eventfd_write(vr.wake_fd)
        log.debug("vring %d: num %d desc %#x avail %#x used %#x, avail idx %d used idx %d", vr.index, vr.num,
                  desc, avail, used, q.last_avail_idx, q.used_idx)

    def _on_set_vring_kick(self, msg: V.VhostUserMessage) -> None:
        vr, fd = self._vring_fd(msg)
        if fd < 0:
            raise VhostUserError("polling mode (SET_VRING_KICK with NOFD) is not supported")
        if vr.started:
            with vr.lock:
                old, vr.pending_kick = vr.pending_kick, fd
            if old is not None:
                _close(old)
            _eventfd_write(vr.wake_fd)
            return
        self._start_thread(vr, fd)

    def _on_set_vring_call(self, msg: V.VhostUserMessage) -> None:
        vr, fd = self._vring_fd(msg)
        with vr.lock:
            old, vr.call_fd = vr.call_fd, fd
            if vr.queue is not None:
                vr.queue.call_fd = fd  # before the close: the engine never writes the old fd after this
        _close(old)
        if fd >= 0 and vr.started:
            _eventfd_write(fd)  # a completion may have signalled the old fd while QEMU switched

    def _on_set_vring_err(self, msg: V.VhostUserMessage) -> None:
        vr, fd = self._vring_fd(msg)
        old, vr.err_fd = vr.err_fd, fd
        _close(old)

    def _on_set_vring_enable(self, msg: V.VhostUserMessage) -> None:
        vr = self._vring(msg.payload.index)
        vr.enabled = bool(msg.payload.num)
        if vr.started:
            _eventfd_write(vr.wake_fd)

    def _on_get_vring_base(self, msg: V.VhostUserMessage) -> Any:
        vr = self._vring(msg.payload.index)
        self._stop_vring(vr)
        base = vr.queue.last_avail_idx if vr.queue is not None else vr.base
        self._drop_queue(vr)
        vr.addr = None
        with vr.lock:
            old, vr.call_fd = vr.call_fd, -1
        _close(old)
        log.debug("vring %d stopped at avail idx %d", vr.index, base)
        return V.make("vhost_vring_state", index=vr.index, num=base)

    # ------------------------------------------------------------------ queue threads
    def _start_thread(self, vr: Vring, kick_fd: int | None) -> None:
        if vr.wake_fd < 0:
            vr.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vr.stopping = False
        vr.started = True
        t = threading.Thread(target=self._queue_loop, args=(vr, kick_fd), name=f"vhost-q{vr.index}", daemon=True)
        vr.thread = t
        t.start()

    def _pause(self, vr: Vring) -> None:
        """Stop the queue thread but keep its kick fd (handed back on restart through pending_kick)."""
        if vr.thread is None:
            return
        vr.stopping = True
        _eventfd_write(vr.wake_fd)
        vr.thread.join()
        vr.thread = None

    def _stop_vring(self, vr: Vring) -> None:
        """Stop the queue thread, wait for its in-flight requests, release its kick fd."""
        if vr.thread is not None:
            self._pause(vr)
        vr.started = False
        with vr.lock:
            kick, vr.pending_kick = vr.pending_kick, None
        if kick is not None:
            _close(kick)
        if self.server.hold is not None:
            self.server.hold.flush(vr.index)  # held requests answer EIO: nothing waits on the debugger
        q = vr.queue
        deadline = time.monotonic() + INFLIGHT_WAIT_S
        pause = 0.0002
        while q is not None and q.inflight > 0:  # the replies come from the pool or lock waiters
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("vring %d: %d requests still in flight after %.0f s", vr.index, q.inflight,
                          INFLIGHT_WAIT_S)
                break
            time.sleep(min(left, pause))
            pause = min(pause * 2, 0.02)
        _close(vr.wake_fd)
        vr.wake_fd = -1

    def _drop_queue(self, vr: Vring) -> None:
        """The ring is gone (GET_VRING_BASE, reset, session end): a late completion must not touch it."""
        q, vr.queue = vr.queue, None
        if q is not None:
            q.detach()
            vr.retire(q)
            late = q.counters["late"]
            if late:
                log.warning("vring %d: %d completions after the queue was torn down, dropped", vr.index, late)

    def _queue_loop(self, vr: Vring, kick_fd: int | None) -> None:
        """Wait for kicks, drain the avail ring, serve the chains; owns the kick fd.

        The wait is one epoll set, edge-triggered, over the kick and wake eventfds, and neither is read:
        every eventfd write is an edge (kicks coalesce, so only "at least one since the last wait"
        matters), a counter that is never read only grows (2**64 - 2 writes away from full), and the set
        stays registered between waits.  A wake-up costs one epoll_wait instead of poll() and a read():
        poll() re-registers both fds at each call (the profile in bench/op_breakdown.py).
        """
        if kick_fd is None:  # restarted after a pause: the fd was parked in pending_kick
            with vr.lock:
                kick_fd, vr.pending_kick = vr.pending_kick, None
        kick = kick_fd if kick_fd is not None else -1
        ep = select.epoll(2)
        try:
            ep.register(vr.wake_fd, EDGE)
            if kick >= 0:
                ep.register(kick, EDGE)  # ready at once if kicked before: a counter set earlier is an edge
            wake = vr.wake_fd
            while True:
                # Serve what is available (buffers made available before the kick fd arrived too); with the
                # fast path on, the ring engine also waits for the next kick itself, until woken.
                woken = self._drain(vr, ep)
                if not woken and not vr.stopping:
                    for fd, _events in ep.poll():
                        if fd == wake:
                            woken = True
                if vr.stopping:
                    return
                if woken:  # SET_VRING_KICK may have left a new kick fd
                    with vr.lock:
                        new, vr.pending_kick = vr.pending_kick, None
                    if new is not None:
                        if kick >= 0:
                            ep.unregister(kick)
                            _close(kick)
                        kick = new
                        ep.register(kick, EDGE)
        except Exception:
            log.exception("vring %d: queue thread failed", vr.index)
        finally:
            ep.close()
            # A pause parks the kick fd for the restart; a stop closes it there.
            with vr.lock:
                if vr.pending_kick is None and kick >= 0:
                    vr.pending_kick = kick
                elif kick >= 0:
                    _close(kick)

    def _drain(self, vr: Vring, ep: select.epoll) -> bool:
        """Pop every available chain and serve it; the inline replies of a batch go out together.

        With the fast path, the ring engine's `serve_wait` pops, answers, scatters and publishes what the
        fast path serves without a Chain object or a Python frame (C engine), and hands back only the
        chains it declines, which `_serve_slow` serves as before, in their place in the batch; while the
        ring is empty it waits for the next kick in `ep` (the queue thread's epoll set) itself, so this
        returns only once the wake fd fired (True).  Without the fast path (or when
        not served: disabled, stopping, stalled) it returns False when the ring is empty: the caller waits.
        A batch begins after a pop that found chains: the last pop of a wake-up, which finds none (it
        re-arms the kick with EVENT_IDX), costs no batch."""
        q = vr.queue
        if q is None or not vr.enabled:
            return False
        server = self.server
        failed, reply_failed = server.fast_failed, server.reply_failed
        batch = False  # serve_fast left a batch open (it returned a chain, or raised)
        try:
            while not vr.stopping:
                fast = server.fast
                if fast is None:
                    if not self._drain_group(vr, q):
                        return False
                    continue
                batch = True
                try:
                    r = q.serve_wait(ep, vr.wake_fd, server, failed, reply_failed)
                except RingError as e:
                    if _stalled(vr, e):
                        return False
                    _malformed(vr, q, e)
                    continue
                if isinstance(r, int):  # woken, every batch published
                    batch = False
                    _log_truncated(vr, r)
                    return True
                else:  # declined by the fast path
                    self._serve_slow(vr, r)
            return False
        finally:
            if batch:
                _log_truncated(vr, q.end_batch())

    def _drain_group(self, vr: Vring, q: SplitQueue) -> bool:
        """One pop and its batch without the fast path; False when there was nothing to pop."""
        err: RingError | None = None
        try:
            chains = q.pop_chains()
        except RingError as e:
            if _stalled(vr, e):
                return False
            err, chains = e, e.chains
        if not chains and err is None:
            return False
        q.begin_batch()
        try:
            for c in chains:
                self._serve_chain(vr, c)
            if err is not None:
                _malformed(vr, q, err)
        finally:
            _log_truncated(vr, q.end_batch())
        return True

    def _serve_chain(self, vr: Vring, chain: Chain) -> None:
        """The chain is the reply sink: `chain.reply(parts)` scatters and completes it (ring engine).

        The fast path's answers go straight into the chain; what it declines goes to `_serve_slow`."""
        raw = chain.readable
        server = self.server
        fast = server.fast
        if fast is not None:  # Server.fast_answer() and send_fast(), inline: two frames less per request
            try:
                r = fast(raw, chain)
            except Exception:
                r = server.fast_failed(raw)
            if r is not None:
                if r:
                    try:
                        chain.reply(r if isinstance(r, tuple) else (r,))  # a READ's header, its data in place
                    except Exception as e:
                        server.reply_failed(e)
                else:
                    chain.complete(0)
                return
        self._serve_slow(vr, chain)

    def _serve_slow(self, vr: Vring, chain: Chain) -> None:
        """A chain the fast path declined (or with no fast path): looked at (a request without a reply, a
        zero-copy READ) and served by the engine."""
        raw = chain.readable
        server = self.server
        if len(raw) < IN_HEADER_SIZE:
            opcode = -1
        else:
            h = _peek_header(raw)
            opcode, unique = h[1], h[2]
        if opcode < 0 or opcode in NO_REPLY_OPS:
            server.handle_slow(raw, _no_reply, vr.index)
            chain.complete(0)
        elif opcode == FUSE_READ:  # zero-copy: the filesystem finds the chain by unique (chain_for)
            self.chains[unique] = chain
            server.handle_slow(raw, _ReadReply(self.chains, unique, chain), vr.index)
        else:
            server.handle_slow(raw, chain.reply, vr.index)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Stop every queue (joining threads, waiting for in-flight requests), release fds and memory."""
        if self.closed:
            return
        self.closed = True
        for vr in self.vrings:
            self._pause(vr)  # no new requests from here on
        self.server.end_lock_waits()  # else a blocked SETLKW holds SIGTERM for INFLIGHT_WAIT_S
        for vr in self.vrings:
            self._stop_vring(vr)
        for vr in self.vrings:
            self._drop_queue(vr)
            _close(vr.call_fd)
            _close(vr.err_fd)
            vr.call_fd = vr.err_fd = -1
        self.chains.clear()
        self.mem.clear()
        left = self.mem.reap()
        if left:
            import gc
            gc.collect()
            left = self.mem.reap()
            if left:
                log.warning("%d guest memory mappings still referenced at exit", left)
        try:
            self.conn.close()
        except OSError:
            pass

    def counters(self) -> dict[str, Any]:
        out: dict[int, dict[str, int]] = {}
        for vr in self.vrings:
            q = vr.queue
            c = q.counters if q is not None else {"calls": 0, "calls_suppressed": 0, "popped": 0}
            out[vr.index] = {"chains": vr.stats_chains + c["popped"], "calls": vr.stats_calls + c["calls"],
                             "calls_suppressed": vr.stats_suppressed + c["calls_suppressed"]}
        return {"vhost_user_messages": self.messages, "queues": out}


def _stalled(vr: Vring, e: RingError) -> bool:
    """The guest's avail index ran ahead of the ring: nothing can be popped safely, the queue stops."""
    if e.reason != "avail_ahead":
        return False
    log.error("vring %d: %s; queue stalled", vr.index, str(e))  # (as text: the error's frames hold the ring)
    return True


def _malformed(vr: Vring, q: SplitQueue, e: RingError) -> None:
    """A malformed chain (after the good ones popped with it): said, and given back with used.len 0."""
    log.error("vring %d: malformed chain: %s", vr.index, str(e))
    if e.head is not None and e.head < q.num:  # the ring's own size, not a later SET_VRING_NUM
        q.complete(e.head, 0)


def _log_truncated(vr: Vring, n: int) -> None:
    if n:
        log.error("vring %d: %d replies truncated to their chains' writable bytes", vr.index, n)


class _ReadReply:
    """A READ's reply sink: forget the chain's zero-copy registration, then reply through the chain."""

    __slots__ = ("chain", "chains", "unique")

    def __init__(self, chains: ChainRegistry, unique: int, chain: Chain) -> None:
        self.chains = chains
        self.unique = unique
        self.chain = chain

    def __call__(self, parts: Sequence[Buffer]) -> None:
        if self.chains.get(self.unique) is self.chain:
            del self.chains[self.unique]
        self.chain.reply(parts)


def _no_reply(parts: Sequence[Buffer]) -> None:
    log.warning("the engine replied to a request that takes no reply; dropped")


# ---------------------------------------------------------------------- listening
def listen_path(path: str) -> socket.socket:
    """A listening Unix socket at `path`: only a stale socket is replaced (one a daemon still listens on,
    or anything that is not a socket, is refused), as for the proxy's --listen."""
    from dissectors.transport.unixsock import claim_socket_path

    return claim_socket_path(path, what="--socket-path")


def listen_fd(fd: int) -> socket.socket:
    """A listening socket inherited from the caller (libvirt's --fd)."""
    try:
        s = socket.socket(fileno=fd)
    except OSError as e:
        raise OSError(e.errno, f"--fd {fd}: {e.strerror or e}") from None
    if s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM:
        s.detach()
        raise OSError(errno.ENOTSOCK, f"--fd {fd} is not a Unix stream socket")
    os.set_inheritable(fd, False)
    try:
        s.listen(1)
    except OSError:
        pass
    return s


def accept_one(listener: socket.socket, stop: threading.Event | None = None) -> socket.socket | None:
    """Wait for QEMU; None when `stop` is set first."""
    while True:
        r, _, _ = select.select([listener], [], [], 0.2)
        if r:
            conn, _ = listener.accept()
            conn.setblocking(True)
            return conn
        if stop is not None and stop.is_set():
            return None


__all__ = ["DEVICE_FEATURES", "PROTOCOL_FEATURES", "InPlace", "MemoryTable", "VhostUserError", "VhostUserSession",
           "WireError", "accept_one", "data_views", "listen_fd", "listen_path"]
