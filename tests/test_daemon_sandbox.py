"""`fsinspect daemon --sandbox`, seen from outside: a running standalone daemon's threads, through /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.sandbox import CAP, KEEP
from daemon.transport.fusedev import in_mountinfo
from dissectors import fuse as F
from tests.conftest import require_root
from tests.pipes import error_lines
from tests.vhostkit import cli_daemon, fuse_ok

pytestmark = pytest.mark.root

KEEP_MASK = sum(1 << CAP[name] for name in KEEP)


def _task(pid: int, tid: int) -> dict[str, object]:
    base = f"/proc/{pid}/task/{tid}"
    status = dict(line.split(":", 1) for line in Path(f"{base}/status").read_text().splitlines() if ":" in line)
    return {"caps": int(status["CapEff"], 16), "bounding": int(status["CapBnd"], 16),
            "nnp": status["NoNewPrivs"].strip(), "mnt": os.readlink(f"{base}/ns/mnt"),
            "net": os.readlink(f"{base}/ns/net"), "root": os.readlink(f"{base}/root")}


@pytest.mark.parametrize("level", ["namespace", "chroot", "none"])
def test_standalone_serving_threads_are_confined_the_main_thread_is_not(tmp_path: Path, level: str) -> None:
    require_root()
    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    mnt.mkdir()
    (shared / "hello").write_text("hi\n")
    p = subprocess.Popen([sys.executable, "-m", "fsinspect", "daemon", "--standalone", str(mnt), "--shared-dir",
                          str(shared), "--sandbox", level, "--xattr"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while not in_mountinfo(mnt):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0]
            time.sleep(0.05)
        # Serving works at this level: reads, creates, O_PATH reopens and xattrs (through procfs).
        assert (mnt / "hello").read_text() == "hi\n"
        (mnt / "new").write_text("x")
        os.setxattr(mnt / "new", "user.k", b"v")
        assert os.getxattr(mnt / "new", "user.k") == b"v"
        os.link(mnt / "new", mnt / "new2")
        assert (shared / "new2").read_text() == "x"
        # The first blocking request (FSYNC: the engine's pool) starts no thread: the pool's runs already.
        before = set(os.listdir(f"/proc/{p.pid}/task"))
        with open(mnt / "new", "rb") as f:
            os.fsync(f.fileno())
        assert set(os.listdir(f"/proc/{p.pid}/task")) == before
        me = _task(os.getpid(), os.getpid())
        tasks = {tid: _task(p.pid, tid) for tid in map(int, os.listdir(f"/proc/{p.pid}/task"))}
        main = tasks.pop(p.pid)
        assert main["caps"] == me["caps"] and main["mnt"] == me["mnt"] and main["root"] == "/"
        confined = [t for t in tasks.values() if t["caps"] == KEEP_MASK]
        if level == "none":
            assert not confined and all(t["mnt"] == me["mnt"] and t["root"] == "/" for t in tasks.values())
        else:
            assert confined, tasks
            for t in confined:
                assert t["bounding"] == KEEP_MASK and t["nnp"] == "1"
                if level == "namespace":
                    assert t["mnt"] != me["mnt"] and t["net"] != me["net"]
                else:
                    assert t["mnt"] == me["mnt"] and t["root"] == str(shared.resolve())
    finally:
        p.send_signal(signal.SIGTERM)
        out = p.communicate(timeout=20)[0]
    assert p.returncode == 0, out
    assert not in_mountinfo(mnt), "the main thread, outside the sandbox, unmounts"


def test_a_level_this_process_cannot_enter_is_a_one_line_error() -> None:
    require_root()  # to become nobody; the check comes before anything is mounted
    for level in ("namespace", "chroot"):
        r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable,
                            "-m", "fsinspect", "daemon", "--standalone", "/nonexistent", "--shared-dir", "/usr",
                            "--sandbox", level], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert f"--sandbox {level} needs root" in r.stderr and len(error_lines(r.stderr)) == 1, r.stderr


_SECCOMP_PROBE = """
import os, socket, sys, threading
from daemon.passthrough import Options, PassthroughFS
from daemon.sandbox import enter

fs = PassthroughFS(Options(sys.argv[1]))
def confined() -> None:
    enter("namespace", fs, "kill")
    t = threading.Thread(target=lambda: print("thread ok", flush=True))  # clone with CLONE_THREAD
    t.start()
    t.join()
    print("listdir", sorted(os.listdir(fs.root.fd if False else "/")), flush=True)
    if sys.argv[2] == "socket":
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    else:
        os.execv("/bin/true", ["true"])
    print("not reached", flush=True)
threading.Thread(target=confined).start()
"""


@pytest.mark.parametrize("call", ["socket", "exec"])
def test_seccomp_kills_a_serving_thread_that_leaves_the_allowlist(tmp_path: Path, call: str) -> None:
    require_root()
    (tmp_path / "f").write_text("")
    r = subprocess.run([sys.executable, "-c", _SECCOMP_PROBE, str(tmp_path), call], capture_output=True, text=True,
                       timeout=30, cwd=Path(__file__).parent.parent)
    assert r.stdout.splitlines() == ["thread ok", "listdir ['f']"], (r.stdout, r.stderr)
    assert r.returncode == -signal.SIGSYS, (r.returncode, r.stderr)


def test_recording_rotates_beside_the_first_part_from_inside_the_sandbox(tmp_path: Path) -> None:
    """The serving threads rotate the recording; they do it relative to the recording's directory as it
    was at the start, not through a path their new root no longer has (or that would land in the share)."""
    require_root()
    shared, mnt, out = tmp_path / "shared", tmp_path / "mnt", tmp_path / "out"
    for d in (shared, mnt, out):
        d.mkdir()
    rec = out / "r.pcapng"
    p = subprocess.Popen([sys.executable, "-m", "fsinspect", "daemon", "--standalone", str(mnt), "--shared-dir",
                          str(shared), "--sandbox", "namespace", "--record", str(rec), "--rotate-mb", "0.1",
                          "--rotate-keep", "2", "--snaplen", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while not in_mountinfo(mnt):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0]
            time.sleep(0.05)
        for i in range(8):
            (mnt / f"f{i}").write_bytes(os.urandom(128 * 1024))
    finally:
        p.send_signal(signal.SIGTERM)
        out_text = p.communicate(timeout=20)[0]
    assert p.returncode == 0, out_text
    files = sorted(x.name for x in out.iterdir())
    parts = [x for x in files if x.endswith(".pcapng")]
    assert len(parts) == 2 and all(x.startswith("r.") for x in parts), files
    assert files == sorted(parts + [f"{x}.fsidx" for x in parts]), files  # each part kept with its index
    assert sorted(x.name for x in shared.iterdir()) == [f"f{i}" for i in range(8)]


@pytest.mark.parametrize("level", ["namespace", "chroot"])
def test_vhost_serving_threads_and_the_pool_are_confined_before_the_first_request(tmp_path: Path,
                                                                                  level: str) -> None:
    """The vhost-user daemon: every thread but the main one is confined once QEMU's connection is served,
    the engine's pool thread among them, started then (Server.start_pool): the first blocking request (a
    guest's FSYNC) starts no thread on its own critical path."""
    require_root()
    shared = tmp_path / "shared"
    shared.mkdir()
    with cli_daemon(shared, "--sandbox", level) as (p, front):
        r = fuse_ok(front, "CREATE", {"create": F.make("fuse_create_in", flags=os.O_RDWR | os.O_CREAT, mode=0o100644),
                                      "name": b"f"})
        before = {tid: _task(p.pid, tid) for tid in map(int, os.listdir(f"/proc/{p.pid}/task"))}
        fuse_ok(front, "FSYNC", {"fsync": F.make("fuse_fsync_in", fh=r.args["open"].fh)}, nodeid=r.args["entry"].nodeid)
        assert set(map(int, os.listdir(f"/proc/{p.pid}/task"))) == set(before)
    me = _task(os.getpid(), os.getpid())
    main = before.pop(p.pid)
    assert main["mnt"] == me["mnt"] and main["root"] == "/"
    assert len(before) >= 4, before  # the connection's, the queues' and the pool's threads at least
    for t in before.values():
        assert t["caps"] == KEEP_MASK and t["nnp"] == "1", t
        if level == "namespace":
            assert t["mnt"] != me["mnt"], t
        else:
            assert t["root"] == str(shared.resolve()), t
