"""What both ring backends share: the error type, reason names and the capture record.

Kept apart from both backends so that `except RingError` and `Capture` mean the same thing whichever
engine is loaded (the C binding imports this module at start-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

# Index = the C core's enum rc_err (ring_core.h); tests check the two agree.
REASONS: tuple[str, ...] = (
    "ok",
    "no_region",         # a descriptor (or ring) outside every memory region
    "overflow",          # addr + len wraps around 2^64
    "chain_loop",        # chain longer than the queue size / indirect table: necessarily a loop
    "nested_indirect",   # an INDIRECT descriptor inside an indirect table
    "next_range",        # next >= num (or >= the indirect table's length)
    "read_after_write",  # a device-readable descriptor after a device-writable one
    "avail_ahead",       # avail->idx more than num ahead of the last seen index
    "head_range",        # an avail or used entry names a head >= num
    "indirect_len",      # indirect table length 0, not a multiple of 16, or longer than 32768
    "indirect_next",     # INDIRECT together with NEXT (the spec forbids it)
    "bad_queue",         # queue size not a power of two in 1..32768, or misaligned rings
    "nomem",
    "regions_full",
    "region_overlap",
    "not_in_flight",     # a used entry for a head that was never made available
    "too_large",         # readable bytes beyond MAX_GATHER: refused rather than allocated
    "not_held",          # a verdict for a head that is not held (unknown, or already resumed)
    "wrong_direction",   # answer/drop on a held reply, rewrite on a held request
    "no_room",           # verdict data larger than the chain's writable segments
    "needs_reply",       # drop of a held request with writable segments: it expects a reply (answer it)
)
REASON_CODE: dict[str, int] = {name: i for i, name in enumerate(REASONS)}

MAX_REGIONS = 64
MAX_GATHER = 256 << 20  # C: RC_MAX_GATHER; FUSE requests are at most 65535 pages plus headers
LAYOUT_F_FROM_INDIRECT = 0x8000  # set in layout flags of descriptors read from an indirect table
CAP_F_TRUNCATED = 1
CAP_F_HELD = 2  # held by a rule: a request not forwarded yet, a reply not published yet
CAP_F_ANSWERED = 4  # a reply the path wrote itself (answer, drop, the safety EIO)
CAP_F_REWRITTEN = 8  # a held reply, rewritten: these are the bytes the guest gets
CAP_F_RELEASED = 16  # a held reply, released unchanged: published to the guest now

KIND_REQUEST = "request"
KIND_REPLY = "reply"
KIND_ERROR = "error"
CAPTURE_KINDS = ("pad", KIND_REQUEST, KIND_REPLY, KIND_ERROR)  # index = enum rc_cap_kind
# Capture record sizes (C: struct rc_cap_hdr and struct rc_layout); both backends account capacity alike.
CAP_HDR_SIZE = 40
CAP_LAYOUT_SIZE = 16


# Hold points (issue 15; /work contract section 1): which captures the path holds instead of forwarding.
HOLD_REQUEST = 1
HOLD_REPLY = 2


@dataclass(frozen=True)
class HoldRule:
    """One native hold rule: a request (or the reply to a request) whose opcode is in `opcodes`
    (empty = every opcode), on a queue in the bitmask `queues` (0 = every queue), is held.

    A reply rule matches on the opcode of the request it answers.  The full filter expression is
    evaluated later in Python on the held capture; this is only the cheap native prefilter.
    """

    direction: int
    queues: int = 0
    opcodes: frozenset[int] = frozenset()


def check_hold_rules(rules: Any) -> tuple[HoldRule, ...]:
    """The rule table as both engines accept it (ValueError with the same message as the C binding
    otherwise): direction 1, 2 or 3, queues a u64 bitmask, opcodes u32s (0xFFFFFFFF is reserved)."""
    out = []
    for rule in rules:
        try:
            d, q, ops = int(rule.direction), int(rule.queues), list(rule.opcodes)
        except TypeError:
            raise ValueError(f"bad hold rule {rule!r}: direction 1|2|3, queues a u64 bitmask, opcodes u32s") from None
        if d < 0 or d >= 1 << 64 or q < 0 or q >= 1 << 64:
            raise ValueError(f"bad hold rule {rule!r}: direction 1|2|3, queues a u64 bitmask, opcodes u32s")
        if not 1 <= d <= 3:
            raise ValueError(f"hold rule direction must be 1 (request), 2 (reply) or 3, not {d}")
        for op in ops:
            if not isinstance(op, int) or not 0 <= op <= 0xFFFFFFFE:
                raise ValueError(f"hold rule opcode {op!r} is not a u32 opcode")
        out.append(HoldRule(d, q, frozenset(ops)))
    return tuple(out)


class RingError(Exception):
    """A malformed ring or chain.  `reason` is one of REASONS; `head` names the chain if known.

    pop_chains() consumes the bad entry and attaches the chains it popped before it (`chains`), so a
    batch is never lost because one chain in it was bad.
    """

    def __init__(self, reason: str, head: int | None = None, chains: list[Any] | None = None) -> None:
        super().__init__(reason, head)
        self.reason = reason
        self.code = REASON_CODE.get(reason, -1)
        self.head = head
        self.chains = chains if chains is not None else []

    def __str__(self) -> str:
        where = f" (head {self.head})" if self.head is not None else ""
        return f"ring: {self.reason}{where}"


class Capture(NamedTuple):
    """One captured request or reply (or a flagged malformed chain) from the shadow path.

    layout: the chain's effective descriptors (addr, len, flags); flags carry VRING_DESC_F_* plus
    LAYOUT_F_FROM_INDIRECT.  length: readable bytes (request) or used.len (reply); data holds at most
    that many bytes (fewer if `truncated`).  reason: set for kind == "error".
    """

    kind: str
    queue: int
    head: int
    ts_ns: int
    layout: tuple[tuple[int, int, int], ...]
    length: int
    data: bytes
    truncated: bool
    reason: str | None
    flags: int = 0  # CAP_F_*: TRUNCATED (== truncated), HELD, ANSWERED, REWRITTEN, RELEASED


def capture_record_size(nlayout: int, data_len: int) -> int:
    """Bytes a record takes in the capture buffer (same arithmetic as the C core)."""
    return (CAP_HDR_SIZE + CAP_LAYOUT_SIZE * nlayout + data_len + 7) & ~7
