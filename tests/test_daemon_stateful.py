"""Hypothesis stateful comparison: random op sequences run on the standalone mount and on a plain
reference directory (same host filesystem); every result (value or errno) and the whole tree after
each step must match."""

from __future__ import annotations

import itertools
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tests.conftest import require_root
from tests.standalone_mount import standalone

pytestmark = pytest.mark.root

PATHS = st.sampled_from(["a", "b", "c", "d1", "d2", "d1/a", "d1/b", "d2/a", "d1/d3", "d1/d3/a"])
DATA = st.binary(max_size=300)
_counter = itertools.count()
_roots: dict[str, Path] = {}


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except OSError as e:
        return ("err", e.errno)


def snapshot(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            s = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(s.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(s.st_mode):
                out[rel] = ("dir", stat.S_IMODE(s.st_mode), s.st_nlink)
            else:
                out[rel] = ("file", stat.S_IMODE(s.st_mode), s.st_nlink, s.st_size, p.read_bytes())
    return out


class MountMatchesPlainDir(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        name = f"case-{next(_counter)}"
        self.m = _roots["mnt"] / name
        self.r = _roots["ref"] / name
        self.m.mkdir()
        self.r.mkdir()

    def both(self, op: Callable[[Path], Any]) -> None:
        got, want = outcome(lambda: op(self.m)), outcome(lambda: op(self.r))
        assert got == want

    @rule(p=PATHS, data=DATA, append=st.booleans())
    def write_file(self, p: str, data: bytes, append: bool) -> None:
        def op(root: Path) -> int:
            with open(root / p, "ab" if append else "wb") as f:
                return f.write(data)
        self.both(op)

    @rule(p=PATHS, off=st.integers(0, 5000), data=DATA)
    def pwrite(self, p: str, off: int, data: bytes) -> None:
        def op(root: Path) -> int:
            fd = os.open(root / p, os.O_WRONLY)
            try:
                return os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        self.both(op)

    @rule(p=PATHS, size=st.integers(0, 6000))
    def truncate(self, p: str, size: int) -> None:
        self.both(lambda root: os.truncate(root / p, size))

    @rule(p=PATHS, off=st.integers(0, 6000), n=st.integers(0, 400))
    def read(self, p: str, off: int, n: int) -> None:
        def op(root: Path) -> bytes:
            fd = os.open(root / p, os.O_RDONLY)
            try:
                return os.pread(fd, n, off)
            finally:
                os.close(fd)
        self.both(op)

    @rule(p=PATHS)
    def unlink(self, p: str) -> None:
        self.both(lambda root: os.unlink(root / p))

    @rule(p=PATHS)
    def mkdir(self, p: str) -> None:
        self.both(lambda root: os.mkdir(root / p, 0o755))

    @rule(p=PATHS)
    def rmdir(self, p: str) -> None:
        self.both(lambda root: os.rmdir(root / p))

    @rule(src=PATHS, dst=PATHS)
    def rename(self, src: str, dst: str) -> None:
        self.both(lambda root: os.rename(root / src, root / dst))

    @rule(src=PATHS, dst=PATHS)
    def link(self, src: str, dst: str) -> None:
        self.both(lambda root: os.link(root / src, root / dst))

    # Targets stay inside the test tree: writes through the link happen on the host for both sides
    # (an absolute target once created /nonexistent); confinement of absolute targets has its own test.
    @rule(dest=st.sampled_from(["a", "../a", "missing", "d1/a"]), p=PATHS)
    def symlink(self, dest: str, p: str) -> None:
        self.both(lambda root: os.symlink(dest, root / p))

    @rule(p=PATHS, mode=st.sampled_from([0o600, 0o644, 0o755, 0o700]))
    def chmod(self, p: str, mode: int) -> None:
        self.both(lambda root: os.chmod(root / p, mode, follow_symlinks=False)
                  if not os.path.islink(root / p) else None)

    @rule(p=PATHS)
    def stat(self, p: str) -> None:
        def op(root: Path) -> tuple[int, int, int]:
            s = os.lstat(root / p)
            return (s.st_mode, s.st_size, s.st_nlink)
        self.both(op)

    @rule(p=st.sampled_from(["", "d1", "d2", "d1/d3", "a"]))
    def listdir(self, p: str) -> None:
        self.both(lambda root: sorted(os.listdir(root / p)))

    @invariant()
    def trees_match(self) -> None:
        assert snapshot(self.m) == snapshot(self.r)


SETTINGS = settings(max_examples=50, stateful_step_count=25, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.mark.parametrize("daemon_args", [(), ("--cache", "always", "--writeback"),
                                         ("--cache", "none", "--inode-file-handles", "never")],
                         ids=["auto", "always-writeback", "none-never"])
def test_mount_matches_plain_directory(daemon_args: tuple[str, ...]) -> None:
    require_root()
    base = Path(tempfile.mkdtemp(prefix="fsinspect-stateful-"))
    (base / "shared").mkdir()
    (base / "ref").mkdir()
    try:
        with standalone(base / "shared", base / "mnt", *daemon_args):
            _roots.update(mnt=base / "mnt", ref=base / "ref")
            run_state_machine_as_test(MountMatchesPlainDir, settings=SETTINGS)
    finally:
        _roots.clear()
        shutil.rmtree(base, ignore_errors=True)
