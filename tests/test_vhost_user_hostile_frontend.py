"""A hostile vhost-user front-end against the real proxy (in front of the C virtiofsd) and the real daemon.

Each case sends what no QEMU would: memory regions that overlap, are empty, exceed their fd, come as a
pipe or a read-only fd, or sit at mmap_offset 2^63; kick and call fds that are not eventfds; unknown
requests and oversized headers; a flood of SET_VRING_KICK.  The back-end must refuse by name, never
print a traceback, end cleanly (the proxy with its one-screen summary) and stop within 1 s of SIGTERM in
every state: waiting for a front-end, connected, half-way through a message, with queues running.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dissectors import vhost_user as V
from dissectors.spec import vhost_user as vspec
from dissectors.spec import virtio as vio
from dissectors.transport.wire import PeerClosed, WireError, recv_message, send_message
from fsinspect.guest.launcher import short_tmpdir, stop_process

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
MEM = 1 << 20
UVA = 0x7F00_0000_0000
NUM = 64
STOP_WITHIN = 1.0

needs_virtiofsd = pytest.mark.skipif(not os.access(VIRTIOFSD, os.X_OK), reason=f"{VIRTIOFSD} not installed")


@dataclass
class Target:
    kind: str  # "proxy" | "daemon"
    proc: subprocess.Popen[bytes]
    sock: Path
    work: Path

    def connect(self) -> socket.socket:
        deadline = time.monotonic() + 10
        while True:  # the socket file appears at bind(), a moment before listen()
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                c.connect(str(self.sock))
                return c
            except ConnectionRefusedError:
                c.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def finish(self, timeout: float = 15) -> tuple[int, str]:
        """Wait for the exit; returns (rc, stderr)."""
        rc = self.proc.wait(timeout)
        assert self.proc.stderr is not None
        return rc, self.proc.stderr.read().decode(errors="replace")

    def summary(self) -> dict[str, Any]:
        return json.loads((self.work / "s.json").read_text())

    def cpu_seconds(self) -> float:
        """User + system CPU of the process, all threads."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spawn(cmd: list[str], sock: Path) -> subprocess.Popen[bytes]:
    """`fsinspect CMD` in its own process group, once it has made `sock`."""
    p = subprocess.Popen([sys.executable, "-m", "fsinspect", *cmd], stdin=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 20
    while not sock.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            stop_process(p)
            raise AssertionError(f"{cmd[0]}: the socket never appeared")
        time.sleep(0.02)
    return p


@contextmanager
def target(kind: str) -> Iterator[Target]:
    with short_tmpdir() as work:
        (work / "share").mkdir()
        if kind == "proxy":
            sock = work / "p.sock"
            cmd = ["proxy", "--listen", str(sock), "--shared-dir", str(work / "share"),
                   "--summary-json", str(work / "s.json")]
        else:
            sock = work / "d.sock"
            cmd = ["daemon", "--socket-path", str(sock), "--shared-dir", str(work / "share")]
        p = _spawn(cmd, sock)
        try:
            yield Target(kind, p, sock, work)
        finally:
            stop_process(p)  # the process group: the proxy's virtiofsd too


def clean(rc: int, err: str) -> None:
    assert rc == 0, err
    assert "Traceback" not in err, err


def send(c: socket.socket, name: str, payload: Any = None, fds: list[int] | None = None, flags: int = 0) -> None:
    msg = V.build(name, payload, fds=fds)
    msg.flags |= flags
    send_message(c, V.encode_message(msg), fds)


def ask(c: socket.socket, name: str, payload: Any = None) -> Any:
    send(c, name, payload)
    raw, _ = recv_message(c)
    rep = V.decode_message(raw)
    assert rep.is_reply and rep.name == name
    return rep.payload


def region(gpa: int, size: int, uva: int, offset: int = 0) -> Any:
    return V.make("vhost_user_memory_region", guest_address=gpa, size=size, user_address=uva, mmap_offset=offset)


def memfd(size: int) -> int:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@dataclass
class Guest:
    """Just enough of QEMU to get queue 1 running: guest memory in a memfd and the ring areas in it."""

    c: socket.socket
    fd: int
    mem: mmap.mmap
    kick: int
    call: int


def start_queues(c: socket.socket) -> Guest:
    feats = ask(c, "GET_FEATURES").u64
    proto = ask(c, "GET_PROTOCOL_FEATURES").u64
    send(c, "SET_PROTOCOL_FEATURES", V.u64(proto & ~(1 << 3)))  # no REPLY_ACK: fewer round trips
    send(c, "SET_OWNER")
    send(c, "SET_FEATURES", V.u64(feats))
    fd = memfd(MEM)
    send(c, "SET_MEM_TABLE", [region(0, MEM, UVA)], fds=[fd])
    lay = vio.split_ring_layout(NUM)
    kick, call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    for q in (0, 1):
        base = 0x10000 * (q + 1)
        send(c, "SET_VRING_NUM", V.make("vhost_vring_state", index=q, num=NUM))
        send(c, "SET_VRING_BASE", V.make("vhost_vring_state", index=q, num=0))
        send(c, "SET_VRING_ADDR", V.make("vhost_vring_addr", index=q, descriptor=UVA + base,
                                         available=UVA + base + lay.desc_size, used=UVA + base + 0x8000))
        send(c, "SET_VRING_CALL", V.u64(q), [call])
        send(c, "SET_VRING_KICK", V.u64(q), [kick])
        send(c, "SET_VRING_ENABLE", V.make("vhost_vring_state", index=q, num=1))
    ask(c, "GET_FEATURES")  # a round trip: everything before it has been handled
    return Guest(c, fd, mmap.mmap(fd, MEM), kick, call)


# ---- malformed memory regions ---------------------------------------------------------------------
def _ro_file(work: Path) -> int:
    (work / "ro").write_bytes(bytes(MEM))
    return os.open(work / "ro", os.O_RDONLY | os.O_CLOEXEC)


REGION_CASES: dict[str, tuple[Any, str]] = {
    "overlap": (lambda w: ([region(0, MEM, UVA), region(MEM // 2, MEM, UVA + 2 * MEM)], [memfd(MEM), memfd(MEM)]),
                "overlaps region gpa 0x0"),
    "zero_size": (lambda w: ([region(0, 0, UVA)], [memfd(MEM)]), "zero size"),
    "larger_than_fd": (lambda w: ([region(0, 4 * MEM, UVA)], [memfd(MEM)]), "the region needs 4194304"),
    "pipe": (lambda w: ([region(0, MEM, UVA)], [os.pipe()[0]]), "not a file that can hold guest memory"),
    "read_only": (lambda w: ([region(0, MEM, UVA)], [_ro_file(w)]), "is not open read-write"),
    "offset_2_63": (lambda w: ([region(0, MEM, UVA, 1 << 63)], [memfd(MEM)]), "exceeds what mmap can map"),
}


@pytest.mark.parametrize("case", list(REGION_CASES))
@pytest.mark.parametrize("kind", [pytest.param("proxy", marks=needs_virtiofsd), "daemon"])
def test_bad_memory_region_refused(kind: str, case: str) -> None:
    make, says = REGION_CASES[case]
    with target(kind) as t:
        c = t.connect()
        regions, fds = make(t.work)
        ask(c, "GET_FEATURES")
        send(c, "SET_MEM_TABLE", regions, fds=fds, flags=0x8)
        for fd in fds:
            os.close(fd)
        if kind == "daemon":
            # Refused, and the connection goes on: the next request is answered.
            assert ask(c, "GET_QUEUE_NUM").u64 == 2
            c.close()
        rc, err = t.finish()
        clean(rc, err)
        assert says in err
        if kind == "proxy":
            s = t.summary()
            assert "protocol violation: SET_MEM_TABLE refused" in s["end_reason"] and says in s["end_reason"]
            assert f"fsinspect proxy: {s['end_reason']}" in err and "FUSE: 0 requests" in err
        else:
            assert "SET_MEM_TABLE failed" in err and len([ln for ln in err.splitlines() if says in ln]) == 1


# ---- fds that are not eventfds -----------------------------------------------------------------------
def _not_eventfd(what: str, work: Path) -> int:
    if what == "dev_zero":
        return os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
    if what == "empty_file":
        (work / "empty").touch()
        return os.open(work / "empty", os.O_RDONLY | os.O_CLOEXEC)
    ep = select.epoll()
    fd = os.dup(ep.fileno())
    ep.close()
    return fd


@pytest.mark.parametrize("which,what", [("KICK", "dev_zero"), ("KICK", "empty_file"), ("CALL", "epoll")])
@pytest.mark.parametrize("kind", [pytest.param("proxy", marks=needs_virtiofsd), "daemon"])
def test_fd_that_is_not_an_eventfd_refused(kind: str, which: str, what: str) -> None:
    """On a running queue: refused by name, and the process does not spin (CPU over 1 s stays low)."""
    with target(kind) as t:
        c = t.connect()
        g = start_queues(c)
        bad = _not_eventfd(what, t.work)
        cpu0 = t.cpu_seconds()
        send(c, f"SET_VRING_{which}", V.u64(1), [bad])
        os.close(bad)
        time.sleep(1.0)
        spent = t.cpu_seconds() - cpu0
        if kind == "daemon":
            assert ask(c, "GET_QUEUE_NUM").u64 == 2  # still serving
            c.close()
        rc, err = t.finish()
        os.close(g.fd)
        summary = t.summary() if kind == "proxy" else {}
    clean(rc, err)
    assert "not an eventfd" in err
    assert spent < 0.5, f"{spent:.2f} s of CPU in the second after SET_VRING_{which} with {what}"
    if kind == "proxy":
        assert f"SET_VRING_{which} refused" in summary["end_reason"]
        # Our memfd is not sealed (QEMU's is): the summary says the front-end is trusted with its size.
        assert summary["unsealed_regions"] == 1 and "not sealed against shrinking" in err
    else:
        assert "is not sealed against shrinking" in err


# ---- undecodable input --------------------------------------------------------------------------------
def test_daemon_unknown_request_and_oversized_header_are_one_line_errors() -> None:
    with target("daemon") as t:
        c = t.connect()
        send_message(c, V.HEADER.struct.pack(200, 1, 8) + bytes(8))
        assert ask(c, "GET_QUEUE_NUM").u64 == 2  # refused, the session goes on
        send_message(c, V.HEADER.struct.pack(1, 1, 1 << 30))
        rc, err = t.finish()
    clean(rc, err)
    lines = err.splitlines()
    assert sum("request 200 refused: vhost-user: unknown front-end request 200" in ln for ln in lines) == 1
    assert sum("vhost-user session ended: not a vhost-user header" in ln for ln in lines) == 1


@needs_virtiofsd
def test_proxy_survives_a_flood_of_kick_fds() -> None:
    """65,721 SET_VRING_KICK filled a wake pipe nobody drained (BlockingIOError): 70,000 are harmless."""
    with target("proxy") as t:
        c = t.connect()
        ask(c, "GET_FEATURES")
        for _ in range(70_000):
            fd = os.eventfd(0, os.EFD_CLOEXEC)
            send(c, "SET_VRING_KICK", V.u64(0), [fd])
            os.close(fd)
        assert ask(c, "GET_QUEUE_NUM") is not None  # still answering
        c.close()
        rc, err = t.finish()
        end = t.summary()["end_reason"]
    clean(rc, err)
    assert end == "QEMU disconnected", end


# ---- SIGTERM in every state ---------------------------------------------------------------------------
STATES = ["waiting", "connected", "half_header", "half_payload", "queues_running"]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("kind", [pytest.param("proxy", marks=needs_virtiofsd), "daemon"])
def test_sigterm_stops_within_a_second(kind: str, state: str) -> None:
    with target(kind) as t:
        c = None
        g = None
        if state != "waiting":
            c = t.connect()
            ask(c, "GET_FEATURES")
        if state == "half_header":
            assert c is not None
            c.sendall(V.HEADER.struct.pack(15, 1, 8)[:7])
        elif state == "half_payload":
            assert c is not None
            c.sendall(V.HEADER.struct.pack(15, 1, 8) + b"\x01\x02")
        elif state == "queues_running":
            assert c is not None
            g = start_queues(c)
        time.sleep(0.3)  # let it settle in that state
        t0 = time.monotonic()
        t.proc.send_signal(signal.SIGTERM)
        try:
            t.proc.wait(5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{kind} still running 5 s after SIGTERM ({state})")
        took = time.monotonic() - t0
        rc, err = t.finish()
        if c is not None:
            c.close()
        if g is not None:
            os.close(g.fd)
    clean(rc, err)
    assert took < STOP_WITHIN, f"{kind} took {took:.2f} s to stop on SIGTERM ({state})"
    if kind == "proxy":
        assert "fsinspect proxy: stopped" in err



def test_daemon_sigterm_with_a_lock_wait_in_flight() -> None:
    """A SETLKW blocked on a host lock is in flight: SIGTERM answers it ENOLCK and stops within 1 s (the
    session used to wait 30 s for its in-flight requests first)."""
    import fcntl

    from dissectors import fuse as F
    from tests import test_daemon_vhost_user_protocol as P

    with target("daemon") as t:
        (t.work / "share" / "f").write_text("x")
        c = t.connect()
        fd = memfd(P.MMAP_OFFSET + P.MEM_SIZE)
        fe = P.Frontend(c, mmap.mmap(fd, P.MMAP_OFFSET + P.MEM_SIZE), {}, {}, {}, fd)
        P.setup_queues(fe, f"/proc/self/fd/{fd}", table=True)
        P._fuse_init(fe)
        hold = os.open(t.work / "share" / "f", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.lockf(hold, fcntl.LOCK_EX)  # this process holds the file's POSIX lock on the host
            e = fe.fuse("LOOKUP", {"name": b"f"}).args["entry"]
            fh = fe.fuse("OPEN", {"open": F.make("fuse_open_in", flags=os.O_RDWR)}, nodeid=e.nodeid).args["open"].fh
            fe.unique += 1
            lk = F.make("fuse_lk_in", fh=fh, owner=7, lk=F.make("fuse_file_lock", start=0, end=2**63 - 1, type=1))
            _head, out_gpa = fe.submit(1, F.encode_request("SETLKW", {"lk": lk}, unique=fe.unique, nodeid=e.nodeid),
                                       256)
            time.sleep(0.5)
            assert not fe.rings[1].collect_used()  # still waiting for the lock
            t0 = time.monotonic()
            t.proc.send_signal(signal.SIGTERM)
            t.proc.wait(10)
            took = time.monotonic() - t0
            rc, err = t.finish()
            used = fe.rings[1].collect_used()
            error = struct.unpack_from("<IiQ", fe.gpa_view(out_gpa, 16))[1]
        finally:
            os.close(hold)
            fe.rings.clear()
            c.close()
            os.close(fd)
    clean(rc, err)
    assert took < STOP_WITHIN, f"{took:.2f} s"
    assert len(used) == 1 and error == -errno.ENOLCK  # the waiter was answered, not abandoned


# ---- random requests ------------------------------------------------------------------------------------
SIZES = {None: 0, "vhost_user_u64": 8, "vhost_vring_state": 8, "vhost_vring_addr": 40}


@pytest.mark.parametrize("seed", [7, 11, 23])
@pytest.mark.parametrize("kind", [pytest.param("proxy", marks=needs_virtiofsd), "daemon"])
def test_random_requests_never_traceback(kind: str, seed: int) -> None:
    """60 requests of random known codes, random payload bytes (small vring indices mostly), sometimes an
    eventfd or a memfd, sometimes NEED_REPLY.  Seed 7 made the proxy answer a `raw`-reply request with a
    KeyError once its back-end had given up."""
    import random

    rnd = random.Random(seed)
    with target(kind) as t:
        c = t.connect()
        c.settimeout(2)
        try:
            for _ in range(60):
                r = rnd.choice(list(vspec.FRONTEND_REQUESTS))
                size = 8 + 32 * 8 if r.payload == "memory" else SIZES.get(r.payload, rnd.choice([0, 8, 40, 64]))
                payload = bytes(rnd.getrandbits(8) for _ in range(size))
                if rnd.random() < 0.7 and size >= 8:
                    payload = bytes([rnd.randrange(3)]) + payload[1:]
                fds = [os.eventfd(0) if rnd.random() < 0.5 else os.memfd_create("m")] if rnd.random() < 0.4 else []
                flags = 1 | (8 if rnd.random() < 0.3 else 0)
                send_message(c, V.HEADER.struct.pack(r.value, flags, size) + payload, fds)
                for fd in fds:
                    os.close(fd)
                if r.reply or flags & 8:
                    with contextlib.suppress(OSError, PeerClosed, WireError):
                        recv_message(c)
                if t.proc.poll() is not None:
                    break
        except OSError:  # the back-end ended the connection: fine, as long as it said why
            pass
        c.close()
        rc, err = t.finish()
    clean(rc, err)


@needs_virtiofsd
def test_proxy_sigterm_while_its_backend_is_stopped() -> None:
    """The C virtiofsd is SIGSTOPped with a request on its way: the proxy waits for its reply, and SIGTERM
    still ends the proxy (and the back-end it started) within a second."""
    with target("proxy") as t:
        c = t.connect()
        ask(c, "GET_FEATURES")
        children = Path(f"/proc/{t.proc.pid}/task/{t.proc.pid}/children").read_text().split()
        assert len(children) == 1
        backend = int(children[0])
        os.kill(backend, signal.SIGSTOP)
        try:
            send(c, "GET_QUEUE_NUM")  # the proxy forwards it and waits for the stopped back-end's answer
            time.sleep(0.3)
            t0 = time.monotonic()
            t.proc.send_signal(signal.SIGTERM)
            t.proc.wait(10)
            took = time.monotonic() - t0
            rc, err = t.finish()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(backend, signal.SIGCONT)
        c.close()
    clean(rc, err)
    assert took < STOP_WITHIN, f"{took:.2f} s"
    assert not Path(f"/proc/{backend}").exists() or "zombie" in Path(f"/proc/{backend}/status").read_text()


def _memfd_of(pid: int, name: str) -> int:
    """Our own fd on process `pid`'s memfd `name` (the same file: its seals, its size)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == f"/memfd:{name} (deleted)":
                return os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    raise AssertionError(f"process {pid} holds no memfd {name!r}")


def test_proxy_shadow_memfd_is_sealed_for_its_backend() -> None:
    """The proxy's shadow rings are guest memory to the back-end: sealed against resizing like QEMU's (the
    bundled daemon does not warn about it), still writable, and ftruncate on it fails."""
    from fsinspect.proxy.control import PROXY_REGION_GPA

    with short_tmpdir() as work:
        (work / "share").mkdir()
        dsock = work / "d.sock"
        daemon = _spawn(["daemon", "--socket-path", str(dsock), "--shared-dir", str(work / "share")], dsock)
        try:
            psock = work / "p.sock"
            proxy = _spawn(["proxy", "--listen", str(psock), "--backend", str(dsock),
                            "--summary-json", str(work / "s.json")], psock)
            try:
                t = Target("proxy", proxy, psock, work)
                g = start_queues(t.connect())
                fd = _memfd_of(proxy.pid, "fsinspect-shadow-rings")
                try:
                    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                    want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
                    assert seals & want == want and not seals & fcntl.F_SEAL_WRITE, hex(seals)
                    with pytest.raises(PermissionError):
                        os.ftruncate(fd, 0)
                    with pytest.raises(PermissionError):
                        os.ftruncate(fd, os.fstat(fd).st_size * 2)
                    with pytest.raises(PermissionError):
                        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)  # F_SEAL_SEAL: no more seals
                finally:
                    os.close(fd)
                g.c.close()
                rc, err = t.finish()
                os.close(g.fd)
            finally:
                stop_process(proxy)
            clean(rc, err)
            assert t.summary()["unsealed_regions"] == 1  # ours (the test's memfd), not the proxy's own
        finally:
            stop_process(daemon)
        assert daemon.stderr is not None
        derr = daemon.stderr.read().decode(errors="replace")
    assert "region gpa 0x0 is not sealed" in derr, derr  # the back-end checks every region: ours is unsealed
    assert f"region gpa {PROXY_REGION_GPA:#x} is not sealed" not in derr, derr
