"""`fsinspect extcap`: Wireshark's extcap interface, so Wireshark and tshark capture virtio-fs live.

Wireshark runs every program in its extcap folders with `--extcap-interfaces`, then per interface
`--extcap-dlts` and `--extcap-config`, validates a capture filter with `--extcap-capture-filter` alone,
and captures with `--capture --extcap-interface NAME --fifo PATH`, stopping it with SIGTERM.  Each control
socket fsinspect.live.registry knows is one interface; a capture is `fsinspect attach --format pcapng`
into the FIFO (the blocks of a recording, link type 252, decoded by fuse.lua).  The capture filter (and the
`--filter` option Wireshark's dialog offers) is fsinspect's filter language.

`fsinspect extcap --install` puts a launcher in the user's personal extcap folder and fuse.lua in the
personal Lua plugins folder, as `tshark -G folders` names them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError

EXTCAP_VERSION = "1.0"
LAUNCHER = "fsinspect-extcap"
LUA_NAME = "fsinspect-fuse.lua"


def register(sub: Any) -> None:
    p = sub.add_parser("extcap", help="Wireshark live capture (extcap); --install sets it up",
                       description="Wireshark's extcap interface: every running proxy's or daemon's --control "
                                   "socket (and those named in $FSINSPECT_CONTROL or "
                                   "~/.config/fsinspect/control-sockets) is a capture interface.  Run "
                                   "`fsinspect extcap --install` once, then `tshark -D` lists them and "
                                   "`tshark -i fsinspect-NAME` captures live.")
    p.add_argument("--install", action="store_true",
                   help="install the extcap launcher and the fuse.lua dissector in your Wireshark folders")
    p.add_argument("--no-lua", action="store_true", help="with --install: the launcher only, not fuse.lua")
    p.add_argument("--list", action="store_true", help="print the interfaces and their sockets (for people)")
    g = p.add_argument_group("the extcap protocol (what Wireshark calls)")
    g.add_argument("--extcap-interfaces", action="store_true")
    g.add_argument("--extcap-version", default=None)
    g.add_argument("--extcap-interface", default=None)
    g.add_argument("--extcap-dlts", action="store_true")
    g.add_argument("--extcap-config", action="store_true")
    g.add_argument("--extcap-reload-option", default=None)
    g.add_argument("--extcap-capture-filter", default=None)
    g.add_argument("--extcap-control-in", default=None)
    g.add_argument("--extcap-control-out", default=None)
    g.add_argument("--extcap-cleanup-postkill", action="store_true")
    g.add_argument("--capture", action="store_true")
    g.add_argument("--fifo", default=None)
    g.add_argument("--filter", default=None, help="an fsinspect filter expression (the dialog's option)")
    g.add_argument("--debug", action="store_true")
    g.add_argument("--debug-file", default=None)
    p.set_defaults(func=run)


def _out(lines: list[str]) -> int:
    sys.stdout.write("".join(f"{x}\n" for x in lines))
    sys.stdout.flush()
    return 0


def _expression(args: argparse.Namespace) -> str | None:
    parts = [e for e in (args.extcap_capture_filter, args.filter) if e and e.strip()]
    return " and ".join(f"({e})" for e in parts) if len(parts) > 1 else (parts[0] if parts else None)


def run(args: argparse.Namespace) -> int:
    from ..live import registry

    if args.install:
        return install(no_lua=args.no_lua)
    if args.list:
        eps = registry.discover()
        return _out([f"{ep.name}\t{ep.path}\t{ep.how}{'' if ep.up else ' (down)'}" for ep in eps]
                    or [f"no control sockets: start `fsinspect proxy ... --control SOCK`, or name one in "
                        f"${registry.ENV_SOCKETS}"])
    if args.extcap_interfaces:
        lines = [f"extcap {{version={EXTCAP_VERSION}}}{{help=https://github.com/fsinspect/fsinspect}}"]
        for ep in registry.discover():
            lines.append(f"interface {{value={ep.name}}}{{display=fsinspect (virtio-fs/FUSE): {ep.path}}}")
        return _out(lines)
    if args.extcap_interface is None:
        raise UserError("say what to do: --install, --list, or the extcap protocol's --extcap-interfaces / "
                        "--extcap-interface NAME with --extcap-dlts, --extcap-config or --capture --fifo PATH")
    if args.extcap_dlts:
        return _out(["dlt {number=252}{name=WIRESHARK_UPPER_PDU}{display=FUSE messages (fsinspect exported PDUs)}"])
    if args.extcap_config:
        return _out(["arg {number=0}{call=--filter}{display=fsinspect filter}{type=string}"
                     "{tooltip=only exchanges that match, e.g. op == SYNCFS or error != 0}{group=Capture}"])
    expr = _expression(args)
    if not args.capture:
        if args.extcap_capture_filter is not None:  # Wireshark validates: nothing on stdout means valid
            from ..analysis import FilterError, compile_filter

            try:
                compile_filter(args.extcap_capture_filter)
            except FilterError as e:
                return _out([str(e).splitlines()[0]])
            return 0
        raise UserError("--extcap-interface goes with --extcap-dlts, --extcap-config or --capture --fifo PATH")
    if args.fifo is None:
        raise UserError("--capture needs --fifo PATH")
    found = registry.find(args.extcap_interface)
    if found is None:
        raise UserError(f"no interface {args.extcap_interface!r} (is its proxy or daemon still running? "
                        "`fsinspect extcap --list`)")
    if not found.up:  # say so before opening the FIFO (that waits for Wireshark's reader)
        raise UserError(f"cannot connect to {found.path}: no socket there (is its proxy or daemon running?)")
    from .attach import run_headless

    try:
        fd = os.open(args.fifo, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise UserError(f"--fifo {args.fifo}: {e.strerror or e}") from None
    try:
        return run_headless(found.path, "pcapng", expr, None, stream=fd, who="fsinspect extcap", quiet=True)
    finally:
        os.close(fd)


def wireshark_folders() -> dict[str, str]:
    """`tshark -G folders` as a dict ("Personal Lua Plugins" -> path, ...)."""
    try:
        res = subprocess.run(["tshark", "-G", "folders"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"cannot run `tshark -G folders` to find your Wireshark folders: {e}") from None
    out: dict[str, str] = {}
    for line in res.stdout.splitlines():
        m = re.match(r"([^:]+):\s+(.*)$", line)
        if m:
            out.setdefault(m.group(1).strip(), m.group(2).strip())
    return out


def install(*, no_lua: bool = False) -> int:
    folders = wireshark_folders()
    # Wireshark 4.2+ prints its personal extcap folder; 4.0 (Debian 12) looks in <personal config>/extcap.
    extcap = folders.get("Personal Extcap path")
    if extcap is None:
        conf = folders.get("Personal configuration")
        if conf is None:
            raise UserError("`tshark -G folders` names no personal folders: is Wireshark (tshark) installed?")
        extcap = os.path.join(conf, "extcap")
    Path(extcap).mkdir(parents=True, exist_ok=True)
    launcher = Path(extcap) / LAUNCHER
    tmp = launcher.with_name(f".{LAUNCHER}.{os.getpid()}")
    tmp.write_text(f"#!/bin/sh\n# installed by `fsinspect extcap --install`\nexec {sys.executable!s} -m fsinspect "
                   "extcap \"$@\"\n")
    tmp.chmod(0o755)
    os.replace(tmp, launcher)
    done = [f"extcap launcher: {launcher}"]
    if not no_lua:
        from ..recording.lua import generate

        plugins = folders.get("Personal Lua Plugins")
        if plugins is None:
            raise UserError("`tshark -G folders` names no personal Lua plugins folder")
        Path(plugins).mkdir(parents=True, exist_ok=True)
        lua = Path(plugins) / LUA_NAME
        lua.write_text(generate())
        done.append(f"dissector: {lua} (do not also pass -X lua_script:recordings/fuse.lua: it would load twice)")
    done.append("now `tshark -D` lists a fsinspect-... interface per running --control socket")
    return _out(done)
