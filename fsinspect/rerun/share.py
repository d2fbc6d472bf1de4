"""Rebuild the share a recording started from, as far as the recording proves it.

A name the guest looked up (or listed) successfully before the recording created it existed at the
start: its type, mode, owner and size come from the recorded attributes, its bytes from the READs
that came before any write to it (the rest stays zeros), a symlink's target from READLINK, extended
attributes from GETXATTR.  A directory that a reply marks FUSE_ATTR_SUBMOUNT becomes a tmpfs, as in
the test bed's share (fsinspect.guest.share).  What the recording creates itself is left for the rerun.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dissectors import fuse as F

from ..guest.share import ShareError, mount_tmpfs
from .plan import Plan

__all__ = ["ShareError", "prepare", "proven"]
_CREATES = frozenset({"CREATE", "MKDIR", "MKNOD", "SYMLINK", "LINK", "RENAME", "RENAME2"})
_WRITES = frozenset({"WRITE", "SETATTR", "FALLOCATE", "COPY_FILE_RANGE"})


@dataclass
class Node:
    path: str
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    submount: bool = False
    data: dict[int, bytes] = field(default_factory=dict)  # offset -> bytes read before any write
    target: bytes | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


def proven(plan: Plan) -> dict[str, Node]:
    """Relative path -> what the recording proves about it at the start (the root is '')."""
    paths: dict[int, str] = {1: ""}
    nodes: dict[str, Node] = {}
    created: set[str] = set()
    written: set[str] = set()

    def saw(parent: int, name: bytes, entry: Any) -> None:
        base = paths.get(parent)
        if base is None or not entry.nodeid:
            return
        path = f"{base}/{name.decode('utf-8', 'surrogateescape')}".lstrip("/")
        paths[entry.nodeid] = path
        if path not in created and path not in nodes:
            a = entry.attr
            nodes[path] = Node(path, a.mode, a.uid, a.gid, a.size, bool(a.flags & 1))

    for ex in plan.exchanges:
        req, rep = ex.request, ex.reply
        if req is None or not isinstance(rep, F.Reply) or rep.error:
            continue
        op = ex.opname
        here = paths.get(req.nodeid)
        if op in _CREATES and here is not None:
            name = req.args.get("newname") or req.args.get("name")
            if isinstance(name, bytes):
                created.add(f"{here}/{name.decode('utf-8', 'surrogateescape')}".lstrip("/"))
        if op in _WRITES and here is not None:
            written.add(here)
        if op == "GETATTR" and here == "" and "" not in nodes:  # the root's own mode and owner
            a = rep.args["attr_out"].attr
            nodes[""] = Node("", a.mode, a.uid, a.gid, a.size)
        elif op == "LOOKUP" and "entry" in rep.args:
            saw(req.nodeid, req.args["name"], rep.args["entry"])
        elif op == "READDIRPLUS":
            for rec, nm in rep.args.get("entries", ()):
                if nm not in (b".", b".."):
                    saw(req.nodeid, nm, rec.entry_out)
        elif here is None or here in written or here in created:
            continue
        elif op == "READ" and here in nodes and not rep.cut:
            nodes[here].data[req.args["read"].offset] = bytes(rep.args.get("data", b""))
        elif op == "READLINK" and here in nodes:
            target = rep.args.get("target")
            if isinstance(target, str):
                target = target.encode("utf-8", "surrogateescape")
            if isinstance(target, bytes):
                nodes[here].target = target
        elif op == "GETXATTR" and here in nodes and isinstance(rep.args.get("value"), bytes):
            nodes[here].xattrs[req.args["name"]] = rep.args["value"]
    return nodes


def prepare(plan: Plan, root: Path) -> str:
    """Build the proven tree under `root` (absent or empty); returns a one-line account."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ShareError(f"--prepare-share {root}: not an empty directory (it would not be the recorded share)")
    nodes = proven(plan)
    root.mkdir(parents=True, exist_ok=True)
    counts = {"dirs": 0, "files": 0, "symlinks": 0, "submounts": 0, "other": 0}
    for path in sorted(nodes, key=lambda p: (p.count("/"), p)):
        n = nodes[path]
        p = root / path
        kind = stat.S_IFMT(n.mode)
        if not path:
            pass  # the root: only its mode and owner below
        elif kind == stat.S_IFDIR:
            p.mkdir(exist_ok=True)
            if n.submount:
                mount_tmpfs(p)
                counts["submounts"] += 1
            counts["dirs"] += 1
        elif kind == stat.S_IFLNK:
            os.symlink(n.target or b"unknown-target", p)
            counts["symlinks"] += 1
        elif kind == stat.S_IFREG:
            with open(p, "wb") as f:
                f.truncate(n.size)
                for off, data in sorted(n.data.items()):
                    f.seek(off)
                    f.write(data[:max(0, n.size - off)])
            counts["files"] += 1
        else:
            os.mknod(p, n.mode)
            counts["other"] += 1
        for name, value in n.xattrs.items():
            try:
                os.setxattr(p, name, value, follow_symlinks=False)
            except OSError as e:
                raise ShareError(f"--prepare-share: setxattr {name!r} on {path}: {e.strerror}") from None
        if os.geteuid() == 0:
            os.lchown(p, n.uid, n.gid)
        if kind != stat.S_IFLNK:
            os.chmod(p, stat.S_IMODE(n.mode))
    made = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "nothing proven beyond an empty share"
    if counts["submounts"]:
        made += f" (tmpfs: unmount with umount -R {root})"
    return made
