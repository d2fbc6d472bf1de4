"""The engine (daemon/server.py) driven with crafted messages: negotiation, ENOSYS defaults, concurrency,
the tap hook and malformed input."""

from __future__ import annotations

import errno
import logging
import struct
import threading
import time
from typing import Any

import pytest

from daemon.server import MAX_WRITE, Context, FileSystem, Server
from dissectors import fuse as F
from dissectors.spec import fuse as spec
from tests.daemon_client import KERNEL_FLAGS, EngineClient

INIT = spec.INIT_FLAGS.by_name()


class StatOnly(FileSystem):
    """GETATTR answers at once; FSYNC takes `slow` seconds (a real sleep in the op)."""

    def __init__(self, slow: float = 2.0) -> None:
        self.slow = slow

    def init(self, kernel_flags: int) -> int:
        return kernel_flags & INIT["ASYNC_READ"]

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[Any, float]:
        import os

        return os.stat("/"), 1.0

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        time.sleep(self.slow)

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        if size > 128 * 1024:
            time.sleep(self.slow)
        return b"r" * size

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int, data: Any, write_flags: int) -> int:
        return len(data)


def test_base_filesystem_answers_enosys_for_every_op() -> None:
    server = Server(FileSystem())
    c = EngineClient(server)
    assert c.init().error == 0
    no_reply = {"FORGET", "BATCH_FORGET", "INTERRUPT", "NOTIFY_REPLY"}
    special = {"INIT", "DESTROY", "CUSE_INIT"} | no_reply
    for o in spec.OPCODES:
        if o.name in special:
            continue
        rep = c.call(o.name, _minimal_args(o.name), nodeid=1)
        assert rep.error == errno.ENOSYS, o.name
    # FORGET gets no reply and the session keeps serving.
    c.send_noreply("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, nodeid=5)
    assert c.call("GETATTR", nodeid=1).error == errno.ENOSYS
    server.shutdown()


def _minimal_args(op: str) -> dict[str, Any]:
    """Structurally valid arguments for any opcode (fields zero, names 'x')."""
    o = spec.OPCODE_BY_NAME[op]
    args: dict[str, Any] = {}
    for p in o.request:
        if p.kind == "struct":
            args[p.name] = F.make(p.ref or p.name)
        elif p.kind == "str":
            args[p.name] = b"x"
        elif p.kind == "data":
            args[p.name] = b""
        elif p.kind == "array":
            args[p.name] = []
    return args


def test_init_negotiation_range_and_state() -> None:
    server = Server(StatOnly())
    c = EngineClient(server)
    assert c.call("GETATTR", nodeid=1).error == errno.EIO  # before INIT
    assert c.init(minor=26).error == errno.EPROTO
    rep = c.init(KERNEL_FLAGS, minor=27)
    assert rep.error == 0
    out = rep.args["init_out"]
    assert (out.major, out.max_write, out.max_pages) == (7, MAX_WRITE, MAX_WRITE // 4096)
    # Only what the kernel offered and the filesystem implements.
    assert out.flags & ~KERNEL_FLAGS == 0
    assert out.flags & INIT["WRITEBACK_CACHE"] == 0
    assert server.negotiated.done and server.negotiated.minor == 27
    assert server.negotiated.has("ASYNC_READ") and not server.negotiated.has("SUBMOUNTS")
    # A newer major: the engine answers with its own so the kernel can retry.
    c2 = EngineClient(Server(StatOnly()))
    init8 = F.make("fuse_init_in", major=8, minor=0)
    assert c2.call("INIT", {"init": init8}).args["init_out"].major == 7
    assert not c2.server.negotiated.done
    rep45 = c2.init(minor=45)
    assert rep45.error == 0 and c2.server.negotiated.minor == 45
    server.shutdown()
    c2.server.shutdown()


@pytest.mark.parametrize("dispatch,slow_op", [("inline+pool", "FSYNC"), ("inline+pool", "READ"),
                                              ("pool", "FSYNC")])
def test_slow_op_does_not_stall_getattr(dispatch: str, slow_op: str) -> None:
    """A FileSystem op held for 2 s (fsync, a 1 MiB READ) delays a concurrent GETATTR by less than 50 ms."""
    server = Server(StatOnly(2.0), dispatch=dispatch)
    c = EngineClient(server)
    c.init()
    done = threading.Event()
    fsync_at: list[float] = []
    t0 = time.monotonic()
    if slow_op == "FSYNC":
        fs_req = c.encode("FSYNC", {"fsync": F.make("fuse_fsync_in", fh=1)}, nodeid=1)
    else:
        fs_req = c.encode("READ", {"read": F.make("fuse_read_in", fh=1, size=1 << 20)}, nodeid=1)
    server.handle(fs_req, lambda parts: (fsync_at.append(time.monotonic()), done.set()))
    lat = []
    for _ in range(5):
        s = time.monotonic()
        assert c.call("GETATTR", nodeid=1).error == 0
        lat.append(time.monotonic() - s)
    assert max(lat) < 0.05, lat
    assert done.wait(5)
    assert fsync_at[0] - t0 >= 2.0
    server.shutdown()


def test_small_io_is_served_inline() -> None:
    """A small READ answers before handle() returns (no pool hand-off); a big one goes to the pool.  A WRITE
    of any size a kernel sends (up to max_write) is inline: its data is in the request, nothing to wait for."""
    server = Server(StatOnly(0.0))
    c = EngineClient(server)
    c.init()
    got: list[bytes] = []
    server.handle(c.encode("READ", {"read": F.make("fuse_read_in", fh=1, size=4096)}, nodeid=1),
                  lambda parts: got.append(b"".join(parts)))
    assert len(got) == 1 and len(got[0]) == 16 + 4096
    big = threading.Event()
    server.handle(c.encode("READ", {"read": F.make("fuse_read_in", fh=1, size=1 << 20)}, nodeid=1),
                  lambda parts: big.set())
    assert big.wait(5)
    for size in (4096, 124 * 4096, MAX_WRITE):
        got.clear()
        server.handle(c.encode("WRITE", {"write": F.make("fuse_write_in", fh=1, size=size), "data": b"w" * size},
                               nodeid=1), lambda parts: got.append(b"".join(parts)))
        assert len(got) == 1, size
        rep = F.decode_reply(got[0], F.decode_request(c.encode("WRITE", {"write": F.make("fuse_write_in", size=0),
                                                                         "data": b""}, nodeid=1)))
        assert rep.error == 0 and rep.args["write_out"].size == size
    server.shutdown()


def test_tap_sees_every_request_and_reply() -> None:
    seen: list[tuple[str, int, int, int, bytes]] = []
    server = Server(StatOnly(), tap=lambda *a: seen.append(a))
    c = EngineClient(server)
    c.init()
    c.call("GETATTR", nodeid=1)
    assert [(d, u) for d, _q, u, _t, _b in seen] == [("request", 1), ("reply", 1), ("request", 2), ("reply", 2)]
    req = F.decode_request(seen[2][4])
    assert req.op.name == "GETATTR"
    assert F.decode_reply(seen[3][4], req).error == 0
    assert all(t > 0 for _d, _q, _u, t, _b in seen)
    server.shutdown()


def test_malformed_messages_get_errno_or_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fsinspect.daemon")
    server = Server(StatOnly())
    c = EngineClient(server)
    c.init()
    good = c.encode("GETATTR", {"getattr": F.make("fuse_getattr_in")}, nodeid=1)
    # Header shorter than fuse_in_header: no unique to answer, dropped.
    assert c.raw(good[:20], timeout=0.2) is None
    # Length mismatch (header says more than present): EINVAL to that unique.
    u = struct.unpack_from("<Q", good, 8)[0]
    for bad in (good[:-4], good + b"\0" * 8, struct.pack("<I", 4000) + good[4:]):
        out = c.raw(bad)
        assert out is not None
        ln, err, uniq = struct.unpack_from("<IiQ", out)
        assert (ln, err, uniq) == (16, -errno.EINVAL, u)
    # Short body: a WRITE whose fuse_write_in is cut.
    w = c.encode("WRITE", {"write": F.make("fuse_write_in", size=0), "data": b""}, nodeid=1)
    short = struct.pack("<I", 40 + 8) + w[4:48]
    out = c.raw(short)
    assert out is not None and struct.unpack_from("<i", out, 4)[0] == -errno.EINVAL
    # Unknown opcode: ENOSYS.
    unk = bytearray(c.encode("GETATTR", {"getattr": F.make("fuse_getattr_in")}, nodeid=1))
    struct.pack_into("<I", unk, 4, 999)
    out = c.raw(bytes(unk))
    assert out is not None and struct.unpack_from("<i", out, 4)[0] == -errno.ENOSYS
    # A malformed FORGET (no reply by design) is dropped silently.
    fg = c.encode("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, nodeid=3)
    assert c.raw(struct.pack("<I", 44) + fg[4:44], timeout=0.2) is None
    assert server.counters()["dropped"] == 7
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 7 and any("dropped a request" in m for m in msgs)
    assert any("unknown opcode 999" in m and "ENOSYS" in m for m in msgs)
    # ... and the engine keeps serving.
    assert c.call("GETATTR", nodeid=1).error == 0
    server.shutdown()


def test_counters_count_ops_and_errors() -> None:
    server = Server(StatOnly(0))
    c = EngineClient(server)
    c.init()
    for _ in range(3):
        c.call("GETATTR", nodeid=1)
    c.call("LOOKUP", {"name": b"x"}, nodeid=1)
    k = server.counters()
    assert k["ops"]["GETATTR"] == 3 and k["ops"]["INIT"] == 1
    assert k["errors"] == {"LOOKUP:ENOSYS": 1}
    server.shutdown()
