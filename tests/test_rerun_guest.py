"""Issue 21's acceptance: recordings of the real guest (QEMU 7.2 + Linux 6.1) through `fsinspect proxy` in
front of the C virtiofsd on the test bed's share, rerun without a guest and diffed.

- `full` reruns against a fresh C virtiofsd on a fresh share with no difference outside volatile fields,
  every request answered; against the bundled daemon only with the differences listed below;
- `submounts` recorded with announce_submounts on and off: `fsinspect diff` reports FUSE_ATTR_SUBMOUNT on
  sub and sub/inner, and only the requests that announcing submounts makes the guest send;
- one fault injected by the proxy's debugger is the one difference of a rerun.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fsinspect.guest.build import GuestImage
from fsinspect.guest.share import make_share
from tests.guest_fixtures import explain
from tests.test_proxy_e2e import boot, proxy_in_front
from tests.test_rerun import DAEMON_CMD, VIRTIOFSD_CMD

pytestmark = [pytest.mark.guest, pytest.mark.root]


def record(image: GuestImage, out: Path, workload: str, *, announce: bool = True, extra: tuple[str, ...] = (),
           must_pass: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with make_share() as share, proxy_in_front(share, out, announce=announce,
                                               extra=("--snaplen", "0", *extra)) as run:
        res = boot(image, run, workload, timeout=400)
        assert run.proc.returncode == 0, run.stderr()
    if must_pass:
        assert res.ok, explain(res)
    return run.record


def jsonl(cmd: list[str]) -> tuple[int, list[dict[str, Any]], str]:
    p = subprocess.run([sys.executable, "-m", "fsinspect", *cmd, "--format", "jsonl"], capture_output=True,
                       text=True, timeout=600, stdin=subprocess.DEVNULL)
    rows = [json.loads(x) for x in p.stdout.splitlines()]
    assert rows and rows[-1]["type"] == "summary", p.stdout + p.stderr
    return p.returncode, rows, p.stderr


def rerun_on_fresh_share(rec: Path, backend_cmd: str) -> tuple[int, list[dict[str, Any]], str]:
    with make_share() as share:
        return jsonl(["rerun", str(rec), "--backend-cmd", backend_cmd, "--shared-dir", str(share.root)])


@pytest.fixture(scope="module")
def full_recording(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield record(guest_image, tmp_path_factory.mktemp("full"), "full")


def test_full_rerun_against_fresh_c_virtiofsd_is_identical(full_recording: Path) -> None:
    rc, rows, err = rerun_on_fresh_share(full_recording, VIRTIOFSD_CMD)
    s = rows[-1]
    assert rc == 0, (s, rows[:5], err)
    assert s["differing"] == 0 and s["unanswered"] == 0
    assert s["compared"] == s["answered"] > 20_000  # every request that expects a reply got one, identical
    assert s["sent"] > s["answered"]  # the forgets went too (no reply)
    # What the guest had in flight together (storm, io) was in flight together again.
    assert s["max_in_flight"] >= s["recorded_max_in_flight"] >= 2, s


def test_full_rerun_against_bundled_daemon_shows_only_explained_differences(full_recording: Path) -> None:
    """Explained: INIT (the bundled daemon speaks 7.45 and offers its own flags: POSIX/flock locks,
    SUBMOUNTS, congestion settings) and READDIRPLUS's '.' and '..' entries (nodeid 0: the C virtiofsd fills
    their mode with S_IFDIR, the bundled daemon leaves it 0; the kernel uses neither)."""
    rc, rows, err = rerun_on_fresh_share(full_recording, DAEMON_CMD)
    s = rows[-1]
    assert rc == 1 and s["unanswered"] == 0, (s, err)
    assert set(s["by_op"]) <= {"INIT", "READDIRPLUS"}, s
    for d in rows[:-1]:
        if d["op"] == "READDIRPLUS":
            assert {f["field"] for f in d["fields"]} <= {"entries[.].entry_out.attr.mode",
                                                          "entries[..].entry_out.attr.mode"}, d
        else:
            assert d["op"] == "INIT" and all(f["field"].startswith("init_out.") for f in d["fields"]), d


def test_diff_submounts_announced_or_not(guest_image: GuestImage, tmp_path: Path) -> None:
    on = record(guest_image, tmp_path / "on", "submounts", announce=True)
    off = record(guest_image, tmp_path / "off", "submounts", announce=False)
    rc, rows, err = jsonl(["diff", str(on), str(off)])
    s = rows[-1]
    assert rc == 1, err
    assert set(s["by_field"]) == {"LOOKUP entry.attr.flags"}, s
    looked = {d["request"].split('name="')[1].rstrip('"') for d in rows if d["type"] == "diff"}
    assert looked == {"inner", "sub"}
    assert all(d["fields"] == [{"field": "entry.attr.flags", "a": "SUBMOUNT", "b": "0"}] for d in rows
               if d["type"] == "diff")
    # Explained: an announced submount is a superblock of its own, whose root the guest GETATTRs when it
    # mounts it and forgets when it unmounts it; a LOOKUP of sub or inner again is a revalidation once the
    # 1 s entry timeout has passed, which the guest's (TCG) timing decides.
    def explained(x: str) -> bool:
        return (x.startswith("FORGET") or x.split()[1] == "GETATTR"
                or (x.split()[1] == "LOOKUP" and x.endswith(('name="sub"', 'name="inner"'))))

    only = [d["exchange"] for d in rows if d["type"] in ("only_a", "only_b")]
    assert all(explained(x) for x in only), only


def test_injected_fault_is_the_one_difference(guest_image: GuestImage, tmp_path: Path) -> None:
    rec = record(guest_image, tmp_path, "submounts",
                 extra=("--inject", 'op == LOOKUP and name == "inner"', "errno=ENOENT", "count=1"), must_pass=False)
    rc, rows, err = rerun_on_fresh_share(rec, VIRTIOFSD_CMD)
    s = rows[-1]
    assert rc == 1 and s["differing"] == 1 and s["unanswered"] == 0, (s, err)
    (d,) = rows[:-1]
    assert d["op"] == "LOOKUP" and 'name="inner"' in d["request"]
    assert d["fields"] == [{"field": "errno", "a": "ENOENT", "b": 0}]
    assert "injected by the debugger" in d["note"]  # the recording's flags say whose answer it was


def test_concurrent_workload_reruns_with_its_overlap(guest_image: GuestImage, tmp_path: Path) -> None:
    """Six loops and a dd in parallel: what the guest had in flight together goes out together again (the
    rerun waits only for replies the recording shows before a request), and every reply is the same."""
    rec = record(guest_image, tmp_path, "concurrent")
    rc, rows, err = rerun_on_fresh_share(rec, VIRTIOFSD_CMD)
    s = rows[-1]
    assert rc == 0 and s["differing"] == 0 and s["unanswered"] == 0, (s, rows[:3], err)
    assert s["recorded_max_in_flight"] >= 4 and s["max_in_flight"] >= s["recorded_max_in_flight"], s
