"""Regenerate recordings/samples/: real kernel traffic through /dev/fuse, served by fsinspect's daemon.

    sudo .venv/bin/python recordings/make_samples.py [OUTDIR]

Runs `fsinspect daemon --standalone MNT --shared-dir DIR --record FILE` on a temporary directory, drives
a scripted workload on the mount, drops the kernel's dentry cache (so FORGETs appear) and stops the
daemon with SIGTERM.  Needs root (it mounts /dev/fuse).

Guest traffic (SYNCFS on submount roots, FUSE_ATTR_SUBMOUNT in READDIRPLUS) only happens on virtio-fs;
a guest sample joins here once the vhost-user daemon or the proxy can record.
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


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("make_samples.py needs root (it mounts /dev/fuse)")
    path = make(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "samples")
    golden = path.with_suffix(".golden.jsonl")
    golden.write_text("".join(json.dumps(row) + "\n" for row in golden_rows(path)))
    print(f"wrote {path} ({path.stat().st_size} bytes) and {golden.name}")
