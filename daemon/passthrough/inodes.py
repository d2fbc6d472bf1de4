"""Inode identity: nodeid <-> host inode, keyed by (st_dev, st_ino, mnt_id) (background 002/004).

Each inode is held either by a file handle (`name_to_handle_at`, reopened with `open_by_handle_at`
against one mount fd per host mount) or by an O_PATH fd.  Handles cost no fd, so a large tree does
not exhaust RLIMIT_NOFILE; O_PATH fds are the fallback where a filesystem has no handles
(`--inode-file-handles=prefer`), the only mode with `never`, and an error with `mandatory`.

Nodeids are never reused (a 64-bit counter), so a stale nodeid can only miss, never alias another
inode.  The generation is a store-wide counter taken when the inode is created.

A handle-held directory used recently keeps an O_PATH fd (at most DIR_FD_CACHE of them, least recently
used let go first, and at its FORGET): every name op (LOOKUP, CREATE, UNLINK, ...) under it would
otherwise open it from its handle and close it again, two syscalls for each request of a create or
stat storm.  Files are never cached: their O_PATH fd would keep an unlinked file's data alive.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum

from . import syscalls as sc

log = logging.getLogger("fsinspect.daemon.inodes")
ROOT_ID = 1
DIR_FD_CACHE = 64


class HandleMode(StrEnum):
    NEVER = "never"
    PREFER = "prefer"
    MANDATORY = "mandatory"


@dataclass(eq=False, slots=True)
class MountFd:
    """An fd on one host mount (not O_PATH: open_by_handle_at ignores those), refcounted by inodes."""

    mnt_id: int
    fd: int
    refs: int = 0


@dataclass(eq=False, slots=True)
class Inode:
    nodeid: int
    generation: int
    dev: int
    ino: int
    mnt_id: int
    mode: int  # file type bits (S_IFMT) + permissions at lookup time
    fd: int = -1  # O_PATH fd, or -1 when held by handle
    handle: bytes | None = None
    mount: MountFd | None = None
    nlookup: int = 0
    parent_mnt_id: int = 0  # the mount of the directory it was first found in (submount detection)
    cached_fd: int = -1  # a handle-held directory's O_PATH fd while it is in the store's cache
    lent: int = 0  # ops using cached_fd right now: it is closed only when none does

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.dev, self.ino, self.mnt_id)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class PathFd:
    """The context manager path_fd() returns: a plain class, as every request uses one (a generator-based
    one costs about a microsecond more)."""

    __slots__ = ("cached", "fd", "inode", "store")

    def __init__(self, store: InodeStore, inode: Inode) -> None:
        self.store = store
        self.inode = inode
        self.fd = -1
        self.cached = False

    def __enter__(self) -> int:
        ino = self.inode
        if ino.fd >= 0:
            return ino.fd
        if stat.S_ISDIR(ino.mode):
            self.fd, self.cached = self.store._lend_dir_fd(ino)
        else:
            self.fd = self.store._open_handle(ino, os.O_PATH)
        return self.fd

    def __exit__(self, *_exc: object) -> None:
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        if self.cached:
            self.store._return_dir_fd(self.inode, fd)
        else:
            os.close(fd)


class InodeStore:
    """Thread-safe nodeid table with nlookup refcounting."""

    def __init__(self, mode: HandleMode) -> None:
        self.mode = mode
        self._lock = threading.Lock()
        self._by_id: dict[int, Inode] = {}
        self._by_key: dict[tuple[int, int, int], Inode] = {}
        self._mounts: dict[int, MountFd] = {}
        self._dir_fds: OrderedDict[int, Inode] = OrderedDict()  # nodeid -> directory with a cached_fd, LRU first
        self._next_id = ROOT_ID + 1
        self._generation = 0
        self.handle_failures = 0
        # Where procfs is: "" once the sandbox has made it the cwd (daemon/sandbox.py), as the new root has none.
        self.proc = "/proc/"

    # ---------------------------------------------------------------- root
    def add_root(self, path: str) -> Inode:
        """The shared dir: always held by an O_PATH fd, never forgotten."""
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = sc.statx(fd)
        if self.mode is HandleMode.MANDATORY:
            try:
                handle, _mnt = sc.name_to_handle_at(fd)
                mfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.close(sc.open_by_handle_at(mfd, handle, os.O_PATH))
                finally:
                    os.close(mfd)
            except OSError as e:
                os.close(fd)
                raise OSError(e.errno, f"--inode-file-handles=mandatory: file handles do not work for {path}: "
                                       f"{e.strerror} (needs a filesystem that supports them and "
                                       "CAP_DAC_READ_SEARCH)") from None
        root = Inode(ROOT_ID, 0, st.st_dev, st.st_ino, st.mnt_id, st.st_mode, fd=fd, nlookup=1, parent_mnt_id=st.mnt_id)
        if self.mode is not HandleMode.NEVER:
            try:
                h, mnt_id = sc.name_to_handle_at(fd)
                # The shared dir itself is the mount fd for its mount, pinned for the session (refs 1).
                mfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                self._mounts[mnt_id] = MountFd(mnt_id, mfd, 1)
                os.close(sc.open_by_handle_at(mfd, h, os.O_PATH))
            except OSError as e:
                if e.errno == errno.EPERM and self.mode is HandleMode.PREFER:
                    # Without CAP_DAC_READ_SEARCH (not root) handles can be made but not opened.
                    log.info("file handles need CAP_DAC_READ_SEARCH; holding inodes by O_PATH fds")
                    self.mode = HandleMode.NEVER
        with self._lock:
            self._by_id[ROOT_ID] = root
            self._by_key[root.key] = root
        return root

    # ---------------------------------------------------------------- access
    def get(self, nodeid: int) -> Inode:
        ino = self._by_id.get(nodeid)
        if ino is None:
            raise OSError(errno.EBADF, f"unknown nodeid {nodeid}")
        return ino

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, nodeid: int) -> bool:
        return nodeid in self._by_id

    def path_fd(self, inode: Inode) -> PathFd:
        """`with store.path_fd(inode) as fd`: an O_PATH fd for *at() calls, closed afterwards when it was
        opened from a handle."""
        return PathFd(self, inode)

    def _lend_dir_fd(self, ino: Inode) -> tuple[int, bool]:
        """A handle-held directory's O_PATH fd: (fd, True) from the cache, to give back with _return_dir_fd;
        (fd, False) for an fd of the caller's own to close (the inode was forgotten meanwhile)."""
        with self._lock:
            if ino.cached_fd >= 0:
                ino.lent += 1
                self._dir_fds.move_to_end(ino.nodeid)
                return ino.cached_fd, True
        fd = self._open_handle(ino, os.O_PATH)  # outside the lock: the kernel may take a while
        evicted = -1
        with self._lock:
            if ino.cached_fd >= 0:  # another thread cached one meanwhile: use that
                ino.lent += 1
                cached = ino.cached_fd
            elif self._by_id.get(ino.nodeid) is not ino:
                return fd, False
            else:
                ino.cached_fd, ino.lent, cached = fd, ino.lent + 1, -1
                self._dir_fds[ino.nodeid] = ino
                if len(self._dir_fds) > DIR_FD_CACHE:
                    old = next((d for d in self._dir_fds.values() if d.lent == 0), None)
                    if old is not None:
                        del self._dir_fds[old.nodeid]
                        evicted, old.cached_fd = old.cached_fd, -1
        if cached >= 0:
            os.close(fd)
            return cached, True
        if evicted >= 0:
            os.close(evicted)
        return fd, True

    def _return_dir_fd(self, ino: Inode, fd: int) -> None:
        with self._lock:
            ino.lent -= 1
            orphan = ino.lent == 0 and ino.cached_fd != fd  # forgotten while lent: closing fell to the last user
        if orphan:
            os.close(fd)

    def reopen(self, inode: Inode, flags: int) -> int:
        """A new open file description on the inode (the caller closes it)."""
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY)
        if stat.S_ISLNK(inode.mode):
            raise OSError(errno.ELOOP, "is a symlink")
        if not (stat.S_ISREG(inode.mode) or stat.S_ISDIR(inode.mode)):
            # Device nodes, FIFOs and sockets are opened by the client kernel itself, never through the
            # daemon: opening a guest-made device node here would reach the host device (and a FIFO
            # would block the daemon).
            raise OSError(errno.EPERM, "the daemon opens only regular files and directories")
        if inode.fd >= 0:
            return os.open(f"{self.proc}self/fd/{inode.fd}", flags | os.O_CLOEXEC)
        return self._open_handle(inode, flags)

    def _open_handle(self, inode: Inode, flags: int) -> int:
        assert inode.handle is not None and inode.mount is not None
        return sc.open_by_handle_at(inode.mount.fd, inode.handle, flags)

    # ---------------------------------------------------------------- lookup
    def find_known(self, pfd: int, name: bytes, st: sc.Statx) -> Inode | None:
        """Fast LOOKUP of an inode we already hold, from a by-name statx: account one lookup, or None.

        An O_PATH-held inode pins its st_ino, so the key alone identifies it; a handle-held one must also
        match its handle (the old inode may be gone and its st_ino reused)."""
        key = (st.st_dev, st.st_ino, st.mnt_id)
        ino = self._by_key.get(key)
        if ino is None:
            return None
        if ino.fd < 0:
            try:
                handle, _mnt = sc.name_to_handle_at(pfd, name, 0)
            except OSError:
                return None
            if handle != ino.handle:
                return None
        with self._lock:
            if self._by_key.get(key) is not ino or self._by_id.get(ino.nodeid) is not ino:
                return None
            ino.nlookup += 1
        return ino

    def find_or_add(self, fd: int, st: sc.Statx, parent: Inode, *, force_fd: bool = False,
                    owned: bool = True) -> Inode:
        """Account one lookup of the inode behind `fd`.  An owned fd (O_PATH) is kept or closed; a borrowed
        one (an open file, owned=False) stays the caller's, and an O_PATH twin is made if one must be kept."""
        try:
            ino, kept = self._find_or_add(fd, st, parent, force_fd, owned)
        except BaseException:
            if owned:
                os.close(fd)
            raise
        if owned and not kept:
            os.close(fd)
        return ino

    def _find_or_add(self, fd: int, st: sc.Statx, parent: Inode, force_fd: bool,
                     owned: bool) -> tuple[Inode, bool]:
        key = (st.st_dev, st.st_ino, st.mnt_id)
        with self._lock:
            ino = self._by_key.get(key)
            if ino is not None and (ino.fd >= 0 or self.mode is HandleMode.NEVER or force_fd):
                # An O_PATH fd pins the host inode, so its st_ino can't have been reused.
                ino.nlookup += 1
                return ino, False
        handle: bytes | None = None
        mnt_id = 0
        if self.mode is not HandleMode.NEVER and not force_fd:
            try:
                handle, mnt_id = sc.name_to_handle_at(fd)
            except OSError as e:
                self.handle_failures += 1
                if self.mode is HandleMode.MANDATORY:
                    log.error("--inode-file-handles=mandatory: no file handle for an inode on st_dev %d: %s",
                              st.st_dev, e.strerror)
                    raise OSError(e.errno or errno.EOPNOTSUPP, "file handles unavailable") from None
        with self._lock:
            ino = self._by_key.get(key)
            if ino is not None and (ino.fd >= 0 or ino.handle == handle):
                ino.nlookup += 1
                return ino, False
            # Either new, or the key's old inode was deleted and its st_ino reused (handle differs).
            mount = self._mount_for(mnt_id, fd, st, parent) if handle is not None else None
            if handle is not None and mount is None:
                if self.mode is HandleMode.MANDATORY:
                    raise OSError(errno.EOPNOTSUPP, "no mount fd for a file handle")
                handle = None
            keep_fd = -1
            if handle is None:
                keep_fd = fd if owned else os.open(f"{self.proc}self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
            self._generation += 1
            new = Inode(self._next_id, self._generation, st.st_dev, st.st_ino, st.mnt_id, st.st_mode, fd=keep_fd,
                        handle=handle, mount=mount, nlookup=1, parent_mnt_id=parent.mnt_id)
            if mount is not None:
                mount.refs += 1
            self._next_id += 1
            self._by_id[new.nodeid] = new
            self._by_key[key] = new
            return new, keep_fd == fd

    def _mount_for(self, mnt_id: int, fd: int, st: sc.Statx, parent: Inode) -> MountFd | None:
        """The mount fd for `mnt_id`, opened from this inode if it is a directory, else from its parent."""
        m = self._mounts.get(mnt_id)
        if m is not None:
            return m
        # A directory, never a file: a mount fd on a file would keep that file alive (and its handle valid).
        mfd = -1
        try:
            if stat.S_ISDIR(st.st_mode):
                mfd = os.open(f"{self.proc}self/fd/{fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            elif parent.mnt_id == st.mnt_id:
                # Under the store's lock: not through path_fd (its directory cache takes that lock).
                pfd = parent.fd if parent.fd >= 0 else self._open_handle(parent, os.O_PATH)
                try:
                    mfd = os.open(f"{self.proc}self/fd/{pfd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                finally:
                    if pfd != parent.fd:
                        os.close(pfd)
        except OSError as e:
            log.debug("no mount fd for mount %d: %s", mnt_id, e)
            return None
        if mfd < 0:
            return None
        m = MountFd(mnt_id, mfd)
        self._mounts[mnt_id] = m
        return m

    # ---------------------------------------------------------------- forget
    def forget(self, nodeid: int, n: int) -> None:
        if nodeid == ROOT_ID:
            return
        with self._lock:
            ino = self._by_id.get(nodeid)
            if ino is None:
                log.warning("FORGET of unknown nodeid %d ignored", nodeid)
                return
            if n > ino.nlookup:
                log.warning("FORGET %d of nodeid %d exceeds its nlookup %d; dropping it", n, nodeid, ino.nlookup)
            ino.nlookup = max(0, ino.nlookup - n)
            if ino.nlookup == 0:
                self._drop(ino)

    def _drop(self, ino: Inode) -> None:
        del self._by_id[ino.nodeid]
        if self._by_key.get(ino.key) is ino:
            del self._by_key[ino.key]
        if ino.fd >= 0:
            os.close(ino.fd)
            ino.fd = -1
        if ino.cached_fd >= 0:
            del self._dir_fds[ino.nodeid]
            if ino.lent == 0:
                os.close(ino.cached_fd)
            ino.cached_fd = -1  # else the last op using it closes it
        m = ino.mount
        if m is not None:
            m.refs -= 1
            if m.refs <= 0:
                del self._mounts[m.mnt_id]
                os.close(m.fd)

    def clear(self) -> None:
        """DESTROY: drop every inode but the root."""
        with self._lock:
            for ino in list(self._by_id.values()):
                if ino.nodeid != ROOT_ID:
                    self._drop(ino)

    def close(self) -> None:
        self.clear()
        with self._lock:
            root = self._by_id.pop(ROOT_ID, None)
            if root is not None and root.fd >= 0:
                os.close(root.fd)
                root.fd = -1
            self._by_key.clear()
            for m in self._mounts.values():
                os.close(m.fd)
            self._mounts.clear()

    def counts(self) -> dict[str, int]:
        with self._lock:
            by_fd = sum(1 for i in self._by_id.values() if i.fd >= 0)
            return {"inodes": len(self._by_id), "held_by_fd": by_fd, "held_by_handle": len(self._by_id) - by_fd,
                    "mount_fds": len(self._mounts), "handle_failures": self.handle_failures,
                    "dir_fds_cached": len(self._dir_fds)}
