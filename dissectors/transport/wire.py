"""vhost-user messages on a Unix socket, with their fds (SCM_RIGHTS).  An edge module: it does I/O.

The fds travel with the 12-byte header, so the header is read with recvmsg and
the payload with plain reads (proxy-notes.md, "Headers and fds").

The fds are checked here too, on arrival, for the proxy and the daemon alike: a front-end may send
any fd, and a kick "eventfd" that is really /dev/zero spins a core, an epoll fd as call fd loses every
completion, a pipe or a read-only file as guest memory cannot be mapped.
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import socket
import stat
import struct

from dissectors.spec import vhost_user as vspec

_HDR = struct.Struct("<III")
_FD_SPACE = socket.CMSG_SPACE(vspec.MAX_FDS * array.array("i").itemsize)


class PeerClosed(Exception):
    """The other side closed the socket (cleanly or mid-message)."""


class WireError(Exception):
    """Bytes on the socket that cannot be a vhost-user message (bad size, bad version)."""


class Cancelled(Exception):
    """The cancel fd became readable (the process is stopping) while a message was awaited."""


class FdRefused(ValueError):
    """An fd that came with a message is not the kind of file that message needs."""


def _wait(sock: socket.socket, cancel_fd: int | None) -> None:
    """Block until `sock` is readable; raise Cancelled first if `cancel_fd` is (or becomes) readable."""
    if cancel_fd is None:
        return
    p = select.poll()
    p.register(sock, select.POLLIN)
    p.register(cancel_fd, select.POLLIN)
    while True:
        ready = dict(p.poll())
        if cancel_fd in ready:
            raise Cancelled("stopped while waiting for a message")
        if ready:
            return


def _recv_exact(sock: socket.socket, n: int, cancel_fd: int | None = None) -> bytes:
    chunks = []
    while n:
        _wait(sock, cancel_fd)
        b = sock.recv(n)
        if not b:
            raise PeerClosed("peer closed mid-message")
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def recv_message(sock: socket.socket, cancel_fd: int | None = None) -> tuple[bytes, list[int]]:
    """One whole message (header + payload) and the fds that came with it.

    With `cancel_fd`, every wait also watches that fd, so a stop request ends even a half-sent message.
    """
    fds = array.array("i")
    _wait(sock, cancel_fd)
    try:
        data, anc, flags, _ = sock.recvmsg(_HDR.size, _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
    except ConnectionResetError:
        raise PeerClosed("connection reset") from None
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    if not data:
        for fd in fds:
            os.close(fd)
        raise PeerClosed("peer closed")
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise WireError("too many fds with one message (control data truncated)")
    if len(data) < _HDR.size:
        try:
            data += _recv_exact(sock, _HDR.size - len(data), cancel_fd)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
    _req, hflags, size = _HDR.unpack(data)
    if hflags & vspec.VERSION_MASK != vspec.VERSION or size > vspec.MAX_PAYLOAD:
        for fd in fds:
            os.close(fd)
        raise WireError(f"not a vhost-user header: {data.hex()} (flags {hflags:#x}, size {size})")
    try:
        payload = _recv_exact(sock, size, cancel_fd) if size else b""
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return data + payload, list(fds)


def send_message(sock: socket.socket, raw: bytes, fds: list[int] | None = None) -> None:
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([raw], anc)
    else:
        sent = sock.send(raw)
    if sent < len(raw):
        sock.sendall(raw[sent:])


# ---- the fds that come with messages ------------------------------------------------------------
EVENTFD_LINK = "anon_inode:[eventfd]"


# Opened once, at import: it stays valid in the daemon's sandbox (daemon/sandbox.py), whose threads have a
# root where /proc is absent (or would be the guest's own directory).
_PROC_FD = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def proc_fd() -> int:
    return _PROC_FD


def describe_fd(fd: int) -> str:
    """What an fd refers to, as /proc shows it ("pipe:[123]", "/dev/zero", "anon_inode:[eventpoll]")."""
    try:
        return os.readlink(f"self/fd/{fd}", dir_fd=proc_fd())
    except OSError as e:
        return f"fd {fd} ({e.strerror})"


def check_eventfd(fd: int, what: str) -> None:
    """Refuse anything but an eventfd where the protocol carries one (kick, call, err)."""
    link = describe_fd(fd)
    if link != EVENTFD_LINK:
        raise FdRefused(f"{what}: the fd is {link}, not an eventfd")


def check_region_fd(fd: int, length: int, what: str) -> None:
    """Refuse a guest-memory fd that cannot be mapped shared, read-write, over `length` bytes.

    Checked before mmap so the answer names the problem instead of an errno: a pipe or socket has no
    pages, a read-only fd cannot be mapped writable, and a file shorter than mmap_offset + size would
    fault (SIGBUS) on first touch of the part past its end.
    """
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as e:
        raise FdRefused(f"{what}: fd {fd}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FdRefused(f"{what}: the fd is {describe_fd(fd)}, not a file that can hold guest memory "
                        "(a memfd, a hugetlbfs or shared-memory file)")
    if flags & os.O_ACCMODE != os.O_RDWR:
        raise FdRefused(f"{what}: {describe_fd(fd)} is not open read-write; guest memory is mapped shared, "
                        "read-write")
    if st.st_size < length:
        raise FdRefused(f"{what}: {describe_fd(fd)} holds {st.st_size} bytes, the region needs {length} "
                        "(mmap_offset + size)")


SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def sealed_memfd(name: str, size: int) -> int:
    """A memfd of `size` bytes sealed against resizing (F_SEAL_SHRINK | F_SEAL_GROW, then F_SEAL_SEAL) and
    still writable: memory we hand a back-end as guest memory, which it can then map without trusting us
    (a truncated mapping faults with SIGBUS), as QEMU's memory-backend-memfd does."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SIZE_SEALS)
    except OSError:
        os.close(fd)
        raise
    return fd


def shrink_sealed(fd: int) -> bool:
    """The file cannot be shrunk (F_SEAL_SHRINK, QEMU's memory-backend-memfd default), so a mapping of it
    can never fault with SIGBUS behind our back."""
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:
        return False
