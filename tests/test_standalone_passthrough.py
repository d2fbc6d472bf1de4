"""FUSE passthrough (`fsinspect daemon --standalone --passthrough`) on a real /dev/fuse mount: the host
kernel reads and writes a passthrough file's host file itself; the daemon falls back to READ/WRITE where
the kernel refuses; the debugger's rules and the recording decide what may go past them."""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.passthrough import CacheMode, Options, PassthroughFS
from daemon.passthrough.backing import BackingFiles
from daemon.server import Server
from dissectors import fuse as F
from dissectors.spec import fuse as spec
from fsinspect.recording.reader import RecordingReader
from tests.conftest import require_root
from tests.daemon_client import KERNEL_FLAGS, EngineClient
from tests.standalone_mount import start, stop

pytestmark = pytest.mark.root

INIT = spec.INIT_FLAGS.by_name()
FOPEN_PASSTHROUGH = spec.FOPEN.by_name()["PASSTHROUGH"]
OP = {o.name: o.value for o in spec.OPCODES}


@dataclass
class Run:
    shared: Path
    mnt: Path
    summary_path: Path
    log: str = ""  # the daemon's stderr, once it has exited

    @property
    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.summary_path.read_text())
        return out


@contextmanager
def _daemon(base: Path, *extra: str, shared: Path | None = None) -> Iterator[Run]:
    """One daemon (--cache none, info log) on `shared` (default base/shared), stopped on exit; then the
    run has its summary and its log."""
    base.mkdir(exist_ok=True)
    run = Run(shared or base / "shared", base / "mnt", base / "summary.json")
    run.shared.mkdir(exist_ok=True)
    run.mnt.mkdir(exist_ok=True)
    proc = start(run.shared, run.mnt, "--cache", "none", "--summary-json", str(run.summary_path),
                 "--log-level", "info", *extra)
    try:
        yield run
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        assert proc.stderr is not None
        run.log = proc.stderr.read().decode()
        assert proc.returncode == 0, run.log
    finally:
        stop(proc, run.mnt)


def _io_workload(m: Path, host: Path, *, direct_io: bool = False) -> None:
    """Writes and reads every way a file can be: pwrite/pread, O_APPEND, a shared mmap, ftruncate, two
    handles on one file at once (one backing file for both), and a file made with O_CREAT.  `direct_io`
    (--cache none without passthrough): the kernel refuses a shared mmap (ENODEV)."""
    f = m / "f"
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"a" * 8192, 0)
        os.pwrite(fd, b"bcd", 4096)
        assert os.pread(fd, 5, 4094) == b"aabcd"
        fd2 = os.open(f, os.O_RDONLY)  # a second handle while the first is open
        try:
            assert os.pread(fd2, 3, 4096) == b"bcd"
        finally:
            os.close(fd2)
        os.ftruncate(fd, 4099)
        assert os.fstat(fd).st_size == 4099
    finally:
        os.close(fd)
    assert (host / "f").read_bytes() == b"a" * 4096 + b"bcd"
    with open(f, "ab") as fp:
        fp.write(b"END")
    assert (host / "f").read_bytes().endswith(b"bcdEND")
    fd = os.open(f, os.O_RDWR)
    try:
        if direct_io:
            with pytest.raises(OSError) as ei:
                mmap.mmap(fd, 0)
            assert ei.value.errno == errno.ENODEV
            os.pwrite(fd, b"MMAP", 0)
        else:
            with mmap.mmap(fd, 0) as mm:
                mm[0:4] = b"MMAP"
                mm.flush()
                assert mm[4096:4099] == b"bcd"
    finally:
        os.close(fd)
    assert (host / "f").read_bytes()[:4] == b"MMAP"
    assert f.read_bytes() == (host / "f").read_bytes()
    (host / "g").write_bytes(b"written on the host")
    assert (m / "g").read_bytes() == b"written on the host"  # a file the daemon did not create


@pytest.mark.parametrize(("sandbox", "syscalls"), [("namespace", "c"), ("namespace", "python"), ("none", "c")])
def test_passthrough_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox: str, syscalls: str) -> None:
    """Every byte goes through the kernel to the host file: the daemon sees OPEN/FLUSH/RELEASE and
    SETATTR, never a READ or a WRITE; under the sandbox CAP_SYS_ADMIN is raised only for the ioctls
    (the C twin and the ctypes twin of ioctl_cap)."""
    require_root()
    monkeypatch.setenv("FSINSPECT_SYSCALLS", syscalls)
    with _daemon(tmp_path, "--passthrough", "on", "--sandbox", sandbox) as run:
        _io_workload(run.mnt, run.shared)
    s = run.summary
    assert "READ" not in s["ops"] and "WRITE" not in s["ops"], s["ops"]
    assert s["ops"]["OPEN"] >= 4 and s["ops"]["CREATE"] == 1
    pt = s["passthrough"]
    assert pt["enabled"] and pt["refused"] == {} and pt["open_now"] == 0
    assert pt["opened"] == s["ops"]["OPEN"] + s["ops"]["CREATE"]  # every file handle


def test_passthrough_off_serves_read_write(tmp_path: Path) -> None:
    """The same workload with --passthrough off: READ and WRITE reach the daemon (and --cache none's
    direct_io refuses the shared mmap that passthrough allows)."""
    require_root()
    with _daemon(tmp_path, "--passthrough", "off") as run:
        _io_workload(run.mnt, run.shared, direct_io=True)
    s = run.summary
    assert s["ops"]["READ"] > 0 and s["ops"]["WRITE"] > 0
    assert "passthrough" not in s


@contextmanager
def _overlays(base: Path, depth: int) -> Iterator[Path]:
    """A directory `depth` overlayfs mounts deep (each the lower layer of the next)."""
    lower = base / "l0"
    lower.mkdir()
    mounted: list[Path] = []
    try:
        for i in range(1, depth + 1):
            for d in (f"u{i}", f"w{i}", f"o{i}"):
                (base / d).mkdir()
            subprocess.run(["mount", "-t", "overlay", f"fsinspect-ovl{i}", "-o",
                            f"lowerdir={lower},upperdir={base}/u{i},workdir={base}/w{i}", str(base / f"o{i}")],
                           check=True, capture_output=True)
            lower = base / f"o{i}"
            mounted.append(lower)
        yield lower
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", "-l", str(m)], check=False, capture_output=True)


@pytest.mark.parametrize("depth", [1, 2])
def test_stacked_shared_dir(tmp_path: Path, depth: int) -> None:
    """A shared dir on an overlayfs asks for max_stack_depth 2, so its files pass through; one on an
    overlayfs over an overlayfs is as deep as the kernel allows, so the kernel refuses each backing file
    (ELOOP) and the daemon serves READ/WRITE itself, with one warning saying why."""
    require_root()
    with _overlays(tmp_path, depth) as top:
        (top / "shared").mkdir()
        (top / "shared" / "f").write_bytes(b"on an overlay")
        with _daemon(tmp_path / "run", "--passthrough", "on", shared=top / "shared") as run:
            assert (run.mnt / "f").read_bytes() == b"on an overlay"
            (run.mnt / "f").write_bytes(b"rewritten")
            assert (top / "shared" / "f").read_bytes() == b"rewritten"
            assert (run.mnt / "f").read_bytes() == b"rewritten"
    s, pt = run.summary, run.summary["passthrough"]
    assert f"(max_stack_depth {depth and 2})" in run.log
    if depth == 1:
        assert pt["opened"] >= 3 and not pt["refused"] and "READ" not in s["ops"]
    else:
        assert pt["opened"] == 0 and pt["refused"]["ELOOP"] >= 3 and pt["enabled"]
        assert s["ops"]["READ"] >= 2 and s["ops"]["WRITE"] >= 1
        assert run.log.count("the kernel refused a backing file") == 1
        assert "Too many levels of symbolic links: the shared directory's filesystem is stacked too deep" in run.log


def test_writeback_turns_passthrough_off(tmp_path: Path) -> None:
    """The kernel does not combine passthrough with the writeback cache: --writeback wins, with a warning,
    and READ/WRITE are served."""
    require_root()
    with _daemon(tmp_path, "--passthrough", "on", "--writeback") as run:
        (run.mnt / "f").write_bytes(b"x" * 10000)
        assert (run.mnt / "f").read_bytes() == b"x" * 10000
    assert "passthrough off: the kernel does not combine it with the writeback cache" in run.log
    assert "passthrough" not in run.summary and run.summary["ops"]["WRITE"] >= 1


class _NoBacking:
    """A /dev/fuse that must never be asked: registering a backing file here is the bug looked for."""

    def backing_open(self, fd: int, cap: int = -1) -> int:
        raise AssertionError("a backing file registered without FUSE_PASSTHROUGH")

    def backing_close(self, backing_id: int, cap: int = -1) -> None:
        raise AssertionError("a backing file closed without FUSE_PASSTHROUGH")


@pytest.mark.parametrize("offered", [False, True], ids=["kernel-without", "kernel-with"])
def test_init_negotiation(tmp_path: Path, caplog: pytest.LogCaptureFixture, offered: bool) -> None:
    """FUSE_PASSTHROUGH is asked for only when the kernel offers it, with max_stack_depth (0 otherwise,
    and flags2 travels only with INIT_EXT); a kernel without it (before 6.9, or built without it) gets one
    warning saying so, and its OPENs are answered without passthrough and no backing file."""
    (tmp_path / "f").write_bytes(b"x")
    fs = PassthroughFS(Options(str(tmp_path), cache=CacheMode.NONE, passthrough=True))
    fs.backing = BackingFiles(_NoBacking())
    server = Server(fs, dispatch="inline")
    c = EngineClient(server)
    kernel = KERNEL_FLAGS | (INIT["PASSTHROUGH"] | INIT["INIT_EXT"] if offered else 0)
    try:
        with caplog.at_level(logging.INFO, logger="fsinspect.daemon.passthrough"):
            out = c.init(kernel).args["init_out"]
        want = out.flags | out.flags2 << 32
        if offered:
            assert want & INIT["PASSTHROUGH"] and want & INIT["INIT_EXT"] and out.max_stack_depth == 1
            assert "passthrough on" in caplog.text
            return
        assert not want & INIT["PASSTHROUGH"] and out.max_stack_depth == 0
        assert "this kernel does not offer FUSE_PASSTHROUGH" in caplog.text
        fh_reply = c.ok("OPEN", {"open": F.make("fuse_open_in", flags=os.O_RDONLY)}, nodeid=c.nodeid(1, b"f"))
        o = fh_reply.args["open"]
        assert not o.open_flags & FOPEN_PASSTHROUGH and o.backing_id == 0
        assert c.ok("READ", {"read": F.make("fuse_read_in", fh=o.fh, size=10)}, nodeid=2).args["data"] == b"x"
    finally:
        server.shutdown()
        fs.close()


def _open_replies(rec: Path) -> list[Any]:
    """Every fuse_open_out the recording holds (OPEN and CREATE replies), and the READ/WRITE count."""
    with RecordingReader(rec) as r:
        recs = [(x.inbound, x.data) for x in r if x.is_fuse]
    ops = {}
    for inbound, data in recs:
        if inbound:
            h = F.peek_header(data)
            ops[h[2]] = h[1]
    out = []
    for inbound, data in recs:
        if not inbound and int.from_bytes(data[4:8], "little", signed=True) == 0:
            op = ops.get(int.from_bytes(data[8:16], "little"))
            if op in (OP["OPEN"], OP["CREATE"]):
                out.append(F.decode_reply(data, op).args["open"])
    return out


def test_recording_shows_passthrough_opens_and_auto_keeps_it_off(tmp_path: Path) -> None:
    """--record with --passthrough on: the OPEN replies carry FOPEN_PASSTHROUGH and their backing_id, and
    no READ/WRITE is recorded; with the default (auto), --record turns passthrough off, so it sees them."""
    require_root()
    rec_on, rec_auto = tmp_path / "on.pcapng", tmp_path / "auto.pcapng"
    with _daemon(tmp_path / "on", "--passthrough", "on", "--record", str(rec_on)) as run:
        _io_workload(run.mnt, run.shared)
    assert "--passthrough on: READ/WRITE of files open in passthrough are not seen by --record" in run.log
    opens = _open_replies(rec_on)
    assert opens and all(o.open_flags & FOPEN_PASSTHROUGH and o.backing_id > 0 for o in opens)
    with RecordingReader(rec_on) as r:
        assert not any(x.inbound and F.peek_header(x.data)[1] in (OP["READ"], OP["WRITE"]) for x in r if x.is_fuse)
    with _daemon(tmp_path / "auto", "--record", str(rec_auto)) as run:
        _io_workload(run.mnt, run.shared, direct_io=True)
    assert "passthrough off: --record should see every READ/WRITE" in run.log
    opens = _open_replies(rec_auto)
    assert opens and not any(o.open_flags & FOPEN_PASSTHROUGH or o.backing_id for o in opens)
    with RecordingReader(rec_auto) as r:
        assert sum(1 for x in r if x.is_fuse and x.inbound and F.peek_header(x.data)[1] == OP["READ"]) > 0


def test_a_rule_on_read_keeps_files_out_of_passthrough(tmp_path: Path) -> None:
    """--passthrough on with a rule that can stop READ: files are opened without passthrough, so the rule
    holds their READs (EIO injected) while WRITE still works through the daemon."""
    require_root()
    with _daemon(tmp_path, "--passthrough", "on", "--inject", "op == READ", "errno=EIO") as run:
        (run.shared / "f").write_bytes(b"host data")
        with pytest.raises(OSError) as ei:
            (run.mnt / "f").read_bytes()
        assert ei.value.errno == errno.EIO
        (run.mnt / "g").write_bytes(b"written")
        assert (run.shared / "g").read_bytes() == b"written"
    s = run.summary
    pt = s["passthrough"]
    assert "a debugger rule can hold READ/WRITE, so files opened from now on are served through the daemon" \
        in run.log
    assert pt["opened"] == 0 and pt["withheld_for_rules"] >= 2
    assert s["ops"]["WRITE"] >= 1


def test_a_rule_on_other_ops_leaves_passthrough_on(tmp_path: Path) -> None:
    """A rule that cannot stop READ or WRITE (here: GETXATTR) does not cost the files their passthrough."""
    require_root()
    with _daemon(tmp_path, "--passthrough", "on", "--xattr", "--inject", "op == GETXATTR",
                 "errno=ENODATA") as run:
        _io_workload(run.mnt, run.shared)
    s = run.summary
    assert s["passthrough"]["opened"] >= 4 and s["passthrough"]["withheld_for_rules"] == 0
    assert "READ" not in s["ops"] and "WRITE" not in s["ops"]


def test_backing_ids_are_reused_and_hold_no_open_file(tmp_path: Path) -> None:
    """A file opened again reuses its inode's backing id (one FUSE_DEV_IOC_BACKING_OPEN for many opens);
    the idle id holds the host file by path only: a script written through the mount runs on the host
    (a write-open backing file would make exec fail, ETXTBSY), and a file deleted through the mount frees
    its space on the host at once (its FORGET lets the idle id go)."""
    require_root()
    tmpfs = tmp_path / "shared"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "fsinspect-pt-test", str(tmpfs)], check=True)
    try:
        with _daemon(tmp_path, "--passthrough", "on") as run:
            script = run.mnt / "run.sh"
            script.write_text("#!/bin/sh\necho ran\n")
            script.chmod(0o755)
            for _ in range(5):
                assert script.read_text().startswith("#!")
            out = subprocess.run([str(run.shared / "run.sh")], capture_output=True, text=True, check=True)
            assert out.stdout == "ran\n"
            free = os.statvfs(tmpfs).f_bfree
            (run.mnt / "big").write_bytes(b"\1" * (16 << 20))
            (run.mnt / "big").read_bytes()
            assert os.statvfs(tmpfs).f_bfree < free - 3000
            os.unlink(run.mnt / "big")
            for _ in range(100):  # the FORGET comes as the kernel drops the inode
                if os.statvfs(tmpfs).f_bfree >= free - 16:
                    break
                time.sleep(0.02)
            assert os.statvfs(tmpfs).f_bfree >= free - 16
        pt = run.summary["passthrough"]
        assert pt["opened"] == 1 + 5 + 2 and pt["registered"] == 2, pt  # run.sh: 1 + 5 opens; big: 2
    finally:
        subprocess.run(["umount", "-l", str(tmpfs)], check=False)


def test_a_rule_added_while_a_file_is_open_in_passthrough(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The debugger's rules change while files are open (control v2, the TUI): a file already open in
    passthrough stays so, and its READs cannot be held (one warning says how many such files there are);
    a file opened after the rule is served through the daemon, and its READ is held."""
    require_root()
    from daemon.hold import EngineHoldPoint
    from daemon.standalone import Standalone
    from dissectors.ring import HOLD_REQUEST, HoldRule

    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    mnt.mkdir()
    (shared / "a").write_bytes(b"A" * 100)
    (shared / "b").write_bytes(b"B" * 100)
    point = EngineHoldPoint()
    held: list[tuple[int, int]] = []  # (opcode, nodeid)

    def on_held(queue: int, unique: int, direction: int, raw: bytes, ts_ns: int) -> None:
        h = F.decode_request(raw).header
        held.append((h.opcode, h.nodeid))
        point.release(queue, unique)

    point.on_held = on_held
    session = Standalone(str(mnt), Options(str(shared), cache=CacheMode.NONE, passthrough=True), hold=point)
    serving = threading.Thread(target=session.serve)
    serving.start()
    try:
        fa = os.open(mnt / "a", os.O_RDONLY)
        try:
            assert os.pread(fa, 10, 0) == b"A" * 10
            point.set_rules([HoldRule(HOLD_REQUEST, 0, frozenset({OP["READ"]}))])
            with caplog.at_level(logging.WARNING, logger="fsinspect.daemon.passthrough"):
                assert (mnt / "b").read_bytes() == b"B" * 100
            assert os.pread(fa, 10, 50) == b"A" * 10  # still passthrough: never held
        finally:
            os.close(fa)
        assert held and {op for op, _ in held} == {OP["READ"]}
        assert len({nodeid for _, nodeid in held}) == 1  # b's: no READ of a was held (or seen)
        assert "1 file(s) already open in passthrough stay so until their last close" in caplog.text
        pt = session.fs.counters()["passthrough"]
        assert pt["opened"] == 1 and pt["withheld_for_rules"] == 1
    finally:
        session.stop()
        serving.join(timeout=15)
        session.close()


def test_idle_backing_ids_are_bounded(tmp_path: Path) -> None:
    """More files opened than IDLE_MAX: the least recently used idle ids are closed, CLOSE_BATCH at a time
    under one raise of CAP_SYS_ADMIN (the sandboxed reader keeps it permitted only), none fails, and the
    files opened last stay idle."""
    require_root()
    from daemon.passthrough.backing import CLOSE_BATCH, IDLE_MAX
    from daemon.standalone import Standalone

    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    mnt.mkdir()
    n = IDLE_MAX + CLOSE_BATCH + 5
    for i in range(n):
        (shared / f"f{i}").write_bytes(b"%d" % i)
    session = Standalone(str(mnt), Options(str(shared), cache=CacheMode.NONE, passthrough=True),
                         sandbox="namespace")
    serving = threading.Thread(target=session.serve)
    serving.start()
    try:
        for i in range(n):
            assert (mnt / f"f{i}").read_bytes() == b"%d" % i
        assert session.error is None
        backing = session.fs.backing
        assert backing is not None
        for _ in range(250):  # RELEASE is asynchronous: the last one may still be on its way
            pt = backing.counters()
            if pt["open_now"] == 0:
                break
            time.sleep(0.02)
        assert (pt["registered"], pt["closed"], pt["close_failed"]) == (n, CLOSE_BATCH, 0), pt
        assert pt["idle"] == IDLE_MAX and pt["open_now"] == 0
        assert list(backing.idle)[-1] == max(backing.idle)  # the newest is the last to go
        assert (mnt / f"f{n - 1}").read_bytes() == b"%d" % (n - 1)  # a re-open reuses its id
        assert backing.counters()["registered"] == n
    finally:
        session.stop()
        serving.join(timeout=30)
        session.close()


def test_an_o_direct_open_is_served_through_the_daemon(tmp_path: Path) -> None:
    """The kernel opens a passthrough file's backing file with the opener's flags, so O_DIRECT would reach
    the host file: on ext4 (this shared dir) a read at an odd offset or into an unaligned buffer failed
    with EINVAL, where without passthrough it works (the daemon drops O_DIRECT, as the C virtiofsd does).
    An O_DIRECT open is answered DIRECT_IO and served by READ/WRITE; the file's other opens still pass
    through while it is open.  (An O_DIRECT open of a file open in passthrough already must join it: the
    kernel refuses a mix, EINVAL.)"""
    require_root()
    data = os.urandom(8192)
    with _daemon(tmp_path, "--passthrough", "on") as run:
        f = run.mnt / "f"
        f.write_bytes(data)  # (in passthrough: its backing id is idle once it is closed)
        fd = os.open(f, os.O_RDWR | os.O_DIRECT)
        try:
            assert os.pread(fd, 100, 3) == data[3:103]
            assert os.pwrite(fd, b"x" * 100, 5) == 100
            plain = os.open(f, os.O_RDWR)  # passes through beside the O_DIRECT handle
            try:
                assert os.pread(plain, 12, 3) == data[3:5] + b"x" * 10
                assert os.pwrite(plain, b"yz", 200) == 2
            finally:
                os.close(plain)
            assert os.pread(fd, 4, 199) == data[199:200] + b"yz" + data[202:203]
        finally:
            os.close(fd)
        assert (run.shared / "f").read_bytes() == data[:5] + b"x" * 100 + data[105:200] + b"yz" + data[202:]
    s = run.summary
    assert s["ops"]["READ"] == 2 and s["ops"]["WRITE"] == 1, s["ops"]  # the O_DIRECT handle's I/O only
    pt = s["passthrough"]
    assert pt["o_direct_served"] == 1 and pt["opened"] == 2 and pt["refused"] == {} and pt["open_now"] == 0
