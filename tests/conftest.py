"""Shared pytest configuration.  Area-specific fixtures live in their own modules (pytest_plugins)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any

import pytest

# How long past its pytest-timeout a test may still run before its FUSE connections are aborted.
UNSTICK_AFTER = float(os.environ.get("FSINSPECT_UNSTICK_AFTER", "30"))


def require_root() -> None:
    """Root tests must run in CI (which is root); outside root they fail loudly rather than skip silently."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (CI runs as root); run the suite as root")


def fuse_connections() -> dict[int, str]:
    """FUSE mounts now, {fusectl connection id: mountpoint}, from the kernel's table (no stat, which
    would ask a daemon)."""
    out = {}
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index(b"-") + 1]
            if fstype == b"fuse" or fstype.startswith(b"fuse."):
                major, minor = fields[2].split(b":")
                out[(int(major) << 20) | int(minor)] = os.fsdecode(fields[4])
    return out


def _children() -> dict[int, set[int]]:
    """{pid: its children} for every process, from /proc/PID/stat."""
    kids: dict[int, set[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, set()).add(int(name))
    return kids


def _own_children() -> set[int]:
    """This process's children: /proc/self/task/*/children when the kernel has it (cheap, at every test)."""
    try:
        out: set[int] = set()
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                out.update(int(x) for x in f.read().split())
        return out
    except OSError:
        return _children().get(os.getpid(), set())


def _descendants(roots: set[int], kids: dict[int, set[int]]) -> list[int]:
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def _unstick(nodeid: str, conns_before: set[int], kids_before: set[int]) -> None:
    """pytest-timeout's SIGALRM runs its handler only once the main thread leaves the kernel, and a thread
    waiting on a FUSE request of a hung daemon never does (only a fatal signal ends that wait): such a
    test held the whole run.  So SIGKILL (by PID) the processes the test started, with theirs (a killed
    daemon's requests end, over /dev/fuse and io_uring alike; QEMU goes too), then abort the FUSE
    connections it mounted (an in-process server's; fusectl's abort does not end a request an io_uring
    entry holds).  The timeout then fires and the test's finalizers clean up as usual."""
    from daemon.transport.fusedev import abort_connection

    kids = _children()
    started = _descendants(_own_children() - kids_before, kids)
    conns = {c: m for c, m in fuse_connections().items() if c not in conns_before}
    sys.stderr.write(f"\n{nodeid}: still running {UNSTICK_AFTER:g} s past its timeout, likely blocked on a FUSE "
                     f"mount: killing the processes it started {started} and aborting the FUSE connections it "
                     f"mounted {sorted(conns.values())}\n")
    for pid in started:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for conn in conns:
        with contextlib.suppress(OSError):
            abort_connection(conn)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> None:
    """Alongside pytest-timeout's own timer (returning None lets it run too): a watchdog past it."""
    timer = threading.Timer(settings.timeout + UNSTICK_AFTER, _unstick,
                            (item.nodeid, set(fuse_connections()), _own_children()))
    timer.daemon = True
    timer.name = f"unstick {item.nodeid}"
    timer.start()
    item.stash[_UNSTICK] = timer


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> None:
    timer = item.stash.get(_UNSTICK, None)
    if timer is not None:
        timer.cancel()
        timer.join(1)  # gone before the next test counts its threads (cancel() only signals it)


_UNSTICK = pytest.StashKey[threading.Timer]()

# Fixtures that boot the real guest (fsinspect.guest): guest_image, guest_share, boot_virtiofsd.
pytest_plugins = ["tests.guest_fixtures"]
