"""Rotation: the writer at and below its threshold, --rotate-keep, the options' errors, and every reader
taking the parts (first part, glob, directory) as one continuous recording."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dissectors import fuse as F
from fsinspect.analysis.exchange import NO_REPLY
from fsinspect.recording.index import RecordingIndex
from fsinspect.recording.reader import RecordingError, RecordingReader
from fsinspect.recording.replay import analyze
from fsinspect.recording.writer import RecordingWriter

ROOT = Path(__file__).resolve().parent.parent


def lookup(unique: int) -> bytes:
    return F.encode_request("LOOKUP", {"name": b"x"}, unique=unique, nodeid=1)


def entry(unique: int) -> bytes:
    return F.encode_reply("LOOKUP", {"entry": {"nodeid": unique, "attr": {"ino": unique}}}, unique=unique)


def init_pair() -> tuple[bytes, bytes]:
    req = F.encode_request("INIT", {"init": F.make("fuse_init_in", major=7, minor=45, max_readahead=65536)},
                           unique=1)
    rep = F.encode_reply("INIT", {"init_out": F.make("fuse_init_out", major=7, minor=45, max_write=1 << 20)},
                         unique=1)
    return req, rep


def record(path: Path, n: int, **kw: object) -> RecordingWriter:
    """n LOOKUPs after an INIT, with two requests in flight at any time (so exchanges straddle parts)."""
    w = RecordingWriter(path, source="virtio", **kw)  # type: ignore[arg-type]
    ireq, irep = init_pair()
    w.request(ireq, 1, 0, 1)
    w.reply(irep, 1, 0, 2)
    for u in range(2, n + 2):
        w.request(lookup(u), 1, u % 64, 10 * u)
        if u > 2:
            w.reply(entry(u - 1), 1, (u - 1) % 64, 10 * u + 1)
    w.reply(entry(n + 1), 1, (n + 1) % 64, 10 * n + 100)
    w.close()
    return w


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsinspect", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_a_threshold_below_a_section_header_rotates_without_recursing(tmp_path: Path) -> None:
    # Before: flush -> _open_part -> flush -> ... RecursionError, with hundreds of header-only files.
    w = record(tmp_path / "r.pcapng", 50, rotate_mb=1e-6, flush_bytes=1)
    assert len(w.paths) >= 50
    with RecordingReader(tmp_path / "r.pcapng") as r:
        an = analyze(r)
        assert r.truncated is None and r.parts == w.paths
    assert an.count == 51 and not an.lints
    for p in w.paths:  # each part is a recording of its own, too
        with RecordingReader(p) as one:
            assert one.section.meta["part"] == w.paths.index(p)


def test_parts_end_at_the_first_block_past_the_threshold(tmp_path: Path) -> None:
    limit = 0.01  # MB
    w = record(tmp_path / "r.pcapng", 400, rotate_mb=limit, flush_bytes=1 << 30, flush_interval=1e9)
    sizes = [p.stat().st_size for p in w.paths]
    assert len(sizes) >= 3
    rotate = int(limit * 1024 * 1024)
    biggest_record = 200
    for s in sizes[:-1]:
        assert rotate <= s < rotate + biggest_record, sizes
    assert sizes[-1] < rotate + biggest_record


def test_exchanges_across_part_boundaries_pair_as_one_recording(tmp_path: Path) -> None:
    base = tmp_path / "r.pcapng"
    w = record(base, 400, rotate_mb=0.01)
    assert len(w.paths) >= 3
    seen = []
    for spec in (base, tmp_path / "r*.pcapng", tmp_path, w.paths[0]):
        with RecordingReader(str(spec)) as r:
            an = analyze(r)
            seen.append((r.parts, an.count, len(an.lints)))
    assert seen == [(w.paths, 401, 0)] * 4
    # Part by part, each boundary cuts an exchange: a no-reply in one part, an orphan reply in the next.
    alone = 0
    for p in w.paths:
        with RecordingReader(p, one_file=True) as r:
            alone += sum(1 for lint in analyze(r).lints if lint.name == NO_REPLY)
    assert alone >= len(w.paths) - 1
    # The side index numbers exchanges across parts like the analyzer.
    idx = RecordingIndex(tmp_path)
    assert len(idx) == 401 and all(a is not None and b is not None for a, b in map(idx.offsets, range(401)))
    with RecordingReader(base) as r:
        req_off, rep_off = idx.offsets(400)
        assert req_off is not None and rep_off is not None
        assert F.decode_request(r.record_at(req_off).data).unique == 401
        assert F.decode_reply(r.record_at(rep_off).data, "LOOKUP").unique == 401


def test_rotate_keep_bounds_the_parts_on_disk(tmp_path: Path) -> None:
    base = tmp_path / "r.pcapng"
    record(base, 5)
    RecordingIndex(base).close()  # an index beside part 0 of an older recording to the same name
    assert (tmp_path / "r.pcapng.fsidx").exists()
    w = record(base, 2000, rotate_mb=0.01, rotate_keep=3)
    assert not (tmp_path / "r.pcapng.fsidx").exists()  # deleted with the part it indexed
    on_disk = sorted(tmp_path.glob("r*.pcapng"))
    assert len(w.paths) > 6 and on_disk == w.paths[-3:] and not base.exists()
    assert sum(p.stat().st_size for p in on_disk) < 3 * (0.01 * 1024 * 1024 + 200)
    # The recording is still named by its first file's name, a glob or the directory; it starts mid-run
    # (the INIT in the oldest kept part's header decodes its replies).
    for spec in (base, tmp_path / "r*.pcapng", tmp_path):
        with RecordingReader(str(spec)) as r:
            an = analyze(r)
        assert r.parts == w.paths[-3:]
        assert an.count > 40 and all(e.decode_error is None for e in an.exchanges if e.req_ts is not None)
        assert sum(1 for x in an.lints if x.name == NO_REPLY) == 0


def test_a_stale_part_of_an_older_run_is_not_read(tmp_path: Path) -> None:
    base = tmp_path / "r.pcapng"
    old = record(base, 2000, rotate_mb=0.01)
    new = record(base, 10, rotate_mb=0.01)
    assert len(old.paths) > len(new.paths) == 1
    with RecordingReader(base) as r:
        assert r.parts == [base] and analyze(r).count == 11


def test_a_directory_with_two_recordings_is_refused_by_name(tmp_path: Path) -> None:
    record(tmp_path / "a.pcapng", 5)
    record(tmp_path / "b.pcapng", 5)
    with pytest.raises(RecordingError, match=r"holds 2 recordings .*a\.pcapng.*b\.pcapng.*name one"):
        RecordingReader(tmp_path)
    with pytest.raises(RecordingError, match="no file matches"):
        RecordingReader(str(tmp_path / "zz*.pcapng"))
    with pytest.raises(RecordingError, match="No such file"):
        RecordingReader(tmp_path / "none.pcapng")


@pytest.mark.parametrize("command", ["proxy", "daemon"])
@pytest.mark.parametrize(("value", "message"), [
    ("-1", "-1 is not a size"), ("0", "0 is not a size"), ("0.05", "0.05 MB is below the minimum part size, 0.1 MB"),
    ("nan", "nan is not a size"), ("inf", "inf is not a size"), ("big", "'big' is not a number of megabytes"),
])
def test_bad_rotate_values_are_one_line_errors(tmp_path: Path, command: str, value: str, message: str) -> None:
    args = (["--listen", str(tmp_path / "s"), "--backend", str(tmp_path / "b")] if command == "proxy"
            else ["--socket-path", str(tmp_path / "s"), "--shared-dir", str(tmp_path)])
    r = cli(command, *args, "--record", str(tmp_path / "r.pcapng"), "--rotate-mb", value)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"argument --rotate-mb: {message}" in r.stderr.splitlines()[-1]
    assert not (tmp_path / "r.pcapng").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--rotate-mb", "1", "--rotate-keep", "0"], "argument --rotate-keep: 0: keep at least 1 part"),
    (["--rotate-keep", "2"], "--rotate-keep N needs --rotate-mb MB"),
    (["--rotate-mb", "1", "--no-record"], ""),
])
def test_rotate_keep_and_combinations_are_checked(tmp_path: Path, extra: list[str], message: str) -> None:
    if "--no-record" in extra:
        r = cli("proxy", "--listen", str(tmp_path / "s"), "--backend", str(tmp_path / "b"), "--rotate-mb", "1")
        message = "--rotate-mb and --rotate-keep need --record FILE"
    else:
        r = cli("proxy", "--listen", str(tmp_path / "s"), "--backend", str(tmp_path / "b"),
                "--record", str(tmp_path / "r.pcapng"), *extra)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr.splitlines()[-1]


def test_info_stats_export_read_the_parts_as_one(tmp_path: Path) -> None:
    base = tmp_path / "r.pcapng"
    w = record(base, 400, rotate_mb=0.01)
    one = tmp_path / "one" / "r.pcapng"
    one.parent.mkdir()
    record(one, 400)
    infos = [json.loads(cli("info", "--json", str(spec)).stdout) for spec in (base, one)]
    assert infos[0]["counts"] == infos[1]["counts"] and infos[0]["counts"]["exchanges"] == 401
    assert infos[0]["parts"] == [str(p) for p in w.paths] and len(infos[0]["interfaces"]) == 1
    assert infos[0]["interfaces"][0]["records"] == infos[1]["interfaces"][0]["records"] == 802
    stats = [json.loads(cli("stats", "--json", spec).stdout) for spec in (str(tmp_path / "r*"), str(one))]
    assert stats[0]["ops"] == stats[1]["ops"] and stats[0]["lints"] == {}
    lines = [cli("export", "--format", "jsonl", str(spec)).stdout.splitlines() for spec in (tmp_path, one)]
    assert len(lines[0]) == len(lines[1]) == 401
