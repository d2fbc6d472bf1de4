"""The passthrough syscalls, both engines: the C extension (daemon/passthrough/_sys, GIL released) and
its ctypes twin (syscalls.TWIN) answer the same, on real files."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from daemon.passthrough import syscalls as sc

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def _engines() -> dict[str, Any]:
    out: dict[str, Any] = {"python": SimpleNamespace(**sc.TWIN)}
    try:
        from daemon.passthrough import _sys  # type: ignore[attr-defined]
    except ImportError as exc:  # CI has a compiler: a missing C engine fails rather than skips
        out["c"] = exc
    else:
        out["c"] = _sys
    return out


@pytest.fixture(params=list(_engines()))
def eng(request: pytest.FixtureRequest) -> Any:
    e = _engines()[request.param]
    if isinstance(e, Exception):
        raise e
    return e


def test_the_c_engine_is_the_one_the_daemon_runs() -> None:
    if os.environ.get("FSINSPECT_SYSCALLS") == "python":
        assert sc.ENGINE == "python"
    else:
        assert sc.ENGINE == "c" and sc.statx is _engines()["c"].statx


def test_statx_matches_os_stat(eng: Any, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 5000)
    (tmp_path / "l").symlink_to("f")
    fd = os.open(f, os.O_PATH)
    try:
        got = eng.statx(fd)
    finally:
        os.close(fd)
    st = os.stat(f)
    for name in ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
                 "st_blksize", "st_rdev", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
        assert getattr(got, name) == getattr(st, name), name
    assert got.mnt_id > 0 and got.mnt_id == sc.TWIN["statx"](sc.AT_FDCWD, os.fsencode(f), 0).mnt_id
    dfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        assert stat.S_ISLNK(eng.statx(dfd, b"l", sc.AT_SYMLINK_NOFOLLOW).st_mode)
        assert stat.S_ISREG(eng.statx(dfd, b"l", 0).st_mode)
        with pytest.raises(FileNotFoundError) as ei:
            eng.statx(dfd, b"missing", 0)
        assert ei.value.filename == b"missing" and "statx" in str(ei.value)
    finally:
        os.close(dfd)
    with pytest.raises(OSError) as bad:
        eng.statx(-1)
    assert bad.value.errno == errno.EBADF


@pytest.mark.skipif(os.geteuid() != 0, reason="open_by_handle_at needs CAP_DAC_READ_SEARCH")
def test_file_handles_round_trip(eng: Any, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"data")
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        handle, mnt = eng.name_to_handle_at(dfd, b"f", 0)
        assert (handle, mnt) == sc.TWIN["name_to_handle_at"](dfd, b"f", 0)
        fd = eng.open_by_handle_at(dfd, handle, os.O_RDONLY)
        try:
            assert os.read(fd, 10) == b"data"
            assert os.get_inheritable(fd) is False  # O_CLOEXEC
            assert os.fstat(fd).st_ino == f.stat().st_ino
        finally:
            os.close(fd)
        with pytest.raises(ValueError):
            eng.open_by_handle_at(dfd, handle[:6], os.O_RDONLY)
        with pytest.raises(ValueError):
            eng.open_by_handle_at(dfd, handle[:-1], os.O_RDONLY)
        f.unlink()
        with pytest.raises(OSError) as gone:
            eng.open_by_handle_at(dfd, handle, os.O_RDONLY)
        assert gone.value.errno == errno.ESTALE
        with pytest.raises(FileNotFoundError):
            eng.name_to_handle_at(dfd, b"f", 0)
    finally:
        os.close(dfd)


def test_renameat2_flags(eng: Any, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"A")
    (tmp_path / "b").write_bytes(b"B")
    dfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            eng.renameat2(dfd, b"a", dfd, b"b", RENAME_NOREPLACE)
        eng.renameat2(dfd, b"a", dfd, b"b", RENAME_EXCHANGE)
        assert (tmp_path / "a").read_bytes() == b"B" and (tmp_path / "b").read_bytes() == b"A"
        eng.renameat2(dfd, b"a", dfd, b"c", 0)
        assert not (tmp_path / "a").exists() and (tmp_path / "c").read_bytes() == b"B"
    finally:
        os.close(dfd)


def test_fd_calls(eng: Any, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"")
    (tmp_path / "l").symlink_to("some/target")
    fd = os.open(f, os.O_RDWR)
    lfd = os.open(tmp_path / "l", os.O_PATH | os.O_NOFOLLOW)
    try:
        eng.syncfs(fd)
        eng.fallocate(fd, 0, 0, 8192)
        assert os.fstat(fd).st_size == 8192
        eng.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
        assert os.fstat(fd).st_size == 8192
        assert eng.readlink_empty(lfd) == b"some/target"
        st = os.fstat(fd)
        eng.fchown_empty(fd, -1, -1)  # leaves both ids
        assert (os.fstat(fd).st_uid, os.fstat(fd).st_gid) == (st.st_uid, st.st_gid)
        if os.geteuid() == 0:
            eng.fchown_empty(fd, 1234, 5678)
            assert (os.fstat(fd).st_uid, os.fstat(fd).st_gid) == (1234, 5678)
        with pytest.raises(OSError) as e1:
            eng.readlink_empty(fd)  # not a symlink
        assert e1.value.errno in (errno.EINVAL, errno.ENOENT)
    finally:
        os.close(fd)
        os.close(lfd)
    for call in (lambda: eng.syncfs(-1), lambda: eng.fallocate(-1, 0, 0, 1), lambda: eng.fchown_empty(-1, 0, 0)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EBADF


@pytest.mark.skipif(os.geteuid() != 0, reason="setgroups needs CAP_SETGID")
def test_credentials_are_per_thread(eng: Any) -> None:
    seen: dict[str, Any] = {}

    def status() -> dict[str, str]:
        with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)

    def worker() -> None:
        seen["prev_uid"] = eng.setfsuid(1234)
        seen["prev_gid"] = eng.setfsgid(5678)
        eng.setgroups_thread([7, 8, 9])
        s = status()
        seen["uid"], seen["gid"], seen["groups"] = s["Uid"].split()[3], s["Gid"].split()[3], s["Groups"].split()
        seen["back_uid"] = eng.setfsuid(0)
        eng.setfsgid(0)
        eng.setgroups_thread(())
        seen["after"] = status()["Groups"].split()

    before = status()["Groups"]
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert (seen["prev_uid"], seen["prev_gid"], seen["back_uid"]) == (0, 0, 1234)
    assert (seen["uid"], seen["gid"], seen["groups"]) == ("1234", "5678", ["7", "8", "9"])
    assert seen["after"] == []
    assert status()["Groups"] == before  # the main thread kept its own


def test_wait_kick(eng: Any) -> None:
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        os.eventfd_write(kick, 3)  # kicks coalesce: one wait reads them all
        assert eng.wait_kick(kick, wake) == 1
        os.eventfd_write(wake, 1)
        assert eng.wait_kick(kick, wake) == 2
        os.eventfd_write(kick, 1)
        os.eventfd_write(wake, 1)
        assert eng.wait_kick(kick, wake) == 3
        for fd in (kick, wake):  # both were read
            with pytest.raises(BlockingIOError):
                os.eventfd_read(fd)
        os.eventfd_write(wake, 1)
        assert eng.wait_kick(-1, wake) == 2  # no kick fd yet
        threading.Timer(0.05, os.eventfd_write, (kick, 1)).start()
        assert eng.wait_kick(kick, wake) == 1  # blocks until the kick comes
        closed = os.eventfd(0)
        os.close(closed)
        with pytest.raises(OSError) as e:
            eng.wait_kick(closed, wake)
        assert e.value.errno == errno.EBADF
    finally:
        os.close(kick)
        os.close(wake)


CAP_SYS_ADMIN = 21
TCGETS = 0x5401
FIONREAD = 0x541B


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a capability needs it permitted")
def test_ioctl_cap(eng: Any) -> None:
    """ioctl's value and errno, with the capability raised for the call only: a thread that had it
    lowered has it lowered after, one that had it raised keeps it (FUSE's backing-file ioctls)."""
    seen: dict[str, Any] = {}
    r, w = os.pipe()

    def worker() -> None:
        sc.set_effective_cap(CAP_SYS_ADMIN, False)
        seen["value"] = eng.ioctl_cap(r, FIONREAD, b"\0" * 4, CAP_SYS_ADMIN)
        seen["lowered_after"] = not sc.has_effective_cap(CAP_SYS_ADMIN)
        with pytest.raises(OSError) as e:
            eng.ioctl_cap(r, TCGETS, b"\0" * 64, CAP_SYS_ADMIN)  # a pipe is no tty
        seen["errno"] = e.value.errno
        seen["lowered_after_error"] = not sc.has_effective_cap(CAP_SYS_ADMIN)
        sc.set_effective_cap(CAP_SYS_ADMIN, True)
        eng.ioctl_cap(r, FIONREAD, b"\0" * 4, CAP_SYS_ADMIN)
        seen["kept"] = sc.has_effective_cap(CAP_SYS_ADMIN)
        eng.ioctl_cap(r, FIONREAD, b"\0" * 4, -1)

    try:
        os.write(w, b"12345")
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    finally:
        os.close(r)
        os.close(w)
    assert seen == {"value": 0, "lowered_after": True, "errno": errno.ENOTTY, "lowered_after_error": True,
                    "kept": True}
    assert sc.has_effective_cap(CAP_SYS_ADMIN)  # the main thread's own set was never touched
