"""fuse.lua against the spec: every opcode's request, reply and error reply, and every notification,
encoded by our codec, recorded, then dissected by real tshark; fields must equal our decoder's and no
message may be flagged malformed."""

from __future__ import annotations

from pathlib import Path

from dissectors import fuse as F
from dissectors.spec import fuse as fspec
from fsinspect.recording.reader import RecordingReader
from fsinspect.recording.writer import RecordingWriter
from tests.specgen import ALL_NOTIFIES, ALL_OPCODES, normalise_dirents, sample_args
from tests.test_recording_samples import check_tshark_matches_our_decoder, tshark_fields

ALL_FLAGS = F.ALL_INIT_FLAGS
EXT = fspec.INIT_FLAGS.by_name()["SETXATTR_EXT"]


def _init(w: RecordingWriter, flags: int, unique: int) -> None:
    lo, hi = flags & 0xFFFFFFFF, flags >> 32
    w.request(F.encode_request("INIT", {"init": F.make("fuse_init_in", major=7, minor=45, flags=lo, flags2=hi)},
                               unique=unique), 1, 0)
    w.reply(F.encode_reply("INIT", {"init_out": F.make("fuse_init_out", major=7, minor=45, flags=lo, flags2=hi,
                                                       max_write=1 << 20)}, unique=unique), 1, 0)


def test_every_opcode_and_notification_through_tshark(tmp_path: Path) -> None:
    p = tmp_path / "spec.pcapng"
    unique = 10
    with RecordingWriter(p, source="virtio", snaplen=0) as w:
        _init(w, ALL_FLAGS, 2)
        for n, op in enumerate(o for o in ALL_OPCODES if o.name != "INIT"):
            head = n % 100 + 1
            queue = 0 if op.queue == "hiprio" else 1
            unique += 2
            req_args = sample_args(op.request)
            w.request(F.encode_request(op, req_args, unique=unique, nodeid=7 + n), queue, head)
            if op.reply is None:
                continue
            args = sample_args(op.reply)
            if any(x.kind in ("dirents", "direntplus") for x in op.reply):
                args = normalise_dirents(args, plus=op.reply[0].kind == "direntplus")
            w.reply(F.encode_reply(op, args, unique=unique), queue, head)
            unique += 2  # and an error reply to a second request
            w.request(F.encode_request(op, req_args, unique=unique, nodeid=7 + n), queue, head)
            w.reply(F.encode_reply(op, unique=unique, error=5), queue, head)
        for nt in ALL_NOTIFIES:
            w.reply(F.encode_notify(nt, sample_args(nt.body)), 1, None)
    with RecordingReader(p) as r:
        count = sum(1 for _ in r)
    assert check_tshark_matches_our_decoder(p) == count
    rows = tshark_fields(p, "fuse.reply", "fuse.opcode", "fuse.notify", "fuse.name", "fuse.errno")
    assert sorted({int(r[2]) for r in rows if r[2]}) == [n.value for n in ALL_NOTIFIES]
    assert {r[4] for r in rows if r[4]} == {"EIO"}
    names = {r[3] for r in rows if r[3]}
    assert "name-\u00e9-1" in names or "name-\u00e9-0" in names  # UTF-8 names come through


def test_setxattr_layout_follows_the_negotiated_init(tmp_path: Path) -> None:
    """Without SETXATTR_EXT the kernel sends the 8-byte fuse_setxattr_in; the dissector must follow INIT."""
    p = tmp_path / "setxattr.pcapng"
    old = F.FuseContext(45, ALL_FLAGS & ~EXT)
    new = F.FuseContext(45, ALL_FLAGS)
    args = {"setxattr": F.make("fuse_setxattr_in", size=5, flags=1), "name": b"user.colour", "value": b"green"}
    with RecordingWriter(p, source="fusedev") as w:
        _init(w, ALL_FLAGS & ~EXT, 2)
        w.request(F.encode_request("SETXATTR", args, unique=4, nodeid=3, ctx=old), 0)
        w.reply(F.encode_reply("SETXATTR", unique=4), 0)
        _init(w, ALL_FLAGS, 2)  # a new epoch that negotiates it
        w.request(F.encode_request("SETXATTR", args, unique=4, nodeid=3, ctx=new), 0)
        w.reply(F.encode_reply("SETXATTR", unique=4), 0)
    rows = tshark_fields(p, "fuse.opcode", "fuse.name", "fuse.value", "fuse.setxattr_in.size",
                         "_ws.expert.message", "fuse.epoch")
    sx = [r for r in rows if r[0] == "21" and r[1]]
    assert [(r[1], r[2], r[3], r[5]) for r in sx] == [("user.colour", "677265656e", "5", "1"),
                                                      ("user.colour", "677265656e", "5", "2")]
    assert not any("Malformed" in r[4] or "does not match" in r[4] for r in rows)


def test_the_debuggers_flags_show_in_wireshark(tmp_path: Path) -> None:
    """Format 2: held, injected and rewritten records carry a field and an expert note in tshark."""
    from fsinspect.recording import format as fmt

    p = tmp_path / "debugger.pcapng"
    with RecordingWriter(p, source="virtio") as w:
        _init(w, ALL_FLAGS, 2)
        w.request(F.encode_request("LOOKUP", {"name": b"victim"}, unique=4, nodeid=1), 1, 3, flags=fmt.RF_HELD)
        w.reply(F.encode_reply("LOOKUP", unique=4, error=2), 1, 3, flags=fmt.RF_INJECTED | fmt.RF_PROXY_REPLY)
        w.request(F.encode_request("READ", {"read": F.make("fuse_read_in", size=4)}, unique=6, nodeid=5), 1, 4)
        w.reply(F.encode_reply("READ", unique=6, error=5), 1, 4, flags=fmt.RF_REWRITTEN,
                notes=["rewritten by the debugger; the back-end replied error 0 (ok), len 20"])
        w.request(F.encode_request("GETATTR", {"getattr": F.make("fuse_getattr_in")}, unique=8, nodeid=1), 1, 5)
        w.reply(F.encode_reply("GETATTR", {"attr_out": F.make("fuse_attr_out")}, unique=8), 1, 5)
    rows = tshark_fields(p, "fuse.opcode", "fuse.reply", "fuse.debugger", "_ws.col.Info")
    marked = [(r[0], r[1], r[2]) for r in rows if r[2]]
    assert marked == [("1", "0", "held"), ("1", "1", "injected"), ("15", "1", "rewritten")], rows
    assert any("LOOKUP reply" in r[3] and r[3].endswith("[injected]") for r in rows), rows
    assert not any(r[2] for r in rows if r[0] in ("3", "26")), rows  # untouched exchanges carry nothing
    with RecordingReader(p) as r:
        assert [rec.debugger for rec in r if rec.is_fuse][2:4] == [["held"], ["injected"]]
