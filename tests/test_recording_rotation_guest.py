"""Rotation on a real run: QEMU + Linux guest -> `fsinspect proxy --rotate-mb 1` -> the bundled daemon,
which records the same run unrotated.  Every reader gives the rotated recording the counts of the whole one."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fsinspect.guest import launcher
from fsinspect.guest.build import GuestImage
from fsinspect.guest.share import Share
from fsinspect.recording.index import RecordingIndex
from fsinspect.recording.parts import part_key
from tests.guest_fixtures import explain
from tests.test_proxy_e2e import bundled_daemon, start_proxy
from tests.test_recording_export import check_parquet_matches_stats, check_syncfs_pcapng

pytestmark = [pytest.mark.guest, pytest.mark.root]
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "fsinspect", *args], capture_output=True, text=True, check=True,
                          cwd=ROOT, timeout=600).stdout


def ops(stats: dict[str, Any]) -> dict[str, tuple[int, dict[str, int]]]:
    return {name: (o["count"], o["errors"]) for name, o in stats["ops"].items()}


def test_rotated_proxy_recording_reads_as_the_whole_run(guest_image: GuestImage, guest_share: Share,
                                                        tmp_path: Path) -> None:
    rotated, whole = tmp_path / "rot" / "rec.pcapng", tmp_path / "daemon.pcapng"
    rotated.parent.mkdir()
    with launcher.short_tmpdir() as work, bundled_daemon(guest_share, work, tmp_path,
                                                         extra=("--record", str(whole))) as be:
        listen = work / "proxy.sock"
        proxy = start_proxy(listen, be, rotated, tmp_path / "summary.json", "--rotate-mb", "1")
        try:
            res = launcher.run_guest(listen, image=guest_image, workload="full", timeout=300,
                                     watch=[proxy, *be.processes], params={"xattr": 1})
            assert proxy.wait(15) == 0
            daemon = be.processes[0]
            assert isinstance(daemon, subprocess.Popen) and daemon.wait(15) == 0
        finally:
            launcher.stop_process(proxy)
    assert res.ok, explain(res)
    parts = sorted((p for p in rotated.parent.iterdir() if p.suffix == ".pcapng"), key=part_key)  # (and its index)
    assert len(parts) >= 3, parts
    assert all(p.stat().st_size < (1 << 20) + (1 << 17) for p in parts[:-1])
    counters = json.loads((tmp_path / "daemon.json").read_text())

    # info: the same requests, replies and exchanges as the daemon's unrotated recording, no lints.
    info_rot, info_whole = (json.loads(cli("info", "--json", str(p))) for p in (rotated, whole))
    assert info_rot["parts"] == [str(p) for p in parts]
    keys = ("requests", "replies", "exchanges", "lints")
    assert {k: info_rot["counts"][k] for k in keys} == {k: info_whole["counts"][k] for k in keys}
    assert info_rot["counts"]["lints"] == 0 and info_rot["counts"]["exchanges"] > 10_000
    # The proxy wrote the side index of the parts as it recorded them: nothing to scan at the first open.
    idx = RecordingIndex(rotated)
    assert not idx.rebuilt and idx.complete and len(idx) == info_rot["counts"]["exchanges"]
    idx.close()
    # stats (by the directory and by a glob): the same per-opcode counts and errors, equal to the daemon's
    # own counters; not one no-reply at the part boundaries.
    for spec in (str(rotated.parent), str(rotated.parent / "rec*.pcapng")):
        s_rot = json.loads(cli("stats", "--json", spec))
        assert ops(s_rot) == ops(json.loads(cli("stats", "--json", str(whole))))
        assert {k: v[0] for k, v in ops(s_rot).items()} == counters["ops"]
        assert s_rot["lints"] == {}
    # export: one line per exchange, the same opcodes.
    lines = [cli("export", "--format", "jsonl", str(p)).splitlines() for p in (rotated, whole)]
    per_op = [Counter(json.loads(x)["opcode"] for x in ls) for ls in lines]
    assert per_op[0] == per_op[1] and sum(per_op[0].values()) == info_rot["counts"]["exchanges"]
    # The filtered exports of the rotated recording: pcapng (tshark + fuse.lua) and Parquet (pyarrow).
    check_syncfs_pcapng(rotated, tmp_path / "syncfs.pcapng")
    check_parquet_matches_stats(str(rotated.parent), tmp_path / "x.parquet")
