"""Conformance through a real standalone mount: the host kernel's FUSE client talks to
`fsinspect daemon --standalone` over /dev/fuse, and ordinary syscalls/tools check POSIX behaviour."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.pipes import read_line
from tests.standalone_mount import (
    REPO,
    TRANSPORTS,
    is_mounted,
    ring_completions,
    standalone,
    start,
    stop,
    uring_missing,
)

pytestmark = pytest.mark.root
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


@pytest.fixture(scope="module", params=[("on", "dev"), ("off", "dev"), ("on", "uring-c"), ("off", "uring-py")],
                ids=["passthrough", "no-passthrough", "passthrough-uring", "no-passthrough-uring-py"])
def mount(request: pytest.FixtureRequest) -> Iterator[tuple[Path, Path]]:
    """(shared dir, mountpoint) of one daemon shared by this module's tests, with FUSE passthrough (the
    kernel moves file data itself) and without (every READ/WRITE through the daemon), over /dev/fuse
    reads and writes or over FUSE-over-io_uring rings (C and Python twin).  Not under pytest's 0700 tmp
    dir: the credential tests reach the mount as uid 65534."""
    require_root()
    passthrough, transport = request.param
    if transport != "dev" and (why := uring_missing()):
        pytest.skip(why)
    args, env = TRANSPORTS[transport]
    base = Path(tempfile.mkdtemp(prefix="fsinspect-standalone-"))
    base.chmod(0o755)
    shared, mnt = base / "shared", base / "mnt"
    shared.mkdir(mode=0o755)
    try:
        with standalone(shared, mnt, "--xattr", "--passthrough", passthrough, *args, env=env) as proc:
            yield shared, mnt
            if transport != "dev":  # the module's requests really went over the rings
                assert ring_completions(proc.pid) > 0
    finally:
        if not is_mounted(mnt):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def dirs(mount: tuple[Path, Path], request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """A fresh subdirectory per test: (host side, mount side)."""
    shared, mnt = mount
    name = request.node.name.replace("[", "_").replace("]", "_")
    (mnt / name).mkdir()
    return shared / name, mnt / name


def test_posix_basics(dirs: tuple[Path, Path]) -> None:
    host, m = dirs
    f = m / "f"
    f.write_bytes(b"hello")
    assert (host / "f").read_bytes() == b"hello"
    with open(f, "ab") as fp:
        fp.write(b" world")
    assert f.read_bytes() == b"hello world"
    os.truncate(f, 5)
    assert f.stat().st_size == 5 and (host / "f").stat().st_size == 5
    os.chmod(f, 0o640)
    assert stat.S_IMODE((host / "f").stat().st_mode) == 0o640
    os.utime(f, ns=(1_000_000_000_000_000_000, 1_500_000_000_123_456_789))
    assert f.stat().st_mtime_ns == (host / "f").stat().st_mtime_ns == 1_500_000_000_123_456_789
    assert f.stat().st_ino == (host / "f").stat().st_ino
    (m / "d").mkdir()
    (m / "d" / "x").write_bytes(b"")
    with pytest.raises(OSError) as ei:
        os.rmdir(m / "d")
    assert ei.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        os.mkdir(m / "d")
    with pytest.raises(FileNotFoundError):
        os.stat(m / "nope")
    os.rename(m / "d" / "x", m / "y")
    assert sorted(os.listdir(m)) == ["d", "f", "y"]
    os.rmdir(m / "d")
    os.symlink("f", m / "ln")
    assert os.readlink(m / "ln") == "f" and (m / "ln").read_bytes() == b"hello"
    os.unlink(m / "ln")
    os.mkfifo(m / "fifo")
    assert stat.S_ISFIFO((host / "fifo").lstat().st_mode)
    assert os.statvfs(m).f_bsize > 0
    assert sorted(os.listdir(host)) == ["f", "fifo", "y"]


def test_readdir_10k_entries(dirs: tuple[Path, Path]) -> None:
    host, m = dirs
    names = {f"file-{i:05d}-{'x' * (i % 40)}" for i in range(10_000)}
    for n in names:
        os.close(os.open(host / n, os.O_CREAT | os.O_WRONLY, 0o644))
    assert set(os.listdir(m)) == names
    with os.scandir(m) as it:
        seen = {e.name for e in it if e.is_file()}
    assert seen == names


def test_concurrent_writers(dirs: tuple[Path, Path]) -> None:
    host, m = dirs
    path = m / "shared-file"
    path.write_bytes(b"")
    chunk = 64 * 1024
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                for i in range(16):
                    os.pwrite(fd, bytes([65 + k]) * chunk, (i * 8 + k) * chunk)
            finally:
                os.close(fd)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    data = (host / "shared-file").read_bytes()
    assert len(data) == 16 * 8 * chunk
    for j in range(16 * 8):
        assert data[j * chunk:(j + 1) * chunk] == bytes([65 + j % 8]) * chunk


def test_rename_over_open_file(dirs: tuple[Path, Path]) -> None:
    _host, m = dirs
    (m / "a").write_bytes(b"old contents")
    (m / "b").write_bytes(b"new")
    fd = os.open(m / "a", os.O_RDONLY)
    try:
        os.rename(m / "b", m / "a")
        assert os.pread(fd, 100, 0) == b"old contents"
        assert os.fstat(fd).st_nlink == 0
        assert (m / "a").read_bytes() == b"new"
    finally:
        os.close(fd)
    assert os.listdir(m) == ["a"]


def test_hard_links(dirs: tuple[Path, Path]) -> None:
    host, m = dirs
    (m / "orig").write_bytes(b"1")
    os.link(m / "orig", m / "alias")
    assert (m / "orig").stat().st_nlink == 2
    assert (m / "orig").stat().st_ino == (m / "alias").stat().st_ino == (host / "alias").stat().st_ino
    with open(m / "alias", "r+b") as fp:
        fp.write(b"2")
    assert (m / "orig").read_bytes() == b"2"
    os.unlink(m / "orig")
    assert (m / "alias").stat().st_nlink == 1


def test_sparse_files(dirs: tuple[Path, Path]) -> None:
    host, m = dirs
    fd = os.open(m / "sparse", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"end", 100 << 20)
        assert os.fstat(fd).st_size == (100 << 20) + 3
        assert os.lseek(fd, 0, os.SEEK_DATA) == 100 << 20
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.pread(fd, 4, 50 << 20) == b"\0" * 4
    finally:
        os.close(fd)
    assert (host / "sparse").stat().st_blocks * 512 < 1 << 20


def test_tmpfile_flock_xattr_copy_file_range(dirs: tuple[Path, Path]) -> None:
    host, m = dirs
    fd = os.open(m, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"from O_TMPFILE")
        # linkat(fd, "", AT_EMPTY_PATH): /proc/self/fd links hit EXDEV on this host's stacked mounts.
        assert _libc.linkat(fd, b"", -100, str(m / "tmp-named").encode(), 0x1000) == 0, ctypes.get_errno()
    finally:
        os.close(fd)
    assert (host / "tmp-named").read_bytes() == b"from O_TMPFILE"
    a = os.open(m / "tmp-named", os.O_RDONLY)
    b = os.open(m / "tmp-named", os.O_RDONLY)
    try:
        fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(a, fcntl.LOCK_UN)
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(a)
        os.close(b)
    os.setxattr(m / "tmp-named", "user.k", b"v")
    assert os.getxattr(host / "tmp-named", "user.k") == b"v"
    assert "user.k" in os.listxattr(m / "tmp-named")
    src = os.open(m / "tmp-named", os.O_RDONLY)
    dst = os.open(m / "copy", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        assert os.copy_file_range(src, dst, 100) == 14
    finally:
        os.close(src)
        os.close(dst)
    assert (host / "copy").read_bytes() == b"from O_TMPFILE"


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *cmd],
                          capture_output=True, text=True, timeout=30, check=False)


def test_credentials_as_a_non_root_client(dirs: tuple[Path, Path]) -> None:
    host, m = dirs
    os.chmod(m, 0o755)
    (m / "pub").mkdir()
    os.chmod(m / "pub", 0o1777)
    (m / "priv").mkdir(mode=0o755)
    (m / "secret").write_bytes(b"s")
    os.chmod(m / "secret", 0o600)
    r = _as_nobody("sh", "-c", f"echo hi > {m}/pub/mine && mkdir {m}/pub/dir && ln -s x {m}/pub/sl")
    assert r.returncode == 0, r.stderr
    for n in ("mine", "dir", "sl"):
        st = (host / "pub" / n).lstat()
        assert (st.st_uid, st.st_gid) == (65534, 65534), n
    r = _as_nobody("touch", f"{m}/priv/nope")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = _as_nobody("cat", f"{m}/secret")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert not (host / "priv" / "nope").exists()
    # Root still reads and creates as root afterwards (fsuid restored per op).
    (m / "priv" / "rootfile").write_bytes(b"")
    assert (host / "priv" / "rootfile").stat().st_uid == 0


def test_readonly_mount_rejects_writes(tmp_path: Path) -> None:
    require_root()
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "f").write_bytes(b"ro")
    with standalone(shared, tmp_path / "mnt", "--readonly"):
        m = tmp_path / "mnt"
        assert (m / "f").read_bytes() == b"ro"
        for action in (lambda: (m / "g").write_bytes(b""), lambda: os.mkdir(m / "d"),
                       lambda: os.unlink(m / "f"), lambda: open(m / "f", "ab").close()):
            with pytest.raises(OSError) as ei:
                action()
            assert ei.value.errno == errno.EROFS
    assert sorted(os.listdir(shared)) == ["f"]


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(tmp_path: Path, sig: int, transport: str) -> None:
    """On every transport: with the rings, the queue threads sleep in io_uring_enter and must see the
    unmount too (the kernel ends their commands with ENOTCONN)."""
    require_root()
    if transport != "dev" and (why := uring_missing()):
        pytest.skip(why)
    args, env = TRANSPORTS[transport]
    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    mnt.mkdir()
    (shared / "f").write_bytes(b"x")
    proc = start(shared, mnt, *args, env=env)
    try:
        assert (mnt / "f").read_bytes() == b"x"
        assert is_mounted(mnt)
        assert (ring_completions(proc.pid) > 0) == (transport != "dev")
    finally:
        rc = stop(proc, mnt, sig)
    assert rc == 0
    assert not is_mounted(mnt)


def _dev_fuse_fds(pid: int) -> int:
    return sum(os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse" for fd in os.listdir(f"/proc/{pid}/fd"))


def _fd_table(pid: int) -> int:
    """The size of the process's fd table (FDSize: slots allocated, not fds open)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("FDSize:"))


@pytest.mark.parametrize("transport", ["dev", "uring-c"])
def test_the_fd_table_holds_the_fd_cache_before_serving(tmp_path: Path, transport: str) -> None:
    """The daemon grows its fd table for its fd cache before its serving threads start: a table that
    doubles while threads share it waits for an RCU grace period (5 to 15 ms on the test VM, against 11 us
    for a LOOKUP), and every thread that opens an fd meanwhile waits too.  A LOOKUP of each of 1,200 new
    files (each O_PATH fd kept in the cache) leaves the table as it was at the start (it grew at 256,
    512 and 1024 fds before)."""
    require_root()
    from daemon.passthrough.inodes import FD_TABLE_HEADROOM, fd_cache_bound

    if transport != "dev" and (why := uring_missing()):
        pytest.skip(why)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = 20000 if hard == resource.RLIM_INFINITY else min(hard, 20000)
    if fd_cache_bound(nofile) < 1300:
        pytest.skip(f"RLIMIT_NOFILE's hard limit {hard} leaves the fd cache fewer than 1300 fds")
    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    names = [f"f{i:04d}" for i in range(1200)]
    for n in names:
        (shared / n).write_bytes(b"")
    args, env = TRANSPORTS[transport]
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))  # the daemon inherits it: a known cache bound
    try:
        mnt.mkdir()
        proc = start(shared, mnt, "--cache", "auto", *args, env=env)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        table = _fd_table(proc.pid)
        assert table >= fd_cache_bound(nofile) + FD_TABLE_HEADROOM
        for n in names:
            os.stat(mnt / n)
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) > 1200  # the cache holds an fd per file
        assert _fd_table(proc.pid) == table
    finally:
        rc = stop(proc, mnt)
    assert rc == 0


@pytest.mark.parametrize("transport", ["dev", "uring-c"])
@pytest.mark.parametrize("clone", [False, True], ids=["shared-fd", "clone-fd"])
def test_several_readers(tmp_path: Path, clone: bool, transport: str) -> None:
    """Three reader threads on one fd, or each on its own FUSE_DEV_IOC_CLONE fd (opened before the
    sandbox, which has no /dev/fuse): concurrent clients all get their replies (a reply written on
    another fd than its request's would be lost, and the caller would hang), and a signal still unmounts."""
    require_root()
    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    mnt.mkdir()
    if transport != "dev" and (why := uring_missing()):
        pytest.skip(why)
    args, env = TRANSPORTS[transport]  # with the rings, whichever reader gets FUSE_INIT must start them
    proc = start(shared, mnt, "--readers", "3", *(["--clone-fd"] if clone else []), *args, env=env)
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            d = mnt / f"c{k}"
            d.mkdir()
            for i in range(60):
                f = d / f"f{i}"
                f.write_bytes(bytes([k]) * (100 + i))
                assert f.stat().st_size == 100 + i
                assert f.read_bytes() == bytes([k]) * (100 + i)
            assert sorted(os.listdir(d)) == sorted(f"f{i}" for i in range(60))
        except BaseException as e:
            errors.append(e)

    try:
        assert _dev_fuse_fds(proc.pid) == (3 if clone else 1)
        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 90
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "a client is still waiting for a reply"
        assert not errors, errors
        assert all((shared / f"c{k}" / "f59").read_bytes() == bytes([k]) * 159 for k in range(6))
    finally:
        rc = stop(proc, mnt)
    assert rc == 0
    assert not is_mounted(mnt)


def test_busy_mountpoint_and_missing_dev_fuse_are_clear_errors(tmp_path: Path) -> None:
    require_root()
    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "busy", str(mnt)], check=True)
    try:
        r = subprocess.run([sys.executable, "-m", "fsinspect.cli", "daemon", "--standalone", str(mnt),
                            "--shared-dir", str(shared)], cwd=REPO, capture_output=True, text=True, timeout=30,
                           check=False)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert r.returncode == 1
    assert "busy" in r.stderr and "Traceback" not in r.stderr
    # A private mount namespace whose /dev has no fuse node.
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f"mount -t tmpfs nodev /dev && exec {sys.executable} -m fsinspect.cli daemon "
                        f"--standalone {mnt} --shared-dir {shared}"],
                       cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 1
    assert "/dev/fuse is missing" in r.stderr and "Traceback" not in r.stderr
    assert not is_mounted(mnt)


def test_non_root_daemon_mounts_through_fusermount3(tmp_path: Path) -> None:
    """As uid 65534 the daemon can't mount(2): fusermount3 mounts and passes the fd back; handles can't be
    opened without CAP_DAC_READ_SEARCH, so `prefer` falls back to O_PATH fds, and backing files can't be
    registered without CAP_SYS_ADMIN, so passthrough falls back to READ/WRITE.

    This host's /dev/fuse is 0600; distributions ship it 0666.  A private mount namespace gets a 0666
    node bound over it, so the host is untouched and everything (mount included) dies with the namespace.
    """
    require_root()
    base = Path(tempfile.mkdtemp(prefix="fsinspect-nonroot-"))
    base.chmod(0o755)
    shared, mnt = base / "shared", base / "mnt"
    shared.mkdir()
    mnt.mkdir()
    (shared / "f").write_bytes(b"mine\n")
    for p in (shared, mnt, shared / "f"):
        os.chown(p, 65534, 65534)
    nobody = "setpriv --reuid 65534 --regid 65534 --clear-groups"
    script = f"""
set -e
mknod {base}/fuse c 10 229 && chmod 666 {base}/fuse && mount --bind {base}/fuse /dev/fuse
{nobody} {sys.executable} -m fsinspect.cli daemon --standalone {mnt} --shared-dir {shared} \
    --log-level info 2>{base}/daemon.log &
pid=$!
trap 'kill -KILL $pid 2>/dev/null || true' EXIT
for i in $(seq 150); do grep -q " {mnt} " /proc/self/mountinfo && break; sleep 0.1; done
grep " {mnt} " /proc/self/mountinfo | grep -o "user_id=[0-9]*"
{nobody} sh -c "cat {mnt}/f && echo new > {mnt}/g && ls {mnt}"
kill -TERM $pid
rc=0; wait $pid || rc=$?
echo "rc=$rc"
echo "mounted=$(grep -c " {mnt} " /proc/self/mountinfo || true)"
"""
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                           capture_output=True, text=True, timeout=60, check=False)
        log = (base / "daemon.log").read_text() if (base / "daemon.log").exists() else ""
        assert r.returncode == 0, r.stderr + log
        assert r.stdout.split() == ["user_id=65534", "mine", "f", "g", "rc=0", "mounted=0"], r.stdout + log
        assert "holding inodes by O_PATH fds" in log
        # FUSE passthrough (on by default) is refused without CAP_SYS_ADMIN: one warning, READ/WRITE served
        assert log.count("passthrough off: the kernel refused a backing file (FUSE_DEV_IOC_BACKING_OPEN: "
                         "Operation not permitted, needs CAP_SYS_ADMIN)") == 1, log
        assert (shared / "g").stat().st_uid == 65534
    finally:
        shutil.rmtree(base, ignore_errors=True)


_HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
fcntl.lockf(fd, fcntl.LOCK_SH, 50, 200)
print("locked", flush=True)
sys.stdin.readline()
os.close(fd)
print("closed", flush=True)
sys.stdin.readline()
"""


def test_posix_locks_between_processes(dirs: tuple[Path, Path]) -> None:
    """fcntl locks reach the daemon (FUSE_POSIX_LOCKS) and conflict between owners as on the host."""
    _host, m = dirs
    f = m / "locked"
    f.write_bytes(b"\0" * 4096)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(f)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, bufsize=0)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert read_line(holder.stdout, 30, "the holder taking its locks") == "locked"
        fd = os.open(f, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 20)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 100)  # outside the holder's range: fine
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 10, 210)  # shared with the holder's read lock
            with pytest.raises(BlockingIOError):
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 210)
            # F_GETLK describes the conflicting write lock.
            import struct
            res = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 10, 0))
            typ, _wh, start, length, _pid = struct.unpack("@hhqqi4x", res)
            assert (typ, start, length) == (fcntl.F_WRLCK, 0, 100)
            holder.stdin.write(b"\n")
            assert read_line(holder.stdout, 30, "the holder closing its locked file") == "closed"
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 20)  # the holder's close released its locks
        finally:
            os.close(fd)
    finally:
        holder.kill()
        holder.wait(10)


def _io_urings(pid: int) -> int:
    return sum(os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[io_uring]" for fd in os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("rules", [(), ("--inject", "op == MKDIR errno=EPERM")], ids=["no-rules", "inject"])
def test_uring_auto_uses_the_rings_unless_a_rule_may_hold(tmp_path: Path, rules: tuple[str, ...]) -> None:
    """--uring auto with enable_uring on: the rings serve, except where a debugger rule may hold requests
    (each held one would keep one of its CPU queue's few entries, and the queue would stall behind them)."""
    require_root()
    if why := uring_missing():
        pytest.skip(why)
    Path("/sys/module/fuse/parameters/enable_uring").write_text("Y")  # what --uring on does
    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    mnt.mkdir()
    proc = start(shared, mnt, "--uring", "auto", *rules)
    try:
        (mnt / "f").write_bytes(b"x")
        if rules:
            with pytest.raises(PermissionError):
                (mnt / "d").mkdir()
            assert _io_urings(proc.pid) == 0
        else:
            (mnt / "d").mkdir()
            assert _io_urings(proc.pid) > 0
            assert ring_completions(proc.pid) > 0
    finally:
        rc = stop(proc, mnt)
    assert rc == 0
