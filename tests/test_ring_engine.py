"""The split-ring reader/writer on both engines (C and the pure-Python twin), same tests for each."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import random
import struct
import weakref

import pytest

from dissectors.ring import _common, driver
from dissectors.spec import fuse as fuse_spec
from dissectors.spec import virtio
from tests.ringkit import GUEST_SIZE, PROXY_GPA, PROXY_UVA, Rig, engines, memfd_map

F_NEXT, F_WRITE, F_INDIRECT = driver.F_NEXT, driver.F_WRITE, driver.F_INDIRECT
ENGINES = engines()


@pytest.fixture(params=sorted(ENGINES))
def eng(request):
    e = ENGINES[request.param]
    if isinstance(e, Exception):
        pytest.fail(f"the C ring engine did not build/import: {e}")
    return e


@pytest.fixture
def rig(eng):
    r = Rig(eng)
    yield r
    r.close()
    del r
    # A test that caught a RingError (pytest.raises) left a cycle: its frame holds the exception, whose
    # traceback holds the frame and so the rig, whose mmaps keep the guest memfds open.  Collected here,
    # not during a later test that counts its own fds (test_daemon_vhost_user_protocol's leak checks).
    gc.collect()


def test_c_layout_matches_spec_tables():
    """The C core's own struct definitions and constants agree with dissectors/spec/virtio.py."""
    c = ENGINES["c"]
    assert not isinstance(c, Exception), c
    lay = c.CORE_LAYOUT
    reg = virtio.REGISTRY
    for sname in ("vring_desc", "vring_used_elem"):
        assert lay[sname]["size"] == reg.sizeof(sname)
        for fname, off, _size in reg.offsets(sname):
            assert lay[sname][fname] == off, (sname, fname)
    flags = virtio.VRING_DESC_F.by_name()
    assert lay["VRING_DESC_F"] == {"NEXT": flags["NEXT"], "WRITE": flags["WRITE"], "INDIRECT": flags["INDIRECT"]}
    ring = virtio.split_ring_layout(256)
    assert lay["avail_ring_off"] == ring.avail_ring_off
    assert lay["used_ring_off"] == ring.used_ring_off
    assert lay["max_queue_size"] == virtio.MAX_QUEUE_SIZE
    assert lay["cap_hdr_size"] == _common.CAP_HDR_SIZE
    assert lay["cap_layout_size"] == _common.CAP_LAYOUT_SIZE
    assert lay["layout_f_from_indirect"] == _common.LAYOUT_F_FROM_INDIRECT
    assert lay["max_regions"] == _common.MAX_REGIONS
    assert lay["max_gather"] == _common.MAX_GATHER
    # the hold points read fuse_in_header and write fuse_out_header
    fin = {n: o for n, o, _ in fuse_spec.REGISTRY.offsets("fuse_in_header")}
    assert lay["fuse_in_header"] == {"size": fuse_spec.REGISTRY.sizeof("fuse_in_header"), "opcode": fin["opcode"],
                                     "unique": fin["unique"]}
    assert lay["fuse_out_header"] == {"size": fuse_spec.REGISTRY.sizeof("fuse_out_header")}
    assert lay["eio"] == errno.EIO
    assert c.REASONS == _common.REASONS
    assert ENGINES["python"].CORE_LAYOUT == lay


def test_direct_chain_pop_gather_write_push(rig):
    hdr, payload = bytes(range(40)), bytes(random.Random(1).randrange(256) for _ in range(4096))
    a, b, w = rig.buf(hdr), rig.buf(payload), rig.buf(64)
    rig.guest.set_descs(3, driver.chain_descs([(*a, False), (*b, False), (*w, True)], first=3))
    rig.guest.publish([3])
    q = rig.queue()
    assert q.avail_pending() == 1
    (ch,) = q.pop_chains()
    assert ch.head == 3
    assert ch.readable == hdr + payload and ch.readable_len == 4136
    assert ch.writable_len == 64 and [len(m) for m in ch.writable] == [64]
    assert ch.layout == ((a[0], 40, F_NEXT), (b[0], 4096, F_NEXT), (w[0], 64, F_WRITE))
    ch.writable[0][:5] = b"reply"
    assert ch.write(b"R" * 100) == 64
    assert rig.get(w[0], 64) == b"R" * 64
    q.push_used([(ch.head, 16)])
    assert rig.guest.collect_used() == [(3, 16)]
    ch.writable[0].release()
    with pytest.raises(ValueError):
        ch.write(b"after release")  # never written through a released view
    assert q.used_idx == 1 and q.last_avail_idx == 1
    assert q.pop_chains() == []


def _pop_head0(rig, q, segs):
    """Publish head 0 as a chain of `segs` ((gpa, len, writable), ...), pop it and give it back as used."""
    rig.guest.set_descs(0, driver.chain_descs(list(segs), first=0))
    rig.guest.publish([0])
    (ch,) = q.pop_chains()
    q.push_used([(ch.head, 0)])
    rig.guest.collect_used()
    return ch


def test_readable_bytes_never_change_under_a_holder(rig):
    """The C engine recycles a dropped chain's readable bytes for the next chain of the same size: a
    recycled object must carry the new bytes and hash, and one still referenced must never be reused."""
    a = rig.buf(4096)
    q = rig.queue()

    def pop(content: bytes):
        rig.put(a[0], content)
        return _pop_head0(rig, q, [(*a, False)])

    contents = [bytes([i]) * 4096 for i in range(6)]
    ch = pop(contents[0])
    assert hash(ch.readable) == hash(contents[0])  # caches the hash inside the bytes object
    del ch  # dropped with its chain: free to be recycled
    ch = pop(contents[1])
    assert ch.readable == contents[1] and hash(ch.readable) == hash(contents[1])
    held = ch.readable
    view = memoryview(pop(contents[2]).readable)
    del ch
    for c in contents[3:]:
        ch = pop(c)
        assert ch.readable == c and hash(ch.readable) == hash(c)
        del ch
    assert held == contents[1] and hash(held) == hash(contents[1])
    assert view == contents[2]


def test_writable_views_always_point_at_their_own_chain(rig):
    """The C engine hands a dropped chain's writable tuple and views to the next chain with as many
    segments in the same regions: each chain must write where its own descriptors say, a view or tuple
    somebody kept must never move, and a released view must never come back."""
    q = rig.queue()
    bufs = [rig.buf(64) for _ in range(6)]
    proxy_buf = (PROXY_GPA + 0x8000, 64)  # a writable segment in the other region

    def pop(seg):
        return _pop_head0(rig, q, [(*seg, True)])

    def read(seg):
        return bytes(rig.pmem[seg[0] - PROXY_GPA:seg[0] - PROXY_GPA + seg[1]]) if seg[0] >= PROXY_GPA \
            else rig.get(seg[0], seg[1])

    ch = pop(bufs[0])
    del ch  # its views are free for the next chain
    for i, seg in enumerate([bufs[1], proxy_buf, bufs[2]]):
        ch = pop(seg)
        assert [len(m) for m in ch.writable] == [64]
        ch.writable[0][:4] = b"W%03d" % i
        assert read(seg)[:4] == b"W%03d" % i
        del ch
    ch = pop(bufs[3])
    kept_view = ch.writable[0]  # its tuple is otherwise free when the chain goes
    del ch
    ch = pop(bufs[4])
    kept_tuple = ch.writable
    del ch
    released = pop(bufs[5])
    released.writable[0].release()
    del released
    for seg in bufs[:3]:
        ch = pop(seg)
        ch.writable[0][:2] = b"ok"
        assert read(seg)[:2] == b"ok"
        del ch
    kept_view[:4] = b"KV!!"
    kept_tuple[0][:4] = b"KT!!"
    assert read(bufs[3])[:4] == b"KV!!" and read(bufs[4])[:4] == b"KT!!"
    assert all(read(seg)[:4] not in (b"KV!!", b"KT!!") for seg in bufs[:3])


def test_removing_a_region_frees_its_mapping_after_chains(eng):
    """Views a dropped chain left behind (the C engine keeps them for reuse) must not pin a region
    that is removed: its mapping can be closed."""
    rig = Rig(eng)
    q = rig.queue()

    def pop(seg):
        return _pop_head0(rig, q, [(*seg, True)])

    ch = pop(rig.buf(64))
    ch.writable[0][:1] = b"x"
    del ch  # nothing else holds its views: they may be kept for reuse
    ch = pop((PROXY_GPA + 0x8000, 64))
    in_proxy = ch.writable[0]  # must pin the proxy region, not the guest's
    del ch
    rig.mem.remove_region(PROXY_GPA)
    with pytest.raises(BufferError):
        rig.pmem.close()  # the view still points into it: no use-after-unmap
    del in_proxy
    rig.pmem.close()
    q = None  # the queue and the driver pin the rings' region
    del rig.guest
    rig.mem.remove_region(0)
    rig.gmem.close()  # would raise BufferError if a pooled view still held the export
    rig.close()


def test_indirect_chain_like_linux_virtiofs(rig):
    """Every guest request is ONE indirect descriptor with 3-4 segments (proxy-notes)."""
    segs = [rig.buf(b"I" * 40), rig.buf(b"A" * 8), rig.buf(16), rig.buf(96)]
    table = driver.pack_descs(driver.chain_descs([(*segs[0], False), (*segs[1], False),
                                                  (*segs[2], True), (*segs[3], True)]))
    t = rig.buf(table)
    rig.guest.set_desc(0, t[0], len(table), F_INDIRECT)
    rig.guest.publish([0])
    (ch,) = rig.queue().pop_chains()
    assert ch.readable == b"I" * 40 + b"A" * 8
    assert [len(m) for m in ch.writable] == [16, 96]
    fi = _common.LAYOUT_F_FROM_INDIRECT
    assert ch.layout[0] == (t[0], 64, F_INDIRECT)
    assert [flags for _, _, flags in ch.layout[1:]] == [F_NEXT | fi, F_NEXT | fi, F_WRITE | F_NEXT | fi, F_WRITE | fi]


def test_batch_pop_max_and_push_many(rig):
    for h in range(4):  # heads 0..3: two-descriptor chains h -> h+4 (readable, then writable)
        rig.guest.set_desc(h, rig.buf(bytes([h]) * 8)[0], 8, F_NEXT, h + 4)
        rig.guest.set_desc(h + 4, rig.buf(8)[0], 8, F_WRITE)
    rig.guest.publish([2, 0, 3, 1])
    q = rig.queue()
    first = q.pop_chains(max=3)
    assert [c.head for c in first] == [2, 0, 3]
    assert [c.readable for c in first] == [b"\2" * 8, b"\0" * 8, b"\3" * 8]
    rest = q.pop_chains()
    assert [c.head for c in rest] == [1]
    q.push_used([(1, 0), (2, 8), (0, 1), (3, 2)])  # out-of-order completion, FORGET-style len 0 included
    assert rig.guest.collect_used() == [(1, 0), (2, 8), (0, 1), (3, 2)]


def test_ring_indices_wrap_16_bit(rig):
    q = rig.queue()
    a = rig.buf(b"x")
    rig.guest.set_desc(0, a[0], 1, 0)
    rig.guest.avail_idx = rig.guest.last_used = 0xFFFE
    rig.guest.set_avail_idx(0xFFFE)
    q.last_avail_idx = q.used_idx = 0xFFFE
    rig.mem.view(rig.used, 4)[2:4] = (0xFFFE).to_bytes(2, "little")
    for _ in range(5):
        rig.guest.publish([0])
        (c,) = q.pop_chains()
        q.push_used([(c.head, 1)])
        assert rig.guest.collect_used() == [(0, 1)]
    assert q.last_avail_idx == 3 and q.used_idx == 3


def test_descriptor_spanning_adjacent_regions(eng):
    """A buffer may cross regions that are adjacent in GPA space (memory hotplug): two segments."""
    fd1, m1 = memfd_map(0x10000, "r1")
    fd2, m2 = memfd_map(0x10000, "r2")
    mem = eng.MemoryMap()
    mem.add_region(0, 0x10000, m1)
    mem.add_region(0x10000, 0x10000, m2)
    m1[0xFFF0:0x10000] = b"A" * 16
    m2[0:16] = b"B" * 16
    g = driver.GuestRing(4, mem.view(0x1000, 64), mem.view(0x2000, 14), mem.view(0x3000, 38))
    g.set_descs(0, [(0xFFF0, 32, F_NEXT, 1), (0xFFF8, 16, F_WRITE, 0)])
    g.publish([0])
    (c,) = eng.SplitQueue(mem, 4, 0x1000, 0x2000, 0x3000).pop_chains()
    assert c.readable == b"A" * 16 + b"B" * 16
    assert [len(m) for m in c.writable] == [8, 8]
    assert c.write(b"0123456789abcdef") == 16
    assert bytes(m1[0xFFF8:0x10000]) + bytes(m2[0:8]) == b"0123456789abcdef"
    os.close(fd1)
    os.close(fd2)


def _memfds(name: str) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{name} "):
                out.append(fd)
    return out


def test_a_chain_dropped_last_does_not_pin_its_mapping(eng):
    """A chain that outlives its queue and memory map: when it goes, the guest mapping (and the fd the mmap
    keeps) goes with it.  The C engine pooled the chain's writable views for reuse after the map had emptied
    the pool, so the mapping stayed until some later map went (another test's fd check saw it close)."""
    fd, m = memfd_map(0x10000, "pinned")
    mem = eng.MemoryMap()
    mem.add_region(0, 0x10000, m)
    g = driver.GuestRing(4, mem.view(0x1000, 64), mem.view(0x2000, 14), mem.view(0x3000, 38))
    g.set_descs(0, [(0x8000, 16, F_WRITE, 0)])
    g.publish([0])
    (c,) = eng.SplitQueue(mem, 4, 0x1000, 0x2000, 0x3000).pop_chains()
    os.close(fd)
    gone = weakref.ref(m)
    del m, mem, g  # the chain holds its queue, which holds the map
    assert gone() is not None and _memfds("pinned")
    del c
    assert gone() is None and _memfds("pinned") == []


def test_memory_map_translation_and_lifetime(eng):
    fd, m = memfd_map(0x3000, "mm")
    mem = eng.MemoryMap()
    # mapped from offset 0 over mmap_offset + size, as libvhost-user does
    assert mem.add_region(0xC0000, 0x2000, m, uva=0x7F0000000000, mmap_offset=0x1000) == 0
    assert mem.translate(0xC0010, 16) == (0, 0x10)
    assert mem.uva_to_gpa(0x7F0000000010) == 0xC0010
    m[0x1010:0x1014] = b"abcd"
    assert bytes(mem.view(0xC0010, 4)) == b"abcd"
    assert mem.regions == [(0xC0000, 0x2000, 0x7F0000000000)]
    for gpa, n, reason in [(0xBFFFF, 2, "no_region"), (0xC1FFF, 2, "no_region"), (0xC2000, 0, "no_region"),
                           ((1 << 64) - 4, 8, "overflow")]:
        with pytest.raises(_common.RingError) as ei:
            mem.translate(gpa, n)
        assert ei.value.reason == reason
    with pytest.raises(_common.RingError) as ei:
        mem.add_region(0xC1000, 0x2000, bytearray(0x2000))
    assert ei.value.reason == "region_overlap"
    with pytest.raises(BufferError):
        mem.add_region(0, 16, b"read-only bytes!")
    v = mem.view(0xC0000, 8)
    with pytest.raises(BufferError):
        m.close()  # the map (and the view) hold the export: no use-after-unmap
    mem.remove_region(0xC0000)
    with pytest.raises(BufferError):
        m.close()  # the view still holds it
    del v
    assert mem.regions == []
    m.close()
    os.close(fd)


def test_uva_proxy_region(rig):
    assert rig.mem.uva_to_gpa(PROXY_UVA + 0x40) == PROXY_GPA + 0x40
    with pytest.raises(_common.RingError):
        rig.mem.uva_to_gpa(0x10)


# ---------------------------------------------------------------- malformed rings


def _bad(rig, case):
    """Build malformed chain `case` at head 1 (a good chain at head 0 is published first)."""
    g = rig.guest
    ok = rig.buf(b"ok")
    g.set_desc(0, ok[0], 2, 0)
    r, w = rig.buf(b"r" * 8), rig.buf(8)
    if case == "no_region":
        g.set_descs(1, [(r[0], 8, F_NEXT, 2), (GUEST_SIZE + 0x1000, 8, F_WRITE, 0)])
    elif case == "no_region_partial":
        g.set_descs(1, [(GUEST_SIZE - 4, 8, 0, 0)])
    elif case == "overflow":
        g.set_descs(1, [((1 << 64) - 16, 64, 0, 0)])
    elif case == "chain_loop":
        g.set_descs(1, [(r[0], 8, F_NEXT, 2), (r[0], 8, F_NEXT, 1)])
    elif case == "chain_loop_indirect":
        t = rig.buf(driver.pack_descs([(r[0], 8, F_NEXT, 1), (r[0], 8, F_NEXT, 0)]))
        g.set_desc(1, t[0], t[1], F_INDIRECT)
    elif case == "nested_indirect":
        inner = rig.buf(driver.pack_descs([(r[0], 8, 0, 0)]))
        t = rig.buf(driver.pack_descs([(inner[0], 16, F_INDIRECT, 0)]))
        g.set_desc(1, t[0], t[1], F_INDIRECT)
    elif case == "next_range":
        g.set_descs(1, [(r[0], 8, F_NEXT, rig.num)])
    elif case == "next_range_indirect":
        t = rig.buf(driver.pack_descs([(r[0], 8, F_NEXT, 2), (r[0], 8, 0, 0)]))
        g.set_desc(1, t[0], t[1], F_INDIRECT)
    elif case == "read_after_write":
        g.set_descs(1, [(w[0], 8, F_WRITE | F_NEXT, 2), (r[0], 8, 0, 0)])
    elif case == "indirect_len":
        t = rig.buf(driver.pack_descs([(r[0], 8, 0, 0)]))
        g.set_desc(1, t[0], 20, F_INDIRECT)
    elif case == "indirect_next":
        t = rig.buf(driver.pack_descs([(r[0], 8, 0, 0)]))
        g.set_desc(1, t[0], 16, F_INDIRECT | F_NEXT, 2)
    elif case == "too_large":  # 4096 descriptors x 1 MiB of the same buffer: 4 GiB to gather
        big = rig.buf(1 << 20)
        t = rig.buf(driver.pack_descs([(big[0], 1 << 20, F_NEXT, i + 1) for i in range(4095)] +
                                      [(big[0], 1 << 20, 0, 0)]))
        g.set_desc(1, t[0], t[1], F_INDIRECT)
    elif case == "indirect_table_outside":
        g.set_desc(1, GUEST_SIZE - 8, 16, F_INDIRECT)
    g.publish([0, 1, 0])


MALFORMED = {
    "no_region": "no_region",
    "no_region_partial": "no_region",
    "overflow": "overflow",
    "chain_loop": "chain_loop",
    "chain_loop_indirect": "chain_loop",
    "nested_indirect": "nested_indirect",
    "next_range": "next_range",
    "next_range_indirect": "next_range",
    "read_after_write": "read_after_write",
    "indirect_len": "indirect_len",
    "indirect_next": "indirect_next",
    "indirect_table_outside": "no_region",
    "too_large": "too_large",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_chain_defined_error(rig, case):
    _bad(rig, case)
    q = rig.queue()
    with pytest.raises(_common.RingError) as ei:
        q.pop_chains()
    e = ei.value
    assert e.reason == MALFORMED[case] and e.code == _common.REASON_CODE[e.reason]
    assert e.head == 1
    assert [c.head for c in e.chains] == [0] and e.chains[0].readable == b"ok"  # the good chain survives
    # the bad entry was consumed; the queue keeps working
    assert [c.head for c in q.pop_chains()] == [0]


def test_avail_index_too_far_ahead(rig):
    q = rig.queue()
    rig.guest.set_avail_idx(rig.num + 1)
    for _ in range(2):  # consumes nothing, stays an error
        with pytest.raises(_common.RingError) as ei:
            q.pop_chains()
        assert ei.value.reason == "avail_ahead"
    assert q.last_avail_idx == 0
    rig.guest.set_avail_idx(rig.num)  # exactly num ahead is legal
    assert q.avail_pending() == rig.num


def test_bad_head_and_bad_used(rig):
    rig.guest.publish([rig.num + 3])
    q = rig.queue()
    with pytest.raises(_common.RingError) as ei:
        q.pop_chains()
    assert (ei.value.reason, ei.value.head) == ("head_range", rig.num + 3)
    with pytest.raises(_common.RingError) as ei:
        q.push_used([(0, 1), (rig.num, 1)])
    assert ei.value.reason == "head_range"
    assert rig.guest.used_pending() == 0  # nothing half-published
    with pytest.raises(TypeError):
        q.push_used([5])


@pytest.mark.parametrize("num,desc,reason", [(6, 0x1000, "bad_queue"), (0, 0x1000, "bad_queue"),
                                             (65536, 0x1000, "bad_queue"), (8, 0x1008, "bad_queue"),
                                             (8, GUEST_SIZE - 64, "no_region")])
def test_bad_queue_setup(rig, num, desc, reason):
    with pytest.raises(_common.RingError) as ei:
        rig.eng.SplitQueue(rig.mem, num, desc, rig.avail, rig.used)
    assert ei.value.reason == reason


# ---------------------------------------------------------------- differential fuzz: C == twin


def _random_ring(rnd: random.Random, gmem, num: int, base_desc: int, avail: int) -> None:
    """Random descriptors (mostly plausible, sometimes hostile) straight into guest memory."""
    def addr() -> int:
        k = rnd.random()
        if k < 0.7:
            return rnd.randrange(0x100000, 0x100000 + 0x8000)
        if k < 0.8:
            return rnd.randrange(GUEST_SIZE - 64, GUEST_SIZE + 64)
        if k < 0.9:
            return (1 << 64) - rnd.randrange(1, 4096)
        return rnd.randrange(0, 1 << 64)

    def desc(indirect_ok: bool) -> bytes:
        flags = rnd.choice([0, F_NEXT, F_WRITE, F_WRITE | F_NEXT, F_NEXT, F_NEXT])
        length = rnd.choice([0, 1, 8, 40, 4096, rnd.randrange(0, 1 << 32)])
        if indirect_ok and rnd.random() < 0.25:
            n = rnd.randrange(1, 6)
            t = rnd.randrange(0x108000, 0x10F000) & ~15
            gmem[t:t + 16 * n] = b"".join(desc(rnd.random() < 0.1) for _ in range(n))
            flags = F_INDIRECT | (F_NEXT if rnd.random() < 0.05 else 0)
            return struct.pack("<QIHH", t if rnd.random() < 0.9 else addr(), 16 * n if rnd.random() < 0.9 else
                               rnd.randrange(0, 200), flags, rnd.randrange(0, num + 2))
        nxt = rnd.randrange(0, num) if rnd.random() < 0.95 else rnd.randrange(0, 1 << 16)
        return struct.pack("<QIHH", addr(), length, flags, nxt)

    gmem[base_desc:base_desc + 16 * num] = b"".join(desc(True) for _ in range(num))
    for i in range(num):
        h = rnd.randrange(0, num) if rnd.random() < 0.97 else rnd.randrange(0, 1 << 16)
        gmem[avail + 4 + 2 * i:avail + 6 + 2 * i] = h.to_bytes(2, "little")
    idx = num if rnd.random() < 0.9 else rnd.randrange(0, 1 << 16)
    gmem[avail + 2:avail + 4] = idx.to_bytes(2, "little")


def _outcome(q):
    try:
        chains = q.pop_chains()
        return ("ok", [(c.head, c.readable, [bytes(m) for m in c.writable], c.layout) for c in chains])
    except _common.RingError as e:
        return (e.reason, e.head, [(c.head, c.readable, c.layout) for c in e.chains])


def test_differential_random_rings_c_equals_twin():
    """Random (often hostile) rings: both engines return the same chains, bytes and error reasons."""
    c, py = ENGINES["c"], ENGINES["python"]
    assert not isinstance(c, Exception), c
    rc, rp = Rig(c), Rig(py)
    n_cases, reasons = 1500, set()
    for seed in range(n_cases):
        for rig in (rc, rp):
            r2 = random.Random(seed)
            rig.gmem[0x100000:0x100000 + 0x10000] = bytes(r2.randrange(256) for _ in range(64)) * 1024
            _random_ring(r2, rig.gmem, rig.num, rig.desc, rig.avail)
        a, b = _outcome(rc.queue()), _outcome(rp.queue())
        assert a == b, seed
        reasons.add(a[0])
    rc.close()
    rp.close()
    assert len(reasons) >= 8, reasons  # the generator reaches most error paths

