"""The debugger's acceptance on the real guest (QEMU 7.2 + Linux 6.1) through `fsinspect proxy` in front of
the real C virtiofsd: command-line --inject rules, and a breakpoint driven by a script over the control
socket (fsinspect.intercept.client).  The guest's side is the `dbg_*` workloads (guest/workloads/debugger.sh);
the back-end's own -d log is its counters."""

from __future__ import annotations

import errno
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dissectors.spec import fuse as fspec
from fsinspect.guest import launcher
from fsinspect.guest.build import GuestImage
from fsinspect.guest.console import Event, GuestResult
from fsinspect.guest.share import Share
from fsinspect.intercept.client import ControlClient
from fsinspect.recording import format as fmt
from fsinspect.recording.reader import RecordingReader
from tests.guest_fixtures import explain
from tests.test_proxy_e2e import boot, bundled_daemon, exchanges, proxy_in_front

pytestmark = [pytest.mark.guest, pytest.mark.root]


def _metric(res: GuestResult, name: str) -> dict[str, str]:
    assert name in res.metrics, explain(res)
    return res.metrics[name]


def _flags(rec: Path) -> list[tuple[bool, int, int, int]]:
    """(inbound, opcode or error, unique, flags) of every FUSE record."""
    out = []
    with RecordingReader(rec) as r:
        for x in r:
            if x.is_fuse and len(x.data) >= 16:
                code = int.from_bytes(x.data[4:8], "little", signed=not x.inbound)
                out.append((x.inbound, code, int.from_bytes(x.data[8:16], "little"), x.flags))
    return out


def test_lookup_answered_enoent_for_a_file_that_exists(guest_image: GuestImage, guest_share: Share,
                                                       tmp_path: Path) -> None:
    (guest_share.root / "victim").write_text("I exist\n")
    (guest_share.root / "bystander").write_text("me too\n")
    rule = ("--inject", 'op == LOOKUP and name == "victim"', "errno=ENOENT")
    with proxy_in_front(guest_share, tmp_path, debug_log=True, extra=rule) as run:
        res = boot(guest_image, run, "dbg_enoent")
    assert res.status == "ok", explain(res)
    assert _metric(res, "dbg-victim") == {"rc": "1", "err": "No_such_file_or_directory"}
    assert _metric(res, "dbg-listed") == {"victim": "1"}  # READDIR shows it: only its LOOKUP is answered
    log = (tmp_path / "backend.log").read_text()
    assert "name=bystander)" in log
    assert "name=victim)" not in log  # the back-end never saw that LOOKUP
    an = exchanges(run.record)
    victims = [e for e in an.exchanges if e.opname == "LOOKUP" and b"victim" in e.names()]
    assert victims and all(e.error == errno.ENOENT for e in victims)
    assert all(any("answered by the debugger" in n for n in e.notes) for e in victims)
    recs = _flags(run.record)
    for e in victims:  # the recording marks the exchange: the request held, the reply injected
        (req_flags,) = [f for inbound, _, u, f in recs if inbound and u == e.unique]
        (rep_flags,) = [f for inbound, _, u, f in recs if not inbound and u == e.unique]
        assert req_flags & fmt.RF_HELD and rep_flags & fmt.RF_INJECTED
    assert run.summary()["holds"]["answered"] == len(victims)


def _inner_nodeid(rec: Path) -> int:
    an = exchanges(rec)
    (ex,) = [e for e in an.exchanges if e.opname == "LOOKUP" and e.names() == [b"inner"]][:1]
    return int(ex.reply.args["entry"].nodeid)  # type: ignore[union-attr]


def test_syncfs_eio_on_one_submount(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    """Find sub/inner's nodeid in a first recording, then fail SYNCFS on it only (the README tour)."""
    (tmp_path / "learn").mkdir()
    with proxy_in_front(guest_share, tmp_path / "learn") as run:
        res = boot(guest_image, run, "dbg_syncfs")
    assert res.status == "ok", explain(res)
    inner = _inner_nodeid(run.record)
    rule = ("--inject", f"op == SYNCFS and nodeid == {inner}", "errno=EIO")
    with proxy_in_front(guest_share, tmp_path, debug_log=True, extra=rule) as run:
        res = boot(guest_image, run, "dbg_syncfs")
    assert res.status == "ok", explain(res)
    assert _inner_nodeid(run.record) == inner  # the C virtiofsd numbers nodeids in lookup order
    m = {k: v for k, v in res.metrics.items() if k.startswith("dbg-syncfs")}
    print("guest sync -f results:", m, "sync:", res.metrics.get("dbg-sync"))
    assert m["dbg-syncfs-"]["rc"] == "0" and m["dbg-syncfs-_sub"]["rc"] == "0"
    # What Linux 6.1 returns for a FUSE_SYNCFS answered EIO: syncfs(2) fails with EIO.
    assert m["dbg-syncfs-_sub_inner"] == {"rc": "1", "err": "Input_output_error"}
    log = (tmp_path / "backend.log").read_text()
    synced = {int(x) for x in re.findall(r"lo_do_syncfs\(ino=(\d+)\)", log)}
    assert inner not in synced and 1 in synced and len(synced) == 2, synced  # the other two superblocks synced
    an = exchanges(run.record)
    failed = {e.nodeid for e in an.exchanges if e.opname == "SYNCFS" and e.error == errno.EIO}
    assert failed == {inner}


def test_getattr_delayed_once(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    """count=1: the recording says which GETATTR the rule delayed (one, held 300 ms or more), and the guest's
    slowest stat waited that long.  (How fast the other stats were is the loaded host's business: a bound
    on their wall time, 150 ms for a fork+exec+stat in a TCG guest, failed under load with nothing wrong.)"""
    (guest_share.root / "bystander").write_text("x")
    rule = ("--inject", "op == GETATTR and nodeid != 1", "delay=300ms", "count=1")
    with proxy_in_front(guest_share, tmp_path, cache="none", extra=rule) as run:
        res = boot(guest_image, run, "dbg_delay", params={"n": 8})
    assert res.status == "ok", explain(res)
    times = sorted(int(v) for v in _metric(res, "dbg-delay").values())  # centiseconds
    print("stat times (cs):", times)
    assert len(times) == 8 and times[-1] >= 30, times  # one stat waited for the delayed GETATTR
    an = exchanges(run.record)
    getattrs = [e for e in an.exchanges if e.opname == "GETATTR" and e.nodeid != 1]
    delayed = [e for e in getattrs if "held by the debugger" in e.notes]
    assert len(getattrs) >= 8 and len(delayed) == 1, [(e.n, e.notes) for e in getattrs]  # once, not more
    assert delayed[0].latency_ns is not None and delayed[0].latency_ns >= 300_000_000, delayed[0].latency_ns
    assert all(e.error == 0 and e.replied for e in getattrs)


def test_breakpoint_driven_by_a_script(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    """The script holds MKDIR; the guest's mkdir waits while its stats are served; release completes it,
    and the second mkdir is answered EACCES."""
    (guest_share.root / "bystander").write_text("x")
    (guest_share.root / "dbg").mkdir()
    seen: dict[str, float] = {}
    got = threading.Condition()

    def on_event(ev: Event) -> None:
        key = f"{ev.kind} {ev.rest.split('=')[0]}" if ev.kind == "metric" else f"{ev.kind} {ev.rest}"
        with got:
            seen.setdefault(key, time.monotonic())
            got.notify_all()

    def wait_event(key: str, timeout: float = 60) -> float:
        with got:
            assert got.wait_for(lambda: any(k.startswith(key) for k in seen), timeout), (key, seen)
            return next(v for k, v in seen.items() if k.startswith(key))

    result: list[Any] = []
    with launcher.short_tmpdir() as sockdir:
        ctl = sockdir / "ctl.sock"
        with proxy_in_front(guest_share, tmp_path, extra=("--control", str(ctl))) as run, \
                ControlClient(str(ctl), timeout=60) as c:  # waits for the socket
            rid = c.add_rule("op == MKDIR")
            t = threading.Thread(target=lambda: result.append(boot(guest_image, run, "dbg_break",
                                                                   on_event=on_event, timeout=180)))
            t.start()
            try:
                held = c.wait_held(lambda m: m["opcode"] == "MKDIR", timeout=120)
                t_held = time.monotonic()
                assert held["request"]["args"]["name"] == "released"
                assert t_held - wait_event("dbg-mkdir-started released") < 1.0
                wait_event("metric dbg-break-released")  # the guest stat others while mkdir waits
                c.release(held["n"])
                held = c.wait_held(lambda m: m["opcode"] == "MKDIR", timeout=60)
                assert held["request"]["args"]["name"] == "answered"
                wait_event("metric dbg-break-answered")
                assert c.answer(held["n"], errno="EACCES")["how"] == "answered"
                c.remove_rule(rid)
            finally:
                c.continue_all()
                t.join(200)
    (res,) = result
    assert res.status == "ok", explain(res)
    assert _metric(res, "dbg-break-released") == {"served": "5", "pending": "1"}
    assert _metric(res, "dbg-mkdir-released") == {"rc": "0", "err": "", "isdir": "1"}
    assert _metric(res, "dbg-break-answered") == {"served": "5", "pending": "1"}
    assert _metric(res, "dbg-mkdir-answered") == {"rc": "1", "err": "Permission_denied", "isdir": "0"}
    assert (guest_share.root / "dbg" / "released").is_dir() and not (guest_share.root / "dbg" / "answered").exists()
    mkdirs = [e for e in exchanges(run.record).exchanges if e.opname == "MKDIR"]
    assert [(e.names(), e.error) for e in mkdirs] == [([b"released"], 0), ([b"answered"], errno.EACCES)]


def test_read_reply_rewritten_to_eio_once(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    """cache=none (FOPEN_DIRECT_IO): through the page cache, Linux retries a failed readahead page by page,
    so one READ answered EIO never reaches the reader (seen with cache=auto: the next READ, 4 KiB, succeeds);
    and busybox cat retries a failed sendfile with read(), so the guest reads with dd."""
    (guest_share.root / "data").write_bytes(bytes(range(256)) * 20)
    rule = ("--inject", "op == READ", "reply-errno=EIO", "count=1")
    with proxy_in_front(guest_share, tmp_path, cache="none", extra=rule) as run:
        res = boot(guest_image, run, "dbg_read")
    assert res.status == "ok", explain(res)
    assert _metric(res, "dbg-read-1") == {"rc": "1", "err": "Input_output_error"}
    assert _metric(res, "dbg-read-2") == {"rc": "0", "size": "5120"}
    read = fspec.OPCODE_BY_NAME["READ"].value
    recs = _flags(run.record)
    reads = [u for inbound, op, u, _ in recs if inbound and op == read]
    replies = [(code, f) for inbound, code, u, f in recs if not inbound and u == reads[0]]
    assert replies == [(-errno.EIO, fmt.RF_REWRITTEN)]  # recorded once, as the guest got it
    assert run.summary()["holds"]["rewritten"] == 1


def test_the_bundled_daemon_takes_the_same_rules(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    """`fsinspect daemon --socket-path` (vhost-user): the engine holds the request itself."""
    (guest_share.root / "victim").write_text("I exist\n")
    (guest_share.root / "bystander").write_text("me too\n")
    rec = tmp_path / "daemon.pcapng"
    rules = ("--inject", 'op == LOOKUP and name == "victim"', "errno=ENOENT", "--record", str(rec))
    with launcher.short_tmpdir() as work, bundled_daemon(guest_share, work, tmp_path, rules) as be:
        res = launcher.run_guest(be.socket_path, image=guest_image, workload="dbg_enoent", timeout=120,
                                 watch=be.processes, params={"xattr": 1})
        daemon = be.processes[0]
        assert daemon.wait(15) == 0  # type: ignore[union-attr]
    assert res.status == "ok", explain(res)
    assert _metric(res, "dbg-victim") == {"rc": "1", "err": "No_such_file_or_directory"}
    counters = json.loads((tmp_path / "daemon.json").read_text())
    victims = [e for e in exchanges(rec).exchanges if e.opname == "LOOKUP" and b"victim" in e.names()]
    assert victims and all(e.error == errno.ENOENT for e in victims)
    assert counters["debugger"]["answered"] == len(victims)
    lookups = sum(1 for e in exchanges(rec).exchanges if e.opname == "LOOKUP")
    assert counters["ops"]["LOOKUP"] == lookups - len(victims)  # the filesystem never saw those
    recs = _flags(rec)
    assert all(any(not inbound and u == e.unique and f & fmt.RF_INJECTED for inbound, _, u, f in recs)
               for e in victims)


@pytest.mark.parametrize("rule", [["--break", "op == MKDIR"], ["--inject", "op == MKDIR", "delay=120s"]],
                         ids=["breakpoint", "delay"])
def test_a_stop_signal_with_a_request_held_ends_the_vhost_user_daemon_promptly(
        guest_image: GuestImage, guest_share: Share, tmp_path: Path, rule: list[str]) -> None:
    """`fsinspect daemon --socket-path` with the guest's mkdir held by a breakpoint or a delay rule: SIGTERM
    ends it at once (the held request is answered EIO as its queue stops, not waited for), exits 0 without a
    traceback, and writes its summary; the guest then sees its back-end gone."""
    (guest_share.root / "bystander").write_text("x")
    (guest_share.root / "dbg").mkdir()
    started = threading.Event()

    def on_event(ev: Event) -> None:
        if ev.kind == "dbg-mkdir-started":
            started.set()

    result: list[Any] = []
    with launcher.short_tmpdir() as work:
        ctl = work / "ctl.sock"
        with bundled_daemon(guest_share, work, tmp_path, ("--control", str(ctl), *rule)) as be:
            daemon = be.processes[0]
            t = threading.Thread(target=lambda: result.append(launcher.run_guest(
                be.socket_path, image=guest_image, workload="dbg_break", timeout=180, watch=be.processes,
                on_event=on_event, params={"xattr": 1})))
            t.start()
            try:
                if rule[0] == "--break":
                    with ControlClient(str(ctl), timeout=60) as c:
                        c.wait_held(lambda m: m["opcode"] == "MKDIR", timeout=150)
                else:  # a delay announces nothing: the guest has started its mkdir, a second on it waits
                    assert started.wait(150), "the guest never started its mkdir"
                    time.sleep(1)
                    assert not (guest_share.root / "dbg" / "released").exists()
                t0 = time.monotonic()
                daemon.terminate()
                rc = daemon.wait(60)  # type: ignore[union-attr]
                took = time.monotonic() - t0
                stderr = daemon.stderr.read().decode() if daemon.stderr else ""  # type: ignore[union-attr]
            finally:
                t.join(200)
    assert rc == 0, stderr
    assert took < 10, f"the daemon took {took:.1f} s to stop"
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr
    assert not (guest_share.root / "dbg" / "released").exists()  # let go with EIO, never made
    counters = json.loads((tmp_path / "daemon.json").read_text())
    print(f"stopped in {took:.2f} s; debugger {counters['debugger']}")
    assert counters["debugger"]["held" if rule[0] == "--break" else "delayed"] == 1, counters["debugger"]
    (res,) = result
    assert res.status != "ok"  # the back-end went away under the guest
