"""`fsinspect export FILE [--filter EXPR] --format text|json|jsonl|pcapng|parquet [-o OUT]`.

One pass over the recording in bounded memory whatever its size: exchanges are analysed as the records
come and written as they finish (in exchange order, see `InOrder`), never all kept.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

from .. import privfile
from ..analysis import Analyzer, Exchange, FilterError, compile_filter
from ..analysis.render import exchange_json, exchange_line
from ..errors import UserError
from ..recording.export import analysed, filtered_records, section_meta, write_pcapng
from ..recording.reader import Record, RecordingError, RecordingReader
from ._recording import RECORDING_HELP, open_recording

FILE_FORMATS = ("pcapng", "parquet")
T = TypeVar("T")
REORDER_MAX = 100_000  # finished exchanges held for exchange order behind one still unanswered, at most


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="export a recording's exchanges: text, JSON, JSON lines, pcapng or Parquet",
                       description="Pair a recording's requests and replies into exchanges and write the ones the "
                                   "filter keeps. JSONL: one exchange per line with opcode, unique, nodeid, queue, "
                                   "request, reply, error (errno name) and latency_ns. pcapng: their requests and "
                                   "replies plus the control plane and INIT (opens in Wireshark and replays). "
                                   "Parquet: one row per exchange with typed columns, for DuckDB, Polars, Spark.")
    p.add_argument("file", metavar="FILE", help=RECORDING_HELP)
    p.add_argument("--format", choices=("text", "json", "jsonl", *FILE_FORMATS), default="text")
    p.add_argument("--filter", metavar="EXPR", help='e.g. \'op == LOOKUP and error == ENOENT\', \'latency > 1ms\'')
    p.add_argument("-o", "--output", metavar="OUT", help="write to OUT (needed for pcapng and parquet; "
                                                         "default for the others: standard output)")
    privfile.add_mode_option(p)
    p.set_defaults(func=run)


class Progress:
    """A one-line progress bar on stderr (a TTY only), by the recording's bytes read."""

    def __init__(self, total: int, out: IO[str]) -> None:
        self.total = max(1, total)
        self.out = out
        self.count = 0
        self._last = 0.0

    def __call__(self, rec: Record) -> None:
        self.count += 1
        if self.count & 1023:
            return
        now = time.monotonic()
        if now - self._last >= 0.2:
            self._last = now
            done = min(1.0, rec.offset / self.total)
            bar = "#" * int(done * 30)
            self.out.write(f"\rexport [{bar:<30}] {done:4.0%}  {self.count:,} records")
            self.out.flush()

    def close(self) -> None:
        self.out.write("\r" + " " * 70 + "\r")
        self.out.flush()


class InOrder(Generic[T]):
    """Emits what is added for finished exchanges in exchange order (None: nothing to emit, the number
    is done); past `cap` held behind a missing one (a request never answered), the oldest held goes out
    of order rather than memory growing."""

    def __init__(self, emit: Callable[[T], None], cap: int = REORDER_MAX) -> None:
        self.emit = emit
        self.cap = cap
        self._heap: list[tuple[int, int, T | None]] = []
        self._next = 0

    def add(self, index: int, item: T | None) -> None:
        heapq.heappush(self._heap, (index, 0, item))
        h = self._heap
        while h and (h[0][0] <= self._next or len(h) > self.cap):
            index, _, x = heapq.heappop(h)
            self._next = max(self._next, index + 1)
            if x is not None:
                self.emit(x)

    def close(self) -> None:
        while self._heap:
            x = heapq.heappop(self._heap)[2]
            if x is not None:
                self.emit(x)


def run(args: argparse.Namespace) -> int:
    pred: Callable[[Exchange], bool] = lambda ex: True  # noqa: E731
    if args.filter is not None:
        try:
            pred = compile_filter(args.filter)
        except FilterError as e:
            raise UserError(f"--filter: {e}") from None
    if args.format in FILE_FORMATS and not args.output:
        raise UserError(f"--format {args.format} writes a file: give -o OUT")
    r = open_recording(args.file)
    if args.output and any(p.resolve() == Path(args.output).resolve() for p in r.parts):
        r.close()
        raise UserError(f"-o {args.output} is the recording being read; pick another file")
    progress = Progress(r.size, sys.stderr) if sys.stderr.isatty() else None
    try:
        if args.format == "pcapng":
            _pcapng(args, r, pred, progress)
        elif args.format == "parquet":
            _parquet(args, r, pred, progress)
        elif args.output:
            with os.fdopen(privfile.create(args.output, args.record_mode), "w") as out:
                _lines(args, r, pred, progress, out)
        else:
            _lines(args, r, pred, progress, sys.stdout)
    except RecordingError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"{e.filename or args.output}: {e.strerror or e}") from None
    finally:
        r.close()
        if progress is not None:
            progress.close()
    if r.truncated:
        print(f"fsinspect export: warning: {args.file}: {r.truncated}; read up to there", file=sys.stderr)
    return 0


def _pcapng(args: argparse.Namespace, r: RecordingReader, pred: Callable[[Exchange], bool],
            progress: Progress | None) -> None:
    note = f"fsinspect export --filter {args.filter!r}" if args.filter else "fsinspect export"
    done = write_pcapng(args.output, filtered_records(r, pred, on_record=progress), meta=section_meta(r),
                        comments=[note], mode=args.record_mode)
    print(f"{done.path}: {done.chosen} records of the matching exchanges, {done.records - done.chosen} of "
          "control plane and INIT", file=sys.stderr)


def _parquet(args: argparse.Namespace, r: RecordingReader, pred: Callable[[Exchange], bool],
             progress: Progress | None) -> None:
    from ..recording.parquet import ParquetSink, ParquetUnavailable

    try:
        sink = ParquetSink(args.output, mode=args.record_mode)
    except ParquetUnavailable as e:
        raise UserError(str(e)) from None
    flags: dict[int, int] = {}  # record offset -> its flags (held, injected, ...), until its exchange ends

    def on_record(rec: Record) -> None:
        if rec.flags:
            flags[rec.offset] = rec.flags
        if progress is not None:
            progress(rec)

    def on_exchange(ex: Exchange) -> None:
        f = flags.pop(ex.req_ref, 0) | flags.pop(ex.reply_ref, 0) if flags else 0
        order.add(ex.index, (ex, f) if pred(ex) else None)

    order: InOrder[tuple[Exchange, int]] = InOrder(lambda item: sink.add(*item))
    try:
        for _ in analysed(r, Analyzer(keep_exchanges=False), on_exchange, on_record=on_record):
            pass
        order.close()
        sink.close()
    except BaseException:
        sink.abort()
        raise
    print(f"{args.output}: {sink.rows} exchanges", file=sys.stderr)


def _lines(args: argparse.Namespace, r: RecordingReader, pred: Callable[[Exchange], bool],
           progress: Progress | None, out: IO[str]) -> None:
    linted: set[int] = set()
    first = [True]
    t0: list[int] = []  # the first FUSE record's time: what relative times count from

    def on_record(rec: Record) -> None:
        if not t0 and rec.is_fuse:
            t0.append(rec.ts_ns)
        if progress is not None:
            progress(rec)

    def emit(ex: Exchange) -> None:
        if ex.lints:
            linted.add(ex.index)
        if args.format == "jsonl":
            out.write(json.dumps(exchange_json(ex, now_ns=an.last_ts)) + "\n")
        elif args.format == "json":
            out.write(("[\n" if first[0] else ",\n") + json.dumps(exchange_json(ex, now_ns=an.last_ts), indent=1))
        else:
            out.write(exchange_line(ex, t0[0] if t0 else 0) + "\n")
        first[0] = False

    order: InOrder[Exchange] = InOrder(emit)
    an = Analyzer(keep_exchanges=False)
    for _ in analysed(r, an, lambda ex: order.add(ex.index, ex if pred(ex) else None), on_record=on_record):
        pass
    order.close()
    if args.format == "json":
        out.write("[]\n" if first[0] else "\n]\n")
    elif args.format == "text":
        lints = [lint for lint in an.lints if lint.exchange in linted]
        if lints:
            out.write(f"\n{len(lints)} lint(s):\n")
            for lint in lints:
                out.write(f"  #{lint.exchange} {lint.name}: {lint.message}\n")
