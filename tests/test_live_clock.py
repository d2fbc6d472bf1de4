"""A live client ages a waiting request on the source's monotonic clock, not on its own clocks.

The source is a real daemon tap (EngineSource) with its control socket, in a process of its own whose clocks
are not the client's: its wall clock an hour behind, its CLOCK_MONOTONIC 11 days ahead (another host, a VM,
a container's clock).  The client is the UI's Store (what its age column and Held panel show) or the headless
`attach --format jsonl`, over the binary stream and over JSON lines.  The client's wall clock is stepped by
replacing time.time_ns in the test (the machine's clock is not ours to step), and the source's by a command.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fsinspect.analysis.exchange import Exchange
from fsinspect.live.feed import ControlFeed, LiveState
from fsinspect.live.headless import HeadlessFeed, open_sink
from fsinspect.tui.render import age_text
from fsinspect.tui.sources import AttachSource, Store
from tests.standalone_mount import REPO

HOUR = 3600 * 10**9
SOURCE_WALL = -HOUR  # the source's clocks against the client's
SOURCE_MONO = 11 * 24 * HOUR

_SOURCE = r"""
import sys, time
off = {"wall": int(sys.argv[2])}
_wall, _mono, mono_off = time.time_ns, time.monotonic_ns, int(sys.argv[3])
time.time_ns = lambda: _wall() + off["wall"]
time.monotonic_ns = lambda: _mono() + mono_off
from dissectors import fuse as F
from fsinspect.live.engine import EngineSource
tap = EngineSource(control=sys.argv[1], stuck_ns=10**18)
print("ready", flush=True)
for line in sys.stdin:
    cmd, arg = line.split()
    if cmd == "request":
        u = int(arg)
        tap("request", 1, u, time.time_ns(), F.encode_request(
            "GETATTR", {"getattr_in": {"getattr_flags": 0, "dummy": 0, "fh": 0}}, unique=u, nodeid=1))
    elif cmd == "step":
        off["wall"] += int(arg)
    print("ok", flush=True)
tap.close()
"""


class _Source:
    """The source process: `request U` captures a GETATTR that nobody answers, `step NS` steps its wall clock."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.captured: dict[int, tuple[float, float]] = {}  # n -> our monotonic time just before and after

    def cmd(self, line: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def request(self, unique: int) -> None:
        t0 = time.monotonic()
        self.cmd(f"request {unique}")
        self.captured[len(self.captured) + 1] = (t0, time.monotonic())

    def check(self, n: int, age_ns: int | None) -> None:
        """The age a client gives request `n` now is the time since it was captured."""
        now = time.monotonic()
        t0, t1 = self.captured[n]
        assert age_ns is not None, f"#{n} is not waiting"
        age = age_ns / 1e9
        assert now - t1 - 0.1 <= age <= now - t0 + 0.1, f"#{n}: aged {age:.3f} s, captured {now - t1:.3f} .. {now - t0:.3f} s ago"


@contextmanager
def _source(ctl: Path) -> Iterator[_Source]:
    proc = subprocess.Popen([sys.executable, "-c", _SOURCE, str(ctl), str(SOURCE_WALL), str(SOURCE_MONO)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield _Source(proc)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


@contextmanager
def _client_wall_stepped(monkeypatch: pytest.MonkeyPatch, step: int) -> Iterator[None]:
    wall = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: wall() + step)
    yield
    monkeypatch.setattr(time, "time_ns", wall)


def _wait_open(state: LiveState, n: int) -> Exchange:
    deadline = time.monotonic() + 10
    while True:
        with state.lock:
            ex = state.open.get(n)
        if ex is not None:
            return ex
        assert time.monotonic() < deadline, f"#{n} never reached the client"
        time.sleep(0.01)


@contextmanager
def _pumping(feed: ControlFeed) -> Iterator[None]:
    stop = threading.Event()
    feed.connect()
    t = threading.Thread(target=feed.pump, args=(stop,), daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        feed.shutdown()
        t.join(10)


def _ui_age(store: Store) -> Callable[[Exchange], int | None]:
    def age(ex: Exchange) -> int | None:
        now, mono = store.now()
        text = age_text(ex, now)  # what the age column and the Held panel show
        assert text is not None and re.fullmatch(r"\d+ms…|\d\.\ds…", text), text
        return ex.age_ns(now, mono)
    return age


@pytest.mark.parametrize("stream", ["pcapng", "jsonl"])
def test_the_ui_ages_requests_on_the_sources_monotonic_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             stream: str) -> None:
    """Live, then a client attaching after the source's wall clock stepped (the snapshot's requests)."""
    ctl = tmp_path / "ctl.sock"
    with _source(ctl) as src:
        store = Store()
        feed = AttachSource(store, str(ctl), stream_format=stream)
        age = _ui_age(store)
        with _pumping(feed):
            src.request(7)
            first = _wait_open(store, 1)
            time.sleep(0.2)
            src.check(1, age(first))
            with _client_wall_stepped(monkeypatch, HOUR):  # our clock: an hour ahead
                time.sleep(0.1)
                src.check(1, age(first))
            src.cmd(f"step {-2 * HOUR}")  # the source's: two hours back, while #1 waits
            src.request(9)
            second = _wait_open(store, 2)
            time.sleep(0.2)
            src.check(1, age(first))
            src.check(2, age(second))
            assert feed.streaming == stream
        late = Store()  # attaches now: both come in its snapshot
        with _pumping(AttachSource(late, str(ctl), stream_format=stream)):
            exs = [_wait_open(late, 1), _wait_open(late, 2)]
            time.sleep(0.1)
            for n, ex in enumerate(exs, 1):
                src.check(n, _ui_age(late)(ex))


def test_attach_jsonl_ages_requests_on_the_sources_monotonic_clock(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The headless client writes the requests still waiting when it stops with their age_ms."""
    ctl, out = tmp_path / "ctl.sock", tmp_path / "out.jsonl"
    with _source(ctl) as src:
        feed = HeadlessFeed(str(ctl))
        feed.sink = open_sink("jsonl", str(out), feed.state)
        with _pumping(feed):
            src.request(7)
            _wait_open(feed.state, 1)
            src.cmd(f"step {-2 * HOUR}")
            src.request(9)
            _wait_open(feed.state, 2)
            time.sleep(0.2)
        with _client_wall_stepped(monkeypatch, HOUR):
            assert feed.write_open() == 2
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            for row in rows:
                src.check(row["n"], int(row["age_ms"] * 1e6))
        feed.sink.close()
