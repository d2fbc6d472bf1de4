"""The vhost-user queue thread's loop in the ring engine (SplitQueue.serve_fast) against the per-chain loop
it replaced, byte for byte.

The same requests, in batches of several chains behind one kick (a malformed chain among them, requests
the fast path declines between ones it serves, READs into odd writable segments, CREATE, WRITE, FORGET on
the hiprio queue), go through the daemon with serve_fast on the C engine (the fast path's C entry: no
Chain object for what it serves), serve_fast on the pure-Python engine, and the per-chain loop (pop_chains,
then the fast path or Python for each Chain) on each engine.  Every used entry and every reply byte must
be the same, and so must the counters; with serve_fast only the declined chains reach Python.
"""

from __future__ import annotations

import gc
import os
import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import daemon.transport.vhost_user as vu
from daemon.transport.vhost_user import VhostUserSession
from dissectors import fuse as F
from dissectors.ring.driver import F_INDIRECT, F_WRITE, pack_descs
from tests.ringkit import engines
from tests.test_daemon_fastpath import _identity_out
from tests.test_daemon_vhost_user_protocol import NUM, Frontend, _fuse_init, session, setup_queues

ENGINES = engines()
Transcript = list[tuple[int, int, bytes]]


def _per_chain(self: VhostUserSession, vr: Any, ep: Any) -> bool:
    """The queue thread's drain before serve_fast: pop a group, then each Chain through _serve_chain; the
    queue thread then waits in Python."""
    q = vr.queue
    if q is None or not vr.enabled:
        return False
    while not vr.stopping and self._drain_group(vr, q):
        pass
    return False


def batch(fe: Frontend, q: int, reqs: list[tuple[bytes | None, tuple[int, ...]]]
          | list[tuple[bytes | None, tuple[int, ...], tuple[int, ...]]], timeout: float = 10.0) -> Transcript:
    """The requests as chains behind one kick (each an INDIRECT table: the request, in readable segments of
    the sizes given third (one segment when not given), then writable segments of the given sizes; None: a
    malformed table); every (index, used.len, reply bytes), in the order used."""
    ring = fe.rings[q]
    heads: dict[int, tuple[int, list[tuple[int, int]]]] = {}
    for i, (raw, wsizes, *rest) in enumerate(reqs):
        head = (ring.avail_idx + i) % NUM
        segs = [(fe.alloc(n), n) for n in wsizes]
        if raw is None:
            table = fe.alloc(20)
            ring.set_desc(head, table, 20, F_INDIRECT)  # not a multiple of 16: RingError("indirect_len")
        else:
            rsizes = rest[0] if rest else (len(raw),)
            assert sum(rsizes) == len(raw)
            descs, at = [], 0
            for n in rsizes:
                g = fe.alloc(n)
                fe.gpa_view(g, n)[:] = raw[at:at + n]
                at += n
                descs.append((g, n, 1, len(descs) + 1))
            descs[-1] = (*descs[-1][:2], 1 if segs else 0, len(descs))
            descs += [(g, n, F_WRITE | (1 if k + 1 < len(segs) else 0), len(descs) + k + 1)
                      for k, (g, n) in enumerate(segs)]
            table = fe.alloc(16 * len(descs))
            fe.gpa_view(table, 16 * len(descs))[:] = pack_descs(descs)
            ring.set_desc(head, table, 16 * len(descs), F_INDIRECT)
        for g, n in segs:
            fe.gpa_view(g, n)[:] = b"\xee" * n
        heads[head] = (i, segs)
    ring.publish(list(heads))
    os.eventfd_write(fe.kick[q], 1)
    used: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout
    while len(used) < len(reqs):
        assert time.monotonic() < deadline, f"only {len(used)} of {len(reqs)} answered"
        r, _, _ = select.select([fe.call[q]], [], [], 0.05)
        if r:
            os.eventfd_read(fe.call[q])
        used += ring.collect_used()
        ring.set_used_event(ring.last_used)
    out = []
    for head, length in used:
        i, segs = heads[head]
        data = b"".join(bytes(fe.gpa_view(g, n)) for g, n in segs)[:length]
        out.append((i, length, data))
    return out


def _req(op: str, args: dict[str, Any] | None, fe: Frontend, nodeid: int = 1) -> bytes:
    fe.unique += 1
    return F.encode_request(op, args, unique=fe.unique, nodeid=nodeid)


def scenario(fe: Frontend, tag: str) -> list[Any]:
    """The requests; what each batch answered.  CREATE's and the fresh directory's replies lose their
    st_ino and times (another file and directory each run), every other byte is compared."""
    setup_queues(fe, f"/proc/self/fd/{fe.memfd}", table=False)
    _fuse_init(fe)
    getattr_in = {"getattr": F.make("fuse_getattr_in")}
    one = batch(fe, 1, [
        (_req("GETATTR", getattr_in, fe), (4096,)),
        (_req("LOOKUP", {"name": b"f"}, fe), (4096,)),
        (_req("LOOKUP", {"name": b"nope"}, fe), (4096,)),
        (_req("GETXATTR", {"getxattr": F.make("fuse_getxattr_in", size=64), "name": b"user.none"}, fe), (4096,)),
        (None, (64,)),
        (_req("LOOKUP", {"name": b"d"}, fe), (20, 4076)),
        (_req("ACCESS", {"access": F.make("fuse_access_in", mask=os.R_OK)}, fe), (4096,)),
        (_req("LOOKUP", {"name": f"cd-{tag}".encode()}, fe), (4096,)),
    ])
    by = {i: data for i, _n, data in one}
    f = F.decode_reply(by[1], F.decode_request(_req("LOOKUP", {"name": b"f"}, fe))).args["entry"]
    cd = F.decode_reply(by[7], F.decode_request(_req("LOOKUP", {"name": b"x"}, fe))).args["entry"]
    one = [(i, n, _identity_out(d) if i == 7 else d) for i, n, d in one]
    create = {"create": F.make("fuse_create_in", flags=os.O_RDWR | os.O_CREAT, mode=0o100644, umask=0o022),
              "name": b"new"}
    two = batch(fe, 1, [
        (_req("OPEN", {"open": F.make("fuse_open_in", flags=os.O_RDONLY)}, fe, f.nodeid), (4096,)),
        (_req("CREATE", create, fe, cd.nodeid), (4096,)),
        (_req("ACCESS", {"access": F.make("fuse_access_in", mask=os.W_OK)}, fe), (4096,)),
    ])
    by = {i: data for i, _n, data in two}
    fh = F.decode_reply(by[0], F.decode_request(_req("OPEN", {"open": F.make("fuse_open_in")}, fe, f.nodeid)))
    fh = fh.args["open"].fh
    created = F.decode_reply(by[1], F.decode_request(_req("CREATE", create, fe, cd.nodeid)))
    cfh = created.args["open"].fh
    two = [(i, n, _identity_out(d) if i == 1 else d) for i, n, d in two]
    read = lambda off, size: _req("READ", {"read": F.make("fuse_read_in", fh=fh, offset=off, size=size)}, fe,  # noqa: E731
                                  f.nodeid)
    three = batch(fe, 1, [
        (read(10, 300), (21, 7, 1000)),  # the header and data across odd segments
        (read(0, 5000), (5, 11, 50, 6000)),  # the header itself split
        (read(5100, 100), (4096,)),  # a short read at the end of the file
        (_req("WRITE", {"write": F.make("fuse_write_in", fh=cfh, offset=3, size=5), "data": b"hello"}, fe,
              created.args["entry"].nodeid), (4096,)),
        (read(0, 200_000), (16, 200_000)),  # beyond what is served inline: the pool's, through Python
    ])
    three.sort()  # the pool's READ completes when it does
    assert [n for i, n, _d in three if i == 4] == [16 + 5120]
    four = batch(fe, 1, [
        (_req("FLUSH", {"flush": F.make("fuse_flush_in", fh=cfh)}, fe, created.args["entry"].nodeid), (4096,)),
        (_req("RELEASE", {"release": F.make("fuse_release_in", fh=cfh)}, fe, created.args["entry"].nodeid),
         (4096,)),
        (_req("RELEASE", {"release": F.make("fuse_release_in", fh=fh)}, fe, f.nodeid), (4096,)),
    ])
    forget = batch(fe, 0, [(_req("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, fe, f.nodeid), ())])
    return [one, two, three, four, forget]


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    (root / "f").write_bytes(bytes(range(256)) * 20)
    (root / "d").mkdir()
    for tag in ("c-fast", "python-fast", "c-chain", "python-chain"):
        (root / f"cd-{tag}").mkdir()
    (root / "f").read_bytes()  # its atime settles before the runs (relatime)
    return root


@contextmanager
def engine_loop(monkeypatch: pytest.MonkeyPatch, engine: str, loop: str) -> Iterator[tuple[Any, pytest.MonkeyPatch]]:
    """The daemon on `engine` ("c" or "python") with its queue loop: serve_fast, or the per-chain loop
    ("chain"); (the engine's module, the patches, to add more to)."""
    e = ENGINES[engine]
    if isinstance(e, Exception):
        pytest.fail(f"the C ring engine did not build/import: {e}")
    with monkeypatch.context() as m:
        m.setattr(vu, "MemoryMap", e.MemoryMap)
        m.setattr(vu, "SplitQueue", e.SplitQueue)
        if loop == "chain":
            m.setattr(VhostUserSession, "_drain", _per_chain)
        yield e, m


LOOPS = [(engine, loop) for engine in ("c", "python") for loop in ("fast", "chain")]


def test_serve_fast_answers_byte_for_byte_as_the_per_chain_loop(share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: dict[str, list[Any]] = {}
    calls: dict[str, dict[str, int]] = {}
    for engine, loop in LOOPS:
        tag = f"{engine}-{loop}"
        with engine_loop(monkeypatch, engine, loop) as (e, m):
            seen = {"slow": 0, "chain": 0}
            slow, per_chain = VhostUserSession._serve_slow, VhostUserSession._serve_chain

            def count_slow(self: Any, vr: Any, chain: Any, _s: Any = seen, _f: Any = slow) -> None:
                _s["slow"] += 1
                _f(self, vr, chain)

            def count_chain(self: Any, vr: Any, chain: Any, _s: Any = seen, _f: Any = per_chain) -> None:
                _s["chain"] += 1
                _f(self, vr, chain)

            m.setattr(VhostUserSession, "_serve_slow", count_slow)
            m.setattr(VhostUserSession, "_serve_chain", count_chain)
            with session(share) as (fe, s, _t):
                assert s.mem.map.__class__ is e.MemoryMap
                runs[tag] = scenario(fe, tag)
                assert (share / f"cd-{tag}" / "new").read_bytes() == b"\0\0\0hello"
                counters = s.counters()
                fast = s.server._fast
                assert fast is not None
                served, _errors, fallbacks = fast.counts()
                calls[tag] = {**seen, "served": sum(served.values()), "fallbacks": fallbacks,
                              "chains": counters["queues"][1]["chains"], "forgets": counters["queues"][0]["chains"]}
            # Nothing keeps a view of guest memory once the session is gone (a mapping still exported at its
            # close is parked): neither engine's loop, nor the log record of the malformed chain.
            gc.collect()
            assert s.mem.reap() == 0
    first = runs["c-chain"]
    for tag, got in runs.items():
        for k, (a, b) in enumerate(zip(first, got, strict=True)):
            assert a == b, f"{tag}: batch {k} differs from the per-chain loop on the C engine"
    one = first[0]
    assert [n for _i, n, _d in one if _i == 4] == [0]  # the malformed chain: completed, nothing written
    assert {i for i, _n, _d in one} == set(range(8))
    # INIT (1) + 8 + 3 + 8 chains on the request queue, the FORGET on hiprio, whichever loop
    assert {c["chains"] for c in calls.values()} == {19} and {c["forgets"] for c in calls.values()} == {1}
    assert len({(c["served"], c["fallbacks"]) for c in calls.values()}) == 1
    for tag, c in calls.items():
        if tag.endswith("-fast"):
            # only what the fast path declined reached Python (GETXATTR, ACCESS twice, the big READ) and INIT
            # (before the fast path is on, through the per-chain loop)
            assert c["chain"] == 1 and c["slow"] == 1 + c["fallbacks"], (tag, c)
        else:
            assert c["chain"] == 19 + 1 and c["slow"] == 1 + c["fallbacks"], (tag, c)


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


def long_requests(fe: Frontend, tag: str) -> tuple[list[Any], bytes]:
    """Requests longer than the C engine gathers on its stack (4096 bytes): WRITEs whose data it writes from
    guest memory (answer_iov), in the Linux driver's layout (the header's two parts, then a segment per page)
    and in odd ones (the header itself split, the stack's end inside a segment, more segments than the
    fast path's iovec holds on its stack, more than a pwritev takes), a WRITE to a handle that is not open
    (declined: Python answers it), and a LOOKUP with a name that long (gathered, declined; the file system
    says ENAMETOOLONG); what each batch answered, and the file's bytes after."""
    setup_queues(fe, f"/proc/self/fd/{fe.memfd}", table=False)
    _fuse_init(fe)
    create = {"create": F.make("fuse_create_in", flags=os.O_RDWR | os.O_CREAT, mode=0o100644, umask=0o022),
              "name": b"long"}
    d = batch(fe, 1, [(_req("LOOKUP", {"name": f"cd-{tag}".encode()}, fe), (4096,))])
    cd = F.decode_reply(d[0][2], F.decode_request(_req("LOOKUP", {"name": b"x"}, fe))).args["entry"]
    c = batch(fe, 1, [(_req("CREATE", create, fe, cd.nodeid), (4096,))])
    created = F.decode_reply(c[0][2], F.decode_request(_req("CREATE", create, fe, cd.nodeid)))
    fh, node = created.args["open"].fh, created.args["entry"].nodeid

    def write(off: int, data: bytes, fh: int = fh) -> bytes:
        return _req("WRITE", {"write": F.make("fuse_write_in", fh=fh, offset=off, size=len(data)), "data": data}, fe,
                    node)

    guest = _pattern(124 * 4096, 1)  # what a guest's dd bs=1M sends first
    at_stack = _pattern(4096 - 80, 2)  # the whole request exactly on the stack
    one_over = _pattern(4096 - 80 + 1, 3)
    odd = _pattern(20_000, 4)
    many = _pattern(1100 * 16 - 80, 5)
    o1, o2, o3, o4 = len(guest), len(guest) + len(at_stack), len(guest) + len(at_stack) + len(one_over), 600_000
    o5 = o4 + len(odd)
    w = batch(fe, 1, [
        (write(0, guest), (16, 8), (40, 40, *[4096] * 124)),
        (write(o1, at_stack), (16, 8)),
        (write(o2, one_over), (16, 8)),
        (write(o3 + 4096, one_over, fh=fh + 1000), (16, 8), (4097,)),  # no such handle: Python's EBADF
        (write(o4, odd), (16, 8), (17, 23, 3000, 1500, 15_540)),  # the header split; the stack ends mid-segment
        (write(o5, many), (16, 8), tuple([16] * 1100)),  # 1100 segments: more than IOV_MAX
        (_req("LOOKUP", {"name": b"n" * 4090}, fe, cd.nodeid), (4096,), (40, 4091)),
    ])
    want = bytearray(o5 + len(many))
    for off, data in ((0, guest), (o1, at_stack), (o2, one_over), (o4, odd), (o5, many)):
        want[off:off + len(data)] = data
    rel = batch(fe, 1, [(_req("RELEASE", {"release": F.make("fuse_release_in", fh=fh)}, fe, node), (4096,))])
    return [_identity_out_of(d), _identity_out_of(c), sorted(w), rel], bytes(want)


def _identity_out_of(t: Transcript) -> Transcript:
    return [(i, n, _identity_out(d)) for i, n, d in t]


def test_a_request_longer_than_the_stack_answers_as_the_per_chain_loop(share: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The C engine's answer_iov (a WRITE's data written from guest memory) against the pure-Python engine and
    the per-chain loop (both gather the request first), byte for byte, and the file the same."""
    runs: dict[str, list[Any]] = {}
    for engine, loop in LOOPS:
        tag = f"{engine}-{loop}"
        with engine_loop(monkeypatch, engine, loop):
            with session(share) as (fe, s, _t):
                runs[tag], want = long_requests(fe, tag)
                fast = s.server._fast
                assert fast is not None
                served, _errors, _fallbacks = fast.counts()
                assert served.get(F.spec.OPCODE_BY_NAME["WRITE"].value) == 5, (tag, served)
            assert (share / f"cd-{tag}" / "long").read_bytes() == want, tag
            gc.collect()
            assert s.mem.reap() == 0, tag
    first = runs["c-chain"]
    for tag, got in runs.items():
        for k, (a, b) in enumerate(zip(first, got, strict=True)):
            assert a == b, f"{tag}: batch {k} differs from the per-chain loop on the C engine"
    w = first[2]
    assert [n for _i, n, _d in w] == [24, 24, 24, 16, 24, 24, 16]
    assert [int.from_bytes(d[16:20], "little") for _i, n, d in w if n == 24] == [
        124 * 4096, 4096 - 80, 4096 - 79, 20_000, 1100 * 16 - 80]
    errors = [int.from_bytes(d[4:8], "little", signed=True) for _i, n, d in w if n == 16]
    assert errors == [-9, -36]  # EBADF, ENAMETOOLONG
