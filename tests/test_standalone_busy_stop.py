"""A stop signal ends `fsinspect daemon --standalone` even when something keeps its mount busy.

A process with its working directory or a file open in the mount, or one waiting on a request the daemon
never finishes (a blocking lock), makes the unmount go lazy: the connection lives on, the readers stay
blocked in read(/dev/fuse) or io_uring_enter, and the daemon waited for them for ever.  After a short
grace the daemon aborts the connection through fusectl, so it exits 0 at once, with its mount gone.
Each test kills only the processes it started, by PID."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from daemon.transport.fusedev import FUSECTL, _fusectl_mounted, connection_id
from tests.conftest import require_root
from tests.pipes import read_line
from tests.standalone_mount import REPO, TRANSPORTS, is_mounted, start, stop, uring_missing

pytestmark = pytest.mark.root

_OPEN_AND_WAIT = "import sys, time; f = open(sys.argv[1], 'rb'); print('open', flush=True); time.sleep(300)"
_LOCK = ("import fcntl, sys; f = open(sys.argv[1], 'r+b'); print('locking', flush=True); "
         "fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True)")


@contextmanager
def _started(argv: list[str], ready: str | None = None, **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    """A busy process of the test's own: killed by its PID at the end, whatever happened."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0, **kw)  # type: ignore[call-overload]
    try:
        if ready is not None:
            assert p.stdout is not None and read_line(p.stdout, 30, f"{argv[-1]!r} saying {ready!r}") == ready
        yield p
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        if p.stdout is not None:
            p.stdout.close()


def _in_cwd(mnt: Path, shared: Path) -> Iterator[subprocess.Popen[bytes]]:
    with _started(["sleep", "300"], cwd=str(mnt)) as p:
        yield p


def _file_open(mnt: Path, shared: Path) -> Iterator[subprocess.Popen[bytes]]:
    with _started([sys.executable, "-c", _OPEN_AND_WAIT, str(mnt / "f")], ready="open") as p:
        yield p


def _lock_wait(mnt: Path, shared: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A SETLKW the daemon waits on for ever: the host file's lock is held by this test itself."""
    fd = os.open(shared / "f", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        with _started([sys.executable, "-c", _LOCK, str(mnt / "f")], ready="locking") as p:
            deadline = time.monotonic() + 10
            while "fuse" not in Path(f"/proc/{p.pid}/wchan").read_text() and time.monotonic() < deadline:
                time.sleep(0.05)  # the caller sleeps in the kernel, waiting for the daemon's reply
            assert p.poll() is None
            yield p
    finally:
        os.close(fd)


BUSY: dict[str, Callable[[Path, Path], Iterator[subprocess.Popen[bytes]]]] = {
    "cwd": _in_cwd, "open-file": _file_open, "lock-wait": _lock_wait}
CASES = [("dev", "cwd"), ("dev", "open-file"), ("dev", "lock-wait"), ("uring-c", "cwd"), ("uring-py", "cwd")]


@pytest.fixture
def host_fusectl() -> Iterator[None]:
    """fusectl mounted, as systemd mounts it at boot on most hosts (a machine that loaded the fuse module
    later has none): these tests watch the connection's directory there.  Without it the daemon mounts it
    for the abort itself (the next test); mounted here, unmounted after only if this mounted it."""
    require_root()
    if _fusectl_mounted():
        yield
        return
    subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], check=True, timeout=10)
    try:
        yield
    finally:
        subprocess.run(["umount", FUSECTL], check=False, timeout=10)


@pytest.mark.parametrize(("transport", "busy"), CASES, ids=[f"{t}-{b}" for t, b in CASES])
@pytest.mark.usefixtures("host_fusectl")
def test_a_stop_signal_ends_the_daemon_although_the_mount_is_busy(tmp_path: Path, transport: str,
                                                                  busy: str) -> None:
    require_root()
    if transport != "dev" and (why := uring_missing()):
        pytest.skip(why)
    args, env = TRANSPORTS[transport]
    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    mnt.mkdir()
    (shared / "f").write_bytes(b"x" * 100)
    proc = start(shared, mnt, *args, env=env)
    try:
        conn = connection_id(str(mnt))
        assert conn is not None and os.path.isdir(f"{FUSECTL}/{conn}")
        with contextmanager(BUSY[busy])(mnt, shared) as holder:
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                rc = None
            took = time.monotonic() - t0
            err = proc.stderr.read().decode() if proc.stderr and rc is not None else ""
            assert rc == 0, f"rc {rc} after {took:.1f} s: {err}"
            assert took < 8, f"the daemon took {took:.1f} s to stop"
            assert "Traceback" not in err and "ERROR" not in err, err
            assert "aborted the FUSE connection" in err, err
            assert not is_mounted(mnt)
            if busy == "lock-wait":  # the waiter got its answer (an error), it is not left hanging
                holder.wait(10)
                assert holder.returncode != 0
            else:  # the process lives on; its dead directory or file now says so
                assert holder.poll() is None
    finally:
        stop(proc, mnt)
    deadline = time.monotonic() + 10  # the holder is gone: the connection is released
    while os.path.isdir(f"{FUSECTL}/{conn}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.isdir(f"{FUSECTL}/{conn}")


def test_fusectl_is_mounted_for_the_abort_and_unmounted_after(tmp_path: Path) -> None:
    """Where fusectl is not mounted (a private mount namespace here, so the host keeps its own), the daemon
    mounts it to abort the busy connection, and leaves the namespace as it found it."""
    require_root()
    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    mnt.mkdir()
    script = (f"umount {FUSECTL} 2>/dev/null; exec {sys.executable} -m fsinspect.cli daemon --standalone {mnt} "
              f"--shared-dir {shared} --log-level warning --uring off")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        mountinfo = Path(f"/proc/{proc.pid}/mountinfo")
        deadline = time.monotonic() + 15
        while f" {mnt} " not in mountinfo.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "the daemon did not mount"
            time.sleep(0.05)
        assert f" {FUSECTL} " not in mountinfo.read_text()
        enter = ["nsenter", "--target", str(proc.pid), "--mount", "--"]
        with _started([*enter, "sh", "-c", f"cd {mnt} && echo in && exec sleep 300"], ready="in") as holder:
            holder_mounts = Path(f"/proc/{holder.pid}/mountinfo")
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=20)
            took = time.monotonic() - t0
            err = proc.stderr.read().decode() if proc.stderr else ""
            assert rc == 0 and took < 8, f"rc {rc} after {took:.1f} s: {err}"
            assert "aborted the FUSE connection" in err and "Traceback" not in err, err
            text = holder_mounts.read_text()
            assert f" {mnt} " not in text and f" {FUSECTL} " not in text
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
