"""The replay UI over a recording of any size: rows read through the side index, a whole-file filter in the
background, far jumps answered from the rows on disk, the analysis saved beside the index and invalidated by a
change, and the process's RSS bounded at 1M exchanges.  The UI runs headless (Textual's Pilot) in a child
process, so its VmHWM is the UI's own peak."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from dissectors import fuse as F
from fsinspect.recording.indexed import analysis_path, rows_path
from fsinspect.recording.parts import resolve
from fsinspect.recording.writer import RecordingWriter
from fsinspect.tui.app import FsInspectApp
from fsinspect.tui.sources import ReplaySource, Store

from .test_tui import SIZE, wait_for

ROOT = Path(__file__).resolve().parent.parent
N = 1_000_000
ERROR_AT = 987_653  # the one ENOENT reply (exchange #987654)
RSS_BOUND_MB = 160  # measured: see the test's printed figures; the in-memory replay peaked at 515 MB


def write(path: Path, n: int) -> None:
    """n LOOKUPs on 64 heads (names f0..f63 in turn), all answered but one ENOENT at ERROR_AT, and the last
    one never answered (a no-reply lint at the very end)."""
    look = [F.encode_request("LOOKUP", {"name": f"f{i}".encode()}, unique=i + 1, nodeid=1) for i in range(64)]
    ent = F.encode_reply("LOOKUP", {"entry": {"nodeid": 5, "attr": {"ino": 5}}}, unique=1)
    enoent = F.encode_reply("LOOKUP", error=2, unique=1)
    with RecordingWriter(path, flush_bytes=1 << 22) as w:
        for i in range(n):
            h = i & 63
            w.request(look[h], 1, h, 1_000_000 + i * 1000)
            if i == n - 1:
                break
            rep = enoent if i == ERROR_AT else ent
            w.reply(rep[:8] + (h + 1).to_bytes(8, "little") + rep[16:], 1, h, 1_000_000 + i * 1000 + 500)


CHILD = textwrap.dedent("""
    import asyncio, json, sys, threading, time
    from fsinspect.tui.app import FsInspectApp
    from fsinspect.tui.sources import ReplaySource, Store

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith(key)) / 1024

    path, phase = sys.argv[1], sys.argv[2]
    out = {"rss_start_mb": status("VmRSS:")}

    async def drawn(app):
        while app.xlist.count == 0 or not app.xlist.render_line(0).text.strip():
            await asyncio.sleep(0.005)

    async def open_once(key):
        t0 = time.perf_counter()
        app = FsInspectApp(ReplaySource(Store(), path))
        async with app.run_test(size=(160, 48)) as pilot:
            await drawn(app)
            out[key + "_rows_s"] = time.perf_counter() - t0
            out[key + "_opened_s"] = app.source.opened_s  # the store's own part: index + saved analysis
            out[key + "_count"] = app.xlist.count
            while not app.store.done:
                await asyncio.sleep(0.2)
            out[key + "_reused"] = app.source.build is None
            out[key + "_lints"] = [[lint.name, lint.exchange] for lint in app.store.analyzer.lints]
            out[key + "_rss_mb"] = status("VmRSS:")
            if key == "warm":
                await work(app, pilot)
            app.source.stop()

    async def work(app, pilot):
        lst = app.xlist
        # A whole-file filter in the background: progress, matches as they come, keys answered meanwhile.
        # A quiet machine ends the pass in a fraction of a second, so its progress is also watched by a
        # thread (every ms) besides the UI's own samples below.
        watched, done = [], threading.Event()
        def watch():
            while not done.is_set():
                g = app.filter
                if g is not None and getattr(g, "thread", None) is not None:
                    watched.append((g.upto, len(g.view)))
                time.sleep(0.001)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        app.apply_filter('name == "f7"')
        f = app.filter
        seen, lat, mid = [], [], 0
        t = time.perf_counter()
        while f.thread is None or f.running:
            k = time.perf_counter()
            row = lst.cursor
            await pilot.press("up" if row else "down")
            lat.append(time.perf_counter() - k)
            mid += lst.cursor != row and f.running  # the key took effect while the pass was still going
            app.tick()
            seen.append((f.upto, len(f.view), str(app.statusline.render())))
            await asyncio.sleep(0.05)
        out["filter_s"] = time.perf_counter() - t
        done.set()
        watcher.join()
        out["filter_seen"] = seen
        out["filter_watched"] = watched
        out["filter_keys_mid_pass"] = mid
        out["filter_keys_max_s"] = max(lat)
        out["filter_hits"] = len(f.view)
        out["filter_sample"] = [f.view[k] for k in (0, 1, len(f.view) // 2, len(f.view) - 1)]
        out["rss_filter_mb"] = status("VmRSS:")
        # A new filter stops the pass still running.
        app.apply_filter('name == "f1"')
        first = app.filter
        app.apply_filter('name == "f2"')
        first.thread.join(5)
        out["replaced_stopped"] = not first.thread.is_alive() and first.upto < len(app.store.rec)
        app.apply_filter("")
        # Far jumps: Ctrl-G to #N, e and l from the top, marks.
        await pilot.press("ctrl+g", *"#900000", "enter")
        await pilot.pause(0.3)
        out["goto"] = lst.selected
        for _ in range(100):
            await pilot.pause(0.05)
            if app.detail.index == lst.selected:
                break
        out["detail_title"] = str(app.detail.query_one("#title").render())
        await pilot.press("m", "home")
        out["after_home"] = lst.selected
        await pilot.press("n")
        out["mark_next"] = lst.selected
        await pilot.press("home", "e")
        out["error_next"] = lst.selected
        await pilot.press("l")
        out["lint_next"] = lst.selected
        await pilot.press("end", "e")
        out["error_none_below"] = lst.selected

    async def main():
        if phase == "both":
            await open_once("cold")
        await open_once("warm")

    asyncio.run(main())
    out["hwm_mb"] = status("VmHWM:")
    print(json.dumps(out))
""")


def run_child(path: Path, phase: str) -> dict[str, Any]:
    res = subprocess.run([sys.executable, "-c", CHILD, str(path), phase], capture_output=True, text=True,
                         cwd=ROOT, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def test_replay_ui_at_1m_exchanges_bounded_rss_background_filter_far_jumps(tmp_path: Path) -> None:
    p = tmp_path / "big.pcapng"
    write(p, N)
    out = run_child(p, "both")
    figures = {k: v for k, v in out.items() if not isinstance(v, list)}
    print(json.dumps(figures, indent=1))
    # The first open builds the index (first rows then) and the analysis in the background; the second
    # reads both back: rows at once, nothing rebuilt.
    assert out["cold_count"] == out["warm_count"] == N
    assert not out["cold_reused"] and out["warm_reused"]
    assert out["warm_opened_s"] < 1.0, figures
    assert out["warm_rows_s"] < 5.0, figures  # includes starting Textual headless on a loaded machine
    assert out["cold_lints"] == out["warm_lints"] == [["no-reply", N - 1]]
    # The filter: progress seen climbing, matches shown before the end, the right ones in the end.
    seen, watched = out["filter_seen"], out["filter_watched"]
    assert len({u for u, _ in watched if 0 < u < N}) >= 2, watched[:5]  # progress climbing mid-pass
    assert any(0 < hits and upto < N for upto, hits in watched), watched[:5]  # matches before the end
    if any(upto < N for upto, _, _ in seen):  # the UI drew a frame mid-pass (a pass can be that quick)
        assert any("filtering" in line and "%" in line for upto, _, line in seen if upto < N), seen[:3]
    assert out["filter_hits"] == N // 64
    assert out["filter_sample"] == [7, 7 + 64, 7 + 64 * (N // 128), 7 + 64 * (N // 64 - 1)]
    assert out["filter_keys_mid_pass"] >= 3, figures  # keys answered while the pass ran (latency: the bench)
    assert out["replaced_stopped"]
    # Far jumps.
    assert out["goto"] == 899_999 and out["detail_title"].startswith(" #900000 LOOKUP")
    assert out["after_home"] == 0 and out["mark_next"] == 899_999
    assert out["error_next"] == ERROR_AT and out["lint_next"] == N - 1
    assert out["error_none_below"] == N - 1  # the end: nothing below, the cursor stays
    # Memory: what grows with the recording is on disk (index, rows) or a flat array (the filter's view).
    assert out["hwm_mb"] < RSS_BOUND_MB, figures
    assert out["rss_filter_mb"] < RSS_BOUND_MB, figures

    # The recording changes (a section appended): the index, the rows and the analysis are built again.
    with RecordingWriter(tmp_path / "more.pcapng") as w:
        w.request(F.encode_request("LOOKUP", {"name": b"y"}, unique=900, nodeid=1), 1, 200, 10**12)
    stamp = (analysis_path(p).stat().st_mtime_ns, rows_path(p).stat().st_mtime_ns)
    with open(p, "ab") as f:
        f.write((tmp_path / "more.pcapng").read_bytes())
    code = textwrap.dedent(f"""
        import asyncio
        from fsinspect.tui.app import FsInspectApp
        from fsinspect.tui.sources import ReplaySource, Store
        async def main():
            app = FsInspectApp(ReplaySource(Store(), {str(p)!r}))
            async with app.run_test() as pilot:
                while not app.store.done:
                    await asyncio.sleep(0.2)
                print(app.source.build is None, app.xlist.count, app.store.rec.analysis["count"])
        asyncio.run(main())
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert res.stdout.split() == ["False", str(N + 1), str(N + 1)], res.stderr[-2000:]
    assert (analysis_path(p).stat().st_mtime_ns, rows_path(p).stat().st_mtime_ns) != stamp


def test_replay_ui_rotated_recording_one_list_and_the_saved_analysis(tmp_path: Path) -> None:
    """A rotated recording opened by its directory is one list (pairing across the parts); its analysis is
    saved beside the first part, read back at the next open, and made stale by a part that grows."""
    base = tmp_path / "rot" / "r.pcapng"
    base.parent.mkdir()
    look = F.encode_request("LOOKUP", {"name": b"x"}, unique=1, nodeid=1)
    rep = F.encode_reply("LOOKUP", error=2, unique=1)
    with RecordingWriter(base, rotate_mb=0.0625, flush_bytes=4096) as w:
        for i in range(3000):
            u = (i + 1).to_bytes(8, "little")
            w.request(look[:8] + u + look[16:], 1, i & 7, 1000 + i * 10)
            w.reply(rep[:8] + u + rep[16:], 1, i & 7, 1005 + i * 10)
    parts = resolve(base.parent)
    assert len(parts) > 3 and parts[0] == base

    async def run(count: int, reused: bool) -> None:
        app = FsInspectApp(ReplaySource(Store(), str(base.parent)))
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.store.done, 60)
            await pilot.pause(0.3)
            assert app.xlist.count == count and (app.source.build is None) == reused
            assert [lint.name for lint in app.store.analyzer.lints] == ["no-reply"] * (count - 3000)
            app.apply_filter("error == ENOENT")
            await wait_for(pilot, lambda: app.filter is not None and not app.filter.running, 60)
            assert app.filter is not None and len(app.filter.view) == 3000
            app.apply_filter("")
            await pilot.press("ctrl+g", *"#2999", "enter")
            await pilot.pause(0.2)
            assert app.xlist.selected == 2998

    asyncio.run(run(3000, False))
    assert analysis_path(parts[0]).exists() and rows_path(parts[0]).exists()
    asyncio.run(run(3000, True))
    with RecordingWriter(tmp_path / "more.pcapng") as w:  # the last part grows by one section
        w.request(look[:8] + (9999).to_bytes(8, "little") + look[16:], 1, 200, 10**9)
    with open(parts[-1], "ab") as f:
        f.write((tmp_path / "more.pcapng").read_bytes())
    asyncio.run(run(3001, False))
