"""Fuzz the control protocol (client -> hub command lines) on the real stack: the daemon engine's control
socket (the engine source's hub) with the debugger's command handler (fsinspect/intercept/control.py).

Each case sends a batch of lines (commands with random fields and values, rule texts from fragments of
the rule language (a bad rule's error has its caret lines), JSON that is not an object, bytes that are not JSON) on one connection.  Every
non-blank line gets exactly one reply or error line, in order, carrying the command's id; no reply is an
"internal error" (a handler that raised); the connection stays up.  CI runs a small budget of hypothesis cases
(shrinking) and of the seeded campaign, which pipelines 200 lines per batch; `./scripts/check --slow` runs the
campaign at 1M cases (FSI_SLOW_CASES; FSI_FUZZ_SEED replays one).
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as hs

from tests.fuzzbudget import SLOW_CASES, fuzz, report
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


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _strict(name: str) -> Any:
    raise AssertionError(f"the hub sent {name}, which is not JSON")


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
            msg = json.loads(line, parse_constant=_strict)  # every line is RFC 8259 JSON (no NaN, no Infinity)
            if msg.get("type") in ("reply", "error"):
                out.append(msg)
        return out

    def case(self, lines: list[bytes]) -> None:
        self.sock.sendall(b"".join(line + b"\n" for line in lines))
        expected = [line for line in lines if line.strip()]
        for line, msg in zip(expected, self.answers(len(expected))):
            assert "internal error" not in str(msg.get("error", "")), (line, msg)
            try:
                obj = json.loads(line, parse_constant=_no_constant)
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


def test_nan_and_infinity_are_not_json(world: World) -> None:
    """Found by the seeded campaign: {"id": NaN} was taken (Python's json reads NaN) and its reply carried
    NaN back, which strict JSON clients (jq, JSON.parse) cannot read.  NaN and Infinity are refused as not
    JSON, like any other bad line."""
    world.sock.sendall(b'{"id": NaN, "cmd": "rules"}\n{"cmd": "rules", "id": -Infinity}\n{"id": 1, "cmd": "rules"}\n')
    bad1, bad2, ok = world.answers(3)
    for bad in (bad1, bad2):
        assert bad["type"] == "error" and bad["error"].startswith("not JSON") and "JSON" in bad["error"][9:], bad
    assert ok["type"] == "reply" and ok["id"] == 1 and ok["ok"] is True


# -- the seeded campaign: lines from a fast RNG, pipelined in batches (1M cases in minutes) -------------------

def _json(rnd: random.Random, depth: int = 0) -> Any:
    k = rnd.randrange(9 if depth < 2 else 6)
    if k == 0:
        return None
    if k == 1:
        return rnd.random() < 0.5
    if k == 2:
        return rnd.choice((0, -1, 1, 2**31, 2**63, -2**70, rnd.randrange(-1000, 1000)))
    if k == 3:
        return rnd.choice((0.5, -0.0, 1e308, float("inf"), float("nan")))
    if k in (4, 5):
        return "".join(rnd.choice("abz\u00e9\\\"\n\t\0 {}[]") for _ in range(rnd.randrange(12)))
    if k in (6, 7):
        return [_json(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    return {_json_key(rnd): _json(rnd, depth + 1) for _ in range(rnd.randrange(4))}


def _json_key(rnd: random.Random) -> str:
    return rnd.choice([*FIELD_NAMES, "cmd", "id", "x", ""])


FIELD_NAMES = sorted(FIELD)
SMALL = {"n": (0, 5), "rule_id": (0, 5), "ms": (-5, 50)}
ERRNOS = ["EACCES", "ENOENT", 13, 0, -1, "NOPE"]


def _line(rnd: random.Random) -> bytes:
    """One command line, as the hypothesis strategy draws them (command_line), from a fast RNG."""
    kind = rnd.randrange(10)
    if kind == 0:
        return rnd.randbytes(rnd.randrange(80)).replace(b"\n", b" ")
    if kind == 1:
        return json.dumps(_json(rnd)).encode()
    obj: dict[str, Any] = {}
    if rnd.randrange(6):
        obj["id"] = rnd.randrange(1001) if rnd.random() < 0.8 else _json(rnd)
    if rnd.randrange(8):
        obj["cmd"] = rnd.choice(COMMANDS) if rnd.random() < 0.9 else _json(rnd)
    for key in rnd.sample(FIELD_NAMES, rnd.randrange(4)):
        if rnd.random() < 0.3:
            obj[key] = _json(rnd)
        elif key == "rule":
            obj[key] = " ".join(rnd.choice(RULE_BITS) for _ in range(rnd.randrange(7)))
        elif key == "errno":
            obj[key] = rnd.choice(ERRNOS)
        elif key in SMALL:
            obj[key] = rnd.randint(*SMALL[key])
        else:
            obj[key] = _json(rnd)
    return json.dumps(obj).encode()


def _campaign(world: World, cases: int, seed: int, batch: int = 200) -> None:
    rnd = random.Random(seed)
    n = 0
    t0 = time.monotonic()
    while n < cases:
        lines = [_line(rnd) for _ in range(min(batch, cases - n))]
        try:
            world.case(lines)
        except AssertionError as e:
            raise AssertionError(f"control fuzz seed {seed}, the batch after case {n}: {e}") from None
        n += len(lines)
    report("control: command lines (seeded, pipelined)", n, time.monotonic() - t0, f"seed {seed}")


def test_control_campaign(world: World) -> None:
    _campaign(world, CI_CASES * 20, 1)


@pytest.mark.slow
def test_fuzz_control_commands_1m(world: World) -> None:
    _campaign(world, SLOW_CASES, int(os.environ.get("FSI_FUZZ_SEED", time.time_ns() % 2**32)))
