"""The control socket's binary stream (pcapng blocks, negotiated with the `stream` command).

JSON-lines clients (that send nothing, or ask for jsonl) and binary clients share one real Hub fed by a real
Analyzer, as a proxy feeds it; each client ends up with the same exchanges.  The client's block parser is
fuzzed (any chunking gives the same messages; a hostile stream is refused with StreamError, one line), and
a hub that breaks the framing makes `fsinspect attach` say so in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as hs

from fsinspect.analysis import Analyzer
from fsinspect.analysis.exchange import LazyExchange
from fsinspect.analysis.render import exchange_json
from fsinspect.live.feed import ControlFeed, LiveState
from fsinspect.live.hub import Hub
from fsinspect.recording import format as fmt
from fsinspect.recording.indexed import IndexedRecording
from fsinspect.recording.reader import Record, RecordingReader, StreamError, StreamReader
from fsinspect.recording.writer import BlockEncoder, custom_block
from tests.fuzzbudget import SLOW_CASES, fuzz, report
from tests.test_tui import SYNCFS, WORKLOAD

CI_CASES = int(os.environ.get("FSI_FUZZ_EXAMPLES", "300"))


def _publish(hub: Hub, lock: Any, path: Path) -> Analyzer:
    """A recording through a real Analyzer that publishes requests as they come and exchanges as they
    finish, as the proxy's session does."""
    an = Analyzer(keep_exchanges=True, keep_raw=True)
    an.pending_listeners.append(hub.publish_request)
    an.listeners.append(hub.publish_exchange)
    with RecordingReader(path) as r:
        for rec in r.records():
            if not rec.is_fuse:
                continue
            with lock:
                if rec.inbound:
                    an.feed_request(rec.data, rec.queue, rec.head, rec.ts_ns, orig_len=rec.orig_len)
                else:
                    an.feed_reply(rec.data, rec.queue, rec.head, rec.ts_ns, orig_len=rec.orig_len)
    return an


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    sock.settimeout(30)
    while chunk := sock.recv(1 << 16):
        out += chunk
    return out


def _view(ex: Any) -> dict[str, Any]:
    d = exchange_json(ex)
    d.pop("index")
    return d


@pytest.mark.parametrize("sample", [SYNCFS, WORKLOAD], ids=["guest-syncfs", "fusedev-workload"])
def test_old_and_new_clients_on_one_hub(tmp_path: Path, sample: Path) -> None:
    lock = threading.RLock()
    hub = Hub(str(tmp_path / "ctl.sock"), lambda: {}, feed_lock=lock, queue_len=100_000)
    old = socket.socket(socket.AF_UNIX)  # version 1: sends nothing
    old.connect(hub.path)
    raw = socket.socket(socket.AF_UNIX)  # asks for pcapng by hand
    raw.connect(hub.path)
    hello = json.loads(raw.recv(1 << 16).split(b"\n")[0])
    assert hello["type"] == "hello" and hello["streams"] == ["jsonl", "pcapng"]
    raw.sendall(b'{"id": 7, "cmd": "stream", "format": "pcapng"}\n')
    feeds = {f: ControlFeed(LiveState(analyzer=Analyzer(lazy=f == "pcapng")), hub.path, stream_format=f)
             for f in ("pcapng", "jsonl")}
    stop = threading.Event()
    threads = [threading.Thread(target=f.pump, args=(stop,), daemon=True) for f in feeds.values()]
    for f, t in zip(feeds.values(), threads):
        f.connect()
        t.start()
    deadline = time.monotonic() + 30
    while sum(c.binary for c in hub.clients) < 2 or len(hub.clients) < 4:
        assert time.monotonic() < deadline, [c.binary for c in hub.clients]
        time.sleep(0.02)
    src = _publish(hub, lock, sample)
    hub.close()
    for t in threads:
        t.join(30)
    want = [_view(ex) for ex in src.exchanges]
    assert want
    # Old client: JSON lines only, as always (a request line when captured, an exchange line when done).
    lines = [json.loads(x) for x in _read_all(old).splitlines()]
    assert [x["type"] for x in lines[:2]] == ["hello", "snapshot"]
    assert sum(x["type"] == "exchange" for x in lines) == len(want)
    # Hand-made binary client: its reply is the last JSON line, then a recording's blocks with `n`.
    data = _read_all(raw)
    head, _, rest = data.partition(b'"format": "pcapng"}\n')
    assert json.loads(head.splitlines()[-1] + b'"format": "pcapng"}')["id"] == 7
    items = StreamReader().feed(rest)
    recs = [x for x in items if isinstance(x, Record)]
    assert {r.n for r in recs} == {ex.n for ex in src.exchanges}
    assert sum(r.inbound for r in recs) == len(want)  # each request once, in capture order
    assert [r.n for r in recs if r.inbound] == sorted(r.n for r in recs if r.inbound)
    # The feeds: binary (lazy decoding) and JSON lines end with the same exchanges as the source.
    got = {f: feed.state.analyzer.exchanges for f, feed in feeds.items()}
    assert feeds["pcapng"].streaming == "pcapng" and feeds["jsonl"].streaming == "jsonl"
    assert feeds["pcapng"].blocks == len(recs)
    assert any(isinstance(ex, LazyExchange) for ex in got["pcapng"])
    for f in feeds:
        assert [_view(ex) for ex in got[f]] == want, f
    paths = {f: sorted(feed.state.analyzer.inodes.path(n) for n in feed.state.analyzer.inodes.nodes)
             for f, feed in feeds.items()}
    assert paths["pcapng"] == paths["jsonl"]


def test_unknown_stream_format_is_refused_and_jsonl_keeps_lines(tmp_path: Path) -> None:
    hub = Hub(str(tmp_path / "ctl.sock"), lambda: {})
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(hub.path)
        s.sendall(b'{"id": 1, "cmd": "stream", "format": "pcap"}\n{"id": 2, "cmd": "stream", "format": "jsonl"}\n')
        f = s.makefile("rb")
        replies = []
        while len(replies) < 2:
            obj = json.loads(f.readline())
            if obj["type"] == "reply":
                replies.append(obj)
        assert replies[0] == {"type": "reply", "id": 1, "ok": False,
                              "error": "unknown stream format 'pcap' (this hub streams jsonl, pcapng)"}
        assert replies[1] == {"type": "reply", "id": 2, "ok": True, "format": "jsonl"}
        hub.publish_event("backend-lost", {"why": "test"})
        assert json.loads(f.readline())["kind"] == "backend-lost"  # still JSON lines
        s.close()
    finally:
        hub.close()


def _clients(hub: Hub) -> tuple[socket.socket, socket.socket]:
    """A JSON-lines client and a binary one, both attached (and the binary one switched) on return."""
    text = socket.socket(socket.AF_UNIX)
    text.connect(hub.path)
    binary = socket.socket(socket.AF_UNIX)
    binary.connect(hub.path)
    binary.sendall(b'{"id": 1, "cmd": "stream", "format": "pcapng"}\n')
    deadline = time.monotonic() + 30
    while len(hub.clients) < 2 or not any(c.binary for c in hub.clients):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return text, binary


def _binary_records(data: bytes) -> list[Record]:
    _, _, rest = data.partition(b'"format": "pcapng"}\n')
    return [x for x in StreamReader().feed(rest) if isinstance(x, Record)]


def test_the_source_thread_renders_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Publishing an exchange or a request costs the source's thread two appends: the JSON and the packet
    blocks are made by the hub thread, once per batch, in the forms its clients read (before: every exchange
    was rendered as JSON twice on the capture thread, watched or not, which took the proxy's CPU per exchange
    from 0.64 s to 1.53 s per 10k with one pcapng client)."""
    import fsinspect.analysis.render as render
    import fsinspect.live.hub as hubmod

    threads: set[int] = set()
    real = render.exchange_json

    def spy(*a: Any, **kw: Any) -> dict[str, Any]:
        threads.add(threading.get_ident())
        return real(*a, **kw)

    monkeypatch.setattr(render, "exchange_json", spy)
    monkeypatch.setattr(hubmod, "exchange_json", spy, raising=False)
    lock = threading.RLock()
    hub = Hub(str(tmp_path / "ctl.sock"), lambda: {}, feed_lock=lock, queue_len=100_000)
    text, binary = _clients(hub)
    src = _publish(hub, lock, SYNCFS)
    hub.close()
    lines = [json.loads(x) for x in _read_all(text).splitlines()]
    recs = _binary_records(_read_all(binary))
    assert threading.get_ident() not in threads and threads == {hub.thread.ident}
    assert sum(x["type"] == "exchange" for x in lines) == len(src.exchanges)
    assert sum(r.inbound for r in recs) == len(src.exchanges)


def test_a_request_answered_before_its_batch_goes_out_comes_as_its_exchange(tmp_path: Path) -> None:
    """JSON clients get a `request` line for a request still open when its batch goes out, and only the
    exchange for one answered by then; binary clients get every request's packet block, in capture order."""
    caps = [c for c in _captures() if c.queue == 1]
    (a_req, ra), (b_req, rb) = (caps[2], caps[3]), (caps[4], caps[5])  # GETATTR, LOOKUP: on chains 1 and 2
    assert a_req.inbound and b_req.inbound and not ra.inbound and not rb.inbound
    lock = threading.RLock()
    hub = Hub(str(tmp_path / "ctl.sock"), lambda: {}, feed_lock=lock)
    text, binary = _clients(hub)
    an = Analyzer(keep_exchanges=True, keep_raw=True)
    an.pending_listeners.append(hub.publish_request)
    an.listeners.append(hub.publish_exchange)
    with lock:  # the hub renders a batch under this lock: both requests are in one, B answered already
        a = an.feed_request(a_req.data, 1, 1, a_req.ts_ns)
        b = an.feed_request(b_req.data, 1, 2, b_req.ts_ns)
        an.feed_reply(rb.data, 1, 2, rb.ts_ns)
    f = text.makefile("rb")
    got = []
    while not got or got[-1]["type"] != "request":
        got.append(json.loads(f.readline()))
    assert got[-1]["n"] == a.n and got[-1]["state"] == "pending"
    with lock:
        an.feed_reply(ra.data, 1, 1, ra.ts_ns)
    hub.close()
    got += [json.loads(x) for x in f.read().splitlines()]
    live = [(x["type"], x["n"]) for x in got if x["type"] in ("request", "exchange")]
    assert live == [("exchange", b.n), ("request", a.n), ("exchange", a.n)] or \
        live == [("request", a.n), ("exchange", b.n), ("exchange", a.n)], live
    recs = _binary_records(_read_all(binary))
    assert [(r.inbound, r.n) for r in recs] == [(True, a.n), (True, b.n), (False, b.n), (False, a.n)]


def _captures() -> list[Record]:
    with RecordingReader(SYNCFS) as r:
        return [rec for rec in r.records() if rec.is_fuse]


# -- the client's block parser ------------------------------------------------------------------
def _stream() -> bytes:
    """A live stream's bytes: header, requests and replies with numbers, notes, descriptor layouts (most), a
    control message."""
    enc = BlockEncoder(snaplen=1 << 14)
    body = []
    with RecordingReader(SYNCFS) as r:
        for k, rec in enumerate(x for x in r.records() if x.is_fuse):
            if k >= 40:
                break
            (enc.request if rec.inbound else enc.reply)(rec.data, rec.queue, rec.head, rec.ts_ns,
                                                         orig_len=rec.orig_len, n=k // 2 + 1,
                                                         notes=["a note"] if k % 7 == 0 else (),
                                                         layout=rec.layout if rec.layout and k % 5 else ())
            body.append(enc.take())
            if k % 9 == 0:
                body.append(custom_block({"type": "event", "kind": "k", "detail": {"k": k}}))
    return b"".join(enc.header) + b"".join(body)


STREAM = _stream()
WHOLE = StreamReader().feed(STREAM)


def _boundary(blocks: int) -> int:
    """The stream offset after `blocks` whole blocks."""
    pos = 0
    for _ in range(blocks):
        pos += int.from_bytes(STREAM[pos + 4:pos + 8], "little")
    return pos


CUT = _boundary(8)  # the header, then a few packets


def _chunked(cuts: list[int]) -> None:
    r = StreamReader()
    out: list[Any] = []
    pos = 0
    for c in sorted(cuts):
        out += r.feed(STREAM[pos:c])
        pos = c
    out += r.feed(STREAM[pos:])
    assert out == WHOLE and r.pending == 0


def _hostile(data: bytes) -> None:
    r = StreamReader("test stream")
    try:
        for k in range(0, len(data), 97):
            for item in r.feed(data[k:k + 97]):
                assert isinstance(item, (Record, dict))
    except StreamError as e:
        assert "\n" not in str(e) and str(e).startswith("test stream: "), str(e)


@hs.composite
def mutated(draw: hs.DrawFn) -> bytes:
    b = bytearray(STREAM)
    for _ in range(draw(hs.integers(1, 6))):
        pos = draw(hs.integers(0, len(b) - 1))
        kind = draw(hs.integers(0, 3))
        if kind == 0:
            b[pos] = draw(hs.integers(0, 255))
        elif kind == 1:  # a length field lies
            b[pos:pos + 4] = draw(hs.integers(0, 0xFFFFFFFF)).to_bytes(4, "little")
        elif kind == 2:
            del b[pos:pos + draw(hs.integers(1, 64))]
        else:
            b[pos:pos] = draw(hs.binary(min_size=1, max_size=64))
    return bytes(b)


def test_stream_parser_any_chunking_gives_the_same_messages() -> None:
    assert sum(isinstance(x, Record) for x in WHOLE) == 40 and sum(isinstance(x, dict) for x in WHOLE) == 5
    assert [x.n for x in WHOLE if isinstance(x, Record)][:4] == [1, 1, 2, 2]
    fuzz("stream-chunking", hs.lists(hs.integers(0, len(STREAM)), max_size=30), _chunked, CI_CASES)


def test_stream_parser_refuses_hostile_streams_in_one_line() -> None:
    fuzz("stream-hostile", hs.one_of(mutated(), hs.binary(max_size=2048)), _hostile, CI_CASES)


def _mutated_rng(rnd: random.Random) -> bytes:
    """`mutated`'s cases (and random bytes) from a fast RNG, for the 1M-case tier."""
    if rnd.random() < 0.2:
        return rnd.randbytes(rnd.randrange(4096))
    b = bytearray(STREAM)
    for _ in range(rnd.randint(1, 6)):
        pos = rnd.randrange(len(b))
        kind = rnd.randrange(4)
        if kind == 0:
            b[pos] = rnd.randrange(256)
        elif kind == 1:  # a length field lies
            b[pos:pos + 4] = rnd.randrange(2**32).to_bytes(4, "little")
        elif kind == 2:
            del b[pos:pos + rnd.randint(1, 64)]
        else:
            b[pos:pos] = rnd.randbytes(rnd.randint(1, 64))
    return bytes(b)


@pytest.mark.slow
def test_stream_parser_fuzz_slow() -> None:
    seed = int(os.environ.get("FSI_FUZZ_SEED", time.time_ns() % 2**32))
    rnd = random.Random(seed)
    t0 = time.monotonic()
    for i in range(SLOW_CASES):
        data = _mutated_rng(rnd)
        try:
            _hostile(data)
        except Exception as e:
            raise AssertionError(f"stream fuzz seed {seed} case {i}: {e!r}") from e
    report("live stream parser: hostile streams (seeded)", SLOW_CASES, time.monotonic() - t0, f"seed {seed}")


@pytest.mark.parametrize("bad,why", [
    (b"\x06\x00\x00\x00\x20\x00\x00\x00" + b"\0" * 20 + b"\x20\x00\x00\x00",
     "a packet block at stream offset 0 before any section header"),
    (b"\x0a\x0d\x0d\x0a\x0d\x00\x00\x00", "bad block at stream offset 0: type 0x0a0d0d0a, length 13"),
    (STREAM + b"\x06\x00\x00\x00\x10\x00\x00\x00\0\0\0\0\x11\x00\x00\x00",
     f"stream offset {len(STREAM)}: its trailing length is not 16"),
    (STREAM + struct.pack("<III12sI", fmt.BT_CB, 28, fmt.PEN, b"{not json}  ", 28),
     f"custom block at stream offset {len(STREAM)} is not JSON"),
])
def test_stream_framing_errors_are_named(bad: bytes, why: str) -> None:
    r = StreamReader()
    with pytest.raises(StreamError, match=why):
        r.feed(bad)  # what came before the bad block first,
        r.feed(b"")  # then the error


# -- a hub that breaks the framing ---------------------------------------------------------------
def _liar(path: str, after_switch: bytes) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        c, _ = srv.accept()
        c.sendall(b'{"type": "hello", "version": 1, "source": "proxy", "streams": ["jsonl", "pcapng"]}\n'
                  b'{"type": "snapshot"}\n')
        line = c.makefile("rb").readline()
        cid = json.loads(line)["id"]
        c.sendall(json.dumps({"type": "reply", "id": cid, "ok": True, "format": "pcapng"}).encode() + b"\n"
                  + after_switch)
        time.sleep(0.5)
        c.close()
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_attach_says_in_one_line_when_the_stream_breaks(tmp_path: Path) -> None:
    path = str(tmp_path / "liar.sock")
    t = _liar(path, STREAM[:CUT] + b"\xff" * 64)
    p = subprocess.run([sys.executable, "-m", "fsinspect", "attach", path, "--format", "jsonl"],
                       capture_output=True, timeout=60)
    t.join(5)
    err = p.stderr.decode()
    assert p.returncode != 0 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert f"(binary stream): bad block at stream offset {CUT}: type 0xffffffff" in err
    assert "gave up the connection" in err


def test_the_ui_source_shows_a_broken_stream(tmp_path: Path) -> None:
    path = str(tmp_path / "liar.sock")
    t = _liar(path, STREAM[:CUT] + b"\x06\0\0\0\xfc\xff\xff\x7f")
    st = LiveState()
    feed = ControlFeed(st, path)
    feed.pump(threading.Event())
    t.join(5)
    assert st.status.startswith("error: ") and f"bad block at stream offset {CUT}: type 0x00000006" in st.status
    assert feed.broken and len(st.analyzer.exchanges) > 0  # what came before the lie is kept


# -- the UI on a real daemon's binary stream ------------------------------------------------------
@pytest.mark.root
def test_the_ui_over_the_binary_stream_of_a_real_daemon(tmp_path: Path) -> None:
    """`fsinspect daemon --standalone --control` on a real /dev/fuse mount; the UI attaches, negotiates the
    binary stream, lists what the host kernel sends with paths, and decodes a lazy WRITE when shown."""
    import asyncio

    from fsinspect.tui.app import FsInspectApp
    from fsinspect.tui.sources import AttachSource, Store
    from fsinspect.tui.widgets import DetailPane
    from tests.conftest import require_root
    from tests.standalone_mount import standalone
    from tests.test_tui_debugger import SIZE, wait_for

    require_root()
    shared, mnt, ctl = tmp_path / "shared", tmp_path / "mnt", tmp_path / "ctl.sock"
    shared.mkdir()

    def work() -> None:
        os.mkdir(mnt / "dir")
        for i in range(80):  # 80 LOOKUPs (ENOENT, no caching) push the WRITE below the first screen
            with contextlib.suppress(FileNotFoundError):
                os.stat(mnt / "dir" / f"missing{i}")
        with open(mnt / "dir" / "data.bin", "wb") as f:
            f.write(b"\xab" * 5000)
        assert (mnt / "dir" / "data.bin").read_bytes() == b"\xab" * 5000
        os.unlink(mnt / "dir" / "data.bin")

    with standalone(shared, mnt, "--cache", "none", "--control", str(ctl)):
        src = AttachSource(Store(), str(ctl))
        src.connect()
        app = FsInspectApp(src, title="binary stream")

        async def run() -> None:
            async with app.run_test(size=SIZE) as pilot:
                store = app.store
                await wait_for(pilot, lambda: src.streaming == "pcapng")
                # A row is decoded when it is drawn, and following the tail draws (and shows in the detail
                # pane) the newest rows; the WRITE must stay unseen until the test scrolls to it, so the view
                # stays on the first screen while the work runs.
                app.xlist.follow = False
                await asyncio.to_thread(work)
                await wait_for(pilot, lambda: any(e.opname == "UNLINK" and e.replied for e in store.exchanges))
                assert src.blocks > 0 and store.overflow == 0
                write = next(e for e in store.exchanges if e.opname == "WRITE")
                assert isinstance(write, LazyExchange) and write.req_todo and write.reply_todo  # nobody looked yet
                mkdir = next(e for e in store.exchanges if e.opname == "MKDIR")
                assert not (mkdir.req_todo or mkdir.reply_todo)  # it changes the inode map: decoded when its reply came
                app.jump(mkdir.index)
                lst = app.xlist
                await pilot.pause(0.2)
                line = lst.render_line(lst.cursor - lst.scroll_offset.y).text
                assert "MKDIR" in line and "dir" in line and "ok" in line
                app.jump(write.index)
                await pilot.pause(0.2)
                line = lst.render_line(lst.cursor - lst.scroll_offset.y).text
                assert "WRITE" in line and "dir/data.bin" in line  # the path, as it was when written
                detail = app.query_one(DetailPane)
                await wait_for(pilot, lambda: detail.index == write.index)
                texts = [ln.text for ln in detail.lines]
                assert any(t.startswith("opcode = WRITE") for t in texts)
                assert any(t == "size = 5000" for t in texts), texts
                assert not write.req_todo and write.request is not None  # decoded now, for the pane
                assert detail.raw[:4] == write.req_len.to_bytes(4, "little")
                # The counters do not need the bodies: every WRITE and READ is counted with its bytes.
                with store.lock:
                    ops = store.analyzer.stats.ops
                    assert ops["WRITE"].count >= 1 and ops["WRITE"].req_bytes >= 5000
                    assert ops["READ"].reply_bytes >= 5000

        try:
            asyncio.run(run())
        finally:
            src.stop()


# -- a stuck binary client, and the headless near-copy ---------------------------------------------
def test_a_stuck_binary_client_is_overflowed_and_memory_stays_flat(tmp_path: Path) -> None:
    """A binary client that never reads, while 32 KiB WRITEs (16 KiB of each streamed) go through the daemon
    engine: dropped and counted like a JSON one, its queue bounded in bytes; a binary client that reads gets
    every exchange."""
    from fsinspect.live.hub import CLIENT_BYTES
    from tests.test_control_hub import _Daemon, _rss

    dmn = _Daemon(tmp_path)
    try:
        hub, client = dmn.tap.hub, dmn.client
        (stuck,) = dmn.attach(1)
        stuck.sendall(b'{"id": 1, "cmd": "stream", "format": "pcapng"}\n')
        good = ControlFeed(LiveState(analyzer=Analyzer(keep_exchanges=False)), hub.path)
        seen: list[str] = []
        good.state.analyzer.listeners.append(lambda ex: seen.append(ex.opname))
        good.connect()
        stop = threading.Event()
        t = threading.Thread(target=good.pump, args=(stop,), daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while sum(c.binary for c in hub.clients) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        nodeid, fh = client.create(1, b"big")
        data = os.urandom(32 << 10)
        for _ in range(200):  # warm up: the allocator, the backlog, the stuck client's socket buffer
            client.write(nodeid, fh, data)
        base = _rss()
        peak = 0
        def caught_up(writes: int) -> None:  # the reader keeps up (a loaded machine must not make it miss)
            deadline = time.monotonic() + 60
            while seen.count("WRITE") < writes:
                assert time.monotonic() < deadline, (seen.count("WRITE"), writes, good.state.overflow)
                time.sleep(0.02)

        for k in range(1000):  # 16 MiB streamed: twice a client's budget
            client.write(nodeid, fh, data)
            if k % 50 == 0:
                peak = max(peak, _rss())
                caught_up(200 + k + 1)
        caught_up(1200)
        stats = {c.id: c for c in hub.clients}
        bad = next(c for c in stats.values() if c.sock.fileno() >= 0 and c.missed)
        assert bad.binary and bad.queued <= CLIENT_BYTES + (1 << 20)
        assert peak - base < 48 << 20, f"RSS grew by {(peak - base) >> 20} MiB with a stuck binary client"
        assert good.state.overflow == 0 and good.streaming == "pcapng" and not good.broken
    finally:
        stop.set()
        good.shutdown()
        dmn.close()


def test_headless_pcapng_is_a_near_copy_of_the_stream(tmp_path: Path) -> None:
    lock = threading.RLock()
    hub = Hub(str(tmp_path / "ctl.sock"), lambda: {}, feed_lock=lock, queue_len=100_000)
    out = tmp_path / "live.pcapng"
    proc = subprocess.Popen([sys.executable, "-m", "fsinspect", "attach", hub.path, "--format", "pcapng",
                             "-o", str(out)], stderr=subprocess.PIPE)
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(hub.path)
    raw.sendall(b'{"id": 1, "cmd": "stream", "format": "pcapng"}\n')
    try:
        deadline = time.monotonic() + 60
        while sum(c.binary for c in hub.clients) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        src = _publish(hub, lock, SYNCFS)
    finally:
        hub.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    n = len(src.exchanges)
    assert f"{n} of {n} exchanges written".encode() in err
    stream = _read_all(raw).partition(b'"format": "pcapng"}\n')[2]
    r = StreamReader()
    r.copy = []
    r.feed(stream)
    copied = b"".join(blk for _, blk in r.copy)
    data = out.read_bytes()
    assert data.endswith(copied)  # the stream's own section, byte for byte, without its custom blocks
    with RecordingReader(out) as rr:
        recs = list(rr.records())
    assert len(rr.sections) == 2  # the writer's (what came before the switch: nothing here), then the stream's
    want = [x for x in StreamReader().feed(stream) if isinstance(x, Record)]
    assert len(want) == 2 * n - sum(1 for ex in src.exchanges if not ex.replied)
    assert [(x.inbound, x.data, x.n) for x in recs] == [(x.inbound, x.data, x.n) for x in want]
    # Opened by number (the UI's way: through the side index the writer kept beside it), every exchange is
    # there with its reply (before: the index held none of the copied blocks, and the file opened empty).
    with IndexedRecording(out) as ir:
        opened = [ir[i] for i in range(len(ir))]
    assert [(ex.opname, ex.replied) for ex in opened] == [(ex.opname, ex.replied) for ex in src.exchanges]


def test_a_lazy_body_that_does_not_decode_says_so_when_read() -> None:
    """Lazy and eager analyzers agree on a FLUSH cut two bytes short of what its header says; the lazy one
    finds out when the request is first read (a row shown, the detail pane, a filter on a field)."""
    from dissectors import fuse as F

    bad = F.encode_request("FLUSH", {"flush": F.make("fuse_flush_in", fh=1)}, unique=9, nodeid=5)[:-2]
    eager, lazy = Analyzer(), Analyzer(lazy=True)
    e = eager.feed_request(bad, 1, 0, 1)
    z = lazy.feed_request(bad, 1, 0, 1)
    assert isinstance(z, LazyExchange) and not z.lints and z.decode_error is None  # not looked at yet
    assert e.decode_error and "decode-error" in e.lints
    assert z.request is None and z.decode_error == e.decode_error and z.lints == ["decode-error"]
    assert z.opname == e.opname == "FLUSH" and z.nodeid == e.nodeid == 5
