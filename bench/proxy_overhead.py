"""Proxy overhead: the `full` guest workload against the same C virtiofsd, direct vs through
`fsinspect proxy --record`, as alternating pairs in one run.

Prints per-step medians, the speed ratio direct/proxy per step (1.0 = no overhead) with min and
max over the pairs, and each proxy arm's CPU seconds per 10k exchanges (utime+stime of the proxy
process: steadier than the ratios when the machine is shared).  Goals: >= 0.90 on the metadata
storm, >= 0.95 on the 64 MiB dd.  Not a test: these machines are noisy; compare within one run.

`--unrecorded` adds a third arm to every round: the proxy without --record and without a control
client, so the guest's burst costs the capture thread almost nothing (analysis is held back).  That
arm is the floor of the design on this machine: what the two extra thread hops per request cost.

`--idle-rule` adds an arm with the debugger armed: one native hold rule that matches nothing
(`--inject 'op == SETUPMAPPING' errno=EIO`; QEMU 7.2 has no DAX window), so every request is matched
against the table and forwarded.  Issue 15 wants it within noise of the plain proxy arm.
`--headless-client jsonl|pcapng|text` adds an arm where `fsinspect attach --format F -o FILE` watches the
recording proxy's control socket for the whole run (issue 18: forwarding stays within noise with one
client attached).

The share's root is a tmpfs by default (`--share-fs disk` puts it on the host's ext4, as before): on
ext4, creating 2000 files seconds after the previous arm deleted 2000 makes the allocator scan past
recently deleted inodes (perf of virtiofsd: recently_deleted, find_inode_bit), 0.3-1.5 s of kernel
time that depends on the order of the arms, not on the proxy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fsinspect.guest import build, launcher
from fsinspect.guest.share import make_share

IDLE_RULE = ("--inject", "op == SETUPMAPPING", "errno=EIO")


def run_direct(image: build.GuestImage, share: Path, workload: str) -> dict[str, float]:
    with launcher.short_tmpdir() as work, launcher.virtiofsd(share, work) as be:
        res = launcher.run_guest(be.socket_path, image=image, workload=workload, timeout=300, watch=be.processes)
    if not res.ok:
        raise SystemExit(f"direct run failed: {res.status} {res.failed_steps}")
    return {s.name: s.duration for s in res.steps if s.duration is not None}


def run_proxied(image: build.GuestImage, share: Path, workload: str, record: bool = True,
                extra: tuple[str, ...] = (), client: str = "") -> tuple[dict[str, float], float, int]:
    """One proxy run; with `client` (a --format of `fsinspect attach`), a headless client watches it throughout."""
    with launcher.short_tmpdir() as work, launcher.virtiofsd(share, work) as be:
        listen, summ, ctrl = work / "p.sock", work / "summary.json", work / "c.sock"
        rec = ["--record", str(work / "rec.pcapng")] if record else []
        ctl = ["--control", str(ctrl)] if client else []
        proc = subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(listen),
                                 "--backend", str(be.socket_path), *rec, *ctl,
                                 "--summary-json", str(summ), "--quiet", *extra], stdin=subprocess.DEVNULL)
        watcher = None
        try:
            while not listen.exists() or (client and not ctrl.exists()):
                time.sleep(0.02)
            if client:
                watcher = subprocess.Popen([sys.executable, "-m", "fsinspect", "attach", str(ctrl), "--format",
                                            client, "-o", str(work / f"client.{client}")],
                                           stdin=subprocess.DEVNULL)
                time.sleep(1.0)  # connected and streaming before the guest starts
            res = launcher.run_guest(listen, image=image, workload=workload, timeout=300, watch=[proc])
            _pid, _status, ru = os.wait4(proc.pid, 0)
            proc.returncode = 0
            if watcher is not None and watcher.wait(timeout=30) != 0:
                raise SystemExit(f"the headless client failed: rc {watcher.returncode}")
        finally:
            launcher.stop_process(proc)
            if watcher is not None:
                launcher.stop_process(watcher)
        s = json.loads(summ.read_text())
    if not res.ok:
        raise SystemExit(f"proxied run failed: {res.status} {res.failed_steps}")
    if s.get("holds", {}).get("held"):
        raise SystemExit(f"a proxy arm held requests: {s['holds']}")
    exchanges = s["requests"]
    return {st.name: st.duration for st in res.steps if st.duration is not None}, ru.ru_utime + ru.ru_stime, exchanges


def ratio_rows(steps: list[str], direct: list[dict[str, float]], other: list[dict[str, float]]) -> list[dict[str, Any]]:
    """Per step: medians of both arms and the direct/other ratio of each round (median, min, max); printed."""
    rows = []
    for k in steps:
        ratios = [d[k] / o[k] if o[k] else 1.0 for d, o in zip(direct, other)]
        row = {"step": k, "direct": statistics.median(d[k] for d in direct),
               "proxy": statistics.median(o[k] for o in other), "ratio": statistics.median(ratios),
               "min": min(ratios), "max": max(ratios)}
        rows.append(row)
        print(f"{k:<22} {row['direct']:>9.2f} {row['proxy']:>9.2f} {row['ratio']:>7.2f} {row['min']:>6.2f} {row['max']:>6.2f}")
    return rows


def cpu_row(kind: str, runs: list[tuple[dict[str, float], float, int]]) -> list[float]:
    """One arm's CPU seconds per 10k exchanges (median, min, max over its runs); printed, returned per run."""
    cpu = [c for _s, c, _n in runs]
    per10k = [c / n * 10_000 for _s, c, n in runs]
    print(f"  {kind:<11} median {statistics.median(cpu):.2f} s per run, {statistics.median(n for *_x, n in runs):.0f} "
          f"exchanges per run, {statistics.median(per10k):.3f} s per 10k exchanges "
          f"(min {min(per10k):.3f}, max {max(per10k):.3f})")
    return per10k


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--workload", default="full")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--poll-us", type=int, default=0, help="pass --poll-us to the proxy arms")
    ap.add_argument("--share-fs", choices=("tmpfs", "disk"), default="tmpfs",
                    help="where the share's root lives (default tmpfs: on the host's ext4 the create storm "
                         "after a delete storm scans recently deleted inodes, 3x noise between runs)")
    ap.add_argument("--unrecorded", action="store_true",
                    help="a third arm per round: the proxy without recording (the design's floor here)")
    ap.add_argument("--idle-rule", action="store_true",
                    help="an arm per round with one debugger rule that matches nothing (issue 15)")
    ap.add_argument("--headless-client", choices=("text", "jsonl", "pcapng"), default="",
                    help="an arm per round with `fsinspect attach --format F` watching the recording proxy "
                         "(issue 18: forwarding within noise with one client)")
    args = ap.parse_args()
    image = build.build(progress=lambda m: print(m, file=sys.stderr))
    direct: list[dict[str, float]] = []
    arms: dict[str, list[tuple[dict[str, float], float, int]]] = {"proxy": [], "unrecorded": [], "idle-rule": [],
                                                                  "client": []}
    extra = ("--poll-us", str(args.poll_us)) if args.poll_us else ()
    with make_share(root_tmpfs_mb=512 if args.share_fs == "tmpfs" else 0) as share:
        for i in range(args.pairs):
            order = ["direct", "proxy", *(["unrecorded"] if args.unrecorded else []),
                     *(["idle-rule"] if args.idle_rule else []),
                     *(["client"] if args.headless_client else [])]
            if i % 2:
                order.reverse()
            for kind in order:
                if kind == "direct":
                    direct.append(run_direct(image, share.root, args.workload))
                else:
                    arms[kind].append(run_proxied(image, share.root, args.workload, record=kind != "unrecorded",
                                                  extra=(*extra, *(IDLE_RULE if kind == "idle-rule" else ())),
                                                  client=args.headless_client if kind == "client" else ""))
            print(f"round {i + 1}/{args.pairs} done", file=sys.stderr)
    steps = [k for k in direct[0] if all(k in d for d in direct + [r[0] for r in arms["proxy"]])]
    print(f"{'step':<22} {'direct s':>9} {'proxy s':>9} {'ratio':>7} {'min':>6} {'max':>6}")
    rows = ratio_rows(steps, direct, [r[0] for r in arms["proxy"]])
    if arms["unrecorded"]:
        print("\nthe floor: proxy without recording or clients (ratio = direct / unrecorded proxy)")
        ratio_rows(steps, direct, [r[0] for r in arms["unrecorded"]])
    if arms["idle-rule"]:
        print("\nthe debugger armed: one rule that matches nothing (ratio = direct / proxy with the rule)")
        ratio_rows(steps, direct, [r[0] for r in arms["idle-rule"]])
    if arms["client"]:
        print(f"\none headless client: `fsinspect attach --format {args.headless_client}` on the recording proxy "
              "(ratio = direct / proxy with the client)")
        ratio_rows(steps, direct, [r[0] for r in arms["client"]])
    print("\nproxy CPU (utime+stime of the whole process, start-up included) per arm:")
    cpu_per_10k = {}
    for kind, runs in arms.items():
        if runs:
            cpu_per_10k[kind] = cpu_row(kind, runs)
    if args.json:
        print(json.dumps({"rows": rows, "cpu_per_10k": cpu_per_10k}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
