"""A fuzz campaign for the vhost-user front of the daemon and of the proxy, in-process over real socketpairs.

The fuzzer plays QEMU.  Its messages come from templates crafted once with the spec-generated scapy layers
(dissectors.scapy: every front-end request, fields drawn from pools of plausible and absurd values: queue
indices, ring sizes, addresses inside and outside the one memfd region, feature words), then a seeded RNG
picks one per case, sets or clears NEED_REPLY, mutates some of them (bytes, sizes, request codes) and
attaches fds of every kind (eventfds, the memfd, a memfd smaller than the region, a pipe, /dev/null, a
socket; too many, too few, none).  Kicks are written to the kick eventfds it sent, over ring memory that is
sometimes random and sometimes well-formed descriptors, so started queues run on the data path too.

Targets: the daemon's VhostUserSession (the real engine and passthrough filesystem over a temp dir), and
the proxy (its Proxy control thread, the native shadow paths) in front of that same daemon session.

Invariants, per case: every message the back-end sends is a well-formed vhost-user reply; a ping
(GET_PROTOCOL_FEATURES) after the fuzzed message is answered, or the session ends; a session that ends does
so within HANG_S with no traceback logged (its end is one line), every thread it started stops; a message
whose declared size lies is followed by the end of the connection and the back-end must see a clean end.
Every SESSION_CHECK sessions the process's fds and threads are back to their baseline.
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import random
import re
import select
import shutil
import socket
import struct
import sys
import tempfile
import threading
import traceback
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from daemon.passthrough import Options
from daemon.server import Server
from daemon.transport.vhost_user import VhostUserSession
from daemon.vhost import GuestPassthroughFS
from dissectors import vhost_user as V
from dissectors.errors import DecodeError
from dissectors.spec import vhost_user as vspec
from dissectors.transport.wire import PeerClosed, WireError, recv_message, send_message
from fsinspect.proxy.server import Proxy, ProxyConfig

REQ = {r.name: r.value for r in vspec.FRONTEND_REQUESTS}
KNOWN = set(REQ.values())
MEM = 1 << 20
UVA = 0x7F00_0000_0000
NUM = 64
RINGS = {0: (0x1000, 0x2000, 0x3000), 1: (0x4000, 0x5000, 0x6000)}  # desc, avail, used offsets per queue
HANG_S = 10.0
SESSION_CHECK = 64
NEED_REPLY = 0x8
PING_REQ = REQ["GET_PROTOCOL_FEATURES"]
PING = struct.pack("<III", PING_REQ, vspec.VERSION, 0)
PINGS = [struct.pack("<III", REQ[n], vspec.VERSION, 0) for n in ("GET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
                                                                  "GET_FEATURES")]
PING_CODES = [struct.unpack_from("<I", p)[0] for p in PINGS]
BATCH = 16
LOGGERS = ("fsinspect.daemon", "fsinspect.proxy", "fsinspect")

# How often each request is drawn: the setup QEMU does, the vring messages, then the rest now and then.
WEIGHTS = {"GET_FEATURES": 3, "SET_FEATURES": 4, "SET_OWNER": 3, "RESET_OWNER": 0.3, "SET_MEM_TABLE": 4,
           "SET_VRING_NUM": 5, "SET_VRING_ADDR": 5, "SET_VRING_BASE": 4, "GET_VRING_BASE": 3, "SET_VRING_KICK": 5,
           "SET_VRING_CALL": 5, "SET_VRING_ERR": 1, "GET_PROTOCOL_FEATURES": 2, "SET_PROTOCOL_FEATURES": 4,
           "GET_QUEUE_NUM": 2, "SET_VRING_ENABLE": 4, "GET_MAX_MEM_SLOTS": 1, "ADD_MEM_REG": 4, "REM_MEM_REG": 2,
           "RESET_DEVICE": 0.5, "SET_BACKEND_REQ_FD": 0.5, "GET_CONFIG": 0.05, "SET_CONFIG": 0.3,
           "SET_LOG_BASE": 0.05, "SET_LOG_FD": 0.2, "GET_INFLIGHT_FD": 0.05, "SET_INFLIGHT_FD": 0.2,
           "SET_STATUS": 0.3, "GET_STATUS": 0.05, "VRING_KICK": 0.3, "IOTLB_MSG": 0.2, "SEND_RARP": 0.1,
           "POSTCOPY_ADVISE": 0.1, "CHECK_DEVICE_STATE": 0.05}
ALL_FEATURES = (1 << 64) - 1
POOLS: dict[str, list[int]] = {
    "index": [0, 1] * 8 + [2, 255, 0x100 | 1, 2**32 - 1],
    "num": [NUM, NUM, 128, 0, 1, 3, 1 << 15, 65535],
    "u64": [0, 1, 0x100, 0x101, 0x10000000, 0x40000000, 0x1_0000_0000, 0x1_7000_0000, 0x30017, ALL_FEATURES],
    "guest_address": [0, 0, 0x1000, MEM, 2**63, 2**64 - 4096],
    "size": [MEM, MEM, 4096, 0, MEM * 2, 2**63],
    "user_address": [UVA, UVA, UVA + 0x1000, 0, 2**64 - 4096],
    "mmap_offset": [0, 0, 4096, MEM, 2**63],
    "flags": [0, 0, 1],
    "descriptor": [UVA + RINGS[1][0], UVA + RINGS[0][0], UVA + MEM, 0, 2**64 - 16],
    "available": [UVA + RINGS[1][1], UVA + RINGS[0][1], UVA + MEM - 2, 0],
    "used": [UVA + RINGS[1][2], UVA + RINGS[0][2], UVA + MEM - 4, 0],
    "log": [0, UVA],
}


def crafted_templates(rng: random.Random, per_request: int = 24) -> dict[str, list[bytes]]:
    """Messages built with the scapy layers, field values from POOLS (else scapy's random values)."""
    from scapy.packet import fuzz as scapy_fuzz

    import dissectors.scapy as S

    state = random.getstate()
    random.seed(rng.random())
    try:
        out: dict[str, list[bytes]] = {}
        for name in WEIGHTS:
            value = REQ[name]
            layer = S.FRONTEND_LAYERS.get((value, False))
            variants = []
            for _ in range(per_request):
                if layer is None:
                    variants.append(bytes(S.VhostUser(request=value)))
                    continue
                pay = scapy_fuzz(layer()) if rng.random() < 0.15 else layer()
                for f in layer.fields_desc:
                    if f.name in POOLS:
                        pay.setfieldval(f.name, rng.choice(POOLS[f.name]))
                if name in ("SET_MEM_TABLE",):
                    pay.regions = [_region(S, rng) for _ in range(rng.choice((1, 1, 1, 2, 0, 8)))]
                    pay.num_regions = None
                elif name in ("ADD_MEM_REG", "REM_MEM_REG"):
                    pay.region = _region(S, rng)
                try:
                    variants.append(bytes(S.VhostUser(request=value) / pay))
                except (ValueError, struct.error):  # a pool value wider than this layout's field
                    variants.append(bytes(S.VhostUser(request=value) / layer()))
            out[name] = variants
        return out
    finally:
        random.setstate(state)


def qemu_script() -> list[tuple[str, bytes]]:
    """QEMU's setup of both queues over the one memfd region (proxy-notes.md), crafted with the scapy layers;
    each session mostly follows it, with fuzzed messages in between, so the queues often start."""
    import dissectors.scapy as S

    def msg(name: str, pay: Any = None) -> tuple[str, bytes]:
        head = S.VhostUser(request=REQ[name])
        return name, bytes(head / pay if pay is not None else head)

    out = [msg("GET_FEATURES"), msg("SET_FEATURES", S.VhostUserSetFeatures(u64=(1 << 32) | (1 << 30) | (1 << 28))),
           msg("GET_PROTOCOL_FEATURES"), msg("SET_PROTOCOL_FEATURES", S.VhostUserSetProtocolFeatures(u64=0x1 | 0x8)),
           msg("GET_QUEUE_NUM"), msg("SET_OWNER"),
           msg("SET_MEM_TABLE", S.VhostUserSetMemTable(regions=[S.VhostUserMemoryRegion(
               guest_address=0, size=MEM, user_address=UVA, mmap_offset=0)]))]
    for q, (desc, avail, used) in RINGS.items():
        out += [msg("SET_VRING_NUM", S.VhostUserSetVringNum(index=q, num=NUM)),
                msg("SET_VRING_BASE", S.VhostUserSetVringBase(index=q, num=0)),
                msg("SET_VRING_ADDR", S.VhostUserSetVringAddr(index=q, descriptor=UVA + desc, available=UVA + avail,
                                                              used=UVA + used)),
                msg("SET_VRING_KICK", S.VhostUserSetVringKick(u64=q)),
                msg("SET_VRING_CALL", S.VhostUserSetVringCall(u64=q)),
                msg("SET_VRING_ENABLE", S.VhostUserSetVringEnable(index=q, num=1))]
    return out


def _region(S: Any, rng: random.Random) -> Any:
    return S.VhostUserMemoryRegion(**{k: rng.choice(POOLS[k]) if rng.random() < 0.25 else POOLS[k][0]
                                      for k in ("guest_address", "size", "user_address", "mmap_offset")})


class BugLog(logging.Handler):
    """A record with a traceback is a bug (whatever a front-end sends must end in one line)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bugs: list[str] = []
        self.lines = 0
        self.ends: Counter[str] = Counter()
        self.recent: deque[str] = deque(maxlen=40)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1
        self.recent.append(f"{record.threadName} {record.name}: {record.getMessage()}")
        if record.exc_info:
            self.bugs.append(self.format(record))
        msg = record.getMessage()
        if "session ended" in msg:  # the kinds of end, for the report: "... ended: VRING_NUM failed: ..."
            self.ends[re.sub(r"0x[0-9a-f]+|\d+", "N", msg.split("ended: ", 1)[-1])[:70]] += 1


@contextmanager
def quiet_logs() -> Iterator[BugLog]:
    """The targets' logs go to a BugLog; so does an exception that ends one of their threads (a bug too:
    the proxy's control thread died that way, and only pytest's warning said so)."""
    h = BugLog()
    saved = []
    for name in LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.propagate))
        lg.addHandler(h)
        lg.propagate = False
    hook = threading.excepthook
    threading.excepthook = lambda a: h.bugs.append(
        f"thread {a.thread.name if a.thread else '?'} died: "
        + "".join(traceback.format_exception(a.exc_type, a.exc_value, a.exc_traceback)))
    try:
        yield h
    finally:
        threading.excepthook = hook
        for lg, prop in saved:
            lg.removeHandler(h)
            lg.propagate = prop


class DaemonTarget:
    """The daemon's vhost-user session over a socketpair, with the real engine over a temp share."""

    name = "daemon"

    def __init__(self, share: Path) -> None:
        self.share = share
        self.threads: list[threading.Thread] = []
        self.server: Server | None = None

    def start(self) -> socket.socket:
        front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server, thread = serve_daemon(back, self.share)
        self.threads = [thread]
        return front

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def state(self) -> str:
        return ""


def serve_daemon(conn: socket.socket, share: Path) -> tuple[Server, threading.Thread]:
    server = Server(GuestPassthroughFS(Options(str(share))), pool_size=2)
    session = VhostUserSession(conn, server)

    def run() -> None:
        try:
            session.serve()
        finally:
            conn.close()
            server.shutdown()
            server.fs.close()  # type: ignore[attr-defined]

    t = threading.Thread(target=run, name="fuzz-daemon-session", daemon=True)
    t.start()
    return server, t


class ProxyTarget:
    """The proxy (control thread + native paths) in front of an in-process daemon session."""

    name = "proxy"

    def __init__(self, share: Path) -> None:
        self.share = share
        self.threads: list[threading.Thread] = []
        self.reasons: list[str] = []

    def start(self) -> socket.socket:
        front, proxy_front = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proxy_back, daemon_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        _server, dthread = serve_daemon(daemon_end, self.share)
        proxy = Proxy(ProxyConfig(capture_bytes=1 << 20))
        self.proxy = proxy

        def run() -> None:
            try:
                self.reasons.append(proxy.serve(proxy_front, proxy_back))
            finally:
                proxy_front.close()
                proxy_back.close()

        t = threading.Thread(target=run, name="fuzz-proxy", daemon=True)
        t.start()
        self.threads = [t, dthread]
        return front

    def stop(self) -> None:
        pass

    def state(self) -> str:
        p = self.proxy
        return (f"proxy: backend_alive={p.cp.backend_alive} pending={p.cp.pending} "
                f"passthrough_reply={getattr(p, '_passthrough_reply', None)} messages={p.stats.vhost_messages}")


class FdKit:
    """Long-lived fds of every kind; a message carries copies (SCM_RIGHTS dups them into the receiver)."""

    def __init__(self) -> None:
        self.memfd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, MEM)
        self.mem = mmap.mmap(self.memfd, MEM)
        self.small = os.memfd_create("fuzz-small", os.MFD_CLOEXEC)
        os.ftruncate(self.small, 4096)
        self.kicks = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(3)]
        self.calls = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(3)]
        self.pipe_r, self.pipe_w = os.pipe2(os.O_CLOEXEC)
        self.null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.sock_a, self.sock_b = socket.socketpair()
        self.others = [self.small, self.pipe_r, self.null, self.sock_a.fileno()]

    def name_of(self, fd: int) -> str:
        return next(k for k, v in vars(self).items() if v == fd or (isinstance(v, list) and fd in v)
                    or (isinstance(v, socket.socket) and v.fileno() == fd))

    def close(self) -> None:
        self.mem.close()
        for fd in [self.memfd, self.small, *self.kicks, *self.calls, self.pipe_r, self.pipe_w, self.null]:
            os.close(fd)
        self.sock_a.close()
        self.sock_b.close()

    def drain_calls(self) -> None:
        for fd in self.calls:
            with suppress(BlockingIOError):
                os.eventfd_read(fd)


class VhostCampaign:
    def __init__(self, target_kind: str, seed: int) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="fsi-vhost-fuzz-", dir="/dev/shm"))
        (self.base / "share").mkdir()
        (self.base / "share" / "f").write_bytes(b"data" * 100)
        self.target: DaemonTarget | ProxyTarget = (DaemonTarget if target_kind == "daemon" else ProxyTarget)(
            self.base / "share")
        self.rng = random.Random(seed)
        self.seed = seed
        self.templates = crafted_templates(self.rng)
        self.script = qemu_script()
        self.script_pos = 0
        self.names = list(WEIGHTS)
        self.weights = list(WEIGHTS.values())
        self.kit = FdKit()
        self.front: socket.socket | None = None
        self.cases = 0
        self.sessions = 0
        self.ends: dict[str, int] = {}
        self.kicked = 0
        self.logs = BugLog()
        self.last: list[str] = []
        self.fd_base = -1
        self.thread_base = -1

    def close(self) -> None:
        self.end_session()
        self.kit.close()
        shutil.rmtree(self.base, ignore_errors=True)

    def stacks(self) -> str:
        """Where the target's threads are (for a hang's failure message)."""
        frames = sys._current_frames()
        out = []
        for t in threading.enumerate():
            if t is not threading.current_thread() and t.ident in frames:
                out.append(f"--- {t.name}\n" + "".join(traceback.format_stack(frames[t.ident])[-6:]))
        return "\n".join(out)

    def fail(self, what: str) -> str:
        path = self.base.parent / f"fsi-vhost-fuzz-{self.target.name}-{self.seed}-{self.cases}.session"
        path.write_text("\n".join(f"{raw.hex()} {' '.join(fds)}" for raw, fds in self.session_log))
        what += f"\nthe session's messages so far: {path}\nlast log lines:\n" + "\n".join(self.logs.recent)
        return f"vhost fuzz ({self.target.name}) seed {self.seed} case {self.cases}: {what}; last: {self.last[-6:]}"

    # ---------------------------------------------------------------- sessions
    def begin_session(self) -> None:
        self.front = self.target.start()
        self.front.settimeout(HANG_S)
        self.sessions += 1
        self.script_pos = 0
        self.session_log: list[tuple[bytes, list[str]]] = []

    def end_session(self, reason: str = "closed by the fuzzer") -> None:
        if self.front is None:
            return
        with suppress(OSError):
            self.front.shutdown(socket.SHUT_RDWR)
        self.front.close()
        self.front = None
        for t in self.target.threads:
            t.join(HANG_S)
            assert not t.is_alive(), self.fail(f"{t.name} still running {HANG_S} s after the session ended")
        self.target.stop()
        self.kit.drain_calls()
        self.ends[reason] = self.ends.get(reason, 0) + 1
        if self.sessions % SESSION_CHECK == 0:
            self.check_baseline()

    def check_baseline(self) -> None:
        gc.collect()  # a daemon session's objects in a cycle go now (the proxy gives its fds back at its end)
        fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
        if self.fd_base < 0:
            self.fd_base, self.thread_base = fds, threads
        assert fds <= self.fd_base + 2, self.fail(f"fds {fds} after {self.sessions} sessions (baseline {self.fd_base})")
        assert threads <= self.thread_base, self.fail(f"{threads} threads (baseline {self.thread_base})")

    # ---------------------------------------------------------------- one case
    def step(self) -> None:
        """A batch of 1..BATCH messages (each one case), then a ping: replies come in order, at most one per
        message; the ping's answer closes the batch.  Pipelining keeps thread hand-offs per case low."""
        if self.front is None:
            self.begin_session()
        front = self.front
        assert front is not None
        batch: list[int] = []
        framing_ok = True
        for _ in range(self.rng.randint(1, BATCH)):
            if sum(c in batch for c in PING_CODES) >= len(PING_CODES) - 1:
                break  # one ping code must stay unused by the batch (its answer closes the batch unambiguously)
            raw, fds, framing_ok = self.draw()
            self.cases += 1
            self.last = [*self.last[-7:], f"{raw[:48].hex()}+{len(fds)}fd"]
            self.session_log.append((raw, [self.kit.name_of(fd) for fd in fds]))
            batch.append(struct.unpack_from("<I", raw)[0] if len(raw) >= 4 else -1)
            try:
                send_message(front, raw, fds)
            except (BrokenPipeError, ConnectionResetError):
                self.expect_end()
                return
            if not framing_ok:  # a size that lies: the back-end must see a clean end of a half message
                with suppress(OSError):
                    front.shutdown(socket.SHUT_WR)
                self.expect_end()
                return
        ping = next(p for p, c in zip(PINGS, PING_CODES) if c not in batch)
        try:
            if self.rng.random() < 0.1:
                self.kick()
            send_message(front, ping)
        except (BrokenPipeError, ConnectionResetError):
            self.expect_end()
            return
        at = 0  # replies come in request order: each one answers a later message of the batch than the last
        while True:
            try:
                r, _, _ = select.select([front], [], [], HANG_S)
                assert r, self.fail(f"no answer to the ping within {HANG_S} s (back-end hung)\n{self.stacks()}\n"
                                    f"{self.target.state()}")
                rep, rfds = recv_message(front)
            except (PeerClosed, ConnectionResetError):
                self.end_session("the back-end ended the session")
                return
            except WireError as e:
                raise AssertionError(self.fail(f"the back-end sent garbage: {e}")) from None
            for fd in rfds:
                os.close(fd)
            if rep[:4] == ping[:4]:
                assert rep[4] & 0x4 and len(rep) == 20, self.fail(f"a bad answer to the ping: {rep.hex()}")
                return
            code, flags, size = struct.unpack_from("<III", rep)
            try:
                msg = V.decode_message(rep, [])
                assert msg.is_reply, self.fail(f"a message that is not a reply: {msg.name}")
            except DecodeError as e:
                # A NAK for a request code we made up is the one reply that has no layout to decode.
                assert code not in KNOWN and flags & 0x4 and size == 8, self.fail(f"an undecodable reply: {e}")
            assert code in batch[at:], self.fail(f"a reply to request {code}; the batch's rest is {batch[at:]}")
            at += batch[at:].index(code) + 1

    def expect_end(self) -> None:
        front = self.front
        assert front is not None
        while True:
            r, _, _ = select.select([front], [], [], HANG_S)
            assert r, self.fail(f"the back-end did not end the session within {HANG_S} s")
            try:
                if not front.recv(65536):
                    break
            except (ConnectionResetError, OSError):
                break
        self.end_session("the back-end ended the session")

    def kick(self) -> None:
        """Ring memory (random, or descriptors pointing into the region) and a kick on every kick eventfd."""
        r = self.rng
        mem = self.kit.mem
        q = r.choice((0, 1))
        desc, avail, _used = RINGS[q]
        if r.random() < 0.5:
            off = r.choice((desc, avail, r.randrange(0, MEM - 64)))
            mem[off:off + 64] = r.randbytes(64)
        else:
            for i in range(r.randint(1, 4)):
                addr = r.choice((0x10000 + 0x1000 * i, MEM - 8, 2**63))
                struct.pack_into("<QIHH", mem, desc + 16 * i, addr, r.choice((40, 64, 4096, 0)),
                                 r.choice((0, 1, 2, 3, 4)), r.randint(0, NUM))
            idx = struct.unpack_from("<H", mem, avail + 2)[0]
            struct.pack_into("<H", mem, avail + 4 + 2 * (idx % NUM), r.randint(0, NUM))
            struct.pack_into("<H", mem, avail + 2, (idx + r.choice((1, 1, 2, 300))) & 0xFFFF)
        for fd in self.kit.kicks:
            os.eventfd_write(fd, 1)
        self.kicked += 1

    def draw(self) -> tuple[bytes, list[int], bool]:
        r = self.rng
        if self.script_pos < len(self.script) and r.random() < 0.85:
            name, raw = self.script[self.script_pos]
            self.script_pos += 1
            q = struct.unpack_from("<Q", raw, 12)[0] if len(raw) >= 20 else 0
            fds = {"SET_VRING_KICK": [self.kit.kicks[q & 1]], "SET_VRING_CALL": [self.kit.calls[q & 1]],
                   "SET_MEM_TABLE": [self.kit.memfd]}.get(name, [])
            return raw, fds, True
        name = r.choices(self.names, self.weights)[0]
        b = bytearray(r.choice(self.templates[name]))
        if r.random() < 0.3:
            b[4] |= NEED_REPLY
        framing_ok = True
        if r.random() < 0.08:
            k = r.random()
            if k < 0.4 and len(b) > 12:
                b[r.randrange(12, len(b))] = r.randrange(256)
            elif k < 0.65:
                struct.pack_into("<I", b, 0, r.randint(0, 60))  # another request code on this payload
            elif k < 0.8:
                b[4:8] = struct.pack("<I", r.choice((0, 2, 0x5, 0xFFFFFFFF)))  # bad version / flag bits
                framing_ok = b[4] & 3 == 1
            elif k < 0.9:
                struct.pack_into("<I", b, 8, r.choice((len(b) - 12 + 8, 0x1000, 2**32 - 1)))  # a size that lies
                framing_ok = False
        return bytes(b), self.fds_for(name), framing_ok

    def fds_for(self, name: str) -> list[int]:
        r = self.rng
        kit = self.kit
        if name in ("SET_VRING_KICK", "SET_VRING_ERR"):
            n = [r.choice(kit.kicks)]
        elif name == "SET_VRING_CALL":
            n = [r.choice(kit.calls)]
        elif name in ("SET_MEM_TABLE", "ADD_MEM_REG", "SET_LOG_FD", "SET_INFLIGHT_FD"):
            n = [kit.memfd] * (r.choice((1, 1, 1, 2)) if name == "SET_MEM_TABLE" else 1)
        elif name == "SET_BACKEND_REQ_FD":
            n = [kit.sock_a.fileno()]
        else:
            n = []
        x = r.random()
        if x < 0.08 and n:
            n = [r.choice(kit.others) for _ in n]  # the wrong kind of fd
        elif x < 0.12:
            n = []  # none where one is due
        elif x < 0.16:
            n = n + [r.choice([*kit.others, kit.memfd, kit.kicks[0]]) for _ in range(r.randint(1, 8))]  # too many
        return n[:vspec.MAX_FDS]


def run_campaign(kind: str, seed: int, cases: int) -> VhostCampaign:
    c = VhostCampaign(kind, seed)
    try:
        with quiet_logs() as c.logs:
            logs = c.logs
            while c.cases < cases:
                c.step()
                assert not logs.bugs, c.fail(f"a traceback was logged: {logs.bugs[0]}")
            c.end_session()
            c.check_baseline()
    finally:
        c.close()
    return c

