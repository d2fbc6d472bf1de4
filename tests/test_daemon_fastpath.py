"""The daemon's C fast path (daemon/passthrough/_fastmodule.c) against its twin, the Python op table.

Two engines over the same shared directory, one with the fast path and one without (FSINSPECT_FAST=python),
get the same request bytes one after the other; every reply must be the same bytes, including errors
(ENOENT, ESTALE, EBADF, bad names, truncated and odd messages), and so must the engines' counters.  The
fast path must also really serve what it claims (its counts), and hand back what it does not handle.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import json
import logging
import os
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from daemon.passthrough import CacheMode, HandleMode, Options, PassthroughFS
from daemon.passthrough import syscalls as sc
from daemon.passthrough.fs import Handle
from daemon.passthrough.inodes import Inode, InodeStore, MountFd
from daemon.server import MAX_WRITE, Server
from daemon.vhost import GuestPassthroughFS
from dissectors import fuse as F
from dissectors.spec import fuse as spec
from tests.conftest import require_root
from tests.daemon_client import KERNEL_FLAGS, EngineClient

pytestmark = pytest.mark.root

OP = {o.name: o.value for o in spec.OPCODES}
GETATTR_FH = spec.GETATTR_FLAGS.by_name()["FH"]
SUBMOUNT = spec.ATTR_FLAGS.by_name()["SUBMOUNT"]
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
OPEN_KILL_SUIDGID = spec.OPEN_IN_FLAGS.by_name()["KILL_SUIDGID"]
# A CREATE reply: fuse_out_header, fuse_entry_out (its fuse_attr from byte 56 on), fuse_open_out.
CREATE_REPLY = F.OUT_HEADER_SIZE + F.CODECS["fuse_entry_out"].size + F.CODECS["fuse_open_out"].size
_ATTR = F.OUT_HEADER_SIZE + 40
_INO, _TIMES = slice(_ATTR, _ATTR + 8), slice(_ATTR + 24, _ATTR + 60)  # st_ino; a/m/ctime and their nsec


def _identity_out(reply: bytes) -> bytes:
    """A CREATE reply without the st_ino and times, which differ between two files made one after the other."""
    b = bytearray(reply)
    b[_INO] = bytes(8)
    b[_TIMES] = bytes(36)
    return bytes(b)


def _native_built() -> bool:
    try:
        from daemon.passthrough import _fast  # type: ignore[attr-defined]  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def share(tmp_path: Path) -> Iterator[Path]:
    """Files, a directory, a symlink, and a tmpfs submount (another st_dev and mount), on a tmpfs of its own:
    STATFS replies carry free block and inode counts, which anything else writing to /tmp's filesystem
    changed between the two engines' calls (a byte-for-byte mismatch, seen under load)."""
    require_root()
    root = tmp_path / "share"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "fsinspect-fast-share", str(root)], check=True)
    try:
        yield from _fill_share(root)
    finally:
        _libc.umount2(str(root).encode(), 2)


def _fill_share(root: Path) -> Iterator[Path]:
    (root / "file").write_bytes(b"x" * 5000)
    (root / "dir").mkdir()
    (root / "dir" / "inner").write_bytes(b"inner")
    (root / "gone").write_bytes(b"deleted later")
    os.symlink("/etc/passwd", root / "link")
    sub = root / "sub"
    sub.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "fsinspect-fast", str(sub)], check=True)
    try:
        (sub / "deep").write_bytes(b"on tmpfs")
        yield root
    finally:
        _libc.umount2(str(sub).encode(), 2)


class Twins:
    """The same request bytes to an engine with the fast path and to one without; replies compared.  Each
    engine serves on a thread of its own, as a daemon's queue does (the main thread creates files through
    Python: it switches the process's umask)."""

    def __init__(self, share: Path, monkeypatch: pytest.MonkeyPatch, fs_class: type[PassthroughFS] = PassthroughFS,
                 **opts: Any) -> None:
        self.threads = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"twin-{n}") for n in ("c", "py")]
        monkeypatch.delenv("FSINSPECT_FAST", raising=False)
        self.fs_c = fs_class(Options(str(share), **opts))
        self.c = EngineClient(Server(self.fs_c), via=self.threads[0])
        monkeypatch.setenv("FSINSPECT_FAST", "python")
        self.fs_py = fs_class(Options(str(share), **opts))
        self.py = EngineClient(Server(self.fs_py), via=self.threads[1])
        monkeypatch.delenv("FSINSPECT_FAST")
        assert self.c.server._fast is not None and self.py.server._fast is None
        self.unique = 0
        self.log: list[tuple[str, bool, bytes | None]] = []
        assert self.init() is not None

    def served(self) -> int:
        assert self.c.server._fast is not None
        served, _errors, _fallbacks = self.c.server._fast.counts()
        return sum(served.values())

    def send(self, raw: bytes, what: str, *, reply: bool = True, between: Callable[[], object] | None = None,
             new_file: Callable[[bytes, bytes], None] | None = None) -> bytes | None:
        """Both engines; the (identical) reply, and whether the fast path served it.  `between` puts back
        what the first engine's request changed in the share (an unlinked name), for the second.  With
        `new_file`, each engine's reply names a file of its own: its st_ino and times are compared by
        new_file(fast, python) instead, every other byte must still be the same."""
        before = self.served()
        timeout = 10.0 if reply else 0.2
        a = self.c.raw(raw, timeout)
        if between is not None:
            between()
        b = self.py.raw(raw, timeout)
        if new_file is not None and a is not None and b is not None and len(a) == len(b) == CREATE_REPLY:
            new_file(a, b)
            a_, b_ = _identity_out(a), _identity_out(b)
            assert a_ == b_, f"{what}: fast path {a_!r} != Python {b_!r} (identity and times left out)"
        else:
            assert a == b, f"{what}: fast path {a!r} != Python {b!r}"
        self.log.append((what, self.served() > before, a))
        return a

    def req(self, op: str, args: dict[str, Any] | None = None, *, nodeid: int = 0, reply: bool = True,
            what: str = "", between: Callable[[], object] | None = None,
            new_file: Callable[[bytes, bytes], None] | None = None, uid: int = 0, gid: int = 0) -> bytes | None:
        self.unique += 1
        raw = F.encode_request(op, args, unique=self.unique, nodeid=nodeid, uid=uid, gid=gid, pid=1,
                               ctx=self.c.server.ctx)
        return self.send(raw, what or f"{op} {nodeid} {args}", reply=reply, between=between, new_file=new_file)

    def init(self) -> bytes | None:
        init = F.make("fuse_init_in", major=7, minor=spec.KERNEL_MINOR_VERSION, max_readahead=128 * 1024,
                      flags=KERNEL_FLAGS & 0xFFFFFFFF, flags2=KERNEL_FLAGS >> 32)
        return self.req("INIT", {"init": init}, what="INIT")

    def decoded(self, op: str, args: dict[str, Any] | None, raw: bytes | None) -> F.Reply:
        assert raw is not None
        rep = F.decode_reply(raw, F.decode_request(F.encode_request(op, args, unique=self.unique),
                                                   self.c.server.ctx), self.c.server.ctx)
        assert isinstance(rep, F.Reply)
        return rep

    def ok(self, op: str, args: dict[str, Any] | None = None, *, nodeid: int = 0) -> F.Reply:
        rep = self.decoded(op, args, self.req(op, args, nodeid=nodeid))
        assert rep.error == 0, f"{op}: {rep.errname}"
        return rep

    def error(self, op: str, args: dict[str, Any] | None = None, *, nodeid: int = 0) -> int:
        return self.decoded(op, args, self.req(op, args, nodeid=nodeid)).error

    def last_fast(self) -> bool:
        return self.log[-1][1]

    def handles(self) -> tuple[dict[int, tuple[int, bool, int, int]], dict[int, tuple[int, bool, int, int]]]:
        """Each engine's open-file table: fh -> (nodeid, is_dir, backing_id, the fd's status flags)."""
        return tuple({fh: (h.inode.nodeid, h.is_dir, h.backing_id, fcntl.fcntl(h.fd, fcntl.F_GETFL))  # type: ignore[return-value]
                      for fh, h in fs._handles.items()} for fs in (self.fs_c, self.fs_py))

    def close(self) -> None:
        for cl in (self.c, self.py):
            cl.server.shutdown()
        self.fs_c.close()
        self.fs_py.close()
        for th in self.threads:
            th.shutdown()


@pytest.fixture
def twins(share: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    if not _native_built():
        pytest.fail("daemon.passthrough._fast is not built: run scripts/setup")
    made: list[Twins] = []

    def make(**opts: Any) -> Twins:
        t = Twins(share, monkeypatch, **opts)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def _getattr(fh: int = 0, flags: int = 0) -> dict[str, Any]:
    return {"getattr": F.make("fuse_getattr_in", getattr_flags=flags, fh=fh)}


def _raw(op: str, body: bytes, *, unique: int, nodeid: int = 1, length: int | None = None, extlen: int = 0) -> bytes:
    n = 40 + len(body) if length is None else length
    return F.IN_HEADER.struct.pack(n, OP[op], unique, nodeid, 0, 0, 1, extlen, 0) + body


@pytest.mark.parametrize("fs_class", [PassthroughFS, GuestPassthroughFS], ids=["standalone", "vhost"])
@pytest.mark.parametrize("handles", [HandleMode.PREFER, HandleMode.NEVER])
@pytest.mark.parametrize("cache", [CacheMode.NONE, CacheMode.AUTO, CacheMode.ALWAYS])
def test_fast_path_replies_byte_for_byte_as_python(twins: Any, share: Path, handles: HandleMode,
                                                   cache: CacheMode, fs_class: type[PassthroughFS]) -> None:
    """The vhost-user filesystem answers a submount point with generation 0 (daemon/vhost.py): both paths."""
    t: Twins = twins(cache=cache, inode_file_handles=handles, fs_class=fs_class)
    look = lambda parent, name: t.ok("LOOKUP", {"name": name}, nodeid=parent).args["entry"]  # noqa: E731

    # LOOKUP: a new inode (made by the store's find_or_add, called from C) and a known one.
    f = look(1, b"file")
    assert t.last_fast()
    assert look(1, b"file").nodeid == f.nodeid and t.last_fast()
    d = look(1, b"dir")
    inner = look(d.nodeid, b"inner")  # its LOOKUP cached the handle-held directory's O_PATH fd
    assert t.last_fast()
    for fs in (t.fs_c, t.fs_py):  # let it go: under a directory whose fd is not cached, Python's (it caches)
        fs.store.drop_cached_fd(fs.store.get(d.nodeid))
    assert look(d.nodeid, b"inner").nodeid == inner.nodeid
    assert t.last_fast() == (handles is HandleMode.NEVER)
    assert all((fs.store.get(d.nodeid).cached_fd >= 0) == (handles is HandleMode.PREFER) for fs in (t.fs_c, t.fs_py))
    assert look(d.nodeid, b"..").nodeid == 1 and t.last_fast()  # the root, held by fd
    assert look(1, b"..").nodeid == 1 and look(1, b".").nodeid == 1 and t.last_fast()
    assert look(d.nodeid, b".").nodeid == d.nodeid
    link = look(1, b"link")
    assert look(1, b"link").nodeid == link.nodeid and t.last_fast()
    # The submount: FUSE_ATTR_SUBMOUNT from both paths (the second LOOKUP is the fast path's).
    s1 = look(1, b"sub")
    s2 = look(1, b"sub")
    assert s1.attr.flags & SUBMOUNT and s2.attr.flags & SUBMOUNT and t.last_fast()
    assert (s2.generation == 0) == (fs_class is GuestPassthroughFS), s2
    deep = look(s1.nodeid, b"deep")
    assert look(s1.nodeid, b"deep").nodeid == deep.nodeid and not deep.attr.flags & SUBMOUNT
    # Errors the fast path answers: a name that is not there.
    assert t.error("LOOKUP", {"name": b"missing"}, nodeid=1) == errno.ENOENT and t.last_fast()
    assert t.error("LOOKUP", {"name": b"x"}, nodeid=f.nodeid) == errno.ENOTDIR  # under a file
    # ... and those it leaves to Python: bad names, unknown nodeids.
    for name, err in ((b"a/b", errno.EINVAL), (b"n" * 256, errno.ENAMETOOLONG)):
        assert t.error("LOOKUP", {"name": name}, nodeid=1) == err and not t.last_fast()
    assert t.error("LOOKUP", {"name": b"file"}, nodeid=999) == errno.EBADF and not t.last_fast()

    # GETATTR: files, directories (a handle-held one is served once its fd is cached), a symlink, the root.
    for nodeid in (1, f.nodeid, d.nodeid, inner.nodeid, link.nodeid, s1.nodeid, deep.nodeid):
        a = t.ok("GETATTR", _getattr(), nodeid=nodeid).args["attr_out"].attr
        b = t.ok("GETATTR", _getattr(), nodeid=nodeid).args["attr_out"].attr
        assert a == b and t.last_fast(), nodeid
    assert t.ok("GETATTR", _getattr(), nodeid=f.nodeid).args["attr_out"].attr.size == 5000
    assert t.error("GETATTR", _getattr(), nodeid=12345) == errno.EBADF and not t.last_fast()

    # OPEN/OPENDIR are Python's; GETATTR with FH, FLUSH, RELEASE and RELEASEDIR the fast path's.
    fh = t.ok("OPEN", {"open": F.make("fuse_open_in", flags=os.O_RDONLY)}, nodeid=f.nodeid).args["open"].fh
    dfh = t.ok("OPENDIR", {"open": F.make("fuse_open_in")}, nodeid=d.nodeid).args["open"].fh
    t.ok("GETATTR", _getattr(fh, GETATTR_FH), nodeid=f.nodeid)
    assert t.last_fast()
    t.ok("GETATTR", _getattr(9999, GETATTR_FH), nodeid=f.nodeid)  # an unknown fh: the inode's stat
    t.ok("FLUSH", {"flush": F.make("fuse_flush_in", fh=fh)}, nodeid=f.nodeid)
    assert t.last_fast()
    assert t.error("FLUSH", {"flush": F.make("fuse_flush_in", fh=dfh)}, nodeid=d.nodeid) == errno.EBADF
    assert t.error("FLUSH", {"flush": F.make("fuse_flush_in", fh=777)}, nodeid=d.nodeid) == errno.EBADF
    rel = lambda h: {"release": F.make("fuse_release_in", fh=h)}  # noqa: E731
    assert t.error("RELEASE", rel(dfh), nodeid=d.nodeid) == errno.EBADF and t.last_fast()  # a dir's fh
    assert t.error("RELEASEDIR", rel(fh), nodeid=f.nodeid) == errno.EBADF and t.last_fast()  # a file's fh
    t.ok("RELEASE", rel(fh), nodeid=f.nodeid)
    assert t.last_fast()
    assert t.error("RELEASE", rel(fh), nodeid=f.nodeid) == errno.EBADF  # released already
    t.ok("RELEASEDIR", rel(dfh), nodeid=d.nodeid)
    assert t.error("RELEASEDIR", rel(dfh), nodeid=d.nodeid) == errno.EBADF
    assert t.fs_c._handles == {} and t.fs_py._handles == {}

    # UNLINK and RMDIR: each engine removes its own copy (made again in between); errors without a change.
    victim, vdir = share / "victim", share / "dir" / "vdir"
    victim.write_bytes(b"v")
    vdir.mkdir()
    t.req("UNLINK", {"name": b"victim"}, nodeid=1, between=lambda: victim.write_bytes(b"v"))
    assert t.last_fast() and not victim.exists()
    t.req("RMDIR", {"name": b"vdir"}, nodeid=d.nodeid, between=vdir.mkdir)
    assert t.last_fast() and not vdir.exists()
    for op, parent, name, err in (("UNLINK", 1, b"missing", errno.ENOENT), ("UNLINK", 1, b"dir", errno.EISDIR),
                                  ("RMDIR", 1, b"file", errno.ENOTDIR), ("RMDIR", 1, b"dir", errno.ENOTEMPTY),
                                  ("RMDIR", 1, b"sub", errno.EBUSY)):
        assert t.error(op, {"name": name}, nodeid=parent) == err and t.last_fast(), (op, name)
    for op, parent, name, err in (("UNLINK", 1, b".", errno.EINVAL), ("RMDIR", d.nodeid, b"..", errno.EINVAL),
                                  ("UNLINK", 1, b"a/b", errno.EINVAL), ("UNLINK", 999, b"file", errno.EBADF),
                                  ("UNLINK", f.nodeid, b"x", errno.ENOTDIR)):
        assert t.error(op, {"name": name}, nodeid=parent) == err and not t.last_fast(), (op, name)
    assert (share / "file").exists() and (share / "dir").is_dir()

    # STATFS of the root, a file, the submount.
    for nodeid in (1, f.nodeid, s1.nodeid):
        t.ok("STATFS", nodeid=nodeid)
        assert t.last_fast()
    assert t.error("STATFS", nodeid=4242) == errno.EBADF

    # A file deleted on the host: ESTALE by handle, its last attributes (nlink 0) by O_PATH fd.  Its LOOKUP
    # cached an O_PATH fd in each engine (handles): the fast engine's shows no link left, so it lets it go and
    # asks the handle.  The Python engine's cached fd would keep the host inode alive for it (two engines in
    # one process): it lets go of it first (its own branch is test_daemon_passthrough's, on both engines).
    gone = look(1, b"gone")
    os.unlink(share / "gone")
    if handles is HandleMode.PREFER:
        assert t.fs_c.store.get(gone.nodeid).cached_fd >= 0
        t.fs_py.store.drop_cached_fd(t.fs_py.store.get(gone.nodeid))
    raw = t.req("GETATTR", _getattr(), nodeid=gone.nodeid)
    rep = t.decoded("GETATTR", _getattr(), raw)
    if handles is HandleMode.PREFER:
        assert rep.error == errno.ESTALE and t.last_fast()
        assert t.fs_c.store.get(gone.nodeid).cached_fd == -1
    else:
        assert rep.error == 0 and rep.args["attr_out"].attr.nlink == 0

    # FORGET and BATCH_FORGET go to the filesystem's forget(): the inode is gone on both sides.
    t.req("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, nodeid=link.nodeid, reply=False)
    assert t.error("GETATTR", _getattr(), nodeid=link.nodeid) == 0  # looked up twice: one left
    t.req("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, nodeid=link.nodeid, reply=False)
    assert t.error("GETATTR", _getattr(), nodeid=link.nodeid) == errno.EBADF
    forgets = [F.make("fuse_forget_one", nodeid=n, nlookup=2) for n in (f.nodeid, inner.nodeid, 31337)]
    t.req("BATCH_FORGET", {"batch": F.make("fuse_batch_forget_in", count=3), "forgets": forgets},
          reply=False)
    for n in (f.nodeid, inner.nodeid):
        assert t.error("GETATTR", _getattr(), nodeid=n) == errno.EBADF
    assert look(1, b"file").nodeid > f.nodeid  # a new nodeid, on both sides
    assert _tables(t.fs_c) == _tables(t.fs_py)

    # Odd messages: all Python's (the decoder's answer), byte for byte.
    u = 10_000
    odd = [
        ("GETATTR with a short body", _raw("GETATTR", b"\0" * 8, unique=u + 1)),
        ("GETATTR with a long body", _raw("GETATTR", b"\0" * 24, unique=u + 2)),
        ("length past the buffer", _raw("GETATTR", b"\0" * 16, unique=u + 3, length=80)),
        ("length short of the buffer", _raw("GETATTR", b"\0" * 16, unique=u + 4, length=48)),
        ("extensions", _raw("GETATTR", b"\0" * 24, unique=u + 5, extlen=1)),
        ("LOOKUP without NUL", _raw("LOOKUP", b"file", unique=u + 6)),
        ("LOOKUP empty name", _raw("LOOKUP", b"\0", unique=u + 7)),
        ("LOOKUP NUL inside", _raw("LOOKUP", b"fi\0le\0", unique=u + 8)),
        ("RELEASE short", _raw("RELEASE", b"\0" * 16, unique=u + 9)),
        ("FLUSH short", _raw("FLUSH", b"\0" * 8, unique=u + 10)),
        ("STATFS with a body", _raw("STATFS", b"\0" * 8, unique=u + 11)),
        ("truncated header", _raw("GETATTR", b"", unique=u + 12)[:30]),
    ]
    for what, raw in odd:
        t.send(raw, what, reply=what != "truncated header")
        assert not t.last_fast(), what
    t.send(_raw("FORGET", b"\0" * 4, unique=u + 13), "FORGET short", reply=False)
    t.send(_raw("BATCH_FORGET", struct.pack("<II", 2, 0) + b"\0" * 16, unique=u + 14), "BATCH_FORGET short",
           reply=False)

    # The engines agree on what they counted, and the fast path did serve most of it.
    cc, pc = t.c.server.counters(), t.py.server.counters()
    assert cc["ops"] == pc["ops"] and cc["errors"] == pc["errors"] and cc["dropped"] == pc["dropped"]
    assert cc["fast_path"]["served"] >= 40 and cc["fast_path"]["fallbacks"] >= 15, cc["fast_path"]
    assert "fast_path" not in pc


def _create(flags: int, mode: int = 0o100644, umask: int = 0o022, open_flags: int = 0, *,
            name: bytes) -> dict[str, Any]:
    return {"create": F.make("fuse_create_in", flags=flags, mode=mode, umask=umask, open_flags=open_flags),
            "name": name}


def _open(flags: int, open_flags: int = 0) -> dict[str, Any]:
    return {"open": F.make("fuse_open_in", flags=flags, open_flags=open_flags)}


@pytest.mark.parametrize("fs_class", [PassthroughFS, GuestPassthroughFS], ids=["standalone", "vhost"])
@pytest.mark.parametrize("handles", [HandleMode.PREFER, HandleMode.NEVER])
@pytest.mark.parametrize("cache,writeback", [(CacheMode.NONE, False), (CacheMode.AUTO, False),
                                             (CacheMode.ALWAYS, True)], ids=["none", "auto", "always-writeback"])
def test_create_and_open_byte_for_byte_as_python(twins: Any, share: Path, handles: HandleMode, cache: CacheMode,
                                                 writeback: bool, fs_class: type[PassthroughFS]) -> None:
    """CREATE, OPEN and OPENDIR on the fast path: the same replies (a new file's st_ino and times are its own),
    the same open-file tables (fd status flags included), the same files on the host and the same counters."""
    t: Twins = twins(cache=cache, inode_file_handles=handles, fs_class=fs_class, writeback=writeback)
    pub = share / "pub"
    pub.mkdir()
    pub.chmod(0o1777)
    os.mkfifo(share / "fifo")
    look = lambda parent, name: t.ok("LOOKUP", {"name": name}, nodeid=parent).args["entry"]  # noqa: E731
    d = look(1, b"dir")
    pubn = look(1, b"pub").nodeid
    sub = look(1, b"sub")

    def made(path: Path) -> Callable[[bytes, bytes], None]:
        """The fast path created `path` (moved aside to path.c for the Python engine to create its own)."""
        def check(a: bytes, b: bytes) -> None:
            for reply, p, moved in ((a, path.with_name(path.name + ".c"), True), (b, path, False)):
                st = os.stat(p)
                assert int.from_bytes(reply[_INO], "little") == st.st_ino, p
                a_s, m_s, c_s, a_ns, m_ns, c_ns = struct.unpack_from("<QQQIII", reply, _TIMES.start)
                assert (a_s * 10**9 + a_ns, m_s * 10**9 + m_ns) == (st.st_atime_ns, st.st_mtime_ns), p
                assert moved or c_s * 10**9 + c_ns == st.st_ctime_ns, p  # (moving it aside set its ctime)
        return check

    def create(parent: int, dirpath: Path, name: bytes, flags: int, **kw: Any) -> F.Reply:
        """A new file made by each engine: the fast path's is moved aside before the Python engine's turn."""
        path = dirpath / os.fsdecode(name)
        args = _create(flags, name=name, **{k: v for k, v in kw.items() if k != "uid"})
        uid = kw.get("uid", 0)
        raw = t.req("CREATE", args, nodeid=parent, uid=uid, gid=uid, new_file=made(path),
                    between=lambda: path.rename(path.with_name(path.name + ".c")))
        rep = t.decoded("CREATE", args, raw)
        assert rep.error == 0, rep.errname
        return rep

    excl = os.O_CREAT | os.O_EXCL
    # New files, in the root (held by fd), in a directory and on the submount, with each access mode and the
    # status flags the kernel passes on (O_APPEND, O_NONBLOCK, O_SYNC, O_DIRECT: dropped; writeback: O_WRONLY
    # opened O_RDWR, O_APPEND dropped).  A directory held by handle has its fd cached since its LOOKUP.
    cases = [(1, share, b"n-ro", os.O_RDONLY | excl), (1, share, b"n-wo", os.O_WRONLY | excl),
             (1, share, b"n-app", os.O_RDWR | os.O_APPEND | excl), (1, share, b"n-nb", os.O_WRONLY | os.O_NONBLOCK),
             (1, share, b"n-sync", os.O_WRONLY | os.O_SYNC | excl), (1, share, b"n-direct", os.O_RDWR | os.O_DIRECT),
             (d.nodeid, share / "dir", b"n1", os.O_RDWR | excl), (d.nodeid, share / "dir", b"n2", os.O_RDWR | excl),
             (sub.nodeid, share / "sub", b"n1", os.O_RDWR | excl), (sub.nodeid, share / "sub", b"n2", os.O_RDWR)]
    fhs = []
    for parent, dirpath, name, flags in cases:
        rep = create(parent, dirpath, name, flags | os.O_CREAT)
        assert t.last_fast(), name
        fhs.append((rep.args["entry"].nodeid, rep.args["open"].fh))
        assert rep.args["entry"].attr.mode == stat.S_IFREG | 0o644  # the mode as sent (the kernel applied the umask)
    fast_table, python_table = t.handles()
    assert fast_table == python_table and len(fast_table) == len(cases)
    ap = fast_table[fhs[2][1]][3]
    assert (ap & os.O_APPEND == 0) == writeback and ap & os.O_NONBLOCK == 0
    assert fast_table[fhs[1][1]][3] & os.O_ACCMODE == (os.O_RDWR if writeback else os.O_WRONLY)
    assert fast_table[fhs[3][1]][3] & os.O_NONBLOCK and not fast_table[fhs[5][1]][3] & os.O_DIRECT
    assert stat.S_IMODE(os.stat(share / "n-ro").st_mode) == stat.S_IMODE(os.stat(share / "n-ro.c").st_mode) == 0o644

    # The mode as the kernel sent it, whatever the umask field: the serving threads create with umask 0.
    create(1, share, b"n-666", os.O_RDWR | excl, mode=0o100666, umask=0o077)
    assert stat.S_IMODE(os.stat(share / "n-666").st_mode) == stat.S_IMODE(os.stat(share / "n-666.c").st_mode) == 0o666
    # As the caller: a file owned by uid 1000 where it may write, EACCES where it may not.
    for name in (b"mine", b"mine2"):  # (the directory's LOOKUP cached its fd)
        create(pubn, pub, name, os.O_WRONLY | excl, uid=1000)
        assert t.last_fast()
        for p in (pub / os.fsdecode(name), pub / (os.fsdecode(name) + ".c")):
            assert (os.stat(p).st_uid, os.stat(p).st_gid) == (1000, 1000)
    raw = t.req("CREATE", _create(os.O_WRONLY | excl, name=b"nope"), nodeid=1, uid=1000, gid=1000)
    assert t.decoded("CREATE", _create(0, name=b"nope"), raw).error == errno.EACCES and t.last_fast()
    assert not (share / "nope").exists()

    # An existing file: the same inode for both, so the same bytes (O_TRUNC's times aside).
    e = look(1, b"file")
    for flags in (os.O_RDWR | os.O_CREAT, os.O_WRONLY | os.O_CREAT):
        rep = t.ok("CREATE", _create(flags, name=b"file"), nodeid=1)
        assert rep.args["entry"].nodeid == e.nodeid and rep.args["entry"].attr.size == 5000 and t.last_fast()
    (share / "trunc").write_bytes(b"t" * 100)
    args = _create(os.O_RDWR | os.O_CREAT | os.O_TRUNC, name=b"trunc")
    raw = t.req("CREATE", args, nodeid=1, between=lambda: (share / "trunc").write_bytes(b"t" * 100),
                new_file=lambda a, b: None)
    assert t.decoded("CREATE", args, raw).args["entry"].attr.size == 0 and t.last_fast()
    # ... left to Python: KILL_SUIDGID with O_TRUNC, O_DIRECTORY, bad names, an unknown parent, a file as parent.
    t.req("CREATE", _create(os.O_RDWR | os.O_CREAT | os.O_TRUNC, open_flags=OPEN_KILL_SUIDGID, name=b"trunc"),
          nodeid=1, between=lambda: None, new_file=lambda a, b: None)
    assert not t.last_fast()
    for parent, name, flags, err in ((1, b".", os.O_RDWR, errno.EINVAL), (1, b"..", os.O_RDWR, errno.EINVAL),
                                     (1, b"a/b", os.O_RDWR, errno.EINVAL), (999, b"x", os.O_RDWR, errno.EBADF),
                                     (e.nodeid, b"x", os.O_RDWR, errno.ENOTDIR),
                                     (1, b"n-dir", os.O_RDWR | os.O_DIRECTORY, errno.EINVAL)):
        assert t.error("CREATE", _create(flags | os.O_CREAT, name=name), nodeid=parent) == err and not t.last_fast()
    # Errors it answers: the name is there (O_EXCL), a directory, a FIFO (never opened for real: EPERM), and a
    # symlink, never followed out of the share (O_NOFOLLOW: ELOOP, or EEXIST with O_EXCL).
    for name, flags, err in ((b"file", os.O_RDWR | excl, errno.EEXIST), (b"dir", os.O_RDWR | os.O_CREAT, errno.EISDIR),
                             (b"fifo", os.O_RDWR | os.O_CREAT, errno.EPERM), (b"link", os.O_RDWR | os.O_CREAT,
                                                                               errno.ELOOP),
                             (b"link", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, errno.ELOOP),
                             (b"link", os.O_RDWR | excl, errno.EEXIST)):
        assert t.error("CREATE", _create(flags, name=name), nodeid=1) == err and t.last_fast(), name
    assert os.path.getsize("/etc/passwd") > 0

    # OPEN of files by each access mode (the table keeps their status flags), OPENDIR of directories.
    for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_APPEND, os.O_RDONLY | os.O_NONBLOCK,
                  os.O_RDWR | os.O_DIRECT, os.O_RDONLY | os.O_NOATIME):
        fhs.append((e.nodeid, t.ok("OPEN", _open(flags), nodeid=e.nodeid).args["open"].fh))
        assert t.last_fast(), flags
    t.req("OPEN", _open(os.O_WRONLY | os.O_TRUNC), nodeid=e.nodeid,
          between=lambda: (share / "file").write_bytes(b"x" * 5000))
    assert t.last_fast() and os.path.getsize(share / "file") == 0
    (share / "file").write_bytes(b"x" * 5000)
    for nodeid in (1, d.nodeid, sub.nodeid):
        fhs.append((nodeid, t.ok("OPENDIR", _open(os.O_RDONLY), nodeid=nodeid).args["open"].fh))
        assert t.last_fast(), nodeid
    fast_table, python_table = t.handles()
    assert fast_table == python_table
    # ... left to Python: a directory (EISDIR), O_DIRECTORY (EINVAL), a symlink (ELOOP), a FIFO (EPERM), OPENDIR of a
    # file (ENOTDIR), an unknown nodeid (EBADF), KILL_SUIDGID with O_TRUNC.
    link, fifo = look(1, b"link"), look(1, b"fifo")
    for op, nodeid, flags, err in (("OPEN", d.nodeid, os.O_RDONLY, errno.EISDIR),
                                   ("OPEN", e.nodeid, os.O_RDONLY | os.O_DIRECTORY, errno.EINVAL),
                                   ("OPEN", link.nodeid, os.O_RDONLY, errno.ELOOP),
                                   ("OPEN", fifo.nodeid, os.O_RDONLY, errno.EPERM),
                                   ("OPENDIR", e.nodeid, os.O_RDONLY, errno.ENOTDIR),
                                   ("OPEN", 4242, os.O_RDONLY, errno.EBADF), ("OPENDIR", 4242, 0, errno.EBADF)):
        assert t.error(op, _open(flags), nodeid=nodeid) == err and not t.last_fast(), (op, nodeid)
    t.req("OPEN", _open(os.O_WRONLY | os.O_TRUNC, OPEN_KILL_SUIDGID), nodeid=e.nodeid,
          between=lambda: (share / "file").write_bytes(b"x" * 5000))
    assert not t.last_fast()
    # A file deleted on the host: ESTALE through its handle (the fast path's answer), opened through its O_PATH fd.
    # Its LOOKUP cached an O_PATH fd, which keeps the host inode alive, so the handle opens it: the fast path
    # sees no link left, lets the cached fd go and asks again.  (The Python engine's cached fd would keep
    # the inode alive for the fast one: it goes first; Python's own branch is test_daemon_passthrough's.)
    gone = look(1, b"gone")
    os.unlink(share / "gone")
    if handles is HandleMode.PREFER:
        t.fs_py.store.drop_cached_fd(t.fs_py.store.get(gone.nodeid))
    raw = t.req("OPEN", _open(os.O_RDONLY), nodeid=gone.nodeid)
    rep = t.decoded("OPEN", _open(0), raw)
    assert t.last_fast() and rep.error == (errno.ESTALE if handles is HandleMode.PREFER else 0)
    assert t.fs_c.store.get(gone.nodeid).cached_fd == -1
    if rep.error == 0:
        fhs.append((gone.nodeid, rep.args["open"].fh))

    # Everything released the same way; the engines counted the same.
    fast_table, python_table = t.handles()
    assert fast_table == python_table and {fh for _n, fh in fhs} <= set(fast_table)
    for fh, (nodeid, is_dir, _b, _fl) in fast_table.items():
        t.ok("RELEASEDIR" if is_dir else "RELEASE", {"release": F.make("fuse_release_in", fh=fh)}, nodeid=nodeid)
        assert t.last_fast()
    assert t.fs_c._handles == {} and t.fs_py._handles == {}
    assert _tables(t.fs_c, identity=False) == _tables(t.fs_py, identity=False)  # each created its own files
    cc, pc = t.c.server.counters(), t.py.server.counters()
    assert cc["ops"] == pc["ops"] and cc["errors"] == pc["errors"], (cc, pc)
    assert cc["fast_path"]["served"] >= 60, cc["fast_path"]


class GuestChain:
    """A vhost-user chain as the ring engine gives it (daemon.transport.vhost_user): writable guest segments,
    and reply() scattering the parts into them, a non-buffer part being bytes already written in place."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.memory = [bytearray(b"\xee" * n) for n in sizes]
        self.writable = [memoryview(m) for m in self.memory]
        self.written = -1

    def reply(self, parts: Any) -> None:
        flat = bytearray(b"".join(self.memory))
        at = 0
        for p in parts:
            if isinstance(p, (bytes, bytearray, memoryview)):
                flat[at:at + len(p)] = p
            at += len(p)
        self.written = at
        self.contents = bytes(flat[:at])


def test_read_write_byte_for_byte_as_python(twins: Any, share: Path) -> None:
    """READ and WRITE on the fast path: plain (the reply carries the data) and, on the vhost-user filesystem,
    READ straight into a chain's guest buffers; the same replies, files and counters as the Python path."""
    t: Twins = twins(fs_class=GuestPassthroughFS)
    look = lambda parent, name: t.ok("LOOKUP", {"name": name}, nodeid=parent).args["entry"]  # noqa: E731
    e = look(1, b"file")
    d = look(1, b"dir")
    rw = t.ok("OPEN", _open(os.O_RDWR), nodeid=e.nodeid).args["open"].fh
    ro = t.ok("OPEN", _open(os.O_RDONLY), nodeid=e.nodeid).args["open"].fh
    ap = t.ok("OPEN", _open(os.O_WRONLY | os.O_APPEND), nodeid=e.nodeid).args["open"].fh
    dfh = t.ok("OPENDIR", _open(0), nodeid=d.nodeid).args["open"].fh

    def write(fh: int, offset: int, data: bytes, flags: int = 0) -> bytes | None:
        w = F.make("fuse_write_in", fh=fh, offset=offset, size=len(data), write_flags=flags)
        return t.req("WRITE", {"write": w, "data": data}, nodeid=e.nodeid)

    def read(fh: int, offset: int, size: int) -> bytes | None:
        return t.req("READ", {"read": F.make("fuse_read_in", fh=fh, offset=offset, size=size)}, nodeid=e.nodeid)

    payload = os.urandom(70_000)
    # ... up to the largest a kernel sends (max_write): a guest's dd bs=1M sends 496 KiB WRITEs.
    for offset, data in ((0, b"hello"), (4000, payload), (123_456, b"past the end"),
                         (300_000, os.urandom(124 * 4096)), (1 << 20, os.urandom(MAX_WRITE))):
        write(rw, offset, data)
        assert t.last_fast()
        assert (share / "file").read_bytes()[offset:offset + len(data)] == data
    write(ap, 0, b"appended")  # both engines append: the file ends with it twice
    assert t.last_fast() and (share / "file").read_bytes().endswith(b"appended" * 2)
    for fh, offset, size in ((rw, 0, 5), (ro, 4000, 70_000), (rw, 100_000, 65_536), (ro, 10**9, 4096), (ro, 0, 0),
                             (rw, 0, 128 * 1024)):
        raw = read(fh, offset, size)
        assert raw is not None and t.last_fast()
        got = raw[F.OUT_HEADER_SIZE:]
        assert got == (share / "file").read_bytes()[offset:offset + size], (offset, size)
    # Errors it answers (the host's): WRITE through a read-only fh, READ through a write-only one.
    assert t.error("WRITE", {"write": F.make("fuse_write_in", fh=ro, size=1), "data": b"x"}, nodeid=e.nodeid) \
        == errno.EBADF and t.last_fast()
    assert t.error("READ", {"read": F.make("fuse_read_in", fh=ap, size=10)}, nodeid=e.nodeid) == errno.EBADF
    assert t.last_fast()
    # ... and what is Python's: an unknown fh, a directory's, KILL_SUIDGID, I/O bigger than the engine does inline.
    big = os.urandom(128 * 1024 + 1)
    too_big = os.urandom(MAX_WRITE + 1)  # past max_write: no kernel sends it
    for what, go in (("WRITE unknown fh", lambda: write(4242, 0, b"x")), ("WRITE dir fh", lambda: write(dfh, 0, b"x")),
                     ("READ dir fh", lambda: read(dfh, 0, 10)), ("READ unknown fh", lambda: read(4242, 0, 10)),
                     ("WRITE KILL_SUIDGID", lambda: write(rw, 0, b"h", spec.WRITE_FLAGS.by_name()["KILL_SUIDGID"])),
                     ("WRITE past max_write", lambda: write(rw, 0, too_big)), ("READ big", lambda: read(rw, 0, len(big)))):
        go()
        assert not t.last_fast(), what
    u = 20_000
    odd = [("WRITE size past the data", _raw("WRITE", struct.pack("<QQIIQII", rw, 0, 10, 0, 0, 0, 0) + b"abc",
                                            unique=u + 1, nodeid=e.nodeid)),
           ("WRITE size short of the data", _raw("WRITE", struct.pack("<QQIIQII", rw, 0, 1, 0, 0, 0, 0) + b"abc",
                                                 unique=u + 2, nodeid=e.nodeid)),
           ("READ short", _raw("READ", struct.pack("<QQI", rw, 0, 10), unique=u + 3, nodeid=e.nodeid))]
    for what, raw in odd:
        t.send(raw, what)
        assert not t.last_fast(), what

    # READ into a vhost-user chain's guest buffers: segments of odd sizes, the reply header in the first.
    chains: dict[str, dict[int, GuestChain]] = {"c": {}, "py": {}}
    t.fs_c.chain_for = chains["c"].get  # type: ignore[attr-defined]
    t.fs_py.chain_for = chains["py"].get  # type: ignore[attr-defined]
    for fh, offset, size, sizes in ((rw, 0, 5000, (10, 4096, 100, 70_000)), (ro, 4000, 70_000, (16, 65_536, 8192)),
                                    (rw, 190_000, 4096, (4112,)), (ro, 0, 100, (8, 8, 50, 4096)),
                                    (ro, 10, 9000, (16,)), (ap, 0, 10, (4096,))):
        t.unique += 1
        raw = F.encode_request("READ", {"read": F.make("fuse_read_in", fh=fh, offset=offset, size=size)},
                               unique=t.unique, nodeid=e.nodeid, ctx=t.c.server.ctx)
        before = t.served()
        got = []
        for side, cl in (("c", t.c), ("py", t.py)):
            chain = GuestChain(sizes)
            if side == "c":  # as the vhost-user queue thread calls it: the chain with the request
                r = cl.via.submit(cl.server.fast, raw, chain).result()  # type: ignore[union-attr,misc]
                assert r is not None
                chain.reply(r if isinstance(r, tuple) else (r,))
            else:  # the Python path finds it by unique (GuestPassthroughFS.chain_for)
                chains[side][t.unique] = chain
                cl.via.submit(cl.server.handle, raw, chain.reply).result()  # type: ignore[union-attr]
            assert chain.written > 0
            got.append((chain.written, chain.contents))
        assert got[0] == got[1], (fh, offset, size, sizes)
        assert t.served() > before, (fh, offset, size, sizes)
        err = int.from_bytes(got[0][1][4:8], "little", signed=True)
        if not err:
            want = (share / "file").read_bytes()[offset:offset + min(size, sum(sizes) - F.OUT_HEADER_SIZE)]
            assert got[0][1][F.OUT_HEADER_SIZE:] == want and got[0][0] == F.OUT_HEADER_SIZE + len(want)
        else:
            assert -err == errno.EBADF and fh == ap

    cc, pc = t.c.server.counters(), t.py.server.counters()
    assert cc["ops"] == pc["ops"] and cc["errors"] == pc["errors"], (cc, pc)
    assert cc["ops"]["READ"] >= 15 and cc["ops"]["WRITE"] >= 8


def test_create_on_the_main_thread_is_pythons(share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main thread has the process's umask (Python switches it around the call): no fast CREATE there."""
    monkeypatch.delenv("FSINSPECT_FAST", raising=False)
    fs = PassthroughFS(Options(str(share)))
    c = EngineClient(Server(fs))
    c.init()
    old = os.umask(0o077)
    try:
        nodeid, fh = c.create(1, b"main", mode=0o100664)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(share / "main").st_mode) == 0o664
    assert c.server.counters()["fast_path"]["fallbacks"] >= 1
    c.release(nodeid, fh)
    c.server.shutdown()
    fs.close()


def test_fast_path_leaves_a_read_only_export_to_python(twins: Any, share: Path) -> None:
    t: Twins = twins(readonly=True)
    assert t.error("UNLINK", {"name": b"file"}, nodeid=1) == errno.EROFS and not t.last_fast()
    assert t.error("RMDIR", {"name": b"dir"}, nodeid=1) == errno.EROFS and not t.last_fast()
    assert t.error("GETATTR", _getattr(), nodeid=1) == 0 and t.last_fast()
    assert (share / "file").exists() and (share / "dir").is_dir()


def test_fast_path_off_with_a_tap_and_after_destroy(share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tap (or hold point) sees every request as Python does: no fast path; none before INIT or after DESTROY."""
    if not _native_built():
        pytest.fail("daemon.passthrough._fast is not built: run scripts/setup")
    monkeypatch.delenv("FSINSPECT_FAST", raising=False)
    fs = PassthroughFS(Options(str(share)))
    seen: list[str] = []
    tapped = Server(fs, tap=lambda d, q, u, ts, raw: seen.append(d))
    assert tapped._fast is None
    plain = Server(fs)
    assert plain._fast is not None and plain.fast is None
    c = EngineClient(plain)
    assert c.call("GETATTR", nodeid=1).error == errno.EIO  # before INIT: the engine's answer
    assert c.init().error == 0 and plain.fast is plain._fast
    c.ok("GETATTR", _getattr(), nodeid=1)
    assert plain.counters()["fast_path"]["served"] == 1
    c.call("DESTROY")
    assert plain.fast is None and c.call("GETATTR", nodeid=1).error == errno.EIO
    e = EngineClient(tapped)
    e.init()
    e.ok("GETATTR", _getattr(), nodeid=1)
    assert seen.count("request") == 2 and "fast_path" not in tapped.counters()
    for s in (plain, tapped):
        s.shutdown()
    fs.close()


def test_a_filesystem_that_redefines_a_fast_op_gets_no_fast_path(share: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The C answers as PassthroughFS's methods do: a subclass with its own LOOKUP entries must be asked."""
    monkeypatch.delenv("FSINSPECT_FAST", raising=False)

    class Renumbered(PassthroughFS):
        def _entry(self, inode: Any, st: Any, parent: Any) -> Any:
            e = super()._entry(inode, st, parent)
            e.generation += 1000
            return e

    fs = Renumbered(Options(str(share)))
    assert fs.fast_path() is None
    c = EngineClient(Server(fs))
    c.init()
    assert c.lookup(1, b"file").args["entry"].generation > 1000
    assert c.lookup(1, b"file").args["entry"].generation > 1000
    c.server.shutdown()
    fs.close()
    plain = PassthroughFS(Options(str(share)))
    assert plain.fast_path() is not None
    plain.close()


def _fields(inode: Any) -> tuple[Any, ...]:
    return tuple(getattr(inode, f) for f in (*(f.name for f in dataclasses.fields(Inode)), "key", "is_dir"))


def test_the_c_inode_is_its_twin_the_dataclass() -> None:
    """_fast.Inode, what a store served by the C holds, reads and writes as inodes.Inode, the Python op table's:
    the same constructor (positions, keywords, defaults), fields, key and is_dir, and the handle's bytes back."""
    if not _native_built():
        pytest.fail("daemon.passthrough._fast is not built: run scripts/setup")
    from daemon.passthrough import _fast  # type: ignore[attr-defined]

    handle = struct.pack("@Ii", 8, 1) + b"\x01\x02\x03\x04\x05\x06\x07\x08"  # struct file_handle + f_handle
    mount = MountFd(42, 7, 1)
    for args, kw in [((2, 1, 2049, 12, 42, 0o100644), {}),
                     ((3, 9, (1 << 64) - 1, (1 << 63) + 5, 42, 0o40755, -1, handle, mount, 1, 41), {}),
                     ((4, 2, 5, 6, 7, 0o120777), {"fd": 12, "nlookup": 3, "cached_fd": 9, "lent": 2, "used": True})]:
        c, py = _fast.Inode(*args, **kw), Inode(*args, **kw)
        assert _fields(c) == _fields(py)
        c.nlookup += 5
        py.nlookup += 5
        c.fd = py.fd = -1
        c.cached_fd = py.cached_fd = 33
        c.used = py.used = True
        c.lent = py.lent = 0
        assert _fields(c) == _fields(py)
    assert _fast.Inode(1, 1, 1, 1, 1, 0, handle=handle).handle == handle
    for bad in (b"short", handle + b"x"):  # not a whole struct file_handle
        with pytest.raises(ValueError):
            _fast.Inode(1, 1, 1, 1, 1, 0, handle=bad)
    fixed = _fast.Inode(1, 1, 1, 1, 1, 0, mount=mount)
    for name in ("nodeid", "generation", "dev", "ino", "mnt_id", "mode", "handle", "mount", "parent_mnt_id"):
        with pytest.raises(AttributeError):  # what identifies it is fixed when it is made (the C never sees it unset)
            delattr(fixed, name)
    assert fixed.mount is mount


def test_the_c_serves_only_its_own_inodes(share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The twins' stores hold each its own Inode (the differential tests compare the C object with the
    dataclass); a store of the dataclass's inodes gets no fast path, and a FastPath made over one anyway hands
    every request back untouched rather than read a dataclass as its struct."""
    monkeypatch.delenv("FSINSPECT_FAST", raising=False)
    from daemon.passthrough import _fast  # type: ignore[attr-defined]

    t = Twins(share, monkeypatch)
    try:
        t.ok("LOOKUP", {"name": b"file"}, nodeid=1)
        assert {type(i) for i in t.fs_c.store._by_id.values()} == {_fast.Inode}
        assert {type(i) for i in t.fs_py.store._by_id.values()} == {Inode}
    finally:
        t.close()
    fs = PassthroughFS(Options(str(share)))
    fs.reroot(str(share), "/proc/")
    assert fs.store.inode_type is _fast.Inode and type(fs.root) is _fast.Inode
    fs.store = InodeStore(fs.store.mode, inode_type=Inode)
    fs.root = fs.store.add_root(str(share))
    assert fs.fast_path() is None
    fast = _fast.FastPath(fs, OP, GETATTR_FH, SUBMOUNT, spec.MAX_MESSAGE, sc.Statx, Handle, lambda _p: True, 0, 0,
                          1 << 20, 1 << 20)
    nodeid = fs.lookup(None, 1, b"file").nodeid  # type: ignore[arg-type]
    for op, args, at in [("LOOKUP", {"name": b"file"}, 1), ("GETATTR", _getattr(), nodeid)]:
        assert fast(F.encode_request(op, args, unique=1, nodeid=at)) is None, op
    assert fs.store.get(nodeid).nlookup == 1
    # FORGET: the store's own forget() does it (as for a nodeid the C does not know)
    assert fast(F.encode_request("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, unique=1,
                                 nodeid=nodeid)) == b""
    assert nodeid not in fs.store and len(fs.store) == 1
    fs.close()


def test_lookup_fast_path_keeps_nlookup_under_concurrent_forgets(share: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """LOOKUPs on the fast path and FORGETs on another thread: every lookup is accounted (no lost update),
    so the inode goes exactly when the last reference is forgotten."""
    import threading

    monkeypatch.delenv("FSINSPECT_FAST", raising=False)
    fs = PassthroughFS(Options(str(share)))
    server = Server(fs)
    c = EngineClient(server)
    c.init()
    nodeid = c.nodeid(1, b"file")
    n = 2000
    stop = threading.Event()

    def forget() -> None:
        f = EngineClient(server)
        msg = {"forget": F.make("fuse_forget_in", nlookup=1)}
        for _ in range(n):
            server.handle(f.encode("FORGET", msg, nodeid=nodeid), lambda parts: None)
        stop.set()

    for _ in range(n):  # n + 1 references before the forgets start
        assert c.nodeid(1, b"file") == nodeid
    th = threading.Thread(target=forget)
    th.start()
    looked = 0
    while not stop.is_set():
        if c.nodeid(1, b"file") == nodeid:
            looked += 1
    th.join()
    assert nodeid in fs.store and fs.store.get(nodeid).nlookup == 1 + looked
    assert server.counters()["fast_path"]["served"] >= n
    server.shutdown()
    fs.close()


def _tables(fs: PassthroughFS, identity: bool = True) -> tuple[Any, ...]:
    """The store's whole state: each inode, both indexes, the mounts' references, the fd cache's order, the
    counts and counters; without `identity`, what two engines that each created their own files share (the
    inodes' keys and handles left out)."""
    s = fs.store
    inodes = sorted((i.nodeid, i.generation, i.key if identity else None, i.mode, i.nlookup, i.fd >= 0,
                     i.cached_fd >= 0, i.lent, i.used, i.handle if identity else None,
                     None if i.mount is None else i.mount.mnt_id, i.parent_mnt_id) for i in s._by_id.values())
    by_key = {k: v.nodeid for k, v in s._by_key.items()} if identity else sorted(v.nodeid for v in s._by_key.values())
    return (inodes, by_key, {m: x.refs for m, x in s._mounts.items()}, list(s._cached), s.counts(),
            (s._next_id, s._generation))


@pytest.mark.parametrize("handles", [HandleMode.PREFER, HandleMode.NEVER])
def test_forget_byte_for_byte_as_python(twins: Any, share: Path, handles: HandleMode,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """FORGET and BATCH_FORGET done in C on the store's tables: after each one both engines' tables are the same
    (inodes, nlookup, indexes, mount references, the fd cache) and they logged the same lines: forgets to zero
    (an inode with a cached fd, one held by fd, a submount's last inodes with their mount fd), unknown
    nodeids, the root, over-forgets (nlookup underflow), a forget while an op has the fd lent, batches of mixed
    entries, and malformed bodies (the decoder's answer)."""
    caplog.set_level(logging.DEBUG, logger="fsinspect.daemon")
    t: Twins = twins(inode_file_handles=handles)
    look = lambda parent, name: t.ok("LOOKUP", {"name": name}, nodeid=parent).args["entry"].nodeid  # noqa: E731
    one = lambda n: {"forget": F.make("fuse_forget_in", nlookup=n)}  # noqa: E731

    def batch(*entries: tuple[int, int]) -> dict[str, Any]:
        return {"batch": F.make("fuse_batch_forget_in", count=len(entries)),
                "forgets": [F.make("fuse_forget_one", nodeid=n, nlookup=k) for n, k in entries]}

    def send(raw: bytes, what: str, fast: bool = True) -> None:
        lines = []
        for side in (t.c, t.py):
            caplog.clear()
            assert side.raw(raw, 0) is None, what
            lines.append([(r.levelname, r.getMessage()) for r in caplog.records])
        assert lines[0] == lines[1], what
        assert _tables(t.fs_c) == _tables(t.fs_py), what
        t.log.append((what, fast, None))

    def forget(nodeid: int, n: int, what: str) -> None:
        t.unique += 1
        send(F.encode_request("FORGET", one(n), unique=t.unique, nodeid=nodeid), what)

    def batch_forget(what: str, *entries: tuple[int, int]) -> None:
        t.unique += 1
        send(F.encode_request("BATCH_FORGET", batch(*entries), unique=t.unique), what)

    served = t.served()
    f = look(1, b"file")
    assert look(1, b"file") == f and look(1, b"file") == f
    forget(f, 1, "3 -> 2")
    forget(f, 2, "2 -> 0: dropped, its cached fd closed")
    assert f not in t.fs_c.store and f not in t.fs_py.store
    forget(f, 1, "forgotten already: unknown")
    assert any("FORGET of unknown nodeid" in r.getMessage() for r in caplog.records)
    forget(31337, 1, "never given out")
    forget(1, 100, "the root stays")
    link = look(1, b"link")
    assert look(1, b"link") == link
    forget(link, 5, "nlookup underflow: logged, dropped")
    assert any("exceeds its nlookup 2" in r.getMessage() for r in caplog.records)
    assert link not in t.fs_c.store
    forget(link, (1 << 64) - 1, "unknown, the largest count")
    huge = look(1, b"file")
    forget(huge, 1 << 63, "a count past a signed 64-bit nlookup")
    assert huge not in t.fs_c.store

    # Forgotten while an op has its fd lent (handles: a directory's cached fd; without: its own O_PATH fd): the
    # last user closes it (the C leaves such a forget to Python).
    d = look(1, b"dir")
    ino_c, ino_py = t.fs_c.store.get(d), t.fs_py.store.get(d)
    with t.fs_c.store.path_fd(ino_c) as fd_c, t.fs_py.store.path_fd(ino_py) as fd_py:
        assert ino_c.lent == ino_py.lent == 1
        forget(d, 1, "forgotten while lent")
        assert os.fstat(fd_c).st_ino == os.fstat(fd_py).st_ino == (share / "dir").stat().st_ino
    assert d not in t.fs_c.store and ino_c.lent == ino_py.lent == 0
    for fd in (fd_c, fd_py):
        with pytest.raises(OSError):
            os.fstat(fd)

    # Batches: the root, an unknown nodeid, a submount's last two inodes (its mount fd goes), a partial
    # forget, an over-forget of what is left, a forget of 0, the same nodeid to zero and once more.
    sub = look(1, b"sub")
    deep = look(sub, b"deep")
    inner_dir = look(1, b"dir")
    inner = look(inner_dir, b"inner")
    assert look(inner_dir, b"inner") == inner
    mounts_before = len(t.fs_c.store._mounts)
    batch_forget("mixed", (1, 1), (31337, 2), (deep, 1), (sub, 1), (inner, 1), (inner, 5), (inner_dir, 0))
    assert len(t.fs_c.store._mounts) == mounts_before - (handles is HandleMode.PREFER)  # the submount's mount fd
    assert inner not in t.fs_c.store and t.fs_c.store.get(inner_dir).nlookup == 1
    batch_forget("to zero, then unknown", (inner_dir, 1), (inner_dir, 1))
    batch_forget("empty")
    assert t.fs_c.store.counts() == {**t.fs_c.store.counts(), "inodes": 1}  # only the root is left

    # Malformed bodies: the decoder's (nothing changed, the same lines logged and counted).
    u = 20_000
    send(_raw("FORGET", b"\0" * 4, unique=u + 1, nodeid=1), "FORGET short", fast=False)
    send(_raw("FORGET", b"\1" + b"\0" * 15, unique=u + 2, nodeid=3), "FORGET long", fast=False)
    send(_raw("FORGET", b"\0" * 8, unique=u + 3, nodeid=3, extlen=1), "FORGET with extensions", fast=False)
    send(_raw("BATCH_FORGET", struct.pack("<II", 3, 0) + b"\0" * 32, unique=u + 4), "BATCH_FORGET count 3, 2 given",
         fast=False)
    send(_raw("BATCH_FORGET", struct.pack("<II", 1, 0) + b"\0" * 20, unique=u + 5), "BATCH_FORGET trailing bytes",
         fast=False)
    send(_raw("BATCH_FORGET", b"\0" * 4, unique=u + 6), "BATCH_FORGET short", fast=False)

    assert t.served() - served >= 18
    cc, pc = t.c.server.counters(), t.py.server.counters()
    assert cc["ops"] == pc["ops"] and cc["errors"] == pc["errors"] and cc["dropped"] == pc["dropped"]
    assert cc["dropped"] >= 4, cc


@pytest.mark.parametrize("handles", [HandleMode.PREFER, HandleMode.NEVER])
def test_forget_to_zero_racing_lookups_leaves_the_tables_coherent(share: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  handles: HandleMode) -> None:
    """Two threads each LOOKUP the same names and give their reference back at once (one by FORGET, one by
    BATCH_FORGET), so the inodes go and come back all the time, with a third holding a reference to one of
    them: every lookup is accounted, and at the end only what is still looked up is left, with its nlookup,
    its mount's references and no fd leaked."""
    import threading

    monkeypatch.delenv("FSINSPECT_FAST", raising=False)
    fs = PassthroughFS(Options(str(share), inode_file_handles=handles))
    server = Server(fs)
    c = EngineClient(server)
    c.init()
    names = (b"file", b"link", b"gone")
    nodeid = c.nodeid(1, b"dir")
    c.server.handle(c.encode("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, nodeid=nodeid),
                    lambda parts: None)
    fds = len(os.listdir("/proc/self/fd"))
    mounts = {m: x.refs for m, x in fs.store._mounts.items()}
    n = 1500
    held = []

    def churn(batch: bool) -> None:
        cl = EngineClient(server)
        for i in range(n):
            nid = cl.nodeid(1, names[i % len(names)])
            if batch:
                msg = {"batch": F.make("fuse_batch_forget_in", count=2),
                       "forgets": [F.make("fuse_forget_one", nodeid=1, nlookup=1),
                                   F.make("fuse_forget_one", nodeid=nid, nlookup=1)]}
                server.handle(cl.encode("BATCH_FORGET", msg), lambda parts: None)
            else:
                server.handle(cl.encode("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, nodeid=nid),
                              lambda parts: None)

    def keep() -> None:
        cl = EngineClient(server)
        for _ in range(n // 3):
            held.append(cl.nodeid(1, b"file"))

    threads = [threading.Thread(target=churn, args=(b,)) for b in (False, True)] + [threading.Thread(target=keep)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # many more switches between the threads than the default 5 ms
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    kept = held[-1]
    assert kept in fs.store and fs.store.get(kept).nlookup == held.count(kept)
    assert len(fs.store) == 2, fs.store.counts()  # the root and the file still looked up
    counts = server.counters()
    assert not counts["errors"] and counts["fast_path"]["served"] >= 4 * n
    c.server.handle(c.encode("FORGET", {"forget": F.make("fuse_forget_in", nlookup=held.count(kept))},
                             nodeid=kept), lambda parts: None)
    assert len(fs.store) == 1 and not fs.store._cached
    assert {m: x.refs for m, x in fs.store._mounts.items()} == mounts
    assert len(os.listdir("/proc/self/fd")) == fds
    server.shutdown()
    fs.close()


@pytest.mark.parametrize("handles", [HandleMode.PREFER, HandleMode.NEVER])
def test_new_inodes_byte_for_byte_as_python(twins: Any, share: Path, handles: HandleMode) -> None:
    """A LOOKUP that finds a new inode and a CREATE put it in the store's tables from C (InodeStore.find_or_add's
    usual case): the same tables after each request (nodeid, generation, key, handle, mount references,
    cached fds and their order), with an fd cache of two (the third evicts, second chance), a CREATE of a
    file the store holds pinned or only by its handle, and the first inode on a submount (Python's: the
    mount fd is opened there)."""
    t: Twins = twins(inode_file_handles=handles)
    for fs in (t.fs_c, t.fs_py):
        fs.store.fd_cache_max = 2
    for i in range(6):
        (share / f"n{i}").write_bytes(b"n")

    def same(what: str) -> None:
        assert _tables(t.fs_c) == _tables(t.fs_py), what

    look = lambda parent, name: t.ok("LOOKUP", {"name": name}, nodeid=parent).args["entry"].nodeid  # noqa: E731
    ids = []
    for i in range(6):
        ids.append(look(1, f"n{i}".encode()))
        assert t.last_fast()
        same(f"LOOKUP n{i}")
    assert look(1, b"n0") == ids[0] and look(1, b"n4") == ids[4]  # known (by key, or by handle)
    same("LOOKUP known")
    sub = look(1, b"sub")
    deep = look(sub, b"deep")
    same("a submount's first inodes")
    assert look(sub, b"deep") == deep
    if handles is HandleMode.PREFER:
        assert len(t.fs_c.store._cached) == 2 and t.fs_c.store.counts()["mount_fds"] == 2

    # CREATE of a file the store holds: pinned by a cached fd, then only by its handle.
    for k in (5, 3):
        if handles is HandleMode.PREFER and k == 3:
            assert t.fs_c.store.get(ids[k]).cached_fd < 0  # evicted: held by its handle alone
        rep = t.decoded("CREATE", _create(os.O_RDWR, name=f"n{k}".encode()),
                        t.req("CREATE", _create(os.O_RDWR, name=f"n{k}".encode()), nodeid=1))
        assert rep.error == 0 and rep.args["entry"].nodeid == ids[k] and t.last_fast()
        same(f"CREATE of n{k}, known")
        t.ok("RELEASE", {"release": F.make("fuse_release_in", fh=rep.args["open"].fh)}, nodeid=ids[k])
    assert t.fs_c.store.get(ids[3]).nlookup == 2


@pytest.mark.parametrize("handles", [HandleMode.PREFER, HandleMode.NEVER])
def test_a_run_of_new_inodes_byte_for_byte_as_python(twins: Any, share: Path, handles: HandleMode) -> None:
    """Once two LOOKUPs in a row under a directory found new inodes, the C opens the next name there first and
    takes its statx from that fd (no statx by name): whatever the name turns out to be (new; known, pinned by
    a cached fd or held by its handle alone; missing; a symlink; a directory; '.' and '..'), the reply and the
    whole tables after it are Python's, which always asks by name first."""
    t: Twins = twins(inode_file_handles=handles)
    for fs in (t.fs_c, t.fs_py):
        fs.store.fd_cache_max = 3  # the first files are evicted: later LOOKUPs of them go by their handle
    d = share / "cold"
    d.mkdir()
    for i in range(8):
        (d / f"f{i}").write_bytes(b"c")
    os.symlink("f0", d / "ln")
    (d / "sub").mkdir()
    cold = t.ok("LOOKUP", {"name": b"cold"}, nodeid=1).args["entry"].nodeid
    names = [b"f0", b"f1", b"f2", b"f3", b"f0", b"f4", b"f5", b"missing", b"f6", b"ln", b"sub", b".", b"..",
             b"f7", b"f1", b"f2", b"missing", b"f3"]
    for name in names:
        raw = t.req("LOOKUP", {"name": name}, nodeid=cold)
        assert raw is not None and t.last_fast(), name
        assert _tables(t.fs_c) == _tables(t.fs_py), name
    assert t.fs_c.store.get(cold).nlookup == 2  # the first LOOKUP and '.'


# A CREATE on the fast path with file handles off whose new inode cannot get its O_PATH twin of the open file
# (EMFILE: one fd left below the limit, which the open itself took).  Run in a process of its own: the fd limit
# is the process's, and the reference count this guards would abort the interpreter.
_NO_TWIN = """
import json, os, resource, sys
from concurrent.futures import ThreadPoolExecutor
from daemon.passthrough import HandleMode, Options, PassthroughFS
from daemon.server import Server
from dissectors import fuse as F
from tests.daemon_client import EngineClient

c = EngineClient(Server(PassthroughFS(Options(sys.argv[1], inode_file_handles=HandleMode.NEVER))),
                 via=ThreadPoolExecutor(max_workers=1))
c.init()
args = {"create": F.make("fuse_create_in", flags=os.O_RDWR | os.O_CREAT, mode=0o100644, umask=0, open_flags=0),
        "name": b"f"}
c.ok("CREATE", {**args, "name": b"g"}, nodeid=1)  # the serving thread ready to create (its umask 0)
reqs = [c.encode("CREATE", args, nodeid=1) for _ in range(int(sys.argv[2]))]
fill = [os.open("/dev/null", os.O_RDONLY)]
while fill[-1] < 200:
    fill.append(os.open("/dev/null", os.O_RDONLY))
resource.setrlimit(resource.RLIMIT_NOFILE, (fill[-1] + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
os.close(fill.pop())
before = sys.getrefcount(None)
errors = {int.from_bytes(c.raw(r)[4:8], "little", signed=True) for r in reqs}
after = sys.getrefcount(None)
print(json.dumps([sorted(errors), after - before, sum(c.server._fast.counts()[0].values())]))
"""


def test_a_create_without_an_fd_for_its_inode_leaves_none_alone(tmp_path: Path) -> None:
    """Each such CREATE (EMFILE, as Python answers it) released a reference to None that add_locked never
    took: a guest that filled the daemon's fd table could crash it ("deallocating None") with ~10,000 of them.
    Fails before: None's count fell by one per CREATE and the interpreter aborted at exit."""
    if not _native_built():
        pytest.skip("the C fast path is not built")
    n = 3000
    r = subprocess.run([sys.executable, "-c", _NO_TWIN, str(tmp_path), str(n)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    errors, drift, served = json.loads(r.stdout)
    assert errors == [-errno.EMFILE], r.stdout
    assert served == n + 1, f"not all on the fast path: {r.stdout}"  # the first CREATE and the n refused
    assert abs(drift) < n // 10, f"None's reference count moved by {drift} over {n} refused CREATEs"
