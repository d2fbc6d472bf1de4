"""The bus every live source feeds: captures in, addons out (the mitmproxy addon model).

An addon is any object with some of the hooks of `Addon`; it subclasses `Addon` to say so (and to be
type-checked).  `Pipeline` calls each hook on the addons that define it, in the order they were added,
and never calls a hook an addon did not override: an addon costs nothing on the hooks it ignores.

Hook order within one capture (documented, tests rely on it):
1. `request` / `reply` go to every addon in order.  The assembled order is recorder, analysis, summary,
   hub, intercept: a capture is on disk before anything can act on it, numbered by the analysis before
   the hub publishes it, and seen by everyone before the debugger decides.
2. `held` (the HoldPoint callback: `Pipeline.on_held` has its signature) follows the `request`/`reply` of
   the same held capture, after every addon saw it; only then does the intercept decide.
3. `resolved` when the source ended a hold itself (its safety rule); `control` and `event` for the
   vhost-user control plane; `tick` when the source is quiet (or every STUCK_CHECK_S); `done` once, when
   the source ends, in order (the analysis finishes before the hub says "end"); `close` last.

Threading: the source calls `request`/`reply`/`error`/`tick`/`done` holding `lock` (one per pipeline; the
hub takes it to join a client between a snapshot and the stream), and `held`/`resolved` without it (a
decision may call back into the source).  Hooks must not block: the capture thread runs them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

# A capture as hooks see it: (data, queue, head, ts_ns, orig_len, layout, notes, flags).
#   data: the bytes captured (cut at the source's snap length; orig_len is the whole length);
#   head: the descriptor chain's head, None where the source has none (the daemon engine: pairing by unique);
#   layout: ((len, flags) per descriptor) or () where the source has no chain;
#   notes: text kept with the record; flags: recording RF_* flags (RF_HELD on a held capture,
#   RF_INJECTED/RF_REWRITTEN/RF_PROXY_REPLY on a reply the debugger or the source made, RF_SNAPPED).
HOOKS = ("request", "reply", "error", "held", "resolved", "control", "event", "tick", "done", "close")

A = TypeVar("A")


class Addon:
    """The hooks an addon may define (override only those you need; the defaults are never called)."""

    def request(self, data: bytes, queue: int, head: int | None, ts_ns: int, orig_len: int, layout: Any,
                notes: list[str], flags: int) -> None:
        """A request was captured (flags & RF_HELD: a hold point holds it; `held` follows)."""

    def reply(self, data: bytes, queue: int, head: int | None, ts_ns: int, orig_len: int, layout: Any,
              notes: list[str], flags: int) -> None:
        """A reply was captured: as the guest gets it, or (RF_HELD) held before the guest saw it."""

    def error(self, data: bytes, queue: int, head: int | None, ts_ns: int, note: str) -> None:
        """A chain that is no FUSE message (forwarded untouched by the source)."""

    def held(self, queue: int, head: int, direction: int, data: bytes, ts_ns: int) -> None:
        """A hold point stopped this capture: decide (the debugger) or note it.  Without the lock."""

    def resolved(self, queue: int, head: int, direction: int, how: str) -> None:
        """The source ended a hold itself (its safety rule): how = answered | released | dropped."""

    def control(self, direction: str, raw: bytes, fds: list[int], msg: Any) -> None:
        """A vhost-user message went by (msg: the decoded message, or why it could not be decoded)."""

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        """A control-plane event (backend-lost, ...)."""

    def tick(self, now_ns: int) -> None:
        """The source is quiet for a moment, or a timer fired: catch up on deferred work."""

    def done(self, reason: str) -> None:
        """The source ended (every capture has been delivered)."""

    def close(self) -> None:
        """Release what the addon holds (sockets, files, threads)."""


def _overrides(addon: object, name: str) -> bool:
    fn = getattr(type(addon), name, None)
    return fn is not None and fn is not getattr(Addon, name)


class Pipeline:
    """Dispatches hooks to the addons in order; `add` while no capture flows (assembly time)."""

    def __init__(self, addons: Sequence[Addon] = (), lock: Any = None) -> None:
        self.lock = lock if lock is not None else threading.RLock()
        self.addons: list[Addon] = []
        self._hooks: dict[str, tuple[Callable[..., None], ...]] = {}
        for a in addons:
            self.add(a)

    def add(self, addon: Addon) -> None:
        self.addons.append(addon)
        self._hooks = {name: tuple(getattr(a, name) for a in self.addons if _overrides(a, name)) for name in HOOKS}
        h = self._hooks
        # the hot hooks as plain tuples: a source may loop over them itself (the proxy's capture thread)
        self.request_hooks, self.reply_hooks, self._held = h["request"], h["reply"], h["held"]

    def find(self, kind: type[A]) -> A | None:
        """The first addon of this class, if any."""
        return next((a for a in self.addons if isinstance(a, kind)), None)

    # the hot hooks, unrolled (one loop, no lookups)
    def request(self, data: bytes, queue: int, head: int | None, ts_ns: int, orig_len: int, layout: Any,
                notes: list[str], flags: int) -> None:
        for f in self.request_hooks:
            f(data, queue, head, ts_ns, orig_len, layout, notes, flags)

    def reply(self, data: bytes, queue: int, head: int | None, ts_ns: int, orig_len: int, layout: Any,
              notes: list[str], flags: int) -> None:
        for f in self.reply_hooks:
            f(data, queue, head, ts_ns, orig_len, layout, notes, flags)

    def on_held(self, queue: int, head: int, direction: int, data: bytes, ts_ns: int) -> None:
        """The HoldPoint callback (fsinspect/intercept/holdpoint.py): install it as a source's on_held."""
        for f in self._held:
            f(queue, head, direction, data, ts_ns)

    def emit(self, hook: str, *args: Any) -> None:
        """Any other hook (error, resolved, control, event, tick, done, close)."""
        for f in self._hooks.get(hook, ()):
            f(*args)

    def on_resolved(self, queue: int, head: int, direction: int, how: str) -> None:
        self.emit("resolved", queue, head, direction, how)
