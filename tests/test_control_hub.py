"""The control hub (fsinspect/proxy/hub.py) under clients that misbehave: commands, caps, budgets, fds."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fsinspect.proxy.hub import Hub


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.connect(path)
    s.settimeout(10)
    return s


def _lines(s: socket.socket) -> Iterator[dict[str, Any]]:
    f = s.makefile("rb")
    for line in f:
        yield json.loads(line)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    h = Hub(str(tmp_path / "ctl.sock"), lambda: {"inodes": [], "stats": {}})
    yield h
    h.close(0.5)


def test_commands_reach_the_handler_and_each_gets_one_reply(hub: Hub) -> None:
    s = _connect(hub.path)
    it = _lines(s)
    assert next(it)["type"] == "hello" and next(it)["type"] == "snapshot"
    # No handler: a command with an id is refused in a reply; one without is ignored (version 1).
    s.sendall(b'{"cmd": "held"}\n{"id": 1, "cmd": "held"}\n')
    assert next(it) == {"type": "reply", "id": 1, "ok": False, "error": "this proxy takes no commands"}
    seen: list[tuple[int, dict[str, Any]]] = []

    def handler(cid: int, obj: dict[str, Any]) -> dict[str, Any]:
        seen.append((cid, obj))
        if obj["cmd"] == "boom":
            raise RuntimeError("broken handler")
        return {"type": "reply", "id": obj["id"], "ok": True, "n": len(seen)}

    hub.command_handler = handler
    s.sendall(b'{"id": 2, "cmd": "held"}\n{"id": 3, "cmd": "boom"}\nnot json\n[1, 2]\n{"id": 4, "cmd": "rules"}\n')
    assert next(it) == {"type": "reply", "id": 2, "ok": True, "n": 1}
    assert next(it) == {"type": "reply", "id": 3, "ok": False, "error": "internal error: broken handler"}
    assert next(it)["error"].startswith("not JSON")
    assert next(it) == {"type": "error", "error": "a command is a JSON object"}
    assert next(it) == {"type": "reply", "id": 4, "ok": True, "n": 3}
    assert [cid for cid, _ in seen] == [1, 1, 1] and seen[0][1] == {"id": 2, "cmd": "held"}
    # A line over the limit: one error line, then the hub closes the connection; memory did not follow it.
    s.sendall(b"x" * (hub.max_line + 10))
    assert next(it) == {"type": "error", "error": f"a line longer than {hub.max_line} bytes: disconnecting"}
    assert s.recv(10) == b""
    assert not hub.clients
    s.close()


def test_client_cap_refuses_the_rest_with_a_message(tmp_path: Path) -> None:
    h = Hub(str(tmp_path / "ctl.sock"), lambda: {}, max_clients=3)
    try:
        kept = [_connect(h.path) for _ in range(3)]
        for s in kept:
            assert next(_lines(s))["type"] == "hello"
        extra = _connect(h.path)
        msg = json.loads(extra.makefile("rb").readline())
        assert msg == {"type": "error", "error": "too many control clients (3 attached): try again later"}
        assert extra.recv(10) == b""
        assert len(h.clients) == 3 and h.refused == 1
        kept[0].close()
        deadline = time.monotonic() + 5
        while len(h.clients) > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        again = _connect(h.path)  # a place freed up
        assert next(_lines(again))["type"] == "hello"
        for s in [*kept[1:], extra, again]:
            s.close()
    finally:
        h.close(0.5)
