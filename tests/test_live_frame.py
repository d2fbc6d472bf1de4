"""The live stream's packet-block framer (fsinspect/recording/scan.py `frame`): the C framer and its twin.

BlockEncoder.frame makes the control hub's packet blocks in bulk; each must be the bytes the recording
writer's request()/reply() make for the same capture (the stream is a recording: the UI's reader, tshark
and fuse.lua read it), whichever framer runs, and the framers agree item for item on what they frame and
where they leave an item to the writer (INIT, debugger flags, a queue's first message, odd values).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as hs

from dissectors.spec import fuse as fspec
from fsinspect.recording import format as fmt
from fsinspect.recording import scan as rscan
from fsinspect.recording import writer as rwriter
from fsinspect.recording.reader import Record, RecordingReader, StreamReader
from fsinspect.recording.scan import frame_python
from fsinspect.recording.writer import BlockEncoder
from tests.fuzzbudget import fuzz
from tests.test_live_scan import CI_CASES
from tests.test_tui import SYNCFS, WORKLOAD

try:
    from fsinspect.recording import _scan  # type: ignore[attr-defined]  # configured by scan.py's import
except ImportError:  # no compiler: the twin alone runs (scripts/setup said so)
    _scan = None
FRAMERS = {"python": frame_python} | ({"c": _scan.frame} if _scan is not None else {})
needs_c = pytest.mark.skipif(_scan is None, reason="the C framer did not build")
SNAP = 16 * 1024


@pytest.fixture(params=sorted(FRAMERS))
def framer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """BlockEncoder.frame with one framer or the other."""
    monkeypatch.setattr(rscan, "frame", FRAMERS[request.param])
    yield request.param


def _items(path: Path) -> list[Any]:
    """A recording's FUSE messages as capture items, numbered, some with notes or debugger flags, most with
    their descriptor layout (the proxy's captures have one; a 9-tuple or None: none)."""
    out: list[Any] = []
    with RecordingReader(path) as r:
        for k, rec in enumerate(x for x in r.records() if x.is_fuse):
            notes = ["a note", "ünïcode ✓"][:k % 3] if k % 5 == 0 else []
            flags = rec.flags | (fmt.RF_HELD if k % 23 == 0 else 0) | (fmt.RF_SNAPPED if k % 7 == 0 else 0)
            item = (rec.inbound, rec.data[:SNAP], rec.queue, rec.head, rec.ts_ns, rec.orig_len, notes, flags,
                    k // 2 + 1 if k % 11 else 0)
            layout = tuple(rec.layout or ((len(rec.data), 2 * (not rec.inbound)),))
            out.append(item if k % 4 == 0 else (*item, None if k % 4 == 1 else layout))
    return out


def _one_by_one(items: list[Any], framer: Any = None) -> tuple[BlockEncoder, list[bytes]]:
    """Each item through the writer's request()/reply(), which frames with `framer` (None: its own Python)."""
    enc = BlockEncoder(snaplen=SNAP)
    enc.framer = framer
    out = []
    for inbound, data, queue, head, ts, orig, notes, flags, n, *layout in items:
        (enc.request if inbound else enc.reply)(data, queue, head, ts, orig_len=orig, notes=notes, flags=flags,
                                                n=n or None, layout=(layout or [None])[0] or ())
        out.append(enc.take())
    return enc, out


@pytest.mark.parametrize("sample", [SYNCFS, WORKLOAD], ids=["guest-syncfs", "fusedev-workload"])
def test_framed_blocks_are_the_writers(framer: str, sample: Path) -> None:
    items = _items(sample)
    ref, want = _one_by_one(items)
    enc = BlockEncoder(snaplen=SNAP)
    got = []
    for k in range(0, len(items), 37):  # in batches, as the hub frames them
        got += enc.frame(items[k:k + 37])
    assert got == want
    assert enc.header[1:] == ref.header[1:] and enc.fresh == ref.fresh and enc.epoch == ref.epoch  # (ids differ)
    recs = [x for x in StreamReader().feed(b"".join(enc.header) + b"".join(got)) if isinstance(x, Record)]
    assert [(r.inbound, r.data, r.n, r.notes[:len(i[6])], r.layout) for r, i in zip(recs, items)] == \
        [(i[0], i[1], i[8], i[6], list(i[9]) if i[9:] and i[9] else None) for i in items]
    assert len(recs) == len(items)


@pytest.mark.parametrize("sample", [SYNCFS, WORKLOAD], ids=["guest-syncfs", "fusedev-workload"])
def test_the_writer_frames_with_the_framer_and_makes_the_same_bytes(framer: str, sample: Path) -> None:
    """The recording writer frames each FUSE record with the framer (C, or its twin; one call a record: the
    recorder's per-exchange framing on the capture thread), leaving it what the framer leaves (INIT, debugger
    notes, odd values): the bytes are those of its own Python framing, record for record."""
    items = _items(sample)
    _ref, want = _one_by_one(items)
    calls: list[int] = []

    def counting(*a: Any) -> Any:
        calls.append(1)
        return FRAMERS[framer](*a)

    enc, got = _one_by_one(items, counting)
    assert got == want and len(calls) == len(items)
    framed = sum(1 for i in items if FRAMERS[framer]([i], 0, enc._fuse_ifaces, 1, 1 << 62)[1])
    assert framed > len(items) * 3 // 4  # (most of them: not the INIT, the debugger's, the odd ones)


def test_what_the_framer_leaves_to_the_writer(framer: str) -> None:
    """An INIT request (a new epoch), a debugger flag (its note), a queue's first message (its interface),
    a message longer than the snap bound: each goes through the writer, the rest is framed."""
    items = _items(SYNCFS)[:12]
    assert items[0][0] and int.from_bytes(items[0][1][4:8], "little") == fspec.OPCODE_BY_NAME["INIT"].value
    assert rscan._OP_INIT == fspec.OPCODE_BY_NAME["INIT"].value
    enc = BlockEncoder(snaplen=SNAP)
    ifaces = enc._fuse_ifaces
    assert FRAMERS[framer](items, 0, ifaces, 0, 1 << 40) == ([], 0)  # no interface yet, and an INIT
    enc.frame(items[:2])
    q = items[2][2]
    assert q in ifaces
    blocks, stop = FRAMERS[framer](items, 2, ifaces, enc.epoch, 1 << 40)
    assert stop > 2 and len(blocks) == stop - 2
    big = (True, b"x" * (rwriter._READ_HEAD + SNAP + 1), q, 1, 5, 99999, [], 0, 3)
    held = (True, items[3][1], q, 1, 5, 0, [], fmt.RF_HELD, 3)
    for odd in (big, held):
        assert FRAMERS[framer]([odd], 0, ifaces, 1, enc._frame_max) == ([], 0)


ODD = [
    (True, b"\x10\0\0\0\x03\0\0\0" + b"\0" * 32, 1, None, 0, 0, [], 0, 0),  # no head, ts 0, orig < len
    (False, b"", 1, 0xFFFFFFFF, (1 << 64) - 1, 1 << 31, ["x" * 65535], 0xFFFF & ~fmt.RF_DEBUGGER, (1 << 64) - 1),
    (True, b"abc", 1, 1, 1, 3, ["\udcff"], 0, 1),  # a note that is not UTF-8
    (True, b"abc", 1, 1, 1, 3, ["x" * 65536], 0, 1),  # a note too long for its option
    (True, b"abc", 1, 1, 1, 3, ["n"] * 17, 0, 1),  # more notes than the framer takes
    (True, b"abc", 1, 1, 1, 3, ("tuple",), 0, 1),
    (True, bytearray(b"abc"), 1, 1, 1, 3, [], 0, 1),
    (True, b"abc", True, 1, 1, 3, [], 0, 1),  # bools are not queue numbers
    (True, b"abc", 1, 1 << 32, 1, 3, [], 0, 1),
    (True, b"abc", 1, -1, 1, 3, [], 0, 1),
    (True, b"abc", 1, 1, -1, 3, [], 0, 1),
    (True, b"abc", 1, 1, 1 << 64, 3, [], 0, 1),
    (True, b"abc", 1, 1, 1, (1 << 32), [], 0, 1),  # an original length its field cannot say
    (True, b"abc", 1, 1, 1, -5, [], 0, 1),
    (True, b"abc", 1 << 16, 1, 1, 3, [], 0, 1),
    (True, b"abc", 2, 1, 1, 3, [], 0, 1),  # no interface for queue 2
    (True, b"abc", 1, 1, 1, 3, [], 1 << 16, 1),
    (True, b"abc", 1, 1, 1, 3, [], 0, -1),
    (True, b"abc", 1, 1, 1, 3, [], 0, 1.0),
    (0, b"abc", 1, 1, 1, 3, [], 0, 1),
    (True, b"abc", 1, 1, 1, 3, [], 0),
    (True, b"abc", 1, 1, 1, 3, [], 0, 1, ((40, 1), (16, 2))),  # a descriptor layout
    (True, b"abc", 1, 1, 1, 3, [], 0, 1, ()),
    (True, b"abc", 1, 1, 1, 3, [], 0, 1, ((0xFFFFFFFF, 0xFFFF),) * 64),
    (True, b"abc", 1, 1, 1, 3, [], 0, 1, ((1, 1),) * 65),  # longer than the framer takes
    (True, b"abc", 1, 1, 1, 3, [], 0, 1, ((1 << 32, 0),)),
    (True, b"abc", 1, 1, 1, 3, [], 0, 1, ((1, 1 << 16),)),
    (True, b"abc", 1, 1, 1, 3, [], 0, 1, ((1, -1),)),
    (True, b"abc", 1, 1, 1, 3, [], 0, 1, ((1, 1, 0),)),
    (True, b"abc", 1, 1, 1, 3, [], 0, 1, [(1, 1)]),
    (True, b"abc", 1, 1, 1, 3, [], 0, 1, ([1, 1],)),
    (True, b"abc", 1, 1, 1, 3, [], 0, 1, ((True, 1),)),
    (True, b"abc", 1, 1, 1, 3, [], 0, 1, None, 5),
    "not a tuple",
]


@needs_c
def test_c_and_twin_agree_on_odd_items() -> None:
    ifaces = {1: 0, 3: 1 << 32}
    for item in [*ODD, (True, b"abc", 3, 1, 1, 3, [], 0, 1)]:
        for items in ([item], [ODD[0], item, ODD[0]]):
            assert _scan.frame(items, 0, ifaces, 7, 1 << 20) == frame_python(items, 0, ifaces, 7, 1 << 20), item


def _agree(items: list[Any]) -> None:
    ifaces = {0: 0, 1: 1, 2: 2}
    for start in (0, len(items) // 2):
        assert _scan.frame(items, start, ifaces, 3, 64) == frame_python(items, start, ifaces, 3, 64)


_ITEM9 = hs.tuples(hs.booleans(), hs.binary(max_size=80), hs.integers(-1, 4), hs.none() | hs.integers(-1, 1 << 33),
                   hs.integers(-1, 1 << 65), hs.integers(-(1 << 33), 1 << 33),
                   hs.lists(hs.text(max_size=8), max_size=3), hs.integers(-1, 1 << 17), hs.integers(-1, 1 << 65))
_LAYOUT = hs.none() | hs.lists(hs.tuples(hs.integers(-1, 1 << 33), hs.integers(-1, 1 << 17)), max_size=66).map(tuple)
ITEM = _ITEM9 | hs.tuples(_ITEM9, _LAYOUT).map(lambda t: (*t[0], t[1]))


@needs_c
def test_c_and_twin_agree_on_fuzzed_items() -> None:
    fuzz("frame-c-vs-twin", hs.lists(ITEM, max_size=6), _agree, CI_CASES)
