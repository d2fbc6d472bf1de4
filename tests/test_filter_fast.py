"""A replay's whole-file filter reads no more of each exchange than the expression needs (its records' headers,
the saved rows, a body decoded on demand); the matches are the same as with every exchange decoded whole.
Differential: fixed expressions and random ones (hypothesis) over real guest recordings and a recording made to
hold the awkward cases (orphans, notifications, bad bodies, a positive error, snapped READ/WRITE, two INITs)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from dissectors import fuse as F
from dissectors.spec import fuse as spec
from fsinspect.analysis.filter import DECODE, FULL, HEADER, ROWS, TABLE, compile_filter, filter_costs
from fsinspect.recording.indexed import IndexedRecording
from fsinspect.recording.writer import RecordingWriter

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "recordings" / "samples"


def _awkward(path: Path) -> None:
    """Every case where a header and a whole decode could disagree, a few hundred exchanges."""
    attr = F.make("fuse_attr", ino=7, size=4096, mode=0o100644, nlink=1)
    entry = F.make("fuse_entry_out", nodeid=42, generation=1, attr=attr)
    sub = F.make("fuse_entry_out", nodeid=43, generation=1, attr=F.make("fuse_attr", ino=8, flags=1))
    init_rq = F.encode_request("INIT", {"init": F.make("fuse_init_in", major=7, minor=38, flags=0)}, unique=1)
    init_rp = F.encode_reply("INIT", {"init_out": F.make("fuse_init_out", major=7, minor=38, max_write=1 << 20)},
                             unique=1)
    with RecordingWriter(path, snaplen=64) as w:
        ts = 1_000_000
        for _epoch in range(2):
            w.request(init_rq, 1, 0, ts)
            w.reply(init_rp, 1, 0, ts + 5)
            for u in range(2, 160):
                ts += 1000
                h = u % 16
                if u % 11 == 0:
                    w.request(F.encode_request("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, unique=u,
                                               nodeid=42), 0, None, ts)
                    continue
                if u % 13 == 0:  # an orphan reply, then a notification (unique 0)
                    w.reply(F.encode_reply("GETATTR", unique=u + 1000, error=2), 1, 99, ts)
                    w.reply(F.encode_reply("LOOKUP", unique=0), 1, None, ts + 1)
                    continue
                if u % 7 == 0:
                    rq = F.encode_request("READ", {"read": F.make("fuse_read_in", fh=7, size=4096)}, unique=u, nodeid=42)
                    rp = F.encode_reply("READ", {"data": bytes(4096)}, unique=u)
                elif u % 5 == 0:
                    rq = F.encode_request("WRITE", {"write": F.make("fuse_write_in", fh=7, size=300),
                                                    "data": bytes(300)}, unique=u, nodeid=42)
                    rp = F.encode_reply("WRITE", {"write_out": F.make("fuse_write_out", size=300)}, unique=u)
                elif u % 17 == 0:  # a body cut short: undecodable
                    rq = F.encode_request("LOOKUP", {"name": b"cut"}, unique=u, nodeid=1)
                    rp = F.encode_reply("LOOKUP", {"entry": entry}, unique=u)[:40]
                elif u % 19 == 0:  # an error field that is no errno
                    rq = F.encode_request("GETATTR", {"getattr": F.make("fuse_getattr_in")}, unique=u, nodeid=42)
                    rp = F.encode_reply("GETATTR", unique=u)
                    rp = rp[:4] + (5).to_bytes(4, "little", signed=True) + rp[8:]
                elif u % 23 == 0:  # a short request header
                    rq, rp = b"\x10\x00\x00\x00\x01\x00\x00\x00", None
                else:
                    name = f"file-{u}".encode()
                    rq = F.encode_request("LOOKUP", {"name": name}, unique=u, nodeid=1 if u % 3 else 43, uid=u % 4)
                    rp = F.encode_reply("LOOKUP", {"entry": sub if u == 4 else entry}, unique=u) if u % 4 \
                        else F.encode_reply("LOOKUP", unique=u, error=2)
                w.request(rq, 1, h, ts, layout=((len(rq), 0),) if u % 29 == 0 else ())
                if rp is not None and u % 31:  # every 31st never answered
                    w.reply(rp, 1, h, ts + (u % 9) * 400_000)
            ts += 1_000_000


@pytest.fixture(scope="module", params=["guest-syncfs.pcapng", "fusedev-workload.pcapng", "awkward"])
def rec(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IndexedRecording]:
    d = tmp_path_factory.mktemp("fast")
    p = d / f"{request.param}.pcapng"
    if request.param == "awkward":
        _awkward(p)
    else:
        shutil.copy(SAMPLES / request.param, p)
    with IndexedRecording(p) as r:
        r.build_analysis()
        yield r


def _check(rec: IndexedRecording, text: str) -> None:
    pred = compile_filter(text, path_of=lambda e: rec.path(e.index) or "")
    costs = filter_costs(text)
    want = list(rec.scan(pred))  # every exchange decoded whole
    assert list(rec.scan(pred, costs=costs)) == want, text


FIXED = ["error == ENOENT", "error", "not error", "op == LOOKUP", "op ~ \"READ\"", "latency > 1ms", "len > 100",
         "reply_len >= 16", "nodeid == 42 and queue == 1", "unique < 50 or epoch == 2", "pending", "snapped",
         "orphan", "bad", "lint", "lint == \"no-reply\"", "lint ~ \"decode\"", "submount", "path ~ \"file\"",
         "name ~ \"file-1\"", "op == LOOKUP and name == \"file-10\"", "read.size >= 4096", "header.uid == 2",
         "entry.attr.ino == 7", "write.size > 0 and not snapped", "head == 3", "index > 10 and index < 60",
         "init.minor == 38", "error == 5", "not (op == FORGET) and reply_len == 0"]


@pytest.mark.parametrize("text", FIXED)
def test_fixed_expressions_match_the_whole_decode(rec: IndexedRecording, text: str) -> None:
    _check(rec, text)


def test_costs_come_from_the_field_table() -> None:
    assert filter_costs("op == LOOKUP and error == ENOENT and latency > 1ms") == {HEADER}
    assert filter_costs("path ~ \"x\" or lint") == {ROWS}
    assert filter_costs("name ~ \"x\" and op == LOOKUP") == {DECODE, HEADER}
    assert filter_costs("read.size > 0") == {DECODE}
    assert filter_costs("bad") == {FULL}
    cheap = {k for k, f in TABLE.items() if f.cost == HEADER}
    assert {"op", "unique", "nodeid", "error", "len", "queue", "latency"} <= cheap


def test_a_header_pass_decodes_only_what_has_no_request_header(rec: IndexedRecording,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A HEADER expression decodes no body, but for the few exchanges read whole (orphans, notifications, a
    short request, an error field that is no errno): none in the real recordings."""
    text = "error == ENOENT or op == GETATTR"
    want = list(rec.scan(compile_filter(text)))
    rec._cache.clear()
    decoded = [0]
    real = F.decode_request

    def counting(*a: Any, **k: Any) -> Any:
        decoded[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(F, "decode_request", counting)
    assert list(rec.scan(compile_filter(text), costs=filter_costs(text))) == want
    whole = sum(1 for i in range(len(rec)) if rec.index.offsets(i)[0] is None) + (20 if "awkward" in
                                                                                   str(rec.parts[0]) else 0)
    assert decoded[0] <= whole


_NUMS = [f for f, x in TABLE.items() if x.kind == "number"]
_VALS = ["0", "1", "2", "3", "7", "42", "100", "4096", "0x10"]
_OPS = [o.name for o in spec.OPCODES[:8]] + ["LOOKUP", "GETATTR", "READ", "WRITE", "FORGET", "INIT", "SYNCFS"]


def _atoms() -> hs.SearchStrategy[str]:
    cmp = hs.sampled_from(["==", "!=", "<", "<=", ">", ">="])
    num = hs.builds(lambda f, c, v: f"{f} {c} {v}", hs.sampled_from(_NUMS), cmp, hs.sampled_from(_VALS))
    lat = hs.builds(lambda c, v: f"latency {c} {v}", cmp, hs.sampled_from(["1us", "500us", "1ms", "2ms", "1s"]))
    err = hs.builds(lambda c, v: f"error {c} {v}", hs.sampled_from(["==", "!="]),
                    hs.sampled_from(["ENOENT", "EIO", "ENOSYS"]))
    op = hs.builds(lambda c, v: f"op {c} {v}", hs.sampled_from(["==", "!="]), hs.sampled_from(_OPS))
    opre = hs.builds(lambda v: f"op ~ \"{v}\"", hs.sampled_from(["READ", "^GET", "LINK", "X"]))
    text = hs.builds(lambda f, c, v: f"{f} {c} \"{v}\"", hs.sampled_from(["name", "path"]),
                     hs.sampled_from(["==", "!=", "~"]), hs.sampled_from(["file-1", "f", "", "sub", "/", "file-10"]))
    lint = hs.builds(lambda c, v: f"lint {c} \"{v}\"", hs.sampled_from(["==", "!=", "~"]),
                     hs.sampled_from(["no-reply", "orphan-reply", "decode-error", "stuck"]))
    dec = hs.builds(lambda f, c, v: f"{f} {c} {v}",
                    hs.sampled_from(["read.size", "header.uid", "entry.attr.ino", "write.size", "entry.nodeid",
                                     "getattr.fh", "init.minor", "header.pid"]), cmp, hs.sampled_from(_VALS))
    flag = hs.sampled_from([k for k, f in TABLE.items() if f.flag is not None])
    return hs.one_of(num, lat, err, op, opre, text, lint, dec, flag)


_EXPR = hs.recursive(_atoms(), lambda inner: hs.one_of(
    hs.builds(lambda a, b: f"({a}) and ({b})", inner, inner),
    hs.builds(lambda a, b: f"{a} or {b}", inner, inner),
    hs.builds(lambda a: f"not ({a})", inner)), max_leaves=6)


@settings(max_examples=int(os.environ.get("FSI_FILTER_CASES", "60")), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(text=_EXPR)
def test_random_expressions_match_the_whole_decode(rec: IndexedRecording, text: str) -> None:
    _check(rec, text)
