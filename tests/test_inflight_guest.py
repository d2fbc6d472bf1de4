"""A hung back-end, on the real guest: the C virtiofsd behind `fsinspect proxy --control` is SIGSTOPped
while the guest keeps a steady stream of requests going (the `hold` workload).

What a user attaching to the hung VM must see at once: the live stream carries the requests as they are
captured (`request`, pending, with their age), the `stuck` lint fires within the threshold while they still
wait, a client attaching now gets them all in its snapshot's `pending`, and the UI (Textual, on the real
control socket) lists them with their age.  After SIGCONT every one of them completes in place, by number,
and the guest's workload finishes.  Only the processes this test started are signalled, and the back-end is
never left stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fsinspect.analysis import exchange as X
from fsinspect.guest.build import GuestImage
from fsinspect.guest.share import Share
from fsinspect.tui.app import FsInspectApp
from fsinspect.tui.sources import AttachSource, Store
from tests.guest_fixtures import explain
from tests.test_proxy_e2e import boot, proxy_in_front

pytestmark = [pytest.mark.guest, pytest.mark.root]
STUCK_MS = 500


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (the C virtiofsd may fork its sandboxed worker)."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            parents[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(c for c, pp in parents.items() if pp == p)
    return out


class Stream:
    """A control-socket client reading JSON lines in a thread (what a script or a UI gets)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.lines: list[tuple[float, dict[str, Any]]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            *done, buf = buf.split(b"\n")
            now = time.monotonic()
            self.lines.extend((now, json.loads(x)) for x in done if x.strip())

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float, after: float = 0.0) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        k = 0
        while time.monotonic() < deadline:
            while k < len(self.lines):
                t, obj = self.lines[k]
                k += 1
                if t >= after and pred(obj):
                    return t, obj
            time.sleep(0.02)
        raise AssertionError(f"not seen within {timeout} s; last lines: {[o.get('type') for _, o in self.lines[-10:]]}")

    def close(self) -> None:
        self.sock.close()


def test_sigstopped_backend_shows_pending_requests_stuck_then_completes(
        guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    ctrl = tmp_path / "ctrl.sock"
    with proxy_in_front(guest_share, tmp_path, extra=("--control", str(ctrl), "--stuck-ms", str(STUCK_MS))) as run:
        while not ctrl.exists():
            time.sleep(0.02)
        live = Stream(ctrl)
        result: dict[str, Any] = {}
        guest = threading.Thread(target=lambda: result.update(res=boot(
            guest_image, run, "hold", timeout=180, params={"seconds": 25}, stall_timeout=0)), daemon=True)
        guest.start()
        stopped: list[int] = []
        try:
            # The workload's loop is running: its writes come through.
            live.wait(lambda o: o.get("type") == "exchange" and o.get("opcode") == "WRITE", 120)
            be_pid = run.backend.processes[0].pid  # type: ignore[attr-defined]
            stopped = descendants(be_pid)
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            t_stop = time.monotonic()
            # A request captured after the stop goes out at once, pending, with its age.
            _t, first = live.wait(lambda o: o.get("type") == "request" and o.get("state") == "pending", 10,
                                  after=t_stop)
            assert first["age_ms"] < STUCK_MS and first["reply"] is None
            # The stuck lint fires while it still waits: within the threshold plus the 100 ms check period.
            t_stuck, stuck = live.wait(lambda o: o.get("type") == "request" and "stuck" in o.get("lints", ()), 10,
                                       after=t_stop)
            late = t_stuck - t_stop
            assert STUCK_MS / 1000 <= late + 0.05 and late < STUCK_MS / 1000 + 1.0, late
            assert stuck["age_ms"] >= STUCK_MS and stuck["state"] == "pending"
            time.sleep(0.5)
            # A client attaching now sees what hangs, at once, in its snapshot.
            late_client = Stream(ctrl)
            _t, snap = late_client.wait(lambda o: o.get("type") == "snapshot", 10)
            pending = snap["pending"]
            assert pending and all(p["state"] == "pending" and p["age_ms"] > 0 for p in pending)
            assert any("stuck" in p["lints"] for p in pending)
            assert max(p["age_ms"] for p in pending) >= STUCK_MS + 400
            assert any(x["kind"] == "stuck" for x in snap["lints"])
            hung = {p["n"] for p in pending}
            # The UI attached now: the same requests (same numbers), pending, with their age and the lint.
            store = Store()
            src = AttachSource(store, str(ctrl))
            src.connect()
            app = FsInspectApp(src, title="hung back-end")

            async def ui() -> None:
                async with app.run_test(size=(160, 48)) as pilot:
                    deadline = time.monotonic() + 20
                    while not hung <= set(store.open):
                        assert time.monotonic() < deadline, (hung, set(store.open))
                        await pilot.pause(0.05)
                    await pilot.pause(0.3)
                    for n in hung:
                        ex = store.open[n]
                        assert ex.state == X.PENDING and X.STUCK in ex.lints
                        app.jump(ex.index)
                        lst = app.xlist
                        text = lst.render_line(lst.cursor - lst.scroll_offset.y).text
                        assert "pending" in text and "s…" in text, text
                    assert f"{len(store.open)} pending" in str(app.statusline.render())

            try:
                asyncio.run(ui())
            finally:
                src.stop()
        finally:
            for pid in stopped:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        t_cont = time.monotonic()
        # Every request that hung completes in place, by its number.
        for n in sorted(hung):
            _t, done = live.wait(lambda o, n=n: o.get("type") == "exchange" and o.get("n") == n, 30, after=t_cont - 1)
            assert done["state"] == "done" and "stuck" in done["lints"] and done["latency_ns"] >= STUCK_MS * 1_000_000
        guest.join(200)
        res = result["res"]
        assert res.ok, explain(res)
        late_client.close()
        live.close()
        s = run.summary()
    assert any(x["kind"] == "stuck" for x in s["lints"])
    print(f"stuck lint {late * 1000:.0f} ms after SIGSTOP (threshold {STUCK_MS} ms); {len(hung)} request(s) hung; "
          f"oldest {max(p['age_ms'] for p in pending):.0f} ms at attach")


def test_tmux_ui_holds_and_continues_a_guest_mkdir(guest_image: GuestImage, guest_share: Share,
                                                   tmp_path: Path) -> None:
    """`fsinspect attach` in tmux on a proxy with `--break 'op == MKDIR'`: the guest's mkdir shows held
    (Held panel, highlighted row) and the guest waits; `c` on it continues it, the guest's workload then
    finishes, and the recording has the MKDIR released by the debugger."""
    import re
    import subprocess
    import sys

    from tests.test_demo_tmux import screen, tmux, wait_screen
    from tests.test_proxy_e2e import exchanges

    ctrl = tmp_path / "ctrl.sock"
    session = f"fsi-hold-test-{os.getpid()}"
    with proxy_in_front(guest_share, tmp_path, extra=("--control", str(ctrl), "--break", "op == MKDIR")) as run:
        while not ctrl.exists():
            time.sleep(0.02)
        result: dict[str, Any] = {}
        guest = threading.Thread(target=lambda: result.update(res=boot(
            guest_image, run, "hold", timeout=180, params={"seconds": 2}, stall_timeout=0)), daemon=True)
        guest.start()
        tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "45",
             f"{sys.executable} -m fsinspect attach {ctrl}; echo ATTACH-ENDED $?; sleep 30")
        try:
            try:
                text = wait_screen(session, r"HELD request\s+#\d+ MKDIR", 150)
            except AssertionError as e:
                guest.join(60)
                raise AssertionError(f"{e}\nproxy: {run.proc.poll()} {run.stderr()[-2000:]}\nguest: {result}") from None
            n = int(re.search(r"HELD request\s+#(\d+) MKDIR", text).group(1))  # type: ignore[union-attr]
            # The Held panel follows the `held` message, the row the request's packet block and the list's
            # next refresh: on a loaded host the row can come a few frames later (CI saw the panel first).
            wait_screen(session, rf"\b{n} .*MKDIR.*HELD req", 30)
            time.sleep(1.5)
            assert result.get("res") is None  # the guest's mkdir waits for us
            tmux("send-keys", "-t", session, "BTab")  # the focus goes up to the Held panel
            time.sleep(0.5)
            tmux("send-keys", "-t", session, "c")
            text = wait_screen(session, rf"#{n} continued", 30)
            guest.join(200)
            res = result["res"]
            assert res.ok, explain(res)
            text = screen(session)
            assert "HELD" not in text, text
            tmux("send-keys", "-t", session, "q")
            wait_screen(session, r"ATTACH-ENDED 0", 30)
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)
    an = exchanges(run.record)
    mkdirs = [e for e in an.exchanges if e.opname == "MKDIR"]
    assert mkdirs and mkdirs[0].error == 0 and mkdirs[0].latency_ns and mkdirs[0].latency_ns > 1_500_000_000
