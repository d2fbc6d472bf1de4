"""What one thread hand-off costs on this machine, with no fsinspect code in the loop.

    .venv/bin/python bench/wakeup_cost.py [--runs 5] [--count 3000]

Two C threads ping-pong over eventfds, the mechanism QEMU, the back-end and the proxy's shadow path use
to wake each other (bench/wakeup_cost.c).  The proxy puts two more hand-offs on every request (shadow
avail, shadow used: design.md, "The proxy"), and a metadata storm is one request at a time, so its
overhead there is about twice the "wake" column of whatever placement the kernel picks.

Rows: the threads pinned to one CPU, pinned to two CPUs, and left to the scheduler, back to back and
with a 100 us pause before each ping (a guest thinks between requests).  Columns (microseconds, median
[min .. max] of --runs runs of the per-run p50): the waker's write() (it sends the IPI when the wakee's
CPU sleeps), the wake latency, the round trip (two hand-offs), and how often the wakee ran on the
waker's CPU.  Not a test: it describes the host.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def host_facts() -> str:
    def read(p: str) -> str:
        try:
            return Path(p).read_text().strip()
        except OSError:
            return "n/a"

    return (f"{os.cpu_count()} CPUs; cpuidle driver {read('/sys/devices/system/cpu/cpuidle/current_driver')}; "
            f"guest_halt_poll_ns {read('/sys/module/haltpoll/parameters/guest_halt_poll_ns')}; "
            f"load average {os.getloadavg()[0]:.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--count", type=int, default=3000, help="round trips per run")
    args = ap.parse_args()
    if args.runs < 1 or args.count < 10:
        ap.error("--runs must be >= 1 and --count >= 10")
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        print("no C compiler: run scripts/setup first", file=sys.stderr)
        return 1
    ncpu = os.cpu_count() or 1
    rows = [("one CPU (pinned 0, 0)", 0, 0)]
    if ncpu > 1:
        rows.append(("two CPUs (pinned 0, 1)", 0, 1))
    rows.append(("the scheduler's choice", -1, -1))
    print(f"# Thread hand-off cost over eventfds; {host_facts()}\n")
    print("| placement | pause | write() | wake | round trip | wakee on waker's CPU |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "wakeup_cost"
        subprocess.run([cc, "-O2", "-Wall", str(HERE / "wakeup_cost.c"), "-o", str(exe), "-lpthread"], check=True)
        for label, a, b in rows:
            for gap in (0, 100):
                runs = []
                for _ in range(args.runs):
                    out = subprocess.run([str(exe), str(args.count), str(gap), str(a), str(b)], check=True,
                                         capture_output=True, text=True).stdout
                    runs.append({k: float(v) for k, v in (kv.split("=") for kv in out.split())})

                def cell(key: str, runs: list[dict[str, float]] = runs) -> str:
                    vals = [r[key] for r in runs]
                    return f"{statistics.median(vals):.1f} [{min(vals):.1f} .. {max(vals):.1f}]"

                print(f"| {label} | {gap} us | {cell('write_p50')} | {cell('wake_p50')} | {cell('rtt_p50')} | "
                      f"{statistics.median(r['same_cpu'] for r in runs):.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
