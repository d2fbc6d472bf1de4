"""bench/op_breakdown.py's attribution rules: a perf sample and a cProfile entry land in the column they describe,
and a row adds up to the measured total."""

from __future__ import annotations

import cProfile
import marshal
import sys
from collections import Counter
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
ob = pytest.importorskip("op_breakdown")

K = "[kernel.kallsyms]"
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
PY = "/usr/lib/libpython3.11.so.1.0"


@pytest.mark.parametrize(("frames", "stage"), [
    ([("finish_task_switch.isra.0", K), ("__schedule", K), ("schedule", K), ("do_sys_poll", K),
      ("do_syscall_64", K), ("__poll", LIBC)], "wake-ups"),
    ([("_raw_spin_unlock_irq", K), ("eventfd_write", K), ("vfs_write", K), ("do_syscall_64", K),
      ("__GI___libc_write", LIBC)], "kick/call"),
    ([("do_handle_open", K), ("__x64_sys_open_by_handle_at", K), ("do_syscall_64", K),
      ("open_by_handle_at", LIBC)], "syscalls"),
    ([("clear_page_erms", K), ("asm_exc_page_fault", K), ("_PyObject_Malloc", PY)], "other"),
    ([("rc_walk_chain", "/x/dissectors/ring/_ring.cpython-311-x86_64-linux-gnu.so")], "ring"),
    ([("attr_from_statx", "/x/daemon/passthrough/_fast.cpython-311-x86_64-linux-gnu.so")], "encode"),
    ([("path_fd", "/x/daemon/passthrough/_fast.cpython-311-x86_64-linux-gnu.so")], "fs"),
    ([("op_getattr", "/x/daemon/passthrough/_fast.cpython-311-x86_64-linux-gnu.so")], "dispatch"),
    ([("sys_wait_kick", "/x/daemon/passthrough/_sys.cpython-311-x86_64-linux-gnu.so")], "kick/call"),
    ([("take_gil", PY)], "wake-ups"),
    ([("_PyEval_EvalFrameDefault", PY), ("[unknown]", "[unknown]")], "python"),
    ([("statx", LIBC)], "syscalls"),
])
def test_perf_sample_columns(frames: list[tuple[str, str]], stage: str) -> None:
    assert ob.perf_stage(frames) == stage


@pytest.mark.parametrize(("func", "path", "stage"), [
    ("decode_request", "dissectors/fuse.py", "decode"),
    ("encode_entry", "daemon/server.py", "encode"),
    ("_serve", "daemon/server.py", "dispatch"),
    ("getattr", "daemon/passthrough/fs.py", "fs"),
    ("statx", "daemon/passthrough/syscalls.py", "syscalls"),
    ("_drain", "daemon/transport/vhost_user.py", "ring"),
    ("_serve_chain", "daemon/transport/vhost_user.py", "dispatch"),
    ("pop_chains", "dissectors/ring/_native.py", "ring"),
    ("wait", "threading.py", None),
])
def test_python_function_columns(func: str, path: str, stage: str | None) -> None:
    assert ob.stage_of_python(func, path) == stage


def test_row_adds_up_to_the_total() -> None:
    perf = Counter({"syscalls": 30, "kick/call": 20, "python": 40, "other": 10})
    got = ob.combine(perf, {"decode": 1.0, "dispatch": 3.0}, 10.0)
    assert sum(got.values()) == pytest.approx(10.0)
    assert got["syscalls"] == pytest.approx(3.0)
    assert got["decode"] == pytest.approx(1.0) and got["dispatch"] == pytest.approx(3.0)
    assert ob.combine(Counter({"python": 5}), {}, 4.0)["other"] == pytest.approx(4.0)  # nothing to split by


def _helper_encode() -> bytes:  # a stand-in caller: its builtin's time follows it to the caller's column
    return b"".join([b"x"] * 50)


def test_python_split_gives_a_builtin_to_its_callers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A builtin called from a function of one column is booked to that column; nothing else appears."""
    monkeypatch.setattr(ob, "stage_of_python", lambda func, path: "encode" if func == "_helper_encode" else None)
    p = cProfile.Profile()
    for name in ("a", "b"):
        if name == "b":
            p.enable()
            for _ in range(2000):
                _helper_encode()
            p.disable()
        p.snapshot_stats()
        stats = {k: (v[0], v[1], v[2], v[3], dict(v[4])) for k, v in p.stats.items()}
        (tmp_path / name).write_bytes(marshal.dumps({"per_call": {"py": 0.0, "c": 0.0}, "stats": stats}))
    got = ob.python_split(tmp_path / "a", tmp_path / "b", Path(__file__).resolve().parent)
    assert set(got) <= {"encode", "other"}
    assert got["encode"] > 0.9 * sum(got.values())


def test_the_profilers_own_cost_is_measured() -> None:
    """The cost cProfile adds per call received and per call made: positive and well under a microsecond."""
    got = ob.calibrate(5000)
    assert set(got) == {"py", "c", "caller"}
    assert 0 < got["py"] < 1e-6 and 0 < got["c"] < 1e-6 and 0 <= got["caller"] < 1e-6, got
