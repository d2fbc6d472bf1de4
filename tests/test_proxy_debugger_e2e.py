"""Hold points on a real guest (issue 15): QEMU 7.2 + Linux 6.1 through the proxy (its Session, run in
this process so the test sets rules and gives verdicts on it directly) to the real C virtiofsd.

The guest (workload `script`, steps written to the share below) runs `mkdir` in the background while a
rule holds MKDIR, stats other files (served meanwhile), says `waiting`, then reports how its mkdir ended.
"""

from __future__ import annotations

import errno
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dissectors import fuse as F
from dissectors.ring import HOLD_REQUEST, HoldRule
from dissectors.spec import fuse as fuse_spec
from fsinspect.analysis.analyzer import Analyzer
from fsinspect.guest import launcher
from fsinspect.guest.build import GuestImage
from fsinspect.guest.console import Event, GuestResult
from fsinspect.guest.share import Share
from fsinspect.proxy.server import ProxyConfig
from fsinspect.proxy.session import Session, SessionOptions
from fsinspect.recording.reader import RecordingReader
from fsinspect.recording.replay import analyze
from tests.guest_fixtures import explain

pytestmark = [pytest.mark.guest, pytest.mark.root]
MKDIR = fuse_spec.OPCODE_BY_NAME["MKDIR"].value
HOLD_MKDIR = HoldRule(HOLD_REQUEST, opcodes=frozenset({MKDIR}))
FILES = 8

# The guest's side (sourced by the `script` workload; fsi_after picks the scenario).
SCRIPT = r"""
dbg_hold() {  # mkdir dbg/$1 in the background (the host holds it), then other requests meanwhile
    mkdir "$MNT/dbg/$1" 2>/tmp/mkdir.err &
    _pid=$!
    sleep 1
    _n=0
    while [ $_n -lt "$(param files 0)" ]; do  # by name, not by a glob: one LOOKUP each, no READDIRPLUS
        stat -c %s "$MNT/dbg-files/f$_n" >/dev/null || { mark check-fail "$STEP" "stat f$_n"; return 1; }
        _n=$((_n + 1))
    done
    if kill -0 $_pid 2>/dev/null; then _pending=1; else _pending=0; fi
    mark metric dbg served=$_n pending=$_pending
    mark waiting
}
dbg_run() {
    dbg_hold "$1" || return 1
    wait $_pid
    _rc=$?
    _err=$(sed 's/.*: //; s/[^A-Za-z]/_/g' /tmp/mkdir.err)
    mark metric dbg-mkdir rc=$_rc err=${_err:-none}
    [ "$(param after none)" = poweroff ] && return 0  # the share is gone with the proxy
    if [ -d "$MNT/dbg/$1" ]; then mark metric dbg-dir exists=1; else mark metric dbg-dir exists=0; fi
}
case "$(param after none)" in
poweroff)  # the proxy is gone by then: report and power off without a sync (it would ask the back-end)
    step dbg dbg_run new
    mark result ok
    mark done "$(now)"
    poweroff -n -f ;;
reboot)  # reboot with the MKDIR held; the second boot holds one more, which the host releases
    if [ -e "$MNT/dbg/booted" ]; then
        mark rebooted
        step dbg dbg_run again
    else
        touch "$MNT/dbg/booted"
        dbg_hold new
        reboot -f
        sleep 60
    fi ;;
*)
    step dbg dbg_run new ;;
esac
"""


@dataclass
class Debugged:
    session: Session
    listen: Path
    backend_log: Path
    backend: Any
    held: list[tuple[int, int, int, bytes, float]] = field(default_factory=list)
    resolved: list[tuple[int, int, int, str]] = field(default_factory=list)
    end: dict[str, Any] = field(default_factory=dict)


@contextmanager
def debugged_proxy(share: Share, out: Path, rules: list[HoldRule]) -> Iterator[Debugged]:
    """The C virtiofsd (with -d, so its own log counts what it saw) behind a Session with `rules`."""
    (share.root / "dbg").mkdir()
    (share.root / "dbg-files").mkdir()
    for i in range(FILES):
        (share.root / "dbg-files" / f"f{i}").write_text("x" * i)
    (share.root / ".fsi-dbg.sh").write_text(SCRIPT)
    with launcher.short_tmpdir() as work, launcher.virtiofsd(share.root, work, xattr=True,
                                                              extra_args=["-d"]) as be:
        s = Session(ProxyConfig(backend=str(be.socket_path)), SessionOptions(record=str(out / "rec.pcapng")))
        d = Debugged(s, work / "p.sock", out / "backend.log", be)
        s.on_held = lambda q, h, direction, raw, ts: d.held.append((q, h, direction, raw, time.monotonic()))
        s.on_resolved = lambda q, h, direction, how: d.resolved.append((q, h, direction, how))
        s.set_rules(rules)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(d.listen))
        listener.listen(1)
        listener.settimeout(60)

        def serve() -> None:
            try:
                frontend = s.proxy.accept_frontend(listener)
                d.end["reason"] = s.run(frontend, s.proxy.connect_backend())
            except Exception as e:  # surfaced by the test's asserts
                d.end["error"] = repr(e)
                s.proxy.shutdown()

        t = threading.Thread(target=serve, name="test-proxy", daemon=True)
        t.start()
        try:
            yield d
        finally:
            s.proxy.stop()
            t.join(15)
            listener.close()
            s.close()
            if be.log_path is not None and be.log_path.exists():
                d.backend_log.write_bytes(be.log_path.read_bytes())
            assert not t.is_alive(), "the proxy did not stop"


def boot(image: GuestImage, d: Debugged, on_waiting: Any, reboot: bool = False, **params: Any) -> GuestResult:
    def on_event(ev: Event) -> None:
        if ev.kind == "waiting":
            on_waiting()
    return launcher.run_guest(d.listen, image=image, workload="script", timeout=120, stall_timeout=0,
                              params={"script": ".fsi-dbg.sh", "files": FILES, **params}, on_event=on_event,
                              reboot=reboot)


def held_mkdir(d: Debugged, count: int = 1) -> tuple[int, int, bytes]:
    """The MKDIR held last (`count`: how many were held so far)."""
    (q, h, direction, raw, _t) = d.held[-1]
    assert len(d.held) == count and direction == HOLD_REQUEST and F.decode_request(raw).opname == "MKDIR", d.held
    return q, h, raw


def backend_saw(d: Debugged, op: str) -> int:
    return len(re.findall(rf"unique: \d+, opcode: {op} \(", d.backend_log.read_text(errors="replace")))


def recording(out: Path) -> Analyzer:
    with RecordingReader(out / "rec.pcapng") as r:
        return analyze(r, Analyzer(keep_exchanges=True))


def other_lints(an: Analyzer) -> list[Any]:
    """Lints, bar `stuck` on the MKDIR the test held on purpose."""
    return [x for x in an.lints if not (x.name == "stuck" and "MKDIR" in x.message)]


def served_while_held(an: Analyzer) -> int:
    """LOOKUPs of dbg-files/* asked and answered between the MKDIR's capture and its reply."""
    (mk,) = [e for e in an.exchanges if e.opname == "MKDIR"]
    return sum(1 for e in an.exchanges if e.opname == "LOOKUP" and e.request is not None
               and e.request.args.get("name", b"").startswith(b"f") and e.reply_ts is not None
               and mk.req_ts < e.req_ts and e.reply_ts < mk.reply_ts)


def test_breakpoint_on_mkdir_then_release(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    with debugged_proxy(guest_share, tmp_path, [HOLD_MKDIR]) as d:
        def release() -> None:
            q, h, _ = held_mkdir(d)
            assert d.session.held() == [(q, h, HOLD_REQUEST)]
            d.session.release(q, h)
        res = boot(guest_image, d, release)
    assert res.ok, explain(res)
    assert res.metrics["dbg"] == {"served": str(FILES), "pending": "1"}, res.metrics
    assert res.metrics["dbg-mkdir"]["rc"] == "0" and res.metrics["dbg-dir"] == {"exists": "1"}
    assert (guest_share.root / "dbg" / "new").is_dir()
    assert backend_saw(d, "MKDIR") == 1 and d.resolved == [] and "error" not in d.end, d.end
    an = recording(tmp_path)
    assert served_while_held(an) == FILES
    assert other_lints(an) == [] and all(e.reply_ts is not None for e in an.exchanges if e.opname != "FORGET")


def test_breakpoint_answered_eacces(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    with debugged_proxy(guest_share, tmp_path, [HOLD_MKDIR]) as d:
        def answer() -> None:
            q, h, raw = held_mkdir(d)
            d.session.answer(q, h, F.encode_reply("MKDIR", unique=F.decode_request(raw).unique, error=errno.EACCES))
        res = boot(guest_image, d, answer)
    assert res.ok, explain(res)
    assert res.metrics["dbg"]["pending"] == "1" and res.metrics["dbg-dir"] == {"exists": "0"}
    assert res.metrics["dbg-mkdir"] == {"rc": "1", "err": "Permission_denied"}, res.metrics
    assert not (guest_share.root / "dbg" / "new").exists()
    assert backend_saw(d, "MKDIR") == 0 and backend_saw(d, "LOOKUP") > 0  # the back-end never saw it
    an = recording(tmp_path)
    (mk,) = [e for e in an.exchanges if e.opname == "MKDIR"]
    assert mk.errname == "EACCES" and any("answered by the debugger" in n for n in mk.notes)
    assert other_lints(an) == []


def test_held_request_across_proxy_stop(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    """SIGTERM's handler is proxy.stop(): the proxy exits with a request held; the guest gets EIO for it
    (the safety rule) instead of hanging, and powers off by itself."""
    with debugged_proxy(guest_share, tmp_path, [HOLD_MKDIR]) as d:
        def stop() -> None:
            held_mkdir(d)
            d.session.proxy.stop()
        res = boot(guest_image, d, stop, after="poweroff")
    assert not res.timed_out and res.guest_result == "ok", explain(res)
    assert res.metrics["dbg-mkdir"] == {"rc": "1", "err": "Input_output_error"}, res.metrics
    assert [(how, direction) for _q, _h, direction, how in d.resolved] == [("answered", HOLD_REQUEST)]
    assert backend_saw(d, "MKDIR") == 0
    an = recording(tmp_path)
    (mk,) = [e for e in an.exchanges if e.opname == "MKDIR"]
    assert mk.errname == "EIO" and any("by the proxy: the queue stopped" in n for n in mk.notes)
    assert other_lints(an) == []


def test_held_request_across_guest_reboot(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    """The guest reboots with a MKDIR held: QEMU stops the queues (GET_VRING_BASE) and resets the device;
    the held request is answered EIO then, the device comes back, and the next boot's MKDIR is held and
    released like any other.  Nothing in the recording is left without its reply."""
    waits: list[float] = []
    with debugged_proxy(guest_share, tmp_path, [HOLD_MKDIR]) as d:
        def on_waiting() -> None:
            waits.append(time.monotonic())
            if len(waits) == 2:  # the second boot's MKDIR; the first one rides the reboot
                q, h, _ = held_mkdir(d, 2)
                d.session.release(q, h)
        res = boot(guest_image, d, on_waiting, reboot=True, after="reboot")
        summary = d.session.summary()
    assert res.ok, explain(res)
    assert len(waits) == 2 and res.metrics["dbg-mkdir"] == {"rc": "0", "err": "none"}, res.metrics
    assert (guest_share.root / "dbg" / "again").is_dir() and not (guest_share.root / "dbg" / "new").exists()
    assert [(direction, how) for _q, _h, direction, how in d.resolved] == [(HOLD_REQUEST, "answered")]
    assert summary["holds"]["safety"] == 1 and backend_saw(d, "MKDIR") == 1
    an = recording(tmp_path)
    mks = [e for e in an.exchanges if e.opname == "MKDIR"]
    assert [e.errname for e in mks] == ["EIO", None], [(e.errname, e.notes) for e in mks]
    assert len([e for e in an.exchanges if e.opname == "INIT"]) == 2  # two boots, one proxy
    assert all(e.reply_ts is not None for e in an.exchanges if e.opname not in ("FORGET", "BATCH_FORGET"))
    assert other_lints(an) == []


def test_held_request_across_backend_loss(guest_image: GuestImage, guest_share: Share, tmp_path: Path) -> None:
    """The back-end dies while a MKDIR is held: the held request is answered EIO with everything the
    back-end had in flight, new requests get EIO from the proxy, and the guest unmounts and powers off."""
    with debugged_proxy(guest_share, tmp_path, [HOLD_MKDIR]) as d:
        def kill_backend() -> None:
            held_mkdir(d)
            launcher.stop_process(d.backend.processes[0], grace=0)
        res = boot(guest_image, d, kill_backend)
        summary = d.session.summary()
    assert res.ok and res.unmounted and res.qemu_rc == 0, explain(res)
    assert res.metrics["dbg-mkdir"] == {"rc": "1", "err": "Input_output_error"}, res.metrics
    assert res.metrics["dbg-dir"] == {"exists": "0"}
    assert summary["backend_lost"] and summary["holds"]["safety"] == 1, summary["holds"]
    assert [(direction, how) for _q, _h, direction, how in d.resolved] == [(HOLD_REQUEST, "answered")]
    an = recording(tmp_path)
    (mk,) = [e for e in an.exchanges if e.opname == "MKDIR"]
    assert mk.errname == "EIO" and any("by the proxy: the queue stopped" in n for n in mk.notes)
    assert all(e.reply_ts is not None for e in an.exchanges if e.opname not in ("FORGET", "BATCH_FORGET"))


def test_cli_proxy_sigterm_with_a_breakpoint_held(guest_image: GuestImage, guest_share: Share,
                                                 tmp_path: Path) -> None:
    """`fsinspect proxy --break 'op == MKDIR'` gets SIGTERM while the MKDIR is held: it answers it EIO on
    its way out (the guest's mkdir fails instead of hanging) and says so in its summary and recording."""
    from tests.test_proxy_e2e import proxy_in_front

    (guest_share.root / "dbg").mkdir()
    (guest_share.root / "dbg-files").mkdir()
    for i in range(FILES):
        (guest_share.root / "dbg-files" / f"f{i}").write_text("x")
    (guest_share.root / ".fsi-dbg.sh").write_text(SCRIPT)
    ctl = tmp_path / "ctl.sock"
    with proxy_in_front(guest_share, tmp_path, extra=("--break", "op == MKDIR", "--control", str(ctl))) as run:
        def sigterm() -> None:
            run.proc.send_signal(signal.SIGTERM)
        res = launcher.run_guest(run.listen, image=guest_image, workload="script", timeout=120, stall_timeout=0,
                                 params={"script": ".fsi-dbg.sh", "files": FILES, "after": "poweroff"},
                                 on_event=lambda ev: sigterm() if ev.kind == "waiting" else None)
        run.proc.wait(30)
        s = run.summary()
    assert not res.timed_out and res.guest_result == "ok", explain(res)
    assert res.metrics["dbg"]["pending"] == "1", res.metrics
    assert res.metrics["dbg-mkdir"] == {"rc": "1", "err": "Input_output_error"}, res.metrics
    assert s["holds"].get("safety") == 1, s["holds"]
    an = recording(tmp_path)
    (mk,) = [e for e in an.exchanges if e.opname == "MKDIR"]
    assert mk.errname == "EIO" and any("by the proxy: the queue stopped" in n for n in mk.notes)
