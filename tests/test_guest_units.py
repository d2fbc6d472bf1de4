"""The guest test bed's pure parts: console marker parsing, the newc writer, cmdline and apt parsing."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import pytest

from fsinspect.guest import build, launcher
from fsinspect.guest.console import ConsoleParser, GuestResult, parse_line

CONSOLE = (
    b"\x1b[2J\x1b[0;30mSeaBIOS noise\r\n"
    b"Probing EDD (edd=off to disable)... ok\x1b[?7l\x1b[2J@@FSI boot 2.72 kernel=6.1.0-56-cloud-amd64 "
    b"workload=submounts tag=myfs\r\n"
    b"@@FSI mounted 3.05 tag=myfs\r\n"
    b"[    3.1] random kernel message\r\n"
    b"@@FSI step-begin submounts-stat 4.12\r\n"
    b"@@FSI stat dev=22 ino=2146484 mode=41ed nlink=3 size=4096 uid=0 gid=0 /mnt\r\n"
    b"@@FSI stat dev=23 ino=1 mode=43ff nlink=3 size=60 uid=0 gid=0 /mnt/sub\r\n"
    b"@@FSI stat dev=24 ino=1 mode=43ff nlink=2 size=40 uid=0 gid=0 /mnt/sub/inner dir with spaces\r\n"
    b"@@FSI step-end submounts-stat rc=0 4.14\r\n"
    b"@@FSI step-begin submounts-mounts 4.15\r\n"
    b"@@FSI mount myfs /mnt virtiofs rw,relatime 0 0\r\n"
    b"@@FSI mount none /mnt/sub virtiofs rw,relatime 0 0\r\n"
    b"@@FSI mount proc /proc proc rw 0 0\r\n"
    b"@@FSI metric submounts-mounts virtiofs_mounts=2\r\n"
    b"@@FSI step-end submounts-mounts rc=1 4.20\r\n"
    b"@@FSI check-fail crud-create content after create got=x want=hello\r\n"
    b"@@FSI step-skip crud-xattr xattr not enabled\r\n"
    b"@@FSI sum 98ea6e4f /mnt/hello world.txt\r\n"
    b"@@FSI result fail failed=submounts-mounts\r\n"
    b"@@FSI unmounted /mnt/sub rc=0\r\n"
    b"@@FSI done 4.35\r\n"
)


def _parse(data: bytes, chunk: int) -> GuestResult:
    r = GuestResult(workload="submounts", tag="myfs")
    p = ConsoleParser(r)
    for i in range(0, len(data), chunk):
        p.feed(data[i:i + chunk])
    p.close()
    return r


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_console_parser_events_survive_noise_and_chunking(chunk):
    r = _parse(CONSOLE, chunk)
    assert r.kernel == "6.1.0-56-cloud-amd64" and r.boot_uptime == 2.72 and r.mounted_uptime == 3.05
    assert [(s.name, s.rc, s.duration) for s in r.steps] == [("submounts-stat", 0, 0.02),
                                                             ("submounts-mounts", 1, 0.05)]
    assert r.st_dev == {"/mnt": 22, "/mnt/sub": 23, "/mnt/sub/inner dir with spaces": 24}
    assert r.stats[1].mode == 0o41777 and r.stats[1].ino == 1 and r.stats[1].step == "submounts-stat"
    assert r.virtiofs_mounts == ["myfs /mnt virtiofs rw,relatime 0 0", "none /mnt/sub virtiofs rw,relatime 0 0"]
    assert r.metrics == {"submounts-mounts": {"virtiofs_mounts": "2"}}
    assert r.check_failures == ["crud-create content after create got=x want=hello"]
    assert r.skipped == {"crud-xattr": "xattr not enabled"}
    assert r.sums == {"/mnt/hello world.txt": "98ea6e4f"}
    assert r.guest_result == "fail" and r.failed_steps == ["submounts-mounts"]
    assert r.unmounted == {"/mnt/sub": 0} and r.done_uptime == 4.35
    assert "random kernel message" in "\n".join(r.console)


def test_status_from_result():
    r = _parse(CONSOLE, 4096)
    r.qemu_rc = 0
    assert launcher._status(r) == "fail"
    ok = _parse(CONSOLE.replace(b"result fail failed=submounts-mounts", b"result ok"), 4096)
    ok.qemu_rc = 0
    assert launcher._status(ok) == "ok"
    ok.backend_lost = True
    assert launcher._status(ok) == "backend_lost"
    crashed = _parse(b"@@FSI boot 1.0\r\nKernel panic - not syncing\r\n", 4096)
    assert launcher._status(crashed) == "crashed"
    assert parse_line("no marker here") is None


def test_json_has_st_dev_map_and_durations():
    d = _parse(CONSOLE, 4096).to_json()
    assert d["st_dev"]["/mnt/sub"] == 23 and d["steps"][0]["duration"] == 0.02
    assert "console" not in d and d["console_tail"]


def test_kernel_cmdline_rejects_shell_metacharacters():
    line = launcher.kernel_cmdline("storm", "myfs", {"n": 500, "xattr": True})
    assert line.endswith("fsi_workload=storm fsi_tag=myfs fsi_n=500 fsi_xattr=1")
    for bad in ({"n": "1;poweroff"}, {"N": "1"}, {"n": "a b"}):
        with pytest.raises(launcher.LaunchError):
            launcher.kernel_cmdline("storm", "myfs", bad)


def test_parse_apt_cache_depends():
    out = ("linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n")
    assert build.parse_depends_output(out) == "linux-image-6.1.0-56-cloud-amd64"
    assert build.kernel_version_of("linux-image-6.1.0-56-cloud-amd64") == "6.1.0-56-cloud-amd64"
    with pytest.raises(build.BuildError, match="apt-get update"):
        build.parse_depends_output("linux-image-cloud-amd64\n")


def test_newc_archive_reads_back_with_busybox_cpio(tmp_path):
    arc = build.Newc()
    arc.directory("dev")
    arc.chardev("dev/console", 5, 1)
    arc.directory("bin")
    arc.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    arc.symlink("bin/sh", "busybox")
    data = arc.finish()
    assert len(data) % 512 == 0
    listing = subprocess.run(["busybox", "cpio", "-t", "-v"], input=data, capture_output=True, check=True)
    lines = listing.stdout.decode().splitlines()
    assert [ln.split()[-1] if "->" not in ln else ln.split()[-3] for ln in lines] == \
        ["dev", "dev/console", "bin", "bin/hello", "bin/sh"]
    assert lines[1].startswith("crw-------") and lines[3].startswith("-rwxr-xr-x")
    assert lines[4].startswith("lrwxrwxrwx") and lines[4].endswith("-> busybox")
    subprocess.run(["busybox", "cpio", "-i", "-d"], input=data, cwd=tmp_path, capture_output=True, check=True)
    assert (tmp_path / "bin" / "hello").read_bytes() == b"#!/bin/sh\necho hi\n"


def test_modinfo_fields():
    ko = b"\x7fELF...\0license=GPL\0depends=fuse,virtio\0name=virtiofs\0vermagic=6.1.0 SMP\0"
    assert build.modinfo(ko) == {"depends": ["fuse,virtio"], "name": ["virtiofs"], "vermagic": ["6.1.0 SMP"]}


@pytest.mark.guest
def test_built_initramfs_contents(guest_image):
    """The cached initramfs holds /init, /dev/console, the workloads and the resolved module chain."""
    listing = subprocess.run(["busybox", "cpio", "-t", "-v"], input=gzip.decompress(guest_image.initramfs.read_bytes()),
                             capture_output=True, check=True).stdout.decode().splitlines()
    names = {ln.split()[-1] if "->" not in ln else ln.split()[-3]: ln for ln in listing}
    assert names["dev/console"].startswith("crw")
    assert names["init"].startswith("-rwx")
    for w in ("smoke", "crud", "submounts", "syncfs", "storm", "io", "concurrent", "full", "hold"):
        assert f"fsi/workloads/{w}.sh" in names
    for m in guest_image.modules:
        assert f"lib/modules/{m}.ko" in names
    assert "usr/bin/setfattr" in names and "lib64/ld-linux-x86-64.so.2" in names


def test_garbled_marker_is_an_error_not_a_crash():
    r = _parse(b"@@FSI stat \r\n@@FSI step-end\r\n@@FSI result ok\r\n", 4096)
    assert len(r.errors) == 2 and "unparseable marker" in r.errors[0]
    assert r.guest_result == "ok"


def test_build_error_names_the_failed_command(tmp_path):
    """A missing kernel package ends in one line naming the apt command that failed, and no traceback."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "fsinspect", "guest", "build", "-q",
                        "--package", "linux-image-0.0.0-0-nosuch-amd64"],
                       capture_output=True, text=True, env=env, timeout=120, check=False)
    assert p.returncode == 1
    assert "`apt-get download -q linux-image-0.0.0-0-nosuch-amd64-unsigned` failed" in p.stderr
    assert "Unable to locate package" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.deb"))


def test_run_without_a_socket_is_a_one_line_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fsinspect", "guest", "run", "--socket", str(tmp_path / "none.sock")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 1
    assert p.stderr.strip() == f"fsinspect guest: no vhost-user socket at {tmp_path / 'none.sock'} (is the backend running?)"
