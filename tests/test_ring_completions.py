"""Completions on the device side (the daemon's path): a chain as its own reply sink, batches published
with one used->idx store and at most one call, call suppression (NO_INTERRUPT, EVENT_IDX), a ring re-made
or torn down while chains are in flight.  Same tests on both engines."""

from __future__ import annotations

import os

import pytest

from dissectors.ring import driver
from dissectors.spec import virtio
from tests.ringkit import Rig, engines

ENGINES = engines()
F = virtio.VRING_DESC_F.by_name()
F_NEXT, F_WRITE = F["NEXT"], F["WRITE"]


@pytest.fixture(params=sorted(ENGINES))
def rig(request):
    e = ENGINES[request.param]
    if isinstance(e, Exception):
        pytest.fail(f"the C ring engine did not build/import: {e}")
    r = Rig(e, num=16)
    yield r
    r.close()


@pytest.fixture
def call_fd():
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def calls(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def offer(rig: Rig, heads: list[int], wsizes: tuple[int, ...] = (8,)) -> dict[int, list[int]]:
    """Chains at heads h (readable 4 bytes, then writable segments of `wsizes`; descriptors h, h+1, ...),
    published; returns each head's writable GPAs."""
    out = {}
    for h in heads:
        segs = [(*rig.buf(bytes([h]) * 4), False)]
        segs += [(*rig.buf(n), True) for n in wsizes]
        rig.guest.set_descs(h, driver.chain_descs(segs, first=h))
        out[h] = [gpa for gpa, _n, w in segs if w]
    rig.guest.publish(heads)
    return out


def test_reply_scatters_completes_once_and_batches_one_call(rig, call_fd):
    q = rig.queue()
    q.call_fd = call_fd
    bufs = offer(rig, [0, 4], wsizes=(3, 8))
    q.begin_batch()
    a, b = q.pop_chains()
    assert q.inflight == 2
    assert a.reply([b"ab", b"cdef"]) == 6  # across the two writable segments
    assert b.reply([b"x" * 20]) == 11  # truncated to the writable bytes
    assert rig.guest.collect_used() == [] and calls(call_fd) == 0  # nothing before end_batch
    assert q.end_batch() == 1  # one truncated reply since the last batch
    assert rig.guest.collect_used() == [(0, 6), (4, 11)]
    assert calls(call_fd) == 1  # one call for the batch
    assert rig.get(bufs[0][0], 3) + rig.get(bufs[0][1], 3) == b"abcdef"
    assert a.done and q.inflight == 0
    with pytest.raises(ValueError, match="already completed"):
        a.reply([b"again"])
    with pytest.raises(ValueError, match="already completed"):
        a.complete()
    c = q.counters
    assert (c["calls"], c["completed"], c["truncated"], c["inflight"]) == (1, 2, 1, 0)


def test_a_part_that_is_not_a_buffer_is_already_in_place(rig, call_fd):
    """The daemon's zero-copy READ: the data was preadv'd into the chain, only its length travels."""

    class InPlace:
        def __len__(self) -> int:
            return 5

    q = rig.queue()
    q.call_fd = call_fd
    bufs = offer(rig, [2], wsizes=(4, 8))
    (ch,) = q.pop_chains()
    rig.put(bufs[2][0] + 2, b"PQ")
    rig.put(bufs[2][1], b"RST")
    assert ch.reply([b"hh", InPlace(), b"!"]) == 8
    assert rig.get(bufs[2][0], 4) + rig.get(bufs[2][1], 4) == b"hhPQRST!"
    assert rig.guest.collect_used() == [(2, 8)] and calls(call_fd) == 1  # no batch open: at once


def test_completion_from_another_thread_is_published_at_once(rig, call_fd):
    import threading

    q = rig.queue()
    q.call_fd = call_fd
    offer(rig, [0, 4])
    q.begin_batch()
    a, b = q.pop_chains()
    t = threading.Thread(target=b.reply, args=([b"pool"],))
    t.start()
    t.join()
    assert rig.guest.collect_used() == [(4, 4)] and calls(call_fd) == 1
    a.complete(0)  # FORGET-like: no bytes
    q.end_batch()
    assert rig.guest.collect_used() == [(0, 0)] and calls(call_fd) == 1


def test_no_interrupt_suppresses_the_call(rig, call_fd):
    q = rig.queue()
    q.call_fd = call_fd
    offer(rig, [0])
    (ch,) = q.pop_chains()
    rig.mem.view(rig.avail, 2)[0] = 1  # VRING_AVAIL_F_NO_INTERRUPT
    ch.reply([b"r"])
    assert rig.guest.collect_used() == [(0, 1)] and calls(call_fd) == 0
    assert q.counters["calls_suppressed"] == 1


def test_event_idx_calls_only_past_used_event_and_asks_for_kicks(rig, call_fd):
    q = rig.queue()
    q.event_idx = True
    q.call_fd = call_fd
    offer(rig, [0, 4, 8])
    chains = q.pop_chains()
    lay = virtio.split_ring_layout(rig.num)
    avail_event = int.from_bytes(rig.mem.view(rig.used + lay.used_size - 2, 2), "little")
    assert avail_event == 0  # written before the avail load: a kick for the first entry after index 0
    assert q.pop_chains() == []
    assert int.from_bytes(rig.mem.view(rig.used + lay.used_size - 2, 2), "little") == 3
    rig.guest.set_used_event(1)  # the driver wants a call once used->idx passes 1
    chains[0].complete()  # the first publication always calls (libvhost-user)
    assert calls(call_fd) == 1
    chains[1].complete()  # used->idx 2: passed 1, call
    assert calls(call_fd) == 1
    chains[2].complete()  # used->idx 3: used_event still 1, and it was told about 2 already
    assert calls(call_fd) == 0 and q.counters["calls_suppressed"] == 1
    assert rig.guest.collect_used() == [(0, 0), (4, 0), (8, 0)]


def test_a_swapped_call_fd_is_never_written_after_the_swap(rig, call_fd):
    q = rig.queue()
    q.call_fd = call_fd
    offer(rig, [0, 4])
    a, b = q.pop_chains()
    a.complete()
    assert calls(call_fd) == 1
    q.call_fd = -1
    b.complete()
    assert calls(call_fd) == 0 and q.counters["calls"] == 1


def test_handover_and_detach(rig, call_fd):
    """A ring re-made while chains are in flight (SET_MEM_TABLE) completes them on the new queue; a torn
    down ring (GET_VRING_BASE) drops late completions and counts them."""
    old = rig.queue()
    offer(rig, [0, 4, 8])
    a, b, c = old.pop_chains()
    new = rig.queue()
    new.last_avail_idx, new.used_idx = old.last_avail_idx, old.used_idx
    new.call_fd = call_fd
    old.handover(new)
    assert (old.inflight, new.inflight) == (0, 3)
    with pytest.raises(ValueError):
        old.handover(new)
    with pytest.raises((TypeError, ValueError)):
        new.handover(old)  # a loop
    a.reply([b"1"])
    assert rig.guest.collect_used() == [(0, 1)] and calls(call_fd) == 1 and new.inflight == 2
    assert new.used_idx == 1
    new.detach()
    b.reply([b"2"])
    c.complete()
    assert rig.guest.collect_used() == [] and calls(call_fd) == 0
    assert new.counters["late"] == 2 and new.inflight == 0
    new.call_fd = call_fd  # a detached queue never calls again
    assert new.call_fd == -1


def test_a_head_offered_twice_in_one_batch_never_overflows(rig, call_fd):
    """A hostile driver puts the same head in the avail ring again and again: the batch flushes itself."""
    q = rig.queue()
    q.call_fd = call_fd
    offer(rig, [0])
    q.begin_batch()
    for _ in range(rig.num + 4):
        (ch,) = q.pop_chains()
        ch.complete(1)
        rig.guest.publish([0])
    (ch,) = q.pop_chains()
    ch.complete(1)
    q.end_batch()
    assert rig.guest.collect_used() == [(0, 1)] * (rig.num + 5)


def test_complete_a_malformed_head_and_range_checks(rig, call_fd):
    q = rig.queue()
    q.call_fd = call_fd
    q.complete(3, 0)
    assert rig.guest.collect_used() == [(3, 0)]
    with pytest.raises(Exception, match="head_range"):
        q.complete(rig.num, 0)
