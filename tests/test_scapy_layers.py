"""The scapy layers (dissectors/scapy) against the codecs: same fields on every sample message, and
crafted messages that the codecs decode, and encode, byte for byte, for every opcode in the spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from scapy.fields import (
    ConditionalField,
    EnumField,
    FieldLenField,
    FieldListField,
    FlagsField,
    PacketField,
    PacketListField,
    StrField,
    StrFixedLenField,
)
from scapy.packet import NoPayload, Packet

import dissectors.scapy as S
from dissectors import fuse as F
from dissectors import vhost_user as V
from dissectors.fuse import FuseContext
from dissectors.spec import fuse as spec
from dissectors.spec import vhost_user as vspec
from dissectors.structs import Record
from fsinspect.recording.reader import RecordingReader

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "recordings" / "samples").glob("*.pcapng"))
INIT = spec.OPCODE_BY_NAME["INIT"].value


def _norm(v: Any) -> Any:
    """A codec value as plain Python: records as dicts, dirent tuples as dicts with the name."""
    if isinstance(v, Record):
        return v.to_dict()
    if isinstance(v, list):
        return [_norm(x) for x in v]
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], Record) and isinstance(v[1], bytes):
        return {**v[0].to_dict(), "name": v[1]}
    if isinstance(v, bytes):
        return bytes(v)
    return v


def _scapy_args(body: Packet | None) -> dict[str, Any]:
    if body is None or isinstance(body, NoPayload):
        return {}
    assert isinstance(body, S.FuseBody), f"dissected as {type(body).__name__}: {body!r}"
    out = body.part_values()
    for k, v in out.items():
        if isinstance(v, list):  # dirent records: the padding is not a field of the codec's
            out[k] = [{n: x for n, x in item.items() if n != "pad"} if isinstance(item, dict) else item
                      for item in v]
    return out


def _codec_args(msg: F.Message) -> dict[str, Any]:
    return {k: _norm(v) for k, v in msg.args.items()}


def _fuse_body(pkt: Packet) -> Packet | None:
    body = pkt.payload
    return None if isinstance(body, (NoPayload, S.FuseExt)) else body


def _exts(pkt: Packet) -> list[Any]:
    out = []
    layer = pkt.payload
    while not isinstance(layer, NoPayload):
        if isinstance(layer, S.FuseExt):
            out.append(layer.values())
        layer = layer.payload
    return out


def _compare_fuse(pkt: Packet, msg: F.Message) -> None:
    assert S.header_values(pkt) == dict(zip(msg.header._fields, msg.header)), msg
    assert _scapy_args(_fuse_body(pkt)) == _codec_args(msg), msg
    if isinstance(msg, F.Request):
        assert _exts(pkt) == [(eh.to_dict(), v) for eh, v in msg.ext]


def _compare_vhost_user(pkt: Packet, msg: V.VhostUserMessage) -> None:
    assert (int(pkt.request), int(pkt.flags), int(pkt.size)) == (msg.request, msg.flags, len(bytes(pkt.payload)))
    body = pkt.payload
    if msg.payload is None:
        assert isinstance(body, NoPayload), msg
        return
    assert isinstance(body, S.VhostUserPayload), f"{msg.name}: dissected as {type(body).__name__}"
    got = body.payload_values()
    if msg.layout == "memory":
        assert got["regions"] == _norm(msg.payload) and got["num_regions"] == msg.extra["num_regions"]
    elif msg.layout == "config":
        assert {k: got[k] for k in ("offset", "size", "flags")} == _norm(msg.payload)
        assert got["region"] == msg.extra["region"]
    elif msg.layout == "raw":
        assert got["data"] == msg.payload
    else:
        assert got == _norm(msg.payload), msg


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_scapy_dissects_every_sample_message_as_the_codecs_do(path: Path) -> None:
    counts = _differential(path)
    assert counts["request"] > 20 and counts["reply"] > 20, counts
    if path.name.startswith("guest"):  # the real guest's recording has the vhost-user setup too
        assert counts["vhost-user"] > 20, counts


@pytest.mark.guest
@pytest.mark.root
def test_scapy_dissects_a_fresh_real_guest_recording_as_the_codecs_do(guest_image: Any, guest_share: Any,
                                                                       tmp_path: Path) -> None:
    """A real guest's `full` workload (xattrs on) through the proxy in front of the bundled daemon."""
    from fsinspect.guest import launcher
    from tests.guest_fixtures import explain
    from tests.test_proxy_e2e import bundled_daemon, start_proxy

    rec = tmp_path / "rec.pcapng"
    with launcher.short_tmpdir() as work, bundled_daemon(guest_share, work, tmp_path) as be:
        proxy = start_proxy(work / "proxy.sock", be, rec, tmp_path / "summary.json")
        try:
            res = launcher.run_guest(work / "proxy.sock", image=guest_image, workload="full", timeout=240,
                                     watch=[proxy, *be.processes], params={"xattr": 1, "n": 100})
            proxy.wait(15)
        finally:
            launcher.stop_process(proxy)
    assert res.ok, explain(res)
    counts = _differential(rec)
    assert counts["request"] > 500 and counts["vhost-user"] > 20, counts
    assert len(counts["opcodes"]) >= 20, counts


def _differential(path: Path) -> dict[str, Any]:
    """Compare scapy's dissection with the codecs' decode on every message of a recording."""
    ctx = F.DEFAULT_CONTEXT
    pending: dict[tuple[int, int], tuple[F.Request, Packet]] = {}
    counts: dict[str, Any] = {"request": 0, "reply": 0, "notify": 0, "vhost-user": 0, "opcodes": set()}
    with RecordingReader(path) as reader:
        for rec in reader:
            wire = rec.orig_len if rec.snapped else None
            if not rec.is_fuse:
                # The proxy masks the back-end channel: every recorded message is on the front-end's.
                msg = V.decode_message(rec.data)
                _compare_vhost_user(S.VhostUser(rec.data), msg)
                counts["vhost-user"] += 1
                continue
            if rec.inbound:
                req = F.decode_request(rec.data, ctx, wire_len=wire)
                pkt = S.FuseIn(rec.data, setxattr_ext=ctx.setxattr_ext)
                _compare_fuse(pkt, req)
                pending[(rec.queue, req.unique)] = (req, pkt)
                counts["request"] += 1
                counts["opcodes"].add(req.opname)
                continue
            unique = F.OUT_HEADER.decode(rec.data).unique
            req, sreq = pending.pop((rec.queue, unique), (None, None))
            reply = F.decode_reply(rec.data, req, ctx, wire_len=wire)
            out = S.FuseOut(rec.data) if unique == 0 else S.fuse_reply(rec.data, sreq)
            _compare_fuse(out, reply)
            counts["notify" if unique == 0 else "reply"] += 1
            if req is not None and req.opcode == INIT and isinstance(reply, F.Reply) and not reply.error:
                ctx = FuseContext.from_init(req.args["init"], reply.args["init_out"])
    return counts


# ------------------------------------------------------------------------------------------------
# Crafting: every layer filled with distinct values, decoded (and re-encoded) by the codecs
# ------------------------------------------------------------------------------------------------
def _value(fld: Any, seed: int) -> Any:
    if isinstance(fld, ConditionalField):
        return _value(fld.fld, seed)
    if isinstance(fld, PacketField):
        return _fill(fld.cls(), seed)
    if isinstance(fld, FieldListField):
        try:
            n = fld.count_from(None)  # a fixed array (u32 unused[11])
        except (AttributeError, TypeError):
            n = 2  # a list whose count is another field's
        return [_value(fld.field, seed + i) for i in range(n)]
    if isinstance(fld, PacketListField):
        items = [_fill(fld.cls(), seed + 10 * i) for i in range(2)]
        for item in items:
            if isinstance(item, S.FuseDirentplusRecord):
                item.dirent.namelen = 0  # 0: the record fills it in from the name
        return items
    if isinstance(fld, EnumField):
        return sorted(fld.i2s)[seed % len(fld.i2s)]
    if isinstance(fld, FlagsField):
        return 1 << (seed % abs(fld.size))
    if isinstance(fld, StrFixedLenField):
        return bytes([seed % 256]) * fld.length_from(None)
    if isinstance(fld, StrField):
        return b"v%d" % seed
    bits = fld.sz * 8
    return (seed * 0x9E3779B1 + 1) % (1 << (bits - 1))


def _fill(pkt: Packet, seed: int) -> Packet:
    for i, fld in enumerate(pkt.fields_desc):
        if isinstance(fld, FieldLenField) or fld.name == "pad":
            continue  # lengths and counts: left for the layer to fill in
        pkt.setfieldval(fld.name, _value(fld, seed + i))
    return pkt


@pytest.mark.parametrize("op", spec.OPCODES, ids=lambda o: o.name)
def test_crafted_request_and_reply_decode_and_reencode_with_the_codecs(op: spec.Opcode) -> None:
    pkt = S.FuseIn(unique=42, nodeid=7, uid=1000, gid=100, pid=4242) / _fill(S.REQUEST_LAYERS[op.value](), op.value)
    raw = bytes(pkt)
    req = F.decode_request(raw)
    assert req.op is op and len(raw) == S.FuseIn(raw).len
    _compare_fuse(S.FuseIn(raw), req)
    assert F.encode_request_obj(req) == raw
    if op.reply is None:
        return
    body = S.REPLY_LAYERS[op.value]() if op.value in S.REPLY_LAYERS else None
    rpkt = S.FuseOut(unique=42) / (_fill(body, op.value + 1) if body is not None else b"")
    rraw = bytes(rpkt)
    reply = F.decode_reply(rraw, req)
    assert not isinstance(reply, F.Notification)
    _compare_fuse(S.fuse_reply(rraw, S.FuseIn(raw)), reply)
    assert F.encode_message(reply) == rraw


def test_crafted_error_reply_and_size_query() -> None:
    raw = bytes(S.FuseOut(unique=9, error=-2))
    assert F.decode_reply(raw, "LOOKUP").errname == "ENOENT"
    req = bytes(S.FuseIn(unique=9) / S.FuseGetxattr(size=0, name=b"user.x"))
    size_reply = bytes(S.FuseOut(unique=9) / S.FuseGetxattrReply(size=5))
    decoded = F.decode_reply(size_reply, F.decode_request(req))
    assert decoded.args["xattr"].size == 5
    assert S.fuse_reply(size_reply, S.FuseIn(req))[S.FuseGetxattrReply].size == 5


@pytest.mark.parametrize("notify", spec.NOTIFIES, ids=lambda n: n.name)
def test_crafted_notification_decodes(notify: spec.Notify) -> None:
    pkt = S.FuseOut() / _fill(S.NOTIFY_LAYERS[notify.value](), notify.value)
    raw = bytes(pkt)
    msg = F.decode_reply(raw, None)
    assert isinstance(msg, F.Notification) and msg.notify is notify
    _compare_fuse(S.FuseOut(raw), msg)
    assert F.encode_message(msg) == raw


def test_extensions_set_total_extlen() -> None:
    pkt = S.FuseIn(unique=3) / S.FuseCreate(name=b"f") / S.FuseExt(type=32, groups=[10, 20, 30])
    raw = bytes(pkt)
    req = F.decode_request(raw)
    assert req.header.total_extlen == 3 and req.ext[0][1] == [10, 20, 30]
    _compare_fuse(S.FuseIn(raw), req)


@pytest.mark.parametrize("r", vspec.FRONTEND_REQUESTS + vspec.BACKEND_REQUESTS,
                         ids=lambda r: r.name)
def test_crafted_vhost_user_messages_decode(r: vspec.Request) -> None:
    backend = r in vspec.BACKEND_REQUESTS
    table = S.BACKEND_LAYERS if backend else S.FRONTEND_LAYERS
    for reply in (False, True):
        cls = table.get((r.value, reply))
        flags = vspec.VERSION | (0x4 if reply else 0)
        body = _fill(cls(), r.value) if cls is not None else None
        if body is not None and cls.layout == "memory":
            body.regions = [S.VhostUserMemoryRegion(guest_address=0x1000 * i, size=0x1000) for i in (1, 3)]
            body.unused, body.padding = bytes(6 * 32), 0  # QEMU sends all 8 slots; the codec re-encodes padding 0
        pkt = S.VhostUser(request=r.value, flags=flags) / body if body is not None else \
            S.VhostUser(request=r.value, flags=flags)
        raw = bytes(pkt)
        msg = V.decode_message(raw, backend_channel=backend)
        assert msg.request == r.value and msg.is_reply == reply
        _compare_vhost_user(S.VhostUser(raw, backend_channel=backend), msg)
        assert V.encode_message(msg) == raw


def test_readme_crafting_example() -> None:
    from dissectors.scapy import FuseIn, FuseLookup

    raw = bytes(FuseIn(unique=2, nodeid=1) / FuseLookup(name=b".."))
    req = F.decode_request(raw)
    assert (req.opname, req.args["name"], req.header.len) == ("LOOKUP", b"..", len(raw))
