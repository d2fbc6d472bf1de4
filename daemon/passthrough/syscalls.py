"""Linux syscalls Python's os module lacks, through ctypes: statx (for mnt_id), file handles, syncfs,
renameat2, fchownat(AT_EMPTY_PATH), utimensat with UTIME_NOW/OMIT, fallocate modes, and the per-thread
credential calls (setfsuid/setfsgid, setgroups, capset, unshare(CLONE_FS)) that glibc would otherwise
apply to every thread, or that Python lacks.

These are host-kernel ABI (struct statx, struct file_handle), not FUSE protocol, so their layouts live
here rather than in dissectors/spec.

The ones on the request path (NATIVE) come from the C extension daemon/passthrough/_sys when it is built:
the same calls without ctypes' per-call cost, and with the GIL released while the kernel works.  The
ctypes versions here are their pure-Python twin and reference (FSINSPECT_SYSCALLS=python forces them;
`ENGINE` says which runs, `TWIN` keeps the ctypes ones for the tests that run both).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import select
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
O_PATH = os.O_PATH
O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)
STATX_BASIC_STATS = 0x7FF
STATX_MNT_ID = 0x1000
MAX_HANDLE_SZ = 128
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]  # the kernel only reads it
_libc.readlinkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
_libc.readlinkat.restype = ctypes.c_ssize_t
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.futimens.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.setfsgid.argtypes = [ctypes.c_uint]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.capget.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.fcntl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_libc.flock.argtypes = [ctypes.c_int, ctypes.c_int]

CLONE_FS = 0x200
CAP_FSETID = 4
_CAP_VERSION_3 = 0x20080522
# glibc's setgroups() changes every thread (a setxid broadcast); the raw syscall changes only this one.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}.get(os.uname().machine)
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159, "riscv64": 159, "ppc64le": 81, "s390x": 206}.get(os.uname().machine)

# struct statx (include/uapi/linux/stat.h), the fields we use, by offset.
_STATX = struct.Struct("<IIQIIIH2xQQQQ" + "qI4x" * 4 + "IIIIQ")
_STATX_BUF = 256


def _raise(what: str, path: bytes | str | None = None) -> None:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}", path)


@dataclass(slots=True)
class Statx:
    """The subset of struct statx the daemon needs, named like os.stat_result so it serves as one,
    plus mnt_id (which os.stat lacks) for identity and submount detection."""

    st_mode: int
    st_ino: int
    st_dev: int
    mnt_id: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_size: int
    st_blocks: int
    st_blksize: int
    st_rdev: int
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int


def statx(dirfd: int, path: bytes = b"", flags: int = AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) -> Statx:
    buf = ctypes.create_string_buffer(_STATX_BUF)
    if _libc.statx(dirfd, path, flags, STATX_BASIC_STATS | STATX_MNT_ID, buf) != 0:
        _raise("statx", path)
    (mask, blksize, _attrs, nlink, uid, gid, mode, ino, size, blocks, _amask,
     a_s, a_ns, _b_s, _b_ns, c_s, c_ns, m_s, m_ns, rmaj, rmin, dmaj, dmin, mnt_id) = _STATX.unpack_from(buf.raw)
    if not mask & STATX_MNT_ID:
        mnt_id = 0  # kernels before 5.8: identity falls back to (st_dev, st_ino)
    return Statx(mode, ino, os.makedev(dmaj, dmin), mnt_id, nlink, uid, gid, size, blocks, blksize,
                 os.makedev(rmaj, rmin), a_s * 1_000_000_000 + a_ns, m_s * 1_000_000_000 + m_ns,
                 c_s * 1_000_000_000 + c_ns)


def readlink_empty(fd: int) -> bytes:
    """readlinkat(fd, "") on an O_PATH fd of a symlink: the link's own content."""
    buf = ctypes.create_string_buffer(4097)
    n = _libc.readlinkat(fd, b"", buf, 4097)
    if n < 0:
        _raise("readlinkat")
    return buf.raw[:n]


def name_to_handle_at(dirfd: int, path: bytes = b"", flags: int = AT_EMPTY_PATH) -> tuple[bytes, int]:
    """(struct file_handle as bytes, mount_id).  Raises OSError (EOPNOTSUPP where handles are impossible)."""
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    struct.pack_into("<I", buf, 0, MAX_HANDLE_SZ)
    mount_id = ctypes.c_int(0)
    if _libc.name_to_handle_at(dirfd, path, buf, ctypes.byref(mount_id), flags) != 0:
        _raise("name_to_handle_at", path)
    (nbytes,) = struct.unpack_from("<I", buf, 0)
    return buf.raw[: 8 + nbytes], mount_id.value


def open_by_handle_at(mount_fd: int, handle: bytes, flags: int) -> int:
    """Needs CAP_DAC_READ_SEARCH (in the effective set: a non-zero fsuid drops it)."""
    if len(handle) < 8 or int.from_bytes(handle[:4], "little") > len(handle) - 8:
        raise ValueError("open_by_handle_at: a truncated struct file_handle")
    fd = _libc.open_by_handle_at(mount_fd, handle, flags | os.O_CLOEXEC)
    if fd < 0:
        _raise("open_by_handle_at")
    return int(fd)


def fs_type(path: str) -> int:
    """statfs(2)'s f_type (the filesystem's magic number), which os.statvfs does not give."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type (a long) is its first field
    if _libc.statfs(os.fsencode(path), buf) != 0:
        _raise("statfs", path)
    return ctypes.c_long.from_buffer(buf).value


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        _raise("syncfs")


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int) -> None:
    if _libc.renameat2(olddirfd, oldname, newdirfd, newname, flags) != 0:
        _raise("renameat2", oldname)


def fchown_empty(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", ..., AT_EMPTY_PATH): works on O_PATH fds, and -1 (0xffffffff) leaves an id unchanged."""
    if _libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0:
        _raise("fchownat")


def utimens(dirfd: int, path: bytes | None, atime: tuple[int, int], mtime: tuple[int, int], flags: int = 0) -> None:
    """utimensat with (sec, nsec) pairs; nsec may be UTIME_NOW or UTIME_OMIT.  path None = futimens(dirfd)."""
    ts = (ctypes.c_long * 4)(atime[0], atime[1], mtime[0], mtime[1])
    # glibc's utimensat() refuses a NULL path (EINVAL); futimens() is the fd form.
    rc = _libc.futimens(dirfd, ts) if path is None else _libc.utimensat(dirfd, path, ts, flags)
    if rc != 0:
        _raise("utimensat", path)


def link_empty(fd: int, newdirfd: int, newname: bytes) -> None:
    """linkat(fd, "", newdir, name, AT_EMPTY_PATH): links what an fd (even O_PATH or O_TMPFILE) names.
    Needs CAP_DAC_READ_SEARCH; /proc/self/fd + AT_SYMLINK_FOLLOW is the unprivileged fallback."""
    if _libc.linkat(fd, b"", newdirfd, newname, AT_EMPTY_PATH) != 0:
        _raise("linkat", newname)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        _raise("fallocate")


def setfsuid(uid: int) -> int:
    """Per-thread (a raw syscall; glibc does not broadcast it).  Returns the previous fsuid."""
    return int(_libc.setfsuid(uid))


def setfsgid(gid: int) -> int:
    return int(_libc.setfsgid(gid))


def unshare_fs() -> None:
    """Give this thread its own cwd, root and umask (CLONE_FS), so its umask(0) leaves the process alone."""
    if _libc.unshare(CLONE_FS) != 0:
        _raise("unshare(CLONE_FS)")


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        _raise("unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    if _libc.mount(None if source is None else os.fsencode(source), os.fsencode(target),
                   None if fstype is None else fstype.encode(), flags, None) != 0:
        _raise("mount", target)


def umount2(target: str, flags: int) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        _raise("umount2", target)


def pivot_root(new_root: str, put_old: str) -> None:
    if _SYS_PIVOT_ROOT is None:
        raise OSError(errno.ENOSYS, f"no pivot_root syscall number for {os.uname().machine}")
    if _libc.syscall(_SYS_PIVOT_ROOT, os.fsencode(new_root), os.fsencode(put_old)) != 0:
        _raise("pivot_root", new_root)


def prctl(option: int, arg2: int = 0) -> None:
    if _libc.prctl(option, arg2, 0, 0, 0) != 0:
        _raise("prctl")


def limit_caps(keep: int) -> None:
    """Keep only the capabilities in the `keep` mask in this thread's effective and permitted sets (and
    none inheritable): what is dropped from permitted cannot come back."""
    hdr, data = _caps()
    for i in range(2):
        part = (keep >> (32 * i)) & 0xFFFFFFFF
        data[i].effective &= part
        data[i].permitted &= part
        data[i].inheritable = 0
    if _libc.capset(hdr, data) != 0:
        _raise("capset")


def setgroups_thread(groups: list[int] | tuple[int, ...]) -> None:
    """This thread's supplementary groups only (needs CAP_SETGID)."""
    if _SYS_SETGROUPS is None:
        raise OSError(errno.ENOSYS, f"no setgroups syscall number for {os.uname().machine}")
    arr = (ctypes.c_uint * max(1, len(groups)))(*groups)
    if _libc.syscall(_SYS_SETGROUPS, ctypes.c_size_t(len(groups)), arr) != 0:
        _raise("setgroups")


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _caps() -> tuple[ctypes.Array[ctypes.c_uint32], ctypes.Array[_CapData]]:
    hdr = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)  # pid 0: this thread
    data = (_CapData * 2)()
    if _libc.capget(hdr, data) != 0:
        _raise("capget")
    return hdr, data


def has_effective_cap(cap: int) -> bool:
    _hdr, data = _caps()
    return bool(data[cap // 32].effective & (1 << (cap % 32)))


def set_effective_cap(cap: int, on: bool) -> None:
    """Raise or lower one capability in this thread's effective set (it stays permitted)."""
    hdr, data = _caps()
    bit = 1 << (cap % 32)
    if on:
        data[cap // 32].effective |= bit
    else:
        data[cap // 32].effective &= ~bit
    if _libc.capset(hdr, data) != 0:
        _raise("capset")


def ioctl_cap(fd: int, request: int, arg: bytes, cap: int) -> int:
    """ioctl(2)'s return value for `request` on a copy of `arg`, with capability `cap` raised in this
    thread's effective set for that call only (cap < 0: as it is), then as it was."""
    with raised_cap(cap):
        return fcntl.ioctl(fd, request, bytearray(arg), True)


@contextmanager
def raised_cap(cap: int) -> Iterator[None]:
    """Capability `cap` in this thread's effective set for the block (cap < 0: as it is), then as it was:
    one capset pair around several calls that need it."""
    raise_it = cap >= 0 and not has_effective_cap(cap)
    if raise_it:
        set_effective_cap(cap, True)
    try:
        yield
    finally:
        if raise_it:
            set_effective_cap(cap, False)


def fcntl_lock_wait(fd: int, cmd: int, flock: bytes) -> None:
    """A blocking F_OFD_SETLKW that returns EINTR to the caller (os/fcntl retry it under PEP 475)."""
    buf = ctypes.create_string_buffer(flock, len(flock))
    if _libc.fcntl(fd, cmd, buf) != 0:
        _raise("fcntl")


def flock_wait(fd: int, op: int) -> None:
    """A blocking flock() that returns EINTR to the caller."""
    if _libc.flock(fd, op) != 0:
        _raise("flock")


def wait_kick(kick_fd: int, wake_fd: int) -> int:
    """A vhost-user queue thread's wait: block until either eventfd is readable, read the ready ones (kicks
    coalesce: their count does not matter) and return 1 for a kick, 2 for a wake-up, or both."""
    p = select.poll()
    p.register(wake_fd, select.POLLIN)
    if kick_fd >= 0:
        p.register(kick_fd, select.POLLIN)
    mask = 0
    for fd, ev in p.poll():
        if ev & select.POLLNVAL:
            raise OSError(errno.EBADF, f"poll: {os.strerror(errno.EBADF)}")
        mask |= 2 if fd == wake_fd else 1
        if ev & select.POLLIN:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
    return mask


# ---------------------------------------------------------------------------------- the C twin
NATIVE = ("statx", "name_to_handle_at", "open_by_handle_at", "renameat2", "syncfs", "fchown_empty",
          "readlink_empty", "fallocate", "setfsuid", "setfsgid", "setgroups_thread", "wait_kick", "ioctl_cap")
TWIN: dict[str, Callable[..., Any]] = {name: globals()[name] for name in NATIVE}
ENGINE = "python"


def _use_native() -> None:
    global ENGINE
    if os.environ.get("FSINSPECT_SYSCALLS", "c") == "python":
        return
    try:
        from . import _sys  # type: ignore[attr-defined]
    except ImportError as e:
        logging.getLogger("fsinspect.daemon").warning(
            "the daemon's C syscalls are not built (%s): the slower ctypes twin runs (run scripts/setup)", e)
        return
    g = globals()
    for name in NATIVE:
        g[name] = getattr(_sys, name)
    ENGINE = "c"


_use_native()
