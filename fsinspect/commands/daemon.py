"""`fsinspect daemon`: the bundled passthrough daemon.

`--standalone MOUNTPOINT` serves --shared-dir over raw /dev/fuse on this host.  The vhost-user mode
(`--socket-path`, virtiofsd-style `-o` options) is added by the vhost-user transport; the options here
are grouped so those slot in beside them.

If the daemon is killed, the dead mount is removed with `fusermount3 -u MOUNTPOINT` (or, as root,
`umount -l MOUNTPOINT`).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from fsinspect.cli import UserError
from fsinspect.commands._daemon_vhost import (
    CAPABILITIES,
    add_vhost_options,
    apply_o_options,
    open_source,
    run_vhost,
    serve_engine,
)
from fsinspect.intercept.cli import add_intercept_options, intercept_from_args
from fsinspect.recording.options import add_record_options

CACHE_MODES = ("none", "auto", "always", "metadata")
HANDLE_MODES = ("never", "prefer", "mandatory")


def add_fs_options(p: argparse.ArgumentParser) -> None:
    """Filesystem options shared by every transport."""
    g = p.add_argument_group("filesystem")
    g.add_argument("--shared-dir", metavar="DIR", help="host directory to export")
    g.add_argument("--cache", choices=CACHE_MODES, default="auto",
                   help="none: no guest caching; auto: 1 s timeouts, data cached while open; always: cache "
                        "forever; metadata: cache metadata forever, data never (default: auto)")
    g.add_argument("--inode-file-handles", choices=HANDLE_MODES, default="prefer",
                   help="hold inodes by file handle instead of an O_PATH fd each (default: prefer)")
    g.add_argument("--announce-submounts", dest="announce_submounts", action="store_true", default=True,
                   help="set FUSE_ATTR_SUBMOUNT on host mount points (default)")
    g.add_argument("--no-announce-submounts", dest="announce_submounts", action="store_false")
    g.add_argument("--writeback", action="store_true", help="enable the guest writeback cache")
    g.add_argument("--xattr", action="store_true", help="serve extended attributes")
    g.add_argument("--readonly", action="store_true", help="reject every modification with EROFS")
    g.add_argument("--thread-pool-size", type=int, default=8, metavar="N",
                   help="threads for blocking ops (READ, WRITE, fsync, syncfs, ...) (default: 8)")
    g.add_argument("--sandbox", choices=("namespace", "chroot", "none"), default=None,
                   help="confine the threads that serve the guest: namespace = private mount namespace with the "
                        "shared dir as its root (pivot_root); chroot = chroot into it; none = the name checks "
                        "only.  Every level but none drops the capabilities passthrough does not need "
                        "(default: namespace as root, as virtiofsd; none otherwise)")
    g.add_argument("--seccomp", choices=("kill", "log", "none"), default=None,
                   help="with a --sandbox: allow only the system calls the serving threads make; kill = any "
                        "other one kills the daemon, log = the kernel's audit log records it (default: kill, "
                        "as virtiofsd)")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def register(sub: Any) -> None:
    p = sub.add_parser("daemon", help="run the bundled passthrough daemon",
                       description="The bundled passthrough daemon.  --standalone mounts the shared directory "
                                   "on this host through /dev/fuse.  If the daemon is killed, remove the dead "
                                   "mount with `fusermount3 -u MOUNTPOINT` (or `umount -l MOUNTPOINT`).")
    t = p.add_argument_group("transport")
    t.add_argument("--standalone", metavar="MOUNTPOINT", help="serve over /dev/fuse, mounted at MOUNTPOINT")
    t.add_argument("--passthrough", choices=("auto", "on", "off"), default="auto",
                   help="--standalone: FUSE passthrough (Linux 6.9+): the kernel reads and writes open files "
                        "itself, so their READ/WRITE never reach the daemon, the recording or the debugger.  "
                        "auto: on unless --record, --control, --break or --inject asks to see them; on: even "
                        "then (files open while a rule can hold READ/WRITE are still served through the daemon) "
                        "(default: auto)")
    t.add_argument("--uring", choices=("auto", "on", "off"), default="auto",
                   help="--standalone: FUSE over io_uring (Linux 6.14+): one ring per CPU carries the requests, "
                        "one system call per request instead of a read and a write on /dev/fuse.  auto: when the "
                        "fuse module's enable_uring parameter is on; on: turn that parameter on (root; it applies "
                        "to every FUSE mount of the host) and fail if that cannot be; off: /dev/fuse only "
                        "(default: auto)")
    add_vhost_options(t)
    # Standalone reader threads, sharing the /dev/fuse fd or each with a clone of it (bench/standalone.py
    # measures both against one reader).
    t.add_argument("--readers", type=int, default=1, metavar="N", help=argparse.SUPPRESS)
    t.add_argument("--clone-fd", action="store_true", help=argparse.SUPPRESS)
    # The concurrency model (bench/standalone.py measures inline+pool against a plain pool).
    t.add_argument("--dispatch", choices=("inline+pool", "pool", "inline"), default="inline+pool",
                   help=argparse.SUPPRESS)
    add_fs_options(p)
    add_record_options(p)
    add_intercept_options(p)
    p.set_defaults(func=run)


def fs_options(args: argparse.Namespace) -> Any:
    from daemon.passthrough import CacheMode, HandleMode, Options

    if not args.shared_dir:
        raise UserError("--shared-dir DIR is required")
    if not os.path.isdir(args.shared_dir):
        raise UserError(f"--shared-dir {args.shared_dir}: not a directory")
    if args.thread_pool_size < 1:
        raise UserError("--thread-pool-size must be at least 1")
    from daemon import sandbox

    if args.sandbox is None:
        args.sandbox = sandbox.default_level()
    try:
        sandbox.check(args.sandbox)
    except sandbox.SandboxError as e:
        raise UserError(e.strerror or str(e)) from None
    args.seccomp = seccomp_action(args.sandbox, args.seccomp)
    return Options(os.path.abspath(args.shared_dir), cache=CacheMode(args.cache),
                   inode_file_handles=HandleMode(args.inode_file_handles),
                   announce_submounts=args.announce_submounts, writeback=args.writeback, xattr=args.xattr,
                   readonly=args.readonly)


def seccomp_action(level: str, asked: str | None) -> str:
    """The --seccomp action: kill by default under a sandbox; a filter is part of the sandbox."""
    if level == "none":
        if asked not in (None, "none"):
            raise UserError(f"--seccomp {asked} is part of the sandbox: add --sandbox namespace or chroot")
        return "none"
    if asked == "none":
        return "none"
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, OSError) as e:  # not installed, or libseccomp2 missing
        if asked is not None:
            raise UserError(f"--seccomp {asked} needs pyseccomp and libseccomp2 ({e}): pip install pyseccomp, "
                            "apt install libseccomp2") from None
        logging.getLogger("fsinspect.daemon").warning("no seccomp filter: %s (pip install pyseccomp)", e)
        return "none"
    return asked or "kill"


def passthrough_wanted(args: argparse.Namespace, intercept: Any) -> bool:
    """--passthrough auto is on only when nothing asked to see the data: a passthrough file's READ and
    WRITE go from the kernel to the host file, past the recording, the clients and the rules."""
    log = logging.getLogger("fsinspect.daemon")
    watchers = [o for o, on in (("--record", args.record), ("--control", args.control),
                                ("--break/--inject", intercept is not None)) if on]
    if args.passthrough == "off":
        return False
    if args.passthrough == "auto" and watchers:
        log.info("passthrough off: %s should see every READ/WRITE (--passthrough on to have it anyway)",
                 ", ".join(watchers))
        return False
    if watchers:
        log.warning("--passthrough on: READ/WRITE of files open in passthrough are not seen by %s",
                    ", ".join(watchers))
    return True


def uring_wanted(args: argparse.Namespace, intercept: Any) -> bool:
    """--uring auto stays on /dev/fuse where a debugger rule may hold requests (--break/--inject, or
    --control, whose clients add rules): a held request keeps one of its queue's few ring entries, and
    once all are held the kernel queues that CPU's other requests behind them; /dev/fuse keeps reading."""
    from daemon.transport import uring
    from daemon.transport.fusedev import FuseDevError

    log = logging.getLogger("fsinspect.daemon")
    if args.uring == "auto" and intercept is not None:
        log.info("FUSE over io_uring off: a debugger rule may hold requests, and each would keep one of the %d ring "
                 "entries of its CPU's queue (--uring on to have it anyway)", uring.DEPTH)
        return False
    try:
        use = uring.decide(args.uring)
    except FuseDevError as e:
        raise UserError(str(e.strerror or e), status=1) from None
    if use and intercept is not None:
        log.warning("--uring on with debugger rules: each held request keeps one of the %d ring entries of its "
                    "CPU's queue; once all are held, that CPU's other requests wait behind them", uring.DEPTH)
    return use


def run(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(CAPABILITIES)
        return 0
    apply_o_options(args)
    intercept = intercept_from_args(args)  # every rule is checked before anything starts
    if args.breaks and not args.control:
        raise UserError("--break holds until a client decides: add --control SOCK (fsinspect attach or a script "
                        "releases it), or use --inject for what needs no client")
    logging.basicConfig(level=args.log_level.upper(), format="fsinspect daemon: %(levelname)s %(message)s")
    from daemon.mainloop import StopSignals

    with StopSignals() as stops:  # from before the socket or the mount exists, so a signal never orphans them
        return _run(args, intercept, stops)


def _run(args: argparse.Namespace, intercept: Any, stops: Any) -> int:
    if args.socket_path or args.fd is not None:
        if args.standalone:
            raise UserError("--standalone and --socket-path/--fd are different transports: choose one")
        if args.passthrough == "on":
            raise UserError("--passthrough is for --standalone: a virtio-fs guest's kernel cannot open the "
                            "host's files")
        if args.uring == "on":
            raise UserError("--uring is for --standalone: a virtio-fs guest's requests come over virtqueues")
        return run_vhost(args, intercept, stops)
    if not args.standalone:
        raise UserError("choose a transport: --socket-path PATH or --fd N (vhost-user), or --standalone MOUNTPOINT")
    opts = fs_options(args)
    opts.passthrough = passthrough_wanted(args, intercept)
    from daemon import standalone
    from daemon.transport.fusedev import FuseDevError

    use_uring = uring_wanted(args, intercept)

    src = open_source(args, source="fusedev", backend="fsinspect daemon --standalone (passthrough)")

    def serve(tap: Any, hold: Any) -> dict[str, Any]:
        served: list[standalone.Standalone] = []
        try:
            standalone.run(args.standalone, opts, readers=args.readers, clone_fd=args.clone_fd,
                           pool_size=args.thread_pool_size, dispatch=args.dispatch, tap=tap, hold=hold,
                           sandbox=args.sandbox, seccomp=args.seccomp, ready=served.append, stops=stops,
                           use_uring=use_uring)
        except FuseDevError as e:
            raise UserError(str(e.strerror or e), status=1) from None
        except OSError as e:
            raise UserError(f"{e.strerror or e}", status=1) from None
        return served[0].server.counters() if served else {}

    return serve_engine(args, intercept, src, serve, "unmounted")
