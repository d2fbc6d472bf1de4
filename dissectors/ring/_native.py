"""The pure-Python twin of the C ring engine (ring_core.c + _ringmodule.c): same API, same errors.

Used when the extension could not be built.  It follows the C core step for step (the differential
fuzz test feeds both the same random rings and compares every result), so behaviour never depends on
which engine is loaded; only speed does.  The shadow path runs in a Python thread.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from ..spec import fuse as fuse_spec
from ..spec import virtio
from ..structs import build_codecs
from ._common import (
    CAP_F_ANSWERED,
    CAP_F_HELD,
    CAP_F_RELEASED,
    CAP_F_REWRITTEN,
    CAP_F_TRUNCATED,
    CAP_HDR_SIZE,
    CAP_LAYOUT_SIZE,
    HOLD_REPLY,
    HOLD_REQUEST,
    KIND_ERROR,
    KIND_REPLY,
    KIND_REQUEST,
    LAYOUT_F_FROM_INDIRECT,
    MAX_GATHER,
    MAX_REGIONS,
    REASONS,
    Capture,
    RingError,
    capture_record_size,
    check_hold_rules,
)

_CODECS = build_codecs(virtio.REGISTRY)
_DESC = _CODECS["vring_desc"].struct
_USED_ELEM = _CODECS["vring_used_elem"].struct
_U16 = _CODECS["vring_avail"].struct  # flags, idx: the index is the second u16
_DESC_SIZE = virtio.DESC_SIZE
_ELEM_SIZE = virtio.USED_ELEM_SIZE
_F = virtio.VRING_DESC_F.by_name()
F_NEXT, F_WRITE, F_INDIRECT = _F["NEXT"], _F["WRITE"], _F["INDIRECT"]
_AVAIL_RING_OFF = virtio.split_ring_layout(1).avail_ring_off
_USED_RING_OFF = virtio.split_ring_layout(1).used_ring_off
_MAX_INDIRECT = virtio.MAX_QUEUE_SIZE
_U64 = 1 << 64
_VRING_AVAIL_F_NO_INTERRUPT = virtio.VRING_AVAIL_F.by_name()["NO_INTERRUPT"]
Buffer = bytes | bytearray | memoryview | mmap.mmap  # collections.abc.Buffer needs 3.12


class _Fail(Exception):
    """Internal: a walk stopped with a reason (turned into RingError or an error capture)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Region:
    __slots__ = ("gpa", "mv", "size", "uva")

    def __init__(self, gpa: int, size: int, uva: int, mv: memoryview) -> None:
        self.gpa, self.size, self.uva, self.mv = gpa, size, uva, mv


class MemoryMap:
    """Guest memory regions with GPA -> (region, offset) translation and bounds checks."""

    def __init__(self) -> None:
        self._r: list[_Region] = []
        self._busy = 0

    def add_region(self, gpa: int, size: int, buf: Buffer, uva: int = 0, mmap_offset: int = 0) -> int:
        """Map `size` bytes of `buf` starting at `mmap_offset` (the libvhost-user mapping rule) at `gpa`."""
        if self._busy:
            raise RuntimeError("memory map in use by a running shadow path: stop it first")
        if size == 0 or gpa + size >= _U64 or uva + size >= _U64:
            raise RingError("overflow")
        if len(self._r) >= MAX_REGIONS:
            raise RingError("regions_full")
        if any(gpa < r.gpa + r.size and r.gpa < gpa + size for r in self._r):
            raise RingError("region_overlap")
        mv = memoryview(buf)
        if mv.readonly or mmap_offset + size > mv.nbytes:
            nbytes, readonly = mv.nbytes, mv.readonly
            mv.release()  # a failed add must not keep the buffer exported
            if readonly:
                raise BufferError("Object is not writable.")
            raise ValueError(f"buffer of {nbytes} bytes cannot hold mmap_offset {mmap_offset} + size {size}")
        mv = mv.cast("B")
        self._r.append(_Region(gpa, size, uva, mv[mmap_offset:mmap_offset + size]))
        return len(self._r) - 1

    def remove_region(self, gpa: int) -> None:
        if self._busy:
            raise RuntimeError("memory map in use by a running shadow path: stop it first")
        for i, r in enumerate(self._r):
            if r.gpa == gpa:
                del self._r[i]
                return
        raise RingError("no_region")

    def _find(self, gpa: int, length: int) -> tuple[int, int]:
        if gpa + length >= _U64:
            raise _Fail("overflow")
        for i, r in enumerate(self._r):
            off = gpa - r.gpa
            if 0 <= off < r.size and length <= r.size - off:
                return i, off
        raise _Fail("no_region")

    def translate(self, gpa: int, length: int = 1) -> tuple[int, int]:
        reason = ""
        try:
            return self._find(gpa, length)
        except _Fail as e:
            reason = e.reason
        # raised outside the except block: a chained _Fail traceback would pin region views (and so
        # keep the caller's mmap exported) for as long as the RingError lives
        raise RingError(reason)

    def uva_to_gpa(self, uva: int) -> int:
        for r in self._r:
            if r.uva <= uva < r.uva + r.size:
                return r.gpa + (uva - r.uva)
        raise RingError("no_region")

    def view(self, gpa: int, length: int) -> memoryview:
        i, off = self.translate(gpa, length)
        return self._r[i].mv[off:off + length]

    @property
    def regions(self) -> list[tuple[int, int, int]]:
        return [(r.gpa, r.size, r.uva) for r in self._r]

    def _ptr(self, gpa: int, length: int) -> memoryview:
        i, off = self._find(gpa, length)
        return self._r[i].mv[off:off + length]


class Chain:
    """One popped descriptor chain; `reply()`/`complete()` put it on its queue's used ring, once."""

    __slots__ = ("_queue", "done", "head", "layout", "readable", "readable_len", "writable", "writable_len")

    def __init__(self, head: int, readable: bytes, writable: tuple[memoryview, ...],
                 layout: tuple[tuple[int, int, int], ...], readable_len: int, writable_len: int,
                 queue: SplitQueue | None = None) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.layout = layout
        self.readable_len = readable_len
        self.writable_len = writable_len
        self._queue = queue
        self.done = False

    def write(self, data: Buffer) -> int:
        """Scatter `data` into the writable segments; returns how many bytes fitted."""
        return self._scatter([memoryview(data)])[0]

    def _scatter(self, parts: Sequence[Any]) -> tuple[int, bool]:
        """(bytes written, truncated); a part that is not a buffer is that many bytes already in place."""
        segs, si, so, written, truncated = self.writable, 0, 0, 0, False
        for part in parts:
            src = None if isinstance(part, int) or not _is_buffer(part) else memoryview(part).cast("B")
            want = len(src) if src is not None else len(part)
            done = 0
            while si < len(segs) and done < want:
                seg = segs[si]
                k = min(len(seg) - so, want - done)
                if src is not None:
                    seg[so:so + k] = src[done:done + k]
                done += k
                so += k
                if so >= len(seg):
                    si, so = si + 1, 0
            written += done
            truncated |= done < want
        return written, truncated

    def _check_open(self) -> SplitQueue:
        if self.done:
            raise ValueError(f"chain {self.head} was already completed")
        if self._queue is None:
            raise ValueError("chain has no queue to complete on")
        return self._queue

    def reply(self, parts: Sequence[Any]) -> int:
        """The reply sink of a request: scatter the parts, then complete the chain with the bytes written."""
        q = self._check_open()
        n, truncated = self._scatter(parts)
        if n > 0xFFFFFFFF:
            raise OverflowError("reply longer than a used length")
        q._complete_chain(self, n, truncated)
        return n

    def complete(self, length: int = 0) -> None:
        """Put the chain on the used ring with `length` bytes and no write (FORGET: 0)."""
        if not 0 <= length <= 0xFFFFFFFF:
            raise OverflowError("used len does not fit in 32 bits")
        self._check_open()._complete_chain(self, length, False)


def _is_buffer(obj: Any) -> bool:
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True


class _Walk:
    """Result of walking one chain: layout, segments (view, write) and the reason it stopped."""

    __slots__ = ("err", "head", "layout", "readable_len", "segs", "writable_len")

    def __init__(self, head: int) -> None:
        self.head = head
        self.layout: list[tuple[int, int, int]] = []
        self.segs: list[tuple[memoryview, bool]] = []
        self.readable_len = 0
        self.writable_len = 0
        self.err: str | None = None

    def gather(self, write: bool, limit: int) -> bytes:
        out = bytearray()
        for mv, w in self.segs:
            if w != write:
                continue
            if len(out) >= limit:
                break
            out += mv[:limit - len(out)]
        return bytes(out)


def _map(mem: MemoryMap, w: _Walk, addr: int, length: int, write: bool) -> None:
    if addr + length >= _U64:
        raise _Fail("overflow")
    left = length
    while left:
        i, off = mem._find(addr, 1)
        r = mem._r[i]
        chunk = min(r.size - off, left)
        w.segs.append((r.mv[off:off + chunk], write))
        addr += chunk
        left -= chunk
    if write:
        w.writable_len += length
    else:
        w.readable_len += length


def _walk(mem: MemoryMap, desc: memoryview, num: int, head: int) -> _Walk:
    """rc_walk_chain: the same checks in the same order, so both engines report the same reason."""
    w = _Walk(head)
    try:
        if head >= num:
            raise _Fail("head_range")
        table, tlen, count, idx = desc, num, 0, head
        indirect = seen_write = False
        while True:
            if idx >= tlen:
                raise _Fail("next_range")
            count += 1
            if count > tlen:
                raise _Fail("chain_loop")
            addr, length, flags, nxt = _DESC.unpack_from(table, idx * _DESC_SIZE)
            if flags & F_INDIRECT:
                if indirect:
                    raise _Fail("nested_indirect")
                w.layout.append((addr, length, flags))
                if flags & F_NEXT:
                    raise _Fail("indirect_next")
                if length == 0 or length % _DESC_SIZE or length // _DESC_SIZE > _MAX_INDIRECT:
                    raise _Fail("indirect_len")
                table = mem._ptr(addr, length)
                tlen, indirect, count, idx = length // _DESC_SIZE, True, 0, 0
                continue
            w.layout.append((addr, length, flags | (LAYOUT_F_FROM_INDIRECT if indirect else 0)))
            write = bool(flags & F_WRITE)
            if not write and seen_write:
                raise _Fail("read_after_write")
            seen_write |= write
            _map(mem, w, addr, length, write)
            if w.readable_len > MAX_GATHER:
                raise _Fail("too_large")
            if not flags & F_NEXT:
                break
            idx = nxt
    except _Fail as e:
        w.err = e.reason
    return w


def _check_rings(mem: MemoryMap, num: int, desc: int, avail: int, used: int) -> tuple[memoryview, ...]:
    if num <= 0 or num > virtio.MAX_QUEUE_SIZE or num & (num - 1):
        raise RingError("bad_queue")
    if desc & 15 or avail & 1 or used & 3:
        raise RingError("bad_queue")
    lay = virtio.split_ring_layout(num)
    reason = ""
    try:
        return mem._ptr(desc, lay.desc_size), mem._ptr(avail, lay.avail_size), mem._ptr(used, lay.used_size)
    except _Fail as e:
        reason = e.reason
    raise RingError(reason)


def _get16(ring: memoryview, off: int) -> int:
    return ring[off] | ring[off + 1] << 8


def _put16(ring: memoryview, off: int, v: int) -> None:
    ring[off:off + 2] = v.to_bytes(2, "little")


def _need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event(): did the index move past what the other side asked to be told about?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def _load_idx(ring: memoryview) -> int:
    return int(_U16.unpack_from(ring, 0)[1])


def _store_idx(ring: memoryview, idx: int) -> None:
    ring[2:4] = (idx & 0xFFFF).to_bytes(2, "little")


class SplitQueue:
    """A split virtqueue seen by the device; ring addresses are GPAs.

    Completions (Chain.reply/complete, complete) publish under one lock, from the used-ring write to the
    call fd's write: completions from several threads are serialised, and a call fd swapped (then closed)
    by the caller is never written after the swap.
    """

    def __init__(self, mem: MemoryMap, num: int, desc: int, avail: int, used: int) -> None:
        self._desc, self._avail, self._used = _check_rings(mem, num, desc, avail, used)
        self._mem = mem
        self.num = num
        self.last_avail_idx = 0
        self.used_idx = 0
        self._lock = threading.RLock()
        self._call_fd = -1
        self._event_idx = False
        self._signalled: int | None = None
        self._detached = False
        self._next: SplitQueue | None = None
        self._batch: list[tuple[int, int]] | None = None
        self._batch_owner = 0
        self.inflight = 0
        self._ctr = {"calls": 0, "calls_suppressed": 0, "completed": 0, "late": 0, "truncated": 0, "popped": 0}
        self._truncated_seen = 0
        self._pending = 0  # serve_fast(): entries of the open batch's group not popped yet

    def avail_pending(self) -> int:
        n = (_load_idx(self._avail) - self.last_avail_idx) & 0xFFFF
        if n > self.num:
            raise RingError("avail_ahead")
        return n

    def serve_wait(self, ep: Any, wake_fd: int, src: Any, failed: Any, reply_failed: Any) -> Chain | int:
        """serve_fast(), and while the ring is empty the wait in `ep` (an edge-triggered epoll set whose
        eventfds are never read) for the next kick, until a chain is declined (returned) or `wake_fd`
        fired (the replies truncated meanwhile)."""
        truncated = 0
        while True:
            r = self.serve_fast(src, failed, reply_failed)
            if r is None:
                timeout = 0.0  # a group published, more available: only look whether woken
            elif isinstance(r, int):
                truncated += r
                timeout = -1.0
            else:
                return r
            if any(fd == wake_fd for fd, _ev in ep.poll(timeout)):
                return truncated

    def _want_kick(self) -> int:
        """avail_pending() after asking for a kick at the next entry (EVENT_IDX): no kick is lost."""
        if self._event_idx:
            _put16(self._used, _USED_RING_OFF + _ELEM_SIZE * self.num, self.last_avail_idx)
        return self.avail_pending()

    def _pop(self, popped: list[Chain]) -> Chain:
        """The next available chain, in flight; a malformed one is consumed and raised (with `popped`)."""
        off = _AVAIL_RING_OFF + 2 * (self.last_avail_idx & (self.num - 1))
        head = self._avail[off] | self._avail[off + 1] << 8
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        w = _walk(self._mem, self._desc, self.num, head)
        if w.err:
            raise RingError(w.err, head, popped)
        chain = Chain(head, w.gather(False, w.readable_len), tuple([mv for mv, wr in w.segs if wr]),
                      tuple(w.layout), w.readable_len, w.writable_len, self)
        with self._lock:
            self.inflight += 1
            self._ctr["popped"] += 1
        return chain

    def pop_chains(self, max: int = 0) -> list[Chain]:
        self._pending = 0  # a serve_fast() group is over: what it had not popped is still available
        n = self._want_kick()
        if max > 0:
            n = min(n, max)
        out: list[Chain] = []
        for _ in range(n):
            out.append(self._pop(out))
        return out

    def serve_fast(self, src: Any, failed: Any, reply_failed: Any) -> Chain | int | None:
        """The queue thread's loop for what `fast = src.fast` (read before each chain) answers (the C engine
        calls a native answerer's C entry, ring_answer.h; this twin calls `fast(request, chain)`): pop a
        group as pop_chains() would, in a batch, and answer each chain as the daemon's queue thread did in
        Python (`except Exception: r = failed(request)`; a reply that cannot be sent: `reply_failed(e)`).
        Returns the first chain `fast` declines (None), or popped while `src.fast` is None, in flight, with
        the batch still open: the caller serves it and calls again; None
        when a group was published and more are available; the replies truncated since last asked (an
        int) when the ring was found empty.  A malformed chain raises RingError(reason, head) with the
        batch open (consumed: the caller completes its head and calls again); an escaped error completes
        the chain it was serving with used.len 0 first."""
        if self._pending == 0 or self._batch is None:
            if self._batch is not None:  # the last group ended with a declined chain
                self._close_batch()
            n = self._want_kick()
            if n == 0:
                return self._truncated_since()
            self.begin_batch()
            self._pending = n
        while self._pending > 0:
            fast = src.fast
            self._pending -= 1
            chain = self._pop([])
            if fast is None:
                return chain
            try:
                raw = chain.readable
                try:
                    r = fast(raw, chain)
                except Exception:
                    r = failed(raw)
                if r is None:
                    return chain
                if r:
                    try:
                        chain.reply(r if isinstance(r, tuple) else (r,))
                    except Exception as e:
                        reply_failed(e)
                else:
                    chain.complete(0)
            except BaseException:
                if not chain.done:
                    chain.complete(0)
                raise
        self._close_batch()
        return self._truncated_since() if self._want_kick() == 0 else None

    def push_used(self, elems: Sequence[tuple[int, int]]) -> None:
        items = list(elems)
        for it in items:
            if not isinstance(it, tuple) or len(it) != 2:
                raise TypeError("push_used() items must be (head, len) tuples")
            if it[1] < 0 or it[1] > 0xFFFFFFFF:
                raise OverflowError("used len does not fit in 32 bits")
        for head, _ in items:
            if head >= self.num:
                raise RingError("head_range")
        idx, mask = self.used_idx, self.num - 1
        for head, length in items:
            _USED_ELEM.pack_into(self._used, _USED_RING_OFF + _ELEM_SIZE * (idx & mask), head, length)
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        _store_idx(self._used, idx)

    # ---- completions
    def _publish(self, elems: list[tuple[int, int]]) -> None:
        """Entries, used->idx once, then a call unless the driver asked for none (caller holds the lock)."""
        if not elems:
            return
        self.push_used(elems)
        if self._event_idx:
            old, self._signalled = self._signalled, self.used_idx
            event = _get16(self._avail, _AVAIL_RING_OFF + 2 * self.num)
            call = old is None or _need_event(event, self.used_idx, old)
        else:
            call = not _get16(self._avail, 0) & _VRING_AVAIL_F_NO_INTERRUPT
        if not call:
            self._ctr["calls_suppressed"] += 1
        elif self._call_fd >= 0:
            try:
                os.eventfd_write(self._call_fd, 1)
            except OSError:  # a dropped fd: the next SET_VRING_CALL replaces it
                pass
            self._ctr["calls"] += 1

    def _add(self, head: int, length: int) -> None:
        if self._detached:
            self._ctr["late"] += 1
            return
        batch = self._batch
        if batch is not None and self._batch_owner == threading.get_ident():
            if len(batch) >= self.num:  # a guest that offered a head twice
                self._batch = []
                self._publish(batch)
                batch = self._batch
            batch.append((head, length))
            return
        self._publish([(head, length)])

    def _complete_chain(self, chain: Chain, length: int, truncated: bool) -> None:
        q = self
        while q._next is not None:  # the ring was re-made while this chain was served
            q = q._next
        with q._lock:
            chain.done = True
            q.inflight -= 1
            q._ctr["completed"] += 1
            q._ctr["truncated"] += truncated
            q._add(chain.head, length)

    def complete(self, head: int, length: int = 0) -> None:
        if head >= self.num or head < 0:
            raise RingError("head_range", head & 0x7FFFFFFF)
        if not 0 <= length <= 0xFFFFFFFF:
            raise OverflowError("used len does not fit in 32 bits")
        with self._lock:
            self._add(head, length)

    def begin_batch(self) -> None:
        with self._lock:
            if self._batch:
                self._publish(self._batch)
            self._batch = []
            self._batch_owner = threading.get_ident()
            self._pending = 0

    def end_batch(self) -> int:
        self._close_batch()
        return self._truncated_since()

    def _close_batch(self) -> None:
        with self._lock:
            batch, self._batch = self._batch, None
            self._pending = 0
            if batch:
                self._publish(batch)

    def _truncated_since(self) -> int:
        with self._lock:
            t = self._ctr["truncated"] - self._truncated_seen
            self._truncated_seen = self._ctr["truncated"]
            return t

    def detach(self) -> None:
        with self._lock:
            batch, self._batch = self._batch, None
            self._pending = 0
            if batch:
                self._publish(batch)
            self._detached = True
            self._call_fd = -1

    def handover(self, new: SplitQueue) -> None:
        if not isinstance(new, SplitQueue) or new is self:
            raise TypeError("handover() takes another SplitQueue")
        q: SplitQueue | None = new
        while q is not None:
            if q is self:
                raise ValueError("handover() would make a loop")
            q = q._next
        if self._next is not None:
            raise ValueError("this queue was already handed over")
        with self._lock:
            batch, self._batch = self._batch, None
            self._pending = 0
            if batch:
                self._publish(batch)
            with new._lock:
                new.inflight += self.inflight
            self.inflight = 0
            self._call_fd = -1
            self._next = new

    @property
    def call_fd(self) -> int:
        return self._call_fd

    @call_fd.setter
    def call_fd(self, fd: int) -> None:
        if fd < -1:
            raise ValueError("call_fd is an fd or -1")
        with self._lock:
            self._call_fd = -1 if self._detached else fd

    @property
    def event_idx(self) -> bool:
        return self._event_idx

    @event_idx.setter
    def event_idx(self, on: bool) -> None:
        with self._lock:
            self._event_idx = bool(on)
            self._signalled = None

    @property
    def counters(self) -> dict[str, int]:
        with self._lock:
            return {**self._ctr, "inflight": self.inflight}


class CaptureBuffer:
    """Bounded capture records; `policy` when full: "drop" (count) or "lossless" (producers wait)."""

    def __init__(self, capacity: int = 16 << 20, policy: str = "drop") -> None:
        if policy not in ("drop", "lossless"):
            raise ValueError(f"policy must be 'drop' or 'lossless', not {policy!r}")
        self._cap = max(4096, capacity & ~7)
        self.policy = policy
        self._q: deque[tuple[Capture, int]] = deque()
        self._used = 0
        self._cond = threading.Condition()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._captured = self._dropped = self._dropped_bytes = self._stalls = 0

    def __del__(self) -> None:
        if hasattr(self, "_cond"):
            self.close()

    def close(self) -> None:
        """Close the eventfd (end of session; rc_capture_close), once the paths writing to it are closed and
        the consumer stopped: buffered records stay readable, nothing waits on it again.  Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def fileno(self) -> int:
        return self._fd

    @property
    def capacity(self) -> int:
        return self._cap

    def _put(self, cap: Capture, size: int, wait: bool, stop: threading.Event | None,
             count_drop: bool = True, stalls: dict[str, int] | None = None) -> bool | None:
        """Append one record; False when dropped, None when a lossless wait was stopped."""
        with self._cond:
            waited = False
            while self._cap - self._used < size:
                if self.policy != "lossless" or not wait or (stop is not None and stop.is_set()):
                    if count_drop:
                        self._dropped += 1
                        self._dropped_bytes += size
                    return None if (stop is not None and stop.is_set() and wait) else False
                if not waited:
                    waited = True
                    self._stalls += 1
                    if stalls is not None:  # the path's counter, visible while it waits
                        stalls["stalls"] += 1
                self._cond.wait(0.05)
            self._q.append((cap, size))
            self._used += size
            self._captured += 1
            return True

    def _notify(self) -> None:
        fd = self._fd  # no lock: a producer never waits behind the consumer (close() comes after the paths')
        if fd >= 0:
            os.eventfd_write(fd, 1)

    def _wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def read_captures(self, max: int = 1024, timeout: float = 0.0) -> list[Capture]:
        out: list[Capture] = []
        for attempt in range(2):
            fd = self._fd  # -1 once closed
            if fd >= 0:
                try:
                    os.eventfd_read(fd)  # clear first, then drain: no lost wake-up
                except BlockingIOError:
                    pass
            with self._cond:
                while self._q and (max <= 0 or len(out) < max):
                    cap, size = self._q.popleft()
                    self._used -= size
                    out.append(cap)
                if out:
                    self._cond.notify_all()
            if out or timeout <= 0 or attempt or fd < 0:
                break  # closed: what was buffered is all there will be
            p = select.poll()
            p.register(fd, select.POLLIN)
            p.poll(min(timeout, 86400.0) * 1000.0)
        return out

    @property
    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"captured": self._captured, "dropped": self._dropped, "dropped_bytes": self._dropped_bytes,
                    "stalls": self._stalls, "used_bytes": self._used, "capacity": self._cap}


_COUNTERS = ("requests", "replies", "errors", "unpaired", "kicks_in", "calls_in", "kicks_out", "calls_out",
             "stalls", "dropped", "wakeups", "spin_hits", "busy_ns", "busy_max_ns", "kicks_suppressed",
             "calls_suppressed", "holds", "released", "answered", "rewritten", "hold_drops", "safety")

# Hold points (ring_core.h): slot states, verdict kinds, and what a request must have to be held.
_HS_NONE, _HS_REQUEST, _HS_REPLY, _HS_PENDING = 0, 1, 2, 0x80
_V_RELEASE, _V_ANSWER, _V_REWRITE, _V_DROP, _V_EIO = 1, 2, 3, 4, 5
_FUSE_CODECS = build_codecs(fuse_spec.REGISTRY)
_IN_HEADER = _FUSE_CODECS["fuse_in_header"]
_IN_OFF = {n: o for n, o, _ in fuse_spec.REGISTRY.offsets("fuse_in_header")}
_OUT_HEADER = _FUSE_CODECS["fuse_out_header"].struct  # len, error, unique
_OP_UNKNOWN = 0xFFFFFFFF
_Rule = tuple[int, int, frozenset[int]]


def _hold_table(rules: Sequence[Any]) -> tuple[_Rule, ...] | None:
    """set_hold_rules(): the C binding's checks; None for an empty table."""
    return tuple((r.direction, r.queues, r.opcodes) for r in check_hold_rules(rules)) or None


def _hold_match(rules: tuple[_Rule, ...], direction: int, queue: int, op: int) -> bool:
    for d, q, ops in rules:
        if not d & direction:
            continue
        if q and (queue >= 64 or not (q >> queue) & 1):
            continue
        if not ops or op in ops:
            return True
    return False


class _Verdict:
    __slots__ = ("data", "dir", "head", "kind", "used_len")

    def __init__(self, head: int, kind: int, direction: int, used_len: int, data: bytes) -> None:
        self.head, self.kind, self.dir, self.used_len, self.data = head, kind, direction, used_len, data


class ShadowPath:
    """The shadow-ring data path of one queue, in a Python thread (the twin of the native one)."""

    def __init__(self, mem: MemoryMap, queue: int, num: int, desc: int, avail: int, used: int,
                 shadow_avail: int, shadow_used: int, capture: CaptureBuffer, kick_fd: int, call_fd: int,
                 backend_kick_fd: int, backend_call_fd: int, avail_base: int = 0, snaplen: int = 0,
                 spin_us: int = 0, event_idx: bool = False) -> None:
        if queue > 0xFFFF or avail_base > 0xFFFF:
            raise ValueError("queue and avail_base are 16-bit")
        if backend_kick_fd < 0 or backend_call_fd < 0:
            raise ValueError("the backend kick and call fds are required")
        self._desc, self._g_avail, self._g_used = _check_rings(mem, num, desc, avail, used)
        _, self._s_avail, self._s_used = _check_rings(mem, num, desc, shadow_avail, shadow_used)
        self._mem, self._cap, self.queue, self.num, self.snaplen = mem, capture, queue, num, snaplen
        self.spin_us = spin_us  # accepted for API parity; a spinning Python thread would starve the GIL
        self._inflight = bytearray(num)
        self._next_avail = self._s_avail_idx = avail_base
        _store_idx(self._s_avail, avail_base)
        self._s_avail[0:2] = b"\0\0"  # shadow avail flags stay 0: the backend always calls
        self._g_used_idx = self._next_used = _load_idx(self._g_used)
        _store_idx(self._s_used, self._g_used_idx)
        self._kick_fd = os.dup(kick_fd) if kick_fd >= 0 else -1
        self._call_fd = os.dup(call_fd) if call_fd >= 0 else -1
        self._bkick_fd = os.dup(backend_kick_fd)
        self._bcall_fd = os.dup(backend_call_fd)
        self._ctl_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False
        self._pending_kick: int | None = None
        self._lock = threading.Lock()  # proc_lock: held while forwarding
        self._fd_lock = threading.Lock()  # call fd use/swap, pending kick fd: never held while waiting
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broken = False
        self._last_error: str | None = None
        self._need_notify = False
        self._ctr = dict.fromkeys(_COUNTERS, 0)
        # EVENT_IDX (rc_path_set_event_idx): used_event follows an avail ring, avail_event a used ring.
        # The guest's used_event and the backend's avail_event are their wishes; the other two are ours.
        self._event_idx = bool(event_idx)
        lay = virtio.split_ring_layout(num)
        self._used_event_off, self._avail_event_off = lay.used_event_off, lay.avail_event_off
        self._signalled_used: int | None = None
        self._kicked_avail = self._s_avail_idx
        if self._event_idx:
            _put16(self._g_used, self._avail_event_off, self._next_avail)
            _put16(self._s_avail, self._used_event_off, self._next_used)
        # hold points (rc_path: rules, rules_seen, slot[], the verdict queue; see ring_core.h)
        self._hold_lock = threading.Lock()  # after self._lock, as in C
        self._rules: tuple[_Rule, ...] | None = None
        self._rules_seen: tuple[_Rule, ...] | None = None
        self._slot_op = [_OP_UNKNOWN] * num
        self._slot_state = bytearray(num)
        self._slot_used = [0] * num
        self._slot_wlen = [0] * num
        self._vq: list[_Verdict] = []
        self._async = False
        self._no_hold = False
        self._nheld = 0

    # -- lifecycle
    def _check_open(self) -> None:
        """start/step/drain and the fd setters need the fds and the rings, which close() gave back."""
        if self._closed:
            raise RuntimeError("ShadowPath closed")

    def _wake(self) -> None:
        """Under _fd_lock: close() closes the ctl eventfd under it, so a verdict or a rule change from
        another thread never writes to a number closed (and maybe reused) meanwhile (C: path_wake)."""
        with self._fd_lock:
            if self._ctl_fd >= 0:
                os.eventfd_write(self._ctl_fd, 1)

    def start(self) -> None:
        self._check_open()
        if self._thread is not None:
            return
        self._stop.clear()
        with self._lock:
            self._no_hold = False
            with self._hold_lock:
                self._async = True
        self._mem._busy += 1
        self._thread = threading.Thread(target=self._run, name=f"shadow-q{self.queue}", daemon=True)
        self._thread.start()
        self._wake()

    def stop(self) -> None:
        """Join the thread, then the safety rule (rc_path_stop): nothing stays held."""
        if self._closed:
            return
        if self._thread is not None:
            self._stop.set()
            self._wake()
            self._cap._wake_all()
            self._thread.join()
            self._thread = None
            self._mem._busy -= 1
            with self._fd_lock:
                self._apply_pending()
        self._resolve_all()

    def drain(self) -> int:
        self._check_open()
        with self._lock:
            return max(0, self._forward_used(False))

    def step(self) -> tuple[int, int]:
        self._check_open()
        if self._thread is not None:
            raise RuntimeError("step() is for a stopped path; the thread is running")
        with self._lock:
            return max(0, self._forward_avail(False)), max(0, self._forward_used(False))

    def close(self) -> None:
        """End of session (rc_path_close): stop, then give back every fd and the rings' memoryviews (their
        mappings may be closed then); counters, indices and held() still answer.  Idempotent."""
        if self._closed:
            return
        self.stop()
        # _lock: a verdict or step() on another thread forwards (and signals) under it
        with self._lock, self._fd_lock:
            self._closed = True
            for name in ("_kick_fd", "_call_fd", "_bkick_fd", "_bcall_fd", "_ctl_fd"):
                fd = getattr(self, name)
                if fd >= 0:
                    os.close(fd)
                    setattr(self, name, -1)
            if self._pending_kick is not None and self._pending_kick >= 0:
                os.close(self._pending_kick)
            self._pending_kick = None
            for view in (self._desc, self._g_avail, self._g_used, self._s_avail, self._s_used):
                view.release()

    def __del__(self) -> None:
        if hasattr(self, "_nheld"):  # __init__ ran to the end
            self.close()

    def set_kick_fd(self, fd: int) -> None:
        """Swap QEMU's kick fd; never waits for a lossless-stalled thread (C: rc_path_set_kick_fd)."""
        self._check_open()
        nfd = os.dup(fd) if fd >= 0 else -1
        with self._fd_lock:
            old, self._pending_kick = self._pending_kick, nfd
            if old is not None and old >= 0:
                os.close(old)
            if self._thread is None:
                self._apply_pending()
        self._wake()

    def set_call_fd(self, fd: int) -> None:
        self._check_open()
        nfd = os.dup(fd) if fd >= 0 else -1
        with self._fd_lock:
            if self._call_fd >= 0:
                os.close(self._call_fd)
            self._call_fd = nfd

    # -- hold points
    def set_hold_rules(self, rules: Sequence[Any]) -> None:
        """Replace the rule table atomically; the thread picks it up at its next pass."""
        table = _hold_table(rules)
        with self._hold_lock:
            self._rules = table
        self._wake()

    def release(self, head: int) -> None:
        self._verdict(head, _V_RELEASE, b"")

    def answer(self, head: int, data: Buffer) -> None:
        self._verdict(head, _V_ANSWER, bytes(data))

    def rewrite(self, head: int, data: Buffer) -> None:
        self._verdict(head, _V_REWRITE, bytes(data))

    def drop(self, head: int) -> None:
        self._verdict(head, _V_DROP, b"")

    def held(self) -> list[tuple[int, int]]:
        with self._hold_lock:
            return [(h, HOLD_REQUEST if st == _HS_REQUEST else HOLD_REPLY)
                    for h, st in enumerate(self._slot_state) if st in (_HS_REQUEST, _HS_REPLY)]

    def _check(self, head: int, kind: int, length: int) -> str | None:
        """rc verdict_check (under _hold_lock)."""
        st = self._slot_state[head]
        if st not in (_HS_REQUEST, _HS_REPLY):
            return "not_held"
        if kind in (_V_ANSWER, _V_REWRITE):
            if st != (_HS_REQUEST if kind == _V_ANSWER else _HS_REPLY):
                return "wrong_direction"
            return "no_room" if length > self._slot_wlen[head] else None
        if kind == _V_DROP:
            if st != _HS_REQUEST:
                return "wrong_direction"
            return "needs_reply" if self._slot_wlen[head] else None
        return None

    def _verdict(self, head: int, kind: int, data: bytes) -> None:
        """rc_path_verdict: queued for the running thread, applied at once on a stopped path."""
        if not 0 <= head < self.num:
            raise RingError("not_held", head)
        if len(data) > 0xFFFFFFFF:
            raise RingError("no_room", head)
        with self._hold_lock:
            err = self._check(head, kind, len(data))
            if not err and self._async:
                self._queue(head, kind, data)
                queued = True
            else:
                queued = False
        if queued:
            self._wake()
            return
        if err:
            raise RingError(err, head)
        with self._lock:
            with self._hold_lock:
                err = self._check(head, kind, len(data))
                v = None
                if not err:
                    if self._async:
                        self._queue(head, kind, data)
                    else:
                        v = _Verdict(head, kind, self._slot_state[head], self._slot_used[head], data)
                        self._slot_state[head] = _HS_NONE
                        self._nheld -= 1
            if err:
                raise RingError(err, head)
            if v is None:
                self._wake()
                return
            fwd_pub = [0, 0]
            self._apply_verdict(v, False, False, fwd_pub)
            self._finish_verdicts(fwd_pub)

    def _queue(self, head: int, kind: int, data: bytes) -> None:
        """Under _hold_lock."""
        st = self._slot_state[head]
        self._vq.append(_Verdict(head, kind, st, self._slot_used[head],
                                 data if kind in (_V_ANSWER, _V_REWRITE) else b""))
        self._slot_state[head] = _HS_PENDING | st
        self._nheld -= 1

    def _refresh_rules(self) -> None:
        """rc refresh_rules (under _lock)."""
        t = self._rules
        if t is self._rules_seen:
            return
        if t is not None and self._rules_seen is None:
            self._slot_op = [_OP_UNKNOWN] * self.num
        self._rules_seen = t

    def _slot_free(self, head: int) -> bool:
        with self._hold_lock:
            return self._slot_state[head] == _HS_NONE

    def _hold_slot(self, head: int, state: int, used_len: int, wlen: int) -> None:
        """Before the capture is committed: the consumer may give a verdict as soon as it sees it."""
        with self._hold_lock:
            self._slot_state[head] = state
            self._slot_used[head] = used_len
            self._slot_wlen[head] = min(wlen, 0xFFFFFFFF)
            self._nheld += 1

    def _hold_kept(self, head: int, r: int) -> bool:
        """rc hold_kept: a held capture that was not recorded is not held (unless a verdict came first)."""
        if r != 0:
            with self._hold_lock:
                if not self._slot_state[head] & _HS_PENDING:
                    self._slot_state[head] = _HS_NONE
                    self._nheld -= 1
                    return False
        self._ctr["holds"] += 1
        return True

    def _publish_used(self, head: int, length: int) -> None:
        _USED_ELEM.pack_into(self._g_used, _USED_RING_OFF + _ELEM_SIZE * (self._g_used_idx & (self.num - 1)),
                             head, length)
        self._g_used_idx = (self._g_used_idx + 1) & 0xFFFF

    @staticmethod
    def _scatter(w: _Walk, data: bytes) -> int:
        done = 0
        for mv, wr in w.segs:
            if not wr or done >= len(data):
                continue
            k = min(len(mv), len(data) - done)
            mv[:k] = data[done:done + k]
            done += k
        return done

    def _apply_verdict(self, v: _Verdict, stopping: bool, may_wait: bool, fwd_pub: list[int]) -> None:
        """rc apply_verdict (under _lock; the slot is already cleared)."""
        kind, head, ctr = v.kind, v.head, self._ctr
        if kind == _V_RELEASE and v.dir == _HS_REQUEST:
            if not stopping:
                self._inflight[head] = 1
                soff = _AVAIL_RING_OFF + 2 * (self._s_avail_idx & (self.num - 1))
                self._s_avail[soff:soff + 2] = head.to_bytes(2, "little")
                self._s_avail_idx = (self._s_avail_idx + 1) & 0xFFFF
                ctr["released"] += 1
                fwd_pub[0] += 1
                return
            kind = _V_EIO
        w = _walk(self._mem, self._desc, self.num, head)
        if kind == _V_EIO and not w.err and w.writable_len == 0:
            kind = _V_DROP  # FORGET, BATCH_FORGET: no reply to give
        length, flags = (v.used_len if kind == _V_RELEASE else 0), CAP_F_ANSWERED
        if w.err:  # the guest rewrote an outstanding chain: complete it empty, flagged
            ctr["errors"] += 1
            self._last_error = w.err
        elif kind == _V_RELEASE:
            flags = CAP_F_RELEASED
        elif kind == _V_EIO:
            o = _IN_OFF["unique"]
            unique = int.from_bytes(w.gather(False, o + 8)[o:o + 8].ljust(8, b"\0"), "little")
            length = self._scatter(w, _OUT_HEADER.pack(_OUT_HEADER.size, -errno.EIO, unique))
        elif kind != _V_DROP:
            length = self._scatter(w, v.data)
            if kind == _V_REWRITE:
                flags = CAP_F_REWRITTEN
        ctr[{_V_RELEASE: "released", _V_REWRITE: "rewritten", _V_DROP: "hold_drops"}.get(kind, "answered")] += 1
        state = [False]
        if w.err:
            self._capture(KIND_ERROR, head, w.err, length, w, True, may_wait, self._flush_used, state)
        else:
            self._capture(KIND_REPLY, head, None, length, w, True, may_wait, self._flush_used, state, flags)
        self._publish_used(head, length)
        fwd_pub[1] += 1

    def _finish_verdicts(self, fwd_pub: list[int]) -> None:
        if fwd_pub[0]:
            self._flush_avail()
        if fwd_pub[1]:
            self._flush_used()
        self._notify()

    def _apply_queued(self, stopping: bool, may_wait: bool) -> None:
        """The thread's side: apply what verdict callers queued (under _lock)."""
        if not self._vq:
            return
        with self._hold_lock:
            vq, self._vq = self._vq, []
            for v in vq:
                self._slot_state[v.head] = _HS_NONE
        fwd_pub = [0, 0]
        for v in vq:
            self._apply_verdict(v, stopping, may_wait, fwd_pub)
        self._finish_verdicts(fwd_pub)

    def _resolve_all(self) -> None:
        """The safety rule (rc path_resolve_all): queued verdicts first, then everything still held."""
        with self._lock:
            with self._hold_lock:
                self._async = False
            self._apply_queued(True, False)
            fwd_pub = [0, 0]
            for h in range(self.num if self._nheld else 0):
                with self._hold_lock:
                    st = self._slot_state[h]
                    if st not in (_HS_REQUEST, _HS_REPLY):
                        continue
                    self._slot_state[h] = _HS_NONE
                    self._nheld -= 1
                    v = _Verdict(h, _V_EIO if st == _HS_REQUEST else _V_RELEASE, st, self._slot_used[h], b"")
                self._ctr["safety"] += 1
                self._apply_verdict(v, True, False, fwd_pub)
            self._finish_verdicts(fwd_pub)
            self._no_hold = True

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def counters(self) -> dict[str, int]:
        return dict(self._ctr)

    @property
    def indices(self) -> dict[str, int]:
        return {"next_avail": self._next_avail, "shadow_avail_idx": self._s_avail_idx,
                "next_used": self._next_used, "guest_used_idx": self._g_used_idx}

    # -- the thread
    def _apply_pending(self) -> None:
        """Under _fd_lock."""
        if self._pending_kick is not None:
            if self._kick_fd >= 0:
                os.close(self._kick_fd)
            self._kick_fd, self._pending_kick = self._pending_kick, None

    def _run(self) -> None:
        ctr = self._ctr
        while not self._stop.is_set():
            p = select.poll()
            p.register(self._ctl_fd, select.POLLIN)
            if self._kick_fd >= 0:
                p.register(self._kick_fd, select.POLLIN)
            p.register(self._bcall_fd, select.POLLIN)
            ready = {fd for fd, ev in p.poll() if ev & select.POLLIN}
            ctr["wakeups"] += 1
            t0 = time.monotonic_ns()
            for fd in ready:
                try:
                    os.eventfd_read(fd)
                except (BlockingIOError, OSError):
                    pass
                if fd == self._kick_fd:
                    ctr["kicks_in"] += 1
                elif fd == self._bcall_fd:
                    ctr["calls_in"] += 1
            if self._stop.is_set():
                break
            with self._fd_lock:
                self._apply_pending()
            with self._lock:
                self._apply_queued(False, True)
                self._forward_avail(True)
                self._forward_used(True)
                self._recheck()
            dt = time.monotonic_ns() - t0
            ctr["busy_ns"] += dt
            ctr["busy_max_ns"] = max(ctr["busy_max_ns"], dt)

    # -- forwarding (under self._lock)
    def _capture(self, kind: str, head: int, reason: str | None, length: int, w: _Walk | None, writable: bool,
                 may_wait: bool, flush: Any, state: list[bool], xflags: int = 0) -> int:
        """rc path_capture: 0 captured, 1 dropped (no room), -1 a lossless wait interrupted by stop()."""
        layout = tuple(w.layout) if w is not None else ()
        if kind == KIND_ERROR or w is None:
            avail = 0
        else:
            avail = min(length, w.writable_len) if writable else w.readable_len
        data_len, truncated = avail, False
        if self.snaplen and data_len > self.snaplen:
            data_len, truncated = self.snaplen, True
        max_rec = self._cap._cap // 2
        fixed = CAP_HDR_SIZE + CAP_LAYOUT_SIZE * len(layout)
        if fixed > max_rec:
            n = (max_rec - CAP_HDR_SIZE) // CAP_LAYOUT_SIZE // 2
            layout, truncated = layout[:n], True
            fixed = CAP_HDR_SIZE + CAP_LAYOUT_SIZE * n
        if fixed + data_len > max_rec:
            data_len, truncated = max_rec - fixed, True
        if kind == KIND_REPLY and w is not None and length > w.writable_len:
            truncated = True
        size = capture_record_size(len(layout), data_len)
        data = w.gather(writable, data_len) if (w is not None and data_len) else b""
        rec = Capture(kind, self.queue, head, time.time_ns(), layout, length, data, truncated, reason,
                      xflags | (CAP_F_TRUNCATED if truncated else 0))
        if self._cap.policy == "lossless" and may_wait:
            r = self._cap._put(rec, size, False, self._stop, count_drop=False)
            if not r:
                if not state[0]:
                    flush()
                    state[0] = True
                self._cap._notify()
                r = self._cap._put(rec, size, True, self._stop, stalls=self._ctr)
                if r is None:
                    return -1
        else:
            r = self._cap._put(rec, size, False, self._stop)
        if not r:
            self._ctr["dropped"] += 1
            return 1
        self._need_notify = True
        return 0

    def _notify(self) -> None:
        if self._need_notify:
            self._need_notify = False
            self._cap._notify()

    def _flush_avail(self) -> None:
        _store_idx(self._s_avail, self._s_avail_idx)
        if self._event_idx:
            old, self._kicked_avail = self._kicked_avail, self._s_avail_idx
            if not _need_event(_get16(self._s_used, self._avail_event_off), self._s_avail_idx, old):
                self._ctr["kicks_suppressed"] += 1
                return
        os.eventfd_write(self._bkick_fd, 1)
        self._ctr["kicks_out"] += 1

    def _flush_used(self) -> None:
        _store_idx(self._g_used, self._g_used_idx)
        if self._event_idx:
            old, self._signalled_used = self._signalled_used, self._g_used_idx
            if old is not None and not _need_event(_get16(self._g_avail, self._used_event_off), self._g_used_idx,
                                                   old):
                self._ctr["calls_suppressed"] += 1
                return
        with self._fd_lock:
            if self._call_fd >= 0:
                os.eventfd_write(self._call_fd, 1)
        self._ctr["calls_out"] += 1

    def _forward_avail(self, may_wait: bool) -> int:
        ctr, num = self._ctr, self.num
        n = (_load_idx(self._g_avail) - self._next_avail) & 0xFFFF
        if n > num:
            if not self._broken:
                ctr["errors"] += 1
            self._broken, self._last_error = True, "avail_ahead"
            return -1
        self._broken = False
        self._refresh_rules()
        rules = self._rules_seen
        state, moved, forwarded, mask = [False], 0, 0, num - 1
        for _ in range(n):
            off = _AVAIL_RING_OFF + 2 * (self._next_avail & mask)
            head = self._g_avail[off] | self._g_avail[off + 1] << 8
            w = _walk(self._mem, self._desc, num, head)
            hold = False
            if w.err:
                ctr["errors"] += 1
                self._last_error = w.err
                r = self._capture(KIND_ERROR, head, w.err, 0, w, False, may_wait, self._flush_avail, state)
            else:
                if rules is not None:
                    op = _OP_UNKNOWN
                    if w.readable_len >= _IN_HEADER.size:
                        o = _IN_OFF["opcode"]
                        op = int.from_bytes(w.gather(False, o + 4)[o:o + 4], "little")
                    self._slot_op[head] = op
                    hold = (not self._no_hold and op != _OP_UNKNOWN and _hold_match(rules, HOLD_REQUEST, self.queue, op)
                            and self._slot_free(head))
                    if hold:
                        self._hold_slot(head, _HS_REQUEST, 0, w.writable_len)
                r = self._capture(KIND_REQUEST, head, None, w.readable_len & 0xFFFFFFFF, w, False, may_wait,
                                  self._flush_avail, state, CAP_F_HELD if hold else 0)
                if hold:
                    hold = self._hold_kept(head, r)
            if r < 0 and not hold:
                break
            if not hold:
                if head < num:
                    self._inflight[head] = 1
                soff = _AVAIL_RING_OFF + 2 * (self._s_avail_idx & mask)
                self._s_avail[soff:soff + 2] = head.to_bytes(2, "little")
                self._s_avail_idx = (self._s_avail_idx + 1) & 0xFFFF
                forwarded += 1
            self._next_avail = (self._next_avail + 1) & 0xFFFF
            ctr["requests"] += 1
            moved += 1
            state[0] = False
        if forwarded:
            self._flush_avail()
        if self._event_idx:  # tell the guest to kick for the next entry
            _put16(self._g_used, self._avail_event_off, self._next_avail)
        self._notify()
        return moved

    def _forward_used(self, may_wait: bool) -> int:
        ctr, num = self._ctr, self.num
        n = (_load_idx(self._s_used) - self._next_used) & 0xFFFF
        if n > num:
            ctr["errors"] += 1
            self._last_error = "avail_ahead"
            return -1
        self._refresh_rules()
        rules = self._rules_seen
        state, moved, published, mask = [False], 0, 0, num - 1
        for _ in range(n):
            hid, length = _USED_ELEM.unpack_from(self._s_used, _USED_RING_OFF + _ELEM_SIZE * (self._next_used & mask))
            hold = False
            if hid < num and self._inflight[hid]:
                w = _walk(self._mem, self._desc, num, hid)
                if w.err:
                    ctr["errors"] += 1
                    self._last_error = w.err
                    r = self._capture(KIND_ERROR, hid, w.err, length, w, True, may_wait, self._flush_used, state)
                else:
                    hold = (rules is not None and not self._no_hold
                            and _hold_match(rules, HOLD_REPLY, self.queue, self._slot_op[hid]) and self._slot_free(hid))
                    if hold:
                        self._hold_slot(hid, _HS_REPLY, length, w.writable_len)
                    r = self._capture(KIND_REPLY, hid, None, length, w, True, may_wait, self._flush_used, state,
                                      CAP_F_HELD if hold else 0)
                    if hold:
                        hold = self._hold_kept(hid, r)
            else:
                ctr["unpaired"] += 1
                ctr["errors"] += 1
                self._last_error = "not_in_flight" if hid < num else "head_range"
                r = self._capture(KIND_ERROR, hid & 0xFFFF, self._last_error, length, None, True, may_wait,
                                   self._flush_used, state)
            if r < 0 and not hold:
                break
            if hid < num:
                self._inflight[hid] = 0
            if not hold:
                _USED_ELEM.pack_into(self._g_used, _USED_RING_OFF + _ELEM_SIZE * (self._g_used_idx & mask), hid,
                                     length)
                self._g_used_idx = (self._g_used_idx + 1) & 0xFFFF
                published += 1
            self._next_used = (self._next_used + 1) & 0xFFFF
            ctr["replies"] += 1
            moved += 1
            state[0] = False
        if published:
            self._flush_used()
        if self._event_idx:  # tell the backend to call for the next entry
            _put16(self._s_avail, self._used_event_off, self._next_used)
        self._notify()
        return moved

    def _recheck(self) -> None:
        """rc path_recheck: an entry that landed before the other side saw our events brings no
        notification; look again.  After a few busy rounds, wake our own poll() instead."""
        rounds = 0
        while self._event_idx and not self._stop.is_set():
            da = (_load_idx(self._g_avail) - self._next_avail) & 0xFFFF
            du = (_load_idx(self._s_used) - self._next_used) & 0xFFFF
            more_avail = not self._broken and 0 < da <= self.num
            more_used = 0 < du <= self.num
            if not (more_avail or more_used):
                return
            if rounds == 4:
                self._wake()
                return
            rounds += 1
            if more_avail:
                self._forward_avail(True)
            if more_used:
                self._forward_used(True)


CORE_LAYOUT: dict[str, Any] = {
    "vring_desc": {"size": _DESC_SIZE, **{n: o for n, o, _ in virtio.REGISTRY.offsets("vring_desc")}},
    "vring_used_elem": {"size": _ELEM_SIZE, **{n: o for n, o, _ in virtio.REGISTRY.offsets("vring_used_elem")}},
    "VRING_DESC_F": {"NEXT": F_NEXT, "WRITE": F_WRITE, "INDIRECT": F_INDIRECT},
    "avail_ring_off": _AVAIL_RING_OFF,
    "used_ring_off": _USED_RING_OFF,
    "max_queue_size": virtio.MAX_QUEUE_SIZE,
    "max_regions": MAX_REGIONS,
    "max_gather": MAX_GATHER,
    "cap_hdr_size": CAP_HDR_SIZE,
    "cap_layout_size": CAP_LAYOUT_SIZE,
    "layout_f_from_indirect": LAYOUT_F_FROM_INDIRECT,
    "fuse_in_header": {"size": _IN_HEADER.size, "opcode": _IN_OFF["opcode"], "unique": _IN_OFF["unique"]},
    "fuse_out_header": {"size": _OUT_HEADER.size},
    "eio": errno.EIO,
}
__all__ = ["CORE_LAYOUT", "REASONS", "Capture", "CaptureBuffer", "Chain", "MemoryMap", "RingError",
           "ShadowPath", "SplitQueue"]
