"""Per-request round trip and CPU over vhost-user, without a guest: the bundled daemon against the C virtiofsd.

A guest under TCG on a shared 2-core machine makes the `full` workload's step times noisy (bench/
daemon_vs_virtiofsd.py); this drives each back-end's socket directly with fsinspect.rerun.front (the
front-end `fsinspect rerun` uses: memfd guest memory, the driver side of the rings, INDIRECT descriptors) and times sequential
round trips: kick -> back-end -> call.  The difference is the back-end's own cost per request.

Beside the median round trip it prints the back-end's CPU per request (utime + stime of its whole process
group over each op's requests / their number): the measure that stays meaningful on a busy machine, where
wall times are noise.  CREATE, OPEN, RELEASE, FORGET, LOOKUP cold (a name whose inode was forgotten: a new
inode in the table) and UNLINK run in batches on fresh names, each op's CPU taken apart.  `--tree NAME=DIR` adds the bundled daemon of another checkout (e.g. `git archive main` unpacked
and built with `python setup.py build_ext --inplace`) to the same alternating rounds: before and after
in one run.

    sudo .venv/bin/python bench/vhost_roundtrip.py [--n 3000] [--rounds 2] [--daemon-arg=--sandbox=none] \
        [--tree before=/tmp/old-checkout]
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

from dissectors import fuse as F
from fsinspect.guest import launcher
from fsinspect.guest.share import make_share
from fsinspect.rerun.front import F_INDIRECT_DESC, F_PROTOCOL, F_VERSION_1, Front, Negotiation

MAX_PAGES = F.spec.INIT_FLAGS.by_name()["MAX_PAGES"]
_UNIQUE = itertools.count(1)
_RUN = itertools.count(1)
# The biggest WRITE a Linux guest sends over a 128-entry virtqueue (QEMU's default queue-size): virtio-fs
# caps a request at queue size - 4 pages (fuse_conn.max_pages_limit), so dd bs=1M writes 496K, 496K, 32K.
GUEST_WRITE = 124 * 4096
BATCH = 250  # CREATEs before their RELEASEs and UNLINKs: the open fds stay well under RLIMIT_NOFILE


def fuse(front: Front, op: str, args: dict[str, Any] | None = None, nodeid: int = 1,
         reply_size: int = 4096) -> F.Reply:
    """One request on the request queue, waited for; anything but a success ends the bench."""
    raw = F.encode_request(op, args, unique=next(_UNIQUE), nodeid=nodeid)
    rep = F.decode_reply(front.roundtrip(raw, reply_size), F.decode_request(raw))
    if not isinstance(rep, F.Reply) or rep.error:
        raise SystemExit(f"{op}: {rep}")
    return rep


def forget(front: Front, args: dict[str, Any], nodeid: int) -> None:
    """One FORGET on the hiprio queue, waited for (its chain back in the used ring; it has no reply)."""
    front.submit(0, F.encode_request("FORGET", args, unique=next(_UNIQUE), nodeid=nodeid), 0, None)
    while front.in_flight():
        front.poll(1.0)


def group_cpu(pgid: int) -> float:
    """CPU seconds of every thread of every live process in the process group (the C virtiofsd forks its
    worker), from each thread's schedstat (ns; utime/stime count 10 ms ticks, too coarse here)."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[2]) != pgid:  # field 5 of stat: the process group
                    continue
            for t in os.listdir(f"/proc/{d}/task"):
                with open(f"/proc/{d}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


class Meter:
    """Round-trip times and back-end CPU, per op."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.times: dict[str, list[float]] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def cpu_of(self, name: str) -> Iterator[None]:
        c0 = group_cpu(self.pgid)
        yield
        self.cpu[name] = self.cpu.get(name, 0.0) + group_cpu(self.pgid) - c0

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        r = fn()
        self.times.setdefault(name, []).append(time.perf_counter() - t0)
        return r

    def result(self) -> dict[str, tuple[float, float]]:
        """op -> (median round trip µs, CPU µs per request)."""
        return {k: (statistics.median(v) * 1e6, self.cpu.get(k, 0.0) / len(v) * 1e6) for k, v in self.times.items()}


def measure(front: Front, n: int, pgid: int) -> dict[str, tuple[float, float]]:
    # MAX_PAGES, as Linux offers it: without it the C virtiofsd keeps 128 KiB buffers and aborts on a bigger WRITE.
    init = F.make("fuse_init_in", major=7, minor=38, max_readahead=128 << 10, flags=MAX_PAGES)
    fuse(front, "INIT", {"init": init}, nodeid=0)
    e = fuse(front, "LOOKUP", {"name": b"big.bin"}).args["entry"]
    fh = fuse(front, "OPEN", {"open": F.make("fuse_open_in", flags=os.O_RDONLY)}, nodeid=e.nodeid).args["open"].fh
    out = F.make("fuse_create_in", flags=os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode=0o100644)
    wname = f"w{next(_RUN)}.bin".encode()
    w = fuse(front, "CREATE", {"create": out, "name": wname})
    wnode, wfh = w.args["entry"].nodeid, w.args["open"].fh
    chunk = os.urandom(1 << 17)
    big = os.urandom(GUEST_WRITE)
    m = Meter(pgid)
    ops: dict[str, Callable[[int], Any]] = {
        "GETATTR": lambda i: fuse(front, "GETATTR", {"getattr": F.make("fuse_getattr_in")}, nodeid=e.nodeid),
        "LOOKUP": lambda i: fuse(front, "LOOKUP", {"name": b"big.bin"}),
        "READ 128K": lambda i: fuse(front, "READ", {"read": F.make("fuse_read_in", fh=fh, offset=(i % 32) << 17,
                                                                   size=1 << 17)}, nodeid=e.nodeid,
                                          reply_size=16 + (1 << 17)),
        "WRITE 128K": lambda i: fuse(front, "WRITE", {"write": F.make("fuse_write_in", fh=wfh, offset=(i % 32) << 17,
                                                                      size=1 << 17), "data": chunk}, nodeid=wnode),
        "WRITE 496K": lambda i: fuse(front, "WRITE", {"write": F.make("fuse_write_in", fh=wfh, offset=(i % 32) * GUEST_WRITE,
                                                                      size=GUEST_WRITE), "data": big}, nodeid=wnode),
    }
    for name, fn in ops.items():
        with m.cpu_of(name):
            for i in range(n):
                m.timed(name, lambda: fn(i))  # noqa: B023 (called at once)
    run = next(_RUN)
    create = F.make("fuse_create_in", flags=os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=0o100644, umask=0o022)
    for start in range(0, n, BATCH):
        names = [f"c{run}-{i}".encode() for i in range(start, min(n, start + BATCH))]
        made = []
        with m.cpu_of("CREATE"):
            for name in names:
                r = m.timed("CREATE", lambda: fuse(front, "CREATE", {"create": create, "name": name}))  # noqa: B023
                made.append((r.args["entry"].nodeid, r.args["open"].fh))
        rdonly = {"open": F.make("fuse_open_in", flags=os.O_RDONLY)}
        with m.cpu_of("OPEN"):
            for nodeid, _h in list(made):
                r = m.timed("OPEN", lambda: fuse(front, "OPEN", rdonly, nodeid=nodeid))  # noqa: B023
                made.append((nodeid, r.args["open"].fh))
        with m.cpu_of("RELEASE"):
            for nodeid, h in made:
                rel = F.make("fuse_release_in", fh=h, flags=os.O_RDWR)
                m.timed("RELEASE", lambda: fuse(front, "RELEASE", {"release": rel}, nodeid=nodeid))  # noqa: B023
        # Their last references forgotten (hiprio queue, each waited for), then a LOOKUP of each: a new inode
        # in the back-end's table (the guest's stat-cold step), which UNLINK then finds known as before.
        one = {"forget": F.make("fuse_forget_in", nlookup=1)}
        with m.cpu_of("FORGET"):
            for nodeid, _h in made[:len(names)]:
                m.timed("FORGET", lambda: forget(front, one, nodeid))  # noqa: B023
        with m.cpu_of("LOOKUP cold"):
            for name in names:
                m.timed("LOOKUP cold", lambda: fuse(front, "LOOKUP", {"name": name}))  # noqa: B023
        with m.cpu_of("UNLINK"):
            for name in names:
                m.timed("UNLINK", lambda: fuse(front, "UNLINK", {"name": name}))  # noqa: B023
    # The written file goes (16 MiB a run: rounds x back-ends of them filled the share's tmpfs)
    fuse(front, "RELEASE", {"release": F.make("fuse_release_in", fh=wfh, flags=os.O_RDWR)}, nodeid=wnode)
    fuse(front, "UNLINK", {"name": wname})
    return m.result()


def measure_at(sock: Path, n: int, pgid: int) -> dict[str, tuple[float, float]]:
    # INDIRECT descriptors as Linux sends them; no EVENT_IDX: a call for every reply
    front = Front(sock, Negotiation(features=F_VERSION_1 | F_INDIRECT_DESC | F_PROTOCOL), max_request=4096 + GUEST_WRITE,
                  max_reply=1 << 17)
    try:
        return measure(front, n, pgid)
    finally:
        front.close()


def run(kind: str, share: Path, n: int, extra: list[str], tree: Path | None = None) -> dict[str, tuple[float, float]]:
    with launcher.short_tmpdir() as work:
        if kind.startswith("C virtiofsd"):
            with launcher.virtiofsd(share, work) as be:
                pgid = be.processes[0].pid
                if "proxy" not in kind:
                    return measure_at(be.socket_path, n, pgid)
                listen = work / "p.sock"
                proxy = subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(listen),
                                          "--backend", str(be.socket_path), "--record", str(work / "rec.pcapng"),
                                          "--quiet", *extra],
                                         stdin=subprocess.DEVNULL, start_new_session=True)
                try:
                    while not listen.exists():
                        time.sleep(0.02)
                    return measure_at(listen, n, pgid)
                finally:
                    launcher.stop_process(proxy)
        sock = work / "d.sock"
        env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
        proc = subprocess.Popen([sys.executable, "-m", "fsinspect", "daemon", f"--socket-path={sock}", "-o",
                                 f"source={share}", "--log-level", "warning", *extra], start_new_session=True,
                                cwd=tree, env=env)
        try:
            while not sock.exists():
                time.sleep(0.02)
            return measure_at(sock, n, proc.pid)
        finally:
            launcher.stop_process(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="round trips per op (default 3000)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    ap.add_argument("--proxy", action="store_true",
                    help="compare the C virtiofsd direct with the same through `fsinspect proxy` (recording on)")
    ap.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for the bundled daemon, e.g. --daemon-arg=--sandbox=none")
    ap.add_argument("--never", action="store_true", help="also the bundled daemon with --inode-file-handles=never")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                    help="also the bundled daemon of another checkout DIR (its C extensions built in place)")
    args = ap.parse_args()
    kinds: dict[str, list[str]] = (
        {"C virtiofsd": [], "C virtiofsd + proxy": []} if args.proxy else
        {"C virtiofsd": [], "bundled (prefer)": list(args.daemon_arg)})
    if args.never and not args.proxy:
        kinds["bundled (never)"] = ["--inode-file-handles=never", *args.daemon_arg]
    trees: dict[str, Path] = {}
    for v in args.tree:
        name, _, tree = v.partition("=")
        trees[name] = Path(tree).resolve()
        kinds[name] = list(args.daemon_arg)
    results: dict[str, list[dict[str, tuple[float, float]]]] = {k: [] for k in kinds}
    load = os.getloadavg()[0]
    with make_share(root_tmpfs_mb=256) as share:  # ext4's recently-deleted scan would swamp CREATE
        (share.root / "big.bin").write_bytes(os.urandom(4 << 20))
        for _ in range(args.rounds):
            for kind, extra in kinds.items():
                results[kind].append(run(kind, share.root, args.n, extra, trees.get(kind)))
    ops = list(results["C virtiofsd"][0])
    print(f"{args.n} sequential requests per op, best of {args.rounds} alternating rounds, load average {load:.2f} "
          "at the start")
    for title, col in (("median round trip (µs)", 0), ("back-end CPU per request (µs)", 1)):
        print(title)
        print(f"{'back-end':<20}" + "".join(f"{o:>12}" for o in ops))
        for kind, runs in results.items():
            print(f"{kind:<20}" + "".join(f"{min(r[o][col] for r in runs):>12.1f}" for o in ops))
    c = {o: min(r[o][1] for r in results["C virtiofsd"]) for o in ops}
    for kind, runs in results.items():
        if kind != "C virtiofsd":
            print(f"CPU ratio {kind} / C: " + ", ".join(
                f"{o} {min(r[o][1] for r in runs) / c[o]:.2f}" for o in ops if c[o] > 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
