"""Sanitizer builds of the C ring core (no Python involved).

- tests/ring_fuzz.c under AddressSanitizer + UBSan: random rings and memory maps; every region is its
  own exact-size malloc, so any access outside a region trips ASan.  Default CI runs 30k cases (a few
  seconds); `./scripts/check --slow` runs 1M (FSI_SLOW_CASES).
- tests/ring_threads.c under ThreadSanitizer and under ASan: driver, native path and device threads
  per queue over real eventfds, fd swaps during traffic, one consumer draining the shared capture
  buffer; checks the locking and the acquire/release ring protocol, and that every capture pairs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.fuzzbudget import SLOW_CASES, report

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "dissectors" / "ring"


def build(tmp_path: Path, harness: str = "ring_fuzz", sanitize: str = "address,undefined") -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "no C compiler: scripts/setup installs gcc"
    exe = tmp_path / f"{harness}-{sanitize.replace(',', '-')}"
    # gcc's TSan does not model atomic_thread_fence, and says so (-Wtsan, an error under -Werror):
    # rc_queue_want_kick has one, after its avail_event store; every ring access around it is an atomic.
    quiet = ["-Wno-tsan"] if "thread" in sanitize else []
    subprocess.run([cc, "-O1", "-g", f"-fsanitize={sanitize}", "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer", "-Wall", "-Werror", *quiet, f"-I{CORE}",
                    str(ROOT / "tests" / f"{harness}.c"), str(CORE / "ring_core.c"), "-o", str(exe), "-lpthread"],
                   check=True)
    return exe


def run(exe: Path, seed: int, cases: int) -> dict[str, int]:
    p = subprocess.run([str(exe), str(seed), str(cases)], capture_output=True, text=True,
                       timeout=900 if cases <= 100_000 else 4 * 3600,
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
    assert r["holds"] > 1000  # hold rules matched random chains, and verdicts ran on them


@pytest.mark.slow
def test_asan_fuzz_random_rings_1m(tmp_path):
    exe = build(tmp_path)
    t0 = time.monotonic()
    r = run(exe, 7, SLOW_CASES)
    report("ring: ASan/UBSan random rings", r["cases"], time.monotonic() - t0)
    print("ASan/UBSan ring fuzz:", r)
    assert r["cases"] == SLOW_CASES


@pytest.mark.parametrize("hold", [0, 1], ids=["plain", "holds"])
@pytest.mark.parametrize("sanitize", ["thread", "address,undefined"])
@pytest.mark.parametrize("policy", [0, 1], ids=["drop", "lossless"])
def test_sanitized_threads_shadow_path(tmp_path, sanitize, policy, hold):
    """hold=1: rule tables replaced during traffic, verdicts from the consumer thread while paths run."""
    exe = build(tmp_path, "ring_threads", sanitize)
    p = subprocess.run([str(exe), "50000", "3", str(policy), str(hold)], capture_output=True, text=True,
                       timeout=600, env={"TSAN_OPTIONS": "halt_on_error=1", "ASAN_OPTIONS": "detect_leaks=1"})
    assert p.returncode == 0 and "WARNING" not in p.stderr and "ERROR" not in p.stderr, p.stderr[-4000:]
    r = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", p.stdout)}
    print(sanitize, "policy", policy, "hold", hold, r)
    assert r["pairs"] == r["requests"] == r["replies"] == 150_000 and r["dropped"] == 0
    assert (r["held"] > 10_000) if hold else r["held"] == 0
