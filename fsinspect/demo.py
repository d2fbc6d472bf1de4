"""`fsinspect demo`: the whole tool at once on the bundled guest.

share (with nested tmpfs submounts) <- back-end (bundled daemon or C virtiofsd) <- fsinspect proxy
(recording + control socket) <- QEMU running the `demo` workload loop; the UI attaches to the control
socket.  Everything started here is stopped here, by PID, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .guest import build, launcher
from .guest.console import GuestResult
from .guest.share import make_share

Progress = Callable[[str], None]


@dataclass
class DemoOptions:
    backend: str = "daemon"  # "daemon" (bundled, vhost-user) or "virtiofsd" (QEMU 7.2's C daemon)
    loops: int = 1  # 0: until quit
    storm_n: int = 300
    io_mb: int = 16
    record: Path | None = None
    headless: bool = False
    timeout: float = 600.0


@dataclass
class DemoResult:
    guest: GuestResult | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    record: Path | None = None
    error: str | None = None
    proxy_rc: int | None = None
    quit_by_user: bool = False  # the UI was closed while the guest still ran: QEMU was stopped on purpose


class CancelWatch:
    """A 'process' the launcher watches: it 'dies' when the user quits, so QEMU gets killed by PID."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.cancelled = threading.Event()

    def poll(self) -> int | None:
        return 0 if self.cancelled.is_set() else None


def default_record_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fsinspect" / "demo"
    base.mkdir(parents=True, exist_ok=True)
    return base / time.strftime("demo-%Y%m%d-%H%M%S.pcapng")


def run_demo(opts: DemoOptions, progress: Progress, ui: Callable[[Path], int] | None = None) -> DemoResult:
    """Run the demo; with `ui`, call ui(control_socket) in this thread while the guest runs."""
    result = DemoResult(record=opts.record or default_record_path())
    image = build.build(progress=progress)
    procs: list[subprocess.Popen[bytes]] = []
    cancel = CancelWatch()
    py = sys.executable
    guest_thread: threading.Thread | None = None
    with make_share() as share, launcher.short_tmpdir("fsi-demo-") as work, \
            open(work / "backend.log", "wb") as logf:
        try:
            be_sock = work / "backend.sock"
            progress(f"share {share.root} (tmpfs submounts: {', '.join(str(m) for m in share.mounts)}); work dir {work}")
            if opts.backend == "virtiofsd":
                cmd = [launcher.VIRTIOFSD, f"--socket-path={be_sock}", "-o",
                       f"source={share.root},cache=auto,announce_submounts,xattr"]
            else:
                cmd = [py, "-m", "fsinspect", "daemon", f"--socket-path={be_sock}", "--shared-dir", str(share.root),
                       "--xattr"]
            progress(f"starting the back-end: {opts.backend}")
            backend = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            procs.append(backend)
            launcher._wait_for_socket(be_sock, backend, opts.backend)
            ctrl, listen, summ = work / "ctrl.sock", work / "proxy.sock", work / "summary.json"
            progress(f"starting the proxy (recording to {result.record})")
            proxy = subprocess.Popen([py, "-m", "fsinspect", "proxy", "--listen", str(listen), "--backend", str(be_sock),
                                      "--record", str(result.record), "--control", str(ctrl),
                                      "--summary-json", str(summ), "--quiet"],
                                     stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            procs.append(proxy)
            launcher._wait_for_socket(listen, proxy, "fsinspect proxy")
            launcher._wait_for_socket(ctrl, proxy, "fsinspect proxy control socket")
            progress(f"booting the guest (workload demo, loops={opts.loops or 'until quit'})")
            params = {"loops": opts.loops, "n": opts.storm_n, "io_mb": opts.io_mb, "xattr": 1}
            holder: dict[str, Any] = {}

            def guest() -> None:
                try:
                    holder["res"] = launcher.run_guest(listen, image=image, workload="demo", params=params,
                                                       timeout=opts.timeout, watch=[proxy, backend, cancel])
                except Exception as e:  # reported below; the thread must not die silently
                    holder["err"] = e

            guest_thread = threading.Thread(target=guest, name="fsinspect-demo-guest", daemon=True)
            guest_thread.start()
            if ui is not None:
                ui(ctrl)
                result.quit_by_user = guest_thread.is_alive()
                cancel.cancelled.set()
            guest_thread.join(opts.timeout + 30)
            if "err" in holder:
                result.error = f"guest: {holder['err']}"
            result.guest = holder.get("res")
            try:
                result.proxy_rc = proxy.wait(15)
            except subprocess.TimeoutExpired:
                launcher.stop_process(proxy)
            if summ.exists():
                result.summary = json.loads(summ.read_text())
        finally:
            # Whatever ended us (quit, error, SIGTERM/SIGHUP): QEMU first (the launcher kills it by PID once
            # the cancel watch fires), then the proxy and the back-end, then the share is unmounted.
            cancel.cancelled.set()
            if guest_thread is not None:
                guest_thread.join(30)
            for p in reversed(procs):
                if p.poll() is None:
                    launcher.stop_process(p)
    return result


class DemoInterrupted(BaseException):
    """SIGTERM/SIGHUP: unwind through every finally block so nothing is left running or mounted."""


def _interrupt(signum: int, _frame: Any) -> None:
    raise DemoInterrupted(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)


def render(result: DemoResult) -> str:
    """The headless summary: the guest's steps, FUSE counts and latency, lints, submounts, SYNCFS."""
    out = []
    g = result.guest
    if g is not None:
        status = "stopped when the UI quit" if result.quit_by_user else g.status
        out.append(f"guest: {status} ({g.kernel or '?'}, {g.accel}), {len(g.steps)} steps, wall {g.wall_s or 0:.1f} s")
        for st in g.steps:
            flag = "" if st.rc in (0, None) else f"  rc={st.rc}"
            out.append(f"  {st.name:<20} {st.duration if st.duration is not None else '-':>7} s{flag}")
    s = result.summary
    if s:
        out.append(f"FUSE: {s['requests']} requests, {s['replies']} replies, capture dropped "
                   f"{s['capture'].get('dropped', 0)}")
        ops = s["opcodes"]
        out.append("  " + ", ".join(f"{k} {v}" for k, v in list(ops.items())[:12]))
        lat = s.get("latency") or {}
        for op in ("LOOKUP", "GETATTR", "CREATE", "WRITE", "READ", "SYNCFS"):
            v = lat.get(op)
            if v and v.get("p50") is not None:
                out.append(f"  latency {op:<8} p50 {v['p50'] / 1e3:8.1f} us  p99 {v['p99'] / 1e3:8.1f} us  "
                           f"max {v['max'] / 1e3:8.1f} us")
        out.append(f"lints: {len(s['lints'])}" + "".join(f"\n  {x['kind']}: {x['message']}" for x in s["lints"][:10]))
        out.append("submounts seen: " + (", ".join(f"{x['name']} (nodeid {x['nodeid']})" for x in s["submounts"])
                                         or "none"))
        out.append(f"SYNCFS calls: {len(s['syncfs'])}" + "".join(
            f"\n  nodeid {x['nodeid']:<4} {'superblock root' if x['superblock_root'] else 'NOT a superblock root'}  "
            f"{(x['latency_ns'] or 0) / 1e6:7.2f} ms" for x in s["syncfs"]))
    if result.record:
        out.append(f"recording: {result.record}  (fsinspect replay {result.record})")
    if result.error:
        out.append(f"error: {result.error}")
    return "\n".join(out)
