"""The `stuck` lint ages a waiting request on CLOCK_MONOTONIC: a wall-clock step (NTP, `date -s`) makes no
request look stuck, or young.  Capture stamps stay wall-clock time (recordings need it).

The proxy session and the daemon's live tap are fed real captures; the wall clock is stepped by replacing
time.time_ns for the test (the machine's clock is not ours to step), the monotonic clock runs on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from dissectors import fuse as F
from dissectors import ring
from fsinspect.analysis import exchange as X
from fsinspect.proxy.server import ProxyConfig
from fsinspect.proxy.session import Session, SessionOptions

HOUR = 3600 * 10**9
GETATTR = F.encode_request("GETATTR", {"getattr_in": {"getattr_flags": 0, "dummy": 0, "fh": 0}}, unique=7,
                           nodeid=1)


@contextmanager
def clocks(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Offsets (ns) added to the wall clock ("wall") and to CLOCK_MONOTONIC ("mono") while in the block."""
    off = {"wall": 0, "mono": 0}
    wall, mono = time.time_ns, time.monotonic_ns
    monkeypatch.setattr(time, "time_ns", lambda: wall() + off["wall"])
    monkeypatch.setattr(time, "monotonic_ns", lambda: mono() + off["mono"])
    yield off


def _session_with_a_waiting_request() -> Session:
    s = Session(ProxyConfig(backend="unused"), SessionOptions())
    s._on_capture(ring.Capture("request", 1, 3, time.time_ns(), ((0, len(GETATTR), 0),), len(GETATTR), GETATTR,
                               False, None, 0))
    s._on_idle()  # the guest is quiet: analysed, and checked now
    (ex,) = s.analyzer.pending
    assert X.STUCK not in ex.lints
    return s


def test_a_wall_clock_step_forward_makes_no_request_stuck(monkeypatch: pytest.MonkeyPatch) -> None:
    with clocks(monkeypatch) as off:
        s = _session_with_a_waiting_request()
        off["wall"] += HOUR  # NTP steps the clock an hour ahead; only 0.2 s really pass
        off["mono"] += 200_000_000
        s._on_idle()
        assert not s.analyzer.lints, s.analyzer.lints


def test_a_wall_clock_step_back_does_not_hide_a_stuck_request(monkeypatch: pytest.MonkeyPatch) -> None:
    with clocks(monkeypatch) as off:
        s = _session_with_a_waiting_request()
        off["wall"] -= HOUR  # the clock goes an hour back while the request waits 2 s
        off["mono"] += 2_000_000_000
        s._on_idle()
        assert [lint.name for lint in s.analyzer.lints] == [X.STUCK]
        assert "has waited 2" in s.analyzer.lints[0].message


def test_the_daemon_tap_ages_on_the_monotonic_clock_too(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from fsinspect.live.engine import EngineSource

    with clocks(monkeypatch) as off:
        tap = EngineSource(control=str(tmp_path / "ctl.sock"))
        try:
            tap("request", 1, 7, time.time_ns(), GETATTR)
            off["wall"] += HOUR
            with tap.lock:
                assert tap.analyzer.check_stuck(time.time_ns(), time.monotonic_ns()) == []
            off["mono"] += 2_000_000_000
            with tap.lock:
                assert [ex.unique for ex in tap.analyzer.check_stuck(time.time_ns(), time.monotonic_ns())] == [7]
        finally:
            tap.close()


def _age_ms(snap: dict) -> float:
    (pending,) = snap["pending"]
    return float(pending["age_ms"])


@pytest.mark.parametrize("step", [HOUR, -HOUR], ids=["forward", "back"])
def test_a_pending_requests_age_ignores_a_wall_clock_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The proxy's snapshot (what `attach` shows first) ages a waiting request on CLOCK_MONOTONIC: a step of
    the wall clock shows neither an hour-long wait nor none at all."""
    with clocks(monkeypatch) as off:
        s = _session_with_a_waiting_request()
        off["wall"] += step
        off["mono"] += 300_000_000
        with s.lock:
            age = _age_ms(s.snapshot())
        assert 300 <= age < 300 + 1000, age


def test_the_daemon_taps_snapshot_and_stuck_message_age_on_the_monotonic_clock(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A client attached to the daemon's control socket: the request message sent when `stuck` lints it (2 s
    after its capture, the wall clock stepped an hour back meanwhile) and a snapshot taken then say 2 s."""
    from fsinspect.live.engine import EngineSource

    from .test_control_hub import _connect, _lines

    ctl = str(tmp_path / "ctl.sock")
    with clocks(monkeypatch) as off:
        tap = EngineSource(control=ctl)
        client = _connect(ctl)
        try:
            lines = _lines(client)
            assert [next(lines)["type"], next(lines)["type"]] == ["hello", "snapshot"]
            tap("request", 1, 7, time.time_ns(), GETATTR)
            assert next(lines)["type"] == "request"
            off["wall"] -= HOUR
            off["mono"] += 2_000_000_000  # the tap's ticker lints it stuck on its next round
            stuck = next(x for x in lines if x["type"] == "request" and X.STUCK in x["lints"])
            assert 2000 <= stuck["age_ms"] < 3000, stuck["age_ms"]
            with tap.lock:
                age = _age_ms(tap.snapshot())
            assert 2000 <= age < 3000, age
        finally:
            client.close()
            tap.close()
