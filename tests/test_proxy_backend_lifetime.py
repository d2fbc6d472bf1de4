"""A back-end the proxy started dies with the proxy, even when the proxy is SIGKILLed (no orphan virtiofsd)."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fsinspect.guest.launcher import short_tmpdir, stop_process
from fsinspect.proxy.server import Cancelled, Proxy, ProxyConfig
from fsinspect.workdir import sweep
from tests.test_workdir_cleanup import owned_workdir

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def _group_alive(pgid: int, but: int) -> dict[int, str]:
    """Live (non-zombie) members of process group `pgid` other than `but`: pid -> command name."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == but:
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(rest[2]) == pgid and rest[0] != "Z":
            found[int(d.name)] = comm
    return found


@pytest.mark.skipif(not os.access(VIRTIOFSD, os.X_OK), reason=f"{VIRTIOFSD} not installed")
def test_backend_cmd_dies_with_a_sigkilled_proxy() -> None:
    with short_tmpdir() as work:
        (work / "share").mkdir()
        backend = work / "b.sock"
        cmd = shlex.join([VIRTIOFSD, f"--socket-path={backend}", "-o", f"source={work / 'share'}"])
        p = subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(work / "p.sock"),
                              "--backend", str(backend), "--backend-cmd", cmd], stdin=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)  # its own group: ours to clean
        try:
            deadline = time.monotonic() + 20
            while not (backend.exists() and (work / "p.sock").exists()):
                assert p.poll() is None and time.monotonic() < deadline, "proxy or virtiofsd never came up"
                time.sleep(0.02)
            children = _group_alive(p.pid, but=p.pid)
            assert "virtiofsd" in children.values(), children
            workdir = owned_workdir(p.pid, "fsi-proxy-")
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
            t0 = time.monotonic()
            while (left := _group_alive(p.pid, but=p.pid)) and time.monotonic() - t0 < 2.0:
                time.sleep(0.02)
            assert not left, f"still running 2 s after the proxy was SIGKILLed: {left}"
            assert workdir is not None and workdir in sweep(), "the killed proxy's work dir is not the next run's"
        finally:
            stop_process(p)  # the group: whatever a failed run left behind


SAMPLE = Path(__file__).resolve().parent.parent / "recordings" / "samples" / "guest-syncfs.pcapng"
# A back-end that takes the connection and never answers: the rerun waits on it.
MUTE_BACKEND = ("import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); "
                "c = s.accept(); time.sleep(120)")


def _still_running(kids: dict[int, str], seconds: float) -> dict[int, str]:
    """Those of `kids` still alive (not zombies) after waiting up to `seconds` for them to go."""
    t0 = time.monotonic()
    while (left := {k: c for k, c in kids.items() if Path(f"/proc/{k}").exists()
                    and Path(f"/proc/{k}/stat").read_text().split(")")[1].split()[0] != "Z"}) \
            and time.monotonic() - t0 < seconds:
        time.sleep(0.02)
    return left


def _children(pid: int) -> dict[int, str]:
    """Live children of `pid` (any session): pid -> command name."""
    found = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            rest = stat[stat.rindex(")") + 2:].split()
            if int(rest[1]) == pid and rest[0] != "Z":
                found[int(d.name)] = stat[stat.index("(") + 1:stat.rindex(")")]
    return found


def test_rerun_backend_cmd_dies_with_a_sigkilled_rerun() -> None:
    """`fsinspect rerun --backend-cmd` starts its back-end in a session of its own; SIGKILL the rerun while
    the back-end keeps it waiting, and the back-end must still go (it would live on for two minutes)."""
    with short_tmpdir() as work:
        cmd = shlex.join([sys.executable, "-c", MUTE_BACKEND]) + " {socket}"
        p = subprocess.Popen([sys.executable, "-m", "fsinspect", "rerun", str(SAMPLE), "--backend-cmd", cmd,
                              "--allow-snapped", "--timeout", "60"], stdin=subprocess.DEVNULL, cwd=work,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        kids: dict[int, str] = {}
        try:
            deadline = time.monotonic() + 20
            while not kids or not any(Path(f"/proc/{k}/fd").exists() for k in kids):
                assert p.poll() is None and time.monotonic() < deadline, "rerun or its back-end never came up"
                time.sleep(0.05)
                kids = _children(p.pid)
            time.sleep(0.5)  # connected and waiting
            workdir = owned_workdir(p.pid, "fsi-rerun-")
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
            left = _still_running(kids, 2.0)
            assert not left, f"the rerun's back-end still runs 2 s after the rerun was SIGKILLed: {left}"
            assert workdir is not None and workdir in sweep(), "the killed rerun's work dir is not the next run's"
        finally:
            stop_process(p)
            for k in kids:  # a failed run: the back-end is ours to clean
                with contextlib.suppress(ProcessLookupError):
                    os.kill(k, signal.SIGKILL)



GUEST_RUNNER = """
import sys
from pathlib import Path
from fsinspect.guest import build, launcher
share, work, mute = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
with launcher.virtiofsd(share, work):  # started, and left waiting for a front-end
    launcher.run_guest(mute, image=build.build(), workload="smoke", timeout=120)
"""


def test_the_launchers_qemu_and_virtiofsd_die_with_a_sigkilled_runner(tmp_path: Path) -> None:
    """A test or bench that runs a guest through the launcher and is SIGKILLed (a pytest timeout, a killed
    bench) must not leave QEMU and virtiofsd running.  Neither notices on its own while nothing happens: a
    QEMU whose back-end never answers prints nothing (no SIGPIPE), and a virtiofsd nobody connected to waits
    for ever (one such QEMU ran on for 15 minutes)."""
    share = tmp_path / "share"
    share.mkdir()
    with short_tmpdir() as work, socket.socket(socket.AF_UNIX) as mute:
        mute.bind(str(work / "mute.sock"))
        mute.listen()
        p = subprocess.Popen([sys.executable, "-c", GUEST_RUNNER, str(share), str(work), str(work / "mute.sock")],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        kids: dict[int, str] = {}
        try:
            mute.settimeout(60)
            conn, _ = mute.accept()  # QEMU is up and waits for the back-end's first reply
            kids = _children(p.pid)
            assert {"virtiofsd", "qemu-system-x86"} <= {c[:15] for c in kids.values()}, kids
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
            left = _still_running(kids, 5.0)
            conn.close()
            assert not left, f"still running 5 s after their runner was SIGKILLed: {left}"
        finally:
            stop_process(p)
            for k in kids:  # a failed run: they are ours to clean
                with contextlib.suppress(ProcessLookupError):
                    os.kill(k, signal.SIGKILL)


# -- connecting to the back-end (unixsock.connect_when_listening, shared with the rerun) ------------------
def _proxy(path: Path, wait: float, cmd: str | None = None) -> Proxy:
    return Proxy(ProxyConfig(backend=str(path), backend_cmd=cmd, backend_wait=wait))


def test_the_proxy_connects_once_the_backend_listens_after_a_stale_file(tmp_path: Path) -> None:
    path = tmp_path / "be.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, nobody listening: refused until the back-end replaces it
    stale.close()

    def listen_later() -> None:
        time.sleep(0.3)
        path.unlink()
        lst.bind(str(path))
        lst.listen(1)

    lst = socket.socket(socket.AF_UNIX)
    t = threading.Thread(target=listen_later)
    t.start()
    try:
        conn = _proxy(path, 10).connect_backend()
        conn.close()
    finally:
        t.join()
        lst.close()


def test_the_proxy_says_why_the_backend_never_listened(tmp_path: Path) -> None:
    path = tmp_path / "be.sock"
    p = _proxy(path, 0.3)
    with pytest.raises(OSError, match=r"^the back-end did not listen on .*be.sock within 0.3 s \(no socket file\)$"):
        p.connect_backend()
    p = _proxy(path, 30, cmd="sh -c 'exit 3'")
    p.start_backend()
    t0 = time.monotonic()
    with pytest.raises(OSError, match="the back-end command exited with 3 before listening"):
        p.connect_backend()
    assert time.monotonic() - t0 < 10
    path.write_bytes(b"")  # a file where a directory should be: waiting would not change it
    with pytest.raises(OSError, match=r"cannot connect to the back-end socket .*be.sock/s: Not a directory") as e:
        _proxy(path / "s", 30).connect_backend()
    assert str(e.value).startswith("cannot connect")  # the CLI's one line


def test_stopping_the_proxy_while_it_waits_for_the_backend_cancels_at_once(tmp_path: Path) -> None:
    p = _proxy(tmp_path / "be.sock", 60)
    threading.Timer(0.2, p.stop).start()
    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        p.connect_backend()
    assert time.monotonic() - t0 < 5
