"""The binary stream of a real proxy Session: packet blocks made from the captures, numbered at capture.

The session's Publisher hands every FUSE capture to the hub with its exchange number (the analysis numbers
requests in delivery order; a reply takes its chain's number), so a binary client's packet blocks are the
recording's, in capture order, whatever the analysis does meanwhile: with only binary clients watching,
the proxy keeps its analysis back and analyses it in batches (at least every WATCHED_CATCH_UP_NS of
capture time).  Real captures (the recorded guest sample) go through the session as the capture thread
feeds them; the clients are the real ControlFeed and a bare socket."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fsinspect.analysis import Analyzer
from fsinspect.live import addons as L
from fsinspect.live import hub as hub_mod
from fsinspect.live.feed import ControlFeed, LiveState
from fsinspect.live.hub import LIVE_SNAPLEN, Hub
from fsinspect.proxy import session as S
from fsinspect.proxy.server import ProxyConfig
from fsinspect.recording.format import BT_EPB
from fsinspect.recording.reader import Record, StreamReader
from tests.test_live_stream import _read_all, _view
from tests.test_proxy_session import captures


@contextlib.contextmanager
def proxy_session(tmp_path: Path, name: str) -> Iterator[S.Session]:
    """A proxy Session with a recording and a control socket, never served (its captures are fed by hand)."""
    s = S.Session(ProxyConfig(), S.SessionOptions(record=str(tmp_path / f"{name}.pcapng"),
                                                  control=str(tmp_path / f"{name}.sock")))
    try:
        yield s
    finally:
        s.close()  # the hub sends what it holds, then closes
        if s.writer is not None:
            s.writer.close()
        s.proxy.shutdown()


def _done(s: S.Session) -> None:
    """The source ends: every capture analysed, "end" published, the hub flushed and closed."""
    with s.lock:
        s.pipeline.emit("done", "replayed")
    s.close()


def _binary(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b'{"id": 1, "cmd": "stream", "format": "pcapng"}\n')
    return s


def _wait(cond: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _feed_thread(feed: ControlFeed) -> tuple[threading.Thread, threading.Event]:
    feed.connect()
    stop = threading.Event()
    t = threading.Thread(target=feed.pump, args=(stop,), daemon=True)
    t.start()
    return t, stop


def test_binary_clients_get_the_captures_blocks_numbered_at_capture(tmp_path: Path) -> None:
    caps = captures()
    with proxy_session(tmp_path, "tee") as s:
        _stream_through(s, caps)


def _stream_through(s: S.Session, caps: list[Any]) -> None:
    assert s.hub is not None and s.hub.tee
    raw = _binary(s.hub.path)
    ui = ControlFeed(LiveState(analyzer=Analyzer(keep_exchanges=True, lazy=True)), s.hub.path)
    t, stop = _feed_thread(ui)
    _wait(lambda: len(s.hub.clients) == 2 and all(c.binary for c in s.hub.clients))  # type: ignore[union-attr]
    held_back = 0
    for c in caps:
        s.proxy._capture_one(c)
        held_back = max(held_back, s.backlog)
        # analysed in batches: never more than WATCHED_CATCH_UP_NS of capture time behind
        assert all(c.ts_ns - item[4] < L.WATCHED_CATCH_UP_NS for item in s.analysis._backlog)
    assert held_back > 1  # only binary clients watch: the analysis was held back
    _done(s)
    t.join(30)
    recs = [x for x in StreamReader().feed(_read_all(raw).partition(b'"format": "pcapng"}\n')[2])
            if isinstance(x, Record)]
    fuse = [c for c in caps if not (c.kind == "reply" and c.queue == 0 and c.length == 0)]  # FORGET: no reply
    # One block per capture, in capture order, with the captured bytes: the recording's records.
    assert [(r.inbound, r.queue, r.head, r.ts_ns, r.data) for r in recs] == \
        [(c.kind == "request", c.queue, c.head, c.ts_ns, c.data[:LIVE_SNAPLEN]) for c in fuse]
    # Requests numbered 1..N in capture order; each reply with its request's number.
    assert [r.n for r in recs if r.inbound] == list(range(1, s.requests + 1))
    opened: dict[tuple[int, int | None], int] = {}
    for r in recs:
        if r.inbound:
            opened[(r.queue, r.head)] = r.n
        else:
            assert r.n == opened.pop((r.queue, r.head))
    # The UI's feed ends with what the source's own analysis made of the same captures.
    ref = Analyzer(keep_exchanges=True)
    for c in fuse:
        (ref.feed_request if c.kind == "request" else ref.feed_reply)(c.data, c.queue, c.head, c.ts_ns,
                                                                    orig_len=c.length,
                                                                    notes=[S._SNAPPED_NOTE] if c.truncated else ())
    assert ui.streaming == "pcapng" and ui.state.overflow == 0
    assert [_view(ex) for ex in ui.state.analyzer.exchanges] == [_view(ex) for ex in ref.exchanges]
    assert s.analyzer.count == ref.count and not ui.state.open
    stop.set()


def test_a_json_client_makes_the_analysis_run_at_once_and_both_forms_agree(tmp_path: Path) -> None:
    caps = captures()
    with proxy_session(tmp_path, "mixed") as s:
        _mixed(s, caps)


def _mixed(s: S.Session, caps: list[Any], *, others: int = 0) -> list[list[dict[str, Any]]]:
    """A pcapng and a JSON-lines UI feed (and `others` clients already attached) through the session: both
    end with the same exchanges (returned as the views)."""
    assert s.hub is not None
    feeds = {f: ControlFeed(LiveState(analyzer=Analyzer(keep_exchanges=True)), s.hub.path, stream_format=f)
             for f in ("pcapng", "jsonl")}
    threads = [_feed_thread(f) for f in feeds.values()]
    _wait(lambda: len(s.hub.clients) == 2 + others and s.hub.json_clients == 1)  # type: ignore[union-attr]
    for c in caps:
        s.proxy._capture_one(c)
        assert s.backlog == 0  # a JSON client reads exchanges: analysed at once
    _done(s)
    for t, stop in threads:
        t.join(30)
        stop.set()
    views = {f: [_view(ex) for ex in feed.state.analyzer.exchanges] for f, feed in feeds.items()}
    assert views["pcapng"] and views["pcapng"] == views["jsonl"]
    assert feeds["pcapng"].streaming == "pcapng" and feeds["jsonl"].streaming == "jsonl"
    return list(views.values())


def test_an_unnumbered_reply_completes_its_open_request_by_its_chain(tmp_path: Path) -> None:
    """A reply the source could not number (n 0: its request came before the source knew it) completes the
    request open on its chain, as a replay pairs them, and the feed forgets it as open."""
    caps = [c for c in captures() if c.queue == 1][2:4]  # GETATTR and its reply
    lock = threading.RLock()
    hub = Hub(str(tmp_path / "ctl.sock"), lambda: {}, feed_lock=lock)
    hub.take_captures()
    feed = ControlFeed(LiveState(analyzer=Analyzer(keep_exchanges=True)), hub.path)
    t, stop = _feed_thread(feed)
    try:
        _wait(lambda: hub.clients and hub.clients[0].binary)
        req, rep = caps
        with lock:
            hub.publish_capture(True, req.data, 1, req.head, req.ts_ns, req.length, [], 0, 7)
            hub.publish_capture(False, rep.data, 1, rep.head, rep.ts_ns, rep.length, [], 0, 0)
        hub.publish_event("end", {"reason": "test"})
        _wait(lambda: any(e.get("kind") == "end" for e in feed.state.events))
        (ex,) = feed.state.analyzer.exchanges
        assert ex.n == 7 and ex.replied and not feed.state.open
    finally:
        stop.set()
        hub.close()
        t.join(30)


def test_the_sources_lints_before_the_reply_block_reach_the_open_exchange() -> None:
    """A source that analyses each capture at once (a JSON client watches too) publishes an exchange's `stuck`
    lint before its reply's capture: a binary client that keeps no finished exchanges (headless) still ends
    with the lint on the exchange its reply completes."""
    req, rep = [c for c in captures() if c.queue == 1][2:4]
    feed = ControlFeed(LiveState(analyzer=Analyzer(keep_exchanges=False, keep_raw=True)), "/nonexistent")
    done: list[Any] = []
    feed.state.analyzer.listeners.append(done.append)
    feed._packet(True, req.data, req.length, 1, req.head, req.ts_ns, 0, 5, [])
    feed.apply({"type": "lints", "n": 5, "lints": ["stuck"]})
    feed._packet(False, rep.data, rep.length, 1, rep.head, rep.ts_ns, 0, 5, [])
    (ex,) = done
    assert ex.n == 5 and ex.replied and "stuck" in ex.lints and not feed.state.open


def test_at_a_guests_pace_the_hub_goes_out_every_fan_out_every_not_every_10_ms(tmp_path: Path) -> None:
    """Each round costs the source's process a hub-thread wake-up, a GIL hand-off with the capture thread and
    a send, and the client a wake-up and a write, whatever it carries: while traffic flows at a TCG guest's
    pace (here 400 captures/s) the hub comes back every FAN_OUT_EVERY (100 ms), not every 10 ms (it made ~10x
    as many rounds: bench/live_publish.py --rate 1000, hub thread 21.6 -> 4.7 us and client 24.9 -> 5.1 us per
    exchange).
    Nothing is lost or reordered meanwhile."""
    caps = captures()
    with proxy_session(tmp_path, "pace") as s:
        assert s.hub is not None
        raw = _binary(s.hub.path)
        _wait(lambda: s.hub.clients and s.hub.clients[0].binary)  # type: ignore[union-attr]
        rounds0, t0 = s.hub.rounds, time.monotonic()
        for k, c in enumerate(caps):
            s.proxy._capture_one(c)
            time.sleep(max(0.0, t0 + (k + 1) / 400 - time.monotonic()))
        elapsed = time.monotonic() - t0
        rounds = s.hub.rounds - rounds0
        _done(s)
        recs = [x for x in StreamReader().feed(_read_all(raw).partition(b'"format": "pcapng"}\n')[2])
                if isinstance(x, Record)]
    assert rounds <= elapsed / 0.1 + 3, f"{rounds} rounds in {elapsed:.2f} s"  # (10 ms rounds: ~10x as many)
    fuse = [c for c in caps if not (c.kind == "reply" and c.queue == 0 and c.length == 0)]
    assert [(r.ts_ns, r.data) for r in recs] == [(c.ts_ns, c.data[:LIVE_SNAPLEN]) for c in fuse]


def test_a_rare_message_or_a_big_batch_does_not_wait_for_the_next_round(tmp_path: Path, monkeypatch: Any) -> None:
    """While traffic flows the hub waits FAN_OUT_EVERY between rounds (here made 30 s), but a message that says
    something happened (an event; held and resumed go the same way) calls it in at once, and so does a batch of
    `wake_at` messages (a fast source: rounds stay within what a client's queue takes)."""
    monkeypatch.setattr(hub_mod, "FAN_OUT_EVERY", 30.0)
    req, rep = [c for c in captures() if c.queue == 1][2:4]
    lock = threading.RLock()
    hub = Hub(str(tmp_path / "ctl.sock"), lambda: {}, feed_lock=lock, queue_len=64)
    hub.take_captures()
    feed = ControlFeed(LiveState(analyzer=Analyzer(keep_exchanges=True)), hub.path)
    t, stop = _feed_thread(feed)
    try:
        _wait(lambda: hub.clients and hub.clients[0].binary)
        with lock:
            hub.publish_capture(True, req.data, 1, req.head, req.ts_ns, req.length, [], 0, 1)
        _wait(lambda: hub.rounds == 1)  # the burst's first batch (after FAN_OUT_DELAY); the hub now ticks
        with lock:
            hub.publish_capture(False, rep.data, 1, rep.head, rep.ts_ns, rep.length, [], 0, 1)
        hub.publish_event("backend-lost", {"test": 1})
        _wait(lambda: any(e.get("kind") == "backend-lost" for e in feed.state.events), 10)
        assert feed.state.analyzer.exchanges[0].replied  # the capture before it went in the same round
        assert hub.wake_at == 32
        with lock:
            for k in range(hub.wake_at):
                hub.publish_capture(True, req.data, 1, req.head, req.ts_ns, req.length, [], 0, 2 + k)
        _wait(lambda: len(feed.state.open) == hub.wake_at, 10)
    finally:
        stop.set()
        hub.close()
        t.join(30)


def _lines_until(sock: socket.socket, kind: str) -> dict[str, Any]:
    """Read JSON lines from a control socket until the first of type `kind`."""
    buf = b""
    sock.settimeout(30)
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            obj = json.loads(line)
            if obj.get("type") == kind:
                return obj
        chunk = sock.recv(1 << 20)
        assert chunk, f"closed before a {kind!r} line"
        buf += chunk


def test_while_only_binary_clients_watch_the_backlog_is_kept_off_the_capture_thread(tmp_path: Path,
                                                                                   monkeypatch: Any) -> None:
    """The snapshot's backlog of finished exchanges is the hub's, not the capture thread's, while only binary
    clients watch: the analysis' listener is the bare append of the hub's `_fresh` (no Python frame per
    exchange), and the hub thread sizes and bounds them in its rounds (bench/live_publish.py: the listener
    cost the feed thread ~3.6 us per exchange at a guest's pace).  A JSON client that joins late still gets
    every finished exchange in its snapshot (the newest BACKLOG_EXCHANGES), and from then on the listener is
    publish_exchange again (it reads exchanges as they finish)."""
    caps = captures()
    where: list[int] = []
    real = Hub._remember

    def spy(self: Hub, ex: Any) -> None:
        where.append(threading.get_ident())
        real(self, ex)

    monkeypatch.setattr(Hub, "_remember", spy)
    with proxy_session(tmp_path, "late") as s:
        hub = s.hub
        assert hub is not None
        listeners = s.analyzer.listeners
        assert hub.publish_exchange in listeners  # nobody watches yet
        raw = _binary(hub.path)
        _wait(lambda: hub.clients and hub.clients[0].binary)
        assert hub._fresh.append in listeners and hub.publish_exchange not in listeners
        for c in caps:
            s.proxy._capture_one(c)
        s.catch_up()  # (every capture analysed: its exchanges finished on this thread)
        assert threading.get_ident() not in where
        ref = Analyzer(keep_exchanges=False)
        done: list[Any] = []
        ref.listeners.append(done.append)
        for c in caps:
            if not (c.kind == "reply" and c.queue == 0 and c.length == 0):
                (ref.feed_request if c.kind == "request" else ref.feed_reply)(c.data, c.queue, c.head, c.ts_ns,
                                                                            orig_len=c.length)
        late = socket.socket(socket.AF_UNIX)
        late.connect(hub.path)
        snap = _lines_until(late, "snapshot")
        want = done[-hub_mod.BACKLOG_EXCHANGES:]
        assert [(e["n"], e["unique"], e["opcode"]) for e in snap["exchanges"]] == \
            [(ex.n, ex.unique, ex.opname) for ex in want]
        _wait(lambda: hub.json_clients == 1)
        assert hub.publish_exchange in listeners and hub._fresh.append not in listeners and not hub._fresh
        late.close()
        raw.close()


def test_a_stuck_lint_at_completion_reaches_a_binary_client_from_the_hub_thread(tmp_path: Path) -> None:
    """An exchange the source lints `stuck` when its reply comes (it took longer than the threshold) is said
    to binary clients by a custom block (their packet blocks cannot say it): while only they watch, the hub
    thread finds it among the exchanges the source appended, and the source's quiet tick calls it in."""
    caps = [c for c in captures() if c.queue == 1][2:4]  # GETATTR and its reply
    s = S.Session(ProxyConfig(), S.SessionOptions(record=str(tmp_path / "st.pcapng"),
                                                  control=str(tmp_path / "st.sock"), stuck_ns=1))
    try:
        hub = s.hub
        assert hub is not None
        feed = ControlFeed(LiveState(analyzer=Analyzer(keep_exchanges=True)), hub.path)
        t, stop = _feed_thread(feed)
        _wait(lambda: hub.clients and hub.clients[0].binary)
        for c in caps:
            s.proxy._capture_one(c)
        s.catch_up()
        s._on_idle()  # the guest is quiet: the hub thread settles what finished, now
        _wait(lambda: feed.state.analyzer.exchanges and "stuck" in feed.state.analyzer.exchanges[0].lints, 10)
        assert feed.state.analyzer.exchanges[0].replied
        stop.set()
    finally:
        s.close()
        if s.writer is not None:
            s.writer.close()
        s.proxy.shutdown()
    t.join(30)


def _blocks_of(data: bytes) -> list[tuple[int, bytes]]:
    """Every block of a pcapng stream or file but the custom ones (control-protocol messages), as (type, bytes)."""
    r = StreamReader()
    r.copy = []
    r.feed(data)
    assert r.failed is None and not r.pending
    return r.copy


def test_a_binary_client_gets_the_recordings_own_bytes(tmp_path: Path) -> None:
    """A proxy that records hands its recorder's blocks to the hub (Recorder.tee, BlockPublisher): built once,
    on the capture thread, and never framed again by the hub.  A binary client attached from the start gets
    the recording byte for byte (section header, interfaces, every packet block, numbered as the analysis
    numbers exchanges); one that joins later gets the same section header and interfaces, then the
    recording's packet blocks from where it joined (what came before is in its snapshot)."""
    caps = captures()
    with proxy_session(tmp_path, "same") as s:
        assert s.hub is not None and isinstance(s.pipeline.find(L.Publisher), L.BlockPublisher)
        assert not any(isinstance(a, L.Publisher) for a in s.pipeline.request_hooks)  # no hook per capture
        early = _binary(s.hub.path)
        _wait(lambda: s.hub.clients and s.hub.clients[0].binary)  # type: ignore[union-attr]
        half = len(caps) // 2
        for c in caps[:half]:
            s.proxy._capture_one(c)
        late = _binary(s.hub.path)
        _wait(lambda: len(s.hub.clients) == 2 and all(c.binary for c in s.hub.clients))  # type: ignore[union-attr]
        for c in caps[half:]:
            s.proxy._capture_one(c)
        _done(s)
        assert s.writer is not None
        recording = Path(s.writer.paths[0]).read_bytes()
        got_early = _read_all(early).partition(b'"format": "pcapng"}\n')[2]
        got_late = _read_all(late)
    # From the start: the recording itself.
    assert b"".join(b for _t, b in _blocks_of(got_early)) == recording
    # Joined mid-way: its snapshot, then the recording's section and interfaces and the packet blocks since.
    head, _, stream = got_late.partition(b'"format": "pcapng"}\n')
    snapshot = next(json.loads(line) for line in head.split(b"\n") if b'"type": "snapshot"' in line)
    rec_blocks = _blocks_of(recording)
    late_blocks = _blocks_of(stream)
    header = [b for b in late_blocks if b[0] != BT_EPB]
    packets = [b for b in late_blocks if b[0] == BT_EPB]
    assert header == [b for b in rec_blocks if b[0] != BT_EPB]
    assert packets and packets == [b for b in rec_blocks if b[0] == BT_EPB][-len(packets):]
    recs = [x for x in StreamReader().feed(stream) if isinstance(x, Record)]
    # numbered at capture: the late client's first request follows the snapshot's exchanges
    first = next(r.n for r in recs if r.inbound)
    assert first > max(e["n"] for e in snapshot["exchanges"] + snapshot["pending"])
    assert [r.n for r in recs if r.inbound] == list(range(first, s.requests + 1))


def test_a_binary_client_follows_the_recording_across_its_parts(tmp_path: Path) -> None:
    """A recording that rotates starts each part with its own section header and interfaces: a binary client
    attached from the start gets every part byte for byte, back to back (each section's blocks in it)."""
    caps = captures()
    s = S.Session(ProxyConfig(), S.SessionOptions(record=str(tmp_path / "rot.pcapng"), rotate_mb=0.01,
                                                  control=str(tmp_path / "rot.sock")))
    try:
        assert s.hub is not None
        raw = _binary(s.hub.path)
        _wait(lambda: s.hub.clients and s.hub.clients[0].binary)  # type: ignore[union-attr]
        for c in caps:
            s.proxy._capture_one(c)
        _done(s)
        assert s.writer is not None and len(s.writer.paths) > 2
        parts = b"".join(Path(p).read_bytes() for p in s.writer.paths)
        got = _read_all(raw).partition(b'"format": "pcapng"}\n')[2]
    finally:
        s.close()
        s.proxy.shutdown()
    assert b"".join(b for _t, b in _blocks_of(got)) == parts


def _with_orphans(caps: list[Any]) -> list[Any]:
    """The sample's captures with two replies that complete nothing (a misbehaving back-end's: a head no
    request is open on, an unknown unique) between them."""
    rep = next(c for c in caps if c.kind == "reply" and c.length >= 16)
    out = list(caps)
    for at, head in ((10, 900), (len(caps) // 2, 901)):
        ts = out[at - 1].ts_ns
        data = rep.data[:8] + (0xDEAD0000 + head).to_bytes(8, "little") + rep.data[16:]
        out.insert(at, rep._replace(head=head, ts_ns=ts, data=data))
    return out


def test_an_orphan_reply_takes_a_number_and_every_form_keeps_the_sources_numbers(tmp_path: Path) -> None:
    """A reply that completes nothing is an exchange of its own for the analysis (an orphan-reply lint), with
    the next number: the live stream numbers it at capture the same way, so the numbers after it (those a
    UI shows and the debugger's commands name) are the source's in the binary stream, in JSON lines, in the
    recording and in a replay, not one behind for each orphan."""
    caps = _with_orphans(captures())
    with proxy_session(tmp_path, "orph") as s:
        assert s.hub is not None
        raw = _binary(s.hub.path)
        _wait(lambda: s.hub.clients and s.hub.clients[0].binary)  # type: ignore[union-attr]
        views = _mixed(s, caps, others=1)
        recs = [x for x in StreamReader().feed(_read_all(raw).partition(b'"format": "pcapng"}\n')[2])
                if isinstance(x, Record)]
    ref = Analyzer(keep_exchanges=True)
    fuse = [c for c in caps if not (c.kind == "reply" and c.queue == 0 and c.length == 0)]
    for c in fuse:
        (ref.feed_request if c.kind == "request" else ref.feed_reply)(c.data, c.queue, c.head, c.ts_ns,
                                                                    orig_len=c.length,
                                                                    notes=[S._SNAPPED_NOTE] if c.truncated else ())
    orphans = [ex for ex in ref.exchanges if "orphan-reply" in ex.lints]
    assert len(orphans) == 2 and all(ex.n == ex.index + 1 for ex in ref.exchanges)
    # The binary stream: each record carries the number of the exchange the analysis put it in.
    got = {(r.inbound, r.queue, r.head, r.ts_ns): r.n for r in recs}
    for ex in ref.exchanges:
        if ex.opcode >= 0:
            assert got[(True, ex.queue, ex.head, ex.req_ts)] == ex.n, ex.n
        if ex.replied:
            assert got[(False, ex.queue, ex.head, ex.reply_ts)] == ex.n, ex.n
    # Both clients' exchanges, numbers included, are the source's own analysis of the same captures.
    assert views == [[_view(ex) for ex in ref.exchanges]] * 2
