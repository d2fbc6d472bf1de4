"""The proxy between a real QEMU 7.2 + Linux 6.1 guest and the real C virtiofsd.

Each test boots the guest through `fsinspect proxy` (a subprocess, killed by PID) and checks the
guest's own results, the proxy's summary and the recording it wrote.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fsinspect.analysis.analyzer import Analyzer
from fsinspect.guest import launcher
from fsinspect.guest.build import GuestImage
from fsinspect.guest.share import Share
from fsinspect.recording.reader import RecordingReader
from fsinspect.recording.replay import analyze
from tests.guest_fixtures import explain

pytestmark = [pytest.mark.guest, pytest.mark.root]
NO_REPLY = {"FORGET", "BATCH_FORGET"}


@dataclass
class ProxyRun:
    listen: Path
    record: Path
    summary_path: Path
    proc: subprocess.Popen[bytes]
    backend: launcher.RunningBackend

    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.summary_path.read_text())
        return data

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")


@contextmanager
def proxy_in_front(share: Share, out: Path, *, announce: bool = True, debug_log: bool = False,
                   extra: tuple[str, ...] = (), cache: str = "auto") -> Iterator[ProxyRun]:
    """C virtiofsd on a private socket, `fsinspect proxy` in front of it; both gone afterwards.

    The recording, the summary and the back-end's log land in `out` (sockets need a short /tmp path).
    """
    with launcher.short_tmpdir() as work, launcher.virtiofsd(
            share.root, work, announce_submounts=announce, xattr=True, cache=cache,
            extra_args=["-d"] if debug_log else []) as be:
        run = ProxyRun(work / "proxy.sock", out / "rec.pcapng", out / "summary.json",
                       subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(work / "proxy.sock"),
                                         "--backend", str(be.socket_path), "--record", str(out / "rec.pcapng"),
                                         "--summary-json", str(out / "summary.json"), *extra],
                                        # its own group: stop_process signals the group (else nothing)
                                        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True),
                       be)
        try:
            deadline = time.monotonic() + 10
            while not run.listen.exists():
                assert run.proc.poll() is None, run.stderr()
                assert time.monotonic() < deadline, "proxy never listened"
                time.sleep(0.02)
            yield run
        finally:
            launcher.stop_process(run.proc)
            if be.log_path is not None and be.log_path.exists():
                (out / "backend.log").write_bytes(be.log_path.read_bytes())


def boot(image: GuestImage, run: ProxyRun, workload: str, **kw: Any) -> Any:
    params = dict(kw.pop("params", {}))
    params.setdefault("xattr", 1)
    res = launcher.run_guest(run.listen, image=image, workload=workload, watch=[run.proc], params=params, **kw)
    run.proc.wait(15)  # QEMU gone -> the proxy ends by itself and writes its summary
    return res


def exchanges(path: Path) -> Analyzer:
    with RecordingReader(path) as r:
        return analyze(r, Analyzer(keep_exchanges=True))


def virtiofsd_counts(log: Path) -> Counter[str]:
    """Per-opcode counts from the C virtiofsd's own -d log."""
    return Counter(m.group(1) for m in re.finditer(r"unique: \d+, opcode: (\w+) \(\d+\)", log.read_text()))


def test_full_workload_through_proxy(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    with proxy_in_front(guest_share, tmp_path, debug_log=True) as run:
        res = boot(guest_image, run, "full", timeout=240)
        assert res.ok, explain(res)
        assert run.proc.returncode == 0, run.stderr()
        s = run.summary()
    assert s["capture"]["dropped"] == 0 and s["capture_errors"] == 0
    assert s["lints"] == [], s["lints"]
    # start-up's objects (modules, codecs) were frozen before serving: full collections walk only the run's
    assert s["gc"]["frozen"] > 20_000, s["gc"]
    # QEMU's memory-backend-memfd seals guest RAM (seal=on): it cannot shrink under the proxy (no SIGBUS).
    assert s["unsealed_regions"] == 0
    backend_counts = virtiofsd_counts(tmp_path / "backend.log")
    an = exchanges(run.record)
    ours: Counter[str] = Counter()
    for ex in an.exchanges:
        ours[ex.opname] += 1
        if ex.opname in NO_REPLY:
            assert ex.reply is None
        else:
            assert ex.replied and ex.reply is not None, f"{ex.opname} unique {ex.unique} has no reply"
    assert ours == backend_counts, (ours - backend_counts, backend_counts - ours)
    assert sum(ours.values()) > 20_000
    # FUSE_INIT with both sides' flags.
    init = next(ex for ex in an.exchanges if ex.opname == "INIT")
    assert init.request is not None and init.reply is not None
    assert init.request.args["init"].minor == 38 and init.reply.args["init_out"].minor == 36
    # The guest offers SUBMOUNTS; the server answers without it (the kernel never requires the echo).
    assert init.request.args["init"].flags & (1 << 27)
    assert init.reply.args["init_out"].flags == 0x44F039  # QEMU 7.2's virtiofsd, as proxy-notes.md measured
    # SUBMOUNT flag on sub and sub/inner; SYNCFS once per superblock on every sync.
    announced = {a.name: a.nodeid for a in an.submounts.announced.values()}
    assert set(announced) == {b"sub", b"inner"}, announced
    roots = {1, *announced.values()}
    sync_nodeids = [r.nodeid for r in an.submounts.syncfs]
    assert sync_nodeids and len(sync_nodeids) % 3 == 0
    assert all(r.is_root for r in an.submounts.syncfs)
    for i in range(0, len(sync_nodeids), 3):
        assert set(sync_nodeids[i:i + 3]) == roots


def test_no_announce_means_no_submount_flag(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    with proxy_in_front(guest_share, tmp_path, announce=False) as run:
        res = boot(guest_image, run, "syncfs", timeout=90)
        assert res.ok, explain(res)
    an = exchanges(run.record)
    assert not an.submounts.announced
    flagged = [ex for ex in an.exchanges if ex.reply is not None and _attr_flags(ex) & 1]
    assert not flagged
    assert {r.nodeid for r in an.submounts.syncfs} == {1}  # one superblock: the root


def _attr_flags(ex: Any) -> int:
    a = ex.reply.args
    flags = 0
    if "entry" in a:
        flags |= a["entry"].attr.flags
    for rec, _nm in a.get("entries", []):
        if hasattr(rec, "entry_out"):
            flags |= rec.entry_out.attr.flags
    return flags


def test_syncfs_three_superblocks_and_submount_flags(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    with proxy_in_front(guest_share, tmp_path) as run:
        res = boot(guest_image, run, "syncfs", timeout=90)
        assert res.ok, explain(res)
    an = exchanges(run.record)
    flagged = {nm for ex in an.exchanges if ex.reply is not None
               for rec, nm in ex.reply.args.get("entries", []) if rec.entry_out.attr.flags & 1}
    flagged |= {ex.request.args["name"] for ex in an.exchanges
                if ex.opname == "LOOKUP" and ex.request is not None and ex.reply is not None and _attr_flags(ex) & 1}
    assert flagged == {b"sub", b"inner"}
    first_sync = [r.nodeid for r in an.submounts.syncfs][:3]
    assert sorted(first_sync) == sorted({1, *(a.nodeid for a in an.submounts.announced.values())})


def test_concurrent_five_times(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    """The load that hung a shadow-used-only design: 5 runs, no missed call, nothing unpaired."""
    for i in range(5):
        with proxy_in_front(guest_share, tmp_path) as run:
            res = boot(guest_image, run, "concurrent", timeout=150)
            assert res.ok, f"run {i}: {explain(res)}"
            s = run.summary()
        assert s["lints"] == [], s["lints"]
        assert s["capture"]["dropped"] == 0
        assert s["requests"] - s["opcodes"].get("FORGET", 0) == s["replies"], s
        assert s["path"].get("unpaired", 0) == 0
        # the guest negotiated EVENT_IDX through the proxy, as it does directly; no notification was lost
        assert s["features"]["features_acked"] & (1 << 29) and not s["features"]["features_masked"] & (1 << 29)


def test_poll_mode_forwards_everything(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    """--poll-us: the native path busy-polls after traffic instead of sleeping; nothing is lost."""
    with proxy_in_front(guest_share, tmp_path, extra=("--poll-us", "300")) as run:
        res = boot(guest_image, run, "crud", timeout=90)
        assert res.ok, explain(res)
        s = run.summary()
    assert s["path"]["spin_hits"] > 0, s["path"]  # rounds the path found while polling, not woken
    assert s["requests"] - s["opcodes"].get("FORGET", 0) == s["replies"], s
    assert s["capture"]["dropped"] == 0 and s["path"].get("unpaired", 0) == 0 and s["lints"] == []


def test_backend_death_guest_gets_eio_and_powers_off(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    with proxy_in_front(guest_share, tmp_path) as run:
        killed: dict[str, float] = {}

        def on_event(ev: Any) -> None:
            if getattr(ev, "kind", "") == "tick" and not killed:
                def kill() -> None:
                    killed["at"] = time.time()
                    launcher.stop_process(run.backend.processes[0], grace=0)  # type: ignore[arg-type]
                threading.Thread(target=kill).start()

        res = boot(guest_image, run, "hold", timeout=90, params={"seconds": 60}, stall_timeout=30,
                   on_event=on_event)
        assert killed, "the backend was never killed"
        s = run.summary()
        err = run.stderr()
    # The guest saw an error instead of hanging, unmounted and powered off by itself.
    assert not res.timed_out and not res.backend_lost, explain(res)
    assert res.failed_steps == ["hold"], explain(res)
    assert res.unmounted, explain(res)
    assert res.qemu_rc == 0, explain(res)
    assert s["backend_lost"] and s["eio_answered"] >= 1, s
    assert "BACKEND LOST" in err
    # The recording is readable to the end and ends with the proxy's own EIO answers.
    an = exchanges(run.record)
    replied = [ex for ex in an.exchanges if ex.reply is not None]
    assert replied[-1].errname == "EIO"
    assert any("back-end lost" in " ".join(ex.notes) for ex in an.exchanges)


def test_two_control_clients(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    """One client never reads (its overflow counter rises); the other gets the snapshot plus the live stream."""
    ctrl = tmp_path / "ctrl.sock"
    with proxy_in_front(guest_share, tmp_path, extra=("--control", str(ctrl))) as run:
        deadline = time.monotonic() + 10
        while not ctrl.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert ctrl.stat().st_mode & 0o777 == 0o600
        stuck = socket.socket(socket.AF_UNIX)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(str(ctrl))
        reader = socket.socket(socket.AF_UNIX)
        reader.connect(str(ctrl))
        lines: list[dict[str, Any]] = []

        def read_all() -> None:
            buf = b""
            while True:
                chunk = reader.recv(1 << 16)
                if not chunk:
                    return
                buf += chunk
                *done, buf = buf.split(b"\n")
                lines.extend(json.loads(x) for x in done)

        t = threading.Thread(target=read_all, daemon=True)
        t.start()
        res = boot(guest_image, run, "storm", timeout=120, params={"n": 1500})
        assert res.ok, explain(res)
        s = run.summary()
        t.join(10)
        stuck.close()
        reader.close()
    # protocol 2 (the debugger's commands); this client speaks version 1: it sends nothing and still gets all
    assert lines[0]["type"] == "hello" and lines[0]["version"] == 2 and 1 in lines[0]["versions"]
    assert lines[1]["type"] == "snapshot" and "inodes" in lines[1]
    live = [x for x in lines if x["type"] == "exchange"]
    # Requests in flight: one still open when its batch went out was announced, same number, before its
    # exchange (one answered by then comes as its exchange alone); none is announced after it completed.
    announced: set[int] = set()
    finished: set[int] = set()
    for x in lines:
        if x["type"] == "request":
            assert x["n"] not in finished and x["state"] in ("pending", "held"), x
            announced.add(x["n"])
        elif x["type"] == "exchange" and x["opcode"] not in NO_REPLY and x["reply"] is not None:
            finished.add(x["n"])
    assert announced and announced <= finished, len(announced - finished)
    assert [x["n"] for x in live] and len({x["n"] for x in live}) == len(live)
    assert not [x for x in lines if x["type"] == "overflow"], "the reading client must not overflow"
    assert len(live) == s["requests"], (len(live), s["requests"])
    assert {x["opcode"] for x in live} >= {"INIT", "CREATE", "LOOKUP", "UNLINK"}
    missed = sorted(c["missed"] for c in s["control_clients"])
    assert missed[-1] > 0, s["control_clients"]
    assert any(x["type"] == "event" and x["kind"] == "end" for x in lines)


def test_libvirt_wrapper_mode(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    """virtiofsd's own options: the proxy starts the C virtiofsd behind itself (libvirt <binary path>)."""
    caps = subprocess.run([sys.executable, "-m", "fsinspect", "proxy", "--print-capabilities"], capture_output=True,
                          text=True, check=True)
    assert json.loads(caps.stdout) == {"type": "fs"}
    with launcher.short_tmpdir() as work:
        sock = work / "vfs.sock"
        proc = subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", f"--socket-path={sock}",
                                 "-o", f"source={guest_share.root},cache=auto", "-o", "announce_submounts",
                                 "--record", str(tmp_path / "rec.pcapng"), "--summary-json", str(tmp_path / "s.json")],
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while not sock.exists():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            res = launcher.run_guest(sock, image=guest_image, workload="submounts", watch=[proc], timeout=90)
            proc.wait(15)
        finally:
            launcher.stop_process(proc)
    assert res.ok, explain(res)
    assert len(set(res.st_dev.values())) == 3, res.st_dev
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["requests"] > 10 and {x["name"] for x in s["submounts"]} == {"sub", "inner"}


@contextmanager
def bundled_daemon(share: Share, work: Path, out: Path, extra: tuple[str, ...] = ()) -> Iterator[launcher.RunningBackend]:
    """`fsinspect daemon --socket-path` (the bundled vhost-user back-end) serving `share`; counters to out."""
    sock = work / "daemon.sock"
    proc = subprocess.Popen([sys.executable, "-m", "fsinspect", "daemon", f"--socket-path={sock}",
                             "-o", f"source={share.root},cache=auto,announce_submounts,xattr",
                             "--summary-json", str(out / "daemon.json"), *extra],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the daemon never listened"
            time.sleep(0.02)
        yield launcher.RunningBackend(sock, [proc], "fsinspect daemon")
    finally:
        launcher.stop_process(proc)


def start_proxy(listen: Path, be: launcher.RunningBackend, record: Path, summary: Path,
                *extra: str) -> subprocess.Popen[bytes]:
    """`fsinspect proxy` from `listen` to the back-end `be`, recording; returns once it listens."""
    proxy = subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(listen),
                              "--backend", str(be.socket_path), "--record", str(record),
                              "--summary-json", str(summary), *extra],
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not listen.exists():
        if proxy.poll() is not None or time.monotonic() > deadline:
            launcher.stop_process(proxy)
            raise AssertionError("proxy never listened")
        time.sleep(0.02)
    return proxy


def test_full_workload_through_proxy_to_bundled_daemon(guest_image: GuestImage, guest_share: Share,
                                                       tmp_path: Path) -> None:
    """The proxy in front of the bundled daemon: the recording's per-opcode counts equal the daemon's own."""
    with launcher.short_tmpdir() as work, bundled_daemon(guest_share, work, tmp_path) as be:
        listen = work / "proxy.sock"
        proxy = start_proxy(listen, be, tmp_path / "rec.pcapng", tmp_path / "summary.json")
        try:
            res = launcher.run_guest(listen, image=guest_image, workload="full", timeout=240,
                                     watch=[proxy, *be.processes], params={"xattr": 1, "n": 1000})
            proxy.wait(15)
            daemon = be.processes[0]
            assert isinstance(daemon, subprocess.Popen)
            assert daemon.wait(15) == 0, "the daemon did not end cleanly when the proxy disconnected"
        finally:
            launcher.stop_process(proxy)
    assert res.ok, explain(res)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["capture"]["dropped"] == 0 and s["capture_errors"] == 0 and s["lints"] == [], s
    counters = json.loads((tmp_path / "daemon.json").read_text())
    an = exchanges(tmp_path / "rec.pcapng")
    recorded: Counter[str] = Counter(ex.opname for ex in an.exchanges)
    for ex in an.exchanges:
        if ex.opname not in NO_REPLY:
            assert ex.replied and ex.reply is not None, f"{ex.opname} unique {ex.unique} has no reply"
    assert recorded == Counter(counters["ops"]), (recorded - Counter(counters["ops"]),
                                                  Counter(counters["ops"]) - recorded)
    assert counters["dropped"] == 0 and sum(recorded.values()) > 10_000
    assert counters["queues"]["0"]["chains"] == recorded["FORGET"]
    # SUBMOUNT flags and one SYNCFS per superblock, as the proxy sees them from the bundled daemon.
    announced = {a.name for a in an.submounts.announced.values()}
    assert announced == {b"sub", b"inner"}, announced
    assert len({r.nodeid for r in an.submounts.syncfs}) == 3
