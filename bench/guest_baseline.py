"""Reference column for the daemon and proxy benchmarks: the `full` workload against the C virtiofsd.

Boots the real guest (QEMU 7.2, Debian 6.1 kernel, TCG here) against /usr/lib/qemu/virtiofsd with
announce_submounts and cache=auto on the standard share (tmpfs at sub/ and sub/inner/), RUNS times, and
prints per-step medians with min and max.  Guest-side times (/proc/uptime, 10 ms resolution).
Needs root (tmpfs mounts).  Usage: .venv/bin/python bench/guest_baseline.py [--runs 3] [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fsinspect.guest import build, launcher, share
from fsinspect.guest.console import GuestResult
from fsinspect.guest.report import format_table, per_step


def run_once(image: build.GuestImage, n: int, io_mb: int, cache: str) -> GuestResult:
    with share.make_share() as sh:
        def backend(work: Path) -> Any:
            return launcher.virtiofsd(sh.root, work, cache=cache, xattr=True)
        res = launcher.run_with_backend(backend, image=image, workload="full", timeout=300,
                                        params={"n": n, "io_mb": io_mb, "xattr": 1})
        bad = {p: v for p, v in res.verify_sums(sh.root).items() if v[0] != v[1]}
    if not res.ok or bad:
        sys.exit(f"run failed: status={res.status} failed={res.failed_steps} checks={res.check_failures} "
                 f"sums={bad}\n" + "\n".join(res.console[-20:]))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000, help="storm file count (default 2000)")
    ap.add_argument("--io-mb", type=int, default=64)
    ap.add_argument("--cache", default="auto", choices=["auto", "always", "none"])
    ap.add_argument("--json", metavar="PATH", help="also write the per-step stats as JSON (reference column)")
    args = ap.parse_args()
    image = build.build()
    results = []
    for i in range(args.runs):
        res = run_once(image, args.n, args.io_mb, args.cache)
        print(f"run {i + 1}/{args.runs}: wall {res.wall_s} s, guest {res.mounted_uptime} -> {res.done_uptime} s",
              file=sys.stderr)
        results.append(res)
    stats = per_step(results)
    by = {s.name: s for s in stats}
    mb = args.io_mb
    extra = {
        "wall (QEMU start to exit)": f"{statistics.median(r.wall_s or 0 for r in results):.2f}",
        "boot to mounted (guest uptime)": f"{statistics.median(r.mounted_uptime or 0 for r in results):.2f}",
        "dd write MB/s (median)": f"{mb * 1.048576 / by['io-write'].median:.0f}",
        "dd read MB/s after drop_caches (median)": f"{mb * 1.048576 / by['io-read'].median:.0f}",
    }
    print(f"C virtiofsd (QEMU 7.2), cache={args.cache}, announce_submounts, full workload n={args.n}, "
          f"io {mb} MiB, {args.runs} runs, accel {results[0].accel}, kernel {image.kernel_version}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(format_table(stats, extra))
    if args.json:
        Path(args.json).write_text(json.dumps({"backend": "C virtiofsd", "cache": args.cache, "n": args.n,
                                               "io_mb": mb, "runs": args.runs, "load_avg": os.getloadavg(),
                                               "steps": [asdict(s) for s in stats], "extra": extra}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
