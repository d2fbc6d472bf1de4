"""The vhost-user transport driven message by message, as a front-end: real memfd guest memory, real
eventfds, the real engine and passthrough filesystem, the driver side of the rings (dissectors.ring.driver).

This covers what QEMU 7.2 does not do in a normal boot (so the guest tests can't): SET_MEM_TABLE with
an mmap_offset (QEMU uses ADD_MEM_REG when CONFIGURE_MEM_SLOTS is offered), REM_MEM_REG, the call fd
swapped mid-traffic, NOFD refused with a REPLY_ACK error, GET_VRING_BASE with requests in flight,
RESET_DEVICE, and the end of the connection leaving no fd or thread behind.
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.passthrough import Options
from daemon.server import Server
from daemon.transport.vhost_user import DEVICE_FEATURES, PROTOCOL_FEATURES, VhostUserSession
from daemon.vhost import GuestPassthroughFS
from dissectors import fuse as F
from dissectors import vhost_user as V
from dissectors.ring.driver import F_INDIRECT, F_WRITE, GuestRing, pack_descs
from dissectors.spec import vhost_user as vspec
from dissectors.spec import virtio as vio
from dissectors.transport.wire import recv_message, send_message

P = vspec.PROTOCOL_F.by_name()
FB = vio.VIRTIO_F.by_name()
MEM_SIZE = 4 << 20
MMAP_OFFSET = 0x2000  # the region starts this far into the memfd (libvhost-user maps from 0)
GPA = 0x10000
UVA = 0x7F12_3400_0000
NUM = 64


@dataclass
class Frontend:
    """The test's QEMU role: one socket, guest memory, and the driver half of queues 0 and 1."""

    sock: socket.socket
    mem: mmap.mmap
    rings: dict[int, GuestRing]
    kick: dict[int, int]
    call: dict[int, int]
    memfd: int = -1
    next_buf: int = 0x100000
    unique: int = 0

    def send(self, name: str, payload: Any = None, fds: list[int] | None = None, need_reply: bool = False) -> None:
        msg = V.build(name, payload, fds=fds)
        if need_reply:
            msg.flags |= 0x8
        send_message(self.sock, V.encode_message(msg), fds)

    def recv(self) -> V.VhostUserMessage:
        raw, fds = recv_message(self.sock)
        return V.decode_message(raw, fds)

    def ask(self, name: str, payload: Any = None) -> Any:
        self.send(name, payload)
        rep = self.recv()
        assert rep.is_reply and rep.name == name
        return rep.payload

    def acked(self, name: str, payload: Any = None, fds: list[int] | None = None) -> int:
        self.send(name, payload, fds, need_reply=True)
        rep = self.recv()
        assert rep.is_reply and rep.name == name
        return int(rep.payload.u64)

    def gpa_view(self, gpa: int, n: int) -> memoryview:
        off = MMAP_OFFSET + gpa - GPA
        return memoryview(self.mem)[off:off + n]

    def alloc(self, n: int) -> int:
        gpa = GPA + self.next_buf
        self.next_buf += (n + 63) & ~63
        return gpa

    def submit(self, q: int, request: bytes, reply_size: int) -> tuple[int, int]:
        """One request as the Linux driver sends it: an INDIRECT descriptor (readable, then writable)."""
        req_gpa, out_gpa, table = self.alloc(len(request)), self.alloc(reply_size), self.alloc(32)
        self.gpa_view(req_gpa, len(request))[:] = request
        self.gpa_view(table, 32)[:] = pack_descs([(req_gpa, len(request), 1, 1), (out_gpa, reply_size, F_WRITE, 0)])
        ring = self.rings[q]
        head = ring.avail_idx % NUM
        ring.set_desc(head, table, 32, F_INDIRECT)
        ring.publish([head])
        os.eventfd_write(self.kick[q], 1)
        return head, out_gpa

    def wait_call(self, q: int, timeout: float = 5.0) -> None:
        r, _, _ = select.select([self.call[q]], [], [], timeout)
        assert r, f"no call on queue {q}"
        os.eventfd_read(self.call[q])

    def fuse(self, op: str, args: dict[str, Any] | None = None, nodeid: int = 1, reply_size: int = 4096) -> F.Reply:
        self.unique += 1
        raw = F.encode_request(op, args, unique=self.unique, nodeid=nodeid)
        _head, out_gpa = self.submit(1, raw, reply_size)
        ring = self.rings[1]
        used: list[tuple[int, int]] = []
        while not used:
            self.wait_call(1)
            used = ring.collect_used()
        ring.set_used_event(ring.last_used)  # EVENT_IDX, as Linux: a call for the next completion
        (_id, length), = used
        rep = F.decode_reply(bytes(self.gpa_view(out_gpa, length)), F.decode_request(raw))
        assert isinstance(rep, F.Reply)
        return rep


@contextmanager
def session(share: Path) -> Iterator[tuple[Frontend, VhostUserSession, threading.Thread]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fs = GuestPassthroughFS(Options(str(share)))
    server = Server(fs)
    s = VhostUserSession(theirs, server)
    fs.chain_for = s.chains.get
    t = threading.Thread(target=s.serve, name="vhost-session")
    t.start()
    memfd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(memfd, MMAP_OFFSET + MEM_SIZE)
    mem = mmap.mmap(memfd, MMAP_OFFSET + MEM_SIZE)
    fe = Frontend(ours, mem, {}, {}, {}, memfd)
    try:
        yield fe, s, t
    finally:
        ours.close()
        t.join(10)
        server.shutdown()
        fs.close()
        for fd in [memfd, *fe.kick.values(), *fe.call.values()]:
            os.close(fd)
        fe.rings.clear()  # the driver's views into our own mapping
        gc.collect()
        mem.close()


def setup_queues(fe: Frontend, memfd_path: str, *, table: bool) -> None:
    """QEMU's sequence (proxy-notes.md), with SET_MEM_TABLE instead of ADD_MEM_REG when `table`."""
    feats = fe.ask("GET_FEATURES").u64
    assert feats == DEVICE_FEATURES
    assert feats & FB["VIRTIO_F_VERSION_1"] and feats & FB["VIRTIO_RING_F_INDIRECT_DESC"] and feats & FB["VIRTIO_RING_F_EVENT_IDX"]
    proto = fe.ask("GET_PROTOCOL_FEATURES").u64
    assert proto == PROTOCOL_FEATURES and not proto & (P["BACKEND_REQ"] | P["LOG_SHMFD"] | P["INFLIGHT_SHMFD"])
    fe.send("SET_PROTOCOL_FEATURES", V.u64(proto))
    assert fe.ask("GET_QUEUE_NUM").u64 == 2
    assert fe.ask("GET_MAX_MEM_SLOTS").u64 >= 8
    fe.send("SET_OWNER")
    fe.send("SET_FEATURES", V.u64(feats))
    region = V.make("vhost_user_memory_region", guest_address=GPA, size=MEM_SIZE, user_address=UVA,
                    mmap_offset=MMAP_OFFSET)
    fd = os.open(memfd_path, os.O_RDWR)
    try:
        if table:
            msg = V.build("SET_MEM_TABLE", [region], fds=[fd])
            msg.flags |= 0x8
            send_message(fe.sock, V.encode_message(msg), [fd])
            rep = fe.recv()
            assert rep.payload.u64 == 0
        else:
            assert fe.acked("ADD_MEM_REG", V.make("vhost_user_mem_reg", region=region), [fd]) == 0
    finally:
        os.close(fd)
    lay = vio.split_ring_layout(NUM)
    for q in (0, 1):
        desc, avail, used = fe.alloc(lay.desc_size), fe.alloc(lay.avail_size), fe.alloc(lay.used_size)
        fe.rings[q] = GuestRing(NUM, fe.gpa_view(desc, lay.desc_size), fe.gpa_view(avail, lay.avail_size),
                                fe.gpa_view(used, lay.used_size))
        fe.send("SET_VRING_NUM", V.make("vhost_vring_state", index=q, num=NUM))
        fe.send("SET_VRING_BASE", V.make("vhost_vring_state", index=q, num=0))
        fe.send("SET_VRING_ADDR", V.make("vhost_vring_addr", index=q, descriptor=UVA + desc - GPA,
                                         used=UVA + used - GPA, available=UVA + avail - GPA))
        fe.kick[q] = os.eventfd(0, os.EFD_CLOEXEC)
        fe.call[q] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        fe.send("SET_VRING_CALL", V.u64(q), [fe.call[q]])
        fe.send("SET_VRING_KICK", V.u64(q), [fe.kick[q]])
        fe.send("SET_VRING_ENABLE", V.make("vhost_vring_state", index=q, num=1))


def _fuse_init(fe: Frontend) -> None:
    init = F.make("fuse_init_in", major=7, minor=38, max_readahead=128 << 10, flags=0)
    rep = fe.fuse("INIT", {"init": init}, nodeid=0)
    assert rep.error == 0 and rep.args["init_out"].major == 7


@pytest.mark.parametrize("table", [True, False], ids=["set_mem_table", "add_mem_reg"])
def test_requests_call_swap_forget_read_and_stop(tmp_path: Path, table: bool) -> None:
    share = tmp_path / "share"
    share.mkdir()
    payload = os.urandom(200_000)
    (share / "f.bin").write_bytes(payload)
    fds_before = set(os.listdir("/proc/self/fd"))
    threads_before = set(threading.enumerate())
    with session(share) as (fe, s, t):
        setup_queues(fe, f"/proc/self/fd/{fe.memfd}", table=table)  # a fresh fd to the memfd, as QEMU sends
        _fuse_init(fe)
        # The call fd changes while requests flow (QEMU's MSI-X mask/unmask): every request completes.
        for i in range(40):
            if i == 20:
                new = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                fe.send("SET_VRING_CALL", V.u64(1), [new])
                os.close(fe.call[1])
                fe.call[1] = new
            assert fe.fuse("GETATTR", {"getattr": F.make("fuse_getattr_in")}).error == 0
        # Zero-copy READ lands byte-identical in guest memory.
        e = fe.fuse("LOOKUP", {"name": b"f.bin"}).args["entry"]
        fh = fe.fuse("OPEN", {"open": F.make("fuse_open_in", flags=os.O_RDONLY)}, nodeid=e.nodeid).args["open"].fh
        rep = fe.fuse("READ", {"read": F.make("fuse_read_in", fh=fh, offset=1000, size=131072)}, nodeid=e.nodeid,
                      reply_size=16 + 131072)
        assert rep.error == 0 and bytes(rep.args["data"]) == payload[1000:1000 + 131072]
        # FORGET on the hiprio queue completes with used.len 0.
        fe.unique += 1
        head, _ = fe.submit(0, F.encode_request("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)},
                                                unique=fe.unique, nodeid=e.nodeid), 0)
        fe.wait_call(0)
        assert fe.rings[0].collect_used() == [(head, 0)]
        # A kick fd without an fd (polling mode) is refused, with a REPLY_ACK error, and traffic goes on.
        assert fe.acked("SET_VRING_KICK", V.u64(1 | vspec.VRING_NOFD_MASK)) != 0
        assert fe.fuse("GETATTR", {"getattr": F.make("fuse_getattr_in")}).error == 0
        # Stop: GET_VRING_BASE answers the next avail index of each queue.
        n1 = fe.rings[1].avail_idx
        fe.send("SET_VRING_ENABLE", V.make("vhost_vring_state", index=1, num=0))
        assert fe.ask("GET_VRING_BASE", V.make("vhost_vring_state", index=1)).num == n1
        assert fe.ask("GET_VRING_BASE", V.make("vhost_vring_state", index=0)).num == 1
        if not table:
            region = V.make("vhost_user_memory_region", guest_address=GPA, size=MEM_SIZE, user_address=UVA,
                            mmap_offset=MMAP_OFFSET)
            assert fe.acked("REM_MEM_REG", V.make("vhost_user_mem_reg", region=region)) == 0
            assert fe.acked("REM_MEM_REG", V.make("vhost_user_mem_reg", region=region)) != 0  # gone already
        assert fe.acked("RESET_DEVICE") == 0
        counters = s.counters()
    assert not t.is_alive()
    assert counters["queues"][0]["chains"] == 1 and counters["queues"][1]["chains"] == 45
    assert set(os.listdir("/proc/self/fd")) == fds_before
    assert set(threading.enumerate()) == threads_before


def test_disconnect_mid_traffic_releases_everything(tmp_path: Path) -> None:
    """QEMU vanishes with requests queued: the session ends, nothing is left behind."""
    share = tmp_path / "share"
    share.mkdir()
    fds_before = set(os.listdir("/proc/self/fd"))
    threads_before = set(threading.enumerate())
    with session(share) as (fe, s, t):
        setup_queues(fe, f"/proc/self/fd/{fe.memfd}", table=False)
        _fuse_init(fe)
        for _ in range(20):
            fe.unique += 1
            fe.submit(1, F.encode_request("GETATTR", {"getattr": F.make("fuse_getattr_in")}, unique=fe.unique,
                                          nodeid=1), 256)
        fe.sock.shutdown(socket.SHUT_RDWR)
        t.join(10)
        assert not t.is_alive() and s.closed
    assert set(os.listdir("/proc/self/fd")) == fds_before
    assert set(threading.enumerate()) == threads_before


def test_a_reply_from_the_front_end_is_refused_and_the_session_goes_on(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A front-end message with the REPLY flag (found by the vhost-user fuzz): SET_VRING_NUM decoded as its
    reply (a u64) reached the request handler, which died on a TypeError with a traceback and ended the
    session.  It is refused in one line (a NAK when an ack was asked for); the session goes on."""
    share = tmp_path / "share"
    share.mkdir()
    with session(share) as (fe, s, t):
        assert fe.ask("GET_PROTOCOL_FEATURES").u64 & P["REPLY_ACK"]
        fe.send("SET_PROTOCOL_FEATURES", V.u64(P["REPLY_ACK"]))
        for need_reply in (False, True):
            raw = bytearray(V.encode_message(V.build("SET_VRING_NUM", V.u64(5), reply=True)))
            raw[4] |= 0x8 if need_reply else 0
            with caplog.at_level(logging.ERROR, logger="fsinspect.daemon"):
                send_message(fe.sock, bytes(raw))
                if need_reply:
                    rep = fe.recv()
                    assert rep.is_reply and rep.name == "SET_VRING_NUM" and rep.payload.u64 != 0
                assert fe.ask("GET_QUEUE_NUM").u64 == 2  # still serving
        assert t.is_alive() and not s.closed
    refusals = [r for r in caplog.records if "SET_VRING_NUM" in r.getMessage()]
    assert len(refusals) == 2 and not any(r.exc_info for r in caplog.records), caplog.text
    assert all("reply" in r.getMessage() for r in refusals)


def test_fds_a_message_does_not_take_are_closed(tmp_path: Path) -> None:
    """Found by the vhost-user fuzz: fds sent along with a message that takes none (GET_FEATURES with a
    pipe), and the kick/call/err fd of a vring out of range, stayed open in the back-end for good (a
    front-end could exhaust its fds).  Each is closed on arrival; the session goes on."""
    share = tmp_path / "share"
    share.mkdir()
    r, w = os.pipe()
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    with session(share) as (fe, s, t):
        fe.send("SET_PROTOCOL_FEATURES", V.u64(P["REPLY_ACK"]))
        fe.ask("GET_QUEUE_NUM")
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            fe.send("GET_FEATURES", None, fds=[r, w])
            assert fe.recv().name == "GET_FEATURES"
            assert fe.acked("SET_VRING_NUM", V.make("vhost_vring_state", index=0, num=NUM), fds=[r]) == 0
            for name in ("SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR"):
                assert fe.acked(name, V.u64(7), fds=[efd]) != 0  # vring 7 does not exist
        assert len(os.listdir("/proc/self/fd")) == before
        assert t.is_alive() and not s.closed
    for fd in (r, w, efd):
        os.close(fd)


def test_a_ring_resized_while_it_runs_is_refused_and_a_bad_head_never_kills_the_queue(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found by the vhost-user fuzz: SET_VRING_NUM 128 on a running 64-entry ring was taken, so a chain head
    of 100 in the avail ring passed the `head < vr.num` check, its used entry overflowed the real ring
    (RingError head_range) and the queue thread died with a traceback: the guest's later requests hung.
    A running ring's size is refused (NAK); a bad head is judged against the ring's own size."""
    share = tmp_path / "share"
    share.mkdir()
    with session(share) as (fe, s, t), caplog.at_level(logging.WARNING, logger="fsinspect.daemon"):
        setup_queues(fe, f"/proc/self/fd/{fe.memfd}", table=True)
        _fuse_init(fe)
        assert fe.acked("SET_VRING_NUM", V.make("vhost_vring_state", index=1, num=128)) != 0
        fe.rings[1].publish([100])  # a head past the 64-entry ring
        os.eventfd_write(fe.kick[1], 1)
        rep = fe.fuse("GETATTR", {"getattr": F.make("fuse_getattr_in")})  # the queue still serves
        assert rep.error == 0
        assert t.is_alive() and not s.closed
    assert not any(r.exc_info for r in caplog.records), caplog.text
    assert any("malformed chain" in r.getMessage() for r in caplog.records), caplog.text


class _RaisingFastPath:
    """A fast path with a bug: every call raises."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, buf: bytes, chain: object = None) -> bytes | None:
        """Called as the real one is: the vhost-user queue thread passes the chain too (a READ's sink)."""
        self.calls += 1
        raise RuntimeError("a bug in the fast path")

    def counts(self) -> tuple[dict[int, int], dict[tuple[int, int], int], int]:
        return {}, {}, 0


def test_a_fast_path_that_raises_leaves_the_request_to_python(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The queue thread calls the fast path itself (no Server.handle frame): a request it fails on still gets
    the Python path's answer, a FORGET is still completed with used.len 0, and the queue thread lives on."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"x")
    with session(share) as (fe, s, t):
        setup_queues(fe, f"/proc/self/fd/{fe.memfd}", table=False)
        _fuse_init(fe)
        broken = _RaisingFastPath()
        s.server.fast = broken
        with caplog.at_level(logging.WARNING, logger="fsinspect.daemon"):
            e = fe.fuse("LOOKUP", {"name": b"f"})
            assert e.error == 0 and e.args["entry"].attr.size == 1
            fe.unique += 1
            head, _ = fe.submit(0, F.encode_request("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)},
                                                    unique=fe.unique, nodeid=e.args["entry"].nodeid), 0)
            fe.wait_call(0)
            assert fe.rings[0].collect_used() == [(head, 0)]
            assert fe.fuse("GETATTR", {"getattr": F.make("fuse_getattr_in")}).error == 0
        assert broken.calls == 3
        assert "the fast path failed on a request" in caplog.text
        assert t.is_alive() and all(vr.thread is not None and vr.thread.is_alive() for vr in s.vrings)
