"""A vhost-user front-end without a guest: memfd guest memory, the driver side of the rings, negotiation.

QEMU's part, reduced to what a virtio-fs back-end sees: it negotiates features, hands over one memory
region and the rings, then puts FUSE requests on the queues as Linux virtio-fs does (one INDIRECT
descriptor per request when negotiated, else a two-descriptor chain) and collects the used entries.
Used by `fsinspect rerun` and by bench/vhost_roundtrip.py.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dissectors import vhost_user as V
from dissectors.ring.driver import F_INDIRECT, F_NEXT, F_WRITE, GuestRing, pack_descs
from dissectors.spec import vhost_user as vspec
from dissectors.spec import virtio as vio
from dissectors.transport.unixsock import ConnectError, connect_when_listening
from dissectors.transport.wire import PeerClosed, WireError, recv_message, sealed_memfd, send_message

GPA, UVA = 0x0, 0x7F00_0000_0000
PAGE = 4096
_VF = vio.VIRTIO_F.by_name()
_PF = vspec.PROTOCOL_F.by_name()
F_INDIRECT_DESC = _VF["VIRTIO_RING_F_INDIRECT_DESC"]
F_EVENT_IDX = _VF["VIRTIO_RING_F_EVENT_IDX"]
F_PROTOCOL = _VF["VHOST_USER_F_PROTOCOL_FEATURES"]
F_VERSION_1 = _VF["VIRTIO_F_VERSION_1"]
P_MQ, P_REPLY_ACK = _PF["MQ"], _PF["REPLY_ACK"]
P_BACKEND_REQ, P_MEM_SLOTS = _PF["BACKEND_REQ"], _PF["CONFIGURE_MEM_SLOTS"]
# Protocol features this front-end implements: anything else the recording used is refused up front.
P_SUPPORTED = P_MQ | P_REPLY_ACK | P_BACKEND_REQ | P_MEM_SLOTS | (_PF["CONFIG"]) | (_PF["RESET_DEVICE"])
# Device feature bits whose ring semantics this driver implements (plus any device-specific low bits).
# Ring and transport details the recording may have used that do not change what the file system does: a
# back-end without them is driven without them (noted); any other refused feature ends a strict rerun.
F_OPTIONAL = F_INDIRECT_DESC | F_EVENT_IDX | _VF["VIRTIO_F_ANY_LAYOUT"] | _VF["VIRTIO_F_NOTIFY_ON_EMPTY"]
P_OPTIONAL = P_REPLY_ACK | P_MEM_SLOTS | P_BACKEND_REQ | _PF["CONFIG"]
F_SUPPORTED = F_INDIRECT_DESC | F_EVENT_IDX | F_PROTOCOL | F_VERSION_1 | (_VF["VIRTIO_F_ANY_LAYOUT"]) | 0xFFFFFF


class FrontError(Exception):
    """The back-end refused what the rerun needs, or went away: one line for the user."""


def feature_names(bits: int, protocol: bool = False) -> str:
    if protocol:
        return vspec.PROTOCOL_F.render(bits)
    return vio.VIRTIO_F.render(bits) if bits & ~0xFFFFFF else f"device bits 0x{bits:x}"


@dataclass
class Negotiation:
    """What the front-end asks for: the recording's control plane, or defaults for a bare benchmark."""

    features: int = F_VERSION_1 | F_INDIRECT_DESC | F_PROTOCOL
    protocol: int = P_MQ | P_REPLY_ACK | P_MEM_SLOTS
    queue_sizes: dict[int, int] = field(default_factory=lambda: {0: 128, 1: 128})
    strict: bool = False  # True: a feature the back-end does not offer is an error (a rerun); False: drop it


@dataclass(slots=True)
class _Slot:
    index: int
    req: int  # guest-physical address of the request buffer
    reply: int
    table: int  # this slot's indirect table (two descriptors)


class Front:
    """The front-end: connect, negotiate, then submit() requests and poll() their replies."""

    def __init__(self, path: str | os.PathLike[str], neg: Negotiation | None = None, *,
                 max_request: int = 1 << 20, max_reply: int = 1 << 20, timeout: float = 10.0,
                 tap: Callable[[bytes, bool], None] | None = None, conn: socket.socket | None = None) -> None:
        """`conn`: the back-end connection already made (connect_backend); else `path` is connected to."""
        self.neg = neg or Negotiation()
        self.tap = tap  # every control message, and whether the front-end sent it (--record)
        self.timeout = timeout
        if conn is None:
            conn = socket.socket(socket.AF_UNIX)
            try:
                conn.connect(str(path))
            except OSError as e:
                conn.close()
                raise FrontError(f"cannot connect to the back-end socket {path}: {e.strerror or e}") from None
        self.sock = conn
        self.sock.settimeout(timeout)
        self.req_size = _round(max_request + 4096)
        self.reply_size = _round(max_reply + 4096)
        self.rings: dict[int, GuestRing] = {}
        self.kick: dict[int, int] = {}
        self.call: dict[int, int] = {}
        self.backend_fd: socket.socket | None = None
        self._free: dict[int, list[_Slot]] = {}
        self._busy: dict[tuple[int, int], tuple[_Slot, Any]] = {}  # (queue, head) -> slot, token
        self._ring_base: dict[int, int] = {}
        self.memfd = -1
        try:
            self._layout()
            self._negotiate()
        except (OSError, PeerClosed, WireError) as e:
            self.close()
            raise FrontError(f"the back-end closed the vhost-user connection during setup ({e})") from None
        except FrontError:
            self.close()
            raise

    # -- memory ----------------------------------------------------------------------------------
    def _layout(self) -> None:
        """Rings first, then per queue `size` slots of (indirect table, request, reply) buffers."""
        off = 0x10000
        plan: list[tuple[int, int, int]] = []
        for q, num in sorted(self.neg.queue_sizes.items()):
            lay = vio.split_ring_layout(num)
            self._ring_base[q] = off
            off += _round(lay.desc_size) + _round(lay.avail_size) + _round(lay.used_size)
        for q, num in sorted(self.neg.queue_sizes.items()):
            plan.append((q, num, off))
            off += num * (PAGE + self.req_size + self.reply_size)
        self.size = _round(off, 1 << 21)
        self.memfd = sealed_memfd("fsinspect-rerun-guest", self.size)  # as QEMU's: the back-end need not trust us
        self.mem = mmap.mmap(self.memfd, self.size)
        indirect = bool(self.neg.features & F_INDIRECT_DESC)
        for q, num, base in plan:
            slots = num if indirect else num // 4
            stride = PAGE + self.req_size + self.reply_size
            self._free[q] = [_Slot(i, base + i * stride + PAGE, base + i * stride + PAGE + self.req_size,
                                   base + i * stride) for i in reversed(range(slots))]

    def view(self, gpa: int, n: int) -> memoryview:
        return memoryview(self.mem)[gpa - GPA:gpa - GPA + n]

    # -- control plane ---------------------------------------------------------------------------
    def _send(self, name: str, payload: Any = None, fds: list[int] | None = None, ack: bool = False) -> None:
        msg = V.build(name, payload, fds=fds)
        if ack:
            msg.flags |= 0x8
        raw = V.encode_message(msg)
        send_message(self.sock, raw, fds)
        if self.tap is not None:
            self.tap(raw, True)
        if ack:
            raw, _ = self._recv()
            status = int(V.decode_message(raw).payload.u64)
            if status:
                raise FrontError(f"the back-end refused {name} (status {status})")

    def _recv(self) -> tuple[bytes, list[int]]:
        raw, fds = recv_message(self.sock)
        if self.tap is not None:
            self.tap(raw, False)
        return raw, fds

    def _ask(self, name: str) -> int:
        self._send(name)
        raw, fds = self._recv()
        for fd in fds:
            os.close(fd)
        return int(V.decode_message(raw).payload.u64)

    def _negotiate(self) -> None:
        neg = self.neg
        offered = self._ask("GET_FEATURES")
        self.offered_features = offered
        self.dropped: list[str] = []
        want = neg.features & F_SUPPORTED
        if neg.strict and neg.features & ~F_SUPPORTED:
            raise FrontError(f"the recording negotiated {feature_names(neg.features & ~F_SUPPORTED)}, "
                             "which this front-end does not implement")
        missing = want & ~offered & ~F_OPTIONAL
        if want & ~offered & F_OPTIONAL:
            self.dropped.append(feature_names(want & ~offered & F_OPTIONAL))
        if missing and neg.strict:
            raise FrontError(f"the back-end does not offer {feature_names(missing)}, which the recording "
                             f"negotiated (it offers {feature_names(offered)})")
        self.features = want & offered
        ack = False
        self.protocol = 0
        if self.features & F_PROTOCOL:
            offered_p = self._ask("GET_PROTOCOL_FEATURES")
            self.offered_protocol = offered_p
            want_p = neg.protocol
            if neg.strict and want_p & ~P_SUPPORTED:
                raise FrontError(f"the recording negotiated protocol feature(s) "
                                 f"{feature_names(want_p & ~P_SUPPORTED, True)}, which this front-end does not "
                                 "implement")
            want_p &= P_SUPPORTED
            miss_p = want_p & ~offered_p & ~P_OPTIONAL
            if want_p & ~offered_p & P_OPTIONAL:
                self.dropped.append(feature_names(want_p & ~offered_p & P_OPTIONAL, True))
            if miss_p and neg.strict:
                raise FrontError(f"the back-end does not offer protocol feature(s) {feature_names(miss_p, True)}, "
                                 "which the recording negotiated")
            self.protocol = want_p & offered_p
            self._send("SET_PROTOCOL_FEATURES", V.u64(self.protocol))
            ack = bool(self.protocol & P_REPLY_ACK)
        if len(self.neg.queue_sizes) > 2 and self.protocol & P_MQ:
            nq = self._ask("GET_QUEUE_NUM")
            if nq < len(self.neg.queue_sizes):
                raise FrontError(f"the back-end has {nq} queues; the recording used {len(self.neg.queue_sizes)}")
        self._send("SET_OWNER")
        self._send("SET_FEATURES", V.u64(self.features))
        if self.protocol & P_BACKEND_REQ:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.backend_fd = ours  # back-end requests are read and answered nowhere: nothing needs them here
            self._send("SET_BACKEND_REQ_FD", None, [theirs.fileno()], ack=ack)
            theirs.close()
        region = V.make("vhost_user_memory_region", guest_address=GPA, size=self.size, user_address=UVA,
                        mmap_offset=0)
        fd = os.open(f"/proc/self/fd/{self.memfd}", os.O_RDWR)
        try:
            if self.protocol & P_MEM_SLOTS:
                self._send("ADD_MEM_REG", V.make("vhost_user_mem_reg", region=region), [fd], ack=ack)
            else:
                self._send("SET_MEM_TABLE", [region], [fd], ack=ack)
        finally:
            os.close(fd)
        event_idx = bool(self.features & F_EVENT_IDX)
        for q, num in sorted(self.neg.queue_sizes.items()):
            lay = vio.split_ring_layout(num)
            desc = self._ring_base[q]
            avail = desc + _round(lay.desc_size)
            used = avail + _round(lay.avail_size)
            self.rings[q] = GuestRing(num, self.view(desc, lay.desc_size), self.view(avail, lay.avail_size),
                                      self.view(used, lay.used_size))
            if event_idx:
                self.rings[q].set_used_event(0)
            self._send("SET_VRING_NUM", V.make("vhost_vring_state", index=q, num=num), ack=ack)
            self._send("SET_VRING_BASE", V.make("vhost_vring_state", index=q, num=0), ack=ack)
            self._send("SET_VRING_ADDR", V.make("vhost_vring_addr", index=q, descriptor=UVA + desc,
                                                used=UVA + used, available=UVA + avail), ack=ack)
            self.kick[q] = os.eventfd(0, os.EFD_CLOEXEC)
            self.call[q] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._send("SET_VRING_CALL", V.u64(q), [self.call[q]], ack=ack)
            self._send("SET_VRING_KICK", V.u64(q), [self.kick[q]], ack=ack)
            if self.features & F_PROTOCOL:
                self._send("SET_VRING_ENABLE", V.make("vhost_vring_state", index=q, num=1), ack=ack)

    # -- data plane ------------------------------------------------------------------------------
    def free_slots(self, queue: int) -> int:
        return len(self._free[queue])

    def submit(self, queue: int, raw: bytes, reply_size: int, token: Any, split: int = 0) -> None:
        """Put one request on `queue` (kicks at once); `reply_size` 0 = no reply buffer (FORGET).

        `split` > 0 puts bytes from there on in a descriptor of their own, as Linux does with a WRITE's
        pages (the C virtiofsd's WRITE path expects the data apart from the header and fuse_write_in)."""
        if len(raw) > self.req_size:
            raise FrontError(f"a request of {len(raw)} bytes exceeds the front-end's buffers ({self.req_size})")
        slot = self._free[queue].pop()
        reply_size = min(reply_size, self.reply_size)
        self.view(slot.req, len(raw))[:] = raw
        segs = ([(slot.req, split, False), (slot.req + split, len(raw) - split, False)] if 0 < split < len(raw)
                else [(slot.req, len(raw), False)])
        segs += ([(slot.reply, reply_size, True)] if reply_size else [])
        ring = self.rings[queue]
        if self.features & F_INDIRECT_DESC:
            assert len(segs) <= 3
            descs = [(a, n, (F_WRITE if w else 0) | (F_NEXT if i + 1 < len(segs) else 0), i + 1 if i + 1 < len(segs)
                      else 0) for i, (a, n, w) in enumerate(segs)]
            table = pack_descs(descs)
            self.view(slot.table, len(table))[:] = table
            head = slot.index
            ring.set_desc(head, slot.table, len(table), F_INDIRECT)
        else:
            head = 4 * slot.index
            for i, (a, n, w) in enumerate(segs):
                last = i + 1 == len(segs)
                ring.set_desc(head + i, a, n, (F_WRITE if w else 0) | (0 if last else F_NEXT), 0 if last else head + i + 1)
        self._busy[(queue, head)] = (slot, token)
        ring.publish([head])
        os.eventfd_write(self.kick[queue], 1)

    def roundtrip(self, raw: bytes, reply_size: int = 4096, queue: int = 1) -> bytes:
        """One request, waited for: its reply's bytes (benchmarks; other requests' replies are dropped)."""
        token = object()
        self.submit(queue, raw, reply_size, token)
        deadline = time.monotonic() + self.timeout
        while (left := deadline - time.monotonic()) > 0:
            for t, reply in self.poll(left):
                if t is token:
                    return reply
        raise FrontError(f"no reply within {self.timeout:.0f} s")

    def in_flight(self) -> int:
        return len(self._busy)

    def poll(self, timeout: float) -> list[tuple[Any, bytes]]:
        """(token, reply bytes) of every request the back-end has finished; waits up to `timeout` for one.

        Raises FrontError when the back-end closed its socket (it died or gave up on us)."""
        out = self._collect()
        if out or timeout <= 0:
            return out
        fds: list[Any] = [*self.call.values(), self.sock]
        ready = select.select(fds, [], [], timeout)[0]
        if self.sock in ready:
            self._check_alive()
        for fd in self.call.values():
            if fd in ready:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
        return self._collect()

    def _check_alive(self) -> None:
        try:
            data = self.sock.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            raise FrontError(f"the back-end's vhost-user connection failed: {e.strerror or e}") from None
        if not data:
            raise FrontError("the back-end closed its vhost-user connection (it died or stopped)")
        self.sock.recv(len(data))  # an unsolicited message: nothing in this protocol needs one answered

    def _collect(self) -> list[tuple[Any, bytes]]:
        out = []
        for q, ring in self.rings.items():
            for head, length in ring.collect_used():
                item = self._busy.pop((q, head), None)
                if item is None:
                    raise FrontError(f"the back-end returned descriptor {head} on queue {q}, which was not in flight")
                slot, token = item
                out.append((token, bytes(self.view(slot.reply, min(length, self.reply_size)))))
                self._free[q].append(slot)
            if self.features & F_EVENT_IDX:
                ring.set_used_event(ring.last_used)
        return out

    def close(self) -> None:
        self.sock.close()
        if self.backend_fd is not None:
            self.backend_fd.close()
        self.rings.clear()
        for fd in [*self.kick.values(), *self.call.values()]:
            os.close(fd)
        self.kick.clear()
        self.call.clear()
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1


def _round(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def connect_backend(path: Path, gone: Callable[[], str | None], timeout: float = 10.0,
                    detail: Callable[[], str] = lambda: "") -> socket.socket:
    """The connection to the back-end we started, once it listens (unixsock.connect_when_listening); its
    failures as FrontError."""
    try:
        return connect_when_listening(str(path), timeout, gone=gone, detail=detail)
    except ConnectError as e:
        raise FrontError(str(e)) from None
