"""The debugger's rules on `fsinspect daemon --standalone`: the host kernel's FUSE client on a real
/dev/fuse mount meets --inject rules held by the daemon engine itself, and the recording says so."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dissectors import fuse as F
from fsinspect.recording import format as fmt
from fsinspect.recording.reader import RecordingReader
from tests.conftest import require_root
from tests.standalone_mount import REPO, is_mounted, standalone

pytestmark = pytest.mark.root


def _records(path: Path) -> list[tuple[bool, int, bytes, list[str]]]:
    with RecordingReader(path) as r:
        return [(rec.inbound, rec.flags, rec.data, rec.notes) for rec in r if rec.is_fuse]


def _lookups(recs: list[tuple[bool, int, bytes, list[str]]], name: bytes) -> list[tuple[int, int]]:
    """(unique, flags) of every LOOKUP request for `name`."""
    out = []
    for inbound, flags, data, _ in recs:
        if inbound and F.peek_header(data)[1] == 1:
            req = F.decode_request(data)
            if req.args["name"] == name:
                out.append((req.unique, flags))
    return out


def _reply_for(recs: list[tuple[bool, int, bytes, list[str]]], unique: int) -> list[tuple[int, int, list[str]]]:
    """(error, flags, notes) of every reply record with this unique."""
    return [(int.from_bytes(d[4:8], "little", signed=True), fl, notes) for inbound, fl, d, notes in recs
            if not inbound and int.from_bytes(d[8:16], "little") == unique]


def test_inject_enoent_on_lookup_of_an_existing_file(tmp_path: Path) -> None:
    require_root()
    shared, mnt, rec = tmp_path / "shared", tmp_path / "mnt", tmp_path / "rec.pcapng"
    shared.mkdir()
    (shared / "victim").write_bytes(b"still here")
    (shared / "bystander").write_bytes(b"fine")
    with standalone(shared, mnt, "--cache", "none", "--record", str(rec),
                    "--inject", 'op == LOOKUP and name == "victim"', "errno=ENOENT"):
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "victim")
        assert (mnt / "bystander").read_bytes() == b"fine"  # other lookups are served
        assert "victim" in os.listdir(mnt)  # READDIR is not a LOOKUP: the file is there
        assert (shared / "victim").read_bytes() == b"still here"
    recs = _records(rec)
    lookups = _lookups(recs, b"victim")
    assert lookups and all(flags & fmt.RF_HELD for _, flags in lookups)
    for unique, _ in lookups:
        (err, flags, notes), = _reply_for(recs, unique)  # exactly one reply: nothing unpaired
        assert err == -errno.ENOENT and flags & fmt.RF_INJECTED
        assert "answered by the debugger: the back-end never saw the request" in notes
    # the native prefilter (every LOOKUP) held it a moment; the expression let it go to the back-end
    (u, flags), = _lookups(recs, b"bystander")[:1]
    (err, flags, _), = _reply_for(recs, u)
    assert err == 0 and not flags & (fmt.RF_INJECTED | fmt.RF_REWRITTEN)


def test_inject_delay_once_on_getattr(tmp_path: Path) -> None:
    require_root()
    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    (shared / "f").write_bytes(b"x")
    with standalone(shared, mnt, "--cache", "none", "--inject", "op == GETATTR and nodeid != 1", "delay=300ms",
                    "count=1"):
        times = []
        for _ in range(4):
            t0 = time.monotonic()
            os.stat(mnt / "f")  # with cache=none every stat asks the daemon (LOOKUP, then GETATTR)
            times.append(time.monotonic() - t0)
    assert times[0] >= 0.3, times
    assert max(times[1:]) < 0.15, times  # count=1: the rule retired after one hit


def test_reply_errno_once_on_read(tmp_path: Path) -> None:
    require_root()
    shared, mnt, rec = tmp_path / "shared", tmp_path / "mnt", tmp_path / "rec.pcapng"
    shared.mkdir()
    (shared / "data").write_bytes(b"payload" * 100)
    with standalone(shared, mnt, "--cache", "none", "--record", str(rec),
                    "--inject", "op == READ", "reply-errno=EIO", "count=1"):
        with pytest.raises(OSError) as ei:
            (mnt / "data").read_bytes()
        assert ei.value.errno == errno.EIO
        assert (mnt / "data").read_bytes() == b"payload" * 100  # once only
    recs = _records(rec)
    reads = [F.peek_header(d)[2] for inbound, _, d, _ in recs if inbound and F.peek_header(d)[1] == 15]
    # one reply record, as the kernel got it; the note says what the back-end had answered
    (err, flags, notes), = _reply_for(recs, reads[0])
    assert err == -errno.EIO and flags & fmt.RF_REWRITTEN
    assert any(n.startswith("rewritten by the debugger; the back-end replied error 0 (ok)") for n in notes), notes
    assert all(len(_reply_for(recs, u)) == 1 for u in reads)


def test_probability_rules_are_reproducible_with_a_seed(tmp_path: Path) -> None:
    require_root()
    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    for i in range(40):
        (shared / f"f{i}").write_bytes(b"")

    def failures() -> list[int]:
        with standalone(shared, mnt, "--cache", "none", "--seed", "7",
                        "--inject", 'op == LOOKUP and name ~ "^f[0-9]+$"', "errno=EIO", "p=0.3"):
            out = []
            for i in range(40):
                try:
                    os.stat(mnt / f"f{i}")
                except OSError as e:
                    assert e.errno == errno.EIO
                    out.append(i)
            return out

    a, b = failures(), failures()
    assert a == b and 3 <= len(a) <= 25, a


@pytest.mark.parametrize(("args", "needle"), [
    (["--inject", 'op == LOOKUP and nam == "x"', "errno=ENOENT"], "unknown field 'nam'"),
    (["--inject", "op == LOOKUP", "errno=ENOENTX"], "unknown errno name 'ENOENTX'"),
    (["--inject", "op == GETATTR", "delay=fast"], "is not a duration"),
    (["--inject", "op == FORGET", "errno=EIO"], "FORGET has no reply"),
    (["--inject", "op == LOOKUP"], "--inject needs what to do"),
    (["--break", "op == MKDIR"], "--break holds until a client decides"),
    (["--inject", "op == READ", "reply-errno=EIO", "count=-1"], "count=: '-1' is not a whole number"),
])
def test_malformed_rules_are_refused_before_mounting(tmp_path: Path, args: list[str], needle: str) -> None:
    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    mnt.mkdir()
    p = subprocess.run([sys.executable, "-m", "fsinspect.cli", "daemon", "--standalone", str(mnt), "--shared-dir",
                        str(shared), *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    if "--break" not in args:
        lines = p.stderr.splitlines()
        assert lines[-1].strip() == "^", p.stderr  # a caret under the problem
    assert not is_mounted(mnt)


def test_breakpoint_on_the_host_mount_driven_over_the_control_socket(tmp_path: Path) -> None:
    """--break needs a client: `fsinspect daemon --standalone --control` takes one, as the proxy does."""
    require_root()
    from fsinspect.intercept.client import ControlClient

    shared, mnt, ctl = tmp_path / "shared", tmp_path / "mnt", tmp_path / "ctl.sock"
    shared.mkdir()
    (shared / "d").mkdir()
    (shared / "other").write_bytes(b"x")
    with standalone(shared, mnt, "--control", str(ctl), "--break", "op == MKDIR"), \
            ControlClient(str(ctl), timeout=10) as c:
        done: list[BaseException | None] = []

        def mkdir(name: str) -> None:
            try:
                os.mkdir(mnt / "d" / name)
                done.append(None)
            except OSError as e:
                done.append(e)

        t = threading.Thread(target=mkdir, args=("released",))
        t.start()
        held = c.wait_held(lambda m: m["opcode"] == "MKDIR")
        assert os.stat(mnt / "other").st_size == 1 and not done  # served while the mkdir waits
        c.release(held["n"])
        t.join(10)
        assert done == [None] and (shared / "d" / "released").is_dir()
        t = threading.Thread(target=mkdir, args=("denied",))
        t.start()
        c.answer(c.wait_held()["n"], errno="EACCES")
        t.join(10)
        assert isinstance(done[1], PermissionError) and not (shared / "d" / "denied").exists()
        assert [r["rule"] for r in c.rules()] == ["op == MKDIR"]


@pytest.mark.parametrize("rule", [["--break", "op == MKDIR"], ["--inject", "op == MKDIR", "delay=120s"]],
                         ids=["breakpoint", "delay"])
def test_a_stop_signal_with_a_request_held_ends_the_daemon_promptly(tmp_path: Path, rule: list[str]) -> None:
    """SIGTERM while a breakpoint or a delay rule holds a mkdir: the caller keeps the mount busy (the
    unmount goes lazy), so the daemon waited out its 30 s join before it let the request go. Now the held
    caller gets EIO at once, the mount goes, and the daemon exits 0 with nothing on stderr past its warnings
    (the delay's timer, firing at the end for a request already let go, logged a traceback)."""
    require_root()
    from fsinspect.intercept.client import ControlClient

    shared, mnt, ctl = tmp_path / "shared", tmp_path / "mnt", tmp_path / "ctl.sock"
    shared.mkdir()
    done: list[BaseException | None] = []

    def mkdir() -> None:
        try:
            os.mkdir(mnt / "held")
            done.append(None)
        except OSError as e:
            done.append(e)

    with standalone(shared, mnt, "--control", str(ctl), *rule) as proc, ControlClient(str(ctl), timeout=10) as c:
        t = threading.Thread(target=mkdir)
        t.start()
        if rule[0] == "--break":
            c.wait_held(lambda m: m["opcode"] == "MKDIR")
        else:  # a delay announces nothing: the caller still waiting a second on is the hold
            time.sleep(1)
            assert t.is_alive() and not done
        t0 = time.monotonic()
        proc.terminate()
        rc = proc.wait(timeout=60)
        took = time.monotonic() - t0
        t.join(10)
        err = proc.stderr.read().decode() if proc.stderr else ""
    assert rc == 0, err
    assert took < 10, f"the daemon took {took:.1f} s to stop"
    assert "Traceback" not in err and "ERROR" not in err, err
    assert len(done) == 1 and isinstance(done[0], OSError) and done[0].errno == errno.EIO
    assert not is_mounted(mnt) and not (shared / "held").exists()
