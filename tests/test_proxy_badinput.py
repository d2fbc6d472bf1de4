"""Garbage on either socket ends the proxy cleanly (or isolates the back-end), with a one-screen summary.

The peers here are raw sockets that send bytes no QEMU or back-end would: that is the point.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from dissectors import vhost_user as V
from dissectors.transport.wire import recv_message, send_message
from fsinspect.guest.launcher import short_tmpdir, stop_process


def _start(work: Path, backend: Path) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(work / "p.sock"), "--backend",
                          str(backend), "--summary-json", str(work / "s.json")], stdin=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)  # stop_process signals the group
    deadline = time.monotonic() + 10
    while not (work / "p.sock").exists():
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    return p


def _connect(path: Path) -> socket.socket:
    """The socket file appears at bind(), a moment before listen(): a refused connect is retried (it
    takes nothing from the proxy's one accept)."""
    deadline = time.monotonic() + 10
    while True:
        c = socket.socket(socket.AF_UNIX)
        try:
            c.connect(str(path))
            return c
        except ConnectionRefusedError:
            c.close()
            assert time.monotonic() < deadline
            time.sleep(0.02)


def _fake_backend(path: Path, script: list[bytes]) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        for chunk in script:
            try:
                recv_message(conn)
            except Exception:
                break
            conn.sendall(chunk)
        time.sleep(1)
        conn.close()
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_garbage_from_frontend_ends_cleanly() -> None:
    with short_tmpdir() as work:
        _fake_backend(work / "b.sock", [])
        p = _start(work, work / "b.sock")
        try:
            c = _connect(work / "p.sock")
            c.sendall(b"GET / HTTP/1.1\r\nHost: nope\r\n\r\n")
            rc = p.wait(15)
            err = p.stderr.read().decode()  # type: ignore[union-attr]
        finally:
            stop_process(p)
        s = json.loads((work / "s.json").read_text())
    assert rc == 0
    assert "garbage from QEMU" in s["end_reason"] and "garbage from QEMU" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 15


def test_garbage_from_backend_isolates_it() -> None:
    """The back-end answers GET_FEATURES with junk: it is treated as lost, QEMU still gets answers."""
    with short_tmpdir() as work:
        _fake_backend(work / "b.sock", [b"\xff" * 40])
        p = _start(work, work / "b.sock")
        try:
            c = _connect(work / "p.sock")
            send_message(c, V.encode_message(V.build("GET_FEATURES")))
            raw, _ = recv_message(c)
            reply = V.decode_message(raw)
            send_message(c, V.encode_message(V.build("GET_QUEUE_NUM")))
            raw2, _ = recv_message(c)
            c.close()
            rc = p.wait(15)
            err = p.stderr.read().decode()  # type: ignore[union-attr]
        finally:
            stop_process(p)
        s = json.loads((work / "s.json").read_text())
    assert reply.name == "GET_FEATURES" and reply.is_reply
    assert V.decode_message(raw2).name == "GET_QUEUE_NUM"
    assert rc == 0 and s["backend_lost"] and "BACKEND LOST" in err and "Traceback" not in err


def test_unknown_request_forwarded_untouched_with_its_reply() -> None:
    """A request newer than our tables goes through byte for byte, and so does the back-end's answer."""
    unknown = V.HEADER.struct.pack(200, 1, 8) + b"\x01\x02\x03\x04\x05\x06\x07\x08"
    answer = V.HEADER.struct.pack(200, 5, 4) + b"okay"
    with short_tmpdir() as work:
        _fake_backend(work / "b.sock", [answer])
        p = _start(work, work / "b.sock")
        try:
            c = _connect(work / "p.sock")
            send_message(c, unknown)
            raw, _ = recv_message(c)
            c.close()
            p.wait(15)
        finally:
            stop_process(p)
        s = json.loads((work / "s.json").read_text())
    assert raw == answer
    assert s["vhost_decode_errors"] == 1


def test_bad_arguments_are_refused_before_anything_starts(tmp_path: Path) -> None:
    for args, says in ((["--poll-us", "-1"], "--poll-us must be between 0 and 100000"),
                       (["--poll-us", "100001"], "--poll-us must be between 0 and 100000"),
                       (["--snaplen", "-5"], "--snaplen must be 0 (everything) or positive"),
                       (["--stuck-ms", "-1"], "--stuck-ms -1: must be between 0 (off) and 86400000"),
                       (["--stuck-ms", "1s"], "--stuck-ms '1s': give a whole number of milliseconds"),
                       (["--stuck-ms", "86400001"], "--stuck-ms 86400001: must be between")):
        p = subprocess.run([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(tmp_path / "p.sock"),
                            "--backend", str(tmp_path / "b.sock"), *args], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 2 and says in p.stderr, (args, p.returncode, p.stderr)
        assert not (tmp_path / "p.sock").exists()
