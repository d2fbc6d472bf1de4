"""The kernel's view of nodeids, rebuilt from traffic: the inode map and the submount/syncfs tracker.

nlookup follows the kernel's accounting: every entry reply (LOOKUP, CREATE, MKDIR, MKNOD, SYMLINK,
LINK, TMPFILE, each READDIRPLUS entry other than "." and "..") adds one; FORGET/BATCH_FORGET subtract.
A nodeid is live while its nlookup is above zero.  Nodeid 1 is the root and is never forgotten.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from dissectors.spec import fuse as spec

from .render import fmt_ns
from .stats import percentile

ATTR_SUBMOUNT = spec.ATTR_FLAGS.by_name()["SUBMOUNT"]
ROOT = spec.ROOT_ID
SYNCFS_KEEP = 10_000  # the most recent SYNCFS calls kept (a guest looping on syncfs(2) must not grow memory)


@dataclass(slots=True)
class Inode:
    nodeid: int
    parent: int | None  # None once unlinked (or unknown)
    name: bytes | None
    ino: int
    generation: int
    nlookup: int
    attr_flags: int = 0

    @property
    def submount(self) -> bool:
        return bool(self.attr_flags & ATTR_SUBMOUNT)


@dataclass(frozen=True, slots=True)
class Issue:
    """Something the inode map noticed; the analyzer turns it into a lint."""

    kind: str
    message: str


class InodeMap:
    """nodeid -> Inode, with (ino, generation) and (parent, name) indexes."""

    def __init__(self) -> None:
        self.nodes: dict[int, Inode] = {}
        self._ident: dict[tuple[int, int], set[int]] = {}
        self._children: dict[tuple[int, bytes], int] = {}
        self.reset()

    def reset(self) -> None:
        """A new INIT epoch: the kernel starts from scratch."""
        self.nodes.clear()
        self._ident.clear()
        self._children.clear()
        self.nodes[ROOT] = Inode(ROOT, None, b"", 0, 0, 1)

    def get(self, nodeid: int) -> Inode | None:
        return self.nodes.get(nodeid)

    def superblock(self, nodeid: int) -> int:
        """The root of the superblock holding nodeid: 1, or the nearest announced submount."""
        seen = 0
        cur = self.nodes.get(nodeid)
        while cur is not None and seen < 4096:
            if cur.nodeid == ROOT or cur.submount:
                return cur.nodeid
            if cur.parent is None:
                return -cur.nodeid  # detached: its own unknown superblock, never equal to a live one's
            parent = self.nodes.get(cur.parent)
            if parent is None:  # an ancestor named before the capture began: its superblock is unknown
                return -cur.parent
            cur = parent
            seen += 1
        return ROOT

    def path(self, nodeid: int) -> str:
        parts: list[str] = []
        cur = self.nodes.get(nodeid)
        while cur is not None and cur.nodeid != ROOT and len(parts) < 256:
            parts.append((cur.name or b"?").decode("utf-8", "backslashreplace"))
            cur = self.nodes.get(cur.parent) if cur.parent is not None else None
            if cur is None:
                parts.append("…")
        return "/" + "/".join(reversed(parts))

    def entry(self, parent: int, name: bytes | None, nodeid: int, generation: int, ino: int,
              attr_flags: int) -> list[Issue]:
        """An entry reply: nodeid gains one lookup (and is named parent/name)."""
        if nodeid == 0:  # negative entry: nothing is looked up
            return []
        issues: list[Issue] = []
        node = self.nodes.get(nodeid)
        ident = (ino, generation)
        if node is None:
            if name in (b".", b".."):  # LOOKUP ".." (EXPORT_SUPPORT) names nothing new
                name = None
            node = self.nodes[nodeid] = Inode(nodeid, parent if name is not None else None, name, ino, generation, 0,
                                              attr_flags)
        else:
            if (node.ino, node.generation) != ident:
                self._drop_ident(node)
                node.ino, node.generation = ino, generation
            node.attr_flags = attr_flags
            if name is not None and nodeid != ROOT and name not in (b".", b".."):
                self._unlink_name(node)
                node.parent, node.name = parent, name
        node.nlookup += 1
        if name is not None and nodeid != ROOT and name not in (b".", b".."):
            self._children[(parent, name)] = nodeid
        peers = self._ident.setdefault(ident, set())
        if nodeid not in peers:
            sb = self.superblock(nodeid)
            for other in sorted(peers):
                o = self.nodes.get(other)
                if o is not None and o.nlookup > 0 and self.superblock(other) == sb:
                    issues.append(Issue("ino-collision",
                                        f"nodeid {nodeid} ({self.path(nodeid)}) and nodeid {other} "
                                        f"({self.path(other)}) share ino {ino} generation {generation} "
                                        f"on one superblock (root {sb}); no submount separates them"))
            peers.add(nodeid)
        return issues

    def attr(self, nodeid: int, ino: int) -> None:
        """A GETATTR/SETATTR reply: learn the ino of a node (the root's comes only this way)."""
        node = self.nodes.get(nodeid)
        if node is not None and node.ino == 0 and ino:
            node.ino = ino
            self._ident.setdefault((ino, node.generation), set()).add(nodeid)

    def forget(self, nodeid: int, nlookup: int) -> list[Issue]:
        node = self.nodes.get(nodeid)
        if node is None:
            return [Issue("forget-unknown", f"FORGET of nodeid {nodeid}, which no reply ever named")]
        if nlookup > node.nlookup:
            had = node.nlookup
            self._remove(node)
            return [Issue("nlookup-underflow",
                          f"FORGET of {nlookup} lookups on nodeid {nodeid} ({self.path(nodeid)}), which had {had}")]
        node.nlookup -= nlookup
        if node.nlookup == 0 and nodeid != ROOT:
            self._remove(node)
        return []

    def rename(self, olddir: int, oldname: bytes, newdir: int, newname: bytes, exchange: bool) -> None:
        moved = self._children.pop((olddir, oldname), None)
        other = self._children.pop((newdir, newname), None)
        if moved is not None and (m := self.nodes.get(moved)) is not None:
            m.parent, m.name = newdir, newname
            self._children[(newdir, newname)] = moved
        if other is not None and (o := self.nodes.get(other)) is not None:
            if exchange:
                o.parent, o.name = olddir, oldname
                self._children[(olddir, oldname)] = other
            else:  # replaced: unlinked, alive until forgotten
                o.parent, o.name = None, None

    def unlink(self, parent: int, name: bytes) -> None:
        child = self._children.pop((parent, name), None)
        if child is not None and (c := self.nodes.get(child)) is not None:
            c.parent, c.name = None, None

    def _unlink_name(self, node: Inode) -> None:
        if node.parent is not None and node.name is not None:
            if self._children.get((node.parent, node.name)) == node.nodeid:
                del self._children[(node.parent, node.name)]

    def _drop_ident(self, node: Inode) -> None:
        peers = self._ident.get((node.ino, node.generation))
        if peers is not None:
            peers.discard(node.nodeid)
            if not peers:
                del self._ident[(node.ino, node.generation)]

    def _remove(self, node: Inode) -> None:
        self._drop_ident(node)
        self._unlink_name(node)
        self.nodes.pop(node.nodeid, None)

    def live(self) -> int:
        return sum(1 for n in self.nodes.values() if n.nlookup > 0)


@dataclass(frozen=True, slots=True)
class Announcement:
    nodeid: int
    parent: int
    name: bytes
    exchange: int
    ino: int


@dataclass(frozen=True, slots=True)
class SyncfsRecord:
    exchange: int
    nodeid: int
    latency_ns: int | None
    is_root: bool
    error: int | None
    path: str = ""  # where the nodeid was when the SYNCFS came ("/" for the root)


def superblock_label(nodeid: int, path: str) -> str:
    """`/sub/inner (nodeid 612)`: a superblock is named by where it is, its nodeid beside."""
    return f"{path or '?'} (nodeid {nodeid})"


@dataclass(frozen=True, slots=True)
class SyncfsGroup:
    """The SYNCFS calls on one nodeid: how many, how fast, and what was wrong with them."""

    nodeid: int
    path: str
    count: int
    p50_ns: int | None
    max_ns: int | None
    errors: int
    is_root: bool

    @property
    def label(self) -> str:
        return superblock_label(self.nodeid, self.path)

    def line(self) -> str:
        """`/sub (nodeid 3): 4 calls, p50 1.20ms, max 3.40ms` plus only what is wrong."""
        wrong = ([] if self.is_root else ["NOT a superblock root"]) + ([f"{self.errors} failed"] if self.errors else [])
        return (f"{self.label}: {self.count} call{'s' if self.count != 1 else ''}, p50 {fmt_ns(self.p50_ns)}, "
                f"max {fmt_ns(self.max_ns)}" + (f"  [{'; '.join(wrong)}]" if wrong else ""))


def group_syncfs(records: list[dict[str, Any]]) -> list[SyncfsGroup]:
    """SYNCFS calls (as the summaries carry them: nodeid, path, latency_ns, superblock_root, error) per
    superblock, in order of first call."""
    by: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(int(r["nodeid"]), []).append(r)
    out = []
    for nodeid, rs in by.items():
        lat = sorted(r["latency_ns"] for r in rs if r.get("latency_ns") is not None)
        path = next((r["path"] for r in reversed(rs) if r.get("path")), "/" if nodeid == ROOT else "")
        out.append(SyncfsGroup(nodeid, path, len(rs), percentile(lat, 50), lat[-1] if lat else None,
                               sum(1 for r in rs if r.get("error")), all(r.get("superblock_root", True) for r in rs)))
    return out


@dataclass
class SubmountTracker:
    """Which entries were announced as submounts, and the SYNCFS calls (the SYNCFS_KEEP most recent) with
    whether each hit a superblock root."""

    announced: dict[int, Announcement] = field(default_factory=dict)
    syncfs: deque[SyncfsRecord] = field(default_factory=lambda: deque(maxlen=SYNCFS_KEEP))

    def announce(self, a: Announcement) -> bool:
        """Record an announcement; True the first time this nodeid is announced."""
        new = a.nodeid not in self.announced
        self.announced[a.nodeid] = a
        return new

    def is_superblock_root(self, nodeid: int) -> bool:
        return nodeid == ROOT or nodeid in self.announced

    def reset(self) -> None:
        self.announced.clear()
