"""AddressSanitizer + UBSan build of the C ring core, fuzzed with random rings and memory maps.

tests/ring_fuzz.c is a standalone C driver (no Python): every region is its own exact-size malloc, so
any access outside a region trips ASan; UBSan aborts on undefined behaviour.  Default CI runs 30k
cases (a few seconds); `-m slow` runs 1M.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "dissectors" / "ring"


def build(tmp_path: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "no C compiler: scripts/setup installs gcc"
    exe = tmp_path / "ring_fuzz"
    subprocess.run([cc, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer", "-Wall", "-Werror", f"-I{CORE}", str(ROOT / "tests" / "ring_fuzz.c"),
                    str(CORE / "ring_core.c"), "-o", str(exe), "-lpthread"], check=True)
    return exe


def run(exe: Path, seed: int, cases: int) -> dict[str, int]:
    p = subprocess.run([str(exe), str(seed), str(cases)], capture_output=True, text=True, timeout=900,
                       env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert p.returncode == 0, p.stderr[-4000:]
    assert "ERROR: AddressSanitizer" not in p.stderr and "runtime error" not in p.stderr, p.stderr[-4000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", p.stdout)}


def test_asan_fuzz_random_rings(tmp_path, record_property):
    r = run(build(tmp_path), 6, 30_000)
    record_property("fuzz", r)
    print("ASan/UBSan ring fuzz:", r)
    assert r["cases"] == 30_000
    assert r["good"] > 1000 and r["chains"] > 50_000  # plenty of valid chains, not only early rejects
    assert r["reasons"] >= 8  # and most error paths


@pytest.mark.slow
def test_asan_fuzz_random_rings_1m(tmp_path):
    r = run(build(tmp_path), 7, 1_000_000)
    print("ASan/UBSan ring fuzz:", r)
    assert r["cases"] == 1_000_000
