"""The recording format: writer/reader round trip, crash safety, refusals, rotation, side index."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dissectors import fuse as F
from fsinspect.analysis import Analyzer
from fsinspect.recording import format as fmt
from fsinspect.recording.index import RecordingIndex, index_path, scan
from fsinspect.recording.reader import RecordingError, RecordingReader
from fsinspect.recording.replay import analyze, feed_records
from fsinspect.recording.writer import RecordingWriter

ROOT = Path(__file__).resolve().parent.parent


def lookup(unique: int, name: bytes = b"x") -> bytes:
    return F.encode_request("LOOKUP", {"name": name}, unique=unique, nodeid=1)


def enoent(unique: int) -> bytes:
    return F.encode_reply("LOOKUP", error=2, unique=unique)


def init_pair(unique: int = 1) -> tuple[bytes, bytes]:
    req = F.encode_request("INIT", {"init": F.make("fuse_init_in", major=7, minor=45, max_readahead=65536)},
                           unique=unique)
    rep = F.encode_reply("INIT", {"init_out": F.make("fuse_init_out", major=7, minor=45, max_write=1 << 20)},
                         unique=unique)
    return req, rep


def test_round_trip_of_every_record_field(tmp_path: Path) -> None:
    p = tmp_path / "r.pcapng"
    w = RecordingWriter(p, source="virtio", backend="virtiofsd", comments=["first", "second"], snaplen=16)
    ireq, irep = init_pair()
    w.request(ireq, 1, 5, 1_000_000_001)
    w.reply(irep, 1, 5, 1_000_000_999, layout=[(40, 2), (80, 2)])
    w.request(lookup(2), 1, 7, 2_000_000_000, layout=[(40, 0), (2, 0), (16, 2)], notes=["decode error: x"],
              flags=fmt.RF_DECODE_ERROR)
    w.reply(enoent(2), 1, 7, 2_000_000_500)
    w.request(F.encode_request("FORGET", {"forget": {"nlookup": 1}}, unique=3, nodeid=9), 0, 0, 2_000_001_000)
    data = bytes(range(256)) * 4
    w.request(F.encode_request("WRITE", {"write": {"fh": 1, "size": len(data)}, "data": data}, unique=4, nodeid=9),
              1, 3, 3_000_000_000)
    w.reply(F.encode_reply("WRITE", {"write_out": {"size": len(data)}}, unique=4), 1, 3, 3_000_000_100)
    w.request(F.encode_request("READ", {"read": {"fh": 1, "size": 4096}}, unique=5, nodeid=9), 1, 4, 3_000_000_200)
    w.reply(F.encode_reply("READ", {"data": data}, unique=5), 1, 4, 3_000_000_300)
    w.control(b"\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00", from_frontend=True, ts_ns=5)
    w.close()

    with RecordingReader(p) as r:
        recs = list(r)
        assert r.truncated is None
        sec = r.section
        assert sec.format_version == fmt.FORMAT_VERSION
        assert sec.comments == ["first", "second"]
        assert sec.meta["backend"] == "virtiofsd" and sec.meta["source"] == "virtio"
        assert sec.meta["snaplen"] == 16 and sec.userappl.startswith("fsinspect ")
        assert sec.os == sec.meta["kernel"] and sec.hardware == sec.meta["host"]
        names = [(i.name, i.kind, i.queue) for i in r.interfaces]
    assert names == [("vq1", "virtqueue", 1), ("vq0", "virtqueue", 0), ("vhost-user", "vhost-user", 0)]
    assert [(x.inbound, x.queue, x.head, x.epoch, x.ts_ns) for x in recs[:5]] == [
        (True, 1, 5, 1, 1_000_000_001), (False, 1, 5, 1, 1_000_000_999), (True, 1, 7, 1, 2_000_000_000),
        (False, 1, 7, 1, 2_000_000_500), (True, 0, 0, 1, 2_000_001_000)]
    assert recs[0].data == ireq and recs[1].data == irep and recs[3].data == enoent(2)
    assert recs[1].layout == [(40, 2), (80, 2)] and recs[0].layout is None
    assert recs[2].notes == ["decode error: x"] and recs[2].flags == fmt.RF_DECODE_ERROR
    write_req, read_rep = recs[5], recs[8]
    assert write_req.flags & fmt.RF_SNAPPED and write_req.snapped
    assert len(write_req.data) == F.IN_HEADER_SIZE + 40 + 16 and write_req.orig_len == F.IN_HEADER_SIZE + 40 + 1024
    assert read_rep.flags & fmt.RF_SNAPPED and len(read_rep.data) == 16 + 16 and read_rep.orig_len == 16 + 1024
    assert not recs[6].snapped and not recs[7].snapped
    ctl = recs[9]
    assert ctl.dissector == fmt.DISSECTOR_VHOST_USER and ctl.inbound and ctl.iface == 2
    # The analyzer decodes snapped records as far as they go and counts the original bytes.
    with RecordingReader(p) as r:
        an = analyze(r)
    write_ex = next(e for e in an.exchanges if e.opname == "WRITE")
    assert write_ex.snapped and write_ex.request is not None and write_ex.request.args["data"] == data[:16]
    assert write_ex.req_len == F.IN_HEADER_SIZE + 40 + 1024
    assert [lint.name for lint in an.lints] == ["forget-unknown"]  # nodeid 9 was never looked up


def test_source_names(tmp_path: Path) -> None:
    with RecordingWriter(tmp_path / "v.pcapng", source="vhost-user") as w:
        w.request(lookup(2), 1, None, 5)
    with RecordingReader(tmp_path / "v.pcapng") as r:
        assert r.section.meta["source"] == "virtio"
        assert [(x.queue, x.head) for x in r] == [(1, None)] and r.interfaces[0].name == "vq1"
    with pytest.raises(ValueError, match="source must be"):
        RecordingWriter(tmp_path / "x.pcapng", source="usb")


def test_format_md_tables_are_generated_from_the_code() -> None:
    text = (ROOT / "recordings" / "FORMAT.md").read_text()
    assert f"Format version: **{fmt.FORMAT_VERSION}**" in text
    start = text.index("<!-- tables:begin -->") + len("<!-- tables:begin -->\n")
    end = text.index("<!-- tables:end -->")
    assert text[start:end] == fmt.format_tables(), "regenerate: python -m fsinspect.recording.format --update recordings/FORMAT.md"


def _write_sample(p: Path, n: int = 50) -> list[bytes]:
    msgs = []
    with RecordingWriter(p, source="fusedev") as w:
        ireq, irep = init_pair()
        w.request(ireq, 0, None, 1)
        w.reply(irep, 0, None, 2)
        msgs += [ireq, irep]
        for u in range(2, 2 + n):
            w.request(lookup(u), 0, None, 10 * u)
            w.reply(enoent(u), 0, None, 10 * u + 5)
            msgs += [lookup(u), enoent(u)]
    return msgs


def test_truncated_file_reads_up_to_the_last_complete_block(tmp_path: Path) -> None:
    full = tmp_path / "full.pcapng"
    msgs = _write_sample(full)
    blob = full.read_bytes()
    with RecordingReader(full) as r:
        offsets = [x.offset for x in r]
    # Cut inside the 11th packet block, and 3 bytes into the next block header.
    for cut, whole in ((offsets[10] + 20, 10), (offsets[7] + 3, 7)):
        p = tmp_path / f"cut{cut}.pcapng"
        p.write_bytes(blob[:cut])
        with RecordingReader(p) as r:
            got = [x.data for x in r]
            assert got == msgs[:whole]
            assert r.truncated is not None and r.truncated.startswith(f"truncated tail at offset {offsets[whole]}")
    # The CLI says so on stderr and still reports what it read.
    p = tmp_path / f"cut{offsets[10] + 20}.pcapng"
    res = subprocess.run([sys.executable, "-m", "fsinspect", "stats", "--json", str(p)], capture_output=True,
                         text=True, check=True)
    assert "truncated tail at offset" in res.stderr and "read up to there" in res.stderr
    assert json.loads(res.stdout)["ops"]["LOOKUP"]["count"] == 4


def _cli_error(path: Path) -> str:
    res = subprocess.run([sys.executable, "-m", "fsinspect", "info", str(path)], capture_output=True, text=True)
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr
    return res.stderr.strip()


def test_garbage_empty_and_pcap_files_are_refused_clearly(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(4096).replace(b"\x0a\x0d\x0d\x0a", b"xxxx"))
    with pytest.raises(RecordingError, match=r"not a pcapng file \(starts with [0-9a-f]{8}, not the pcapng"):
        RecordingReader(garbage)
    assert "not a pcapng file" in _cli_error(garbage)
    empty = tmp_path / "empty.pcapng"
    empty.write_bytes(b"")
    with pytest.raises(RecordingError, match=r"not a pcapng file \(0 bytes"):
        RecordingReader(empty)
    pcap = tmp_path / "old.pcap"
    pcap.write_bytes(bytes.fromhex("d4c3b2a1020004000000000000000000ffff000001000000"))
    with pytest.raises(RecordingError, match=r"a pcap \(libpcap\) file"):
        RecordingReader(pcap)
    with pytest.raises(RecordingError, match="No such file"):
        RecordingReader(tmp_path / "missing.pcapng")


def test_future_version_wrong_linktype_and_foreign_pcapng_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.pcapng"
    _write_sample(good, 2)
    blob = good.read_bytes()
    needle = b'"format": %d' % fmt.FORMAT_VERSION
    assert blob.count(needle) == 1
    future = tmp_path / "future.pcapng"
    future.write_bytes(blob.replace(needle, b'"format": 9'))
    with pytest.raises(RecordingError, match="recording format version 9 is newer than this fsinspect reads"):
        RecordingReader(future)
    assert "upgrade fsinspect" in _cli_error(future)

    # Link type 1 (Ethernet) in the first IDB: the IDB body starts right after the SHB.
    shb_len = int.from_bytes(blob[4:8], "little")
    assert int.from_bytes(blob[shb_len + 8:shb_len + 10], "little") == fmt.LINKTYPE_WIRESHARK_UPPER_PDU
    eth = tmp_path / "eth.pcapng"
    eth.write_bytes(blob[:shb_len + 8] + (1).to_bytes(2, "little") + blob[shb_len + 10:])
    with pytest.raises(RecordingError, match=r"interface 0 has link type 1, expected 252"):
        list(RecordingReader(eth))
    assert "link type 1, expected 252" in subprocess.run(
        [sys.executable, "-m", "fsinspect", "stats", str(eth)], capture_output=True, text=True).stderr

    foreign = tmp_path / "foreign.pcapng"
    foreign.write_bytes(blob.replace(b"\xd9\x7e\x00\x00{", b"\x00\x00\x00\x00{"))  # PEN 32473 -> 0
    with pytest.raises(RecordingError, match="not an fsinspect recording"):
        RecordingReader(foreign)


_KILL_WRITER = textwrap.dedent("""
    import sys, time
    from dissectors import fuse as F
    from fsinspect.recording.writer import RecordingWriter
    w = RecordingWriter(sys.argv[1], source="fusedev", flush_interval=0.01, flush_bytes=1 << 14)
    u = 1
    print("ready", flush=True)
    while True:
        w.request(F.encode_request("LOOKUP", {"name": b"n%d" % u}, unique=u, nodeid=1), 0, None, u)
        w.reply(F.encode_reply("LOOKUP", error=2, unique=u), 0, None, u + 1)
        u += 1
        if u % 64 == 0:
            time.sleep(0.001)
""")


def test_kill_9_mid_write_leaves_a_readable_file(tmp_path: Path) -> None:
    p = tmp_path / "killed.pcapng"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_WRITER, str(p)], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    with RecordingReader(p) as r:
        recs = list(r)
        truncated = r.truncated
    assert len(recs) > 100
    assert truncated is None or truncated.startswith("truncated tail")
    an = Analyzer()
    feed_records(an, recs)
    an.finish()
    # Every complete block decodes; only a request whose reply was still buffered lacks one.
    assert all(e.decode_error is None for e in an.exchanges)
    assert [e.unique for e in an.exchanges] == list(range(1, len(an.exchanges) + 1))
    assert sum(1 for e in an.exchanges if not e.replied) <= 1


def test_rotation_carries_init_so_later_parts_decode(tmp_path: Path) -> None:
    p = tmp_path / "rot.pcapng"
    with RecordingWriter(p, source="virtio", rotate_mb=0.01, flush_bytes=1024) as w:
        ireq, irep = init_pair()
        w.request(ireq, 1, 0, 1)
        w.reply(irep, 1, 0, 2)
        for u in range(2, 400):
            w.request(lookup(u), 1, u % 128, 10 * u)
            w.reply(F.encode_reply("LOOKUP", {"entry": {"nodeid": u, "attr": {"ino": u}}}, unique=u), 1, u % 128,
                    10 * u + 3)
        paths = list(w.paths)
    assert len(paths) >= 3 and paths[1].name == "rot.001.pcapng"
    total = 0
    for i, part in enumerate(paths):
        with RecordingReader(part, one_file=True) as r:  # each part decodes on its own
            assert r.section.meta["part"] == i
            if i:
                assert r.section.meta["init"]["reply"] == irep.hex()
            an = analyze(r)
        assert r.truncated is None
        assert all(e.decode_error is None for e in an.exchanges), part
        total += len(an.exchanges)
        if i:
            assert an.negotiated == {1}
    assert total == 399
    info = json.loads(subprocess.run([sys.executable, "-m", "fsinspect", "info", "--json", str(paths[1])],
                                     capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    assert info["part"] == 1 and info["init"][0]["epoch"] == 1 and info["init"][0]["max_write"] == 1 << 20


def test_side_index_random_access_matches_the_analyzer(tmp_path: Path) -> None:
    p = tmp_path / "idx.pcapng"
    with RecordingWriter(p, source="virtio", index=False) as w:  # the reader builds it (test_recording_live_index:
        # the recorder's own)
        ireq, irep = init_pair()
        w.request(ireq, 1, 0, 1)
        w.reply(irep, 1, 0, 2)
        for u in range(2, 300):  # replies come back out of order, two at a time
            w.request(lookup(u), 1, u % 64, 10 * u)
            if u % 2:
                w.reply(enoent(u), 1, u % 64, 10 * u + 5)
                w.reply(enoent(u - 1), 1, (u - 1) % 64, 10 * u + 6)
        w.request(F.encode_request("FORGET", {"forget": {"nlookup": 1}}, unique=999, nodeid=1), 0, 0, 9999)
        w.reply(enoent(5000), 1, 63, 10000)  # orphan
    idx = RecordingIndex(p)
    assert idx.rebuilt and index_path(p).exists()
    blob = p.read_bytes()  # the writer-layout fast path and the general option walk agree
    assert list(scan(blob)) == list(scan(blob, fast=False))
    with RecordingReader(p) as r:
        an = analyze(r)
        assert len(idx) == len(an.exchanges)
        for i in (0, 1, 2, 150, len(idx) - 2, len(idx) - 1):
            ex = an.exchanges[i]
            assert idx.offsets(i) == (ex.req_ref, ex.reply_ref)
            req_off, rep_off = idx.offsets(i)
            if req_off is not None:
                assert r.record_at(req_off).data[8:16] == ex.unique.to_bytes(8, "little")
            if rep_off is not None:
                assert r.record_at(rep_off).inbound is False
        assert all(idx.offsets(e.index) == (e.req_ref, e.reply_ref) for e in an.exchanges)
    idx.close()
    again = RecordingIndex(p)
    assert not again.rebuilt and len(again) == len(an.exchanges)
    again.close()
    with RecordingWriter(tmp_path / "other.pcapng") as w:
        pass
    with open(p, "ab") as f:  # the recording grew: the index is stale and gets rebuilt
        f.write((tmp_path / "other.pcapng").read_bytes())
    grown = RecordingIndex(p)
    assert grown.rebuilt
    grown.close()
    with pytest.raises(IndexError):
        grown.offsets(10**6)
