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


# The /dev/fuse transports a standalone test runs on: daemon arguments and environment.  uring-c and
# uring-py are FUSE over io_uring with the C rings and with their pure-Python twin (--uring on turns the
# fuse module's enable_uring on, as root).
TRANSPORTS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "dev": (("--uring", "off"), {}),
    "uring-c": (("--uring", "on"), {}),
    "uring-py": (("--uring", "on"), {"FSINSPECT_URING": "python"}),
}


def uring_missing() -> str | None:
    """Why FUSE over io_uring cannot run here, or None."""
    if not os.path.exists("/sys/module/fuse/parameters/enable_uring"):
        return "this kernel has no FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING=y)"
    return None


def ring_completions(pid: int) -> int:
    """Completions the daemon's io_urings have posted (/proc/PID/fdinfo): requests served over the rings."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[io_uring]":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("CqTail:"))
        except (OSError, StopIteration):
            pass
    return total


def start(shared: Path, mnt: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "fsinspect.cli", "daemon", "--standalone", str(mnt),
                             "--shared-dir", str(shared), "--log-level", "warning", *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
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
def standalone(shared: Path, mnt: Path, *extra: str,
               env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    mnt.mkdir(exist_ok=True)
    proc = start(shared, mnt, *extra, env=env)
    try:
        yield proc
    finally:
        stop(proc, mnt)
