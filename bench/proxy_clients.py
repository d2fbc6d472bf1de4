"""Does a stuck control client slow the VM?  The metadata storm through the proxy with no client
attached vs with two clients (one reading, one that never reads), as alternating pairs.

Prints guest-side step times (wall seconds measured inside the guest), the stuck client's overflow
count, the reading client's message count, and the proxy's longest forwarding stall: the longest time
any queue's native path took from a wake-up to done forwarding (its `busy_max_ns` counter; the control
clients are served by another thread and never hold the rings).  Not a test: report the figures, don't
assert them.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fsinspect.guest import build, launcher
from fsinspect.guest.share import make_share


def one(image: build.GuestImage, share: Path, n: int, clients: bool) -> dict[str, Any]:
    with launcher.short_tmpdir() as work, launcher.virtiofsd(share, work) as be:
        listen, ctrl, summ = work / "p.sock", work / "c.sock", work / "s.json"
        proc = subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(listen), "--backend",
                                 str(be.socket_path), "--record", str(work / "r.pcapng"), "--control", str(ctrl),
                                 "--summary-json", str(summ), "--quiet"], stdin=subprocess.DEVNULL)
        socks: list[socket.socket] = []
        got = [0]
        try:
            while not ctrl.exists():
                time.sleep(0.02)
            if clients:
                stuck = socket.socket(socket.AF_UNIX)
                stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                stuck.connect(str(ctrl))
                reader = socket.socket(socket.AF_UNIX)
                reader.connect(str(ctrl))
                socks += [stuck, reader]

                def drain() -> None:
                    while chunk := reader.recv(1 << 16):
                        got[0] += chunk.count(b"\n")

                threading.Thread(target=drain, daemon=True).start()
            res = launcher.run_guest(listen, image=image, workload="storm", params={"n": n}, timeout=300,
                                     watch=[proc])
            proc.wait(20)
        finally:
            launcher.stop_process(proc)
            for s in socks:
                s.close()
        s = json.loads(summ.read_text())
    steps = {st.name: st.duration for st in res.steps if st.duration is not None}
    missed = max((c["missed"] for c in s.get("control_clients", [])), default=0)
    path = s.get("path", {})
    return {"steps": steps, "missed": missed, "received": got[0], "ok": res.ok,
            "stall_ms": path.get("busy_max_ns", 0) / 1e6,
            "busy_us": path.get("busy_ns", 0) / 1e3 / max(1, path.get("wakeups", 0))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("-n", type=int, default=2000)
    args = ap.parse_args()
    image = build.build()
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    with make_share() as share:
        for i in range(args.pairs):
            for clients in ((False, True) if i % 2 == 0 else (True, False)):
                runs[clients].append(one(image, share.root, args.n, clients))
    names = [k for k in runs[False][0]["steps"] if k.startswith("storm")]
    print(f"{'step':<18} {'no client s':>12} {'2 clients s':>12} {'ratio':>7}")
    for k in names:
        a = statistics.median(r["steps"][k] for r in runs[False])
        b = statistics.median(r["steps"][k] for r in runs[True])
        print(f"{k:<18} {a:>12.2f} {b:>12.2f} {a / b if b else 1:>7.2f}")
    print(f"stuck client missed (median): {statistics.median(r['missed'] for r in runs[True]):.0f} messages; "
          f"reading client received (median): {statistics.median(r['received'] for r in runs[True]):.0f} lines; "
          f"all guests ok: {all(r['ok'] for rs in runs.values() for r in rs)}")
    for clients, label in ((False, "no client"), (True, "2 clients")):
        stalls = [r["stall_ms"] for r in runs[clients]]
        print(f"longest forwarding stall, {label}: median {statistics.median(stalls):.2f} ms, max {max(stalls):.2f} ms "
              f"(per run: {', '.join(f'{x:.2f}' for x in stalls)}); mean busy per wake-up "
              f"{statistics.median(r['busy_us'] for r in runs[clients]):.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
