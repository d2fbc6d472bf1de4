"""Per-request round trip over vhost-user, without a guest: the bundled daemon against the C virtiofsd.

A guest under TCG on a shared 2-core machine makes the `full` workload's step times noisy (bench/
daemon_vs_virtiofsd.py); this drives each back-end's socket directly with fsinspect.rerun.front (the
front-end `fsinspect rerun` uses: memfd guest memory, the driver side of the rings, INDIRECT descriptors) and times sequential
round trips: kick -> back-end -> call.  The difference is the back-end's own cost per request.

    sudo .venv/bin/python bench/vhost_roundtrip.py [--n 3000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dissectors import fuse as F
from fsinspect.guest import launcher
from fsinspect.guest.share import make_share
from fsinspect.rerun.front import F_INDIRECT_DESC, F_PROTOCOL, F_VERSION_1, Front, Negotiation

_UNIQUE = itertools.count(1)


def fuse(front: Front, op: str, args: dict[str, Any] | None = None, nodeid: int = 1,
         reply_size: int = 4096) -> F.Reply:
    """One request on the request queue, waited for; anything but a success ends the bench."""
    raw = F.encode_request(op, args, unique=next(_UNIQUE), nodeid=nodeid)
    rep = F.decode_reply(front.roundtrip(raw, reply_size), F.decode_request(raw))
    if not isinstance(rep, F.Reply) or rep.error:
        raise SystemExit(f"{op}: {rep}")
    return rep


def measure(front: Front, n: int) -> dict[str, float]:
    init = F.make("fuse_init_in", major=7, minor=38, max_readahead=128 << 10, flags=0)
    fuse(front, "INIT", {"init": init}, nodeid=0)
    e = fuse(front, "LOOKUP", {"name": b"big.bin"}).args["entry"]
    fh = fuse(front, "OPEN", {"open": F.make("fuse_open_in", flags=os.O_RDONLY)}, nodeid=e.nodeid).args["open"].fh
    ops: dict[str, Callable[[int], Any]] = {
        "GETATTR": lambda i: fuse(front, "GETATTR", {"getattr": F.make("fuse_getattr_in")}, nodeid=e.nodeid),
        "LOOKUP": lambda i: fuse(front, "LOOKUP", {"name": b"big.bin"}),
        "READ 128K": lambda i: fuse(front, "READ", {"read": F.make("fuse_read_in", fh=fh, offset=(i % 32) << 17,
                                                                   size=1 << 17)}, nodeid=e.nodeid,
                                          reply_size=16 + (1 << 17)),
    }
    out = {}
    for name, fn in ops.items():
        ts = []
        for i in range(n):
            t0 = time.perf_counter()
            fn(i)
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts) * 1e6
    return out


def measure_at(sock: Path, n: int) -> dict[str, float]:
    # INDIRECT descriptors as Linux sends them; no EVENT_IDX: a call for every reply
    front = Front(sock, Negotiation(features=F_VERSION_1 | F_INDIRECT_DESC | F_PROTOCOL), max_request=4096,
                  max_reply=1 << 17)
    try:
        return measure(front, n)
    finally:
        front.close()


def run(kind: str, share: Path, n: int, extra: list[str]) -> dict[str, float]:
    with launcher.short_tmpdir() as work:
        if kind.startswith("C virtiofsd"):
            with launcher.virtiofsd(share, work) as be:
                if "proxy" not in kind:
                    return measure_at(be.socket_path, n)
                listen = work / "p.sock"
                proxy = subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(listen),
                                          "--backend", str(be.socket_path), "--record", str(work / "rec.pcapng"),
                                          "--quiet", *extra],
                                         stdin=subprocess.DEVNULL, start_new_session=True)
                try:
                    while not listen.exists():
                        time.sleep(0.02)
                    return measure_at(listen, n)
                finally:
                    launcher.stop_process(proxy)
        sock = work / "d.sock"
        proc = subprocess.Popen([sys.executable, "-m", "fsinspect", "daemon", f"--socket-path={sock}", "-o",
                                 f"source={share}", "--log-level", "warning", *extra], start_new_session=True)
        try:
            while not sock.exists():
                time.sleep(0.02)
            return measure_at(sock, n)
        finally:
            launcher.stop_process(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="round trips per op (default 3000)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    ap.add_argument("--proxy", action="store_true",
                    help="compare the C virtiofsd direct with the same through `fsinspect proxy` (recording on)")
    args = ap.parse_args()
    kinds: dict[str, list[str]] = (
        {"C virtiofsd": [], "C virtiofsd + proxy": []} if args.proxy else
        {"C virtiofsd": [], "bundled (prefer)": [], "bundled (never)": ["--inode-file-handles=never"]})
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    with make_share() as share:
        (share.root / "big.bin").write_bytes(os.urandom(4 << 20))
        for _ in range(args.rounds):
            for kind, extra in kinds.items():
                results[kind].append(run(kind, share.root, args.n, extra))
    ops = list(results["C virtiofsd"][0])
    print(f"median round trip in µs ({args.n} sequential requests, best of {args.rounds} rounds)")
    print(f"{'back-end':<20}" + "".join(f"{o:>12}" for o in ops))
    for kind, runs in results.items():
        print(f"{kind:<20}" + "".join(f"{min(r[o] for r in runs):>12.1f}" for o in ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
