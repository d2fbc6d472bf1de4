"""`fsinspect export` to pcapng (filtered, self-describing, read by tshark + fuse.lua) and to Parquet
(typed rows read back by pyarrow and queried by DuckDB), streaming in one pass."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dissectors import fuse as F
from fsinspect.analysis import compile_filter
from fsinspect.recording.export import filtered_records
from fsinspect.recording.reader import RecordingReader
from fsinspect.recording.writer import RecordingWriter
from tests.test_recording_samples import tshark_fields

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "recordings" / "samples"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsinspect", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def jsonl(spec: str, flt: str | None = None) -> list[dict[str, object]]:
    r = cli("export", "--format", "jsonl", spec, *(["--filter", flt] if flt else []))
    assert r.returncode == 0, r.stderr
    return [json.loads(x) for x in r.stdout.splitlines()]


def check_syncfs_pcapng(src: Path, out: Path) -> int:
    """Export `op == SYNCFS` to pcapng: tshark with fuse.lua shows exactly those exchanges (both sides),
    plus the INIT and the vhost-user control plane of the source.  Returns the SYNCFS count."""
    want = jsonl(str(src), "op == SYNCFS")
    assert want, "the recording has no SYNCFS"
    r = cli("export", str(src), "--format", "pcapng", "--filter", "op == SYNCFS", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rows = tshark_fields(out, "fuse.opcode", "fuse.unique", "fuse.reply", "_ws.col.Protocol")
    fuse = [(int(op), int(u), rep == "1") for op, u, rep, _ in rows if op]
    opcodes = Counter(op for op, _, _ in fuse)
    assert opcodes == Counter({50: 2 * len(want), 26: 2}) or opcodes == Counter({50: 2 * len(want)}), opcodes
    got = sorted((u, rep) for op, u, rep in fuse if op == 50)
    assert got == sorted((int(str(x["unique"])), rep) for x in want for rep in (False, True))
    with RecordingReader(src) as rd:
        control = sum(1 for rec in rd.records() if not rec.is_fuse)
    assert sum(1 for *_, proto in rows if proto == "vhost-user") == control  # the control plane came along: self-describing
    again = jsonl(str(out))  # and it reads back as a recording, the same exchanges
    def same(x: dict[str, object]) -> dict[str, object]:
        # Numbered anew; the LOOKUPs that announced the submounts are not in the export, so what it says
        # about submounts (a lint, a flag) is the export's own.
        return {k: v for k, v in x.items() if k not in ("n", "index", "lints", "submount")}

    assert [same(x) for x in again if x["opcode"] == "SYNCFS"] == [same(x) for x in want]
    return len(want)


def check_parquet_matches_stats(spec: str, out: Path) -> None:
    """A Parquet export read back by pyarrow has stats' per-opcode counts and errors, typed."""
    pq = pytest.importorskip("pyarrow.parquet")
    r = cli("export", spec, "--format", "parquet", "-o", str(out))
    assert r.returncode == 0, r.stderr
    t = pq.read_table(out)
    stats = json.loads(cli("stats", "--json", spec).stdout)
    ops = Counter(t.column("opcode").to_pylist())
    assert ops == Counter({k: v["count"] for k, v in stats["ops"].items()})
    errors = Counter(e for e in t.column("error").to_pylist() if e)
    assert errors == Counter(stats["errors"])
    assert t.num_rows == stats["total"]
    types = {f.name: str(f.type) for f in t.schema}
    assert types["time"] == "timestamp[ns, tz=UTC]" and types["unique"] == "uint64"
    assert types["latency_ns"] == "int64" and types["lints"] == "list<element: string>"


def test_syncfs_export_of_a_real_guest_recording_opens_in_tshark(tmp_path: Path) -> None:
    assert check_syncfs_pcapng(SAMPLES / "guest-syncfs.pcapng", tmp_path / "s.pcapng") >= 3


@pytest.mark.parametrize("sample", ["guest-syncfs.pcapng", "fusedev-workload.pcapng"])
def test_parquet_counts_equal_stats(tmp_path: Path, sample: str) -> None:
    check_parquet_matches_stats(str(SAMPLES / sample), tmp_path / "x.parquet")


def test_the_readme_duckdb_query_runs_over_exports(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"```sql\n(.*?)```", readme, re.S)
    assert m, "README shows a DuckDB query"
    exports = tmp_path / "exports"
    exports.mkdir()
    for s in ("guest-syncfs", "fusedev-workload"):
        assert cli("export", str(SAMPLES / f"{s}.pcapng"), "--format", "parquet",
                   "-o", str(exports / f"{s}.parquet")).returncode == 0
    sql = m.group(1).replace("'exports/*.parquet'", f"'{exports}/*.parquet'")
    rows = duckdb.sql(sql).fetchall()
    # Recompute the README's answer (errors per opcode across both recordings) from our own exports.
    want: Counter[str] = Counter()
    for s in ("guest-syncfs", "fusedev-workload"):
        for x in jsonl(str(SAMPLES / f"{s}.pcapng")):
            if x["error"]:
                want[str(x["opcode"])] += 1
    assert {r[0]: r[1] for r in rows} == dict(want) and rows


def _lookup(u: int) -> bytes:
    return F.encode_request("LOOKUP", {"name": f"f{u}".encode()}, unique=u, nodeid=1)


def _entry(u: int) -> bytes:
    return F.encode_reply("LOOKUP", {"entry": {"nodeid": u, "attr": {"ino": u}}}, unique=u)


def test_a_request_answered_late_leaves_the_window_and_still_comes_out(tmp_path: Path) -> None:
    """A LOOKUP answered only at the end: with a small window it is set aside alone (out of file order);
    every chosen record comes out once, whatever the window."""
    p = tmp_path / "r.pcapng"
    with RecordingWriter(p) as w:
        w.request(_lookup(1), 1, 1, 1)  # answered last
        for u in range(2, 3000):
            w.request(_lookup(u), 1, 2 + u % 100, 10 * u)
            w.reply(_entry(u), 1, 2 + u % 100, 10 * u + 1)
            if u % 1000 == 0:
                w.control(b"\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00", from_frontend=True, ts_ns=10 * u + 2)
        w.reply(_entry(1), 1, 1, 10**6)
        w.request(_lookup(5000), 1, 7, 10**6 + 1)  # never answered
    pred = compile_filter('name ~ "^f(1|5000|2999)$" or name ~ "^f1.0$"')
    results = []
    for window in (1 << 30, 4096):
        with RecordingReader(p) as r:
            out = [(rec.offset, chosen) for rec, chosen in filtered_records(r, pred, window_bytes=window)]
        results.append(out)
    big, small = results
    assert sorted(big) == sorted(small) and big == sorted(big)  # the big window keeps file order
    assert small != sorted(small)  # the small one wrote the late LOOKUP after its neighbours
    chosen = [o for o, c in big if c]
    assert len(chosen) == 2 * 12 + 1  # f1, f2999, f100..f190: request and reply; f5000: its request
    assert len(big) - len(chosen) == 2  # the control messages


def test_file_formats_need_an_output_and_never_overwrite_the_source(tmp_path: Path) -> None:
    src = SAMPLES / "guest-syncfs.pcapng"
    r = cli("export", str(src), "--format", "pcapng")
    assert r.returncode == 2 and r.stderr.strip().endswith("--format pcapng writes a file: give -o OUT")
    r = cli("export", str(src), "--format", "parquet", "-o", str(src))
    assert r.returncode == 2 and "is the recording being read" in r.stderr and "Traceback" not in r.stderr
    r = cli("export", str(src), "--format", "pcapng", "--filter", "op ==", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.count("\n") <= 3 and "--filter" in r.stderr


def test_a_progress_bar_on_a_terminal_only(tmp_path: Path) -> None:
    import os
    import pty

    pytest.importorskip("pyarrow")
    p = tmp_path / "r.pcapng"
    with RecordingWriter(p) as w:
        for u in range(1, 3000):
            w.request(_lookup(u), 1, u % 64, 10 * u)
            w.reply(_entry(u), 1, u % 64, 10 * u + 1)
    master, slave = pty.openpty()
    try:
        r = subprocess.run([sys.executable, "-m", "fsinspect", "export", str(p), "--format", "parquet", "-o",
                            str(tmp_path / "x.parquet")], stdout=subprocess.PIPE, stderr=slave, cwd=ROOT,
                           timeout=120, check=False)
        os.set_blocking(master, False)
        shown = os.read(master, 1 << 16).decode(errors="replace")
    finally:
        os.close(master)
        os.close(slave)
    assert r.returncode == 0 and "export [" in shown and "records" in shown and "2999 exchanges" in shown
    piped = cli("export", str(p), "--format", "parquet", "-o", str(tmp_path / "y.parquet"))
    assert piped.returncode == 0 and "export [" not in piped.stderr
