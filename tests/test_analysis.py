"""The analysis layer on scripted message sequences: pairing, inode map, submounts/syncfs, lints, stats,
filters.  Every lint fires exactly once in its own sequence, and none fires on the clean sample."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dissectors import fuse as F
from dissectors.spec import fuse as spec
from fsinspect.analysis import Analyzer, FilterError, compile_filter
from fsinspect.analysis import exchange as X
from fsinspect.analysis.render import exchange_json, exchange_line
from fsinspect.analysis.stats import percentile
from fsinspect.recording.reader import RecordingReader
from fsinspect.recording.replay import analyze

SAMPLE = Path(__file__).resolve().parent.parent / "recordings" / "samples" / "fusedev-workload.pcapng"
FLAG = spec.INIT_FLAGS.by_name()
SUBMOUNT = spec.ATTR_FLAGS.by_name()["SUBMOUNT"]


class Script:
    """Drives an Analyzer like a virtio capture: each request takes a free descriptor head on queue 1."""

    def __init__(self, *, heads: bool = True) -> None:
        self.an = Analyzer()
        self.unique = 0
        self.t = 1_000_000_000
        self.heads = heads
        self.next_head = 0

    def tick(self, ns: int = 1000) -> int:
        self.t += ns
        return self.t

    def request(self, op: str, args: dict[str, Any] | None = None, nodeid: int = 0, *, queue: int = 1,
                head: int | None = None, unique: int | None = None) -> tuple[int, int | None]:
        if unique is None:
            self.unique += 2
            unique = self.unique
        if head is None and self.heads:
            head = self.next_head
            self.next_head = (self.next_head + 1) % 128
        raw = F.encode_request(op, args or {}, unique=unique, nodeid=nodeid)
        self.an.feed_request(raw, queue, head if self.heads else None, self.tick())
        return unique, head

    def reply(self, op: str, unique: int, args: dict[str, Any] | None = None, *, error: int = 0, queue: int = 1,
              head: int | None = None, latency: int = 1000) -> X.Exchange:
        raw = F.encode_reply(op, args or {}, unique=unique, error=error)
        return self.an.feed_reply(raw, queue, head, self.tick(latency))

    def call(self, op: str, args: dict[str, Any] | None = None, nodeid: int = 0, reply: dict[str, Any] | None = None,
             *, error: int = 0, latency: int = 1000) -> X.Exchange:
        u, h = self.request(op, args, nodeid)
        return self.reply(op, u, reply, error=error, head=h, latency=latency)

    def init(self, flags: int = FLAG["DO_READDIRPLUS"] | FLAG["SUBMOUNTS"]) -> X.Exchange:
        return self.call("INIT", {"init": F.make("fuse_init_in", major=7, minor=45, flags=flags & 0xFFFFFFFF,
                                                 flags2=flags >> 32)},
                         reply={"init_out": F.make("fuse_init_out", major=7, minor=45, flags=flags & 0xFFFFFFFF,
                                                   flags2=flags >> 32, max_write=1 << 20)})

    def lookup(self, parent: int, name: bytes, nodeid: int, ino: int, gen: int = 0, attr_flags: int = 0,
               op: str = "LOOKUP") -> X.Exchange:
        entry = F.make("fuse_entry_out", nodeid=nodeid, generation=gen,
                       attr=F.make("fuse_attr", ino=ino, mode=0o40755, flags=attr_flags))
        return self.call(op, {"name": name}, parent, {"entry": entry})

    def forget(self, nodeid: int, nlookup: int) -> X.Exchange:
        _u, _h = self.request("FORGET", {"forget": {"nlookup": nlookup}}, nodeid, queue=0, head=0)
        return self.an.exchanges[-1]

    def lints(self) -> Counter[str]:
        self.an.finish()
        return Counter(lint.name for lint in self.an.lints)


def direntplus(entries: list[tuple[bytes, int, int, int]]) -> list[tuple[Any, bytes]]:
    """(name, nodeid, ino, attr flags) -> READDIRPLUS records."""
    out = []
    for i, (nm, nodeid, ino, fl) in enumerate(entries):
        rec = F.make("fuse_direntplus", entry_out=F.make("fuse_entry_out", nodeid=nodeid,
                                                          attr=F.make("fuse_attr", ino=ino, flags=fl)),
                     dirent=F.make("fuse_dirent", ino=ino, off=i + 1, type=4))
        out.append((rec, nm))
    return out


def guest_session() -> Script:
    """What the proxy saw on a real guest: a tmpfs submount announced by READDIRPLUS, SYNCFS on 1 and 4."""
    s = Script()
    s.init()
    s.call("GETATTR", {"getattr": {}}, 1, {"attr_out": {"attr": {"ino": 2, "mode": 0o40755}}})
    s.call("READDIRPLUS", {"read": {"fh": 1, "size": 4096}}, 1,
           {"entries": direntplus([(b".", 0, 2, 0), (b"..", 0, 2, 0), (b"sub", 4, 1, SUBMOUNT),
                                   (b"file", 5, 12, 0)])})
    s.lookup(4, b"inner", 6, 12)  # ino 12 again, but on the submount's superblock: no collision
    s.lookup(1, b"dir", 7, 30)
    s.call("SYNCFS", {"syncfs": {}}, 1, latency=1_600_000)
    s.call("SYNCFS", {"syncfs": {}}, 4, latency=8_000_000)
    s.call("GETXATTR", {"getxattr": {"size": 0}, "name": b"user.x"}, 5, error=38)  # no INIT flag for xattrs
    s.call("SETLK", {"lk": {}}, 5, error=38)  # POSIX_LOCKS not negotiated: ENOSYS is legitimate
    s.forget(5, 1)
    s.forget(7, 1)
    return s


def test_clean_guest_sequence_fires_no_lint_and_tracks_submounts_and_syncfs() -> None:
    s = guest_session()
    assert s.lints() == Counter()
    an = s.an
    assert list(an.submounts.announced) == [4]
    a = an.submounts.announced[4]
    assert (a.parent, a.name, a.ino) == (1, b"sub", 1)
    assert [(r.nodeid, r.is_root, r.latency_ns, r.error) for r in an.submounts.syncfs] == [
        (1, True, 1_600_000, 0), (4, True, 8_000_000, 0)]
    assert an.inodes.superblock(6) == 4 and an.inodes.superblock(7) == 1
    assert an.inodes.path(6) == "/sub/inner"
    assert 5 not in an.inodes.nodes and 7 not in an.inodes.nodes  # forgotten to zero
    assert an.inodes.get(4).nlookup == 1 and an.inodes.get(4).submount
    rdp = next(e for e in an.exchanges if e.opname == "READDIRPLUS")
    assert rdp.submount
    assert [e.index for e in an.exchanges if compile_filter("submount")(e)] == [
        rdp.index, *[e.index for e in an.exchanges if e.nodeid == 4]]


def test_clean_recorded_sample_fires_no_lint() -> None:
    with RecordingReader(SAMPLE) as r:
        an = analyze(r)
    assert an.lints == []
    assert len(an.exchanges) > 50 and all(e.decode_error is None for e in an.exchanges)
    assert all(e.replied for e in an.exchanges if e.expects_reply)


def _orphan_reply(s: Script) -> None:
    s.reply("LOOKUP", 99, error=2, head=5)


def _no_reply(s: Script) -> None:
    s.request("LOOKUP", {"name": b"lost"}, 1)


def _duplicate(s: Script) -> None:
    _u1, _ = s.request("GETATTR", {"getattr": {}}, 1, head=9)
    u2, _ = s.request("GETATTR", {"getattr": {}}, 1, head=9)
    s.reply("GETATTR", u2, {"attr_out": {"attr": {"ino": 2}}}, head=9)


def _mismatch(s: Script) -> None:
    u, h = s.request("GETATTR", {"getattr": {}}, 1)
    s.reply("GETATTR", u + 100, {"attr_out": {"attr": {"ino": 2}}}, head=h)


def _collision(s: Script) -> None:
    s.lookup(1, b"a", 2, 100)
    s.lookup(1, b"b", 3, 100)  # same (ino, generation), same superblock


def _forget_unknown(s: Script) -> None:
    s.forget(77, 1)


def _underflow(s: Script) -> None:
    s.lookup(1, b"a", 2, 100)
    s.forget(2, 2)


def _syncfs_not_root(s: Script) -> None:
    s.lookup(1, b"dir", 2, 100)
    s.call("SYNCFS", {"syncfs": {}}, 1)
    s.call("SYNCFS", {"syncfs": {}}, 2)


def _supported_error(s: Script) -> None:
    s.call("SETLK", {"lk": {}}, 1, error=38)


def _decode_error(s: Script) -> None:
    bad = F.encode_request("LOOKUP", {"name": b"x"}, unique=500, nodeid=1)[:-1]  # no NUL
    bad = len(bad).to_bytes(4, "little") + bad[4:]
    s.an.feed_request(bad, 1, 40, s.tick())
    s.reply("LOOKUP", 500, error=2, head=40)


def _stuck(s: Script) -> None:
    u, h = s.request("GETATTR", {"getattr": {}}, 1)
    s.an.check_stuck(s.t + 999_000_000)  # not yet
    s.an.check_stuck(s.t + 1_000_001_000)  # still waiting: linted now, before any reply
    s.an.check_stuck(s.t + 5_000_000_000)  # once
    s.reply("GETATTR", u, {"attr_out": {"attr": {"ino": 2}}}, head=h, latency=6_000_000_000)


LINT_SCRIPTS = {
    X.ORPHAN_REPLY: (_orphan_reply, 0),
    X.NO_REPLY: (_no_reply, 0),
    X.DUPLICATE_IN_FLIGHT: (_duplicate, 0),
    X.UNIQUE_MISMATCH: (_mismatch, 0),
    X.INO_COLLISION: (_collision, 0),
    X.FORGET_UNKNOWN: (_forget_unknown, 0),
    X.NLOOKUP_UNDERFLOW: (_underflow, 0),
    X.SYNCFS_NOT_ROOT: (_syncfs_not_root, 0),
    X.ERROR_SUPPORTED_OP: (_supported_error, FLAG["POSIX_LOCKS"]),
    X.DECODE_ERROR: (_decode_error, 0),
    X.STUCK: (_stuck, 0),
}


def test_every_lint_has_a_script() -> None:
    assert set(LINT_SCRIPTS) == set(X.LINTS)


@pytest.mark.parametrize("lint", sorted(LINT_SCRIPTS))
def test_lint_fires_exactly_once(lint: str) -> None:
    fn, extra_flags = LINT_SCRIPTS[lint]
    s = Script()
    s.init(FLAG["DO_READDIRPLUS"] | extra_flags)
    fn(s)
    assert s.lints() == Counter({lint: 1})
    (found,) = s.an.lints
    ex = s.an.exchanges[found.exchange]
    assert ex.lints == [lint] and found.message
    assert compile_filter(f'lint == "{lint}"')(ex) and compile_filter("lint")(ex)


def test_requests_in_flight_are_numbered_pending_and_completed_in_place() -> None:
    s = Script()
    s.init()
    opened: list[tuple[int, str, list[str]]] = []
    finished: list[int] = []
    s.an.pending_listeners.append(lambda ex: opened.append((ex.n, ex.state, list(ex.lints))))
    s.an.listeners.append(lambda ex: finished.append(ex.n))
    u1, h1 = s.request("LOOKUP", {"name": b"a"}, 1)
    u2, h2 = s.request("GETATTR", {"getattr": {}}, 1)
    t_req = s.t
    assert opened == [(2, "pending", []), (3, "pending", [])] and finished == []
    assert [e.n for e in s.an.pending] == [2, 3] and s.an.find(3) is s.an.exchanges[2]
    d = exchange_json(s.an.find(3), now_ns=t_req + 2_500_000)
    assert d["n"] == 3 and d["state"] == "pending" and d["age_ms"] == 2.5
    s.an.check_stuck(t_req + 1_500_000_000)  # both waited longer than the default 1 s: linted while pending
    assert [(n, lints) for n, _st, lints in opened[2:]] == [(2, [X.STUCK]), (3, [X.STUCK])]
    ex = s.reply("GETATTR", u2, {"attr_out": {"attr": {"ino": 2}}}, head=h2, latency=2_000_000_000)
    assert ex.n == 3 and ex.state == "done" and finished == [3] and s.an.find(3) is None
    assert "age_ms" not in exchange_json(ex, now_ns=s.t) and ex.lints == [X.STUCK]
    # A reply may name its exchange by number (a UI attached to a proxy pairs them that way).
    ex = s.an.feed_reply(F.encode_reply("LOOKUP", {}, unique=u1, error=2), 1, None, s.tick(), n=2)
    assert ex.n == 2 and ex.errname == "ENOENT" and s.an.pending == []
    assert (u1, h1) != (0, None)


def test_a_late_reply_is_stuck_too_and_the_threshold_is_configurable() -> None:
    an = Analyzer(stuck_ns=50_000_000)
    raw = F.encode_request("GETATTR", {"getattr": {}}, unique=2, nodeid=1)
    an.feed_request(raw, 1, 0, 1_000_000_000)
    an.feed_request(F.encode_request("GETATTR", {"getattr": {}}, unique=4, nodeid=1), 1, 1, 1_000_000_000)
    an.feed_reply(F.encode_reply("GETATTR", {"attr_out": {}}, unique=2), 1, 0, 1_060_000_000)  # 60 ms
    an.feed_reply(F.encode_reply("GETATTR", {"attr_out": {}}, unique=4), 1, 1, 1_040_000_000)  # 40 ms
    assert [e.lints for e in an.exchanges] == [[X.STUCK], []]
    assert "took 60.0ms" in an.lints[0].message and "threshold 50.0ms" in an.lints[0].message
    off = Analyzer(stuck_ns=0)
    off.feed_request(raw, 1, 0, 0)
    assert off.check_stuck(10**12) == [] and off.lints == []


def test_a_stream_that_ends_with_unanswered_requests_keeps_them_pending() -> None:
    s = Script()
    s.init()
    s.request("MKDIR", {"mkdir": {"mode": 0o755}, "name": b"d"}, 1)
    t_req = s.t
    s.call("GETATTR", {"getattr": {}}, 1, {"attr_out": {"attr": {"ino": 2}}}, latency=3_000_000_000)
    s.an.finish()
    ex = s.an.exchanges[1]
    assert ex.state == "pending" and not ex.replied
    assert sorted(ex.lints) == [X.NO_REPLY, X.STUCK]  # waited 3 s by the recording's last capture
    assert exchange_json(ex, now_ns=s.an.last_ts)["age_ms"] == round((s.an.last_ts - t_req) / 1e6, 1)


def test_held_requests_and_replies() -> None:
    s = Script()
    s.init()
    seen: list[tuple[int, str]] = []
    s.an.pending_listeners.append(lambda ex: seen.append((ex.n, ex.state)))
    raw = F.encode_request("MKDIR", {"mkdir": {"mode": 0o755}, "name": b"d"}, unique=10, nodeid=1)
    ex = s.an.feed_request(raw, 1, 7, s.tick(), held=True)
    assert ex.state == "held" and ex.held == X.HELD_REQUEST
    assert exchange_json(ex)["held"] == "request"
    s.an.check_stuck(s.t + 10**10)
    assert X.STUCK not in ex.lints  # the UI shows it held; not stuck while the user holds it
    assert s.an.resume(ex.n, "released") is ex and ex.state == "pending" and "released by the debugger" in ex.notes
    # Its reply is held too: the exchange stays open with the reply decoded, then a rewrite replaces it.
    entry = F.make("fuse_entry_out", nodeid=5, attr=F.make("fuse_attr", ino=50, mode=0o40755))
    s.an.feed_reply(F.encode_reply("MKDIR", {"entry": entry}, unique=10), 1, 7, s.tick(), held=True)
    assert ex.state == "held" and ex.held == X.HELD_REPLY and ex.error == 0 and s.an.find(ex.n) is ex
    s.an.feed_reply(F.encode_reply("MKDIR", {}, unique=10, error=13), 1, 7, s.tick(), notes=["rewritten"])
    assert ex.state == "done" and ex.errname == "EACCES" and 5 not in s.an.inodes.nodes
    assert seen == [(ex.n, "held"), (ex.n, "pending"), (ex.n, "held")]
    # A held reply released as it was completes the exchange with that reply.
    u, h = s.request("GETATTR", {"getattr": {}}, 1)
    s.an.feed_reply(F.encode_reply("GETATTR", {"attr_out": {"attr": {"ino": 2}}}, unique=u), 1, h, s.tick(),
                    held=True)
    n = s.an.exchanges[-1].n
    done = s.an.resume(n, "released")
    assert done is not None and done.state == "done" and done.error == 0 and s.an.pending == []
    assert s.an.resume(n, "released") is None


def test_duplicate_pairs_the_reply_with_the_newer_request() -> None:
    s = Script()
    s.init()
    _duplicate(s)
    s.an.finish()
    first, second = s.an.exchanges[1:3]
    assert not first.replied and "displaced by #3" in first.notes[0]  # the `#` numbers, 1-based
    assert second.replied and second.error == 0


def test_decode_failures_are_flagged_exchanges_not_exceptions() -> None:
    s = Script()
    s.init()
    an = s.an
    for raw in (b"", b"\x01\x02", b"\xff" * 40, F.encode_request("LOOKUP", {"name": b"x"}, unique=8)[:30]):
        ex = an.feed_request(raw, 1, 3, s.tick())
        assert ex.decode_error is not None and ex.req_raw == raw
        an.feed_reply(b"\x00\x01", 1, 3, s.tick())
    # A reply whose body does not fit its request's opcode.
    u, h = s.request("GETATTR", {"getattr": {}}, 1)
    short = F.encode_reply("GETATTR", {"attr_out": {}}, unique=u)[:-20]  # 84 bytes: no fuse_attr_out layout
    ex = an.feed_reply(len(short).to_bytes(4, "little") + short[4:], 1, h, s.tick())
    assert ex.decode_error is not None and ex.decode_error.startswith("reply:") and ex.reply_raw is not None
    line = exchange_line(ex)
    assert "GETATTR" in line and "<reply:" in line
    assert exchange_json(ex)["reply_raw"] == ex.reply_raw.hex()


def test_fusedev_pairing_by_unique_and_init_epochs() -> None:
    s = Script(heads=False)
    s.init()
    u1, _ = s.request("LOOKUP", {"name": b"a"}, 1)
    u2, _ = s.request("LOOKUP", {"name": b"b"}, 1)
    s.reply("LOOKUP", u2, error=2)  # out of order
    s.reply("LOOKUP", u1, error=2)
    s.request("GETATTR", {"getattr": {}}, 1)  # lost in the remount
    s.unique = 0  # a new INIT: uniques restart
    s.init()
    s.lookup(1, b"a", 2, 10)
    lints = s.lints()
    assert lints == Counter({X.NO_REPLY: 1})
    an = s.an
    assert [(e.opname, e.epoch, e.unique, e.errname) for e in an.exchanges[:3]] == [
        ("INIT", 1, 2, None), ("LOOKUP", 1, 4, "ENOENT"), ("LOOKUP", 1, 6, "ENOENT")]
    assert an.exchanges[-1].epoch == 2 and an.exchanges[-1].unique == 4 and an.epoch == 2
    assert an.inodes.get(2) is not None  # the map was reset at the new INIT and rebuilt


def test_inode_map_follows_nlookup_renames_and_unlinks() -> None:
    s = Script()
    s.init()
    s.lookup(1, b"d", 2, 20, op="MKDIR")
    s.lookup(2, b"f", 3, 30)
    s.lookup(2, b"f", 3, 30)  # a second lookup of the same entry
    s.call("READDIRPLUS", {"read": {}}, 2, {"entries": direntplus([(b".", 0, 20, 0), (b"f", 3, 30, 0)])})
    inodes = s.an.inodes
    assert inodes.get(3).nlookup == 3 and inodes.get(2).nlookup == 1
    s.call("RENAME", {"rename": {"newdir": 1}, "name": b"f", "newname": b"g"}, 2)
    assert inodes.path(3) == "/g"
    s.call("RENAME2", {"rename": {"newdir": 1, "flags": 2}, "name": b"d", "newname": b"g"}, 1)  # EXCHANGE
    assert inodes.path(2) == "/g" and inodes.path(3) == "/d"
    s.call("UNLINK", {"name": b"d"}, 1)
    assert inodes.get(3).parent is None and inodes.get(3).nlookup == 3
    s.an.feed_request(F.encode_request("BATCH_FORGET", {"batch": {"count": 2}, "forgets": [
        {"nodeid": 3, "nlookup": 3}, {"nodeid": 2, "nlookup": 1}]}, unique=900), 0, 1, s.tick())
    assert 3 not in inodes.nodes and 2 not in inodes.nodes and inodes.live() == 1
    s.lookup(1, b"l", 9, 90, op="SYMLINK")
    s.call("LINK", {"link": {"oldnodeid": 9}, "newname": b"l2"}, 1,
           {"entry": F.make("fuse_entry_out", nodeid=9, attr=F.make("fuse_attr", ino=90))})
    assert inodes.get(9).nlookup == 2 and inodes.path(9) == "/l2"
    assert s.lints() == Counter()


def test_dotdot_lookups_and_unknown_ancestors_do_not_confuse_the_map() -> None:
    s = Script()
    s.init()
    s.lookup(1, b"d", 2, 20)
    s.lookup(2, b"..", 1, 0)  # EXPORT_SUPPORT: LOOKUP ".." answers the root
    inodes = s.an.inodes
    assert inodes.get(1).parent is None and inodes.path(2) == "/d" and inodes.get(1).nlookup == 2
    # Nodes under parents named before the capture began: same unknown parent -> same superblock (lint),
    # different unknown parents -> unknown relation (no lint).
    s.lookup(50, b"x", 60, 777)
    s.lookup(51, b"y", 61, 777)
    assert s.an.lints == []
    s.lookup(50, b"z", 62, 777)
    assert [lint.name for lint in s.an.lints] == [X.INO_COLLISION]


def test_decoded_messages_feed_like_raw_ones() -> None:
    an = Analyzer()
    req = F.decode_request(F.encode_request("LOOKUP", {"name": b"x"}, unique=4, nodeid=1))
    rep = F.decode_reply(F.encode_reply("LOOKUP", {"entry": {"nodeid": 2, "attr": {"ino": 5}}}, unique=4), req)
    an.feed_request(req, 1, 0, 10)
    ex = an.feed_reply(rep, 1, 0, 35)
    assert ex.request is req and ex.reply is rep and ex.latency_ns == 25 and an.inodes.get(2).ino == 5


def test_stats_counts_errors_percentiles_bytes_and_rate() -> None:
    s = Script()
    s.init()
    for i in range(1, 101):
        s.call("GETATTR", {"getattr": {}}, 1, {"attr_out": {}}, latency=i * 1000)
    for _ in range(3):
        s.call("LOOKUP", {"name": b"no"}, 1, error=2)
    s.t += 2_000_000_000
    s.call("LOOKUP", {"name": b"no"}, 1, error=13)
    s.an.finish()
    st = s.an.stats
    g = st.ops["GETATTR"]
    assert g.count == 100 and g.latency() == {"p50": 50_000, "p90": 90_000, "p99": 99_000, "max": 100_000}
    assert st.errors == Counter({"ENOENT": 3, "EACCES": 1})
    assert st.ops["LOOKUP"].errors == Counter({"ENOENT": 3, "EACCES": 1})
    assert g.req_bytes == 100 * (40 + 16) and g.reply_bytes == 100 * (16 + 104)
    rates = st.ops_per_second()
    assert sum(r for _, r in rates) == st.total == 105 and rates[-1][1] == 1
    # Only seconds with exchanges count: the 2 s gap adds no empty buckets, its length shows in the offsets.
    assert all(r > 0 for _, r in rates) and rates[-1][0] - rates[-2][0] >= 2 and len(rates) == st.active_seconds
    assert percentile([], 50) is None and percentile([7], 99) == 7


FILTER_CASES = {
    'op == LOOKUP and name ~ "fo+"': ["LOOKUP foo"],
    "error != 0": ["LOOKUP nope", "LOOKUP foo"],
    "error == ENOENT": ["LOOKUP nope"],
    "error == EACCES": ["LOOKUP foo"],
    "latency > 1ms": ["SYNCFS 4"],
    "latency >= 1.5ms and latency < 3ms": ["SYNCFS 4"],
    "nodeid == 4": ["SYNCFS 4"],
    "queue == 0": ["FORGET 2"],
    "submount": ["READDIRPLUS 1", "SYNCFS 4"],
    "lint": ["FORGET 2"],
    'lint == "forget-unknown"': ["FORGET 2"],
    "not (op == LOOKUP) and nodeid != 1 and not lint": ["INIT 0", "SYNCFS 4"],
    'op ~ "^READDIR" || op == fuse_forget': ["READDIRPLUS 1", "FORGET 2"],
    'name == "sub"': ["READDIRPLUS 1"],
}


def _filter_session() -> list[X.Exchange]:
    s = Script()
    s.init()
    s.call("LOOKUP", {"name": b"nope"}, 1, error=2)
    s.call("LOOKUP", {"name": b"foo"}, 1, error=13)
    s.call("READDIRPLUS", {"read": {}}, 1, {"entries": direntplus([(b"sub", 4, 1, SUBMOUNT)])})
    s.call("SYNCFS", {"syncfs": {}}, 4, latency=2_000_000)
    s.forget(2, 1)
    s.an.finish()
    return s.an.exchanges


@pytest.mark.parametrize("expr", list(FILTER_CASES))
def test_filter_examples(expr: str) -> None:
    exchanges = _filter_session()
    pred = compile_filter(expr)
    got = [f"{e.opname} {e.request.get('name').decode() if e.request.get('name') else e.nodeid}"
           for e in exchanges if pred(e)]
    assert got == FILTER_CASES[expr]


@pytest.mark.parametrize(("expr", "column", "message"), [
    ("op == LOKUP", 7, "unknown opcode 'LOKUP'"),
    ("latency > 1parsec", 12, "unexpected"),
    ("nodeid = 4", 8, "'=' is not a comparison: use '=='"),
    ('name ~ "fsi', 8, 'unterminated string: no closing "'),
    ("op = LOOKUP", 4, "use '=='"),
    ("name == 'x'", 9, "double quotes"),
    ("op == LOOKUP & error", 14, "use '&&' or 'and'"),
    ("foo == 3", 1, "unknown field 'foo'"),
    ("name > 3", 6, "name compares with == != or ~"),
    ("error == ENOPE", 10, "unknown errno name 'ENOPE'"),
    ("op == LOOKUP and and", 18, "unexpected 'and'"),
    ("(op == READ", 12, "unexpected end of expression (expected ')')"),
    ("nodeid", 1, "unknown flag 'nodeid'"),
    ("nodeid == 5ms", 11, "a duration makes sense only for latency"),
    ('lint == "nope"', 9, "unknown lint 'nope'"),
    ('name ~ "("', 9, "bad regular expression"),
    ("   ", 1, "empty filter"),
])
def test_filter_errors_point_at_the_column(expr: str, column: int, message: str) -> None:
    with pytest.raises(FilterError) as ei:
        compile_filter(expr)
    e = ei.value
    assert e.column == column and message in e.message
    line, caret = str(e).splitlines()[1:]
    assert line == f"  {expr}" and caret == "  " + " " * (column - 1) + "^"


def test_lints_keep_exact_counts_and_a_bounded_recent_sample_per_kind() -> None:
    """A session of weeks: the lints kept stop growing at X.LINTS_PER_KIND per kind, counts stay exact, and
    the summary says how many more it counted."""
    from fsinspect.analysis.render import lints_json

    s = Script()
    s.init()
    extra = 2_500
    for i in range(X.LINTS_PER_KIND + extra):
        s.reply("LOOKUP", 1_000_000 + i, error=2, head=5)  # an orphan reply each
    s.forget(77, 1)
    an = s.an
    assert an.lints.counts[X.ORPHAN_REPLY] == X.LINTS_PER_KIND + extra
    assert an.lints.total == X.LINTS_PER_KIND + extra + 1
    kept = list(an.lints)
    assert len(kept) == len(an.lints) == X.LINTS_PER_KIND + 1
    orphans = [lint for lint in kept if lint.name == X.ORPHAN_REPLY]
    assert f"unique {1_000_000 + extra} " in orphans[0].message  # the oldest ones went
    assert kept[-1].name == X.FORGET_UNKNOWN  # in the order they were raised
    assert an.lints.dropped(X.ORPHAN_REPLY) == extra and an.lints.dropped(X.FORGET_UNKNOWN) == 0
    tail = lints_json(an)[-1]
    assert tail["kind"] == X.ORPHAN_REPLY and tail["not_kept"] == extra and f"{extra} more not kept" in tail["message"]


def test_syncfs_records_and_rate_buckets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from fsinspect.analysis import inodes, stats

    s = Script()
    s.init()
    for _ in range(inodes.SYNCFS_KEEP + 10):
        s.call("SYNCFS", {"syncfs": {}}, 1)
    assert len(s.an.submounts.syncfs) == inodes.SYNCFS_KEEP
    monkeypatch.setattr(stats, "RATE_BUCKETS", 64)
    st = stats.Stats()
    for sec in range(1, 1001):  # 1000 seconds, one exchange each: buckets merge, the total and rate stay true
        ex = X.Exchange(sec, 0, None, 1, 2, spec.OPCODE_BY_NAME["GETATTR"].value, 1, req_ts=sec * 1_000_000_000, reply_ts=sec * 1_000_000_000 + 10, replied=True)
        st.add(ex)
    assert st.active_seconds <= 64 and st.bucket_ns == 16_000_000_000
    assert sum(n for _t, n in st.ops_per_second()) * st.bucket_ns / 1e9 == pytest.approx(1000)
    assert st.rate()["peak_ops_per_bucket"] == 16


@pytest.mark.parametrize("lazy", [False, True])
def test_an_interrupt_ends_with_the_request_it_interrupts(lazy: bool) -> None:
    """/dev/fuse: libfuse answers an INTERRUPT only with EAGAIN.  One left unanswered stayed in the pending
    map for good (keyed by its unique): a session with many signals grew without bound."""
    s = Script(heads=False)
    s.an = Analyzer(lazy=lazy)
    s.init()
    for _ in range(50):
        u, _h = s.request("READ", {"read": {"size": 4096}}, 5)
        s.request("INTERRUPT", {"interrupt": {"unique": u}})
        s.reply("READ", u, error=4)  # EINTR
    eagain, _h = s.request("INTERRUPT", {"interrupt": {"unique": 10**6}})
    s.reply("INTERRUPT", eagain, error=11)  # EAGAIN: the one reply an INTERRUPT may get
    assert s.an.pending == [] and s.an._interrupts == {}
    intr = [e for e in s.an.exchanges if e.opname == "INTERRUPT"]
    assert len(intr) == 51 and all(e.state == X.DONE for e in intr)
    assert "completed; no reply to the INTERRUPT" in intr[0].notes[-1]
    assert s.an.stats.ops["INTERRUPT"].count == 51
    assert s.an.finish() == []
