"""SVG snapshots of the main screens on the guest-syncfs sample (pytest-textual-snapshot).

Update after an intended UI change with `pytest tests/test_tui_snapshots.py --snapshot-update`, and look at
the report it writes before committing the new SVGs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fsinspect.tui.app import FsInspectApp
from fsinspect.tui.sources import ReplaySource, Store

SAMPLE = Path(__file__).resolve().parent.parent / "recordings" / "samples" / "guest-syncfs.pcapng"
SIZE = (160, 45)


def app() -> FsInspectApp:
    return FsInspectApp(ReplaySource(Store(), str(SAMPLE)))


async def loaded(pilot: Any) -> None:
    a = pilot.app
    deadline = time.monotonic() + 20
    while not a.store.done:
        assert time.monotonic() < deadline
        await pilot.pause(0.05)
    await pilot.pause(0.3)


def at_syncfs(keys: list[str]) -> Any:
    """Wait for the replay, put the cursor on the first SYNCFS of the submount, then press keys."""

    async def run(pilot: Any) -> None:
        await loaded(pilot)
        a = pilot.app
        # Every part composed (a compose error would otherwise be snapshotted as the expected screen).
        assert a.xlist.is_mounted and a.detail.is_mounted and a.filterbar.input.is_mounted
        assert all(p.is_mounted for p in a.panels.values())
        idx = next(e.index for e in a.store.exchanges if e.opname == "SYNCFS" and e.submount)
        a.jump(idx)
        deadline = time.monotonic() + 10
        while a.detail.index != idx:  # the detail pane follows the cursor after a short rest
            assert time.monotonic() < deadline
            await pilot.pause(0.05)
        await pilot.pause(0.2)
        if keys:
            await pilot.press(*keys)
            await pilot.pause(0.5)

    return run


@pytest.mark.parametrize("name,keys", [
    ("exchanges", []),
    ("detail_reply", ["r", "tab", "down", "down", "down"]),
    ("inodes", ["2"]),
    ("submounts", ["3"]),
    ("stats", ["4"]),
    ("control", ["5"]),
    ("help", ["question_mark"]),
    ("filter_error", ["slash", *"op == SYNCFS and latency > 5xs"]),
    ("filter_applied", ["slash", *"op == SYNCFS", "enter"]),
])
def test_screen(snap_compare: Any, name: str, keys: list[str]) -> None:
    assert snap_compare(app(), terminal_size=SIZE, run_before=at_syncfs(keys))


def debugger_app() -> FsInspectApp:
    """A live source's protocol lines, made by a real Analyzer: finished exchanges, requests still pending
    (one linted stuck), a held request and a held reply; the clock is fixed so the ages are too."""
    import json

    from dissectors import fuse as F
    from fsinspect.analysis import Analyzer
    from fsinspect.analysis.render import exchange_json, inflight_json
    from fsinspect.tui.sources import AttachSource

    an = Analyzer(keep_raw=True)
    t0 = 1_700_000_000_000_000_000
    entry = F.make("fuse_entry_out", nodeid=7, attr=F.make("fuse_attr", ino=70, mode=0o40755))
    an.feed_request(F.encode_request("LOOKUP", {"name": b"dir"}, unique=2, nodeid=1), 1, 0, t0)
    an.feed_reply(F.encode_reply("LOOKUP", {"entry": entry}, unique=2), 1, 0, t0 + 40_000)
    an.feed_request(F.encode_request("GETATTR", {"getattr": {}}, unique=4, nodeid=7), 1, 1, t0 + 100_000)
    an.feed_request(F.encode_request("MKDIR", {"mkdir": {"mode": 0o755}, "name": b"victim"}, unique=6, nodeid=7),
                    1, 2, t0 + 200_000, held=True)
    an.feed_request(F.encode_request("LOOKUP", {"name": b"x"}, unique=8, nodeid=7), 1, 3, t0 + 300_000)
    an.feed_reply(F.encode_reply("LOOKUP", {"entry": entry}, unique=8), 1, 3, t0 + 350_000, held=True)
    an.feed_request(F.encode_request("READ", {"read": {"fh": 1, "size": 4096}}, unique=10, nodeid=7), 1, 4,
                    t0 + 1_900_000_000)
    now = t0 + 2_300_000_000
    an.check_stuck(t0 + 1_500_000_000)
    snap = {"type": "snapshot", "exchanges": [exchange_json(e, raw=True) for e in an.exchanges if e.state == "done"],
            **inflight_json(an.pending, now)}
    store = Store()
    store.clock = lambda: now
    src = AttachSource(store, "/nonexistent/ctl.sock")
    src.feed_lines([json.dumps({"type": "hello", "version": 2, "versions": [1, 2], "source": "proxy",
                                "tool": "fsinspect"}).encode(), json.dumps(snap).encode()])
    store.done = True  # nothing more comes: the screen is still
    return FsInspectApp(src, title="attach (debugger)")


def test_debugger_screen(snap_compare: Any) -> None:
    """Pending rows with their age (the stuck one in red), held rows highlighted and in the Held panel."""

    async def run(pilot: Any) -> None:
        await pilot.pause(0.5)
        a = pilot.app
        assert len(a.held.rows) == 2 and len(a.store.open) == 4
        a.held.focus()
        await pilot.pause(0.3)

    assert snap_compare(debugger_app(), terminal_size=SIZE, run_before=run)
