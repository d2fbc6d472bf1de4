"""The Analyzer: fed requests and replies one at a time, from any source, it pairs them into Exchanges
and keeps the inode map, the submount/syncfs tracker, the lints and the stats up to date.

Pairing key: (INIT epoch, queue, descriptor head) for virtio sources, checked against `unique`;
(INIT epoch, unique) when there is no head (/dev/fuse).  Every INIT request starts a new epoch, since
uniques restart at INIT.  Nothing here raises on bad input: undecodable messages become flagged
exchanges that keep their raw bytes.

Requests in flight are state: a request is an Exchange from its capture on, numbered (`n`, 1-based, in
capture order), pending until its reply.  `pending_listeners` hear about it at once and again whenever it
changes while pending (held, resumed, linted `stuck`); `listeners` hear about it once it is finished.
The `stuck` lint needs a clock: the feeder calls `check_stuck(now_ns)` periodically (a reply that comes
late gets it too, so a recording replays to the same lints).  A live feeder also gives each request's
capture time on CLOCK_MONOTONIC (`mono_ns`) and passes the monotonic now: capture stamps are wall-clock
time, and a clock step (NTP, `date -s`) must not make a waiting request look stuck, or young.
"""

from __future__ import annotations

import errno as _errno
import struct
from collections.abc import Callable, Sequence
from typing import Any

from dissectors import fuse as F
from dissectors.errors import DecodeError
from dissectors.spec import fuse as spec

from . import exchange as X
from .exchange import Exchange, LazyExchange, Lint, LintLog
from .inodes import ATTR_SUBMOUNT, Announcement, InodeMap, Issue, SubmountTracker, SyncfsRecord
from .render import fmt_ns
from .stats import Stats

Raw = bytes | bytearray | memoryview
OP = {o.name: o.value for o in spec.OPCODES}
_ENTRY_OPS = frozenset(OP[n] for n in ("LOOKUP", "CREATE", "MKDIR", "MKNOD", "SYMLINK", "LINK", "TMPFILE"))
NO_REPLY = _NO_REPLY = frozenset(o.value for o in spec.OPCODES if o.reply is None)  # (FORGET, ...)
_UNSUPPORTED = frozenset((_errno.ENOSYS, _errno.EOPNOTSUPP))
_RENAME_EXCHANGE = spec.RENAME_FLAGS.by_name()["EXCHANGE"]
_INIT_FLAG = spec.INIT_FLAGS.by_name()
_IN = struct.Struct("<IIQQ")  # len, opcode, unique, nodeid
_IN_SIZE = _IN.size
_OP_INIT, _OP_SYNCFS, _OP_FORGET, _OP_BATCH_FORGET = OP["INIT"], OP["SYNCFS"], OP["FORGET"], OP["BATCH_FORGET"]
_OP_LINK, _OP_TMPFILE, _OP_READDIRPLUS = OP["LINK"], OP["TMPFILE"], OP["READDIRPLUS"]
_OP_INTERRUPT = OP["INTERRUPT"]
_INTERRUPTED = struct.Struct("<Q")  # fuse_interrupt_in.unique, after the header
_ATTR_OPS = frozenset((OP["GETATTR"], OP["SETATTR"]))
_RENAME_OPS = frozenset((OP["RENAME"], OP["RENAME2"]))
_UNLINK_OPS = frozenset((OP["UNLINK"], OP["RMDIR"]))
_OUT = struct.Struct("<IiQ")  # len, error, unique
_OUT_SIZE = _OUT.size
# Ops whose messages change the analyzer's state (INIT, the inode map, submounts, syncfs).  With
# Analyzer(lazy=True) every op but INIT and those without a reply (FORGET: applied when it comes) is decoded
# lazily: counting, pairing and stats need only the headers, and a reply completes the state ops' decoding
# only when their state needs it (not for an error reply, not for SYNCFS, whose state is its header, nor for
# GETATTR/SETATTR when the node's ino is known already).  A message that turns out undecodable then is
# linted on its exchange (as every lazy exchange is, when it is decoded), not in the analyzer's list.
_STATE_OPS = frozenset(OP[n] for n in ("INIT", "GETATTR", "SETATTR", "READDIRPLUS", "RENAME", "RENAME2", "UNLINK",
                                       "RMDIR", "SYNCFS")) | _ENTRY_OPS | _NO_REPLY
_BODY_STATE_OPS = _STATE_OPS - {OP["SYNCFS"]}  # state learnt from the bodies
LAZY_OPS = frozenset(o.value for o in spec.OPCODES) - {OP["INIT"]} - _NO_REPLY
DEFAULT_STUCK_NS = 1_000_000_000  # `stuck`: a request waiting longer than this (--stuck-ms changes it)


class Analyzer:
    """Usable live (proxy, daemon tap) and offline (recordings): call feed_request/feed_reply, then finish."""

    def __init__(self, *, keep_exchanges: bool = True, keep_raw: bool = False,
                 stats_bucket_ns: int = 1_000_000_000, stuck_ns: int = DEFAULT_STUCK_NS, lazy: bool = False) -> None:
        self.keep_exchanges = keep_exchanges
        self.lazy = lazy  # LAZY_OPS become LazyExchanges: decoded when first read, not when fed
        self.stuck_ns = stuck_ns  # 0: no `stuck` lint
        self.last_ts = 0  # the newest capture time fed: a recording's "now"
        self.keep_raw = keep_raw
        self.epoch = 0
        self.count = 0
        self.exchanges: list[Exchange] = []
        self.lints = LintLog()  # exact counts per kind, a bounded recent sample of each
        self.inodes = InodeMap()
        self.submounts = SubmountTracker()
        self.stats = Stats(stats_bucket_ns)
        self.contexts: dict[int, F.FuseContext] = {}  # per epoch, once INIT is seen
        self.negotiated: set[int] = set()  # epochs whose INIT reply was seen
        self.init: dict[int, tuple[F.Request, F.Reply | None]] = {}
        self.listeners: list[Callable[[Exchange], None]] = []  # called when an exchange is finished
        self.pending_listeners: list[Callable[[Exchange], None]] = []  # a request opened, or changed while open
        self._pending: dict[tuple[int, ...], Exchange] = {}
        self._by_n: dict[int, tuple[int, ...]] = {}  # pending exchanges by number
        self._interrupts: dict[tuple[int, int], Exchange] = {}  # (epoch, interrupted unique) -> INTERRUPT
        self._finished = False

    # -- feeding ---------------------------------------------------------------------------------
    def feed_request(self, msg: Raw | F.Request, queue: int = 0, head: int | None = None, ts_ns: int = 0, *,
                     epoch: int | None = None, orig_len: int | None = None, notes: Sequence[str] = (),
                     ref: Any = None, n: int | None = None, held: bool = False,
                     mono_ns: int | None = None) -> Exchange:
        """A request as raw bytes or decoded; returns its (open or, for FORGET, finished) Exchange.

        `ref` is the caller's handle on the message (a recording offset), kept as `Exchange.req_ref`.
        `n` imposes the source's exchange number (a UI attached to a proxy); by default it is index + 1.
        `held`: a breakpoint holds it (the back-end has not seen it).  `mono_ns`: its capture time on
        CLOCK_MONOTONIC (live sources), what `check_stuck(..., mono_ns=)` measures its wait from.
        """
        req: F.Request | None
        raw: bytes | None
        if isinstance(msg, F.Request):
            req, raw = msg, None
            opcode, unique, nodeid, length = msg.opcode, msg.unique, msg.nodeid, msg.raw_len
        else:
            raw = msg if msg.__class__ is bytes else bytes(msg)
            req = None
            if len(raw) >= _IN_SIZE:
                length, opcode, unique, nodeid = _IN.unpack_from(raw)
            else:
                length, opcode, unique, nodeid = len(raw), -1, 0, 0
        if epoch is not None:
            if epoch != self.epoch:
                self._new_epoch(epoch)
        elif opcode == _OP_INIT:
            self._new_epoch(self.epoch + 1)
        count = self.count
        req_len = orig_len if orig_len is not None else (len(raw) if raw is not None else length)
        ex: Exchange
        if self.lazy and raw is not None and opcode in LAZY_OPS:  # (a live UI's common case: built in one call)
            ex = LazyExchange(count, queue, head, self.epoch, unique, opcode, nodeid, None, None, ts_ns, None, req_len,
                              0, None, raw, None, None, [], False, orig_len is not None and orig_len > len(raw),
                              list(notes), False, ref, None, n if n is not None else count + 1,
                              X.HELD_REQUEST if held else None, mono_ns, None, None, self.contexts.get(self.epoch),
                              orig_len,
                              None, True, False)
        else:
            ex = Exchange(count, queue, head, self.epoch, unique, opcode, nodeid, req_ts=ts_ns, req_len=req_len,
                          notes=list(notes), req_ref=ref, n=n if n is not None else count + 1,
                          held=X.HELD_REQUEST if held else None, req_mono=mono_ns)
        self.count = count + 1
        if ts_ns > self.last_ts:
            self.last_ts = ts_ns
        if ex.__class__ is LazyExchange:
            pass
        elif raw is not None:
            ex.snapped = orig_len is not None and orig_len > len(raw)
            try:
                req = F.decode_request(raw, self.contexts.get(self.epoch, F.DEFAULT_CONTEXT), wire_len=orig_len)
            except DecodeError as e:
                ex.decode_error = f"request: {e}"
                ex.req_raw = raw
                self._lint(ex, X.DECODE_ERROR, f"undecodable request: {e}")
            else:
                if self.keep_raw:
                    ex.req_raw = raw
        if req is not None:
            ex.request = req
        if self.keep_exchanges:
            self.exchanges.append(ex)
        if req is not None and opcode == _OP_INIT:
            self.init[self.epoch] = (req, None)
            self.contexts[self.epoch] = F.FuseContext.from_init(req.args["init"], None)
        if nodeid and nodeid in self.submounts.announced:
            ex.submount = True
        if opcode in _NO_REPLY:
            if req is not None:
                self._apply_forget(ex, req)
            self._finish(ex)
            return ex
        key = (self.epoch, queue, head) if head is not None else (self.epoch, -1, unique)  # (_key, inline)
        old = self._pending.get(key)
        if old is not None:
            what = f"chain (queue {queue}, head {head})" if head is not None else f"unique {unique}"
            self._lint(ex, X.DUPLICATE_IN_FLIGHT,
                       f"{ex.opname} unique {unique} on {what} while {old.opname} unique {old.unique} "
                       f"(#{old.n}) is still in flight")
            old.notes.append(f"displaced by #{ex.n}")  # the numbers the UI lists and goes to
            self._by_n.pop(old.n, None)
            self._finish(old)
        self._pending[key] = ex
        self._by_n[ex.n] = key
        if opcode == _OP_INTERRUPT:
            self._note_interrupt(ex, raw, req)
        if self.pending_listeners:
            self._changed(ex)
        return ex

    def _note_interrupt(self, ex: Exchange, raw: bytes | None, req: F.Request | None) -> None:
        """An INTERRUPT gets a reply only for EAGAIN (libfuse sends none): it is over when the request it
        interrupts is, else it would wait in the pending map for ever (a /dev/fuse session keys it by unique)."""
        if req is not None and "interrupt" in req.args:
            target = int(req.args["interrupt"].unique)
        elif raw is not None and len(raw) >= F.IN_HEADER_SIZE + _INTERRUPTED.size:
            target = _INTERRUPTED.unpack_from(raw, F.IN_HEADER_SIZE)[0]
        else:
            return
        self._interrupts[(ex.epoch, target)] = ex

    def _interrupt_over(self, ex: Exchange) -> None:
        """`ex` completed: an INTERRUPT of it still waiting for a reply is finished, unanswered."""
        if ex.opcode == _OP_INTERRUPT:  # answered (EAGAIN): nothing left to end
            for k in [k for k, v in self._interrupts.items() if v is ex]:
                del self._interrupts[k]
        intr = self._interrupts.pop((ex.epoch, ex.unique), None)
        if intr is None or self._pending.get(self._by_n.get(intr.n, ())) is not intr:
            return
        del self._pending[self._by_n.pop(intr.n)]
        intr.notes.append(f"the request it interrupts (#{ex.n}) completed; no reply to the INTERRUPT (none is due)")
        self._finish(intr)

    def feed_reply(self, msg: Raw | F.Reply | F.Notification, queue: int = 0, head: int | None = None,
                   ts_ns: int = 0, *, epoch: int | None = None, orig_len: int | None = None,
                   notes: Sequence[str] = (), ref: Any = None, n: int | None = None,
                   held: bool = False) -> Exchange:
        """A reply (or notification) as raw bytes or decoded; returns the Exchange it finished.

        `n` pairs it with that pending exchange (a UI attached to a proxy); by default the chain or unique
        does.  `held`: a breakpoint holds the reply (the guest has not seen it): the exchange stays open,
        held, until `resume()` or the reply that replaces it.
        """
        decoded: F.Reply | F.Notification | None = None
        raw: bytes | None = None
        if msg.__class__ is not bytes and isinstance(msg, (F.Reply, F.Notification)):
            decoded = msg
            unique = msg.unique
            err = msg.header.error
            length = msg.raw_len
        else:
            raw = msg if msg.__class__ is bytes else bytes(msg)
            if len(raw) >= _OUT_SIZE:
                length, err, unique = _OUT.unpack_from(raw)
            else:
                length, err, unique = len(raw), 0, -1
        rlen = orig_len if orig_len is not None else (len(raw) if raw is not None else length)
        if ts_ns > self.last_ts:
            self.last_ts = ts_ns
        if epoch is not None and epoch > self.epoch:
            self._new_epoch(epoch)
        if unique == 0:  # a notification: it stands alone
            ex = self._lone(queue, head, unique, ts_ns, rlen, notes, ref, n)
            self._decode_reply(ex, decoded, raw, None, orig_len)
            self._finish(ex)
            return ex
        ex_or_none = self._pop(queue, head, unique, n, keep=held)
        if ex_or_none is None:
            ex = self._lone(queue, head, unique, ts_ns, rlen, notes, ref, n)
            ex.error = -err if err <= 0 else None
            where = f" on chain (queue {queue}, head {head})" if head is not None else ""
            self._lint(ex, X.ORPHAN_REPLY, f"reply unique {unique}{where} without a request")
            if decoded is not None:
                ex.reply = decoded
            elif raw is not None:
                ex.reply_raw = raw
                ex.decode_error = "reply: no request to decode it against"
            ex.replied = True
            self._finish(ex)
            return ex
        ex = ex_or_none
        ex.reply_ts = ts_ns
        ex.reply_ref = ref
        ex.reply_len = rlen
        ex.notes.extend(notes)
        if unique != ex.unique and X.UNIQUE_MISMATCH not in ex.lints:
            self._lint(ex, X.UNIQUE_MISMATCH, f"chain (queue {queue}, head {head}) carried request unique "
                                              f"{ex.unique} but the reply says {unique}")
        ex.reply = None
        ex.error = None
        lazy = ex.__class__ is LazyExchange  # its request is not decoded for this
        self._decode_reply(ex, decoded, raw, ex.opcode if lazy or ex.request is None else ex.request, orig_len)
        if ex.error is None:
            ex.error = -err if err <= 0 else None
        if held:
            ex.held = X.HELD_REPLY
            self._changed(ex)
            return ex
        self._complete(ex)
        return ex

    def _complete(self, ex: Exchange) -> None:
        ex.held = None
        ex.replied = True
        if self.stuck_ns and ex.req_ts is not None and ex.reply_ts is not None \
                and ex.reply_ts - ex.req_ts > self.stuck_ns:
            self._stuck(ex, ex.reply_ts - ex.req_ts, "took")
        self._apply_reply(ex)
        self._finish(ex)
        if self._interrupts:
            self._interrupt_over(ex)

    # -- requests in flight ------------------------------------------------------------------------
    def find(self, n: int) -> Exchange | None:
        """The pending (or held) exchange number `n`, or None if it is complete or unknown."""
        key = self._by_n.get(n)
        return self._pending.get(key) if key is not None else None

    def set_held(self, n: int, side: str | None) -> Exchange | None:
        """Mark pending exchange `n` held (X.HELD_REQUEST / X.HELD_REPLY) or not (None)."""
        ex = self.find(n)
        if ex is not None and ex.held != side:
            ex.held = side
            self._changed(ex)
        return ex

    def resume(self, n: int, how: str) -> Exchange | None:
        """A breakpoint let exchange `n` go (`how`: released, answered, delayed, rewritten, dropped).

        A held request goes back to pending (its reply completes it as usual); a held reply released as it
        was (`released`, `delayed`) completes the exchange now, a rewritten one when the new reply is fed.
        Returns the exchange, or None if `n` is not open.
        """
        ex = self.find(n)
        if ex is None:
            return None
        ex.notes.append(f"{how} by the debugger")
        if ex.held == X.HELD_REPLY and ex.reply_ts is not None and how in ("released", "delayed"):
            self._pending.pop(self._by_n.pop(n))
            self._complete(ex)
            return ex
        ex.held = None
        self._changed(ex)
        return ex

    def check_stuck(self, now_ns: int, mono_ns: int | None = None) -> list[Exchange]:
        """Lint every pending request that has waited longer than `stuck_ns` at `now_ns` (once each).

        With `mono_ns` (CLOCK_MONOTONIC now), a request fed with its own `mono_ns` is aged on that clock."""
        if not self.stuck_ns:
            return []
        out = []
        for ex in list(self._pending.values()):
            if ex.req_ts is not None and ex.held is None and X.STUCK not in ex.lints and ex.expects_reply:
                waited = mono_ns - ex.req_mono if mono_ns is not None and ex.req_mono is not None \
                    else now_ns - ex.req_ts
                if self._stuck(ex, waited, "has waited"):
                    self._changed(ex)
                    out.append(ex)
        return out

    def _stuck(self, ex: Exchange, waited_ns: int, verb: str) -> bool:
        """Not while a breakpoint holds it (the UI shows that already); its latency still counts at the end:
        the guest waited for it all the same."""
        if not self.stuck_ns or waited_ns <= self.stuck_ns or X.STUCK in ex.lints:
            return False
        self._lint(ex, X.STUCK, f"{ex.opname} unique {ex.unique} (#{ex.n}) {verb} {fmt_ns(waited_ns)} for its "
                                f"reply (threshold {fmt_ns(self.stuck_ns)})")
        return True

    def _changed(self, ex: Exchange) -> None:
        for cb in self.pending_listeners:
            cb(ex)

    def finish(self) -> LintLog:
        """End of the stream: every request still waiting gets the no-reply lint (and `stuck` if it had
        waited long enough by the last capture).  Returns the lints."""
        self.check_stuck(self.last_ts)
        for ex in sorted(self._pending.values(), key=lambda e: e.index):
            if ex.expects_reply:
                self._lint(ex, X.NO_REPLY, f"{ex.opname} unique {ex.unique} (epoch {ex.epoch}) never got a reply")
            self._finish(ex)
        self._pending.clear()
        self._by_n.clear()
        self._interrupts.clear()
        self._finished = True
        return self.lints

    def prime_init(self, epoch: int, request: Raw, reply: Raw | None) -> None:
        """Adopt an INIT negotiated before this stream began (a rotated recording's header carries it)."""
        try:
            req = F.decode_request(bytes(request))
            rep = F.decode_reply(bytes(reply), req) if reply is not None else None
        except DecodeError:
            return
        if req.opcode != OP["INIT"]:
            return
        self.epoch = epoch
        init_out = rep.args.get("init_out") if isinstance(rep, F.Reply) and not rep.error else None
        self.contexts[epoch] = F.FuseContext.from_init(req.args["init"], init_out)
        if isinstance(rep, F.Reply):
            self.init[epoch] = (req, rep)
            if init_out is not None:
                self.negotiated.add(epoch)

    @property
    def pending(self) -> list[Exchange]:
        return sorted(self._pending.values(), key=lambda e: e.index)

    # -- internals -------------------------------------------------------------------------------
    @staticmethod
    def _key(queue: int, head: int | None, unique: int, epoch: int) -> tuple[int, ...]:
        return (epoch, queue, head) if head is not None else (epoch, -1, unique)

    def _pop(self, queue: int, head: int | None, unique: int, n: int | None = None, *,
             keep: bool = False) -> Exchange | None:
        """The pending exchange a reply completes: exchange `n` (if pending), else this epoch's chain (or unique),
        else the previous epoch's; removed from the pending ones unless `keep`."""
        key: tuple[int, ...] | None = self._by_n.get(n) if n is not None else None
        if key is None:  # no key list built: the reply's own epoch nearly always has it
            key = self._key(queue, head, unique, self.epoch)
            if key not in self._pending:
                key = self._key(queue, head, unique, self.epoch - 1)
        ex = self._pending.get(key)
        if ex is not None and not keep:
            del self._pending[key]
            self._by_n.pop(ex.n, None)
        return ex

    def _lone(self, queue: int, head: int | None, unique: int, ts_ns: int, rlen: int,
              notes: Sequence[str], ref: Any, n: int | None = None) -> Exchange:
        """A reply that completes nothing (a notification, an orphan) is an exchange of its own, numbered in
        the same sequence as requests (index + 1, or the source's number): a live source numbers it so at
        capture too, so the numbers a UI, the debugger's commands and a replay use never drift apart."""
        ex = Exchange(self.count, queue, head, self.epoch, max(unique, 0), -1, reply_ts=ts_ns, reply_len=rlen,
                      notes=list(notes), reply_ref=ref, n=n if n else self.count + 1)
        self.count += 1
        if self.keep_exchanges:
            self.exchanges.append(ex)
        return ex

    def _new_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inodes.reset()
        self.submounts.reset()

    def add_lint(self, ex: Exchange, name: str, message: str) -> None:
        """A lint the feeder knows and the analyzer cannot tell (a live source's `stuck`, with its clock)."""
        self._lint(ex, name, message)

    def _lint(self, ex: Exchange, name: str, message: str) -> None:
        ex.lints.append(name)
        self.lints.append(Lint(name, ex.index, message))

    def _issues(self, ex: Exchange, issues: list[Issue]) -> None:
        for i in issues:
            self._lint(ex, i.kind, i.message)

    def _finish(self, ex: Exchange) -> None:
        self.stats.add(ex)
        for cb in self.listeners:
            cb(ex)

    def _decode_reply(self, ex: Exchange, decoded: F.Reply | F.Notification | None, raw: bytes | None,
                      request: Any, orig_len: int | None) -> None:
        if decoded is not None:
            ex.reply = decoded
            if isinstance(decoded, F.Reply):
                ex.error = decoded.error
            return
        assert raw is not None
        ex.snapped = ex.snapped or (orig_len is not None and orig_len > len(raw))
        if ex.__class__ is LazyExchange:  # decoded when read; the caller takes the error from the header
            assert isinstance(ex, LazyExchange)
            ex.reply_raw = raw
            ex.wire_reply = orig_len
            ex.reply_todo = True
            return
        try:
            rep = F.decode_reply(raw, request, self.contexts.get(ex.epoch, F.DEFAULT_CONTEXT), wire_len=orig_len)
        except DecodeError as e:
            ex.reply_raw = raw
            ex.decode_error = f"reply: {e}"
            self._lint(ex, X.DECODE_ERROR, f"undecodable reply to {ex.opname}: {e}")
            return
        if self.keep_raw:
            ex.reply_raw = raw
        ex.reply = rep
        if isinstance(rep, F.Reply):
            ex.error = rep.error

    def _apply_forget(self, ex: Exchange, req: F.Request) -> None:
        if req.opcode == _OP_FORGET:
            self._issues(ex, self.inodes.forget(req.nodeid, req.args["forget"].nlookup))
        elif req.opcode == _OP_BATCH_FORGET:
            for f in req.args["forgets"]:
                self._issues(ex, self.inodes.forget(f.nodeid, f.nlookup))

    def _entry(self, ex: Exchange, parent: int, name: bytes | None, e: Any) -> None:
        self._issues(ex, self.inodes.entry(parent, name, e.nodeid, e.generation, e.attr.ino, e.attr.flags))
        if e.nodeid and e.attr.flags & ATTR_SUBMOUNT:
            ex.submount = True
            self.submounts.announce(Announcement(e.nodeid, parent, name or b"", ex.index, e.attr.ino))

    def _apply_reply(self, ex: Exchange) -> None:
        op = ex.opcode
        if op == _OP_SYNCFS:
            is_root = self.submounts.is_superblock_root(ex.nodeid)
            self.submounts.syncfs.append(SyncfsRecord(ex.index, ex.nodeid, ex.latency_ns, is_root, ex.error,
                                                      self.inodes.path(ex.nodeid)))
            if not is_root:
                self._lint(ex, X.SYNCFS_NOT_ROOT, f"SYNCFS on nodeid {ex.nodeid} ({self.inodes.path(ex.nodeid)}), "
                                                  "which is neither 1 nor an announced submount")
        if ex.error:
            if ex.error in _UNSUPPORTED:
                o = spec.OPCODE_BY_VALUE.get(op)
                ctx = self.contexts.get(ex.epoch)
                if (o is not None and o.needs and ex.epoch in self.negotiated and ctx is not None
                        and ctx.flags & _INIT_FLAG[o.needs]):
                    self._lint(ex, X.ERROR_SUPPORTED_OP, f"{o.name} answered {ex.errname} although INIT "
                                                         f"negotiated {o.needs}")
            return
        if op not in _BODY_STATE_OPS:  # nothing to learn (and a lazy exchange stays undecoded)
            return
        if op in _ATTR_OPS and ex.__class__ is LazyExchange:
            node = self.inodes.nodes.get(ex.nodeid)
            if node is None or node.ino:  # inodes.attr() would learn nothing: stays undecoded
                return
        req, rep = ex.request, ex.reply  # (a lazy exchange is decoded here)
        if req is None or not isinstance(rep, F.Reply):
            return
        a, r = req.args, rep.args
        if op == _OP_INIT:
            self.init[ex.epoch] = (req, rep)
            self.contexts[ex.epoch] = F.FuseContext.from_init(a["init"], r["init_out"])
            self.negotiated.add(ex.epoch)
        elif op in _ENTRY_OPS:
            name = a.get("newname") if op == _OP_LINK else (None if op == _OP_TMPFILE else a.get("name"))
            self._entry(ex, req.nodeid, name, r["entry"])
        elif op == _OP_READDIRPLUS:
            for rec, nm in r.get("entries", ()):
                if nm in (b".", b".."):
                    continue
                self._entry(ex, req.nodeid, nm, rec.entry_out)
        elif op in _ATTR_OPS:
            self.inodes.attr(req.nodeid, r["attr_out"].attr.ino)
        elif op in _RENAME_OPS:
            rn = a["rename"]
            flags = getattr(rn, "flags", 0)
            self.inodes.rename(req.nodeid, a["name"], rn.newdir, a["newname"], bool(flags & _RENAME_EXCHANGE))
        elif op in _UNLINK_OPS:
            self.inodes.unlink(req.nodeid, a["name"])
