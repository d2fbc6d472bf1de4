"""bench/standalone.py against real /dev/fuse mounts: --requests counts what the kernel sends each daemon
(its fuse:fuse_request_send tracepoint), and the pyfuse3 peer caches no more than the mode it mirrors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parent.parent


def _requests(out: str, cache: str) -> dict[tuple[str, str], dict[str, float]]:
    """{(storm, target): {opcode: requests per op}} from the bench's request table for `cache`."""
    lines = out.splitlines()
    start = lines.index(next(x for x in lines if x.startswith(f"--cache {cache}: FUSE requests per op")))
    table: dict[tuple[str, str], dict[str, float]] = {}
    for line in lines[start + 1:]:
        if line.startswith("--cache"):
            break
        storm, target, per = line[:10].strip(), line[10:32].strip(), line[32:]
        table[storm, target] = {op: float(k) for op, k in (item.split() for item in per.split(", "))}
    return table


def test_requests_per_op_as_the_kernel_counts_them() -> None:
    """With --cache auto the stat storm is one LOOKUP per file and one for their directory on both sides (21
    in 60 stats: 0.35 per stat) and nothing else; the read-4K storm READs at every open on both sides (the peer answered opens
    with pyfuse3's default FOPEN_KEEP_CACHE and READ once per file, 0.33); no trace instance is left."""
    require_root()
    pytest.importorskip("pyfuse3")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    run = subprocess.run([sys.executable, "bench/standalone.py", "--rounds", "1", "--cache", "auto", "--files", "20",
                          "-n", "60", "--big-mb", "1", "--no-native", "--requests", "--passthrough"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = _requests(run.stdout, "auto")
    for target in ("fsinspect", "fsinspect pt=off", "pyfuse3"):
        assert got["stat", target] == {"LOOKUP": 0.35}, (target, run.stdout)
        assert got["read 4K", target]["OPEN"] == 1.0
    assert got["read 4K", "pyfuse3"]["READ"] == got["read 4K", "fsinspect pt=off"]["READ"] == 1.0
    assert "READ" not in got["read 4K", "fsinspect"]  # FUSE passthrough: the kernel reads the host file
    with open("/proc/self/mountinfo") as f:
        assert not any("fsinspect-bench-" in line for line in f)
