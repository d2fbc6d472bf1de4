"""SplitQueue.serve_fast(): the daemon queue thread's loop in the ring engine (pop, answer, scatter, publish),
handing back only what the answerer declines.  Same tests on both engines, with a Python answerer (the C
engine serves it through a Chain, as the twin does); the C entry of the real fast path is compared with
the per-chain loop in tests/test_daemon_serve_fast.py."""

from __future__ import annotations

import os
import select
import sys
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from dissectors.ring import driver
from dissectors.spec import virtio
from tests.ringkit import Rig, engines
from tests.test_ring_completions import calls

ENGINES = engines()

F_INDIRECT = virtio.VRING_DESC_F.by_name()["INDIRECT"]


@pytest.fixture(params=sorted(ENGINES))
def ring(request: pytest.FixtureRequest) -> Iterator[tuple[Rig, Any, int]]:
    """A 16-entry ring on either engine, its device-side queue, and that queue's call eventfd."""
    e = ENGINES[request.param]
    if isinstance(e, Exception):
        pytest.fail(f"the C ring engine did not build/import: {e}")
    r = Rig(e, num=16)
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    q = r.queue()
    q.call_fd = fd
    yield r, q, fd
    os.close(fd)
    r.close()


def offer(rig: Rig, requests: dict[int, bytes], wsizes: tuple[int, ...] = (3, 8), publish: bool = True) -> dict[int, list[int]]:
    """A chain per head h carrying `requests[h]` (readable), then writable segments of `wsizes`; returns each
    head's writable GPAs."""
    out = {}
    for h, req in requests.items():
        segs = [(*rig.buf(req), False)] + [(*rig.buf(n), True) for n in wsizes]
        rig.guest.set_descs(h, driver.chain_descs(segs, first=h))
        out[h] = [gpa for gpa, _n, w in segs if w]
    if publish:
        rig.guest.publish(list(requests))
    return out


def written(rig: Rig, gpas: list[int], wsizes: tuple[int, ...] = (3, 8)) -> bytes:
    return b"".join(rig.get(g, n) for g, n in zip(gpas, wsizes, strict=True))


class Answerer:
    """A fast path in Python: b"r:" + request for requests starting with "ok", b"" for "nr", None for
    anything else; "boom" raises; a callback may run before each answer."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bool]] = []
        self.before: Any = None
        self.fast: Any = self  # serve_fast(src, ...) reads src.fast before each chain (the daemon's Server)

    def __call__(self, raw: bytes, chain: Any = None) -> bytes | None:
        self.seen.append((bytes(raw), chain is not None))
        if self.before is not None:
            self.before()
        if raw.startswith(b"ok"):
            return b"r:" + raw
        if raw.startswith(b"nr"):
            return b""
        if raw.startswith(b"boom"):
            raise RuntimeError("a bug in the answerer")
        return None


class Sinks:
    def __init__(self) -> None:
        self.failed: list[bytes] = []
        self.reply_failed: list[Exception] = []
        self.exc_info: list[Any] = []

    def on_failed(self, raw: bytes) -> bytes | None:
        self.failed.append(bytes(raw))
        self.exc_info.append(sys.exc_info()[1])  # called as inside the `except`
        return b"" if raw.startswith(b"boom-nr") else None

    def on_reply_failed(self, e: Exception) -> None:
        self.reply_failed.append(e)


def test_serves_a_group_in_one_batch_and_hands_back_what_it_declines(ring):
    rig, q, call_fd = ring
    q.event_idx = True
    ans, sinks = Answerer(), Sinks()
    bufs = offer(rig, {0: b"ok-a", 3: b"nr-b", 6: b"py-c", 9: b"ok-d"})
    r = q.serve_fast(ans, sinks.on_failed, sinks.on_reply_failed)
    # the first declined chain comes back in flight; nothing is published yet (the batch is open)
    assert r.head == 6 and r.readable == b"py-c" and not r.done and q.inflight == 1
    assert rig.guest.collect_used() == [] and calls(call_fd) == 0
    assert written(rig, bufs[0]) == b"r:ok-a\0\0\0\0\0"
    r.reply([b"slow"])  # the caller serves it in its place in the batch
    assert q.serve_fast(ans, sinks.on_failed, sinks.on_reply_failed) == 0  # the ring is empty
    assert rig.guest.collect_used() == [(0, 6), (3, 0), (6, 4), (9, 6)]
    assert calls(call_fd) == 1  # one batch, one call
    assert [s for s, _c in ans.seen] == [b"ok-a", b"nr-b", b"py-c", b"ok-d"]
    c = q.counters
    assert (c["popped"], c["completed"], c["inflight"], c["calls"]) == (4, 4, 0, 1)
    # EVENT_IDX: the kick was asked for at the next entry before the ring was found empty
    lay = virtio.split_ring_layout(rig.num)
    assert int.from_bytes(rig.mem.view(rig.used + lay.used_size - 2, 2), "little") == 4
    assert q.serve_fast(ans, sinks.on_failed, sinks.on_reply_failed) == 0 and calls(call_fd) == 0


def test_an_entry_added_while_serving_is_the_next_group(ring):
    rig, q, call_fd = ring
    ans, sinks = Answerer(), Sinks()
    offer(rig, {0: b"ok-1"})
    offer(rig, {5: b"ok-2"}, publish=False)
    ans.before = lambda: rig.guest.publish([5]) if len(ans.seen) == 1 else None
    assert q.serve_fast(ans, sinks.on_failed, sinks.on_reply_failed) is None  # published, more available
    assert rig.guest.collect_used() == [(0, 6)] and calls(call_fd) == 1
    assert q.serve_fast(ans, sinks.on_failed, sinks.on_reply_failed) == 0
    assert rig.guest.collect_used() == [(5, 6)] and calls(call_fd) == 1


def test_failures_are_handled_as_the_queue_thread_did(ring):
    rig, q, _fd = ring
    ans, sinks = Answerer(), Sinks()
    offer(rig, {0: b"boom-nr", 4: b"boom-py"})
    r = q.serve_fast(ans, sinks.on_failed, sinks.on_reply_failed)
    # a raising answer goes to `failed` inside the except: b"" completes it, None hands it to Python
    assert sinks.failed == [b"boom-nr", b"boom-py"]
    assert all(isinstance(e, RuntimeError) for e in sinks.exc_info)
    assert r.head == 4 and not r.done
    r.complete(0)
    assert q.serve_fast(ans, sinks.on_failed, sinks.on_reply_failed) == 0
    assert rig.guest.collect_used() == [(0, 0), (4, 0)]


def test_an_escaping_error_completes_the_chain_and_keeps_the_queue_usable(ring):
    rig, q, _fd = ring
    ans, sinks = Answerer(), Sinks()

    def failed(raw: bytes) -> None:
        raise KeyError("failed() itself failed")

    offer(rig, {0: b"boom", 3: b"ok-z"})
    with pytest.raises(KeyError):
        q.serve_fast(ans, failed, sinks.on_reply_failed)
    assert q.inflight == 0  # completed with used.len 0 (the batch is still open: the caller ends it)
    assert q.end_batch() == 0
    assert rig.guest.collect_used() == [(0, 0)]
    assert q.serve_fast(ans, sinks.on_failed, sinks.on_reply_failed) == 0  # a new group from where it was
    assert rig.guest.collect_used() == [(3, 6)]


def test_a_reply_that_cannot_be_scattered_goes_to_reply_failed(ring):
    rig, q, _fd = ring

    def odd(raw: bytes, chain: Any = None) -> tuple[Any, ...]:
        return (b"h", object())  # neither a buffer nor a length

    sinks = Sinks()
    offer(rig, {1: b"x"})
    assert q.serve_fast(SimpleNamespace(fast=odd), sinks.on_failed, sinks.on_reply_failed) == 0
    assert len(sinks.reply_failed) == 1 and isinstance(sinks.reply_failed[0], TypeError)
    assert q.inflight == 1  # as Chain.reply() raising left it: never completed
    assert rig.guest.collect_used() == []


def test_a_malformed_chain_raises_with_the_batch_open_and_nothing_is_lost(ring):
    rig, q, call_fd = ring
    ans, sinks = Answerer(), Sinks()
    bufs = offer(rig, {0: b"ok-a"})
    ind, _ = rig.buf(20)  # an indirect table whose length is not a multiple of 16
    rig.guest.set_desc(4, ind, 20, F_INDIRECT)
    bufs.update(offer(rig, {8: b"ok-c"}, publish=False))
    rig.guest.publish([4, 8])
    err = None
    try:
        q.serve_fast(ans, sinks.on_failed, sinks.on_reply_failed)
    except Exception as e:  # RingError of either engine
        err = e
    assert err is not None and err.reason == "indirect_len" and err.head == 4 and err.chains == []
    assert rig.guest.collect_used() == [] and calls(call_fd) == 0
    q.complete(err.head, 0)  # what the daemon does with it
    assert q.serve_fast(ans, sinks.on_failed, sinks.on_reply_failed) == 0
    assert rig.guest.collect_used() == [(0, 6), (4, 0), (8, 6)] and calls(call_fd) == 1
    assert written(rig, bufs[8]) == b"r:ok-c\0\0\0\0\0"


def test_avail_ahead_consumes_nothing(ring):
    rig, q, _fd = ring
    rig.guest.set_avail_idx(rig.num + 1)
    with pytest.raises(Exception, match="avail_ahead"):
        q.serve_fast(Answerer(), Sinks().on_failed, Sinks().on_reply_failed)
    assert q.last_avail_idx == 0 and q.inflight == 0


def test_pop_chains_and_end_batch_end_a_group(ring):
    """A group left open by a declined chain is over once the caller pops or ends the batch itself (the
    daemon's fast path going away mid-group): the rest is still available, nothing popped twice."""
    rig, q, _fd = ring
    ans, sinks = Answerer(), Sinks()
    offer(rig, {0: b"py-1", 3: b"ok-2", 6: b"ok-3"})
    r = q.serve_fast(ans, sinks.on_failed, sinks.on_reply_failed)
    assert r.head == 0
    q.begin_batch()
    rest = q.pop_chains()
    assert [c.head for c in rest] == [3, 6]
    for c in (r, *rest):
        c.complete(1)
    q.end_batch()
    assert q.serve_fast(ans, sinks.on_failed, sinks.on_reply_failed) == 0
    assert sorted(rig.guest.collect_used()) == [(0, 1), (3, 1), (6, 1)]
    assert q.counters["popped"] == 3



def test_src_fast_is_read_before_each_chain(ring):
    """The daemon's Server.fast can go away (DESTROY) while a group is served: the next chain comes back as a
    declined one, and nothing is popped twice."""
    rig, q, _fd = ring
    ans, sinks = Answerer(), Sinks()
    offer(rig, {0: b"ok-1", 3: b"ok-2", 6: b"ok-3"})

    def after_first() -> None:
        if len(ans.seen) == 1:
            ans.fast = None
    ans.before = after_first
    r = q.serve_fast(ans, sinks.on_failed, sinks.on_reply_failed)
    assert r.head == 3 and len(ans.seen) == 1 and not r.done
    r.complete(1)
    ans.fast = ans
    assert q.serve_fast(ans, sinks.on_failed, sinks.on_reply_failed) == 0
    assert rig.guest.collect_used() == [(0, 6), (3, 1), (6, 6)]
    assert q.counters["popped"] == 3


def test_serve_wait_waits_for_kicks_itself_and_returns_when_woken(ring):
    """serve_wait: the queue thread's whole loop; kicks are served without returning, the wake fd returns."""
    rig, q, call_fd = ring
    ans, sinks = Answerer(), Sinks()
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    ep = select.epoll()
    ep.register(kick, select.EPOLLIN | select.EPOLLET)
    ep.register(wake, select.EPOLLIN | select.EPOLLET)
    out: list[Any] = []
    served = threading.Event()
    ans.before = served.set
    try:
        offer(rig, {0: b"ok-a"})
        t = threading.Thread(target=lambda: out.append(q.serve_wait(ep, wake, ans, sinks.on_failed,
                                                                    sinks.on_reply_failed)))
        t.start()
        assert served.wait(5)  # what was available is served first
        served.clear()
        offer(rig, {3: b"ok-b"})
        os.eventfd_write(kick, 1)
        assert served.wait(5)  # a kick: served in the same call
        served.clear()
        offer(rig, {6: b"py-c"})
        os.eventfd_write(kick, 1)
        t.join(5)
        assert not t.is_alive() and out[0].head == 6  # declined: back to the caller, batch open
        out[0].complete(2)
        t = threading.Thread(target=lambda: out.append(q.serve_wait(ep, wake, ans, sinks.on_failed,
                                                                    sinks.on_reply_failed)))
        t.start()
        t.join(0.2)
        assert t.is_alive()  # waiting in the engine
        os.eventfd_write(wake, 1)
        t.join(5)
        assert not t.is_alive() and out[1] == 0  # woken: the replies truncated meanwhile
        assert rig.guest.collect_used() == [(0, 6), (3, 6), (6, 2)]
        assert [x for x, _c in ans.seen] == [b"ok-a", b"ok-b", b"py-c"]
        assert calls(call_fd) == 3  # one per group: a, b, and c's once the caller came back
    finally:
        ep.close()
        os.close(kick)
        os.close(wake)
