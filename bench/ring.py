"""Ring engine benchmark: C engine vs pure-Python twin, and the shadow path's added latency.

    .venv/bin/python bench/ring.py [--runs 5] [--quick]

1. Throughput, end to end on a 1024-entry ring: the driver publishes a full batch, then the device side
   pops every chain (walk + translate), gathers the readable bytes (40-byte header + 4 KiB payload),
   exposes the writable reply segment as a memoryview, and pushes all used entries.  Chains are
   3 descriptors: either one INDIRECT descriptor with a 3-entry table (what a Linux virtio-fs guest sends;
   1024 chains per batch) or 3 NEXT-linked descriptors (341 chains per batch).
2. Latency: one chain in flight, ping-pong between a driver thread and a device thread over real
   eventfds, directly and through a running ShadowPath (with capture).  Added latency = the difference
   of the percentiles.  The C path is measured sleeping in poll() (the default) and with spin_us=50
   (busy-polls the rings for 50 us after activity, saving the two thread wake-ups it otherwise adds).
   Twice: with a C driver and device (bench/ring_latency.c, no Python anywhere) and with Python ones
   (the rows per engine; their GIL hand-offs are in both the direct and the proxied figure).

Each figure is the median of --runs runs, with min and max.
"""

from __future__ import annotations

import argparse
import mmap
import os
import select
import statistics
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dissectors.ring import _native, driver
from dissectors.spec import virtio

NUM = 1024
HDR, PAYLOAD, REPLY = 40, 4096, 4096
GPA_BUFS = 0x100000
PROXY_GPA = 1 << 40


def engines() -> dict[str, ModuleType]:
    out: dict[str, ModuleType] = {}
    try:
        import dissectors.ring  # noqa: F401  (applies the malloc tuning the engine's users get)
        from dissectors.ring import _ring  # type: ignore[attr-defined]

        out["c"] = _ring
    except ImportError as exc:
        print(f"C engine unavailable: {exc}", file=sys.stderr)
    out["python"] = _native
    return out


class Setup:
    """Guest memory (memfd) with a 1024-entry ring and 3-descriptor chains; a proxy region."""

    def __init__(self, eng: ModuleType, layout: str) -> None:
        self.gsize = 32 << 20
        gfd = os.memfd_create("bench-guest", os.MFD_CLOEXEC)
        os.ftruncate(gfd, self.gsize)
        self.gmem = mmap.mmap(gfd, self.gsize)
        os.close(gfd)
        self.pmem = mmap.mmap(-1, 1 << 20)
        self.mem = eng.MemoryMap()
        self.mem.add_region(0, self.gsize, self.gmem)
        self.mem.add_region(PROXY_GPA, 1 << 20, self.pmem)
        lay = virtio.split_ring_layout(NUM)
        self.desc, self.avail = 0x1000, 0x1000 + lay.desc_size
        self.used = (self.avail + lay.avail_size + 4095) & ~4095
        self.guest = driver.GuestRing(NUM, self.mem.view(self.desc, lay.desc_size),
                                      self.mem.view(self.avail, lay.avail_size), self.mem.view(self.used, lay.used_size))
        per = HDR + PAYLOAD + REPLY + 64
        if layout == "indirect":
            self.heads = list(range(NUM))
            tables = GPA_BUFS + NUM * per
            for h in self.heads:
                b = GPA_BUFS + h * per
                t = tables + h * 48
                raw = driver.pack_descs(driver.chain_descs([(b, HDR, False), (b + 64, PAYLOAD, False),
                                                            (b + 64 + PAYLOAD, REPLY, True)]))
                self.gmem[t:t + 48] = raw
                self.guest.set_desc(h, t, 48, driver.F_INDIRECT)
        else:
            self.heads = [3 * i for i in range(NUM // 3)]
            for i, h in enumerate(self.heads):
                b = GPA_BUFS + i * per
                self.guest.set_descs(h, driver.chain_descs([(b, HDR, False), (b + 64, PAYLOAD, False),
                                                            (b + 64 + PAYLOAD, REPLY, True)], first=h))
        self.raw_heads = b"".join(h.to_bytes(2, "little") for h in self.heads)
        self.queue = eng.SplitQueue(self.mem, NUM, self.desc, self.avail, self.used)


def throughput(eng: ModuleType, layout: str, min_chains: int) -> tuple[float, float]:
    """Chains per second, end to end (publish + pop + gather + expose writable + push used).

    Returns (per wall-clock second, per CPU second of this thread): the machine is shared, so the
    CPU-time figure is the one that does not depend on what the neighbours run.
    """
    s = Setup(eng, layout)
    q, g, raw, n = s.queue, s.guest, s.raw_heads, len(s.heads)
    batches = max(1, min_chains // n)
    total_chains = 0
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(batches):
        g.publish_raw(raw, n)
        chains = q.pop_chains()
        q.push_used([(c.head, 16) for c in chains])
        total_chains += len(chains)
    dt, dc = time.perf_counter() - t0, time.thread_time() - c0
    assert total_chains == batches * n
    # sanity: the last batch really gathered and exposed
    assert len(chains[0].readable) == HDR + PAYLOAD and len(chains[0].writable[0]) == REPLY
    return total_chains / dt, total_chains / dc


def _efd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _wait(p: select.poll, fd: int) -> None:
    while not p.poll(1000):
        pass
    os.eventfd_read(fd)


def latency(eng: ModuleType, proxied: bool, count: int, spin_us: int = 0) -> list[float]:
    """Round-trip times (microseconds) of single chains: driver -> device -> driver."""
    s = Setup(eng, "indirect")
    g_kick, g_call = _efd(), _efd()
    cap = path = None
    if proxied:
        b_kick, b_call = _efd(), _efd()
        s_used, s_avail = PROXY_GPA, PROXY_GPA + 0x4000 * 2
        cap = eng.CaptureBuffer(64 << 20, "drop")
        path = eng.ShadowPath(s.mem, 1, NUM, s.desc, s.avail, s.used, s_avail, s_used, cap, kick_fd=g_kick,
                              call_fd=g_call, backend_kick_fd=b_kick, backend_call_fd=b_call, spin_us=spin_us)
        dev = eng.SplitQueue(s.mem, NUM, s.desc, s_avail, s_used)
        dev_kick, dev_call = b_kick, b_call
        path.start()
    else:
        dev, dev_kick, dev_call = s.queue, g_kick, g_call
    stop = threading.Event()

    def device() -> None:
        p = select.poll()
        p.register(dev_kick, select.POLLIN)
        while not stop.is_set():
            if not p.poll(100):
                continue
            os.eventfd_read(dev_kick)
            chains = dev.pop_chains()
            if chains:
                dev.push_used([(c.head, 16) for c in chains])
                os.eventfd_write(dev_call, 1)

    t = threading.Thread(target=device)
    t.start()
    pc = select.poll()
    pc.register(g_call, select.POLLIN)
    g = s.guest
    rtts = []
    drained = 0
    for i in range(count + 200):
        h = i % NUM
        t0 = time.perf_counter_ns()
        g.publish([h])
        os.eventfd_write(g_kick, 1)
        while True:
            _wait(pc, g_call)
            if g.collect_used():
                break
        if i >= 200:  # warm-up excluded
            rtts.append((time.perf_counter_ns() - t0) / 1000)
        if cap is not None and i % 256 == 0:
            drained += len(cap.read_captures(0))
    stop.set()
    t.join()
    if path is not None and cap is not None:
        path.stop()
        drained += len(cap.read_captures(0))
        assert drained == 2 * (count + 200) and cap.stats["dropped"] == 0, (drained, cap.stats)
    return rtts


def c_latency(runs: int, count: int) -> list[tuple[str, list[tuple[float, float, float, float]]]]:
    """bench/ring_latency.c: the same ping-pong with a C driver and C device (no Python, no GIL)."""
    import shutil
    import subprocess
    import tempfile

    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        return []
    here = Path(__file__).resolve().parent
    core = here.parent / "dissectors" / "ring"
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "ring_latency"
        subprocess.run([cc, "-O2", f"-I{core}", str(here / "ring_latency.c"), str(core / "ring_core.c"), "-o",
                        str(exe), "-lpthread"], check=True)

        def one(mode: int, spin: int) -> tuple[float, float]:
            out = subprocess.run([str(exe), str(count), str(mode), str(spin)], check=True, capture_output=True,
                                 text=True).stdout
            vals = dict(kv.split("=") for kv in out.split())
            return float(vals["p50"]), float(vals["p99"])

        rows = []
        for label, spin in (("C driver+device, path sleeps", 0), ("C driver+device, spin_us=50", 50)):
            res = []
            for _ in range(runs):
                d50, d99 = one(0, 0)
                p50, p99 = one(1, spin)
                res.append((d50, d99, p50, p99))
            rows.append((label, res))
        return rows


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def fmt(vals: list[float], unit: str = "") -> str:
    med = statistics.median(vals)
    return f"{med:,.1f}{unit} [{min(vals):,.1f} .. {max(vals):,.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer chains per run (smoke test)")
    args = ap.parse_args()
    engs = engines()
    scale = 0.1 if args.quick else 1.0
    layouts = (("indirect", "full ring: 1024 indirect chains per batch"),
               ("direct", "341 NEXT-linked chains per batch"))
    tp: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for layout, _ in layouts:
        for name, eng in engs.items():
            min_chains = int((1_000_000 if name == "c" else 30_000) * scale)
            tp[(name, layout)] = [throughput(eng, layout, min_chains) for _ in range(args.runs)]
    print(f"\n## Throughput, end to end (pop, gather 4136 B, expose writable, push used); {NUM}-entry ring,"
          f" 3-descriptor chains; median [min .. max] of {args.runs} runs; load average at start "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| batch | clock | C chains/s | twin chains/s | C / twin |")
    print("|---|---|---|---|---|")
    for layout, label in layouts:
        for i, clock in enumerate(("wall", "CPU")):
            py = [r[i] for r in tp[("python", layout)]]
            c = [r[i] for r in tp[("c", layout)]] if ("c", layout) in tp else []
            ratio = f"{statistics.median(c) / statistics.median(py):.1f}x" if c else "n/a"
            print(f"| {label} | {clock} | {fmt(c) if c else 'n/a'} | {fmt(py)} | {ratio} |")
    print(f"\n## Shadow path latency per chain (round trip, one chain in flight, microseconds); median [min .. max] "
          f"of {args.runs} runs\n")
    print("| driver/device, path | direct p50 | direct p99 | proxied p50 | proxied p99 | added p50 | added p99 |")
    print("|---|---|---|---|---|---|---|")
    for label, res in c_latency(args.runs, int(50_000 * scale)):
        cols = list(zip(*[(d50, d99, p50, p99, p50 - d50, p99 - d99) for d50, d99, p50, p99 in res]))
        print(f"| {label} | " + " | ".join(fmt(list(c)) for c in cols) + " |")
    variants = [(name, eng, 0) for name, eng in engs.items()]
    if "c" in engs:
        variants.insert(1, ("c, spin_us=50", engs["c"], 50))
    for name, eng, spin in variants:
        count = int((20_000 if eng is not _native else 5_000) * scale)
        rows: dict[str, list[float]] = {k: [] for k in ("d50", "d99", "p50", "p99", "a50", "a99")}
        for _ in range(args.runs):
            d = latency(eng, False, count)
            p = latency(eng, True, count, spin)
            d50, d99, p50, p99 = pct(d, 0.5), pct(d, 0.99), pct(p, 0.5), pct(p, 0.99)
            for k, v in zip(rows, (d50, d99, p50, p99, p50 - d50, p99 - d99)):
                rows[k].append(v)
        print(f"| Python driver+device, engine {name} | " + " | ".join(fmt(rows[k]) for k in rows) + " |")


if __name__ == "__main__":
    main()
