"""FUSE over io_uring's pieces that need no mount: the C rings and their Python twin against the real
kernel, and the --uring decision on the fuse module's enable_uring parameter.  The mounted paths run in
test_daemon_standalone.py (conformance and signals on both rings)."""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from daemon import standalone
from daemon.passthrough import CacheMode, Options, PassthroughFS
from daemon.server import FileSystem, Server
from daemon.transport import uring, uring_py
from daemon.transport.fusedev import FuseDev, FuseDevError, MountOptions, unmount
from dissectors import fuse as F
from tests.conftest import require_root
from tests.standalone_mount import uring_missing


def _both(name: str) -> list[Any]:
    """The twin's `name` and, when the extension is built, the C one: the same tests run on both."""
    out: list[Any] = [getattr(uring_py, name)]
    try:
        from daemon.transport import _uring  # type: ignore[attr-defined]

        out.append(getattr(_uring, name))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("Ring", _both("Ring"), ids=lambda c: c.__module__.rsplit(".", 1)[-1])
def test_ring_on_a_file_that_is_not_fuse_is_a_clear_error(Ring: type) -> None:
    """A REGISTER on something else than /dev/fuse comes back as an OSError naming the command, once;
    then the queue is over (wait() returns None), and close() is idempotent."""
    if why := uring_missing():
        pytest.skip(why)
    r, w = os.pipe()
    try:
        ring = Ring(r, 0, 2, 1 << 20)
        ring.register()
        with pytest.raises(OSError) as ei:
            ring.wait()
        assert ei.value.errno == errno.EOPNOTSUPP
        assert "FUSE_IO_URING_CMD_REGISTER" in str(ei.value)
        assert ring.wait() is None
        ring.close()
        ring.close()
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("Ring", _both("Ring"), ids=lambda c: c.__module__.rsplit(".", 1)[-1])
def test_ring_arguments_are_checked(Ring: type) -> None:
    for args in ((0, 0, 0, 1 << 20), (0, 0, 300, 1 << 20), (0, -1, 2, 1 << 20), (0, 0, 2, 100), (0, 0, 2, 1 << 20, 2000)):
        with pytest.raises(ValueError):
            Ring(*args)


@pytest.mark.parametrize("Ring", _both("Ring"), ids=lambda c: c.__module__.rsplit(".", 1)[-1])
def test_a_ring_grows_by_its_spare_entries_and_no_further(Ring: type) -> None:
    """grow() registers one entry more while spare ones are left (a lock wait holds one: the queue keeps
    its depth for everything else), then says False; a closed ring does not grow."""
    if why := uring_missing():
        pytest.skip(why)
    r, w = os.pipe()
    try:
        ring = Ring(r, 0, 2, 1 << 20, 2)
        assert (ring.depth, ring.capacity) == (2, 4)
        assert ring.grow() is True and ring.grow() is True and ring.depth == 4
        assert ring.grow() is False and ring.depth == 4
        assert Ring(r, 0, 2, 1 << 20).capacity == 2  # no spare by default
        ring.close()
        assert Ring(r, 0, 2, 1 << 20, 1).grow() is True
        closed = Ring(r, 0, 2, 1 << 20, 1)
        closed.close()
        assert closed.grow() is False
    finally:
        os.close(r)
        os.close(w)


def test_possible_cpus_parses_the_kernel_list(tmp_path: Path) -> None:
    f = tmp_path / "possible"
    f.write_text("0-3,6,8-9\n")
    assert uring.possible_cpus(str(f)) == [0, 1, 2, 3, 6, 8, 9]
    assert uring.possible_cpus(str(tmp_path / "missing")) == list(range(os.cpu_count() or 1))


def test_decide_follows_the_parameter(tmp_path: Path) -> None:
    """auto: only when enable_uring is on; off: never; on: turns it on (root) and says so; a kernel
    without the parameter: auto quietly keeps /dev/fuse, on is a one-line error."""
    param = tmp_path / "enable_uring"
    param.write_text("N\n")
    assert uring.decide("auto", str(param)) is False
    assert uring.decide("off", str(param)) is False
    if os.geteuid() == 0:
        assert uring.decide("on", str(param)) is True
        assert param.read_text() == "Y"
    else:
        with pytest.raises(FuseDevError, match="only root may turn it on"):
            uring.decide("on", str(param))
        param.write_text("Y\n")
    assert uring.decide("auto", str(param)) is True
    missing = str(tmp_path / "nothing")
    assert uring.decide("auto", missing) is False
    with pytest.raises(FuseDevError, match="no FUSE over io_uring"):
        uring.decide("on", missing)


def _entry(request: bytes, op_size: int) -> tuple[bytes, bytes]:
    """The ring entry's buffers the kernel fills for `request` (a /dev/fuse-layout request): the in
    header in in_out, the op's header in op_in, the rest in the payload, its size in ring_ent_in_out."""
    payload = request[40 + op_size:]
    header = bytearray(uring_py.HDR_SIZE)
    header[0:40] = request[:40]
    header[128:128 + op_size] = request[40:40 + op_size]
    struct.pack_into("=QQI", header, 256, 0, 7, len(payload))
    return bytes(header), payload


@pytest.mark.parametrize("rebuild", _both("rebuild"), ids=lambda f: f.__module__.rsplit(".", 1)[-1])
def test_rebuild_gives_dev_fuse_layout_and_clamps_what_does_not_add_up(rebuild: Any) -> None:
    """What wait() hands the engine is byte for byte the /dev/fuse request; an entry whose sizes do not
    add up (a length shorter than the payload, a payload size past the buffer, an op header past op_in)
    is clamped, never read past, and the engine answers it with one error reply."""
    getattr_req = F.encode_request("GETATTR", {"getattr": F.make("fuse_getattr_in")}, unique=5, nodeid=1)
    lookup_req = F.encode_request("LOOKUP", {"name": b"victim"}, unique=6, nodeid=1)
    write_req = F.encode_request("WRITE", {"write": F.make("fuse_write_in", size=5), "data": b"hello"}, unique=7)
    for req, op in ((getattr_req, 16), (lookup_req, 0), (write_req, len(write_req) - 45)):
        assert rebuild(*_entry(req, op)) == req
    header, payload = _entry(lookup_req, 0)
    short = bytearray(header)
    struct.pack_into("=I", short, 0, 41)  # says 41 bytes, the payload alone is 7
    bad = rebuild(bytes(short), payload)
    assert len(bad) == 40 + len(payload)
    big = bytearray(header)
    struct.pack_into("=I", big, 272, 1 << 30)  # a payload size past the buffer
    struct.pack_into("=I", big, 0, 1 << 31)  # and a length past op_in
    assert len(rebuild(bytes(big), payload)) == 40 + 128 + len(payload)
    with pytest.raises(ValueError):
        rebuild(header[:100], payload)
    replies: list[bytes] = []
    server = Server(FileSystem())
    server.handle(bad, lambda parts: replies.append(b"".join(parts)))
    assert len(replies) == 1
    _len, error, unique = struct.unpack_from("=IiQ", replies[0])
    assert error < 0 and unique == 6


class _ThreadedReplies(Server):
    """Every reply committed a moment later (the queue's thread is back waiting by then) from a thread
    that ends right after, as a debugger's delayed or released reply may be."""

    def handle(self, buf: Any, reply: Any, queue: int = 1) -> None:
        def later(parts: Any) -> None:
            time.sleep(0.002)
            reply(parts)

        super().handle(buf, lambda parts: threading.Thread(target=later, args=(parts,)).start(), queue)


@contextmanager
def _on_rings(tmp_path: Path, monkeypatch: Any, impl: str,
              make_server: Callable[[PassthroughFS], Server]) -> Iterator[tuple[Path, Path, Server, Any]]:
    """A real mount of tmp_path/shared at tmp_path/mnt, served by make_server(fs) over the rings (C or the
    twin); (shared, mnt, server, queues), all torn down whatever happened."""
    require_root()
    if why := uring_missing():
        pytest.skip(why)
    monkeypatch.setenv("FSINSPECT_URING", impl)
    Path(uring.ENABLE_PARAM).write_text("Y")  # what --uring on does
    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    mnt.mkdir()
    fs = PassthroughFS(Options(str(shared), cache=CacheMode.NONE))
    server = make_server(fs)
    dev = FuseDev.mount(str(mnt), MountOptions(fsname=str(shared)))
    queues = uring.UringQueues(dev.fd, server)
    assert queues.impl == ("C" if impl == "C" else "Python")
    reader = threading.Thread(target=standalone._reader, args=(dev, server, 0, queues.start_if_agreed), daemon=True)
    reader.start()
    try:
        yield shared, mnt, server, queues
    finally:
        unmount(str(mnt), lazy=True, via_fusermount=False)
        queues.close()
        server.shutdown()  # (ends lock waits still running)
        reader.join(10)
        dev.close()
        fs.close()


@pytest.mark.root
@pytest.mark.parametrize("impl", ["C", "python"])
def test_replies_from_threads_that_end_keep_every_queue_serving(tmp_path: Path, monkeypatch: Any,
                                                                impl: str) -> None:
    """The kernel cancels a ring command when the task that submitted it exits, and hands an entry its
    next request by task work on that task: only a queue's own thread may submit.  Before, a commit
    from another thread was submitted by that thread; once it ended, its entry came back ENOTCONN, the
    queue stopped, and the callers on that CPU hung."""
    with _on_rings(tmp_path, monkeypatch, impl, _ThreadedReplies) as (shared, mnt, _server, queues):
        (shared / "f").write_bytes(b"x")
        client = ("import os, sys\n"
                  "for cpu in sorted(os.sched_getaffinity(0)):\n"
                  "    os.sched_setaffinity(0, {cpu})\n"
                  "    for i in range(20):\n"
                  "        os.stat(sys.argv[1])\n"
                  "        open(sys.argv[1], 'rb').read()\n")
        for _ in range(2):
            r = subprocess.run([sys.executable, "-c", client, str(mnt / "f")], timeout=30, check=False)
            assert r.returncode == 0
        assert queues.served() > 80


_LOCK_WAITER = r"""
import fcntl, os, sys
os.sched_setaffinity(0, {int(sys.argv[2])})
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX, 0, 0)
print("locked", flush=True)
"""


@pytest.mark.root
@pytest.mark.parametrize("impl", ["C", "python"])
def test_lock_waiters_on_one_cpu_leave_its_queue_serving(tmp_path: Path, monkeypatch: Any, impl: str) -> None:
    """A SETLKW keeps its ring entry for as long as it waits, and the kernel parks a queue's requests
    while every entry of that queue is busy: ten lock waiters on one CPU (more than its 8 entries) parked
    every other request from that CPU, a root stat included, until a waiter gave up (the hang of
    test_daemon_hardening's lock test under load).  The queue registers an entry more per waiter."""
    import fcntl

    with _on_rings(tmp_path, monkeypatch, impl, Server) as (shared, mnt, server, queues):
        (shared / "f").write_bytes(b"x" * 4096)
        (shared / "other").write_bytes(b"y")
        hold = os.open(shared / "f", os.O_RDWR)  # the host holds the lock: every waiter through the mount waits
        try:
            fcntl.fcntl(hold, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
            _waiters_and_a_stat(mnt, server, queues, hold)
        finally:
            os.close(hold)


def _waiters_and_a_stat(mnt: Path, server: Server, queues: Any, hold: int) -> None:
    """DEPTH + 2 waiters on one CPU behind the host's OFD lock on `hold`, a stat from that CPU, then the
    lock released and every waiter served."""
    import fcntl

    cpu = min(os.sched_getaffinity(0))
    ring = next(r for r in queues.rings if r.qid == cpu)
    n = uring.DEPTH + 2
    os.stat(mnt / "f")  # FUSE_INIT answered, the rings registered
    waiters = [subprocess.Popen([sys.executable, "-c", _LOCK_WAITER, str(mnt / "f"), str(cpu)],
                                stdout=subprocess.PIPE, text=True) for _ in range(n)]
    try:
        deadline = time.monotonic() + 30
        while (waiting := server.counters()["lock_waits"]["waiting"]) < n:
            assert all(p.poll() is None for p in waiters), "a lock waiter ended before the lock was free"
            assert time.monotonic() < deadline, \
                f"{waiting} of {n} lock waits reached the daemon in 30 s (the rest parked behind a full queue)"
            time.sleep(0.02)
        assert ring.depth >= uring.DEPTH + n
        probe = ("import os, sys\nos.sched_setaffinity(0, {int(sys.argv[2])})\n"
                 "os.stat(sys.argv[1])\nopen(sys.argv[1], 'rb').read()\n")
        try:
            r = subprocess.run([sys.executable, "-c", probe, str(mnt / "other"), str(cpu)], timeout=10, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a stat on CPU {cpu} waited 10 s behind {n} lock waiters holding its queue")
        assert r.returncode == 0
        # The lock is free: the waiters get it one after another (each one's exit drops it).
        fcntl.fcntl(hold, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_UNLCK, 0, 0, 0, 0))
        for p in waiters:
            try:
                assert p.wait(20) == 0
            except subprocess.TimeoutExpired:
                pytest.fail("a lock waiter did not get the lock within 20 s of its release")
            assert p.stdout is not None and p.stdout.read().strip() == "locked"
        assert server.counters()["lock_waits"]["waiting"] == 0
    finally:
        for p in waiters:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)  # (a killed waiter whose wait the daemon holds ends once the session does)
            if p.stdout is not None:
                p.stdout.close()
