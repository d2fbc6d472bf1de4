"""`fsinspect attach CTRL_SOCK`: the Textual UI live on a proxy's (or daemon's) control socket."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UserError


def register(sub: Any) -> None:
    p = sub.add_parser("attach", help="watch a running proxy live in the UI",
                       description="Attach the Textual UI to the control socket of `fsinspect proxy --control "
                                   "SOCK`.  Any number of UIs may attach; a slow one never slows the proxy "
                                   "(it is told how many messages it missed).")
    p.add_argument("ctrl", metavar="CTRL_SOCK", help="the proxy's --control socket")
    p.add_argument("--title", default=None, help="title shown in the header")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tui.app import run_attach  # textual loads only for the UI commands

    try:
        return run_attach(args.ctrl, title=args.title)
    except ConnectionError as e:
        raise UserError(str(e)) from None
