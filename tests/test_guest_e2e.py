"""End-to-end: the real guest (Debian 6.1 kernel, busybox) under QEMU 7.2 against the real C virtiofsd.

Workloads are combined into few boots (TCG: about 3 s to mount) to keep the whole file well under a
minute of CI once the guest is cached.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsinspect.guest import launcher, share
from fsinspect.guest.console import Event
from tests.guest_fixtures import explain

pytestmark = pytest.mark.guest

CRUD_STEPS = ["crud-create", "crud-append", "crud-rename", "crud-symlink", "crud-link", "crud-dir",
              "crud-truncate", "crud-xattr", "crud-unlink"]
SUB_PATHS = ["/mnt", "/mnt/sub", "/mnt/sub/inner"]


def test_announce_submounts_all_workloads(boot_virtiofsd, guest_share):
    """smoke, crud, submounts, syncfs, a small storm, io and concurrent pass in one boot with announce."""
    res = boot_virtiofsd("smoke,crud,submounts,syncfs,storm,io,concurrent",
                         params={"n": 300, "io_mb": 16, "conc_iters": 100, "conc_mb": 8})
    assert res.ok, explain(res)
    names = [s.name for s in res.steps]
    for want in ["smoke-ls", "smoke-stat", *CRUD_STEPS, "submounts-stat", "submounts-write", "syncfs-sync",
                 "syncfs-per-mount", "storm-create", "storm-stat-cold", "storm-delete", "io-write", "io-read",
                 "concurrent"]:
        assert want in names, f"step {want} missing from {names}"
    assert all(s.rc == 0 and s.duration is not None and s.duration >= 0 for s in res.steps), res.steps
    assert not res.skipped and not res.check_failures

    # smoke: the host's files, with the host's bytes and sizes.
    assert {"hello.txt", "data.bin", "dir", "sub"} <= set(res.entries)
    smoke = res.stats_for("smoke-stat")
    assert smoke["/mnt/data.bin"].size == len(share.SHARE_FILES["data.bin"])
    assert smoke["/mnt/hello.txt"].ino == guest_share.host_stat("hello.txt").st_ino
    sums = res.verify_sums(guest_share.root)
    assert set(sums) == {"/mnt/hello.txt", "/mnt/data.bin", "/mnt/.fsi-io.bin"}
    assert all(g == h for g, h in sums.values()), sums
    assert (guest_share.root / ".fsi-io.bin").stat().st_size == 16 << 20

    # submounts: three superblocks, three st_dev values, three virtiofs lines.
    assert set(res.st_dev) == set(SUB_PATHS)
    assert len(set(res.st_dev.values())) == 3, res.st_dev
    mountpoints = [m.split()[1] for m in res.virtiofs_mounts]
    assert mountpoints == SUB_PATHS, res.virtiofs_mounts
    assert res.metrics["submounts-mounts"]["virtiofs_mounts"] == "3"
    writes = res.stats_for("submounts-write")
    for p in SUB_PATHS:
        assert writes[f"{p}/.fsi-submount-write"].dev == res.st_dev[p], "file not on its submount's st_dev"
    # Each submount root shows the ino of its own host tmpfs root.
    for p in SUB_PATHS[1:]:
        assert res.stats_for("submounts-stat")[p].ino == guest_share.host_stat(p.removeprefix("/mnt/")).st_ino

    # Nothing the workloads created is left in the share, and the guest unmounted innermost first.
    leftovers = {p.name for p in guest_share.root.rglob(".fsi-*")} - {".fsi-io.bin"}
    assert not leftovers, leftovers
    assert list(res.unmounted) == SUB_PATHS[::-1] and set(res.unmounted.values()) == {0}


def test_without_announce_submounts_st_ino_collides(boot_virtiofsd, guest_share):
    """Without announce_submounts the guest sees one superblock, and st_ino values of different host
    file systems collide under it (background 000/002): both tmpfs roots have the same host st_ino, so
    /mnt/sub and /mnt/sub/inner - two different directories - have the same (st_dev, st_ino)."""
    host_sub = guest_share.host_stat("sub")
    host_inner = guest_share.host_stat("sub/inner")
    assert host_sub.st_dev != host_inner.st_dev, "host: two different tmpfs instances"
    assert host_sub.st_ino == host_inner.st_ino, "host: both tmpfs roots have the same inode number"

    res = boot_virtiofsd("submounts", announce_submounts=False)
    assert res.ok, explain(res)
    assert len(set(res.st_dev.values())) == 1, f"no announce: one st_dev for all of {res.st_dev}"
    assert [m.split()[1] for m in res.virtiofs_mounts] == ["/mnt"]
    st = res.stats_for("submounts-stat")
    sub, inner = st["/mnt/sub"], st["/mnt/sub/inner"]
    assert sub.ino == host_sub.st_ino and inner.ino == host_inner.st_ino
    # The collision, concretely: same (st_dev, st_ino), different directories.
    assert (sub.dev, sub.ino) == (inner.dev, inner.ino)
    assert {p.name for p in (guest_share.root / "sub").iterdir()} != \
        {p.name for p in (guest_share.root / "sub" / "inner").iterdir()}
    print(f"\nno announce_submounts: /mnt/sub and /mnt/sub/inner both (st_dev={sub.dev}, st_ino={sub.ino}); "
          f"host: sub ({host_sub.st_dev}, {host_sub.st_ino}), inner ({host_inner.st_dev}, {host_inner.st_ino})")


@pytest.mark.parametrize("how", ["kill-watched", "kill-unwatched", "sigstop-unwatched"])
def test_backend_lost_during_hold(guest_image, guest_share, how):
    """The backend dies (SIGKILL) or hangs (SIGSTOP) mid-`hold`: reported as backend lost within 5 s of
    it, QEMU killed, nothing left behind.  Unwatched runs rely on QEMU's stderr (socket closed) or, for a
    hung backend whose socket stays open, on the console going silent."""
    sig = signal.SIGSTOP if how.startswith("sigstop") else signal.SIGKILL
    killed_at: list[float] = []
    with launcher.short_tmpdir() as work:
        with launcher.virtiofsd(guest_share.root, work) as be:
            vproc = be.processes[0]
            ticks = 0

            def on_event(ev: Event) -> None:
                nonlocal ticks
                if ev.kind == "tick":
                    ticks += 1
                    if ticks == 5:  # steady traffic is flowing: take the backend away under it
                        # virtiofsd forks a sandboxed worker: signal the whole group we started.
                        os.killpg(vproc.pid, sig)
                        killed_at.append(time.monotonic())

            try:
                res = launcher.run_guest(be.socket_path, image=guest_image, workload="hold", timeout=90,
                                         params={"seconds": 80},
                                         watch=be.processes if how == "kill-watched" else (),
                                         on_event=on_event)
                returned_at = time.monotonic()
            finally:
                if sig == signal.SIGSTOP:
                    os.killpg(vproc.pid, signal.SIGCONT)
            sock, pidfile = be.socket_path, launcher.virtiofsd_pidfile(be.socket_path)
        assert vproc.poll() is not None, "virtiofsd still running"
        with pytest.raises(ProcessLookupError):
            os.killpg(vproc.pid, 0)  # its sandboxed worker is gone too
        assert not sock.exists() and not pidfile.exists(), "virtiofsd socket or pid file left behind"
    assert not work.exists()
    assert killed_at, explain(res)
    assert res.status == "backend_lost" and res.backend_lost, explain(res)
    assert not res.timed_out
    took = returned_at - killed_at[0]
    assert took < 5.0, f"took {took:.1f} s: {res.backend_lost_reason}"
    assert res.ticks >= 5
    want = "console silent" if sig == signal.SIGSTOP else ("QEMU" if how == "kill-unwatched" else "")
    assert res.backend_lost_reason and want in res.backend_lost_reason, res.backend_lost_reason
    assert res.qemu_pid and not Path(f"/proc/{res.qemu_pid}").exists(), "QEMU still running"
    print(f"\n{how}: backend lost detected {took:.2f} s after the signal: {res.backend_lost_reason}")


def test_cli_run_json_st_dev_map(guest_image):
    """`fsinspect guest run --backend virtiofsd --json`: its own share, the st_dev map, clean exit."""
    p = subprocess.run([sys.executable, "-m", "fsinspect", "guest", "run", "--backend", "virtiofsd",
                        "--workload", "smoke,submounts", "--json", "--timeout", "90"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    d = json.loads(p.stdout)
    assert d["ok"] is True and d["status"] == "ok"
    assert set(d["st_dev"]) == set(SUB_PATHS) and len(set(d["st_dev"].values())) == 3
    assert len(d["virtiofs_mounts"]) == 3
    assert d["host_sums"] and all(v["match"] for v in d["host_sums"].values())
    assert [s["name"] for s in d["steps"]][:2] == ["smoke-ls", "smoke-stat"]
    assert all(isinstance(s["duration"], float) for s in d["steps"])


def test_build_is_cached_and_fast(guest_image):
    """A second build is a cache hit: under 1 s, same files."""
    from fsinspect.guest import build
    t = time.monotonic()
    again = build.build()
    assert time.monotonic() - t < 1.0
    assert again == guest_image
    mods = list(guest_image.modules)
    assert {"fuse", "virtio_ring", "virtio", "virtiofs", "virtio_pci"} <= set(mods)
    # Dependencies load first (from modinfo depends=; the .deb has no modules.dep).
    assert mods.index("fuse") < mods.index("virtiofs") and mods.index("virtio") < mods.index("virtiofs")
    assert mods.index("virtio_ring") < mods.index("virtio") < mods.index("virtio_pci")


def test_timeout_kills_qemu_and_cleans_up(boot_virtiofsd):
    """A workload that outlives --timeout: QEMU is killed by PID, the result says timeout, nothing is left."""
    t = time.monotonic()
    res = boot_virtiofsd("hold", timeout=8, params={"seconds": 120}, stall_timeout=30)
    assert time.monotonic() - t < 20
    assert res.status == "timeout" and res.timed_out and not res.backend_lost, explain(res)
    assert res.ticks > 0, "the guest was running the workload when the timeout hit"
    assert res.qemu_pid and not Path(f"/proc/{res.qemu_pid}").exists()


def test_failed_check_fails_the_run(boot_virtiofsd):
    """A workload check that fails shows up as a failed step with its check-fail marker, not as ok."""
    res = boot_virtiofsd("submounts", params={"subs": "sub,no-such-dir"})
    assert res.status == "fail" and not res.ok, explain(res)
    assert "submounts-access" in res.failed_steps
    assert res.step("submounts-access").rc == 1
    assert any("access /mnt/no-such-dir" in f for f in res.check_failures), res.check_failures


def test_syncfs_reaches_every_superblock(guest_image, guest_share):
    """`syncfs` against virtiofsd -d: one `sync` sends FUSE_SYNCFS for all three superblocks (root, sub,
    sub/inner), and the per-mount `sync -f` sends one each.  The backend's own debug log is the witness."""
    with launcher.short_tmpdir() as work, launcher.virtiofsd(guest_share.root, work, extra_args=["-d"]) as be:
        res = launcher.run_guest(be.socket_path, image=guest_image, workload="syncfs", timeout=90)
        assert be.log_path is not None
        log = be.log_path.read_text(errors="replace")
    assert res.ok, explain(res)
    calls = re.findall(r"opcode: SYNCFS \(50\), nodeid: (\d+), insize: \d+, pid: (\d+)", log)
    assert len(calls) == 6, calls
    by_sync, per_mount = calls[:3], calls[3:]
    assert len({pid for _, pid in by_sync}) == 1, "one sync(2) call reaches all three superblocks"
    assert len({node for node, _ in by_sync}) == 3 and "1" in {node for node, _ in by_sync}
    assert {node for node, _ in per_mount} == {node for node, _ in by_sync}
    assert len({pid for _, pid in per_mount}) == 3, "one `sync -f` process per mount"


def test_a_launcher_that_runs_late_reads_done_before_calling_the_backend_lost(guest_image, guest_share):
    """The launcher shares its process with a busy caller (a test thread holding the GIL): by the time it
    polls again, the guest may have written `done`, powered off, and the backend left after QEMU.  The
    backend's exit is a loss only if the guest had not finished: the launcher reads the pipe first.
    CI saw it as a `backend_lost` on a passing `hold` (the proxy had exited 0 behind a powered-off guest)."""
    with launcher.short_tmpdir() as work, launcher.virtiofsd(guest_share.root, work) as be:
        waited: list[float] = []

        def on_event(ev: Event) -> None:
            if ev.kind == "result":
                # Run late: do not come back until the guest is gone and the backend with it.
                t = time.monotonic()
                while be.processes[0].poll() is None:
                    assert time.monotonic() - t < 30, "the backend never left after the guest powered off"
                    time.sleep(0.05)
                waited.append(time.monotonic() - t)

        res = launcher.run_guest(be.socket_path, image=guest_image, workload="smoke", timeout=90,
                                 watch=be.processes, on_event=on_event)
    assert waited, explain(res)
    assert res.ok and not res.backend_lost, explain(res)
    assert res.done_uptime is not None
