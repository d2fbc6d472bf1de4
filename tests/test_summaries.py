"""The end-of-run summaries (demo, proxy) and `fsinspect stats`: one screen, totals first, every opcode,
SYNCFS per superblock, one duration format, and an ops/s that says its time base (issues 16 and 19)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fsinspect.analysis.inodes import group_syncfs
from fsinspect.analysis.render import fmt_ns
from fsinspect.demo import DemoResult, render
from fsinspect.guest.console import GuestResult, Step
from fsinspect.proxy import session as S
from tests.test_proxy_session import _release, captures, feed, session  # noqa: F401 (_release: autouse)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "recordings" / "samples" / "guest-syncfs.pcapng"
SCREEN = 40  # lines


def _long_run(tmp_path: Path) -> dict[str, Any]:
    """The sample's summary as a 255 s demo would have it: the SYNCFS calls of 200 loops, and 40 opcodes."""
    s = session(tmp_path, "sum", defer_analysis=False)
    try:
        feed(s, captures())
        s.analyzer.finish()
        summ = json.loads(S.summary_json(s.summary()))
    finally:
        assert s.writer is not None
        s.writer.close()
    summ["syncfs"] = summ["syncfs"] * 200
    summ["opcodes"].update({f"OP{i}": i for i in range(1, 41 - len(summ["opcodes"]))})
    return summ


def _guest() -> GuestResult:
    g = GuestResult("demo", "myfs", status="ok", kernel="6.1", accel="tcg", wall_s=255.0)
    t = 0.0
    for _loop in range(50):
        for name in ("crud-create", "crud-read", "storm", "io-write", "io-read", "syncfs"):
            g.steps.append(Step(name, t, t + 0.25, 0))
            t += 0.25
    return g


def test_demo_summary_fits_on_a_screen(tmp_path: Path) -> None:
    summ = _long_run(tmp_path)
    text = render(DemoResult(guest=_guest(), summary=summ, record=tmp_path / "rec.pcapng"))
    lines = text.splitlines()
    assert len(lines) <= SCREEN, text
    assert lines[0].startswith(f"FUSE: {summ['requests']} requests, {summ['replies']} replies"), lines[0]
    for op in summ["opcodes"]:  # every opcode that occurred, READ/WRITE/SYNCFS included
        assert re.search(rf"\b{op} {summ['opcodes'][op]}\b", text), op
    groups = group_syncfs(summ["syncfs"])
    assert len(groups) == 3 and f"SYNCFS: {len(summ['syncfs'])} calls on 3 superblock(s)" in text
    for g in groups:
        assert f"  {g.label}: {g.count} calls, p50 {fmt_ns(g.p50_ns)}, max {fmt_ns(g.max_ns)}" in lines
    assert {g.label.split(" (")[0] for g in groups} == {"/", "/sub", "/sub/inner"}
    assert "superblock root" not in text  # flagged only when wrong
    assert "crud-create 50x 250ms avg" in text
    assert not re.search(r"\d ?us\b", text)  # one duration format: µs, never us


def test_proxy_summary_groups_syncfs_and_lists_every_opcode(tmp_path: Path) -> None:
    summ = _long_run(tmp_path)
    text = S.render_summary(summ)
    assert len(text.splitlines()) <= SCREEN, text
    assert all(op in text for op in summ["opcodes"])
    assert f"SYNCFS ({len(summ['syncfs'])} calls), per superblock:" in text
    assert "/sub/inner (nodeid " in text and not re.search(r"\d ?us\b", text)


def test_a_wrong_syncfs_is_flagged_and_nothing_else() -> None:
    recs = [{"nodeid": 1, "path": "/", "latency_ns": 2_000_000, "superblock_root": True, "error": None},
            {"nodeid": 7, "path": "/a/b", "latency_ns": 50_000, "superblock_root": False, "error": 5}]
    lines = [g.line() for g in group_syncfs(recs)]
    assert lines == ["/ (nodeid 1): 1 call, p50 2.00ms, max 2.00ms",
                     "/a/b (nodeid 7): 1 call, p50 50.0µs, max 50.0µs  [NOT a superblock root; 1 failed]"]


def test_one_duration_format_by_magnitude() -> None:
    assert [fmt_ns(v) for v in (870, 52_000, 999_600, 3_975_000, 17_100_000, 1_250_000_000, None)] == \
        ["870ns", "52.0µs", "1.00ms", "3.98ms", "17.1ms", "1.25s", "-"]


def test_stats_states_its_time_base() -> None:
    """`ops/s: mean 123.8, peak 73` read as nonsense: the mean is over the span, the peak per 1 s bucket."""
    res = subprocess.run([sys.executable, "-m", "fsinspect", "stats", str(SAMPLE)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    js = json.loads(subprocess.run([sys.executable, "-m", "fsinspect", "stats", "--json", str(SAMPLE)],
                                   capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    rate = js["rate"]
    line = next(x for x in res.stdout.splitlines() if x.startswith("ops/s:"))
    assert rate["span_ns"] < rate["bucket_ns"] == 1_000_000_000  # the sample is shorter than one bucket
    want = (f"ops/s: mean {js['total'] / (rate['span_ns'] / 1e9):.1f} ({js['total']} exchanges over the "
            f"recording's {fmt_ns(rate['span_ns'])} span); peak {rate['peak_ops_per_bucket']} exchanges in one "
            f"1.00s bucket (the recording is shorter than a bucket)")
    assert line == want, line
    assert "SYNCFS: " in res.stdout and "/sub/inner (nodeid " in res.stdout


@pytest.mark.guest
@pytest.mark.root
def test_real_headless_demo_summary(guest_image: Any, tmp_path: Path) -> None:
    """The real demo, headless: one screen, totals first, READ/WRITE/SYNCFS among the opcodes, SYNCFS per
    superblock named by path."""
    res = subprocess.run([sys.executable, "-m", "fsinspect", "demo", "--headless", "--loops", "1", "--storm", "100",
                          "--io-mb", "4", "--record", str(tmp_path / "rec.pcapng")], capture_output=True, text=True,
                         timeout=400, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) <= SCREEN and lines[0].startswith("FUSE: ") and " lint(s)" in lines[0], res.stdout
    ops = res.stdout.split("opcodes (")[1].split("latency")[0]
    for op in ("LOOKUP", "GETATTR", "CREATE", "READ", "WRITE", "SYNCFS", "FORGET"):
        assert re.search(rf"\b{op} \d+", ops), (op, ops)
    sync = [ln.strip() for ln in lines if re.match(r"  /\S* \(nodeid \d+\): \d+ calls?, p50 ", ln)]
    assert {ln.split(" (")[0] for ln in sync} == {"/", "/sub", "/sub/inner"}, res.stdout
    assert not re.search(r"\d ?us\b", res.stdout) and "superblock root" not in res.stdout


def test_info_wraps_the_negotiated_flags_between_names() -> None:
    text = subprocess.run([sys.executable, "-m", "fsinspect", "info", str(SAMPLE)], capture_output=True, text=True,
                          check=True, cwd=ROOT).stdout
    js = json.loads(subprocess.run([sys.executable, "-m", "fsinspect", "info", "--json", str(SAMPLE)],
                                   capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    names = js["init"][0]["negotiated_flags"]
    lines = text.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("    negotiated: "))
    block = [lines[i]] + [ln for ln in lines[i + 1:] if ln.startswith(" " * 16)]
    assert len("|".join(names)) > 84 and len(block) > 1, "the sample's list must be long enough to wrap"
    assert all(len(ln) <= 100 for ln in block)
    assert "".join(ln.strip() for ln in block).removeprefix("negotiated: ").split("|") == names
