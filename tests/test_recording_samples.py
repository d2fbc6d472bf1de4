"""The committed samples: golden summary, real tshark with the generated fuse.lua, stats/info/export CLIs."""

from __future__ import annotations

import errno
import importlib.util
import json
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

from fsinspect.recording import lua
from fsinspect.recording.reader import RecordingReader
from fsinspect.recording.replay import analyze
from tests.conftest import require_root

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "recordings" / "samples"
SAMPLE = SAMPLES / "fusedev-workload.pcapng"
GUEST = SAMPLES / "guest-syncfs.pcapng"  # real guest traffic: proxy in front of the C virtiofsd
ALL_SAMPLES = [SAMPLE, GUEST]
LUA = ROOT / "recordings" / "fuse.lua"


def _make_samples() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_samples", ROOT / "recordings" / "make_samples.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fsinspect(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsinspect", *args], capture_output=True, text=True, check=check,
                          cwd=ROOT)


def test_committed_lua_is_the_generated_one() -> None:
    assert LUA.read_text() == lua.generate(), "regenerate: python -m fsinspect.recording.lua > recordings/fuse.lua"


@pytest.mark.parametrize("sample", ALL_SAMPLES, ids=lambda p: p.stem)
def test_golden_summary_of_the_sample(sample: Path) -> None:
    golden = [json.loads(line) for line in sample.with_suffix(".golden.jsonl").read_text().splitlines()]
    assert _make_samples().golden_rows(sample) == golden


def tshark_fields(path: Path, *fields: str, flt: str | None = None, occurrence: str = "f") -> list[list[str]]:
    """One row per packet (matching the display filter `flt`, if given) of the fields' values."""
    cmd = ["tshark", "-2", "-X", f"lua_script:{LUA}", "-r", str(path), "-T", "fields", "-E", "separator=/t",
           "-E", f"occurrence={occurrence}", *(["-Y", flt] if flt else [])]
    for f in fields:
        cmd += ["-e", f]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    assert "Lua" not in res.stderr, res.stderr
    return [line.split("\t") for line in res.stdout.splitlines()]


def check_tshark_matches_our_decoder(path: Path) -> int:
    """Per record: opcode, unique, nodeid and error from tshark + fuse.lua equal our decoder's."""
    with RecordingReader(path) as r:
        records = list(r)
        an = analyze(RecordingReader(path))
    by_offset = {rec.offset: i for i, rec in enumerate(records)}
    expected: dict[int, tuple[str, ...]] = {i: ("",) * 6 for i, rec in enumerate(records) if not rec.is_fuse}
    for ex in an.exchanges:
        if ex.req_ref is not None:
            expected[by_offset[ex.req_ref]] = ("0", str(ex.opcode), str(ex.unique), str(ex.nodeid), "", "")
        if ex.reply_ref is not None:
            err = ex.reply.header.error if ex.reply is not None else 0
            if ex.opcode < 0:  # a notification (or an orphan reply): no request to take opcode/nodeid from
                expected[by_offset[ex.reply_ref]] = ("1", "", str(ex.unique), "", str(err), ex.errname or "")
            else:
                expected[by_offset[ex.reply_ref]] = ("1", str(ex.opcode), str(ex.unique), str(ex.nodeid), str(err),
                                                     ex.errname or "")
    rows = tshark_fields(path, "frame.number", "fuse.reply", "fuse.opcode", "fuse.unique", "fuse.nodeid",
                         "fuse.error", "fuse.errno", "fuse.time", "fuse.request_in", "_ws.expert.message")
    assert len(rows) == len(records) == len(expected)
    for i, row in enumerate(rows):
        assert int(row[0]) == i + 1
        assert tuple(row[1:7]) == expected[i], f"frame {i + 1}"
        assert "Malformed" not in row[9] and "body does not match" not in row[9]
    # Response times: tshark's fuse.time equals our latency to the microsecond (Lua keeps time as a double).
    for ex in an.exchanges:
        if ex.latency_ns is not None and ex.reply_ref is not None and ex.req_ref is not None:
            row = rows[by_offset[ex.reply_ref]]
            assert abs(float(row[7]) * 1e9 - ex.latency_ns) < 1000
            assert int(row[8]) == by_offset[ex.req_ref] + 1
    return len(rows)


@pytest.mark.parametrize("sample", ALL_SAMPLES, ids=lambda p: p.stem)
def test_tshark_decodes_the_sample_like_our_decoder(sample: Path) -> None:
    assert check_tshark_matches_our_decoder(sample) > 100


def test_guest_sample_submounts_and_syncfs() -> None:
    """Guest-only traffic: SUBMOUNT visible in tshark, tracked by the analysis; SYNCFS only on roots."""
    rows = tshark_fields(GUEST, "fuse.reply", "fuse.opcode", "fuse.nodeid", "fuse.attr.flags",
                         "fuse.attr.flags.SUBMOUNT", "_ws.col.Info", "fsinspect_vhost_user.request")
    submount_replies = [r for r in rows if r[0] == "1" and r[4] in ("1", "True")]
    assert len(submount_replies) >= 2 and all(r[3] == "0x00000001" for r in submount_replies)
    assert sum(1 for r in rows if r[1] == "50" and r[0] == "0") == 6  # SYNCFS requests
    assert any(r[6] == "1" and r[5] == "QEMU → back-end  GET_FEATURES" for r in rows)  # the vhost-user channel
    with RecordingReader(GUEST) as r:
        an = analyze(r)
        assert [i.kind for i in r.interfaces] == ["vhost-user", "virtqueue", "virtqueue"]
    assert an.lints == []
    assert {a.name for a in an.submounts.announced.values()} == {b"sub", b"inner"}
    roots = {1, *an.submounts.announced}
    assert len(an.submounts.syncfs) == 6 and {s.nodeid for s in an.submounts.syncfs} == roots
    assert all(s.is_root and s.error == 0 and s.latency_ns for s in an.submounts.syncfs)
    assert all(e.head is not None for e in an.exchanges)  # virtio: paired by descriptor head
    forgets = [e for e in an.exchanges if e.opname == "FORGET"]
    assert forgets and all(e.queue == 0 for e in forgets)


def test_tshark_shows_names_and_attr_flags() -> None:
    rows = tshark_fields(SAMPLE, "_ws.col.Info", "fuse.name", "fuse.attr.flags", "fuse.attr.flags.SUBMOUNT")
    infos = [r[0] for r in rows]
    assert any(i.startswith("LOOKUP request") and "name=nope" in i for i in infos)
    assert any(i == f"LOOKUP reply unique={i.split('=')[1].split()[0]} ENOENT" for i in infos)
    assert any(r[1] == "dir" for r in rows)
    flagged = [r for r in rows if r[2]]
    assert flagged and all(r[2] == "0x00000000" and r[3] in ("0", "False") for r in flagged)


def _independent_counts(path: Path) -> tuple[Counter[int], Counter[str], int, int]:
    """Walk the pcapng blocks by hand (not with our reader): requests per opcode and errors by errno."""
    blob = path.read_bytes()
    ops: Counter[int] = Counter()
    errs: Counter[str] = Counter()
    off = 0
    req_bytes = rep_bytes = 0
    while off < len(blob):
        btype, total = struct.unpack_from("<II", blob, off)
        if btype == 6:
            caplen, origlen = struct.unpack_from("<II", blob, off + 20)
            data = blob[off + 28:off + 28 + caplen]
            p = 0
            received = False
            while True:  # exported-PDU tags, big endian; P2P_DIRECTION 1 = received = a request
                tag, ln = struct.unpack_from(">HH", data, p)
                if tag == 35:
                    received = struct.unpack_from(">i", data, p + 4)[0] == 1
                p += 4 + ln
                if tag == 0:
                    break
            pdu = data[p:]
            if received:
                ops[struct.unpack_from("<I", pdu, 4)[0]] += 1
                req_bytes += origlen - p
            else:
                e = struct.unpack_from("<i", pdu, 4)[0]
                if e < 0:
                    errs[errno.errorcode[-e]] += 1
                rep_bytes += origlen - p
        off += total
    return ops, errs, req_bytes, rep_bytes


def test_stats_cli_matches_independent_counts() -> None:
    from dissectors.spec import fuse as spec

    ops, errs, req_bytes, rep_bytes = _independent_counts(SAMPLE)
    d = json.loads(fsinspect("stats", "--json", str(SAMPLE)).stdout)
    assert {name: o["count"] for name, o in d["ops"].items()} == {
        spec.OPCODE.name_of(op): n for op, n in ops.items()}
    assert d["errors"] == dict(errs)
    assert d["total"] == sum(ops.values())
    assert d["bytes"] == {"request": req_bytes, "reply": rep_bytes}
    assert d["lints"] == {}
    text = fsinspect("stats", str(SAMPLE)).stdout
    assert "LOOKUP" in text and "p99" in text and "errors by errno: ENOENT" in text and "lints: none" in text


def test_info_cli() -> None:
    out = fsinspect("info", str(SAMPLE)).stdout
    assert "fsinspect recording format 1" in out and "fusedev" in out
    assert "INIT:\n  epoch 1: kernel 7." in out and "negotiated: " in out
    d = json.loads(fsinspect("info", "--json", str(SAMPLE)).stdout)
    assert d["counts"]["records"] == d["counts"]["requests"] + d["counts"]["replies"]
    assert d["interfaces"][0]["kind"] == "fusedev" and d["init"][0]["max_write"] > 0


def test_export_cli_jsonl_json_text_and_filters() -> None:
    lines = fsinspect("export", str(SAMPLE), "--format", "jsonl").stdout.splitlines()
    rows = [json.loads(x) for x in lines]
    assert len(rows) > 50
    for row in rows:
        for key in ("opcode", "unique", "nodeid", "queue", "request", "reply", "error", "latency_ns"):
            assert key in row
    lk = next(r for r in rows if r["opcode"] == "LOOKUP" and r["error"] is None)
    assert lk["request"]["args"]["name"] and lk["reply"]["args"]["entry"]["attr"]["flags_names"] == []
    assert lk["latency_ns"] > 0
    enoent = [json.loads(x) for x in fsinspect("export", str(SAMPLE), "--format", "jsonl", "--filter",
                                                   "error == ENOENT").stdout.splitlines()]
    assert enoent and all(r["error"] == "ENOENT" and r["reply"]["header"]["error"] == -2 for r in enoent)
    assert len(enoent) == sum(1 for r in rows if r["error"] == "ENOENT")
    as_json = json.loads(fsinspect("export", str(SAMPLE), "--format", "json", "--filter", "op == INIT").stdout)
    assert [r["opcode"] for r in as_json] == ["INIT"]
    assert "SUBMOUNTS" not in as_json[0]["reply"]["args"]["init_out"]["flags_names"]
    text = fsinspect("export", str(SAMPLE), "--filter", 'op == LOOKUP and name ~ "nope"').stdout.splitlines()
    assert len(text) == 2 and all("LOOKUP" in t and "-> ENOENT" in t for t in text)
    bad = fsinspect("export", str(SAMPLE), "--filter", "latency > 1 ms", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    first, expr, caret = bad.stderr.splitlines()
    assert first.startswith("fsinspect export: --filter: unexpected 'ms'") and first.endswith("at column 13")
    assert (expr, caret) == ("  latency > 1 ms", "  " + " " * 12 + "^")


@pytest.mark.root
def test_regenerated_sample_from_the_real_daemon(tmp_path: Path) -> None:
    """make_samples.py end to end: the daemon records a real /dev/fuse session that tshark decodes."""
    require_root()
    path = _make_samples().make(tmp_path)
    with RecordingReader(path) as r:
        an = analyze(r)
        assert r.truncated is None
    assert an.lints == []
    ops = Counter(e.opname for e in an.exchanges)
    for op in ("INIT", "LOOKUP", "MKDIR", "CREATE", "WRITE", "READ", "READDIRPLUS", "RENAME", "UNLINK", "RMDIR",
               "SYMLINK", "READLINK", "LINK", "FSYNC", "STATFS"):
        assert ops[op] >= 1, op
    assert ops["FORGET"] + ops["BATCH_FORGET"] >= 1
    assert any(e.snapped for e in an.exchanges if e.opname in ("READ", "WRITE"))
    assert check_tshark_matches_our_decoder(path) == sum(1 for _ in RecordingReader(path))


@pytest.mark.root
def test_kill_9_of_a_recording_daemon_leaves_a_readable_file(tmp_path: Path) -> None:
    """`fsinspect daemon --standalone --record` killed with SIGKILL: the recording reads, every record decodes."""
    import os
    import signal
    import time

    require_root()
    shared, mnt, rec = tmp_path / "shared", tmp_path / "mnt", tmp_path / "live.pcapng"
    shared.mkdir()
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "fsinspect", "daemon", "--standalone", str(mnt), "--shared-dir",
                             str(shared), "--record", str(rec), "--log-level", "warning"], cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, "the daemon did not mount"
            time.sleep(0.05)
        for i in range(20):
            (mnt / f"f{i}").write_text("x" * i)
        assert len(os.listdir(mnt)) == 20
        time.sleep(0.6)  # idle: the tap's timer flushes what the last requests left in the buffer
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
    with RecordingReader(rec) as r:
        records = list(r)
        assert r.truncated is None or r.truncated.startswith("truncated tail")
    an = analyze(RecordingReader(rec))
    assert len(records) > 100 and all(e.decode_error is None for e in an.exchanges)
    creates = [e for e in an.exchanges if e.opname == "CREATE"]
    assert len(creates) == 20 and all(e.replied for e in creates)
    assert any(e.opname == "READDIRPLUS" and e.replied for e in an.exchanges)
    # The side index the daemon wrote as it recorded is trusted up to its last checkpoint and extended from
    # there: the same entries as a scan of a copy without it.
    import shutil

    from fsinspect.recording.index import RecordingIndex

    idx = RecordingIndex(rec)
    assert idx.resumed_at > 0 and idx.complete and len(idx) == len(an.exchanges)
    shutil.copy(rec, tmp_path / "copy.pcapng")
    scanned = RecordingIndex(tmp_path / "copy.pcapng")
    assert scanned.resumed_at == 0 and scanned.rebuilt
    assert [idx.offsets(i) for i in range(len(idx))] == [scanned.offsets(i) for i in range(len(scanned))]


@pytest.mark.guest
@pytest.mark.root
def test_regenerated_guest_sample(tmp_path: Path) -> None:
    """make_samples.py --guest end to end: real guest, proxy, C virtiofsd; tshark agrees with our decoder."""
    require_root()
    path = _make_samples().make_guest(tmp_path)
    with RecordingReader(path) as r:
        an = analyze(r)
        assert r.truncated is None
    assert an.lints == []
    assert {a.name for a in an.submounts.announced.values()} == {b"sub", b"inner"}
    assert {s.nodeid for s in an.submounts.syncfs} == {1, *an.submounts.announced}
    assert check_tshark_matches_our_decoder(path) > 100


def test_export_lists_requests_the_recording_ends_without_answering(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A recording that stops while a request waits (a hung back-end): export shows it pending, with how
    long it had waited by the last record, linted no-reply and stuck, not hidden."""
    from dissectors import fuse as F
    from fsinspect.cli import main
    from fsinspect.recording.writer import RecordingWriter

    path = tmp_path / "hung.pcapng"
    w = RecordingWriter(str(path), source="virtio")
    t = 1_700_000_000_000_000_000
    w.request(F.encode_request("MKDIR", {"mkdir": {"mode": 0o755}, "name": b"d"}, unique=2, nodeid=1), 1, 0, t)
    w.request(F.encode_request("GETATTR", {"getattr": {}}, unique=4, nodeid=1), 1, 1, t + 1_000)
    w.reply(F.encode_reply("GETATTR", {"attr_out": {}}, unique=4), 1, 1, t + 1_800_000_000)
    w.close()
    assert main(["export", str(path), "--format", "jsonl"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    hung = next(r for r in rows if r["opcode"] == "MKDIR")
    assert hung["state"] == "pending" and hung["age_ms"] == 1800.0 and hung["n"] == 1
    assert sorted(hung["lints"]) == ["no-reply", "stuck"] and hung["reply"] is None
    done = next(r for r in rows if r["opcode"] == "GETATTR")
    assert done["state"] == "done" and "age_ms" not in done and done["lints"] == ["stuck"]
