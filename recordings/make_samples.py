"""Regenerate recordings/samples/: real kernel traffic through /dev/fuse, served by fsinspect's daemon.

    sudo .venv/bin/python recordings/make_samples.py [--guest] [OUTDIR]

Runs `fsinspect daemon --standalone MNT --shared-dir DIR --record FILE` on a temporary directory, drives
a scripted workload on the mount, drops the kernel's dentry cache (so FORGETs appear) and stops the
daemon with SIGTERM.  Needs root (it mounts /dev/fuse).

`--guest` also records guest traffic, which only virtio-fs produces (FUSE_ATTR_SUBMOUNT in READDIRPLUS,
SYNCFS on each superblock root): the test-bed guest (QEMU 7.2 + Linux 6.1, `fsinspect guest build`)
runs the `syncfs` workload on a share with tmpfs submounts, through `fsinspect proxy --record` in front
of the C virtiofsd (-o announce_submounts).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE = "fusedev-workload.pcapng"
GUEST_SAMPLE = "guest-syncfs.pcapng"
# What the golden file pins per exchange: a reader or decoder change that alters any of these shows up.
GOLDEN_KEYS = ("index", "opcode", "unique", "nodeid", "queue", "head", "epoch", "ts_ns", "error", "latency_ns",
               "lints", "snapped")


def golden_rows(path: Path) -> list[dict[str, object]]:
    """The golden summary of a recording, as the current reader and analyzer see it."""
    from fsinspect.analysis.render import exchange_json
    from fsinspect.recording.reader import RecordingReader
    from fsinspect.recording.replay import analyze

    with RecordingReader(path) as r:
        an = analyze(r)
    rows = []
    for ex in an.exchanges:
        d = exchange_json(ex)
        row = {k: d.get(k, False) for k in GOLDEN_KEYS}
        row["names"] = [n.decode("utf-8", "backslashreplace") for n in ex.names()]
        rows.append(row)
    return rows


def workload(mnt: Path) -> None:
    """A small, deterministic mix: directories, files, a snapped write and read, errors, renames, links."""
    assert (mnt / "readme").read_text().startswith("a file")  # a LOOKUP that finds something
    d = mnt / "dir"
    d.mkdir()
    payload = bytes(range(256)) * 64  # 16 KiB: WRITE and READ get cut to the snap length
    (d / "a.txt").write_bytes(payload)
    fd = os.open(d / "a.txt", os.O_RDONLY | os.O_DIRECT)  # bypass the page cache: real READs
    got = b""
    while chunk := os.read(fd, len(payload)):
        got += chunk
    assert got == payload
    os.close(fd)
    (d / "small").write_text("hello\n")
    with open(d / "small", "r+b") as f:
        f.write(b"HELLO")
        f.flush()
        os.fsync(f.fileno())
    assert sorted(os.listdir(d)) == ["a.txt", "small"]
    for p in mnt.iterdir():
        p.stat()
    for missing in ("nope", "dir/nope"):
        try:
            (mnt / missing).stat()
        except FileNotFoundError:
            pass
    os.symlink("a.txt", d / "link")
    assert os.readlink(d / "link") == "a.txt"
    os.link(d / "small", d / "hard")
    os.rename(d / "small", d / "renamed")
    os.chmod(d / "renamed", 0o600)
    try:
        os.getxattr(d / "renamed", "user.test")
    except OSError as e:
        assert e.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOSYS), e
    os.statvfs(mnt)
    (d / "sub").mkdir()
    (d / "sub" / "f").write_bytes(b"x")
    os.unlink(d / "sub" / "f")
    os.rmdir(d / "sub")
    os.unlink(d / "hard")
    os.sync()


def make(outdir: Path, *, timeout: float = 20.0) -> Path:
    """Record the workload into outdir/SAMPLE and return its path."""
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / SAMPLE
    work = Path(tempfile.mkdtemp(prefix="fsinspect-samples-"))
    shared, mnt = work / "shared", work / "mnt"
    shared.mkdir()
    mnt.mkdir()
    (shared / "readme").write_text("a file that was there before the mount\n")
    cmd = [sys.executable, "-m", "fsinspect", "daemon", "--standalone", str(mnt), "--shared-dir", str(shared),
           "--record", str(out), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not mount {mnt} (exit status {proc.poll()})")
            time.sleep(0.05)
        workload(mnt)
        Path("/proc/sys/vm/drop_caches").write_text("2\n")  # dentries and inodes: the kernel sends FORGETs
        time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the daemon exited with status {proc.returncode}")
    return out


def make_guest(outdir: Path, *, timeout: float = 120.0) -> Path:
    """Record the guest's `syncfs` workload through the proxy into outdir/GUEST_SAMPLE."""
    from fsinspect.guest import build, launcher
    from fsinspect.guest.share import make_share

    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / GUEST_SAMPLE
    image = build.build()
    with make_share() as share, launcher.short_tmpdir() as work, \
            launcher.virtiofsd(share.root, work, announce_submounts=True, xattr=True) as be:
        listen = work / "proxy.sock"
        proc = subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(listen), "--backend",
                                 str(be.socket_path), "--record", str(out), "--quiet"], stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not listen.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the proxy never listened")
                time.sleep(0.02)
            res = launcher.run_guest(listen, image=image, workload="syncfs", watch=[proc], timeout=timeout)
            proc.wait(15)  # QEMU gone: the proxy ends by itself and closes the recording
            if not res.ok:
                raise RuntimeError(f"the guest workload failed: {res}")
        finally:
            launcher.stop_process(proc)
    return out


def write_golden(path: Path) -> Path:
    golden = path.with_suffix(".golden.jsonl")
    golden.write_text("".join(json.dumps(row) + "\n" for row in golden_rows(path)))
    return golden


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("make_samples.py needs root (it mounts /dev/fuse)")
    args = [a for a in sys.argv[1:] if a != "--guest"]
    outdir = Path(args[0]) if args else HERE / "samples"
    paths = [make(outdir)]
    if "--guest" in sys.argv:
        paths.append(make_guest(outdir))
    for path in paths:
        golden = write_golden(path)
        print(f"wrote {path} ({path.stat().st_size} bytes) and {golden.name}")
