"""The packet-block scanner (fsinspect/recording/scan.py): the C scanner and its pure-Python twin.

Both take exactly the blocks the general parser reads as canonical packets, with the same fields, and stop
in front of everything else; the stream reader gives the same messages whichever runs, and in any chunks.
The C scanner and the twin agree row for row and on where they stop, on every byte of a block changed and
on fuzzed streams.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import strategies as hs

from fsinspect.recording import format as fmt
from fsinspect.recording import reader as rreader
from fsinspect.recording import scan as rscan
from fsinspect.recording.reader import Record, StreamReader
from fsinspect.recording.scan import Row, scan_python
from tests.fuzzbudget import fuzz
from tests.test_live_stream import STREAM, WHOLE, mutated

CI_CASES = int(os.environ.get("FSI_FUZZ_EXAMPLES", "300"))
MAX = 16 << 20

try:
    from fsinspect.recording import _scan  # type: ignore[attr-defined]  # configured by scan.py's import
except ImportError:  # no compiler: the twin alone runs (scripts/setup said so)
    _scan = None
SCANNERS = {"python": scan_python} | ({"c": _scan.scan} if _scan is not None else {})
needs_c = pytest.mark.skipif(_scan is None, reason="the C scanner did not build")


@pytest.fixture(params=sorted(SCANNERS))
def scanner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The stream reader with one scanner or the other."""
    monkeypatch.setattr(rreader, "scan", SCANNERS[request.param])
    yield request.param


def _as_record(item: Any) -> Any:
    return rreader._row_record(item) if isinstance(item, Row) else item


def test_the_backend_loaded_is_the_c_one_unless_forced() -> None:
    assert rscan.BACKEND == ("python" if os.environ.get("FSINSPECT_SCAN", "").lower() == "python" or _scan is None
                             else "c")


def test_rows_are_the_general_parsers_records(scanner: str) -> None:
    """The whole stream: canonical packets come as rows (and the same Records without `rows`), packets with
    notes through the general parser, custom blocks as messages; the same list as a parse without rows."""
    items = StreamReader(rows=True).feed(STREAM)
    assert sum(isinstance(x, Row) for x in items) >= 30  # every packet but those with a note
    assert all(not isinstance(x, Record) or x.notes for x in items)
    assert [_as_record(x) for x in items] == WHOLE
    assert StreamReader().feed(STREAM) == WHOLE


def _chunks(cuts: list[int]) -> None:
    r = StreamReader(rows=True)
    out: list[Any] = []
    pos = 0
    for c in [*sorted(cuts), len(STREAM)]:
        out += r.feed(STREAM[pos:c])
        pos = c
    assert [_as_record(x) for x in out] == WHOLE and r.pending == 0


def test_any_chunking_gives_the_same_rows(scanner: str) -> None:
    fuzz(f"scan-chunking-{scanner}", hs.lists(hs.integers(0, len(STREAM)), max_size=30), _chunks, CI_CASES // 2)


def _copied(cuts: list[int]) -> None:
    r = StreamReader(rows=True)
    r.copy = []
    out: list[Any] = []
    pos = 0
    for c in [*sorted(cuts), len(STREAM)]:
        out += r.feed(STREAM[pos:c])
        pos = c
    want, p = [], 0  # every block but the custom ones, each as it came
    while p < len(STREAM):
        btype, total = int.from_bytes(STREAM[p:p + 4], "little"), int.from_bytes(STREAM[p + 4:p + 8], "little")
        if btype != fmt.BT_CB:
            want.append((btype, STREAM[p:p + total]))
        p += total
    assert r.copy == want
    assert [_as_record(x) for x in out] == WHOLE  # (the scanner's rows too: a copy decodes nothing more)
    assert sum(isinstance(x, Row) for x in out) >= 30


def test_a_copy_gets_each_block_as_it_came(scanner: str) -> None:
    """The headless near-copy (StreamReader.copy): every block but the custom ones, in any chunking, with the
    canonical packets still taken by the scanner."""
    fuzz(f"scan-copy-{scanner}", hs.lists(hs.integers(0, len(STREAM)), max_size=30), _copied, CI_CASES // 3)


def _ifaces() -> int:
    r = StreamReader()
    r.feed(STREAM)
    return len(r.sections[-1].interfaces)


ROWS = [x for x in StreamReader(rows=True).feed(STREAM) if isinstance(x, Row)]


def _both(buf: bytes, pos: int, n_ifaces: int, max_block: int = MAX) -> tuple[list[Row], int]:
    """The C scanner's answer, checked against the twin's."""
    want = scan_python(buf, pos, 1000, n_ifaces, max_block)
    got = _scan.scan(buf, pos, 1000, n_ifaces, max_block)
    assert (got[0], got[1]) == want
    assert all(type(r) is Row for r in got[0])
    return want


@needs_c
def test_c_and_twin_agree_on_every_byte_of_a_packet_block_changed() -> None:
    """Each byte of a numbered packet block and of the blocks up to the next but one, set to 0, 0xff and a bit
    flipped:
    the two scanners take the same rows and stop at the same place (a layout field that differs stops both;
    data bytes do not)."""
    n = _ifaces()
    start = ROWS[0].offset  # the first canonical packet (the very first one has a note)
    end = ROWS[2].offset
    rows, stop = _both(STREAM, start, n)
    assert rows and rows[0] == ROWS[0]._replace(offset=start + 1000)
    taken = stopped = 0
    for i in range(start, end):
        for v in {0, 0xFF, STREAM[i] ^ 0x01}:
            b = bytearray(STREAM)
            b[i] = v
            rows, stop = _both(bytes(b), start, n)
            taken += stop > start
            stopped += stop == start
    assert taken and stopped


@needs_c
def test_c_and_twin_agree_on_limits() -> None:
    n = _ifaces()
    start = ROWS[0].offset
    whole = _both(STREAM, start, n)
    assert whole[0]
    assert _both(STREAM, start, 0) == ([], start)  # interface not defined yet: the general parser says so
    assert _both(STREAM, start, n, max_block=16) == ([], start)  # over the limit: refused by the general parser
    for cut in (start + 7, start + 40, ROWS[1].offset - 1):  # incomplete blocks wait for more bytes
        assert _both(STREAM[:cut], start, n)[1] <= cut
    assert _both(STREAM, len(STREAM), n) == ([], len(STREAM))
    with pytest.raises(ValueError):
        _scan.scan(STREAM, len(STREAM) + 1, 0, n, MAX)


def _agree(data: bytes) -> None:
    for pos in (0, min(len(data), ROWS[0].offset)):
        _both(data, pos, 3)


@needs_c
def test_c_and_twin_agree_on_fuzzed_streams() -> None:
    fuzz("scan-c-vs-twin", hs.one_of(mutated(), hs.binary(max_size=2048)), _agree, CI_CASES)
