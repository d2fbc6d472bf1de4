"""Run `fsinspect daemon --standalone` as a real process over /dev/fuse, and always clean it up."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from daemon.transport.fusedev import in_mountinfo as is_mounted

REPO = Path(__file__).resolve().parent.parent
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
MNT_DETACH = 2


def start(shared: Path, mnt: Path, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "fsinspect.cli", "daemon", "--standalone", str(mnt),
                             "--shared-dir", str(shared), "--log-level", "warning", *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while not is_mounted(mnt):
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited {proc.returncode}: {proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            stop(proc, mnt)
            raise RuntimeError("the standalone mount did not appear within 15 s")
        time.sleep(0.02)
    os.stat(mnt)  # FUSE_INIT done
    return proc


def stop(proc: subprocess.Popen[bytes], mnt: Path, sig: int = signal.SIGTERM) -> int | None:
    """Signal the daemon, wait, and make sure neither the process nor the mount is left behind."""
    rc: int | None = None
    try:
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    finally:
        if is_mounted(mnt):
            _libc.umount2(str(mnt).encode(), MNT_DETACH)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    return rc


@contextmanager
def standalone(shared: Path, mnt: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    mnt.mkdir(exist_ok=True)
    proc = start(shared, mnt, *extra)
    try:
        yield proc
    finally:
        stop(proc, mnt)
