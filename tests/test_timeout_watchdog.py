"""A test that hangs on a FUSE mount fails alone (pytest-timeout), and what it started is gone after it.

pytest-timeout's SIGALRM handler runs only once the main thread leaves the kernel, and a thread waiting
on a FUSE request of a hung daemon never does: such a test held the whole CI run.  tests/conftest.py's
watchdog kills, by PID, what the test started and aborts what it mounted, past the timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import fuse_connections, require_root
from tests.standalone_mount import MNT_DETACH, REPO, _libc

pytestmark = pytest.mark.root

_HANGS = '''
import os, signal, time
from pathlib import Path
from tests.standalone_mount import standalone

def test_stat_on_a_stopped_daemon(tmp_path):
    (tmp_path / "shared").mkdir()
    with standalone(tmp_path / "shared", tmp_path / "mnt") as daemon:
        Path(os.environ["PID_FILE"]).write_text(str(daemon.pid))
        os.kill(daemon.pid, signal.SIGSTOP)  # hung: every request waits for it
        os.stat(tmp_path / "mnt" / "x")
'''


@pytest.mark.parametrize("uring", ["off", "on"])
def test_a_test_blocked_on_a_hung_daemon_times_out_alone(tmp_path: Path, uring: str) -> None:
    """Over /dev/fuse and over io_uring (where fusectl's abort does not end a request a ring entry
    holds, and only the daemon's end does): the test fails with pytest-timeout's Timeout a moment past
    it, its daemon is killed and its mount is gone."""
    require_root()
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "test_hangs.py").write_text(_HANGS.replace('standalone(tmp_path / "shared", tmp_path / "mnt")',
                                                        f'standalone(tmp_path / "shared", tmp_path / "mnt", '
                                                        f'"--uring", "{uring}")'))
    pid_file = tmp_path / "daemon.pid"
    before = set(fuse_connections())
    env = {**os.environ, "PID_FILE": str(pid_file), "FSINSPECT_UNSTICK_AFTER": "2"}
    # Its own process group: without the watchdog, only killing the daemon in it ends the run.
    r = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                          "--rootdir", str(inner), "-o", "addopts=", "--timeout", "5",
                          "--basetemp", str(tmp_path / "base"), str(inner / "test_hangs.py")],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        try:
            out, _ = r.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(r.pid, signal.SIGKILL)
            out, _ = r.communicate(timeout=30)
            pytest.fail(f"the timed-out test held its run for 90 s: {out}")
        assert r.returncode == 1 and "Timeout (>5.0s) from pytest-timeout" in out, out
        assert "still running 2 s past its timeout" in out, out
        pid = int(pid_file.read_text())
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", out
        assert set(fuse_connections()) <= before, "the hung test's mount was left behind"
    finally:
        for conn, mnt in fuse_connections().items():
            if conn not in before:
                _libc.umount2(mnt.encode(), MNT_DETACH)
