"""Listening Unix sockets at a path the user gave: only a stale socket is ever replaced; and connecting to
a back-end's socket once it listens.

One helper for `proxy --listen`, `daemon --socket-path` and every `--control`: a path that holds anything
but a socket (a regular file, a directory, a symlink) is refused, a socket some process still listens on
is refused, and only a socket nobody listens on (left by a dead process) is removed and bound again.  At
exit, the path is removed only if it is still the socket we bound.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
import threading
import time
import weakref
from collections.abc import Callable

# sock_diag (linux/sock_diag.h, linux/unix_diag.h, linux/netlink.h)
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_UDIAG_SHOW_VFS = 0x2
_UNIX_DIAG_VFS = 1
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie[2]
_UNIX_DIAG_MSG_SIZE = 16  # family, type, state, pad, ino, cookie[2]

_bound: weakref.WeakKeyDictionary[socket.socket, tuple[int, int]] = weakref.WeakKeyDictionary()


class _Refused(OSError):
    """The path is not ours to take (its message is complete)."""


def _bound_inodes() -> set[tuple[int, int]]:
    """(kernel dev, inode) of every Unix socket bound to a path in this network namespace (sock_diag).

    Asking the kernel does not disturb a listener: a probe connection would be taken by a daemon waiting
    for its one front-end as that front-end.
    """
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG) as nl:
        req = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, _UDIAG_SHOW_VFS, 0xFFFFFFFF, 0xFFFFFFFF)
        nl.sendto(_NLMSG.pack(_NLMSG.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
                  + req, (0, 0))
        found: set[tuple[int, int]] = set()
        while True:
            data = nl.recv(1 << 16)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    raise OSError(-struct.unpack_from("=i", data, off + _NLMSG.size)[0], "sock_diag refused")
                end = off + length
                attr = off + _NLMSG.size + _UNIX_DIAG_MSG_SIZE
                while attr + 4 <= end:
                    alen, atype = struct.unpack_from("=HH", data, attr)
                    if alen < 4:
                        break
                    if atype == _UNIX_DIAG_VFS and alen >= 12:
                        ino, dev = struct.unpack_from("=II", data, attr + 4)
                        found.add((dev, ino))
                    attr += (alen + 3) & ~3
                off += max((length + 3) & ~3, _NLMSG.size)
            if not data:
                return found


def _in_use(path: str, st: os.stat_result) -> bool:
    """Does a process hold the socket at `path`?  The kernel's socket table tells; a probe connection
    (closed at once) settles what it cannot (no sock_diag, a listener in another network namespace)."""
    try:
        if (os.major(st.st_dev) << 20 | os.minor(st.st_dev), st.st_ino) in _bound_inodes():
            return True
    except OSError:
        pass
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except TimeoutError:
        return True
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        if e.errno in (errno.EAGAIN, errno.ETIMEDOUT):  # listening, its backlog is full
            return True
        raise
    finally:
        probe.close()
    return True


def _private_name(path: str) -> str:
    """A name beside `path` for binding before the socket listens; `path` itself when that would be too
    long for sun_path (108 bytes)."""
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.{os.getpid()}.{threading.get_ident() & 0xFFFF:x}")
    return tmp if len(os.fsencode(tmp)) < 108 else path


def claim_socket_path(path: str, *, backlog: int = 1, mode: int | None = None, what: str = "") -> socket.socket:
    """A listening socket bound at `path`; OSError with a one-line reason (prefixed by `what`) otherwise."""
    prefix = f"{what} {path}" if what else path
    try:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise _Refused(errno.EEXIST, f"{prefix} exists and is not a socket: not replacing it")
            if _in_use(path, st):
                raise _Refused(errno.EADDRINUSE, f"{prefix} is in use by a running process")
            os.unlink(path)  # stale: left by a process that is gone
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Bound and listening under a private name first, then linked into place: a client that waits for
        # `path` to appear never finds a socket that is not listening yet (ECONNREFUSED).
        tmp = _private_name(path)
        try:
            old = os.umask(0o777 & ~mode) if mode is not None else None
            try:
                s.bind(tmp)
            finally:
                if old is not None:
                    os.umask(old)
            try:
                if mode is not None:
                    os.chmod(tmp, mode)
                st = os.lstat(tmp)
                s.listen(backlog)
                if tmp != path:
                    os.link(tmp, path)  # EEXIST if something took `path` meanwhile: never replaced
            finally:
                if tmp != path:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
        except BaseException:
            s.close()
            raise
    except _Refused:
        raise
    except OSError as e:
        raise OSError(e.errno, f"{prefix}: {e.strerror or e}") from None
    _bound[s] = (st.st_dev, st.st_ino)
    return s


def release_socket_path(path: str, sock: socket.socket) -> None:
    """Close `sock` and remove `path` if it is still the socket `claim_socket_path` bound there."""
    ident = _bound.pop(sock, None)
    sock.close()
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if ident is not None and (st.st_dev, st.st_ino) == ident:
            os.unlink(path)


class ConnectError(OSError):
    """No connection to a back-end's socket: its process went away first (ECONNREFUSED), the time ran out
    (ETIMEDOUT), or the path cannot take one.  Its message is a whole sentence (str() is just that)."""

    def __str__(self) -> str:
        return str(self.strerror)


def connect_when_listening(path: str, timeout: float, *, gone: Callable[[], str | None] = lambda: None,
                           wait: Callable[[float], object] = time.sleep, detail: Callable[[], str] = lambda: "",
                           interval: float = 0.02) -> socket.socket:
    """The connection to a back-end we started (the proxy's, the rerun's), once it listens.

    Its socket file appears at bind(), before listen(), and a stale file from an earlier run refuses: both
    are retried until `timeout`; any other error (EACCES, ENOTDIR) is raised at once, since waiting would
    not change it.  Every failure is a ConnectError.  The connection is kept (not a probe): a vhost-user back-end such as the C virtiofsd
    serves one front-end and exits when it hangs up.  `gone()` says why the back-end process is gone (None:
    running; it may raise to cancel the wait); `wait(interval)` sleeps between attempts (a stop event's
    wait, so a stop is not late); `detail()` is what to add to an error's message (the back-end's stderr)."""
    deadline = time.monotonic() + timeout
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            conn.connect(path)
            return conn
        except (FileNotFoundError, ConnectionRefusedError) as e:
            conn.close()
            last = "no socket file" if isinstance(e, FileNotFoundError) else "connection refused"
        except OSError as e:
            conn.close()
            raise ConnectError(e.errno, f"cannot connect to the back-end socket {path}: {e.strerror or e}"
                                        f"{detail()}") from None
        why = gone()
        if why:
            raise ConnectError(errno.ECONNREFUSED, f"{why} before listening")
        if time.monotonic() > deadline:
            raise ConnectError(errno.ETIMEDOUT, f"the back-end did not listen on {path} within {timeout:g} s "
                                                f"({last}){detail()}")
        wait(interval)
