"""Pilot tests of the Textual UI on the recorded samples: list, detail + hex dump, filter bar, every panel,
marks/copy/help, and the live source against a real control-socket Hub.

Expected values come from the samples' golden files and from the recording reader, not from the UI.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, OptionList, Sparkline, Tree

from dissectors import fuse as F
from fsinspect.analysis import Analyzer
from fsinspect.analysis.render import exchange_json
from fsinspect.live.hub import Hub
from fsinspect.recording.reader import RecordingReader
from fsinspect.recording.replay import analyze
from fsinspect.tui.app import FsInspectApp, HelpScreen
from fsinspect.tui.panels import ControlPanel, InodePanel, StatsPanel, SubmountPanel
from fsinspect.tui.sources import AttachSource, ReplaySource, Store
from fsinspect.tui.widgets import DetailPane, ExchangeList, FilterBar, completions

SAMPLES = Path(__file__).resolve().parent.parent / "recordings" / "samples"
SYNCFS = SAMPLES / "guest-syncfs.pcapng"
WORKLOAD = SAMPLES / "fusedev-workload.pcapng"
SIZE = (160, 48)


def golden(name: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (SAMPLES / f"{name}.golden.jsonl").read_text().splitlines() if x.strip()]


async def wait_for(pilot: Any, cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the UI"
        await pilot.pause(0.05)


def replay_app(path: Path = SYNCFS) -> FsInspectApp:
    return FsInspectApp(ReplaySource(Store(), str(path)))


async def loaded(pilot: Any, app: FsInspectApp) -> None:
    await wait_for(pilot, lambda: app.store.done)
    await pilot.pause(0.3)  # a tick picks the last rows up


def visible_rows(app: FsInspectApp) -> list[str]:
    lst = app.xlist
    return [lst.render_line(y).text for y in range(lst.size.height)]


def test_replay_list_follow_pause_and_rows() -> None:
    gold = golden("guest-syncfs")

    async def run() -> None:
        app = replay_app()
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            lst = app.xlist
            assert len(app.store.exchanges) == len(gold) == lst.count
            # Follow mode: the cursor sits on the newest exchange, and it is on screen.
            assert lst.follow and lst.cursor == len(gold) - 1
            rows = visible_rows(app)
            assert any(gold[-1]["opcode"] in r for r in rows)
            # Moving up leaves follow mode; End comes back.
            await pilot.press("up", "up")
            assert not lst.follow and lst.cursor == len(gold) - 3
            await pilot.press("end")
            assert lst.follow and lst.cursor == len(gold) - 1
            # Every column: time, queue, unique, opcode, nodeid -> path, summary, errno name, latency.
            await pilot.press("home")
            first_enoent = next(g for g in gold if g["error"] == "ENOENT")
            lst.go(first_enoent["index"], follow=False)
            await pilot.pause()
            row = lst.render_line(lst.cursor - lst.scroll_offset.y)
            text = row.text
            assert f" {first_enoent['unique']} " in text and first_enoent["opcode"] in text and "ENOENT" in text
            assert "name=" in text and "µs" in text
            # The errno is coloured (red), not just named.
            seg = next(s for s in row if "ENOENT" in s.text)
            assert seg.style is not None and seg.style.color is not None and seg.style.color.name == "red"
            # Pause freezes the row count.
            await pilot.press("p")
            assert lst.paused
            await pilot.press("p")
            assert not lst.paused

    asyncio.run(run())


def test_detail_pane_tree_hex_highlight_and_request_reply_jump() -> None:
    gold = golden("guest-syncfs")
    lookup = next(g for g in gold if g["opcode"] == "LOOKUP" and g["error"] is None)
    with RecordingReader(SYNCFS) as r:
        an = analyze(r)
    ex = an.exchanges[lookup["index"]]

    async def run() -> None:
        app = replay_app()
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            app.jump(lookup["index"])
            detail = app.query_one(DetailPane)
            await wait_for(pilot, lambda: detail.index == lookup["index"])
            assert detail.index == lookup["index"] and detail.side == "request"
            texts = [ln.text for ln in detail.lines]
            assert any(t.startswith("opcode = LOOKUP") for t in texts)
            # The name field: its offset/size point at the name bytes in the captured request.
            i = next(k for k, ln in enumerate(detail.lines) if ln.text.startswith("name = "))
            await pilot.press("tab")
            fields = detail.query_one("#fields", OptionList)
            fields.highlighted = i
            await pilot.pause(0.1)
            ln = detail.highlighted_field
            assert ln is not None and ln.offset == 40
            name = ex.request.args["name"]
            assert detail.raw[ln.offset:ln.offset + ln.size] == name + b"\0"
            hexw = str(detail.query_one("#hex").render())
            assert "0020" in hexw
            # The highlighted bytes are styled in the hex dump.
            lit = "".join(detail.hex_text.plain[sp.start:sp.end] for sp in detail.hex_text.spans
                          if "reverse" in str(sp.style))
            assert lit == (name + b"\0").hex() + name.decode() + "."  # the hex bytes, then the ASCII column
            # The descriptor chain as recorded.
            assert "descriptor chain" in str(detail.query_one("#layout").render())
            # r (from the list too): the reply side of the same exchange (its entry's nodeid in the tree).
            app.xlist.focus()
            await pilot.press("r")
            await pilot.pause(0.1)
            assert detail.side == "reply"
            nodeid = ex.reply.args["entry"].nodeid
            assert any(t == f"nodeid = {nodeid}" for t in (x.text for x in detail.lines))
            assert detail.raw[:4] == len(detail.raw).to_bytes(4, "little") or len(detail.raw) < ex.reply_len

    asyncio.run(run())


def test_filter_bar_validates_completes_and_filters() -> None:
    gold = golden("guest-syncfs")
    want_syncfs = [g["index"] for g in gold if g["opcode"] == "SYNCFS"]
    want_enoent = [g["index"] for g in gold if g["error"] == "ENOENT"]
    assert completions("op == SYN") == ["SYNCFS"]
    assert "ENOENT" in completions("error == ENO")
    assert "submount" in completions("sub")

    async def run() -> None:
        app = replay_app()
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            await pilot.press("slash")
            bar = app.query_one(FilterBar)
            assert bar.has_class("open") and bar.input.has_focus
            await pilot.press(*"op == LOKUP")
            await pilot.pause(0.1)
            assert bar.input.has_class("-invalid")
            ferr = bar.query_one("#ferr")
            err = str(ferr.render())
            # The caret sits on the screen column of the bad opcode (column 7 of the text).
            assert "unknown opcode" in err
            assert ferr.content_region.x + err.index("^") == bar.input.content_region.x + 7 - 1
            await pilot.press(*["backspace"] * 5, *"SYN")
            await pilot.pause(0.1)
            await pilot.press("tab")
            assert bar.input.value == "op == SYNCFS"
            assert not bar.input.has_class("-invalid")
            await pilot.press("enter")
            await pilot.pause(0.3)
            assert app.filter is not None and list(app.filter.view) == want_syncfs
            assert app.xlist.count == len(want_syncfs) and app.xlist.has_focus
            rows = [r for r in visible_rows(app) if r.strip()]
            assert len(rows) == len(want_syncfs) and all("SYNCFS" in r for r in rows)
            # Another filter, then Esc clears it.
            app.apply_filter("error == ENOENT")
            await pilot.pause(0.2)
            assert list(app.filter.view) == want_enoent
            await pilot.press("escape")
            await pilot.pause(0.2)
            assert app.filter is None and app.xlist.count == len(gold)

    asyncio.run(run())


def test_inode_panel_tree_submount_root_and_lint_jump(tmp_path: Path) -> None:
    """A copy of the sample whose first GETATTR reply was lost: the next request on that descriptor chain is
    flagged (duplicate-in-flight), and selecting the lint shows that exchange."""
    path = tmp_path / "lost-reply.pcapng"
    gold = golden("guest-syncfs")
    lost = next(g for g in gold if g["opcode"] == "GETATTR")
    with RecordingReader(SYNCFS) as r:
        off = next(rec.offset for rec in r.records() if rec.is_fuse and not rec.inbound
                   and int.from_bytes(rec.data[8:16], "little") == lost["unique"])  # fuse_out_header.unique
    blob = SYNCFS.read_bytes()
    blen = int.from_bytes(blob[off + 4:off + 8], "little")  # the pcapng block's total length
    path.write_bytes(blob[:off] + blob[off + blen:])  # the same recording minus that reply's block
    with RecordingReader(path) as r:
        expect = analyze(r).lints
    assert [lint.name for lint in expect] == ["duplicate-in-flight"]
    target = expect[0].exchange

    async def run() -> None:
        app = replay_app(path)
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            await pilot.press("2")
            await pilot.pause(0.3)
            panel = app.query_one(InodePanel)
            tree = panel.query_one("#itree", Tree)
            labels: list[str] = []

            def walk(node: Any) -> None:
                labels.append(str(node.label))
                for c in node.children:
                    walk(c)
            walk(tree.root)
            assert labels[0].startswith("/") and "nodeid=1" in labels[0]
            sub = [x for x in labels if "SUBMOUNT root" in x]
            assert sub and any("attr.flags=SUBMOUNT" in x for x in sub)
            assert panel.lint_targets == [target]
            lints = panel.query_one("#lints", OptionList)
            lints.focus()
            lints.highlighted = 0
            await pilot.press("enter")
            await pilot.pause(0.2)
            assert app.active_tab == "exchanges" and app.xlist.selected == target
            assert "duplicate-in-flight" in app.store.exchanges[target].lints
            assert "displaced" in " ".join(app.store.exchanges[lost["index"]].notes)

    asyncio.run(run())


def test_submount_panel_superblocks_and_syncfs() -> None:
    gold = golden("guest-syncfs")
    syncfs = [g for g in gold if g["opcode"] == "SYNCFS"]

    async def run() -> None:
        app = replay_app()
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            await pilot.press("3")
            await pilot.pause(0.3)
            panel = app.query_one(SubmountPanel)
            sb = panel.query_one("#sb", DataTable)
            sy = panel.query_one("#sync", DataTable)
            roots = {str(sb.get_row_at(i)[0]) for i in range(sb.row_count)}
            with RecordingReader(SYNCFS) as r:
                an = analyze(r)
            assert roots == {"1", *(str(n) for n in an.submounts.announced)}
            assert len(roots) >= 3  # the root and the two nested tmpfs submounts
            assert sy.row_count == len(syncfs)
            assert [int(str(sy.get_row_at(i)[0])[1:]) for i in range(sy.row_count)] == \
                [g["index"] + 1 for g in syncfs]  # the `#` numbers: 1-based
            # Each SYNCFS row names its superblock by path and nodeid, and flags nothing (all are roots).
            where = [str(sy.get_row_at(i)[1]) for i in range(sy.row_count)]
            paths = {"1": "/"}
            for a in an.submounts.announced.values():  # in announcement order: a parent comes first
                paths[str(a.nodeid)] = paths[str(a.parent)].rstrip("/") + "/" + a.name.decode()
            assert where == [f"{paths[str(g['nodeid'])]} (nodeid {g['nodeid']})" for g in syncfs], where
            assert {w.split(" (")[0] for w in where} == {"/", "/sub", "/sub/inner"}
            assert not any("superblock root" in w for w in where)
            assert "guest st_dev" not in [str(c.label) for c in sb.columns.values()]
            # Enter on a SYNCFS row shows that exchange.
            sy.focus()
            sy.move_cursor(row=1)
            await pilot.press("enter")
            await pilot.pause(0.2)
            assert app.active_tab == "exchanges" and app.xlist.selected == syncfs[1]["index"]
            # Enter on a superblock row shows its announcing exchange (a LOOKUP with SUBMOUNT).
            await pilot.press("3")
            await pilot.pause(0.2)
            sb.focus()
            sb.move_cursor(row=1)
            await pilot.press("enter")
            await pilot.pause(0.2)
            first = next(iter(an.submounts.announced.values()))
            assert app.xlist.selected == first.exchange
            assert app.store.exchanges[first.exchange].submount

    asyncio.run(run())


def test_stats_panel_counts_and_sparklines() -> None:
    gold = golden("fusedev-workload")
    counts: dict[str, int] = {}
    for g in gold:
        counts[g["opcode"]] = counts.get(g["opcode"], 0) + 1

    async def run() -> None:
        app = replay_app(WORKLOAD)
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            await pilot.press("4")
            await pilot.pause(0.3)
            panel = app.query_one(StatsPanel)
            t = panel.query_one("#ops_table", DataTable)
            shown = {str(t.get_row_at(i)[0]): int(str(t.get_row_at(i)[1]))
                     for i in range(t.row_count)}
            assert shown == counts
            errs = {str(t.get_row_at(i)[0]): int(str(t.get_row_at(i)[2]))
                    for i in range(t.row_count)}
            assert errs["LOOKUP"] == sum(1 for g in gold if g["opcode"] == "LOOKUP" and g["error"])
            ops = panel.query_one("#ops", Sparkline).data
            # A sub-second capture: sub-second buckets, labelled, so the sparkline is not one solid block.
            label = str(panel.query_one("#opslabel").render())
            m = re.search(r"per ([\d.]+)(ms|µs) bucket", label)
            assert m is not None, label
            bucket_s = float(m.group(1)) / (1e3 if m.group(2) == "ms" else 1e6)
            assert ops and len(ops) > 10 and len(set(ops)) > 2 and round(sum(ops) * bucket_s) == len(gold)
            assert sum(panel.query_one("#bytes", Sparkline).data or ()) > 0
            assert f"{len(gold)} exchanges" in str(panel.query_one("#totals").render())

    asyncio.run(run())


def test_control_panel_replay_messages() -> None:
    from dissectors import vhost_user as V
    from dissectors.spec import vhost_user as vspec
    from dissectors.spec import virtio as vio

    with RecordingReader(SYNCFS) as r:
        ctrl = [(rec, V.decode_message(rec.data)) for rec in r.records() if not rec.is_fuse]
    n_ctrl = len(ctrl)
    assert n_ctrl > 0
    replies = [(rec.notes, m.payload.u64) for rec, m in ctrl if m.is_reply and m.name == "GET_FEATURES"]
    offered = next(v for notes, v in replies if not notes)
    to_qemu = next(v for notes, v in replies if "as sent to QEMU" in notes)
    acked = next(m.payload.u64 for rec, m in ctrl if m.name == "SET_FEATURES" and rec.inbound and not rec.notes)
    kicks = sum(1 for rec, m in ctrl if m.name == "SET_VRING_KICK" and rec.inbound and "1 fd(s)" in rec.notes
                and len(rec.notes) == 1)
    regions = next(m.payload for rec, m in ctrl if m.name == "SET_MEM_TABLE" and rec.inbound and not m.is_reply)

    async def run() -> None:
        app = replay_app()
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            await pilot.press("5")
            await pilot.pause(0.3)
            panel = app.query_one(ControlPanel)
            assert len(app.store.control) == n_ctrl
            msgs = str(panel.query_one("#cmsgs_text").render())
            assert f"vhost-user messages ({n_ctrl}" in msgs
            assert "SET_MEM_TABLE" in msgs or "ADD_MEM_REG" in msgs
            assert "SET_VRING_KICK" in msgs and "SET_VRING_CALL" in msgs
            state = str(panel.query_one("#cstate_text").render())
            assert "CAPTURE HEALTH" in state and "overflow): 0" in state
            assert f"virtio features offered: {offered:#x}" in state
            assert f"virtio features acked: {acked:#x}" in state
            assert f"virtio features masked by the proxy: {offered & ~to_qemu:#x}" in state
            # The proxy forwards EVENT_IDX now: the shipped sample must not say it masks it.
            assert offered & (1 << 29) and to_qemu & (1 << 29) and "EVENT_IDX" not in state.split("masked by")[1]
            assert f"MEMORY REGIONS ({len(regions)})" in state
            # Feature names whole (VHOST_USER_F_PROTOCOL_FEATURES, not USER_F_PROTOCOL_FEATURES), and the
            # wrapped lines on screen break between names, never inside one.
            assert "VHOST_USER_F_PROTOCOL_FEATURES" in state and "VIRTIO_F_VERSION_1" in state
            names = {n for fs in (vio.VIRTIO_F, vspec.PROTOCOL_F) for n, _ in fs.bits}
            box = panel.query_one("#cstate_text")
            shown = [box.render_line(y).text for y in range(box.size.height)]
            assert len(shown) > len(state.splitlines()), "nothing wrapped: the check would prove nothing"
            cut = [w for line in shown for w in re.findall(r"[A-Z0-9_]*_F_[A-Z0-9_]*", line)
                   if w not in names and w.upper() == w]
            assert not cut, (cut, shown)
            assert f"gpa={regions[-1].guest_address:#x} size={regions[-1].size:#x}" in state
            f = app.store.features
            assert sum(v["kick_changes"] for v in f["vrings"].values()) == kicks

    asyncio.run(run())


def test_marks_copy_write_and_help(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    gold = golden("guest-syncfs")

    async def run() -> None:
        app = replay_app()
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            lst = app.query_one(ExchangeList)
            await pilot.press("home", "m", "down", "down", "m", "home")
            assert lst.marks == {0, 2}
            await pilot.press("n")
            assert lst.selected == 2
            await pilot.press("N")
            assert lst.selected == 0
            assert visible_rows(app)[0].startswith("●")
            await pilot.press("e")  # next error
            assert lst.selected == next(g["index"] for g in gold if g["error"])
            await pilot.press("y")
            assert app.last_copy is not None and app.last_copy.startswith(f"exchange #{lst.selected + 1}:")
            assert "FUSE request" in app.last_copy and "FUSE reply" in app.last_copy
            await pilot.press("Y")
            assert json.loads(app.last_copy)["index"] == lst.selected
            await pilot.press("w")
            await pilot.pause(0.1)
            wpath = tmp_path / f"fsinspect-exchange-{lst.selected + 1}.json"
            written = json.loads(wpath.read_text())
            assert wpath.stat().st_mode & 0o777 == 0o600  # the guest's names and data: private
            assert written["opcode"] == gold[lst.selected]["opcode"]
            assert written["error"] == gold[lst.selected]["error"]
            await pilot.press("question_mark")
            await pilot.pause(0.1)
            assert isinstance(app.screen, HelpScreen)
            await pilot.pause(0.3)  # ticks keep running under the help screen
            await pilot.press("escape")
            await pilot.pause(0.1)
            assert not isinstance(app.screen, HelpScreen)
            await pilot.press("q")
        assert app.return_code in (0, None)

    asyncio.run(run())


def _publish_sample(hub: Hub, lock: Any, path: Path) -> Analyzer:
    """Run the sample through a real Analyzer whose finished exchanges the real Hub publishes (as a proxy does)."""
    an = Analyzer(keep_exchanges=False, keep_raw=True)
    an.listeners.append(hub.publish_exchange)
    with RecordingReader(path) as r:
        for rec in r.records():
            with lock:
                if not rec.is_fuse:
                    continue
                if rec.inbound:
                    an.feed_request(rec.data, rec.queue, rec.head, rec.ts_ns, orig_len=rec.orig_len)
                else:
                    an.feed_reply(rec.data, rec.queue, rec.head, rec.ts_ns, orig_len=rec.orig_len)
    return an


def test_attach_live_hub_snapshot_stream_and_overflow(tmp_path: Path) -> None:
    """The attach source against the proxy's real Hub: snapshot, live exchanges decoded from raw bytes,
    the inode map and submounts rebuilt, then an overflow shown when the client falls behind."""
    ctrl = str(tmp_path / "ctrl.sock")
    gold = golden("guest-syncfs")
    import threading

    lock = threading.RLock()
    hub = Hub(ctrl, lambda: {"inodes": [], "stats": {}, "lints": [], "submounts": [], "syncfs": [],
                             "features": {"features_offered": 1 << 32, "features_acked": 1 << 32,
                                          "features_masked": 1 << 29, "regions": [], "vrings": {}},
                             "capture": {"captured": 0, "dropped": 0, "stalls": 0}},
              feed_lock=lock, queue_len=100_000)
    try:
        store = Store()
        src = AttachSource(store, ctrl)
        src.connect()
        app = FsInspectApp(src, title="live test")

        async def run() -> None:
            async with app.run_test(size=SIZE) as pilot:
                await wait_for(pilot, lambda: store.status.startswith("attached"))
                await asyncio.to_thread(_publish_sample, hub, lock, SYNCFS)
                await wait_for(pilot, lambda: len(store.exchanges) == len(gold))
                await pilot.pause(0.3)
                # Same multiset of (opcode, unique, error) as the golden file: decoded from the live raw bytes.
                got = sorted((e.opname, e.unique, e.errname) for e in store.exchanges)
                want = sorted((g["opcode"], g["unique"], g["error"]) for g in gold)
                assert got == want
                assert all(e.request is not None for e in store.exchanges if e.opcode >= 0)
                # Detail pane: hex bytes from the stream.
                app.jump(store.exchanges[2].index)
                det = app.query_one(DetailPane)
                await wait_for(pilot, lambda: det.index == store.exchanges[2].index)
                assert int.from_bytes(det.raw[:4], "little") == store.exchanges[2].req_len >= 40
                assert det.raw[4:8] == store.exchanges[2].opcode.to_bytes(4, "little")
                # Inode map and submounts rebuilt locally from the live stream.
                assert store.analyzer.submounts.announced
                await pilot.press("3")
                await pilot.pause(0.3)
                assert app.query_one(SubmountPanel).query_one("#sync", DataTable).row_count == sum(
                    1 for g in gold if g["opcode"] == "SYNCFS")
                await pilot.press("5")
                await pilot.pause(0.3)
                state = str(app.query_one(ControlPanel).query_one("#cstate_text").render())
                assert "masked by the proxy: 0x20000000 EVENT_IDX" in state or "EVENT_IDX" in state
                assert app.sub_title == "live test"

        asyncio.run(run())
    finally:
        src.stop()
        hub.close()


def test_attach_refused_by_a_full_hub_says_why(tmp_path: Path) -> None:
    """A hub at its client cap answers with one error line and closes: the status line says why."""
    hub = Hub(str(tmp_path / "ctrl.sock"), lambda: {}, max_clients=0)
    try:
        store = Store()
        src = AttachSource(store, hub.path)
        src.connect()
        src.run()  # returns at the hub's EOF
        assert store.status == ("the proxy closed the control socket: too many control clients (0 attached): "
                                "try again later")
    finally:
        hub.close()


def test_attach_overflow_is_shown(tmp_path: Path) -> None:
    """A client whose queue is tiny misses messages; the hub tells it, and the status line says so."""
    ctrl = str(tmp_path / "ctrl.sock")
    import threading

    lock = threading.RLock()
    hub = Hub(ctrl, lambda: {}, feed_lock=lock, queue_len=8)
    store = Store()
    src = AttachSource(store, ctrl)
    src.connect()
    try:
        app = FsInspectApp(src)

        async def run() -> None:
            async with app.run_test(size=SIZE) as pilot:
                await wait_for(pilot, lambda: store.status.startswith("attached"))
                await asyncio.to_thread(_publish_sample, hub, lock, WORKLOAD)
                await wait_for(pilot, lambda: store.overflow > 0)
                await pilot.pause(0.3)
                assert "OVERFLOW" in str(app.statusline.render())
                assert len(store.exchanges) + store.overflow <= len(golden("fusedev-workload")) + 1

        asyncio.run(run())
    finally:
        src.stop()
        hub.close()


def test_attach_missing_socket_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fsinspect.cli import main

    rc = main(["attach", str(tmp_path / "nope.sock")])
    assert rc != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot connect to" in err and "nope.sock" in err


def test_replay_command_bad_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fsinspect.cli import main

    bad = tmp_path / "x.pcapng"
    bad.write_bytes(b"not a recording at all")
    assert main(["replay", str(bad)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a pcapng file" in err


def test_commands_import_textual_lazily() -> None:
    import subprocess
    import sys

    code = ("import sys, fsinspect.cli as c; c.build_parser(); "
            "print('textual' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SAMPLES.parent.parent)})
    assert out.stdout.strip() == "False"


def test_exchange_json_raw_round_trip() -> None:
    """What the hub sends (exchange_json raw=True) carries the bytes the attach source re-decodes."""
    with RecordingReader(SYNCFS) as r:
        an = analyze(r, Analyzer(keep_raw=True))
    ex = next(e for e in an.exchanges if e.opname == "LOOKUP")
    d = exchange_json(ex, raw=True)
    assert bytes.fromhex(d["request_raw"]) == ex.req_raw and d["request_len"] == ex.req_len
    assert ex.request is not None
    assert F.decode_request(bytes.fromhex(d["request_raw"])).args["name"] == ex.request.args["name"]


def test_rows_fit_every_terminal_width() -> None:
    """Every row and the header are exactly as wide as the list, from a small terminal to a wide one."""
    from fsinspect.tui.render import header_text, row_text

    with RecordingReader(SYNCFS) as r:
        an = analyze(r)
    t0 = an.exchanges[0].ts_ns
    for width in (60, 80, 100, 120, 160, 240):
        assert header_text(width).cell_len == width
        for ex in an.exchanges:
            t = row_text(ex, "/some/longer/path/than/the/column", width, t0, ex.index % 2 == 0)
            assert t.cell_len == width, (width, ex.index, t.plain)
            if width >= 100:  # the result column stays readable
                assert (ex.errname or "") in t.plain


def test_attach_keeps_a_bounded_window(tmp_path: Path) -> None:
    """A live session forgets its oldest exchanges beyond `keep`: the list, filter, marks and jumps follow."""
    import threading

    ctrl = str(tmp_path / "ctrl.sock")
    gold = golden("guest-syncfs")
    lock = threading.RLock()
    hub = Hub(ctrl, lambda: {}, feed_lock=lock, queue_len=100_000)
    store = Store()
    src = AttachSource(store, ctrl, keep=20)
    src.connect()
    try:
        app = FsInspectApp(src)

        async def run() -> None:
            async with app.run_test(size=SIZE) as pilot:
                await wait_for(pilot, lambda: store.status.startswith("attached"))
                await pilot.press("home", "m")  # a mark on an exchange that will be forgotten
                await asyncio.to_thread(_publish_sample, hub, lock, SYNCFS)
                await wait_for(pilot, lambda: store.end == len(gold))
                await pilot.pause(0.3)
                assert store.base > 0 and len(store.exchanges) <= 20
                assert [e.index for e in store.exchanges] == list(range(store.base, store.end))
                lst = app.xlist
                assert lst.count == len(store.exchanges) and lst.selected == store.end - 1
                assert all(m >= store.base for m in lst.marks)
                rows = [r for r in visible_rows(app) if r.strip()]
                assert len(rows) == len(store.exchanges)
                assert f"keeping the newest {len(store.exchanges)}" in str(app.statusline.render())
                # A filter sees only what is kept.
                app.apply_filter("op == SYNCFS")
                await pilot.pause(0.2)
                assert app.filter is not None
                assert list(app.filter.view) == [e.index for e in store.exchanges if e.opname == "SYNCFS"]
                # Jumping to a forgotten exchange says so instead of failing.
                app.jump(0)
                await pilot.pause(0.2)
                assert app.filter is None and lst.selected != 0
                app.detail.show(0)
                assert "no longer kept" in str(app.detail.query_one("#title").render())

        asyncio.run(run())
    finally:
        src.stop()
        hub.close()


def test_filter_completion_follows_the_parser() -> None:
    """After a complete value comes `and`/`or`, never a flag name (`latency > 500µs` offered `snapped`)."""
    assert completions("latency > 500µs") == [" and", " or"]
    assert completions("latency > 500µs ") == ["and", "or"]
    assert completions("op == LOOKUP") == [" and", " or"]
    assert "snapped" not in completions("latency > 5ms") and completions("op == LOOKUP and sub") == ["submount"]


def test_next_error_and_mark_at_the_end_of_the_list_say_so() -> None:
    async def run() -> None:
        app = replay_app()
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            await pilot.press("end")
            await pilot.press("e")
            await pilot.pause(0.1)
            await pilot.press("n")
            await pilot.pause(0.1)
            said = [n.message for n in app._notifications]
            assert any("no error below this row: the end of the list" in m for m in said), said
            assert any("no marks yet" in m for m in said), said

    asyncio.run(run())


def test_events_read_as_text_not_python_dicts() -> None:
    from fsinspect.tui.render import event_text

    assert event_text({"kind": "vring-enable", "detail": {"index": 1, "enable": True}}) == "vring-enable: index=1 enable=true"
    feats = event_text({"kind": "features", "detail": {"offered": (1 << 32) | (1 << 30), "masked": 0}})
    assert feats == "features: offered=0x140000000 (VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_F_VERSION_1) masked=0"
    mem = event_text({"kind": "mem-table", "detail": {"regions": [{"guest_address": 0, "size": 1 << 30}]}})
    assert mem == "mem-table: regions=[{guest_address=0x0 size=0x40000000}]" and "{'" not in mem


def test_a_detail_shown_after_the_pane_lost_its_children_draws_nothing() -> None:
    """The debounced detail timer can fire while the app closes (Pilot's teardown, a quick quit after opening a
    large replay): it raised NoMatches on '#title' and the UI ended in a traceback."""
    from fsinspect.tui.widgets import DetailPane

    store = Store()
    pane = DetailPane(store, ReplaySource.__new__(ReplaySource))  # never mounted: no children, as after teardown
    pane.show(3)
    assert pane.index == 3
