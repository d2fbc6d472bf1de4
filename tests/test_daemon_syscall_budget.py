"""What one request costs the running vhost-user daemon, counted in system calls (strace -c on the live
process, attached after start-up): a count holds on a loaded machine where a time would not.

The budgets are what each request needs: the queue thread's wait (one epoll_wait: the kick eventfd is
edge-triggered and never read), the op's own calls, and the call eventfd's write.  They pin the hot path against a cost coming back unseen:
a credential switch per CREATE, or a handle-held directory opened and closed again for every name op.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dissectors import fuse as F
from dissectors import ring
from fsinspect.guest.share import make_share
from fsinspect.rerun.front import Front
from tests.conftest import require_root
from tests.pipes import read_line
from tests.vhostkit import cli_daemon, fuse_ok, unique

pytestmark = pytest.mark.root
N = 200


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[int, Front]]:
    """The CLI daemon as users start it (default sandbox and seccomp as root), INIT done."""
    require_root()
    if not os.path.exists("/usr/bin/strace"):
        pytest.fail("strace is missing (scripts/setup installs it)")
    with make_share(root_tmpfs_mb=64) as share:
        (share.root / "d").mkdir()
        (share.root / "d" / "f").write_bytes(b"x")
        with cli_daemon(share.root) as (proc, front):
            yield proc.pid, front


def _count(pid: int, work: Callable[[], None]) -> dict[str, int]:
    """System calls of every thread of `pid` while `work` runs: {name: calls}."""
    st = subprocess.Popen(["strace", "-f", "-c", "-p", str(pid)], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, bufsize=0)
    assert st.stderr is not None
    try:
        line = read_line(st.stderr, 30, "strace attaching")  # "strace: Process N attached with M threads"
        assert " attached" in line, line
        work()
        st.send_signal(signal.SIGINT)
        out = st.communicate(timeout=20)[1].decode()
    except BaseException:
        st.kill()
        st.wait(10)
        raise
    calls: dict[str, int] = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 5 and f[-1] != "total" and f[0][0].isdigit() and f[3].isdigit():
            calls[f[-1]] = int(f[3])
    assert calls, out
    return calls


def _per_request(calls: dict[str, int]) -> float:
    return sum(calls.values()) / N


def test_getattr_lookup_create_syscall_budgets(daemon: tuple[int, Front]) -> None:
    pid, front = daemon
    d = fuse_ok(front, "LOOKUP", {"name": b"d"}).args["entry"].nodeid  # a handle-held directory
    f = fuse_ok(front, "LOOKUP", {"name": b"f"}, nodeid=d).args["entry"].nodeid
    fuse_ok(front, "LOOKUP", {"name": b"f"}, nodeid=d)  # warm: the directory's fd is cached from here
    getattr_in = {"getattr": F.make("fuse_getattr_in")}
    create_in = F.make("fuse_create_in", flags=os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=0o100644, umask=0o022)
    made: list[tuple[int, int]] = []

    def creates() -> None:
        for i in range(N):
            r = fuse_ok(front, "CREATE", {"create": create_in, "name": b"c%d" % i}, nodeid=d)
            made.append((r.args["entry"].nodeid, r.args["open"].fh))

    ops: dict[str, tuple[Callable[[], None], float]] = {
        # epoll_wait + fstat/statx ... + eventfd write; a handle-held file too: one fstat of the O_PATH fd its
        # LOOKUP cached (it was open_by_handle_at + fstat + close)
        "GETATTR of the root": (lambda: [fuse_ok(front, "GETATTR", getattr_in) for _ in range(N)] and None, 3.2),
        "GETATTR of a handle-held file": (
            lambda: [fuse_ok(front, "GETATTR", getattr_in, nodeid=f) for _ in range(N)] and None, 3.2),
        # statx by name, nothing for the cached directory; no name_to_handle_at: the known inode's cached fd
        # pins it, so its key is its identity
        "LOOKUP in a handle-held directory": (
            lambda: [fuse_ok(front, "LOOKUP", {"name": b"f"}, nodeid=d) for _ in range(N)] and None, 3.2),
        # openat + statx + fcntl(F_SETFL) + name_to_handle_at; no credential switch for root's request
        "CREATE in a handle-held directory": (creates, 6.2),
        # a name whose inode was forgotten (the guest's cold stat): after two such in a row the name is opened
        # first and stat-ed on the fd, openat + statx + name_to_handle_at, no statx by name before (the first
        # two: 4 calls each)
        "LOOKUP of a new inode": (
            lambda: [fuse_ok(front, "LOOKUP", {"name": b"c%d" % i}, nodeid=d) for i in range(N)] and None, 5.2),
    }
    seen: dict[str, tuple[float, dict[str, int]]] = {}
    for name, (work, budget) in ops.items():
        if name == "LOOKUP of a new inode":  # the created files closed and forgotten: their inodes are gone
            for nodeid, fh in made:
                fuse_ok(front, "RELEASE", {"release": F.make("fuse_release_in", fh=fh, flags=os.O_RDWR)}, nodeid=nodeid)
                front.submit(0, F.encode_request("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)},
                                                 unique=unique(), nodeid=nodeid), 0, None)
                while front.in_flight():
                    front.poll(1.0)
        calls = _count(pid, work)
        seen[name] = (_per_request(calls), calls)
        assert _per_request(calls) <= budget, f"{name}: {_per_request(calls):.2f} syscalls per request > {budget}: {calls}"
    assert len(made) == N
    assert seen["LOOKUP of a new inode"][1]["statx"] <= N + 2, seen["LOOKUP of a new inode"]  # none by name
    for name in ("LOOKUP in a handle-held directory", "CREATE in a handle-held directory", "LOOKUP of a new inode"):
        assert "open_by_handle_at" not in seen[name][1], seen[name]  # the directory's fd stays cached
    assert not {"setfsuid", "setfsgid", "capset"} & set(seen["CREATE in a handle-held directory"][1])


def test_a_guest_sized_write_is_one_pwritev_from_guest_memory(daemon: tuple[int, Front]) -> None:
    """A WRITE as a Linux guest sends it (496 KiB): epoll_wait, one pwritev of the data where it is in guest
    memory (the C ring engine gathers only the request's first page; the pure-Python twin, which the daemon
    here runs under FSINSPECT_RING=python as this process does, gathers all of it and pwrites that), the
    call's eventfd write."""
    pid, front = daemon
    create_in = F.make("fuse_create_in", flags=os.O_RDWR | os.O_CREAT, mode=0o100644, umask=0o022)
    r = fuse_ok(front, "CREATE", {"create": create_in, "name": b"w"})
    node, fh = r.args["entry"].nodeid, r.args["open"].fh
    data = os.urandom(124 * 4096)
    args = [{"write": F.make("fuse_write_in", fh=fh, offset=(i % 8) * len(data), size=len(data)), "data": data}
            for i in range(N)]

    def writes() -> None:
        for a in args:
            assert fuse_ok(front, "WRITE", a, nodeid=node).args["write_out"].size == len(data)

    calls = _count(pid, writes)
    want, not_want = ("pwritev", "pwrite64") if ring.BACKEND == "c" else ("pwrite64", "pwritev")
    assert calls.get(want) == N and not_want not in calls, calls
    assert _per_request(calls) <= 3.2, calls
