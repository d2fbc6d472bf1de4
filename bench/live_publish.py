"""What a control client costs the proxy's publishing side, load-robustly: a recording is replayed in-process
through the proxy's real Session (recorder, analysis, summary, hub) as its capture thread would feed it, with
no --control, with --control and no client, and with one client of each kind attached, the arms interleaved.

Prints CPU microseconds per exchange (the median of the rounds, and the min): the feeding thread's
(time.thread_time: the capture thread's work), the hub thread's (/proc/self/task), and the process's.
Wall time is not used: the machine may be shared.  `--rate N` feeds N exchanges/s in 5 ms chunks, as a guest
does: the hub's batches are then as small as on a real proxy (a TCG guest's storm is ~1000/s), and its
per-batch costs show.  The clients run in their own processes: their CPU from the moment they are
attached until they wrote what they got is the `client` column (not in `process`).  `pcapng`/`jsonl` are
`fsinspect attach --format F -o FILE` (the real headless client), `drain-pcapng`/`drain-jsonl` a bare
socket reader that asks for that stream and drops the bytes (what
the hub alone costs, without a busy client beside it).  Idle ticks come every --tick captures, as a
quiet guest gives them.

The recording: `--make FILE` records the guest's `full` workload through `fsinspect proxy` first (the
capture snap length of a live proxy, 16 KiB), or give any proxy recording.  This measures the Python side
only; bench/proxy_overhead.py --headless-client F measures the whole proxy on a real guest.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dissectors.ring._common import Capture
from fsinspect.guest import launcher
from fsinspect.proxy.server import ProxyConfig
from fsinspect.proxy.session import Session, SessionOptions
from fsinspect.recording.reader import RecordingReader

ARMS = ("none", "control", "drain-pcapng", "drain-jsonl", "pcapng", "jsonl")
_DRAIN = ("import socket, sys\n"
          "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
          "if sys.argv[2] == 'pcapng': s.sendall(b'{\"id\": 1, \"cmd\": \"stream\", \"format\": \"pcapng\"}\\n')\n"
          "while s.recv(1 << 20): pass\n")


def make_recording(path: Path) -> None:
    from fsinspect.guest import build
    from fsinspect.guest.share import make_share

    image = build.build(progress=lambda m: print(m, file=sys.stderr))
    with make_share(root_tmpfs_mb=512) as share, launcher.short_tmpdir() as work, \
            launcher.virtiofsd(share.root, work) as be:
        listen = work / "p.sock"
        proc = subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(listen), "--backend",
                                 str(be.socket_path), "--record", str(path), "--snaplen", "16384", "--quiet"],
                                stdin=subprocess.DEVNULL)
        try:
            while not listen.exists():
                time.sleep(0.02)
            res = launcher.run_guest(listen, image=image, workload="full", timeout=600, watch=[proc])
            proc.wait(30)
        finally:
            launcher.stop_process(proc)
    if not res.ok:
        raise SystemExit(f"recording run failed: {res.status} {res.failed_steps}")


def captures(path: Path) -> list[Capture]:
    """The recording's FUSE records as the ring engine's captures."""
    out = []
    with RecordingReader(path) as r:
        for rec in r:
            if rec.is_fuse:
                layout = tuple((0, ln, fl) for ln, fl in (rec.layout or ()))
                out.append(Capture("request" if rec.inbound else "reply", rec.queue, rec.head or 0, rec.ts_ns,
                                   layout, rec.orig_len, rec.data, rec.orig_len > len(rec.data), None, 0))
    return out


def _thread_cpu(tid: int) -> float:
    """A thread's CPU seconds, to the nanosecond (schedstat; /proc/.../stat counts 10 ms ticks)."""
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def _proc_cpu(pid: int) -> float:
    """A process's CPU seconds, every thread (schedstat, ns); 0 once it is gone."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except OSError:
        return 0.0
    return total / 1e9


def _client(arm: str, ctl: Path, work: Path) -> subprocess.Popen[bytes]:
    if arm.startswith("drain-"):
        return subprocess.Popen([sys.executable, "-c", _DRAIN, str(ctl), arm.split("-", 1)[1]])
    return subprocess.Popen([sys.executable, "-m", "fsinspect", "attach", str(ctl), "--format", arm, "-o",
                             str(work / f"out.{arm}")], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_arm(caps: list[Capture], arm: str, work: Path, tick: int, rate: float = 0) -> dict[str, float]:
    """One replay (`rate` exchanges/s, in 5 ms chunks; 0: as fast as it goes); CPU microseconds per exchange:
    feeding thread, hub thread, process."""
    ctl = work / "c.sock"
    for p in (work / "rec.pcapng", ctl):
        p.unlink(missing_ok=True)
    s = Session(ProxyConfig(backend="/nonexistent"), SessionOptions(
        record=str(work / "rec.pcapng"), control=str(ctl) if arm != "none" else None))
    client = None
    try:
        if arm not in ("none", "control"):
            client = _client(arm, ctl, work)
            binary = arm.endswith("pcapng")
            deadline = time.monotonic() + 30
            while not s.hub or not s.hub.clients or (binary and not s.hub.clients[0].binary):
                if time.monotonic() > deadline:
                    raise SystemExit(f"{arm}: the client did not attach")
                time.sleep(0.01)
            time.sleep(0.2)
        hub_tid = s.hub.thread.native_id if s.hub is not None else None
        p0, f0, h0 = os.times(), time.thread_time(), _thread_cpu(hub_tid) if hub_tid else 0.0
        c0 = _proc_cpu(client.pid) if client is not None else 0.0
        chunk = max(1, int(rate * 2 * 0.005)) if rate else len(caps)
        start = time.monotonic()
        for k in range(0, len(caps), chunk):
            for i in range(k, min(k + chunk, len(caps))):
                s._on_capture(caps[i])
                if i % tick == tick - 1:
                    s._on_idle()
            if rate:  # as a guest makes them: the hub's batches are as small as a real proxy's
                time.sleep(max(0.0, start + (k + chunk) / (2 * rate) - time.monotonic()))
        with s.lock:
            s.pipeline.emit("done", "replayed")
        feed = time.thread_time() - f0
        deadline = time.monotonic() + 60
        while s.hub is not None and (s.hub._outbox or any(c.has_output for c in s.hub.clients)) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        hub = _thread_cpu(hub_tid) - h0 if hub_tid else 0.0
        p1 = os.times()
        if client is not None:  # (it has written what it got: the hub's queue to it is empty)
            time.sleep(0.2)
        cl = _proc_cpu(client.pid) - c0 if client is not None else 0.0
    finally:
        s.close()
        if client is not None:
            client.wait(30)
    n = max(s.requests, 1)
    return {"feed": feed / n * 1e6, "hub": hub / n * 1e6,
            "process": (p1.user + p1.system - p0.user - p0.system) / n * 1e6, "client": cl / n * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recording", type=Path)
    ap.add_argument("--make", action="store_true", help="record the guest's full workload into RECORDING first")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tick", type=int, default=2000, help="an idle tick every N captures")
    ap.add_argument("--rate", type=float, default=0,
                    help="feed N exchanges/s, as a guest does (the real proxy's small batches; a TCG guest's storm "
                         "is ~1000/s); default: as fast as it goes")
    ap.add_argument("--limit", type=int, default=0, help="replay only the first N captures")
    args = ap.parse_args()
    arms = args.arms.split(",")
    if bad := [a for a in arms if a not in ARMS]:
        ap.error(f"unknown arm(s): {', '.join(bad)}")
    if args.make:
        make_recording(args.recording)
    caps = captures(args.recording)
    if args.limit:
        caps = caps[:args.limit]
    gc.freeze()  # the replay's own captures: a proxy holds no such list for the collector to walk
    print(f"{len(caps)} captures from {args.recording}", file=sys.stderr)
    results: dict[str, list[dict[str, float]]] = {a: [] for a in arms}
    with launcher.short_tmpdir() as work:
        for k in range(args.rounds):
            for arm in arms if k % 2 == 0 else arms[::-1]:
                results[arm].append(run_arm(caps, arm, work, args.tick, args.rate))
            print(f"round {k + 1}/{args.rounds} done", file=sys.stderr)
    base = statistics.median(r["process"] for r in results[arms[0]])
    print(f"{'arm':<14} {'process us/ex':>14} {'min':>7} {'feed':>7} {'hub':>7} {'vs ' + arms[0]:>10} {'client':>7}")
    for arm, rs in results.items():
        med: dict[str, Any] = {k: statistics.median(r[k] for r in rs) for k in ("process", "feed", "hub", "client")}
        print(f"{arm:<14} {med['process']:>14.1f} {min(r['process'] for r in rs):>7.1f} {med['feed']:>7.1f} "
              f"{med['hub']:>7.1f} {med['process'] / base:>9.2f}x {med['client']:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
