"""A live session of weeks: what a UI attached to a source keeps stays bounded (the rate buckets, the
control-plane events), whatever the source sends and however long it runs."""

from __future__ import annotations

from dissectors import fuse as F
from fsinspect.live.feed import EVENTS_KEEP, ControlFeed, LiveState
from fsinspect.tui import sources
from fsinspect.tui.sources import Store


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
    assert len(st.ops_buckets) <= sources.RATE_SECONDS + sources.RATE_SECONDS // 4
    assert max(st.ops_buckets) == seconds and set(st.bytes_buckets) == set(st.ops_buckets)
    ops, _byts = st.rates(60)
    assert ops == [1.0] * 60  # the sparkline's last minute is whole
    assert an.stats.total == seconds  # the totals are the analyzer's, untouched


def test_a_source_spewing_bad_lines_does_not_grow_the_events() -> None:
    state = LiveState()
    ControlFeed(state, "/nonexistent").feed_lines([b"not json %d" % i for i in range(EVENTS_KEEP * 3)])
    assert len(state.events) == EVENTS_KEEP
    assert state.events[-1]["detail"]["line"] == f"not json {EVENTS_KEEP * 3 - 1}"
