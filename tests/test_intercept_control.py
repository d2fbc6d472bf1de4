"""Control protocol v2 end to end on the daemon engine: a script (fsinspect.intercept.client) on the real
control socket holds, answers, delays and rewrites requests the engine serves from a real host directory.
The "kernel" is tests/daemon_client.EngineClient (crafted FUSE messages); the guest runs live in
tests/test_intercept_guest.py."""

from __future__ import annotations

import errno
import json
import os
import queue
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.passthrough import Options, PassthroughFS
from daemon.server import Server
from dissectors import fuse as F
from fsinspect.commands._daemon_vhost import attach_debugger
from fsinspect.intercept.addon import Intercept
from fsinspect.intercept.client import ControlClient, ControlError
from fsinspect.intercept.rules import parse_rule
from fsinspect.live.engine import EngineSource
from tests.daemon_client import EngineClient


class Rig:
    def __init__(self, root: Path, sock: Path, rules: list[str]) -> None:
        self.ctl = EngineSource(control=str(sock))
        self.intercept = Intercept([parse_rule(r) for r in rules], seed=1)
        point = attach_debugger(self.intercept, self.ctl)
        self.fs = PassthroughFS(Options(str(root)))
        self.server = Server(self.fs, tap=self.ctl, hold=point)
        self.kernel = EngineClient(self.server)
        self.kernel.init()

    def call_async(self, op: str, args: dict[str, Any] | None = None, *, nodeid: int = 1) -> queue.Queue[Any]:
        """Send a request without waiting: the queue gets its decoded reply once there is one."""
        q: queue.Queue[Any] = queue.Queue()
        buf = self.kernel.encode(op, args, nodeid=nodeid)
        req = F.decode_request(buf, self.server.ctx)
        self.server.handle(buf, lambda parts: q.put(F.decode_reply(b"".join(bytes(p) for p in parts), req)))
        return q

    def close(self) -> None:
        self.server.shutdown()
        self.intercept.close()
        self.ctl.close()
        self.fs.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Any]:
    made: list[Rig] = []

    def make(*rules: str) -> tuple[Rig, ControlClient]:
        (tmp_path / "share").mkdir(exist_ok=True)
        r = Rig(tmp_path / "share", tmp_path / "ctl.sock", list(rules))
        made.append(r)
        return r, ControlClient(str(tmp_path / "ctl.sock"), timeout=5)

    yield make
    for r in made:
        r.close()


def _mkdir(name: bytes) -> dict[str, Any]:
    return {"mkdir": F.make("fuse_mkdir_in", mode=0o755), "name": name}


def test_breakpoint_release_and_answer(rig: Any, tmp_path: Path) -> None:
    r, c = rig()
    assert c.hello["version"] == 2 and c.hello["versions"] == [1, 2]
    assert stat.S_IMODE(os.stat(tmp_path / "ctl.sock").st_mode) == 0o600
    (tmp_path / "share" / "other").write_bytes(b"x")
    rid = c.add_rule("op == MKDIR")
    assert c.rules()[0]["rule"] == "op == MKDIR" and c.rules()[0]["action"] == "break"
    t0 = time.monotonic()
    pending = r.call_async("MKDIR", _mkdir(b"new"))
    held = c.wait_held(lambda m: m["opcode"] == "MKDIR", timeout=2)
    assert time.monotonic() - t0 < 1.0
    assert held["direction"] == "request" and held["request"]["args"]["name"] == "new"
    assert pending.empty() and not (tmp_path / "share" / "new").exists()
    assert r.kernel.lookup(1, b"other").error == 0  # served while MKDIR is held
    assert [h["n"] for h in c.held()] == [held["n"]]
    c.release(held["n"])
    assert pending.get(timeout=5).error == 0
    assert (tmp_path / "share" / "new").is_dir()
    assert c.wait_for(lambda m: m.get("type") == "resumed")["how"] == "released"

    pending = r.call_async("MKDIR", _mkdir(b"denied"))
    held = c.wait_held(timeout=2)
    c.answer(held["n"], errno="EACCES")
    assert pending.get(timeout=5).error == errno.EACCES
    assert not (tmp_path / "share" / "denied").exists()
    assert r.server.counters()["ops"]["MKDIR"] == 1  # the engine's own count: it never saw the second one
    c.remove_rule(rid)
    assert c.rules() == []
    assert r.call_async("MKDIR", _mkdir(b"free")).get(timeout=5).error == 0


def test_rewrite_a_reply_by_fields_and_delay(rig: Any, tmp_path: Path) -> None:
    """A LOOKUP reply carrying another st_ino (background/002), and a delayed GETATTR."""
    r, c = rig()
    (tmp_path / "share" / "f").write_bytes(b"x")
    c.add_rule("op == LOOKUP and name == \"f\" on=reply")
    pending = r.call_async("LOOKUP", {"name": b"f"})
    held = c.wait_held(timeout=2)
    assert held["direction"] == "reply" and held["reply"]["args"]["entry"]["attr"]["ino"] == os.stat(
        tmp_path / "share" / "f").st_ino
    with pytest.raises(ControlError, match="held on its reply"):
        c.answer(held["n"], errno="EIO")
    c.rewrite(held["n"], fields={"entry": {"attr": {"ino": 424242}}})
    rep = pending.get(timeout=5)
    assert rep.error == 0 and rep.args["entry"].attr.ino == 424242
    assert rep.args["entry"].nodeid != 0  # the rest of the reply is the back-end's

    c.add_rule("op == GETATTR")
    pending = r.call_async("GETATTR", {"getattr": F.make("fuse_getattr_in")})
    held = c.wait_held(lambda m: m["opcode"] == "GETATTR", timeout=2)
    t0 = time.monotonic()
    assert c.delay(held["n"], 300)["how"] == "delayed"
    assert pending.get(timeout=5).error == 0
    assert time.monotonic() - t0 >= 0.29
    assert c.held() == []


def test_every_bad_command_gets_a_reason(rig: Any) -> None:
    r, c = rig("op == MKDIR")
    pending = r.call_async("MKDIR", _mkdir(b"x"))
    n = c.wait_held(timeout=2)["n"]
    cases = [
        ({"cmd": "release", "n": n + 100}, f"exchange {n + 100} is not held (held: {n})"),
        ({"cmd": "release"}, "n must be an exchange number"),
        ({"cmd": "answer", "n": n}, "give either errno or fields"),
        ({"cmd": "answer", "n": n, "errno": "ENOPE"}, "unknown errno name 'ENOPE'"),
        ({"cmd": "answer", "n": n, "errno": 0}, "outside 1..4095"),
        ({"cmd": "answer", "n": n, "fields": {"entry": {"bogus": 1}}}, "fields do not encode as a MKDIR reply"),
        ({"cmd": "rewrite", "n": n, "errno": "EIO"}, "rewrite needs a held reply"),
        ({"cmd": "drop", "n": n}, "only FORGET and BATCH_FORGET can be dropped"),
        ({"cmd": "delay", "n": n, "ms": -5}, "ms must be a number"),
        ({"cmd": "add-rule", "rule": "op == MKDIR errno=ENOENTX"}, "unknown errno name 'ENOENTX'"),
        ({"cmd": "add-rule"}, "add-rule needs \"rule\""),
        ({"cmd": "remove-rule", "rule_id": 99}, "no rule 99"),
        ({"cmd": "frobnicate"}, "unknown command 'frobnicate'"),
        ({"nocmd": 1}, "a command needs \"cmd\""),
    ]
    for i, (cmd, reason) in enumerate(cases, start=100):
        c.sock.sendall((json.dumps({"id": i, **cmd}) + "\n").encode())
        reply = c.wait_for(lambda m, i=i: m.get("type") == "reply" and m.get("id") == i)
        assert reply["ok"] is False and reason in reply["error"], (cmd, reply)
    with pytest.raises(ControlError) as ei:  # the caret comes along for a bad rule
        c.add_rule("op == MKDIR and nam == \"x\"")
    assert ei.value.args[0].splitlines()[-1].strip() == "^"
    assert pending.empty()  # none of that touched the held MKDIR
    assert c.continue_all() == [n]
    assert pending.get(timeout=5).error == 0


def test_a_held_request_is_answered_eio_when_the_engine_stops(rig: Any, tmp_path: Path) -> None:
    r, c = rig("op == MKDIR")
    pending = r.call_async("MKDIR", _mkdir(b"late"))
    c.wait_held(timeout=2)
    r.server.shutdown()  # what the transports do at the end, or GET_VRING_BASE for its queue
    assert pending.get(timeout=5).error == errno.EIO
    assert not (tmp_path / "share" / "late").exists()


def test_inject_rules_with_count_and_probability(rig: Any, tmp_path: Path) -> None:
    r, c = rig()
    for i in range(30):
        (tmp_path / "share" / f"f{i}").write_bytes(b"")
    c.add_rule("op == LOOKUP errno=ENOENT count=2")
    assert [r.kernel.lookup(1, f"f{i}".encode()).error for i in range(4)] == [errno.ENOENT] * 2 + [0] * 2
    assert c.rules() == []  # count spent: the rule retired
    rid = c.add_rule("'op == LOOKUP' errno=EIO p=0.5")
    errs = [r.kernel.lookup(1, f"f{i}".encode()).error for i in range(30)]
    assert set(errs) == {0, errno.EIO} and 5 < errs.count(errno.EIO) < 25
    assert c.rules()[0]["hits"] == errs.count(errno.EIO)
    c.remove_rule(rid)
    counters = c.command("counters")["counters"]
    assert counters["answered"] == 2 + errs.count(errno.EIO)


def test_delay_rule_does_not_block_other_requests(rig: Any, tmp_path: Path) -> None:
    r, _ = rig("op == MKDIR delay=400ms")
    pending = r.call_async("MKDIR", _mkdir(b"slow"))
    t0 = time.monotonic()
    assert r.kernel.lookup(1, b"nothing").error == errno.ENOENT  # served at once
    assert time.monotonic() - t0 < 0.2
    rep = pending.get(timeout=5)
    assert rep.error == 0 and time.monotonic() - t0 >= 0.38


def test_a_delayed_request_is_pending_with_an_age_and_linted_stuck(rig: Any) -> None:
    """A delay is no breakpoint: clients see the request pending, ageing, and `stuck` past the threshold
    (1 s); requests the prefilter held but the expression let go are pending at once, not held."""
    r, c = rig('op == MKDIR and name == "slow" delay=1500ms')
    fast = r.call_async("MKDIR", _mkdir(b"fast"))
    assert fast.get(timeout=5).error == 0
    pending = r.call_async("MKDIR", _mkdir(b"slow"))

    def update(state: str, lint: str | None = None) -> Any:
        return c.wait_for(lambda m: m.get("type") == "request" and m.get("opcode") == "MKDIR"
                          and m["request"]["args"]["name"] == "slow" and m["state"] == state
                          and (lint is None or lint in m["lints"]), timeout=5)

    first = c.wait_for(lambda m: m.get("type") == "exchange" and m["request"]["args"].get("name") == "fast")
    assert not any("debugger" in n for n in first.get("notes", [])), first  # let go by the expression: no note
    assert update("pending")["n"] > 0
    stuck = update("pending", "stuck")
    assert stuck["age_ms"] >= 1000
    assert pending.get(timeout=5).error == 0
    assert not any(m.get("type") in ("held", "resumed") for m in c.messages)  # no breakpoint involved


def test_a_verdict_the_source_refuses_never_raises_into_its_thread(rig: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The proxy calls on_held on its capture thread: a refused verdict is logged, not raised there."""
    r, _ = rig("op == LOOKUP errno=ENOENT")
    raw = r.kernel.encode("LOOKUP", {"name": b"gone"}, nodeid=1)
    r.intercept.on_held(1, 424242, 1, raw, 0)  # the engine holds nothing with that key: answer() refuses
    assert "deciding on a held request (queue 1, head 424242) failed" in caplog.text
    assert r.kernel.lookup(1, b"x").error == errno.ENOENT  # and the rule keeps working
