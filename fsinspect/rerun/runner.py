"""Replay a plan against a back-end: order, overlap, timing, remapping, and the reply-by-reply diff.

A request goes out once every reply that the recording shows before it has come back from the new
back-end (so what the guest learnt before asking is known here too, and requests that were in flight
together are in flight together again).  `speed="1x"` also waits for the request's recorded time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dissectors import fuse as F
from dissectors.errors import DecodeError
from dissectors.render import summary
from dissectors.spec import fuse as fspec
from dissectors.spec import virtio as vio

from ..analysis.exchange import Exchange
from ..recording.writer import RecordingWriter
from .compare import ExchangeDiff, FieldDiff, Tally, compare
from .front import Front, FrontError
from .lookups import Lookups, forgets
from .plan import Plan, reply_room
from .remap import Remap

NO_REPLY_OPS = fspec.RETURNS_LOOKUP


class RerunError(Exception):
    """The rerun stopped: the back-end died, stalled or broke the protocol.  One line for the user."""


@dataclass
class RerunResult:
    tally: Tally
    sent: int = 0
    answered: int = 0
    elapsed: float = 0.0
    latency_ns: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    max_in_flight: int = 0


def describe(m: Any) -> str:
    if m is None:
        return "(no reply)"
    if isinstance(m, F.Reply) and m.error:
        return f"error {m.errname}"
    try:
        return summary(m) or "(empty)"
    except Exception as e:  # a summary must never end the run
        return f"({e})"


def exchange_diff(ex: Exchange, a: Any, b: Any, fields: list[FieldDiff], n_b: int | None = None) -> ExchangeDiff:
    req = describe(ex.request) if ex.request is not None else ""
    return ExchangeDiff(ex.n, ex.opname, f"nodeid {ex.nodeid} {req}".strip(), describe(a), describe(b), fields, n_b)


def debugger_note(plan: Plan, ex: Exchange) -> str:
    """Say when the recorded side is the debugger's doing (--inject/--break), not the back-end's answer."""
    what = [*plan.debugger.get(ex.req_ref, ()), *plan.debugger.get(ex.reply_ref, ())] \
        if ex.req_ref is not None or ex.reply_ref is not None else []
    return f"the recording's reply was {' and '.join(dict.fromkeys(what))} by the debugger" if what else ""


class Rerun:
    """One rerun of `plan` over a connected Front."""

    def __init__(self, plan: Plan, front: Front, *, speed: str = "max", strict: bool = False,
                 timeout: float = 10.0, writer: RecordingWriter | None = None,
                 alive: Callable[[], str | None] | None = None) -> None:
        self.plan, self.front, self.speed, self.strict = plan, front, speed, strict
        self.timeout = timeout
        self.writer = writer
        self.alive = alive  # returns why the back-end is gone, or None
        self.remap = Remap()
        self.lookups = Lookups()
        self.ctx = plan.context
        self.result = RerunResult(Tally())
        self._sent_req: dict[int, F.Request] = {}
        self._sent_at: dict[int, int] = {}
        self._done: set[int] = set()
        self._unique = 0

    # -- submission ------------------------------------------------------------------------------
    def run(self) -> RerunResult:
        exs = self.plan.exchanges
        replies = sorted((e.reply_ref, i) for i, e in enumerate(exs) if e.reply_ref is not None and e.replied)
        p = 0
        need: set[int] = set()
        t0 = time.monotonic()
        base_ts = exs[0].req_ts or 0
        for i, ex in enumerate(exs):
            while p < len(replies) and replies[p][0] < (ex.req_ref if ex.req_ref is not None else 0):
                need.add(replies[p][1])
                p += 1
            if i == 1:  # nothing may follow INIT before its reply: it sets the session's terms
                need.add(0)
            if ex.opname == "DESTROY":
                # It ends the session: the C virtiofsd answers what comes after it EIO, and a FORGET still
                # on the hiprio queue then gets an error it has no buffer for ("elem too short for
                # out_header").  The guest's forgets went before it; here they are done before it too.
                need.update(self._sent_req)
            self._wait_done(need, ex)
            if self.speed == "1x" and ex.req_ts:
                due = t0 + (ex.req_ts - base_ts) / 1e9
                while time.monotonic() < due:
                    self._pump(min(due - time.monotonic(), 0.05))
            self._submit(i, ex, self._queue(ex))
        expected = sum(1 for e in exs if self._expects(e))
        self._wait(lambda: self.result.answered >= expected, None)
        self.result.elapsed = time.monotonic() - t0
        for j, ex in enumerate(exs):
            if self._expects(ex) and j not in self._done:
                self.result.tally.unanswered += 1
        if self.lookups.adjusted:
            self.result.tally.notes += [self.lookups.note(), *self.lookups.adjusted]
        return self.result

    def _queue(self, ex: Exchange) -> int:
        if ex.queue in self.front.rings:
            return ex.queue
        return vio.FS_HIPRIO_QUEUE if ex.opname in NO_REPLY_OPS else vio.FS_REQUEST_QUEUE_BASE

    @staticmethod
    def _expects(ex: Exchange) -> bool:
        return ex.opname not in NO_REPLY_OPS

    def _wait_done(self, need: set[int], ex: Exchange) -> None:
        need -= self._done
        self._wait(lambda: not (need - self._done), ex)
        need.clear()

    def _submit(self, i: int, ex: Exchange, queue: int) -> None:
        assert ex.request is not None
        self._wait(lambda: self.front.free_slots(queue) > 0, ex)
        self._unique += 1
        req = self.remap.request(ex.request, self._unique)
        if ex.opname in fspec.RETURNS_LOOKUP:
            recorded = forgets(ex.request)
            clamped = self.lookups.give_back(req, f"#{ex.n} {ex.opname}",
                                             lambda k: recorded[k][0] in self.remap.nodeid)
            if clamped is None:  # nothing this back-end granted: it must not see the forget at all
                self._done.add(i)
                return
            req = clamped
        if ex.snapped:
            req = unsnap(req)
        raw = F.encode_request_obj(req, self.ctx)
        room = 0 if not self._expects(ex) else (self.plan.rooms.get(ex.req_ref) if ex.req_ref is not None else None)
        if room is None:
            room = max(ex.reply_len, reply_room(req))
        self._sent_req[i] = req
        self._sent_at[i] = time.perf_counter_ns()
        if self.writer is not None:
            self.writer.request(raw, queue, None)
        try:
            data = req.args.get("data") if req.opname == "WRITE" else None
            self.front.submit(queue, raw, room, i, len(raw) - len(data) if isinstance(data, bytes) else 0)
        except FrontError as e:
            raise RerunError(str(e)) from None
        self.result.sent += 1
        self.result.max_in_flight = max(self.result.max_in_flight, self.front.in_flight())

    # -- completion ------------------------------------------------------------------------------
    def _wait(self, ready: Callable[[], bool], ex: Exchange | None) -> None:
        last = time.monotonic()
        while not ready():
            if self._pump(0.2):
                last = time.monotonic()
            elif time.monotonic() - last > self.timeout:
                pending = sorted(set(self._sent_req) - self._done)
                what = (f"#{self.plan.exchanges[pending[0]].n} {self.plan.exchanges[pending[0]].opname}"
                        if pending else "nothing")
                raise RerunError(f"the back-end answered nothing for {self.timeout:.0f} s "
                                 f"({len(pending)} request(s) in flight, the oldest {what})"
                                 + (f", waiting to send #{ex.n} {ex.opname}" if ex is not None else ""))

    def _pump(self, timeout: float) -> bool:
        try:
            got = self.front.poll(timeout)
        except FrontError as e:
            why = self.alive() if self.alive is not None else None
            raise RerunError(f"{e}{'; ' + why if why else ''} after {self.result.answered} replies") from None
        if not got and self.alive is not None:
            why = self.alive()
            if why:
                raise RerunError(f"{why} after {self.result.answered} replies")
        for i, raw in got:
            self._complete(i, raw)
        return bool(got)

    def _complete(self, i: int, raw: bytes) -> None:
        ex = self.plan.exchanges[i]
        self._done.add(i)
        if not self._expects(ex):
            return
        now = time.perf_counter_ns()
        self.result.answered += 1
        self.result.latency_ns[ex.opname].append(now - self._sent_at[i])
        if self.writer is not None:
            self.writer.reply(raw, self._queue(ex), None)
        req = self._sent_req[i]
        if len(raw) >= 4:  # the used length may cover the whole buffer (the C virtiofsd's READ): the header says
            raw = raw[:max(int.from_bytes(raw[:4], "little"), F.OUT_HEADER_SIZE)]
        fields: list[FieldDiff]
        new: Any
        try:
            new = F.decode_reply(raw, req, self.ctx)
        except DecodeError as e:
            new = None
            fields = [FieldDiff("decode", "ok", f"undecodable reply: {e}")]
        else:
            if ex.opname == "INIT" and isinstance(new, F.Reply) and not new.error and ex.request is not None:
                self.ctx = F.FuseContext.from_init(ex.request.args["init"], new.args["init_out"])
            assert ex.request is not None
            self.remap.learn(ex.request, ex.reply, new)
            self.lookups.grant(ex.opname, new)
            fields = compare(ex.reply, new, strict=self.strict)
        d = exchange_diff(ex, ex.reply, new, fields) if fields else None
        if d is not None:
            d.note = debugger_note(self.plan, ex)
        self.result.tally.add(d, ex.opname)


def unsnap(req: F.Request) -> F.Request:
    """A request recorded snapped, its data padded with zeros back to its wire length (--allow-snapped)."""
    data = req.args.get("data")
    if not isinstance(data, bytes) or req.raw_len <= req.captured:
        return req
    args = dict(req.args, data=data + bytes(req.raw_len - req.captured))
    return F.Request(req.header, req.op, args, req.ext, req.raw_len)
