"""Stat, create and read storms through `fsinspect daemon --standalone`, a pyfuse3 passthrough (the peer)
and the native directory, side by side in one run, with and without kernel caching.

For each cache mode (`--cache none`: 0 s timeouts and direct_io, so every operation reaches the daemon;
`auto`: 1 s timeouts and the page cache) every target runs once per round, the order reversed every other
round, so neither side always goes first.  Per storm it prints the ops/s median, the ratio to pyfuse3
per round as median [min .. max], and the daemon's CPU per operation (user + system time of all its
threads, from /proc/PID/task/*/schedstat): the wall ratio follows the load of a shared machine, the CPU
per operation much less, so compare those when the load average printed at the start is not near 0.

The shared directory is on a private tmpfs (`--on-disk` for the temporary directory's filesystem): on
ext4 a create storm measures the host's journal and its scan of recently deleted inodes more than the
daemons, and whichever ran second looked slower.

The `fsinspect` arm runs the daemon's defaults, FUSE passthrough included (`--passthrough auto`: on
where the kernel offers it, Linux 6.9+): a passthrough file's READ and WRITE go from the kernel to the
host file, so the read storms measure OPEN/FLUSH/RELEASE there, not READ.  `--passthrough` adds the arm
`fsinspect pt=off` (`--passthrough off`: every READ through the daemon, as pyfuse3, which has no
passthrough).  Neither side caches more than its `--cache` mode allows: a passthrough file has no FUSE
page cache at all, the host file's is the one both daemons read through anyway.

The `fsinspect` arm serves over FUSE over io_uring where the kernel has it (`--uring on`, which turns the
fuse module's enable_uring parameter on for the host, as root: one ring per CPU queue, one system call per
request); `--uring off` keeps it on /dev/fuse reads and writes, and `--uring-ab` adds the arm `fsinspect dev`
(`--uring off`) to compare both transports in one interleaved run.

`--requests` counts the FUSE requests each daemon gets per operation, by opcode, from the kernel's own
`fuse:fuse_request_send` tracepoint (a private tracefs mount and trace instance, filtered to the mount's
connection): what the kernel asks each side, whatever each daemon says of itself.  With `--cache auto` the
stat storm is one LOOKUP per file (500) and no GETATTR on either side: the other 2500 stats are the
kernel's, at about 2 us each for both.

`--tree NAME=DIR` adds a column with the daemon of another checkout (a `git worktree add` of an older
commit), run by this interpreter with DIR first on the path: a regression hunt in one interleaved run.

Run as root: python bench/standalone.py [--rounds 5] [--cache none,auto]
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
from dataclasses import dataclass, field
from pathlib import Path

from daemon.transport.fusedev import in_mountinfo as mounted
from daemon.transport.uring import ENABLE_PARAM as ENABLE_URING

REPO = Path(__file__).resolve().parent.parent
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
SMALL = 4096
MIB = 1 << 20
SEQ = "seq read"
PEER = "pyfuse3"


@dataclass
class Target:
    name: str
    cmd: list[str] | None  # None: the native directory
    cwd: Path = REPO
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Sample:
    rate: float  # ops/s (MB/s for the sequential read)
    cpu: float  # daemon CPU seconds per op (per MiB for the sequential read); 0 for native
    requests: dict[str, float] = field(default_factory=dict)  # --requests: FUSE requests per op, by opcode


class Requests:
    """The FUSE requests the kernel sends one mount's daemon (the fuse:fuse_request_send tracepoint), counted
    by opcode, in a trace instance of a tracefs mounted privately under `base` (other tracers are left alone)."""

    def __init__(self, base: Path) -> None:
        self.tracefs = base / "tracefs"
        self.tracefs.mkdir()
        if _libc.mount(b"tracefs", str(self.tracefs).encode(), b"tracefs", 0, None) != 0:
            raise SystemExit(f"--requests: mount tracefs: {os.strerror(ctypes.get_errno())}")
        self.dir = self.tracefs / "instances" / f"fsinspect-bench-{os.getpid()}"
        self.dir.mkdir()
        self.event = self.dir / "events" / "fuse" / "fuse_request_send"
        if not self.event.is_dir():
            self.close()
            raise SystemExit("--requests: this kernel has no fuse:fuse_request_send tracepoint")
        (self.dir / "tracing_on").write_text("0")
        (self.dir / "buffer_size_kb").write_text("16384")
        (self.event / "enable").write_text("1")
        self.connection = -1

    def follow(self, mnt: Path) -> None:
        """Count the requests of the FUSE connection mounted at `mnt` (its st_dev) from now on."""
        self.connection = os.stat(mnt).st_dev
        (self.event / "filter").write_text(f"connection == {self.connection}")

    def start(self) -> None:
        (self.dir / "trace").write_text("")
        (self.dir / "tracing_on").write_text("1")

    def stop(self) -> dict[str, int]:
        (self.dir / "tracing_on").write_text("0")
        counts: dict[str, int] = {}
        with open(self.dir / "trace") as f:
            for line in f:
                _, sep, rest = line.partition(" opcode ")
                if sep:  # "... opcode 1 (FUSE_LOOKUP) len 47"
                    name = rest.split()[1].strip("()").removeprefix("FUSE_")
                    counts[name] = counts.get(name, 0) + 1
        return counts

    def close(self) -> None:
        if self.dir.is_dir():
            if self.event.is_dir():
                (self.event / "enable").write_text("0")
            self.dir.rmdir()
        _libc.umount2(str(self.tracefs).encode(), 2)
        self.tracefs.rmdir()


REQUESTS: Requests | None = None  # --requests


def trace_start(pid: int | None) -> bool:
    """Start counting a daemon's requests (--requests; not for the native directory)."""
    if REQUESTS is None or pid is None:
        return False
    REQUESTS.start()
    return True


def trace_stop(tracing: bool, sample: Sample, per: float) -> Sample:
    """`sample` with the requests counted since trace_start, per op (`per` ops)."""
    if tracing and REQUESTS is not None:
        sample.requests = {op: k / per for op, k in REQUESTS.stop().items()}
    return sample


def start(t: Target, mnt: Path) -> subprocess.Popen[bytes]:
    assert t.cmd is not None
    log = tempfile.TemporaryFile()  # not a pipe: a chatty daemon must never block on it
    proc = subprocess.Popen(t.cmd, cwd=t.cwd, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **t.env})
    deadline = time.monotonic() + 20
    while not mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc, mnt)
            log.seek(0)
            raise SystemExit(f"{t.name} did not mount: {log.read().decode()}")
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


def cpu_seconds(pid: int | None) -> float:
    """On-CPU time of every thread of `pid` (ns-exact, unlike the 10 ms ticks of /proc/PID/stat)."""
    if pid is None:
        return 0.0
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that just ended
    return total / 1e9


def populate(d: Path, n: int) -> None:
    d.mkdir()
    blob = os.urandom(SMALL)
    for i in range(n):
        (d / f"f{i:05d}").write_bytes(blob)


CLIENTS = 1  # --clients: processes sharing each metadata storm's operations


def measure(pid: int | None, n: int, fn: Callable[[int], None]) -> Sample:
    """`n` operations, by one process or CLIENTS forked ones (operation i by client i % CLIENTS)."""
    tracing = trace_start(pid)
    c = cpu_seconds(pid)
    t = time.perf_counter()
    if CLIENTS == 1:
        for i in range(n):
            fn(i)
    else:
        kids = []
        for k in range(CLIENTS):
            kid = os.fork()
            if kid == 0:
                status = 1
                try:
                    for i in range(k, n, CLIENTS):
                        fn(i)
                    status = 0
                finally:
                    os._exit(status)
            kids.append(kid)
        if any(os.waitstatus_to_exitcode(os.waitpid(kid, 0)[1]) for kid in kids):
            raise SystemExit("a storm client failed")
    wall = time.perf_counter() - t
    return trace_stop(tracing, Sample(n / wall, (cpu_seconds(pid) - c) / n), n)


def storms(root: Path, files: int, n: int, tag: str, pid: int | None) -> dict[str, Sample]:
    src = root / "src"
    names = [str(src / f"f{i:05d}") for i in range(files)]
    out: dict[str, Sample] = {}
    out["stat"] = measure(pid, n, lambda i: os.stat(names[i % files]))

    def read_one(i: int) -> None:
        fd = os.open(names[i % files], os.O_RDONLY)
        os.read(fd, SMALL)
        os.close(fd)

    out["read 4K"] = measure(pid, n, read_one)
    new = root / f"new-{tag}"
    os.mkdir(new)

    def create_one(i: int) -> None:
        os.close(os.open(f"{new}/c{i}", os.O_CREAT | os.O_WRONLY, 0o644))

    out["create"] = measure(pid, n, create_one)
    tracing = trace_start(pid)
    c = cpu_seconds(pid)
    t = time.perf_counter()
    total = 0
    with open(src / "big", "rb", buffering=0) as f:
        while chunk := f.read(128 * 1024):
            total += len(chunk)
    wall = time.perf_counter() - t
    out[SEQ] = trace_stop(tracing, Sample(total / wall / 1e6, (cpu_seconds(pid) - c) / (total / MIB)), total / MIB)
    return out


def targets(args: argparse.Namespace, mnt: Path, shared: Path, cache: str) -> list[Target]:
    py = sys.executable
    base = [py, "-m", "fsinspect.cli", "daemon", "--standalone", str(mnt), "--shared-dir", str(shared),
            "--cache", cache, "--log-level", "warning"]
    out = [Target("native", None)] if not args.no_native else []
    out.append(Target("fsinspect", [*base, "--uring", args.uring]))
    if args.uring_ab:
        out.append(Target("fsinspect dev", [*base, "--uring", "off"]))
    if args.passthrough:
        out.append(Target("fsinspect pt=off", [*base, "--passthrough", "off"]))
    for v in args.variant:
        name, _, extra = v.partition("=")
        out.append(Target(f"fsinspect {name}", [*base, *extra.split()]))
    for v in args.tree:
        name, _, tree = v.partition("=")
        d = Path(tree).resolve()
        out.append(Target(name, [*base, *args.tree_args.split()], cwd=d, env={"PYTHONPATH": str(d)}))
    if not args.no_pyfuse3:
        out.append(Target(PEER, [py, str(REPO / "bench" / "pyfuse3_passthrough.py"), "--cache", cache,
                                 str(shared), str(mnt)]))
    return out


def run_mode(args: argparse.Namespace, shared: Path, mnt: Path, cache: str) -> dict[str, list[dict[str, Sample]]]:
    ts = targets(args, mnt, shared, cache)
    samples: dict[str, list[dict[str, Sample]]] = {t.name: [] for t in ts}
    for rnd in range(args.rounds):
        for t in ts if rnd % 2 == 0 else ts[::-1]:
            tag = f"{cache}-{t.name.replace(' ', '-')}-{rnd}"
            subprocess.run(["sync"], check=False)
            if t.cmd is None:
                samples[t.name].append(storms(shared, args.files, args.n, tag, None))
            else:
                proc = start(t, mnt)
                try:
                    if REQUESTS is not None:
                        REQUESTS.follow(mnt)
                    samples[t.name].append(storms(mnt, args.files, args.n, tag, proc.pid))
                finally:
                    stop(proc, mnt)
            shutil.rmtree(shared / f"new-{tag}", ignore_errors=True)
    return samples


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f} .. {max(xs):.2f}]"


def table(samples: dict[str, list[dict[str, Sample]]], cache: str, rounds: int, n: int) -> list[str]:
    peer = samples.get(PEER)
    lines = [f"--cache {cache}: {rounds} alternating rounds, {n} ops per storm (seq read: MB/s, CPU per MiB); "
             f"ratios per round against {PEER}, median [min .. max]",
             f"{'storm':<10}{'target':<22}{'ops/s':>9}{'vs ' + PEER:>26}{'CPU us/op':>11}"
             f"{PEER + ' CPU / CPU':>26}"]
    for storm in next(iter(samples.values()))[0]:
        for name, runs in samples.items():
            rates = [r[storm].rate for r in runs]
            cpus = [r[storm].cpu for r in runs]
            row = f"{storm:<10}{name:<22}{statistics.median(rates):>9.0f}"
            if peer is not None and name not in (PEER, "native"):
                row += f"{spread([a / b[storm].rate for a, b in zip(rates, peer)]):>26}"
            else:
                row += " " * 26
            if name != "native":
                row += f"{statistics.median(cpus) * 1e6:>11.1f}"
                if peer is not None and name != PEER:
                    row += f"{spread([b[storm].cpu / a for a, b in zip(cpus, peer) if a > 0]):>26}"
            lines.append(row.rstrip())
    return lines


def request_table(samples: dict[str, list[dict[str, Sample]]], cache: str) -> list[str]:
    """FUSE requests per op by opcode (per MiB for the sequential read), median over the rounds."""
    lines = [f"--cache {cache}: FUSE requests per op (seq read: per MiB) by opcode, the kernel's tracepoint, "
             "median over the rounds"]
    for storm in next(iter(samples.values()))[0]:
        for name, runs in samples.items():
            ops = sorted({op for r in runs for op in r[storm].requests})
            if name == "native" or not ops:
                continue
            per = ", ".join(f"{op} {statistics.median(r[storm].requests.get(op, 0.0) for r in runs):.2f}" for op in ops)
            lines.append(f"{storm:<10}{name:<22}{per}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("-n", type=int, default=3000, help="operations per storm")
    ap.add_argument("--big-mb", type=int, default=64)
    ap.add_argument("--cache", default="none,auto", help="comma-separated cache modes (none, auto)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds per cache mode, the target order reversed every other round (the host is shared)")
    ap.add_argument("--on-disk", action="store_true", help="share a directory of $TMPDIR's filesystem, not a tmpfs")
    ap.add_argument("--no-pyfuse3", action="store_true")
    ap.add_argument("--no-native", action="store_true")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="extra fsinspect column with extra daemon arguments, e.g. 'r2=--readers 2'")
    ap.add_argument("--passthrough", action="store_true",
                    help="add the arm 'fsinspect pt=off': the daemon with --passthrough off (the fsinspect arm "
                         "has the default, auto)")
    ap.add_argument("--uring", choices=("on", "off"), default=None,
                    help="the fsinspect arm's transport: on = FUSE over io_uring (default where the kernel has it; "
                         "turns enable_uring on), off = /dev/fuse reads and writes")
    ap.add_argument("--uring-ab", action="store_true",
                    help="add the arm 'fsinspect dev' (--uring off) beside the io_uring one")
    ap.add_argument("--clients", type=int, default=1, metavar="N",
                    help="processes sharing each stat, read-4K and create storm (the sequential read stays one): "
                         "with FUSE over io_uring each CPU's queue serves its own callers")
    ap.add_argument("--requests", action="store_true",
                    help="count the FUSE requests each daemon gets per op, by opcode (the kernel's "
                         "fuse:fuse_request_send tracepoint, in a private tracefs)")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                    help="extra column: the daemon of another checkout DIR (e.g. an older commit's worktree)")
    ap.add_argument("--tree-args", default="", metavar="ARGS", help="extra daemon arguments for the --tree columns")
    args = ap.parse_args()
    modes = [m.strip() for m in args.cache.split(",") if m.strip()]
    if bad := [m for m in modes if m not in ("none", "auto")]:
        raise SystemExit(f"--cache: unknown mode {', '.join(bad)} (none, auto)")
    if os.geteuid() != 0:
        raise SystemExit("run as root (mount(2) and a clean comparison)")
    if not args.no_pyfuse3:
        try:
            import pyfuse3  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            raise SystemExit("pyfuse3 is missing: run ./scripts/setup (or pass --no-pyfuse3)") from None
    global CLIENTS
    CLIENTS = max(1, args.clients)
    if args.uring is None:
        args.uring = "on" if os.path.exists(ENABLE_URING) else "off"
    load = os.getloadavg()
    print(f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs); "
          f"kernel {os.uname().release}; fsinspect transport: {'io_uring' if args.uring == 'on' else '/dev/fuse'}; "
          f"{CLIENTS} client(s)",
          flush=True)
    base = Path(tempfile.mkdtemp(prefix="fsinspect-bench-"))
    shared, mnt = base / "shared", base / "mnt"
    mnt.mkdir()
    shared.mkdir()
    if not args.on_disk and _libc.mount(b"fsinspect-bench", str(shared).encode(), b"tmpfs", 0,
                                        f"size={args.big_mb + 256}m".encode()) != 0:
        raise SystemExit(f"mount tmpfs on {shared}: {os.strerror(ctypes.get_errno())} (or pass --on-disk)")
    try:
        populate(shared / "src", args.files)
        with open(shared / "src" / "big", "wb") as f:
            f.write(os.urandom(MIB) * args.big_mb)
        global REQUESTS
        if args.requests:
            REQUESTS = Requests(base)
        for cache in modes:
            samples = run_mode(args, shared, mnt, cache)
            print("\n".join(table(samples, cache, args.rounds, args.n)), flush=True)
            if REQUESTS is not None:
                print("\n".join(request_table(samples, cache)), flush=True)
    finally:
        if REQUESTS is not None:
            REQUESTS.close()
        if not mounted(mnt):
            if not args.on_disk:
                _libc.umount2(str(shared).encode(), 2)
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
