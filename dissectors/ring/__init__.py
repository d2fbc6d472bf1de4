"""The split-ring engine: a C extension (ring_core.c + _ringmodule.c) or its pure-Python twin.

One engine serves the bundled daemon (pop chains, push used) and the proxy's shadow-ring data path
(design.md, "The proxy").  `BACKEND` says which engine is loaded ("c" or "python"); when the C one is
missing, one warning says so at import.  Set FSINSPECT_RING=python to force the twin (the tests run
everything on both).

API (identical in both engines; addresses are guest-physical unless named otherwise):

- `MemoryMap()`
  - `add_region(gpa, size, buf, uva=0, mmap_offset=0) -> slot`: `buf` is a writable buffer (an mmap of
    the region's fd from offset 0, length mmap_offset + size, as libvhost-user maps it).  The map holds
    the buffer export, so `mmap.close()` raises BufferError while the map or a chain view uses it.
  - `remove_region(gpa)`; `translate(gpa, length=1) -> (slot, offset)`; `uva_to_gpa(uva)` (for
    SET_VRING_ADDR, which carries frontend user addresses); `view(gpa, length) -> memoryview`;
    `regions -> [(gpa, size, uva)]`.  Adding/removing raises RuntimeError while a ShadowPath using the
    map runs: stop it first.
- `SplitQueue(mem, num, desc, avail, used)`: the device side of a split ring.
  - `pop_chains(max=0) -> [Chain]`: every available chain (kicks coalesce), NEXT/INDIRECT/WRITE
    followed.  A malformed chain raises `RingError(reason, head, chains=<the good ones before it>)`; the
    bad entry is consumed.  A chain whose readable bytes exceed MAX_GATHER (256 MiB) is refused as
    "too_large" instead of being gathered (a guest could otherwise describe terabytes).  An avail
    index more than `num` ahead raises `RingError("avail_ahead")` and consumes nothing.
  - `push_used([(head, len), ...])`: entries first, the 16-bit used->idx once, last.
  - `avail_pending()`, `last_avail_idx` / `used_idx` (read/write, for SET/GET_VRING_BASE), `num`.
  - Completions (a device serving requests, the daemon): `Chain.reply()`/`Chain.complete()` put a popped
    chain on its queue's used ring.  Between `begin_batch()` and `end_batch() -> truncated` (the number
    of replies cut to their chain's writable bytes since the last end_batch) the completions made on
    that thread wait, and are published together: the entries, used->idx once, at most one call; a
    completion from any other thread (a pool) is published at once.  A call is an 8-byte write to
    `call_fd` (-1: none; the engine never writes an fd after it was swapped out), skipped while the
    driver sets VRING_AVAIL_F_NO_INTERRUPT or, with `event_idx` set (VIRTIO_RING_F_EVENT_IDX), unless
    used->idx passed the driver's used_event since the last call (libvhost-user's rule); with
    `event_idx`, pop_chains() also writes avail_event (a kick for the next entry) before it reads
    avail->idx, so popping until empty loses no kick.  `complete(head, len=0)` completes a head that has
    no Chain (a malformed one); `inflight` counts popped chains not completed; `handover(new)` sends
    the completions of chains still in flight to the queue that replaced this one (the ring was
    re-made); `detach()` drops every later completion (the ring is gone; counted as `late`);
    `counters` (calls, calls_suppressed, completed, late, truncated, inflight, popped).
  - `serve_fast(src, failed, reply_failed) -> Chain | None | int`: a device's queue loop for what an
    answerer serves.  It pops a group as pop_chains() would (EVENT_IDX kick request first), in a batch,
    and answers each chain with `fast = src.fast`, read before each chain (None: the chain is handed
    back as a declined one): `fast(request, chain)` (the twin, and a plain callable on the C engine) or,
    when `fast` has an `answerer` capsule (ring_answer.h: the daemon's C fast path), its C entry with
    the request bytes and the writable buffers as an iovec, so no Chain object and no Python frame; a
    reply is scattered and completed, b"" completes with used.len 0; a raising answer goes to
    `failed(request)` inside the `except` (its result taken as the answer's), a reply that cannot be
    scattered to `reply_failed(exc)`.  Returns the first chain the answerer declines (None), in
    flight, with the batch still open (the caller serves it and calls again); None after a group was
    published with more available; when the ring is found empty, the replies truncated since last
    asked (an int).  A malformed chain raises RingError(reason, head) with the batch open (consumed:
    complete its head, call again); an error that escapes completes the chain being served with
    used.len 0 first.  pop_chains(), begin_batch() and end_batch() end a group left open.
  - `serve_wait(ep, wake_fd, src, failed, reply_failed) -> Chain | int`: serve_fast() and, whenever
    the ring is empty, the wait for the next kick in `ep` (an edge-triggered epoll set, eventfds never
    read; GIL released), in one loop: it returns a declined chain as serve_fast() does, or, once
    `wake_fd` fired, the replies truncated meanwhile.  The C engine does all
    this with the GIL held, which serialises completions from several threads; the twin takes a lock.
- `Chain`: `head`, `readable` (bytes, gathered), `writable` (tuple of writable memoryviews into guest
  memory), `layout` (((addr, len, flags), ...) effective descriptors; the INDIRECT descriptor itself is
  listed, and entries from its table carry LAYOUT_F_FROM_INDIRECT), `readable_len`, `writable_len`,
  `write(data) -> n` (scatter a reply into the writable segments), `reply(parts) -> n` (scatter the
  buffers in order, a part that is not a buffer being that many bytes already in place, then complete
  with the bytes written; refused once completed), `complete(len=0)`, `done`.
- `CaptureBuffer(capacity=16 MiB, policy="drop"|"lossless")`: bounded; shared by any number of paths.
  `read_captures(max=1024, timeout=0.0) -> [Capture]` (one consumer thread; max <= 0: all),
  `fileno()` (an eventfd, readable when records are pending: select on it, then call read_captures
  until it returns []), `stats` (captured, dropped,
  dropped_bytes, stalls, used_bytes, capacity).  "drop" never slows the VM and counts what it could not
  keep; "lossless" holds back forwarding (used publication, and avail forwarding) until there is room.
  `close()` (end of session, once the paths writing to it are closed): the eventfd goes (`fileno()` -1),
  buffered records stay readable, and read_captures no longer waits.  Idempotent.
- `ShadowPath(mem, queue, num, desc, avail, used, shadow_avail, shadow_used, capture, kick_fd, call_fd,
  backend_kick_fd, backend_call_fd, avail_base=0, snaplen=0, spin_us=0, event_idx=False)`: one queue's data path, on
  its own native thread (C) or Python thread (twin).  The guest's
  rings are (desc, avail, used); the backend sees (desc, shadow_avail, shadow_used), which must lie in
  a region of `mem` (the proxy's own memfd).  The shadow avail index starts at `avail_base` (the
  SET_VRING_BASE value) and the shadow used index at the guest's current used->idx.  All fds are
  dup'ed, so the caller may close its own.  On a kick: capture each new request (timestamp, queue, head,
  layout, readable bytes), copy the entry to the shadow avail ring, kick the backend.  On the backend's
  call: capture each reply (writable bytes up to used.len), copy the entry to the guest's used ring,
  signal the call fd.  Malformed chains are forwarded unchanged, captured as kind "error" and counted;
  nothing outside a region is ever touched.  A runaway guest avail index (> num ahead) is counted once,
  `last_error` = "avail_ahead", and nothing is forwarded until it is sane again.  `snaplen` caps the
  bytes captured per record (0 = all; records are also capped at half the buffer), `spin_us` makes the
  C thread busy-poll the rings for that long after activity (saves ~2 thread wake-ups per round trip
  when it has a core to itself; the twin accepts and ignores it).  `event_idx` (VIRTIO_RING_F_EVENT_IDX
  negotiated): the path writes avail_event in the guest's used ring and used_event in the shadow avail
  ring (asking for every new entry, re-checking the rings after writing them), and calls the guest or
  kicks the backend only when their used_event/avail_event ask for it.
  - `start()`, `stop()` (join; nothing moves after), `drain() -> n` (move pending used entries to the
    guest now: call it after stop() on GET_VRING_BASE; in lossless mode it drops rather than waits),
    `step() -> (n_avail, n_used)` (one synchronous pass on a stopped path), `set_kick_fd(fd)` /
    `set_call_fd(fd)` (swap QEMU's fds while running, -1 = none; they never wait behind a lossless stall,
    so the capture consumer may call them), `counters` (requests, replies, errors, unpaired, kicks_in,
    calls_in, kicks_out, calls_out, stalls, dropped, wakeups, spin_hits, kicks_suppressed,
    calls_suppressed; busy_ns and busy_max_ns: the time from a wake-up to done forwarding, total and
    longest), `running`, `last_error`,
    `indices`.  Keep the proxy's own backend-side eventfds constant; only QEMU's side is swapped.
  - `close()`: the end of a session: stop, then give back the thread, every fd the path holds (its dups
    and its own wake-up eventfd) and its hold on the rings' mappings, at once rather than when the object
    goes; `counters`, `indices`, `held()` still answer, verdicts find nothing held, and start(), step(),
    drain() and the fd setters raise RuntimeError.  Idempotent.
  - GET_VRING_BASE: forward it, let the backend reply, then `stop()`, `drain()`, then reply to QEMU.
  - Hold points (issue 15, the debugger).  `set_hold_rules([HoldRule, ...])` replaces the rule table
    atomically, running or not (empty: no rules, and the path does what it did before, at the same
    cost).  A rule matches natively on direction (HOLD_REQUEST, HOLD_REPLY, or both), queue (bitmask,
    0 = every queue) and opcode set (empty = every opcode); a reply is matched on its request's opcode,
    remembered per head (requests forwarded while no rules were set have none: only rules with an empty
    opcode set hold their replies).  Only chains with a whole fuse_in_header are held.  A matching
    request is captured with CAP_F_HELD and not put on the shadow avail ring; a matching reply is
    captured with CAP_F_HELD and not published to the guest.  Verdicts, from any thread (queued for the
    path's thread, which applies them at once; never waiting for a lossless stall), RingError "not_held"
    / "wrong_direction" / "no_room" / "needs_reply" otherwise:
    `release(head)` (a request goes to the back-end; a reply is published and captured again with
    CAP_F_RELEASED), `answer(head, data)` (held request: data goes into its writable segments and is
    published with used.len = len(data), captured as a reply with CAP_F_ANSWERED; the back-end never sees
    it), `rewrite(head, data)` (held reply: new bytes, then published; captured with CAP_F_REWRITTEN),
    `drop(head)` (held request without writable segments, FORGET/BATCH_FORGET: used.len 0, captured as
    an empty CAP_F_ANSWERED reply), `held() -> [(head, direction)]`.
  - Safety: `stop()` (so GET_VRING_BASE, RESET, back-end loss and proxy exit) applies verdicts still
    queued (a released request is answered EIO instead: the back-end is stopping), answers every held
    request with a fuse_out_header error -EIO carrying the request's own unique, publishes every held
    reply, and completes held FORGETs with used.len 0.  Nothing is held after stop() until start(), so
    drain() never holds.  Counters: holds, released, answered, rewritten, hold_drops, safety.
- `Capture` (NamedTuple): kind ("request"|"reply"|"error"), queue, head, ts_ns (CLOCK_REALTIME), layout,
  length, data, truncated, reason, flags (CAP_F_TRUNCATED | CAP_F_HELD | CAP_F_ANSWERED |
  CAP_F_REWRITTEN | CAP_F_RELEASED).  Pair requests and replies by (queue, head).
- `RingError`: `reason` (one of `REASONS`), `code`, `head`, `chains`.

Process-wide side effect (C engine only): importing this package raises glibc's malloc trim threshold
(128 MiB) and mmap threshold (32 MiB), because gathering a batch allocates MBs of bytes objects and the
defaults return the freed heap to the kernel and fault it back in at every batch (6x slower per chain
when measured).  FSINSPECT_RING_TUNE_MALLOC=0 turns this off.  The C engine also reuses what dropped chains
leave behind when nothing else references it, like CPython's own free lists: `readable` bytes (up to
16 MiB, one size at a time) for the next chains of that size, and `writable` tuples with their views,
re-pointed, for the next chains with as many segments in the same regions (emptied when a region is
removed, so no mapping stays pinned).  Together 30-40% more chains per second in bench/ring.py.
"""

from __future__ import annotations

import logging
import os
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING

from ._common import (
    CAP_F_ANSWERED,
    CAP_F_HELD,
    CAP_F_RELEASED,
    CAP_F_REWRITTEN,
    CAP_F_TRUNCATED,
    HOLD_REPLY,
    HOLD_REQUEST,
    KIND_ERROR,
    KIND_REPLY,
    KIND_REQUEST,
    LAYOUT_F_FROM_INDIRECT,
    MAX_GATHER,
    REASONS,
    Capture,
    HoldRule,
    RingError,
    check_hold_rules,
)

log = logging.getLogger(__name__)


def _load() -> tuple[str, ModuleType]:
    """Pick the engine once, and say so once when it is the slow one."""
    if os.environ.get("FSINSPECT_RING", "").lower() == "python":
        log.warning("ring engine: pure-Python twin (FSINSPECT_RING=python); the shadow path will be slow")
        return "python", import_module("._native", __name__)
    try:
        c = import_module("._ring", __name__)
    except ImportError as exc:
        log.warning("ring engine: C extension unavailable (%s); using the pure-Python twin, which is much "
                    "slower on the proxy's data path. Install gcc and python3-dev, then re-run ./scripts/setup.",
                    exc)
        return "python", import_module("._native", __name__)
    if os.environ.get("FSINSPECT_RING_TUNE_MALLOC", "1") != "0":
        c.tune_malloc()
    return "c", c


BACKEND, _engine = _load()

if TYPE_CHECKING:  # both engines have the twin's API (_ring.pyi says so)
    from ._native import CORE_LAYOUT, CaptureBuffer, Chain, MemoryMap, ShadowPath, SplitQueue
else:
    MemoryMap = _engine.MemoryMap
    SplitQueue = _engine.SplitQueue
    Chain = _engine.Chain
    CaptureBuffer = _engine.CaptureBuffer
    ShadowPath = _engine.ShadowPath
    CORE_LAYOUT = _engine.CORE_LAYOUT

__all__ = [
    "BACKEND",
    "CAP_F_ANSWERED",
    "CAP_F_HELD",
    "CAP_F_RELEASED",
    "CAP_F_REWRITTEN",
    "CAP_F_TRUNCATED",
    "CORE_LAYOUT",
    "HOLD_REPLY",
    "HOLD_REQUEST",
    "KIND_ERROR",
    "KIND_REPLY",
    "KIND_REQUEST",
    "LAYOUT_F_FROM_INDIRECT",
    "MAX_GATHER",
    "REASONS",
    "Capture",
    "CaptureBuffer",
    "Chain",
    "HoldRule",
    "MemoryMap",
    "RingError",
    "ShadowPath",
    "SplitQueue",
    "check_hold_rules",
]
