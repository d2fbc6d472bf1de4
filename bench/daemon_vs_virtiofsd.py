"""The bundled daemon against the C virtiofsd: the `full` guest workload, as alternating pairs in one run.

Both back-ends serve the same share (tmpfs submounts included) with the same options (cache auto,
announce_submounts, no xattr); the bundled daemon runs as users start it (`fsinspect daemon
--socket-path ... -o source=...`).  Prints, per step, each side's median with min and max, and the speed
ratio bundled/C (C seconds / bundled seconds: 1.0 = as fast as virtiofsd) with its min and max over the
pairs; then the goal table of issue 20, each ratio as median [min .. max] over the pairs, with the load
average at the start:

- metadata storm (its four steps summed), speed ratio, goal >= 0.95;
- io-write and io-read (64 MiB each), speed ratio, goal >= 1.0;
- back-end CPU per request, bundled / C, goal <= 1.3: each back-end's CPU seconds (utime + stime of its
  processes, the bundled daemon's from when it listens: its start-up is no request's) per request served.  The bundled daemon counts its requests (--summary-json); the C virtiofsd
  counts none, so its run is taken to serve as many as the bundled run of its pair (the same guest
  workload with the same cache options: the per-pair request counts are printed to judge that by).

Then each back-end's CPU over each guest step, from every thread's schedstat at the step's begin and end
marks (ns; the per-run figures above are clock ticks), with the I/O steps per MiB: `--workload io` runs
only the io steps (a pair takes about 15 s).

`--tree DIR` runs another checkout's bundled daemon in each pair too (before/after in one run): its CPU per
request, and per storm step and I/O step its speed against this checkout's (tree time / this time, per pair).
`--aa` runs the C virtiofsd a second time in each pair and prints what the same statistics read when both
sides are the same back-end: the noise floor of the median of 5 per-pair ratios on this machine.  Each
step row also shows the ratio of the medians beside the median of the per-pair ratios.

Not a test: these machines are noisy (2 shared cores); compare within one run, on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fsinspect.guest import build, launcher
from fsinspect.guest.share import make_share

STORM = ("storm-create", "storm-stat-warm", "storm-stat-cold", "storm-delete")
GOALS = {"storm (4 steps)": 0.95, "io-write": 1.0, "io-read": 1.0}  # speed ratios, at least
CPU_GOAL = 1.3  # bundled CPU per request / C's, at most
IO_MIB = {"io-write": 64, "io-read": 64}  # the guest's io steps' size (io.sh's io_mb default)


def _steps(res: Any) -> dict[str, float]:
    out = {s.name: s.duration for s in res.steps if s.duration is not None}
    if all(k in out for k in STORM):
        out["storm (4 steps)"] = sum(out[k] for k in STORM)
    return out


def _cpu_of(pid: int) -> float:
    """utime + stime of a live process (and its reaped children) from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        return sum(int(x) for x in fields[11:15]) / tck
    except (OSError, IndexError, ValueError):
        return 0.0


def run_c(image: build.GuestImage, share: Path, workload: str) -> tuple[dict[str, float], float, dict[str, float]]:
    with launcher.short_tmpdir() as work, launcher.virtiofsd(share, work) as be:
        # The C virtiofsd forks a sandboxed worker that does the work and exits with the connection: sample
        # the process group's CPU at every console event (the last ones come right before the power-off).
        seen = [0.0]
        pgid = be.processes[0].pid
        per_step = StepCpu(lambda: _group_pids(pgid))

        def sample(ev: Any) -> None:
            seen[0] = max(seen[0], sum(_cpu_of(p) for p in _group_pids(pgid)))
            per_step(ev)

        res = launcher.run_guest(be.socket_path, image=image, workload=workload, timeout=400, watch=be.processes,
                                 params={"xattr": 0}, on_event=sample)
        cpu = seen[0]
    if not res.ok:
        raise SystemExit(f"C virtiofsd run failed: {res.status} {res.failed_steps} {res.errors}")
    return _steps(res), cpu, per_step.cpu


def _threads_cpu_ns(pids: list[int]) -> int:
    """CPU nanoseconds of every thread of `pids` (/proc/.../schedstat: ns, where utime/stime are 10 ms ticks)."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


class StepCpu:
    """A console-event hook: the back-end's CPU seconds over each guest step (schedstat at its begin and end
    marks, every thread of the back-end's processes; a thread that ends within a step takes its share with
    it, and the back-ends' serving threads do not).  With the `io` metric, io-write and io-read per MiB too."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self.begin: dict[str, int] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, ev: Any) -> None:
        if ev.kind not in ("step-begin", "step-end") or not ev.rest:
            return
        name = ev.rest.split()[0]
        now = _threads_cpu_ns(self.pids())
        if ev.kind == "step-begin":
            self.begin[name] = now
        elif name in self.begin:
            self.cpu[name] = (now - self.begin.pop(name)) / 1e9


def _group_pids(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid:
                    out.append(int(d))
            except OSError:
                pass
    return out


def run_bundled(image: build.GuestImage, share: Path, workload: str, extra: list[str],
                tree: Path | None = None) -> tuple[dict[str, float], float, int, dict[str, float]]:
    """(step times, CPU seconds, requests served, CPU seconds per step) of one guest run against the bundled
    daemon (of the checkout `tree`, its C extensions built in place, when given)."""
    with launcher.short_tmpdir() as work:
        sock = work / "d.sock"
        summary = work / "summary.json"
        proc = subprocess.Popen([sys.executable, "-m", "fsinspect", "daemon", f"--socket-path={sock}",
                                 "-o", f"source={share},cache=auto,announce_submounts,no_xattr",
                                 "--log-level", "warning", f"--summary-json={summary}", *extra],
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=tree,
                                env=None if tree is None else {**os.environ, "PYTHONPATH": str(tree)})
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the bundled daemon did not start")
                time.sleep(0.02)
            # Listening means started: the interpreter's start-up and imports (about half a CPU second)
            # are no request's cost, and the C virtiofsd has none to speak of.
            startup = _cpu_of(proc.pid)
            per_step = StepCpu(lambda: [proc.pid])
            res = launcher.run_guest(sock, image=image, workload=workload, timeout=400, watch=[proc],
                                     params={"xattr": 0}, on_event=per_step)
            _pid, _status, ru = os.wait4(proc.pid, 0)
            proc.returncode = 0
        finally:
            launcher.stop_process(proc)
        try:
            requests = sum(json.loads(summary.read_text())["ops"].values())
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"the bundled daemon wrote no usable --summary-json: {e}") from None
    if not res.ok:
        raise SystemExit(f"bundled daemon run failed: {res.status} {res.failed_steps} {res.errors}")
    return _steps(res), ru.ru_utime + ru.ru_stime - startup, requests, per_step.cpu


def spread(values: list[float]) -> str:
    """median [min .. max]"""
    return f"{statistics.median(values):.2f} [{min(values):.2f} .. {max(values):.2f}]"


def goal_table(c_runs: list[dict[str, float]], ours: list[dict[str, float]], cpu: dict[str, list[float]],
               requests: list[int], load: float) -> list[dict[str, Any]]:
    """Issue 20's goal table, printed; also returned for --json."""
    rows: list[dict[str, Any]] = []
    for k, goal in GOALS.items():
        ratios = [c[k] / b[k] for c, b in zip(c_runs, ours) if k in c and k in b and b[k]]
        if ratios:
            rows.append({"ratio": f"{k} speed, C time / bundled time", "goal": f">= {goal}", "values": ratios,
                         "met": statistics.median(ratios) >= goal})
    cpu_ratios = [b / c for b, c in zip(cpu["bundled"], cpu["C"]) if c]
    if cpu_ratios:
        rows.append({"ratio": "back-end CPU per request, bundled / C", "goal": f"<= {CPU_GOAL}", "values": cpu_ratios,
                     "met": statistics.median(cpu_ratios) <= CPU_GOAL})
    print(f"\ngoal table (issue 20): {len(ours)} alternating pairs, load average {load:.2f} at the start")
    print(f"{'ratio':<44} {'goal':>7}  {'median [min .. max]':<24} verdict")
    for r in rows:
        print(f"{r['ratio']:<44} {r['goal']:>7}  {spread(r['values']):<24} {'met' if r['met'] else 'MISSED'}")
    per_req = [f"{b / n * 1e6:.0f}/{c / n * 1e6:.0f}" for b, c, n in zip(cpu["bundled"], cpu["C"], requests) if n]
    print(f"requests served per bundled run: {', '.join(str(n) for n in requests)}; CPU µs per request "
          f"bundled/C per pair (C taken to serve as many): {', '.join(per_req)}")
    return rows


def step_cpu_table(step_cpu: dict[str, list[dict[str, float]]], tree: Path | None) -> None:
    """Each back-end's CPU over each guest step (schedstat, ns resolution), median [min .. max] ms over the
    runs, per MiB for the I/O steps; and bundled / C per pair.  The per-run CPU above is in clock ticks
    (10 ms), too coarse for a step of a few hundred requests."""
    arms = [("C", "C virtiofsd"), ("bundled", "bundled"), *([("tree", str(tree))] if tree else [])]
    names = [k for k in step_cpu["C"][0] if all(k in d for a, _ in arms for d in step_cpu[a])] if step_cpu["C"] else []
    if not names:
        return
    print("\nback-end CPU per step (schedstat), ms: median [min .. max] over the runs"
          + "; bundled / C per pair" + "; the I/O steps also per MiB (64 MiB each)")
    for k in names:
        cols = []
        for arm, label in arms:
            v = [d[k] * 1e3 for d in step_cpu[arm]]
            cols.append(f"{label} {spread(v)}")
        ratios = [b[k] / c[k] for b, c in zip(step_cpu["bundled"], step_cpu["C"]) if c[k]]
        line = f"  {k:<18} " + "; ".join(cols) + (f"; bundled/C {spread(ratios)}" if ratios else "")
        if k in IO_MIB:
            line += "; ms per MiB " + ", ".join(
                f"{label} {statistics.median(d[k] for d in step_cpu[arm]) * 1e3 / IO_MIB[k]:.3f}"
                for arm, label in arms)
        print(line)


def side_by_side(title: str, num: list[dict[str, float]], den: list[dict[str, float]]) -> None:
    """Per goal step: the median [min .. max] of num/den over the pairs, and the ratio of the medians."""
    print(f"\n{title}")
    for k in GOALS:
        ratios = [a[k] / b[k] for a, b in zip(num, den) if k in a and k in b and b[k]]
        if ratios:
            of_medians = statistics.median(a[k] for a in num) / statistics.median(b[k] for b in den)
            print(f"  {k:<18} {spread(ratios):<24} of medians {of_medians:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--workload", default="full")
    ap.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    ap.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for the bundled daemon, e.g. --daemon-arg=--inode-file-handles=never")
    ap.add_argument("--share-fs", choices=("tmpfs", "disk"), default="tmpfs",
                    help="the share's root: a tmpfs (default) or the host's disk (ext4), as before")
    ap.add_argument("--tree", metavar="DIR", type=Path,
                    help="also the bundled daemon of another checkout DIR in each pair (its CPU per request "
                         "and its step times against this checkout's are printed; the goal table stays this "
                         "checkout's)")
    ap.add_argument("--aa", action="store_true",
                    help="also a second C virtiofsd run in each pair: the ratios of C against itself (A/A), "
                         "what the goal statistics read when nothing differs")
    args = ap.parse_args()
    image = build.build(progress=lambda m: print(m, file=sys.stderr))
    c_runs: list[dict[str, float]] = []
    ours: list[dict[str, float]] = []
    cpu: dict[str, list[float]] = {"C": [], "bundled": []}
    requests: list[int] = []
    tree_cpu: list[float] = []
    tree_cpu_s: list[float] = []  # CPU seconds per run, as cpu[...] holds for the other two
    tree_runs: list[dict[str, float]] = []
    c2_runs: list[dict[str, float]] = []
    step_cpu: dict[str, list[dict[str, float]]] = {"C": [], "bundled": [], "tree": []}
    load = os.getloadavg()[0]
    # A tmpfs root by default: on the host's ext4 a create storm soon after a delete storm (the previous
    # run's) pays ext4's scan past recently deleted inodes, which varies 3x between runs (make_share).
    with make_share(root_tmpfs_mb=1024 if args.share_fs == "tmpfs" else 0) as share:
        for i in range(args.pairs):
            order: tuple[str, ...] = ("C", "bundled") if i % 2 == 0 else ("bundled", "C")
            for extra_arm, wanted in (("tree", args.tree is not None), ("C2", args.aa)):
                if wanted:
                    order = (*order, extra_arm) if i % 2 == 0 else (extra_arm, *order)
            for kind in order:
                if kind == "tree":
                    steps_t, c, n, sc = run_bundled(image, share.root, args.workload, args.daemon_arg, args.tree)
                    tree_cpu.append(c / n * 1e6 if n else 0.0)
                    tree_cpu_s.append(c)
                    tree_runs.append(steps_t)
                    step_cpu["tree"].append(sc)
                    continue
                if kind == "C2":
                    c2_runs.append(run_c(image, share.root, args.workload)[0])
                    continue
                if kind == "C":
                    steps, c, sc = run_c(image, share.root, args.workload)
                    c_runs.append(steps)
                else:
                    steps, c, n, sc = run_bundled(image, share.root, args.workload, args.daemon_arg)
                    ours.append(steps)
                    requests.append(n)
                cpu[kind].append(c)
                step_cpu[kind].append(sc)
            print(f"pair {i + 1}/{args.pairs} done", file=sys.stderr)
    keys = [k for k in c_runs[0] if all(k in d for d in c_runs + ours)]
    rows: list[dict[str, Any]] = []
    print(f"{args.pairs} alternating pairs, workload {args.workload}, share on {args.share_fs}, load average "
          f"{load:.2f} at the start; "
          f"times in s (median [min-max]); "
          f"ratio = C time / bundled time (speed of the bundled daemon relative to the C virtiofsd), the median "
          f"of the per-pair ratios; 'of med.' = C median / bundled median")
    print(f"{'step':<18} {'C virtiofsd':>20} {'bundled daemon':>20} {'ratio':>6} {'min':>5} {'max':>5} "
          f"{'of med.':>7}  goal")
    for k in keys:
        cs, bs = [d[k] for d in c_runs], [d[k] for d in ours]
        ratios = [c / b if b else 1.0 for c, b in zip(cs, bs)]
        row: dict[str, Any] = {"step": k, "c_median": statistics.median(cs), "c_min": min(cs), "c_max": max(cs),
               "bundled_median": statistics.median(bs), "bundled_min": min(bs), "bundled_max": max(bs),
               "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
        rows.append(row)
        goal = GOALS.get(k)
        mark = "" if goal is None else f">= {goal} {'met' if row['ratio'] >= goal else 'MISSED'}"
        print(f"{k:<18} {row['c_median']:>7.2f} [{row['c_min']:.2f}-{row['c_max']:.2f}] "
              f"{row['bundled_median']:>7.2f} [{row['bundled_min']:.2f}-{row['bundled_max']:.2f}] "
              f"{row['ratio']:>6.2f} {row['ratio_min']:>5.2f} {row['ratio_max']:>5.2f} "
              f"{row['c_median'] / row['bundled_median'] if row['bundled_median'] else 1.0:>7.2f}  {mark}")
    storm = "storm (4 steps)"
    if all(storm in d for d in c_runs + ours):
        print("storm per pair, C / bundled s (ratio): " + ", ".join(
            f"{c[storm]:.2f}/{b[storm]:.2f} ({c[storm] / b[storm]:.2f})" for c, b in zip(c_runs, ours)))
    for kind, vals in cpu.items():
        print(f"{kind} back-end CPU per run: median {statistics.median(vals):.2f} s (min {min(vals):.2f}, "
              f"max {max(vals):.2f})")
    goals = goal_table(c_runs, ours, cpu, requests, load)
    step_cpu_table(step_cpu, args.tree)
    if tree_cpu:
        print(f"CPU µs per request of {args.tree}'s bundled daemon per pair: "
              + ", ".join(f"{v:.0f}" for v in tree_cpu))
        side_by_side(f"{args.tree}'s daemon against this checkout's: tree time / this time per pair "
                     f"(> 1: this checkout is faster)", tree_runs, ours)
        side_by_side(f"{args.tree}'s daemon against the C virtiofsd: C time / tree time per pair", c_runs, tree_runs)
    if c2_runs:
        side_by_side("A/A: the C virtiofsd against itself, first run time / second run time per pair (nothing "
                     "differs: the spread is the noise)", c_runs, c2_runs)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "cpu": {**cpu, "tree": tree_cpu_s}, "requests": requests, "load": load,
                                               "goals": goals, "runs": {"C": c_runs, "bundled": ours,
                                                                        "tree": tree_runs, "C2": c2_runs},
                                               "step_cpu": step_cpu},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
