"""What an attacker probed (issue 17), through the real /dev/fuse mount where the kernel can send it, and
through the engine where only a crafted message can: set-user-ID bits, supplementary groups, lock
waiters that must not stall everyone, a mountpoint inside the shared dir, the process umask, and
out-of-range integers."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from daemon.passthrough import Options, PassthroughFS
from daemon.server import Server
from dissectors import fuse as F
from tests.conftest import require_root
from tests.daemon_client import EngineClient
from tests.pipes import error_lines, read_line
from tests.standalone_mount import REPO, is_mounted, standalone

pytestmark = pytest.mark.root

BIG = 1 << 63


@pytest.fixture
def base() -> Iterator[Path]:
    """A world-traversable scratch dir (pytest's tmp dir is 0700, and uid 65534 must reach the mount)."""
    require_root()
    d = Path(tempfile.mkdtemp(prefix="fsinspect-hardening-"))
    d.chmod(0o755)
    (d / "shared").mkdir(mode=0o755)
    (d / "mnt").mkdir()
    try:
        yield d
    finally:
        if not is_mounted(d / "mnt"):
            shutil.rmtree(d, ignore_errors=True)


def _as(uid: int, gid: int, *cmd: str, groups: str | None = None) -> subprocess.CompletedProcess[str]:
    g = ["--groups", groups] if groups else ["--clear-groups"]
    return subprocess.run(["setpriv", "--reuid", str(uid), "--regid", str(gid), *g, *cmd],
                          capture_output=True, text=True, timeout=30, check=False)


# ------------------------------------------------------------------------------- 9: out-of-range integers
@pytest.fixture
def client(tmp_path: Path) -> Iterator[EngineClient]:
    require_root()
    fs = PassthroughFS(Options(str(tmp_path)))
    server = Server(fs)
    c = EngineClient(server)
    assert c.init().error == 0
    yield c
    server.shutdown()
    fs.close()


def test_out_of_range_integers_are_einval_in_one_line(client: EngineClient, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A READ at offset 2**63 (and its kin) is the host kernel's EINVAL, logged as one line at most,
    never a traceback per request."""
    (tmp_path / "f").write_bytes(b"data")
    c = client
    f = c.nodeid(1, b"f")
    fh = c.open(f, os.O_RDWR)
    lk = F.make("fuse_lk_in", fh=fh, owner=1, lk=F.make("fuse_file_lock", start=BIG, end=BIG + 5, type=1))
    requests: list[tuple[str, dict[str, Any]]] = [
        ("READ", {"read": F.make("fuse_read_in", fh=fh, offset=BIG, size=10)}),
        ("WRITE", {"write": F.make("fuse_write_in", fh=fh, offset=BIG, size=1), "data": b"x"}),
        ("SETATTR", {"setattr": F.make("fuse_setattr_in", valid=F.spec.FATTR.by_name()["SIZE"], size=BIG)}),
        ("LSEEK", {"lseek": F.make("fuse_lseek_in", fh=fh, offset=BIG, whence=3)}),
        ("FALLOCATE", {"fallocate": F.make("fuse_fallocate_in", fh=fh, offset=BIG, length=1)}),
        ("COPY_FILE_RANGE", {"copy": F.make("fuse_copy_file_range_in", fh_in=fh, off_in=BIG, nodeid_out=f,
                                            fh_out=fh, off_out=0, len=1)}),
        ("GETLK", {"lk": lk}),
        ("SETLK", {"lk": lk}),
    ]
    caplog.set_level(logging.WARNING, logger="fsinspect.daemon")
    for _round in range(50):
        for op, args in requests:
            assert c.call(op, args, nodeid=f).errname == "EINVAL", op
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert len(caplog.records) <= 3, [r.getMessage() for r in caplog.records]
    assert c.read(f, fh, 4) == b"data"  # the session goes on


# ------------------------------------------------------------------------------- 8: paths given up
def test_mountpoint_inside_the_shared_dir_is_refused(base: Path) -> None:
    """Mounting inside the export made the daemon look its own mount up (a deadlock on the first `ls`):
    refused with one line, also through a bind mount of the shared dir."""
    shared = base / "shared"
    (shared / "inner").mkdir()
    (base / "view").mkdir()
    subprocess.run(["mount", "--bind", str(shared), str(base / "view")], check=True)
    try:
        for mnt in (shared / "inner", base / "view" / "inner"):
            p = subprocess.Popen([sys.executable, "-m", "fsinspect.cli", "daemon", "--standalone", str(mnt),
                                  "--shared-dir", str(shared)], cwd=REPO, stderr=subprocess.PIPE, text=True)
            try:
                _out, err = p.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                _out, err = p.communicate(timeout=10)
            finally:
                if is_mounted(mnt):
                    subprocess.run(["umount", "-l", str(mnt)], check=False)
            assert p.returncode == 1, err
            assert "inside --shared-dir" in err and "Traceback" not in err
            assert len(error_lines(err)) == 1, err
    finally:
        subprocess.run(["umount", str(base / "view")], check=True)


def test_process_umask_is_left_alone(tmp_path: Path) -> None:
    """PassthroughFS set umask(0) for the whole process: the daemon's own files came out 0666."""
    require_root()
    old = os.umask(0o027)
    try:
        fs = PassthroughFS(Options(str(tmp_path)))
        try:
            assert os.umask(0o027) == 0o027
        finally:
            fs.close()
    finally:
        os.umask(old)


def test_guests_modes_are_kept_with_a_daemon_umask(base: Path) -> None:
    """The daemon runs with umask 077; what callers create keeps the mode their own kernel computed, and
    the daemon's --summary-json is not world-writable."""
    shared, mnt = base / "shared", base / "mnt"
    old = os.umask(0o077)
    try:
        with standalone(shared, mnt):
            os.umask(0)
            os.close(os.open(mnt / "f", os.O_CREAT | os.O_WRONLY, 0o666))
            os.mkdir(mnt / "d", 0o777)
            os.mkfifo(mnt / "p", 0o662)
            os.umask(0o022)
            os.close(os.open(mnt / "g", os.O_CREAT | os.O_WRONLY, 0o666))
    finally:
        os.umask(old)
    modes = {n: stat.S_IMODE((shared / n).lstat().st_mode) for n in ("f", "d", "p", "g")}
    assert modes == {"f": 0o666, "d": 0o777, "p": 0o662, "g": 0o644}


@contextmanager
def vhost_daemon(sock: Path, shared: Path, log: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """`fsinspect daemon --socket-path SOCK` listening (its output to `log`); killed if still running."""
    with open(log, "wb") as logf:
        p = subprocess.Popen([sys.executable, "-m", "fsinspect", "daemon", f"--socket-path={sock}",
                              "--shared-dir", str(shared), *extra],
                             cwd=REPO, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert p.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the daemon never listened"
            time.sleep(0.02)
        yield p
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_vhost_daemon_summary_json_is_not_world_writable(base: Path) -> None:
    summary = base / "summary.json"
    with vhost_daemon(base / "vfs.sock", base / "shared", base / "daemon.log", "--summary-json", str(summary)) as p:
        p.send_signal(signal.SIGTERM)
        p.wait(15)
    assert stat.S_IMODE(summary.stat().st_mode) & 0o022 == 0, oct(summary.stat().st_mode)



# ------------------------------------------------------------------------------- 1: set-user-ID bits
@pytest.mark.parametrize("cache", ["none", "metadata", "auto", "always"])
def test_a_non_owners_write_clears_setuid_and_setgid(base: Path, cache: str) -> None:
    """With FOPEN_DIRECT_IO (none, metadata) the kernel flags the WRITE with KILL_SUIDGID instead of
    sending a SETATTR; the daemon wrote as root with CAP_FSETID, so 04777 stayed 04777."""
    shared, mnt = base / "shared", base / "mnt"
    with standalone(shared, mnt, "--cache", cache):
        for name, mode in (("suid", 0o4777), ("sgid", 0o2777), ("both", 0o6777), ("root-writes", 0o4777)):
            (mnt / name).write_bytes(b"#!/bin/sh\n")
            os.chmod(mnt / name, mode)
        for name in ("suid", "sgid", "both"):
            r = _as(65534, 65534, "sh", "-c", f"echo x >> {mnt / name}")
            assert r.returncode == 0, r.stderr
        with open(mnt / "root-writes", "ab") as f:  # root keeps CAP_FSETID: the bits stay
            f.write(b"x")
        modes = {n: stat.S_IMODE((mnt / n).stat().st_mode) for n in ("suid", "sgid", "both", "root-writes")}
    host = {n: stat.S_IMODE((shared / n).stat().st_mode) for n in modes}
    assert host == modes == {"suid": 0o777, "sgid": 0o777, "both": 0o777, "root-writes": 0o4777}


def test_kill_suidgid_on_truncate_and_o_trunc_open(client: EngineClient, tmp_path: Path) -> None:
    """FATTR_KILL_SUIDGID (SETATTR) and FUSE_OPEN_KILL_SUIDGID (OPEN with O_TRUNC), which the kernel
    sends under HANDLE_KILLPRIV_V2, clear the bits too; without the flags root's truncate keeps them."""
    c = client
    fattr = F.spec.FATTR.by_name()
    for name in ("t", "o", "keep"):
        (tmp_path / name).write_bytes(b"data")
        os.chmod(tmp_path / name, 0o6777)
    sa = F.make("fuse_setattr_in", valid=fattr["SIZE"] | fattr["KILL_SUIDGID"], size=1)
    c.ok("SETATTR", {"setattr": sa}, nodeid=c.nodeid(1, b"t"), uid=65534, gid=65534)
    o = c.nodeid(1, b"o")
    rep = c.ok("OPEN", {"open": F.make("fuse_open_in", flags=os.O_WRONLY | os.O_TRUNC, open_flags=1)}, nodeid=o)
    c.release(o, rep.args["open"].fh)
    c.ok("SETATTR", {"setattr": F.make("fuse_setattr_in", valid=fattr["SIZE"], size=2)},
         nodeid=c.nodeid(1, b"keep"))
    assert {n: stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("t", "o", "keep")} == \
        {"t": 0o777, "o": 0o777, "keep": 0o6777}
    # CAP_FSETID came back: root's own write keeps the bits.
    fh = c.open(c.nodeid(1, b"keep"), os.O_WRONLY)
    c.write(c.nodeid(1, b"keep"), fh, b"y")
    assert stat.S_IMODE((tmp_path / "keep").stat().st_mode) == 0o6777


# ------------------------------------------------------------------------------- 2: supplementary groups
GROUP = 4242


def test_supplementary_group_creates_through_the_mount(base: Path) -> None:
    """A directory 0:G mode 0770: a caller whose supplementary groups include G creates, mkdirs, mknods
    and symlinks there (FUSE_CREATE_SUPP_GROUP), as on tmpfs; a caller without G still can't."""
    shared, mnt = base / "shared", base / "mnt"
    d = shared / "team"
    d.mkdir()
    os.chown(d, 0, GROUP)
    d.chmod(0o770)
    with standalone(shared, mnt):
        r = _as(65534, 65534, "sh", "-c", f"cd {mnt}/team && echo hi > f && mkdir dir && ln -s f sl && mkfifo p",
                groups=str(GROUP))
        assert r.returncode == 0, r.stderr
        r = _as(65534, 65534, "touch", f"{mnt}/team/nope")
        assert r.returncode != 0 and "Permission denied" in r.stderr
    for n in ("f", "dir", "sl", "p"):
        st = (d / n).lstat()
        assert (st.st_uid, st.st_gid) == (65534, 65534), n
    assert not (d / "nope").exists()


@pytest.fixture
def member() -> Iterator[int]:
    """A live process whose supplementary groups include GROUP (its pid plays the FUSE caller's)."""
    p = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534", "--groups", f"{GROUP},4243",
                          "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while b"4242" not in Path(f"/proc/{p.pid}/status").read_bytes().split(b"Groups:")[1].split(b"\n")[0]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield p.pid
    finally:
        p.kill()
        p.wait(10)


def test_groups_from_proc_where_the_kernel_sends_none(tmp_path: Path, member: int) -> None:
    """Standalone on a kernel without FUSE_CREATE_SUPP_GROUP: the caller's groups come from
    /proc/PID/status; without that fallback (virtio-fs: the pid is the guest's) creation is refused."""
    require_root()
    d = tmp_path / "team"
    d.mkdir()
    os.chown(d, 0, GROUP)
    d.chmod(0o770)
    tmp_path.chmod(0o755)
    for proc_groups, want in ((True, 0), (False, errno.EACCES)):
        fs = PassthroughFS(Options(str(tmp_path), proc_groups=proc_groups))
        server = Server(fs)
        try:
            c = EngineClient(server)
            assert c.init().error == 0  # KERNEL_FLAGS: no CREATE_SUPP_GROUP
            team = c.nodeid(1, b"team")
            mk = {"mkdir": F.make("fuse_mkdir_in", mode=0o755), "name": f"d{proc_groups}".encode()}
            assert c.call("MKDIR", mk, nodeid=team, uid=65534, gid=65534, pid=member).error == want
        finally:
            server.shutdown()
            fs.close()
    assert os.listdir(d) == ["dTrue"]


# ------------------------------------------------------------------------------- 3: lock waiters
_WAITER = r"""
import fcntl, os, signal, sys
path, kind, alarm = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
class Timeout(Exception):
    pass
def on_alarm(_s, _f):
    raise Timeout
signal.signal(signal.SIGALRM, on_alarm)
print("waiting", flush=True)
signal.alarm(alarm)
try:
    fcntl.flock(fd, fcntl.LOCK_EX) if kind == "flock" else fcntl.lockf(fd, fcntl.LOCK_EX, 0, 0)
    print("locked", flush=True)
except Timeout:
    print("timeout", flush=True)
"""


def _waiter(path: Path, kind: str, alarm: int = 0) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-c", _WAITER, str(path), kind, str(alarm)], stdout=subprocess.PIPE,
                         bufsize=0)
    assert p.stdout is not None and read_line(p.stdout, 30, f"a {kind} waiter starting") == "waiting"
    return p


def _lock_waits_in(pid: int) -> int:
    """Threads of `pid` blocked in a host lock wait (fcntl F_OFD_SETLKW, flock), from their kernel stacks."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stack = Path(f"/proc/{pid}/task/{tid}/stack").read_text()
        except OSError:
            continue
        n += "fcntl_setlk" in stack or "sys_flock" in stack
    return n


def _wait_for_lock_waits(pid: int, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (have := _lock_waits_in(pid)) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"{have} of {n} lock waits reached the daemon within {timeout:g} s")
        time.sleep(0.02)


def _reap(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(3)
        except subprocess.TimeoutExpired:
            pass  # stuck in the kernel waiting on the daemon: the daemon's stop will end it
        if p.stdout is not None:
            p.stdout.close()


def test_lock_waiters_do_not_stall_others_and_interrupt_ends_a_wait(base: Path) -> None:
    """One process holds a POSIX lock and a flock; eight F_SETLKW and two flock waiters queue behind it.
    A root dd of 4 MiB (1 MiB WRITEs and an fsync: pool work) still finishes within 1 s; a killed waiter
    and one whose alarm fires stop waiting (FUSE_INTERRUPT); the rest get the lock once it is free."""
    shared, mnt = base / "shared", base / "mnt"
    procs: list[subprocess.Popen[bytes]] = []
    with standalone(shared, mnt) as daemon:
        f = mnt / "locked"
        f.write_bytes(b"\0" * 4096)
        f.chmod(0o666)
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(f)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, bufsize=0)
        procs.append(holder)
        try:
            assert holder.stdout is not None and holder.stdin is not None
            assert read_line(holder.stdout, 30, "the holder taking its locks") == "locked"
            waiters = [_waiter(f, "fcntl") for _ in range(8)] + [_waiter(f, "flock") for _ in range(2)]
            procs += waiters
            _wait_for_lock_waits(daemon.pid, len(waiters))  # every waiter is in the daemon now
            assert all(p.poll() is None for p in waiters)
            t0 = time.monotonic()
            dd = subprocess.Popen(["dd", "if=/dev/zero", f"of={mnt}/big", "bs=1M", "count=4", "conv=fsync"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(dd)
            try:
                dd.wait(10)  # not subprocess.run: a dd stuck on the daemon can't be killed and reaped
            except subprocess.TimeoutExpired:
                pytest.fail("dd still waits after 10 s behind the lock waiters")
            took = time.monotonic() - t0
            assert dd.returncode == 0
            assert took < 1.0, f"dd took {took:.2f} s behind the lock waiters"
            assert (shared / "big").stat().st_size == 4 << 20
            # Kill one waiter (fatal signal: the kernel still waits for our reply unless we interrupt).
            killed = waiters.pop(0)
            killed.kill()
            killed.wait(5)
            # Waiters with a 1 s alarm: the handler runs, so each wait ended with EINTR in the caller.
            for kind in ("fcntl", "flock"):
                timed = _waiter(f, kind, alarm=1)
                procs.append(timed)
                assert timed.stdout is not None
                assert read_line(timed.stdout, 30, f"a {kind} waiter with a 1 s alarm") == "timeout", kind
                assert timed.wait(5) == 0
            holder.stdin.write(b"\n")
            assert read_line(holder.stdout, 30, "the holder closing its POSIX-locked file") == "closed"
            # The holder closed its file: the fcntl waiters get the lock one after another; the flock
            # waiters follow once the holder's flock goes with its last descriptor.
            holder.stdin.write(b"\n")
            holder.wait(10)
            for p in waiters:
                assert p.stdout is not None
                assert read_line(p.stdout, 30, "a waiter getting the lock once it is free") == "locked"
                assert p.wait(10) == 0
        finally:
            _reap(procs)


_HOLDER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX, 0, 0)
fl = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fl, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
os.close(fd)
print("closed", flush=True)
sys.stdin.readline()
os.close(fl)
"""


def test_lock_waiter_limit_interrupt_and_shutdown(tmp_path: Path) -> None:
    """Past `lock_waiters` (or a non-root uid's quarter of them) a SETLKW is refused with ENOLCK at once;
    INTERRUPT answers a wait EINTR (also one that arrives before its request is registered); shutdown
    ends the remaining waits (ENOLCK)."""
    require_root()
    import fcntl
    import queue
    import struct

    (tmp_path / "f").write_bytes(b"x")
    hold = os.open(tmp_path / "f", os.O_RDWR)
    fcntl.fcntl(hold, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
    fs = PassthroughFS(Options(str(tmp_path)))
    server = Server(fs, lock_waiters=4)
    try:
        c = EngineClient(server)
        assert c.init().error == 0
        f = c.nodeid(1, b"f")
        fh = c.open(f, os.O_RDWR)
        replies: queue.Queue[tuple[int, int]] = queue.Queue()

        def setlkw(owner: int, uid: int = 0) -> int:
            lk = F.make("fuse_lk_in", fh=fh, owner=owner, lk=F.make("fuse_file_lock", start=0, end=BIG - 1, type=1))
            buf = c.encode("SETLKW", {"lk": lk}, nodeid=f, uid=uid, gid=uid)
            server.handle(buf, lambda parts: replies.put(F.OUT_HEADER.struct.unpack_from(b"".join(
                bytes(p) for p in parts))[1:3]))
            return c.unique

        first, second, nobody = setlkw(1), setlkw(2), setlkw(3, uid=65534)
        refused = setlkw(4, uid=65534)
        assert replies.get(timeout=5) == (-errno.ENOLCK, refused)  # that uid's share (1 of 4) is taken
        third = setlkw(5)
        refused = setlkw(6)
        assert replies.get(timeout=5) == (-errno.ENOLCK, refused)  # all 4 are taken
        assert server.counters()["lock_waits"] == {"waiting": 4, "refused": 2, "interrupted": 0}
        c.send_noreply("INTERRUPT", {"interrupt": F.make("fuse_interrupt_in", unique=first)})
        assert replies.get(timeout=5) == (-errno.EINTR, first)
        # An INTERRUPT for a request not seen yet (another reader thread has it) is kept for it.
        c.send_noreply("INTERRUPT", {"interrupt": F.make("fuse_interrupt_in", unique=c.unique + 2)})
        early = setlkw(7)
        assert replies.get(timeout=5) == (-errno.EINTR, early)
        assert c.call("GETATTR", nodeid=f).error == 0
        t0 = time.monotonic()
        server.shutdown()
        assert {replies.get(timeout=5) for _ in range(3)} == {(-errno.ENOLCK, u) for u in (second, nobody, third)}
        assert time.monotonic() - t0 < 5
    finally:
        server.shutdown()
        fs.close()
        os.close(hold)


# ------------------------------------------------------------------------------- 1 over vhost-user
_GUEST_SUID = r"""
suid_write() {
    mkdir -p /etc
    grep -q '^nobody:' /etc/passwd 2>/dev/null || echo 'nobody:x:65534:65534:nobody:/:/bin/sh' >>/etc/passwd
    grep -q '^nogroup:' /etc/group 2>/dev/null || echo 'nogroup:x:65534:' >>/etc/group
    for _n in suid sgid; do printf '#!/bin/sh\n' >"$MNT/$_n-f" || return 1; done
    must chmod chmod 4777 "$MNT/suid-f" || return 1
    must chmod chmod 2777 "$MNT/sgid-f" || return 1
    must write-as-nobody su -s /bin/sh nobody -c "echo x >>$MNT/suid-f && echo x >>$MNT/sgid-f" || return 1
    mark metric suid suid=$(stat -c %a "$MNT/suid-f") sgid=$(stat -c %a "$MNT/sgid-f")
}
step suid suid_write
"""


@pytest.mark.guest
@pytest.mark.parametrize("cache", ["none", "metadata"])
def test_guest_non_owner_write_clears_setuid_over_vhost_user(guest_image: Any, guest_share: Any,
                                                              cache: str) -> None:
    """The Linux 6.1 guest, through `fsinspect daemon` over vhost-user with direct I/O: a write by uid 65534
    (flagged KILL_SUIDGID by the guest kernel) clears set-user-ID and set-group-ID on the host."""
    from fsinspect.guest import launcher
    from tests.guest_fixtures import explain

    (guest_share.root / ".fsi-suid.sh").write_text(_GUEST_SUID)
    guest_share.root.chmod(0o755)  # uid 65534 must reach the files
    with launcher.short_tmpdir() as work, \
            vhost_daemon(work / "vfs.sock", guest_share.root, work / "daemon.log", "--cache", cache) as p:
        res = launcher.run_guest(work / "vfs.sock", image=guest_image, workload="script", timeout=120, watch=[p],
                                 params={"script": ".fsi-suid.sh"})
    assert res.ok, explain(res)
    assert res.metrics["suid"] == {"suid": "777", "sgid": "777"}, res.metrics
    host = {n: stat.S_IMODE((guest_share.root / f"{n}-f").stat().st_mode) for n in ("suid", "sgid")}
    assert host == {"suid": 0o777, "sgid": 0o777}
