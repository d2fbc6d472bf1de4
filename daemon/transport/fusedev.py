"""Raw /dev/fuse transport: mount a FUSE connection on the host and move whole messages.

This is an edge module (it does I/O).  As root it mounts with mount(2) through
ctypes; otherwise it asks fusermount3 for the fd over a socketpair
(_FUSE_COMMFD), as libfuse does.  Each read(2) on the device returns exactly one
request; each write(2) must carry exactly one reply, on the fd the request was read from (a clone has
its own list of requests being processed).
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import errno
import fcntl
import os
import socket
import stat
import struct
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from daemon.passthrough import syscalls as sc
from dissectors.fuse import CODECS
from dissectors.spec import fuse as spec

DEV_FUSE = "/dev/fuse"
FUSECTL = "/sys/fs/fuse/connections"  # fusectl: one directory per connection, named by its device number
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
# A read buffer must hold the largest request: max_write (1 MiB) plus headers (FUSE_MIN_READ_BUFFER is 8 KiB).
DEFAULT_BUFSIZE = 1024 * 1024 + 4096
_IOC = spec.DEV_IOC.by_name()
FUSE_DEV_IOC_CLONE = _IOC["FUSE_DEV_IOC_CLONE"]  # the argument is the fd of the session to join
FUSE_DEV_IOC_BACKING_OPEN = _IOC["FUSE_DEV_IOC_BACKING_OPEN"]
FUSE_DEV_IOC_BACKING_CLOSE = _IOC["FUSE_DEV_IOC_BACKING_CLOSE"]
_backing_map_pack = CODECS["fuse_backing_map"].struct.pack
_u32 = struct.Struct("I").pack
_CLOSED = (errno.ENODEV, errno.EBADF, errno.ECONNABORTED)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class FuseDevError(OSError):
    """A mount/unmount problem, phrased for the user."""


class DeviceClosed(Exception):
    """The connection is gone: unmounted (ENODEV) or aborted."""


def _err(op: str, path: str) -> FuseDevError:
    e = ctypes.get_errno()
    return FuseDevError(e, f"{op} {path}: {os.strerror(e)}")


def in_mountinfo(path: str | os.PathLike[str]) -> bool:
    """Whether something is mounted exactly at `path`, from the kernel's table: unlike a stat, this
    also answers for a dead FUSE mount (ENOTCONN)."""
    target = os.path.realpath(path).encode()
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


def connection_id(path: str | os.PathLike[str], *, resolved: bool = False) -> int | None:
    """The FUSE connection mounted at `path` (the newest, if several are stacked), as fusectl names it:
    the superblock's kernel dev_t, read from the kernel's table (a stat would ask the daemon).  The
    daemon itself passes a path it `resolved` before mounting: realpath's lstat of the mount's root would
    wait for a FUSE_INIT that only the daemon can answer."""
    target = os.fsencode(path if resolved else os.path.realpath(path))
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                major, minor = fields[2].split(b":")
                found = (int(major) << 20) | int(minor)  # the kernel's MKDEV
    return found


def _fusectl_mounted() -> bool:
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if fields[4] == FUSECTL.encode() and fields[fields.index(b"-") + 1] == b"fusectl":
                return True
    return False


def abort_connection(conn: int) -> None:
    """Abort a FUSE connection through fusectl, as `echo 1 > /sys/fs/fuse/connections/N/abort`: every
    request pending on it fails (ENOTCONN), its readers get ECONNABORTED and the connection ends though
    a lazily unmounted mount is still busy.  As root fusectl is mounted for it when it is not (and
    unmounted again); the owner of the mount may abort it when fusectl is there."""
    mounted_here = False
    if not _fusectl_mounted():
        if os.geteuid() != 0:
            raise FuseDevError(errno.EPERM, f"fusectl is not mounted at {FUSECTL} and only root may mount it")
        if _libc.mount(b"fusectl", FUSECTL.encode(), b"fusectl", 0, None) != 0:
            raise _err("mount fusectl on", FUSECTL)
        mounted_here = True
    try:
        try:
            with open(f"{FUSECTL}/{conn}/abort", "w") as f:
                f.write("1")
        except FileNotFoundError:
            return  # the connection ended meanwhile
        except OSError as e:
            raise FuseDevError(e.errno or errno.EIO, f"abort {FUSECTL}/{conn}: {e.strerror}") from None
    finally:
        if mounted_here:
            _libc.umount2(FUSECTL.encode(), 0)


def is_mountpoint(path: str) -> bool:
    try:
        st = os.stat(path)
        parent = os.stat(os.path.join(path, ".."))
    except OSError:
        return False
    return st.st_dev != parent.st_dev or st.st_ino == parent.st_ino


def check_mountpoint(path: str) -> None:
    """Clear errors before trying: missing, not a directory, already mounted (busy)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FuseDevError(errno.ENOENT, f"mountpoint {path} does not exist") from None
    except OSError as e:
        # ENOTCONN: a dead FUSE mount is still there.
        raise FuseDevError(e.errno or errno.EIO,
                           f"mountpoint {path}: {e.strerror} (a dead FUSE mount? try: fusermount3 -u {path} "
                           f"or umount -l {path})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise FuseDevError(errno.ENOTDIR, f"mountpoint {path} is not a directory")
    if is_mountpoint(path):
        raise FuseDevError(errno.EBUSY, f"mountpoint {path} is busy: something is already mounted there")


def open_device() -> int:
    try:
        return os.open(DEV_FUSE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FuseDevError(errno.ENOENT, f"{DEV_FUSE} is missing: load the fuse module (modprobe fuse)") from None
    except PermissionError:
        raise FuseDevError(errno.EACCES, f"{DEV_FUSE}: permission denied") from None


@dataclass
class MountOptions:
    fsname: str = "fsinspect"
    subtype: str = "fsinspect"
    allow_other: bool = True
    default_permissions: bool = False
    max_read: int | None = None
    extra: list[str] = field(default_factory=list)


class FuseDev:
    """One mounted FUSE connection."""

    def __init__(self, fd: int, mountpoint: str, *, via_fusermount: bool, bufsize: int = DEFAULT_BUFSIZE,
                 conn: int | None = None) -> None:
        self.fd = fd
        self.mountpoint = mountpoint
        self.via_fusermount = via_fusermount
        self.bufsize = bufsize
        self.mounted = True
        # fusectl's name for the connection, taken while the mount is in the table (a lazy unmount hides it)
        self.conn = conn

    @classmethod
    def mount(cls, mountpoint: str, opts: MountOptions | None = None) -> FuseDev:
        opts = opts or MountOptions()
        mountpoint = os.path.abspath(mountpoint)
        check_mountpoint(mountpoint)
        real = os.path.realpath(mountpoint)  # before the mount: see connection_id
        if os.geteuid() == 0:
            fd = open_device()
            st = os.stat(mountpoint)
            data = [f"fd={fd}", f"rootmode={stat.S_IFMT(st.st_mode):o}", f"user_id={os.getuid()}",
                    f"group_id={os.getgid()}"]
            if opts.allow_other:
                data.append("allow_other")
            if opts.default_permissions:
                data.append("default_permissions")
            if opts.max_read:
                data.append(f"max_read={opts.max_read}")
            data += opts.extra
            rc = _libc.mount(opts.fsname.encode(), mountpoint.encode(), f"fuse.{opts.subtype}".encode(),
                             MS_NOSUID | MS_NODEV, ",".join(data).encode())
            if rc != 0:
                err = _err("mount", mountpoint)
                os.close(fd)
                raise err
            return cls(fd, mountpoint, via_fusermount=False, conn=connection_id(real, resolved=True))
        fd = _fusermount(mountpoint, opts)
        return cls(fd, mountpoint, via_fusermount=True, conn=connection_id(real, resolved=True))

    def read(self) -> bytes:
        """One whole request.  Raises DeviceClosed when the filesystem is unmounted."""
        while True:
            try:
                return os.read(self.fd, self.bufsize)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:  # the request was interrupted before we read it
                    continue
                if e.errno in _CLOSED:
                    raise DeviceClosed(str(e)) from None
                raise

    def requests(self) -> Iterator[bytes]:
        """Every request until the filesystem is unmounted, read into one buffer kept for the whole loop:
        os.read(fd, 1 MiB) costs a 1 MiB allocation per request (~16 us), readv into a kept buffer ~1.5 us
        plus one copy of the request's own length (the engine may keep the request past the next read)."""
        buf = bytearray(self.bufsize)
        view = memoryview(buf)
        iov = [buf]
        readv = os.readv
        fd = self.fd
        while True:
            try:
                n = readv(fd, iov)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:  # the request was interrupted before we read it
                    continue
                if e.errno in _CLOSED:
                    return
                raise
            yield view[:n].tobytes()

    def write(self, data: bytes | Sequence[bytes]) -> None:
        """Send one reply (bytes or a list of iovecs) in one system call.  A reply to an interrupted
        request is dropped, and so is one that comes after the connection ended (unmounted or aborted: the
        kernel has failed that request itself; a lock wait ended at the session's end answers then)."""
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                os.write(self.fd, data)
            else:
                os.writev(self.fd, data)
        except OSError as e:
            if e.errno == errno.ENOENT or e.errno in _CLOSED:
                return
            raise

    def clone(self) -> FuseDev:
        """Another fd on this connection (FUSE_DEV_IOC_CLONE, as libfuse's clone_fd): a reader thread
        with its own fd answers on it, and the kernel keeps a processing list per fd instead of one shared
        list.  The original keeps the mount; a clone only closes its fd."""
        fd = open_device()
        try:
            fcntl.ioctl(fd, FUSE_DEV_IOC_CLONE, struct.pack("I", self.fd))
        except OSError as e:
            os.close(fd)
            raise FuseDevError(e.errno or errno.EIO, f"FUSE_DEV_IOC_CLONE on {DEV_FUSE}: {e.strerror}") from None
        dev = FuseDev(fd, self.mountpoint, via_fusermount=self.via_fusermount, bufsize=self.bufsize, conn=self.conn)
        dev.mounted = False
        return dev

    def backing_open(self, fd: int, cap: int = -1) -> int:
        """Register `fd`'s file as a passthrough backing file (FUSE_DEV_IOC_BACKING_OPEN, FUSE 7.40): the id
        goes in fuse_open_out.backing_id with FOPEN_PASSTHROUGH.  The kernel keeps its own reference (the
        fd may be closed) and asks for CAP_SYS_ADMIN; it raises OSError as the kernel refuses (EPERM: no
        CAP_SYS_ADMIN or passthrough not negotiated, ELOOP: the file's filesystem is stacked as deep as
        max_stack_depth allows, EINVAL: not a regular file, ENOTTY: a kernel without passthrough).
        `cap` >= 0 is raised in the effective set for the call (CAP_SYS_ADMIN kept permitted only)."""
        return sc.ioctl_cap(self.fd, FUSE_DEV_IOC_BACKING_OPEN, _backing_map_pack(fd, 0, 0), cap)

    def backing_close(self, backing_id: int, cap: int = -1) -> None:
        """Let go of a backing id (FUSE_DEV_IOC_BACKING_CLOSE); files already open on it keep working."""
        sc.ioctl_cap(self.fd, FUSE_DEV_IOC_BACKING_CLOSE, _u32(backing_id), cap)

    def unmount(self, *, lazy: bool = False) -> None:
        if self.mounted:
            self.mounted = False
            unmount(self.mountpoint, lazy=lazy, via_fusermount=self.via_fusermount)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FuseDev:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.unmount()
        except FuseDevError:
            self.unmount(lazy=True)


def unmount(mountpoint: str, *, lazy: bool = False, via_fusermount: bool | None = None) -> None:
    """Unmount; lazy (MNT_DETACH / fusermount3 -uz) as the last resort for busy mounts."""
    if via_fusermount is None:
        via_fusermount = os.geteuid() != 0
    if via_fusermount:
        cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise FuseDevError(errno.EBUSY, f"{' '.join(cmd)}: {r.stderr.strip()}")
        return
    if _libc.umount2(mountpoint.encode(), MNT_DETACH if lazy else 0) != 0:
        e = ctypes.get_errno()
        if e == errno.EINVAL:  # not mounted any more
            return
        raise _err("umount", mountpoint)


def _fusermount(mountpoint: str, opts: MountOptions) -> int:
    """Mount without root: fusermount3 opens /dev/fuse, mounts, and passes the fd back."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        o = [f"fsname={opts.fsname}", f"subtype={opts.subtype}"]
        if opts.allow_other:
            o.append("allow_other")
        if opts.default_permissions:
            o.append("default_permissions")
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.run(["fusermount3", "-o", ",".join(o + opts.extra), "--", mountpoint],
                              env=env, pass_fds=(theirs.fileno(),), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise FuseDevError(errno.EPERM, f"fusermount3 {mountpoint}: {proc.stderr.strip()}")
        fds = array.array("i")
        _msg, anc, _flags, _addr = ours.recvmsg(1, socket.CMSG_LEN(fds.itemsize))
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        if not fds:
            raise FuseDevError(errno.EIO, "fusermount3 did not pass a /dev/fuse fd back")
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        ours.close()
        theirs.close()
