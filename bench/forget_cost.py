"""CPU per FORGET, BATCH_FORGET and CREATE on the back-end thread that serves it, without a guest.

Each FORGET goes alone on the hiprio queue (queue 0) and is waited for (its chain back in the used ring),
as a guest's `rm -r` sends them: one kick, one wake-up, one chain each.  Per phase it reads every back-end
thread's schedstat before and after, and prints the CPU µs per request of the thread that did the most of
it (the one serving that queue) and of the whole back-end:

- `FORGET to 0`: the last reference of a created file (the inode goes);
- `FORGET 1 of 2`: a reference of a file looked up twice (the inode stays);
- `LOOKUP new`: a LOOKUP of a file whose inode was forgotten (a new inode in the table);
- `FORGET burst`: one of two references each of n unlinked files, sent all at once (as a guest's reclaim sends them);
- `FORGET unknown`: a nodeid the back-end never gave out;
- `BATCH_FORGET x16`: 16 files' last references in one message (per entry);
- `CREATE`: a new file on the request queue (RELEASEd afterwards, outside the measure).

Both back-ends in alternating rounds (bench/vhost_roundtrip.py's front-end and meter).  `--profile` runs
only the bundled daemon under `perf record -g -t <hiprio thread>` during `FORGET to 0` and prints the
report's top lines; `--tree NAME=DIR` adds the bundled daemon of another checkout (before and after).

    sudo .venv/bin/python bench/forget_cost.py [--n 3000] [--rounds 2] [--tree before=/tmp/old]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from delete_forget import backend  # the same back-ends
from vhost_roundtrip import fuse  # the same driver

from dissectors import fuse as F
from fsinspect.guest.share import make_share
from fsinspect.rerun.front import Front

_UNIQUE = itertools.count(1 << 40)
_RUN = itertools.count(1)
BATCH = 16
OPEN_MAX = 250


def thread_cpu(pgid: int) -> dict[int, int]:
    """ns of CPU of every thread of every process in the process group (schedstat)."""
    out: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[2]) != pgid:
                    continue
            for t in os.listdir(f"/proc/{d}/task"):
                with open(f"/proc/{d}/task/{t}/schedstat") as f:
                    out[int(t)] = int(f.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return out


class Phases:
    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.ns: dict[str, dict[int, int]] = {}
        self.count: dict[str, int] = {}

    @contextmanager
    def phase(self, name: str, count: int) -> Iterator[None]:
        """Adds up over the calls with the same name."""
        c0 = thread_cpu(self.pgid)
        yield
        c1 = thread_cpu(self.pgid)
        d = self.ns.setdefault(name, {})
        for t, v in c1.items():
            d[t] = d.get(t, 0) + v - c0.get(t, 0)
        self.count[name] = self.count.get(name, 0) + count

    def busiest(self, name: str) -> int:
        d = self.ns[name]
        return max(d, key=lambda t: d[t])

    @property
    def res(self) -> dict[str, tuple[float, float]]:
        """phase -> (µs per request of the busiest thread, of all threads)"""
        return {k: (d[self.busiest(k)] / self.count[k] / 1e3, sum(d.values()) / self.count[k] / 1e3)
                for k, d in self.ns.items()}


def forget_wait(front: Front, op: str, args: dict[str, Any], nodeid: int = 0) -> None:
    front.submit(0, F.encode_request(op, args, unique=next(_UNIQUE), nodeid=nodeid), 0, None)
    while front.in_flight():
        front.poll(1.0)


def measure(front: Front, pgid: int, n: int, hook: Callable[[Phases, str], Any] | None = None) -> Phases:
    fuse(front, "INIT", {"init": F.make("fuse_init_in", major=7, minor=38, max_readahead=128 << 10, flags=0)},
         nodeid=0)
    run = next(_RUN)
    create = F.make("fuse_create_in", flags=os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=0o100644, umask=0o022)
    ph = Phases(pgid)
    files: list[tuple[bytes, int, int]] = []
    for start in range(0, 2 * n, OPEN_MAX):  # the open fds stay well under RLIMIT_NOFILE
        made = []
        with ph.phase("CREATE", min(OPEN_MAX, 2 * n - start)):
            for i in range(start, min(2 * n, start + OPEN_MAX)):
                name = f"f{run}-{i}".encode()
                r = fuse(front, "CREATE", {"create": create, "name": name})
                made.append((name, r.args["entry"].nodeid, r.args["open"].fh))
        for _name, nodeid, fh in made:
            fuse(front, "RELEASE", {"release": F.make("fuse_release_in", fh=fh, flags=os.O_RDWR)}, nodeid=nodeid)
        files += made
    single, batch = files[:n], files[n:]
    one = {"forget": F.make("fuse_forget_in", nlookup=1)}
    for name, _nodeid, _fh in single:  # a second reference each
        fuse(front, "LOOKUP", {"name": name})
    with ph.phase("FORGET 1 of 2", n):
        for _name, nodeid, _fh in single:
            forget_wait(front, "FORGET", one, nodeid)
    for _name, nodeid, _fh in single:  # gone from the table, the files still there
        forget_wait(front, "FORGET", one, nodeid)
    with ph.phase("LOOKUP new", n):
        single = [(name, fuse(front, "LOOKUP", {"name": name}).args["entry"].nodeid, fh) for name, _n, fh in single]
    again = [fuse(front, "LOOKUP", {"name": name}).args["entry"].nodeid for name, _n, _fh in batch]  # 2 each
    for name, _nodeid, _fh in files:  # as rm does: UNLINK (of a known inode), then its FORGET
        fuse(front, "UNLINK", {"name": name})
    ctx = hook(ph, "FORGET to 0") if hook is not None else None
    with ph.phase("FORGET to 0", n):
        for _name, nodeid, _fh in single:
            forget_wait(front, "FORGET", one, nodeid)
    if ctx is not None:
        ctx.__exit__(None, None, None)
    with ph.phase("FORGET burst", n):  # as a guest's reclaim sends them: all at once, none waited for
        for nodeid in again:
            while not front.free_slots(0):
                front.poll(0.1)
            front.submit(0, F.encode_request("FORGET", one, unique=next(_UNIQUE), nodeid=nodeid), 0, None)
        while front.in_flight():
            front.poll(1.0)
    with ph.phase("FORGET unknown", n):
        for i in range(n):
            forget_wait(front, "FORGET", one, (1 << 50) + i)
    with ph.phase(f"BATCH_FORGET x{BATCH}", n):
        for s in range(0, n, BATCH):
            forgets = [F.make("fuse_forget_one", nodeid=x[1], nlookup=1) for x in batch[s:s + BATCH]]
            forget_wait(front, "BATCH_FORGET", {"batch": F.make("fuse_batch_forget_in", count=len(forgets)),
                                                "forgets": forgets})
    return ph


def perf_hook(out: Path) -> Callable[[Phases, str], Any]:
    """perf record -g on the hiprio thread (the busiest in the last FORGET phase) for one phase."""
    class Ctx:
        proc: subprocess.Popen[bytes] | None = None

        def __exit__(self, *_a: object) -> None:
            if self.proc is not None:
                self.proc.send_signal(2)
                self.proc.wait(30)

    def hook(ph: Phases, _name: str) -> Ctx:
        c = Ctx()
        tid = ph.busiest("FORGET 1 of 2")
        c.proc = subprocess.Popen(["perf", "record", "-q", "-g", "-F", "5000", "-t", str(tid), "-o", str(out)],
                                  stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        return c
    return hook


def run(kind: str, share: Path, n: int, tree: Path | None = None,
        hook: Callable[[Phases, str], Any] | None = None) -> Phases:
    with backend(kind, share, tree) as (front, pgid):
        return measure(front, pgid, n, hook if kind != "C virtiofsd" else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="files per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--profile", type=Path, metavar="PERF_DATA", help="perf record the bundled hiprio thread")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} at the start")
    kinds: list[tuple[str, Path | None]] = [("C virtiofsd", None), ("bundled", None)]
    kinds += [(name, Path(d).resolve()) for name, d in (t.split("=", 1) for t in args.tree)]
    with make_share(root_tmpfs_mb=256) as share:
        if args.profile is not None:
            ph = run("bundled", share.root, args.n, hook=perf_hook(args.profile))
            print({k: f"{v[0]:.1f}" for k, v in ph.res.items()})
            rep = subprocess.run(["perf", "report", "-i", str(args.profile), "--no-children", "--stdio",
                                  "--percent-limit", "1.5", "-g", "none"], capture_output=True, text=True)
            print(rep.stdout)
            return 0
        res: dict[str, list[Phases]] = {}
        for r in range(args.rounds):
            for kind, tree in kinds if r % 2 == 0 else kinds[::-1]:
                res.setdefault(kind, []).append(run(kind, share.root, args.n, tree))
    names = list(next(iter(res.values()))[0].res)
    print(f"{'µs per request (serving thread / whole back-end), median of rounds':<40}")
    print(f"{'':<18}" + "".join(f"{k:>24}" for k in res))
    for name in names:
        cells = []
        for v in res.values():
            th = statistics.median(p.res[name][0] for p in v)
            al = statistics.median(p.res[name][1] for p in v)
            cells.append(f"{th:10.1f} / {al:6.1f}")
        print(f"{name:<18}" + "".join(f"{c:>24}" for c in cells))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
