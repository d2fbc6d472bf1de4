"""vhost-user messages on a Unix socket, with their fds (SCM_RIGHTS).  An edge module: it does I/O.

The fds travel with the 12-byte header, so the header is read with recvmsg and
the payload with plain reads (proxy-notes.md, "Headers and fds").
"""

from __future__ import annotations

import array
import os
import socket
import struct

from dissectors.spec import vhost_user as vspec

_HDR = struct.Struct("<III")
_FD_SPACE = socket.CMSG_SPACE(vspec.MAX_FDS * array.array("i").itemsize)


class PeerClosed(Exception):
    """The other side closed the socket (cleanly or mid-message)."""


class WireError(Exception):
    """Bytes on the socket that cannot be a vhost-user message (bad size, bad version)."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        b = sock.recv(n)
        if not b:
            raise PeerClosed("peer closed mid-message")
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def recv_message(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One whole message (header + payload) and the fds that came with it."""
    fds = array.array("i")
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
        data += _recv_exact(sock, _HDR.size - len(data))
    _req, hflags, size = _HDR.unpack(data)
    if hflags & vspec.VERSION_MASK != vspec.VERSION or size > vspec.MAX_PAYLOAD:
        for fd in fds:
            os.close(fd)
        raise WireError(f"not a vhost-user header: {data.hex()} (flags {hflags:#x}, size {size})")
    payload = _recv_exact(sock, size) if size else b""
    return data + payload, list(fds)


def send_message(sock: socket.socket, raw: bytes, fds: list[int] | None = None) -> None:
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([raw], anc)
    else:
        sent = sock.send(raw)
    if sent < len(raw):
        sock.sendall(raw[sent:])
