"""`fsinspect demo`: guest + back-end + proxy + UI, all at once, torn down on quit."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .. import privfile
from ..errors import UserError


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run everything on the bundled guest and open the UI",
                       description="Builds the guest if needed, serves a share with nested tmpfs submounts "
                                   "through a back-end, puts the proxy (recording + control socket) in front, "
                                   "boots QEMU with a crud/storm/io/sync loop and attaches the UI.  Quitting "
                                   "tears everything down.  Without a TTY (or with --headless) it prints a "
                                   "summary instead.")
    p.add_argument("--backend", choices=("daemon", "virtiofsd"), default="daemon",
                   help="what serves the share behind the proxy (default: the bundled daemon)")
    p.add_argument("--loops", type=int, default=None,
                   help="passes of the workload loop (default: 1 headless, until quit with the UI; 0 = until quit)")
    p.add_argument("--headless", action="store_true", help="no UI: run and print a summary")
    p.add_argument("--record", type=Path, help="where the recording goes (default under ~/.cache/fsinspect/demo)")
    p.add_argument("--storm", type=int, default=300, help="files per metadata storm (default 300)")
    p.add_argument("--io-mb", type=int, default=16, help="MiB per dd (default 16)")
    p.add_argument("--log", type=Path, help="also append progress and the final summary to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoInterrupted, DemoOptions, install_signal_handlers, render, run_demo

    headless = args.headless or not (sys.stdin.isatty() and sys.stdout.isatty())
    loops = args.loops if args.loops is not None else (1 if headless else 0)
    if loops < 0 or args.storm < 1 or args.io_mb < 1:
        raise UserError("--loops must be >= 0, --storm and --io-mb >= 1")
    opts = DemoOptions(backend=args.backend, loops=loops, storm_n=args.storm, io_mb=args.io_mb,
                       record=args.record, headless=headless)

    def progress(msg: str) -> None:
        print(f"demo: {msg}", file=sys.stderr, flush=True)
        if args.log is not None:
            with os.fdopen(privfile.open_append(args.log), "a") as f:  # 0600 if new: guest names
                print(f"demo: {msg}", file=f)

    ui = None
    if not headless:
        def ui(ctrl: Path) -> int:
            from ..tui.app import run_attach

            return run_attach(str(ctrl), title=f"fsinspect demo ({args.backend})")
    from ..guest.build import BuildError
    from ..guest.launcher import LaunchError

    install_signal_handlers()
    try:
        result = run_demo(opts, progress, ui)
    except (LaunchError, BuildError) as e:
        raise UserError(str(e), 1) from None
    except DemoInterrupted as e:
        progress(f"stopped by {e}; everything torn down")
        return 128 + 15
    text = render(result)
    print(text)
    if args.log is not None:
        with os.fdopen(privfile.open_append(args.log), "a") as f:  # 0600 if new: guest names
            print(text, file=f)
    g = result.guest
    ok = g is not None and (g.ok or result.quit_by_user)
    return 0 if ok and not result.error else 1
