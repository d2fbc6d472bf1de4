"""Oracle (b): the running kernel's FUSE client talks to our codec over a real /dev/fuse mount.

The kernel sends FUSE_INIT and the LOOKUP/GETATTR/OPEN/READ/FLUSH/RELEASE/STATX that `stat`, `cat`
and `stat -c %W` cause.  We decode every request, re-encode it byte for byte, and answer with encoded
replies; the kernel accepting them (the file reads back, stat shows our attributes, statx shows our
btime) checks the reply layouts, including 7.39+ ones (fuse_statx_out) the installed header lacks.
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from daemon.transport.fusedev import DeviceClosed, FuseDev
from dissectors import fuse as F
from dissectors.spec import fuse as fspec
from tests.conftest import require_root

pytestmark = pytest.mark.root

DATA = b"hello from the oracle\n" * 100
FILE_INO = 2
BTIME = 1_234_567_890
ROOT_ATTR = F.make("fuse_attr", ino=1, mode=stat.S_IFDIR | 0o755, nlink=2, blksize=4096)
FILE_ATTR = F.make("fuse_attr", ino=FILE_INO, size=len(DATA), blocks=(len(DATA) + 511) // 512,
                   mode=stat.S_IFREG | 0o644, nlink=1, uid=0, gid=0, blksize=4096, mtime=1_600_000_000)
STATX_MASK = fspec.STATX_MASK.by_name()


class OracleServer:
    """Answers just enough of the protocol for stat/cat; records what the kernel sent."""

    def __init__(self, dev: FuseDev) -> None:
        self.dev = dev
        self.requests: list[F.Request] = []
        self.raw: list[bytes] = []
        self.reencode_mismatch: list[str] = []
        self.replies: list[F.Reply] = []
        self.errors: list[BaseException] = []
        self.kernel_minor = 0
        self.seen = threading.Condition()

    def attr_for(self, nodeid: int) -> Any:
        return ROOT_ATTR if nodeid == 1 else FILE_ATTR

    def answer(self, req: F.Request) -> bytes | None:
        op = req.op.name
        u = req.unique
        if op == "INIT":
            i = req.args["init"]
            self.kernel_minor = i.minor
            out = F.make("fuse_init_out", major=7, minor=min(i.minor, fspec.KERNEL_MINOR_VERSION),
                         max_readahead=i.max_readahead, flags=i.flags & fspec.INIT_FLAGS.by_name()["ASYNC_READ"],
                         max_background=16, congestion_threshold=12, max_write=128 * 1024, time_gran=1,
                         max_pages=32)
            return F.encode_reply("INIT", {"init_out": out}, unique=u)
        if op == "LOOKUP":
            if req.args["name"] != b"hello" or req.nodeid != 1:
                return F.encode_reply(op, unique=u, error=2)
            entry = F.make("fuse_entry_out", nodeid=FILE_INO, generation=1, attr=FILE_ATTR)
            return F.encode_reply(op, {"entry": entry}, unique=u)
        if op == "GETATTR":
            return F.encode_reply(op, {"attr_out": F.make("fuse_attr_out", attr=self.attr_for(req.nodeid))},
                                  unique=u)
        if op == "STATX":
            a = self.attr_for(req.nodeid)
            sx = F.make("fuse_statx", mask=0x7FF | STATX_MASK["BTIME"], blksize=a.blksize, nlink=a.nlink,
                        mode=a.mode, ino=a.ino, size=a.size, blocks=a.blocks,
                        btime=F.make("fuse_sx_time", tv_sec=BTIME, tv_nsec=5),
                        mtime=F.make("fuse_sx_time", tv_sec=a.mtime))
            return F.encode_reply(op, {"statx_out": F.make("fuse_statx_out", stat=sx)}, unique=u)
        if op in ("OPEN", "OPENDIR"):
            return F.encode_reply(op, {"open": F.make("fuse_open_out", fh=7)}, unique=u)
        if op == "READ":
            r = req.args["read"]
            return F.encode_reply(op, {"data": DATA[r.offset:r.offset + r.size]}, unique=u)
        if op in ("FLUSH", "RELEASE", "RELEASEDIR"):
            return F.encode_reply(op, unique=u)
        if op in ("FORGET", "BATCH_FORGET", "INTERRUPT"):
            return None
        return F.encode_reply(op, unique=u, error=38)  # ENOSYS

    def serve(self) -> None:
        try:
            while True:
                try:
                    raw = self.dev.read()
                except DeviceClosed:
                    return
                req = F.decode_request(raw)
                again = F.encode_request_obj(req)
                if again != raw:
                    self.reencode_mismatch.append(f"{req.op.name}: {raw.hex()} != {again.hex()}")
                reply = self.answer(req)
                # Recorded before the reply goes out: once a client's call returns, what it caused is here
                # (appended after the write, a STATX could be missed by a test reading on stat's exit).
                with self.seen:
                    self.requests.append(req)
                    self.raw.append(raw)
                    if reply is not None:
                        self.replies.append(F.decode_reply(reply, req))  # type: ignore[arg-type]
                    self.seen.notify_all()
                if reply is not None:
                    self.dev.write(reply)
        except BaseException as e:  # surfaced by the test
            self.errors.append(e)

    def wait_for(self, opname: str, timeout: float = 5.0) -> None:
        with self.seen:
            self.seen.wait_for(lambda: any(r.op.name == opname for r in self.requests), timeout)


@pytest.fixture
def oracle(tmp_path: Path) -> Any:
    require_root()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    dev = FuseDev.mount(str(mnt))
    srv = OracleServer(dev)
    t = threading.Thread(target=srv.serve, daemon=True)
    t.start()
    try:
        yield srv, mnt
    finally:
        try:
            dev.unmount()
        except OSError:
            dev.unmount(lazy=True)
        t.join(5)
        assert not t.is_alive(), "serving thread did not end after unmount"
        assert not os.path.ismount(mnt)


def test_kernel_round_trip(oracle: Any) -> None:
    srv, mnt = oracle
    st = os.stat(mnt / "hello")
    assert (st.st_ino, st.st_size, stat.S_IMODE(st.st_mode)) == (FILE_INO, len(DATA), 0o644)
    assert (mnt / "hello").read_bytes() == DATA
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "nope")
    # GNU stat asks statx for STATX_BTIME for %W: the kernel sends FUSE_STATX (7.39+).
    btime = subprocess.run(["stat", "-c", "%W", str(mnt / "hello")], capture_output=True, text=True,
                           check=True).stdout.strip()
    srv.wait_for("RELEASE")
    assert not srv.errors, srv.errors
    assert not srv.reencode_mismatch, srv.reencode_mismatch
    ops = [r.op.name for r in srv.requests]
    for needed in ("INIT", "LOOKUP", "GETATTR", "OPEN", "READ", "FLUSH", "RELEASE"):
        assert needed in ops, f"{needed} not seen; got {ops}"
    init = srv.requests[0]
    assert init.op.name == "INIT" and init.args["init"].major == 7
    assert srv.kernel_minor >= 38
    # The host kernel offers its whole flag set in flags|flags2 (INIT_EXT is set when flags2 is used).
    flags = init.args["init"].flags | (init.args["init"].flags2 << 32)
    assert flags & fspec.INIT_FLAGS.by_name()["SUBMOUNTS"] or flags & fspec.INIT_FLAGS.by_name()["INIT_EXT"]
    lookup = next(r for r in srv.requests if r.op.name == "LOOKUP")
    assert lookup.args["name"] == b"hello" and lookup.nodeid == 1
    reads = [r for r in srv.requests if r.op.name == "READ"]
    assert all(r.args["read"].fh == 7 for r in reads)
    if srv.kernel_minor >= 39 and "STATX" in ops:
        assert btime == str(BTIME), "the kernel did not read btime where fuse_statx puts it"
        sx = next(r for r in srv.requests if r.op.name == "STATX")
        assert sx.args["statx"].sx_mask & STATX_MASK["BTIME"]
    elif srv.kernel_minor >= 39:
        pytest.fail(f"kernel 7.{srv.kernel_minor} never sent STATX for a btime query; ops {ops}")
