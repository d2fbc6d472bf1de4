"""Per-request round trip over vhost-user, without a guest: the bundled daemon against the C virtiofsd.

A guest under TCG on a shared 2-core machine makes the `full` workload's step times noisy (bench/
daemon_vs_virtiofsd.py); this drives each back-end's socket directly as the front-end (memfd guest
memory, the driver side of the rings, INDIRECT descriptors as Linux sends them) and times sequential
round trips: kick -> back-end -> call.  The difference is the back-end's own cost per request.

    sudo .venv/bin/python bench/vhost_roundtrip.py [--n 3000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import mmap
import os
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dissectors import fuse as F
from dissectors import vhost_user as V
from dissectors.ring.driver import F_INDIRECT, F_WRITE, GuestRing, pack_descs
from dissectors.spec import virtio as vio
from fsinspect.guest import launcher
from fsinspect.guest.share import make_share
from fsinspect.proxy.wire import recv_message, send_message

GPA, UVA, SIZE, NUM = 0x0, 0x7F00_0000_0000, 8 << 20, 64
BUFS = 0x100000


class Front:
    """Just enough of a front-end: setup, then one request at a time on queue 1."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.memfd = os.memfd_create("bench-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, SIZE)
        self.mem = mmap.mmap(self.memfd, SIZE)
        self.unique = 0
        self.rings: dict[int, GuestRing] = {}
        self.kick: dict[int, int] = {}
        self.call: dict[int, int] = {}
        self._setup()

    def view(self, gpa: int, n: int) -> memoryview:
        return memoryview(self.mem)[gpa - GPA:gpa - GPA + n]

    def _send(self, name: str, payload: Any = None, fds: list[int] | None = None, ack: bool = False) -> None:
        msg = V.build(name, payload, fds=fds)
        if ack:
            msg.flags |= 0x8
        send_message(self.sock, V.encode_message(msg), fds)
        if ack:
            recv_message(self.sock)

    def _ask(self, name: str) -> int:
        self._send(name)
        raw, _ = recv_message(self.sock)
        return int(V.decode_message(raw).payload.u64)

    def _setup(self) -> None:
        feats = self._ask("GET_FEATURES")
        proto = self._ask("GET_PROTOCOL_FEATURES")
        self._send("SET_PROTOCOL_FEATURES", V.u64(proto & 0x8009))  # MQ, REPLY_ACK, CONFIGURE_MEM_SLOTS
        self._send("SET_OWNER")
        self._send("SET_FEATURES", V.u64(feats & ((1 << 32) | (1 << 28) | (1 << 30))))
        region = V.make("vhost_user_memory_region", guest_address=GPA, size=SIZE, user_address=UVA, mmap_offset=0)
        fd = os.open(f"/proc/self/fd/{self.memfd}", os.O_RDWR)
        if proto & (1 << 15):  # CONFIGURE_MEM_SLOTS (a proxy in front masks it: then one SET_MEM_TABLE)
            self._send("ADD_MEM_REG", V.make("vhost_user_mem_reg", region=region), [fd], ack=True)
        else:
            self._send("SET_MEM_TABLE", [region], [fd], ack=bool(proto & (1 << 3)))
        os.close(fd)
        lay = vio.split_ring_layout(NUM)
        for q in (0, 1):
            base = 0x10000 * (q + 1)
            desc, avail, used = base, base + 0x1000, base + 0x2000
            self.rings[q] = GuestRing(NUM, self.view(desc, lay.desc_size), self.view(avail, lay.avail_size),
                                      self.view(used, lay.used_size))
            self._send("SET_VRING_NUM", V.make("vhost_vring_state", index=q, num=NUM))
            self._send("SET_VRING_BASE", V.make("vhost_vring_state", index=q, num=0))
            self._send("SET_VRING_ADDR", V.make("vhost_vring_addr", index=q, descriptor=UVA + desc, used=UVA + used,
                                                available=UVA + avail))
            self.kick[q] = os.eventfd(0, os.EFD_CLOEXEC)
            self.call[q] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._send("SET_VRING_CALL", V.u64(q), [self.call[q]])
            self._send("SET_VRING_KICK", V.u64(q), [self.kick[q]])
            self._send("SET_VRING_ENABLE", V.make("vhost_vring_state", index=q, num=1))

    def fuse(self, op: str, args: dict[str, Any] | None = None, nodeid: int = 1, reply_size: int = 4096) -> F.Reply:
        self.unique += 1
        raw = F.encode_request(op, args, unique=self.unique, nodeid=nodeid)
        req, out, table = BUFS, BUFS + 0x10000, BUFS + 0x8000
        self.view(req, len(raw))[:] = raw
        self.view(table, 32)[:] = pack_descs([(req, len(raw), 1, 1), (out, reply_size, F_WRITE, 0)])
        ring = self.rings[1]
        head = ring.avail_idx % NUM
        ring.set_desc(head, table, 32, F_INDIRECT)
        ring.publish([head])
        os.eventfd_write(self.kick[1], 1)
        used: list[tuple[int, int]] = []
        while not used:
            if not select.select([self.call[1]], [], [], 5)[0]:
                raise SystemExit(f"no reply to {op} within 5 s")
            os.eventfd_read(self.call[1])
            used = ring.collect_used()
        rep = F.decode_reply(bytes(self.view(out, used[0][1])), F.decode_request(raw))
        assert isinstance(rep, F.Reply) and rep.error == 0, rep
        return rep

    def close(self) -> None:
        self.sock.close()
        self.rings.clear()
        for fd in [self.memfd, *self.kick.values(), *self.call.values()]:
            os.close(fd)


def measure(front: Front, n: int) -> dict[str, float]:
    init = F.make("fuse_init_in", major=7, minor=38, max_readahead=128 << 10, flags=0)
    front.fuse("INIT", {"init": init}, nodeid=0)
    e = front.fuse("LOOKUP", {"name": b"big.bin"}).args["entry"]
    fh = front.fuse("OPEN", {"open": F.make("fuse_open_in", flags=os.O_RDONLY)}, nodeid=e.nodeid).args["open"].fh
    ops: dict[str, Callable[[int], Any]] = {
        "GETATTR": lambda i: front.fuse("GETATTR", {"getattr": F.make("fuse_getattr_in")}, nodeid=e.nodeid),
        "LOOKUP": lambda i: front.fuse("LOOKUP", {"name": b"big.bin"}),
        "READ 128K": lambda i: front.fuse("READ", {"read": F.make("fuse_read_in", fh=fh, offset=(i % 32) << 17,
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
    front = Front(sock)
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
