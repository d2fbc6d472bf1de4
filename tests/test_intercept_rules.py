"""Rule specs: parsing, caret errors, the canonical form, and the native prefilter never narrower than the
expression (a capture the prefilter lets through unheld could never have matched)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dissectors import fuse as F
from dissectors.ring import HOLD_REPLY, HOLD_REQUEST
from dissectors.spec import fuse as spec
from fsinspect.analysis.analyzer import Analyzer
from fsinspect.analysis.exchange import Exchange
from fsinspect.analysis.filter import compile_filter
from fsinspect.intercept.rules import NO_REPLY_OPS, RuleError, parse_rule, rule_from_args
from tests.specgen import ALL_OPCODES, sample_args

OP = {o.name: o.value for o in spec.OPCODES}


def test_actions_directions_and_prefilters() -> None:
    r = parse_rule('\'op == LOOKUP and name == "victim"\' errno=ENOENT')
    assert (r.kind, r.action, r.errno, r.direction, r.opcodes) == ("inject", "answer", 2, HOLD_REQUEST,
                                                                   frozenset({OP["LOOKUP"]}))
    r = parse_rule("op == READ reply-errno=EIO count=1")
    assert (r.action, r.direction, r.count, r.reply_errno) == ("rewrite", HOLD_REPLY, 1, 5)
    r = parse_rule("op == GETATTR delay=1.5s p=0.25")
    assert (r.action, r.delay_ns, r.p) == ("delay", 1_500_000_000, 0.25)
    r = parse_rule("queue == 0 or queue == 2")
    assert (r.kind, r.action, r.queues, r.opcodes) == ("break", "break", 0b101, frozenset())
    r = parse_rule("name == \"x\" errno=EIO")  # answers: only ops that have a reply are held
    assert r.opcodes == frozenset(o.value for o in spec.OPCODES) - NO_REPLY_OPS
    assert parse_rule("op == FORGET").opcodes == {OP["FORGET"]}  # a breakpoint may hold a FORGET
    assert parse_rule("op == MKDIR on=reply").direction == HOLD_REPLY


@pytest.mark.parametrize("text", [
    "op == MKDIR", "'op == LOOKUP and name == \"a b\"' errno=ENOENT count=3",
    "'op == READ' reply-errno=EIO p=0.01", "'op == GETATTR' delay=200ms", "'op == READ' on=reply",
    "'op == READ' errno=EIO delay=1s",
])
def test_describe_round_trips(text: str) -> None:
    r = parse_rule(text)
    again = parse_rule(r.describe())
    assert (again.expr, again.errno, again.reply_errno, again.delay_ns, again.count, again.p, again.direction,
            again.opcodes, again.queues) == (r.expr, r.errno, r.reply_errno, r.delay_ns, r.count, r.p,
                                             r.direction, r.opcodes, r.queues)


@pytest.mark.parametrize(("parts", "message", "at"), [
    (["op == LOOKUP", "errno=ENOENTX"], "unknown errno name 'ENOENTX'", "ENOENTX"),
    (["op == LOOKUP and nam == \"x\"", "errno=EIO"], "unknown field 'nam'", "nam"),
    (["op == LOOKUP", "delay=0ms"], "a delay must be longer than 0", "0ms"),
    (["op == LOOKUP", "p=0"], "p=: 0 is outside (0, 1]", "0"),
    (["op == LOOKUP", "errno=EIO", "errno=EIO"], "errno= given twice", "errno=EIO"),
    (["op == LOOKUP", "errno=EIO", "reply-errno=EIO"], "choose one", "EIO"),
    (["op == LOOKUP", "errno=EIO", "on=reply"], "there is no reply to hold", "reply"),
    (["op == LOOKUP", "on=sideways", "delay=1s"], "choose request or reply", "sideways"),
    (["op == FORGET", "reply-errno=EIO"], "FORGET has no reply", "op == FORGET"),
    (["op == LOOKUP and op == MKDIR", "errno=EIO"], "matches no opcode", "op == LOOKUP"),
    (["op == LOOKUP", "bogus"], "expected OPTION=VALUE", "bogus"),
    (["op == LOOKUP", "delay=1h"], "is not a duration", "1h"),
    (["op == LOOKUP"], "--inject needs what to do", None),
])
def test_every_malformed_rule_is_refused_with_a_caret(parts: list[str], message: str, at: str | None) -> None:
    with pytest.raises(RuleError) as ei:
        rule_from_args("inject", parts)
    e = ei.value
    assert message in e.message, e.message
    line, caret = str(e).splitlines()[-2:]
    assert caret.strip() == "^" and line.startswith("  --inject ")
    # the caret sits under the offending part (the last occurrence: options come after the expression)
    want = len(line) if at is None else line.rindex(at)
    assert caret.index("^") == want, str(e)


def _exchanges() -> list[tuple[int, object]]:
    """One decoded request of every opcode (with a name where it takes one), as the filter sees it."""
    out = []
    for i, op in enumerate(ALL_OPCODES):
        an = Analyzer()
        args = sample_args(op.request)
        raw = F.encode_request(op, args, unique=2 + i, nodeid=1 + i % 7)
        ex = an.feed_request(raw, i % 3, i)
        out.append((op.value, ex))
    return out


EXCHANGES = _exchanges()
ATOMS = ["op == LOOKUP", "op == MKDIR", "op != FORGET", 'op ~ "READ"', "opcode == 50", "nodeid == 3",
         'name ~ "-"', "queue == 1", "queue == 0", "submount", "error", "len > 60", "unique < 20", "pending"]


@st.composite
def expressions(draw: st.DrawFn, depth: int = 0) -> str:
    if depth > 2 or draw(st.booleans()):
        return draw(st.sampled_from(ATOMS))
    kind = draw(st.sampled_from(["and", "or", "not"]))
    if kind == "not":
        return f"not ({draw(expressions(depth + 1))})"
    return f"({draw(expressions(depth + 1))}) {kind} ({draw(expressions(depth + 1))})"


@settings(max_examples=300, deadline=None)
@given(expressions())
def test_the_prefilter_never_misses_a_match(expr: str) -> None:
    try:
        r = parse_rule(expr)
    except RuleError as e:  # refused as never matching: then nothing may match
        assert "matches no" in e.message
        pred = compile_filter(expr)
        assert not any(pred(ex) for _, ex in EXCHANGES)  # type: ignore[arg-type]
        return
    for opcode, ex in EXCHANGES:
        if r.predicate(ex):  # type: ignore[arg-type]
            assert not r.opcodes or opcode in r.opcodes, (expr, opcode)
            assert not r.queues or r.queues >> ex.queue & 1, (expr, ex.queue)  # type: ignore[attr-defined]


def _spellings() -> list[str]:
    """`op == NAME` and `op != NAME` for every opcode, as users write them (case, FUSE_, spacing, opcode)."""
    out = []
    for o in spec.OPCODES:
        for name in (o.name, o.name.lower(), f"FUSE_{o.name}"):
            out += [f"op == {name}", f"op != {name}", f"opcode=={name}", f" \top  ==\n{name} "]
    return out


def test_op_rules_are_read_without_the_grammar_as_the_grammar_reads_them() -> None:
    """`op == NAME` / `op != NAME` alone (the commonest rule: bench/proxy_overhead.py's idle one) skip lark:
    for every opcode and spelling, the same predicate on every opcode, prefilter and cost as the grammar's
    reading; anything else (an unknown name, a number, a string, more than one comparison) is the grammar's."""
    from fsinspect.analysis import filter as FI

    exchanges = [Exchange(0, 1, 0, 1, 1, code) for code in [-1, *(o.value for o in spec.OPCODES)]]
    for text in _spellings():
        assert FI._simple_op(text) is not None, text
        tree = FI._parser().parse(text)
        grammar = FI._build(tree, text)
        fast = compile_filter(text)
        assert [fast(e) for e in exchanges] == [grammar(e) for e in exchanges], text
        assert FI.filter_pins(text) == (FI._pin(tree, "op", FI._ALL_OPCODES)[0], None), text
        assert FI.filter_costs(text) == FI._costs(tree) == {FI.HEADER}, text
    for text in ("op == NOSUCHOP", "op == 26", 'op == "LOOKUP"', "op == LOOKUP and queue == 1", "op ~ LOOK",
                 "op == LOOKUP.x", "error == ENOENT", "op = LOOKUP", "op == and"):
        assert FI._simple_op(text) is None, text
    with pytest.raises(RuleError, match="unknown opcode 'NOSUCHOP'"):
        parse_rule("op == NOSUCHOP errno=EIO")


def test_a_proxy_armed_with_an_op_rule_does_not_load_the_grammar() -> None:
    """lark (~100 ms of start-up CPU) loads for an expression that needs it, not for `op == NAME`: the idle
    rule of bench/proxy_overhead.py cost every run that much.  The prefilter is the same."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from fsinspect.intercept.rules import rule_from_args\n"
            "from fsinspect.intercept.addon import Intercept\n"
            "r = rule_from_args('inject', ['op == SETUPMAPPING', 'errno=EIO'])\n"
            "Intercept([r])\n"
            "print('lark' in sys.modules, sorted(r.opcodes))\n"
            "rule_from_args('inject', ['op == SETUPMAPPING and queue == 1', 'errno=EIO'])\n"
            "print('lark' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == [f"False [{OP['SETUPMAPPING']}]", "True"], out
