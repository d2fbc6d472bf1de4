"""Headless clients of a control socket: finished exchanges as text, JSON lines or pcapng, as they come.

The model is `mitmdump` and `tshark -i`: stream until the source ends or the user stops it.  A sink gets
each finished exchange that passes the filter and is flushed after every batch, so a pipe (`| tshark -r -`)
or an extcap FIFO is never more than one batch behind.  pcapng goes through the recording writer, so its
blocks are a recording's blocks and fuse.lua decodes them.

pcapng without a filter from a hub that streams pcapng is a near-copy: once the binary stream starts, its
section header, interfaces and packet blocks are written as they came (the custom blocks, which carry the
protocol's other messages, are left out), and nothing is decoded.  What came before the switch (the
snapshot's backlog, requests then in flight) is written first by the recording writer, as its own section.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, TYPE_CHECKING, Any, Protocol

from ..analysis import Analyzer, Exchange
from ..analysis.render import exchange_json, exchange_line
from ..recording import format as rfmt
from ..recording.reader import Record
from ..recording.scan import Row
from ..recording.writer import RecordingWriter
from .feed import ControlFeed, LiveState, layout_list

if TYPE_CHECKING:
    from ..analysis.filter import Predicate

FORMATS = ("text", "jsonl", "pcapng")


class Sink(Protocol):
    def write(self, ex: Exchange) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TextSink:
    """One line per exchange (analysis.render.exchange_line), times relative to the first record."""

    def __init__(self, out: IO[bytes], state: LiveState, jsonl: bool = False) -> None:
        self.out = out
        self.state = state
        self.jsonl = jsonl

    def write(self, ex: Exchange) -> None:
        if not self.jsonl:
            line = exchange_line(ex, self.state.first_ts)
        elif ex.replied:
            line = json.dumps(exchange_json(ex))
        else:  # a request still waiting (held, or at the end): its age on the source's clock
            now, mono = self.state.source_now()
            line = json.dumps(exchange_json(ex, now_ns=now, mono_ns=mono))
        self.out.write(line.encode("utf-8", "surrogateescape") + b"\n")

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        self.out.flush()


class PcapngSink:
    """Request and reply blocks of each exchange, written when it finishes (so across exchanges the blocks
    are in completion order, as a capture of replies would be)."""

    def __init__(self, writer: RecordingWriter) -> None:
        self.writer = writer

    def write(self, ex: Exchange) -> None:
        w = self.writer
        if ex.req_raw is not None:
            w.request(ex.req_raw, ex.queue, ex.head, ex.req_ts or 0, epoch=ex.epoch, orig_len=ex.req_len,
                      notes=ex.notes, layout=layout_list(ex.req_layout) or ())
        if ex.reply_raw is not None:
            w.reply(ex.reply_raw, ex.queue, ex.head, ex.reply_ts or 0, epoch=ex.epoch, orig_len=ex.reply_len,
                    layout=layout_list(ex.reply_layout) or ())

    def copy(self, blocks: bytes, packets: list[tuple[int, bool, int, int | None, int, bytes]]) -> None:
        """Blocks of the binary stream, as they came (after what the writer holds); `packets` index them."""
        self.writer.append_blocks(blocks, packets)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_sink(fmt: str, dest: str | None, state: LiveState, *, mode: int = 0o600, stream: int | None = None) -> Sink:
    """A sink writing `fmt` to `dest` (created with `mode`) or to the fd `stream` (stdout when both are None)."""
    if dest is None and stream is None:
        stream = 1
    if fmt == "pcapng":
        return PcapngSink(RecordingWriter(dest or "-", stream=stream, mode=mode, flush_interval=0.05,
                                          comments=["live from an fsinspect control socket"]))
    if fmt not in ("text", "jsonl"):
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if stream is not None:
        out = os.fdopen(os.dup(stream), "wb")
    else:
        from .. import privfile

        assert dest is not None
        out = os.fdopen(privfile.create(dest, mode), "wb")
    return TextSink(out, state, jsonl=fmt == "jsonl")


class HeadlessFeed(ControlFeed):
    """A control socket's finished exchanges, filtered, into a sink; nothing is kept once written."""

    keep_raw_bytes = False

    def __init__(self, ctrl_path: str, *, predicate: Predicate | None = None,
                 connect_timeout: float = 5.0) -> None:
        state = LiveState(analyzer=Analyzer(keep_exchanges=False, keep_raw=True))
        super().__init__(state, ctrl_path, connect_timeout=connect_timeout)
        self.predicate = predicate
        self.sink: Sink | None = None
        self.written = 0
        self.seen = 0
        self.reported_overflow = 0
        self.pending_at_end = 0
        self._finished: list[Exchange] = []
        state.analyzer.listeners.append(self._finished.append)
        # Held by the source's debugger: written when it is held (state held), then again when it completes.
        self._held: list[Exchange] = []
        self._held_shown: dict[int, str] = {}  # n -> the side it was written held on
        state.analyzer.pending_listeners.append(self._pending)
        self.copying = False  # the near-copy of the binary stream (pcapng, no filter)
        self._copied_requests: set[int] = set()  # requests in flight at the switch, written already

    def switched(self) -> None:
        """pcapng without a filter: from here on the stream's own blocks are the output."""
        if not isinstance(self.sink, PcapngSink) or self.predicate is not None or self.reader is None:
            return
        self.batch_done()  # what finished before the switch, written by the writer
        still = sorted(self.state.open.values(), key=lambda ex: ex.n)
        for ex in still:  # in flight: the request now (its reply block follows), once
            if ex.req_raw is not None:
                self.sink.writer.request(ex.req_raw, ex.queue, ex.head, ex.req_ts or 0, epoch=ex.epoch,
                                         orig_len=ex.req_len, notes=ex.notes, layout=layout_list(ex.req_layout) or ())
                self._copied_requests.add(ex.n)
        self.seen += len(still)
        self.written += len(still)
        self.state.open.clear()
        self.sink.flush()
        self.reader.copy = []
        self.copying = True

    def feed_blocks(self, chunk: bytes) -> None:
        if not self.copying:
            super().feed_blocks(chunk)
            return
        assert self.reader is not None and self.reader.copy is not None and isinstance(self.sink, PcapngSink)
        items = self.reader.feed(chunk)
        recs = iter([x for x in items if not isinstance(x, dict)])  # (Records, and Rows of the scanner)
        out = []
        packets = []  # (offset in the output, inbound, queue, head, epoch, PDU) of the FUSE ones: the side index
        pos = 0
        for btype, blk in self.reader.copy:
            if btype == rfmt.BT_EPB:
                rec: Record | Row = next(recs)
                if rec.inbound:
                    if rec.n in self._copied_requests:  # the hub sent it again with its reply
                        self._copied_requests.discard(rec.n)
                        continue
                    self.seen += 1
                    self.written += 1
                if isinstance(rec, Row) or rec.is_fuse:
                    packets.append((pos, rec.inbound, rec.queue, rec.head, rec.epoch, rec.data))
            out.append(blk)
            pos += len(blk)
        self.reader.copy.clear()
        if out:
            self.sink.copy(b"".join(out), packets)
        msgs: list[dict[str, Any] | Record] = [x for x in items if isinstance(x, dict)]
        if msgs:  # overflow, events, errors: counted and said as before
            self.apply_batch(msgs)
        if self.reader.failed is not None:
            raise self.reader.failed
    def path_of(self, ex: Exchange) -> str:
        """`path ~ "x"` in a headless filter: the nodeid's path now (as the UI's, without the history)."""
        inodes = self.state.analyzer.inodes
        return inodes.path(ex.nodeid) if ex.opcode >= 0 and ex.nodeid in inodes.nodes else ""

    def _pending(self, ex: Exchange) -> None:
        if ex.held is not None and self._held_shown.get(ex.n) != ex.held:
            self._held_shown[ex.n] = ex.held
            self._held.append(ex)

    def batch_done(self) -> None:
        held, self._held[:] = list(self._held), []
        if held and not isinstance(self.sink, PcapngSink):  # pcapng: blocks are written once, at completion
            self._write(held, count=False)
        done, self._finished[:] = list(self._finished), []
        for ex in done:
            self._held_shown.pop(ex.n, None)
        self._write(done)
        missed = self.state.overflow
        if missed > self.reported_overflow:
            self.reported_overflow = missed
            sys.stderr.write(f"fsinspect attach: the source dropped {missed} messages for this client "
                             "(it was too slow)\n")

    def write_open(self) -> int:
        """At the end: the requests still waiting (or held), so a hung back-end's requests are not lost from
        the output (pending, with their age); returns how many there were."""
        with self.state.lock:
            still = sorted(self.state.open.values(), key=lambda ex: ex.n)
            self.state.open.clear()
        self._write(still)
        self.pending_at_end = len(still)
        return len(still)

    def _write(self, exs: list[Exchange], count: bool = True) -> None:
        """`count`: these are exchanges as they end (the "N of M" on stderr), not a held one shown early."""
        sink = self.sink
        if sink is None:
            return
        pred = self.predicate
        for ex in exs:
            self.seen += count
            if pred is None or pred(ex):
                sink.write(ex)
                self.written += count
        sink.flush()
