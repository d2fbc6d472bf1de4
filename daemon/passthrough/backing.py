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
  file registered and the credentials of the thread that registered it: so an O_PATH fd is registered,
  which holds no open mode (a file open for writing would make the host's exec of it fail, ETXTBSY).

An inode's backing id outlives its last handle, kept idle (at most IDLE_MAX, least recently used let go
first, and at the inode's FORGET): re-opening a file then costs no ioctl (under the sandbox each one also
costs two capset calls, about 10 us in all).  An idle backing pins the host file's dentry, not an open
file: an unlinked file's data stays until its FORGET or its eviction from the idle set (the kernel
forgets an inode unlinked through the mount as soon as nothing uses it).

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
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from . import syscalls as sc

log = logging.getLogger("fsinspect.daemon.passthrough")

CAP_SYS_ADMIN = 21
IDLE_MAX = 1024  # idle backing ids kept: no fd of ours, about a struct file and a pinned dentry each
# Idle ids let go for room are closed this many at a time, under one raise of CAP_SYS_ADMIN (a capset
# pair costs more than the ioctl): a create storm would otherwise pay a pair per file twice.
CLOSE_BATCH = 64
PathFdSource = Callable[[], AbstractContextManager[int]]  # `with source() as fd`: an O_PATH fd of the inode
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
        self.idle: OrderedDict[int, int] = OrderedDict()  # nodeid -> backing id of an inode with no handle
        self._evicted: list[int] = []  # ids let go from idle, closed in one batch
        self._lock = threading.Lock()
        self.opened = 0  # handles answered with FOPEN_PASSTHROUGH
        self.registered = 0  # FUSE_DEV_IOC_BACKING_OPEN calls that gave an id
        self.closed = 0  # ... and FUSE_DEV_IOC_BACKING_CLOSE calls that let one go
        self.close_failed = 0
        self.refused: dict[str, int] = {}  # errno name -> backing files the kernel refused
        self.withheld = 0  # first opens served through the daemon because a rule could hold READ/WRITE
        self.direct = 0  # O_DIRECT opens served through the daemon (open(direct=True))
        self._warned_rules = False

    def open(self, nodeid: int, path_fd: PathFdSource, *, direct: bool = False) -> int:
        """A new handle on `nodeid`: the backing id to answer, or 0.  `path_fd` gives an O_PATH fd of the
        inode if a backing file has to be registered.

        `direct` (an O_DIRECT open): -1, not passthrough and not counted (answer FOPEN_DIRECT_IO, which
        puts the inode in no io mode, so its other opens may still pass through), unless the inode is open
        in passthrough already: the kernel wants every open of it in passthrough then (EINVAL otherwise).
        The kernel opens the backing file with the opener's flags, so O_DIRECT would reach the host file:
        its alignment rules (EINVAL on ext4 for a read the daemon serves, since it drops O_DIRECT as the C
        virtiofsd does) and a host file system without O_DIRECT would fail what works without passthrough."""
        with self._lock:
            o = self._opens.get(nodeid)
            if direct and (o is None or not o.backing_id):
                self.direct += 1
                return -1
            if o is None:
                o = self._opens[nodeid] = _Opens()
            if o.handles == 0:
                o.backing_id = self._first_open(nodeid, path_fd)
            o.handles += 1
            if o.backing_id:
                self.opened += 1
            return o.backing_id

    def _first_open(self, nodeid: int, path_fd: PathFdSource) -> int:
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
        idle = self.idle.pop(nodeid, 0)
        if idle or not self.enabled:
            return idle
        try:
            with path_fd() as fd:
                backing_id = self.dev.backing_open(fd, self.cap)
            self.registered += 1
            return backing_id
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
        """A handle on `nodeid` is gone; after the last one its backing id waits idle for a re-open."""
        with self._lock:
            o = self._opens.get(nodeid)
            if o is None:
                return
            o.handles -= 1
            if o.handles > 0:
                return
            del self._opens[nodeid]
            if not o.backing_id:
                return
            self.idle[nodeid] = o.backing_id
            if len(self.idle) <= IDLE_MAX:
                return
            self._evicted.append(self.idle.popitem(last=False)[1])
            if len(self._evicted) < CLOSE_BATCH:
                return
            batch, self._evicted = self._evicted, []
        with sc.raised_cap(self.cap):
            for backing_id in batch:
                self._close(backing_id, -1)

    def forget(self, nodeid: int) -> None:
        """The inode left the daemon's table (its last FORGET): its idle backing id goes too."""
        with self._lock:
            backing_id = self.idle.pop(nodeid, 0)
        if backing_id:
            self._close(backing_id, self.cap)

    def reset(self) -> None:
        """FUSE_DESTROY: the connection ends, and the kernel lets go of every backing id with it."""
        with self._lock:
            self._opens.clear()
            self.idle.clear()
            self._evicted.clear()

    def _close(self, backing_id: int, cap: int) -> None:
        try:
            self.dev.backing_close(backing_id, cap)
            self.closed += 1
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.EBADF):  # the connection is gone: the kernel dropped them all
                return
            self.close_failed += 1
            if self.close_failed == 1:
                log.warning("passthrough: FUSE_DEV_IOC_BACKING_CLOSE %d: %s (the kernel keeps the id)",
                            backing_id, os.strerror(e.errno) if e.errno else e)

    def open_now(self) -> int:
        with self._lock:
            return sum(o.handles for o in self._opens.values() if o.backing_id)

    def counters(self) -> dict[str, object]:
        return {"opened": self.opened, "registered": self.registered, "closed": self.closed,
                "close_failed": self.close_failed, "open_now": self.open_now(), "idle": len(self.idle),
                "refused": dict(self.refused), "withheld_for_rules": self.withheld, "o_direct_served": self.direct,
                "enabled": self.enabled}
