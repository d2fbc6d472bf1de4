"""The passthrough filesystem through the engine, with crafted messages: confinement and bad input,
inode identity (file handles / O_PATH), submounts, syncfs, cache modes, credentials, read-only."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import pytest

from daemon.passthrough import CacheMode, HandleMode, Options, PassthroughFS
from daemon.passthrough import fs as fs_module
from daemon.passthrough.fs import Handle
from daemon.passthrough.inodes import InodeStore, MountFd
from daemon.sandbox import enter as enter_sandbox
from daemon.server import Server
from dissectors import fuse as F
from dissectors.spec import fuse as spec
from tests.conftest import require_root
from tests.daemon_client import KERNEL_FLAGS, EngineClient
from tests.pipes import error_lines

pytestmark = pytest.mark.root

INIT = spec.INIT_FLAGS.by_name()
FATTR = spec.FATTR.by_name()
FOPEN = spec.FOPEN.by_name()
SUBMOUNT = spec.ATTR_FLAGS.by_name()["SUBMOUNT"]
GETATTR_FH = spec.GETATTR_FLAGS.by_name()["FH"]
RENAME = spec.RENAME_FLAGS.by_name()
_libc = ctypes.CDLL("libc.so.6", use_errno=True)

Factory = Callable[..., EngineClient]


@pytest.fixture(params=["fast", "python"])
def engine(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Factory]:
    """make(shared, sandbox=LEVEL, **Options) -> a client of a fresh engine, driven from a serving thread of
    its own, as a daemon's queue is.  With a sandbox, that thread is confined as `fsinspect daemon --sandbox
    LEVEL` confines its serving thread (its pool threads start from it, so they are confined too).  Every
    test runs with the C fast path (daemon/passthrough/_fastmodule.c) and with its twin, the Python op table
    alone."""
    require_root()
    if request.param == "python":
        monkeypatch.setenv("FSINSPECT_FAST", "python")
    else:
        monkeypatch.delenv("FSINSPECT_FAST", raising=False)
    made: list[tuple[Server, PassthroughFS, ThreadPoolExecutor]] = []

    def make(shared: Path | None = None, *, flags: int = KERNEL_FLAGS, sandbox: str = "none",
             **kw: Any) -> EngineClient:
        fs = PassthroughFS(Options(str(shared or tmp_path), **kw))
        server = Server(fs)
        assert (server._fast is not None) == (request.param == "fast"), "the C fast path is not built"
        via = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"serve-{sandbox}")
        if sandbox != "none":
            via.submit(enter_sandbox, sandbox, fs).result()
        made.append((server, fs, via))
        c = EngineClient(server, via=via)
        assert c.init(flags).error == 0
        return c

    yield make
    for server, fs, via in made:
        server.shutdown()
        fs.close()
        via.shutdown()


# The confinement tests run at every level: the sandbox must not change what the name checks answer.
SANDBOXES = pytest.mark.parametrize("sandbox", ["none", "namespace", "chroot"])


def _alive(c: EngineClient) -> None:
    assert c.call("GETATTR", nodeid=1).error == 0


# ------------------------------------------------------------------------------- names / confinement
@SANDBOXES
def test_names_are_validated(engine: Factory, tmp_path: Path, sandbox: str) -> None:
    c = engine(sandbox=sandbox)
    (tmp_path / "d").mkdir()
    assert c.lookup(1, b"..").args["entry"].nodeid == 1  # '..' of the root is the root
    assert c.lookup(1, b".").args["entry"].nodeid == 1
    d = c.nodeid(1, b"d")
    assert c.lookup(d, b"..").args["entry"].nodeid == 1
    assert c.lookup(1, b"a/b").error == errno.EINVAL
    assert c.lookup(1, b"../../etc").error == errno.EINVAL
    assert c.lookup(1, b"x" * 256).error == errno.ENAMETOOLONG
    # NUL inside a name: the name ends early and the rest is garbage -> EINVAL.
    raw = bytearray(c.encode("LOOKUP", {"name": b"d\0passwd"}, nodeid=1))
    out = c.raw(bytes(raw))
    assert out is not None and int.from_bytes(out[4:8], "little", signed=True) == -errno.EINVAL
    mk = {"mkdir": F.make("fuse_mkdir_in", mode=0o755)}
    for bad, err in ((b"..", errno.EINVAL), (b".", errno.EINVAL), (b"a/b", errno.EINVAL)):
        assert c.call("MKDIR", {**mk, "name": bad}, nodeid=d).error == err
        assert c.call("UNLINK", {"name": bad}, nodeid=d).error == err
        assert c.call("RMDIR", {"name": bad}, nodeid=d).error == err
    ren = {"rename": F.make("fuse_rename_in", newdir=d), "name": b"d", "newname": b".."}
    assert c.call("RENAME", ren, nodeid=1).error == errno.EINVAL
    assert sorted(os.listdir(tmp_path)) == ["d"]
    _alive(c)


@SANDBOXES
def test_absolute_symlink_targets_are_never_followed(engine: Factory, tmp_path: Path, sandbox: str) -> None:
    c = engine(sandbox=sandbox)
    rep = c.ok("SYMLINK", {"name": b"esc", "target": b"/etc"}, nodeid=1)
    esc = rep.args["entry"].nodeid
    assert stat.S_ISLNK(rep.args["entry"].attr.mode)
    assert os.readlink(tmp_path / "esc") == "/etc"
    assert c.ok("READLINK", nodeid=esc).args["target"] == b"/etc"
    assert c.lookup(esc, b"passwd").error == errno.ENOTDIR
    assert c.call("OPENDIR", {"open": F.make("fuse_open_in")}, nodeid=esc).error == errno.ENOTDIR
    assert c.call("OPEN", {"open": F.make("fuse_open_in")}, nodeid=esc).error == errno.ELOOP
    mk = {"mkdir": F.make("fuse_mkdir_in", mode=0o755), "name": b"x"}
    assert c.call("MKDIR", mk, nodeid=esc).error == errno.ENOTDIR
    _alive(c)


@SANDBOXES
def test_symlink_swapped_in_during_an_op_stays_confined(engine: Factory, tmp_path: Path, sandbox: str) -> None:
    c = engine(sandbox=sandbox)
    (tmp_path / "d").mkdir()
    d = c.nodeid(1, b"d")
    # The host swaps the directory for a symlink to /etc between the guest's LOOKUP and its next op.
    (tmp_path / "d").rename(tmp_path / "d.old")
    (tmp_path / "d").symlink_to("/etc")
    assert c.lookup(d, b"passwd").error == errno.ENOENT  # resolved in the real directory, not /etc
    nid, fh = c.create(d, b"planted")
    c.release(nid, fh)
    assert (tmp_path / "d.old" / "planted").exists()
    assert not os.path.exists("/etc/planted")
    assert stat.S_ISLNK(c.lookup(1, b"d").args["entry"].attr.mode)
    _alive(c)


def test_unknown_and_forgotten_nodeids_bad_fh_and_over_forget(engine: Factory, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fsinspect.daemon")
    c = engine()
    (tmp_path / "f").write_bytes(b"data")
    assert c.call("GETATTR", nodeid=12345).error == errno.EBADF
    assert c.lookup(12345, b"f").error == errno.EBADF
    f = c.nodeid(1, b"f")
    assert c.nodeid(1, b"f") == f  # same host inode, same nodeid, nlookup 2
    assert c.call("READ", {"read": F.make("fuse_read_in", fh=999, size=10)}, nodeid=f).error == errno.EBADF
    assert c.call("RELEASE", {"release": F.make("fuse_release_in", fh=999)}, nodeid=f).error == errno.EBADF
    assert c.call("READDIR", {"read": F.make("fuse_read_in", fh=999, size=4096)}, nodeid=1).error == errno.EBADF
    fh = c.open(f, os.O_RDONLY)
    # A file fh is not a directory fh.
    assert c.call("READDIR", {"read": F.make("fuse_read_in", fh=fh, size=4096)}, nodeid=1).error == errno.EBADF
    c.release(f, fh)
    # FORGET more than was looked up: logged, clamped, the inode goes away; serving goes on.
    c.send_noreply("FORGET", {"forget": F.make("fuse_forget_in", nlookup=5)}, nodeid=f)
    assert any("exceeds its nlookup 2" in r.getMessage() for r in caplog.records)
    assert c.call("GETATTR", nodeid=f).error == errno.EBADF
    c.send_noreply("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, nodeid=f)  # already gone
    c.send_noreply("FORGET", {"forget": F.make("fuse_forget_in", nlookup=100)}, nodeid=1)  # root stays
    forgets = [F.make("fuse_forget_one", nodeid=n, nlookup=1) for n in (1, 777, f)]
    c.send_noreply("BATCH_FORGET", {"batch": F.make("fuse_batch_forget_in", count=3), "forgets": forgets})
    _alive(c)
    f2 = c.nodeid(1, b"f")
    assert f2 != f  # nodeids are never reused
    assert c.ok("GETATTR", nodeid=f2).args["attr_out"].attr.size == 4


# ------------------------------------------------------------------------------- inode identity
@pytest.mark.parametrize("mode", ["prefer", "never", "mandatory"])
def test_inode_file_handle_modes(engine: Factory, tmp_path: Path, mode: str) -> None:
    c = engine(inode_file_handles=HandleMode(mode))
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(b"x" * i)
    ids = [c.nodeid(1, f"f{i}".encode()) for i in range(5)]
    assert len(set(ids)) == 5
    fs = c.server.fs
    assert isinstance(fs, PassthroughFS)
    counts = fs.store.counts()
    if mode == "never":
        assert counts["held_by_fd"] == 6 and counts["held_by_handle"] == 0
    else:
        assert counts["held_by_handle"] == 5 and counts["held_by_fd"] == 1  # only the root keeps an fd
    for i, n in enumerate(ids):  # reopening works through handles too
        fh = c.open(n, os.O_RDONLY)
        assert c.read(n, fh, 10) == b"x" * i
        c.release(n, fh)


def _count_handle_opens(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every open_by_handle_at the store makes, counted (the syscall itself still runs)."""
    from daemon.passthrough import inodes

    opened: list[int] = []
    real = inodes.sc.open_by_handle_at

    def counting(mount_fd: int, handle: bytes, flags: int) -> int:
        opened.append(flags)
        return real(mount_fd, handle, flags)

    monkeypatch.setattr(inodes.sc, "open_by_handle_at", counting)
    return opened


def test_name_ops_in_a_handle_held_directory_open_it_once(engine: Factory, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A create/stat/delete storm in a subdirectory never opens that directory from its handle: its LOOKUP
    cached the O_PATH fd it opened (the cost counted in syscalls, so the test holds on a loaded machine)."""
    c = engine(inode_file_handles=HandleMode.PREFER)
    (tmp_path / "d").mkdir()
    fds_before = len(os.listdir("/proc/self/fd"))
    d = c.nodeid(1, b"d")
    fs = c.server.fs
    assert isinstance(fs, PassthroughFS)
    opened = _count_handle_opens(monkeypatch)
    for i in range(20):
        nid, fh = c.create(d, b"f%d" % i)
        c.release(nid, fh)
        assert c.lookup(d, b"f%d" % i).error == 0
    for i in range(20):
        assert c.ok("UNLINK", {"name": b"f%d" % i}, nodeid=d).error == 0
    assert opened == []
    assert fs.store.counts()["fds_cached"] == 1
    assert len(os.listdir("/proc/self/fd")) == fds_before + 1
    # FORGET lets the directory's fd go.
    c.send_noreply("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, nodeid=d)
    assert fs.store.counts()["fds_cached"] == 0 and len(os.listdir("/proc/self/fd")) == fds_before


def test_a_files_getattr_uses_its_cached_fd(engine: Factory, tmp_path: Path) -> None:
    """A handle-held file keeps the O_PATH fd its LOOKUP opened: GETATTR uses it (the same fd stays cached,
    nothing else is opened; tests/test_daemon_syscall_budget.py counts the one fstat); one whose cached fd was
    let go is opened from its handle once, then cached."""
    c = engine(inode_file_handles=HandleMode.PREFER)
    (tmp_path / "f").write_bytes(b"x")
    fds_before = len(os.listdir("/proc/self/fd"))
    f = c.nodeid(1, b"f")
    fs = c.server.fs
    assert isinstance(fs, PassthroughFS)
    ino = fs.store.get(f)
    cached = ino.cached_fd
    assert cached >= 0 and os.fstat(cached).st_ino == (tmp_path / "f").stat().st_ino
    for _ in range(3):
        assert c.ok("GETATTR", nodeid=f).args["attr_out"].attr.ino == (tmp_path / "f").stat().st_ino
        assert ino.cached_fd == cached and len(os.listdir("/proc/self/fd")) == fds_before + 1
    fs.store.drop_cached_fd(ino)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    c.ok("GETATTR", nodeid=f)
    cached = ino.cached_fd
    assert cached >= 0 and fs.store.counts()["fds_cached"] == 1
    for _ in range(2):
        c.ok("GETATTR", nodeid=f)
        assert ino.cached_fd == cached and len(os.listdir("/proc/self/fd")) == fds_before + 1
    assert c.lookup(1, b"f").error == 0  # a known inode, pinned by its cached fd
    c.send_noreply("FORGET", {"forget": F.make("fuse_forget_in", nlookup=2)}, nodeid=f)
    assert fs.store.counts()["fds_cached"] == 0 and len(os.listdir("/proc/self/fd")) == fds_before


def test_a_cached_file_deleted_on_the_host_answers_as_without_the_cache(engine: Factory, tmp_path: Path) -> None:
    """The cached fd keeps the deleted file's inode alive (its handle still opens): GETATTR and OPEN see no
    link left, let the cached fd go and ask the handle again, so they answer ESTALE as before; while the
    guest holds the file open, the inode is alive anyway and both answer from it, nlink 0."""
    c = engine(inode_file_handles=HandleMode.PREFER)
    fs = c.server.fs
    assert isinstance(fs, PassthroughFS)
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(b"12345")
    a, b, o = (c.nodeid(1, n) for n in (b"a", b"b", b"c"))
    fh = c.open(o, os.O_RDONLY)
    for n in ("a", "b", "c"):
        os.unlink(tmp_path / n)
    assert all(fs.store.get(n).cached_fd >= 0 for n in (a, b, o))
    assert c.call("GETATTR", nodeid=a).error == errno.ESTALE
    assert c.call("OPEN", {"open": F.make("fuse_open_in", flags=os.O_RDONLY)}, nodeid=b).error == errno.ESTALE
    attr = c.ok("GETATTR", nodeid=o).args["attr_out"].attr
    assert (attr.size, attr.nlink) == (5, 0)
    assert [fs.store.get(n).cached_fd for n in (a, b, o)] == [-1, -1, -1]
    c.release(o, fh)
    assert c.call("GETATTR", nodeid=o).error == errno.ESTALE
    _alive(c)


def test_the_fd_cache_is_bounded(engine: Factory, tmp_path: Path) -> None:
    from daemon.passthrough import inodes

    c = engine(inode_file_handles=HandleMode.PREFER)
    fs = c.server.fs
    assert isinstance(fs, PassthroughFS)
    bound = fs.store.fd_cache_max
    assert bound == inodes.fd_cache_bound() >= inodes.FD_CACHE_MIN
    assert [inodes.fd_cache_bound(n) for n in (256, 1024, 20000, 1 << 20)] == [64, 128, 2500, 8192]
    fs.store.fd_cache_max = bound = 40  # a small bound, so the test opens few fds
    n = bound + 10
    for i in range(n):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / "f").write_bytes(b"")
    fds_before = len(os.listdir("/proc/self/fd"))
    dirs = [c.nodeid(1, b"d%d" % i) for i in range(n)]
    files = [c.nodeid(d, b"f") for d in dirs]
    for nid in files:
        c.ok("GETATTR", nodeid=nid)
    assert fs.store.counts()["fds_cached"] == bound
    assert len(os.listdir("/proc/self/fd")) == fds_before + bound
    # The oldest went first: the first directories and files reopen, the last ones are still cached.
    assert [fs.store.get(x).cached_fd >= 0 for x in (dirs[0], files[0], files[-1])] == [False, False, True]
    assert c.lookup(dirs[0], b"f").error == 0 and fs.store.get(dirs[0]).cached_fd >= 0
    assert fs.store.counts()["fds_cached"] == bound
    fs.destroy()
    assert fs.store.counts()["fds_cached"] == 0 and len(os.listdir("/proc/self/fd")) == fds_before


def test_reserving_the_fd_table_never_replaces_an_open_fd(tmp_path: Path) -> None:
    """reserve_fd_table asks for a descriptor at or above an index (F_DUPFD), never a given one: an fd
    already open there stays what it was, and none is left open."""
    from daemon.passthrough import inodes

    f = tmp_path / "f"
    f.write_bytes(b"kept")
    fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
    high = os.dup2(fd, 700)
    try:
        before = sorted(os.listdir("/proc/self/fd"))
        assert inodes.reserve_fd_table(high + 1) > high  # the lowest free fd at or above 700
        assert sorted(os.listdir("/proc/self/fd")) == before
        assert os.pread(high, 4, 0) == b"kept"
        assert inodes.reserve_fd_table(1) == 0
    finally:
        os.close(high)
        os.close(fd)


def test_a_directory_forgotten_while_in_use_is_closed_by_its_last_user(engine: Factory, tmp_path: Path) -> None:
    c = engine(inode_file_handles=HandleMode.PREFER)
    (tmp_path / "d").mkdir()
    d = c.nodeid(1, b"d")
    fs = c.server.fs
    assert isinstance(fs, PassthroughFS)
    store = fs.store
    ino = store.get(d)
    assert ino.cached_fd >= 0  # its LOOKUP's O_PATH fd
    fds_before = len(os.listdir("/proc/self/fd")) - 1
    with store.path_fd(ino) as fd1, store.path_fd(ino) as fd2:
        assert fd1 == fd2 == ino.cached_fd and ino.lent == 2
        store.forget(d, 1)  # the kernel forgets it while two ops use its fd
        assert os.fstat(fd1).st_ino == (tmp_path / "d").stat().st_ino  # still open
        assert store.counts()["fds_cached"] == 0
    assert ino.lent == 0 and len(os.listdir("/proc/self/fd")) == fds_before
    with pytest.raises(OSError):
        os.fstat(fd1)


# ---------------------------------------------------------------- a hostile guest's FORGET racing a request
# A kernel never FORGETs an inode while a request on it is in flight; a hostile guest can, on the hiprio queue.
# The request must keep the inode's fds (its O_PATH fd, its mount's fd) until it is done: closed at the FORGET,
# the number goes to the daemon's next open (a recording part, a log), and the request runs on that file.  The
# hooks below run on the real code path, between the request's lookup of the inode and its use of the fd: the
# FORGET is served from another thread (as the hiprio queue's), then the daemon opens a file of its own, which
# takes the forgotten fd's number if it is free (F_DUPFD: the lowest free fd at or above it).


class _ProcHookStore(InodeStore):
    """The store, with a hook run once when its procfs prefix is next read: OPEN reads it to reopen an O_PATH-held
    inode through /proc/self/fd/N, after it has found the inode (the C has read N by then; Python has checked it)."""

    @property
    def proc(self) -> str:
        hook = self.__dict__.pop("hook", None)
        if hook is not None:
            hook()
        return str(self.__dict__["_proc"])

    @proc.setter
    def proc(self, value: str) -> None:
        self.__dict__["_proc"] = value


class _FdHookMount(MountFd):
    """A MountFd whose fd, once read, runs the hook (the value is read first: then the reader lets the GIL go)."""

    __slots__ = ()
    hooks: list[Callable[[], None]] = []

    @property  # type: ignore[override]
    def fd(self) -> int:
        value = int(MountFd.fd.__get__(self))  # type: ignore[attr-defined]
        while self.hooks:
            self.hooks.pop()()
        return value

    @fd.setter
    def fd(self, value: int) -> None:
        MountFd.fd.__set__(self, value)  # type: ignore[attr-defined]


def _forget_then_open(server: Server, forget: bytes, fd: int, secret: Path, taken: list[int],
                      flags: int = os.O_RDONLY) -> Callable[[], None]:
    own = os.open(secret, flags | os.O_CLOEXEC)  # opened now: the hook's dup below is the only new fd
    taken.append(own)

    def hook() -> None:
        th = threading.Thread(target=server.handle, args=(forget, lambda parts: None, 0))
        th.start()
        th.join()
        taken.append(fcntl.fcntl(own, fcntl.F_DUPFD_CLOEXEC, fd))
    return hook


def test_a_forget_racing_an_open_leaves_the_inodes_fd_to_the_open(engine: Factory, tmp_path: Path) -> None:
    """OPEN of an O_PATH-held inode (handles off) reopens it through /proc/self/fd/N; a FORGET of it to zero in
    between must not close N under it.  Before: the C path opened the daemon's own file (its READ gave the
    secret), the Python path answered ENOENT; now both open the shared file, and N is closed when the OPEN ends."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"shared")
    secret = tmp_path / "secret"
    secret.write_bytes(b"the daemon's own file")
    c = engine(share, inode_file_handles=HandleMode.NEVER)
    fs = c.server.fs
    assert isinstance(fs, PassthroughFS)
    f = c.nodeid(1, b"f")
    ino = fs.store.get(f)
    n = ino.fd
    assert n >= 0
    taken: list[int] = []
    forget = c.encode("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, nodeid=f)
    store = fs.store
    store.__dict__["_proc"] = store.__dict__.pop("proc")
    store.__class__ = _ProcHookStore
    store.__dict__["hook"] = _forget_then_open(c.server, forget, n, secret, taken)
    try:
        fh = c.open(f, os.O_RDONLY)
        assert len(taken) == 2 and "hook" not in store.__dict__  # the FORGET came in the middle of the OPEN
        assert c.read(f, fh, 100) == b"shared"  # (before, in C: b"the daemon's own file")
        assert f not in store and ino.lent == 0 and ino.fd == -1
        assert taken[1] != n  # the OPEN kept N open: the daemon's own open got another number
        with pytest.raises(OSError) as e:
            os.fstat(n)  # closed by the OPEN, its last user
        assert e.value.errno == errno.EBADF
        c.release(f, fh)
    finally:
        for fd in taken:
            os.close(fd)
        store.__class__ = InodeStore
        store.__dict__["proc"] = store.__dict__.pop("_proc")
    assert c.call("GETATTR", {"getattr": F.make("fuse_getattr_in")}, nodeid=f).errname == "EBADF"


def test_a_forget_racing_a_handle_open_leaves_the_mount_fd_to_it(engine: Factory, tmp_path: Path) -> None:
    """OPEN of a handle-held file on a submount opens its handle against the mount's fd; a BATCH_FORGET of every
    inode on that mount in between must not close the mount fd under it (before: its number went to the
    daemon's own file, on another filesystem, and the OPEN failed with ESTALE; now the OPEN opens the file)."""
    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_bytes(b"the daemon's own file")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "fsinspect-fdlife", str(share / "sub")], check=True)
    try:
        (share / "sub" / "deep").write_bytes(b"on the submount")
        c = engine(share, inode_file_handles=HandleMode.PREFER)
        fs = c.server.fs
        assert isinstance(fs, PassthroughFS)
        sub = c.nodeid(1, b"sub")
        deep = c.nodeid(sub, b"deep")
        ino = fs.store.get(deep)
        if ino.handle is None:
            pytest.skip("no file handles here (needs CAP_DAC_READ_SEARCH)")
        mount = ino.mount
        assert mount is not None and mount.refs == 2 and fs.store.get(sub).mount is mount
        mfd = mount.fd
        forgets = [F.make("fuse_forget_one", nodeid=deep, nlookup=1), F.make("fuse_forget_one", nodeid=sub, nlookup=1)]
        batch = c.encode("BATCH_FORGET", {"batch": F.make("fuse_batch_forget_in", count=2), "forgets": forgets})
        taken: list[int] = []
        mount.__class__ = _FdHookMount
        _FdHookMount.hooks.append(_forget_then_open(c.server, batch, mfd, secret, taken))
        try:
            fh = c.open(deep, os.O_RDONLY)
            assert len(taken) == 2
            assert c.read(deep, fh, 100) == b"on the submount"
            assert deep not in fs.store and sub not in fs.store and mount.mnt_id not in fs.store._mounts
            assert taken[1] != mfd  # kept open by the OPEN
            with pytest.raises(OSError) as e:
                os.fstat(mfd)  # closed with the mount's last inode, by the OPEN that had it lent
            assert e.value.errno == errno.EBADF
            c.release(deep, fh)
        finally:
            _FdHookMount.hooks.clear()
            mount.__class__ = MountFd
            for fd in taken:
                os.close(fd)
    finally:
        _libc.umount2(str(share / "sub").encode(), 2)


# ---------------------------------------------------------------- a hostile guest's RELEASE racing a READ/WRITE
# The same for an open file: a kernel never RELEASEs a handle while a READ or WRITE on it is in flight; a hostile
# guest can, on another queue.  The hook runs when the op reads the handle's fd (after its lookup in fs._handles).


class _FdHookHandle(Handle):
    """A Handle whose fd, once read, runs the hook (the value is read first: then the op uses it)."""

    hooks: ClassVar[list[Callable[[], None]]] = []

    @property  # type: ignore[override]
    def fd(self) -> int:
        value = int(self.__dict__["fd"])
        while self.hooks:
            self.hooks.pop()()
        return value

    @fd.setter
    def fd(self, value: int) -> None:
        self.__dict__["fd"] = value


@pytest.mark.parametrize("op", ["READ", "WRITE"])
def test_a_release_racing_a_read_or_write_leaves_the_handles_fd_to_it(engine: Factory, tmp_path: Path,
                                                                      op: str) -> None:
    """A RELEASE of the handle between the READ's (WRITE's) lookup of it and its use of the fd must not close the
    fd under it.  Before: the daemon's next open took the number, and the READ returned the daemon's own file, the
    WRITE wrote into it; now both use the guest's file, the fd is closed when the op ends, and the released fh is
    EBADF."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"shared")
    secret = tmp_path / "secret"
    secret.write_bytes(b"the daemon's own file")
    c = engine(share)
    fs = c.server.fs
    assert isinstance(fs, PassthroughFS)
    f = c.nodeid(1, b"f")
    fh = c.open(f, os.O_RDWR)
    h = fs._handles[fh]
    n = h.fd
    release = c.encode("RELEASE", {"release": F.make("fuse_release_in", fh=fh)}, nodeid=f)
    taken: list[int] = []
    h.__class__ = _FdHookHandle
    _FdHookHandle.hooks.append(_forget_then_open(c.server, release, n, secret, taken, os.O_RDWR))
    try:
        if op == "READ":
            assert c.read(f, fh, 100) == b"shared"  # (before: b"the daemon's own file")
        else:
            assert c.write(f, fh, b"GUEST") == 5
        assert secret.read_bytes() == b"the daemon's own file"  # (before: b"GUESTaemon's own file")
        assert (share / "f").read_bytes() == (b"shared" if op == "READ" else b"GUESTd")
        assert len(taken) == 2 and not _FdHookHandle.hooks  # the RELEASE came in the middle of the op
        assert fh not in fs._handles and not h.users
        assert taken[1] != n  # the op kept N open: the daemon's own open got another number
        with pytest.raises(OSError) as e:
            os.fstat(n)  # closed by the op, its last user
        assert e.value.errno == errno.EBADF
    finally:
        _FdHookHandle.hooks.clear()
        h.__class__ = Handle
        for fd in taken:
            os.close(fd)
    r = F.make("fuse_read_in", fh=fh, offset=0, size=10)
    assert c.call("READ", {"read": r}, nodeid=f).errname == "EBADF"
    w = F.make("fuse_write_in", fh=fh, offset=0, size=1)
    assert c.call("WRITE", {"write": w, "data": b"x"}, nodeid=f).errname == "EBADF"


def test_mandatory_fails_clearly_without_handles(engine: Factory) -> None:
    # procfs has no export operations: no file handles.
    with pytest.raises(OSError, match="mandatory"):
        PassthroughFS(Options("/proc/sys", inode_file_handles=HandleMode.MANDATORY))
    c = engine(Path("/proc/sys"), inode_file_handles=HandleMode.PREFER)  # prefer falls back to O_PATH
    c.nodeid(1, b"kernel")
    fs = c.server.fs
    assert isinstance(fs, PassthroughFS)
    assert fs.store.counts()["held_by_fd"] == 2 and fs.store.handle_failures == 1


def test_open_unlinked_file_uses_the_fh(engine: Factory, tmp_path: Path) -> None:
    c = engine()
    nid, fh = c.create(1, b"gone")
    c.write(nid, fh, b"12345")
    c.ok("UNLINK", {"name": b"gone"}, nodeid=1)
    ga = {"getattr": F.make("fuse_getattr_in", getattr_flags=GETATTR_FH, fh=fh)}
    a = c.ok("GETATTR", ga, nodeid=nid).args["attr_out"].attr
    assert (a.size, a.nlink) == (5, 0)
    sa = F.make("fuse_setattr_in", valid=FATTR["SIZE"] | FATTR["FH"], fh=fh, size=2)
    assert c.ok("SETATTR", {"setattr": sa}, nodeid=nid).args["attr_out"].attr.size == 2
    c.release(nid, fh)
    # Nothing holds the host inode any more: its handle is stale.
    assert c.call("GETATTR", nodeid=nid).error == errno.ESTALE
    _alive(c)


_PROBE = r"""
import json, os, resource, sys
from daemon.passthrough import Options, PassthroughFS, HandleMode
from daemon.server import Server
from tests.daemon_client import EngineClient
from dissectors import fuse as F
shared, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
fs = PassthroughFS(Options(shared, inode_file_handles=HandleMode(mode)))
s = Server(fs, dispatch="inline")
c = EngineClient(s)
c.init()
errs = {}
ok = 0
first_err = None
ids = []
for i in range(n):
    r = c.lookup(1, b"f%d" % i)
    if r.error:
        errs[r.errname] = errs.get(r.errname, 0) + 1
        first_err = i if first_err is None else first_err
    else:
        ok += 1
        ids.append(r.args["entry"].nodeid)
alive = c.call("GETATTR", nodeid=1).error == 0
# Forgetting releases what was held: the failed names now look up fine.
for nid in ids[:200]:
    s.handle(c.encode("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, nodeid=nid), lambda p: None)
retry = sum(c.lookup(1, b"f%d" % i).error == 0 for i in range(ok, min(n, ok + 100)))
alive = alive and c.call("STATFS", nodeid=1).error == 0
fds = len(os.listdir("/proc/self/fd"))
print(json.dumps({"ok": ok, "errors": errs, "first_error": first_err, "fds": fds, "alive": alive, "retry": retry,
                  "inodes": fs.store.counts()}))
"""


def _make_files(d: Path, n: int) -> None:
    d.mkdir()
    for i in range(n):
        os.close(os.open(d / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))


def _probe(shared: Path, mode: str, n: int) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", _PROBE, str(shared), mode, str(n)], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).parent.parent, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_rlimit_prefer_100k_lookups_hold_few_fds(tmp_path: Path) -> None:
    """RLIMIT_NOFILE=1024: 100k LOOKUPs all succeed in prefer mode with < 100 fds open besides the O_PATH fd
    cache, which stays at its bound (1/8 of the limit: 128)."""
    from daemon.passthrough.inodes import fd_cache_bound

    require_root()
    _make_files(tmp_path / "many", 100_000)
    res = _probe(tmp_path / "many", "prefer", 100_000)
    assert res["ok"] == 100_000 and res["errors"] == {}, res
    assert res["inodes"]["fds_cached"] == fd_cache_bound(1024) == 128, res
    assert res["fds"] < 100 + 128, res
    assert res["inodes"]["held_by_handle"] == 100_000 - 200  # the probe forgets 200 at the end
    assert res["alive"]


def test_rlimit_never_mode_runs_out_with_emfile_and_keeps_serving(tmp_path: Path) -> None:
    require_root()
    _make_files(tmp_path / "many", 1500)
    res = _probe(tmp_path / "many", "never", 1500)
    assert 900 < res["ok"] < 1024, res
    assert set(res["errors"]) == {"EMFILE"} and res["ok"] + res["errors"]["EMFILE"] == 1500
    assert res["first_error"] == res["ok"]  # everything past the limit fails
    assert res["alive"] and res["retry"] == 100


# ------------------------------------------------------------------------------- submounts / syncfs
@pytest.fixture
def with_submount(tmp_path: Path) -> Iterator[Path]:
    require_root()
    sub = tmp_path / "sub"
    sub.mkdir()
    (tmp_path / "plain").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "fsinspect-test", str(sub)], check=True)
    try:
        (sub / "inner").write_bytes(b"on tmpfs")
        yield sub
    finally:
        _libc.umount2(str(sub).encode(), 2)  # MNT_DETACH: the engine may still hold a mount fd


def test_submount_flag_announced_only_when_negotiated(engine: Factory, tmp_path: Path, with_submount: Path) -> None:
    c = engine()
    assert c.server.negotiated.has("SUBMOUNTS")
    e = c.lookup(1, b"sub").args["entry"]
    assert e.attr.flags & SUBMOUNT
    assert e.attr.ino == os.stat(with_submount).st_ino
    assert not c.lookup(1, b"plain").args["entry"].attr.flags & SUBMOUNT
    assert not c.lookup(e.nodeid, b"inner").args["entry"].attr.flags & SUBMOUNT
    # READDIRPLUS announces it too.
    fh = c.ok("OPENDIR", {"open": F.make("fuse_open_in")}, nodeid=1).args["open"].fh
    ents = c.ok("READDIRPLUS", {"read": F.make("fuse_read_in", fh=fh, size=65536)}, nodeid=1).args["entries"]
    flags = {nm: rec.entry_out.attr.flags for rec, nm in ents}
    assert flags[b"sub"] & SUBMOUNT and not flags[b"plain"] & SUBMOUNT
    # Off by option, or when the client did not offer FUSE_SUBMOUNTS.
    c2 = engine(announce_submounts=False)
    assert not c2.lookup(1, b"sub").args["entry"].attr.flags & SUBMOUNT
    c3 = engine(flags=KERNEL_FLAGS & ~INIT["SUBMOUNTS"])
    assert not c3.lookup(1, b"sub").args["entry"].attr.flags & SUBMOUNT


def test_syncfs_syncs_each_host_filesystem(engine: Factory, tmp_path: Path, with_submount: Path) -> None:
    c = engine()
    sub = c.nodeid(1, b"sub")
    c.ok("SYNCFS", {"syncfs": F.make("fuse_syncfs_in")}, nodeid=1)
    c.ok("SYNCFS", {"syncfs": F.make("fuse_syncfs_in")}, nodeid=sub)
    c.ok("SYNCFS", {"syncfs": F.make("fuse_syncfs_in")}, nodeid=sub)
    by_dev = c.server.counters()["syncfs_by_dev"]
    assert by_dev == {os.stat(tmp_path).st_dev: 1, os.stat(with_submount).st_dev: 2}
    assert c.call("SYNCFS", {"syncfs": F.make("fuse_syncfs_in")}, nodeid=4242).error == errno.EBADF


# ------------------------------------------------------------------------------- ops
@SANDBOXES
def test_rename2_link_tmpfile_and_hard_links(engine: Factory, tmp_path: Path, sandbox: str) -> None:
    c = engine(sandbox=sandbox)
    (tmp_path / "a").write_bytes(b"A")
    (tmp_path / "b").write_bytes(b"B")
    r2 = {"rename": F.make("fuse_rename2_in", newdir=1, flags=RENAME["NOREPLACE"]), "name": b"a", "newname": b"b"}
    assert c.call("RENAME2", r2, nodeid=1).error == errno.EEXIST
    r2["rename"] = F.make("fuse_rename2_in", newdir=1, flags=RENAME["EXCHANGE"])
    c.ok("RENAME2", r2, nodeid=1)
    assert (tmp_path / "a").read_bytes() == b"B" and (tmp_path / "b").read_bytes() == b"A"
    a = c.nodeid(1, b"a")
    e = c.ok("LINK", {"link": F.make("fuse_link_in", oldnodeid=a), "newname": b"a2"}, nodeid=1).args["entry"]
    assert e.nodeid == a and e.attr.nlink == 2
    assert os.stat(tmp_path / "a2").st_ino == os.stat(tmp_path / "a").st_ino
    # O_TMPFILE, then LINK gives it a name.
    rep = c.ok("TMPFILE", {"create": F.make("fuse_create_in", flags=os.O_RDWR, mode=0o100600), "name": b""},
               nodeid=1)
    t, fh = rep.args["entry"].nodeid, rep.args["open"].fh
    c.write(t, fh, b"anonymous")
    c.ok("LINK", {"link": F.make("fuse_link_in", oldnodeid=t), "newname": b"named"}, nodeid=1)
    c.release(t, fh)
    assert (tmp_path / "named").read_bytes() == b"anonymous"


def test_sparse_files_lseek_fallocate_copy_file_range(engine: Factory, tmp_path: Path) -> None:
    c = engine()
    nid, fh = c.create(1, b"sparse")
    c.write(nid, fh, b"z" * 4096, offset=1 << 20)
    seek = lambda off, wh: c.ok("LSEEK", {"lseek": F.make("fuse_lseek_in", fh=fh, offset=off, whence=wh)},  # noqa: E731
                                nodeid=nid).args["lseek_out"].offset
    assert seek(0, os.SEEK_DATA) == 1 << 20
    assert seek(0, os.SEEK_HOLE) == 0
    assert os.stat(tmp_path / "sparse").st_blocks * 512 < 64 * 1024
    blocks = os.stat(tmp_path / "sparse").st_blocks
    fa = F.make("fuse_fallocate_in", fh=fh, offset=0, length=64 * 1024, mode=0)
    c.ok("FALLOCATE", {"fallocate": fa}, nodeid=nid)
    assert os.stat(tmp_path / "sparse").st_blocks >= blocks + 128
    punch = F.make("fuse_fallocate_in", fh=fh, offset=0, length=64 * 1024, mode=0x3)  # PUNCH_HOLE|KEEP_SIZE
    c.ok("FALLOCATE", {"fallocate": punch}, nodeid=nid)
    assert os.stat(tmp_path / "sparse").st_blocks == blocks
    n2, fh2 = c.create(1, b"copy")
    cp = F.make("fuse_copy_file_range_in", fh_in=fh, off_in=1 << 20, nodeid_out=n2, fh_out=fh2, off_out=0,
                len=4096)
    assert c.ok("COPY_FILE_RANGE", {"copy": cp}, nodeid=nid).args["write_out"].size == 4096
    assert (tmp_path / "copy").read_bytes() == b"z" * 4096
    c.ok("FSYNC", {"fsync": F.make("fuse_fsync_in", fh=fh2)}, nodeid=n2)
    c.ok("FLUSH", {"flush": F.make("fuse_flush_in", fh=fh2)}, nodeid=n2)
    c.release(nid, fh)
    c.release(n2, fh2)


@SANDBOXES
def test_setattr_chmod_chown_utimens_truncate(engine: Factory, tmp_path: Path, sandbox: str) -> None:
    c = engine(sandbox=sandbox)
    (tmp_path / "f").write_bytes(b"0123456789")
    f = c.nodeid(1, b"f")
    sa = F.make("fuse_setattr_in", valid=FATTR["MODE"] | FATTR["UID"] | FATTR["GID"] | FATTR["SIZE"]
                | FATTR["MTIME"] | FATTR["ATIME_NOW"], mode=0o600, uid=65534, gid=65534, size=3,
                mtime=1_000_000_000, mtimensec=5)
    a = c.ok("SETATTR", {"setattr": sa}, nodeid=f).args["attr_out"].attr
    st = os.stat(tmp_path / "f")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size) == (0o600, 65534, 65534, 3)
    assert st.st_mtime_ns == 1_000_000_000_000_000_005 and a.mtime == 1_000_000_000
    assert abs(st.st_atime - __import__("time").time()) < 60


def test_times_before_1970_are_sent_as_the_kernel_reads_them(engine: Factory, tmp_path: Path) -> None:
    """A host file dated before 1970 (found by the engine fuzz: a SETATTR set one): its negative seconds go
    out two's complement in fuse_attr's u64, which the kernel reads as s64, as libfuse does; they failed
    every LOOKUP/GETATTR of the file with EIO and a traceback."""
    c = engine()
    (tmp_path / "old").write_bytes(b"x")
    os.utime(tmp_path / "old", ns=(-1_500_000_000, -86_400_000_000_000))  # 1969-12-31T23:59:58.5, 1969-12-31
    f = c.nodeid(1, b"old")
    for a in (c.ok("GETATTR", {"getattr": F.make("fuse_getattr_in")}, nodeid=f).args["attr_out"].attr,
              c.ok("LOOKUP", {"name": b"old"}, nodeid=1).args["entry"].attr):
        assert (a.atime - (1 << 64), a.atimensec) == (-2, 500_000_000)
        assert (a.mtime - (1 << 64), a.mtimensec) == (-86_400, 0)


def test_readonly_rejects_every_modification(engine: Factory, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"keep")
    c = engine(readonly=True, xattr=True)
    f = c.nodeid(1, b"f")
    rofs = [
        ("MKDIR", {"mkdir": F.make("fuse_mkdir_in", mode=0o755), "name": b"d"}, 1),
        ("CREATE", {"create": F.make("fuse_create_in", flags=os.O_WRONLY, mode=0o100644), "name": b"n"}, 1),
        ("MKNOD", {"mknod": F.make("fuse_mknod_in", mode=0o10644), "name": b"p"}, 1),
        ("SYMLINK", {"name": b"s", "target": b"f"}, 1),
        ("UNLINK", {"name": b"f"}, 1),
        ("RMDIR", {"name": b"f"}, 1),
        ("RENAME", {"rename": F.make("fuse_rename_in", newdir=1), "name": b"f", "newname": b"g"}, 1),
        ("LINK", {"link": F.make("fuse_link_in", oldnodeid=f), "newname": b"h"}, 1),
        ("SETATTR", {"setattr": F.make("fuse_setattr_in", valid=FATTR["SIZE"], size=0)}, f),
        ("OPEN", {"open": F.make("fuse_open_in", flags=os.O_WRONLY)}, f),
        ("OPEN", {"open": F.make("fuse_open_in", flags=os.O_RDONLY | os.O_TRUNC)}, f),
        ("SETXATTR", {"setxattr": F.make("fuse_setxattr_in", size=1), "name": b"user.x", "value": b"1"}, f),
        ("REMOVEXATTR", {"name": b"user.x"}, f),
        ("ACCESS", {"access": F.make("fuse_access_in", mask=2)}, f),
    ]
    for op, args, nid in rofs:
        assert c.call(op, args, nodeid=nid).error == errno.EROFS, op
    fh = c.open(f, os.O_RDONLY)
    assert c.call("WRITE", {"write": F.make("fuse_write_in", fh=fh, size=1), "data": b"x"},
                  nodeid=f).error == errno.EROFS
    assert c.read(f, fh, 10) == b"keep"
    assert sorted(os.listdir(tmp_path)) == ["f"]


@SANDBOXES
def test_xattrs_only_with_the_option(engine: Factory, tmp_path: Path, sandbox: str) -> None:
    (tmp_path / "f").write_bytes(b"")
    off = engine(sandbox=sandbox)
    f = off.nodeid(1, b"f")
    assert off.call("GETXATTR", {"getxattr": F.make("fuse_getxattr_in", size=0), "name": b"user.a"},
                    nodeid=f).error == errno.ENOSYS
    c = engine(sandbox=sandbox, xattr=True)
    f = c.nodeid(1, b"f")
    c.ok("SETXATTR", {"setxattr": F.make("fuse_setxattr_in", size=5), "name": b"user.a", "value": b"hello"}, nodeid=f)
    assert os.getxattr(tmp_path / "f", "user.a") == b"hello"
    gx = lambda size: c.call("GETXATTR", {"getxattr": F.make("fuse_getxattr_in", size=size),  # noqa: E731
                                          "name": b"user.a"}, nodeid=f)
    assert gx(0).args["xattr"].size == 5
    assert gx(64).args["value"] == b"hello"
    assert gx(2).error == errno.ERANGE
    lx = c.ok("LISTXATTR", {"getxattr": F.make("fuse_getxattr_in", size=256)}, nodeid=f).args["value"]
    assert b"user.a\0" in lx
    c.ok("REMOVEXATTR", {"name": b"user.a"}, nodeid=f)
    assert gx(64).error == errno.ENODATA


@pytest.mark.parametrize("mode,timeout,fopen_file,fopen_dir", [
    ("none", 0, FOPEN["DIRECT_IO"], 0),
    ("auto", 1, 0, 0),
    ("always", 86400, FOPEN["KEEP_CACHE"], FOPEN["CACHE_DIR"] | FOPEN["KEEP_CACHE"]),
    ("metadata", 86400, FOPEN["DIRECT_IO"], 0),
])
def test_cache_modes(engine: Factory, tmp_path: Path, mode: str, timeout: int, fopen_file: int,
                     fopen_dir: int) -> None:
    (tmp_path / "f").write_bytes(b"x")
    c = engine(cache=CacheMode(mode))
    e = c.lookup(1, b"f").args["entry"]
    assert (e.entry_valid, e.attr_valid) == (timeout, timeout)
    assert c.ok("GETATTR", nodeid=1).args["attr_out"].attr_valid == timeout
    rep = c.ok("OPEN", {"open": F.make("fuse_open_in")}, nodeid=e.nodeid)
    assert rep.args["open"].open_flags == fopen_file
    rep = c.ok("OPENDIR", {"open": F.make("fuse_open_in")}, nodeid=1)
    assert rep.args["open"].open_flags == fopen_dir
    assert c.server.negotiated.has("AUTO_INVAL_DATA") == (mode == "auto")
    assert not c.server.negotiated.has("WRITEBACK_CACHE")


def test_writeback_negotiated_and_write_only_opens_upgraded(engine: Factory, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    c = engine(writeback=True)
    assert c.server.negotiated.has("WRITEBACK_CACHE")
    f = c.nodeid(1, b"f")
    fh = c.open(f, os.O_WRONLY | os.O_APPEND)
    assert c.read(f, fh, 3) == b"abc"  # the kernel may read-modify-write: O_WRONLY became O_RDWR
    c.write(f, fh, b"X", offset=1)  # and O_APPEND is the kernel's business
    assert (tmp_path / "f").read_bytes() == b"aXc"


def test_credentials_create_as_the_caller(engine: Factory, tmp_path: Path) -> None:
    pub = tmp_path / "pub"
    pub.mkdir()
    pub.chmod(0o1777)
    priv = tmp_path / "priv"
    priv.mkdir(mode=0o755)
    c = engine()
    pubn, privn = c.nodeid(1, b"pub"), c.nodeid(1, b"priv")
    mk = {"mkdir": F.make("fuse_mkdir_in", mode=0o750), "name": b"mine"}
    e = c.ok("MKDIR", mk, nodeid=pubn, uid=65534, gid=65534).args["entry"]
    assert (e.attr.uid, e.attr.gid) == (65534, 65534)
    st = os.stat(pub / "mine")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o750)
    n, fh = c.create(pubn, b"file", flags=os.O_WRONLY)
    assert os.stat(pub / "file").st_uid == 0
    c.release(n, fh)
    rep = c.call("CREATE", {"create": F.make("fuse_create_in", flags=os.O_WRONLY, mode=0o100644), "name": b"f"},
                 nodeid=pubn, uid=65534, gid=65534)
    assert os.stat(pub / "f").st_uid == 65534
    c.release(rep.args["entry"].nodeid, rep.args["open"].fh)
    assert c.call("MKDIR", mk, nodeid=privn, uid=65534, gid=65534).error == errno.EACCES
    assert c.call("SYMLINK", {"name": b"l", "target": b"x"}, nodeid=privn, uid=65534, gid=65534).error == errno.EACCES
    acc = {"access": F.make("fuse_access_in", mask=os.W_OK)}
    assert c.call("ACCESS", acc, nodeid=privn, uid=65534, gid=65534).error == errno.EACCES
    c.ok("ACCESS", acc, nodeid=privn)
    # fsuid went back to 0: handle-based reopen (needs CAP_DAC_READ_SEARCH) still works.
    assert c.nodeid(pubn, b"mine") == e.nodeid
    fh = c.ok("OPENDIR", {"open": F.make("fuse_open_in")}, nodeid=e.nodeid).args["open"].fh
    assert fh > 0


def test_readdir_offsets_resume_and_plus_counts_lookups(engine: Factory, tmp_path: Path) -> None:
    for i in range(300):
        (tmp_path / f"entry-{i:04d}").write_bytes(b"")
    c = engine()
    fh = c.ok("OPENDIR", {"open": F.make("fuse_open_in")}, nodeid=1).args["open"].fh
    names: list[bytes] = []
    off = 0
    while True:
        ents = c.ok("READDIR", {"read": F.make("fuse_read_in", fh=fh, offset=off, size=1024)},
                    nodeid=1).args["entries"]
        if not ents:
            break
        names += [nm for _rec, nm in ents]
        off = ents[-1][0].off
    assert sorted(names) == sorted([b".", b".."] + [f"entry-{i:04d}".encode() for i in range(300)])
    # READDIRPLUS: each entry returned (not '.'/'..') is one lookup; entries that don't fit are not.
    ents = c.ok("READDIRPLUS", {"read": F.make("fuse_read_in", fh=fh, offset=0, size=2048)},
                nodeid=1).args["entries"]
    fs = c.server.fs
    assert isinstance(fs, PassthroughFS)
    assert fs.store.counts()["inodes"] == 1 + len(ents) - 2


def test_destroy_releases_everything(engine: Factory, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    c = engine()
    f = c.nodeid(1, b"f")
    c.open(f, os.O_RDONLY)
    c.ok("OPENDIR", {"open": F.make("fuse_open_in")}, nodeid=1)
    fs = c.server.fs
    assert isinstance(fs, PassthroughFS)
    assert fs.counters()["open_handles"] == 2
    c.ok("DESTROY")
    assert fs.counters()["open_handles"] == 0 and fs.store.counts()["inodes"] == 1
    assert c.call("GETATTR", nodeid=1).error == errno.EIO  # a new session must INIT first
    assert c.init().error == 0
    assert c.nodeid(1, b"f") != f


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fsinspect.cli", "daemon", *args], capture_output=True,
                              text=True, timeout=30, cwd=Path(__file__).parent.parent, check=False)

    r = run("--shared-dir", str(tmp_path))
    assert r.returncode == 2 and "--standalone" in r.stderr and "Traceback" not in r.stderr
    r = run("--standalone", str(tmp_path), "--shared-dir", str(tmp_path / "missing"))
    assert r.returncode == 2 and "not a directory" in r.stderr
    r = run("--standalone", str(tmp_path), "--shared-dir", "/proc/sys", "--inode-file-handles", "mandatory")
    assert r.returncode == 1 and "mandatory" in r.stderr and "Traceback" not in r.stderr
    assert len(error_lines(r.stderr)) == 1, r.stderr
    r = run("--socket-path", str(tmp_path / "s.sock"), "--shared-dir", str(tmp_path), "--passthrough", "on")
    assert r.returncode == 2 and "--passthrough is for --standalone" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s.sock").exists()


def test_setattr_times_through_the_fh(engine: Factory, tmp_path: Path) -> None:
    """With writeback the kernel sets mtime (and ctime, which the host keeps itself) through the fh."""
    c = engine(writeback=True)
    nid, fh = c.create(1, b"wb")
    sa = F.make("fuse_setattr_in", valid=FATTR["MTIME"] | FATTR["FH"] | FATTR["CTIME"], fh=fh, mtime=1_234_567_890,
                mtimensec=7, ctime=5)
    a = c.ok("SETATTR", {"setattr": sa}, nodeid=nid).args["attr_out"].attr
    assert (a.mtime, a.mtimensec) == (1_234_567_890, 7)
    assert os.stat(tmp_path / "wb").st_mtime_ns == 1_234_567_890_000_000_007
    c.release(nid, fh)


def test_mandatory_fails_per_inode_where_a_submount_has_no_handles(engine: Factory, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A procfs mounted inside an ext4 share: prefer falls back to O_PATH there, mandatory answers an error."""
    (tmp_path / "proc").mkdir()
    subprocess.run(["mount", "-t", "proc", "fsinspect-test-proc", str(tmp_path / "proc")], check=True)
    try:
        prefer = engine(inode_file_handles=HandleMode.PREFER)
        p = prefer.nodeid(1, b"proc")
        assert prefer.nodeid(p, b"self") > 0
        fs = prefer.server.fs
        assert isinstance(fs, PassthroughFS) and fs.store.handle_failures >= 1
        caplog.set_level(logging.ERROR, logger="fsinspect.daemon")
        mand = engine(inode_file_handles=HandleMode.MANDATORY)
        assert mand.lookup(1, b"proc").error == errno.EOPNOTSUPP
        assert any("mandatory" in r.getMessage() for r in caplog.records)
        _alive(mand)
    finally:  # lazy: the engines (closed by the fixture) may still hold fds in it
        _libc.umount2(str(tmp_path / "proc").encode(), 2)


@SANDBOXES
def test_device_nodes_and_fifos_are_never_opened_by_the_daemon(engine: Factory, tmp_path: Path,
                                                               sandbox: str) -> None:
    """A guest may create device nodes (its kernel opens them); the daemon must not open them on the host."""
    c = engine(sandbox=sandbox)
    chr_dev = c.ok("MKNOD", {"mknod": F.make("fuse_mknod_in", mode=stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3)),
                             "name": b"null"}, nodeid=1).args["entry"].nodeid
    fifo = c.ok("MKNOD", {"mknod": F.make("fuse_mknod_in", mode=stat.S_IFIFO | 0o666), "name": b"fifo"},
                nodeid=1).args["entry"].nodeid
    assert stat.S_ISCHR(os.lstat(tmp_path / "null").st_mode)
    for nid in (chr_dev, fifo):
        for flags in (os.O_RDONLY, os.O_WRONLY):
            assert c.call("OPEN", {"open": F.make("fuse_open_in", flags=flags)}, nodeid=nid).error == errno.EPERM
        sa = F.make("fuse_setattr_in", valid=FATTR["SIZE"], size=0)
        assert c.call("SETATTR", {"setattr": sa}, nodeid=nid).error == errno.EPERM
    # CREATE over an existing FIFO name (a host race, or a crafted request) neither blocks nor opens it.
    cr = {"create": F.make("fuse_create_in", flags=os.O_WRONLY, mode=0o100644), "name": b"fifo"}
    assert c.call("CREATE", cr, nodeid=1, timeout=5).error in (errno.ENXIO, errno.EPERM)
    _alive(c)


@SANDBOXES
def test_dotdot_of_a_directory_moved_out_of_the_share_does_not_escape(engine: Factory, tmp_path: Path,
                                                                      sandbox: str) -> None:
    shared, outside = tmp_path / "shared", tmp_path / "outside"
    (shared / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    c = engine(shared, sandbox=sandbox)
    a = c.nodeid(1, b"a")
    b = c.nodeid(a, b"b")
    assert c.lookup(b, b"..").args["entry"].nodeid == a
    (shared / "a" / "b").rename(outside / "b")  # the host moves it away while the client holds it
    # In the namespace sandbox the share is a bind mount, and the kernel refuses '..' out of a bind
    # mount's subtree itself (ENOENT) before the daemon's own check (EACCES) is reached.
    assert c.lookup(b, b"..").error == (errno.ENOENT if sandbox == "namespace" else errno.EACCES)
    _alive(c)


def test_create_keeps_the_callers_status_flags(engine: Factory, tmp_path: Path) -> None:
    import fcntl

    c = engine(inode_file_handles=HandleMode.NEVER)
    fs = c.server.fs
    assert isinstance(fs, PassthroughFS)
    for name, flags in ((b"plain", os.O_WRONLY), (b"nb", os.O_WRONLY | os.O_NONBLOCK), (b"ap", os.O_RDWR | os.O_APPEND)):
        nid, fh = c.create(1, name, flags=flags)
        got = fcntl.fcntl(fs._handles[fh].fd, fcntl.F_GETFL)
        assert got & (os.O_NONBLOCK | os.O_APPEND | os.O_ACCMODE) == flags, name
        assert fs.store.get(nid).fd >= 0  # never mode: an O_PATH twin holds the inode
        c.release(nid, fh)
    assert c.nodeid(1, b"plain") == c.lookup(1, b"plain").args["entry"].nodeid


@pytest.mark.parametrize("sandbox", ["none", "namespace", "chroot"])
def test_the_sandbox_is_the_second_wall(engine: Factory, tmp_path: Path, sandbox: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the name check removed (a bug in the first wall), '..' and an absolute symlink walk out of
    the share without a sandbox, and stay in it with one."""
    shared, outside = tmp_path / "shared", tmp_path / "outside"
    shared.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"host secret")
    (shared / "esc").symlink_to(outside)  # absolute: the host's path
    monkeypatch.setattr(fs_module, "check_name", lambda name, *, lookup=False: None)
    c = engine(shared, sandbox=sandbox)
    for name in (b"../outside/secret", b"../../" * 20 + str(outside / "secret").encode(), b"esc/secret"):
        rep = c.lookup(1, name)
        if sandbox == "none":  # the escape is real: the test does remove the first wall
            nid = rep.args["entry"].nodeid
            fh = c.ok("OPEN", {"open": F.make("fuse_open_in", flags=os.O_RDONLY)}, nodeid=nid).args["open"].fh
            assert c.ok("READ", {"read": F.make("fuse_read_in", fh=fh, size=64)}, nodeid=nid).args["data"] \
                == b"host secret"
        else:
            assert rep.error == errno.ENOENT, (name, rep)
    mk = {"mkdir": F.make("fuse_mkdir_in", mode=0o755), "name": b"../planted"}
    assert c.call("MKDIR", mk, nodeid=1).error == 0
    assert (tmp_path / "planted").exists() == (sandbox == "none")
    assert (shared / "planted").exists() == (sandbox != "none")  # in the sandbox '..' of the root is the root
    _alive(c)


def test_lock_owner_fds_go_with_the_last_handle_of_their_inode(engine: Factory, tmp_path: Path) -> None:
    """A lock owner's extra open file description was dropped only by a FLUSH naming that owner; a RELEASE
    without one (a kernel that skips the FLUSH, a crafted sequence) left it open after the inode's last
    handle was gone and the nodeid forgotten: an fd held for nothing, for the session's life.  When the
    last handle of an inode is released, no POSIX lock on it can remain, so neither does its owner fd."""
    c = engine()
    (tmp_path / "f").write_bytes(b"0123456789")
    before = len(os.listdir("/proc/self/fd"))
    f = c.nodeid(1, b"f")
    for owner in (7, 8):
        fh = c.open(f, os.O_RDWR)
        lk = F.make("fuse_lk_in", fh=fh, owner=owner,
                    lk=F.make("fuse_file_lock", start=0, end=9, type=spec.LOCK_TYPE.by_name()["F_WRLCK"], pid=1))
        c.ok("SETLK", {"lk": lk}, nodeid=f)
        c.ok("RELEASE", {"release": F.make("fuse_release_in", fh=fh)}, nodeid=f)  # no FLUSH, no RELEASE_FLUSH
    c.send_noreply("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, nodeid=f)
    assert len(os.listdir("/proc/self/fd")) == before
