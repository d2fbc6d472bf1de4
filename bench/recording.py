"""Recording throughput: the pcapng writer (records/s), plus reading back and building the side index.

Corpus: the guest workload's opcode mix from bench/decode.py (~24.5k exchanges, ~45k records; READ/WRITE
payloads cut to the default snap length, as a live capture does).  Each run writes a fresh file into a
temporary directory on disk.  Prints a table: median of 5 runs with min and max.  Goal: >= 200k records/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import build_corpus

from fsinspect.recording.index import RecordingIndex
from fsinspect.recording.reader import RecordingReader
from fsinspect.recording.writer import RecordingWriter

Corpus = list[tuple[bytes, bytes | None]]


def write_once(corpus: Corpus, path: Path) -> float:
    n = 0
    t0 = time.perf_counter()
    w = RecordingWriter(path, source="virtio")
    req, rep = w.request, w.reply
    ts = 1_700_000_000_000_000_000
    for i, (rq, rp) in enumerate(corpus):
        head = i & 127
        if rp is None:
            req(rq, 0, head, ts)
            n += 1
        else:
            req(rq, 1, head, ts)
            rep(rp, 1, head, ts + 40_000)
            n += 2
        ts += 50_000
    w.close()
    return n / (time.perf_counter() - t0)


def read_once(path: Path) -> float:
    t0 = time.perf_counter()
    with RecordingReader(path) as r:
        n = sum(1 for _ in r)
    return n / (time.perf_counter() - t0)


def index_once(path: Path) -> float:
    t0 = time.perf_counter()
    idx = RecordingIndex(path, rebuild=True)
    n = len(idx)
    idx.close()
    return n / (time.perf_counter() - t0)


def big_file(d: Path, exchanges: int) -> None:
    """A file with `exchanges` LOOKUP exchanges: side-index build time, then random access by number."""
    import random

    from dissectors import fuse as F

    path = d / "big.pcapng"
    reqs = [F.encode_request("LOOKUP", {"name": b"f%06d" % i}, unique=2 * i + 2, nodeid=1) for i in range(1000)]
    t0 = time.perf_counter()
    with RecordingWriter(path, source="virtio") as w:
        for i in range(exchanges):
            u = 2 * i + 2
            rq = reqs[i % 1000]
            rq = rq[:8] + u.to_bytes(8, "little") + rq[16:]
            w.request(rq, 1, i & 127, 1_000_000 * i)
            w.reply(F.encode_reply("LOOKUP", error=2, unique=u), 1, i & 127, 1_000_000 * i + 5000)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx = RecordingIndex(path)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx2 = RecordingIndex(path)
    t_open = time.perf_counter() - t0
    picks = random.Random(1).sample(range(len(idx2)), 1000)
    with RecordingReader(path) as r:
        t0 = time.perf_counter()
        for i in picks:
            req_off, rep_off = idx2.offsets(i)
            assert req_off is not None and rep_off is not None
            r.record_at(req_off)
            r.record_at(rep_off)
        t_access = (time.perf_counter() - t0) / len(picks)
    idx.close()
    idx2.close()
    print(f"{exchanges:,}-exchange file ({path.stat().st_size / 1e6:.0f} MB): written in {t_write:.1f} s, "
          f"side index built in {t_build:.1f} s, reopened in {t_open * 1000:.1f} ms, "
          f"random exchange read {t_access * 1e6:.0f} µs")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--big", type=int, default=0, metavar="N",
                    help="also time the side index on an N-exchange file (e.g. 1000000)")
    args = ap.parse_args()
    corpus = build_corpus()
    records = sum(2 if rp is not None else 1 for _, rp in corpus)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "bench.pcapng"
        writes = [write_once(corpus, path) for _ in range(args.runs)]
        size = path.stat().st_size
        reads = [read_once(path) for _ in range(args.runs)]
        builds = [index_once(path) for _ in range(args.runs)]
    print(f"corpus: {len(corpus)} exchanges, {records} records, file {size / 1e6:.1f} MB; {args.runs} runs")
    print(f"{'pass':<40} {'median/s':>12} {'min/s':>12} {'max/s':>12}")
    for label, xs in (("writer (records)", writes), ("reader (records)", reads),
                      ("side index rebuild (exchanges)", builds)):
        print(f"{label:<40} {statistics.median(xs):>12,.0f} {min(xs):>12,.0f} {max(xs):>12,.0f}")
    if args.big:
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            big_file(Path(d), args.big)
    ok = statistics.median(writes) >= 200_000
    print(f"goal: writer >= 200,000 records/s: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
