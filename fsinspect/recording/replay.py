"""Feed a recording into an Analyzer: the offline source of the analysis layer."""

from __future__ import annotations

from collections.abc import Iterable

from ..analysis import Analyzer, Exchange
from . import format as fmt
from .reader import Record, RecordingReader


def feed_record(analyzer: Analyzer, rec: Record) -> Exchange | None:
    """Feed one FUSE record (a vhost-user control record is skipped: None); returns its exchange."""
    if not rec.is_fuse:
        return None
    if rec.inbound:  # a request the debugger held stays held until its reply (what the UI showed live)
        return analyzer.feed_request(rec.data, rec.queue, rec.head, rec.ts_ns, epoch=rec.epoch,
                                     orig_len=rec.orig_len, notes=rec.notes, ref=rec.offset,
                                     held=bool(rec.flags & fmt.RF_HELD))
    return analyzer.feed_reply(rec.data, rec.queue, rec.head, rec.ts_ns, epoch=rec.epoch,
                               orig_len=rec.orig_len, notes=rec.notes, ref=rec.offset)


def feed_records(analyzer: Analyzer, records: Iterable[Record]) -> None:
    """Feed FUSE records in file order (vhost-user control records are skipped)."""
    for rec in records:
        feed_record(analyzer, rec)


def prime_from_header(analyzer: Analyzer, reader: RecordingReader) -> None:
    """A rotated part starts mid-session: adopt the INIT its section header carries (checked by the reader)."""
    init = reader.section.init
    if init is not None and init[1]:
        analyzer.prime_init(*init)


def analyze(reader: RecordingReader, analyzer: Analyzer | None = None) -> Analyzer:
    """Run a whole recording through an Analyzer and finish it."""
    an = analyzer if analyzer is not None else Analyzer()
    prime_from_header(an, reader)
    feed_records(an, reader.records())
    an.finish()
    return an
