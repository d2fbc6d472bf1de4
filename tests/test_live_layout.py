"""The descriptor layout travels with the live stream: the UI attached to a proxy shows each message's chain as
a replay of the recording does, over the binary stream and over JSON lines.

The source is a real proxy Session fed the captures of a recorded guest session (its vrings' chains), as the
capture thread feeds them; the client is the UI (Pilot) attached to its control socket.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fsinspect.recording.reader import RecordingReader
from fsinspect.tui.app import FsInspectApp
from fsinspect.tui.render import layout_text
from fsinspect.tui.sources import AttachSource, Store
from fsinspect.tui.widgets import DetailPane
from tests.test_live_tee import _done, proxy_session
from tests.test_proxy_session import SAMPLE, captures
from tests.test_tui_debugger import SIZE, wait_for


def _recorded_layouts() -> dict[tuple[bool, int, int], list[tuple[int, int]] | None]:
    """(inbound, queue, unique) -> the layout the recording has for that message."""
    with RecordingReader(SAMPLE) as r:
        return {(rec.inbound, rec.queue, int.from_bytes(rec.data[8:16], "little")): rec.layout
                for rec in r if rec.is_fuse and len(rec.data) >= 16}


@pytest.mark.parametrize("stream", ["pcapng", "jsonl"])
def test_the_detail_pane_shows_a_live_exchanges_descriptor_chain(tmp_path: Path, stream: str) -> None:
    recorded = _recorded_layouts()
    caps = captures()
    with proxy_session(tmp_path, stream) as s:
        assert s.hub is not None
        src = AttachSource(Store(), s.hub.path, stream_format=stream)
        src.connect()
        app = FsInspectApp(src, title="live layout")

        async def run() -> None:
            async with app.run_test(size=SIZE) as pilot:
                store = app.store
                await wait_for(pilot, lambda: src.streaming == stream and s.hub is not None and s.hub.clients)
                for c in caps:
                    s.proxy._capture_one(c)
                await wait_for(pilot, lambda: sum(e.replied for e in store.exchanges) >= 20)
                app.xlist.follow = False
                detail = app.query_one(DetailPane)
                shown = 0
                for ex in [e for e in store.exchanges if e.replied and e.opname in ("LOOKUP", "GETATTR")][:4]:
                    app.jump(ex.index)
                    await wait_for(pilot, lambda ex=ex: detail.index == ex.index)
                    for side, inbound in (("request", True), ("reply", False)):
                        if detail.side != side:
                            await pilot.press("r")
                            await wait_for(pilot, lambda side=side: detail.side == side)
                        want = recorded[(inbound, ex.queue, ex.unique)]
                        assert want, "the sample's chains are recorded"
                        text = str(detail.query_one("#layout").render())
                        assert text == layout_text(want), (ex.opname, side, text)
                        assert "not recorded" not in text
                        shown += 1
                    app.xlist.focus()
                assert shown == 8
                _done(s)

        asyncio.run(run())
        src.stop()
