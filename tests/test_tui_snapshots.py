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
