"""A request paired with its reply, plus what the analyzer learnt about it."""

from __future__ import annotations

import heapq
import operator
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from dissectors import fuse as F
from dissectors.errors import DecodeError
from dissectors.spec import fuse as spec

# Lint names: stable identifiers used by filters (`lint == "no-reply"`), the TUI and exports.
ORPHAN_REPLY = "orphan-reply"
NO_REPLY = "no-reply"
DUPLICATE_IN_FLIGHT = "duplicate-in-flight"
UNIQUE_MISMATCH = "unique-mismatch"
INO_COLLISION = "ino-collision"
FORGET_UNKNOWN = "forget-unknown"
NLOOKUP_UNDERFLOW = "nlookup-underflow"
SYNCFS_NOT_ROOT = "syncfs-not-root"
ERROR_SUPPORTED_OP = "error-for-supported-op"
DECODE_ERROR = "decode-error"
STUCK = "stuck"

LINTS: dict[str, str] = {
    ORPHAN_REPLY: "a reply without a request",
    NO_REPLY: "a request that never got a reply",
    DUPLICATE_IN_FLIGHT: "a request on a chain (or unique) that already had one in flight",
    UNIQUE_MISMATCH: "the reply's unique differs from its chain's request",
    INO_COLLISION: "two live nodeids with the same (ino, generation) and no submount between them",
    FORGET_UNKNOWN: "FORGET of a nodeid that was never looked up",
    NLOOKUP_UNDERFLOW: "FORGET of more lookups than the nodeid had",
    SYNCFS_NOT_ROOT: "SYNCFS on a nodeid that is no superblock root (1 or an announced submount)",
    ERROR_SUPPORTED_OP: "ENOSYS/EOPNOTSUPP for an op the INIT said was supported",
    DECODE_ERROR: "the message could not be decoded",
    STUCK: "a request waited longer than the stuck threshold for its reply (--stuck-ms, default 1 s)",
}

# Exchange.state: waiting for its reply, stopped at a breakpoint (HELD_*), or complete.
PENDING, HELD, DONE = "pending", "held", "done"
HELD_REQUEST, HELD_REPLY = "request", "reply"


@dataclass(frozen=True, slots=True)
class Lint:
    name: str
    exchange: int  # Exchange.index
    message: str


LINTS_PER_KIND = 10_000  # the most recent lints kept per kind (their counts stay exact): a session of weeks


class LintLog:
    """The lints, bounded as Wireshark's expert info summarises: exact counts per kind, and the
    `per_kind` most recent lints of each kind (iterated in the order they were raised).

    A live session of weeks, or a replay of a huge recording, must not grow memory with its lints; each
    linted exchange is flagged on itself all the same.  `dropped(kind)` says how many are not kept."""

    __slots__ = ("_kept", "_seq", "counts", "per_kind")

    def __init__(self, lints: Iterable[Lint] = (), per_kind: int = LINTS_PER_KIND) -> None:
        self.per_kind = per_kind
        self.counts: Counter[str] = Counter()
        self._kept: dict[str, deque[tuple[int, Lint]]] = {}
        self._seq = 0
        for lint in lints:
            self.append(lint)

    def append(self, lint: Lint) -> None:
        """O(1): a full kind drops its oldest."""
        kept = self._kept.get(lint.name)
        if kept is None:
            kept = self._kept[lint.name] = deque(maxlen=self.per_kind)
        kept.append((self._seq, lint))
        self._seq += 1
        self.counts[lint.name] += 1

    def __iter__(self) -> Iterator[Lint]:
        for _seq, lint in heapq.merge(*self._kept.values(), key=lambda sl: sl[0]):
            yield lint

    def __len__(self) -> int:
        """The lints kept (`total` counts them all)."""
        return sum(len(k) for k in self._kept.values())

    def __bool__(self) -> bool:
        return self._seq > 0

    def __getitem__(self, i: int) -> Lint:
        return list(self)[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, LintLog)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LintLog({list(self)!r}, total={self.total})"

    @property
    def total(self) -> int:
        return self._seq

    def dropped(self, kind: str | None = None) -> int:
        """How many lints (of `kind`, or of every kind) were counted but not kept."""
        if kind is not None:
            return self.counts[kind] - len(self._kept.get(kind, ()))
        return self._seq - len(self)

    def not_kept(self) -> list[tuple[str, int]]:
        """(kind, how many not kept) for each kind past its cap: what a summary says after the kept ones."""
        return [(k, n) for k in sorted(self._kept) if (n := self.dropped(k)) > 0]

    def restore(self, counts: dict[str, int]) -> None:
        """Adopt the exact counts a saved analysis recorded (it kept only the sample)."""
        for kind, n in counts.items():
            kept = len(self._kept.get(kind, ()))
            self.counts[kind] = max(int(n), kept)
        self._seq = max(self._seq, sum(self.counts.values()))


@dataclass(slots=True, eq=False)
class Exchange:
    """One FUSE exchange.  `request`/`reply` are decoded messages, or None (absent or undecodable)."""

    index: int
    queue: int
    head: int | None
    epoch: int
    unique: int
    opcode: int  # -1 when unknown (orphan reply, undecodable request)
    nodeid: int = 0
    request: F.Request | None = None
    reply: F.Reply | F.Notification | None = None
    req_ts: int | None = None
    reply_ts: int | None = None
    req_len: int = 0  # original lengths in bytes (before any snapping)
    reply_len: int = 0
    error: int | None = None  # positive errno, 0 = success, None = no reply
    req_raw: bytes | None = None  # kept when decoding failed (or when the analyzer keeps raw bytes)
    reply_raw: bytes | None = None
    decode_error: str | None = None
    lints: list[str] = field(default_factory=list)
    submount: bool = False  # announces a submount, or targets an announced submount root
    snapped: bool = False
    notes: list[str] = field(default_factory=list)
    replied: bool = False
    req_ref: Any = None  # the feeder's handles (recording offsets), for random access back to the bytes
    reply_ref: Any = None
    n: int = 0  # the source's exchange number (1-based, capture order of requests and of replies that complete
    # none): what every UI and command names
    held: str | None = None  # HELD_REQUEST / HELD_REPLY while a breakpoint holds it
    req_mono: int | None = None  # a live source's request capture time on CLOCK_MONOTONIC: its age for `stuck`
    # The descriptor chains as a live source captured them: (len, flags) per vring_desc, or their META_LAYOUT
    # items' bytes as the binary stream brings them (layout_list() reads either); None: not known.
    req_layout: Any = None
    reply_layout: Any = None

    @property
    def state(self) -> str:
        """`held`, `pending` (a request still waiting for its reply, or that never got one) or `done`."""
        if self.held is not None:
            return HELD
        return PENDING if not self.replied and self.expects_reply else DONE

    def age_ns(self, now_ns: int, mono_ns: int | None = None) -> int | None:
        """How long a pending request has been waiting at `now_ns` (None once it is complete).

        With `mono_ns` (CLOCK_MONOTONIC now), a request captured live (`req_mono`) is aged on that clock:
        a wall-clock step (NTP, a suspended VM's host) shows neither a negative nor an hours-long wait."""
        if self.state == DONE or self.req_ts is None:
            return None
        if mono_ns is not None and self.req_mono is not None:
            return max(0, mono_ns - self.req_mono)
        return max(0, now_ns - self.req_ts)

    @property
    def opname(self) -> str:
        if self.reply is not None and isinstance(self.reply, F.Notification):
            return self.reply.opname
        return spec.OPCODE.name_of(self.opcode) or (str(self.opcode) if self.opcode >= 0 else "?")

    @property
    def errname(self) -> str | None:
        if not self.error:
            return None
        return spec.ERRNO.name_of(self.error) or str(self.error)

    @property
    def latency_ns(self) -> int | None:
        if self.req_ts is None or self.reply_ts is None:
            return None
        return self.reply_ts - self.req_ts

    @property
    def ts_ns(self) -> int:
        return self.req_ts if self.req_ts is not None else (self.reply_ts or 0)

    @property
    def expects_reply(self) -> bool:
        op = spec.OPCODE_BY_VALUE.get(self.opcode)
        return op is not None and op.reply is not None and not op.reply_optional

    def names(self) -> list[bytes]:
        """Every name the exchange carries: request names and READDIR(PLUS) entry names."""
        out: list[bytes] = []
        if self.request is not None:
            for k in ("name", "newname", "target"):
                v = self.request.args.get(k)
                if isinstance(v, bytes):
                    out.append(v)
        if self.reply is not None:
            for item in self.reply.args.get("entries", ()):
                out.append(item[1])
        return out

    def arg(self, path: str, default: Any = None) -> Any:
        """Dotted access into the request args, then the reply args."""
        for m in (self.request, self.reply):
            if m is not None:
                v = m.get(path, None)
                if v is not None:
                    return v
        return default


_REQUEST = Exchange.__dict__["request"]  # the slots under the lazy properties
_REPLY = Exchange.__dict__["reply"]


_KEPT = tuple(f for f in Exchange.__slots__ if f not in ("request", "reply", "notes", "lints"))
_kept_values = operator.attrgetter(*_KEPT)
_KEPT_N, _KEPT_UNIQUE = _KEPT.index("n"), _KEPT.index("unique")


class Kept(NamedTuple):
    """A finished exchange without its decoded messages (keep()): bytes, ints, strings and tuples of them only,
    which the garbage collector stops walking, where an Exchange with its decoded request and reply is a
    couple of dozen objects it walks at every collection for as long as it is kept (a live snapshot's
    backlog: ~5 us per exchange of a guest's traffic).  revive() decodes it again."""

    decoded: int  # 1: the request was decoded, 2: the reply
    notes: tuple[str, ...]
    lints: tuple[str, ...]
    values: tuple[Any, ...]  # the other fields, in _KEPT order

    @property
    def n(self) -> int:
        return int(self.values[_KEPT_N])

    @property
    def unique(self) -> int:
        return int(self.values[_KEPT_UNIQUE])


def keep(ex: Exchange) -> Kept | Exchange:
    """`ex` as a Kept (a LazyExchange, whose messages are decoded when read, stays as it is)."""
    if ex.__class__ is not Exchange:
        return ex
    return Kept((ex.request is not None) | (ex.reply is not None) << 1, tuple(ex.notes), tuple(ex.lints),
                _kept_values(ex))


def revive(k: Kept | Exchange, contexts: dict[int, F.FuseContext]) -> Exchange:
    """The Exchange a Kept was made of, its messages decoded again as the analyzer decoded them (with its
    contexts by epoch)."""
    if not isinstance(k, Kept):
        return k
    ex = Exchange(**dict(zip(_KEPT, k.values)), notes=list(k.notes), lints=list(k.lints))
    ctx = contexts.get(ex.epoch, F.DEFAULT_CONTEXT)
    try:
        if k.decoded & 1 and ex.req_raw is not None:
            ex.request = F.decode_request(ex.req_raw, ctx, wire_len=ex.req_len)
        if k.decoded & 2 and ex.reply_raw is not None:
            ex.reply = F.decode_reply(ex.reply_raw, ex.request if ex.request is not None else ex.opcode, ctx,
                                      wire_len=ex.reply_len)
    except DecodeError:  # (they decoded once: not with these contexts)
        pass
    return ex


@dataclass(slots=True, eq=False)
class LazyExchange(Exchange):
    """An exchange whose messages are decoded when first read (`Analyzer(lazy=True)`: a live UI).

    Only ops that change no analyzer state are made lazy: their header (opcode, unique, nodeid, error,
    lengths) is all that counting, pairing and stats need; the body is decoded by whoever looks at
    `request`/`reply` (a row shown, the detail pane, a filter on a field).  A body that turns out to be
    undecodable gets `decode_error` and the lint then.
    """

    ctx: Any = None  # the FuseContext of the exchange's epoch, to decode with
    wire_req: int | None = None  # the original lengths the analyzer was given (None: not snapped)
    wire_reply: int | None = None
    # Still undecoded.  Two flags, not bits of one: the feed thread sets the reply's while the UI thread may
    # be clearing the request's, and a read-modify-write of one int could lose one of them.
    req_todo: bool = False
    reply_todo: bool = False

    def _get_request(self) -> F.Request | None:
        if self.req_todo:
            self.req_todo = False
            raw = self.req_raw
            if raw is not None:
                try:
                    _REQUEST.__set__(self, F.decode_request(raw, self.ctx or F.DEFAULT_CONTEXT,
                                                            wire_len=self.wire_req))
                except DecodeError as e:
                    self._undecodable(f"request: {e}")
        return _REQUEST.__get__(self)

    def _set_request(self, value: F.Request | None) -> None:
        _REQUEST.__set__(self, value)

    def _get_reply(self) -> F.Reply | F.Notification | None:
        if self.reply_todo:
            self.reply_todo = False
            raw = self.reply_raw
            if raw is not None:
                req = self.request
                try:
                    _REPLY.__set__(self, F.decode_reply(raw, req if req is not None else self.opcode,
                                                        self.ctx or F.DEFAULT_CONTEXT, wire_len=self.wire_reply))
                except DecodeError as e:
                    self._undecodable(f"reply: {e}")
        return _REPLY.__get__(self)

    def _set_reply(self, value: F.Reply | F.Notification | None) -> None:
        _REPLY.__set__(self, value)

    def _undecodable(self, why: str) -> None:
        self.decode_error = why if self.decode_error is None else f"{self.decode_error}; {why}"
        if DECODE_ERROR not in self.lints:
            self.lints.append(DECODE_ERROR)

    @property
    def opname(self) -> str:
        """From the opcode alone: a lazy exchange is never a notification (those are decoded at once)."""
        return spec.OPCODE.name_of(self.opcode) or str(self.opcode)


# Set after the dataclass is made: its __init__ then stores through them (a property in the class body would
# be taken for the fields' default).
setattr(LazyExchange, "request", property(LazyExchange._get_request, LazyExchange._set_request))  # noqa: B010
setattr(LazyExchange, "reply", property(LazyExchange._get_reply, LazyExchange._set_reply))  # noqa: B010
