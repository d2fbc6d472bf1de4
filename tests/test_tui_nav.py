"""Pilot tests of issue 16's navigation: the last row in view, the detail pane keeping up, focus per panel,
and the Wireshark/mitmproxy-style keys (#N go-to, apply as filter, sort, history, export, time travel).

Expected values come from the recordings (reader, analyzer, golden files), not from the UI.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from textual.scrollbar import ScrollBar
from textual.widgets import DataTable, Tree

from fsinspect.recording.reader import Record, RecordingReader
from fsinspect.tui.app import FsInspectApp
from fsinspect.tui.sources import ReplaySource, Source, Store

from .test_tui import SYNCFS, WORKLOAD, golden, loaded, wait_for

SIZES = [(80, 24), (180, 50), (240, 60)]
SOON = 0.8  # seconds: the detail pane's old lag was a full second (FOLLOW_DETAIL_EVERY) behind the list


def last_row_on_screen(app: FsInspectApp) -> bool:
    """The newest row is drawn by the list itself at its screen line (not under a scrollbar, not below)."""
    lst = app.xlist
    row = lst.count - 1
    y = row - lst.scroll_offset.y
    if not 0 <= y < lst.scrollable_content_region.height:
        return False
    widget, _ = app.screen.get_widget_at(lst.scrollable_content_region.x + 2, lst.scrollable_content_region.y + y)
    return widget is lst and not isinstance(widget, ScrollBar)


@pytest.mark.parametrize("size", SIZES)
def test_last_row_visible_end_down_follow(size: tuple[int, int]) -> None:
    async def run() -> None:
        app = FsInspectApp(ReplaySource(Store(), str(WORKLOAD)))
        async with app.run_test(size=size) as pilot:
            await loaded(pilot, app)
            lst = app.xlist
            assert lst.count == len(app.store.exchanges) > lst.scrollable_content_region.height
            assert not lst.show_horizontal_scrollbar  # rows are cut to the width: nothing to scroll sideways
            assert lst.follow and last_row_on_screen(app)  # follow mode shows the newest
            await pilot.press("home")
            assert not last_row_on_screen(app)
            await pilot.press("end")
            await pilot.pause(0.1)
            assert lst.cursor == lst.count - 1 and last_row_on_screen(app)
            await pilot.press("home", *["down"] * (lst.count - 1))
            await pilot.pause(0.1)
            assert lst.cursor == lst.count - 1 and last_row_on_screen(app)
            # The header is as wide as the rows (the vertical scrollbar takes the rest).
            assert len(app.listheader.render().plain) == lst.scrollable_content_region.width

    asyncio.run(run())


class ManualSource(Source):
    """A source the test feeds by hand (the store and the analyzer are the real ones)."""

    kind = "replay"

    def run(self) -> None:
        self._stop.wait()

    def feed(self, recs: list[Record]) -> None:
        st = self.store
        with st.lock:
            for rec in recs:
                if rec.inbound:
                    st.feed_request(rec.data, rec.queue, rec.head, rec.ts_ns, epoch=rec.epoch,
                                    orig_len=rec.orig_len, ref=rec.offset)
                else:
                    st.analyzer.feed_reply(rec.data, rec.queue, rec.head, rec.ts_ns, epoch=rec.epoch,
                                           orig_len=rec.orig_len, ref=rec.offset)
                st.sync_paths()


def fuse_records(path: Path) -> list[Record]:
    with RecordingReader(path) as r:
        return [rec for rec in r.records() if rec.is_fuse]


def test_detail_follows_the_selection_in_follow_mode_and_after_pause() -> None:
    recs = fuse_records(WORKLOAD)
    src = ManualSource(Store())

    async def run() -> None:
        app = FsInspectApp(src)
        async with app.run_test(size=(160, 48)) as pilot:
            lst, detail = app.xlist, app.detail
            src.feed(recs[:20])
            await wait_for(pilot, lambda: detail.index is not None and detail.index == lst.selected)
            # A few more rows right after: the pane follows as soon as the feed rests (not a second later).
            src.feed(recs[20:30])
            await wait_for(pilot, lambda: detail.index == app.store.end - 1, timeout=SOON)
            assert lst.follow and lst.selected == app.store.end - 1
            # A request whose reply comes later: the pane shows the reply once it is there.
            req = next(k for k in range(30, len(recs)) if recs[k].inbound and not recs[k + 1].inbound)
            src.feed(recs[30:req + 1])
            await pilot.press("r")  # the reply side
            await wait_for(pilot, lambda: detail.index == app.store.end - 1 and detail.side == "reply"
                           and bool(detail.lines), timeout=SOON)
            assert lst.selected == detail.index and detail.lines[0].text.startswith("no reply")
            src.feed(recs[req + 1:req + 2])
            await wait_for(pilot, lambda: not detail.lines[0].text.startswith("no reply"), timeout=SOON)
            assert detail.index == lst.selected
            # p freezes the list; p again catches up and the pane shows the newest at once.
            await pilot.press("r", "p")
            src.feed(recs[req + 2:req + 20])
            await pilot.pause(0.2)
            assert lst.selected != app.store.end - 1
            await pilot.press("p")
            await wait_for(pilot, lambda: detail.index == app.store.end - 1, timeout=SOON)
            assert lst.selected == app.store.end - 1
            assert last_row_on_screen(app)

    try:
        asyncio.run(run())
    finally:
        src.stop()


def test_each_panel_focuses_its_main_widget() -> None:
    gold = golden("guest-syncfs")

    async def run() -> None:
        app = FsInspectApp(ReplaySource(Store(), str(SYNCFS)))
        async with app.run_test(size=(160, 48)) as pilot:
            await loaded(pilot, app)
            await pilot.press("2")
            await pilot.pause(0.2)
            tree = app.query_one("#itree", Tree)
            assert app.focused is tree
            assert tree.cursor_line == 0
            await pilot.press("down")
            assert tree.cursor_line == 1  # arrows work at once, no Tab
            await pilot.press("3")
            await pilot.pause(0.2)
            sb = app.query_one("#sb", DataTable)
            assert app.focused is sb
            await pilot.press("down", "enter")  # the first submount's row: Enter jumps to its announcement
            await pilot.pause(0.2)
            announced = app.panels["submounts"].targets["sb"][1]
            assert app.active_tab == "exchanges" and app.xlist.selected == announced
            await pilot.press("4")
            await pilot.pause(0.2)
            assert app.focused is app.query_one("#ops_table", DataTable)
            await pilot.press("5")
            await pilot.pause(0.2)
            assert app.focused is app.query_one("#cstate")
            # Back to the list: Home, e and m act without Tab.
            await pilot.press("1")
            await pilot.pause(0.2)
            assert app.focused is app.xlist
            await pilot.press("home")
            assert app.xlist.cursor == 0
            await pilot.press("e")
            first_err = next(g["index"] for g in gold if g["error"])
            assert app.xlist.selected == first_err
            await pilot.press("m")
            assert app.xlist.marks == {first_err}

    asyncio.run(run())




def test_number_column_goto_and_time_modes() -> None:
    """`#` shows the exchange number; Ctrl-G goes to a number (as printed anywhere) or a time; `t` cycles
    the time column through relative to the first record (tshark's -t r), absolute and delta."""
    gold = golden("guest-syncfs")
    with RecordingReader(SYNCFS) as r:
        recs = list(r.records())
    first_ts = recs[0].ts_ns  # the first record of the file (a vhost-user message): tshark's zero
    fuse = [rec for rec in recs if rec.is_fuse and rec.inbound]

    async def run() -> None:
        app = FsInspectApp(ReplaySource(Store(), str(SYNCFS)))
        async with app.run_test(size=(160, 48)) as pilot:
            await loaded(pilot, app)
            lst = app.xlist
            assert app.listheader.render().plain.split()[0] == "#"
            # Ctrl-G #N: the row shows N in its # column, and the detail title says #N.
            target = gold[len(gold) // 2]
            await pilot.press("ctrl+g", *f"#{target['index'] + 1}", "enter")
            await pilot.pause(0.3)
            assert lst.selected == target["index"] and not lst.follow
            row = lst.render_line(lst.cursor - lst.scroll_offset.y).text
            assert row.split()[0] == str(target["index"] + 1) and target["opcode"] in row
            assert str(app.detail.query_one("#title").render()).startswith(f" #{target['index'] + 1} ")
            # Every #N the panels print leads back to the same exchange: the lints' and SYNCFS's.
            await pilot.press("3")
            await pilot.pause(0.3)
            sync = app.query_one("#sync", DataTable)
            shown = str(sync.get_row_at(0)[0])
            await pilot.press("1", "ctrl+g", *shown, "enter")
            await pilot.pause(0.3)
            assert lst.selected == app.panels["submounts"].targets["sync"][0]
            # A time relative to the first record: the first exchange at or after it.
            k = len(fuse) // 3
            rel = (fuse[k].ts_ns - first_ts) / 1e9
            await pilot.press("ctrl+g", *f"+{rel:.9f}", "enter")
            await pilot.pause(0.3)
            ex = app.store.get(lst.selected)
            assert ex is not None and ex.ts_ns == fuse[k].ts_ns
            # Nonsense keeps the prompt open with a reason.
            await pilot.press("ctrl+g", *"banana", "enter")
            await pilot.pause(0.2)
            assert "neither an exchange number" in str(app.screen.query_one("#perr").render())
            await pilot.press("escape")
            await pilot.pause(0.1)
            # t: relative (default) -> absolute -> delta -> relative.
            ex = app.store.get(lst.selected)
            prev = app.store.get(lst.index_at(lst.cursor - 1))
            assert ex is not None and prev is not None

            def time_cell() -> str:
                return lst.render_line(lst.cursor - lst.scroll_offset.y).text.split()[1]

            assert time_cell() == f"{(ex.ts_ns - first_ts) / 1e9:.6f}"
            await pilot.press("t")
            await pilot.pause(0.1)
            assert time_cell() == time.strftime("%H:%M:%S", time.localtime(ex.ts_ns // 10**9)) + \
                f".{ex.ts_ns % 10**9 // 1000:06d}"
            assert "time (abs)" in app.listheader.render().plain
            await pilot.press("t")
            await pilot.pause(0.1)
            assert time_cell() == f"{(ex.ts_ns - prev.ts_ns) / 1e9:.6f}"
            await pilot.press("t")
            await pilot.pause(0.1)
            assert time_cell() == f"{(ex.ts_ns - first_ts) / 1e9:.6f}"

    asyncio.run(run())


def test_apply_as_filter_field_inode_superblock_and_path_column() -> None:
    """Enter / a on a decoded field, an inode-map row or a superblock filter on it; A narrows; `path` is a
    filter column.  Expected sets come from the analyzer and the store's paths, not from the UI."""
    gold = golden("guest-syncfs")

    async def run() -> None:
        app = FsInspectApp(ReplaySource(Store(), str(SYNCFS)))
        async with app.run_test(size=(160, 48)) as pilot:
            await loaded(pilot, app)
            st = app.store
            # path ~ "sub": every exchange whose nodeid was under a path containing "sub" when it came.
            app.apply_filter('path ~ "sub"')
            await pilot.pause(0.3)
            want = [e.index for e in st.exchanges if "sub" in st.path(e.index)]
            assert app.filter is not None and list(app.filter.view) == want and len(want) > 5
            app.apply_filter("")
            # A decoded field: the first SYNCFS's nodeid line -> nodeid == N (Enter), then A with op.
            sync = next(g for g in gold if g["opcode"] == "SYNCFS" and g["nodeid"] != 1)
            app.jump(sync["index"])
            await wait_for(pilot, lambda: app.detail.index == sync["index"])
            fields = app.detail.query_one("#fields")
            fields.focus()
            await pilot.pause()
            k = next(i for i, ln in enumerate(app.detail.lines) if ln.text == f"nodeid = {sync['nodeid']}")
            fields.highlighted = k
            await pilot.press("enter")
            await pilot.pause(0.3)
            assert app.filter is not None and app.filter.text == f"nodeid == {sync['nodeid']}"
            assert list(app.filter.view) == [g["index"] for g in gold if g["nodeid"] == sync["nodeid"]]
            # The replay's filter fills its view in a thread: the selection comes back when it reaches it.
            await wait_for(pilot, lambda: app.focused is app.xlist and app.xlist.selected == sync["index"])
            await wait_for(pilot, lambda: app.detail.index == sync["index"])
            await pilot.pause(0.2)  # the pane reloads once the list has settled on the new view
            fields.focus()
            await pilot.pause()
            fields.highlighted = 0  # "request SYNCFS (50) ..." -> op == SYNCFS, anded with A
            await pilot.press("A")
            await pilot.pause(0.3)
            assert app.filter.text == f"(nodeid == {sync['nodeid']}) and op == SYNCFS"
            assert list(app.filter.view) == [g["index"] for g in gold
                                       if g["nodeid"] == sync["nodeid"] and g["opcode"] == "SYNCFS"]
            # A reply field by its dotted path (a LOOKUP's entry.attr.ino), with a.
            look = next(e for e in st.exchanges if e.opname == "LOOKUP" and not e.error)
            app.apply_filter("")
            app.jump(look.index)
            await pilot.press("r")
            await wait_for(pilot, lambda: app.detail.index == look.index and app.detail.side == "reply")
            await pilot.pause(0.2)
            fields.focus()
            await pilot.pause()
            fields.highlighted = next(i for i, ln in enumerate(app.detail.lines) if ln.text.startswith("attr.ino = "))
            await pilot.press("a")
            await pilot.pause(0.3)
            ino = look.reply.args["entry"].attr.ino
            assert app.filter.text == f"entry.attr.ino == {ino}"
            assert list(app.filter.view) == [e.index for e in st.exchanges if e.arg("entry.attr.ino") == ino]
            await pilot.press("r")
            # An inode-map row: Enter filters on its nodeid.
            await pilot.press("2")
            await pilot.pause(0.3)
            tree = app.query_one("#itree", Tree)
            tree.move_cursor(next(n for n in tree.root.children if n.data is not None))
            nodeid = tree.cursor_node.data
            await pilot.press("enter")
            await pilot.pause(0.3)
            assert app.active_tab == "exchanges" and app.filter.text == f"nodeid == {nodeid}"
            assert list(app.filter.view) == [e.index for e in st.exchanges if e.opcode >= 0 and e.nodeid == nodeid]
            # A superblock: a on /sub keeps what is under /sub and not under /sub/inner (its own superblock).
            await pilot.press("3")
            await pilot.pause(0.3)
            await pilot.press("down", "a")
            await pilot.pause(0.3)
            sub = str(app.query_one("#sb", DataTable).get_row_at(1)[1])
            inner = [str(app.query_one("#sb", DataTable).get_row_at(r)[1]) for r in range(2, 3)]
            assert sub == "/sub" and inner == ["/sub/inner (forgotten)"]  # forgotten by the end: still a superblock
            assert list(app.filter.view) == [e.index for e in st.exchanges
                                       if (st.path(e.index) + "/").startswith("/sub/")
                                       and not (st.path(e.index) + "/").startswith("/sub/inner/")]
            assert app.filter.view

    asyncio.run(run())


def test_sort_by_latency_top_n_per_opcode_and_filter_history() -> None:
    gold = golden("fusedev-workload")

    async def run() -> None:
        app = FsInspectApp(ReplaySource(Store(), str(WORKLOAD)))
        async with app.run_test(size=(160, 48)) as pilot:
            await loaded(pilot, app)
            st, lst = app.store, app.xlist

            def lat(i: int) -> int:
                ex = st.get(i)
                assert ex is not None
                return ex.latency_ns if ex.latency_ns is not None else -1

            await pilot.press("s")
            await pilot.pause(0.2)
            rows = [lst.index_at(r) for r in range(lst.count)]
            assert sorted(rows) == list(range(len(gold)))  # every exchange, once
            lats = [lat(i) for i in rows if lat(i) >= 0]
            assert lats == sorted(lats, reverse=True) and lst.selected == max(range(len(gold)), key=lat)
            assert "SORTED by latency" in str(app.statusline.render())
            await pilot.press("down", "down")
            keep = lst.selected
            await pilot.press("s")  # capture order again, on the same exchange
            await pilot.pause(0.2)
            assert lst.order is None and lst.selected == keep and lst.index_at(0) == 0
            # Stats: Enter on an opcode -> its exchanges, slowest first.
            await pilot.press("4")
            await pilot.pause(0.3)
            table = app.query_one("#ops_table", DataTable)
            names = [str(table.get_row_at(r)[0]) for r in range(table.row_count)]
            r = names.index("READ")
            table.move_cursor(row=r)
            await pilot.press("enter")
            await pilot.pause(0.3)
            reads = sorted((g["index"] for g in gold if g["opcode"] == "READ"), key=lambda i: -lat(i))
            assert app.active_tab == "exchanges" and app.filter is not None and app.filter.text == "op == READ"
            assert [lst.index_at(r) for r in range(lst.count)] == reads
            # Filter history: ↑ walks back through what was applied, ↓ returns to the typed line.
            app.apply_filter("error == ENOENT")
            app.apply_filter("latency > 1ms")
            await pilot.press("slash")
            bar = app.filterbar
            bar.input.value = "nodeid =="
            await pilot.press("up")
            assert bar.input.value == "latency > 1ms"
            await pilot.press("up", "up")
            assert bar.input.value == "op == READ"
            await pilot.press("down")
            assert bar.input.value == "error == ENOENT"
            await pilot.press("down", "down")
            assert bar.input.value == "nodeid =="
            await pilot.press("up", "up", "enter")
            await pilot.pause(0.3)
            assert app.filter.text == "error == ENOENT"
            assert bar.history[-1] == "error == ENOENT" and bar.history.count("error == ENOENT") == 1

    asyncio.run(run())


def test_filter_decoded_fields_and_path() -> None:
    """Every decoded field the detail pane can apply as a filter compiles and keeps its own exchange; the
    dotted paths reach the decoded values; `path` needs the UI's paths and says so elsewhere."""
    from fsinspect.analysis import FilterError, compile_filter
    from fsinspect.recording.replay import analyze
    from fsinspect.tui.render import field_lines

    with RecordingReader(WORKLOAD) as r:
        an = analyze(r)
    seen = set()
    for ex in an.exchanges:
        for m in (ex.request, ex.reply):
            for ln in field_lines(m) if m is not None else ():
                if ln.filter:
                    assert compile_filter(ln.filter)(ex), (ln, ex.index)
                    seen.add(ln.filter.split()[0])
    assert {"op", "nodeid", "unique", "len", "reply_len", "name", "read.size", "header.uid"} <= seen
    reads = [e for e in an.exchanges if e.request is not None and "read" in e.request.args]  # READ, READDIR*
    assert {e.opname for e in reads} >= {"READ", "READDIR"}
    assert [e.index for e in an.exchanges if compile_filter("read.size >= 4096")(e)] == \
        [e.index for e in reads if e.request.args["read"].size >= 4096]
    assert sum(map(compile_filter("fuse.read.size > 0"), an.exchanges)) == len(reads)
    with pytest.raises(FilterError, match="starts with an argument name"):
        compile_filter("bogus.x == 1")
    with pytest.raises(FilterError, match="path is known where the exchanges are listed"):
        compile_filter('path ~ "x"')
    paths = {e.index: f"/dir{e.index % 3}" for e in an.exchanges}
    pred = compile_filter('path ~ "dir1$" or path == "/dir2"', path_of=lambda e: paths[e.index])
    assert [e.index for e in an.exchanges if pred(e)] == [e.index for e in an.exchanges if e.index % 3 != 0]


def test_export_filtered_view_as_pcapng_opens_in_tshark(tmp_path: Path) -> None:
    """W writes what the filter keeps, with the vhost-user control plane and INIT, through the recording
    writer: it replays to the same exchanges and tshark (with fuse.lua) decodes every record as we do."""
    from fsinspect.recording.replay import analyze
    from tests.test_recording_samples import check_tshark_matches_our_decoder

    gold = golden("guest-syncfs")
    dest = tmp_path / "syncfs-only.pcapng"
    with RecordingReader(SYNCFS) as r:
        control = [rec for rec in r.records() if not rec.is_fuse]

    async def run() -> None:
        app = FsInspectApp(ReplaySource(Store(), str(SYNCFS)))
        async with app.run_test(size=(160, 48)) as pilot:
            await loaded(pilot, app)
            app.apply_filter("op == SYNCFS")
            await pilot.pause(0.2)
            await pilot.press("W")
            await pilot.pause(0.2)
            box = app.screen.query_one("#pinput")
            box.value = str(tmp_path / "no-such-dir" / "x.pcapng")
            await pilot.press("enter")
            await pilot.pause(0.1)
            assert "no directory" in str(app.screen.query_one("#perr").render())
            box.value = str(dest)
            await pilot.press("enter")
            await wait_for(pilot, lambda: dest.exists())
            await pilot.pause(0.3)

    asyncio.run(run())
    assert oct(dest.stat().st_mode & 0o777) == "0o600"  # the guest's data: private, as recordings are
    with RecordingReader(dest) as r:
        recs = list(r.records())
        assert any("filter: op == SYNCFS" in c for c in r.section.comments)
    with RecordingReader(dest) as r:
        an = analyze(r)
    syncfs = [g for g in gold if g["opcode"] == "SYNCFS"]
    assert [e.opname for e in an.exchanges] == ["INIT"] + ["SYNCFS"] * len(syncfs)
    assert [e.unique for e in an.exchanges[1:]] == [g["unique"] for g in syncfs]
    assert [e.errname for e in an.exchanges[1:]] == [g["error"] for g in syncfs]
    assert [(c.ts_ns, c.data) for c in recs if not c.is_fuse] == [(c.ts_ns, c.data) for c in control]
    assert check_tshark_matches_our_decoder(dest) == len(recs)


def test_export_from_a_live_session(tmp_path: Path) -> None:
    """Attached to a real Hub: the exported file holds the chosen exchanges' bytes and the INIT, says the
    control plane is missing, and reads back (ours and tshark's) to the same exchanges."""
    import threading

    from fsinspect.live.hub import Hub
    from fsinspect.recording.replay import analyze
    from fsinspect.tui.sources import AttachSource
    from tests.test_recording_samples import check_tshark_matches_our_decoder
    from tests.test_tui import _publish_sample

    gold = golden("guest-syncfs")
    ctrl = str(tmp_path / "ctrl.sock")
    dest = tmp_path / "live.pcapng"
    lock = threading.RLock()
    hub = Hub(ctrl, lambda: {}, feed_lock=lock, queue_len=100_000)
    store = Store()
    src = AttachSource(store, ctrl)
    src.connect()
    try:
        app = FsInspectApp(src)

        async def run() -> None:
            async with app.run_test(size=(160, 48)) as pilot:
                await wait_for(pilot, lambda: store.status.startswith("attached"))
                await asyncio.to_thread(_publish_sample, hub, lock, SYNCFS)
                await wait_for(pilot, lambda: store.end == len(gold))
                app.apply_filter("op == LOOKUP")
                await pilot.pause(0.2)
                res = await asyncio.to_thread(app.export, str(dest))
                lookups = [g for g in gold if g["opcode"] == "LOOKUP"]
                assert res.chosen == 2 * len(lookups) and res.records == res.chosen + 2  # + INIT request, reply

        asyncio.run(run())
    finally:
        src.stop()
        hub.close()
    with RecordingReader(dest) as r:
        assert any("no vhost-user control messages" in c for c in r.section.comments)
        an = analyze(r)
    lookups = [g for g in gold if g["opcode"] == "LOOKUP"]
    assert [e.opname for e in an.exchanges] == ["INIT"] + ["LOOKUP"] * len(lookups)
    assert [(e.unique, e.errname) for e in an.exchanges[1:]] == [(g["unique"], g["error"]) for g in lookups]
    assert check_tshark_matches_our_decoder(dest) == 2 * len(an.exchanges)


@pytest.mark.parametrize("sample", [SYNCFS, WORKLOAD])
def test_state_at_equals_the_analyzer_fed_up_to_that_record(sample: Path) -> None:
    """Time travel: at every record's time, the replayed inode map and submounts are exactly what an
    Analyzer fed the recording up to that record holds."""
    from fsinspect.analysis import Analyzer
    from fsinspect.analysis.timetravel import state_at
    from fsinspect.recording.replay import analyze

    def nodes(an: Analyzer) -> dict[int, tuple[Any, ...]]:
        return {k: (v.parent, v.name, v.ino, v.generation, v.nlookup, v.attr_flags) for k, v in an.inodes.nodes.items()}

    with RecordingReader(sample) as r:
        full = analyze(r)
    recs = fuse_records(sample)
    live = Analyzer(keep_exchanges=False)
    for rec in recs:
        if rec.inbound:
            live.feed_request(rec.data, rec.queue, rec.head, rec.ts_ns, epoch=rec.epoch, orig_len=rec.orig_len)
        else:
            live.feed_reply(rec.data, rec.queue, rec.head, rec.ts_ns, epoch=rec.epoch, orig_len=rec.orig_len)
        past = state_at(full.exchanges, rec.ts_ns)
        assert nodes(past) == nodes(live), rec.offset
        assert sorted(past.submounts.announced) == sorted(live.submounts.announced)


def test_inode_map_as_of_the_selected_exchange() -> None:
    """Panel 2 in a replay shows the map as of the exchange selected in the list; T shows now and back."""
    from fsinspect.analysis.timetravel import moment_of, state_at

    def tree_ids(tree: Tree[int]) -> set[int]:
        out: set[int] = set()
        stack = list(tree.root.children)
        while stack:
            n = stack.pop()
            if n.data is not None:
                out.add(n.data)
            stack.extend(n.children)
        return out

    async def run() -> None:
        app = FsInspectApp(ReplaySource(Store(), str(SYNCFS)))
        async with app.run_test(size=(160, 48)) as pilot:
            await loaded(pilot, app)
            st = app.store
            end = set(st.analyzer.inodes.nodes) - {1}
            # An exchange in the middle: nodeids looked up by then and not yet forgotten.
            k = next(e.index for e in st.exchanges if e.opname == "SYNCFS" and e.submount)
            then = set(state_at(st.exchanges, moment_of(st.exchanges[k])).inodes.nodes) - {1}
            assert then != end and then
            app.jump(k)
            await pilot.press("2")
            await pilot.pause(0.3)
            tree = app.query_one("#itree", Tree)
            assert tree_ids(tree) == then
            head = str(app.query_one("#asof").render())
            assert f"as of #{k + 1} SYNCFS" in head and "T: now" in head
            await pilot.press("T")
            await pilot.pause(0.3)
            assert tree_ids(tree) == end and "inode map now" in str(app.query_one("#asof").render())
            await pilot.press("T", "1", "end", "2")
            await pilot.pause(0.3)
            assert tree_ids(tree) == end  # the newest exchange: as of it is now
            await pilot.press("1", "home", "2")
            await pilot.pause(0.3)
            assert tree_ids(tree) == set() and "as of #1 INIT" in str(app.query_one("#asof").render())

    asyncio.run(run())
