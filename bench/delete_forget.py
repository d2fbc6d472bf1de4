"""The delete storm's pattern without a guest: do FORGETs on the hiprio queue hold the requests up?

Per file: GETATTR, UNLINK (each waited for), then a FORGET of it on the hiprio queue (queue 0, not waited
for) while the next file's GETATTR goes out, as a guest's `rm -r` does; against the same without the
FORGETs.  Both back-ends, alternating rounds, driven by bench/vhost_roundtrip.py's vhost-user front-end
(INDIRECT descriptors, no EVENT_IDX).  Prints per arm the wall µs per file, the back-end's CPU µs per file
(schedstat), and per back-end thread its voluntary/involuntary context switches and CPU µs per file: a
request thread that waits for the GIL sleeps more than once per request.

    sudo .venv/bin/python bench/delete_forget.py [--n 3000] [--rounds 3] [--tree before=/tmp/old-checkout]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vhost_roundtrip import fuse, group_cpu  # the same driver and CPU meter

from dissectors import fuse as F
from fsinspect.guest import launcher
from fsinspect.guest.share import make_share
from fsinspect.rerun.front import F_INDIRECT_DESC, F_PROTOCOL, F_VERSION_1, Front, Negotiation

_UNIQUE = itertools.count(1 << 32)
_RUN = itertools.count(1)
KINDS = ("C virtiofsd", "bundled")


def switches(pgid: int) -> dict[str, tuple[int, int, int]]:
    """Voluntary and involuntary context switches and CPU ns (schedstat) of each thread of the process group."""
    out: dict[str, tuple[int, int, int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.getpgid(int(d)) != pgid:
                continue
            for t in os.listdir(f"/proc/{d}/task"):
                st = Path(f"/proc/{d}/task/{t}/status").read_text()
                cpu = int(Path(f"/proc/{d}/task/{t}/schedstat").read_text().split()[0])
                out[t] = (int(st.split("\nvoluntary_ctxt_switches:")[1].split()[0]),
                          int(st.split("nonvoluntary_ctxt_switches:")[1].split()[0]), cpu)
        except (OSError, IndexError, ValueError):
            continue
    return out


def measure(front: Front, pgid: int, n: int, forget: bool) -> tuple[float, float, str]:
    fuse(front, "INIT", {"init": F.make("fuse_init_in", major=7, minor=38, max_readahead=128 << 10, flags=0)},
         nodeid=0)
    run = next(_RUN)
    create = F.make("fuse_create_in", flags=os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=0o100644, umask=0o022)
    files = []
    for i in range(n):
        name = f"d{run}-{i}".encode()
        r = fuse(front, "CREATE", {"create": create, "name": name})
        nodeid, fh = r.args["entry"].nodeid, r.args["open"].fh
        fuse(front, "RELEASE", {"release": F.make("fuse_release_in", fh=fh, flags=os.O_RDWR)}, nodeid=nodeid)
        files.append((name, nodeid))
    getattr_in = {"getattr": F.make("fuse_getattr_in")}
    forget_in = {"forget": F.make("fuse_forget_in", nlookup=1)}
    sw0, c0, t0 = switches(pgid), group_cpu(pgid), time.perf_counter()
    for name, nodeid in files:
        fuse(front, "GETATTR", getattr_in, nodeid=nodeid)
        fuse(front, "UNLINK", {"name": name})
        if forget:
            while not front.free_slots(0):  # the hiprio queue's buffers all in flight: wait for one
                front.poll(0.1)
            front.submit(0, F.encode_request("FORGET", forget_in, unique=next(_UNIQUE), nodeid=nodeid), 0, None)
    t1, c1, sw1 = time.perf_counter(), group_cpu(pgid), switches(pgid)
    while front.in_flight():
        front.poll(0.1)
    per = sorted(((v[0] - sw0.get(t, (0, 0, 0))[0]) / n, (v[1] - sw0.get(t, (0, 0, 0))[1]) / n,
                  (v[2] - sw0.get(t, (0, 0, 0))[2]) / n / 1e3) for t, v in sw1.items())
    threads = ", ".join(f"{a:.2f}/{b:.2f} {c:.1f} µs" for a, b, c in per if a > 0.01)
    return (t1 - t0) / n * 1e6, (c1 - c0) / n * 1e6, threads


@contextmanager
def backend(kind: str, share: Path, tree: Path | None = None) -> Iterator[tuple[Front, int]]:
    """A front-end on the back-end's socket, and the back-end's process group, while it runs; `tree`: the
    bundled daemon of another checkout."""
    neg = Negotiation(features=F_VERSION_1 | F_INDIRECT_DESC | F_PROTOCOL)
    with launcher.short_tmpdir() as work:
        if kind == "C virtiofsd":
            with launcher.virtiofsd(share, work) as be:
                front = Front(be.socket_path, neg, max_request=8192, max_reply=8192)
                try:
                    yield front, be.processes[0].pid
                finally:
                    front.close()
            return
        sock = work / "d.sock"
        env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
        proc = subprocess.Popen([sys.executable, "-m", "fsinspect", "daemon", f"--socket-path={sock}", "-o",
                                 f"source={share}", "--log-level", "error"], start_new_session=True, cwd=tree, env=env)
        try:
            while not sock.exists():
                time.sleep(0.02)
            front = Front(sock, neg, max_request=8192, max_reply=8192)
            try:
                yield front, proc.pid
            finally:
                front.close()
        finally:
            launcher.stop_process(proc)


def run(kind: str, share: Path, n: int, forget: bool, tree: Path | None = None) -> tuple[float, float, str]:
    with backend(kind, share, tree) as (front, pgid):
        return measure(front, pgid, n, forget)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="files per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                    help="also the bundled daemon of another checkout (built in place), in the same rounds")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} at the start")
    kinds: list[tuple[str, Path | None]] = [(k, None) for k in KINDS]
    kinds += [(name, Path(d).resolve()) for name, d in (t.split("=", 1) for t in args.tree)]
    res: dict[tuple[str, bool], list[tuple[float, float, str]]] = {}
    with make_share(root_tmpfs_mb=256) as share:
        for r in range(args.rounds):
            arms = [(k, f) for k in kinds for f in (False, True)]
            for (kind, tree), forget in arms if r % 2 == 0 else arms[::-1]:
                res.setdefault((kind, forget), []).append(run(kind, share.root, args.n, forget, tree))
    for (kind, forget), v in res.items():
        walls = [x[0] for x in v]
        print(f"{kind:<12} {'FORGETs beside' if forget else 'no FORGETs    '}  wall µs/file "
              f"{statistics.median(walls):7.1f} [{min(walls):.1f} .. {max(walls):.1f}]  back-end CPU µs/file "
              f"{statistics.median(x[1] for x in v):6.1f}  switches vol/invol and CPU per file per thread: "
              f"{'; '.join(x[2] for x in v)}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
