"""A live session of weeks: what a UI attached to a source keeps stays bounded (the rate buckets, the
control-plane events), whatever the source sends and however long it runs."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from dissectors import fuse as F
from fsinspect.analysis import Analyzer
from fsinspect.analysis.exchange import Exchange, Kept
from fsinspect.live.feed import EVENTS_KEEP, ControlFeed, LiveState
from fsinspect.live.hub import BACKLOG_BYTES, BACKLOG_EXCHANGES, LIVE_SNAPLEN, Hub, _exchange_obj
from fsinspect.recording.reader import RecordingReader
from fsinspect.tui import sources
from fsinspect.tui.sources import Store
from tests.test_tui import SYNCFS, WORKLOAD


def test_a_live_store_keeps_the_newest_rate_buckets_only() -> None:
    st = Store()
    an = st.analyzer
    seconds = sources.RATE_SECONDS * 2
    for sec in range(1, seconds + 1):  # one GETATTR a second, for two RATE_SECONDS
        ts = sec * 1_000_000_000
        an.feed_request(F.encode_request("GETATTR", {"getattr": {}}, unique=2 * sec, nodeid=1), 1, 0, ts)
        an.feed_reply(F.encode_reply("GETATTR", {"attr_out": {}}, unique=2 * sec), 1, 0, ts + 1000)
        if sec % 1000 == 0:
            with st.lock:
                st.trim(sources.LIVE_KEEP)
    with st.lock:
        st.trim(sources.LIVE_KEEP)
    assert len(st.second_rates) <= sources.RATE_SECONDS + sources.RATE_SECONDS // 4
    assert max(st.second_rates.ops) == seconds and set(st.second_rates.bytes) == set(st.second_rates.ops)
    ops, _byts = st.rates(60)
    assert ops == [1.0] * 60  # the sparkline's last minute is whole
    assert an.stats.total == seconds  # the totals are the analyzer's, untouched


def test_a_source_spewing_bad_lines_does_not_grow_the_events() -> None:
    state = LiveState()
    ControlFeed(state, "/nonexistent").feed_lines([b"not json %d" % i for i in range(EVENTS_KEEP * 3)])
    assert len(state.events) == EVENTS_KEEP
    assert state.events[-1]["detail"]["line"] == f"not json {EVENTS_KEEP * 3 - 1}"


def test_a_replay_of_a_recording_of_days_keeps_the_newest_rate_seconds_only(tmp_path) -> None:
    """The stats panel's ops/s and bytes/s of a replay: one bucket per capture second, for the newest
    RATE_SECONDS seconds only, while the background pass builds them and when its saved analysis is read
    back (both used to keep every second of the recording: a week is 604,800 buckets, in the side file too)."""
    from fsinspect.recording.indexed import analysis_path
    from fsinspect.recording.writer import RecordingWriter
    from fsinspect.tui.sources import ReplaySource

    path = tmp_path / "days.pcapng"
    w = RecordingWriter(path, source="virtio")
    seconds = sources.RATE_SECONDS * 3
    t0 = 1_700_000_000 * 10**9
    for sec in range(seconds):  # one GETATTR a second
        ts = t0 + sec * 10**9
        w.request(F.encode_request("GETATTR", {"getattr": {}}, unique=2 * sec + 2, nodeid=1), 1, 0, ts)
        w.reply(F.encode_reply("GETATTR", {"attr_out": {}}, unique=2 * sec + 2), 1, 0, ts + 1000)
    w.close()
    bound = sources.RATE_SECONDS + sources.RATE_SECONDS // 4
    for opening in ("analysed in the background", "analysis read back"):
        st = Store()
        src = ReplaySource(st, str(path))
        src.start()
        src.join(120)
        assert not src.thread.is_alive() and st.error is None, (opening, st.error)
        assert len(st.second_rates) <= bound, (opening, len(st.second_rates))
        ops, _byts = st.rates(60)
        assert ops == [1.0] * 60, opening  # the sparkline's last minute is whole
        assert st.analyzer.stats.total == seconds  # the totals are the analysis', untouched
        saved = json.loads(analysis_path(path).read_text())["rates"]
        assert len(saved) <= sources.RATE_SECONDS and saved[-1][0] == (t0 // 10**9) + seconds - 1, opening


def test_the_hubs_snapshot_backlog_is_bounded_in_exchanges_and_in_bytes(tmp_path: Path) -> None:
    """A source publishing for weeks keeps at most BACKLOG_EXCHANGES finished exchanges for the next snapshot,
    and no more than BACKLOG_BYTES of them (raw bytes, and their hex cut at LIVE_SNAPLEN): the newest."""
    hub = Hub(str(tmp_path / "c.sock"), lambda: {})
    try:
        small, big = bytes(64), bytes(4 * LIVE_SNAPLEN)  # (a daemon's engine hands over whole WRITEs)
        for k in range(3 * BACKLOG_EXCHANGES):
            hub.publish_exchange(Exchange(k, 1, k, 0, k, 15, 1, req_raw=small, reply_raw=small, n=k + 1))
        assert [ex.n for ex in hub.recent] == list(range(2 * BACKLOG_EXCHANGES + 1, 3 * BACKLOG_EXCHANGES + 1))
        for k in range(3 * BACKLOG_EXCHANGES, 4 * BACKLOG_EXCHANGES):
            hub.publish_exchange(Exchange(k, 1, k, 0, k, 16, 1, req_raw=big, n=k + 1))
        per = 512 + len(big) + 2 * LIVE_SNAPLEN
        assert len(hub.recent) == BACKLOG_BYTES // per and hub.recent[-1].n == 4 * BACKLOG_EXCHANGES
        assert hub._recent_bytes == sum(hub._recent_sizes) == len(hub.recent) * per <= BACKLOG_BYTES
    finally:
        hub.close()


@pytest.mark.parametrize("sample", [SYNCFS, WORKLOAD], ids=["guest-syncfs", "fusedev-workload"])
def test_the_backlog_keeps_exchanges_without_their_decoded_messages(tmp_path: Path, sample: Path) -> None:
    """The snapshot's backlog holds each finished exchange as one Kept (bytes, ints, strings: the collector walks
    one object, not the exchange's decoded request and reply, for as long as it is kept), and a joining
    client's snapshot renders them as the exchanges themselves, their messages decoded again with the
    source's contexts."""
    an = Analyzer(keep_exchanges=False, keep_raw=True)
    done: list[Exchange] = []
    an.listeners.append(done.append)
    hub = Hub(str(tmp_path / "c.sock"), lambda: {})
    try:
        hub.listen(an.listeners)
        hub.contexts = lambda: an.contexts
        with RecordingReader(sample) as r:
            for rec in r:
                if rec.is_fuse:
                    (an.feed_request if rec.inbound else an.feed_reply)(rec.data, rec.queue, rec.head, rec.ts_ns,
                                                                        orig_len=rec.orig_len, notes=rec.notes)
        an.finish()
        assert done and all(isinstance(k, Kept) for k in hub.recent)
        gc.collect()
        for k in hub.recent:  # nothing the collector walks but the record itself
            assert all(not gc.is_tracked(x) for x in (*k, *k.values))
        assert hub.backlog() == [_exchange_obj(ex) for ex in done[-BACKLOG_EXCHANGES:]]
    finally:
        hub.close()
