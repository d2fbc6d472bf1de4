"""Hold points in the daemon engine: the engine itself stops a request before its FileSystem sees it, or
a reply before the transport sends it, and waits for a verdict.

This is the daemon's implementation of fsinspect's HoldPoint (fsinspect/intercept/holdpoint.py; the
same methods, structurally: this package does not import fsinspect).  A held exchange is named by
(queue, unique): the engine has no descriptor head, and a unique names one request in flight.

- Matching: a rule table of `HoldRule`s (direction, queue bitmask, opcode set), replaced atomically by
  `set_rules`.  With an empty table the engine pays one attribute test per request.
- A held request is tapped as "request:held"; `release` serves it as if it had just arrived, `answer`
  sends the given reply bytes instead (tapped "reply:answered"; the FileSystem never sees the request),
  `drop` forgets a reply-less one (FORGET).
- A held reply is tapped "reply:held"; `release` sends it as it was (tapped "reply"), `rewrite` sends
  other bytes (tapped "reply:rewritten").
- Safety: `flush(queue)` (the transport stops a queue, or the engine shuts down) answers every held
  request with EIO, sends every held reply, drops held FORGETs; nothing is left waiting.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dissectors import fuse as F
from dissectors.errors import DecodeError
from dissectors.ring import HOLD_REPLY, HOLD_REQUEST, HoldRule

if TYPE_CHECKING:
    from .server import ReplySink, Server

log = logging.getLogger("fsinspect.daemon.hold")

# on_held(queue, unique, direction, raw, ts_ns), as fsinspect's HoldPoint calls it.
HeldCallback = Callable[[int, int, int, bytes, int], None]
_out_pack = F.OUT_HEADER.struct.pack


class HoldError(ValueError):
    """A verdict the engine cannot carry out (unknown exchange, wrong direction, bad reply bytes)."""


@dataclass
class _Held:
    direction: int
    queue: int
    unique: int
    opcode: int
    raw: bytes  # the request, or the reply
    reply: ReplySink
    request: bytes | None = None  # for a held reply: the request it answers (rules evaluate both)


class EngineHoldPoint:
    """The engine's hold point; give it to `Server(hold=...)` (the server binds itself)."""

    def __init__(self) -> None:
        self.on_held: HeldCallback | None = None
        # Told of each hold the engine resolves itself (flush: the session ends), so a delay rule's timer
        # or a client's verdict does not come for it later.
        self.on_resolved: Callable[[int, int, int, str], None] | None = None
        self.server: Server | None = None
        self._rules: tuple[HoldRule, ...] = ()
        self._req_ops: tuple[frozenset[int] | None, int] = (frozenset(), 0)  # cached prefilter, see set_rules
        self._held: dict[tuple[int, int], _Held] = {}
        self._lock = threading.Lock()

    def bind(self, server: Server) -> None:
        self.server = server

    # -- the rule table ----------------------------------------------------------------------------
    def set_rules(self, rules: Sequence[HoldRule]) -> None:
        """Replace the table atomically (one tuple assignment: readers see the old or the new one)."""
        self._rules = tuple(rules)

    def _matches(self, direction: int, queue: int, opcode: int) -> bool:
        for r in self._rules:
            if r.direction == direction and (not r.queues or r.queues >> queue & 1) and (
                    not r.opcodes or opcode in r.opcodes):
                return True
        return False

    @property
    def active(self) -> bool:
        return bool(self._rules)

    def may_hold(self, opcodes: frozenset[int]) -> bool:
        """Whether a rule of the table, in either direction and on any queue, could stop one of `opcodes`
        (a passthrough file's READ/WRITE never reach the engine, so it must not be opened so then)."""
        return any(not r.opcodes or not opcodes.isdisjoint(r.opcodes) for r in self._rules)

    # -- called by the engine ------------------------------------------------------------------------
    def match_request(self, queue: int, opcode: int) -> bool:
        return bool(self._rules) and self._matches(HOLD_REQUEST, queue, opcode)

    def match_reply(self, queue: int, opcode: int) -> bool:
        return bool(self._rules) and self._matches(HOLD_REPLY, queue, opcode)

    def hold_request(self, raw: bytes, reply: ReplySink, queue: int, ts_ns: int) -> None:
        """Keep a request (already tapped as held) and tell the decision maker."""
        try:
            _len, opcode, unique = F.peek_header(raw)
        except DecodeError:
            opcode, unique = -1, 0
        with self._lock:
            self._held[(queue, unique)] = _Held(HOLD_REQUEST, queue, unique, opcode, raw, reply)
        self._tell(queue, unique, HOLD_REQUEST, raw, ts_ns)

    def hold_reply(self, queue: int, unique: int, opcode: int, raw: bytes, reply: ReplySink,
                   request: bytes | None, ts_ns: int) -> None:
        with self._lock:
            self._held[(queue, unique)] = _Held(HOLD_REPLY, queue, unique, opcode, raw, reply, request)
        self._tell(queue, unique, HOLD_REPLY, raw, ts_ns)

    def _tell(self, queue: int, unique: int, direction: int, raw: bytes, ts_ns: int) -> None:
        cb = self.on_held
        if cb is None:  # nobody decides: never keep anything
            self.release(queue, unique)
            return
        try:
            cb(queue, unique, direction, raw, ts_ns)
        except Exception:
            log.exception("the hold decision failed; releasing unique %d", unique)
            try:
                self.release(queue, unique)
            except HoldError:
                pass  # already decided

    def request_of(self, queue: int, unique: int) -> bytes | None:
        """For a held reply: the request it answers (the filter language looks at both)."""
        with self._lock:
            h = self._held.get((queue, unique))
            return h.request if h is not None else None

    # -- verdicts ------------------------------------------------------------------------------------
    def _take(self, queue: int, unique: int, direction: int | None, what: str) -> _Held:
        with self._lock:
            h = self._held.get((queue, unique))
            if h is None:
                raise HoldError(f"nothing held on queue {queue} with unique {unique}")
            if direction is not None and h.direction != direction:
                raise HoldError(f"unique {unique} is a held {'reply' if h.direction == HOLD_REPLY else 'request'}: "
                                f"{what}")
            del self._held[(queue, unique)]
            return h

    def release(self, queue: int, head: int) -> None:
        """Serve the held request now, or send the held reply as it was."""
        h = self._take(queue, head, None, "")
        assert self.server is not None
        if h.direction == HOLD_REQUEST:
            self.server.serve_later(h.raw, h.reply, h.queue)  # the caller may be a client's thread
        else:
            self.server.send_reply(h.reply, h.queue, h.unique, h.raw, "reply")

    def answer(self, queue: int, head: int, data: bytes) -> None:
        """Reply to the held request with `data` (a whole fuse_out_header + body); the FileSystem never sees it."""
        self._check_reply(data, head)
        h = self._take(queue, head, HOLD_REQUEST, "only a held request can be answered (rewrite a reply)")
        assert self.server is not None
        self.server.send_reply(h.reply, h.queue, h.unique, data, "reply:answered")

    def rewrite(self, queue: int, head: int, data: bytes) -> None:
        """Send `data` instead of the held reply."""
        self._check_reply(data, head)
        h = self._take(queue, head, HOLD_REPLY, "only a held reply can be rewritten (answer a request)")
        assert self.server is not None
        self.server.send_reply(h.reply, h.queue, h.unique, data, "reply:rewritten")

    def drop(self, queue: int, head: int) -> None:
        """Forget a held reply-less request (FORGET, BATCH_FORGET): it is never served."""
        from .server import NO_REPLY_OPS

        with self._lock:
            h = self._held.get((queue, head))
            if h is not None and (h.direction != HOLD_REQUEST or h.opcode not in NO_REPLY_OPS):
                raise HoldError(f"unique {head} expects a reply: it cannot be dropped")
        self._take(queue, head, HOLD_REQUEST, "")

    @staticmethod
    def _check_reply(data: bytes, unique: int) -> None:
        if len(data) < F.OUT_HEADER_SIZE or int.from_bytes(data[:4], "little") != len(data):
            raise HoldError(f"a reply needs a fuse_out_header whose len says {len(data)}")
        if int.from_bytes(data[8:16], "little") != unique:
            raise HoldError(f"the reply's unique is not {unique}")

    def held(self) -> list[tuple[int, int, int]]:
        """(queue, unique, direction) of everything held now."""
        with self._lock:
            return [(h.queue, h.unique, h.direction) for h in self._held.values()]

    def flush(self, queue: int | None = None) -> int:
        """Let everything held (on `queue`, or everywhere) go safely: EIO for requests, replies as they were."""
        from .server import NO_REPLY_OPS

        with self._lock:
            items = [h for k, h in self._held.items() if queue is None or k[0] == queue]
            for h in items:
                del self._held[(h.queue, h.unique)]
        server = self.server
        for h in items:
            if server is None:
                continue
            if h.direction == HOLD_REPLY:
                server.send_reply(h.reply, h.queue, h.unique, h.raw, "reply")
            elif h.opcode not in NO_REPLY_OPS:
                server.send_reply(h.reply, h.queue, h.unique, _out_pack(F.OUT_HEADER_SIZE, -errno.EIO, h.unique),
                                  "reply:safety")
        if self.on_resolved is not None:
            for h in items:
                self.on_resolved(h.queue, h.unique, h.direction, "released" if h.direction == HOLD_REPLY else "answered")
        if items:
            log.warning("released %d held exchange(s) safely (EIO for held requests)", len(items))
        return len(items)


__all__ = ["EngineHoldPoint", "HoldError"]
