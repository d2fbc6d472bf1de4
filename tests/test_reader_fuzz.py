"""Fuzz the pcapng reader: mutated sample recordings, and recordings of scapy-crafted random messages.

The reader must refuse a bad file with RecordingError (one line) and nothing else, and give back exactly
what the writer wrote; the codecs must raise only DecodeError on whatever the records hold.  CI runs a
small budget (hypothesis, shrinking) plus a small budget of the seeded campaigns; `./scripts/check --slow` runs
the campaigns at 1M cases per target (FSI_SLOW_CASES; FSI_FUZZ_SEED to replay one).
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as hs
from scapy.packet import fuzz as scapy_fuzz

import dissectors.scapy as S
from dissectors import fuse as F
from dissectors import vhost_user as V
from dissectors.errors import DecodeError
from dissectors.spec import fuse as spec
from fsinspect.recording import format as fmt
from fsinspect.recording.reader import RecordingError, RecordingReader
from fsinspect.recording.writer import RecordingWriter
from tests.fuzzbudget import SLOW_CASES, fuzz, report

CI_CASES = int(os.environ.get("FSI_FUZZ_EXAMPLES", "300"))
SAMPLES = [p.read_bytes() for p in
           sorted((Path(__file__).resolve().parent.parent / "recordings" / "samples").glob("*.pcapng"))]


def _read_all(path: Path, one_file: bool = False) -> list[Any]:
    """Every record, each decoded by the codecs (DecodeError allowed); RecordingError is a refusal."""
    try:
        with RecordingReader(path, one_file=one_file) as r:
            recs = list(r)
    except RecordingError as e:
        assert "\n" not in str(e), str(e)
        return []
    for rec in recs:
        try:
            if not rec.is_fuse:
                V.decode_message(rec.data)
            elif rec.inbound:
                F.decode_request(rec.data, wire_len=rec.orig_len if rec.snapped else None)
            else:
                F.decode_reply(rec.data, None)
        except DecodeError:
            pass
    return recs


@hs.composite
def mutated_recording(draw: hs.DrawFn) -> bytes:
    b = bytearray(draw(hs.sampled_from(SAMPLES)))
    for _ in range(draw(hs.integers(1, 6))):
        kind = draw(hs.integers(0, 4))
        pos = draw(hs.integers(0, len(b) - 4))
        if kind == 0:
            b[pos] ^= 1 << draw(hs.integers(0, 7))
        elif kind == 1:  # a block length, option length or captured length that lies
            struct.pack_into("<I", b, pos, draw(hs.sampled_from([0, 1, 4, 12, 28, 0x7FFFFFFF, 0xFFFFFFFF,
                                                                 len(b), len(b) - pos])))
        elif kind == 2:
            del b[pos:]  # a crash's truncated tail
            if len(b) < 8:
                break
        elif kind == 3:
            struct.pack_into("<H", b, pos, draw(hs.integers(0, 0xFFFF)))  # option codes and lengths
        else:
            b[pos:pos] = b[pos:pos + draw(hs.integers(1, 200))]  # a repeated slice
    return bytes(b)


def _mutated_case(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    _read_all(path)


@hs.composite
def crafted_messages(draw: hs.DrawFn) -> list[tuple[bool, bytes]]:
    """Requests and replies from the scapy layers with random field values (scapy's fuzz(), seeded)."""
    rnd = random.Random(draw(hs.integers(0, 2**32)))
    out = []
    for _ in range(draw(hs.integers(1, 8))):
        op = draw(hs.sampled_from(spec.OPCODES))
        state = random.getstate()
        random.seed(rnd.random())  # scapy's random values come from the random module
        try:
            if draw(hs.booleans()) or op.value not in S.REPLY_LAYERS:
                pkt = S.FuseIn(unique=rnd.randrange(1, 1 << 20)) / scapy_fuzz(S.REQUEST_LAYERS[op.value]())
                inbound = True
            else:
                pkt = S.FuseOut(unique=rnd.randrange(1, 1 << 20)) / scapy_fuzz(S.REPLY_LAYERS[op.value]())
                inbound = False
            raw = bytes(pkt)
        finally:
            random.setstate(state)
        out.append((inbound, raw))
    return out


def _crafted_case(path: Path, msgs: list[tuple[bool, bytes]]) -> None:
    with RecordingWriter(path, source="virtio", snaplen=0) as w:
        for inbound, raw in msgs:
            (w.request if inbound else w.reply)(raw, queue=1)
    recs = _read_all(path, one_file=True)
    assert [(r.inbound, r.data) for r in recs] == msgs


def _mutated(tmp_path: Path, cases: int, derandomize: bool = False) -> int:
    path = tmp_path / "mutated.pcapng"
    return fuzz("reader: mutated sample recordings", mutated_recording(), lambda d: _mutated_case(path, d),
                cases, derandomize=derandomize)


def _crafted(tmp_path: Path, cases: int, derandomize: bool = False) -> int:
    path = tmp_path / "crafted.pcapng"
    return fuzz("reader: scapy-crafted random messages", crafted_messages(), lambda m: _crafted_case(path, m),
                cases, derandomize=derandomize)


def test_fuzz_reader_mutated_samples(tmp_path: Path) -> None:
    assert _mutated(tmp_path, CI_CASES, derandomize=True) == CI_CASES


def test_fuzz_reader_scapy_crafted(tmp_path: Path) -> None:
    assert _crafted(tmp_path, CI_CASES // 3, derandomize=True) == CI_CASES // 3


# -- seeded campaigns (fast enough for 1M cases: no hypothesis draw per byte, windows of the samples) -----------

def _blocks(data: bytes) -> list[bytes]:
    """A pcapng file cut into its blocks (the samples are well-formed)."""
    out, off = [], 0
    while off < len(data):
        total = struct.unpack_from("<I", data, off + 4)[0]
        out.append(data[off:off + total])
        off += total
    return out


SAMPLE_BLOCKS = [_blocks(d) for d in SAMPLES]
SAMPLE_HEADS = [b"".join(b for b in blocks if struct.unpack_from("<I", b)[0] in (fmt.BT_SHB, fmt.BT_IDB))
                for blocks in SAMPLE_BLOCKS]


def _window(rnd: random.Random) -> bytearray:
    """A real recording cut short: its section header and interfaces, then a run of 1..8 consecutive blocks
    from anywhere in it (a real file's records in a real order, so the mutations land on real fields)."""
    i = rnd.randrange(len(SAMPLE_BLOCKS))
    blocks = SAMPLE_BLOCKS[i]
    start = rnd.randrange(len(blocks))
    return bytearray(SAMPLE_HEADS[i] + b"".join(blocks[start:start + rnd.randint(1, 8)]))


def _mutate(rnd: random.Random, b: bytearray) -> bytes:
    for _ in range(rnd.randint(1, 6)):
        kind = rnd.randrange(5)
        pos = rnd.randrange(max(1, len(b) - 4))
        if kind == 0:
            b[pos] ^= 1 << rnd.randrange(8)
        elif kind == 1:  # a block length, option length or captured length that lies
            struct.pack_into("<I", b, pos, rnd.choice((0, 1, 4, 12, 28, 0x7FFFFFFF, 0xFFFFFFFF, len(b), len(b) - pos)))
        elif kind == 2:
            del b[pos:]  # a crash's truncated tail
            if len(b) < 8:
                break
        elif kind == 3:
            struct.pack_into("<H", b, pos, rnd.randrange(0x10000))  # option codes and lengths
        else:
            b[pos:pos] = b[pos:pos + rnd.randint(1, 200)]  # a repeated slice
    return bytes(b)


def _campaign(name: str, cases: int, seed: int, case: Any) -> None:
    rnd = random.Random(seed)
    path = Path(tempfile.mkdtemp(prefix="fsi-reader-fuzz-", dir="/dev/shm")) / "r.pcapng"
    t0 = time.monotonic()
    try:
        for i in range(cases):
            try:
                case(rnd, path)
            except AssertionError as e:
                raise AssertionError(f"{name}: seed {seed} case {i}: {e}") from None
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
    report(name, cases, time.monotonic() - t0, f"seed {seed}")


def _window_case(rnd: random.Random, path: Path) -> None:
    data = _window(rnd)
    path.write_bytes(_mutate(rnd, data) if rnd.random() < 0.9 else bytes(data))
    _read_all(path, one_file=rnd.random() < 0.9)  # a tenth also looks for rotated parts (their ids are read)


class _CraftedPool:
    """Requests and replies crafted once with the scapy layers' fuzz() (every opcode, seeded); each case
    records a random handful of them and reads them back."""

    def __init__(self, rnd: random.Random, n: int = 3000) -> None:
        state = random.getstate()
        random.seed(rnd.random())
        try:
            self.msgs: list[tuple[bool, bytes]] = []
            for _ in range(n):
                op = rnd.choice(spec.OPCODES)
                if rnd.random() < 0.5 or op.value not in S.REPLY_LAYERS:
                    pkt = S.FuseIn(unique=rnd.randrange(1, 1 << 20)) / scapy_fuzz(S.REQUEST_LAYERS[op.value]())
                    self.msgs.append((True, bytes(pkt)))
                else:
                    pkt = S.FuseOut(unique=rnd.randrange(1, 1 << 20)) / scapy_fuzz(S.REPLY_LAYERS[op.value]())
                    self.msgs.append((False, bytes(pkt)))
        finally:
            random.setstate(state)

    def case(self, rnd: random.Random, path: Path) -> None:
        _crafted_case(path, [rnd.choice(self.msgs) for _ in range(rnd.randint(1, 8))])


def _seed() -> int:
    return int(os.environ.get("FSI_FUZZ_SEED", time.time_ns() % 2**32))


def test_reader_campaigns() -> None:
    _campaign("reader: windows of the sample recordings, mutated", CI_CASES * 10, 1, _window_case)
    _campaign("reader: scapy-crafted messages recorded and read back", CI_CASES * 3, 1,
              _CraftedPool(random.Random(1), 500).case)


@pytest.mark.slow
def test_fuzz_reader_mutated_samples_1m() -> None:
    _campaign("reader: windows of the sample recordings, mutated", SLOW_CASES, _seed(), _window_case)


@pytest.mark.slow
def test_fuzz_reader_scapy_crafted_1m() -> None:
    seed = _seed()
    _campaign("reader: scapy-crafted messages recorded and read back", SLOW_CASES, seed,
              _CraftedPool(random.Random(seed)).case)
