"""The Intercept addon: rules decide what a HoldPoint holds, and verdicts let it go.

For every held capture (HoldPoint.on_held) the addon builds the exchange as the filter language sees it
(decoded request, and the reply for a held reply), runs the active rules in order and acts on the first
one that matches and fires (count=, p=):
- break: keep it in the held table until a client decides (release/answer/delay/rewrite/drop);
- answer: reply with the rule's errno, encoded by the codecs (the back-end never sees the request);
- delay: release it later from the timer thread (never blocks the data path);
- rewrite: replace the back-end's reply by the rule's errno.
Nothing matches (the native prefilter is coarser than the expression): release at once.

Rules can be added and removed while the source runs; the native table follows (`set_rules`).  A rule
whose count is spent retires.  Listeners hear `held` and `resumed` events (control protocol v2).
Exchange numbers: the source's own (`exchange.n`, from its analyzer) when the wiring passes the
exchange; otherwise the addon numbers held captures itself.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dissectors import edit
from dissectors import fuse as F
from dissectors.errors import DecodeError
from dissectors.spec import fuse as spec

from ..analysis.exchange import Exchange
from ..analysis.render import exchange_json
from .holdpoint import HOLD_REPLY, HOLD_REQUEST, HoldPoint, HoldRule
from .rules import NO_REPLY_OPS, Rule, parse_errno
from .timers import Timers

log = logging.getLogger("fsinspect.intercept")

Event = dict[str, Any]
DIRECTION_NAME = {HOLD_REQUEST: "request", HOLD_REPLY: "reply"}
MAX_DELAY_MS = 3_600_000
_REMEMBERED = 4096  # requests kept for reply rules (bounded: in-flight chains are at most queue sizes)


class InterceptError(Exception):
    """A verdict or rule change that cannot be carried out; the message is the reason a client sees."""


@dataclass
class Held:
    """One exchange stopped at a breakpoint (or waiting for its delay)."""

    n: int
    queue: int
    head: int
    direction: int
    raw: bytes  # the held request, or the held reply
    ts_ns: int
    exchange: Exchange
    rule_id: int | None
    timer: int | None = None  # a pending delay

    def json(self) -> dict[str, Any]:
        d = exchange_json(self.exchange, raw=True)
        d.update(n=self.n, direction=DIRECTION_NAME[self.direction], state="held", rule_id=self.rule_id)
        return d


@dataclass
class _Active:
    id: int
    rule: Rule
    hits: int = 0
    left: int | None = None

    def json(self) -> dict[str, Any]:
        return {"rule_id": self.id, "rule": self.rule.describe(), "kind": self.rule.kind,
                "action": self.rule.action, "direction": DIRECTION_NAME[self.rule.direction], "hits": self.hits,
                "left": self.left}


@dataclass
class Counters:
    held: int = 0
    released: int = 0
    answered: int = 0
    delayed: int = 0
    rewritten: int = 0
    dropped: int = 0
    passed: int = 0  # held natively, but the expression (or p=) let it go at once


def error_reply(errno_: int, unique: int) -> bytes:
    """A whole FUSE error reply (fuse_out_header only), through the codecs."""
    return F.encode_reply(spec.OPCODES[0], unique=unique, error=errno_)


class Intercept:
    """The policy half of the debugger over one HoldPoint (proxy session or daemon engine)."""

    def __init__(self, rules: Sequence[Rule] = (), *, seed: int | None = None,
                 context: Callable[[], F.FuseContext] | None = None) -> None:
        self.point: HoldPoint | None = None
        self.context = context or (lambda: F.DEFAULT_CONTEXT)
        self.rng = random.Random(seed)
        self.seed = seed
        self.lock = threading.RLock()
        self.timers = Timers()
        self.counters = Counters()
        self.listeners: list[Callable[[Event], None]] = []
        self._rules: list[_Active] = []
        self._ids = itertools.count(1)
        self._own_n = itertools.count(1)
        self._held: dict[int, Held] = {}
        self._by_key: dict[tuple[int, int, int], int] = {}  # (queue, head, direction) -> n
        self._requests: dict[tuple[int, int], bytes] = {}  # for reply rules: the request each chain carries
        self._reply_ops: frozenset[int] = frozenset()
        self._closed = False
        # Set by the wiring: the source's own exchange for a capture just held (analyzer: numbered, decoded).
        self.exchange_of: Callable[[int, int, int], Exchange | None] | None = None
        for r in rules:
            self._add(r)

    # -- wiring ------------------------------------------------------------------------------------
    def attach(self, point: HoldPoint) -> None:
        """Become `point`'s decision maker and install the native rule table."""
        self.point = point
        point.on_held = self.on_held
        self._push_rules()

    @property
    def wants_requests(self) -> bool:
        """True while a reply rule needs observe_request() (the source may skip the call otherwise)."""
        return bool(self._reply_ops) or any(not r.rule.opcodes for r in self._rules
                                            if r.rule.direction == HOLD_REPLY)

    def observe_request(self, queue: int, head: int, raw: bytes) -> None:
        """A request went by (held or not): reply rules evaluate their expression on it later."""
        if len(raw) < 8 or not self.wants_requests:
            return
        opcode = int.from_bytes(raw[4:8], "little")
        if self._reply_ops and opcode not in self._reply_ops:
            return
        with self.lock:
            if len(self._requests) >= _REMEMBERED:
                self._requests.pop(next(iter(self._requests)))
            self._requests[(queue, head)] = bytes(raw)

    # -- rules -----------------------------------------------------------------------------------
    def _add(self, rule: Rule) -> int:
        a = _Active(next(self._ids), rule, left=rule.count)
        self._rules.append(a)
        self._reply_ops = frozenset().union(*[r.rule.opcodes for r in self._rules
                                              if r.rule.direction == HOLD_REPLY])
        return a.id

    def add_rule(self, rule: Rule) -> int:
        with self.lock:
            rid = self._add(rule)
        self._push_rules()
        return rid

    def remove_rule(self, rule_id: int) -> Rule:
        with self.lock:
            for i, a in enumerate(self._rules):
                if a.id == rule_id:
                    del self._rules[i]
                    break
            else:
                raise InterceptError(f"no rule {rule_id} (rules: {', '.join(str(a.id) for a in self._rules) or 'none'})")
            self._reply_ops = frozenset().union(*[r.rule.opcodes for r in self._rules
                                                  if r.rule.direction == HOLD_REPLY])
        self._push_rules()
        return a.rule

    def rules(self) -> list[dict[str, Any]]:
        with self.lock:
            return [a.json() for a in self._rules]

    def hold_rules(self) -> list[HoldRule]:
        """The native table: one HoldRule per distinct prefilter of the active rules."""
        with self.lock:
            out: list[HoldRule] = []
            for a in self._rules:
                hr = a.rule.hold_rule()
                if hr not in out:
                    out.append(hr)
            return out

    def _push_rules(self) -> None:
        if self.point is not None and not self._closed:
            self.point.set_rules(self.hold_rules())

    # -- the held capture --------------------------------------------------------------------------
    def _exchange(self, queue: int, head: int, direction: int, raw: bytes, ts_ns: int,
                  request: bytes | None) -> Exchange:
        ctx = self.context()
        req_raw = raw if direction == HOLD_REQUEST else request
        ex = Exchange(-1, queue, head, 0, 0, -1)
        if req_raw is not None and len(req_raw) >= F.IN_HEADER_SIZE:
            _, ex.opcode, ex.unique = F.peek_header(req_raw)
            ex.nodeid = int.from_bytes(req_raw[16:24], "little")
            ex.req_raw, ex.req_len, ex.req_ts = req_raw, len(req_raw), ts_ns
            try:
                ex.request = F.decode_request(req_raw, ctx)
            except DecodeError as e:
                ex.decode_error = f"request: {e}"
        if direction == HOLD_REPLY:
            ex.reply_raw, ex.reply_len, ex.reply_ts, ex.replied = raw, len(raw), ts_ns, True
            if len(raw) >= F.OUT_HEADER_SIZE:
                err = int.from_bytes(raw[4:8], "little", signed=True)
                ex.error = -err if err <= 0 else None
                if ex.unique == 0:
                    ex.unique = int.from_bytes(raw[8:16], "little")
            try:
                ex.reply = F.decode_reply(raw, ex.request if ex.request is not None else ex.opcode, ctx)
            except DecodeError as e:
                ex.decode_error = f"reply: {e}"
        return ex

    def on_held(self, queue: int, head: int, direction: int, raw: bytes, ts_ns: int, *,
                exchange: Exchange | None = None, request: bytes | None = None) -> None:
        """HoldPoint callback: decide now (answer/rewrite/release/timer) or keep it for a client.

        Never raises into the source's thread: a decision that fails (the path refused a verdict, a bug)
        is logged and the capture released, so nothing stays held that nobody knows about."""
        try:
            self._decide(queue, head, direction, raw, ts_ns, exchange, request)
        except Exception:
            log.exception("deciding on a held %s (queue %d, head %d) failed; releasing it",
                          DIRECTION_NAME.get(direction, "?"), queue, head)
            with self.lock:
                n = self._by_key.pop((queue, head, direction), None)
                if n is not None:
                    self._held.pop(n, None)
            try:
                self._verdict(queue, head, direction, "released")
            except Exception as e:  # already decided, or the path is gone (its safety rule applies)
                log.debug("release after a failed decision: %s", e)

    def _decide(self, queue: int, head: int, direction: int, raw: bytes, ts_ns: int, exchange: Exchange | None,
                request: bytes | None) -> None:
        if exchange is None and self.exchange_of is not None:
            exchange = self.exchange_of(queue, head, direction)
        if direction == HOLD_REPLY and request is None and exchange is None:
            with self.lock:
                request = self._requests.pop((queue, head), None)
            request_of = getattr(self.point, "request_of", None)
            if request is None and request_of is not None:
                request = request_of(queue, head)
        elif direction == HOLD_REQUEST:
            self.observe_request(queue, head, raw)
        ex = exchange if exchange is not None else self._exchange(queue, head, direction, raw, ts_ns, request)
        hit = self._match(ex, queue, direction)
        src_n = getattr(exchange, "n", 0)
        if hit is None:
            self.counters.passed += 1
            self._verdict(queue, head, direction, "released")
            self._auto(src_n, "released")
            return
        rule_id, rule = hit
        n = src_n or next(self._own_n)
        h = Held(n, queue, head, direction, bytes(raw), ts_ns, ex, rule_id)
        if rule.action == "break":
            with self.lock:
                self._held[n] = h
                self._by_key[(queue, head, direction)] = n
                self.counters.held += 1
            self._emit({"type": "held", **h.json()})
            return
        how = {"answer": "answered", "rewrite": "rewritten", "delay": "released"}[rule.action]
        err = rule.errno if rule.errno is not None else rule.reply_errno
        if rule.delay_ns:
            with self.lock:
                self._held[n] = h
                self._by_key[(queue, head, direction)] = n
                self.counters.delayed += 1
                h.timer = self.timers.call_later(rule.delay_ns / 1e9, lambda: self._due(n, how, err))
            self._auto(src_n, "delayed")  # pending from now on: it ages, and may be linted stuck
            return
        self._act(h, how, err)
        self._auto(src_n, how)

    def _auto(self, n: int, how: str) -> None:
        """A rule decided at once: the source's analyzer moves the exchange on (it was marked held when
        captured).  `auto` events are for the source only; clients see the exchange's own updates."""
        if n:
            self._emit({"type": "resumed", "n": n, "how": how, "auto": True})

    def _match(self, ex: Exchange, queue: int, direction: int) -> tuple[int, Rule] | None:
        retired = False
        try:
            with self.lock:
                for a in self._rules:
                    r = a.rule
                    if r.direction != direction or (r.opcodes and ex.opcode not in r.opcodes) or (
                            r.queues and not r.queues >> queue & 1):
                        continue
                    try:
                        if not r.predicate(ex):
                            continue
                    except Exception:  # a predicate on a half-decoded exchange: not a match
                        log.debug("rule %d could not evaluate exchange", a.id, exc_info=True)
                        continue
                    if r.p is not None and self.rng.random() >= r.p:
                        continue
                    a.hits += 1
                    if a.left is not None:
                        a.left -= 1
                        if a.left <= 0:
                            self._rules.remove(a)
                            retired = True
                    return a.id, r
                return None
        finally:
            if retired:
                self._push_rules()

    def _due(self, n: int, how: str, err: int | None) -> None:
        with self.lock:
            h = self._held.pop(n, None)
            if h is None:
                return  # a client decided first
            self._by_key.pop((h.queue, h.head, h.direction), None)
        self._act(h, how, err)

    def _act(self, h: Held, how: str, err: int | None) -> None:
        if how == "answered":
            assert err is not None
            self._verdict(h.queue, h.head, h.direction, how, error_reply(err, h.exchange.unique))
        elif how == "rewritten":
            assert err is not None
            self._verdict(h.queue, h.head, h.direction, how, error_reply(err, h.exchange.unique))
        else:
            self._verdict(h.queue, h.head, h.direction, how)

    def _verdict(self, queue: int, head: int, direction: int, how: str, data: bytes = b"") -> None:
        p = self.point
        if p is None:
            return
        if how == "answered":
            p.answer(queue, head, data)
            self.counters.answered += 1
        elif how == "rewritten":
            p.rewrite(queue, head, data)
            self.counters.rewritten += 1
        elif how == "dropped":
            p.drop(queue, head)
            self.counters.dropped += 1
        else:
            p.release(queue, head)
            self.counters.released += 1

    def _emit(self, ev: Event) -> None:
        for cb in list(self.listeners):
            try:
                cb(ev)
            except Exception:
                log.exception("an intercept listener failed")

    def on_resolved(self, queue: int, head: int, direction: int, how: str) -> None:
        """The source resolved a hold itself (safety: its queue stopped): forget it, tell the clients."""
        with self.lock:
            n = self._by_key.pop((queue, head, direction), None)
            h = self._held.pop(n, None) if n is not None else None
            if h is not None and h.timer is not None:
                self.timers.cancel(h.timer)
        if h is not None:
            self._emit({"type": "resumed", "n": h.n, "how": how, "by": "source"})

    # -- verdicts from clients ----------------------------------------------------------------------
    def held(self) -> list[dict[str, Any]]:
        with self.lock:
            return [h.json() for h in sorted(self._held.values(), key=lambda h: h.n) if h.timer is None]

    def _take(self, n: Any, direction: int | None = None, what: str = "") -> Held:
        if not isinstance(n, int) or isinstance(n, bool):
            raise InterceptError(f"n must be an exchange number, not {n!r}")
        with self.lock:
            h = self._held.get(n)
            if h is None:
                raise InterceptError(f"exchange {n} is not held" + (
                    f" (held: {', '.join(str(k) for k in sorted(self._held))})" if self._held else " (nothing is)"))
            if direction is not None and h.direction != direction:
                raise InterceptError(f"exchange {n} is held on its {DIRECTION_NAME[h.direction]}: {what}")
            if h.timer is not None:
                self.timers.cancel(h.timer)
                h.timer = None
            del self._held[n]
            self._by_key.pop((h.queue, h.head, h.direction), None)
            return h

    def _resume(self, h: Held, how: str, data: bytes = b"") -> Event:
        try:
            self._verdict(h.queue, h.head, h.direction, how, data)
        except Exception as e:
            raise InterceptError(f"the data path refused: {e}") from e
        ev = {"type": "resumed", "n": h.n, "how": how}
        self._emit(ev)
        return ev

    def release(self, n: Any) -> Event:
        return self._resume(self._take(n), "released")

    def drop(self, n: Any) -> Event:
        with self.lock:
            h = self._held.get(n) if isinstance(n, int) else None
            if h is not None and (h.direction != HOLD_REQUEST or h.exchange.opcode not in NO_REPLY_OPS):
                raise InterceptError(f"exchange {n} expects a reply: only FORGET and BATCH_FORGET can be "
                                     "dropped (answer it with an errno instead)")
        return self._resume(self._take(n), "dropped")

    def _encode(self, h: Held, errno_: Any, fields: Any, *, rewrite: bool) -> bytes:
        if (errno_ is None) == (fields is None):
            raise InterceptError("give either errno or fields")
        if errno_ is not None:
            try:
                e = parse_errno(str(errno_)) if not isinstance(errno_, int) or isinstance(errno_, bool) else errno_
                if not 1 <= e <= 4095:
                    raise ValueError(f"errno {e} is outside 1..4095")
            except ValueError as ex:
                raise InterceptError(str(ex)) from None
            return error_reply(e, h.exchange.unique)
        if not isinstance(fields, dict):
            raise InterceptError("fields must be an object of the reply's decoded fields")
        op = h.exchange.opcode
        if op not in spec.OPCODE_BY_VALUE or spec.OPCODE_BY_VALUE[op].reply is None:
            raise InterceptError(f"{h.exchange.opname} has no reply body to build from fields")
        base = h.exchange.reply if rewrite and isinstance(h.exchange.reply, F.Reply) else None
        try:  # every field name and value checked against the spec; unnamed fields keep the base's values
            return edit.encode_fields(op, fields, unique=h.exchange.unique, reply=base, ctx=self.context())
        except edit.FieldError as e:
            raise InterceptError(f"fields do not encode as a {h.exchange.opname} reply: {e}") from None

    def answer(self, n: Any, errno_: Any = None, fields: Any = None) -> Event:
        with self.lock:
            h = self._peek(n, HOLD_REQUEST, "answer it before the back-end does means holding the request; "
                                            "rewrite the reply instead")
            if h.exchange.opcode in NO_REPLY_OPS:
                raise InterceptError(f"{h.exchange.opname} has no reply: release or drop it")
            data = self._encode(h, errno_, fields, rewrite=False)
            h = self._take(n)
        return self._resume(h, "answered", data)

    def rewrite(self, n: Any, errno_: Any = None, fields: Any = None) -> Event:
        with self.lock:
            h = self._peek(n, HOLD_REPLY, "rewrite needs a held reply; answer the request instead")
            data = self._encode(h, errno_, fields, rewrite=True)
            h = self._take(n)
        return self._resume(h, "rewritten", data)

    def _peek(self, n: Any, direction: int, what: str) -> Held:
        h = self._take(n, direction, what)  # validates; put back until the encoding succeeded
        self._held[h.n] = h
        self._by_key[(h.queue, h.head, h.direction)] = h.n
        return h

    def delay(self, n: Any, ms: Any) -> Event:
        if not isinstance(ms, int | float) or isinstance(ms, bool) or not 0 < ms <= MAX_DELAY_MS:
            raise InterceptError(f"ms must be a number in (0, {MAX_DELAY_MS}], not {ms!r}")
        with self.lock:
            h = self._take(n)
            self._held[h.n] = h
            self._by_key[(h.queue, h.head, h.direction)] = h.n
            h.timer = self.timers.call_later(ms / 1000, lambda: self._due(h.n, "released", None))
            self.counters.delayed += 1
        ev = {"type": "resumed", "n": h.n, "how": "delayed"}
        self._emit(ev)
        return ev

    def continue_all(self) -> list[Event]:
        """Release everything held by a breakpoint (not the delays already scheduled)."""
        with self.lock:
            ns = [h.n for h in self._held.values() if h.timer is None]
        out = []
        for n in ns:
            try:
                out.append(self.release(n))
            except InterceptError:
                pass  # decided by someone else meanwhile
        return out

    def describe_counters(self) -> dict[str, int]:
        c = self.counters
        return {"held": c.held, "released": c.released, "answered": c.answered, "delayed": c.delayed,
                "rewritten": c.rewritten, "dropped": c.dropped, "passed": c.passed}

    def close(self) -> None:
        """Stop deciding: due delays run now, breakpoints are released (the source answers the rest)."""
        self.timers.close()
        with self.lock:
            self._closed = True
            left = [h for h in self._held.values() if h.timer is None]
        for h in left:
            try:
                self._verdict(h.queue, h.head, h.direction, "dropped" if h.exchange.opcode in NO_REPLY_OPS
                              and h.direction == HOLD_REQUEST else "released")
            except Exception as e:  # the source already stopped and answered it itself
                log.debug("releasing %d at close: %s", h.n, e)
        with self.lock:
            self._held.clear()
            self._by_key.clear()

