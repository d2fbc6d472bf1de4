"""Fuzz the pcapng reader: mutated sample recordings, and recordings of scapy-crafted random messages.

The reader must refuse a bad file with RecordingError (one line) and nothing else, and give back exactly
what the writer wrote; the codecs must raise only DecodeError on whatever the records hold.  CI runs a
small budget; `./scripts/check --slow` runs 1M cases per target (FSI_SLOW_CASES).
"""

from __future__ import annotations

import os
import random
import struct
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
from fsinspect.recording.reader import RecordingError, RecordingReader
from fsinspect.recording.writer import RecordingWriter
from tests.fuzzbudget import SLOW_CASES, fuzz

CI_CASES = int(os.environ.get("FSI_FUZZ_EXAMPLES", "300"))
SAMPLES = [p.read_bytes() for p in
           sorted((Path(__file__).resolve().parent.parent / "recordings" / "samples").glob("*.pcapng"))]


def _read_all(path: Path) -> list[Any]:
    """Every record, each decoded by the codecs (DecodeError allowed); RecordingError is a refusal."""
    try:
        with RecordingReader(path) as r:
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
    recs = _read_all(path)
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


@pytest.mark.slow
def test_fuzz_reader_mutated_samples_1m(tmp_path: Path) -> None:
    _mutated(tmp_path, SLOW_CASES)


@pytest.mark.slow
def test_fuzz_reader_scapy_crafted_1m(tmp_path: Path) -> None:
    _crafted(tmp_path, SLOW_CASES)
