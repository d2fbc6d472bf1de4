"""`fsinspect proxy`: the vhost-user man-in-the-middle between QEMU and a virtio-fs back-end.

It is also a drop-in for libvirt's virtiofs `<binary path>`: with virtiofsd's options (`--fd`,
`--socket-path`, `-o source=...`, `--shared-dir`, `--print-capabilities`) it starts the real
back-end (the C virtiofsd by default) on a private socket behind itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from .. import privfile
from ..errors import UserError
from ..intercept.cli import add_intercept_options, intercept_from_args
from ..live.addons import add_debugger
from ..recording.options import add_record_options, writer_options
from ..workdir import not_ignored, short_tmpdir, unwind_on
from ._stuck import add_stuck_option, stuck_ns

if TYPE_CHECKING:
    from ..intercept.addon import Intercept

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
# Bytes of each chain the native path copies when --snaplen > 0.  Metadata fits (Linux 6.1 asks for
# one 4 KiB page per READDIRPLUS); bulk READ/WRITE payloads get cut here, and the recorder keeps
# --snaplen of them anyway.  Copying whole 128 KiB-1 MiB payloads cost the guest ~7% on dd.
CAPTURE_SNAPLEN = 16 * 1024
MAX_POLL_US = 100_000  # --poll-us: a longer spin only burns the core after the guest has gone quiet
CAPABILITIES = {"type": "fs"}  # vhost-user.json VHostUserBackendType; what the C virtiofsd prints


def register(sub: Any) -> None:
    p = sub.add_parser("proxy", help="vhost-user MITM: record and inspect a VM's virtio-fs traffic",
                       description=__doc__)
    where = p.add_argument_group("where QEMU connects")
    where.add_argument("--listen", "--socket-path", dest="listen", metavar="SOCK",
                       help="Unix socket QEMU's vhost-user-fs chardev connects to")
    where.add_argument("--fd", type=int, help="an inherited listening socket fd (libvirt)")
    be = p.add_argument_group("the back-end")
    be.add_argument("--backend", metavar="SOCK", help="the real back-end's vhost-user socket")
    be.add_argument("--backend-cmd", metavar="CMD", help="start the back-end with this command (it creates SOCK)")
    be.add_argument("--backend-binary", default=VIRTIOFSD,
                    help=f"wrapper mode: the back-end to run behind the proxy (default {VIRTIOFSD})")
    be.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT]",
                    help="wrapper mode: virtiofsd options passed to the back-end (source=DIR, cache=..., ...)")
    be.add_argument("--shared-dir", help="wrapper mode: the directory to share (same as -o source=DIR)")
    be.add_argument("--print-capabilities", action="store_true", help="print vhost-user capabilities (JSON) and exit")
    add_record_options(p)
    out = p.add_argument_group("observation")
    out.add_argument("--lossless", action="store_true",
                     help="never drop captures: hold used-publication back instead (may slow the VM)")
    out.add_argument("--poll-us", type=int, default=0, metavar="US",
                     help="after any traffic, busy-poll the rings for US microseconds instead of sleeping: saves "
                          "the two thread wake-ups each request crosses, for a core while traffic flows. Only "
                          "where cores are spare: with no more CPUs than the guest's vCPU threads need, it "
                          "slows the guest (default 0: sleep)")
    out.add_argument("--control", metavar="SOCK",
                     help="control socket (0600, JSON lines) for `fsinspect attach` and scripts")
    add_stuck_option(out)
    out.add_argument("--summary-json", metavar="FILE", help="also write the end-of-run summary as JSON")
    out.add_argument("--quiet", action="store_true", help="no summary on stderr")
    add_intercept_options(p)
    p.set_defaults(func=run)


def _listener(args: argparse.Namespace) -> socket.socket:
    if args.fd is not None:
        try:
            s = socket.socket(fileno=args.fd)
        except OSError as e:
            raise UserError(f"--fd {args.fd}: {e.strerror}") from None
        return s
    from dissectors.transport.unixsock import claim_socket_path

    try:
        return claim_socket_path(args.listen, what="--listen")
    except OSError as e:
        raise UserError(e.strerror or str(e)) from None


def _close_listener(args: argparse.Namespace, listener: socket.socket) -> None:
    from dissectors.transport.unixsock import release_socket_path

    if args.listen and args.fd is None:
        release_socket_path(args.listen, listener)  # only if it is still ours
    else:
        listener.close()


def _wrapper_backend(args: argparse.Namespace, workdir: str) -> tuple[str, str]:
    """virtiofsd-compatible mode: run the real back-end on a private socket."""
    opts = [o for chunk in args.options for o in chunk.split(",") if o]
    if args.shared_dir:
        opts.append(f"source={args.shared_dir}")
    if not any(o.startswith("source=") for o in opts):
        raise UserError("give --backend SOCK, or the directory to share (--shared-dir DIR / -o source=DIR)")
    sock = os.path.join(workdir, "backend.sock")
    cmd = [args.backend_binary, f"--socket-path={sock}", "-o", ",".join(opts)]
    return sock, shlex.join(cmd)


def run(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES, indent=2))
        return 0
    if args.listen is None and args.fd is None:
        raise UserError("say where QEMU connects: --listen SOCK (or --socket-path / --fd)")
    record = writer_options(args)
    if not 0 <= args.poll_us <= MAX_POLL_US:
        raise UserError(f"--poll-us must be between 0 and {MAX_POLL_US} (microseconds)")
    stuck = stuck_ns(args.stuck_ms)
    intercept = intercept_from_args(args)  # every rule is checked before anything starts
    if args.breaks and not args.control:
        raise UserError("--break holds until a client decides: add --control SOCK (fsinspect attach or a script "
                        "releases it), or use --inject for what needs no client")
    from dissectors import ring

    if args.poll_us and ring.BACKEND != "c":
        print("fsinspect: warning: --poll-us needs the C ring engine; the Python twin sleeps between requests",
              file=sys.stderr)
    # Until the session's stop takes over below, SIGTERM/SIGHUP unwind start-up (the work dir and the listening
    # socket go) and end the process by that signal; SIGINT does so as KeyboardInterrupt.
    unwind_on(signal.SIGTERM, signal.SIGHUP)
    with short_tmpdir("fsi-proxy-") as work:
        return _serve(args, record, stuck, intercept, str(work))


def _serve(args: argparse.Namespace, record: dict[str, Any], stuck: int, intercept: Intercept | None,
           workdir: str) -> int:
    from dissectors.transport.wire import Cancelled

    from ..proxy.server import ProxyConfig
    from ..proxy.session import Session, SessionOptions, render_summary, summary_json

    backend_sock, backend_cmd = args.backend, args.backend_cmd
    if backend_sock is None:
        backend_sock, wrapped = _wrapper_backend(args, workdir)
        backend_cmd = backend_cmd or wrapped
    cfg = ProxyConfig(backend=backend_sock, backend_cmd=backend_cmd,
                      lossless=args.lossless, snaplen=0 if args.snaplen == 0 else CAPTURE_SNAPLEN,
                      spin_us=args.poll_us)
    listener = _listener(args)
    try:
        session = Session(cfg, SessionOptions(record=args.record, control=args.control, snaplen=record["snaplen"],
                                              rotate_mb=record["rotate_mb"], rotate_keep=record["rotate_keep"],
                                              record_mode=record["mode"],
                                              backend_name=backend_cmd or backend_sock, stuck_ns=stuck,
                                              accept_clients=False))
    except OSError as e:
        _close_listener(args, listener)
        raise UserError(f"{e.filename}: {e.strerror}" if e.filename else e.strerror or str(e)) from None
    except BaseException:  # a stop signal
        _close_listener(args, listener)
        raise
    # SIGTERM (a service manager), SIGHUP (its terminal gone) and SIGINT end the run in every state, within a
    # second: the proxy's waits all watch its stop fd (see Proxy.stop).  One ignored since start (nohup) is not.
    for sig in not_ignored(signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda *_: session.proxy.stop())
    if intercept is not None:
        add_debugger(session.pipeline, intercept, session, exchange_of=session.exchange_of,
                     listener=session.on_debugger, hub=session.hub)
    # Assembled: what start-up made (modules, codecs, the filter language) lives as long as the process, so it
    # leaves the collector's generations; each full collection the capture thread triggers then walks what the
    # run made (~45 ms a collection less in-process, ~3.5 us per exchange of a 12.5k-exchange replay).
    gc.freeze()
    if session.hub is not None:  # clients get the hello of what this proxy can do
        session.hub.open_clients()
    frontend = None
    s: dict[str, Any] | None = None
    try:
        session.proxy.start_backend()
        listener.settimeout(None)
        frontend = session.proxy.accept_frontend(listener)
        if frontend is None:
            session.proxy.stats.end_reason = "stopped before QEMU connected"
        else:
            try:
                backend = session.proxy.connect_backend()
            except Cancelled:
                session.proxy.stats.end_reason = "stopped while connecting to the back-end"
                frontend.close()
                frontend = None
            except OSError as e:
                raise UserError(str(e), 1) from None
            else:
                session.run(frontend, backend)
        s = session.summary()
    finally:
        if intercept is not None:
            intercept.close()  # due delays go now; the paths already answered what was still held
        _close_listener(args, listener)
        session.proxy.shutdown()  # idempotent: after serve() it has nothing left to do
        session.close()
    if s is None:
        s = session.summary()
    if args.summary_json:
        privfile.write_file(args.summary_json, summary_json(s), args.record_mode)
    if not args.quiet:
        print(render_summary(s), file=sys.stderr)
    return 0
