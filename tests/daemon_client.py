"""Drive the daemon engine directly with crafted FUSE messages (no kernel in between)."""

from __future__ import annotations

import queue
from concurrent.futures import Executor
from typing import Any

from daemon.server import Server
from dissectors import fuse as F
from dissectors.spec import fuse as spec

INIT = spec.INIT_FLAGS.by_name()
KERNEL_FLAGS = (INIT["ASYNC_READ"] | INIT["BIG_WRITES"] | INIT["MAX_PAGES"] | INIT["DO_READDIRPLUS"]
                | INIT["READDIRPLUS_AUTO"] | INIT["PARALLEL_DIROPS"] | INIT["FLOCK_LOCKS"] | INIT["ATOMIC_O_TRUNC"]
                | INIT["AUTO_INVAL_DATA"] | INIT["WRITEBACK_CACHE"] | INIT["SUBMOUNTS"] | INIT["POSIX_LOCKS"])


class EngineClient:
    """Plays the kernel: numbers requests, collects replies (inline or from the pool)."""

    def __init__(self, server: Server, *, uid: int = 0, gid: int = 0, via: Executor | None = None) -> None:
        self.server = server
        self.via = via  # the thread that hands requests to the engine (a sandboxed one), else the caller's
        self.unique = 0
        self.uid = uid
        self.gid = gid

    def raw(self, buf: bytes, timeout: float = 10.0) -> bytes | None:
        """Send raw bytes; the reply bytes, or None when the engine sent none within `timeout`."""
        q: queue.Queue[bytes] = queue.Queue()
        def reply(parts: Any) -> None:
            q.put(b"".join(bytes(p) for p in parts))

        if self.via is None:
            self.server.handle(buf, reply)
        else:
            self.via.submit(self.server.handle, buf, reply).result()
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            return None

    def encode(self, op: str, args: dict[str, Any] | None = None, *, nodeid: int = 0, **kw: Any) -> bytes:
        self.unique += 1
        return F.encode_request(op, args, unique=self.unique, nodeid=nodeid, uid=kw.get("uid", self.uid),
                                gid=kw.get("gid", self.gid), pid=kw.get("pid", 1), ctx=self.server.ctx)

    def call(self, op: str, args: dict[str, Any] | None = None, *, nodeid: int = 0, timeout: float = 10.0,
             **kw: Any) -> F.Reply:
        buf = self.encode(op, args, nodeid=nodeid, **kw)
        req = F.decode_request(buf, self.server.ctx)
        raw = self.raw(buf, timeout)
        assert raw is not None, f"no reply to {op}"
        rep = F.decode_reply(raw, req, self.server.ctx)
        assert isinstance(rep, F.Reply)
        assert rep.unique == self.unique
        return rep

    def send_noreply(self, op: str, args: dict[str, Any] | None = None, *, nodeid: int = 0) -> None:
        assert self.raw(self.encode(op, args, nodeid=nodeid), timeout=0.2) is None

    def init(self, flags: int = KERNEL_FLAGS, minor: int = spec.KERNEL_MINOR_VERSION) -> F.Reply:
        init = F.make("fuse_init_in", major=7, minor=minor, max_readahead=128 * 1024, flags=flags & 0xFFFFFFFF,
                      flags2=flags >> 32)
        return self.call("INIT", {"init": init})

    # conveniences -----------------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> F.Reply:
        return self.call("LOOKUP", {"name": name}, nodeid=parent)

    def ok(self, op: str, args: dict[str, Any] | None = None, *, nodeid: int = 0, **kw: Any) -> F.Reply:
        rep = self.call(op, args, nodeid=nodeid, **kw)
        assert rep.error == 0, f"{op}: {rep.errname}"
        return rep

    def nodeid(self, parent: int, name: bytes) -> int:
        return int(self.ok("LOOKUP", {"name": name}, nodeid=parent).args["entry"].nodeid)

    def open(self, nodeid: int, flags: int) -> int:
        return int(self.ok("OPEN", {"open": F.make("fuse_open_in", flags=flags)}, nodeid=nodeid).args["open"].fh)

    def create(self, parent: int, name: bytes, mode: int = 0o100644, flags: int = 0o2) -> tuple[int, int]:
        rep = self.ok("CREATE", {"create": F.make("fuse_create_in", flags=flags, mode=mode), "name": name},
                      nodeid=parent)
        return int(rep.args["entry"].nodeid), int(rep.args["open"].fh)

    def write(self, nodeid: int, fh: int, data: bytes, offset: int = 0) -> int:
        w = F.make("fuse_write_in", fh=fh, offset=offset, size=len(data))
        return int(self.ok("WRITE", {"write": w, "data": data}, nodeid=nodeid).args["write_out"].size)

    def read(self, nodeid: int, fh: int, size: int, offset: int = 0) -> bytes:
        r = F.make("fuse_read_in", fh=fh, offset=offset, size=size)
        return bytes(self.ok("READ", {"read": r}, nodeid=nodeid).args["data"])

    def release(self, nodeid: int, fh: int) -> None:
        self.ok("RELEASE", {"release": F.make("fuse_release_in", fh=fh)}, nodeid=nodeid)
