"""The proxy session's held-back analysis: real guest captures (the recorded sample) fed through the
session as the capture thread does, without QEMU.  Holding analysis back must not change its results."""

from __future__ import annotations

import gc
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dissectors.ring._common import Capture
from fsinspect.live import addons as L
from fsinspect.proxy import session as S
from fsinspect.proxy.server import ProxyConfig
from fsinspect.recording.reader import RecordingReader

SAMPLE = Path(__file__).resolve().parent.parent / "recordings" / "samples" / "guest-syncfs.pcapng"


def captures() -> list[Capture]:
    out = []
    with RecordingReader(SAMPLE) as r:
        for rec in r:
            if rec.is_fuse:
                layout = tuple((0, ln, fl) for ln, fl in rec.layout or ())
                out.append(Capture("request" if rec.inbound else "reply", rec.queue, rec.head or 0, rec.ts_ns,
                                   layout, rec.orig_len, rec.data, rec.snapped, ""))
    assert len(out) > 100
    return out


@pytest.fixture(autouse=True)
def _release() -> Iterator[None]:
    """Sessions made here are never served: release their fds now, not during some later test's fd
    accounting (tests/test_daemon_vhost_user_protocol.py compares /proc/self/fd before and after)."""
    yield
    while MADE:
        s = MADE.pop()
        s.close()
        if s.writer is not None:
            s.writer.close()
        s.proxy.shutdown()  # closes its own wake-up eventfds and its shadow-ring memfd
        del s  # the last one too: gc.collect() below frees the capture buffer's eventfd and the mappings
    gc.collect()


MADE: list[S.Session] = []


def session(tmp_path: Path, name: str, **kw: Any) -> S.Session:
    s = S.Session(ProxyConfig(), S.SessionOptions(record=str(tmp_path / f"{name}.pcapng"), **kw))
    MADE.append(s)
    return s


def comparable(s: S.Session) -> dict[str, Any]:
    out = s.summary()
    for k in ("recording", "path", "capture", "features"):
        out.pop(k)
    return json.loads(S.summary_json(out))


def feed(s: S.Session, caps: list[Capture]) -> None:
    for c in caps:
        s.proxy._capture_one(c)


def test_held_back_analysis_gives_the_same_results(tmp_path: Path) -> None:
    caps = captures()
    now = session(tmp_path, "now", defer_analysis=False)
    later = session(tmp_path, "later")
    try:
        feed(now, caps)
        feed(later, caps)
        # recorded at once, analysed not yet
        assert later.requests == now.requests > 0 and later.replies == now.replies
        assert later.analyzer.count == 0 and later.backlog == later.requests + later.replies
        # a quiet spell analyses one chunk, oldest first
        L.BACKLOG_CHUNK, old = 50, L.BACKLOG_CHUNK
        try:
            later._on_idle()
        finally:
            L.BACKLOG_CHUNK = old
        assert later.analyzer.count > 0 and later.backlog == later.requests + later.replies - 50
        assert later.catch_up() > 0 and later.backlog == 0
        now.analyzer.finish()
        later.analyzer.finish()
        a, b = comparable(now), comparable(later)
        assert a == b
        assert a["opcodes"]["SYNCFS"] >= 3 and a["submounts"]
    finally:
        for x in (now, later):
            x.writer.close()  # type: ignore[union-attr]
    # both recordings are the same bytes apart from the section header's host facts
    assert (tmp_path / "now.pcapng").stat().st_size == (tmp_path / "later.pcapng").stat().st_size


def test_backlog_over_its_byte_budget_analyses_the_oldest_half(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    caps = captures()
    monkeypatch.setattr(L, "BACKLOG_BYTES", 20_000)
    s = session(tmp_path, "cap")
    ref = session(tmp_path, "ref", defer_analysis=False)
    try:
        feed(s, caps)
        feed(ref, caps)
        assert 0 < s.analysis._backlog_bytes <= 20_000 + 16384 + L._BACKLOG_OVERHEAD
        assert 0 < s.analyzer.count < ref.analyzer.count  # the oldest were analysed on the way
        s.catch_up()
        assert s.backlog == 0 and s.analyzer.count == ref.analyzer.count
    finally:
        for x in (s, ref):
            x.writer.close()  # type: ignore[union-attr]


def test_a_watching_client_gets_everything_analysed_at_once(tmp_path: Path) -> None:
    caps = captures()
    half = len(caps) // 2
    s = session(tmp_path, "watched", control=str(tmp_path / "ctl.sock"))
    client = socket.socket(socket.AF_UNIX)
    files: list[Any] = []
    try:
        feed(s, caps[:half])
        held = s.backlog
        assert held > 0 and s.analyzer.count == 0  # nobody watches yet
        client.connect(str(tmp_path / "ctl.sock"))
        f = client.makefile("rb")
        files.append(f)
        hello, snap = json.loads(f.readline()), json.loads(f.readline())
        assert hello["type"] == "hello" and snap["type"] == "snapshot"
        # the snapshot analysed the backlog first: the client sees the exchanges so far
        assert s.backlog == 0 and snap["stats"]["total"] == s.analyzer.stats.total > 0
        deadline = time.monotonic() + 5
        while not s.watched and time.monotonic() < deadline:
            time.sleep(0.01)
        before = s.analyzer.count
        feed(s, caps[half:])
        assert s.backlog == 0 and s.analyzer.count > before  # watched: analysed as it comes
        got = json.loads(f.readline())
        assert got["type"] in ("request", "exchange") and got["n"] > 0
    finally:
        for f in files:
            f.close()
        client.close()


def _lines(f: Any, until: Any, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Protocol lines read until `until(line)` holds (the socket has a timeout)."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out.append(json.loads(f.readline()))
        if until(out[-1]):
            return out
    raise AssertionError(f"not seen in {timeout} s: {out[-5:]}")


def test_requests_in_flight_stream_snapshot_and_stuck(tmp_path: Path) -> None:
    """A request shows at once (stream and snapshot, with its age), is linted `stuck` while it still waits,
    and its reply completes the same number in place."""
    caps = [c for c in captures() if c.queue == 1][:40]
    replies = {(c.queue, c.head): c for c in caps if c.kind == "reply"}
    last_req = max((c for c in caps if c.kind == "request" and (c.queue, c.head) in replies), key=lambda c: c.ts_ns)
    held_reply = replies[(last_req.queue, last_req.head)]
    s = session(tmp_path, "inflight", control=str(tmp_path / "ctl.sock"), stuck_ns=200_000_000)
    client = socket.socket(socket.AF_UNIX)
    client.settimeout(5)
    files: list[Any] = []
    try:
        now = time.time_ns()
        shift = now - last_req.ts_ns  # as if captured just now
        live = [c._replace(ts_ns=c.ts_ns + shift) for c in caps if c is not held_reply]
        feed(s, live)
        client.connect(str(tmp_path / "ctl.sock"))
        f = client.makefile("rb")
        files.append(f)
        hello, snap = json.loads(f.readline()), json.loads(f.readline())
        assert hello["type"] == "hello"
        (pending,) = snap["pending"]
        n = pending["n"]
        assert pending["state"] == "pending" and pending["head"] == last_req.head and snap["held"] == []
        assert 0 <= pending["age_ms"] < 1000 and pending["request_raw"] == last_req.data.hex()
        assert n not in {x["n"] for x in snap["exchanges"]}
        # Nothing comes back: the capture thread's idle checks lint it once it waited 200 ms.
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 and "stuck" not in s.analyzer.find(n).lints:  # type: ignore[union-attr]
            s._on_idle()
            time.sleep(0.02)
        got = _lines(f, lambda x: x["type"] == "request")
        assert got[-1]["n"] == n and got[-1]["lints"] == ["stuck"] and got[-1]["age_ms"] >= 200
        assert got[-1]["state"] == "pending"
        assert any(x["kind"] == "stuck" and f"(#{n})" in x["message"] for x in s.summary()["lints"])
        # A new request goes out as it is captured; the held-back reply completes number n in place.
        feed(s, [held_reply._replace(ts_ns=time.time_ns())])
        done = _lines(f, lambda x: x["type"] == "exchange")[-1]
        assert done["n"] == n and done["state"] == "done" and done["lints"] == ["stuck"] and "age_ms" not in done
        assert s.analyzer.pending == [] and s.snapshot()["pending"] == []
    finally:
        for f in files:
            f.close()
        client.close()
        s.writer.close()  # type: ignore[union-attr]


def _shape(v: Any) -> Any:
    """A JSON value's shape: dict keys (recursively), the shape of a list's first item, the type otherwise."""
    if isinstance(v, dict):
        return {k: _shape(x) for k, x in sorted(v.items())}
    if isinstance(v, list):
        return [_shape(v[0])] if v else []
    return type(v).__name__ if v is not None else None


def test_the_proxy_and_the_daemon_serialise_the_same_snapshot_and_summary(tmp_path: Path) -> None:
    """The same traffic through the proxy's session and through the daemon engine's live source: the
    snapshot a client gets first and the summary have one shape (the proxy only adds its transport's keys),
    and the analysis in them is the same."""
    from fsinspect.live.engine import EngineSource

    caps, snapped = [], set()  # the engine always has whole messages: leave out the snapped exchanges
    for c in captures():
        key = (c.queue, c.head)
        if c.kind == "request" and c.length != len(c.data):
            snapped.add(key)
        elif c.kind == "request" or key not in snapped:
            caps.append(c)
        else:
            snapped.discard(key)
    s = session(tmp_path, "proxy", control=str(tmp_path / "p.sock"))
    ctl = EngineSource(control=str(tmp_path / "d.sock"))
    try:
        feed(s, caps)
        for c in caps:  # as the engine taps them: no descriptor head, the unique names the request
            ctl(c.kind, c.queue, int.from_bytes(c.data[8:16], "little"), c.ts_ns, c.data)
        with s.lock:
            p_snap = json.loads(json.dumps(s.snapshot()))
        with ctl.lock:
            d_snap = json.loads(json.dumps(ctl.snapshot()))
        proxy_only = {"features", "capture", "backend_lost"}
        assert set(p_snap) - set(d_snap) == proxy_only and set(d_snap) <= set(p_snap)
        assert {k: _shape(v) for k, v in p_snap.items() if k not in proxy_only} == _shape(d_snap)
        assert d_snap["syncfs"] and d_snap["submounts"] and d_snap["inodes"]  # the shapes are not of empty lists
        for k in ("inodes", "stats", "submounts", "syncfs", "lints"):
            assert p_snap[k] == d_snap[k], k
        p_sum = json.loads(S.summary_json(s.summary()))
        d_sum = json.loads(S.summary_json(ctl.summary()))
        assert set(d_sum) <= set(p_sum)
        for k in d_sum:
            assert _shape(p_sum[k]) == _shape(d_sum[k]), k
        for k in ("requests", "replies", "opcodes", "errors", "submounts", "syncfs", "lints"):
            assert p_sum[k] == d_sum[k], k
        assert d_sum["opcodes"]["SYNCFS"] >= 3 and d_sum["requests"] > 50
    finally:
        ctl.close()
        s.writer.close()  # type: ignore[union-attr]


def test_a_proxy_shut_down_leaves_no_fd_behind() -> None:
    """Found by the vhost-user fuzz, which runs many proxies in one process: each kept its shadow-ring memfd
    open after shutdown (harmless for the one-connection CLI process, a leak for anything that embeds it)."""
    from fsinspect.proxy.server import Proxy

    before = 0
    for i in range(6):
        if i == 1:  # after a first one: the native module's one-time state is not a leak
            gc.collect()
            before = len(os.listdir("/proc/self/fd"))
        qemu, front = socket.socketpair()
        backend, back = socket.socketpair()
        p = Proxy(ProxyConfig(capture_bytes=1 << 20))
        qemu.close()  # QEMU gone at once
        assert p.serve(front, back) == "QEMU disconnected"
        backend.close()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
