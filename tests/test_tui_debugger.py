"""Pilot tests of the debugger keys (b, c, E, d, x, C), the Held panel and held/pending rows with their age.

The UI attaches to a real control socket: the daemon engine serving a real host directory, its live source (EngineSource)
(the real Hub) and the real Intercept command handler, as `fsinspect daemon --control` runs them
(tests/test_intercept_control.py's rig).  The "kernel" is tests/daemon_client.EngineClient, so each test
knows exactly which requests are in flight.
"""

from __future__ import annotations

import asyncio
import errno
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dissectors import fuse as F
from fsinspect.analysis import exchange as X
from fsinspect.intercept.client import ControlClient
from fsinspect.tui.app import FsInspectApp, HelpScreen
from fsinspect.tui.debugger import FieldsScreen, PromptScreen
from fsinspect.tui.sources import AttachSource, Store
from tests.test_intercept_control import Rig

SIZE = (160, 48)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    (tmp_path / "share").mkdir()
    r = Rig(tmp_path / "share", tmp_path / "ctl.sock", [])
    yield r
    r.close()


async def wait_for(pilot: Any, cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the UI"
        await pilot.pause(0.05)


def attach(tmp_path: Path) -> tuple[FsInspectApp, AttachSource]:
    src = AttachSource(Store(), str(tmp_path / "ctl.sock"))
    src.connect()
    return FsInspectApp(src, title="debugger test"), src


def row(app: FsInspectApp, n: int) -> str:
    ex = next(e for e in app.store.exchanges if e.n == n)
    app.jump(ex.index)
    lst = app.xlist
    return lst.render_line(lst.cursor - lst.scroll_offset.y).text


def mkdir(name: bytes) -> dict[str, Any]:
    return {"mkdir": F.make("fuse_mkdir_in", mode=0o755), "name": name}


async def held_one(pilot: Any, app: FsInspectApp, opname: str) -> int:
    """Wait until the Held panel lists a held `opname`; its number."""
    await wait_for(pilot, lambda: any(e.opname == opname for e in app.held.rows))
    return next(e.n for e in app.held.rows if e.opname == opname)


async def answered(pilot: Any, q: queue.Queue[Any]) -> Any:
    deadline = time.monotonic() + 10
    while q.empty():
        assert time.monotonic() < deadline, "the engine never answered"
        await pilot.pause(0.05)
    return q.get()


def test_break_on_the_filter_then_continue_and_answer(rig: Rig, tmp_path: Path) -> None:
    share = tmp_path / "share"
    app, src = attach(tmp_path)

    async def run() -> None:
        async with app.run_test(size=SIZE) as pilot:
            store = app.store
            await wait_for(pilot, lambda: store.status.startswith("attached"))
            # b on the applied filter: the real handler adds it as a breakpoint.
            app.apply_filter("op == MKDIR")
            await pilot.press("b")
            await wait_for(pilot, lambda: app.last_reply is not None)
            assert app.last_command == {"cmd": "add-rule", "rule": "op == MKDIR"}
            assert app.last_reply is not None and app.last_reply["ok"] and app.last_reply["rule_id"] == 1
            app.apply_filter("")
            # The guest's mkdir is held: highlighted, in the Held panel, its age ticking; the share has no dir.
            pending = rig.call_async("MKDIR", mkdir(b"new"))
            n = await held_one(pilot, app, "MKDIR")
            assert pending.empty() and not (share / "new").exists()
            await pilot.pause(0.2)
            first = row(app, n)
            assert "HELD req" in first and "…" in first
            assert "1 pending, 1 HELD" in str(app.statusline.render())
            await pilot.pause(1.1)
            assert row(app, n) != first  # the age ticks
            # `c` on a row that is not held sends nothing and says why.
            other = next(e for e in store.exchanges if e.state == X.DONE)
            app.jump(other.index)
            app.last_command = None
            await pilot.press("c")
            await pilot.pause(0.2)
            assert app.last_command is None and not (share / "new").exists()
            # From the Held panel, `c` continues it: the engine makes the directory, the row completes in place.
            app.held.focus()
            await pilot.press("c")
            assert (await answered(pilot, pending)).error == 0 and (share / "new").is_dir()
            await wait_for(pilot, lambda: n not in store.open)
            ex = next(e for e in store.exchanges if e.n == n)
            assert ex.state == X.DONE and ex.error == 0 and "released by the debugger" in ex.notes
            await pilot.pause(0.3)
            assert not app.held.has_class("some") and "HELD" not in row(app, n)
            # E: an errno, completed with Tab; the engine never sees the request.
            pending = rig.call_async("MKDIR", mkdir(b"denied"))
            n = await held_one(pilot, app, "MKDIR")
            row(app, n)
            await pilot.press("E")
            assert isinstance(app.screen, PromptScreen)
            await pilot.press("e", "a", "c")
            await pilot.press("tab")
            assert app.screen.query_one("#pinput").value == "EACCES"  # type: ignore[attr-defined]
            await pilot.press("enter")
            assert (await answered(pilot, pending)).error == errno.EACCES and not (share / "denied").exists()
            assert app.last_command == {"cmd": "answer", "n": n, "errno": "EACCES"}
            await wait_for(pilot, lambda: n not in store.open)
            assert next(e for e in store.exchanges if e.n == n).errname == "EACCES"
            assert rig.server.counters()["ops"]["MKDIR"] == 1  # the engine's own count: it saw the first only

    try:
        asyncio.run(run())
    finally:
        src.stop()


def test_delay_fields_continue_all_and_errors(rig: Rig, tmp_path: Path) -> None:
    share = tmp_path / "share"
    (share / "f").write_bytes(b"x")
    script = ControlClient(str(tmp_path / "ctl.sock"), timeout=5)
    app, src = attach(tmp_path)

    async def run() -> None:
        async with app.run_test(size=SIZE) as pilot:
            store = app.store
            await wait_for(pilot, lambda: store.status.startswith("attached"))
            # b with no filter: a prompt offers the selected exchange's opcode; a bad expression is refused.
            await pilot.press("b")
            assert isinstance(app.screen, PromptScreen)
            box = app.screen.query_one("#pinput")
            box.value = "op == "  # type: ignore[attr-defined]
            await pilot.press("enter")
            assert isinstance(app.screen, PromptScreen)  # still open: the caret message says why
            box.value = "op == GETATTR"  # type: ignore[attr-defined]
            await pilot.press("enter")
            await wait_for(pilot, lambda: (app.last_reply or {}).get("rule_id") == 1)
            # d: a delay in ms, then the engine answers.
            pending = rig.call_async("GETATTR", {"getattr": F.make("fuse_getattr_in")})
            n = await held_one(pilot, app, "GETATTR")
            row(app, n)
            await pilot.press("d")
            await pilot.press(*["backspace"] * 3, "3", "0", "0")
            assert pending.empty()
            t0 = time.monotonic()
            await pilot.press("enter")
            assert (await answered(pilot, pending)).error == 0 and time.monotonic() - t0 >= 0.29
            assert app.last_command == {"cmd": "delay", "n": n, "ms": 300}
            await wait_for(pilot, lambda: n not in store.open)
            # x on a held reply: the form shows its decoded fields; the edit goes through the codecs.
            script.add_rule('op == LOOKUP and name == "f" on=reply')
            pending = rig.call_async("LOOKUP", {"name": b"f"})
            n = await held_one(pilot, app, "LOOKUP")
            ex = store.open[n]
            assert ex.held == X.HELD_REPLY and isinstance(ex.reply, F.Reply)
            assert "HELD reply" in row(app, n)
            await pilot.press("x")
            form = app.screen
            assert isinstance(form, FieldsScreen)
            paths = [f.path for f in form.fields]
            i = paths.index("entry.attr.ino")
            assert form.fields[i].value == (share / "f").stat().st_ino
            form.query_one(f"#f{i}").value = "0x424242"  # type: ignore[attr-defined]
            await pilot.pause(0.1)
            await pilot.press("ctrl+s")
            rep = await answered(pilot, pending)
            assert rep.error == 0 and rep.args["entry"].attr.ino == 0x424242 and rep.args["entry"].nodeid != 0
            assert app.last_command == {"cmd": "rewrite", "n": n, "fields": {"entry.attr.ino": 0x424242}}
            # x on a held request: a form of zeros for its reply; a value out of range is refused in the form.
            script.add_rule("op == MKDIR")
            p1 = rig.call_async("MKDIR", mkdir(b"one"))
            p2 = rig.call_async("MKDIR", mkdir(b"two"))
            await wait_for(pilot, lambda: sum(e.opname == "MKDIR" for e in app.held.rows) == 2)
            row(app, app.held.rows[0].n)
            await pilot.press("x")
            form = app.screen
            assert isinstance(form, FieldsScreen)
            paths = [f.path for f in form.fields]
            form.query_one(f"#f{paths.index('entry.nodeid')}").value = "-1"  # type: ignore[attr-defined]
            await pilot.pause(0.1)
            await pilot.press("ctrl+s")
            assert app.screen is form and "does not fit a u64" in str(form.query_one("#ferr").render())
            await pilot.press("escape")
            # C continues everything held: both mkdirs reach the engine.
            await pilot.press("C")
            assert (await answered(pilot, p1)).error == 0 and (await answered(pilot, p2)).error == 0
            assert (share / "one").is_dir() and (share / "two").is_dir()
            await wait_for(pilot, lambda: not app.held.rows)
            assert app.last_command == {"cmd": "continue-all"}
            # A command the handler refuses: its reason is shown (nothing is held any more).
            app.last_reply = None
            app.held.focus()
            ex1 = next(e for e in store.exchanges if e.opname == "MKDIR")
            app.source.command("release", lambda r: app.call_from_thread(app._command_done, "release", r), n=ex1.n)
            await wait_for(pilot, lambda: app.last_reply is not None)
            assert app.last_reply is not None and not app.last_reply["ok"] and app.last_reply["error"]
            # The keys are in the help screen.
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            text = str(app.screen.query_one("Static").render())
            for key in ("break on the current filter", "continue the held", "with an errno", "delay",
                        "decoded fields", "continue every held"):
                assert key in text

    try:
        asyncio.run(run())
    finally:
        src.stop()
        script.close()


def test_rules_panel_lists_and_removes_breakpoints(rig: Rig, tmp_path: Path) -> None:
    """b adds a rule, the Rules panel lists it with its hits; u removes it in the engine (a MKDIR goes through
    unheld), U removes every rule."""
    share = tmp_path / "share"
    app, src = attach(tmp_path)

    async def run() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.store.status.startswith("attached"))
            assert not app.rules.has_class("some")
            await pilot.press("u")  # nothing to remove: says so, sends nothing
            assert app.last_command is None
            app.apply_filter("op == MKDIR")
            await pilot.press("b")
            app.apply_filter("")
            await wait_for(pilot, lambda: [r["rule"] for r in app.rules.rules] == ["op == MKDIR"])
            assert app.rules.has_class("some") and app.rules.rules[0]["hits"] == 0
            # It holds: one hit, shown once the panel polls.
            pending = rig.call_async("MKDIR", mkdir(b"held"))
            await held_one(pilot, app, "MKDIR")
            await wait_for(pilot, lambda: app.rules.rules and app.rules.rules[0]["hits"] == 1)
            assert "hits 1" in str(app.rules.get_option_at_index(0).prompt)
            await pilot.press("C")
            assert (await answered(pilot, pending)).error == 0
            # u on the Rules panel: the handler drops it, the list empties and hides.
            app.rules.focus()
            await pilot.press("u")
            await wait_for(pilot, lambda: not app.rules.rules)
            assert app.last_command == {"cmd": "remove-rule", "rule_id": 1}
            assert app.last_reply is not None and app.last_reply["ok"]
            assert not app.rules.has_class("some")
            # The engine's effect: a MKDIR is no longer held.
            pending = rig.call_async("MKDIR", mkdir(b"free"))
            assert (await answered(pilot, pending)).error == 0 and (share / "free").is_dir()
            assert not app.store.held()
            # U: every rule goes.
            for text in ("op == MKDIR", "op == RMDIR"):
                app.apply_filter(text)
                await pilot.press("b")
                await wait_for(pilot, lambda t=text: t in [r["rule"] for r in app.rules.rules])
            app.apply_filter("")
            await pilot.press("U")
            await wait_for(pilot, lambda: not app.rules.rules)
            pending = rig.call_async("MKDIR", mkdir(b"free2"))
            assert (await answered(pilot, pending)).error == 0 and (share / "free2").is_dir()
            # The help lists the keys.
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            assert "remove the rule highlighted in the Rules panel" in str(app.screen.query_one("Static").render())
            await pilot.press("escape")

    asyncio.run(run())
    src.stop()


def test_replay_has_no_debugger_but_shows_unanswered_requests(tmp_path: Path) -> None:
    """A recording that ends with a request never answered lists it with its age; keys say why they can't."""
    from fsinspect.recording.writer import RecordingWriter
    from fsinspect.tui.sources import ReplaySource

    path = tmp_path / "hung.pcapng"
    w = RecordingWriter(str(path), source="virtio")
    t = 1_700_000_000_000_000_000
    w.request(F.encode_request("GETATTR", {"getattr": {}}, unique=2, nodeid=1), 1, 0, t)
    w.request(F.encode_request("MKDIR", {"mkdir": {"mode": 0o755}, "name": b"d"}, unique=4, nodeid=1), 1, 1, t + 10)
    w.reply(F.encode_reply("GETATTR", {"attr_out": {}}, unique=2), 1, 0, t + 2_500_000_000)
    w.close()
    app = FsInspectApp(ReplaySource(Store(), str(path)))

    async def run() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.store.done)
            await pilot.pause(0.3)
            ex = app.store.exchanges[1]
            assert ex.state == X.PENDING and sorted(ex.lints) == [X.NO_REPLY, X.STUCK]
            text = row(app, ex.n)
            assert "(no reply)" in text and "≥2.5s" in text
            assert "took 2.50s" in " ".join(lint.message for lint in app.store.analyzer.lints)
            await pilot.press("b")
            await pilot.pause(0.2)
            assert app.last_command is None

    asyncio.run(run())

