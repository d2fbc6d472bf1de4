"""`fsinspect attach --format text|jsonl|pcapng`: the headless client against the real Hub.

The guest-syncfs sample is run through a real Analyzer whose finished exchanges the real Hub publishes (as
the proxy does); `fsinspect attach` runs as a subprocess and its output is checked against the golden file,
and (pcapng) decoded by real tshark with fuse.lua from a pipe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fsinspect.live.hub import Hub
from tests.test_recording_samples import LUA
from tests.test_tui import SYNCFS, _publish_sample, golden

FSINSPECT = [sys.executable, "-m", "fsinspect"]


def _wait_clients(hub: Hub, n: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while len(hub.clients) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the client never attached"
        time.sleep(0.02)


def _serve(tmp_path: Path, *cmd: str, stdout: int | None = subprocess.PIPE) -> tuple[subprocess.Popen[bytes], Hub]:
    lock = threading.RLock()
    hub = Hub(str(tmp_path / "ctl.sock"), lambda: {}, feed_lock=lock, queue_len=100_000)
    proc = subprocess.Popen([*FSINSPECT, "attach", hub.path, *cmd], stdout=stdout, stderr=subprocess.PIPE)
    _wait_clients(hub, 1, proc)
    _publish_sample(hub, lock, SYNCFS)
    return proc, hub


def test_jsonl_filter_streams_until_the_source_ends(tmp_path: Path) -> None:
    proc, hub = _serve(tmp_path, "--format", "jsonl", "--filter", "op == SYNCFS")
    hub.close()  # the source ends: the client ends too, exit 0
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    rows = [json.loads(x) for x in out.splitlines()]
    want = [g for g in golden("guest-syncfs") if g["opcode"] == "SYNCFS"]
    assert len(rows) == len(want) == 6  # the sample's guest synced twice: 3 superblocks each
    assert [(r["opcode"], r["unique"], r["nodeid"], r["error"]) for r in rows] == \
        [(g["opcode"], g["unique"], g["nodeid"], g["error"]) for g in want]
    assert b"6 of " in err and b"the source closed" in err


def test_text_to_a_file_is_0600_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    out = tmp_path / "live.txt"
    os.umask(0o022)
    proc, hub = _serve(tmp_path, "--format", "text", "-o", str(out))
    try:
        gold = golden("guest-syncfs")
        deadline = time.monotonic() + 30
        while not out.exists() or len(out.read_text().splitlines()) < len(gold):  # (made once it has connected)
            assert time.monotonic() < deadline, out.exists() and out.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        hub.close()
    assert proc.returncode == 0, err
    assert b"stopped" in err and b"Traceback" not in err
    assert out.stat().st_mode & 0o777 == 0o600
    lines = out.read_text().splitlines()
    assert len(lines) == len(gold)
    syncfs = [x for x in lines if " SYNCFS " in x]
    assert len(syncfs) == 6 and all(x.startswith("#") and "->" in x for x in syncfs)


@pytest.mark.skipif(not Path("/usr/bin/tshark").exists(), reason="tshark not installed")
def test_pcapng_to_stdout_pipes_into_tshark(tmp_path: Path) -> None:
    r, w = os.pipe()  # fsinspect attach --format pcapng | tshark -r -
    tshark = subprocess.Popen(["tshark", "-X", f"lua_script:{LUA}", "-r", "-", "-T", "fields",
                               "-e", "fuse.opcode", "-e", "fuse.reply", "-Y", "fuse.opcode == 50"],
                              stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(r)
    proc, hub = _serve(tmp_path, "--format", "pcapng", stdout=w)
    os.close(w)
    hub.close()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    out, terr = tshark.communicate(timeout=120)
    assert b"Lua" not in terr, terr
    rows = out.decode().splitlines()
    assert sorted(rows) == ["50\t0"] * 6 + ["50\t1"] * 6, rows  # each SYNCFS: its request and its reply


def test_a_bad_filter_is_one_line_with_a_caret(tmp_path: Path) -> None:
    res = subprocess.run([*FSINSPECT, "attach", str(tmp_path / "none.sock"), "--format", "jsonl",
                          "--filter", "op == NOPE"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "--filter" in res.stderr and "^" in res.stderr and "NOPE" in res.stderr


def test_no_socket_is_one_line(tmp_path: Path) -> None:
    res = subprocess.run([*FSINSPECT, "attach", str(tmp_path / "none.sock"), "--format", "text"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "cannot connect" in res.stderr


def _attach_to_analyzer(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Hub, threading.RLock, Any]:
    """`fsinspect attach` on a real Hub that a real Analyzer publishes to (as a proxy session wires them)."""
    from fsinspect.analysis import Analyzer

    lock = threading.RLock()
    hub = Hub(str(tmp_path / "ctl.sock"), lambda: {}, feed_lock=lock, queue_len=100_000)
    proc = subprocess.Popen([*FSINSPECT, "attach", hub.path, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    an = Analyzer(keep_exchanges=False, keep_raw=True)
    an.listeners.append(hub.publish_exchange)
    an.pending_listeners.append(hub.publish_request)
    try:
        _wait_clients(hub, 1, proc)
    except BaseException:
        hub.close()
        raise
    return proc, hub, lock, an


def _ended(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """The client's output once the source has closed (it must end by itself, exit 0)."""
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out, err


def test_requests_still_waiting_at_the_end_are_written_as_pending(tmp_path: Path) -> None:
    """A hung back-end: the last SYNCFS is never answered.  The headless client writes it at the end, pending
    with its age, instead of losing it (the UI shows it as a pending row)."""
    from fsinspect.recording.reader import RecordingReader

    proc, hub, lock, an = _attach_to_analyzer(tmp_path, "--format", "jsonl", "--filter", "op == SYNCFS")
    want = [g["unique"] for g in golden("guest-syncfs") if g["opcode"] == "SYNCFS"]
    try:
        with RecordingReader(SYNCFS) as r:
            for rec in r.records():
                if rec.is_fuse and rec.inbound:
                    with lock:
                        an.feed_request(rec.data, rec.queue, rec.head, rec.ts_ns, orig_len=rec.orig_len)
                    if int.from_bytes(rec.data[8:16], "little") == want[-1]:
                        break  # the back-end hangs here
                elif rec.is_fuse:
                    with lock:
                        an.feed_reply(rec.data, rec.queue, rec.head, rec.ts_ns, orig_len=rec.orig_len)
    finally:
        hub.close()
    out, err = _ended(proc)
    rows = [json.loads(x) for x in out.splitlines()]
    assert [r["unique"] for r in rows] == want
    assert [r["state"] for r in rows] == ["done"] * 5 + ["pending"]
    assert rows[-1]["reply"] is None and rows[-1]["age_ms"] > 0
    assert b"1 still waiting" in err


@pytest.mark.parametrize("fmt", ["jsonl", "text"])
def test_a_held_request_is_written_when_held_then_when_it_completes(tmp_path: Path, fmt: str) -> None:
    """The source's debugger holds the first SYNCFS: the headless client writes it at once, held (the line a
    user at a breakpoint waits for), then again when it is released and answered."""
    import select

    from fsinspect.recording.reader import RecordingReader

    proc, hub, lock, an = _attach_to_analyzer(tmp_path, "--format", fmt, "--filter", "op == SYNCFS")
    assert proc.stdout is not None
    first = next(g["unique"] for g in golden("guest-syncfs") if g["opcode"] == "SYNCFS")
    try:
        held = None
        with RecordingReader(SYNCFS) as r:
            for rec in r.records():
                if not rec.is_fuse:
                    continue
                unique = int.from_bytes(rec.data[8:16], "little")
                with lock:
                    if rec.inbound:
                        ex = an.feed_request(rec.data, rec.queue, rec.head, rec.ts_ns, orig_len=rec.orig_len,
                                             held=unique == first)
                        held = ex if unique == first else held
                        continue
                if unique == first:  # its reply: first the client must have shown it held
                    assert held is not None
                    ready, _, _ = select.select([proc.stdout], [], [], 20)
                    assert ready, "nothing written while the request was held"
                    line = proc.stdout.readline().decode()
                    if fmt == "jsonl":
                        row = json.loads(line)
                        assert (row["unique"], row["state"], row["held"]) == (first, "held", "request")
                    else:
                        assert f"#{held.n} " in line and "SYNCFS" in line and line.rstrip().endswith("(held)")
                    with lock:
                        an.resume(held.n, "released")
                with lock:
                    an.feed_reply(rec.data, rec.queue, rec.head, rec.ts_ns, orig_len=rec.orig_len)
    finally:
        hub.close()
    out, err = _ended(proc)
    lines = out.decode().splitlines()
    assert len(lines) == 6  # every SYNCFS once as it completed; the held line came before
    if fmt == "jsonl":
        rows = [json.loads(x) for x in lines]
        assert rows[0]["unique"] == first and rows[0]["state"] == "done" and rows[0]["error"] is None
    else:
        assert held is not None and lines[0].startswith(f"#{held.n} ") and "(held)" not in lines[0]
    assert b"6 of " in err


def test_stop_signals_while_it_ends_print_nothing(tmp_path: Path) -> None:
    """Wireshark SIGTERMs its extcap once the FIFO closes, maybe while the interpreter shuts down: a
    traceback on stderr then shows in Wireshark as an error (CI saw it once). SIGTERMs every millisecond
    from the source's end until the exit must leave stderr clean and the output whole."""
    out = tmp_path / "live.jsonl"
    proc, hub = _serve(tmp_path, "--format", "jsonl", "-o", str(out))
    gold = golden("guest-syncfs")
    deadline = time.monotonic() + 30
    try:  # the client makes the file once it has its hello, which may be after the hub counted it
        while not out.exists() or len(out.read_bytes().splitlines()) < len(gold):
            assert time.monotonic() < deadline, out.exists() and out.read_text()
            time.sleep(0.02)
    finally:
        hub.close()
    while proc.poll() is None:
        assert time.monotonic() < deadline
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.001)
    _, err = proc.communicate(timeout=30)
    assert b"Traceback" not in err and b"Exception ignored" not in err, err
    assert proc.returncode == 0, err
    assert len(out.read_bytes().splitlines()) == len(gold)


_WHAT_LOADED = """
import sys
from fsinspect import cli
rc = cli.main(sys.argv[1:])
heavy = ("lark", "fsinspect.analysis.filter", "fsinspect.commands.daemon", "fsinspect.commands.proxy",
         "fsinspect.live.engine", "daemon.server", "textual")
print("loaded:", *(m for m in heavy if m in sys.modules), file=sys.stderr)
sys.exit(rc)
"""


@pytest.mark.parametrize("filt", [[], ["--filter", "op == SYNCFS"], ["--filter", "op == SYNCFS and queue >= 0"]],
                         ids=["no-filter", "op-filter", "filter"])
def test_a_headless_client_loads_only_what_it_uses(tmp_path: Path, filt: list[str]) -> None:
    """Start-up cost: `attach --format jsonl` imports no other command's modules (the daemon's engine, the
    proxy), the filter language only for a --filter, and lark (its grammar) only for an expression other than
    `op == NAME`; the output is the same."""
    lock = threading.RLock()
    hub = Hub(str(tmp_path / "ctl.sock"), lambda: {}, feed_lock=lock, queue_len=100_000)
    proc = subprocess.Popen([sys.executable, "-c", _WHAT_LOADED, "attach", hub.path, "--format", "jsonl", *filt],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_clients(hub, 1, proc)
    _publish_sample(hub, lock, SYNCFS)
    hub.close()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    loaded = err.decode().strip().splitlines()[-1].split()[1:]
    assert loaded == (["lark", "fsinspect.analysis.filter"] if "and" in " ".join(filt) else
                      ["fsinspect.analysis.filter"] if filt else []), err
    rows = [json.loads(x) for x in out.splitlines()]
    assert len(rows) == (6 if filt else len(golden("guest-syncfs")))


def test_help_still_lists_every_command() -> None:
    from fsinspect.cli import COMMANDS

    out = subprocess.run([*FSINSPECT, "--help"], capture_output=True, text=True, check=True).stdout
    assert all(f"    {name}" in out for name in COMMANDS), out
