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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import privfile
from .analysis.inodes import group_syncfs
from .analysis.render import fmt_ns, opcode_counts, wrap_items
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
            os.fdopen(privfile.create(work / "backend.log"), "wb") as logf:  # 0600: it names guest files
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


def _step_items(g: GuestResult) -> list[str]:
    """Each guest step once, however many loops ran it: `io-write 1.25s`, `crud-create 12x 40.0ms avg FAILED 1`."""
    by: dict[str, list[Any]] = {}
    for st in g.steps:
        by.setdefault(st.name, []).append(st)
    items = []
    for name, sts in by.items():
        durs = [st.duration for st in sts if st.duration is not None]
        bad = sum(1 for st in sts if st.rc not in (0, None))
        if len(sts) == 1:
            t = f"{name} {fmt_ns(durs[0] * 1e9) if durs else '-'}"
        else:
            t = f"{name} {len(sts)}x {fmt_ns(sum(durs) / len(durs) * 1e9) if durs else '-'} avg"
        items.append(t + (f" FAILED {bad}" if bad else ""))
    return items


def render(result: DemoResult) -> str:
    """The headless summary, one screen whatever the run's length: totals first, then every opcode that
    occurred, latency, lints, and SYNCFS per superblock."""
    out = []
    g = result.guest
    s = result.summary
    if s:
        lints = Counter(x["kind"] for x in s["lints"])
        out.append(f"FUSE: {s['requests']} requests, {s['replies']} replies, {len(s['lints'])} lint(s), "
                   f"{len(s['syncfs'])} SYNCFS, {len(s['submounts'])} submount(s); capture dropped "
                   f"{s['capture'].get('dropped', 0)}")
    if g is not None:
        status = "stopped when the UI quit" if result.quit_by_user else g.status
        out.append(f"guest: {status} ({g.kernel or '?'}, {g.accel}), {len(g.steps)} steps, "
                   f"wall {fmt_ns((g.wall_s or 0) * 1e9)}")
        out.extend(wrap_items(_step_items(g)))
    if s:
        ops = s["opcodes"]
        out.append(f"opcodes ({len(ops)} kinds):")
        out.extend(wrap_items(opcode_counts(ops)))
        lat = s.get("latency") or {}
        shown = [op for op in ("LOOKUP", "GETATTR", "CREATE", "WRITE", "READ", "SYNCFS")
                 if (lat.get(op) or {}).get("p50") is not None]
        if shown:
            out.append("latency p50 / p99 / max:")
            out.extend(wrap_items([f"{op} {fmt_ns(lat[op]['p50'])} / {fmt_ns(lat[op]['p99'])} / "
                                   f"{fmt_ns(lat[op]['max'])}" for op in shown], sep="   "))
        out.append("lints: " + (", ".join(f"{k} {v}" for k, v in lints.most_common()) if lints else "none"))
        out.extend(f"  {x['kind']}: {x['message']}" for x in s["lints"][:5])
        if len(s["lints"]) > 5:
            out.append(f"  … {len(s['lints']) - 5} more (fsinspect stats on the recording lists them)")
        out.append("submounts seen: " + (", ".join(f"{x['name']} (nodeid {x['nodeid']})" for x in s["submounts"])
                                         or "none"))
        groups = group_syncfs(s["syncfs"])
        out.append(f"SYNCFS: {len(s['syncfs'])} calls on {len(groups)} superblock(s)")
        out.extend(f"  {grp.line()}" for grp in groups)
    if result.record:
        out.append(f"recording: {result.record}  (fsinspect replay {result.record})")
    if result.error:
        out.append(f"error: {result.error}")
    return "\n".join(out)
