"""Rule specs for the debugger: `--break EXPR` and `--inject 'EXPR' errno=ENOENT|delay=200ms|reply-errno=EIO`.

A rule is a filter expression (fsinspect/analysis/filter.py) followed by options:

    op == MKDIR                                        break: hold until a client decides
    'op == LOOKUP and name == "victim"' errno=ENOENT   answer the request with ENOENT (back-end never sees it)
    op == GETATTR delay=300ms count=1                  forward it 300 ms late, once
    op == READ reply-errno=EIO p=0.1                   let the back-end answer, then turn 10 % of replies into EIO
    op == READ on=reply                                break on the reply instead of the request

Options: errno=NAME|N, reply-errno=NAME|N, delay=N(ns|us|ms|s) (a bare number is ms), count=N (the rule
retires after N hits), p=P (0 < P <= 1, seeded with --seed), on=request|reply (break and delay rules).
errno= may come with delay= (answer late); reply-errno= may come with delay= (rewrite late).

Every problem raises RuleError, a FilterError whose caret points into the rule as the user wrote it, so
`fsinspect proxy`/`daemon` refuse a bad rule before anything starts, and the control socket says why.
The rule compiles to the data path's native prefilter (HoldRule: direction, queues, opcodes) from what the
expression pins; the whole expression is evaluated in Python on every held capture.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from dissectors.ring import HOLD_REPLY, HOLD_REQUEST, HoldRule
from dissectors.spec import fuse as spec

from ..analysis.filter import FilterError, Predicate, compile_filter, filter_pins

BREAK, INJECT = "break", "inject"
OPTIONS = ("errno", "reply-errno", "delay", "count", "p", "on")
MAX_DELAY_NS = 3600 * 1_000_000_000  # an hour: longer is a breakpoint, not a delay
_ERRNO = spec.ERRNO.by_name()
_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
# Ops without a reply: they can be held and released (or dropped), never answered or rewritten.
NO_REPLY_OPS = frozenset(o.value for o in spec.OPCODES if o.reply is None)
REPLY_OPS = frozenset(o.value for o in spec.OPCODES) - NO_REPLY_OPS
# A token: runs of non-space text, 'single' or "double" quoted parts (shell-like, so `shlex.join` output
# parses back), with the column where it starts.
_TOKEN = re.compile(r"""(?:[^\s'"]+|'[^']*'|"(?:[^"\\]|\\.)*")+""")
_OPTION = re.compile(r"([A-Za-z][A-Za-z_-]*)=(?!=)(.*)", re.S)


class RuleError(FilterError):
    """A rule that does not parse or make sense; the caret points into the whole rule text."""


@dataclass(frozen=True)
class Rule:
    """One compiled rule (immutable; the Intercept keeps the running hit counts)."""

    text: str  # the rule as written (one line, shell-quoted expression)
    kind: str  # BREAK or INJECT
    expr: str
    predicate: Predicate
    errno: int | None = None  # answer the request with this error
    reply_errno: int | None = None  # rewrite the back-end's reply into this error
    delay_ns: int = 0
    count: int | None = None  # retire after this many hits
    p: float | None = None  # fire with this probability
    direction: int = HOLD_REQUEST
    opcodes: frozenset[int] = frozenset()  # the prefilter; empty = every opcode
    queues: int = 0  # bitmask; 0 = every queue

    @property
    def action(self) -> str:
        """break, answer, delay or rewrite: what a hit does."""
        if self.errno is not None:
            return "answer"
        if self.reply_errno is not None:
            return "rewrite"
        if self.delay_ns:
            return "delay"
        return "break"

    def hold_rule(self) -> HoldRule:
        return HoldRule(self.direction, self.queues, self.opcodes)

    def describe(self) -> str:
        """`op == LOOKUP and name == "victim"` errno=ENOENT count=1: the canonical one-line form."""
        opts = []
        if self.errno is not None:
            opts.append(f"errno={errno_name(self.errno)}")
        if self.reply_errno is not None:
            opts.append(f"reply-errno={errno_name(self.reply_errno)}")
        if self.delay_ns:
            opts.append(f"delay={_fmt_delay(self.delay_ns)}")
        if self.direction == HOLD_REPLY and self.reply_errno is None:
            opts.append("on=reply")
        if self.count is not None:
            opts.append(f"count={self.count}")
        if self.p is not None:
            opts.append(f"p={self.p:g}")
        return " ".join([shlex.quote(self.expr) if opts else self.expr, *opts])


def errno_name(n: int) -> str:
    return spec.ERRNO.name_of(n) or str(n)


def _fmt_delay(ns: int) -> str:
    for unit, mult in (("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)):
        if ns % mult == 0:
            return f"{ns // mult}{unit}"
    return f"{ns}ns"


def parse_errno(value: str) -> int:
    """ENOENT, enoent, 2 -> 2; ValueError with the reason otherwise."""
    v = value.strip()
    if re.fullmatch(r"\d+", v):
        n = int(v)
        if not 1 <= n <= 4095:
            raise ValueError(f"errno {n} is outside 1..4095")
        return n
    n2 = _ERRNO.get(v.upper())
    if n2 is None:
        raise ValueError(f"unknown errno name {v!r} (e.g. ENOENT, EIO, EACCES, or a number)")
    return n2


def parse_delay(value: str) -> int:
    """200ms, 1.5s, 300 (ms) -> nanoseconds; ValueError with the reason otherwise."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s)?", value.strip())
    if m is None:
        raise ValueError(f"delay {value!r} is not a duration (e.g. 200ms, 1.5s)")
    ns = int(float(m.group(1)) * _UNITS[m.group(2) or "ms"])
    if ns <= 0:
        raise ValueError("a delay must be longer than 0")
    if ns > MAX_DELAY_NS:
        raise ValueError("a delay over an hour is a breakpoint: use --break")
    return ns


def _tokens(text: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group()) for m in _TOKEN.finditer(text)]


def parse_rule(text: str, kind: str | None = None) -> Rule:
    """Compile one rule from its one-line text (`EXPR [OPTION=VALUE ...]`); RuleError on any problem.

    `kind` None (the control socket's add-rule): a break without errno=/delay=/reply-errno=, else an inject.
    """
    toks = _tokens(text)
    inside = bytearray(len(text))
    for start, t in toks:
        inside[start:start + len(t)] = b"\1" * len(t)
    stray = next((i for i, c in enumerate(text) if not inside[i] and not c.isspace()), None)
    if stray is not None:  # only an unmatched quote escapes the tokenizer
        raise RuleError("unbalanced quote", text, stray + 1)
    if not toks:
        raise RuleError("empty rule (expected a filter expression, e.g. op == LOOKUP)", text, 1)
    if toks[0][1][0] == "'":  # a shell-quoted expression: everything after it is options
        first_opt = 1
    else:
        first_opt = next((i for i, (_, t) in enumerate(toks) if _OPTION.fullmatch(t) and t[0] not in "'\""),
                         len(toks))
    if first_opt == 0:
        raise RuleError("a rule starts with a filter expression (e.g. op == LOOKUP), then its options", text, 1)
    start = toks[0][0]
    end = toks[first_opt - 1][0] + len(toks[first_opt - 1][1])
    expr, col0 = text[start:end], start
    if first_opt == 1 and expr[0] == "'":  # one shell-quoted expression: unquote it
        try:
            (expr,) = shlex.split(expr)
        except ValueError as e:
            raise RuleError(f"bad quoting: {e}", text, start + 1) from None
        col0 = start + 1
    try:
        predicate = compile_filter(expr)
    except FilterError as e:
        raise RuleError(e.message, text, col0 + e.column) from None
    opts: dict[str, tuple[str, int]] = {}
    for col, tok in toks[first_opt:]:
        m = _OPTION.fullmatch(tok)
        if m is None or tok[0] in "'\"":
            raise RuleError(f"expected OPTION=VALUE after the expression, not {tok!r} (quote an expression "
                            "that has spaces: 'op == LOOKUP and name == \"x\"')", text, col + 1)
        key = m.group(1).lower().replace("_", "-")
        if key not in OPTIONS:
            raise RuleError(f"unknown option {m.group(1)!r} (options: {', '.join(OPTIONS)})", text, col + 1)
        if key in opts:
            raise RuleError(f"{key}= given twice", text, col + 1)
        value = m.group(2)
        if value[:1] in "'\"":
            value = value[1:-1]
        opts[key] = (value, col + len(m.group(1)) + 2)
    return _build(text, kind, expr, predicate, opts, col0 + 1)


def _build(text: str, kind: str | None, expr: str, predicate: Predicate, opts: dict[str, tuple[str, int]],
           expr_col: int) -> Rule:
    def err(key: str, msg: str) -> RuleError:
        return RuleError(msg, text, opts[key][1] if key in opts else 1)

    def value(key: str, conv: object) -> object:
        try:
            return conv(opts[key][0])  # type: ignore[operator]
        except ValueError as e:
            raise err(key, f"{key}=: {e}") from None

    errno_ = value("errno", parse_errno) if "errno" in opts else None
    reply_errno = value("reply-errno", parse_errno) if "reply-errno" in opts else None
    delay = value("delay", parse_delay) if "delay" in opts else 0
    count = None
    if "count" in opts:
        raw = opts["count"][0]
        if not raw.isdigit() or int(raw) < 1:
            raise err("count", f"count=: {raw!r} is not a whole number >= 1")
        count = int(raw)
    p = None
    if "p" in opts:
        try:
            p = float(opts["p"][0])
        except ValueError:
            raise err("p", f"p=: {opts['p'][0]!r} is not a probability") from None
        if not 0 < p <= 1:
            raise err("p", f"p=: {p:g} is outside (0, 1]")
    assert isinstance(errno_, int | None) and isinstance(reply_errno, int | None) and isinstance(delay, int)
    if kind is None:
        kind = BREAK if errno_ is None and reply_errno is None and not delay else INJECT
    on = opts.get("on", ("", 0))[0].lower()
    if "on" in opts and on not in ("request", "reply"):
        raise err("on", f"on=: {on!r}: choose request or reply")
    if errno_ is not None and reply_errno is not None:
        raise err("reply-errno", "errno= answers the request, reply-errno= rewrites the reply: choose one")
    if kind == BREAK and (errno_ is not None or reply_errno is not None or delay):
        key = next(k for k in ("errno", "reply-errno", "delay") if k in opts)
        raise err(key, f"--break holds until a client decides; {key}= belongs to --inject")
    if kind == INJECT and errno_ is None and reply_errno is None and not delay:
        raise RuleError("--inject needs what to do: errno=E (answer), delay=T (forward late) or reply-errno=E "
                        "(rewrite the reply); use --break to hold", text, len(text) + 1)
    if errno_ is not None and on == "reply":
        raise err("on", "errno= answers the request itself: there is no reply to hold (use reply-errno=)")
    if reply_errno is not None and on == "request":
        raise err("on", "reply-errno= rewrites the reply: it holds the reply, not the request")
    direction = HOLD_REPLY if reply_errno is not None or on == "reply" else HOLD_REQUEST
    ops, queues = filter_pins(expr)
    if ops is not None and not ops:
        raise RuleError("the expression matches no opcode, so the rule could never fire", text, expr_col)
    if errno_ is not None or direction == HOLD_REPLY:
        what = "answered" if errno_ is not None else "held on its reply"
        if ops is not None and not ops - NO_REPLY_OPS:
            names = ", ".join(sorted(spec.OPCODE.name_of(o) or str(o) for o in ops))
            raise RuleError(f"{names} has no reply, so it cannot be {what} (break on it, then release or drop)",
                            text, expr_col)
        ops = (REPLY_OPS if ops is None else ops) - NO_REPLY_OPS  # never hold what this rule cannot act on
    mask = 0
    if queues is not None:
        if not queues:
            raise RuleError("the expression matches no queue", text, expr_col)
        if max(queues) >= 64:
            raise RuleError(f"queue {max(queues)} is beyond the 64 queues the data path can select", text, expr_col)
        for q in queues:
            mask |= 1 << q
    return Rule(text=text, kind=kind, expr=expr, predicate=predicate, errno=errno_, reply_errno=reply_errno,
                delay_ns=delay, count=count, p=p, direction=direction, opcodes=ops or frozenset(),
                queues=mask)


def rule_from_args(kind: str, parts: Sequence[str]) -> Rule:
    """`--break EXPR` / `--inject EXPR OPT...` (argparse nargs='+'): the caret names the command line."""
    flag = f"--{kind}"
    if not parts:
        raise RuleError(f"{flag} needs a filter expression", flag, len(flag) + 1)
    # One argument may carry its options too (`--inject "op == X errno=EIO"`); with several, the first is
    # the whole expression.
    line = parts[0] if len(parts) == 1 else " ".join([shlex.quote(parts[0]), *parts[1:]])
    try:
        return parse_rule(line, kind)
    except RuleError as e:
        raise RuleError(e.message, f"{flag} {line}", e.column + len(flag) + 1) from None
