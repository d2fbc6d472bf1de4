"""FUSE passthrough (7.40): the kernel reads and writes an open file's backing file itself.

An OPEN/CREATE answered with FOPEN_PASSTHROUGH and a `backing_id` (registered on /dev/fuse with
FUSE_DEV_IOC_BACKING_OPEN) sends no READ or WRITE to the daemon for that file any more: read, write,
splice and mmap go from the kernel straight to the host file.  FLUSH, FSYNC, FALLOCATE, LSEEK, locks,
SETATTR and RELEASE still come.

The kernel's rules this follows (fs/fuse/iomode.c, backing.c):
- every open of an inode while any is open in passthrough must name the same backing file (EBUSY
  otherwise), and a passthrough open of an inode open in the page cache fails (ETXTBSY): so the mode is
  decided per inode at its first open and kept until its last handle is released, one backing id shared
  by all its handles;
- registering and unregistering need CAP_SYS_ADMIN; under the sandbox the serving threads keep it
  permitted, not effective, and raise it only around these two ioctls (`raise_cap`);
- the kernel opens its own backing file per fuse file, with the opener's flags, from the path of the
  file registered and the credentials of the thread that registered it.

A refusal is never an error for the client: the file is then served through READ/WRITE as without
passthrough.  EPERM/ENOTTY/EOPNOTSUPP (no privilege, no kernel support) turn passthrough off for the
session, with one warning; others (ELOOP: the host file's filesystem is as deeply stacked as
max_stack_depth allows) only for that file.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("fsinspect.daemon.passthrough")

CAP_SYS_ADMIN = 21
# The kernel cannot do it at all (a privilege or a feature missing): no later file would fare better.
_FOR_GOOD = (errno.EPERM, errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS)


class BackingDevice(Protocol):
    """What registers backing files: the mounted /dev/fuse connection (transport/fusedev.FuseDev)."""

    def backing_open(self, fd: int, cap: int = -1) -> int: ...

    def backing_close(self, backing_id: int, cap: int = -1) -> None: ...


@dataclass(slots=True)
class _Opens:
    handles: int = 0
    backing_id: int = 0  # >0: this inode's handles are passthrough


class BackingFiles:
    """Per-inode backing ids while the inode has open handles."""

    def __init__(self, dev: BackingDevice, *, raise_cap: bool = False,
                 allowed: Callable[[], bool] | None = None) -> None:
        self.dev = dev
        self.cap = CAP_SYS_ADMIN if raise_cap else -1
        self.allowed = allowed  # None: always; else asked at an inode's first open (the debugger's rules)
        self.enabled = True
        self._opens: dict[int, _Opens] = {}
        self._lock = threading.Lock()
        self.opened = 0  # handles answered with FOPEN_PASSTHROUGH
        self.refused: dict[str, int] = {}  # errno name -> backing files the kernel refused
        self.withheld = 0  # first opens served through the daemon because a rule could hold READ/WRITE
        self._warned_rules = False

    def open(self, nodeid: int, fd: int) -> int:
        """A new handle on `nodeid` (its host file open as `fd`): the backing id to answer, or 0."""
        with self._lock:
            o = self._opens.get(nodeid)
            if o is None:
                o = self._opens[nodeid] = _Opens()
            if o.handles == 0 and self.enabled:
                o.backing_id = self._register(fd)
            o.handles += 1
            if o.backing_id:
                self.opened += 1
            return o.backing_id

    def _register(self, fd: int) -> int:
        if self.allowed is not None and not self.allowed():
            self.withheld += 1
            if not self._warned_rules:
                self._warned_rules = True
                busy = sum(1 for o in self._opens.values() if o.backing_id)
                log.warning("passthrough: a debugger rule can hold READ/WRITE, so files opened from now on are "
                            "served through the daemon; %d file(s) already open in passthrough stay so until "
                            "their last close (their READ/WRITE cannot be seen or held)", busy)
            return 0
        self._warned_rules = False
        try:
            return self.dev.backing_open(fd, self.cap)
        except OSError as e:
            name = errno.errorcode.get(e.errno or 0, str(e.errno))
            why = os.strerror(e.errno) if e.errno else str(e)
            first = name not in self.refused
            self.refused[name] = self.refused.get(name, 0) + 1
            if e.errno in _FOR_GOOD:
                self.enabled = False
                log.warning("passthrough off: the kernel refused a backing file (FUSE_DEV_IOC_BACKING_OPEN: %s%s); "
                            "files are served through READ/WRITE", why,
                            ", needs CAP_SYS_ADMIN" if e.errno == errno.EPERM else "")
            elif first:
                log.warning("passthrough: the kernel refused a backing file (FUSE_DEV_IOC_BACKING_OPEN: %s%s); "
                            "such files are served through READ/WRITE", why,
                            ": the shared directory's filesystem is stacked too deep" if e.errno == errno.ELOOP
                            else "")
            return 0

    def release(self, nodeid: int) -> None:
        """A handle on `nodeid` is gone; the last one lets the backing id go."""
        with self._lock:
            o = self._opens.get(nodeid)
            if o is None:
                return
            o.handles -= 1
            if o.handles > 0:
                return
            del self._opens[nodeid]
            backing_id = o.backing_id
        if backing_id:
            try:
                self.dev.backing_close(backing_id, self.cap)
            except OSError as e:  # the connection is gone (unmounted): the kernel dropped them all
                log.debug("FUSE_DEV_IOC_BACKING_CLOSE %d: %s", backing_id, e)

    def open_now(self) -> int:
        with self._lock:
            return sum(o.handles for o in self._opens.values() if o.backing_id)

    def counters(self) -> dict[str, object]:
        return {"opened": self.opened, "open_now": self.open_now(), "refused": dict(self.refused),
                "withheld_for_rules": self.withheld, "enabled": self.enabled}
