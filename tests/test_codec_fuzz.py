"""Fuzz: random and mutated bytes make the decoders raise DecodeError and nothing else.

CI runs a bounded budget (FSI_FUZZ_EXAMPLES=N); `./scripts/check --slow` runs 1M cases per target (FSI_SLOW_CASES).
"""

from __future__ import annotations

import os
import random
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from dissectors import fuse as F
from dissectors import vhost_user as V
from dissectors.errors import DecodeError
from dissectors.spec import fuse as fspec
from dissectors.spec import vhost_user as vspec
from tests.fuzzbudget import SLOW_CASES, report
from tests.specgen import ALL_NOTIFIES, ALL_OPCODES, sample_args

CI_EXAMPLES = int(os.environ.get("FSI_FUZZ_EXAMPLES", "1500"))
OPCODE_VALUES = [o.value for o in ALL_OPCODES]


def _seeds() -> list[tuple[bytes, int | None]]:
    """Valid requests and replies for every opcode and notify: (bytes, opcode for replies or None)."""
    out: list[tuple[bytes, int | None]] = []
    for op in ALL_OPCODES:
        out.append((F.encode_request(op, sample_args(op.request), unique=5, nodeid=2), None))
        if op.reply is not None:
            out.append((F.encode_reply(op, sample_args(op.reply), unique=5), op.value))
    for n in ALL_NOTIFIES:
        out.append((F.encode_notify(n, sample_args(n.body)), 0))
    return out


SEEDS = _seeds()
VHOST_SEEDS = [
    V.encode_message(V.build("SET_VRING_NUM", V.make("vhost_vring_state", index=1, num=128))),
    V.encode_message(V.build("SET_VRING_ADDR", V.make("vhost_vring_addr", index=1, descriptor=0x1000))),
    V.encode_message(V.build("ADD_MEM_REG", V.make("vhost_user_mem_reg"))),
    V.encode_message(V.build("SET_MEM_TABLE", [V.make("vhost_user_memory_region", size=4096)] * 2)),
    V.encode_message(V.build("GET_FEATURES", V.u64(0x175000000), reply=True)),
    V.encode_message(V.build("SET_CONFIG", V.make("vhost_user_config", size=4), flags=1)),
]


def _decode_any(buf: bytes, opcode: int | None, strict: bool) -> None:
    ctx = F.FuseContext(strict_names=strict)
    try:
        if opcode is None:
            F.decode_request(buf, ctx)
        else:
            F.decode_reply(buf, opcode or None, ctx)
    except DecodeError as e:
        assert isinstance(e.reason, str) and e.reason
        assert e.offset is None or 0 <= e.offset <= max(len(buf), 1 << 32)


@hs.composite
def mutated(draw: hs.DrawFn) -> tuple[bytes, int | None, bool]:
    raw, opcode = draw(hs.sampled_from(SEEDS))
    b = bytearray(raw)
    for _ in range(draw(hs.integers(0, 4))):
        kind = draw(hs.integers(0, 5))
        if kind == 0 and b:  # flip a byte
            i = draw(hs.integers(0, len(b) - 1))
            b[i] = draw(hs.integers(0, 255))
        elif kind == 1:  # truncate
            del b[draw(hs.integers(0, len(b))):]
        elif kind == 2:  # append junk
            b += draw(hs.binary(max_size=64))
        elif kind == 3 and len(b) >= 4:  # make the length field agree with the new size (deeper paths)
            struct.pack_into("<I", b, 0, len(b))
        elif kind == 4 and len(b) >= 40:  # total_extlen / count fields
            struct.pack_into("<H", b, 36, draw(hs.integers(0, 0xFFFF)))
        elif kind == 5 and len(b) >= 8:
            struct.pack_into("<I", b, 4, draw(hs.sampled_from([*OPCODE_VALUES, 0, 7, 99999])))
    strict = draw(hs.booleans())
    reply_op = opcode if opcode is None or draw(hs.booleans()) else draw(hs.sampled_from(OPCODE_VALUES))
    return bytes(b), reply_op, strict


def _settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), derandomize=n <= 5000)


@_settings(CI_EXAMPLES)
@given(mutated())
def test_fuzz_mutated_fuse(case: tuple[bytes, int | None, bool]) -> None:
    _decode_any(*case)


@_settings(CI_EXAMPLES)
@given(hs.binary(max_size=512), hs.sampled_from([None, 0, *OPCODE_VALUES]))
def test_fuzz_random_fuse(buf: bytes, opcode: int | None) -> None:
    _decode_any(buf, opcode, False)


@_settings(CI_EXAMPLES)
@given(hs.sampled_from(VHOST_SEEDS), hs.lists(hs.tuples(hs.integers(0, 200), hs.integers(0, 255)), max_size=4),
       hs.integers(0, 300), hs.booleans())
def test_fuzz_vhost_user(seed: bytes, flips: list[tuple[int, int]], cut: int, backend: bool) -> None:
    b = bytearray(seed)
    for i, v in flips:
        if i < len(b):
            b[i] = v
    b = b[:cut] if cut < len(b) else b
    try:
        V.decode_message(bytes(b), backend_channel=backend)
    except DecodeError as e:
        assert e.proto == "vhost-user"


def test_fuzz_header_length_extremes() -> None:
    """Oversized, undersized and absurd lengths name the problem."""
    raw, _ = SEEDS[0]
    for n, word in ((0, "shorter"), (20, "shorter"), (fspec.MAX_MESSAGE + 1, "exceeds"), (len(raw) + 1, "truncated"),
                    (len(raw) - 1, "mismatch")):
        b = bytearray(raw)
        struct.pack_into("<I", b, 0, n)
        with pytest.raises(DecodeError, match=word):
            F.decode_request(bytes(b))
    with pytest.raises(DecodeError, match="unknown opcode"):
        F.decode_request(F.IN_HEADER.struct.pack(40, 7, 1, 0, 0, 0, 0, 0, 0))
    with pytest.raises(DecodeError, match="missing NUL"):
        F.decode_request(F.IN_HEADER.struct.pack(43, 1, 1, 1, 0, 0, 0, 0, 0) + b"abc")
    with pytest.raises(DecodeError, match="not UTF-8"):
        F.decode_request(F.encode_request("LOOKUP", {"name": b"\xff\xfe"}), F.FuseContext(strict_names=True))
    assert F.decode_request(F.encode_request("LOOKUP", {"name": b"\xff\xfe"})).args["name"] == b"\xff\xfe"
    with pytest.raises(DecodeError, match="unsupported version"):
        V.decode_message(struct.pack("<III", 1, 0, 0))
    with pytest.raises(DecodeError, match="exceeds"):
        V.decode_message(struct.pack("<III", 1, 1, vspec.MAX_PAYLOAD + 1))


def _mutated_rng(rnd: random.Random) -> tuple[bytes, int | None, bool]:
    """The `mutated` strategy's cases from a fast RNG (the same seeds and mutations)."""
    raw, opcode = rnd.choice(SEEDS)
    b = bytearray(raw)
    for _ in range(rnd.randint(0, 4)):
        kind = rnd.randrange(6)
        if kind == 0 and b:
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif kind == 1:
            del b[rnd.randint(0, len(b)):]
        elif kind == 2:
            b += rnd.randbytes(rnd.randint(0, 64))
        elif kind == 3 and len(b) >= 4:
            struct.pack_into("<I", b, 0, len(b))
        elif kind == 4 and len(b) >= 40:
            struct.pack_into("<H", b, 36, rnd.randrange(0x10000))
        elif kind == 5 and len(b) >= 8:
            struct.pack_into("<I", b, 4, rnd.choice([*OPCODE_VALUES, 0, 7, 99999]))
    strict = rnd.random() < 0.5
    reply_op = opcode if opcode is None or rnd.random() < 0.5 else rnd.choice(OPCODE_VALUES)
    return bytes(b), reply_op, strict


def _campaign(cases: int, seed: int) -> None:
    rnd = random.Random(seed)
    t0 = time.monotonic()
    for i in range(cases):
        case = _mutated_rng(rnd)
        try:
            _decode_any(*case)
        except Exception as e:
            raise AssertionError(f"codec fuzz seed {seed} case {i}: {case[0].hex()} op {case[1]}: {e!r}") from e
    report("codec: mutated FUSE messages (seeded)", cases, time.monotonic() - t0, f"seed {seed}")


def test_codec_campaign() -> None:
    _campaign(CI_EXAMPLES * 10, 1)


@pytest.mark.slow
def test_fuzz_mutated_fuse_long() -> None:
    _campaign(SLOW_CASES, int(os.environ.get("FSI_FUZZ_SEED", time.time_ns() % 2**32)))
