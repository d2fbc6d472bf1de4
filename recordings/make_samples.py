"""Regenerate recordings/samples/: real kernel traffic through /dev/fuse, served by fsinspect's daemon.

    sudo .venv/bin/python recordings/make_samples.py [OUTDIR]

The daemon's engine (daemon.server.Server) with the passthrough filesystem serves a temporary shared
directory over raw /dev/fuse (daemon.transport.fusedev); its tap hook records every request and reply
with the recording writer while a scripted workload runs on the mount.  Needs root.

Guest traffic (SYNCFS on submount roots, FUSE_ATTR_SUBMOUNT in READDIRPLUS) only happens on virtio-fs;
a guest sample joins here once the vhost-user daemon or the proxy can record.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from daemon.passthrough.fs import Options, PassthroughFS
from daemon.server import Server
from daemon.transport.fusedev import DeviceClosed, FuseDev, MountOptions
from fsinspect.recording.tap import RecordingTap
from fsinspect.recording.writer import RecordingWriter

HERE = Path(__file__).resolve().parent
SAMPLE = "fusedev-workload.pcapng"


def _serve(dev: FuseDev, server: Server) -> None:
    def reply(parts: list[bytes] | list[memoryview] | list[bytes | bytearray | memoryview]) -> None:
        dev.write(list(parts))

    while True:
        try:
            buf = dev.read()
        except DeviceClosed:
            return
        server.handle(buf, reply, 0)


def workload(mnt: Path) -> None:
    """A small, deterministic mix: directories, files, a snapped write and read, errors, renames, links."""
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


def make(outdir: Path) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / SAMPLE
    work = Path(tempfile.mkdtemp(prefix="fsinspect-samples-"))
    shared, mnt = work / "shared", work / "mnt"
    shared.mkdir()
    mnt.mkdir()
    (shared / "readme").write_text("a file that was there before the mount\n")
    writer = RecordingWriter(out, source="fusedev", backend="fsinspect daemon (passthrough, /dev/fuse)",
                             comments=["recordings/make_samples.py: scripted workload on a standalone mount"])
    tap = RecordingTap(writer)
    fs = PassthroughFS(Options(shared_dir=str(shared)))
    server = Server(fs, tap=tap)
    dev = FuseDev.mount(str(mnt), MountOptions(fsname="fsinspect-sample"))
    t = threading.Thread(target=_serve, args=(dev, server), daemon=True)
    t.start()
    try:
        workload(mnt)
        # Drop the kernel's dentries and inodes so that FORGETs appear in the sample.
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
        time.sleep(0.2)
    finally:
        dev.unmount()
        t.join(timeout=10)
        server.shutdown()
        tap.close()
        shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("make_samples.py needs root (it mounts /dev/fuse)")
    path = make(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "samples")
    print(f"wrote {path} ({path.stat().st_size} bytes)")
