"""Decode throughput of the pure-Python FUSE codec on the guest workload's opcode mix.

"Decoded" = every field of request and reply materialised into records, exactly what
`fsinspect decode` prints from.  Mix and sizes from ../shared/guest-notes.md (one `full` run:
~24.5k requests).  Prints a table; median of 5 runs with min and max.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from dissectors import fuse as F

MIX = {"LOOKUP": 5600, "GETATTR": 4000, "FORGET": 4000, "FLUSH": 4000, "RELEASE": 2000, "UNLINK": 2000,
       "CREATE": 2000, "READ": 515, "WRITE": 195, "READDIRPLUS": 101}
READ_SIZE = 128 * 1024
WRITE_SIZE = 64 * 1024 * 1024 // 195


def build_corpus() -> list[tuple[bytes, bytes | None]]:
    attr = F.make("fuse_attr", ino=1234, size=4096, blocks=8, mode=0o100644, nlink=1, blksize=4096)
    entry = F.make("fuse_entry_out", nodeid=42, generation=1, entry_valid=1, attr_valid=1, attr=attr)
    out: list[tuple[bytes, bytes | None]] = []
    u = 0
    for op, n in MIX.items():
        for i in range(n):
            u += 1
            name = f"file-{i:05d}".encode()
            if op == "LOOKUP":
                rq = F.encode_request(op, {"name": name}, unique=u, nodeid=1)
                rp = F.encode_reply(op, {"entry": entry}, unique=u) if i % 3 else F.encode_reply(op, unique=u, error=2)
            elif op == "GETATTR":
                rq = F.encode_request(op, {"getattr": F.make("fuse_getattr_in")}, unique=u, nodeid=42)
                rp = F.encode_reply(op, {"attr_out": F.make("fuse_attr_out", attr_valid=1, attr=attr)}, unique=u)
            elif op == "FORGET":
                out.append((F.encode_request(op, {"forget": F.make("fuse_forget_in", nlookup=1)}, unique=u, nodeid=42),
                            None))
                continue
            elif op in ("FLUSH", "RELEASE"):
                key = "flush" if op == "FLUSH" else "release"
                rq = F.encode_request(op, {key: F.make(f"fuse_{key}_in", fh=7)}, unique=u, nodeid=42)
                rp = F.encode_reply(op, unique=u)
            elif op == "UNLINK":
                rq = F.encode_request(op, {"name": name}, unique=u, nodeid=1)
                rp = F.encode_reply(op, unique=u)
            elif op == "CREATE":
                rq = F.encode_request(op, {"create": F.make("fuse_create_in", flags=0o101, mode=0o100644), "name": name},
                                      unique=u, nodeid=1)
                rp = F.encode_reply(op, {"entry": entry, "open": F.make("fuse_open_out", fh=9)}, unique=u)
            elif op == "READ":
                rq = F.encode_request(op, {"read": F.make("fuse_read_in", fh=7, offset=i * READ_SIZE, size=READ_SIZE)},
                                      unique=u, nodeid=42)
                rp = F.encode_reply(op, {"data": bytes(READ_SIZE)}, unique=u)
            elif op == "WRITE":
                rq = F.encode_request(op, {"write": F.make("fuse_write_in", fh=7, size=WRITE_SIZE), "data": bytes(WRITE_SIZE)},
                                      unique=u, nodeid=42)
                rp = F.encode_reply(op, {"write_out": F.make("fuse_write_out", size=WRITE_SIZE)}, unique=u)
            else:  # READDIRPLUS: a 4 KiB page of entries
                rq = F.encode_request(op, {"read": F.make("fuse_read_in", fh=7, size=4096)}, unique=u, nodeid=1)
                ents = [(F.make("fuse_direntplus", entry_out=entry), f"f{j}".encode()) for j in range(24)]
                rp = F.encode_reply(op, {"entries": ents}, unique=u)
            out.append((rq, rp))
    return out


def run_once(corpus: list[tuple[bytes, bytes | None]]) -> float:
    dreq, drep = F.decode_request, F.decode_reply
    t0 = time.perf_counter()
    for rq, rp in corpus:
        r = dreq(rq)
        if rp is not None:
            drep(rp, r)
    return len(corpus) / (time.perf_counter() - t0)


def run_header_only(corpus: list[tuple[bytes, bytes | None]]) -> float:
    peek = F.peek_header
    t0 = time.perf_counter()
    for rq, _rp in corpus:
        peek(rq)
    return len(corpus) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    corpus = build_corpus()
    full = [run_once(corpus) for _ in range(args.runs)]
    lazy = [run_header_only(corpus) for _ in range(args.runs)]
    print(f"corpus: {len(corpus)} exchanges ({sum(1 for _, r in corpus if r)} paired, "
          f"{sum(1 for _, r in corpus if r is None)} FORGET), {args.runs} runs")
    print(f"{'pass':<36} {'median/s':>12} {'min/s':>12} {'max/s':>12}")
    print(f"{'full decode (request + reply)':<36} {statistics.median(full):>12,.0f} {min(full):>12,.0f} {max(full):>12,.0f}")
    print(f"{'header peek only (not a decode)':<36} {statistics.median(lazy):>12,.0f} {min(lazy):>12,.0f} {max(lazy):>12,.0f}")
    print(f"goal >= 300,000 paired messages/s: {'met' if statistics.median(full) >= 300_000 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
