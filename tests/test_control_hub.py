"""The control hub (fsinspect/live/hub.py) under clients that misbehave: commands, caps, budgets, fds."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fsinspect.guest.build import GuestImage
from fsinspect.guest.share import Share
from fsinspect.live.hub import Hub
from tests.daemon_client import EngineClient
from tests.guest_fixtures import explain


def _connect(path: str) -> socket.socket:
    """A client of the hub at `path` (which may still be starting in another process)."""
    deadline = time.monotonic() + 10
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            assert time.monotonic() < deadline, f"nothing listens on {path}"
            time.sleep(0.02)
            continue
        s.settimeout(10)
        return s


def _lines(s: socket.socket) -> Iterator[dict[str, Any]]:
    f = s.makefile("rb")
    for line in f:
        yield json.loads(line)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    h = Hub(str(tmp_path / "ctl.sock"), lambda: {"inodes": [], "stats": {}})
    yield h
    h.close(0.5)


def test_commands_reach_the_handler_and_each_gets_one_reply(hub: Hub) -> None:
    s = _connect(hub.path)
    it = _lines(s)
    assert next(it)["type"] == "hello" and next(it)["type"] == "snapshot"
    # No handler: a command with an id is refused in a reply; one without is ignored (version 1).
    s.sendall(b'{"cmd": "held"}\n{"id": 1, "cmd": "held"}\n')
    assert next(it) == {"type": "reply", "id": 1, "ok": False, "error": "this proxy takes no commands"}
    seen: list[tuple[int, dict[str, Any]]] = []

    def handler(cid: int, obj: dict[str, Any]) -> dict[str, Any]:
        seen.append((cid, obj))
        if obj["cmd"] == "boom":
            raise RuntimeError("broken handler")
        return {"type": "reply", "id": obj["id"], "ok": True, "n": len(seen)}

    hub.command_handler = handler
    s.sendall(b'{"id": 2, "cmd": "held"}\n{"id": 3, "cmd": "boom"}\nnot json\n[1, 2]\n{"id": 4, "cmd": "rules"}\n')
    assert next(it) == {"type": "reply", "id": 2, "ok": True, "n": 1}
    assert next(it) == {"type": "reply", "id": 3, "ok": False, "error": "internal error: broken handler"}
    assert next(it)["error"].startswith("not JSON")
    assert next(it) == {"type": "error", "error": "a command is a JSON object"}
    assert next(it) == {"type": "reply", "id": 4, "ok": True, "n": 3}
    assert [cid for cid, _ in seen] == [1, 1, 1] and seen[0][1] == {"id": 2, "cmd": "held"}
    # A line over the limit: one error line, then the hub closes the connection; memory did not follow it.
    s.sendall(b"x" * (hub.max_line + 10))
    assert next(it) == {"type": "error", "error": f"a line longer than {hub.max_line} bytes: disconnecting"}
    assert s.recv(10) == b""
    assert not hub.clients
    s.close()


def test_a_client_that_sends_commands_but_never_reads_is_not_read_either(hub: Hub) -> None:
    """Every command gets a reply, and replies are never dropped: so once a client's replies fill its budget
    the hub stops reading its commands until it reads (memory stays bounded, the client just blocks)."""
    hub.command_handler = lambda cid, obj: {"type": "reply", "id": obj.get("id"), "ok": True, "pad": "x" * 1000}
    s = _connect(hub.path)
    s.setblocking(False)
    line = b'{"id": 1, "cmd": "held"}\n'
    chunk = line * 4096
    sent = 0
    last = time.monotonic()
    while time.monotonic() - last < 1.0 and sent < 400 << 20:  # until the hub has stopped reading for 1 s
        try:
            sent += s.send(chunk)
            last = time.monotonic()
        except BlockingIOError:
            time.sleep(0.05)
    queued = hub.total_queued
    assert sent < 400 << 20, "the hub kept reading commands whose replies nobody reads"
    assert queued < hub.client_bytes + (8 << 20), f"{queued >> 20} MiB of replies queued"
    s.close()


def test_a_failing_snapshot_refuses_that_client_and_the_hub_goes_on(tmp_path: Path) -> None:
    calls = []

    def snapshot() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("inode 7")
        return {}

    h = Hub(str(tmp_path / "ctl.sock"), snapshot)
    try:
        first = _connect(h.path)
        assert next(_lines(first)) == {"type": "error", "error": "no snapshot: KeyError: 'inode 7'"}
        second = _connect(h.path)
        assert next(_lines(second))["type"] == "hello"
        first.close()
        second.close()
    finally:
        h.close(0.5)


def test_a_client_that_connects_before_the_source_is_assembled_gets_the_assembled_hello(tmp_path: Path) -> None:
    """The proxy and the daemon make the hub, then add the debugger (whose command handler makes the
    protocol version 2).  A client that connected in between got a version-1 hello (CI caught a script
    that checks it); now it waits in the backlog until the source opens the hub."""
    h = Hub(str(tmp_path / "ctl.sock"), dict, accept_clients=False)
    try:
        early = _connect(h.path)  # the socket exists and takes the connection into its backlog
        early.settimeout(0.3)
        with pytest.raises(TimeoutError):
            early.recv(1)  # not accepted yet: no hello before the source is assembled
        h.command_handler = lambda client, obj: {"ok": True}
        h.protocol_version = 2
        h.open_clients()
        early.settimeout(5)
        hello = next(_lines(early))
        assert hello["type"] == "hello" and hello["version"] == 2 and hello["versions"] == [1, 2]
        early.close()
    finally:
        h.close(0.5)


def test_client_cap_refuses_the_rest_with_a_message(tmp_path: Path) -> None:
    h = Hub(str(tmp_path / "ctl.sock"), lambda: {}, max_clients=3)
    try:
        kept = [_connect(h.path) for _ in range(3)]
        for s in kept:
            assert next(_lines(s))["type"] == "hello"
        extra = _connect(h.path)
        msg = json.loads(extra.makefile("rb").readline())
        assert msg == {"type": "error", "error": "too many control clients (3 attached): try again later"}
        assert extra.recv(10) == b""
        assert len(h.clients) == 3 and h.refused == 1
        kept[0].close()
        deadline = time.monotonic() + 5
        while len(h.clients) > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        again = _connect(h.path)  # a place freed up
        assert next(_lines(again))["type"] == "hello"
        for s in [*kept[1:], extra, again]:
            s.close()
    finally:
        h.close(0.5)


# -- exhaustion (issue 17 items 4 and 9) ------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


class _Daemon:
    """The daemon engine with its control tap (as `fsinspect daemon --control` runs it), driven directly."""

    def __init__(self, tmp_path: Path) -> None:
        from daemon.passthrough import Options, PassthroughFS
        from daemon.server import Server
        from fsinspect.live.engine import EngineSource

        self.share = tmp_path / "share"
        self.share.mkdir()
        self.tap = EngineSource(control=str(tmp_path / "ctl.sock"))
        self.server: Server | None = Server(PassthroughFS(Options(str(self.share))), tap=self.tap)
        self.client = EngineClient(self.server)
        self.client.init()
        self.socks: list[socket.socket] = []

    def attach(self, n: int) -> list[socket.socket]:
        """`n` more control clients (that never read), once the hub has taken them all in."""
        want = len(self.tap.hub.clients) + n
        new = [_connect(self.tap.hub.path) for _ in range(n)]
        self.socks += new
        deadline = time.monotonic() + 120
        while len(self.tap.hub.clients) < want:
            assert time.monotonic() < deadline, f"{len(self.tap.hub.clients)} of {want} attached"
            time.sleep(0.01)
        return new

    def close(self) -> None:
        if self.server is None:
            return
        self.tap.close()
        for s in self.socks:
            s.close()
        self.server.shutdown()
        self.server = None


@pytest.fixture
def dmn(tmp_path: Path) -> Iterator[_Daemon]:
    d = _Daemon(tmp_path)
    yield d
    d.close()


def test_stuck_client_and_200_mib_of_writes_keep_memory_flat(dmn: _Daemon) -> None:
    """A client that never reads, while 1 MiB WRITEs go through the daemon: its queue is bounded in bytes,
    and what the hub keeps for the next snapshot is too (before: +900 MB, and +1.5 GB after it left)."""
    tap, client = dmn.tap, dmn.client
    (stuck,) = dmn.attach(1)
    nodeid, fh = client.create(1, b"big")
    data = os.urandom(1 << 20)
    for _ in range(20):  # warm up: the allocator, the backlog, the stuck client's socket buffer
        client.write(nodeid, fh, data)
    base = _rss()
    peak = 0
    for _ in range(200):
        client.write(nodeid, fh, data)
        peak = max(peak, _rss())
    stuck.close()
    for _ in range(20):
        client.write(nodeid, fh, data)
    assert peak - base < 48 << 20, f"RSS grew by {(peak - base) >> 20} MiB with a stuck client"
    assert _rss() - base < 48 << 20, f"RSS grew by {(_rss() - base) >> 20} MiB after it left"
    # The exchanges themselves went through whole and were published (cut at LIVE_SNAPLEN).
    assert tap.requests >= 241 and tap.hub.backlog()[-1]["request_len"] > (1 << 20)


def test_200_idle_clients_cost_no_cpu_and_the_data_path_keeps_its_speed(dmn: _Daemon) -> None:
    """200 clients that attach and then do nothing: LOOKUPs go about as fast as with one, and once the
    traffic stops the process sleeps (before: 0 LOOKUPs/s at 100% CPU)."""
    tap, client = dmn.tap, dmn.client
    (dmn.share / "f").write_text("x")

    def measure(n: int = 1500) -> tuple[float, float]:
        """(LOOKUPs per second, process CPU seconds per LOOKUP), the best of five runs: the machine is shared."""
        runs = []
        for _ in range(5):
            t0, cpu0 = time.perf_counter(), _cpu()
            for _ in range(n):
                client.lookup(1, b"f")
            runs.append((n / (time.perf_counter() - t0), (_cpu() - cpu0) / n))
        return max(r for r, _ in runs), min(c for _, c in runs)

    dmn.attach(1)  # one client: the price of a live view at all (analysis, JSON)
    for _ in range(300):
        client.lookup(1, b"f")
    alone, alone_cpu = measure()
    dmn.attach(199)
    watched, watched_cpu = measure()
    time.sleep(0.5)  # the hub hands out what it still holds
    cpu = _cpu()
    time.sleep(3)
    spent = _cpu() - cpu
    # 2x, not 1.5x: under a loaded CI machine the best of five measured 1.54x once (1.0-1.3x when quiet);
    # the old hub's cost was unbounded (0 LOOKUPs/s at 100% CPU), so 2x still catches it.
    assert watched_cpu < 2.0 * alone_cpu, \
        f"{watched_cpu * 1e6:.0f} µs of CPU per LOOKUP with 200 idle clients, {alone_cpu * 1e6:.0f} with one"
    # CPU per request is the measure that other engineers' load on this machine does not move much; the
    # rate is checked loosely (the hub thread's CPU competes with the data path's for the GIL: before, the
    # rate fell to a fifth here and to 0 in the probe).
    assert watched > 0.3 * alone, f"{watched:.0f} LOOKUP/s with 200 idle clients, {alone:.0f} with one"
    assert spent < 0.3, f"{spent:.2f} s of CPU in 3 s with 200 idle clients and no traffic"
    assert len(tap.hub.clients) == 200


def test_client_fds_past_1024_work(tmp_path: Path) -> None:
    """select() cannot watch fd 1024 and up (before: ValueError in a loop at 100% CPU, nobody served)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if soft != resource.RLIM_INFINITY else soft, hard))
    pad = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(1030)]
    h = None
    try:
        h = Hub(str(tmp_path / "ctl.sock"), lambda: {})
        s = _connect(h.path)
        s.settimeout(5)
        assert s.fileno() >= 1024
        it = _lines(s)
        assert next(it)["type"] == "hello" and next(it)["type"] == "snapshot"
        h.publish_event("x", {})
        assert next(it)["kind"] == "x"
        cpu = _cpu()
        time.sleep(1)
        assert _cpu() - cpu < 0.2
        s.close()
    finally:
        if h is not None:
            h.close(0.5)
        for fd in pad:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_1008_clients_come_and_go_then_the_hub_sleeps(hub: Hub) -> None:
    """The probe's proxy case: 1,008 clients at once, then all close; 256 were served, the rest told why,
    and afterwards the hub costs nothing (before: 100% CPU for good once an fd passed 1023)."""
    socks = [_connect(hub.path) for _ in range(1008)]
    firsts = [json.loads(s.makefile("rb").readline()) for s in socks]
    assert sum(1 for m in firsts if m["type"] == "hello") == 256
    assert all(m == {"type": "error", "error": "too many control clients (256 attached): try again later"}
               for m in firsts if m["type"] != "hello")
    for s in socks:
        s.close()
    deadline = time.monotonic() + 10
    while hub.clients:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cpu = _cpu()
    time.sleep(1)
    assert _cpu() - cpu < 0.1
    again = _connect(hub.path)
    assert next(_lines(again))["type"] == "hello"
    again.close()


def test_out_of_fds_the_hub_waits_instead_of_spinning(tmp_path: Path) -> None:
    """accept() failing with EMFILE leaves the listener readable: the hub must not poll it in a loop. A hub
    in a process with a low fd limit: clients past the limit wait, the process sleeps, and they are served
    once fds free up."""
    import subprocess
    import sys

    path = tmp_path / "ctl.sock"
    script = (
        "import resource, sys, time\n"
        "from fsinspect.live.hub import Hub\n"
        f"h = Hub({str(path)!r}, lambda: {{}})\n"
        "import os\n"
        "n = len(os.listdir('/proc/self/fd'))\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (n + 3, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "sys.stdin.readline()\n"
        "h.close(0.5)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    socks: list[socket.socket] = []
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == "ready"
        socks = [_connect(str(path)) for _ in range(8)]  # the first few get fds, the rest cannot be accepted
        time.sleep(0.5)

        def cpu() -> float:
            with open(f"/proc/{p.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before = cpu()
        time.sleep(2)
        spent = cpu() - before
        assert spent < 0.1, f"{spent:.2f} s of CPU in 2 s while out of fds"
        p.stdin.write("more fds\n")
        p.stdin.flush()
        for s in socks:  # everyone is served in the end
            assert next(_lines(s))["type"] == "hello"
        p.stdin.write("stop\n")
        p.stdin.flush()
        assert p.wait(10) == 0, p.communicate()[1]
        assert "cannot accept a client: Too many open files" in p.communicate()[1]
    finally:
        for s in socks:
            s.close()
        if p.poll() is None:
            p.kill()
            p.wait()


def test_snapshots_count_against_the_byte_budget(dmn: _Daemon) -> None:
    """150 clients attach and never read while the backlog is full of 16 KiB WRITEs: each snapshot fits
    its client's budget, so memory stays bounded (before: the proxy reached 4.5 GB)."""
    tap, client = dmn.tap, dmn.client
    nodeid, fh = client.create(1, b"f")
    data = os.urandom(32 << 10)
    for _ in range(500):
        client.write(nodeid, fh, data)
    base = _rss()
    dmn.attach(150)
    grew = _rss() - base
    assert grew < 160 << 20, f"RSS grew by {grew >> 20} MiB for 150 snapshots"
    assert tap.hub.total_queued <= (64 << 20) + 150 * (256 << 10)
    # A client that reads gets a snapshot whose backlog is the newest exchanges that fit.
    (late,) = dmn.attach(1)
    it = _lines(late)
    assert next(it)["type"] == "hello"
    snap = next(it)
    assert snap["backlog_dropped"] > 0 and len(snap["exchanges"]) > 0
    assert snap["exchanges"][-1]["unique"] == tap.hub.recent[-1].unique


def test_sending_does_not_copy_what_is_left(tmp_path: Path) -> None:
    """A 24 MiB snapshot to a slow reader: each partial send advances a view; `pending[n:]` copied the
    rest every time (24 MiB, then 23.9, ...)."""
    import tracemalloc

    big = "x" * (24 << 20)
    h = Hub(str(tmp_path / "ctl.sock"), lambda: {"inodes": [{"name": big}]})
    tracemalloc.start()
    try:
        s = _connect(h.path)
        got = s.recv(4096)
        assert got.startswith(b'{"type": "hello"')
        now = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        total = len(got)
        while not got.endswith(b"}\n"):
            got = s.recv(256 << 10)
            assert got
            total += len(got)
        peak = tracemalloc.get_traced_memory()[1]
        assert total > 24 << 20
        assert peak - now < 4 << 20, f"{(peak - now) >> 20} MiB allocated while sending"
        s.close()
    finally:
        tracemalloc.stop()
        h.close(0.5)


def test_a_stuck_client_does_not_hold_the_exit(dmn: _Daemon) -> None:
    """At exit the hub flushes to clients that read (they get the end), not to one that never reads
    (before: the daemon waited 2 s + 3 s for it)."""
    import threading

    dmn.attach(1)
    (reader,) = dmn.attach(1)  # this one reads: what follows is live
    got: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: got.extend(_lines(reader)), daemon=True)
    t.start()
    nodeid, fh = dmn.client.create(1, b"f")
    data = os.urandom(1 << 20)
    for _ in range(16):
        dmn.client.write(nodeid, fh, data)
    t0 = time.monotonic()
    dmn.close()
    took = time.monotonic() - t0
    t.join(5)
    assert took < 1.0, f"closing took {took:.1f} s with a client that does not read"
    assert got[-1] == {"type": "event", "kind": "end", "detail": {"reason": "front-end closed"}}
    assert sum(1 for m in got if m["type"] == "exchange") == 17  # CREATE and 16 WRITEs (INIT came before it attached)


# -- the same, through a real guest and the `fsinspect daemon` process ----------------------------------------
def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.guest
@pytest.mark.root
def test_guest_writes_200_mib_past_a_stuck_and_200_idle_control_clients(guest_image: GuestImage,
                                                                          guest_share: Share) -> None:
    """The probe's case: `fsinspect daemon --control`, one client that never reads and 200 idle ones, and
    the guest dd-writes 200 MiB in 1 MiB WRITEs (cache=none). The daemon's peak RSS stays near its start
    (before: 43 -> 929 MB) and the guest's I/O completes with the same bytes."""
    import subprocess
    import sys
    import threading

    from fsinspect.guest import launcher

    with launcher.short_tmpdir() as work:
        sock, ctl, log = work / "vfs.sock", work / "ctl.sock", work / "daemon.log"
        with open(log, "wb") as logf:
            p = subprocess.Popen([sys.executable, "-m", "fsinspect", "daemon", f"--socket-path={sock}",
                                  "-o", f"source={guest_share.root},cache=none", "--thread-pool-size=4",
                                  "--control", str(ctl)],
                                 stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        clients: list[socket.socket] = []
        try:
            deadline = time.monotonic() + 15
            while not sock.exists():
                assert p.poll() is None, log.read_text()
                assert time.monotonic() < deadline
                time.sleep(0.02)
            clients = [_connect(str(ctl)) for _ in range(201)]  # none of them reads
            time.sleep(1)
            start_kb = _status_kb(p.pid, "VmRSS")
            peak_kb = [start_kb]
            done = threading.Event()

            def sample() -> None:  # VmHWM only grows: the last read is the peak so far
                while not done.wait(0.2):
                    try:
                        peak_kb.append(_status_kb(p.pid, "VmHWM"))
                    except (OSError, KeyError):
                        return

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            res = launcher.run_guest(sock, image=guest_image, workload="smoke,io", timeout=600, watch=[p],
                                     params={"io_mb": 200, "xattr": 0}, memory_mb=1536)
            done.set()
            sampler.join()
            assert p.wait(30) == 0, log.read_text()
        finally:
            for s in clients:
                s.close()
            launcher.stop_process(p)
    assert res.ok, explain(res)
    assert all(s.rc == 0 for s in res.steps), res.steps
    sums = res.verify_sums(guest_share.root)
    assert all(g == h for g, h in sums.values()) and "/mnt/.fsi-io.bin" in sums, sums
    assert (guest_share.root / ".fsi-io.bin").stat().st_size == 200 << 20
    assert len(peak_kb) > 10
    peak = max(peak_kb)
    print(f"daemon RSS: {start_kb >> 10} MiB with 201 clients attached, peak {peak >> 10} MiB over 200 MiB written")
    assert peak - start_kb < 96 << 10, f"daemon RSS {start_kb >> 10} MiB at start, peak {peak >> 10} MiB"
