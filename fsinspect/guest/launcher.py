"""Boot the test-bed guest under QEMU against a vhost-user-fs socket and collect a GuestResult.

The backend is a parameter: `run_guest` takes a socket path plus the processes to watch, and
`run_with_backend` takes a context manager factory that starts a backend and yields a RunningBackend
(`virtiofsd` here; the fsinspect daemon and proxy provide their own).

Backend loss: QEMU 7.2 never reconnects, and the guest's next request hangs in D state, so waiting for
the workload would only end at the timeout.  Three signals end the run early instead: a watched backend
process exits, QEMU's stderr reports the closed socket, or (when `stall_timeout` is set, as for `hold`)
the console stays silent.  QEMU is then killed by PID.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from .. import privfile
from ..children import die_with_parent
from ..workdir import short_tmpdir, virtiofsd_pidfile
from .build import GuestImage
from .console import ConsoleParser, Event, GuestResult

QEMU = "qemu-system-x86_64"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
# QEMU's words when the vhost-user socket closes under it (7.2 prints the first one).
BACKEND_LOST_PATTERNS = (
    re.compile(r"Unexpected end-of-file before all data were read"),
    re.compile(r"Failed to read msg header"),
    re.compile(r"vhost.*(lost|disconnect|Broken pipe|Connection reset)", re.I),
)
_PARAM_KEY = re.compile(r"[a-z][a-z0-9_]*\Z")
_PARAM_VALUE = re.compile(r"[A-Za-z0-9_.,:/+-]+\Z")
SUN_PATH_MAX = 107


class LaunchError(Exception):
    """The guest could not be started (bad parameters, missing QEMU, backend failed to come up)."""


class Watchable(Protocol):
    """A process the run depends on: subprocess.Popen fits, and so does PidWatch."""

    pid: int

    def poll(self) -> int | None: ...


class PidWatch:
    """Watch a process that is not our child, by PID (e.g. a backend someone else started)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return -1
        return -1 if state in ("Z", "X") else None


@dataclass
class RunningBackend:
    """A started backend: the socket QEMU connects to and the processes whose death means backend lost."""

    socket_path: Path
    processes: list[Watchable] = field(default_factory=list)
    name: str = "backend"
    log_path: Path | None = None


BackendFactory = Callable[[Path], AbstractContextManager[RunningBackend]]


def choose_accel() -> str:
    """KVM only when a real kvm_intel/kvm_amd is loaded (here /dev/kvm is kvm_pvm, which fails); else TCG."""
    if os.path.exists("/dev/kvm") and any(os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd")):
        return "kvm"
    return "tcg"


def kernel_cmdline(workload: str, tag: str, params: Mapping[str, object] | None) -> str:
    """The guest's command line; workload parameters travel as fsi_KEY=VALUE (checked: no shell quoting)."""
    items: dict[str, str] = {"workload": workload, "tag": tag}
    for k, v in (params or {}).items():
        items[k] = str(int(v) if isinstance(v, bool) else v)
    words = ["console=ttyS0", "panic=-1", "loglevel=4"]
    for k, v in items.items():
        if not _PARAM_KEY.match(k) or not _PARAM_VALUE.match(v):
            raise LaunchError(f"guest parameter {k}={v!r}: keys are [a-z0-9_], values [A-Za-z0-9_.,:/+-]")
        words.append(f"fsi_{k}={v}")
    return " ".join(words)


def qemu_command(image: GuestImage, socket_path: Path | str, tag: str, cmdline: str, accel: str,
                 memory_mb: int = 512, smp: int = 2, reboot: bool = False) -> list[str]:
    """The measured recipe (guest-notes.md): shared memfd RAM is what lets vhost-user map guest memory.
    `reboot`: a guest reboot resets the machine (and its devices) instead of ending QEMU."""
    accel_args = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else \
        ["-accel", "tcg,thread=multi", "-cpu", "max"]
    return [
        QEMU, *accel_args, "-machine", "q35", "-smp", str(smp), "-m", f"{memory_mb}M",
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on", "-numa", "node,memdev=mem",
        "-chardev", f"socket,id=char0,path={socket_path}",
        "-device", f"vhost-user-fs-pci,chardev=char0,tag={tag}",
        "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
        "-append", cmdline, "-nographic", *([] if reboot else ["-no-reboot"]), "-net", "none",
    ]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL by PID and reap: a guest blocked in D state never powers off by itself."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def run_guest(socket_path: Path | str, *, image: GuestImage | None = None, tag: str = "myfs",
              workload: str = "smoke", timeout: float = 120.0, params: Mapping[str, object] | None = None,
              watch: Sequence[Watchable] = (), stall_timeout: float | None = None,
              on_event: Callable[[Event], None] | None = None, accel: str | None = None,
              memory_mb: int = 512, reboot: bool = False) -> GuestResult:
    """Boot the guest against `socket_path`, run `workload`, and return what the console reported.

    QEMU is always gone when this returns (killed by PID on timeout, backend loss or an exception).
    `stall_timeout` (default 3 s for `hold`, 0 disables) declares the backend lost when the console is
    silent that long after the mount.  A backend behind a proxy that answers EIO itself should pass
    watch=() and stall_timeout=0, and judge the guest's own result.
    """
    if image is None:
        from .build import build
        image = build()
    sock = Path(socket_path)
    if len(os.fsencode(sock)) > SUN_PATH_MAX:
        raise LaunchError(f"socket path is {len(os.fsencode(sock))} bytes; AF_UNIX allows {SUN_PATH_MAX}")
    if shutil.which(QEMU) is None:
        raise LaunchError(f"{QEMU} not found (apt-get install qemu-system-x86)")
    if stall_timeout is None and workload == "hold":
        stall_timeout = 3.0
    if not sock.exists():
        raise LaunchError(f"no vhost-user socket at {sock} (is the backend running?)")
    accel = accel or choose_accel()
    result = GuestResult(workload=workload, tag=tag, accel=accel)
    cmd = qemu_command(image, sock, tag, kernel_cmdline(workload, tag, params), accel, memory_mb, reboot=reboot)
    parser = ConsoleParser(result)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=die_with_parent(os.getpid()))
    assert proc.stdout is not None and proc.stderr is not None
    result.qemu_pid = proc.pid
    sel = selectors.DefaultSelector()
    out_fd = proc.stdout.fileno()
    streams: dict[int, IO[bytes]] = {out_fd: proc.stdout, proc.stderr.fileno(): proc.stderr}
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    err_buf = b""
    last_output = time.monotonic()
    lost_at: float | None = None

    def backend_lost(reason: str) -> None:
        nonlocal lost_at
        if not result.backend_lost:
            result.backend_lost = True
            result.backend_lost_reason = reason
            lost_at = time.monotonic()

    suspects: list[str] = []

    def pump(timeout: float) -> bool:
        """Read what the pipes hold; False when nothing was ready."""
        nonlocal err_buf, last_output
        ready = sel.select(timeout=timeout)
        for key, _ in ready:
            fd = int(key.fd)
            data = os.read(fd, 65536)
            if not data:
                sel.unregister(fd)
                continue
            if fd == out_fd:
                last_output = time.monotonic()
                for ev in parser.feed(data):
                    if on_event is not None:
                        on_event(ev)
            else:
                err_buf += data
                *lines, err_buf = err_buf.split(b"\n")
                for raw in lines:
                    text = raw.decode("utf-8", "replace").rstrip()
                    result.qemu_stderr.append(text)
                    if any(p.search(text) for p in BACKEND_LOST_PATTERNS):
                        suspects.append(f"QEMU: {text}")
        return bool(ready)

    def drain() -> None:
        """Read all the guest had already written before judging a loss.

        The launcher may run late (a busy caller holds the GIL): the guest's `done`, its poweroff, QEMU's
        exit and then the proxy's can all happen before this thread reads the pipe again.  After `done` the
        guest has unmounted, so a backend leaving then is no loss.
        """
        deadline = time.monotonic() + 1.0
        while sel.get_map() and pump(0) and time.monotonic() < deadline:
            pass

    try:
        while sel.get_map():
            pump(0.1)
            if result.done_uptime is None:
                gone = [f"backend process {w.pid} exited (status {rc})" for w in watch if (rc := w.poll()) is not None]
                if suspects or gone:
                    drain()
                    if result.done_uptime is None:
                        backend_lost((suspects or gone)[0])
                if (stall_timeout and result.mounted_uptime is not None
                        and time.monotonic() - last_output > stall_timeout):
                    drain()
                    silent = time.monotonic() - last_output
                    if silent > stall_timeout:
                        backend_lost(f"console silent for {silent:.1f} s (guest blocked on a request)")
            now = time.monotonic()
            if result.backend_lost:
                break
            if now - t0 > timeout:
                result.timed_out = True
                break
            if proc.poll() is not None and not sel.get_map():
                break
    finally:
        _kill(proc)
        sel.close()
        for s in streams.values():
            with suppress(OSError):
                rest = s.read() if s is proc.stdout else b""
                if rest and not result.backend_lost:
                    parser.feed(rest)
            s.close()
        parser.close()
    result.wall_s = round(time.monotonic() - t0, 2)
    if lost_at is not None:
        result.backend_lost_after_s = round(lost_at - t0, 2)
    if err_buf:
        result.qemu_stderr.append(err_buf.decode("utf-8", "replace").rstrip())
    result.qemu_rc = proc.returncode
    result.status = _status(result)
    return result


def _status(r: GuestResult) -> str:
    if r.backend_lost:
        return "backend_lost"
    if r.timed_out:
        return "timeout"
    if r.guest_result == "ok" and r.done_uptime is not None and r.qemu_rc == 0 and not r.failed_steps:
        return "ok"
    if r.guest_result is None:
        return "crashed"
    return "fail"


# ---------------------------------------------------------------------------------------------------------
# Backends


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise LaunchError(f"{what} exited (status {proc.returncode}) before creating {path}")
        if time.monotonic() > deadline:
            raise LaunchError(f"{what} did not create {path} within {timeout:.0f} s")
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 3.0, group: bool = True) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; always reaped.

    With `group` (for processes started with start_new_session) the signals go to the process group the
    process leads: the C virtiofsd forks its sandboxed worker, which would outlive a parent-only kill.
    """
    def send(sig: int) -> None:
        with suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)

    if proc.poll() is None:
        send(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait(timeout=10)
    if group:
        send(signal.SIGKILL)  # any worker left in the group after its parent died
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # not our child: wait for its new parent to reap it
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.02)


@contextmanager
def virtiofsd(shared_dir: Path | str, workdir: Path, *, announce_submounts: bool = True,
              cache: str = "auto", xattr: bool = False, extra_args: Sequence[str] = (),
              binary: str = VIRTIOFSD) -> Iterator[RunningBackend]:
    """Start the C virtiofsd (QEMU 7.2's) on workdir/vfs.sock; stop it and remove its socket and pid file."""
    if not os.path.exists(binary):
        raise LaunchError(f"{binary} not found (apt-get install qemu-system-x86)")
    sock = workdir / "vfs.sock"
    log = workdir / "virtiofsd.log"
    opts = [f"source={shared_dir}", f"cache={cache}"]
    if announce_submounts:
        opts.append("announce_submounts")  # off by default; QEMU 7.2's virtiofsd has no "no_" form
    opts.append("xattr" if xattr else "no_xattr")
    cmd = [binary, f"--socket-path={sock}", "-o", ",".join(opts), *extra_args]
    with os.fdopen(privfile.create(log), "wb") as logf:  # 0600: virtiofsd logs the guest's file names
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent(os.getpid()))
    try:
        try:
            _wait_for_socket(sock, proc, "virtiofsd")
        except LaunchError as e:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise LaunchError(f"{e}: {' / '.join(tail)}") from None
        yield RunningBackend(sock, [proc], "virtiofsd", log)
    finally:
        stop_process(proc)
        with suppress(FileNotFoundError):
            sock.unlink()
        with suppress(FileNotFoundError, PermissionError):
            virtiofsd_pidfile(sock).unlink()


def socket_backend(socket_path: Path | str, pids: Sequence[int] = ()) -> BackendFactory:
    """A backend someone else runs: just its socket, plus PIDs to watch if known."""
    @contextmanager
    def factory(_workdir: Path) -> Iterator[RunningBackend]:
        yield RunningBackend(Path(socket_path), [PidWatch(p) for p in pids], "external")
    return factory


def run_with_backend(backend: BackendFactory, *, on_backend: Callable[[RunningBackend], None] | None = None,
                     **kwargs: Any) -> GuestResult:
    """Start `backend` in a private dir, boot the guest against it, and tear both down.

    `on_backend` runs once the backend is up (tests use it to kill the backend mid-run, say).
    """
    with short_tmpdir() as work, backend(work) as be:
        if on_backend is not None:
            on_backend(be)
        return run_guest(be.socket_path, watch=be.processes, **kwargs)
