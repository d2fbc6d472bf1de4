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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
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
    ok = statistics.median(writes) >= 200_000
    print(f"goal: writer >= 200,000 records/s: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
