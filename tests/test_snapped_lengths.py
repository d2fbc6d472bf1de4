"""A snapped record never shows a wrong byte (issue 16, item 1).

Decoded fields are what is on the wire (fuse_in_header.len, fuse_out_header.len, READ/WRITE sizes); the
captured length is a separate, labelled fact; the pcapng original length is the message's real length.
The last test records one real guest run twice, cut (the proxy, snaplen 256) and whole (the bundled
daemon behind it, snaplen 0), and compares every length field.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dissectors import fuse as F
from dissectors.render import message_lines, summary
from dissectors.ring._common import Capture
from dissectors.structs import wire_len
from fsinspect.analysis import Analyzer
from fsinspect.analysis.render import exchange_json
from fsinspect.recording.reader import RecordingReader
from fsinspect.recording.replay import analyze
from fsinspect.recording.writer import RecordingWriter
from fsinspect.tui.render import field_lines, row_text
from tests.guest_fixtures import explain
from tests.test_proxy_session import _release, session  # noqa: F401 (_release: autouse)
from tests.test_recording_samples import tshark_fields

ROOT = Path(__file__).resolve().parent.parent
WRITE_SIZE = 507_904  # the WRITE: its header says 0x0007c050 = 508,000 bytes
READ_SIZE = 131_072


def _write(unique: int, size: int = WRITE_SIZE) -> bytes:
    return F.encode_request("WRITE", {"write": {"fh": 7, "offset": 4096, "size": size}, "data": b"w" * size},
                            unique=unique, nodeid=5)


def _read(unique: int, size: int = READ_SIZE) -> bytes:
    return F.encode_request("READ", {"read": {"fh": 7, "offset": 0, "size": size}}, unique=unique, nodeid=5)


def _record(path: Path, snaplen: int, read_reply: int = READ_SIZE) -> None:
    with RecordingWriter(path, snaplen=snaplen) as w:
        w.request(_write(2), 1, 3, 1_000)
        w.reply(F.encode_reply("WRITE", {"write_out": {"size": WRITE_SIZE}}, unique=2), 1, 3, 2_000)
        w.request(_read(4), 1, 4, 3_000)
        w.reply(F.encode_reply("READ", {"data": b"r" * read_reply}, unique=4), 1, 4, 4_000)


def _exchanges(path: Path) -> list[Any]:
    with RecordingReader(path) as r:
        return analyze(r, Analyzer(keep_raw=True)).exchanges


def test_snapped_write_and_read_decode_the_wire_lengths(tmp_path: Path) -> None:
    _record(tmp_path / "cut.pcapng", 256)
    write, read = _exchanges(tmp_path / "cut.pcapng")
    assert write.snapped and read.snapped
    req = write.request
    assert req is not None and req.header.len == 80 + WRITE_SIZE == 0x7C050
    assert req.raw_len == 80 + WRITE_SIZE and req.captured == 80 + 256 and req.cut
    assert req.args["write"].size == WRITE_SIZE and wire_len(req.args["data"]) == WRITE_SIZE
    assert req.args["data"] == b"w" * 256  # the bytes captured, and no more
    rep = read.reply
    assert isinstance(rep, F.Reply) and rep.header.len == 16 + READ_SIZE and rep.captured == 16 + 256
    assert write.req_raw is not None and write.req_raw[:4] == bytes.fromhex("50c00700")
    # Rendering: the wire values, the captured length as its own labelled fact, no short read.
    lines = message_lines(req)
    assert lines[0].endswith(f"len={80 + WRITE_SIZE} (captured 336 of {80 + WRITE_SIZE} bytes)"), lines[0]
    assert f"len          = {80 + WRITE_SIZE}" in lines[2]
    assert any(f"data: {WRITE_SIZE} bytes (256 captured)" in ln for ln in lines)
    assert summary(rep) == f"{READ_SIZE} bytes"
    tui = [fl.text for fl in field_lines(rep)]
    assert tui[0] == f"reply to READ len={16 + READ_SIZE} (captured 272 of {16 + READ_SIZE} bytes)"
    assert f"len = {16 + READ_SIZE}" in tui and f"data = {READ_SIZE} bytes (256 captured)" in tui
    row = row_text(read, "", 200, 0, False).plain
    assert f"size={READ_SIZE} → {READ_SIZE} bytes" in row and "short" not in row
    # JSON: the header as sent, the captured length beside it.
    j = exchange_json(write)
    assert j["request"]["header"]["len"] == 80 + WRITE_SIZE and j["request"]["captured"] == 336
    assert j["request"]["args"]["data"]["len"] == WRITE_SIZE and j["request"]["args"]["data"]["captured"] == 256


def test_a_short_read_is_short_only_when_its_header_says_so(tmp_path: Path) -> None:
    _record(tmp_path / "short.pcapng", 256, read_reply=4096)
    _write_ex, read = _exchanges(tmp_path / "short.pcapng")
    assert read.snapped and read.reply is not None and read.reply.header.len == 16 + 4096  # cut, and short
    assert f"size={READ_SIZE} → 4096 bytes (short)" in row_text(read, "", 200, 0, False).plain


def _lengths(path: Path) -> list[tuple[Any, ...]]:
    """Every length the decoded view shows, per exchange: header lens and READ/WRITE sizes."""
    out = []
    for ex in _exchanges(path):
        req, rep = ex.request, ex.reply
        out.append((ex.opname, ex.unique, req.header.len if req else None, rep.header.len if rep else None,
                    ex.req_len, ex.reply_len,
                    ex.arg("write.size"), ex.arg("read.size"), ex.arg("write_out.size"),
                    wire_len(rep.args["data"]) if rep is not None and "data" in rep.args else None))
    return out


def test_export_jsonl_of_a_snapped_recording_shows_the_wire_lengths(tmp_path: Path) -> None:
    _record(tmp_path / "cut.pcapng", 256)
    _record(tmp_path / "whole.pcapng", 0)
    assert _lengths(tmp_path / "cut.pcapng") == _lengths(tmp_path / "whole.pcapng")
    rows = {}
    for name in ("cut", "whole"):
        res = subprocess.run([sys.executable, "-m", "fsinspect", "export", str(tmp_path / f"{name}.pcapng"),
                              "--format", "jsonl"], capture_output=True, text=True, check=True, cwd=ROOT)
        rows[name] = [json.loads(line) for line in res.stdout.splitlines()]
    for cut, whole in zip(rows["cut"], rows["whole"], strict=True):
        for side in ("request", "reply"):
            assert cut[side]["header"] == whole[side]["header"]
        assert cut["request"]["args"].get("write") == whole["request"]["args"].get("write")
    assert rows["cut"][0]["request"]["header"]["len"] == 80 + WRITE_SIZE
    assert rows["cut"][1]["reply"]["header"]["len"] == 16 + READ_SIZE


def test_live_capture_cut_natively_records_the_real_length(tmp_path: Path) -> None:
    """The proxy's data path captures at most 16 KiB of a chain: the EPB original length, tshark's
    "bytes on wire", the analyzer and the recording all say the message's real length."""
    s = session(tmp_path, "live", snaplen=0, defer_analysis=False)
    req, rep = _read(9, 32_768), F.encode_reply("READ", {"data": b"z" * 32_768}, unique=9)
    cut = 16_384
    s._on_capture(Capture("request", 1, 2, 10, (), len(req), req, False, ""))
    s._on_capture(Capture("reply", 1, 2, 20, (), len(rep), rep[:cut], True, ""))
    assert s.analyzer.finish() == []
    assert s.writer is not None
    s.writer.close()
    with RecordingReader(tmp_path / "live.pcapng") as r:
        recs = [x for x in r if x.is_fuse]
    assert [(len(x.data), x.orig_len) for x in recs] == [(len(req), len(req)), (cut, 32_784)]
    rows = tshark_fields(tmp_path / "live.pcapng", "frame.len", "frame.cap_len", "fuse.len", "_ws.col.Info")
    prefix = int(rows[0][0]) - len(req)
    assert [r[0] for r in rows] == [str(len(req) + prefix), str(32_784 + prefix)]
    assert rows[1][1] == str(cut + prefix) and rows[1][2] == "32784"
    assert rows[1][3].endswith("32768 bytes (16368 captured) [captured 16384 of 32784 bytes]"), rows[1][3]
    (read,) = _exchanges(tmp_path / "live.pcapng")
    assert read.reply.header.len == 32_784 and summary(read.reply) == "32768 bytes"


def test_old_recordings_with_the_captured_length_as_original_length_still_decode(tmp_path: Path) -> None:
    """Recordings from proxies before the fix: RF_SNAPPED with orig == caplen; the header has the length."""
    from fsinspect.recording import format as fmt

    rep = F.encode_reply("READ", {"data": b"q" * 32_768}, unique=4)
    with RecordingWriter(tmp_path / "old.pcapng", snaplen=0) as w:
        w.request(_read(4, 32_768), 1, 4, 3_000)
        w.reply(rep[:16_384], 1, 4, 4_000, flags=fmt.RF_SNAPPED)
    (read,) = _exchanges(tmp_path / "old.pcapng")
    assert read.decode_error is None and read.reply.header.len == 32_784 and read.reply_len == 32_784


# -- the acceptance test on real guest traffic ------------------------------------------------------
@pytest.mark.guest
@pytest.mark.root
def test_real_guest_io_snapped_and_whole_recordings_agree(guest_image: Any, guest_share: Any,
                                                          tmp_path: Path) -> None:
    """One guest run recorded twice: by the proxy at snaplen 256, and whole by the daemon behind it."""
    from fsinspect.guest import launcher
    from tests.test_proxy_e2e import bundled_daemon

    with launcher.short_tmpdir() as work, bundled_daemon(
            guest_share, work, tmp_path, ("--record", str(tmp_path / "whole.pcapng"), "--snaplen", "0")) as be:
        listen = work / "proxy.sock"
        proxy = subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(listen),
                                  "--backend", str(be.socket_path), "--record", str(tmp_path / "cut.pcapng"),
                                  "--snaplen", "256"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            launcher._wait_for_socket(listen, proxy, "the proxy")
            res = launcher.run_guest(listen, image=guest_image, workload="io", timeout=240,
                                     watch=[proxy, *be.processes], params={"xattr": 1, "io_mb": 8})
            proxy.wait(15)
            daemon = be.processes[0]
            assert isinstance(daemon, subprocess.Popen) and daemon.wait(15) == 0, "the daemon did not end cleanly"
        finally:
            launcher.stop_process(proxy)
    assert res.ok, explain(res)
    cut, whole = _lengths(tmp_path / "cut.pcapng"), _lengths(tmp_path / "whole.pcapng")
    assert len(cut) == len(whole) > 100
    big = [x for x in whole if x[0] in ("READ", "WRITE") and max(x[4], x[5]) > 16_384]
    assert len(big) >= 8, "the workload made no large READ/WRITE"
    assert sorted(cut, key=repr) == sorted(whole, key=repr)
    with RecordingReader(tmp_path / "cut.pcapng") as r:
        snapped = sum(1 for x in r if x.snapped)
    assert snapped >= len(big)
    print(f"{len(cut)} exchanges, {len(big)} READ/WRITE over 16 KiB, {snapped} snapped records: lengths equal")


def test_tui_detail_of_a_snapped_write_shows_the_wire() -> None:
    """Pilot on the guest sample: its WRITEs are cut at 256 bytes of payload."""
    import asyncio

    from fsinspect.tui.widgets import DetailPane
    from tests.test_tui import SIZE, loaded, replay_app, wait_for

    async def run() -> None:
        app = replay_app()
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            write = next(e for e in app.store.exchanges if e.opname == "WRITE" and e.snapped)
            wire = write.request.header.len
            assert wire == write.req_len > len(write.request.args["data"]) + 80
            app.jump(write.index)
            detail = app.query_one(DetailPane)
            await wait_for(pilot, lambda: detail.index == write.index)
            texts = [ln.text for ln in detail.lines]
            assert texts[0] == f"request WRITE (16) len={wire} (captured {write.request.captured} of {wire} bytes)"
            assert f"len = {wire}" in texts and f"data = {wire - 80} bytes (256 captured)" in texts

    asyncio.run(run())
