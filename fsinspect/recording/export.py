"""Export chosen exchanges as an fsinspect pcapng recording (Wireshark's "Export Specified Packets").

The new file is written by the recording writer, so it reads back in `fsinspect replay` and opens in
Wireshark/tshark like any recording.  Besides the chosen requests and replies it carries what makes it
self-describing: the section header's metadata (source, back-end, snap length, the INIT that sets the
protocol minor), every vhost-user control message (features, memory table, vrings) and each INIT exchange.
Records keep their timestamps, original lengths, flags, descriptor layouts and comments.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dissectors.spec import fuse as fspec

from .. import privfile
from ..analysis import Analyzer, Exchange
from . import format as fmt
from .parts import INDEX_SUFFIX, side_file
from .reader import Record, RecordingReader
from .replay import feed_records, prime_from_header
from .writer import RecordingWriter

_OP_INIT = fspec.OPCODE_BY_NAME["INIT"].value
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass
class Exported:
    path: Path
    records: int  # records written
    chosen: int  # of which chosen (the rest: control plane and INIT)


def _key(rec: Record) -> tuple[int, int]:
    """A request's pairing key: its descriptor head, or its unique where there is none (fusedev)."""
    if rec.head is not None:
        return rec.queue, rec.head
    return rec.queue, _U64.unpack_from(rec.data, 8)[0] if len(rec.data) >= 16 else 0


class _Context:
    """Tells the records every export keeps, chosen or not: the control plane and each INIT exchange."""

    def __init__(self) -> None:
        self._inits: set[tuple[int, int]] = set()

    def __call__(self, rec: Record) -> bool:
        if not rec.is_fuse:
            return True
        if rec.inbound and len(rec.data) >= 8 and _U32.unpack_from(rec.data, 4)[0] == _OP_INIT:
            self._inits.add(_key(rec))
            return True
        if not rec.inbound and self._inits and _key(rec) in self._inits:
            self._inits.discard(_key(rec))
            return True
        return False


def section_meta(reader: RecordingReader) -> dict[str, Any]:
    """What write_pcapng needs from the source's header (source, backend, snaplen, init, comments)."""
    meta = dict(reader.section.meta)
    meta["comments"] = list(reader.section.comments)
    return meta


def recording_records(src: str | os.PathLike[str],
                      offsets: Collection[int]) -> tuple[dict[str, Any], Iterator[tuple[Record, bool]]]:
    """(the source's section metadata, its records to export, each with "was it chosen"): those at
    `offsets` (EPB offsets, the analyzer's req_ref/reply_ref) and the self-describing ones, in file order."""
    reader = RecordingReader(src)
    meta = section_meta(reader)

    def records() -> Iterator[tuple[Record, bool]]:
        context = _Context()
        with reader:
            for rec in reader.records():
                chosen = rec.offset in offsets
                if context(rec) or chosen:
                    yield rec, chosen

    return meta, records()


WINDOW_BYTES = 32 << 20  # records held back for their exchange's verdict, at most (see filtered_records)
_REC_OVERHEAD = 200  # bytes a held Record costs besides its data


def analysed(reader: RecordingReader, analyzer: Analyzer, on_exchange: Callable[[Exchange], None], *,
             on_record: Callable[[Record], None] | None = None) -> Iterator[Record]:
    """Feed every record of `reader` to `analyzer` (which forgets exchanges), yielding each after it was
    fed; `on_record` sees each before, `on_exchange` hears of each finished exchange (the last ones
    after the final record)."""
    prime_from_header(analyzer, reader)
    analyzer.listeners.append(on_exchange)
    for rec in reader.records():
        if on_record is not None:
            on_record(rec)
        feed_records(analyzer, (rec,))
        yield rec
    analyzer.finish()


def filtered_records(reader: RecordingReader, pred: Callable[[Exchange], bool], *,
                     window_bytes: int = WINDOW_BYTES,
                     on_record: Callable[[Record], None] | None = None) -> Iterator[tuple[Record, bool]]:
    """The records of the exchanges `pred` keeps (chosen) and the self-describing ones, in one pass and in
    bounded memory.

    A request's fate is known only when its reply comes, so records wait in file order until their
    exchange finishes.  A request still unanswered when `window_bytes` of records wait behind it is set
    aside alone and written when its reply comes (out of file order): memory stays within the window plus
    the requests in flight.
    """
    verdict: dict[int, bool] = {}  # record offset -> did its exchange match
    aside: dict[int, Record] = {}  # requests pushed out of the window, waiting for their verdict
    late: list[Record] = []
    waiting: deque[tuple[Record, bool]] = deque()  # (record, is context)
    held = 0
    final = False
    context = _Context()

    def done(ex: Exchange) -> None:
        m = bool(pred(ex))
        for ref in (ex.req_ref, ex.reply_ref):
            if isinstance(ref, int):
                rec = aside.pop(ref, None)
                if rec is None:
                    verdict[ref] = m
                elif m:
                    late.append(rec)

    def drain() -> Iterator[tuple[Record, bool]]:
        nonlocal held
        while late:
            yield late.pop(), True
        while waiting:
            rec, ctx = waiting[0]
            m = verdict.pop(rec.offset, None) if rec.is_fuse else False
            if m is None:
                if held <= window_bytes and not final:
                    return
                if ctx:  # an INIT never goes missing from the export, whatever its fate
                    yield rec, False
                else:
                    aside[rec.offset] = rec
            elif m or ctx:
                yield rec, m
            waiting.popleft()
            held -= len(rec.data) + _REC_OVERHEAD

    for rec in analysed(reader, Analyzer(keep_exchanges=False), done, on_record=on_record):
        waiting.append((rec, context(rec)))
        held += len(rec.data) + _REC_OVERHEAD
        yield from drain()
    final = True  # the end: every verdict is in; what has none is not chosen
    yield from drain()
    yield from ((rec, True) for rec in late)


def write_pcapng(dest: str | os.PathLike[str], records: Iterable[tuple[Record, bool]], *, meta: dict[str, Any],
                 comments: Iterable[str] = (), mode: int = privfile.DEFAULT_MODE) -> Exported:
    """Write `records` (each with "did the user choose it", to count them apart from the context) to `dest`,
    replaced whole when done, never seen half written.

    `meta` is the source's section metadata (source, backend, snaplen, init, comments).
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    idx = side_file(tmp, INDEX_SUFFIX)
    snaplen = meta.get("snaplen")
    w = RecordingWriter(tmp, source=str(meta.get("source") or "virtio"), backend=str(meta.get("backend") or ""),
                        comments=[*meta.get("comments", ()), *comments],
                        snaplen=snaplen if isinstance(snaplen, int) and snaplen >= 0 else fmt.DEFAULT_SNAPLEN,
                        init=meta.get("init") if isinstance(meta.get("init"), dict) else None, mode=mode)
    n = picked = 0
    try:
        with w:
            for rec, chosen in records:
                notes = rec.notes
                if rec.flags & fmt.RF_DEBUGGER:  # the writer adds the debugger's comment from the flags
                    notes = [x for x in notes if x != fmt.debugger_comment(rec.flags)]
                if not rec.is_fuse:
                    w.control(rec.data, from_frontend=rec.inbound, ts_ns=rec.ts_ns, notes=notes)
                else:
                    put = w.request if rec.inbound else w.reply
                    put(rec.data, rec.queue, rec.head, rec.ts_ns, epoch=rec.epoch, layout=rec.layout or (),
                        flags=rec.flags, notes=notes, orig_len=rec.orig_len)
                n += 1
                picked += chosen
        os.replace(tmp, dest)
        if idx.exists():  # the index the writer kept goes with it (it is trusted by content, not by name)
            os.replace(idx, side_file(dest, INDEX_SUFFIX))
    except BaseException:
        tmp.unlink(missing_ok=True)
        idx.unlink(missing_ok=True)
        raise
    return Exported(dest, n, picked)


def export_recording(src: str | os.PathLike[str], dest: str | os.PathLike[str], offsets: Collection[int], *,
                     comment: str = "", mode: int = privfile.DEFAULT_MODE) -> Exported:
    """Export the records at `offsets` of recording `src` (with its self-describing context) to `dest`."""
    if Path(dest).exists() and Path(dest).resolve() == Path(src).resolve():
        raise ValueError(f"{dest} is the recording being read; pick another file")
    meta, records = recording_records(src, offsets)
    return write_pcapng(dest, records, meta=meta, comments=[comment] if comment else (), mode=mode)
