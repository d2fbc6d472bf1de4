"""`fsinspect daemon --socket-path/--fd`: the vhost-user mode, with virtiofsd-compatible options.

libvirt and scripts start virtiofsd as `virtiofsd --fd=N -o source=DIR,cache=auto,xattr
--thread-pool-size=N` (C) or `--socket-path=P --shared-dir=DIR --cache=auto` (Rust); both spellings
work here.  `-o` options can repeat and be comma-joined; an unknown one is a one-line error.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from fsinspect.commands._stuck import add_stuck_option, stuck_ns
from fsinspect.errors import UserError
from fsinspect.live.addons import add_debugger
from fsinspect.live.engine import EngineSource

# The --print-capabilities answer (vhost-user.json: VhostUserBackendCapabilities for type "fs").
CAPABILITIES = json.dumps({"type": "fs"}, indent=2)

# -o KEY[=VALUE] -> (attribute, value or None when the value comes after '=').
_O_FLAGS: dict[str, tuple[str, Any]] = {
    "announce_submounts": ("announce_submounts", True),
    "no_announce_submounts": ("announce_submounts", False),
    "xattr": ("xattr", True),
    "no_xattr": ("xattr", False),
    "writeback": ("writeback", True),
    "no_writeback": ("writeback", False),
    "readonly": ("readonly", True),
    # POSIX and flock locks are always served (OFD locks); accepted so libvirt's command lines work.
    "flock": ("", None),
    "posix_lock": ("", None),
}
_O_VALUES: dict[str, str] = {"source": "shared_dir", "cache": "cache", "log_level": "log_level",
                             "inode_file_handles": "inode_file_handles", "thread_pool_size": "thread_pool_size",
                             "sandbox": "sandbox"}
_LOG_LEVELS = {"debug": "debug", "info": "info", "warn": "warning", "warning": "warning", "err": "error",
               "error": "error"}


def add_vhost_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--socket-path", metavar="PATH", help="vhost-user: listen on this Unix socket for QEMU")
    g.add_argument("--fd", type=int, metavar="N", help="vhost-user: an already listening socket fd (libvirt)")
    g.add_argument("-o", dest="o_options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="virtiofsd-style options: source=DIR, cache=none|auto|always, announce_submounts, "
                        "no_announce_submounts, xattr, no_xattr, writeback, no_writeback, readonly, "
                        "log_level=LEVEL, inode_file_handles=MODE, thread_pool_size=N, sandbox=LEVEL, flock, "
                        "posix_lock")
    g.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user backend capabilities (JSON) and exit")
    g.add_argument("-f", "--foreground", action="store_true", help="accepted for virtiofsd compatibility "
                   "(the daemon always runs in the foreground)")
    g.add_argument("-d", dest="debug", action="store_true", help="debug logging (as virtiofsd -d)")
    g.add_argument("--control", metavar="SOCK",
                   help="a control socket (0600, JSON lines) where `fsinspect attach` and scripts "
                        "follow the daemon's own traffic live, as with the proxy")
    add_stuck_option(g)
    g.add_argument("--summary-json", metavar="FILE",
                   help="write the daemon's counters (per opcode, syncfs per host st_dev) to FILE at exit")


def parse_o_options(values: list[str]) -> dict[str, Any]:
    """-o strings -> {attribute: value}; raises UserError on anything unknown."""
    out: dict[str, Any] = {}
    for v in values:
        for item in v.split(","):
            item = item.strip()
            if not item:
                continue
            key, eq, val = item.partition("=")
            if key in _O_FLAGS and not eq:
                attr, value = _O_FLAGS[key]
                if attr:
                    out[attr] = value
            elif key in _O_VALUES and eq:
                attr = _O_VALUES[key]
                if attr == "log_level":
                    if val not in _LOG_LEVELS:
                        raise UserError(f"-o log_level={val}: choose one of {', '.join(_LOG_LEVELS)}")
                    out[attr] = _LOG_LEVELS[val]
                elif attr == "thread_pool_size":
                    try:
                        out[attr] = int(val)
                    except ValueError:
                        raise UserError(f"-o thread_pool_size={val}: not a number") from None
                else:
                    out[attr] = val
            elif key in _O_VALUES:
                raise UserError(f"-o {key} needs a value: -o {key}=...")
            else:
                raise UserError(f"unknown option -o {item} (supported: {', '.join([*_O_FLAGS, *_O_VALUES])})")
    return out


def apply_o_options(args: argparse.Namespace) -> None:
    """Fold -o options (and -d) into the parsed arguments; choices are checked like the long options."""
    from fsinspect.commands.daemon import CACHE_MODES, HANDLE_MODES

    for attr, value in parse_o_options(getattr(args, "o_options", []) or []).items():
        if attr == "cache" and value not in CACHE_MODES:
            raise UserError(f"-o cache={value}: choose one of {', '.join(CACHE_MODES)}")
        if attr == "inode_file_handles" and value not in HANDLE_MODES:
            raise UserError(f"-o inode_file_handles={value}: choose one of {', '.join(HANDLE_MODES)}")
        setattr(args, attr, value)
    if getattr(args, "debug", False):
        args.log_level = "debug"
    stuck_ns(getattr(args, "stuck_ms", None))  # refused before anything starts
    if getattr(args, "stuck_ms", None) is not None and not getattr(args, "control", None):
        raise UserError("--stuck-ms applies to the --control stream (the daemon analyses its traffic for "
                        "attached clients only): add --control SOCK")


def open_source(args: argparse.Namespace, *, source: str, backend: str) -> EngineSource:
    """The engine as a live source, with the addons the command line asks for (--record, --control)."""
    from fsinspect.recording.options import open_writer

    return EngineSource(control=args.control, stuck_ns=stuck_ns(args.stuck_ms),
                        writer=open_writer(args, source=source, backend=backend),
                        capture_source="fusedev" if source == "fusedev" else "virtio",
                        accept_clients=False)  # serve_engine opens it once the debugger is in


def attach_debugger(intercept: Any, src: EngineSource) -> Any:
    """The engine's hold point, driven by `intercept` (None: no debugger, and no cost in the engine)."""
    if intercept is None:
        return None
    from daemon.hold import EngineHoldPoint

    point = EngineHoldPoint()
    live = src.analysis is not None
    add_debugger(src.pipeline, intercept, point, exchange_of=src.exchange_of if live else None,
                 listener=src.on_debugger if live else None, hub=src.hub)
    return point


def serve_engine(args: argparse.Namespace, intercept: Any, src: EngineSource, serve: Any, reason: str) -> int:
    """Run `serve(tap, hold)` (a transport's main loop, returning the engine's counters) with the live
    source and the debugger, then close them (in that order: due delays go first) and write the summary."""
    point = attach_debugger(intercept, src)
    if src.hub is not None:  # assembled: clients get the hello of what this daemon can do
        src.hub.open_clients()
    try:
        counters = serve(src.tap, point)
    finally:
        if intercept is not None:
            intercept.close()
        src.close(reason)
    return write_summary(args, counters, intercept, src)


def run_vhost(args: argparse.Namespace, intercept: Any = None, stops: Any = None) -> int:
    """Serve one QEMU connection; exit 0 when QEMU disconnects (or on SIGINT/SIGTERM)."""
    from daemon import vhost
    from daemon.transport.vhost_user import VhostUserError, listen_fd, listen_path
    from dissectors.transport.unixsock import release_socket_path
    from fsinspect.commands.daemon import fs_options

    if args.socket_path and args.fd is not None:
        raise UserError("--socket-path and --fd are alternatives: give one")
    opts = fs_options(args)
    try:
        listener = listen_fd(args.fd) if args.fd is not None else listen_path(args.socket_path)
    except OSError as e:
        raise UserError(e.strerror or str(e), status=1) from None
    try:
        src = open_source(args, source="vhost-user", backend="fsinspect daemon (passthrough, vhost-user)")
    except BaseException:  # e.g. --control names a file: leave nothing behind
        if args.socket_path:
            release_socket_path(args.socket_path, listener)
        else:
            listener.close()
        raise
    log = logging.getLogger("fsinspect.daemon")
    log.info("listening on %s", args.socket_path or f"fd {args.fd}")

    def serve(tap: Any, hold: Any) -> dict[str, Any]:
        try:
            d = vhost.run(listener, opts, pool_size=args.thread_pool_size, dispatch=args.dispatch, tap=tap,
                          socket_path=args.socket_path, hold=hold, sandbox=args.sandbox, seccomp=args.seccomp,
                          stops=stops)
        except (OSError, VhostUserError) as e:
            raise UserError(f"{getattr(e, 'strerror', None) or e}", status=1) from None
        counters = d.counters()
        log.info("counters: %s", json.dumps(counters.get("ops", {}), sort_keys=True))
        return counters

    return serve_engine(args, intercept, src, serve, "front-end closed")


def write_summary(args: argparse.Namespace, counters: dict[str, Any], intercept: Any, src: EngineSource) -> int:
    """--summary-json, for both transports: the engine's counters, the debugger's, and with --control what
    the clients saw ("live", shaped as the proxy's summary)."""
    if intercept is not None:
        counters["debugger"] = intercept.describe_counters()
    if src.counts is not None:
        counters["live"] = src.summary()
    if args.summary_json:
        from fsinspect import privfile

        privfile.write_file(args.summary_json, json.dumps(counters, indent=1, sort_keys=True, default=str),
                            args.record_mode)
    return 0
