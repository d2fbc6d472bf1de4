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
from fsinspect.live.engine import ControlTap, _both

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


def attach_debugger(intercept: Any, ctl: ControlTap | None) -> Any:
    """The engine's hold point, driven by `intercept` (None: no debugger, and no cost in the engine)."""
    if intercept is None:
        return None
    from daemon.hold import EngineHoldPoint
    from fsinspect.intercept.cli import wire

    point = EngineHoldPoint()
    if ctl is None:
        wire(intercept, point)
    else:
        wire(intercept, point, exchange_of=ctl.exchange_of, listener=ctl.on_debugger, hub=ctl.hub)
    return point


def run_vhost(args: argparse.Namespace, intercept: Any = None) -> int:
    """Serve one QEMU connection; exit 0 when QEMU disconnects (or on SIGINT/SIGTERM)."""
    from daemon import vhost
    from daemon.transport.vhost_user import VhostUserError, listen_fd, listen_path
    from dissectors.transport.unixsock import release_socket_path
    from fsinspect.commands.daemon import fs_options
    from fsinspect.recording.options import open_tap

    if args.socket_path and args.fd is not None:
        raise UserError("--socket-path and --fd are alternatives: give one")
    opts = fs_options(args)
    try:
        listener = listen_fd(args.fd) if args.fd is not None else listen_path(args.socket_path)
    except OSError as e:
        raise UserError(e.strerror or str(e), status=1) from None
    rec = ctl = None
    try:
        rec = open_tap(args, source="vhost-user", backend="fsinspect daemon (passthrough, vhost-user)")
        ctl = ControlTap(args.control, stuck_ns(args.stuck_ms)) if args.control else None
    except BaseException:  # e.g. --control names a file: leave nothing behind
        if rec is not None:
            rec.close()
        if args.socket_path:
            release_socket_path(args.socket_path, listener)
        else:
            listener.close()
        raise
    tap: Any = _both(rec, ctl) if rec is not None and ctl is not None else (rec or ctl)
    point = attach_debugger(intercept, ctl)
    log = logging.getLogger("fsinspect.daemon")
    log.info("listening on %s", args.socket_path or f"fd {args.fd}")
    try:
        d = vhost.run(listener, opts, pool_size=args.thread_pool_size, dispatch=args.dispatch, tap=tap,
                      socket_path=args.socket_path, hold=point, sandbox=args.sandbox, seccomp=args.seccomp)
    except (OSError, VhostUserError) as e:
        raise UserError(f"{getattr(e, 'strerror', None) or e}", status=1) from None
    finally:
        if intercept is not None:
            intercept.close()
        if rec is not None:
            rec.close()
        if ctl is not None:
            ctl.close()
    counters = d.counters()
    log.info("counters: %s", json.dumps(counters.get("ops", {}), sort_keys=True))
    return write_summary(args, counters, intercept, ctl)


def write_summary(args: argparse.Namespace, counters: dict[str, Any], intercept: Any, ctl: ControlTap | None) -> int:
    """--summary-json, for both transports: the engine's counters, the debugger's, and with --control what
    the clients saw ("live", shaped as the proxy's summary)."""
    if intercept is not None:
        counters["debugger"] = intercept.describe_counters()
    if ctl is not None:
        counters["live"] = ctl.summary()
    if args.summary_json:
        from fsinspect import privfile

        privfile.write_file(args.summary_json, json.dumps(counters, indent=1, sort_keys=True, default=str),
                            args.record_mode)
    return 0
