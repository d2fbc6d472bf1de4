"""Inode identity: nodeid <-> host inode, keyed by (st_dev, st_ino, mnt_id) (background 002/004).

Each inode is held either by a file handle (`name_to_handle_at`, reopened with `open_by_handle_at`
against one mount fd per host mount) or by an O_PATH fd.  Handles cost no fd, so a large tree does
not exhaust RLIMIT_NOFILE; O_PATH fds are the fallback where a filesystem has no handles
(`--inode-file-handles=prefer`), the only mode with `never`, and an error with `mandatory`.

Nodeids are never reused (a 64-bit counter), so a stale nodeid can only miss, never alias another
inode.  The generation is a store-wide counter taken when the inode is created.

A handle-held inode used recently keeps an O_PATH fd in a bounded cache (InodeStore.fd_cache_max of them,
a fraction of RLIMIT_NOFILE, see fd_cache_bound; second-chance eviction of the oldest; closed at its FORGET):
the point of handles is not holding an fd per inode, so the cache's size is explicit and never exceeded.
- A directory's serves every name op under it (LOOKUP, CREATE, UNLINK, ...), which would otherwise open it
  from its handle and close it again, two syscalls for each request of a create or stat storm.
- A file's (or symlink's) serves GETATTR only (InodeStore.stat): one fstat, as the C virtiofsd does on the
  O_PATH fd it holds, where the handle costs open_by_handle_at, fstat and close.  A cached fd whose file
  shows no link left (deleted on the host) is let go and the stat goes through the handle, as it did
  before: ESTALE once the inode is gone, so an unlinked file's data is not kept alive by the cache.  The
  other ops on a file still open it from its handle, and where the file has a cached fd (which keeps the
  host inode alive, so the handle still opens it) and no link left, the cached fd is let go and the
  handle asked again: every op answers as without the cache.
- A LOOKUP that finds a new handle-held inode opened an O_PATH fd on it anyway: that fd goes into the cache
  instead of being closed.
- A cached inode is pinned, so its st_ino can't be reused: a LOOKUP that finds its key needs no handle to
  compare (as for an O_PATH-held inode).

An op that uses an inode's fds (its O_PATH fd, its cached fd, its mount's fd for open_by_handle_at) lends the
inode for that time (InodeStore._lend / _give_back, PathFd), as the C virtiofsd's lo_inode refcount does: a
FORGET that drops it meanwhile (a kernel never sends one for an inode in use, a hostile guest can, on the hiprio
queue) takes it out of the tables at once but leaves its fds and its mount reference to the last op using it.
Closed at once, an fd's number would go to the daemon's next open (a recording part, a log) and the op would run
on that file: an OPEN through /proc/self/fd/N would hand the guest a file outside the shared directory.  The
root's fd lives as long as the store and is not lent.

The store grows the process's fd table once, when it is made (reserve_fd_table), to hold its fd cache and
FD_TABLE_HEADROOM more.  The kernel grows a table by doubling it, and when the table is shared by threads
(as the serving daemon's is) each doubling waits for an RCU grace period (fs/file.c, expand_fdtable:
synchronize_rcu), during which every thread that opens an fd waits too: 5 to 15 ms each at 256, 512,
1024, 2048 fds on this VM, where a LOOKUP takes 11 us.  Made before the serving threads start, the
growth waits for nothing; the table costs 8 bytes per fd (32 KiB for 4096).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import resource
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum

from . import syscalls as sc

log = logging.getLogger("fsinspect.daemon.inodes")
ROOT_ID = 1
FD_CACHE_MIN = 64  # the directory cache's old size: a low RLIMIT_NOFILE still gets that many
FD_CACHE_MAX = 8192
FD_CACHE_SHARE = 8  # at most 1/8 of RLIMIT_NOFILE: open files, O_PATH-held inodes and mount fds need the rest
FD_TABLE_HEADROOM = 1024  # fds the table is grown for beyond the cache: open files, the transport's, mount fds


def fd_cache_bound(nofile: int | None = None) -> int:
    """How many O_PATH fds the store may cache: 1/FD_CACHE_SHARE of the soft RLIMIT_NOFILE (read now when
    not given), within [FD_CACHE_MIN, FD_CACHE_MAX]."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY or nofile < 0:
        nofile = FD_CACHE_MAX * FD_CACHE_SHARE
    return max(FD_CACHE_MIN, min(nofile // FD_CACHE_SHARE, FD_CACHE_MAX))


def reserve_fd_table(fds: int) -> int:
    """Grow this process's fd table now so that it holds `fds` descriptors (at most the soft RLIMIT_NOFILE);
    return the lowest fd the reservation reached (0: none, the limit or the kernel refused it).

    F_DUPFD asks for a descriptor at or above an index, so the kernel grows the table to fit it; the
    duplicate is closed at once.  It never replaces an open fd (dup2 would) and the table never shrinks."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft >= 0:
        fds = min(fds, soft)
    if fds <= 1:
        return 0
    probe = os.open("/", os.O_PATH | os.O_CLOEXEC)
    try:
        high = fcntl.fcntl(probe, fcntl.F_DUPFD_CLOEXEC, fds - 1)
    except OSError:
        return 0
    finally:
        os.close(probe)
    os.close(high)
    return high


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
    """One host inode the store holds.  Its C twin, _fast.Inode (the same fields in the same order, checked at
    load), is what a store served by the C fast path holds: the C makes a new one and reads and changes its
    fields without the interpreter."""

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
    cached_fd: int = -1  # a handle-held inode's O_PATH fd while it is in the store's cache
    lent: int = 0  # ops using cached_fd right now: it is closed only when none does
    used: bool = False  # cached_fd was used since the eviction scan last passed it (second chance)

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.dev, self.ino, self.mnt_id)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class PathFd:
    """The context manager path_fd() returns: a plain class, as every request uses one (a generator-based
    one costs about a microsecond more).  It lends the inode (InodeStore._lend) for as long as the fd is in
    use, so a FORGET meanwhile leaves the fd open until the op is done (the root's lives as long as the store)."""

    __slots__ = ("fd", "inode", "lent", "store")

    def __init__(self, store: InodeStore, inode: Inode) -> None:
        self.store = store
        self.inode = inode
        self.fd = -1
        self.lent = False

    def __enter__(self) -> int:
        ino = self.inode
        if ino.nodeid == ROOT_ID:
            return ino.fd
        store = self.store
        is_dir = stat.S_ISDIR(ino.mode)
        cached = store._lend(ino, is_dir)
        self.lent = True
        if ino.fd >= 0:
            return ino.fd
        if cached >= 0:
            return cached
        try:
            self.fd = store._fill_cache(ino) if is_dir else store._open_handle(ino, os.O_PATH)
        except BaseException:
            self.lent = False
            store._give_back(ino)
            raise
        return ino.cached_fd if self.fd < 0 else self.fd

    def __exit__(self, *_exc: object) -> None:
        fd, self.fd = self.fd, -1
        try:
            if fd >= 0:
                os.close(fd)
        finally:
            if self.lent:
                self.lent = False
                self.store._give_back(self.inode)


class InodeStore:
    """Thread-safe nodeid table with nlookup refcounting."""

    def __init__(self, mode: HandleMode, fd_cache_max: int | None = None, inode_type: type[Inode] = Inode) -> None:
        self.mode = mode
        # What holds each inode: this module's Inode, or its C twin (_fast.Inode, the same fields) where the C
        # fast path serves the store: it reads that one's fields directly.
        self.inode_type = inode_type
        self.fd_cache_max = fd_cache_bound() if fd_cache_max is None else fd_cache_max
        reserve_fd_table(self.fd_cache_max + FD_TABLE_HEADROOM)
        self._lock = threading.Lock()
        self._by_id: dict[int, Inode] = {}
        self._by_key: dict[tuple[int, int, int], Inode] = {}
        self._mounts: dict[int, MountFd] = {}
        self._cached: OrderedDict[int, Inode] = OrderedDict()  # nodeid -> inode with a cached_fd, oldest first
        self._orphans: dict[int, list[int]] = {}  # nodeid -> its cached fds let go while lent: its last user closes
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
        root = self.inode_type(ROOT_ID, 0, st.st_dev, st.st_ino, st.mnt_id, st.st_mode, fd=fd, nlookup=1, parent_mnt_id=st.mnt_id)
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

    def _lend(self, ino: Inode, use_cached: bool) -> int:
        """One more op using the inode's fds (its O_PATH fd, its cached fd, its mount's fd): none of them is
        closed until every such op gave it back (_give_back), even if the inode is forgotten meanwhile, as
        the C virtiofsd's lo_inode refcount keeps its fd (a guest can FORGET an inode while a request on it
        runs; closed at once, the fd's number could be reused by the daemon's next open and the op would
        run on another file).  Its cached fd (marked used when `use_cached`), or -1.  EBADF when the inode
        was forgotten already, as for its nodeid."""
        with self._lock:
            if ino.nlookup <= 0:
                raise OSError(errno.EBADF, f"unknown nodeid {ino.nodeid}")
            ino.lent += 1
            fd = ino.cached_fd
            if use_cached and fd >= 0:
                ino.used = True
            return fd

    def _give_back(self, ino: Inode) -> None:
        """The end of an op that lent the inode: the last one closes what was let go meanwhile."""
        with self._lock:
            ino.lent -= 1
            if ino.lent == 0 and (ino.nlookup <= 0 or self._orphans):
                self._settle_locked(ino)

    def _settle_locked(self, ino: Inode) -> None:
        """No op uses the inode's fds any more: close its cached fds let go meanwhile, and its fds and mount
        reference if it was forgotten."""
        for fd in self._orphans.pop(ino.nodeid, ()):
            os.close(fd)
        if ino.nlookup <= 0:
            self._release_locked(ino)

    def _fill_cache(self, ino: Inode) -> int:
        """A lent handle-held directory without a cached fd: one opened from its handle becomes its cached one
        (-1 returned: use ino.cached_fd, kept while lent), or the fd, the caller's to close (the inode was
        forgotten meanwhile)."""
        fd = self._open_handle(ino, os.O_PATH)  # outside the lock: the kernel may take a while
        with self._lock:
            if ino.cached_fd >= 0:  # another thread cached one meanwhile: use that
                evicted = fd
            elif ino.nlookup <= 0:
                return fd
            else:
                evicted = self._cache_locked(ino, fd)
        if evicted >= 0:
            os.close(evicted)
        return -1

    def _cache_locked(self, ino: Inode, fd: int) -> int:
        """Cache `fd` as the inode's (it has none); the fd evicted to stay within fd_cache_max, for the caller
        to close after the lock, or -1.  Second chance: the oldest not used since the last pass goes; one
        in use by an op (lent) is skipped, so the bound may be passed by as many fds as ops run at once."""
        ino.cached_fd, ino.used = fd, False
        self._cached[ino.nodeid] = ino
        return self._evict_locked()

    def _evict_locked(self) -> int:
        """_cache_locked's eviction, once an fd was added (the C fast path adds one itself, then calls this
        when the cache is over its bound)."""
        if len(self._cached) <= self.fd_cache_max:
            return -1
        for _ in range(len(self._cached)):
            nodeid, old = next(iter(self._cached.items()))
            if old.lent == 0 and not old.used:
                del self._cached[nodeid]
                evicted, old.cached_fd = old.cached_fd, -1
                return evicted
            old.used = False
            self._cached.move_to_end(nodeid)
        return -1

    def keep_fd(self, ino: Inode, fd: int) -> bool:
        """Cache an O_PATH fd the caller opened on the handle-held inode `ino` (a GETATTR's from its handle, a
        LOOKUP's on its name): True if the store took it, False if the caller still closes it (the inode has
        one cached already, or was forgotten)."""
        with self._lock:
            if ino.cached_fd >= 0 or ino.fd >= 0 or self._by_id.get(ino.nodeid) is not ino:
                return False
            evicted = self._cache_locked(ino, fd)
        if evicted >= 0:
            os.close(evicted)
        return True

    def drop_cached_fd(self, ino: Inode, held: int = 0) -> None:
        """Let go of the inode's cached fd (its file showed no link left): closed now, or, when other ops than
        the caller's `held` lendings have the inode lent (one may be using the fd), by its last user
        (InodeStore._orphans until then)."""
        with self._lock:
            fd = ino.cached_fd
            if fd < 0 or ino.nlookup <= 0:  # a forgotten inode's goes with its last user
                return
            del self._cached[ino.nodeid]
            ino.cached_fd = -1
            if ino.lent > held:
                self._orphans.setdefault(ino.nodeid, []).append(fd)
                return
        os.close(fd)

    def stat(self, ino: Inode) -> os.stat_result:
        """GETATTR's stat: the inode's O_PATH fd, its cached fd, or (a miss) an fd from its handle that is
        then cached.  A cached fd whose file has no link left is let go and the handle asked again (ESTALE
        once the inode is gone, as without the cache).  The inode is lent meanwhile (_lend)."""
        if ino.nodeid == ROOT_ID:
            return os.stat(ino.fd)
        cached = self._lend(ino, True)
        try:
            if ino.fd >= 0:
                return os.stat(ino.fd)
            if cached >= 0:
                st = os.stat(cached)
                if st.st_nlink > 0 or stat.S_ISDIR(st.st_mode):
                    return st
                self.drop_cached_fd(ino, 1)
            fd = self._open_handle(ino, os.O_PATH)
            try:
                st = os.stat(fd)
            except BaseException:
                os.close(fd)
                raise
            if cached >= 0 or (st.st_nlink == 0 and not stat.S_ISDIR(st.st_mode)) or not self.keep_fd(ino, fd):
                os.close(fd)
            return st
        finally:
            self._give_back(ino)

    def reopen(self, inode: Inode, flags: int) -> int:
        """A new open file description on the inode (the caller closes it), the inode lent meanwhile."""
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY)
        if stat.S_ISLNK(inode.mode):
            raise OSError(errno.ELOOP, "is a symlink")
        if not (stat.S_ISREG(inode.mode) or stat.S_ISDIR(inode.mode)):
            # Device nodes, FIFOs and sockets are opened by the client kernel itself, never through the
            # daemon: opening a guest-made device node here would reach the host device (and a FIFO
            # would block the daemon).
            raise OSError(errno.EPERM, "the daemon opens only regular files and directories")
        if inode.nodeid == ROOT_ID:
            return os.open(f"{self.proc}self/fd/{inode.fd}", flags | os.O_CLOEXEC)
        self._lend(inode, False)
        try:
            if inode.fd >= 0:
                return os.open(f"{self.proc}self/fd/{inode.fd}", flags | os.O_CLOEXEC)
            return self._open_handle(inode, flags)
        finally:
            self._give_back(inode)

    def _open_handle(self, inode: Inode, flags: int) -> int:
        """open_by_handle_at, with the answer it would give without the cache: a file's cached fd keeps its
        host inode alive, so a file deleted on the host (no link left) lets it go and asks again (ESTALE
        once the inode is gone)."""
        assert inode.handle is not None and inode.mount is not None
        fd = sc.open_by_handle_at(inode.mount.fd, inode.handle, flags)
        if inode.cached_fd < 0 or stat.S_ISDIR(inode.mode):
            return fd
        try:
            alive = os.stat(fd).st_nlink > 0
        except BaseException:
            os.close(fd)
            raise
        if alive:
            return fd
        os.close(fd)
        self.drop_cached_fd(inode, 1)  # (every caller has the inode lent)
        return sc.open_by_handle_at(inode.mount.fd, inode.handle, flags)

    # ---------------------------------------------------------------- lookup
    def find_known(self, pfd: int, name: bytes, st: sc.Statx) -> Inode | None:
        """Fast LOOKUP of an inode we already hold, from a by-name statx: account one lookup, or None.

        An O_PATH-held inode pins its st_ino, so the key alone identifies it, as does a handle-held one with
        a cached fd (cached now, so alive at the statx, so the inode it found); any other handle-held one
        must also match its handle (the old inode may be gone and its st_ino reused)."""
        key = (st.st_dev, st.st_ino, st.mnt_id)
        ino = self._by_key.get(key)
        if ino is None:
            return None
        if ino.fd < 0 and ino.cached_fd < 0:
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
        """Account one lookup of the inode behind `fd`.  An owned fd (O_PATH) is kept (as a new inode's own
        fd, or a new handle-held inode's cached one) or closed; a borrowed one (an open file, owned=False)
        stays the caller's, and an O_PATH twin is made if one must be kept."""
        evicted = -1
        try:
            ino, kept, evicted = self._find_or_add(fd, st, parent, force_fd, owned)
        except BaseException:
            if owned:
                os.close(fd)
            raise
        if owned and not kept:
            os.close(fd)
        if evicted >= 0:
            os.close(evicted)
        return ino

    def _find_or_add(self, fd: int, st: sc.Statx, parent: Inode, force_fd: bool,
                     owned: bool) -> tuple[Inode, bool, int]:
        """(the inode, whether it kept `fd`, an fd evicted from the cache for the caller to close or -1)"""
        key = (st.st_dev, st.st_ino, st.mnt_id)
        with self._lock:
            ino = self._by_key.get(key)
            if ino is not None and (ino.fd >= 0 or ino.cached_fd >= 0 or self.mode is HandleMode.NEVER or force_fd):
                # An O_PATH fd (its own or a cached one) pins the host inode, so its st_ino can't have been reused.
                ino.nlookup += 1
                return ino, False, -1
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
                return ino, False, -1
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
            new = self.inode_type(self._next_id, self._generation, st.st_dev, st.st_ino, st.mnt_id, st.st_mode, fd=keep_fd,
                        handle=handle, mount=mount, nlookup=1, parent_mnt_id=parent.mnt_id)
            if mount is not None:
                mount.refs += 1
            self._next_id += 1
            self._by_id[new.nodeid] = new
            self._by_key[key] = new
            if keep_fd < 0 and owned and not force_fd:
                # Handle-held: the O_PATH fd opened to find it becomes its cached one, not closed.
                return new, True, self._cache_locked(new, fd)
            return new, keep_fd == fd, -1

    def _mount_for(self, mnt_id: int, fd: int, st: sc.Statx, parent: Inode) -> MountFd | None:
        """The mount fd for `mnt_id`, opened from this inode if it is a directory, else from its parent."""
        m = self._mounts.get(mnt_id)
        if m is not None:
            return m
        if parent.nlookup <= 0 and parent.lent == 0:
            return None  # the parent was forgotten meanwhile: its fds are closed
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
        """The inode leaves both tables; its fds and its mount's reference go now, or with the last op that has
        it lent (_give_back)."""
        del self._by_id[ino.nodeid]
        if self._by_key.get(ino.key) is ino:
            del self._by_key[ino.key]
        ino.nlookup = 0
        if ino.cached_fd >= 0:
            del self._cached[ino.nodeid]
        if ino.lent == 0:
            self._release_locked(ino)

    def _release_locked(self, ino: Inode) -> None:
        """A forgotten inode that no op uses: its O_PATH fd, its cached fd and its mount's reference go."""
        if ino.fd >= 0:
            os.close(ino.fd)
            ino.fd = -1
        if ino.cached_fd >= 0:
            os.close(ino.cached_fd)
            ino.cached_fd = -1
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
                    "fds_cached": len(self._cached)}
