"""A host share for the test bed: known files, a tmpfs at sub/ and a second tmpfs nested at sub/inner/.

The nested tmpfs is a submount inside a submount, the case virtiofsd's announce_submounts exists for
(background 000): both tmpfs roots have st_ino 1, so without submount announcement the guest sees two
different directories with the same (st_dev, st_ino).  Mounting needs root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# Relative path -> content.  Directories are implied.  Paths under sub/ and sub/inner/ land on the tmpfs.
SHARE_FILES: dict[str, bytes] = {
    "hello.txt": b"hello from the host\n",
    "data.bin": bytes(range(256)) * 64,
    "dir/nested.txt": b"nested file\n",
    "sub/on-sub.txt": b"this file lives on the sub/ tmpfs\n",
    "sub/inner/on-inner.txt": b"this file lives on the sub/inner/ tmpfs\n",
}
SUBMOUNTS = ("sub", "sub/inner")


class ShareError(Exception):
    """The share could not be set up (mounting tmpfs needs root)."""


@dataclass
class Share:
    """A live share: `root` is the directory to export; `mounts` are the tmpfs mount points, outermost first."""

    root: Path
    mounts: list[Path] = field(default_factory=list)

    def sha256(self, rel: str) -> str:
        return hashlib.sha256((self.root / rel).read_bytes()).hexdigest()

    def host_stat(self, rel: str) -> os.stat_result:
        return os.stat(self.root / rel)


def mount_tmpfs(path: Path, size_mb: int = 64) -> None:
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "fsinspect-share", str(path)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise ShareError(f"`{' '.join(cmd)}` failed: {p.stderr.strip()} (mounting tmpfs needs root)")


def _umount(path: Path) -> None:
    """Unmount; fall back to a lazy unmount so a busy mount never survives the fixture."""
    if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def is_mountpoint(path: Path) -> bool:
    return os.path.ismount(path)


@contextmanager
def make_share(parent: Path | None = None, files: dict[str, bytes] | None = None,
               submounts: tuple[str, ...] = SUBMOUNTS, root_tmpfs_mb: int = 0) -> Iterator[Share]:
    """Create the share, yield it, and always unmount the tmpfs (innermost first) and remove it.

    `root_tmpfs_mb` > 0 puts the root itself on a tmpfs of that size, for benchmarks: on the host's ext4,
    a create storm that follows a delete storm within seconds pays ext4's scan past recently deleted
    inodes (recently_deleted() in perf), which varies 3x between runs and swamps what is measured."""
    root = Path(tempfile.mkdtemp(prefix="fsi-share-", dir=parent))
    share = Share(root)
    try:
        if root_tmpfs_mb:
            mount_tmpfs(root, root_tmpfs_mb)
            share.mounts.append(root)
        for rel in submounts:
            mp = root / rel
            mp.mkdir(parents=True, exist_ok=True)
            mount_tmpfs(mp)
            share.mounts.append(mp)
        for rel, data in (SHARE_FILES if files is None else files).items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        yield share
    finally:
        for mp in reversed(share.mounts):
            _umount(mp)
        if any(is_mountpoint(mp) for mp in share.mounts):
            raise ShareError(f"could not unmount the share's tmpfs under {root}")
        shutil.rmtree(root, ignore_errors=True)
