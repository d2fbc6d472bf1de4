"""READDIRPLUS's entries looked up through the C fast path: the same bytes, lookups and counters as Python's.

A READDIRPLUS answers every entry as a LOOKUP would (a new reference each).  With the fast path the
engine asks it for each entry's fuse_entry_out instead of running fs.lookup; where it declines (a
handle-held directory whose fd is not cached yet) fs.lookup answers.  Against the Python engine
(FSINSPECT_FAST=python) over the same share: every reply byte for byte, each inode's nlookup, and the
engines' counters (the inner lookups are no requests of the client's).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from daemon.passthrough import CacheMode, HandleMode, PassthroughFS
from daemon.vhost import GuestPassthroughFS
from dissectors import fuse as F
from tests.test_daemon_fastpath import Twins, share, twins  # noqa: F401 (fixtures)

pytestmark = pytest.mark.root


def _read(fh: int, offset: int, size: int) -> dict[str, Any]:
    return {"read": F.make("fuse_read_in", fh=fh, offset=offset, size=size)}


def _nlookups(fs: PassthroughFS) -> dict[int, int]:
    return {nodeid: ino.nlookup for nodeid, ino in fs.store._by_id.items()}


def _walk(t: Twins, nodeid: int, size: int) -> list[tuple[bytes, int]]:
    """READDIRPLUS from offset 0 to the end, `size` bytes a reply; (name, nodeid) of each entry."""
    fh = t.ok("OPENDIR", {"open": F.make("fuse_open_in")}, nodeid=nodeid).args["open"].fh
    seen: list[tuple[bytes, int]] = []
    offset = 0
    while True:
        rep = t.ok("READDIRPLUS", _read(fh, offset, size), nodeid=nodeid)
        entries = rep.args["entries"]
        if not entries:
            break
        for ent, name in entries:
            seen.append((bytes(name), ent.entry_out.nodeid))
        offset = entries[-1][0].dirent.off
    t.ok("RELEASEDIR", {"release": F.make("fuse_release_in", fh=fh)}, nodeid=nodeid)
    return seen


@pytest.mark.parametrize("fs_class", [PassthroughFS, GuestPassthroughFS], ids=["standalone", "vhost"])
@pytest.mark.parametrize("handles", [HandleMode.PREFER, HandleMode.NEVER])
@pytest.mark.parametrize("cache", [CacheMode.NONE, CacheMode.AUTO])
def test_readdirplus_through_the_fast_path_as_python(twins: Any, share: Path, handles: HandleMode,  # noqa: F811
                                                     cache: CacheMode, fs_class: type[PassthroughFS]) -> None:
    t: Twins = twins(cache=cache, inode_file_handles=handles, fs_class=fs_class)
    for i in range(40):
        (share / f"n{i:02d}").write_bytes(b"x" * i)
    known = t.ok("LOOKUP", {"name": b"file"}, nodeid=1).args["entry"].nodeid  # a known inode, and new ones
    whole = _walk(t, 1, 4096)
    names = {n for n, _ in whole}
    assert {b".", b"..", b"file", b"dir", b"link", b"sub", b"gone", b"n00", b"n39"} <= names
    assert dict(whole)[b"file"] == known
    assert dict(whole)[b"sub"] != 0  # the submount (FUSE_ATTR_SUBMOUNT in the bytes compared)
    # One entry a reply, and again: every reply byte for byte, known inodes referenced once more.
    assert _walk(t, 1, 200) == whole
    # Under a directory: a handle-held one whose fd is not cached yet leaves its entries to fs.lookup.
    d = t.ok("LOOKUP", {"name": b"dir"}, nodeid=1).args["entry"].nodeid
    assert [n for n, _ in _walk(t, d, 4096)] == [b".", b"..", b"inner"]
    # An entry gone from the host between the listing and its lookup is left out by both.
    fh = t.ok("OPENDIR", {"open": F.make("fuse_open_in")}, nodeid=1).args["open"].fh
    first = t.ok("READDIRPLUS", _read(fh, 0, 200), nodeid=1).args["entries"]  # the listing is made here
    os.unlink(share / "gone")
    rest: list[bytes] = []
    offset = first[-1][0].dirent.off
    while entries := t.ok("READDIRPLUS", _read(fh, offset, 4096), nodeid=1).args["entries"]:
        rest += [bytes(n) for _e, n in entries]
        offset = entries[-1][0].dirent.off
    assert b"gone" not in rest and b"n39" in rest

    fs_c, fs_py = t.fs_c, t.fs_py
    assert _nlookups(fs_c) == _nlookups(fs_py)
    assert _nlookups(fs_c)[known] == 4  # its LOOKUP and three READDIRPLUS entries
    inner = t.c.server._inner_lookups
    assert inner["served"] >= 3 * 44 and inner[errno.ENOENT] == 1, inner  # the root's entries, "gone"
    c, py = t.c.server.counters(), t.py.server.counters()
    assert c["ops"] == py["ops"] and c["errors"] == py["errors"], (c, py)
    assert c["ops"]["LOOKUP"] == 2
