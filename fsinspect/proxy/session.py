"""One proxy run: the Proxy as a live source, assembling the addons its options ask for.

The session turns the proxy's captures and vhost-user messages into Pipeline hooks (fsinspect/live:
recorder, analysis, summary, hub; add_debugger puts the intercept rules last).  Hooks run on the capture
thread (FUSE traffic) or the control thread (vhost-user messages) under the session's lock; the guest's
critical path (the ring engine's forwarding) never waits on them.  Analysis is held back while no
control client watches (live/addons.py Analysis: the burst stays fast; the results are the same).

The debugger: the session is the proxy's HoldPoint (fsinspect/intercept/holdpoint.py).  Rules go to every
queue's native path; a held capture goes through the pipeline flagged RF_HELD (recorded if a request,
analysed at once so `exchange_of` finds its numbered exchange), then `on_held` decides (with the
debugger wired, that is Pipeline.on_held).  A held reply is not recorded: the reply the guest gets is,
when it is released (captured again, flagged RELEASED) or rewritten (the original's header goes into a
note).  When the path resolves a hold itself (the safety rule: GET_VRING_BASE, RESET, back-end loss,
exit), the recording says so and `on_resolved` is told.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dissectors import ring
from dissectors.spec import vhost_user as vspec
from dissectors.spec import virtio as vio

from .. import privfile
from ..analysis import exchange as X
from ..analysis.analyzer import DEFAULT_STUCK_NS
from ..analysis.inodes import group_syncfs
from ..analysis.render import fmt_ns, opcode_counts, snapshot_json, wrap_items
from ..live.addons import Analysis, BlockPublisher, Publisher, Recorder, Summary
from ..live.hub import Hub
from ..live.pipeline import Pipeline
from ..recording import format as fmt
from ..recording.writer import RecordingWriter
from . import control as C
from .server import Proxy, ProxyConfig

_HOLD_FLAGS = ring.CAP_F_HELD | ring.CAP_F_ANSWERED | ring.CAP_F_REWRITTEN | ring.CAP_F_RELEASED
_SNAPPED_NOTE = "payload cut at the capture snap length"
HeldCallback = Callable[[int, int, int, bytes, int], None]  # (queue, head, direction, raw, ts_ns)
ResolvedCallback = Callable[[int, int, int, str], None]  # (queue, head, direction, how)


@dataclass
class SessionOptions:
    record: str | None = None
    control: str | None = None
    snaplen: int = 256
    rotate_mb: float = 0
    rotate_keep: int = 0  # parts kept on disk (0: all)
    record_mode: int = privfile.DEFAULT_MODE  # the recording's file mode
    backend_name: str = ""
    defer_analysis: bool = True  # False: analyse every capture at once, watched or not
    stuck_ns: int = DEFAULT_STUCK_NS  # the `stuck` lint's threshold (0: off)
    accept_clients: bool = True  # False: the hub waits for hub.open_clients() (the debugger is added first)


class Session:
    """The proxy as a live source: its captures and vhost-user messages into a Pipeline of addons
    (recorder, analysis, summary, hub; the debugger is added by fsinspect.live.addons.add_debugger)."""

    def __init__(self, cfg: ProxyConfig, opts: SessionOptions) -> None:
        self.cfg = cfg
        self.opts = opts
        self.lock = threading.RLock()
        self.pipeline = Pipeline(lock=self.lock)
        self.writer = (RecordingWriter(opts.record, source="virtio", backend=opts.backend_name,
                                       snaplen=opts.snaplen, rotate_mb=opts.rotate_mb, rotate_keep=opts.rotate_keep,
                                       mode=opts.record_mode,
                                       comments=["fsinspect proxy"]) if opts.record else None)
        self.proxy = Proxy(cfg, on_capture=self._on_capture, on_vhost_message=self._on_vhost,
                           on_event=self._on_event, on_idle=self._on_idle)
        self.hub: Hub | None = None
        self.analysis = Analysis(keep_raw=bool(opts.control),  # raw bytes for attached UIs
                                 stuck_ns=opts.stuck_ns, defer=opts.defer_analysis)
        self.local_replies = 0
        self.events: list[C.Event] = []
        # HoldPoint: the callback for held captures, and for holds the path resolved itself (safety rule)
        self.on_held: HeldCallback | None = None
        self.on_resolved: ResolvedCallback | None = None
        self._held_replies: dict[tuple[int, int], bytes] = {}  # a held reply's header, for the rewritten note
        self._decided: dict[tuple[int, int], str] = {}  # verdicts given through this session, by chain
        self.holds = Counter[str]()  # held, answered, rewritten, released, dropped, safety
        if opts.control:
            self.hub = Hub(opts.control, self.snapshot, feed_lock=self.lock, accept_clients=opts.accept_clients)
            self.analysis.hub = self.hub
        self.counts = Summary(self.analysis, self.hub)
        recorder = Recorder(self.writer, lock=self.lock) if self.writer is not None else None
        if recorder is not None:
            self.pipeline.add(recorder)
        self.pipeline.add(self.analysis)
        self.pipeline.add(self.counts)
        if self.hub is not None:  # binary clients get the recording's own blocks, else the hub frames the captures
            self.pipeline.add(Publisher(self.hub, self.analysis, flush_timeout=3.0) if recorder is None else
                              BlockPublisher(self.hub, self.analysis, recorder, flush_timeout=3.0))

    # -- the source: captures into the pipeline -----------------------------------------------------
    def _on_capture(self, cap: Any) -> None:
        if type(cap) is tuple:  # a request/reply the proxy itself answered (back-end gone); Capture is a NamedTuple
            kind, queue, head, ts, data = cap
            with self.lock:
                if kind == "local-request":
                    self.pipeline.request(data, queue, head, ts, len(data), (), ["backend lost: answered by the proxy"],
                                          0)
                else:
                    self.local_replies += 1
                    self.pipeline.reply(data, queue, head, ts, len(data), (), ["EIO from the proxy: back-end lost"],
                                        fmt.RF_PROXY_REPLY)
            return
        layout = tuple([(ln, fl) for _addr, ln, fl in cap.layout])  # hashable: the writer caches its packing
        if cap.flags & _HOLD_FLAGS and cap.kind != "error":
            self._on_hold_capture(cap, layout)
            return
        with self.lock:  # the hooks are called here, not through Pipeline.request: one frame less a capture
            if cap.kind == "request":
                notes, flags = ([_SNAPPED_NOTE], fmt.RF_SNAPPED) if cap.truncated else ([], 0)
                for f in self.pipeline.request_hooks:
                    f(cap.data, cap.queue, cap.head, cap.ts_ns, cap.length, layout, notes, flags)
            elif cap.kind == "reply":
                if cap.queue == vio.FS_HIPRIO_QUEUE and cap.length == 0:
                    return  # FORGET completes with used.len 0: there is no reply
                notes, flags = ([_SNAPPED_NOTE], fmt.RF_SNAPPED) if cap.truncated else ([], 0)
                for f in self.pipeline.reply_hooks:
                    f(cap.data, cap.queue, cap.head, cap.ts_ns, cap.length, layout, notes, flags)
            else:
                self.pipeline.emit("error", cap.data, cap.queue, cap.head, cap.ts_ns,
                                   f"malformed chain: {cap.reason} (forwarded untouched)")

    # -- the debugger's hold points (HoldPoint) ------------------------------------------------------
    def set_rules(self, rules: Sequence[ring.HoldRule]) -> None:
        """Replace the native rule table on every queue (ValueError for a malformed rule)."""
        self.proxy.set_hold_rules(rules)

    def release(self, queue: int, head: int) -> None:
        self._verdict(queue, head, "released")

    def answer(self, queue: int, head: int, data: bytes) -> None:
        self._verdict(queue, head, "answered", data)

    def rewrite(self, queue: int, head: int, data: bytes) -> None:
        self._verdict(queue, head, "rewritten", data)

    def drop(self, queue: int, head: int) -> None:
        self._verdict(queue, head, "dropped")

    def _verdict(self, queue: int, head: int, how: str, *data: bytes) -> None:
        """RingError (not_held, wrong_direction, no_room, needs_reply) if the path refuses."""
        path = self.proxy.path_of(queue, head)
        key = (queue, head)
        with self.lock:
            self._decided[key] = how
        try:
            getattr(path, {"released": "release", "answered": "answer", "rewritten": "rewrite",
                           "dropped": "drop"}[how])(head, *data)
        except Exception:
            with self.lock:
                self._decided.pop(key, None)
            raise
        with self.lock:
            self.holds[how] += 1

    def held(self) -> list[tuple[int, int, int]]:
        """(queue, head, direction) of everything the paths hold now."""
        return [(i, h, d) for i, q in list(self.proxy.queues.items()) if q.path is not None
                for h, d in q.path.held()]

    def exchange_of(self, queue: int, head: int, direction: int) -> Any:
        """The analyzer's exchange for a capture just held (Intercept.exchange_of), numbered like the UI's."""
        with self.lock:
            return self.analysis.exchange_of(queue, head, direction)

    def on_debugger(self, ev: dict[str, Any]) -> None:
        """Intercept listener: a verdict moves the analyzer's exchange on.  A held reply is completed by the
        capture of what the guest gets (released or rewritten), not here; a delayed one is pending again."""
        if ev.get("type") != "resumed" or not isinstance(ev.get("n"), int):
            return
        with self.lock:
            self.analysis.catch_up()
            an = self.analyzer
            ex = an.find(ev["n"])
            if ex is None:
                return
            if ex.held == X.HELD_REPLY:
                if ev.get("how") == "delayed":
                    an.set_held(ex.n, None)
                return
            if ev.get("auto") and ev.get("how") == "released":  # the prefilter held it, no rule wanted it
                an.set_held(ex.n, None)
                return
            an.resume(ex.n, str(ev.get("how")))

    def _on_hold_capture(self, cap: Any, layout: Any) -> None:
        """A capture a hold point made: a held request or reply, or how a hold ended."""
        key = (cap.queue, cap.head)
        notes = [_SNAPPED_NOTE] if cap.truncated else []
        flags = fmt.RF_SNAPPED if cap.truncated else 0
        held_cb: tuple[int, int, int, bytes, int] | None = None
        resolved_cb: tuple[int, int, int, str] | None = None
        with self.lock:
            if cap.flags & ring.CAP_F_HELD:
                self._decided.pop(key, None)
                self.holds["held"] += 1
                direction = ring.HOLD_REQUEST if cap.kind == "request" else ring.HOLD_REPLY
                if direction == ring.HOLD_REQUEST:
                    notes.append("held by the debugger")
                    self.pipeline.request(cap.data, cap.queue, cap.head, cap.ts_ns, cap.length, layout, notes,
                                          flags | fmt.RF_HELD)
                else:  # not recorded: the reply the guest gets is, when the hold ends
                    self._held_replies[key] = cap.data[:16]
                    self.pipeline.reply(cap.data, cap.queue, cap.head, cap.ts_ns, cap.length, layout,
                                        ["held by the debugger: the guest has not seen it"], flags | fmt.RF_HELD)
                held_cb = (cap.queue, cap.head, direction, cap.data, cap.ts_ns)
            else:
                how = self._decided.pop(key, None)
                if how is None:
                    self.holds["safety"] += 1
                orig = self._held_replies.pop(key, None)
                if cap.flags & ring.CAP_F_ANSWERED:
                    direction, done = ring.HOLD_REQUEST, "dropped" if cap.length == 0 else "answered"
                    flags |= fmt.RF_PROXY_REPLY | (fmt.RF_INJECTED if how else 0)
                    notes.append(f"{done} by the debugger: the back-end never saw the request" if how else
                                 f"{done} (EIO) by the proxy: the queue stopped while the request was held")
                else:
                    direction = ring.HOLD_REPLY
                    done = "rewritten" if cap.flags & ring.CAP_F_REWRITTEN else "released"
                    if done == "rewritten":
                        flags |= fmt.RF_REWRITTEN
                        notes.append("rewritten by the debugger; the back-end replied "
                                     + (fmt.out_header_note(orig) if orig else "(not captured)"))
                    else:
                        notes.append("held by the debugger, then released" if how else
                                     "held by the debugger, released by the proxy: the queue stopped")
                if not (cap.queue == vio.FS_HIPRIO_QUEUE and cap.length == 0):  # FORGET: no reply
                    self.pipeline.reply(cap.data, cap.queue, cap.head, cap.ts_ns, cap.length, layout, notes, flags)
                if how is None:
                    resolved_cb = (cap.queue, cap.head, direction, done)
        if held_cb is not None and self.on_held is not None:
            self.on_held(*held_cb)
        if resolved_cb is not None and self.on_resolved is not None:
            self.on_resolved(*resolved_cb)

    # -- what tests and the CLI read ---------------------------------------------------------------
    @property
    def analyzer(self) -> Any:
        return self.analysis.analyzer

    @property
    def requests(self) -> int:
        return self.counts.requests

    @property
    def replies(self) -> int:
        return self.counts.replies

    @property
    def watched(self) -> bool:
        return self.hub is not None and bool(self.hub.clients)

    @property
    def backlog(self) -> int:
        """Captures recorded but not analysed yet."""
        return self.analysis.backlog

    def catch_up(self, limit: int | None = None) -> int:
        """Analyse the held-back captures, oldest first (all of them, or at most `limit`)."""
        with self.lock:
            return self.analysis.catch_up(limit)

    def _on_idle(self) -> None:
        """The guest has been quiet for a moment (capture thread): analyse a chunk of the backlog, lint."""
        with self.lock:
            self.pipeline.emit("tick", time.time_ns())

    def _on_vhost(self, direction: str, raw: bytes, fds: list[int], msg: Any) -> None:
        self.pipeline.emit("control", direction, raw, fds, msg)

    def _on_event(self, ev: C.Event) -> None:
        self.events.append(ev)
        self.pipeline.emit("event", ev.kind, ev.detail)

    # -- run -------------------------------------------------------------------------------------
    def run(self, frontend: Any, backend: Any) -> str:
        try:
            return self.proxy.serve(frontend, backend)
        finally:
            with self.lock:
                self.pipeline.emit("done", self.proxy.stats.end_reason)

    def close(self) -> None:
        self.pipeline.emit("close")

    def snapshot(self) -> dict[str, Any]:
        """What a newly attached client gets first (called with self.lock held)."""
        self.analysis.catch_up()  # a client is watching from now on: it sees everything analysed
        st = self.proxy.stats
        return {**snapshot_json(self.analyzer, time.time_ns(), time.monotonic_ns()), "features": self.proxy.cp.snapshot(),
                "capture": dict(self.proxy.capture.stats), "backend_lost": st.backend_lost_ns is not None}

    def summary(self) -> dict[str, Any]:
        st = self.proxy.stats
        counters: Counter[str] = Counter()
        busy_max = 0
        for c in self.proxy.path_counters().values():
            busy_max = max(busy_max, c.get("busy_max_ns", 0))
            counters.update(c)
        counters["busy_max_ns"] = busy_max  # the longest forwarding stall of any queue (not a sum)
        with self.lock:
            live = self.counts.summary()
        return {
            "end_reason": st.end_reason,
            "backend_lost": st.backend_lost_ns is not None,
            "eio_answered": st.eio_answered,
            "unsealed_regions": st.unsealed_regions,
            "vhost_messages": st.vhost_messages,
            "vhost_decode_errors": st.decode_errors,
            **live,
            "path": dict(counters),
            "capture": dict(self.proxy.capture.stats),
            "capture_errors": self.counts.capture_errors,
            "features": self.proxy.cp.snapshot(),
            "recording": [str(p) for p in self.writer.paths] if self.writer else [],
            "holds": dict(self.holds),
            # the collector's work (what a full collection walks is what the run made: start-up is frozen)
            "gc": {"frozen": gc.get_freeze_count(), "collections": [g["collections"] for g in gc.get_stats()]},
        }


def render_summary(s: dict[str, Any]) -> str:
    """The one-screen summary printed when the proxy ends."""
    f = s["features"]
    lines = [f"fsinspect proxy: {s['end_reason']}"]
    if s["backend_lost"]:
        lines.append(f"  BACKEND LOST: the proxy answered {s['eio_answered']} request(s) with EIO; the VM kept running")
    lines.append(f"  FUSE: {s['requests']} requests, {s['replies']} replies; vhost-user: {s['vhost_messages']} messages"
                 + (f" ({s['vhost_decode_errors']} undecodable, forwarded)" if s["vhost_decode_errors"] else ""))
    if s.get("unsealed_regions"):
        lines.append(f"  guest memory: {s['unsealed_regions']} region(s) not sealed against shrinking; the front-end "
                     "is trusted not to truncate them (SIGBUS)")
    cap = s["capture"]
    lines.append(f"  capture: {cap.get('captured', 0)} records, dropped {cap.get('dropped', 0)}, "
                 f"lossless stalls {cap.get('stalls', 0)}, malformed chains {s['capture_errors']}")
    path = s["path"]
    if path.get("wakeups"):
        lines.append(f"  forwarding: {path['wakeups']} wake-ups, {fmt_ns(path['busy_ns'] / path['wakeups'])} each on "
                     f"average, longest {fmt_ns(path['busy_max_ns'])}"
                     + (f"; {path['spin_hits']} rounds found by polling" if path.get("spin_hits") else ""))
    lines.append("  opcodes:")
    lines.extend(wrap_items(opcode_counts(s["opcodes"]), indent="    "))
    if f.get("features_masked"):
        lines.append(f"  features masked by the proxy: {vio.VIRTIO_F.render(f['features_masked'])}")
    if f.get("protocol_masked"):
        lines.append(f"  protocol features masked: {vspec.PROTOCOL_F.render(f['protocol_masked'])}")
    if s["submounts"]:
        lines.append("  submounts announced: " + ", ".join(f"{x['name']} (nodeid {x['nodeid']})" for x in s["submounts"]))
    if s["syncfs"]:
        lines.append(f"  SYNCFS ({len(s['syncfs'])} calls), per superblock:")
        lines.extend(f"    {g.line()}" for g in group_syncfs(s["syncfs"]))
    if s.get("holds"):
        lines.append("  debugger: " + ", ".join(f"{k} {v}" for k, v in s["holds"].items())
                     + (" (safety: resolved by the proxy when a queue stopped)" if s["holds"].get("safety") else ""))
    if s["lints"]:
        lines.append(f"  lints: {len(s['lints'])}")
        for lint in s["lints"][:8]:
            lines.append(f"    {lint['kind']}: {lint['message']}")
    if s["recording"]:
        lines.append("  recording: " + ", ".join(s["recording"]))
    return "\n".join(lines)


def summary_json(s: dict[str, Any]) -> str:
    return json.dumps(s, default=str, sort_keys=True)

