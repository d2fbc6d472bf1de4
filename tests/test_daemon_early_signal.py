"""A SIGTERM/SIGINT that reaches the daemon after its socket or mount exists, but before it serves, ends it
cleanly: the socket file is removed and the mount unmounted (it used to die of the signal, leaving them).

The window is made certain, not raced: a small driver wraps the step that creates the socket (or mounts)
so that the process signals itself right after it, then runs the real command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.standalone_mount import REPO, is_mounted

VHOST = """
import os, signal, sys
import daemon.transport.vhost_user as vu
real = vu.listen_path
def listen_then_signal(path):
    s = real(path)
    os.kill(os.getpid(), SIG)
    return s
vu.listen_path = listen_then_signal
from fsinspect.cli import main
sys.exit(main(sys.argv[1:]))
"""

STANDALONE = """
import os, signal, sys
import daemon.standalone as st
real = st.Standalone.__init__
def mount_then_signal(self, *a, **kw):
    real(self, *a, **kw)
    os.kill(os.getpid(), SIG)
st.Standalone.__init__ = mount_then_signal
from fsinspect.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(driver: str, sig: int, *args: str) -> subprocess.CompletedProcess[str]:
    code = f"SIG = {int(sig)}\n" + driver
    return subprocess.run([sys.executable, "-c", code, "daemon", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_vhost_signal_between_listen_and_serve(tmp_path: Path, sig: int) -> None:
    sock = tmp_path / "d.sock"
    p = _run(VHOST, sig, "--socket-path", str(sock), "--sandbox", "none", "-o", f"source={tmp_path}")
    assert p.returncode == 0, p.stderr
    assert not sock.exists()


@pytest.mark.root
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_standalone_signal_between_mount_and_serve(tmp_path: Path, sig: int) -> None:
    require_root()
    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    mnt.mkdir()
    p = _run(STANDALONE, sig, "--standalone", str(mnt), "-o", f"source={shared}")
    try:
        assert p.returncode == 0, p.stderr
        assert not is_mounted(mnt)
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
