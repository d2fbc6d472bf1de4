"""VIRTIO_RING_F_EVENT_IDX on the shadow path, both engines: the path publishes avail_event (guest) and
used_event (backend) asking for every new entry, and honours the guest's used_event and the backend's
avail_event when deciding to call or kick (virtio 1.2, 2.7.7 and 2.7.10)."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from tests.test_ring_shadow import Proxy, eng, wait_fd  # noqa: F401  (eng is a fixture)

NUM = 8


def u16(p: Proxy, gpa: int) -> int:  # guest or proxy-region memory
    return int(struct.unpack("<H", p.rig.mem.view(gpa, 2))[0])


def put16(p: Proxy, gpa: int, v: int) -> None:
    p.rig.mem.view(gpa, 2)[:] = struct.pack("<H", v & 0xFFFF)


def guest_used_event(p: Proxy) -> int:  # written by the guest, after its avail ring
    return p.rig.avail + 4 + 2 * NUM


def guest_avail_event(p: Proxy) -> int:  # written by the path, after the guest's used ring
    return p.rig.used + 4 + 8 * NUM


def shadow_used_event(p: Proxy) -> int:  # written by the path, after the shadow avail ring
    return p.rig.s_avail + 4 + 2 * NUM


def shadow_avail_event(p: Proxy) -> int:  # written by the backend, after the shadow used ring
    return p.rig.s_used + 4 + 8 * NUM


@pytest.fixture
def ev(eng):  # noqa: F811
    p = Proxy(eng, num=NUM, event_idx=True)
    yield p
    p.close()


def one_request(p: Proxy, head: int) -> None:
    p.request(head, [b"H" * 40], [16])
    p.rig.guest.publish([head])


def test_events_ask_for_every_new_entry(ev):
    assert u16(ev, guest_avail_event(ev)) == 0 and u16(ev, shadow_used_event(ev)) == 0
    for h in (0, 1):
        one_request(ev, h)
    assert ev.path.step() == (2, 0)
    assert u16(ev, guest_avail_event(ev)) == 2  # kick me when you publish entry 2
    for c in ev.dev.pop_chains():
        ev.dev.push_used([(c.head, 16)])
    assert ev.path.step() == (0, 2)
    assert u16(ev, shadow_used_event(ev)) == 2  # call me when you use entry 2
    assert ev.rig.guest.collect_used() == [(0, 16), (1, 16)]


def test_guest_used_event_suppresses_calls(ev):
    put16(ev, guest_used_event(ev), 5)  # the guest wants no interrupt before its used idx passes 5
    for h in range(4):
        one_request(ev, h)
        assert ev.path.step() == (1, 0)
        (c,) = ev.dev.pop_chains()
        ev.dev.push_used([(c.head, 16)])
        assert ev.path.step() == (0, 1)
        called = wait_fd(ev.g_call, 0)
        assert called == (h == 0)  # the first call is always sent; then used idx 2, 3, 4 are not past 5
    k = ev.path.counters
    assert k["calls_out"] == 1 and k["calls_suppressed"] == 3
    assert [h for h, _ in ev.rig.guest.collect_used()] == [0, 1, 2, 3]  # entries are published regardless
    put16(ev, guest_used_event(ev), 4)  # now: interrupt me for the entry after index 4
    one_request(ev, 4)
    ev.path.step()
    (c,) = ev.dev.pop_chains()
    ev.dev.push_used([(c.head, 16)])
    ev.path.step()
    assert wait_fd(ev.g_call, 0) and ev.path.counters["calls_out"] == 2


def test_backend_avail_event_suppresses_kicks(ev):
    one_request(ev, 0)
    ev.path.step()
    assert wait_fd(ev.b_kick, 0)  # the backend's avail_event is 0: entry 0 crosses it
    one_request(ev, 1)
    ev.path.step()
    assert not wait_fd(ev.b_kick, 0)  # the backend has not caught up (avail_event still 0): no kick
    assert ev.path.counters["kicks_suppressed"] == 1
    assert len(ev.dev.pop_chains()) == 2  # it finds both when it looks
    put16(ev, shadow_avail_event(ev), 2)  # the backend waits for entry 2
    one_request(ev, 2)
    ev.path.step()
    assert wait_fd(ev.b_kick, 0) and ev.path.counters["kicks_out"] == 2


def test_without_event_idx_every_batch_notifies(eng):  # noqa: F811
    p = Proxy(eng, num=NUM)
    try:
        put16(p, guest_used_event(p), 5)  # ignored without the feature
        for h in range(3):
            one_request(p, h)
            p.path.step()
            assert wait_fd(p.b_kick, 0)
            (c,) = p.dev.pop_chains()
            p.dev.push_used([(c.head, 16)])
            p.path.step()
            assert wait_fd(p.g_call, 0)
        assert u16(p, guest_avail_event(p)) == 0  # nothing published either
        k = p.path.counters
        assert k["kicks_suppressed"] == k["calls_suppressed"] == 0
    finally:
        p.close()


def test_threads_lose_no_notification(ev):
    """A driver and a device that both use EVENT_IDX as Linux and libvhost-user do, through the running
    path: every round trip completes (a lost notification would hang it)."""
    n, stop = 3000, threading.Event()
    rig, dev = ev.rig, ev.dev
    for h in range(NUM):
        ev.request(h, [b"H" * 40], [16])

    def device() -> None:
        while not stop.is_set():
            if not wait_fd(ev.b_kick, 0.1):
                continue
            while True:
                chains = dev.pop_chains()
                if chains:
                    dev.push_used([(c.head, 16) for c in chains])
                    os.eventfd_write(ev.b_call, 1)
                # libvhost-user: avail_event = the next index it will pop, then look once more
                put16(ev, shadow_avail_event(ev), dev.last_avail_idx)
                if not dev.avail_pending():
                    break

    t = threading.Thread(target=device, daemon=True)
    ev.path.start()
    t.start()
    try:
        done = 0
        deadline = time.monotonic() + 60
        for i in range(n):
            rig.guest.publish([i % NUM])
            os.eventfd_write(ev.g_kick, 1)
            while True:  # Linux: used_event = what it has seen, then check before sleeping
                got = rig.guest.collect_used()
                if got:
                    done += len(got)
                    break
                put16(ev, guest_used_event(ev), rig.guest.last_used)
                if rig.guest.used_pending():
                    continue
                assert wait_fd(ev.g_call, 2), f"round trip {i} lost a notification: {ev.path.counters}"
                assert time.monotonic() < deadline
        assert done == n
        k = ev.path.counters
        assert k["requests"] == k["replies"] == n and k["errors"] == 0
    finally:
        stop.set()
        t.join(5)
