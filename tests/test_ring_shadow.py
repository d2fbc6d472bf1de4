"""The shadow-ring data path (proxy) on both engines: real eventfds, real threads, memfd guest memory."""

from __future__ import annotations

import contextlib
import gc
import os
import select
import time

import pytest

from dissectors.ring import driver
from tests.ringkit import GUEST_GPA, PROXY_GPA, Rig
from tests.test_ring_engine import ENGINES

F_NEXT, F_WRITE, F_INDIRECT = driver.F_NEXT, driver.F_WRITE, driver.F_INDIRECT


@pytest.fixture(params=sorted(ENGINES))
def eng(request):
    e = ENGINES[request.param]
    if isinstance(e, Exception):
        pytest.fail(f"the C ring engine did not build/import: {e}")
    return e


def efd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def wait_fd(fd: int, timeout: float = 5.0) -> bool:
    """Wait for an eventfd and consume it."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    if not p.poll(timeout * 1000):
        return False
    os.eventfd_read(fd)
    return True


class Proxy:
    """A rig with the four eventfds, a capture buffer, a ShadowPath and the backend's SplitQueue."""

    def __init__(self, eng, num: int = 8, capacity: int = 1 << 20, policy: str = "drop", snaplen: int = 0,
                 avail_base: int = 0, used_start: int | None = None, spin_us: int = 0, event_idx: bool = False,
                 queue: int = 1):
        self.rig = Rig(eng, num=num)
        if used_start is not None:  # a guest whose used ring already moved (proxy started mid-life)
            self.rig.mem.view(self.rig.used, 4)[2:4] = used_start.to_bytes(2, "little")
            self.rig.guest = self.rig.guest_ring(self.rig.avail, self.rig.used)
        self.g_kick, self.g_call, self.b_kick, self.b_call = efd(), efd(), efd(), efd()
        self.cap = eng.CaptureBuffer(capacity, policy)
        r = self.rig
        self.path = eng.ShadowPath(r.mem, queue, num, r.desc, r.avail, r.used, r.s_avail, r.s_used, self.cap,
                                   kick_fd=self.g_kick, call_fd=self.g_call, backend_kick_fd=self.b_kick,
                                   backend_call_fd=self.b_call, avail_base=avail_base, snaplen=snaplen,
                                   spin_us=spin_us, event_idx=event_idx)
        self.dev = r.queue(shadow=True)
        self.dev.last_avail_idx = avail_base
        if used_start is not None:
            self.dev.used_idx = used_start

    def request(self, head: int, readable: list[bytes], writable: list[int]) -> list[tuple[int, int]]:
        """Lay out one request the way Linux virtio-fs does: a single INDIRECT descriptor.  Returns the
        writable buffers (gpa, len)."""
        wbufs = [self.rig.buf(n) for n in writable]
        segs = [(*self.rig.buf(b), False) for b in readable] + [(*w, True) for w in wbufs]
        table = driver.pack_descs(driver.chain_descs(segs))
        t = self.rig.buf(table)
        self.rig.guest.set_desc(head, t[0], len(table), F_INDIRECT)
        return wbufs

    def close(self):
        self.path.stop()
        for fd in (self.g_kick, self.g_call, self.b_kick, self.b_call):
            os.close(fd)
        self.rig.close()


@pytest.fixture
def px(eng):
    p = Proxy(eng)
    yield p
    p.close()


def test_step_request_and_reply_are_captured_and_forwarded(px):
    px.request(0, [b"H" * 40, b"args"], [16, 32])
    px.request(5, [b"F" * 40], [])  # FORGET-like: no writable part, used.len = 0
    px.rig.guest.publish([5, 0])
    assert px.dev.avail_pending() == 0  # the backend sees nothing before the proxy forwards
    assert px.path.step() == (2, 0)
    assert wait_fd(px.b_kick, 0)
    caps = px.cap.read_captures()
    assert [(c.kind, c.queue, c.head, c.length, c.data) for c in caps] == [
        ("request", 1, 5, 40, b"F" * 40), ("request", 1, 0, 44, b"H" * 40 + b"args")]
    assert len(caps[1].layout) == 5 and caps[1].layout[0][2] == F_INDIRECT
    assert caps[0].ts_ns <= caps[1].ts_ns and abs(caps[0].ts_ns - time.time_ns()) < 10**9
    chains = px.dev.pop_chains()
    assert [c.head for c in chains] == [5, 0]
    assert chains[1].write(b"o" * 16 + b"p" * 32) == 48
    px.dev.push_used([(0, 20), (5, 0)])
    assert px.rig.guest.used_pending() == 0  # not visible to the guest before the proxy copies it
    assert px.path.step() == (0, 2)
    assert wait_fd(px.g_call, 0)
    assert px.rig.guest.collect_used() == [(0, 20), (5, 0)]
    caps = px.cap.read_captures()
    assert [(c.kind, c.head, c.length, c.data, c.truncated) for c in caps] == [
        ("reply", 0, 20, b"o" * 16 + b"pppp", False), ("reply", 5, 0, b"", False)]
    k = px.path.counters
    assert (k["requests"], k["replies"], k["errors"], k["unpaired"]) == (2, 2, 0, 0)
    assert px.cap.stats["captured"] == 4 and px.cap.stats["dropped"] == 0


def test_thread_forwards_on_eventfds_and_fd_swaps(px):
    px.path.start()
    assert px.path.running
    for rnd in range(3):
        if rnd == 1:  # QEMU swaps the call fd on MSI-X mask/unmask; the caller may close its copy at once
            new_call = efd()
            px.path.set_call_fd(new_call)
            os.close(px.g_call)
            px.g_call = new_call
        if rnd == 2:
            new_kick = efd()
            px.path.set_kick_fd(new_kick)
            os.close(px.g_kick)
            px.g_kick = new_kick
        px.request(rnd, [b"req%d" % rnd], [8])
        px.rig.guest.publish([rnd])
        os.eventfd_write(px.g_kick, 1)
        assert wait_fd(px.b_kick), "backend never kicked"
        (c,) = px.dev.pop_chains()
        c.write(b"rep%d" % rnd)
        px.dev.push_used([(c.head, 4)])
        os.eventfd_write(px.b_call, 1)
        assert wait_fd(px.g_call), "guest never called"
        assert px.rig.guest.collect_used() == [(rnd, 4)]
    caps = px.cap.read_captures(timeout=1.0)
    assert [(c.kind, c.head, c.data) for c in caps] == [
        (k, i, (b"req%d" if k == "request" else b"rep%d") % i) for i in range(3) for k in ("request", "reply")]
    px.path.stop()
    assert not px.path.running
    k = px.path.counters
    # kicks and calls coalesce (one may be seen together with a ctl wake-up), forwarding never does
    assert k["kicks_in"] >= 1 and k["calls_in"] >= 1 and k["calls_out"] == 3 and k["kicks_out"] == 3
    assert 0 < k["busy_max_ns"] <= k["busy_ns"] < 10**9  # wake-up to done forwarding: short here


def test_call_fd_none_while_running(px):
    """SET_VRING_CALL with the NOFD bit: no call fd; used entries still reach the guest's ring."""
    px.path.start()
    px.path.set_call_fd(-1)
    px.request(0, [b"q"], [1])
    px.rig.guest.publish([0])
    os.eventfd_write(px.g_kick, 1)
    assert wait_fd(px.b_kick)
    px.dev.push_used([(px.dev.pop_chains()[0].head, 1)])
    os.eventfd_write(px.b_call, 1)
    deadline = time.monotonic() + 5
    while not px.rig.guest.used_pending():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert px.rig.guest.collect_used() == [(0, 1)]
    assert not wait_fd(px.g_call, 0.05)  # the old fd is no longer signalled


def test_malformed_request_is_flagged_forwarded_and_path_survives(px):
    px.path.start()
    px.rig.guest.set_desc(2, 0xFFFF_FFFF_FFFF_0000, 4096, 0)  # far outside every region
    px.request(3, [b"fine"], [4])
    px.rig.guest.publish([2, 3])
    os.eventfd_write(px.g_kick, 1)
    assert wait_fd(px.b_kick)
    caps = px.cap.read_captures(timeout=1.0)
    assert [(c.kind, c.head, c.reason) for c in caps] == [("error", 2, "no_region"), ("request", 3, None)]
    assert caps[0].layout == ((0xFFFF_FFFF_FFFF_0000, 4096, 0),)
    assert px.path.counters["errors"] == 1 and px.path.last_error == "no_region"
    # forwarded unchanged: the backend decides what a bad chain means
    with pytest.raises(Exception) as ei:
        px.dev.pop_chains()
    assert getattr(ei.value, "reason", None) == "no_region"
    assert [c.head for c in ei.value.chains] == []
    assert [c.head for c in px.dev.pop_chains()] == [3]


def test_avail_index_far_ahead_is_counted_not_forwarded(px):
    px.rig.guest.set_avail_idx(px.rig.num + 5)
    assert px.path.step() == (0, 0)
    assert px.path.last_error == "avail_ahead" and px.path.counters["errors"] == 1
    assert px.path.step() == (0, 0)
    assert px.path.counters["errors"] == 1  # counted once per episode
    assert px.dev.avail_pending() == 0
    px.rig.guest.set_avail_idx(0)
    px.request(0, [b"x"], [])
    px.rig.guest.publish([0])
    assert px.path.step() == (1, 0)


def test_used_entry_never_forwarded_is_unpaired(px):
    px.dev.push_used([(4, 9)])
    assert px.path.step() == (0, 1)
    (c,) = px.cap.read_captures()
    assert (c.kind, c.head, c.reason, c.length) == ("error", 4, "not_in_flight", 9)
    assert px.path.counters["unpaired"] == 1
    assert px.rig.guest.collect_used() == [(4, 9)]  # still published: the proxy stays transparent


def test_stop_then_drain_flushes_used_entries(px):
    """GET_VRING_BASE: stop the path, then move every pending used entry to the guest before replying."""
    px.path.start()
    for h in (0, 1):
        px.request(h, [b"r"], [4])
    px.rig.guest.publish([0, 1])
    os.eventfd_write(px.g_kick, 1)
    assert wait_fd(px.b_kick)
    chains = px.dev.pop_chains()
    px.path.stop()
    px.dev.push_used([(c.head, 4) for c in chains])
    os.eventfd_write(px.b_call, 1)
    time.sleep(0.05)
    assert px.rig.guest.used_pending() == 0  # stopped: nothing moves by itself
    assert px.path.drain() == 2
    assert wait_fd(px.g_call, 0)
    assert px.rig.guest.collect_used() == [(0, 4), (1, 4)]
    assert px.path.drain() == 0
    assert [c.kind for c in px.cap.read_captures()] == ["request", "request", "reply", "reply"]


def test_snaplen_truncates_capture_not_traffic(eng):
    p = Proxy(eng, snaplen=10)
    try:
        p.request(0, [b"A" * 64], [64])
        p.rig.guest.publish([0])
        p.path.step()
        (c,) = p.dev.pop_chains()
        assert c.readable == b"A" * 64
        c.write(b"B" * 64)
        p.dev.push_used([(0, 64)])
        p.path.step()
        caps = p.cap.read_captures()
        assert [(x.data, x.length, x.truncated) for x in caps] == [(b"A" * 10, 64, True), (b"B" * 10, 64, True)]
    finally:
        p.close()


def test_proxy_started_mid_life_initialises_shadow_indices(eng):
    p = Proxy(eng, avail_base=700, used_start=700)
    try:
        assert p.path.indices == {"next_avail": 700, "shadow_avail_idx": 700, "next_used": 700,
                                  "guest_used_idx": 700}
        p.rig.guest.set_avail_idx(700)
        p.request(1, [b"q"], [1])
        p.rig.guest.publish([1])
        assert p.path.step() == (1, 0)
        (c,) = p.dev.pop_chains()
        p.dev.push_used([(c.head, 1)])
        assert p.path.step() == (0, 1)
        assert p.rig.guest.collect_used() == [(1, 1)]
    finally:
        p.close()


def _run_many(p: Proxy, n: int, payload: int, reader=None) -> None:
    """Push n requests through a running path, with a device that answers each."""
    p.path.start()
    for i in range(n):
        head = i % p.rig.num
        p.request(head, [bytes([i % 256]) * payload], [8])
        p.rig.guest.publish([head])
        os.eventfd_write(p.g_kick, 1)
        t0 = time.monotonic()
        deadline = t0 + 10
        while not p.dev.avail_pending():
            if reader and time.monotonic() - t0 > 0.02:  # read only once the path is visibly held back
                reader()
            assert time.monotonic() < deadline, "request never forwarded"
            time.sleep(0.001)
        (c,) = p.dev.pop_chains()
        p.dev.push_used([(c.head, 8)])
        os.eventfd_write(p.b_call, 1)
        t0 = time.monotonic()
        while not p.rig.guest.used_pending():
            if reader and time.monotonic() - t0 > 0.02:
                reader()
            assert time.monotonic() < deadline, "reply never forwarded"
            time.sleep(0.001)
        assert p.rig.guest.collect_used() == [(head, 8)]
        p.rig.next_buf = 0x100000 + (i % 2) * 0x10000  # reuse guest buffers


def test_drop_policy_never_blocks_and_counts(eng):
    p = Proxy(eng, capacity=4096, policy="drop")
    try:
        _run_many(p, 12, 1500)  # 12 requests of 1.5 KiB + replies into a 4 KiB buffer, nobody reading
        st, k = p.cap.stats, p.path.counters
        assert k["requests"] == k["replies"] == 12
        assert st["dropped"] > 0 and st["captured"] + st["dropped"] == 24
        assert k["dropped"] == st["dropped"] and st["stalls"] == 0
    finally:
        p.close()


def test_lossless_policy_holds_back_until_drained(eng):
    p = Proxy(eng, capacity=4096, policy="lossless")
    got = []

    def slow_reader():
        got.extend(p.cap.read_captures(max=1))
    try:
        _run_many(p, 12, 1500, reader=slow_reader)
        while len(got) < 24:
            more = p.cap.read_captures(timeout=1.0)
            assert more, "captures missing"
            got.extend(more)
        st = p.cap.stats
        assert st["dropped"] == 0 and st["stalls"] > 0 and p.path.counters["stalls"] > 0
        assert [(c.kind, c.data[:1]) for c in got] == [
            (k, bytes([i]) if k == "request" else b"\0") for i in range(12) for k in ("request", "reply")]
    finally:
        p.close()


def test_capture_eventfd_wakes_a_selector(px):
    px.path.start()
    sel = select.poll()
    sel.register(px.cap.fileno(), select.POLLIN)
    assert sel.poll(0) == []
    px.request(0, [b"x"], [])
    px.rig.guest.publish([0])
    os.eventfd_write(px.g_kick, 1)
    assert sel.poll(5000)
    assert [c.kind for c in px.cap.read_captures()] == ["request"]
    assert px.cap.read_captures() == []


def test_memory_map_locked_while_path_runs(px):
    px.path.start()
    with pytest.raises(RuntimeError):
        px.rig.mem.remove_region(0)
    px.path.stop()
    px.rig.mem.add_region(1 << 30, 4096, bytearray(4096))


def _eventfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    return n


def test_close_gives_back_the_fds_and_the_mappings_while_the_objects_live(eng):
    """A session's end (the proxy's shutdown): close() gives back the path's thread, its four fd dups and
    its wake-up eventfd, its hold on the rings' mappings, and the capture buffer's eventfd, at once.
    Before, only the objects' deallocation did: a Proxy kept for its counters held 5 eventfds per queue,
    one more, and the guest's memory (the vhost-user front campaign's fd check failed on them)."""
    gc.collect()  # an earlier test's objects going now would make the counts below lie
    base = _eventfds()
    px = Proxy(eng)
    try:
        assert _eventfds() == base + 4 + 5 + 1  # ours, the path's (4 dups + its own), the capture buffer's
        px.path.start()
        px.request(0, [b"req"], [8])
        px.rig.guest.publish([0])
        os.eventfd_write(px.g_kick, 1)
        assert wait_fd(px.b_kick)
        px.path.close()
        px.path.close()  # idempotent
        px.cap.close()
        px.cap.close()
        assert _eventfds() == base + 4
        assert px.cap.fileno() == -1
        assert [c.kind for c in px.cap.read_captures(timeout=5)] == ["request"]  # buffered ones stay readable
        assert px.cap.read_captures(timeout=5) == []  # and nothing waits on a closed buffer
        assert px.path.counters["requests"] == 1 and px.path.indices["next_avail"] == 1
        assert px.path.held() == [] and not px.path.running
        for call in (px.path.start, px.path.step, px.path.drain, lambda: px.path.set_kick_fd(px.g_kick),
                     lambda: px.path.set_call_fd(px.g_call)):
            with pytest.raises(RuntimeError, match="closed"):
                call()
        with pytest.raises(eng.RingError, match="not_held"):
            px.path.release(0)
        px.path.set_hold_rules([])  # no thread to wake, and no fd written
        px.path.stop()
        # The rings' mappings are free to go: nothing but the map (and our own views) holds them now.
        px.dev = px.rig.guest = None
        px.rig.mem.remove_region(GUEST_GPA)
        px.rig.mem.remove_region(PROXY_GPA)
        px.rig.gmem.close()
        px.rig.pmem.close()
    finally:
        for fd in (px.g_kick, px.g_call, px.b_kick, px.b_call):
            os.close(fd)
        px.rig.close()
    assert _eventfds() == base


def test_spin_mode_forwards_without_waiting_for_eventfds(eng):
    """spin_us: the C path busy-polls the rings after activity (the twin accepts it and sleeps)."""
    p = Proxy(eng, spin_us=200_000)
    try:
        p.path.start()
        for i in range(4):
            p.request(i, [b"s%d" % i], [2])
            p.rig.guest.publish([i])
            if i == 0 or eng.__name__.endswith("_native"):
                os.eventfd_write(p.g_kick, 1)  # later kicks are not needed while the path spins
            assert wait_fd(p.b_kick)
            (c,) = p.dev.pop_chains()
            p.dev.push_used([(c.head, 2)])
            os.eventfd_write(p.b_call, 1)
            assert wait_fd(p.g_call)
            assert p.rig.guest.collect_used() == [(i, 2)]
        k = p.path.counters
        assert k["requests"] == k["replies"] == 4
        if not eng.__name__.endswith("_native"):
            assert k["spin_hits"] >= 3
    finally:
        p.close()


def test_fd_swaps_do_not_wait_for_a_lossless_stall(eng):
    """The thread handling SET_VRING_CALL/KICK may be the capture consumer: swaps must not block on a
    path that is holding back forwarding until captures are drained."""
    import threading

    p = Proxy(eng, capacity=4096, policy="lossless")
    try:
        p.path.start()
        for h in range(4):
            p.request(h, [bytes([h]) * 1500], [])
        p.rig.guest.publish([0, 1, 2, 3])
        os.eventfd_write(p.g_kick, 1)
        deadline = time.monotonic() + 5
        while p.path.counters["stalls"] == 0:  # the path is now waiting for the consumer
            assert time.monotonic() < deadline, "never stalled"
            time.sleep(0.001)
        time.sleep(0.2)  # the stall lasts at least this long: it must show as the longest forwarding time
        new_call, new_kick = efd(), efd()
        t = threading.Thread(target=lambda: (p.path.set_call_fd(new_call), p.path.set_kick_fd(new_kick)))
        t.start()
        t.join(3)
        assert not t.is_alive(), "fd swap blocked behind the lossless stall"
        got = []
        while len(got) < 4:
            more = p.cap.read_captures(timeout=2)
            assert more
            got += more
        assert [c.head for c in got] == [0, 1, 2, 3]
        assert len(p.dev.pop_chains()) == 4
        while p.path.counters["busy_max_ns"] < 200_000_000:  # updated just after the forwarding ends
            assert time.monotonic() < deadline + 5, p.path.counters
            time.sleep(0.001)
        os.close(new_call)
        os.close(new_kick)
    finally:
        p.close()


def test_differential_shadow_path_c_equals_twin():
    """Random (often hostile) guest rings and backend used entries, stepped through both engines' paths:
    the same captures (bar timestamps), counters, shadow avail entries and guest used entries."""
    import random

    from tests.test_ring_engine import _random_ring

    c, py = ENGINES["c"], ENGINES["python"]
    assert not isinstance(c, Exception), c
    kinds = set()
    suppressed = {"kicks": 0, "calls": 0}
    for seed in range(300):
        results = []
        for eng in (c, py):
            ev = seed % 2 == 1  # EVENT_IDX on every other seed, with random event indices on both sides
            p = Proxy(eng, capacity=1 << 16, snaplen=random.Random(seed).choice([0, 0, 64]), event_idx=ev)
            try:
                rnd = random.Random(seed)
                r = p.rig
                r.gmem[0x100000:0x110000] = bytes(rnd.randrange(256) for _ in range(64)) * 1024
                _random_ring(rnd, r.gmem, r.num, r.desc, r.avail)
                r.mem.view(r.avail + 4 + 2 * r.num, 2)[:] = rnd.randrange(1 << 16).to_bytes(2, "little")
                r.mem.view(r.s_used + 4 + 8 * r.num, 2)[:] = rnd.randrange(1 << 16).to_bytes(2, "little")
                a = p.path.step()
                used = r.mem.view(r.s_used, 4 + 8 * r.num + 2)
                n = rnd.randrange(0, r.num + 2)
                for i in range(r.num):
                    hid = rnd.randrange(0, r.num) if rnd.random() < 0.9 else rnd.randrange(0, 1 << 32)
                    used[4 + 8 * i:12 + 8 * i] = hid.to_bytes(4, "little") + rnd.randrange(0, 1 << 32).to_bytes(4, "little")
                used[2:4] = n.to_bytes(2, "little")
                u = p.path.step()
                n2 = rnd.randrange(0, r.num + 1)  # a second batch: the first call is always sent
                for i in range(n, n + n2):
                    hid = rnd.randrange(0, r.num)
                    used[4 + 8 * (i % r.num):12 + 8 * (i % r.num)] = hid.to_bytes(4, "little") + bytes(4)
                used[2:4] = ((n + n2) & 0xFFFF).to_bytes(2, "little")
                u = (u, p.path.step())
                caps = [x._replace(ts_ns=0) for x in p.cap.read_captures(0)]
                k = p.path.counters
                ctr = {key: k[key] for key in ("requests", "replies", "errors", "unpaired", "dropped", "kicks_out",
                                               "calls_out", "kicks_suppressed", "calls_suppressed")}
                savail = bytes(r.mem.view(r.s_avail, 4 + 2 * r.num + 2))  # with used_event
                gused = bytes(r.mem.view(r.used, 4 + 8 * r.num + 2))  # with avail_event
                results.append((a, u, caps, ctr, p.path.last_error, p.path.indices, savail, gused))
            finally:
                p.close()
        assert results[0] == results[1], seed
        suppressed["kicks"] += results[0][3]["kicks_suppressed"]
        suppressed["calls"] += results[0][3]["calls_suppressed"]
        kinds |= {x.kind for x in results[0][2]} | {x.reason for x in results[0][2]}
    assert {"request", "reply", "error", "no_region", "not_in_flight"} <= kinds, kinds
    assert suppressed["kicks"] and suppressed["calls"], suppressed  # the EVENT_IDX seeds did suppress
