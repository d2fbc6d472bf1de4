"""Hold points in the shadow path (issue 15), on both engines: rules, verdicts, safety, C == twin."""

from __future__ import annotations

import errno
import os
import random
import struct
import threading
import time

import pytest

from dissectors import fuse as F
from dissectors.ring import (
    CAP_F_ANSWERED,
    CAP_F_HELD,
    CAP_F_RELEASED,
    CAP_F_REWRITTEN,
    HOLD_REPLY,
    HOLD_REQUEST,
    HoldRule,
    RingError,
)
from dissectors.spec import fuse as fuse_spec
from tests.test_ring_engine import ENGINES
from tests.test_ring_shadow import Proxy, eng, wait_fd  # noqa: F401 - eng is a fixture

OP = fuse_spec.OPCODE_BY_NAME
MKDIR, LOOKUP, GETATTR, FORGET = OP["MKDIR"].value, OP["LOOKUP"].value, OP["GETATTR"].value, OP["FORGET"].value
HOLD_MKDIR = HoldRule(HOLD_REQUEST, opcodes=frozenset({MKDIR}))


@pytest.fixture
def px(eng):  # noqa: F811
    p = Proxy(eng)
    yield p
    p.close()


def lookup(px: Proxy, head: int, unique: int, name: bytes = b"x") -> list[tuple[int, int]]:
    return px.request(head, [F.encode_request("LOOKUP", {"name": name}, unique=unique, nodeid=1)], [16, 128])


def mkdir(px: Proxy, head: int, unique: int) -> list[tuple[int, int]]:
    req = F.encode_request("MKDIR", {"mkdir": {"mode": 0o755, "umask": 0}, "name": b"d"}, unique=unique, nodeid=1)
    return px.request(head, [req[:40], req[40:]], [16, 128])


def forget(px: Proxy, head: int, unique: int) -> None:
    px.request(head, [F.encode_request("FORGET", {"forget": {"nlookup": 1}}, unique=unique, nodeid=5)], [])


def caps(px: Proxy) -> list[tuple[str, int, int, bytes]]:
    """(kind, head, flags without TRUNCATED, data) of what the path captured since the last call."""
    return [(c.kind, c.head, c.flags & ~1, c.data) for c in px.cap.read_captures(0)]


def backend_answer(px: Proxy, data_for: dict[int, bytes]) -> list[int]:
    """The back-end pops what the path forwarded and answers each chain with data_for[head]."""
    chains = px.dev.pop_chains()
    px.dev.push_used([(c.head, c.write(data_for.get(c.head, b""))) for c in chains])
    return [c.head for c in chains]


def eio(unique: int) -> bytes:
    return F.encode_reply("GETATTR", unique=unique, error=errno.EIO)


def test_no_rules_forwards_as_before_and_captures_carry_no_flags(px):
    mkdir(px, 0, 1)
    px.rig.guest.publish([0])
    px.path.set_hold_rules([])
    assert px.path.step() == (1, 0)
    assert px.dev.avail_pending() == 1 and px.path.held() == []
    assert [c.flags for c in px.cap.read_captures()] == [0]


def test_held_request_is_not_forwarded_until_released(px):
    px.path.set_hold_rules([HOLD_MKDIR])
    mkdir(px, 0, 41)
    lookup(px, 1, 42)
    px.rig.guest.publish([0, 1])
    assert px.path.step() == (2, 0)
    got = caps(px)
    assert [(k, h, f) for k, h, f, _ in got] == [("request", 0, CAP_F_HELD), ("request", 1, 0)]
    assert F.decode_request(got[0][3]).header.unique == 41
    assert px.path.held() == [(0, HOLD_REQUEST)]
    assert backend_answer(px, {1: eio(42)}) == [1]  # the LOOKUP is served while the MKDIR waits
    assert px.path.step() == (0, 1)
    assert px.rig.guest.collect_used() == [(1, 16)]
    px.path.release(0)
    assert px.path.held() == []
    assert backend_answer(px, {0: eio(41)}) == [0]
    px.path.step()
    assert px.rig.guest.collect_used() == [(0, 16)]
    assert [(k, h, f) for k, h, f, _ in caps(px)] == [("reply", 1, 0), ("reply", 0, 0)]
    k = px.path.counters
    assert (k["holds"], k["released"], k["requests"], k["replies"]) == (1, 1, 2, 2)
    with pytest.raises(RingError) as ei:
        px.path.release(0)
    assert (ei.value.reason, ei.value.head) == ("not_held", 0)


def test_answer_completes_a_held_request_without_the_backend(px):
    px.path.set_hold_rules([HOLD_MKDIR])
    wbufs = mkdir(px, 3, 77)
    px.rig.guest.publish([3])
    px.path.step()
    caps(px)
    reply = F.encode_reply("MKDIR", unique=77, error=errno.EACCES)
    px.path.answer(3, reply)
    assert px.dev.avail_pending() == 0  # the back-end never sees it
    assert wait_fd(px.g_call, 0)
    assert px.rig.guest.collect_used() == [(3, len(reply))]
    assert px.rig.get(wbufs[0][0], 16) == reply
    assert caps(px) == [("reply", 3, CAP_F_ANSWERED, reply)]
    assert px.path.counters["answered"] == 1 and px.path.held() == []


def test_reply_rule_holds_the_reply_then_rewrite_or_release(px):
    px.path.set_hold_rules([HoldRule(HOLD_REPLY, opcodes=frozenset({LOOKUP}))])
    w0 = lookup(px, 0, 5)
    lookup(px, 1, 6)
    mkdir(px, 2, 7)
    px.rig.guest.publish([0, 1, 2])
    assert px.path.step() == (3, 0)  # requests are not held by a reply rule
    assert [f for _, _, f, _ in caps(px)] == [0, 0, 0]
    ok = F.encode_reply("LOOKUP", unique=5, error=errno.ENOENT)
    backend_answer(px, {0: ok, 1: F.encode_reply("LOOKUP", unique=6, error=errno.ENOENT), 2: eio(7)})
    assert px.path.step() == (0, 3)
    assert px.rig.guest.collect_used() == [(2, 16)]  # the MKDIR's reply is not held
    got = caps(px)
    assert [(k, h, f) for k, h, f, _ in got] == [("reply", 0, CAP_F_HELD), ("reply", 1, CAP_F_HELD), ("reply", 2, 0)]
    assert got[0][3] == ok
    assert sorted(px.path.held()) == [(0, HOLD_REPLY), (1, HOLD_REPLY)]
    new = F.encode_reply("LOOKUP", unique=5, error=errno.EIO)
    px.path.rewrite(0, new)
    assert px.rig.guest.collect_used() == [(0, 16)]
    assert px.rig.get(w0[0][0], 16) == new
    px.path.release(1)
    assert px.rig.guest.collect_used() == [(1, 16)]
    assert caps(px) == [("reply", 0, CAP_F_REWRITTEN, new),
                        ("reply", 1, CAP_F_RELEASED, F.encode_reply("LOOKUP", unique=6, error=errno.ENOENT))]
    k = px.path.counters
    assert (k["holds"], k["rewritten"], k["released"]) == (2, 1, 1)


def test_drop_completes_a_held_forget_with_len_0(eng):  # noqa: F811
    p = Proxy(eng, queue=0)
    try:
        p.path.set_hold_rules([HoldRule(HOLD_REQUEST, queues=1 << 0, opcodes=frozenset({FORGET, MKDIR}))])
        forget(p, 0, 9)
        mkdir(p, 1, 10)
        p.rig.guest.publish([0, 1])
        p.path.step()
        assert sorted(p.path.held()) == [(0, HOLD_REQUEST), (1, HOLD_REQUEST)]
        with pytest.raises(RingError) as ei:
            p.path.drop(1)  # it has writable segments: it expects a reply
        assert ei.value.reason == "needs_reply"
        p.path.drop(0)
        assert p.rig.guest.collect_used() == [(0, 0)]
        assert [(k, h, f, d) for k, h, f, d in caps(p)][-1] == ("reply", 0, CAP_F_ANSWERED, b"")
        assert p.path.counters["hold_drops"] == 1 and p.dev.avail_pending() == 0
    finally:
        p.close()


def test_verdict_errors_name_the_reason(px):
    px.path.set_hold_rules([HOLD_MKDIR, HoldRule(HOLD_REPLY, opcodes=frozenset({LOOKUP}))])
    mkdir(px, 0, 1)
    lookup(px, 1, 2)
    px.rig.guest.publish([0, 1])
    px.path.step()
    backend_answer(px, {1: eio(2)})
    px.path.step()
    cases = [(px.path.release, (5,), "not_held"), (px.path.release, (1 << 20,), "not_held"),
             (px.path.answer, (1, eio(2)), "wrong_direction"), (px.path.rewrite, (0, eio(1)), "wrong_direction"),
             (px.path.drop, (1,), "wrong_direction"), (px.path.answer, (0, b"x" * 145), "no_room"),
             (px.path.rewrite, (1, b"x" * 145), "no_room")]
    for fn, args, reason in cases:
        with pytest.raises(RingError) as ei:
            fn(*args)
        assert ei.value.reason == reason, (fn, args)
    assert "not_held" in str(RingError("not_held", 5))
    px.path.answer(0, b"y" * 144)  # exactly the writable room
    assert sorted(px.path.held()) == [(1, HOLD_REPLY)]


def test_rules_match_direction_queue_and_opcode(eng):  # noqa: F811
    p = Proxy(eng, queue=2)
    try:
        p.path.set_hold_rules([HoldRule(HOLD_REQUEST, queues=1 << 1, opcodes=frozenset({MKDIR})),  # other queue
                               HoldRule(HOLD_REPLY, opcodes=frozenset({MKDIR})),  # replies only
                               HoldRule(HOLD_REQUEST, queues=(1 << 2) | 1, opcodes=frozenset({GETATTR}))])
        mkdir(p, 0, 1)
        p.request(1, [F.encode_request("GETATTR", {"getattr": {}}, unique=2, nodeid=1)], [16, 104])
        p.request(2, [b"short"], [16])  # not a FUSE request: never held, whatever the rules say
        p.rig.guest.publish([0, 1, 2])
        p.path.step()
        assert p.path.held() == [(1, HOLD_REQUEST)]
        p.path.set_hold_rules([HoldRule(HOLD_REQUEST | HOLD_REPLY)])  # everything, both directions
        p.rig.guest.set_avail_idx(3)
        p.request(3, [b"short"], [16])
        p.rig.guest.publish([3])
        p.path.step()
        assert p.path.held() == [(1, HOLD_REQUEST)]
        for bad in (HoldRule(0), HoldRule(4), HoldRule(1, queues=-1), HoldRule(1, opcodes=frozenset({-3})),
                    HoldRule(1, opcodes=frozenset({1 << 32})), HoldRule(1, queues=1 << 64)):
            with pytest.raises(ValueError):
                p.path.set_hold_rules([bad])
        p.path.set_hold_rules([])
    finally:
        p.close()


def test_rules_replaced_while_running_and_verdicts_from_another_thread(px):
    px.path.start()
    px.path.set_hold_rules([HOLD_MKDIR])

    def send(head: int, fn, unique: int) -> None:
        fn(px, head, unique)
        px.rig.guest.publish([head])
        os.eventfd_write(px.g_kick, 1)

    send(0, mkdir, 1)
    deadline = time.monotonic() + 5
    while px.path.held() != [(0, HOLD_REQUEST)]:
        assert time.monotonic() < deadline, "never held"
        time.sleep(0.001)
    send(1, lookup, 2)  # served while the MKDIR waits
    assert wait_fd(px.b_kick)
    assert backend_answer(px, {1: eio(2)}) == [1]
    os.eventfd_write(px.b_call, 1)
    assert wait_fd(px.g_call)
    assert px.rig.guest.collect_used() == [(1, 16)]
    px.path.set_hold_rules([])  # replaced while running: the next MKDIR goes straight through
    send(2, mkdir, 3)
    assert wait_fd(px.b_kick)
    assert backend_answer(px, {}) == [2]
    assert px.path.held() == [(0, HOLD_REQUEST)]  # what was held stays held
    t = threading.Thread(target=px.path.release, args=(0,))
    t.start()
    t.join(5)
    assert wait_fd(px.b_kick)
    assert backend_answer(px, {0: eio(1)}) == [0]
    os.eventfd_write(px.b_call, 1)
    deadline = time.monotonic() + 5
    got: list[tuple[int, int]] = []
    while len(got) < 2:
        assert time.monotonic() < deadline
        got += px.rig.guest.collect_used()
        time.sleep(0.001)
    assert sorted(got) == [(0, 16), (2, 0)]
    flags = [(c.head, c.flags) for c in px.cap.read_captures(0) if c.kind == "request"]
    assert flags == [(0, CAP_F_HELD), (1, 0), (2, 0)]


def test_safety_on_stop_answers_eio_releases_replies_drops_forgets(eng):  # noqa: F811
    """stop() (GET_VRING_BASE, RESET, back-end loss, proxy exit): nothing held may wedge the guest."""
    p = Proxy(eng, queue=0)
    try:
        p.path.set_hold_rules([HoldRule(HOLD_REQUEST, opcodes=frozenset({MKDIR, FORGET})),
                               HoldRule(HOLD_REPLY, opcodes=frozenset({LOOKUP}))])
        p.path.start()
        w0 = mkdir(p, 0, 0x1122334455)
        forget(p, 1, 12)
        w2 = lookup(p, 2, 13)
        mkdir(p, 3, 14)
        p.rig.guest.publish([0, 1, 2, 3])
        os.eventfd_write(p.g_kick, 1)
        assert wait_fd(p.b_kick)
        ok = F.encode_reply("LOOKUP", unique=13, error=errno.ENOENT)
        assert backend_answer(p, {2: ok}) == [2]
        os.eventfd_write(p.b_call, 1)
        deadline = time.monotonic() + 5
        while len(p.path.held()) < 4:
            assert time.monotonic() < deadline, p.path.held()
            time.sleep(0.001)
        p.path.release(3)  # queued for the thread; if it stops first, the back-end will not take it: EIO
        p.path.stop()
        assert p.path.held() == []
        used = dict(p.rig.guest.collect_used())
        assert used[0] == 16 and used[1] == 0 and used[2] == 16
        assert p.rig.get(w0[0][0], 16) == eio(0x1122334455)  # the unique comes from the request itself
        assert p.rig.get(w2[0][0], 16) == ok
        assert 3 in used or p.dev.avail_pending() == 1  # released before the stop, or answered EIO by it
        replies = {c.head: (c.flags, c.data) for c in p.cap.read_captures(0) if c.kind == "reply"}
        assert replies[0] == (CAP_F_ANSWERED, eio(0x1122334455))
        assert replies[1] == (CAP_F_ANSWERED, b"")
        assert replies[2][0] == CAP_F_RELEASED and replies[2][1] == ok
        assert p.path.counters["safety"] >= 3
        # after stop nothing is held, even by drain(): the back-end's late replies go straight through
        if 3 not in used:
            backend_answer(p, {3: eio(14)})
            assert p.path.drain() == 1 and p.path.held() == []
    finally:
        p.close()


def test_lossless_stall_never_blocks_a_verdict_from_the_consumer(eng):  # noqa: F811
    """The capture consumer decides at once on held captures (on_held): a verdict it gives while the
    path waits for it in lossless mode must not deadlock."""
    p = Proxy(eng, capacity=4096, policy="lossless")
    try:
        p.path.set_hold_rules([HoldRule(HOLD_REQUEST)])
        p.path.start()
        for h in range(4):
            p.request(h, [F.encode_request("LOOKUP", {"name": b"n" * 1400}, unique=h + 1, nodeid=1)], [16])
        p.rig.guest.publish([0, 1, 2, 3])
        os.eventfd_write(p.g_kick, 1)
        released: list[int] = []
        deadline = time.monotonic() + 10
        while p.path.counters["stalls"] == 0:  # the path now waits for this thread, holding its lock
            assert time.monotonic() < deadline, "never stalled"
            time.sleep(0.001)
        while len(released) < 4:
            assert time.monotonic() < deadline, released
            for c in p.cap.read_captures(max=1, timeout=0.2):
                if c.flags & CAP_F_HELD:
                    p.path.release(c.head)  # called from the consumer, maybe while the path stalls
                    released.append(c.head)
        assert released == [0, 1, 2, 3]
        while p.dev.avail_pending() < 4:
            assert time.monotonic() < deadline
            time.sleep(0.001)
    finally:
        p.close()


def test_held_capture_that_cannot_be_recorded_is_forwarded_not_held(eng):  # noqa: F811
    """Drop policy, buffer full: nobody would ever learn of the hold, so the path does not hold."""
    p = Proxy(eng, capacity=4096, policy="drop")
    try:
        p.path.set_hold_rules([HoldRule(HOLD_REQUEST)])
        for h in range(4):
            p.request(h, [F.encode_request("LOOKUP", {"name": b"n" * 1400}, unique=h + 1, nodeid=1)], [16])
        p.rig.guest.publish([0, 1, 2, 3])
        assert p.path.step() == (4, 0)
        got = p.cap.read_captures(0)
        assert got and all(c.flags & CAP_F_HELD for c in got)
        assert sorted(p.path.held()) == sorted((c.head, HOLD_REQUEST) for c in got)
        assert p.dev.avail_pending() == 4 - len(got) == p.cap.stats["dropped"] > 0
        assert p.path.counters["holds"] == len(got)
    finally:
        p.close()


def test_spin_mode_applies_verdicts_promptly(eng):  # noqa: F811
    p = Proxy(eng, spin_us=100_000)
    try:
        p.path.set_hold_rules([HOLD_MKDIR])
        p.path.start()
        mkdir(p, 0, 1)
        p.rig.guest.publish([0])
        os.eventfd_write(p.g_kick, 1)
        deadline = time.monotonic() + 5
        while not p.path.held():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        p.path.release(0)
        assert wait_fd(p.b_kick)
        assert backend_answer(p, {}) == [0]
    finally:
        p.close()


# ---- differential: C == twin on random rule tables, rings and verdicts ------------------------------

_OPS = [LOOKUP, MKDIR, GETATTR, FORGET, OP["READ"].value, OP["SYNCFS"].value]


def _random_rules(rnd: random.Random) -> list[HoldRule]:
    return [HoldRule(rnd.choice([1, 2, 3]), rnd.choice([0, 0, 1 << rnd.randrange(3), rnd.randrange(1 << 64)]),
                     frozenset(rnd.sample(_OPS, rnd.randrange(0, 3)))) for _ in range(rnd.randrange(0, 4))]


def _random_requests(rnd: random.Random, p: Proxy) -> list[int]:
    from tests.test_ring_engine import _random_ring

    r = p.rig
    if rnd.random() < 0.25:  # hostile rings: the matcher must cope with any chain
        r.gmem[0x100000:0x110000] = bytes(rnd.randrange(256) for _ in range(64)) * 1024
        _random_ring(rnd, r.gmem, r.num, r.desc, r.avail)
        return list(range(r.num))
    heads = rnd.sample(range(r.num), rnd.randrange(1, r.num + 1))
    for h in heads:
        op = rnd.choice([*_OPS, 0, 0xFFFFFFFF])
        hdr = struct.pack("<IIQQIIIHH", 40 + 8, op, rnd.randrange(1 << 64), 1, 0, 0, 0, 0, 0) + bytes(8)
        if rnd.random() < 0.1:
            hdr = hdr[:rnd.randrange(0, 40)]
        split = rnd.randrange(1, len(hdr)) if len(hdr) > 1 and rnd.random() < 0.5 else len(hdr)
        p.request(h, [x for x in (hdr[:split], hdr[split:]) if x],
                  rnd.choice([[], [16], [8], [16, 64], [4, 4, 100]]))
    r.guest.publish(heads)
    return heads


def _random_verdicts(rnd: random.Random, p: Proxy, log: list) -> None:
    held = p.path.held()
    for head, _direction in [*held, (rnd.randrange(p.rig.num), rnd.choice([1, 2]))]:
        if rnd.random() < 0.3:
            continue
        kind = rnd.choice(["release", "answer", "rewrite", "drop"])
        data = bytes(rnd.randrange(256) for _ in range(rnd.choice([0, 8, 16, 40, 200])))
        try:
            getattr(p.path, kind)(head, *((data,) if kind in ("answer", "rewrite") else ()))
            log.append((kind, head, "ok"))
        except RingError as e:
            log.append((kind, head, e.reason, e.head))


def test_differential_holds_c_equals_twin():
    """Random rule tables, random (sometimes hostile) rings, random verdicts and a final stop() stepped
    through both engines: the same captures (bar timestamps), verdict outcomes, counters and rings."""
    c, py = ENGINES["c"], ENGINES["python"]
    assert not isinstance(c, Exception), c
    seen = {"held": 0, "flags": set(), "reasons": set()}
    for seed in range(250):
        results = []
        for eng_ in (c, py):
            rnd = random.Random(seed)
            p = Proxy(eng_, queue=rnd.randrange(3), capacity=1 << 16, event_idx=seed % 3 == 0,
                      snaplen=rnd.choice([0, 0, 24]))
            try:
                log: list = []
                held_seen = []
                p.path.set_hold_rules(_random_rules(rnd))
                _random_requests(rnd, p)
                steps = [p.path.step()]
                held_seen.append(p.path.held())
                _random_verdicts(rnd, p, log)
                if rnd.random() < 0.5:
                    p.path.set_hold_rules(_random_rules(rnd))
                try:
                    chains = p.dev.pop_chains()
                except RingError as e:
                    chains = e.chains
                used = [(ch.head, ch.write(bytes(rnd.randrange(256) for _ in range(rnd.choice([0, 16, 90])))))
                        for ch in chains if rnd.random() < 0.8]
                if used:
                    p.dev.push_used(used)
                steps.append(p.path.step())
                held_seen.append(p.path.held())
                _random_verdicts(rnd, p, log)
                steps.append(p.path.step())
                p.path.stop()  # the safety rule
                held_seen.append(p.path.held())
                caps_ = [x._replace(ts_ns=0) for x in p.cap.read_captures(0)]
                r = p.rig
                results.append((steps, log, held_seen, caps_, p.path.counters | {"busy_ns": 0, "busy_max_ns": 0},
                                p.path.indices, bytes(r.mem.view(r.s_avail, 4 + 2 * r.num + 2)),
                                bytes(r.mem.view(r.used, 4 + 8 * r.num + 2)), bytes(r.gmem[0x100000:0x110000])))
            finally:
                p.close()
        assert results[0] == results[1], seed
        seen["held"] += sum(len(h) for h in results[0][2])
        seen["flags"] |= {x.flags & ~1 for x in results[0][3]}
        seen["reasons"] |= {entry[2] for entry in results[0][1]}
        assert results[0][2][-1] == []  # nothing held after stop
    assert seen["held"] > 100, seen
    assert {CAP_F_HELD, CAP_F_ANSWERED, CAP_F_REWRITTEN, CAP_F_RELEASED, 0} <= seen["flags"], seen
    assert {"ok", "not_held", "wrong_direction", "no_room", "needs_reply"} <= seen["reasons"], seen
