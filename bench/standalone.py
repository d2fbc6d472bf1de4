"""Stat, create and read storms through `fsinspect daemon --standalone`, a pyfuse3 passthrough (the peer)
and the native directory, side by side in one run; prints ops/s and the ratios.

Both daemons run without kernel caching (fsinspect --cache none; the pyfuse3 peer with 0 s timeouts and
direct_io), so every operation reaches the daemon.  Run as root: python bench/standalone.py
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from daemon.transport.fusedev import in_mountinfo as mounted

REPO = Path(__file__).resolve().parent.parent
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
SMALL = 4096


def start(cmd: list[str], mnt: Path) -> subprocess.Popen[bytes]:
    log = tempfile.TemporaryFile()  # not a pipe: a chatty daemon must never block on it
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 20
    while not mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc, mnt)
            log.seek(0)
            raise SystemExit(f"{cmd[0:4]} did not mount: {log.read().decode()}")
        time.sleep(0.02)
    os.stat(mnt)
    return proc


def stop(proc: subprocess.Popen[bytes], mnt: Path) -> None:
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    finally:
        if mounted(mnt):
            _libc.umount2(str(mnt).encode(), 2)


def populate(d: Path, n: int) -> None:
    d.mkdir(parents=True)
    blob = os.urandom(SMALL)
    for i in range(n):
        (d / f"f{i:05d}").write_bytes(blob)


def rate(n: int, fn: Callable[[int], None]) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t)


def storms(root: Path, files: int, n: int, tag: str) -> dict[str, float]:
    src = root / "src"
    names = [str(src / f"f{i:05d}") for i in range(files)]
    out: dict[str, float] = {}
    out["stat"] = rate(n, lambda i: os.stat(names[i % files]))

    def read_one(i: int) -> None:
        fd = os.open(names[i % files], os.O_RDONLY)
        os.read(fd, SMALL)
        os.close(fd)

    out["read 4K"] = rate(n, read_one)
    new = root / f"new-{tag}"
    os.mkdir(new)

    def create_one(i: int) -> None:
        os.close(os.open(f"{new}/c{i}", os.O_CREAT | os.O_WRONLY, 0o644))

    out["create"] = rate(n, create_one)
    big = root / "src" / "big"
    t = time.perf_counter()
    with open(big, "rb", buffering=0) as f:
        total = 0
        while chunk := f.read(128 * 1024):
            total += len(chunk)
    out["seq read MB/s"] = total / (time.perf_counter() - t) / 1e6
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("-n", type=int, default=3000, help="operations per storm")
    ap.add_argument("--big-mb", type=int, default=64)
    ap.add_argument("--no-pyfuse3", action="store_true")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="extra fsinspect column with extra daemon arguments, e.g. 'r4=--readers 4'")
    ap.add_argument("--no-pool-only", action="store_true")
    ap.add_argument("--rounds", type=int, default=3,
                    help="run every target this many times, interleaved, and report medians (the host is shared)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (mount(2) and a clean comparison)")
    base = Path(tempfile.mkdtemp(prefix="fsinspect-bench-"))
    shared, mnt = base / "shared", base / "mnt"
    mnt.mkdir()
    populate(shared / "src", args.files)
    with open(shared / "src" / "big", "wb") as f:
        f.write(os.urandom(1 << 20) * args.big_mb)
    py = sys.executable
    daemons: dict[str, list[str] | None] = {
        "native": None,
        "fsinspect": [py, "-m", "fsinspect.cli", "daemon", "--standalone", str(mnt), "--shared-dir", str(shared),
                      "--cache", "none", "--log-level", "warning"],
        "fsinspect pool-only": [py, "-m", "fsinspect.cli", "daemon", "--standalone", str(mnt), "--shared-dir",
                                str(shared), "--cache", "none", "--log-level", "warning", "--dispatch", "pool"],
    }
    base_cmd = daemons["fsinspect"]
    assert base_cmd is not None
    for v in args.variant:
        vname, _, extra = v.partition("=")
        daemons[f"fsinspect {vname}"] = [*base_cmd, *extra.split()]
    if args.no_pool_only:
        del daemons["fsinspect pool-only"]
    if not args.no_pyfuse3:
        daemons["pyfuse3"] = [py, str(REPO / "bench" / "pyfuse3_passthrough.py"), str(shared), str(mnt)]
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in daemons}
    try:
        for rnd in range(args.rounds):
            for name, cmd in daemons.items():
                tag = f"{name.replace(' ', '-')}-{rnd}"
                subprocess.run(["sync"], check=False)
                if cmd is None:
                    samples[name].append(storms(shared, args.files, args.n, tag))
                    continue
                proc = start(cmd, mnt)
                try:
                    samples[name].append(storms(mnt, args.files, args.n, tag))
                finally:
                    stop(proc, mnt)
    finally:
        if not mounted(mnt):
            shutil.rmtree(base, ignore_errors=True)
    results = {name: {m: statistics.median(r[m] for r in runs) for m in runs[0]} for name, runs in samples.items()}
    print(f"medians of {args.rounds} interleaved rounds, {args.n} ops per storm, --cache none")
    cols = list(results)
    metrics = list(next(iter(results.values())))
    print(f"{'storm (ops/s)':<16}" + "".join(f"{c:>20}" for c in cols) + (
        f"{'fsinspect/pyfuse3':>20}" if "pyfuse3" in results else ""))
    for m in metrics:
        row = f"{m:<16}" + "".join(f"{results[c][m]:>20.0f}" for c in cols)
        if "pyfuse3" in results:
            row += f"{results['fsinspect'][m] / results['pyfuse3'][m]:>19.2f}x"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
