"""The side index written while recording: a recording fsinspect made opens without a scan (rotated parts
too); a recorder killed mid-write leaves an index the reader extends from its last checkpoint to the same
entries a whole rebuild gives; a torn or stale index is rebuilt; a recording without an index opens at once
and its index grows with the analysis pass."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dissectors import fuse as F
from fsinspect.recording.index import RecordingIndex, index_path
from fsinspect.recording.indexed import IndexedRecording
from fsinspect.recording.writer import RecordingWriter

ROOT = Path(__file__).resolve().parent.parent


def _traffic(w: RecordingWriter, n: int, start: int = 0) -> None:
    look = F.encode_request("LOOKUP", {"name": b"x"}, unique=1, nodeid=1)
    forget = F.encode_request("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, unique=2, nodeid=5)
    for i in range(start, start + n):
        h = i & 31
        if i % 7 == 0:
            w.request(forget, 0, None, 1000 + i)
            continue
        w.request(look[:8] + (i + 1).to_bytes(8, "little") + look[16:], 1, h, 1000 + i)
        if i % 97:  # a few never answered
            w.reply(F.encode_reply("LOOKUP", error=2, unique=i + 1), 1, h, 1001 + i)


def _entries(idx: RecordingIndex) -> list[tuple[int | None, int | None]]:
    return [idx.offsets(i) for i in range(len(idx))]


def _rebuilt(tmp: Path, parts: list[Path], name: str = "copy") -> list[tuple[int | None, int | None]]:
    """The entries a scan from the start gives, for copies of `parts` without any index."""
    d = tmp / name
    d.mkdir()
    for p in parts:
        shutil.copy(p, d / p.name)
    idx = RecordingIndex(d / parts[0].name)
    assert idx.rebuilt and idx.resumed_at == 0
    try:
        return _entries(idx)
    finally:
        idx.close()


def test_a_recording_opens_with_the_index_its_recorder_wrote(tmp_path: Path) -> None:
    p = tmp_path / "r.pcapng"
    with RecordingWriter(p) as w:
        _traffic(w, 5000)
    idx = RecordingIndex(p)
    assert not idx.rebuilt and idx.complete and len(idx) == 5000
    assert _entries(idx) == _rebuilt(tmp_path, [p])


def test_a_rotated_recording_opens_with_the_index_its_recorder_wrote(tmp_path: Path) -> None:
    p = tmp_path / "r.pcapng"
    with RecordingWriter(p, rotate_mb=0.05) as w:
        _traffic(w, 8000)
    assert len(w.paths) > 5
    idx = RecordingIndex(tmp_path)  # the directory names the recording
    assert not idx.rebuilt and idx.complete and len(idx) == 8000
    assert _entries(idx) == _rebuilt(tmp_path, w.paths)


def test_every_part_of_a_rotate_keep_recording_opens_with_its_recorders_index(tmp_path: Path) -> None:
    """--rotate-keep deletes the oldest parts, so the recording starts at whichever part is the oldest kept:
    each part gets its own index (offsets from its own start), which a reader opening the recording there
    takes as it is and extends over the later parts, to the entries a whole scan of them gives."""
    p = tmp_path / "r.pcapng"
    with RecordingWriter(p, rotate_mb=0.05, rotate_keep=3) as w:
        _traffic(w, 8000)
    kept = w.paths[-3:]
    assert len(w.paths) > 5 and sorted(tmp_path.glob("r*.pcapng")) == kept
    assert sorted(tmp_path.glob("*.fsidx")) == [index_path(part) for part in kept]
    for i in reversed(range(3)):  # (from the newest: opening a part writes back its own index only)
        idx = RecordingIndex(kept[i])
        try:
            assert idx.complete and len(idx) > 100 and idx.rebuilt == (i < 2), i  # (the newest: as it is)
            assert idx.resumed_at == kept[i].stat().st_size, i  # the recorder's index, extended past its part
            assert _entries(idx) == _rebuilt(tmp_path, kept[i:], f"copy{i}"), i
            whole = len(idx)
        finally:
            idx.close()
    rec = IndexedRecording(p, lazy_index=True)  # the replay UI's open, by the name of the deleted part 0:
    try:                                        # every row at once, from the index written back
        assert rec.parts == kept and len(rec) == whole and rec.index.complete and rec[whole - 1].unique > 0
    finally:
        rec.close()


def test_a_killed_recorder_leaves_an_index_the_reader_extends(tmp_path: Path) -> None:
    """SIGKILL mid-recording: the index says where it stopped; the reader pairs on from there with the
    requests that were still waiting, to exactly the entries of a whole rebuild."""
    p = tmp_path / "r.pcapng"
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_recording_live_index import _traffic
        from fsinspect.recording.writer import RecordingWriter
        w = RecordingWriter({str(p)!r}, flush_bytes=1 << 12, rotate_mb=0.5)
        i = 0
        while True:
            _traffic(w, 1000, i)
            i += 1000
            if i == 20_000:
                print("ready", flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    idx = RecordingIndex(p)
    assert 0 < idx.resumed_at <= idx.total and idx.complete
    parts = idx.parts
    assert len(parts) > 1 and _entries(idx) == _rebuilt(tmp_path, parts)


def test_a_torn_or_stale_index_is_rebuilt(tmp_path: Path) -> None:
    p = tmp_path / "r.pcapng"
    with RecordingWriter(p) as w:
        _traffic(w, 3000)
    want = _rebuilt(tmp_path, [p])
    ip = index_path(p)
    with open(ip, "r+b") as f:  # torn: cut in the middle of the entries
        f.truncate(os.path.getsize(ip) // 2)
    idx = RecordingIndex(p)
    assert idx.rebuilt and idx.resumed_at == 0 and _entries(idx) == want
    idx.close()
    saved = ip.read_bytes()
    with RecordingWriter(tmp_path / "other.pcapng") as w:  # another recording of the same size, same name
        _traffic(w, 3000, 1)
    os.replace(tmp_path / "other.pcapng", p)
    ip.write_bytes(saved)  # beside it, the first one's index
    idx = RecordingIndex(p)
    assert idx.rebuilt and idx.resumed_at == 0 and len(idx) == 3000
    assert _entries(idx) != want


def test_a_recording_without_an_index_opens_at_once_and_grows(tmp_path: Path) -> None:
    """The index grows with the analysis pass; a filter started meanwhile follows it to the end."""
    from fsinspect.analysis import compile_filter
    from fsinspect.analysis.filter import filter_costs

    p = tmp_path / "r.pcapng"
    with RecordingWriter(p, index=False) as w:
        _traffic(w, 30_000)
    assert not index_path(p).exists()
    rec = IndexedRecording(p, lazy_index=True)
    assert len(rec) == 0 and not rec.index.complete
    build = rec.analysis_build()
    it = rec.records()
    for _ in range(2000):
        build.apply(next(it))
    assert 0 < len(rec) < 30_000 and rec[5].n == 6
    text = "error == ENOENT"
    matches = rec.scan(compile_filter(text), costs=filter_costs(text))
    early = [next(matches) for _ in range(5)]
    for r in it:
        build.apply(r)
    build.finish(rec.records_end)
    assert rec.index.complete and len(rec) == 30_000 and rec.analysed == 30_000
    got = early + list(matches)
    assert got == [i for i in range(30_000) if i % 7 and i % 97] == list(rec.scan(compile_filter(text)))
    rec.close()
    again = IndexedRecording(p)
    assert not again.index.rebuilt and again.analysis is not None


class _Killed(Exception):
    """The recorder stops here, as a SIGKILL stops it: no write after this one."""


@pytest.mark.parametrize("gap", [16, 128])  # 16 (one entry): appends move the list nearly every time
def test_a_recorder_killed_before_any_index_write_leaves_a_checkpoint_the_reader_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gap: int) -> None:
    """Each write the index makes (entries, a pending list moved out of the entries' way, a new list, the
    header, the trim), in turn, is where the recorder dies: the reader must always find the last whole
    checkpoint and resume from it (never a torn file rebuilt from the start), to the entries a whole scan
    gives.  The lists are kept close behind the entries, so appends have to move them."""
    from fsinspect.recording import indexfile

    monkeypatch.setattr(indexfile, "GAP", gap)
    monkeypatch.setattr(indexfile.IndexFile, "FLUSH", 256)
    state = {"left": -1, "headers": 0}
    real = os

    class KillingOs:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def _tick(self) -> None:
            if state["left"] == 0:
                raise _Killed
            state["left"] -= 1

        def pwrite(self, fd: int, data: bytes, pos: int) -> int:
            self._tick()
            n = real.pwrite(fd, data, pos)
            state["headers"] += pos == 0
            return n

        def ftruncate(self, fd: int, length: int) -> None:
            self._tick()
            real.ftruncate(fd, length)

    monkeypatch.setattr(indexfile, "os", KillingOs())

    def record(d: Path, stop: int) -> Path:
        d.mkdir()
        state["left"], state["headers"] = stop, 0
        w = RecordingWriter(d / "r.pcapng", flush_bytes=1 << 10)
        try:
            _traffic(w, 400)
            w.close()
        except _Killed:
            ix = w._index
            assert ix is not None and ix.fd is not None
            real.close(ix.fd)
            real.close(w._fd)
        return d / "r.pcapng"

    record(tmp_path / "whole", -1)
    writes = -1 - state["left"]
    assert writes > 100
    moved = 0
    for stop in range(writes):
        p = record(tmp_path / f"k{stop}", stop)
        headers = state["headers"]
        monkeypatch.setattr(indexfile, "os", real)  # the reader's own writes are not killed
        try:
            idx = RecordingIndex(p)
            try:
                assert idx.complete, stop
                if headers:
                    assert idx.resumed_at > 0, (stop, headers)
                    moved += idx.resumed_at < p.stat().st_size
                assert _entries(idx) == _rebuilt(tmp_path / f"k{stop}", [p]), stop
            finally:
                idx.close()
        finally:
            monkeypatch.setattr(indexfile, "os", KillingOs())
    assert moved > writes // 2  # (most kills left records past the last checkpoint to pair on from it)
