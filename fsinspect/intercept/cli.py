"""`--break EXPR`, `--inject EXPR OPTION=VALUE...` and `--seed N`, shared by `fsinspect proxy` and `daemon`.

Every rule is compiled when the command line is read: a bad one is refused (with a caret under the
problem) before a socket is opened or anything is mounted.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:  # imported when a rule or a control socket needs them: a plain run pays nothing
    from .addon import Intercept
    from .rules import Rule


def add_intercept_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("debugger (hold points; see README: debugging tour)")
    g.add_argument("--break", dest="breaks", action="append", default=[], nargs="+", metavar=("EXPR", "OPTION"),
                   help="hold what matches the filter EXPR until a client (fsinspect attach, a script on "
                        "--control) releases, answers, delays or rewrites it; on=reply holds the reply")
    g.add_argument("--inject", dest="injects", action="append", default=[], nargs="+",
                   metavar=("EXPR", "OPTION"),
                   help="fault injection on what matches EXPR: errno=ENOENT answers it (the back-end never sees "
                        "it), delay=200ms forwards it late, reply-errno=EIO rewrites the back-end's reply; "
                        "count=N fires N times, p=0.01 with that probability (see --seed)")
    g.add_argument("--seed", type=int, metavar="N",
                   help="seed for the p= rules, so a run is reproducible (default: random)")


def rules_from_args(args: argparse.Namespace) -> list[Rule]:
    """The --break and --inject rules in command-line order within each kind; UserError with a caret."""
    out: list[Rule] = []
    if not (getattr(args, "breaks", None) or getattr(args, "injects", None)):
        return out
    from .rules import BREAK, INJECT, RuleError, rule_from_args

    try:
        out.extend(rule_from_args(BREAK, parts) for parts in getattr(args, "breaks", None) or [])
        out.extend(rule_from_args(INJECT, parts) for parts in getattr(args, "injects", None) or [])
    except RuleError as e:
        raise UserError(str(e)) from None
    return out


def intercept_from_args(args: argparse.Namespace) -> Intercept | None:
    """An Intercept with the command line's rules, or None when there are none and no client can add any."""
    rules = rules_from_args(args)
    if not rules and not getattr(args, "control", None):
        return None
    from .addon import Intercept

    return Intercept(rules, seed=getattr(args, "seed", None))
