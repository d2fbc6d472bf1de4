"""A recorded guest workload replayed against back-ends alone: no guest, no TCG (`fsinspect rerun --bench`).

Each back-end serves a fresh test-bed share (tmpfs submounts); the rerun keeps the recording's order and
overlap, so this measures the back-end's own answer to a real workload: per-opcode latency percentiles
and requests/s, the C virtiofsd beside the bundled daemon.  Take figures on a quiet machine.

The share's root is a tmpfs: on the host's ext4, a CREATE made soon after many deletes (the previous
back-end's share removed, or the recording's own delete storm) pays ext4's scan past recently deleted
inodes, about 1 ms each, whichever back-end runs (it showed as a bundled CREATE of 944 µs against the
C virtiofsd's 118 µs when the C one always ran first).  Rounds alternate the order.

    sudo .venv/bin/python bench/rerun_backends.py [REC] [--rounds 3]

REC defaults to recordings/samples/guest-syncfs.pcapng (small); a `full` workload recorded through
`fsinspect proxy --snaplen 0` is the meaningful input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fsinspect.guest.launcher import VIRTIOFSD
from fsinspect.guest.share import make_share

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent / "recordings" / "samples" / "guest-syncfs.pcapng"
BACKENDS = {
    "C virtiofsd": f"{VIRTIOFSD} --socket-path={{socket}} -o source={{shared_dir}},announce_submounts,xattr",
    "bundled": f"{sys.executable} -m fsinspect daemon --socket-path={{socket}} -o source={{shared_dir}} --xattr "
               "--log-level warning",
}


def bench(rec: Path, cmd: str) -> dict[str, Any]:
    with make_share(root_tmpfs_mb=1024) as share:
        p = subprocess.run([sys.executable, "-m", "fsinspect", "rerun", str(rec), "--backend-cmd", cmd,
                            "--shared-dir", str(share.root), "--bench", "--allow-snapped", "--format", "jsonl"],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if p.returncode == 2:
        raise SystemExit(f"rerun failed: {p.stderr.strip()}")
    rows = [json.loads(x) for x in p.stdout.splitlines()]
    return {"summary": rows[-1], "ops": {r["op"]: r for r in rows if r["type"] == "bench"}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rec", nargs="?", type=Path, default=SAMPLE, help="the recording to rerun")
    ap.add_argument("--rounds", type=int, default=1, help="runs per back-end; the best is shown (default 1)")
    args = ap.parse_args()
    best: dict[str, dict[str, Any]] = {}
    for i in range(args.rounds):
        for name, cmd in list(BACKENDS.items())[::1 if i % 2 == 0 else -1]:
            r = bench(args.rec, cmd)
            if name not in best or r["summary"]["elapsed_s"] < best[name]["summary"]["elapsed_s"]:
                best[name] = r
    print(f"{args.rec.name}: best of {args.rounds} rerun(s) per back-end")
    for name, r in best.items():
        s = r["summary"]
        rate = s["answered"] / s["elapsed_s"] if s["elapsed_s"] else 0
        print(f"{name:<12} {s['answered']} replies in {s['elapsed_s']:.3f} s = {rate:.0f} requests/s, "
              f"{s['differing']} differing from the recording")
        if s.get("backend_failed"):  # every reply may be equal, and the back-end still crashed at the end
            print(f"{'':<12} back-end failure: {s['backend_failed']}")
        if s.get("notes"):  # the rerun adjusted what it sent (e.g. forgets clamped to this back-end's grants)
            print(f"{'':<12} note: {s['notes'][0]}")
    ops = sorted(best["C virtiofsd"]["ops"], key=lambda o: -best["C virtiofsd"]["ops"][o]["count"])
    print(f"{'opcode':<14}{'count':>8}" + "".join(f"{n + ' p50':>18}{'p99':>10}" for n in best))
    for op in ops:
        line = f"{op:<14}{best['C virtiofsd']['ops'][op]['count']:>8}"
        for r in best.values():
            o = r["ops"].get(op)
            line += f"{o['p50_us'] if o else 0:>18.1f}{o['p99_us'] if o else 0:>10.1f}"
        print(line + "   (µs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
