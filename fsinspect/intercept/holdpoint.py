"""HoldPoint: what a data path that can hold FUSE traffic offers the Intercept addon.

Two sources implement it: the proxy session (held natively in the shadow path, C engine or twin) and
the daemon engine (which holds the request before calling its FileSystem).  The Intercept addon only
knows this protocol, so rules, verdicts and the control socket work the same on both.

Identity: a held exchange is (queue, head): the descriptor chain's head index in the proxy, the
engine's own request key in the daemon.  `direction` is HOLD_REQUEST or HOLD_REPLY.

Threading: every method may be called from any Python thread while the path runs, and must not block
on the guest.  `on_held` is called from the source's capture/dispatch thread, once per held capture
(a held request, or a held reply), after the capture itself went to the recording/analyzer: the
callee decides quickly (it must not block either; delays are timers) and calls one verdict later.

Verdicts (RingError or ValueError with a clear reason on an unknown key, a wrong direction, or data
that does not fit the chain's writable segments):
- release(queue, head): forward the held request to the back-end / publish the held reply to the guest;
- answer(queue, head, data): held request only: `data` (a whole fuse_out_header + body) is the reply;
  the back-end never sees the request;
- rewrite(queue, head, data): held reply only: replace the reply bytes, then publish;
- drop(queue, head): held request without a reply (FORGET, BATCH_FORGET) only: complete it unforwarded.

Safety is the implementation's job: when it stops or loses its back-end, every held request is
answered EIO, held replies are released and held FORGETs dropped (design.md, "hold points").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from dissectors.ring import HOLD_REPLY, HOLD_REQUEST, HoldRule

__all__ = ["HOLD_REPLY", "HOLD_REQUEST", "HeldCallback", "HoldPoint", "HoldRule"]

# on_held(queue, head, direction, raw, ts_ns): raw is the held request (fuse_in_header + body) or the
# held reply (fuse_out_header + body) as captured; ts_ns is the capture's CLOCK_REALTIME timestamp.
HeldCallback = Callable[[int, int, int, bytes, int], None]


@runtime_checkable
class HoldPoint(Protocol):
    """A data path that holds what its rule table matches, and takes verdicts on it."""

    on_held: HeldCallback | None

    def set_rules(self, rules: Sequence[HoldRule]) -> None:
        """Replace the native rule table atomically; an empty table restores the unhindered path."""

    def release(self, queue: int, head: int) -> None:
        """Forward a held request, or publish a held reply unchanged."""

    def answer(self, queue: int, head: int, data: bytes) -> None:
        """Complete a held request with `data` as its reply, without the back-end."""

    def rewrite(self, queue: int, head: int, data: bytes) -> None:
        """Publish a held reply with `data` instead of what the back-end wrote."""

    def drop(self, queue: int, head: int) -> None:
        """Complete a held reply-less request (FORGET, BATCH_FORGET) without forwarding it."""
