"""`fsinspect rerun REC`: replay a recording's FUSE session against any vhost-user-fs back-end, no guest.

The command is the front-end (as QEMU is), replays every request, and diffs each reply with the
recorded one.  Exit status: 0 all equal and answered, 1 differences (or a back-end that failed), 2 error.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import privfile
from ..children import die_with_parent
from ..errors import UserError
from ..rerun import report
from ..rerun.front import Front, FrontError, connect_backend
from ..rerun.plan import Plan, PlanError, load
from ..rerun.runner import Rerun, RerunError
from ..workdir import short_tmpdir, unwind_on

EPILOG = """\
The share: a rerun needs the share as it was when the recording started.  --prepare-share DIR rebuilds
what the recording proves; a workload that starts from an empty directory needs nothing else (what the
recording creates, the rerun creates).

--backend-cmd runs a command that serves a vhost-user socket; {socket} and {shared_dir} in it are
replaced (by a private socket path and --shared-dir), for example
  --backend-cmd '/usr/lib/qemu/virtiofsd --socket-path={socket} -o source={shared_dir},announce_submounts'
  --backend-cmd 'fsinspect daemon --socket-path={socket} -o source={shared_dir}'
Exit status: 0 every reply equal, 1 differences (or unanswered requests, or a back-end that exited non-zero
or by a signal, even after its last reply), 2 error.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("rerun", help="replay a recording against a virtio-fs back-end (no guest) and diff",
                       description="Act as the vhost-user front-end (negotiating as the recording did), "
                                   "replay every recorded FUSE request of its first session in order (INIT "
                                   "first, forgets on the hiprio queue, the recording's overlap kept), map the "
                                   "back-end's nodeids, file handles and directory cookies onto the recorded "
                                   "ones, and compare each reply with the recorded reply.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="REC", help="an fsinspect recording (.pcapng) made from a guest's mount on")
    be = p.add_mutually_exclusive_group(required=True)
    be.add_argument("--backend", metavar="SOCK", help="the vhost-user socket of a running back-end")
    be.add_argument("--backend-cmd", metavar="CMD", help="start this back-end for the rerun (see below)")
    p.add_argument("--shared-dir", metavar="DIR", help="the share the back-end serves ({shared_dir} in "
                                                       "--backend-cmd; --prepare-share builds it)")
    p.add_argument("--prepare-share", metavar="DIR", help="first rebuild DIR (empty or absent) as the recording "
                                                          "proves it was at the start, then rerun on it")
    p.add_argument("--record", metavar="OUT", help="record the rerun's FUSE traffic (pcapng, like the proxy's)")
    p.add_argument("--speed", choices=("max", "1x"), default="max",
                   help="max: as fast as the back-end answers (keeping order and overlap); 1x: the recorded timing")
    p.add_argument("--strict", action="store_true", help="compare volatile fields too (ino, times, blocks)")
    p.add_argument("--format", choices=("text", "jsonl"), default="text")
    p.add_argument("--first", type=int, default=10, metavar="K", help="differences shown in full (default 10)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="give up when the back-end answers nothing for S seconds (default 10)")
    p.add_argument("--allow-truncated", action="store_true", help="rerun a recording cut short, up to its end")
    p.add_argument("--allow-snapped", action="store_true",
                   help="rerun a recording made with a snap length: missing WRITE bytes become zeros")
    p.add_argument("--bench", action="store_true",
                   help="also print per-opcode latency percentiles and requests/s of the back-end")
    p.set_defaults(func=run)


@dataclass
class Backend:
    """The back-end of a rerun: its socket, and the process and log when the rerun started it."""

    path: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    conn: socket.socket | None = None  # connected once it listened (--backend-cmd)

    def tail(self) -> str:
        """The last lines the back-end wrote, for an error message."""
        if self.log is None:
            return ""
        lines = self.log.read_text(errors="replace").strip().splitlines()[-3:]
        return f" (its last output: {' / '.join(lines)})" if lines else ""

    def gone(self) -> str | None:
        """Why the back-end process is gone (None: running, or not ours)."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"the back-end {exit_text(self.proc.returncode)}{self.tail()}"

    def failed_at_end(self, grace: float) -> str | None:
        """After the front-end hung up: a back-end that exits (as the C virtiofsd does) must exit 0; one
        still serving after `grace` seconds is stopped by us, which is no failure of its own."""
        if self.proc is None:
            return None
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        rc = self.proc.returncode
        return self.gone() if rc is not None and rc != 0 else None


def exit_text(rc: int) -> str:
    if rc < 0:
        with suppress(ValueError):
            return f"was killed by {signal.Signals(-rc).name}"
        return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


@contextmanager
def backend(args: argparse.Namespace, workdir: Path) -> Iterator[Backend]:
    """The back-end named on the command line; one we start is connected to once it listens."""
    if args.backend:
        yield Backend(Path(args.backend))
        return
    sock = workdir / "backend.sock"
    cmd = args.backend_cmd.replace("{socket}", str(sock)).replace("{shared_dir}", str(args.shared_dir or ""))
    try:
        argv = shlex.split(cmd)
    except ValueError as e:
        raise UserError(f"--backend-cmd: {e}") from None
    if "{socket}" not in args.backend_cmd:
        raise UserError("--backend-cmd must name its socket as {socket}")
    log = os.fdopen(privfile.create(workdir / "backend.log"), "wb")  # 0600: the back-end's log names guest files
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent(os.getpid()))
    except OSError as e:
        log.close()
        raise UserError(f"--backend-cmd: cannot run {argv[0]}: {e.strerror}") from None
    be = Backend(sock, proc, workdir / "backend.log")
    from ..guest.launcher import stop_process

    try:
        try:
            be.conn = connect_backend(sock, be.gone, max(args.timeout, 1.0), be.tail)
        except FrontError as e:
            raise UserError(str(e)) from None
        yield be
    finally:
        if be.conn is not None:
            be.conn.close()
        stop_process(proc)
        log.close()


def run(args: argparse.Namespace) -> int:
    unwind_on(signal.SIGTERM, signal.SIGHUP)  # the back-end is stopped and the work dir goes (SIGINT: likewise)
    try:
        plan = load(args.file, allow_truncated=args.allow_truncated, allow_snapped=args.allow_snapped)
    except PlanError as e:
        raise UserError(str(e)) from None
    for w in plan.warnings:
        print(f"fsinspect rerun: warning: {w}", file=sys.stderr)
    if args.prepare_share:
        from ..rerun.share import ShareError, prepare

        try:
            made = prepare(plan, Path(args.prepare_share))
        except ShareError as e:
            raise UserError(str(e)) from None
        print(f"fsinspect rerun: prepared {args.prepare_share}: {made}", file=sys.stderr)
        args.shared_dir = args.shared_dir or args.prepare_share
    if args.backend_cmd and "{shared_dir}" in args.backend_cmd and not args.shared_dir:
        raise UserError("--backend-cmd uses {shared_dir}: give --shared-dir DIR (or --prepare-share DIR)")
    with ExitStack() as stack:
        work = stack.enter_context(short_tmpdir("fsi-rerun-"))
        be = stack.enter_context(backend(args, work))
        return _rerun(args, plan, be, stack)


def _rerun(args: argparse.Namespace, plan: Plan, be: Backend, stack: ExitStack) -> int:
    sock, alive = be.path, (be.gone if be.proc is not None else None)
    writer = None
    if args.record:
        from ..recording.writer import RecordingWriter

        try:
            writer = stack.enter_context(RecordingWriter(args.record, source="virtio", backend=str(sock),
                                                         snaplen=0, comments=[f"fsinspect rerun {args.file}"]))
        except OSError as e:
            raise UserError(f"--record {args.record}: {e.strerror}") from None
    try:
        tap = None if writer is None else (lambda raw, ours: writer.control(raw, from_frontend=ours))
        front = Front(sock, plan.negotiation, max_request=plan.max_request, max_reply=plan.max_reply,
                      timeout=args.timeout, tap=tap, conn=be.conn)
        be.conn = None  # the Front's now
    except FrontError as e:
        why = alive() if alive is not None else None
        raise UserError(f"{e}{'; ' + why if why else ''}") from None
    stack.callback(front.close)
    if front.dropped:
        print(f"fsinspect rerun: note: the back-end does not offer {', '.join(front.dropped)}, which the "
              "recording used; the rerun goes without (ring details, not file system behaviour)", file=sys.stderr)
    if args.format == "text":
        print(f"rerun of {args.file} ({len(plan.exchanges)} exchanges) against {args.backend or args.backend_cmd}; "
              f"{report.SHARE_NOTE}", file=sys.stderr)
    try:
        result = Rerun(plan, front, speed=args.speed, strict=args.strict, timeout=args.timeout, writer=writer,
                       alive=alive).run()
    except RerunError as e:
        raise UserError(str(e)) from None
    front.close()  # hang up: a back-end that crashes now, after its last reply, is reported too
    failed = be.failed_at_end(min(args.timeout, 5.0))
    t = result.tally
    extra = {"sent": result.sent, "answered": result.answered, "elapsed_s": round(result.elapsed, 6),
             "max_in_flight": result.max_in_flight, "recorded_max_in_flight": plan.overlap,
             "backend_failed": failed}
    if args.format == "jsonl":
        lines = list(report.jsonl(t, extra))
        if args.bench:
            lines[-1:-1] = [report.json.dumps({"type": "bench", **r}) for r in report.bench_rows(result.latency_ns)]
    else:
        lines = list(report.text(t, first=args.first))
        lines.insert(1, f"{result.sent} requests sent, {result.answered} answered, at most "
                        f"{result.max_in_flight} in flight (the recording: {plan.overlap}), {result.elapsed:.2f} s")
        if failed:
            lines.insert(2, f"back-end failure: {failed}, after its last reply")
        if args.bench:
            lines += ["", *report.bench_text(result.latency_ns, result.answered, result.elapsed)]
    print("\n".join(lines))
    return 0 if t.equal and not t.unanswered and not failed else 1
