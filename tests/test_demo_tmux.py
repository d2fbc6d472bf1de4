"""`fsinspect demo` as a person runs it: in tmux, on the real guest, keys in, screen out.

The screen must show SYNCFS exchanges and a submount-flagged inode; quitting must leave no process,
mount or socket of the demo behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsinspect.guest.build import GuestImage

pytestmark = [pytest.mark.guest, pytest.mark.root]


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def screen(session: str) -> str:
    return tmux("capture-pane", "-t", session, "-p")


def wait_screen(session: str, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = screen(session)
        if re.search(pattern, text):
            return text
        if "DEMO-ENDED" in text:
            break
        time.sleep(0.5)
    raise AssertionError(f"screen never matched {pattern!r}; last screen:\n{text}")


def test_demo_in_tmux(guest_image: GuestImage, tmp_path: Path) -> None:
    session = f"fsi-demo-test-{os.getpid()}"
    log, rc_file = tmp_path / "demo.log", tmp_path / "rc"
    cmd = (f"{sys.executable} -m fsinspect demo --loops 1 --storm 100 --io-mb 4 --record {tmp_path / 'rec.pcapng'} "
           f"--log {log}; echo $? >{rc_file}; echo DEMO-ENDED; sleep 30")  # the pane stays: a failure shows the last screen
    tmux("new-session", "-d", "-s", session, "-x", "200", "-y", "50", cmd)
    try:
        wait_screen(session, r"Exchanges.*Inodes", 120)
        # One pass of the loop ends with the syncfs step: wait for the proxy to finish the run.
        wait_screen(session, r"the proxy closed the control socket", 240)
        tmux("send-keys", "-t", session, "/")
        wait_screen(session, r"filter:", 20)  # the filter bar is open and focused
        tmux("send-keys", "-t", session, "op == SYNCFS")
        wait_screen(session, r"Enter applies", 20)  # typed and validated as you type
        tmux("send-keys", "-t", session, "Enter")
        text = wait_screen(session, r"\bSYNCFS\b.*ok[^\n]*\n[^\n]*\bSYNCFS\b", 20)
        syncfs_rows = [line for line in text.splitlines() if re.search(r"\bSYNCFS\b", line) and "ok" in line]
        assert len(syncfs_rows) >= 3, text
        tmux("send-keys", "-t", session, "2")
        text = wait_screen(session, r"SUBMOUNT", 20)
        assert re.search(r"\bsub\b.*SUBMOUNT|SUBMOUNT.*\bsub\b", text), text
        tmux("send-keys", "-t", session, "q")
        deadline = time.monotonic() + 60
        while not rc_file.exists():
            assert time.monotonic() < deadline, screen(session)
            time.sleep(0.5)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)
    assert rc_file.read_text().strip() == "0", log.read_text()
    text = log.read_text()
    work = re.search(r"work dir (\S+)", text)
    share = re.search(r"share (\S+) ", text)
    assert work and share, text
    # Nothing of the demo is left: no process mentioning its dirs, no mount, no socket, no share.
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            assert work.group(1) not in cmdline and share.group(1) not in cmdline, cmdline
    mounts = Path("/proc/mounts").read_text()
    assert share.group(1) not in mounts
    assert not Path(work.group(1)).exists() and not Path(share.group(1)).exists()
    assert (tmp_path / "rec.pcapng").stat().st_size > 10_000


def test_demo_follow_shows_the_newest_row(guest_image: GuestImage, tmp_path: Path) -> None:
    """Follow mode on a real guest: once the run ends, the newest exchange (#N, N the count in the status
    line) is on screen, on the list's last line above the detail pane, not under a scrollbar."""
    session = f"fsi-follow-test-{os.getpid()}"
    rc_file = tmp_path / "rc"
    cmd = (f"{sys.executable} -m fsinspect demo --loops 1 --storm 100 --io-mb 4 --log {tmp_path / 'demo.log'}; "
           f"echo $? >{rc_file}; echo DEMO-ENDED; sleep 30")
    tmux("new-session", "-d", "-s", session, "-x", "110", "-y", "30", cmd)
    try:
        text = wait_screen(session, r"the proxy closed the control socket", 360)
        time.sleep(1.5)  # the detail pane follows the newest after the feed rests; a tick or two
        text = screen(session)
        m = re.search(r"\| (\d+) exchanges", text)
        assert m, text
        newest = int(m.group(1))
        lines = text.splitlines()
        rows = [k for k, line in enumerate(lines) if re.match(rf"^[ ●]\s*{newest} ", line)]
        assert rows, text  # the newest row is on screen
        k = rows[0]
        assert "─" in lines[k + 1] or "━" in lines[k + 1], text  # the list's last line: the pane border is next
        assert re.match(rf"^\s*#{newest} ", lines[k + 2]), text  # and the detail pane shows it
        tmux("send-keys", "-t", session, "q")
        deadline = time.monotonic() + 60
        while not rc_file.exists():
            assert time.monotonic() < deadline, screen(session)
            time.sleep(0.5)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)
    assert rc_file.read_text().strip() == "0"
