"""fuse.lua on the vhost-user control channel, through real tshark (issue 16, Wireshark side): the direction
of every message is in the Source/Destination columns, the protocol filters as `vhost-user` and
`vhost_user`, and SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG payloads are decoded field by field."""

from __future__ import annotations

from pathlib import Path

from dissectors import vhost_user as V
from fsinspect.recording import format as fmt
from fsinspect.recording.reader import RecordingReader
from fsinspect.recording.writer import RecordingWriter
from tests.test_recording_samples import tshark_fields

SAMPLE = Path(__file__).resolve().parent.parent / "recordings" / "samples" / "guest-syncfs.pcapng"


def _expected_direction(inbound: bool, notes: list[str]) -> tuple[str, str]:
    if fmt.NOTE_TO_BACKEND in notes:
        return "proxy", "back-end"
    if fmt.NOTE_TO_FRONTEND in notes:
        return "proxy", "QEMU"
    return ("QEMU", "back-end") if inbound else ("back-end", "QEMU")


def test_direction_in_the_columns_and_both_filter_names() -> None:
    with RecordingReader(SAMPLE) as r:
        ctl = [(rec, V.decode_message(rec.data)) for rec in r if not rec.is_fuse]
    want = [(*_expected_direction(rec.inbound, rec.notes), m.name) for rec, m in ctl]
    assert {w[:2] for w in want} == {("QEMU", "back-end"), ("proxy", "back-end"), ("back-end", "QEMU"),
                                     ("proxy", "QEMU")}
    for flt in ("vhost-user", "vhost_user", "fsinspect_vhost_user"):
        rows = tshark_fields(SAMPLE, "_ws.col.Source", "_ws.col.Destination", "fsinspect_vhost_user.request",
                             "vhost_user.direction", "_ws.col.Info", flt=flt)
        got = [(src, dst, V.spec.FRONTEND_BY_VALUE[int(req)].name) for src, dst, req, _, _ in rows]
        assert got == want, flt
        assert all(d == f"{s} -> {t}" and info.startswith(f"{s} → {t}  ") for s, t, _, d, info in rows)


def test_set_mem_table_regions_are_decoded() -> None:
    with RecordingReader(SAMPLE) as r:
        tables = [V.decode_message(rec.data) for rec in r
                  if not rec.is_fuse and V.decode_header(rec.data)[0] == 5 and not V.decode_header(rec.data)[1] & 4]
    assert tables, "the sample has no SET_MEM_TABLE"
    rows = tshark_fields(SAMPLE, "vhost_user.memory.num_regions", "vhost_user.memory_region.guest_address",
                         "vhost_user.memory_region.size", "vhost_user.memory_region.user_address",
                         "vhost_user.memory_region.mmap_offset", "_ws.col.Info",
                         flt="fsinspect_vhost_user.request == 5 && !(fsinspect_vhost_user.flags & 4)", occurrence="a")
    assert len(rows) == len(tables)
    for row, msg in zip(rows, tables, strict=True):
        regions = msg.payload
        assert int(row[0]) == len(regions)
        for col, key in zip(row[1:5], ("guest_address", "size", "user_address", "mmap_offset"), strict=True):
            assert [int(x, 16) for x in col.split(",")] == [getattr(x, key) for x in regions], key
        assert f"{len(regions)} regions: gpa={regions[0].guest_address:#x} size={regions[0].size:#x}" in row[5]


def test_add_and_rem_mem_reg_and_reply_ack(tmp_path: Path) -> None:
    region = V.make("vhost_user_memory_region", guest_address=0x100000, size=0x200000,
                    user_address=0x7F0000000000, mmap_offset=0x1000)
    p = tmp_path / "memreg.pcapng"
    with RecordingWriter(p) as w:
        add = V.build("ADD_MEM_REG", V.make("vhost_user_mem_reg", region=region), flags=V.spec.VERSION | 8)
        w.control(V.encode_message(add), from_frontend=True, ts_ns=1)
        w.control(V.encode_message(V.build("ADD_MEM_REG", V.u64(0), reply=True)), from_frontend=False, ts_ns=2)
        w.control(V.encode_message(V.build("REM_MEM_REG", V.make("vhost_user_mem_reg", region=region))),
                  from_frontend=True, ts_ns=3)
    rows = tshark_fields(p, "_ws.col.Source", "_ws.col.Destination", "vhost_user.memory_region.guest_address",
                         "vhost_user.memory_region.size", "vhost_user.memory_region.user_address",
                         "vhost_user.memory_region.mmap_offset", "vhost_user.u64.u64", "_ws.col.Info", flt="vhost_user")
    assert [r[:2] for r in rows] == [["QEMU", "back-end"], ["back-end", "QEMU"], ["QEMU", "back-end"]]
    for r in (rows[0], rows[2]):
        assert [int(x, 16) for x in r[2:6]] == [0x100000, 0x200000, 0x7F0000000000, 0x1000]
    assert rows[0][7] == "QEMU → back-end  ADD_MEM_REG NEED_REPLY gpa=0x100000 size=0x200000 uva=0x7f0000000000 off=0x1000"
    assert rows[1][6] == "0x0000000000000000" and rows[1][7] == "back-end → QEMU  ADD_MEM_REG REPLY u64=0x0"
    assert rows[2][7].startswith("QEMU → back-end  REM_MEM_REG gpa=0x100000")
