"""What a storm step is made of, per back-end: the requests, their latency, and the guest's own time.

The guest's `storm` workload runs through `fsinspect proxy --record` in front of the C virtiofsd and in
front of the bundled daemon (started as bench/daemon_vs_virtiofsd.py starts them: cache auto,
announce_submounts, no xattr), in alternating rounds.  Each recording is read back with `fsinspect export
--format jsonl` and cut into the storm's steps by the host's clock at the guest's step marks.  Per step and
back-end it prints:

- the request mix: each opcode (with its error) counted;
- per opcode the latency at the proxy (request capture to reply capture): mean and the distribution
  (p10, p50, p90, p99, max), since a few scheduling delays make the mean;
- the guest's share: the gap from one reply to the next request (the guest's CPU under TCG, its wake-up,
  the next system call), against the sum of the latencies;
- the INIT reply of each back-end, field by field where they differ.

`--workload io` does the same for the io workload's io-write and io-read steps, READ and WRITE counted per
request size (what a guest's dd sends after virtio-fs split it).

The proxy masks EVENT_IDX, so both back-ends run without it here; step times are the proxied ones, not the
goal table's.  Compare the counts and the latency distributions, not the step times, on a loaded machine.

    sudo .venv/bin/python bench/storm_anatomy.py [--rounds 2] [--n 2000] [--keep DIR] [--workload storm|io]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fsinspect.guest import build, launcher
from fsinspect.guest.share import make_share

STORM = ("storm-create", "storm-stat-warm", "storm-stat-cold", "storm-delete")
STEPS = {"storm": STORM, "io": ("io-write", "io-read")}  # --workload: the guest workload and its steps
SIZED = ("READ", "WRITE")  # the mix counts these per request size: larger requests mean fewer of them
KINDS = ("C virtiofsd", "bundled")


def wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{proc.args!r} did not create {path}")
        time.sleep(0.02)


@contextmanager
def backend(kind: str, share: Path, work: Path) -> Iterator[Path]:
    """The back-end's vhost-user socket while it runs."""
    if kind == "C virtiofsd":
        with launcher.virtiofsd(share, work) as be:
            yield be.socket_path
        return
    sock = work / "d.sock"
    proc = subprocess.Popen([sys.executable, "-m", "fsinspect", "daemon", f"--socket-path={sock}",
                             "-o", f"source={share},cache=auto,announce_submounts,no_xattr", "--log-level", "warning"],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(sock, proc)
        yield sock
    finally:
        launcher.stop_process(proc)


def record(kind: str, image: build.GuestImage, share: Path, out: Path, n: int,
           workload: str = "storm") -> dict[str, tuple[int, int]]:
    """Record one run of the workload through the proxy; the steps' host CLOCK_REALTIME windows (ns), as the
    recording's."""
    marks: dict[str, list[int]] = {}

    def on_event(ev: Any) -> None:
        if ev.kind in ("step-begin", "step-end"):
            marks.setdefault(ev.rest.split()[0], []).append(time.time_ns())

    with launcher.short_tmpdir() as work, backend(kind, share, work) as sock:
        listen = work / "p.sock"
        proxy = subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(listen), "--backend",
                                  str(sock), "--record", str(out), "--snaplen", "64", "--quiet"],
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(listen, proxy)
            res = launcher.run_guest(listen, image=image, workload=workload, timeout=400,
                                     params={"xattr": 0, "n": n}, on_event=on_event, watch=[proxy])
            proxy.wait(timeout=30)  # it ends with QEMU's connection: the recording is complete
        finally:
            launcher.stop_process(proxy)
    if not res.ok:
        raise SystemExit(f"{kind}: guest run failed: {res.status} {res.failed_steps}")
    return {k: (v[0], v[1]) for k, v in marks.items() if len(v) == 2}


def exchanges(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "fsinspect", "export", "--format", "jsonl", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line]


def pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(q * len(s)))]


def _size(e: dict[str, Any]) -> str:
    """' 131072' for a READ or WRITE of that many bytes, else ''."""
    if e["opcode"] not in SIZED:
        return ""
    args = (e.get("request") or {}).get("args") or {}
    body = args.get(e["opcode"].lower()) or {}
    return f" {body['size']}" if "size" in body else ""


def anatomy(ex: list[dict[str, Any]], t0: int, t1: int) -> dict[str, Any]:
    """One step of one run: opcode counts, latencies (µs) per opcode, the guest's gaps and the latency sum."""
    sel = [e for e in ex if t0 <= e["ts_ns"] <= t1]
    mix = Counter(e["opcode"] + _size(e) + (f"/{e['error']}" if e.get("error") else "") for e in sel)
    lat: dict[str, list[float]] = defaultdict(list)
    for e in sel:
        if e.get("latency_ns") is not None:
            lat[e["opcode"]].append(e["latency_ns"] / 1000)
    # Request queue only (the hiprio queue's FORGETs take no reply and run beside the requests).
    spans = sorted((e["ts_ns"], e["ts_ns"] + (e.get("latency_ns") or 0)) for e in sel if e["queue"] != 0)
    gaps = [max(0, b[0] - a[1]) / 1e9 for a, b in itertools.pairwise(spans)]
    return {"mix": dict(mix), "lat": dict(lat), "gap_s": sum(gaps),
            "latency_s": sum(b - a for a, b in spans) / 1e9, "host_s": (t1 - t0) / 1e9}


def init_out(ex: list[dict[str, Any]]) -> dict[str, Any]:
    e = next(e for e in ex if e["opcode"] == "INIT")
    return {k: v for k, v in e["reply"]["args"]["init_out"].items() if k != "unused"}


def report(runs: dict[str, list[tuple[list[dict[str, Any]], dict[str, tuple[int, int]]]]],
           steps: tuple[str, ...] = STORM) -> None:
    inits = {k: init_out(v[0][0]) for k, v in runs.items()}
    a, b = (inits[k] for k in KINDS)
    print("INIT replies, the fields that differ (C virtiofsd | bundled):")
    for f in a:
        if a[f] != b.get(f):
            print(f"  {f:<22} {a[f]} | {b.get(f)}")
    for step in steps:
        print(f"\n== {step}")
        for kind in KINDS:
            for i, (ex, marks) in enumerate(runs[kind]):
                if step not in marks:
                    continue
                s = anatomy(ex, *marks[step])
                print(f"  {kind:<12} round {i + 1}: {s['host_s']:.2f} s; guest gaps {s['gap_s']:.2f} s, latencies "
                      f"{s['latency_s']:.2f} s; {dict(sorted(s['mix'].items()))}")
                for op, v in sorted(s["lat"].items()):
                    if len(v) >= 20:
                        print(f"      {op:<12} n={len(v):<5} mean {statistics.mean(v):7.1f}  p10 {pct(v, .1):6.1f}  "
                              f"p50 {pct(v, .5):6.1f}  p90 {pct(v, .9):7.1f}  p99 {pct(v, .99):8.1f}  "
                              f"max {max(v):8.1f} µs")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n", type=int, default=2000, help="files in the storm (the guest's default)")
    ap.add_argument("--keep", type=Path, help="keep the recordings in DIR")
    ap.add_argument("--workload", choices=sorted(STEPS), default="storm",
                    help="the guest workload whose steps are cut out (io: io-write and io-read, READ and WRITE "
                         "counted per request size)")
    args = ap.parse_args()
    image = build.build(progress=lambda m: print(m, file=sys.stderr))
    print(f"load average {os.getloadavg()[0]:.2f} at the start")
    runs: dict[str, list[tuple[list[dict[str, Any]], dict[str, tuple[int, int]]]]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory(prefix="fsi-anatomy-") as tmp, \
            make_share(root_tmpfs_mb=512) as share:
        out_dir = args.keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for r in range(args.rounds):
            for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
                path = out_dir / f"{kind.split()[0]}-{r + 1}.pcapng"
                marks = record(kind, image, share.root, path, args.n, args.workload)
                runs[kind].append((exchanges(path), marks))
                print(f"{kind} round {r + 1} recorded", file=sys.stderr)
    report(runs, STEPS[args.workload])
    return 0


if __name__ == "__main__":
    sys.exit(main())
