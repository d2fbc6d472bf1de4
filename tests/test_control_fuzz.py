"""Fuzz the control protocol (client -> hub command lines) on the real stack: the daemon engine's control
socket (ControlTap's hub) with the debugger's command handler (fsinspect/intercept/control.py).

Each case sends a batch of lines (commands with random fields and values, rule texts from fragments of
the rule language (a bad rule's error has its caret lines), JSON that is not an object, bytes that are not JSON) on one connection.  Every
non-blank line gets exactly one reply or error line, in order, carrying the command's id; no reply is an
"internal error" (a handler that raised); the connection stays up.  CI runs a small budget;
`./scripts/check --slow` runs 1M cases (FSI_SLOW_CASES).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as hs

from tests.fuzzbudget import SLOW_CASES, fuzz
from tests.test_intercept_control import Rig

CI_CASES = int(os.environ.get("FSI_FUZZ_EXAMPLES", "300")) // 2
COMMANDS = ["held", "release", "answer", "delay", "rewrite", "drop", "continue-all", "rules", "add-rule",
            "remove-rule", "counters"]
RULE_BITS = ["op == MKDIR", "op == GETATTR", "name == \"x\"", "nodeid == 1", "error", "and", "or", "not", "(",
             ")", "errno=ENOENT", "errno=999999", "delay=5", "delay=-1", "reply-errno=EIO", "count=2", "p=0.5",
             "p=2", "on=reply", "==", "\"", "op ==", "latency > 1ms", "\u00e9", "\\"]
JSON = hs.recursive(hs.none() | hs.booleans() | hs.integers(-2**70, 2**70) | hs.floats() | hs.text(max_size=20),
                    lambda inner: hs.lists(inner, max_size=3) | hs.dictionaries(hs.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
FIELD = {"n": JSON | hs.integers(0, 5), "errno": JSON | hs.sampled_from(["EACCES", "ENOENT", 13, 0, -1, "NOPE"]),
         "ms": JSON | hs.integers(-5, 50), "fields": JSON, "rule_id": JSON | hs.integers(0, 5),
         "rule": JSON | hs.lists(hs.sampled_from(RULE_BITS), max_size=6).map(" ".join)}


@hs.composite
def command_line(draw: hs.DrawFn) -> bytes:
    kind = draw(hs.integers(0, 9))
    if kind == 0:
        return draw(hs.binary(max_size=80)).replace(b"\n", b" ")
    if kind == 1:
        return json.dumps(draw(JSON)).encode()
    obj: dict[str, Any] = {}
    if draw(hs.integers(0, 5)):
        obj["id"] = draw(hs.integers(0, 1000) | JSON)
    if draw(hs.integers(0, 7)):
        obj["cmd"] = draw(hs.sampled_from(COMMANDS) | JSON)
    for key in draw(hs.lists(hs.sampled_from(sorted(FIELD)), max_size=3, unique=True)):
        obj[key] = draw(FIELD[key])
    return json.dumps(obj).encode()


class World:
    def __init__(self, tmp: Path) -> None:
        (tmp / "share").mkdir()
        self.rig = Rig(tmp / "share", tmp / "ctl.sock", [])
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(tmp / "ctl.sock"))
        self.sock.settimeout(10)
        self.lines = self.sock.makefile("rb")
        self.id = 0
        assert json.loads(self.lines.readline())["type"] == "hello"

    def answers(self, count: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < count:
            line = self.lines.readline()
            assert line, "the hub closed the connection"
            msg = json.loads(line)
            if msg.get("type") in ("reply", "error"):
                out.append(msg)
        return out

    def case(self, lines: list[bytes]) -> None:
        self.sock.sendall(b"".join(line + b"\n" for line in lines))
        expected = [line for line in lines if line.strip()]
        for line, msg in zip(expected, self.answers(len(expected))):
            assert "internal error" not in str(msg.get("error", "")), (line, msg)
            try:
                obj = json.loads(line)
            except ValueError:
                assert msg["type"] == "error" and msg["error"].startswith("not JSON"), (line, msg)
                continue
            if not isinstance(obj, dict):
                assert msg == {"type": "error", "error": "a command is a JSON object"}, (line, msg)
                continue
            assert msg["type"] == "reply" and msg["id"] == obj.get("id") and isinstance(msg["ok"], bool), (line, msg)
        # Leave no rule behind for the next case (a break rule would hold the engine's next requests).
        for rule in self.rig.intercept.rules():
            self.rig.intercept.remove_rule(rule["rule_id"])
        self.rig.intercept.continue_all()

    def close(self) -> None:
        self.lines.close()
        self.sock.close()
        self.rig.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


BATCHES = hs.lists(command_line(), min_size=1, max_size=6)


def test_fuzz_control_commands(world: World) -> None:
    assert fuzz("control: command lines", BATCHES, world.case, CI_CASES, derandomize=True) == CI_CASES


@pytest.mark.slow
def test_fuzz_control_commands_1m(world: World) -> None:
    fuzz("control: command lines", BATCHES, world.case, SLOW_CASES)
