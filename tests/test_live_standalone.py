"""`fsinspect daemon --standalone --control` is a live source like the vhost-user mode: the host kernel's
FUSE client on a real /dev/fuse mount, a real headless client (`fsinspect attach --format jsonl`), the
snapshot a client gets first, and the summary at exit (--summary-json, shaped as the proxy's)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.standalone_mount import REPO, standalone

pytestmark = pytest.mark.root


def _wait_connected(pid: int) -> None:
    """Until the process holds a socket (attach connected to the control socket), then a moment more for
    its hello and snapshot."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        links = []
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                links.append(os.readlink(fd))
            except OSError:  # closed meanwhile
                pass
        if any(x.startswith("socket:") for x in links):
            time.sleep(0.5)
            return
        time.sleep(0.05)
    raise AssertionError("attach did not connect within 30 s")


def test_standalone_control_snapshot_stream_and_summary(tmp_path: Path) -> None:
    require_root()
    shared, mnt, ctl, summ = tmp_path / "shared", tmp_path / "mnt", tmp_path / "ctl.sock", tmp_path / "s.json"
    shared.mkdir()
    (shared / "f").write_bytes(b"hello")
    with standalone(shared, mnt, "--control", str(ctl), "--summary-json", str(summ)):
        attach = subprocess.Popen([sys.executable, "-m", "fsinspect.cli", "attach", str(ctl), "--format", "jsonl",
                                   "--filter", "op == MKDIR"], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        try:
            assert (mnt / "f").read_bytes() == b"hello"
            with socket.socket(socket.AF_UNIX) as s:  # a client that joins now gets the snapshot first
                s.settimeout(10)
                s.connect(str(ctl))
                f = s.makefile("rb")
                hello, snap = json.loads(f.readline()), json.loads(f.readline())
            assert hello["type"] == "hello" and hello["source"] == "daemon" and hello["version"] == 2
            assert snap["type"] == "snapshot" and snap["stats"]["total"] > 0
            assert {"inodes", "stats", "lints", "submounts", "syncfs", "pending", "held", "exchanges"} <= set(snap)
            assert any(i["name"] == "f" for i in snap["inodes"])
            _wait_connected(attach.pid)  # what follows reaches it live
            os.mkdir(mnt / "made")
        except BaseException:
            attach.kill()
            raise
    out, err = attach.communicate(timeout=30)  # the daemon's end ends the stream
    lines = [json.loads(x) for x in out.splitlines()]
    assert attach.returncode == 0, err
    assert [x["opcode"] for x in lines] == ["MKDIR"] and lines[0]["request"]["args"]["name"] == "made"
    assert lines[0]["error"] is None and lines[0]["n"] > 0
    live = json.loads(summ.read_text())["live"]
    assert live["opcodes"]["MKDIR"] == 1 and live["requests"] >= live["replies"] > 0
    assert {"latency", "errors", "lints", "submounts", "syncfs", "control_clients"} <= set(live)
