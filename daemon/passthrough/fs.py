"""The passthrough filesystem: serves one host directory, confined to it.

Confinement: every name-based op is an *at() call relative to the parent's fd, with O_NOFOLLOW where it
applies, and names are checked (no '/', no NUL, at most 255 bytes, '.'/'..' only in LOOKUP, where '..' of
the root is the root).  Inodes are reopened through their handle or /proc/self/fd, never by path, so a
symlink swapped in by the host can't redirect an op outside the shared directory.

Credentials: files are created with the caller's uid/gid by switching this thread's fsuid/fsgid around
the creating call only (a non-zero fsuid drops CAP_DAC_READ_SEARCH, which open_by_handle_at needs), as
virtiofsd does.  The caller's supplementary groups come with the request (FUSE_CREATE_SUPP_GROUP: the
kernel sends the parent directory's group when the caller is a member) and are set on the thread for
that call; otherwise the thread has none, never root's.  The kernel already applied the caller's umask
(we don't negotiate DONT_MASK), so the threads that create run with umask 0 in their own fs_struct
(unshare(CLONE_FS)); the process umask, which governs the daemon's own files, is left alone.

Set-user-ID/set-group-ID bits: a write, truncate or O_TRUNC open flagged KILL_SUIDGID by the kernel
runs with CAP_FSETID lowered, so the host kernel clears the bits as it would for the caller.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from daemon.lockwait import interruptible
from daemon.server import (
    INLINE_IO_MAX,
    INLINE_WRITE_MAX,
    Context,
    DirEntry,
    Entry,
    FastPath,
    FileSystem,
    StatLike,
)
from dissectors.fuse import CODECS, make
from dissectors.spec import fuse as spec

from . import syscalls as sc
from .backing import BackingFiles
from .inodes import ROOT_ID, HandleMode, Inode, InodeStore

log = logging.getLogger("fsinspect.daemon.passthrough")

INIT = spec.INIT_FLAGS.by_name()
FOPEN = spec.FOPEN.by_name()
FATTR = spec.FATTR.by_name()
WRITE_KILL_SUIDGID = spec.WRITE_FLAGS.by_name()["KILL_SUIDGID"]
OPEN_KILL_SUIDGID = spec.OPEN_IN_FLAGS.by_name()["KILL_SUIDGID"]
ATTR_SUBMOUNT = spec.ATTR_FLAGS.by_name()["SUBMOUNT"]
GETATTR_FH = spec.GETATTR_FLAGS.by_name()["FH"]
LK_FLOCK = spec.LK_FLAGS.by_name()["FLOCK"]
RELEASE_FLUSH = spec.RELEASE_FLAGS.by_name()["FLUSH"]
LOCK_TYPE = spec.LOCK_TYPE.by_name()
RENAME_FLAGS_OK = sum(v for _, v in spec.RENAME_FLAGS.bits)
W_OK = spec.ACCESS_MASK.by_name()["W_OK"]
NAME_MAX = 255
DT = spec.DIRENT_TYPE.by_name()
_IFMT_TO_DT = {stat.S_IFDIR: DT["DT_DIR"], stat.S_IFREG: DT["DT_REG"], stat.S_IFLNK: DT["DT_LNK"],
               stat.S_IFCHR: DT["DT_CHR"], stat.S_IFBLK: DT["DT_BLK"], stat.S_IFIFO: DT["DT_FIFO"],
               stat.S_IFSOCK: DT["DT_SOCK"]}


class CacheMode(StrEnum):
    NONE = "none"
    AUTO = "auto"
    ALWAYS = "always"
    METADATA = "metadata"


# virtiofsd's policies: (entry/attr timeout, FOPEN flags for files, FOPEN flags for dirs).
CACHE_POLICY: dict[CacheMode, tuple[float, int, int]] = {
    CacheMode.NONE: (0.0, FOPEN["DIRECT_IO"], 0),
    CacheMode.AUTO: (1.0, 0, 0),
    CacheMode.ALWAYS: (86400.0, FOPEN["KEEP_CACHE"], FOPEN["CACHE_DIR"] | FOPEN["KEEP_CACHE"]),
    CacheMode.METADATA: (86400.0, FOPEN["DIRECT_IO"], 0),
}


@dataclass
class Options:
    shared_dir: str
    cache: CacheMode = CacheMode.AUTO
    inode_file_handles: HandleMode = HandleMode.PREFER
    announce_submounts: bool = True
    writeback: bool = False
    xattr: bool = False
    readonly: bool = False
    # Standalone only: the caller's groups from /proc/PID/status where the kernel sends none.
    proc_groups: bool = False
    # Standalone only: ask for FUSE_PASSTHROUGH (backing.py); needs `PassthroughFS.backing` set.
    passthrough: bool = False


@dataclass(eq=False)
class Handle:
    """An open file or directory (fh)."""

    fd: int
    inode: Inode
    is_dir: bool = False
    backing_id: int = -1  # passthrough sessions: the backing id answered (0: none), -1: not counted
    listing: list[DirEntry] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Who holds the fd: one entry for fs._handles, one per op using it (PassthroughFS._hold, the C's
    # handle_hold).  RELEASE takes the handle out of the table at once; the last holder closes the fd, so a
    # hostile guest's RELEASE racing a READ or WRITE cannot free the number for the daemon's next open under
    # it.  Lists: append and pop are atomic under the GIL, for the C fast path and Python alike.
    users: list[None] = field(default_factory=lambda: [None])
    unclosed: list[None] = field(default_factory=lambda: [None])  # taken by the one holder that closes

    def give_back(self) -> None:
        """One holder done with the fd: the last one closes it (once, whoever races it)."""
        self.users.pop()
        if not self.users:
            try:
                self.unclosed.pop()
            except IndexError:
                return
            os.close(self.fd)


def check_name(name: bytes, *, lookup: bool = False) -> None:
    if not name or b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, f"invalid name {name!r}")
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name longer than 255 bytes")
    if not lookup and name in (b".", b".."):
        raise OSError(errno.EINVAL, f"{name!r} is not allowed here")


_thread = threading.local()
_UNCHANGED: AbstractContextManager[None] = nullcontext()  # the common case of _creds and _kill_suidgid: no change


def _prepare_thread(privileged: bool) -> bool:
    """Once per serving thread: its own fs_struct with umask 0 and, as root, no supplementary groups (so a
    caller never borrows root's).  False on the main thread, whose umask is the daemon's own."""
    ready: bool | None = getattr(_thread, "ready", None)
    if ready is None:
        ready = threading.current_thread() is not threading.main_thread()
        if ready:
            try:
                sc.unshare_fs()
                os.umask(0)
                if privileged:
                    sc.setgroups_thread(())
            except OSError as e:
                log.warning("a private umask for %s: %s", threading.current_thread().name, e)
                ready = False
        _thread.ready = ready
    return ready


def proc_groups(pid: int, proc: str = "/proc/") -> tuple[int, ...]:
    """The caller's supplementary groups from /proc/PID/status, for kernels without FUSE_CREATE_SUPP_GROUP
    (standalone mode only: a virtio-fs pid is the guest's).  The caller is blocked in its syscall while we
    read, so the pid is its own unless it was killed meanwhile and the pid reused; the kernel already
    checked the caller's permission (default_permissions), so this only lets the host agree."""
    if pid <= 0:
        return ()
    try:
        with open(f"{proc}{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


class PassthroughFS(FileSystem):
    # An entry announced FUSE_ATTR_SUBMOUNT carries generation 0 (virtio-fs guests: daemon/vhost.py says why).
    zero_submount_generation = False

    def __init__(self, opts: Options) -> None:
        if not os.path.isdir(opts.shared_dir):
            raise OSError(errno.ENOTDIR, f"shared dir {opts.shared_dir} is not a directory")
        self.opts = opts
        # The C fast path's own Inode object where it is on (its twin, the dataclass, where it is not).
        native = _fast_module()
        self.store = InodeStore(HandleMode(opts.inode_file_handles), inode_type=Inode if native is None else native.Inode)
        self.root = self.store.add_root(opts.shared_dir)
        timeout, self._fopen_file, self._fopen_dir = CACHE_POLICY[CacheMode(opts.cache)]
        self.timeout = timeout
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._lock = threading.Lock()
        self._switch_creds = os.geteuid() == 0
        self.submounts = False
        self.writeback = False
        self.syncfs_by_dev: Counter[int] = Counter()
        self._lock_fds: dict[tuple[int, int], int] = {}
        self.kernel_groups = False  # FUSE_CREATE_SUPP_GROUP negotiated
        self.backing: BackingFiles | None = None  # set by a transport that can register backing files
        self.passthrough = False  # FUSE_PASSTHROUGH negotiated
        self.max_stack_depth = _stack_depth(opts.shared_dir)
        self._fsetid = self._switch_creds and sc.has_effective_cap(sc.CAP_FSETID)

    def reroot(self, path: str, proc: str) -> None:
        """Hold the shared dir afresh as `path` with procfs at `proc`: the sandbox's view of them.

        An fd opened before a pivot_root still points into the host's mount tree, where '..' of the
        shared dir is its host parent; only an fd opened after it stops at the new root.  Called before
        the first request, when the root is the only inode.
        """
        mode = self.store.mode
        self.store.close()
        self.store = InodeStore(mode, inode_type=self.store.inode_type)
        self.store.proc = proc
        self.root = self.store.add_root(path)

    # ------------------------------------------------------------------ session
    def init(self, kernel_flags: int) -> int:
        want = (INIT["ASYNC_READ"] | INIT["ATOMIC_O_TRUNC"] | INIT["DO_READDIRPLUS"] | INIT["READDIRPLUS_AUTO"]
                | INIT["PARALLEL_DIROPS"] | INIT["ASYNC_DIO"] | INIT["FLOCK_LOCKS"] | INIT["POSIX_LOCKS"])
        if self.opts.cache is CacheMode.AUTO:
            want |= INIT["AUTO_INVAL_DATA"]
        if self.opts.writeback and not self.opts.readonly:
            want |= INIT["WRITEBACK_CACHE"]
        if self.opts.announce_submounts:
            want |= INIT["SUBMOUNTS"]
        if self._switch_creds:  # setting groups needs root (CAP_SETGID)
            want |= INIT["CREATE_SUPP_GROUP"]
        if self.opts.passthrough and self.backing is not None:
            if want & INIT["WRITEBACK_CACHE"]:
                log.warning("passthrough off: the kernel does not combine it with the writeback cache (--writeback)")
            elif not kernel_flags & INIT["PASSTHROUGH"]:
                log.warning("passthrough off: this kernel does not offer FUSE_PASSTHROUGH (Linux 6.9 or later "
                            "with CONFIG_FUSE_PASSTHROUGH=y); files are served through READ/WRITE")
            else:
                want |= INIT["PASSTHROUGH"]
        want &= kernel_flags
        self.kernel_groups = bool(want & INIT["CREATE_SUPP_GROUP"])
        self.submounts = bool(want & INIT["SUBMOUNTS"])
        self.writeback = bool(want & INIT["WRITEBACK_CACHE"])
        self.passthrough = bool(want & INIT["PASSTHROUGH"])
        if self.passthrough:
            log.info("passthrough on: READ/WRITE of open files go from the kernel to the host file "
                     "(max_stack_depth %d)", self.max_stack_depth)
        return want

    def destroy(self) -> None:
        with self._lock:
            handles = list(self._handles.values())
            fds = list(self._lock_fds.values())
            self._handles.clear()
            self._lock_fds.clear()
        for h in handles:
            h.give_back()  # (an op still using one closes it)
        for fd in fds:
            os.close(fd)
        self.store.clear()
        if self.backing is not None:
            self.backing.reset()

    def close(self) -> None:
        """Release everything including the root (the daemon is exiting)."""
        self.destroy()
        self.store.close()

    def counters(self) -> dict[str, Any]:
        out = {"syncfs_by_dev": dict(self.syncfs_by_dev), "inodes": self.store.counts(),
               "open_handles": len(self._handles)}
        if self.passthrough and self.backing is not None:
            out["passthrough"] = self.backing.counters()
        return out

    def fast_path(self) -> FastPath | None:
        """The C fast path (_fastmodule.c) over this filesystem's own tables; FSINSPECT_FAST=python (or a
        missing extension) leaves every request to the methods here, its twin."""
        native = _fast_module()
        if native is None:
            return None
        if self.store.inode_type is not native.Inode:  # the C reads its own Inode's fields, no other
            log.info("no C fast path: the inode store holds %s", self.store.inode_type.__name__)
            return None
        changed = [m for m in _FAST_METHODS if getattr(type(self), m) is not getattr(PassthroughFS, m)
                   and getattr(type(self), m) not in _FAST_TWINS]
        if changed:  # the C answers as these methods do here: a subclass that redefines one goes without it
            log.info("no C fast path: %s redefines %s", type(self).__name__, ", ".join(changed))
            return None
        opcodes = {o.name: o.value for o in spec.OPCODES}
        fast: FastPath = native.FastPath(self, opcodes, GETATTR_FH, ATTR_SUBMOUNT, spec.MAX_MESSAGE, sc.Statx, Handle,
                                         _prepare_thread, OPEN_KILL_SUIDGID, WRITE_KILL_SUIDGID, INLINE_IO_MAX,
                                         INLINE_WRITE_MAX)
        return fast

    def backing_id(self, fh: int) -> int:
        h = self._handles.get(fh)
        return h.backing_id if h is not None and h.backing_id > 0 else 0

    # ------------------------------------------------------------------ helpers
    def _rw(self) -> None:
        if self.opts.readonly:
            raise OSError(errno.EROFS, "read-only export")

    def _creds(self, ctx: Context) -> AbstractContextManager[None]:
        """Act as the caller: this thread's fsuid/fsgid and supplementary groups, restored right after."""
        if not self._switch_creds or (ctx.uid == 0 and ctx.gid == 0):
            return _UNCHANGED
        return self._switched(ctx)

    @contextmanager
    def _switched(self, ctx: Context) -> Iterator[None]:
        base = () if _prepare_thread(True) else tuple(os.getgroups())
        groups = self._groups(ctx)
        if groups != base:
            sc.setgroups_thread(groups)
        sc.setfsgid(ctx.gid)
        sc.setfsuid(ctx.uid)
        try:
            yield
        finally:
            sc.setfsuid(0)
            sc.setfsgid(0)
            if groups != base:
                sc.setgroups_thread(base)

    def _creating(self, ctx: Context) -> AbstractContextManager[None]:
        """Create as the caller, with umask 0: the mode is what the caller's kernel computed."""
        if _prepare_thread(self._switch_creds):
            return self._creds(ctx)
        return self._creating_on_main_thread(ctx)

    @contextmanager
    def _creating_on_main_thread(self, ctx: Context) -> Iterator[None]:
        old = os.umask(0)  # the main thread (in-process use): briefly, the process's umask
        try:
            with self._creds(ctx):
                yield
        finally:
            os.umask(old)

    def _groups(self, ctx: Context) -> tuple[int, ...]:
        if ctx.groups or self.kernel_groups or not self.opts.proc_groups:
            return ctx.groups
        return proc_groups(ctx.pid, self.store.proc)

    def _kill_suidgid(self, kill: bool) -> AbstractContextManager[None]:
        """Without CAP_FSETID the host kernel clears set-user-ID/set-group-ID on write and truncate."""
        if not (kill and self._fsetid):
            return _UNCHANGED
        return self._without_fsetid()

    @contextmanager
    def _without_fsetid(self) -> Iterator[None]:
        sc.set_effective_cap(sc.CAP_FSETID, False)
        try:
            yield
        finally:
            sc.set_effective_cap(sc.CAP_FSETID, True)

    def _handle(self, fh: int, *, is_dir: bool = False) -> Handle:
        h = self._handles.get(fh)
        if h is None or h.is_dir != is_dir:
            raise OSError(errno.EBADF, f"bad fh {fh}")
        return h

    def _hold(self, fh: int, *, is_dir: bool = False) -> Handle:
        """The handle fh, held (Handle.users) until its give_back(): a RELEASE meanwhile leaves the fd's close to
        the last holder.  Without a lock: a RELEASE takes the handle out of the table before it gives back the
        table's hold, so a handle still in the table after the hold was taken is closed by a holder, not under
        one (the C takes the two steps with the GIL held)."""
        h = self._handle(fh, is_dir=is_dir)
        h.users.append(None)
        if self._handles.get(fh) is not h:  # released meanwhile
            h.give_back()
            raise OSError(errno.EBADF, f"bad fh {fh}")
        return h

    @contextmanager
    def _using(self, fh: int, *, is_dir: bool = False) -> Iterator[Handle]:
        """_hold for the length of the block."""
        h = self._hold(fh, is_dir=is_dir)
        try:
            yield h
        finally:
            h.give_back()

    def _add_handle(self, fd: int, inode: Inode, *, is_dir: bool = False, backing_id: int = -1) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = Handle(fd, inode, is_dir, backing_id)
        return fh

    def _add_file(self, fd: int, inode: Inode, flags: int) -> tuple[int, int]:
        """A file handle and the FOPEN flags to answer: FOPEN_PASSTHROUGH alone when the kernel reads and
        writes the host file itself (DIRECT_IO would override it, and there is no FUSE page cache to keep).
        `flags`: the opener's (an O_DIRECT open is served through the daemon: BackingFiles.open)."""
        backing = self.backing
        if not self.passthrough or backing is None or not stat.S_ISREG(inode.mode):
            return self._add_handle(fd, inode), self._fopen_file
        backing_id = backing.open(inode.nodeid, lambda: self.store.path_fd(inode), direct=bool(flags & os.O_DIRECT))
        if backing_id < 0:
            return self._add_handle(fd, inode), FOPEN["DIRECT_IO"]
        fh = self._add_handle(fd, inode, backing_id=backing_id)
        return fh, FOPEN["PASSTHROUGH"] if backing_id else self._fopen_file

    def _entry(self, inode: Inode, st: StatLike, parent: Inode) -> Entry:
        flags = 0
        if (self.submounts and stat.S_ISDIR(st.st_mode)
                and (inode.mnt_id != parent.mnt_id or inode.dev != parent.dev)):
            flags = ATTR_SUBMOUNT
            if self.zero_submount_generation:
                return Entry(inode.nodeid, 0, st, flags, self.timeout, self.timeout)
        return Entry(inode.nodeid, inode.generation, st, flags, self.timeout, self.timeout)

    def _do_lookup(self, parent: Inode, name: bytes) -> Entry:
        if name == b"." or (name == b".." and parent.nodeid == ROOT_ID):
            name = b"."  # '..' of the root is the root
        with self.store.path_fd(parent) as pfd:
            st = sc.statx(pfd, name, sc.AT_SYMLINK_NOFOLLOW)
            known = self.store.find_known(pfd, name, st)
            if known is not None:
                return self._entry(known, st, parent)
            if name == b"..":
                # Only an inode the client already reached from the root: a directory the host moved
                # out of the shared dir must not lead to its new surroundings.
                raise OSError(errno.EACCES, "'..' leads to an inode outside what the client has looked up")
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            st = sc.statx(fd)
        except BaseException:
            os.close(fd)
            raise
        inode = self.store.find_or_add(fd, st, parent)
        return self._entry(inode, st, parent)

    def _stat(self, inode: Inode) -> os.stat_result:
        return self.store.stat(inode)

    # ------------------------------------------------------------------ lookup / attributes
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        check_name(name, lookup=True)
        return self._do_lookup(self.store.get(parent), name)

    def forget(self, ctx: Context, nodeid: int, nlookup: int) -> None:
        self.store.forget(nodeid, nlookup)
        if self.backing is not None and self.backing.idle and nodeid not in self.store:
            self.backing.forget(nodeid)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[StatLike, float]:
        inode = self.store.get(nodeid)
        if fh is not None and (found := self._handles.get(fh)) is not None:
            try:
                h = self._hold(fh, is_dir=found.is_dir)
            except OSError:
                pass  # released meanwhile: as if never there
            else:
                try:
                    return os.fstat(h.fd), self.timeout
                finally:
                    h.give_back()
        return self._stat(inode), self.timeout

    def setattr(self, ctx: Context, nodeid: int, sa: Any) -> tuple[StatLike, float]:
        self._rw()
        inode = self.store.get(nodeid)
        valid = sa.valid
        using = self._using(sa.fh, is_dir=inode.is_dir) if valid & FATTR["FH"] else nullcontext(None)
        with using as h, self.store.path_fd(inode) as pfd:
            hfd = h.fd if h is not None else None
            if valid & FATTR["MODE"]:
                if hfd is not None:
                    os.fchmod(hfd, sa.mode)
                else:
                    os.chmod(f"{self.store.proc}self/fd/{pfd}", sa.mode)
            if valid & (FATTR["UID"] | FATTR["GID"]):
                uid = sa.uid if valid & FATTR["UID"] else -1
                gid = sa.gid if valid & FATTR["GID"] else -1
                sc.fchown_empty(hfd if hfd is not None else pfd, uid, gid)
            if valid & FATTR["SIZE"]:
                with self._kill_suidgid(bool(valid & FATTR["KILL_SUIDGID"])):
                    self._truncate(inode, hfd, sa.size)
            if valid & (FATTR["ATIME"] | FATTR["MTIME"] | FATTR["ATIME_NOW"] | FATTR["MTIME_NOW"]):
                at = _utime(valid, "ATIME", sa.atime, sa.atimensec)
                mt = _utime(valid, "MTIME", sa.mtime, sa.mtimensec)
                if hfd is not None:
                    sc.utimens(hfd, None, at, mt)
                else:
                    sc.utimens(sc.AT_FDCWD, f"{self.store.proc}self/fd/{pfd}".encode(), at, mt)
            st = os.fstat(hfd) if hfd is not None else os.stat(pfd)
        return st, self.timeout

    def _truncate(self, inode: Inode, hfd: int | None, size: int) -> None:
        if hfd is not None:
            os.ftruncate(hfd, size)
            return
        fd = self.store.reopen(inode, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        inode = self.store.get(nodeid)
        if not stat.S_ISLNK(inode.mode):
            raise OSError(errno.EINVAL, "not a symlink")
        with self.store.path_fd(inode) as fd:
            return sc.readlink_empty(fd)

    # ------------------------------------------------------------------ namespace
    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        self._rw()
        check_name(name)
        if not target or len(target) >= spec.PATH_MAX:
            raise OSError(errno.ENAMETOOLONG if target else errno.ENOENT, "bad symlink target")
        p = self.store.get(parent)
        with self.store.path_fd(p) as pfd, self._creating(ctx):
            os.symlink(target, name, dir_fd=pfd)
        return self._do_lookup(p, name)

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int) -> Entry:
        self._rw()
        check_name(name)
        p = self.store.get(parent)
        with self.store.path_fd(p) as pfd, self._creating(ctx):
            os.mknod(name, mode, rdev, dir_fd=pfd)
        return self._do_lookup(p, name)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        self._rw()
        check_name(name)
        p = self.store.get(parent)
        with self.store.path_fd(p) as pfd, self._creating(ctx):
            os.mkdir(name, mode, dir_fd=pfd)
        return self._do_lookup(p, name)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        self._rw()
        check_name(name)
        with self.store.path_fd(self.store.get(parent)) as pfd:
            os.unlink(name, dir_fd=pfd)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        self._rw()
        check_name(name)
        with self.store.path_fd(self.store.get(parent)) as pfd:
            os.rmdir(name, dir_fd=pfd)

    def rename(self, ctx: Context, olddir: int, oldname: bytes, newdir: int, newname: bytes, flags: int) -> None:
        self._rw()
        check_name(oldname)
        check_name(newname)
        if flags & ~RENAME_FLAGS_OK:
            raise OSError(errno.EINVAL, f"unknown rename flags {flags:#x}")
        od, nd = self.store.get(olddir), self.store.get(newdir)
        with self.store.path_fd(od) as ofd, self.store.path_fd(nd) as nfd:
            if flags:
                sc.renameat2(ofd, oldname, nfd, newname, flags)
            else:
                os.rename(oldname, newname, src_dir_fd=ofd, dst_dir_fd=nfd)

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        self._rw()
        check_name(newname)
        inode, p = self.store.get(nodeid), self.store.get(newparent)
        if inode.is_dir:
            raise OSError(errno.EPERM, "hard links to directories")
        with self.store.path_fd(inode) as fd, self.store.path_fd(p) as pfd:
            if self._switch_creds:
                sc.link_empty(fd, pfd, newname)
            else:
                os.link(f"{self.store.proc}self/fd/{fd}", newname, dst_dir_fd=pfd, follow_symlinks=True)
        return self._do_lookup(p, newname)

    # ------------------------------------------------------------------ files
    def _open_flags(self, flags: int) -> int:
        acc = flags & os.O_ACCMODE
        if self.opts.readonly and (acc != os.O_RDONLY or flags & os.O_TRUNC):
            raise OSError(errno.EROFS, "read-only export")
        flags &= ~(os.O_DIRECT | os.O_NOCTTY)
        if self.writeback:
            # The kernel's page cache may read-modify-write and handles O_APPEND itself.
            if acc == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags

    def open(self, ctx: Context, nodeid: int, flags: int, open_flags: int) -> tuple[int, int]:
        if flags & os.O_DIRECTORY:  # (the kernel resolves it before it sends OPEN; the C virtiofsd: EINVAL)
            raise OSError(errno.EINVAL, "O_DIRECTORY in OPEN: a directory is opened with OPENDIR")
        inode = self.store.get(nodeid)
        if inode.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        with self._kill_suidgid(bool(open_flags & OPEN_KILL_SUIDGID and flags & os.O_TRUNC)):
            fd = self.store.reopen(inode, self._open_flags(flags))
        return self._add_file(fd, inode, flags)

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               umask: int, open_flags: int = 0) -> tuple[Entry, int, int]:
        self._rw()
        kill = bool(open_flags & OPEN_KILL_SUIDGID and flags & os.O_TRUNC)
        check_name(name)
        p = self.store.get(parent)
        asked, flags = flags, self._open_flags(flags)
        with self.store.path_fd(p) as pfd, self._creating(ctx), self._kill_suidgid(kill):
            # O_NONBLOCK: an existing FIFO or device under that name must not block or be opened for real.
            fd = os.open(name, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode & 0o7777,
                         dir_fd=pfd)
        try:
            st = sc.statx(fd)  # identity from the open file itself: no second walk of the name
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EPERM, "not a regular file")
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)  # F_SETFL takes the status flags we opened with
            inode = self.store.find_or_add(fd, st, p, owned=False)
        except BaseException:
            os.close(fd)
            raise
        return (self._entry(inode, st, p), *self._add_file(fd, inode, asked))

    def tmpfile(self, ctx: Context, parent: int, mode: int, flags: int, umask: int) -> tuple[Entry, int, int]:
        self._rw()
        p = self.store.get(parent)
        asked, flags = flags, self._open_flags(flags) & ~(os.O_CREAT | os.O_EXCL)
        if flags & os.O_ACCMODE == os.O_RDONLY:
            flags |= os.O_RDWR
        with self.store.path_fd(p) as pfd, self._creating(ctx):
            fd = os.open(".", flags | sc.O_TMPFILE | os.O_CLOEXEC, mode & 0o7777, dir_fd=pfd)
        try:
            ofd = os.open(f"{self.store.proc}self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
            st = sc.statx(ofd)
            # An unlinked inode can't be reopened by handle: hold it by fd (LINK can then name it).
            inode = self.store.find_or_add(ofd, st, p, force_fd=True)
        except BaseException:
            os.close(fd)
            raise
        return (self._entry(inode, st, p), *self._add_file(fd, inode, asked))

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        h = self._hold(fh)
        try:
            return os.pread(h.fd, size, offset)
        finally:
            h.give_back()

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int, data: Any, write_flags: int) -> int:
        self._rw()
        h = self._hold(fh)
        try:
            with self._kill_suidgid(bool(write_flags & WRITE_KILL_SUIDGID)):
                return os.pwrite(h.fd, data, offset)
        finally:
            h.give_back()

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        # close() of a duplicate gives the host filesystem its close-time semantics (NFS), and the
        # owner's POSIX locks go away as with close(2).
        with self._using(fh) as h:
            os.close(os.dup(h.fd))
        self._drop_owner(nodeid, lock_owner)

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int, release_flags: int,
                lock_owner: int) -> None:
        with self._lock:
            h = self._handles.get(fh)
            if h is None or h.is_dir:
                raise OSError(errno.EBADF, f"bad fh {fh}")
            del self._handles[fh]
            # The inode's last handle gone: no POSIX lock on it can outlive that (close(2) semantics), so
            # neither does any owner's lock fd, FLUSH or not.
            orphans = [k for k in self._lock_fds if k[0] == nodeid] if self._lock_fds and not any(
                o.inode.nodeid == nodeid for o in self._handles.values()) else []
            lock_fds = [self._lock_fds.pop(k) for k in orphans]
        h.give_back()  # the table's hold: the fd closes now, or with the last op using it
        for fd in lock_fds:
            os.close(fd)
        if h.backing_id >= 0 and self.backing is not None:
            self.backing.release(h.inode.nodeid)
        if release_flags & RELEASE_FLUSH:
            self._drop_owner(nodeid, lock_owner)

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        with self._using(fh) as h:
            os.fdatasync(h.fd) if datasync else os.fsync(h.fd)

    def fallocate(self, ctx: Context, nodeid: int, fh: int, offset: int, length: int, mode: int) -> None:
        self._rw()
        with self._using(fh) as h:
            sc.fallocate(h.fd, mode, offset, length)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        with self._using(fh) as h:
            return os.lseek(h.fd, offset, whence)

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int,
                        fh_out: int, off_out: int, length: int, flags: int) -> int:
        self._rw()
        if flags:
            raise OSError(errno.EINVAL, "copy_file_range flags must be 0")
        with self._using(fh_in) as h_in, self._using(fh_out) as h_out:
            return os.copy_file_range(h_in.fd, h_out.fd, length, off_in, off_out)

    # POSIX (fcntl) locks: one extra open file description per (inode, lock owner) carries that owner's
    # OFD locks, so owners conflict with each other exactly as processes do; closing it on FLUSH (the
    # owner closed a descriptor) drops all of the owner's locks on the file, as close(2) does.
    def _owner_fd(self, h: Handle, owner: int) -> int:
        key = (h.inode.nodeid, owner)
        with self._lock:
            fd = self._lock_fds.get(key)
        if fd is not None:
            return fd
        try:
            fd = self.store.reopen(h.inode, os.O_RDWR)
        except OSError:
            fd = self.store.reopen(h.inode, fcntl.fcntl(h.fd, fcntl.F_GETFL) & os.O_ACCMODE)
        with self._lock:
            old = self._lock_fds.setdefault(key, fd)
        if old != fd:
            os.close(fd)
        return old

    def _drop_owner(self, nodeid: int, owner: int) -> None:
        with self._lock:
            fd = self._lock_fds.pop((nodeid, owner), None)
        if fd is not None:
            os.close(fd)

    def getlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lk: Any, lk_flags: int) -> Any:
        if lk_flags & LK_FLOCK:
            raise OSError(errno.EINVAL, "no GETLK for flock locks")
        with self._using(fh) as h:
            fd = self._owner_fd(h, owner)
        res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _pack_flock(lk.type, lk.start, lk.end))
        typ, _wh, start, length, _pid = _FLOCK.unpack(res)
        end = start + length - 1 if length else OFFSET_MAX
        return _file_lock(start, end, typ)

    def setlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lk: Any, lk_flags: int, sleep: bool) -> None:
        with self._using(fh) as h:
            if lk_flags & LK_FLOCK:
                op = {LOCK_TYPE["F_RDLCK"]: fcntl.LOCK_SH, LOCK_TYPE["F_WRLCK"]: fcntl.LOCK_EX,
                      LOCK_TYPE["F_UNLCK"]: fcntl.LOCK_UN}.get(lk.type)
                if op is None:
                    raise OSError(errno.EINVAL, f"bad lock type {lk.type}")
                if sleep:
                    interruptible(lambda: sc.flock_wait(h.fd, op))
                else:
                    fcntl.flock(h.fd, op | fcntl.LOCK_NB)
                return
            fd = self._owner_fd(h, owner)
        flock = _pack_flock(lk.type, lk.start, lk.end)
        if sleep:
            interruptible(lambda: sc.fcntl_lock_wait(fd, fcntl.F_OFD_SETLKW, flock))
        else:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock)

    # ------------------------------------------------------------------ directories
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> tuple[int, int]:
        inode = self.store.get(nodeid)
        if not inode.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        fd = self.store.reopen(inode, os.O_RDONLY | os.O_DIRECTORY)
        return self._add_handle(fd, inode, is_dir=True), self._fopen_dir

    def _list(self, h: Handle) -> list[DirEntry]:
        """Snapshot the directory (offset 0 = rewinddir); cookies are positions in the snapshot."""
        st = os.fstat(h.fd)
        if h.inode.nodeid == ROOT_ID:
            up = st.st_ino
        else:
            try:
                up = os.stat("..", dir_fd=h.fd, follow_symlinks=False).st_ino
            except OSError:
                up = st.st_ino
        out = [DirEntry(st.st_ino, 1, DT["DT_DIR"], b"."), DirEntry(up, 2, DT["DT_DIR"], b"..")]
        with os.scandir(h.fd) as it:
            for d in it:
                try:
                    if d.is_symlink():
                        t = DT["DT_LNK"]
                    elif d.is_dir(follow_symlinks=False):
                        t = DT["DT_DIR"]
                    elif d.is_file(follow_symlinks=False):
                        t = DT["DT_REG"]
                    else:
                        t = _IFMT_TO_DT.get(stat.S_IFMT(d.stat(follow_symlinks=False).st_mode), 0)
                except OSError:
                    t = 0
                out.append(DirEntry(d.inode(), len(out) + 1, t, os.fsencode(d.name)))
        return out

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int) -> Iterator[DirEntry]:
        with self._using(fh, is_dir=True) as h, h.lock:
            if offset == 0 or h.listing is None:
                h.listing = self._list(h)
            listing = h.listing
        return iter(listing[offset:])

    def releasedir(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        with self._lock:
            h = self._handles.get(fh)
            if h is None or not h.is_dir:
                raise OSError(errno.EBADF, f"bad fh {fh}")
            del self._handles[fh]
        h.give_back()  # the table's hold: the fd closes now, or with the last op using it

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        with self._using(fh, is_dir=True) as h:
            os.fdatasync(h.fd) if datasync else os.fsync(h.fd)

    # ------------------------------------------------------------------ filesystem-wide
    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        with self.store.path_fd(self.store.get(nodeid)) as fd:
            return os.fstatvfs(fd)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        inode = self.store.get(nodeid)
        if mask & W_OK and self.opts.readonly:
            raise OSError(errno.EROFS, "read-only export")
        with self.store.path_fd(inode) as fd, self._creds(ctx):
            if not os.access(f"{self.store.proc}self/fd/{fd}", mask, effective_ids=True):
                raise OSError(errno.EACCES, "access denied")

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        """syncfs() the host filesystem behind this nodeid (the root's, or a submount's)."""
        inode = self.store.get(nodeid)
        fd = self.store.reopen(inode, os.O_RDONLY | os.O_NONBLOCK)
        try:
            sc.syncfs(fd)
        finally:
            os.close(fd)
        with self._lock:
            self.syncfs_by_dev[inode.dev] += 1

    # ------------------------------------------------------------------ xattrs
    def _xattr_path(self, nodeid: int) -> tuple[Inode, Any]:
        if not self.opts.xattr:
            raise OSError(errno.ENOSYS, "xattrs are off (--xattr)")
        inode = self.store.get(nodeid)
        return inode, self.store.path_fd(inode)

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        _inode, cm = self._xattr_path(nodeid)
        self._rw()
        with cm as fd:
            os.setxattr(f"{self.store.proc}self/fd/{fd}", name, value, flags)

    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        _inode, cm = self._xattr_path(nodeid)
        with cm as fd:
            v = os.getxattr(f"{self.store.proc}self/fd/{fd}", name)
        return _sized(v, size)

    def listxattr(self, ctx: Context, nodeid: int, size: int) -> bytes | int:
        _inode, cm = self._xattr_path(nodeid)
        with cm as fd:
            names = os.listxattr(f"{self.store.proc}self/fd/{fd}")
        return _sized(b"".join(os.fsencode(n) + b"\0" for n in names), size)

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        _inode, cm = self._xattr_path(nodeid)
        self._rw()
        with cm as fd:
            os.removexattr(f"{self.store.proc}self/fd/{fd}", name)


# The layouts the fast path packs and reads (linux/fuse.h), against the spec's: a mismatch turns it off.
_FAST_SIZES = {"SIZE_IN_HEADER": "fuse_in_header", "SIZE_ENTRY_OUT": "fuse_entry_out",
               "SIZE_ATTR_OUT": "fuse_attr_out", "SIZE_STATFS_OUT": "fuse_statfs_out",
               "SIZE_RELEASE_IN": "fuse_release_in", "SIZE_FLUSH_IN": "fuse_flush_in",
               "SIZE_GETATTR_IN": "fuse_getattr_in", "SIZE_CREATE_IN": "fuse_create_in", "SIZE_OPEN_IN": "fuse_open_in",
               "SIZE_OPEN_OUT": "fuse_open_out", "SIZE_READ_IN": "fuse_read_in", "SIZE_WRITE_IN": "fuse_write_in",
               "SIZE_WRITE_OUT": "fuse_write_out"}
_fast_loaded: list[Any] = []
# What the fast path answers in C (with the attributes it reads: store, _handles, _next_fh, _lock, _lock_fds,
# backing, passthrough, timeout, submounts, zero_submount_generation, writeback, _fopen_file, _fopen_dir,
# _switch_creds, kernel_groups, opts.readonly, opts.proc_groups); FORGET/BATCH_FORGET do InodeStore.forget's
# accounting and _drop on the store's tables (its own forget() for an unknown nodeid or an over-forget, which it
# logs; forget()/batch_forget() themselves with backing files), CREATE and LOOKUP put a new inode in the store's
# tables (find_or_add's usual cases; its own find_or_add for a failed handle or a mount's first inode,
# _evict_locked past the fd cache's bound), CREATE _prepare_thread; READ fills a vhost-user chain's buffers in place where the filesystem has
# chain_for (GuestPassthroughFS.read, a twin the C also answers as).
_FAST_METHODS = ("lookup", "_do_lookup", "_entry", "getattr", "_stat", "release", "releasedir", "flush",
                 "_handle", "_using", "_drop_owner", "statfs", "unlink", "rmdir", "_rw", "create", "open", "opendir",
                 "_open_flags", "_add_file", "_add_handle", "_creating", "_creds", "_switched", "_groups",
                 "_kill_suidgid", "read", "write", "forget", "batch_forget")
_FAST_TWINS: set[Any] = set()


def fast_twin(method: Any) -> Any:
    """Marks a subclass's redefinition of a fast op that the C answers as it does (it keeps the fast path)."""
    _FAST_TWINS.add(method)
    return method


def _fast_module() -> Any:
    """daemon.passthrough._fast, once checked; None when off, missing (one warning) or built against
    other struct layouts than the spec's."""
    if os.environ.get("FSINSPECT_FAST", "c") == "python":
        return None
    if not _fast_loaded:
        try:
            from . import _fast  # type: ignore[attr-defined]
        except ImportError as e:
            log.warning("the daemon's C fast path is not built (%s): every request takes the Python path "
                        "(run scripts/setup)", e)
            _fast = None
        if _fast is not None:
            wrong = [n for k, n in _FAST_SIZES.items() if getattr(_fast, k) != CODECS[n].size]
            if wrong:
                log.warning("the C fast path was built against other layouts of %s than the spec's: off",
                            ", ".join(wrong))
                _fast = None
            elif _fast.INODE_FIELDS != tuple(f.name for f in dataclasses.fields(Inode)):
                log.warning("the C fast path's Inode has the fields %s, its twin inodes.Inode has others: off",
                            ", ".join(_fast.INODE_FIELDS))
                _fast = None
        _fast_loaded.append(_fast)
    return _fast_loaded[0]


_FLOCK = struct.Struct("@hhqqi4x")  # struct flock (x86_64 / LP64)
OFFSET_MAX = (1 << 63) - 1


def _pack_flock(typ: int, start: int, end: int) -> bytes:
    """fuse_file_lock (inclusive end, OFFSET_MAX = to EOF) -> struct flock (length, 0 = to EOF)."""
    if not 0 <= start <= OFFSET_MAX or end < start:
        raise OSError(errno.EINVAL, f"lock range {start}..{end}")
    length = 0 if end >= OFFSET_MAX else end - start + 1
    return _FLOCK.pack(typ, os.SEEK_SET, start, length, 0)


def _file_lock(start: int, end: int, typ: int) -> Any:
    return make("fuse_file_lock", start=start, end=end, type=typ, pid=0)


def _sized(v: bytes, size: int) -> bytes | int:
    if size == 0:
        return len(v)
    if len(v) > size:
        raise OSError(errno.ERANGE, "buffer too small")
    return v


# Filesystems that stack on others (their superblock's s_stack_depth is at least 1): a backing file on
# one needs max_stack_depth 2, or the kernel refuses it (ELOOP).
_STACKED_FS = {0x794C7630: "overlayfs", 0x65735546: "fuse", 0xF15F: "ecryptfs"}


def _stack_depth(shared_dir: str) -> int:
    """max_stack_depth for passthrough: 1, so this mount may itself be stacked on (an overlayfs lower
    layer), unless the shared dir is on a stacking filesystem, whose files need 2."""
    try:
        return spec.FILESYSTEM_MAX_STACK_DEPTH if sc.fs_type(shared_dir) in _STACKED_FS else 1
    except OSError:
        return 1


def _utime(valid: int, which: str, sec: int, nsec: int) -> tuple[int, int]:
    if valid & FATTR[f"{which}_NOW"]:
        return (0, sc.UTIME_NOW)
    if valid & FATTR[which]:
        return (sec, nsec)
    return (0, sc.UTIME_OMIT)
