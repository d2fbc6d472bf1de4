"""The peer for bench/standalone.py: a pyfuse3 (libfuse 3) passthrough filesystem, equivalent to the
passthroughfs.py example in pyfuse3's sdist (path map keyed by host st_ino), with the caching of
`fsinspect daemon --cache none|auto`: none = 0 s entry/attr timeouts and direct_io, so both serve every
request; auto = 1 s timeouts and the page cache, as the daemon's (and virtiofsd's) auto.

Every open is answered without FOPEN_KEEP_CACHE (pyfuse3's FileInfo sets it by default), as the daemon's and
virtiofsd's auto answer it: the kernel drops a file's page cache at each open, so each open-read-close of
the read-4K storm READs again.  With it the peer kept the data across opens (0.17 READ per op against the
daemon's 1.00 with `--passthrough off`, `bench/standalone.py --requests`): it cached more than the mode allows.

Usage: python bench/pyfuse3_passthrough.py [--cache none|auto] SHARED_DIR MOUNTPOINT
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
from collections import defaultdict
from typing import Any

import pyfuse3  # type: ignore[import-not-found]
import trio  # type: ignore[import-not-found]


class Passthrough(pyfuse3.Operations):  # type: ignore[misc]
    enable_writeback_cache = False

    def __init__(self, source: str, cache: str = "none") -> None:
        super().__init__()
        self.timeout = 0.0 if cache == "none" else 1.0
        self.direct_io = cache == "none"
        self._paths: dict[int, set[str]] = defaultdict(set)
        self._lookups: dict[int, int] = defaultdict(int)
        self._paths[pyfuse3.ROOT_INODE].add(source)

    def _path(self, inode: int) -> str:
        try:
            return next(iter(self._paths[inode]))
        except StopIteration:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _remember(self, inode: int, path: str) -> None:
        self._lookups[inode] += 1
        self._paths[inode].add(path)

    def _attr(self, path: str | int) -> Any:
        try:
            st = os.lstat(path) if isinstance(path, str) else os.fstat(path)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        a = pyfuse3.EntryAttributes()
        for k in ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_atime_ns",
                  "st_mtime_ns", "st_ctime_ns"):
            setattr(a, k, getattr(st, k))
        a.generation = 0
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        a.st_blksize = 512
        a.st_blocks = (a.st_size + 511) // 512
        return a

    async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> Any:
        path = os.path.join(self._path(parent), os.fsdecode(name))
        a = self._attr(path)
        if name not in (b".", b".."):
            self._remember(a.st_ino, path)
        return a

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        a = self._attr(self._path(inode))
        if inode == pyfuse3.ROOT_INODE:
            a.st_ino = inode
        return a

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, n in inode_list:
            self._lookups[inode] -= n
            if self._lookups[inode] <= 0:
                self._lookups.pop(inode, None)
                if inode != pyfuse3.ROOT_INODE:
                    self._paths.pop(inode, None)

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, inode: int, off: int, token: Any) -> None:
        path = self._path(inode)
        entries = sorted((e.inode(), e.name) for e in os.scandir(path))
        for ino, name in entries:
            if ino <= off:
                continue
            child = os.path.join(path, name)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(child), ino):
                break
            self._remember(ino, child)

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        try:
            fd = os.open(self._path(inode), flags & ~os.O_CREAT)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        return pyfuse3.FileInfo(fh=fd, direct_io=self.direct_io, keep_cache=False)

    async def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        path = os.path.join(self._path(parent), os.fsdecode(name))
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_TRUNC, mode)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        a = self._attr(fd)
        self._remember(a.st_ino, path)
        return pyfuse3.FileInfo(fh=fd, direct_io=self.direct_io, keep_cache=False), a

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        os.close(fh)

    async def releasedir(self, fh: int) -> None:
        pass

    async def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
        path = os.path.join(self._path(parent), os.fsdecode(name))
        try:
            ino = os.lstat(path).st_ino
            os.unlink(path)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        self._paths.get(ino, set()).discard(path)

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Any) -> Any:
        path = os.path.join(self._path(parent), os.fsdecode(name))
        try:
            os.mkdir(path, mode)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        a = self._attr(path)
        self._remember(a.st_ino, path)
        return a

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        path = self._path(inode)
        if fields.update_size:
            os.truncate(path if fh is None else fh, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_atime or fields.update_mtime:
            os.utime(path, ns=(attr.st_atime_ns, attr.st_mtime_ns))
        return await self.getattr(inode)

    async def statfs(self, ctx: Any) -> Any:
        s = os.statvfs(self._path(pyfuse3.ROOT_INODE))
        out = pyfuse3.StatvfsData()
        for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                  "f_namemax"):
            setattr(out, k, getattr(s, k))
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", choices=("none", "auto"), default="none")
    ap.add_argument("source")
    ap.add_argument("mountpoint")
    args = ap.parse_args()
    opts = set(pyfuse3.default_options)
    opts.add("fsname=pyfuse3-passthrough")
    opts.add("default_permissions")  # parity with fsinspect, which always mounts with it
    pyfuse3.init(Passthrough(args.source, args.cache), args.mountpoint, opts)
    try:
        trio.run(pyfuse3.main)
    except KeyboardInterrupt:
        pass
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
