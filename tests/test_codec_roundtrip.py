"""Every opcode and notify code round-trips encode -> decode -> encode, generated from the spec."""

from __future__ import annotations

import pytest

from dissectors import fuse as F
from dissectors.spec import fuse as fspec
from dissectors.spec.types import Opcode
from tests.specgen import ALL_NOTIFIES, ALL_OPCODES, normalise_dirents, sample_args


@pytest.mark.parametrize("op", ALL_OPCODES, ids=lambda o: o.name)
def test_request_roundtrip(op: Opcode) -> None:
    args = sample_args(op.request)
    raw = F.encode_request(op, args, unique=0x1122334455, nodeid=77, uid=1000, gid=100, pid=4242)
    req = F.decode_request(raw)
    assert req.op is op and req.unique == 0x1122334455 and req.nodeid == 77
    assert req.header.len == len(raw)
    assert req.args == args
    assert F.encode_request_obj(req) == raw


@pytest.mark.parametrize("op", [o for o in ALL_OPCODES if o.reply is not None], ids=lambda o: o.name)
def test_reply_roundtrip(op: Opcode) -> None:
    req = F.decode_request(F.encode_request(op, sample_args(op.request), unique=9, nodeid=1))
    assert op.reply is not None
    args = sample_args(op.reply)
    if any(p.kind in ("dirents", "direntplus") for p in op.reply):
        args = normalise_dirents(args, plus=op.reply[0].kind == "direntplus")
    raw = F.encode_reply(op, args, unique=9)
    rep = F.decode_reply(raw, req)
    assert isinstance(rep, F.Reply) and rep.error == 0
    assert rep.args == args
    assert F.encode_message(rep) == raw
    err = F.decode_reply(F.encode_reply(op, unique=9, error=2), req)
    assert isinstance(err, F.Reply) and err.errname == "ENOENT" and err.args == {}


@pytest.mark.parametrize("n", ALL_NOTIFIES, ids=lambda n: n.name)
def test_notify_roundtrip(n: fspec.Notify) -> None:
    args = sample_args(n.body)
    raw = F.encode_notify(n, args)
    msg = F.decode_reply(raw, None)
    assert isinstance(msg, F.Notification) and msg.notify is n
    assert msg.args == args
    assert F.encode_message(msg) == raw


def test_every_opcode_in_enum_and_tables() -> None:
    assert {o.value for o in ALL_OPCODES} == {v for _, v in fspec.OPCODE.values}
    assert fspec.OPCODE_BY_NAME["SYNCFS"].value == 50
    assert max(o.value for o in ALL_OPCODES if o.value < 4096) == 53  # COPY_FILE_RANGE_64, 7.45
    assert [n.value for n in ALL_NOTIFIES] == list(range(1, 10))  # ... PRUNE = 9 in 7.45


def test_getxattr_size_query_reply_uses_getxattr_out() -> None:
    req = F.decode_request(F.encode_request("GETXATTR", {"getxattr": F.make("fuse_getxattr_in", size=0),
                                                          "name": b"user.x"}, unique=3))
    rep = F.decode_reply(F.encode_reply("GETXATTR", {"xattr": F.make("fuse_getxattr_out", size=12)}, unique=3), req)
    assert rep.args["xattr"].size == 12


def test_compat_init_in_and_setxattr_without_ext() -> None:
    """Older peers send shorter structs: 16-byte fuse_init_in (< 7.36) and 8-byte setxattr_in."""
    raw = F.IN_HEADER.struct.pack(F.IN_HEADER_SIZE + 16, 26, 1, 0, 0, 0, 0, 0, 0) + bytes.fromhex(
        "07000000" "1f000000" "00000200" "01000000")
    req = F.decode_request(raw)
    assert (req.args["init"].minor, req.args["init"].flags2) == (31, 0)
    ctx = F.FuseContext(minor=36, flags=0)
    args = {"setxattr": F.make("fuse_setxattr_in", size=3, flags=1), "name": b"user.a", "value": b"abc"}
    raw = F.encode_request("SETXATTR", args, ctx=ctx)
    assert len(raw) == F.IN_HEADER_SIZE + 8 + 7 + 3
    assert F.decode_request(raw, ctx).args == args


def test_request_extensions_supp_groups() -> None:
    """total_extlen extensions (7.39 FUSE_EXT_GROUPS) are decoded and re-encoded."""
    ext = F.CODECS["fuse_ext_header"].encode(F.make("fuse_ext_header", size=24, type=32))
    ext += (3).to_bytes(4, "little") + b"".join(g.to_bytes(4, "little") for g in (10, 20, 30))
    raw = F.encode_request("MKDIR", {"mkdir": F.make("fuse_mkdir_in", mode=0o755), "name": b"d"}, ext=ext)
    req = F.decode_request(raw)
    assert req.ext[0][1] == [10, 20, 30]
    assert req.args["name"] == b"d"
    assert F.encode_request_obj(req) == raw
