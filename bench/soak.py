"""Soak: the guest's `concurrent` workload in rounds for N minutes through `fsinspect proxy --record` in front
of the bundled daemon, then checks that nothing leaked and nothing was lost.

    python bench/soak.py --minutes 30 [--rotate-mb 32 --rotate-keep 4] [--interval 60] [--json FILE]

Checks (exit status 1 when one fails, each printed as PASS/FAIL):
- fds and RSS of the proxy and of the daemon, sampled every `--interval` seconds and printed as a series, do
  not grow.  Rule: the samples of the warm-up (`--warmup-min`, default a third of the run and at least one
  minute) are left out, because the proxy's bounded buffers fill then (the native capture buffer and the
  analysis backlog, 64 MiB each, while the guest never pauses); the rest is cut in thirds, and the median of
  the last third may exceed the median of the first third by at most FD_SLACK fds, and by at most the
  larger of RSS_SLACK_FRAC and RSS_SLACK_KB of RSS.
- every request paired: the proxy's live analysis (whole run) has no no-reply, orphan-reply, unique-mismatch
  or duplicate-in-flight lint, replies = requests - FORGET/BATCH_FORGET/INTERRUPT, and no capture was
  dropped (the proxy runs --lossless, so a drop would be a bug); the kept recording parts (`fsinspect stats`)
  have no unreplied request either (an orphan reply at the start of the oldest kept part is allowed only when
  older parts were rotated away, its request went with them);
- the recording is readable: `fsinspect info --json` and `fsinspect stats --json` on the kept parts succeed;
- the guest is still responsive at the end: after the last round it creates, reads back, lists and removes a
  file through the mount (step soak-alive), unmounts and powers off cleanly (status ok).

QEMU is killed by PID when the guest has not finished `--grace` seconds after the soak's end; the proxy and
the daemon are stopped by PID (SIGTERM, then SIGKILL), the share's tmpfs mounts and the sockets removed.
The recording rotates (--rotate-mb, --rotate-keep) so a long run cannot fill the disk; check `df -h` first.
Not a speed measurement: a loaded machine only means fewer rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fsinspect.guest import build, launcher
from fsinspect.guest.console import GuestResult
from fsinspect.guest.share import make_share

FD_SLACK = 2
RSS_SLACK_FRAC = 0.10
RSS_SLACK_KB = 8 * 1024
NO_REPLY_OPS = ("FORGET", "BATCH_FORGET", "INTERRUPT")
PAIRING_LINTS = ("no-reply", "orphan-reply", "unique-mismatch", "duplicate-in-flight")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def growth(series: list[tuple[float, int]], warmup_s: float) -> tuple[float, float] | None:
    """(first-third median, last-third median) of the samples after warm-up; None when too few."""
    kept = [v for t, v in series if t >= warmup_s]
    if len(kept) < 3:
        return None
    third = len(kept) // 3
    return statistics.median(kept[:third]), statistics.median(kept[-third:])


def judge(name: str, series: list[tuple[float, int]], slack: float, unit: str, warmup_s: float) -> tuple[bool, str]:
    g = growth(series, warmup_s)
    if g is None:
        return False, f"{name}: only {len(series)} samples, need 3 after the {warmup_s:.0f} s warm-up"
    first, last = g
    ok = last - first <= slack
    return ok, f"{name}: after a {warmup_s / 60:.0f}-minute warm-up, first-third median {first:.0f} {unit}, " \
               f"last-third median {last:.0f} {unit} (growth {last - first:+.0f}, allowed {slack:.0f})"


def fsinspect_json(*args: str) -> tuple[dict[str, Any] | None, str]:
    p = subprocess.run([sys.executable, "-m", "fsinspect", *args, "--json"], capture_output=True, text=True,
                       timeout=1800)
    if p.returncode != 0:
        return None, p.stderr.strip()
    return json.loads(p.stdout), ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, required=True, help="how long the guest loops the workload")
    ap.add_argument("--interval", type=float, default=60.0, help="seconds between fd/RSS samples")
    ap.add_argument("--warmup-min", type=float, default=None,
                    help="minutes of samples left out of the growth rule (default: a third of the run, at least 1)")
    ap.add_argument("--rotate-mb", type=float, default=32.0, help="recording part size (MB)")
    ap.add_argument("--rotate-keep", type=int, default=4, help="recording parts kept")
    ap.add_argument("--grace", type=float, default=300.0,
                    help="seconds after the soak's end the guest gets to finish its round and power off")
    ap.add_argument("--conc-loops", type=int, default=6)
    ap.add_argument("--conc-iters", type=int, default=400)
    ap.add_argument("--conc-mb", type=int, default=32)
    ap.add_argument("--json", metavar="FILE", help="also write the series and the verdicts as JSON")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the soak needs root (tmpfs submounts in the share, the daemon's sandbox)")
    image = build.build(progress=lambda m: print(f"guest build: {m}", file=sys.stderr))
    soak_s = int(args.minutes * 60)
    free = shutil.disk_usage("/tmp").free
    budget = args.rotate_mb * (args.rotate_keep + 1) * 1e6
    if free < 2 * budget:
        raise SystemExit(f"/tmp has {free / 1e9:.1f} GB free; the recording may take {budget / 1e9:.1f} GB")

    samples: dict[str, list[tuple[float, int]]] = {"proxy fds": [], "proxy rss": [], "daemon fds": [],
                                                    "daemon rss": []}
    verdicts: list[tuple[bool, str]] = []
    result: GuestResult | None = None
    with make_share() as share, launcher.short_tmpdir("fsi-soak-") as work:
        dsock, psock, summ = work / "d.sock", work / "p.sock", work / "summary.json"
        recdir = work / "rec"
        recdir.mkdir()
        daemon = subprocess.Popen([sys.executable, "-m", "fsinspect", "daemon", "--socket-path", str(dsock),
                                   "--shared-dir", str(share.root), "--xattr", "--log-level", "warning"],
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        proxy: subprocess.Popen[bytes] | None = None
        try:
            launcher._wait_for_socket(dsock, daemon, "the daemon", 30)
            proxy = subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(psock),
                                      "--backend", str(dsock), "--record", str(recdir / "soak.pcapng"),
                                      "--rotate-mb", str(args.rotate_mb), "--rotate-keep", str(args.rotate_keep),
                                      "--lossless", "--summary-json", str(summ), "--quiet"],
                                     stdin=subprocess.DEVNULL, start_new_session=True)
            launcher._wait_for_socket(psock, proxy, "the proxy", 30)
            holder: dict[str, GuestResult] = {}
            params = {"soak_s": soak_s, "conc_loops": args.conc_loops, "conc_iters": args.conc_iters,
                      "conc_mb": args.conc_mb}
            guest = threading.Thread(target=lambda: holder.update(r=launcher.run_guest(
                psock, image=image, workload="soak", params=params, timeout=soak_s + args.grace,
                watch=[proxy, daemon])), daemon=True)
            t0 = time.monotonic()
            guest.start()
            print(f"{'min':>5} {'proxy fds':>9} {'proxy RSS kB':>12} {'daemon fds':>10} {'daemon RSS kB':>13}",
                  flush=True)
            while True:
                t = time.monotonic() - t0
                try:
                    row = {"proxy fds": fd_count(proxy.pid), "proxy rss": rss_kb(proxy.pid),
                           "daemon fds": fd_count(daemon.pid), "daemon rss": rss_kb(daemon.pid)}
                except (FileNotFoundError, ProcessLookupError):
                    break  # one of them ended: the guest thread sees it as backend lost
                if not guest.is_alive():
                    break  # the session is over: the proxy is winding down, its figures mean nothing now
                for k, v in row.items():
                    samples[k].append((t, v))
                print(f"{t / 60:5.1f} {row['proxy fds']:9} {row['proxy rss']:12} {row['daemon fds']:10} "
                      f"{row['daemon rss']:13}", flush=True)
                guest.join(timeout=max(0.0, args.interval - (time.monotonic() - t0 - t)))
            guest.join()
            result = holder.get("r")
            if proxy.poll() is None:
                try:
                    proxy.wait(timeout=60)  # QEMU is gone: the proxy writes its summary and ends by itself
                except subprocess.TimeoutExpired:
                    verdicts.append((False, "the proxy did not end within 60 s of QEMU's exit"))
        finally:
            if proxy is not None:
                launcher.stop_process(proxy)
            launcher.stop_process(daemon)
        warmup_s = 60 * (args.warmup_min if args.warmup_min is not None else max(1.0, args.minutes / 3))
        verdicts += check_run(result, soak_s, samples, warmup_s)
        verdicts += check_pairing(summ, recdir, args.rotate_keep)
    for ok, text in verdicts:
        print(("PASS " if ok else "FAIL ") + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"minutes": args.minutes, "samples": samples,
                                               "verdicts": verdicts}, indent=1))
    return 0 if all(ok for ok, _ in verdicts) else 1


def check_run(result: GuestResult | None, soak_s: int, samples: dict[str, list[tuple[float, int]]],
              warmup_s: float) -> list[tuple[bool, str]]:
    out: list[tuple[bool, str]] = []
    if result is None:
        return [(False, "the guest run raised (see the traceback above)")]
    rounds = [s for s in result.steps if s.name.startswith("soak-") and s.name != "soak-alive"]
    alive = [s for s in result.steps if s.name == "soak-alive"]
    out.append((result.status == "ok", f"guest: status {result.status}, {len(rounds)} rounds of `concurrent` "
                f"in {result.wall_s:.0f} s (soak {soak_s} s), failed steps {result.failed_steps or 'none'}"
                + (f", lost: {result.backend_lost_reason}" if result.backend_lost else "")))
    out.append((bool(alive) and alive[0].rc == 0,
                "guest responsive at the end: create/read/list/remove after the last round "
                + (f"took {alive[0].duration:.2f} s" if alive and alive[0].duration is not None else "did not run")))
    for key in ("proxy fds", "daemon fds"):
        out.append(judge(key, samples[key], FD_SLACK, "fds", warmup_s))
    for key in ("proxy rss", "daemon rss"):
        base = growth(samples[key], warmup_s)
        rss_slack = max(RSS_SLACK_KB, RSS_SLACK_FRAC * base[0]) if base else RSS_SLACK_KB
        out.append(judge(key, samples[key], rss_slack, "kB", warmup_s))
    return out


def check_pairing(summ: Path, recdir: Path, keep: int) -> list[tuple[bool, str]]:
    out: list[tuple[bool, str]] = []
    if not summ.exists():
        return [(False, "the proxy wrote no summary")]
    s = json.loads(summ.read_text())
    no_reply = sum(s["opcodes"].get(op, 0) for op in NO_REPLY_OPS)
    lints = {k: sum(1 for lint in s["lints"] if lint["kind"] == k) for k in PAIRING_LINTS}
    dropped = s["capture"].get("dropped", 0)
    others = Counter(lint["kind"] for lint in s["lints"] if lint["kind"] not in PAIRING_LINTS)
    out.append((s["replies"] == s["requests"] - no_reply and not any(lints.values()) and not dropped,
                f"proxy (live, whole run): {s['requests']} requests ({no_reply} without reply), {s['replies']} "
                f"replies, pairing lints {lints}, captures dropped {dropped}; other lints {dict(others)}"))
    parts = sorted(recdir.glob("*.pcapng"))
    info, err = fsinspect_json("info", str(recdir))
    out.append((info is not None, f"recording readable: fsinspect info on {len(parts)} kept parts "
                f"({sum(p.stat().st_size for p in parts) / 1e6:.1f} MB)" + (f": {err}" if err else "")))
    stats, err = fsinspect_json("stats", str(recdir))
    if stats is None:
        out.append((False, f"fsinspect stats failed: {err}"))
        return out
    unreplied = sum(o["unreplied"] for o in stats["ops"].values())
    rlints = stats["lints"]
    rotated = info is not None and info.get("part", 0) > 0
    orphans = rlints.get("orphan-reply", 0)
    bad = {k: rlints.get(k, 0) for k in PAIRING_LINTS if k != "orphan-reply"}
    out.append((unreplied == 0 and not any(bad.values()) and (rotated or orphans == 0),
                f"recording (kept parts, first kept part {info.get('part') if info else '?'}): {stats['total']} "
                f"exchanges, {unreplied} unreplied, lints {bad}, orphan replies {orphans}, all lints {rlints}"
                + (" (their requests were in rotated-away parts)" if rotated and orphans else "")))
    return out


if __name__ == "__main__":
    sys.exit(main())
