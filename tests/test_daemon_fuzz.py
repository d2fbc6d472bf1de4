"""The daemon engine under fuzz.  A hypothesis test of mutated requests (never raises, every reply is well-formed or
the message dropped, it keeps serving, nothing outside the share changes), and the stateful model-checked
campaign of tests/fuzz_engine.py: a small seeded budget in CI, 1M cases in `./scripts/check --slow`.

The hypothesis test: mutated requests against the passthrough engine: it never raises, every reply is well-formed (or the
message is dropped), it keeps serving, and nothing outside the shared directory changes."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.passthrough import Options, PassthroughFS
from daemon.server import Server
from dissectors import fuse as F
from dissectors.errors import DecodeError
from dissectors.spec import fuse as spec
from tests.conftest import require_root
from tests.daemon_client import EngineClient
from tests.fuzz_engine import EngineCampaign, engine_log, tree_snapshot
from tests.fuzzbudget import SLOW_CASES, report

pytestmark = pytest.mark.root

SETTLE_EVERY = 50_000
NO_REPLY = {spec.OPCODE_BY_NAME[n].value for n in ("FORGET", "BATCH_FORGET", "INTERRUPT")}
OPS = [o.name for o in spec.OPCODES if o.name not in ("CUSE_INIT", "NOTIFY_REPLY", "SETLKW")]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EngineClient, Path]]:
    require_root()
    base = tmp_path_factory.mktemp("fuzz")
    shared, outside = base / "shared", base / "outside"
    (shared / "d").mkdir(parents=True)
    (shared / "f").write_bytes(b"data")
    outside.mkdir()
    (outside / "keep").write_bytes(b"precious")
    fs = PassthroughFS(Options(str(shared), xattr=True))
    server = Server(fs, pool_size=2)
    c = EngineClient(server)
    c.init()
    for name in (b"d", b"f"):
        c.lookup(1, name)  # nodeids 2 and 3 exist, so mutated nodeids sometimes hit
    before = tree_snapshot(outside)
    yield c, outside
    server.shutdown()
    fs.close()
    assert tree_snapshot(outside) == before


def _args(op: str, draw: Any) -> dict[str, Any]:
    o = spec.OPCODE_BY_NAME[op]
    args: dict[str, Any] = {}
    names = st.sampled_from([b"f", b"d", b"x", b"..", b".", b"a/b", b"../outside/keep", b"\xff" * 300])
    for p in o.request:
        if p.kind == "struct":
            codec = F.CODECS[p.ref or p.name]
            raw = draw(st.binary(min_size=codec.size, max_size=codec.size))
            args[p.name] = codec.decode(raw)
        elif p.kind == "str":
            args[p.name] = draw(names)
        elif p.kind == "data":
            args[p.name] = draw(st.binary(max_size=64))
        elif p.kind == "array":
            args[p.name] = []
    return args


@st.composite
def requests(draw: Any) -> bytes:
    op = draw(st.sampled_from(OPS))
    nodeid = draw(st.sampled_from([0, 1, 2, 3, 99, 2**64 - 1]))
    try:
        buf = bytearray(F.encode_request(op, _args(op, draw), unique=draw(st.integers(1, 2**32)), nodeid=nodeid,
                                         uid=draw(st.sampled_from([0, 65534])), gid=0))
    except (ValueError, TypeError, struct.error, OverflowError):
        buf = bytearray(F.encode_request("GETATTR", {"getattr": F.make("fuse_getattr_in")}, unique=7, nodeid=1))
    mutation = draw(st.sampled_from(["none", "truncate", "flip", "length", "append"]))
    if mutation == "truncate":
        buf = buf[:draw(st.integers(0, len(buf)))]
    elif mutation == "flip" and len(buf) > 40:
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(40, len(buf) - 1))
            buf[i] = draw(st.integers(0, 255))
    elif mutation == "length" and len(buf) >= 4:
        struct.pack_into("<I", buf, 0, draw(st.integers(0, 2**32 - 1)))
    elif mutation == "append":
        buf += draw(st.binary(min_size=1, max_size=16))
    return bytes(buf)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(raw=requests())
def test_mutated_requests_never_break_the_engine(world: tuple[EngineClient, Path], raw: bytes) -> None:
    _engine_case(world, raw)


def _campaign(seed: int, cases: int) -> None:
    """The stateful model-checked campaign (tests/fuzz_engine.py); a settle (every handle released, every
    nodeid forgotten: fds back to the start) every SETTLE_EVERY cases and at the end."""
    require_root()
    c = EngineCampaign(seed)
    t0 = time.monotonic()
    try:
        with engine_log() as log:
            while c.cases < cases:
                c.step()
                assert not log.bugs, c.fail(f"a traceback was logged: {log.bugs[0]}")
                if c.cases % SETTLE_EVERY == 0:
                    c.settle()
            c.settle()
    finally:
        c.close()
    report("daemon engine: stateful FUSE sequences, mutated", c.cases, time.monotonic() - t0,
           f"seed {seed}, {log.lines} one-line complaints, {c.opcounts()}")


def test_engine_campaign() -> None:
    _campaign(1, int(os.environ.get("FSI_FUZZ_EXAMPLES", "20000")))


@pytest.mark.slow
def test_engine_campaign_1m() -> None:
    _campaign(int(os.environ.get("FSI_FUZZ_SEED", time.time_ns() % 2**32)), SLOW_CASES)


def _engine_case(world: tuple[EngineClient, Path], raw: bytes) -> None:
    c, _outside = world
    no_reply = len(raw) < 40 or struct.unpack_from("<I", raw, 4)[0] in NO_REPLY
    out = c.raw(raw, timeout=0.05 if no_reply else 5.0)
    if not no_reply:
        assert out is not None
    if out is not None:
        ln, err, unique = struct.unpack_from("<IiQ", out)
        assert ln == len(out) and err <= 0 and -err < 4096
        assert unique == struct.unpack_from("<Q", raw, 8)[0]
        try:
            req: Any = F.decode_request(raw, c.server.ctx)
        except DecodeError:
            req = None
        if req is not None:
            F.decode_reply(out, req, c.server.ctx)  # a well-formed reply for that request
    if not c.server.negotiated.done:  # a mutated DESTROY ends the session; the kernel would INIT again
        assert c.init().error == 0
    assert c.call("GETATTR", nodeid=1).error == 0
