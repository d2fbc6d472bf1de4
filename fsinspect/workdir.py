"""Private work directories under /tmp, and what a run leaves when it is stopped or killed.

`fsinspect proxy`, `rerun`, `demo` and the guest launcher keep their back-end's socket (and log) in a
directory of their own under /tmp (AF_UNIX paths must stay under 108 bytes).  A run removes it on the way
out, a stop signal included (`unwind_on`).  One killed by SIGKILL cannot: so each directory holds an
`.owner` file its run keeps flock()ed for its life, which the kernel releases however the run ends, and the
next one to make such a directory removes every one whose lock it can take (`sweep`).  A lock, unlike a pid,
cannot be mistaken for a live run when the pid has been reused, nor a live run for a dead one in another pid
namespace sharing /tmp.

The C virtiofsd leaves a pid file named after its socket, /run/virtiofsd/<path with / as .>.pid, which it
never removes; one for a socket in our directory is ours and goes with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

TMP = "/tmp"
OWNER = ".owner"
PREFIX = "fsi-"  # every work dir's name starts so (fsi-proxy-, fsi-rerun-, fsi-demo-, ...)
VIRTIOFSD_RUN = Path("/run/virtiofsd")


def virtiofsd_pidfile(socket_path: Path | str) -> Path:
    """The lock file the C virtiofsd leaves behind: /run/virtiofsd/<socket path with / as .>.pid."""
    return VIRTIOFSD_RUN / (str(socket_path).replace("/", ".") + ".pid")


@contextlib.contextmanager
def short_tmpdir(prefix: str = PREFIX) -> Iterator[Path]:
    """A private (0700) directory under /tmp, removed on exit, and by the next run if this one is killed."""
    sweep()
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=TMP))
    lock = -1
    try:
        lock = _own(d)
        yield d
    finally:
        _remove(d)
        if lock >= 0:
            os.close(lock)  # last: a sweep never sees it unlocked while it still exists


def _own(d: Path) -> int:
    """Lock d/.owner for this process's life.  It appears under its name only once locked, so a sweep can
    never take it in the moment between its creation and the lock."""
    tmp = d / f"{OWNER}.new"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())  # whose it is, for a person (and a test) looking
        os.rename(tmp, d / OWNER)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sweep(tmp: str = TMP) -> list[Path]:
    """Remove the work dirs whose run is gone (their .owner lock is free); returns those removed.

    Only this user's directories, only with an .owner file (a directory being made has none yet), and never
    one with something mounted under it (a killed test's FUSE mount: removing through it would reach its
    files)."""
    try:
        names = [n for n in os.listdir(tmp) if n.startswith(PREFIX)]
    except OSError:
        return []
    removed = []
    for name in names:
        d = Path(tmp) / name
        try:
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            fd = os.open(d / OWNER, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its run holds it
            if _has_mount_under(d):
                continue
            _remove(d)
            removed.append(d)
        finally:
            os.close(fd)
    return removed


def _has_mount_under(d: Path) -> bool:
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        return any((mp := line.split()[4]) == str(d) or mp.startswith(f"{d}/") for line in f)
    return True  # cannot tell: leave it


def _remove(d: Path) -> None:
    for pid in VIRTIOFSD_RUN.glob(glob.escape(str(d).replace("/", ".")) + ".*.pid"):
        with contextlib.suppress(OSError):
            pid.unlink()
    shutil.rmtree(d, ignore_errors=True)


# -- stop signals -----------------------------------------------------------------------------------------
class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGHUP) arrived: unwind through every finally block (the work dir, the
    back-end, the listening socket), then end by that same signal (`die`), as if it had not been caught."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def die(self) -> None:
        for f in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                f.flush()
        signal.signal(self.signum, signal.SIG_DFL)
        os.kill(os.getpid(), self.signum)


def not_ignored(*signums: int) -> list[int]:
    """Those of `signums` this process does not ignore.  One ignored when it started stays ignored, as whoever
    started it asked: nohup's SIGHUP, the SIGINT of a shell script's background job (Python leaves an ignored
    SIGINT alone for the same reason)."""
    return [s for s in signums if signal.getsignal(s) is not signal.SIG_IGN]


def unwind_on(*signums: int) -> None:
    """Make each of `signums` (not ignored: `not_ignored`) raise Stopped in the main thread, once: a second one
    while the first is being cleaned up after does not cut that short (SIGKILL still ends it at once)."""
    fired: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        if not fired:
            fired.append(signum)
            raise Stopped(signum)

    for s in not_ignored(*signums):
        signal.signal(s, handler)
