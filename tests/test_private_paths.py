"""Files with the guest's data are private, and paths the user gave are never taken over (issue 17 items 5, 8).

- recordings, `--summary-json` and the TUI's `w` are created 0600 whatever the umask; `--record-mode` asks
  for another mode;
- `--control FILE` and `--socket-path S` / `--listen S` replace only a stale socket: a regular file, or a
  socket some process still listens on, is refused with one line, and the listener is not disturbed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dissectors.transport.unixsock import claim_socket_path, release_socket_path
from fsinspect.guest.launcher import short_tmpdir, stop_process
from fsinspect.privfile import parse_mode
from fsinspect.recording.index import RecordingIndex
from fsinspect.recording.writer import RecordingWriter
from tests.test_proxy_badinput import _fake_backend


def _mode(p: Path | str) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def umask0() -> Iterator[None]:
    """The daemon's PassthroughFS runs with umask 0: the modes must not depend on it."""
    old = os.umask(0)
    yield
    os.umask(old)


def _request(unique: int) -> bytes:
    from dissectors import fuse as F

    return F.encode_request("GETATTR", {"getattr": F.make("fuse_getattr_in")}, unique=unique, nodeid=1)


def test_recordings_are_0600_whatever_the_umask(tmp_path: Path, umask0: None) -> None:
    base = tmp_path / "r.pcapng"
    base.write_bytes(b"old")
    base.chmod(0o644)  # an existing file is truncated: it takes the mode too
    w = RecordingWriter(base, rotate_mb=0.001)
    for i in range(40):  # enough for a few rotated parts
        w.request(_request(i + 1), 0, i, 1_000 + i)
    w.close()
    assert len(w.paths) > 1
    assert {p.name: _mode(p) for p in w.paths} == {p.name: 0o600 for p in w.paths}
    # The index of a recording is readable by whoever may read the recording, no more.
    RecordingIndex(base).close()
    idx = [p for p in tmp_path.iterdir() if p not in w.paths]
    assert idx and all(_mode(p) == 0o600 for p in idx), idx
    w = RecordingWriter(tmp_path / "shared.pcapng", mode=0o640)
    w.close()
    assert _mode(tmp_path / "shared.pcapng") == 0o640


def test_record_mode_is_octal_and_checked() -> None:
    assert parse_mode("600") == parse_mode("0600") == parse_mode("0o600") == 0o600
    assert parse_mode("0644") == 0o644
    for bad in ("rw-------", "0800", "7777", "-1", ""):
        with pytest.raises(Exception, match="mode"):
            parse_mode(bad)
    r = subprocess.run([sys.executable, "-m", "fsinspect", "daemon", "--socket-path", "/nonexistent/x",
                        "--shared-dir", "/tmp", "--record-mode", "u+rw"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--record-mode" in r.stderr and "octal" in r.stderr
    assert "Traceback" not in r.stderr


def _daemon(work: Path, *extra: str) -> subprocess.Popen[bytes]:
    (work / "share").mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "fsinspect", "daemon", "--socket-path", str(work / "d.sock"),
                             "-o", f"source={work / 'share'}", *extra], stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _err(p: subprocess.Popen[bytes]) -> str:
    return p.communicate(timeout=30)[1].decode()


def _wait_for(p: subprocess.Popen[bytes], path: Path) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert p.poll() is None, _err(p)
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _wait_catching_sigterm(p: subprocess.Popen[bytes]) -> None:
    """Until `p` catches SIGTERM (SigCgt in /proc/PID/status).  The daemon sets its handler just after its
    sockets; a fixed 0.5 s wait for it could run short under load, and SIGTERM's default action killed it."""
    deadline = time.monotonic() + 20
    while True:
        with open(f"/proc/{p.pid}/status") as f:
            caught = int(next(x for x in f if x.startswith("SigCgt:")).split()[1], 16)
        if caught >> (signal.SIGTERM - 1) & 1:
            return
        assert p.poll() is None, _err(p)
        assert time.monotonic() < deadline, "the daemon did not catch SIGTERM within 20 s"
        time.sleep(0.02)


@pytest.mark.root
@pytest.mark.parametrize("record_mode", [None, "0640"])
def test_daemon_recording_and_summary_modes(record_mode: str | None) -> None:
    with short_tmpdir() as work:
        extra = ["--record", str(work / "r.pcapng"), "--summary-json", str(work / "s.json"),
                 "--control", str(work / "c.sock")]
        p = _daemon(work, *extra, *(["--record-mode", record_mode] if record_mode else []))
        try:
            _wait_for(p, work / "c.sock")
            _wait_catching_sigterm(p)
            p.send_signal(signal.SIGTERM)
            assert p.wait(20) == 0, _err(p)
        finally:
            stop_process(p)
        want = int(record_mode, 8) if record_mode else 0o600
        assert _mode(work / "r.pcapng") == want  # before: 0644
        assert _mode(work / "s.json") == want  # before: 0666 (the daemon's umask 0)
        assert json.loads((work / "s.json").read_text())["ops"] == {}


@pytest.mark.parametrize("record_mode", [None, "0644"])
def test_proxy_recording_and_summary_modes(record_mode: str | None) -> None:
    with short_tmpdir() as work:
        _fake_backend(work / "b.sock", [])
        p = subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(work / "p.sock"),
                              "--backend", str(work / "b.sock"), "--record", str(work / "r.pcapng"),
                              "--summary-json", str(work / "s.json"),
                              *(["--record-mode", record_mode] if record_mode else [])],
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_for(p, work / "p.sock")
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(work / "p.sock"))
            c.sendall(b"not vhost-user at all, the proxy ends")
            assert p.wait(20) == 0, _err(p)
            c.close()
        finally:
            stop_process(p)
        want = int(record_mode, 8) if record_mode else 0o600
        assert _mode(work / "r.pcapng") == want and _mode(work / "s.json") == want  # before: 0644


SAMPLE = Path(__file__).resolve().parent.parent / "recordings" / "samples" / "guest-syncfs.pcapng"


def _descendants(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for t in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for c in map(int, (t / "children").read_text().split()):
                    out += [c, *_descendants(c)]
    return out


def _run_noting_backend_logs(cmd: list[str], timeout: float) -> tuple[int, dict[str, int]]:
    """Run `fsinspect CMD` to its end; meanwhile the mode of every log file in a /tmp/fsi-* work dir that a
    process under it writes its output to (the back-end's log, gone with the work dir at the end)."""
    p = subprocess.Popen([sys.executable, "-m", "fsinspect", *cmd], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    logs: dict[str, int] = {}
    try:
        deadline = time.monotonic() + timeout
        while p.poll() is None:
            assert time.monotonic() < deadline, f"{cmd[0]} still running after {timeout} s"
            for k in _descendants(p.pid):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{k}/fd/1")
                    if target.startswith("/tmp/fsi-") and target.endswith(".log"):
                        logs[Path(target).name] = _mode(f"/proc/{k}/fd/1")
            time.sleep(0.05)
        return p.wait(), logs
    finally:
        stop_process(p)


def _modes(d: Path) -> dict[str, int]:
    return {str(f.relative_to(d)): _mode(f) for f in sorted(d.rglob("*")) if not f.is_dir()}


def test_every_file_a_rerun_and_the_exports_make_is_0600(tmp_path: Path, umask0: None) -> None:
    """The rerun's back-end log (it names the guest's files; 0644 before), its recording and index, and each
    export format, under umask 0; and nothing else is left (the pcapng export left its index under a temporary
    name, .export.pcapng.tmpPID.fsidx)."""
    out, share = tmp_path / "out", tmp_path / "share"
    out.mkdir()
    share.mkdir()
    backend = f"{sys.executable} -m fsinspect daemon --socket-path {{socket}} --shared-dir {share} --log-level info"
    rc, logs = _run_noting_backend_logs(["rerun", str(SAMPLE), "--backend-cmd", backend, "--allow-snapped",
                                         "--record", str(out / "rerun.pcapng")], 120)
    assert rc in (0, 1)  # equal or not (the share is not the recorded one): the files are what counts here
    assert logs == {"backend.log": 0o600}
    for fmt_ in ("text", "json", "jsonl", "pcapng", "parquet"):
        r = subprocess.run([sys.executable, "-m", "fsinspect", "export", str(out / "rerun.pcapng"), "--format",
                            fmt_, "-o", str(out / f"export.{fmt_}")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    got = _modes(out)
    assert set(got) == {"rerun.pcapng", "rerun.pcapng.fsidx", "export.pcapng", "export.pcapng.fsidx",
                        *(f"export.{f}" for f in ("text", "json", "jsonl", "parquet"))}, got
    assert got == dict.fromkeys(got, 0o600)


@pytest.mark.guest
def test_the_guest_console_demo_log_and_backend_logs_are_0600(guest_image: object, tmp_path: Path,
                                                                umask0: None) -> None:
    """`fsinspect guest run --console` and `fsinspect demo --log`, and the back-end logs in their work dirs
    (the C virtiofsd's, the bundled daemon's): all 0644 before (0666 under umask 0)."""
    rc, logs = _run_noting_backend_logs(["guest", "run", "--backend", "virtiofsd", "--workload", "smoke",
                                         "--console", str(tmp_path / "console.txt")], 300)
    assert rc == 0
    assert logs == {"virtiofsd.log": 0o600}
    rc, logs = _run_noting_backend_logs(["demo", "--headless", "--loops", "1", "--storm", "5", "--io-mb", "1",
                                         "--log", str(tmp_path / "demo.log"), "--record",
                                         str(tmp_path / "demo.pcapng")], 300)
    assert rc == 0, (tmp_path / "demo.log").read_text()
    assert logs == {"backend.log": 0o600}
    got = _modes(tmp_path)
    assert {"console.txt", "demo.log", "demo.pcapng"} <= set(got), got
    assert got == dict.fromkeys(got, 0o600)


# -- paths the user did not mean to give up ----------------------------------------------------------------
def test_control_on_a_regular_file_is_refused_by_the_proxy() -> None:
    with short_tmpdir() as work:
        keep = work / "notes.txt"
        keep.write_text("mine")
        r = subprocess.run([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(work / "p.sock"),
                            "--backend", str(work / "b.sock"), "--control", str(keep)],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == f"fsinspect proxy: --control {keep} exists and is not a socket: not replacing it"
        assert keep.read_text() == "mine" and stat.S_ISREG(os.lstat(keep).st_mode)  # before: a socket
        assert not (work / "p.sock").exists()  # nothing left behind


@pytest.mark.root
def test_control_on_a_regular_file_is_refused_by_the_daemon() -> None:
    with short_tmpdir() as work:
        keep = work / "notes.txt"
        keep.write_text("mine")
        p = _daemon(work, "--control", str(keep))
        try:
            assert p.wait(30) == 2
            err = _err(p)
        finally:
            stop_process(p)
        assert f"--control {keep} exists and is not a socket: not replacing it" in err and "Traceback" not in err
        assert keep.read_text() == "mine"  # before: deleted
        assert not (work / "d.sock").exists()


@pytest.mark.root
def test_daemon_socket_path_of_a_running_daemon_is_refused() -> None:
    """A second daemon on the first one's socket: refused, and the first neither loses its path nor sees a
    connection (a probe connection would be taken as its front-end)."""
    with short_tmpdir() as work:
        sock = work / "d.sock"
        first = _daemon(work)
        try:
            _wait_for(first, sock)
            _wait_catching_sigterm(first)
            ino = os.stat(sock).st_ino
            second = _daemon(work)
            try:
                assert second.wait(30) == 1  # before: it took the path over and served
                err = _err(second)
            finally:
                stop_process(second)
            assert f"--socket-path {sock} is in use by a running process" in err and "Traceback" not in err
            assert os.stat(sock).st_ino == ino and first.poll() is None
            first.send_signal(signal.SIGTERM)
            assert first.wait(20) == 0
        finally:
            stop_process(first)
        assert not sock.exists()


@pytest.mark.root
def test_daemon_replaces_a_stale_socket() -> None:
    with short_tmpdir() as work:
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(work / "d.sock"))
        stale.close()  # its process is gone: the file stays
        p = _daemon(work)
        try:
            deadline = time.monotonic() + 20
            while True:
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(str(work / "d.sock"))
                    break
                except OSError:
                    assert p.poll() is None and time.monotonic() < deadline, _err(p)
                    time.sleep(0.05)
                finally:
                    probe.close()
            p.send_signal(signal.SIGTERM)
            p.wait(20)
        finally:
            stop_process(p)


def test_claim_does_not_disturb_a_listener_and_release_removes_only_ours(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    first = claim_socket_path(path, what="--listen")
    first.setblocking(False)
    with pytest.raises(OSError, match="in use by a running process"):
        claim_socket_path(path, what="--listen")
    with pytest.raises(BlockingIOError):
        first.accept()  # nobody connected to find out
    os.unlink(path)
    Path(path).write_text("someone else's now")
    release_socket_path(path, first)
    assert Path(path).read_text() == "someone else's now"
    os.unlink(path)
    os.symlink(tmp_path / "target", path)
    with pytest.raises(OSError, match="exists and is not a socket"):
        claim_socket_path(path, what="--control")
    assert os.path.islink(path)


def test_a_client_that_waits_for_the_path_is_never_refused(tmp_path: Path) -> None:
    """The path appears only once the socket listens: a client that polls for it and connects at once
    never gets ECONNREFUSED (bind-then-listen left a window where it did); nothing else is left beside it."""
    import threading

    path = str(tmp_path / "c.sock")
    refused = 0
    for _ in range(200):
        stop = threading.Event()
        results: list[str] = []

        def client(stop: threading.Event = stop, results: list[str] = results) -> None:
            while not stop.is_set():
                if os.path.exists(path):
                    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    try:
                        c.connect(path)
                        results.append("ok")
                    except ConnectionRefusedError:
                        results.append("refused")
                    finally:
                        c.close()
                    return

        t = threading.Thread(target=client)
        t.start()
        s = claim_socket_path(path, backlog=4, mode=0o600, what="--control")
        t.join(5)
        stop.set()
        refused += results.count("refused")
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        release_socket_path(path, s)
        assert not os.path.exists(path)
    assert refused == 0
    assert os.listdir(tmp_path) == []
