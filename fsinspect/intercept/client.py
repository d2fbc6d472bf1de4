"""A small client for the control socket (protocol version 2): what a test script needs to drive the debugger.

    with ControlClient("/run/fsi.ctl") as c:
        rid = c.add_rule("op == MKDIR")                 # a breakpoint
        held = c.wait_held(lambda m: m["opcode"] == "MKDIR", timeout=5)
        c.answer(held["n"], errno="EACCES")             # or c.release(n), c.delay(n, 300), ...
        c.remove_rule(rid)

Commands block until their reply; the live stream (exchanges, requests, held, resumed, events) that
arrives meanwhile is kept, in order, for `wait_for` / `wait_held`.  A refused command raises
ControlError with the server's reason.  Standard library only, so a script can copy it.
"""

from __future__ import annotations

import collections
import itertools
import json
import socket
import time
from collections.abc import Callable
from typing import Any

Message = dict[str, Any]


class ControlError(Exception):
    """The server refused a command (the message is its reason), or the connection failed."""


class ControlClient:
    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.sock = self._connect(path, time.monotonic() + timeout)
        self._buf = b""
        self._ids = itertools.count(1)
        self.messages: collections.deque[Message] = collections.deque(maxlen=100_000)
        self.hello = self._read(time.monotonic() + timeout)
        if self.hello.get("type") != "hello":
            raise ControlError(f"expected a hello, got {self.hello.get('type')!r}")
        if 2 not in self.hello.get("versions", [self.hello.get("version")]):
            raise ControlError(f"the server speaks protocol {self.hello.get('version')}, not 2: it takes no commands")
        self.snapshot = self._read(time.monotonic() + timeout)

    # -- plumbing ------------------------------------------------------------------------------------
    @staticmethod
    def _connect(path: str, deadline: float) -> socket.socket:
        """Connect, waiting (until `deadline`) for a source that is still starting: no socket yet, or
        bound but not listening."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise ControlError(f"{path}: {e.strerror or e}") from None
                time.sleep(0.05)
            except OSError as e:
                sock.close()
                raise ControlError(f"{path}: {e.strerror or e}") from None

    def _read(self, deadline: float) -> Message:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from the control socket in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                raise TimeoutError("no message from the control socket in time") from None
            if not chunk:
                raise ControlError("the control socket closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise ControlError(f"not a message: {line[:80]!r}")
        return obj

    def command(self, cmd: str, **args: Any) -> Message:
        """Send one command and return its reply (ok); ControlError with the reason otherwise."""
        cid = next(self._ids)
        self.sock.sendall((json.dumps({"id": cid, "cmd": cmd, **args}) + "\n").encode())
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._read(deadline)
            if m.get("type") == "reply" and m.get("id") == cid:
                if not m.get("ok"):
                    raise ControlError(str(m.get("error")))
                return m
            if m.get("type") == "error":
                raise ControlError(str(m.get("error")))
            self.messages.append(m)

    def wait_for(self, match: Callable[[Message], bool], timeout: float | None = None) -> Message:
        """The first live message (kept or new) that `match` accepts; it is removed from `messages`."""
        for m in list(self.messages):
            if match(m):
                self.messages.remove(m)
                return m
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            m = self._read(deadline)
            if match(m):
                return m
            self.messages.append(m)

    def wait_held(self, match: Callable[[Message], bool] = lambda m: True, timeout: float | None = None) -> Message:
        """The next `held` message (an exchange a breakpoint stopped) that `match` accepts."""
        return self.wait_for(lambda m: m.get("type") == "held" and match(m), timeout)

    # -- the commands ----------------------------------------------------------------------------------
    def held(self) -> list[Message]:
        return list(self.command("held")["held"])

    def release(self, n: int) -> Message:
        return self.command("release", n=n)

    def answer(self, n: int, *, errno: str | int | None = None, fields: dict[str, Any] | None = None) -> Message:
        return self.command("answer", n=n, **({"errno": errno} if errno is not None else {"fields": fields}))

    def rewrite(self, n: int, *, errno: str | int | None = None, fields: dict[str, Any] | None = None) -> Message:
        return self.command("rewrite", n=n, **({"errno": errno} if errno is not None else {"fields": fields}))

    def delay(self, n: int, ms: float) -> Message:
        return self.command("delay", n=n, ms=ms)

    def drop(self, n: int) -> Message:
        return self.command("drop", n=n)

    def continue_all(self) -> list[int]:
        return list(self.command("continue-all")["released"])

    def rules(self) -> list[Message]:
        return list(self.command("rules")["rules"])

    def add_rule(self, rule: str) -> int:
        return int(self.command("add-rule", rule=rule)["rule_id"])

    def remove_rule(self, rule_id: int) -> Message:
        return self.command("remove-rule", rule_id=rule_id)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
