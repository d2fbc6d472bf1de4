"""`fsinspect proxy` and `fsinspect rerun` leave nothing under /tmp however they end.

A stop signal (SIGTERM, SIGHUP, SIGINT) at any point, start-up included, removes the work dir (with its
back-end socket and log) and the listening socket; a SIGTERM/SIGHUP still ends the process by that signal.
A run killed by SIGKILL cannot clean up: its work dir's owner lock goes with it, and the next run removes
the dir (two leaked so from each CI run, one per SIGKILL test in test_proxy_backend_lifetime).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fsinspect.guest.launcher import stop_process
from fsinspect.workdir import OWNER, short_tmpdir, sweep

SAMPLE = Path(__file__).resolve().parent.parent / "recordings" / "samples" / "guest-syncfs.pcapng"
# A back-end that takes the connection and never answers: the rerun waits on it.
MUTE_BACKEND = ("import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); "
                "c = s.accept(); time.sleep(120)")


def owned_workdir(pid: int, prefix: str) -> Path | None:
    """The work dir under /tmp that process `pid` made and holds (its .owner names it)."""
    for d in Path("/tmp").glob(f"{prefix}*"):
        try:
            if (d / OWNER).read_text().strip() == str(pid):
                return d
        except OSError:
            continue
    return None


def wait_for_workdir(p: subprocess.Popen[bytes], prefix: str, also: Path | None = None) -> Path:
    deadline = time.monotonic() + 20
    while (d := owned_workdir(p.pid, prefix)) is None or (also is not None and not also.exists()):
        assert p.poll() is None, f"exited with {p.returncode} before making its work dir"
        assert time.monotonic() < deadline, f"no {prefix} work dir of pid {p.pid} within 20 s"
        time.sleep(0.02)
    return d


def _default_stop_signals() -> None:
    """In the child: SIGTERM, SIGHUP and SIGINT as a terminal leaves them, whatever the test runner ignores (a
    run started with one ignored keeps it ignored)."""
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)


def _rerun_against_a_mute_backend(work: Path, *, nohup: bool = False) -> tuple[subprocess.Popen[bytes], Path]:
    """A rerun waiting on a back-end that never answers (under nohup: SIGHUP ignored from its start)."""
    cmd = shlex.join([sys.executable, "-c", MUTE_BACKEND]) + " {socket}"
    p = subprocess.Popen([*(["nohup"] if nohup else []), sys.executable, "-m", "fsinspect", "rerun", str(SAMPLE),
                          "--backend-cmd", cmd, "--allow-snapped", "--timeout", "60"], stdin=subprocess.DEVNULL,
                         cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=_default_stop_signals)
    try:
        d = wait_for_workdir(p, "fsi-rerun-", also=None)
        deadline = time.monotonic() + 20
        while not (d / "backend.sock").exists():
            assert p.poll() is None and time.monotonic() < deadline, "the back-end never listened"
            time.sleep(0.02)
    except BaseException:
        stop_process(p)
        raise
    return p, d


def _group_left(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stopped_rerun_removes_its_work_dir_and_stops_its_backend(sig: signal.Signals) -> None:
    with short_tmpdir() as work:
        p, d = _rerun_against_a_mute_backend(work)
        try:
            backend = [int(x) for x in (Path(f"/proc/{p.pid}/task/{p.pid}/children")).read_text().split()]
            assert backend, "the rerun's back-end is not its child"
            time.sleep(0.3)  # connected, and waiting for the first reply
            p.send_signal(sig)
            rc = p.wait(15)
            err = p.stderr.read().decode() if p.stderr else ""
            assert "Traceback" not in err, err
            # SIGTERM and SIGHUP end it by that signal, as before; SIGINT is KeyboardInterrupt's 130
            assert rc == (130 if sig == signal.SIGINT else -sig), (rc, err)
            assert not d.exists(), f"{d} left: {sorted(os.listdir(d))}"
            deadline = time.monotonic() + 5
            while any(Path(f"/proc/{b}").exists() for b in backend) and time.monotonic() < deadline:
                time.sleep(0.02)  # not our child: its reaper is init
            assert not any(_group_left(b) for b in backend), "the back-end outlived the rerun"
        finally:
            stop_process(p)


def test_a_sigterm_during_proxy_start_up_removes_its_work_dir_and_socket(tmp_path: Path) -> None:
    """Start-up blocked (the recording is a FIFO nobody reads yet): SIGTERM there used to kill the proxy by
    its default action before its handler was set, leaving /tmp/fsi-proxy-* and the --listen socket."""
    fifo = tmp_path / "rec.pcapng"
    os.mkfifo(fifo)
    with short_tmpdir() as work:
        (work / "share").mkdir()
        listen = work / "p.sock"
        p = subprocess.Popen([sys.executable, "-m", "fsinspect", "proxy", "--listen", str(listen),
                              "--shared-dir", str(work / "share"), "--record", str(fifo)],
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            d = wait_for_workdir(p, "fsi-proxy-", also=listen)
            time.sleep(0.3)  # blocked opening the FIFO
            assert p.poll() is None
            p.send_signal(signal.SIGTERM)
            rc = p.wait(15)
            err = p.stderr.read().decode() if p.stderr else ""
            assert rc == -signal.SIGTERM and "Traceback" not in err, (rc, err)
            assert not d.exists(), f"{d} left: {sorted(os.listdir(d))}"
            assert not listen.exists(), "the --listen socket was left"
        finally:
            stop_process(p)


def test_the_next_run_removes_a_sigkilled_runs_work_dir() -> None:
    """SIGKILL leaves the work dir (nothing can run); its owner lock is free, and the next proxy or rerun to
    make its own removes it (and the pid file the C virtiofsd leaves in /run/virtiofsd for its socket)."""
    with short_tmpdir() as work:
        p, d = _rerun_against_a_mute_backend(work)
        try:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
        finally:
            stop_process(p)
        assert (d / "backend.sock").exists() and (d / "backend.log").exists(), "nothing left to sweep?"
        vfsd_pid = Path("/run/virtiofsd") / (str(d / "backend.sock").replace("/", ".") + ".pid")
        if vfsd_pid.parent.is_dir():
            vfsd_pid.write_text("1\n")  # as the C virtiofsd leaves it
        # The next run: a rerun that fails at once (no back-end there) still made, and swept, its work dir.
        r = subprocess.run([sys.executable, "-m", "fsinspect", "rerun", str(SAMPLE), "--backend",
                            str(work / "nobody.sock"), "--allow-snapped", "--timeout", "1"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert not d.exists(), f"{d} left by the next run"
        assert not vfsd_pid.exists()


KILLED_OWNER = ("import os, sys; from fsinspect.workdir import short_tmpdir\n"
                "with short_tmpdir('fsi-proxy-') as d:\n"
                "    print(d, flush=True); os.kill(os.getpid(), 9)")


def test_a_sweep_leaves_live_runs_others_and_mounts_alone() -> None:
    with short_tmpdir("fsi-proxy-") as mine:
        assert (mine / OWNER).read_text().strip() == str(os.getpid())
        assert mine not in sweep() and mine.exists()  # locked by us: alive
    assert not mine.exists()
    # A directory without an owner file (being made, or from an older version) is not ours to judge.
    bare = Path(tempfile.mkdtemp(prefix="fsi-proxy-", dir="/tmp"))
    try:
        assert bare not in sweep() and bare.exists()
    finally:
        bare.rmdir()
    # A dead run's dir with something mounted in it: removing it would reach into the mount.
    r = subprocess.run([sys.executable, "-c", KILLED_OWNER], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    dead = Path(r.stdout.strip())
    try:
        (dead / "mnt").mkdir()
        if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "none", str(dead / "mnt")]).returncode == 0:
            try:
                (dead / "mnt" / "f").write_text("x")
                assert dead not in sweep() and (dead / "mnt" / "f").exists()
            finally:
                subprocess.run(["umount", str(dead / "mnt")], check=True)
        assert dead in sweep() and not dead.exists()
    finally:
        shutil.rmtree(dead, ignore_errors=True)


def test_a_rerun_started_under_nohup_outlives_a_hangup() -> None:
    """A stop signal ignored when the run started (nohup's SIGHUP) stays ignored: the rerun goes on, and a
    SIGTERM still ends it cleanly.  Fails before: unwind_on's handler replaced nohup's SIG_IGN and the hangup
    killed it."""
    with short_tmpdir() as work:
        p, d = _rerun_against_a_mute_backend(work, nohup=True)
        try:
            time.sleep(0.3)
            p.send_signal(signal.SIGHUP)
            time.sleep(1.0)
            assert p.poll() is None, f"ended by a SIGHUP it was started to ignore: {p.returncode}"
            assert d.exists()
            p.send_signal(signal.SIGTERM)
            rc = p.wait(15)
            err = p.stderr.read().decode() if p.stderr else ""
            assert rc == -signal.SIGTERM and "Traceback" not in err, (rc, err)
            assert not d.exists(), f"{d} left: {sorted(os.listdir(d))}"
        finally:
            stop_process(p)


def test_a_serving_proxy_started_under_nohup_outlives_a_hangup() -> None:
    """The same for the proxy once serving (waiting for QEMU, its back-end started): its stop handlers leave
    an ignored SIGHUP ignored.  Fails before: the hangup stopped it."""
    with short_tmpdir() as work:
        listen, be = work / "p.sock", work / "be.sock"
        cmd = shlex.join([sys.executable, "-c", MUTE_BACKEND, str(be)])
        p = subprocess.Popen(["nohup", sys.executable, "-m", "fsinspect", "proxy", "--listen", str(listen),
                              "--backend", str(be), "--backend-cmd", cmd, "--quiet"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True, preexec_fn=_default_stop_signals)
        try:
            d = wait_for_workdir(p, "fsi-proxy-", also=listen)
            children = Path(f"/proc/{p.pid}/task/{p.pid}/children")
            deadline = time.monotonic() + 20
            while not children.read_text().split():  # its back-end started: the session's handlers are set
                assert p.poll() is None and time.monotonic() < deadline, "the proxy never started its back-end"
                time.sleep(0.02)
            p.send_signal(signal.SIGHUP)
            time.sleep(1.0)
            assert p.poll() is None, f"ended by a SIGHUP it was started to ignore: {p.returncode}"
            p.send_signal(signal.SIGTERM)
            rc = p.wait(15)
            err = p.stderr.read().decode() if p.stderr else ""
            assert rc == 0 and "Traceback" not in err, (rc, err)
            assert not d.exists(), f"{d} left: {sorted(os.listdir(d))}"
            assert not listen.exists(), "the --listen socket was left"
        finally:
            stop_process(p)
