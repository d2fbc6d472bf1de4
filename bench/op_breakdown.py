"""Where the bundled daemon's CPU goes, per GETATTR, LOOKUP and CREATE, stage by stage, against the C virtiofsd.

The driver is bench/vhost_roundtrip.py's: fsinspect.rerun.front feeds real vhost-user rings (memfd guest
memory, INDIRECT descriptors, a kick per request, a call per reply, no EVENT_IDX) to a real `fsinspect
daemon` process, one request at a time.  For each engine (the C fast path, daemon/passthrough/_fastmodule.c;
the Python path, FSINSPECT_FAST=python) and op, three passes of `--n` requests:

1. **total**, no profiler: the daemon's CPU per request, from every thread's /proc/.../schedstat (ns)
   over the pass.  The same for the C virtiofsd (/usr/lib/qemu/virtiofsd, its worker included) on the
   same workload ("C vfsd"), and their ratio.
2. **perf** `record -a -e cpu-clock -g` (system-wide: with `-p` the sampling timer is re-armed at each of
   the daemon's context switches, which tripled its CPU here), the samples of the daemon's pid.  A
   cpu-clock sample is taken only while a thread is on a CPU, so the samples split CPU time, not wall
   time.  Each goes to one column by its kernel call chain and its user leaf (symbol and DSO; the user
   stack above the leaf is not unwound):
   - kernel under __schedule/futex: **wake-ups** (going to sleep in poll and being switched back in at a
     kick; a GIL hand-off); libpython's take_gil/drop_gil too;
   - kernel in eventfd read/write or poll, and their libc wrappers, and _sysmodule.c's wait_kick:
     **kick/call** (the wait, the kick's read, the call's write, which wakes the driver);
   - kernel in any other syscall (statx, open_by_handle_at, close, openat, unlinkat, ...) and its
     libc/_sysmodule.c wrapper: **syscalls**;
   - _ringmodule.c/ring_core.c (pop_chains, the Chain objects, the reply's scatter, the used-ring
     update): **ring**;
   - _fastmodule.c: filling fuse_attr/entry and allocating the reply are **encode**; the inode and handle
     tables **fs**; the rest (fast_call, op_*, where the header read is inlined) **dispatch**;
   - anything else in user space (the interpreter, malloc, _struct): the **Python share**, split by pass 3;
   - the main thread (it only waits for a signal), kernel time outside a syscall (a page fault, an
     interrupt), and what matches no rule: **other**.
3. **cProfile** on a second daemon of the same engine, run by this file (`--profiled-daemon`): its queue
   threads run under cProfile, the C fast path is called through a Python shim so its time stays apart,
   and SIGUSR1 dumps the stats before and after the pass.  Each project function's own time (tottime,
   less the profiler's own cost per call received and per call made, calibrated at start) goes to its file's and name's column:
   dissectors' decoders **decode**; encode_*/_attr_values/_entry_values **encode**; daemon/server.py and
   vhost_user._serve_chain **dispatch**; daemon/passthrough/*.py **fs** (its syscalls.py twin
   **syscalls**); vhost_user's queue loop and the ring's twin **ring**.  A builtin's or library
   function's time goes to its callers' columns; the project's C modules, syscalls and waits are left out
   (perf has them).  These shares split the Python share of pass 2.  cProfile times wall, not CPU, and adds
   its cost per call unevenly; it only divides the Python share, whose size perf measured.

A column's µs = its share of the perf samples x the total of pass 1, so a row adds up to the measured
total.  CREATE runs on fresh names, in pieces that fit the daemon's open-file limit; what a piece made is
released, unlinked and forgotten after it, with the meter and the profilers stopped.

    sudo .venv/bin/python bench/op_breakdown.py [--n 10000] [--rounds 2] [--engines c,python] \
        [--rate 10000] [--keep DIR]

Needs root and perf (perf -a).  The CPU columns hold on a loaded machine; the wall line does not.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vhost_roundtrip import fuse, group_cpu  # the same driver and CPU meter

from dissectors import fuse as F
from fsinspect.guest import launcher
from fsinspect.guest.share import make_share
from fsinspect.rerun.front import F_INDIRECT_DESC, F_PROTOCOL, F_VERSION_1, Front, Negotiation

OPS = ("GETATTR", "LOOKUP", "CREATE")
STAGES = ("decode", "dispatch", "fs", "syscalls", "encode", "ring", "kick/call", "wake-ups", "other")
SETTLE_S = 1.0  # perf -a starting before a pass

# ---------------------------------------------------------------------------------------- classification
SCHED = re.compile(r"^(__schedule|schedule|finish_task_switch|futex_|__futex|do_futex|__x64_sys_futex)")
EVENTFD_OR_POLL = re.compile(r"^(eventfd_|do_sys_poll|__x64_sys_poll|__x64_sys_ppoll|do_poll)")
TRANSPORT_WRAPPERS = {"__poll", "poll", "__GI___poll", "__GI___libc_write", "__libc_write", "write",
                      "__GI___libc_read", "__libc_read", "read", "eventfd_read", "eventfd_write"}
GIL_SYMS = re.compile(r"^(take_gil|drop_gil|PyEval_RestoreThread|PyEval_SaveThread|PyThread_acquire_lock|"
                      r"PyCOND_|_PyThread_cond)")
FAST_ENCODE = re.compile(r"^(attr_from_stat|attr_from_statx|split_timeout|reply_new|reply_error|entry_out|"
                         r"fill_entry|encode)")
FAST_FS = re.compile(r"^(inode_of|handle_of|path_fd|path_fd_done|do_fstat|statx_at|same_inode|adopt|under_lock|"
                     r"account_lookup|fs_timeout|get_long|lend|lend_locked|give_back|give_back_locked)")
# Python-level stage of a frame, innermost project frame first.
PY_ENCODE = re.compile(r"(^|\.)(encode\w*|_attr_values|_entry_values|_split_timeout|attr_from_stat|_open_out|"
                       r"pack\w*)$")
PY_DECODE = re.compile(r"(^|\.)(decode\w*|peek_header|_decode\w*|unpack\w*)$")


def stage_of_native(sym: str, where: str) -> str | None:
    """A frame in one of the project's C modules (by perf's DSO name)."""
    if "_ring" in where or "ring_core" in where:
        return "ring"
    if "_fast" in where:
        if FAST_ENCODE.match(sym):
            return "encode"
        if FAST_FS.match(sym):
            return "fs"
        return "dispatch"
    if "_sys" in where:
        return "kick/call" if "wait_kick" in sym else "syscalls"
    if "_uring" in where:
        return "ring"
    return None


def stage_of_python(func: str, path: str) -> str | None:
    if path.startswith("dissectors/ring/"):
        return "ring"
    if path.startswith("dissectors/"):
        if PY_ENCODE.search(func):
            return "encode"
        return "decode"
    if path == "daemon/server.py":
        return "encode" if PY_ENCODE.search(func) else "dispatch"
    if path == "daemon/passthrough/syscalls.py":
        return "syscalls"
    if path.startswith("daemon/passthrough/"):
        return "fs"
    if path == "daemon/transport/vhost_user.py":
        return "dispatch" if func in ("_serve_chain", "__call__", "_no_reply") else "ring"
    if path.startswith(("daemon/", "fsinspect/")):
        return "dispatch"
    return None


PERF_SAMPLE = re.compile(r"^\s*(\d+)/(\d+)\s")
PERF_FRAME = re.compile(r"^\s+[0-9a-f]+\s+(\S+?)(?:\+0x[0-9a-f]+)?\s+\((.*)\)\s*$")


def perf_stage(frames: list[tuple[str, str]]) -> str:
    """One perf sample of a serving thread (leaf first: kernel frames, then the user leaf) -> a stage, or
    "python"."""
    kernel = [s for s, dso in frames if dso == "[kernel.kallsyms]"]
    user = [(s, dso) for s, dso in frames if dso != "[kernel.kallsyms]" and s != "[unknown]"]
    leaf_sym, leaf_dso = user[0] if user else ("", "")
    if kernel:
        if any(SCHED.match(s) for s in kernel):
            return "wake-ups"
        if not any(s.startswith(("do_syscall_64", "entry_SYSCALL")) for s in kernel):
            return "other"  # a page fault, an interrupt
        if any(EVENTFD_OR_POLL.match(s) for s in kernel):
            return "kick/call"
        return "syscalls"
    base = os.path.basename(leaf_dso)
    native = stage_of_native(leaf_sym, base)
    if native is not None:
        return native
    if base.startswith("libc"):
        if leaf_sym in TRANSPORT_WRAPPERS:
            return "kick/call"
        if leaf_sym.lstrip("_").startswith(("statx", "open_by_handle_at", "name_to_handle_at", "fstatat",
                                            "GI___fstatat", "close", "GI___close", "openat", "GI___openat",
                                            "unlinkat", "renameat", "mkdirat", "fchown", "fchmod",
                                            "setfs", "syscall")):
            return "syscalls"
    if base.startswith("libpython") and GIL_SYMS.match(leaf_sym):
        return "wake-ups"
    if not leaf_dso:
        return "other"
    return "python"


def read_perf(data: Path, pid: int) -> Counter[str]:
    """Stage -> samples of `pid` in a `perf record -a -g` file."""
    out = subprocess.run(["perf", "script", "-i", str(data), "--pid", str(pid), "-F", "pid,tid,ip,sym,dso"],
                         capture_output=True, text=True, check=True).stdout
    counts: Counter[str] = Counter()
    frames: list[tuple[str, str]] | None = None
    main = False
    for line in [*out.splitlines(), ""]:
        if m := PERF_SAMPLE.match(line):
            frames = []
            main = m.group(1) == m.group(2)  # the main thread waits for a signal: no request's work
        elif frames is not None and (m := PERF_FRAME.match(line)):
            frames.append((m.group(1), m.group(2)))
        elif frames is not None and not line.strip():
            counts["other" if main else perf_stage(frames)] += 1
            frames = None
    return counts


# ---------------------------------------------------------------------------------------- the Python share
# The daemon of the cProfile pass runs under this file (`--profiled-daemon`): its queue threads run under
# cProfile from their start, the C fast path is called through _Native (so its time, which perf measures,
# stays apart from Server.handle's), and SIGUSR1 writes the cumulative stats with the profiler's own cost per
# call (calibrated at start) to $FSI_PROFILE_OUT.
# Builtins whose time perf books itself: the project's C modules, syscalls, waits (the queue thread's epoll).
EXACT_BUILTINS = re.compile(r"_ring\.|SplitQueue|Chain|wait_kick|posix\.|_sys\.|_fast\.|_uring\.|select\.|"
                            r"'acquire' of|time\.sleep")
Key = tuple[str, int, str]


class _Native:
    """The C fast path behind a Python call, so cProfile books its time apart (excluded: perf has it)."""

    def __init__(self, fast: Any) -> None:
        self.fast = fast
        self.counts = fast.counts

    def __call__(self, buf: Any, chain: Any = None) -> Any:
        """Called as the queue thread calls the fast path (the chain too: a READ's sink).  Having no C entry
        (`answerer`), it is called through Python, so cProfile sees it."""
        return self.fast(buf, chain)


def _empty() -> None:
    pass


def _calls(n: int) -> None:
    e = ()
    for _ in range(n):
        _empty()
        len(e)


def calibrate(n: int = 20000) -> dict[str, float]:
    """cProfile's own cost per call, in this process: what it books to the callee ("py", "c": an empty
    function's, len(())'s tottime per call) and to the caller ("caller": per call made, beyond what the
    loop costs unprofiled).  python_split() subtracts them."""
    import cProfile

    t0 = time.perf_counter()
    _calls(n)
    bare = time.perf_counter() - t0
    cal = cProfile.Profile()
    cal.enable()
    _calls(n)
    cal.disable()
    cal.create_stats()
    st = {k[2]: v for k, v in cal.stats.items()}
    py, c = st["_empty"][2] / n, st["<built-in method builtins.len>"][2] / n
    return {"py": py, "c": c, "caller": max(0.0, (st["_calls"][2] + n * (py + c) - bare) / (2 * n) - (py + c) / 2)}


def profiled_daemon(argv: list[str]) -> int:
    import cProfile
    import marshal

    from daemon.server import Server
    from daemon.transport.vhost_user import VhostUserSession
    from fsinspect.cli import main as cli_main

    profs: list[cProfile.Profile] = []
    loop, init = VhostUserSession._queue_loop, Server.__init__

    def queue_loop(self: Any, *a: Any) -> None:
        p = cProfile.Profile()
        profs.append(p)
        p.enable()
        try:
            loop(self, *a)
        finally:
            p.disable()

    def server_init(self: Any, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        if self._fast is not None:
            self._fast = _Native(self._fast)

    per_call = calibrate()

    def dump(_sig: int, _frame: Any) -> None:
        merged: dict[Key, list[Any]] = {}
        for p in profs:
            p.snapshot_stats()
            for k, (cc, nc, tt, ct, callers) in p.stats.items():
                m = merged.setdefault(k, [0, 0, 0.0, 0.0, {}])
                m[0] += cc
                m[1] += nc
                m[2] += tt
                m[3] += ct
                for ck, cv in callers.items():
                    old = m[4].get(ck, (0, 0, 0.0, 0.0))
                    m[4][ck] = tuple(x + y for x, y in zip(old, cv))
        with open(os.environ["FSI_PROFILE_OUT"], "wb") as f:
            marshal.dump({"per_call": per_call, "stats": {k: tuple(v) for k, v in merged.items()}}, f)

    VhostUserSession._queue_loop = queue_loop  # type: ignore[method-assign,assignment]
    Server.__init__ = server_init  # type: ignore[method-assign]
    signal.signal(signal.SIGUSR1, dump)
    return cli_main(argv)


def read_profile(path: Path) -> tuple[dict[str, float], dict[Key, tuple[Any, ...]]]:
    import marshal

    d = marshal.loads(path.read_bytes())
    return d["per_call"], d["stats"]


def python_split(before: Path, after: Path, root: Path) -> dict[str, float]:
    """Seconds per stage of the Python code the serving threads ran between two snapshots.

    A project function's own time (cProfile's tottime, less the profiler's cost per call) goes to its stage;
    a builtin's or a library function's to its callers' stages, in proportion to what each caller spent in
    it; the project's C modules and the syscalls (perf measures those) are left out."""
    per_call, a = read_profile(before)
    _, b = read_profile(after)
    stats: dict[Key, tuple[int, float, dict[Key, float]]] = {}
    for k, (_cc, nc, tt, _ct, callers) in b.items():
        old = a.get(k)
        onc, ott, ocallers = (old[1], old[2], old[4]) if old else (0, 0.0, {})
        d_callers = {ck: cv[2] - (ocallers[ck][2] if ck in ocallers else 0.0) for ck, cv in callers.items()}
        stats[k] = (nc - onc, tt - ott, d_callers)
    memo: dict[Key, dict[str, float]] = {}

    def own_stage(k: Key) -> str | None:
        fn, _line, name = k
        if fn == "~":
            return "exact" if EXACT_BUILTINS.search(name) else None
        if Path(fn).resolve() == Path(__file__).resolve():
            return "exact"  # _Native.__call__: the C fast path
        try:
            rel = str(Path(fn).resolve().relative_to(root))
        except ValueError:
            return None
        return stage_of_python(name, rel) or None

    def shares(k: Key, depth: int = 0) -> dict[str, float]:
        """Fractions of k's time per stage."""
        if k in memo:
            return memo[k]
        st = own_stage(k)
        if st is not None:
            out = {st: 1.0}
        else:
            callers = stats.get(k, (0, 0.0, {}))[2]
            total = sum(v for v in callers.values() if v > 0)
            out = {}
            if total <= 0 or depth > 20:
                out = {"other": 1.0}
            else:
                for ck, v in callers.items():
                    if v > 0:
                        for s2, f in shares(ck, depth + 1).items():
                            out[s2] = out.get(s2, 0.0) + f * v / total
        memo[k] = out
        return out

    made: Counter[Key] = Counter()  # calls each function made (the profiler books part of each to it)
    for k, (_nc, _tt, callers) in stats.items():
        for ck in callers:
            made[ck] += b[k][4][ck][1] - (a[k][4][ck][1] if k in a and ck in a[k][4] else 0)
    got: dict[str, float] = {}
    for k, (nc, tt, _c) in stats.items():
        if nc <= 0 and tt <= 0:
            continue
        own = max(0.0, tt - nc * per_call["c" if k[0] == "~" else "py"] - made[k] * per_call.get("caller", 0.0))
        for st, f in shares(k).items():
            if st != "exact":
                got[st] = got.get(st, 0.0) + own * f
    return got


def combine(perf: Counter[str], py: dict[str, float], total_us: float) -> dict[str, float]:
    """µs per stage: perf's shares of the total, its Python share split by cProfile's (seconds per stage)."""
    n = sum(perf.values())
    if n == 0:
        return {"other": total_us}
    out = dict.fromkeys(STAGES, 0.0)
    for st, c in perf.items():
        if st != "python":
            out[st] += total_us * c / n
    python_us = total_us * perf.get("python", 0) / n
    m = sum(py.values())
    if m == 0:
        out["other"] += python_us
    else:
        for st, sec in py.items():
            out[st] += python_us * sec / m
    return out


# ---------------------------------------------------------------------------------------- workload
@dataclass
class Target:
    front: Front
    pid: int
    nodeid: int = 0
    run: int = 0
    made: list[tuple[int, int, bytes]] = field(default_factory=list)


def connect(sock: Path, pid: int) -> Target:
    front = Front(sock, Negotiation(features=F_VERSION_1 | F_INDIRECT_DESC | F_PROTOCOL), max_request=4096,
                  max_reply=1 << 17)
    fuse(front, "INIT", {"init": F.make("fuse_init_in", major=7, minor=38, max_readahead=128 << 10, flags=0)},
         nodeid=0)
    t = Target(front, pid)
    t.nodeid = fuse(front, "LOOKUP", {"name": b"big.bin"}).args["entry"].nodeid
    return t


_FORGETS = itertools.count(1 << 40)
GETATTR_IN = F.make("fuse_getattr_in")
CREATE_IN = F.make("fuse_create_in", flags=os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=0o100644, umask=0o022)


def run_op(t: Target, op: str, n: int) -> None:
    if op == "GETATTR":
        for _ in range(n):
            fuse(t.front, "GETATTR", {"getattr": GETATTR_IN}, nodeid=t.nodeid)
    elif op == "LOOKUP":
        for _ in range(n):
            fuse(t.front, "LOOKUP", {"name": b"big.bin"})
    else:
        t.run += 1
        for i in range(n):
            name = f"c{t.run}-{i}".encode()
            r = fuse(t.front, "CREATE", {"create": CREATE_IN, "name": name})
            t.made.append((r.args["entry"].nodeid, r.args["open"].fh, name))


def clean_up(t: Target) -> None:
    """Release and unlink what CREATE made (never inside a measured pass)."""
    for nodeid, fh, _ in t.made:
        fuse(t.front, "RELEASE", {"release": F.make("fuse_release_in", fh=fh, flags=os.O_RDWR)}, nodeid=nodeid)
    for _, _, name in t.made:
        fuse(t.front, "UNLINK", {"name": name})
    for i in range(0, len(t.made), 64):  # the lookups back, as the guest's kernel gives them: the C virtiofsd
        part = t.made[i:i + 64]  # keeps an O_PATH fd per inode until then
        forgets = [F.make("fuse_forget_one", nodeid=nodeid, nlookup=1) for nodeid, _, _ in part]
        raw = F.encode_request("BATCH_FORGET", {"batch": F.make("fuse_batch_forget_in", count=len(part)),
                                                "forgets": forgets}, unique=next(_FORGETS), nodeid=0)
        t.front.roundtrip(raw, 0, queue=0)
    t.made.clear()


def chunks(op: str, n: int) -> list[int]:
    """CREATE keeps a file open per request: a pass is cut where the daemon's open files would run out, and
    what it made is released and unlinked between the pieces (outside the measurement)."""
    if op != "CREATE":
        return [n]
    size = max(1000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)  # the daemon inherits ours; the C
    # virtiofsd holds an O_PATH fd beside each open file
    return [min(size, n - i) for i in range(0, n, size)]


def cpu_pass(t: Target, pgid: int, op: str, n: int) -> tuple[float, float]:
    """(daemon CPU µs per request, wall µs per request)."""
    cpu = wall = 0.0
    for k in chunks(op, n):
        c0, w0 = group_cpu(pgid), time.perf_counter()
        run_op(t, op, k)
        cpu, wall = cpu + group_cpu(pgid) - c0, wall + time.perf_counter() - w0
        clean_up(t)
    return cpu / n * 1e6, wall / n * 1e6


def profiled(cmd: Callable[[Path], list[str]], out: Path, t: Target, op: str, n: int) -> list[Path]:
    """Run a profiler (`cmd(output file)`) around each piece of one pass; SIGINT makes it write its file."""
    files = []
    for i, k in enumerate(chunks(op, n)):
        f = out.with_name(f"{out.name}.{i}")
        prof = subprocess.Popen(cmd(f), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            time.sleep(SETTLE_S)
            if prof.poll() is not None:
                err = prof.stderr.read().decode(errors="replace").strip() if prof.stderr else ""
                raise SystemExit(f"{cmd(f)[0]} failed: {err}")
            run_op(t, op, k)
        finally:
            prof.send_signal(signal.SIGINT)
            try:
                prof.wait(timeout=120)
            except subprocess.TimeoutExpired:
                prof.kill()
                prof.wait()
        clean_up(t)
        files.append(f)
    return files


@dataclass
class Row:
    total: float
    wall: float
    perf: Counter[str]
    python: dict[str, float] = field(default_factory=dict)

    @property
    def stages(self) -> dict[str, float]:
        return combine(self.perf, self.python, self.total)


def measure_engine(t: Target, pgid: int, op: str, n: int, rate: int, keep: Path) -> Row:
    """Passes 1 and 2 on a plain daemon."""
    run_op(t, op, min(n, 2000))  # warm: first-touch of tables, the pool, the page cache
    clean_up(t)
    total, wall = cpu_pass(t, pgid, op, n)
    perf: Counter[str] = Counter()
    for f in profiled(lambda f: ["perf", "record", "-a", "-e", "cpu-clock", "-F", str(rate), "-g", "-o", str(f)],
                      keep / f"perf-{pgid}-{op}.data", t, op, n):
        perf += read_perf(f, t.pid)
    return Row(total, wall, perf)


def python_pass(t: Target, op: str, n: int, keep: Path) -> dict[str, float]:
    """Pass 3 on the daemon run under cProfile (profiled_daemon): its stats before and after each piece."""
    run_op(t, op, min(n, 2000))
    clean_up(t)
    got: dict[str, float] = {}
    for i, k in enumerate(chunks(op, n)):
        before = snapshot(t.pid, keep / "profile.out", keep / f"prof-{t.pid}-{op}.{i}a")
        run_op(t, op, k)
        after = snapshot(t.pid, keep / "profile.out", keep / f"prof-{t.pid}-{op}.{i}b")
        clean_up(t)
        for st, sec in python_split(before, after, Path(__file__).resolve().parent.parent).items():
            got[st] = got.get(st, 0.0) + sec
    return got


def snapshot(pid: int, out: Path, dest: Path) -> Path:
    """SIGUSR1: the profiled daemon writes its stats to `out`; renamed to `dest`."""
    out.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if out.stat().st_size > 0:
                time.sleep(0.1)  # one write, but let it finish
                out.rename(dest)
                return dest
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise SystemExit("the profiled daemon wrote no stats")


@contextmanager
def daemon(share: Path, work: Path, env: dict[str, str], profiled_out: Path | None = None
           ) -> Iterator[tuple[Path, int]]:
    sock = work / "d.sock"
    args = [f"--socket-path={sock}", "-o", f"source={share}", "--log-level", "warning"]
    if profiled_out is None:
        cmd = [sys.executable, "-m", "fsinspect", "daemon", *args]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--profiled-daemon", "daemon", *args]
        env = {**env, "FSI_PROFILE_OUT": str(profiled_out)}
    proc = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, **env})
    try:
        while not sock.exists():
            if proc.poll() is not None:
                raise SystemExit("the daemon exited at start")
            time.sleep(0.02)
        yield sock, proc.pid
    finally:
        launcher.stop_process(proc)


def measure_virtiofsd(share: Path, n: int) -> dict[str, float]:
    with launcher.short_tmpdir() as work, launcher.virtiofsd(share, work) as be:
        pgid = be.processes[0].pid
        t = connect(be.socket_path, pgid)
        try:
            out = {}
            for op in OPS:
                run_op(t, op, min(n, 2000))
                clean_up(t)
                out[op] = cpu_pass(t, pgid, op, n)[0]
            return out
        finally:
            t.front.close()


def measure_bundled(share: Path, engine: str, n: int, rate: int, keep: Path) -> dict[str, Row]:
    env = {"FSINSPECT_FAST": engine}
    with launcher.short_tmpdir() as work, daemon(share, work, env) as (sock, pid):
        t = connect(sock, pid)
        try:
            rows = {op: measure_engine(t, pid, op, n, rate, keep) for op in OPS}
        finally:
            t.front.close()
    with launcher.short_tmpdir() as work, daemon(share, work, env, keep / "profile.out") as (sock, pid):
        t = connect(sock, pid)
        try:
            for op in OPS:
                rows[op].python = python_pass(t, op, n, keep)
        finally:
            t.front.close()
    return rows


def main() -> int:
    if sys.argv[1:2] == ["--profiled-daemon"]:
        return profiled_daemon(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000, help="requests per op and pass (default 10000)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds; the round with the lowest total per op is shown (default 2)")
    ap.add_argument("--engines", default="c,python", help="daemon engines: c (the fast path), python")
    ap.add_argument("--rate", type=int, default=10000, help="perf samples per second per CPU (default 10000)")
    ap.add_argument("--keep", type=Path, help="keep the perf and cProfile files in DIR")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (perf -a)")
    if shutil.which("perf") is None:
        raise SystemExit("perf not found (apt-get install linux-perf)")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    load = os.getloadavg()[0]
    rows: dict[str, dict[str, Row]] = {}
    cfsd: dict[str, float] = {}
    keep_ctx: Any = launcher.short_tmpdir("fsi-prof-") if args.keep is None else _existing(args.keep)
    with make_share(root_tmpfs_mb=256) as share, keep_ctx as keep:
        (share.root / "big.bin").write_bytes(os.urandom(1 << 20))
        for _ in range(args.rounds):
            for eng in engines:
                got = measure_bundled(share.root, eng, args.n, args.rate, keep)
                for op, r in got.items():
                    best = rows.setdefault(eng, {}).get(op)
                    if best is None or r.total < best.total:
                        rows[eng][op] = r
            for op, us in measure_virtiofsd(share.root, args.n).items():
                cfsd[op] = min(us, cfsd.get(op, us))
    print(f"{args.n} sequential requests per op and pass, {args.rounds} round(s), load average {load:.2f} at the "
          f"start; µs of daemon CPU per request")
    head = f"{'op':<8} {'engine':<7}" + "".join(f"{s:>10}" for s in STAGES) + f"{'total':>9}{'C vfsd':>9}{'ratio':>7}"
    print(head)
    for op in OPS:
        for eng in engines:
            r = rows[eng][op]
            print(f"{op:<8} {eng:<7}" + "".join(f"{r.stages[s]:>10.2f}" for s in STAGES)
                  + f"{r.total:>9.2f}{cfsd[op]:>9.2f}{r.total / cfsd[op]:>7.2f}")
    print("perf samples (Python share ms under cProfile): " + "; ".join(
        f"{op} {eng} {sum(rows[eng][op].perf.values())} ({sum(rows[eng][op].python.values()) * 1e3:.0f})"
        for op in OPS for eng in engines))
    print("wall µs per request (a loaded machine makes these noise): " + "; ".join(
        f"{op} {eng} {rows[eng][op].wall:.1f}" for op in OPS for eng in engines))
    return 0


@contextmanager
def _existing(d: Path) -> Iterator[Path]:
    d.mkdir(parents=True, exist_ok=True)
    yield d


if __name__ == "__main__":
    sys.exit(main())
