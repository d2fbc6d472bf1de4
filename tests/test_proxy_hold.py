"""The proxy session as a HoldPoint (issue 15), without QEMU: held captures from a real shadow path (both
engines) go through the session as the capture thread hands them on: recorded, analysed at once, named by
their exchange, and `on_held` told; verdicts go back to the path by (queue, head); what the path resolves
by itself at stop (the safety rule) is recorded as such.  GET_VRING_BASE reports what the guest lost."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from dissectors import fuse as F
from dissectors import vhost_user as V
from dissectors.ring import HOLD_REPLY, HOLD_REQUEST, HoldRule, RingError
from dissectors.spec import fuse as fuse_spec
from fsinspect.analysis import exchange as X
from fsinspect.proxy.server import QueueRuntime
from fsinspect.recording.reader import RecordingReader
from tests.test_proxy_session import _release, session  # noqa: F401 - _release is an autouse fixture
from tests.test_ring_hold import backend_answer, lookup, mkdir
from tests.test_ring_shadow import Proxy, eng  # noqa: F401 - eng is a fixture

OP = fuse_spec.OPCODE_BY_NAME


class Rigged:
    """A Session whose queue 1 is a real ShadowPath over memfd guest memory (tests/ringkit.py)."""

    def __init__(self, tmp_path: Path, eng_: Any) -> None:
        self.s = session(tmp_path, "hold", defer_analysis=True)
        self.px = Proxy(eng_)
        self.s.proxy.queues[1] = QueueRuntime(path=self.px.path)
        self.s.proxy.cp.backend_alive = True
        self.held: list[tuple[int, int, int, bytes]] = []
        self.resolved: list[tuple[int, int, int, str]] = []
        self.s.on_held = lambda q, h, d, raw, ts: self.held.append((q, h, d, raw))
        self.s.on_resolved = lambda q, h, d, how: self.resolved.append((q, h, d, how))

    def pump(self) -> None:
        """One forwarding pass, then the captures through the session (the capture thread's work)."""
        self.px.path.step()
        for c in self.px.cap.read_captures(0):
            self.s.proxy._capture_one(c)

    def mkdir_and_lookup(self, mkdir_unique: int, lookup_unique: int) -> None:
        """Rules: hold MKDIR requests and LOOKUP replies; a MKDIR (head 0) and a LOOKUP (head 1) arrive."""
        self.s.set_rules([HoldRule(HOLD_REQUEST, opcodes=frozenset({OP["MKDIR"].value})),
                          HoldRule(HOLD_REPLY, opcodes=frozenset({OP["LOOKUP"].value}))])
        mkdir(self.px, 0, mkdir_unique)
        lookup(self.px, 1, lookup_unique)
        self.px.rig.guest.publish([0, 1])
        self.pump()

    def drain_captures(self) -> None:
        for c in self.px.cap.read_captures(0):
            self.s.proxy._capture_one(c)

    def close(self) -> None:
        del self.s.proxy.queues[1]
        self.px.close()


@pytest.fixture
def rig(tmp_path: Path, eng: Any) -> Any:  # noqa: F811
    r = Rigged(tmp_path, eng)
    yield r
    r.close()


def records(path: Path) -> list[tuple[bool, int, list[str], int]]:
    with RecordingReader(path) as r:
        return [(rec.inbound, rec.head or 0, list(rec.notes), rec.flags) for rec in r if rec.is_fuse]


def test_held_request_release_then_reply(rig: Rigged, tmp_path: Path) -> None:
    s = rig.s
    s.set_rules([HoldRule(HOLD_REQUEST, opcodes=frozenset({OP["MKDIR"].value}))])
    assert s.proxy.hold_rules and rig.px.path.held() == []
    mkdir(rig.px, 0, 41)
    rig.px.rig.guest.publish([0])
    rig.pump()
    assert [(q, h, d) for q, h, d, _ in rig.held] == [(1, 0, HOLD_REQUEST)]
    assert s.held() == [(1, 0, HOLD_REQUEST)]
    ex = s.exchange_of(1, 0, HOLD_REQUEST)  # analysed at once, though nobody watches (analysis deferred)
    assert ex is not None and ex.opname == "MKDIR" and ex.held == X.HELD_REQUEST and ex.n == 1
    assert s.exchange_of(1, 0, HOLD_REQUEST) is None
    s.release(1, 0)
    s.on_debugger({"type": "resumed", "n": ex.n, "how": "released"})
    assert s.analyzer.find(ex.n).held is None  # type: ignore[union-attr]
    backend_answer(rig.px, {0: F.encode_reply("MKDIR", unique=41, error=errno.EEXIST)})
    rig.pump()
    s.catch_up()  # an ordinary reply: its analysis waits until the guest pauses (nobody watches)
    assert s.analyzer.find(ex.n) is None and rig.resolved == []
    with pytest.raises(RingError) as ei:
        s.release(1, 0)
    assert ei.value.reason == "not_held"
    with pytest.raises(RingError):
        s.release(7, 0)  # no such queue
    s.writer.close()  # type: ignore[union-attr]
    recs = records(tmp_path / "hold.pcapng")
    assert [(inb, h) for inb, h, _, _ in recs] == [(True, 0), (False, 0)]
    assert "held by the debugger" in recs[0][2]
    assert s.summary()["holds"] == {"held": 1, "released": 1}


def test_answer_and_held_reply_rewrite_are_recorded_once(rig: Rigged, tmp_path: Path) -> None:
    s = rig.s
    rig.mkdir_and_lookup(5, 6)
    s.answer(1, 0, F.encode_reply("MKDIR", unique=5, error=errno.EACCES))
    backend_answer(rig.px, {1: F.encode_reply("LOOKUP", unique=6, error=errno.ENOENT)})
    rig.pump()
    assert [(h, d) for _, h, d, _ in rig.held] == [(0, HOLD_REQUEST), (1, HOLD_REPLY)]
    ex = s.exchange_of(1, 1, HOLD_REPLY)
    assert ex is not None and ex.held == X.HELD_REPLY and ex.errname == "ENOENT"
    s.rewrite(1, 1, F.encode_reply("LOOKUP", unique=6, error=errno.EIO))
    s.on_debugger({"type": "resumed", "n": ex.n, "how": "rewritten"})  # the capture completes it, not this
    rig.drain_captures()
    s.catch_up()
    assert s.analyzer.pending == [] and rig.resolved == []
    s.writer.close()  # type: ignore[union-attr]
    recs = records(tmp_path / "hold.pcapng")
    assert [(inb, h) for inb, h, _, _ in recs] == [(True, 0), (True, 1), (False, 0), (False, 1)]  # one reply each
    assert any("answered by the debugger" in n for n in recs[2][2])
    assert any("rewritten by the debugger; the back-end replied error -2 (ENOENT)" in n for n in recs[3][2])
    from fsinspect.analysis.analyzer import Analyzer
    from fsinspect.recording.replay import analyze

    with RecordingReader(tmp_path / "hold.pcapng") as r:
        an = analyze(r, Analyzer(keep_exchanges=True))
    assert [(e.opname, e.errname) for e in an.exchanges] == [("MKDIR", "EACCES"), ("LOOKUP", "EIO")]
    assert an.lints == []


def test_safety_at_stop_is_recorded_and_told(rig: Rigged, tmp_path: Path) -> None:
    s = rig.s
    rig.mkdir_and_lookup(0xABC, 7)
    backend_answer(rig.px, {1: F.encode_reply("LOOKUP", unique=7, error=errno.ENOENT)})
    rig.pump()
    s.proxy._queue_stop(1)  # GET_VRING_BASE, RESET, back-end loss and exit all stop the path
    rig.drain_captures()
    s.catch_up()
    assert sorted(rig.resolved) == [(1, 0, HOLD_REQUEST, "answered"), (1, 1, HOLD_REPLY, "released")]
    assert s.analyzer.pending == [] and s.summary()["holds"]["safety"] == 2
    s.writer.close()  # type: ignore[union-attr]
    recs = records(tmp_path / "hold.pcapng")
    notes = {(inb, h): n for inb, h, n, _ in recs}
    assert any("EIO) by the proxy: the queue stopped" in n for n in notes[(False, 0)])
    assert any("released by the proxy: the queue stopped" in n for n in notes[(False, 1)])


def test_bad_rules_are_refused_before_any_path(tmp_path: Path) -> None:
    s = session(tmp_path, "rules")
    for bad in (HoldRule(0), HoldRule(1, opcodes=frozenset({-1})), HoldRule(2, queues=1 << 64)):
        with pytest.raises(ValueError):
            s.set_rules([bad])
    s.set_rules([HoldRule(3)])
    assert s.proxy.hold_rules == (HoldRule(3),)
    s.writer.close()  # type: ignore[union-attr]


def test_get_vring_base_reports_what_the_guest_lost(rig: Rigged) -> None:
    """Held requests were taken off the guest's ring but never reached the back-end's: the index QEMU gets
    is the guest's, less what the back-end left untaken (the back-end's own count would replay them)."""
    rig.s.set_rules([HoldRule(HOLD_REQUEST, opcodes=frozenset({OP["MKDIR"].value}))])
    mkdir(rig.px, 0, 1)
    lookup(rig.px, 1, 2)
    mkdir(rig.px, 2, 3)
    lookup(rig.px, 3, 4)
    rig.px.rig.guest.publish([0, 1, 2, 3])
    rig.pump()
    rig.px.path.stop()  # the held MKDIRs are answered EIO: the guest's ring moved 4, the back-end's 2
    rig.px.dev.pop_chains()  # the back-end took both LOOKUPs
    reply = V.build("GET_VRING_BASE", V.make("vhost_vring_state", index=1, num=2), reply=True)
    assert rig.s.proxy._vring_base_consumed(reply).payload.num == 4
    # the back-end left one untaken: QEMU must hand it out again
    reply = V.build("GET_VRING_BASE", V.make("vhost_vring_state", index=1, num=1), reply=True)
    assert rig.s.proxy._vring_base_consumed(reply).payload.num == 3
    # no holds: the back-end's count is the guest's, and the message goes through untouched
    other = V.build("GET_VRING_BASE", V.make("vhost_vring_state", index=0, num=9), reply=True)
    assert rig.s.proxy._vring_base_consumed(other) is other


def test_reset_device_runs_the_safety_rule(rig: Rigged) -> None:
    """RESET_DEVICE (and RESET_OWNER): the control plane stops every started queue; held requests are
    answered EIO before the back-end is told, so the guest's ring owes nothing after the reset."""
    rig.mkdir_and_lookup(0x77, 8)
    assert rig.px.path.held() == [(0, HOLD_REQUEST)]
    rig.s.proxy.cp.vring(1).started = True
    cmds = rig.s.proxy.cp.from_frontend(V.build("RESET_DEVICE"))
    rig.s.proxy.cp.backend_alive = False  # nothing to forward to here: run the queue commands only
    rig.s.proxy._execute([c for c in cmds if type(c).__name__ in ("QueueStop", "QueueDrain")], [])
    rig.drain_captures()
    assert rig.px.path.held() == [] and rig.resolved == [(1, 0, HOLD_REQUEST, "answered")]
    assert dict(rig.px.rig.guest.collect_used())[0] == 16


def test_the_pipeline_shows_a_held_capture_to_every_addon_before_the_debugger_decides(rig: Rigged,
                                                                                        tmp_path: Path) -> None:
    """Hook order (fsinspect/live/pipeline.py): a held request goes to every addon's `request` (recorded,
    numbered by the analysis) before any `held`; the intercept rules are last and find the exchange by its n."""
    from fsinspect.intercept.addon import Intercept
    from fsinspect.intercept.rules import BREAK, rule_from_args
    from fsinspect.live.addons import add_debugger
    from fsinspect.live.pipeline import Addon
    from fsinspect.recording import format as fmt

    s = rig.s
    seen: list[tuple[Any, ...]] = []

    class Probe(Addon):
        def request(self, data: bytes, queue: int, head: int | None, ts_ns: int, orig_len: int, layout: Any,
                    notes: list[str], flags: int) -> None:
            seen.append(("request", head, bool(flags & fmt.RF_HELD), s.writer.records if s.writer else 0))

        def held(self, queue: int, head: int, direction: int, data: bytes, ts_ns: int) -> None:
            seen.append(("held", head, direction, [h["n"] for h in ic.held()]))

    ic = Intercept([rule_from_args(BREAK, ["op == MKDIR"])])
    s.pipeline.add(Probe())
    add_debugger(s.pipeline, ic, s, exchange_of=s.exchange_of, listener=s.on_debugger)
    assert s.on_held == s.pipeline.on_held and s.on_resolved == s.pipeline.on_resolved
    # a hook an addon does not define is never dispatched: the probe costs nothing on replies
    assert [type(f.__self__).__name__ for f in s.pipeline.reply_hooks] == ["Recorder", "Analysis"]
    assert [type(a).__name__ for a in s.pipeline.addons] == ["Recorder", "Analysis", "Summary", "Probe", "Debugger"]
    mkdir(rig.px, 0, 41)
    rig.px.rig.guest.publish([0])
    rig.pump()
    # the probe saw the request after the recorder wrote it, and `held` before the intercept kept it
    assert seen == [("request", 0, True, 1), ("held", 0, HOLD_REQUEST, [])]
    (h,) = ic.held()
    assert h["n"] == 1 and h["opcode"] == "MKDIR" and s.analyzer.find(1).held == X.HELD_REQUEST  # type: ignore[union-attr]
    ev = ic.release(1)
    assert ev["how"] == "released" and s.analyzer.find(1).held is None  # type: ignore[union-attr]
    ic.close()
