"""The filter language shared by the TUI and the CLI.

    op == LOOKUP and name ~ "foo"      error != 0      error == ENOENT      latency > 1ms
    nodeid == 4      submount      queue == 0      lint      lint == "no-reply"      not (op == FORGET)
    path ~ "sub"      read.size >= 4096      entry.attr.flags != 0      header.uid == 0

A real grammar (lark, LALR) compiles an expression to a predicate over Exchanges.  Syntax and meaning
errors raise FilterError carrying the column, and `str()` shows the expression with a caret under it.
lark loads with the first expression that needs it: `op == NAME` and `op != NAME` alone (the commonest
debugger rule) are read without it (_simple_op, checked against the grammar's reading in the tests), so a
proxy armed with such a rule, or with a control socket, does not pay lark's ~100 ms of start-up CPU.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dissectors.spec import fuse as spec

from .exchange import LINTS, Exchange

if TYPE_CHECKING:
    from lark import Lark, Token, Tree

GRAMMAR = r"""
?start: or_expr
?or_expr: and_expr (OR and_expr)*
?and_expr: not_expr (AND not_expr)*
?not_expr: NOT not_expr -> not_
         | atom
?atom: "(" or_expr ")"
     | NAME CMP value -> comparison
     | NAME -> flag
?value: DURATION -> duration
      | NUMBER -> number
      | ESCAPED_STRING -> string
      | NAME -> word
OR.2: "or" | "||"
AND.2: "and" | "&&"
NOT.2: "not" | "!"
CMP: "==" | "!=" | "<=" | ">=" | "<" | ">" | "~"
DURATION.3: /\d+(\.\d+)?(ns|us|µs|ms|s)(?![A-Za-z0-9_])/
NUMBER.1: /0x[0-9a-fA-F]+|\d+/
NAME: /(?!(and|or|not)(?![A-Za-z0-9_.]))[A-Za-z_][A-Za-z0-9_.-]*/
%import common.ESCAPED_STRING
%import common.WS
%ignore WS
"""



@functools.cache
def _parser() -> Lark:
    """The LALR parser, built once, on the first expression (importing the module for its field tables, as
    the UI does at start, does not pay for it)."""
    from lark import Lark

    return Lark(GRAMMAR, parser="lalr", propagate_positions=True, maybe_placeholders=False)


_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_ERRNO = spec.ERRNO.by_name()

Predicate = Callable[[Exchange], bool]


class FilterError(ValueError):
    """A filter that does not parse or mean anything; `column` is 1-based."""

    def __init__(self, message: str, text: str, column: int) -> None:
        super().__init__(message)
        self.message = message
        self.text = text
        self.column = max(1, column)

    def caret(self) -> str:
        return f"  {self.text}\n  {' ' * (self.column - 1)}^"

    def __str__(self) -> str:
        return f"{self.message} at column {self.column}\n{self.caret()}"


# What knowing a field costs, cheapest first (a whole-file pass over a recording picks its way from these):
# HEADER: the two records' headers (opcode, unique, nodeid, queue, head, epoch, lengths, timestamps, the
# reply's error); ROWS: the recording's saved analysis (paths, lints, submount flags); DECODE: a message's body,
# one side decoded when first read; FULL: the exchange as the analyzer decodes it (decode errors).
HEADER, ROWS, DECODE, FULL = 0, 1, 2, 3
Getter = Callable[[Exchange], Any]


@dataclass(frozen=True)
class Field:
    """One name of the language: compared (`kind`: number, opcode, text, lint; None: a flag only), and/or a
    flag on its own (`flag`), and what it costs to know."""

    kind: str | None
    cost: int
    get: Getter | None = None
    flag: Predicate | None = None


# The field table: every name the language knows, in one place.  None as a number means "no value" and every
# comparison on it is false.
TABLE: dict[str, Field] = {
    "op": Field("opcode", HEADER),
    "opcode": Field("opcode", HEADER),
    "error": Field("number", HEADER, lambda e: e.error, lambda e: bool(e.error)),
    "latency": Field("number", HEADER, lambda e: e.latency_ns),
    "nodeid": Field("number", HEADER, lambda e: e.nodeid if e.opcode >= 0 else None),
    "unique": Field("number", HEADER, lambda e: e.unique),
    "queue": Field("number", HEADER, lambda e: e.queue),
    "head": Field("number", HEADER, lambda e: e.head),
    "epoch": Field("number", HEADER, lambda e: e.epoch),
    "len": Field("number", HEADER, lambda e: e.req_len),
    "reply_len": Field("number", HEADER, lambda e: e.reply_len if e.replied else None),
    "index": Field("number", HEADER, lambda e: e.index),
    "name": Field("text", DECODE),
    "path": Field("text", ROWS),
    "lint": Field("lint", ROWS, flag=lambda e: bool(e.lints)),
    "submount": Field(None, ROWS, flag=lambda e: e.submount),
    # an orphan has no request record (opcode -1): a pass reads such an exchange whole
    "orphan": Field(None, HEADER, flag=lambda e: e.opcode < 0 and e.replied and e.request is None),
    "pending": Field(None, HEADER, flag=lambda e: not e.replied and e.expects_reply),
    "bad": Field(None, FULL, flag=lambda e: e.decode_error is not None),
    "snapped": Field(None, HEADER, flag=lambda e: e.snapped),
}
NUMERIC: dict[str, Callable[[Exchange], int | None]] = {k: f.get for k, f in TABLE.items()
                                                        if f.kind == "number" and f.get is not None}
STRINGS = tuple(k for k, f in TABLE.items() if f.kind == "text")
PathOf = Callable[[Exchange], str]
# Decoded fields by their dotted path (`read.size`, `entry.attr.flags`, `header.uid`): the first part is an
# argument name from the spec tables, or `header` (the request's fuse_in_header).  They cost DECODE.
ARG_NAMES = frozenset({p.name for o in spec.OPCODES for p in (*o.request, *(o.reply or ()))} | {"header"})
FLAGS: dict[str, Predicate] = {k: f.flag for k, f in TABLE.items() if f.flag is not None}
FIELDS = sorted(k for k, f in TABLE.items() if f.kind is not None)


def _opcode_value(tok: Token, text: str) -> int:
    v = str(tok)
    if tok.type == "NUMBER":
        return int(v, 0)
    if tok.type == "ESCAPED_STRING":
        v = v[1:-1]
    o = spec.OPCODE_BY_NAME.get(v.upper().removeprefix("FUSE_"))
    if o is None:
        raise FilterError(f"unknown opcode {v!r}", text, tok.column or 1)
    return o.value


def _int_value(field: str, tok: Token, text: str) -> int:
    v = str(tok)
    if tok.type == "DURATION":
        if field != "latency":
            raise FilterError(f"a duration makes sense only for latency, not {field}", text, tok.column or 1)
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s)", v)
        assert m is not None
        return int(float(m.group(1)) * _UNITS[m.group(2)])
    if tok.type == "NUMBER":
        return int(v, 0)
    if field == "error" and tok.type in ("NAME", "ESCAPED_STRING"):
        name = v.strip('"').upper()
        if name not in _ERRNO:
            raise FilterError(f"unknown errno name {name!r}", text, tok.column or 1)
        return _ERRNO[name]
    raise FilterError(f"{field} needs a number{' or a duration' if field == 'latency' else ''}, "
                      f"not {v}", text, tok.column or 1)


_CMP: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}


def _regex(tok: Token, text: str) -> re.Pattern[str]:
    v = str(tok)
    if tok.type == "ESCAPED_STRING":
        v = v[1:-1].replace('\\"', '"')
    try:
        return re.compile(v)
    except re.error as e:
        raise FilterError(f"bad regular expression: {e.msg}", text, (tok.column or 1) + (e.pos or 0) + 1) from None


def _decoded(path: str) -> Callable[[Exchange], Any]:
    """A getter for a dotted decoded field: the request's header, else the request's then the reply's args."""
    if path.startswith("header."):
        part = path.split(".", 1)[1]
        return lambda e: getattr(e.request.header, part, None) if e.request is not None else None
    return lambda e: e.arg(path)


def _as_text(v: Any) -> str | None:
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    return v if isinstance(v, str) else None


def _decoded_comparison(field: str, op: str, val: Token, text: str, col: int) -> Predicate:
    path = field.removeprefix("fuse.")
    if path.split(".", 1)[0] not in ARG_NAMES:
        raise FilterError(f"unknown field {field!r}: a decoded field starts with an argument name "
                          f"(e.g. read.size, entry.attr.flags, header.uid)", text, col)
    get = _decoded(path)
    if op == "~":
        rx = _regex(val, text)
        return lambda e: (s := _as_text(get(e))) is not None and rx.search(s) is not None
    if val.type == "ESCAPED_STRING" or val.type == "NAME":
        if op not in ("==", "!="):
            raise FilterError(f"text compares with == != or ~, not {op}", text, col)
        want = str(val)[1:-1] if val.type == "ESCAPED_STRING" else str(val)
        eq = op == "=="
        return lambda e: (_as_text(get(e)) == want) == eq
    wanted = _int_value(field, val, text)
    cmp = _CMP[op]
    return lambda e: isinstance(v := get(e), int) and cmp(v, wanted)


def _comparison(node: Tree[Token], text: str, path_of: PathOf | None = None) -> Predicate:
    from lark import Token, Tree

    field_tok, op_tok, val_tok = node.children
    assert isinstance(field_tok, Token) and isinstance(op_tok, Token)
    val = val_tok.children[0] if isinstance(val_tok, Tree) else val_tok
    assert isinstance(val, Token)
    field, op = str(field_tok), str(op_tok)
    col = field_tok.column or 1
    if field in ("op", "opcode"):
        if op == "~":
            rx = _regex(val, text)
            return lambda e: rx.search(e.opname) is not None
        if op not in ("==", "!="):
            raise FilterError(f"{field} compares with == != or ~, not {op}", text, op_tok.column or 1)
        code = _opcode_value(val, text)
        return (lambda e: e.opcode == code) if op == "==" else (lambda e: e.opcode != code)
    if field == "name":
        if op == "~":
            rx = _regex(val, text)
            return lambda e: any(rx.search(n.decode("utf-8", "backslashreplace")) for n in e.names())
        if op not in ("==", "!="):
            raise FilterError(f"name compares with == != or ~, not {op}", text, op_tok.column or 1)
        want = (str(val)[1:-1] if val.type == "ESCAPED_STRING" else str(val)).encode("utf-8", "surrogateescape")
        if op == "==":
            return lambda e: want in e.names()
        return lambda e: want not in e.names()
    if field == "path":
        if path_of is None:
            raise FilterError("path is known where the exchanges are listed (fsinspect replay/attach), "
                              "not here", text, col)
        get_path = path_of
        if op == "~":
            rx = _regex(val, text)
            return lambda e: rx.search(get_path(e)) is not None
        if op not in ("==", "!="):
            raise FilterError(f"path compares with == != or ~, not {op}", text, op_tok.column or 1)
        want_p = str(val)[1:-1] if val.type == "ESCAPED_STRING" else str(val)
        return (lambda e: get_path(e) == want_p) if op == "==" else (lambda e: get_path(e) != want_p)
    if "." in field or (field in ARG_NAMES and field not in FIELDS):
        return _decoded_comparison(field, op, val, text, col)
    if field == "lint":
        want_s = str(val)[1:-1] if val.type == "ESCAPED_STRING" else str(val)
        if op == "~":
            rx = _regex(val, text)
            return lambda e: any(rx.search(x) for x in e.lints)
        if want_s not in LINTS:
            raise FilterError(f"unknown lint {want_s!r} (known: {', '.join(LINTS)})", text, val.column or 1)
        if op == "==":
            return lambda e: want_s in e.lints
        if op == "!=":
            return lambda e: want_s not in e.lints
        raise FilterError(f"lint compares with == != or ~, not {op}", text, op_tok.column or 1)
    get = NUMERIC.get(field)
    if get is None:
        raise FilterError(f"unknown field {field!r} (known: {', '.join(FIELDS)})", text, col)
    if op == "~":
        raise FilterError(f"~ matches text; {field} is a number", text, op_tok.column or 1)
    wanted = _int_value(field, val, text)
    cmp = _CMP[op]

    def pred(e: Exchange) -> bool:
        v = get(e)
        return v is not None and cmp(v, wanted)

    return pred


def _costs(node: Tree[Token] | Token) -> frozenset[int]:
    """The costs (HEADER .. FULL) of the names an expression reads."""
    from lark import Token

    if isinstance(node, Token):  # pragma: no cover - the grammar wraps tokens
        return frozenset({FULL})
    if node.data in ("comparison", "flag"):
        name = str(node.children[0])
        if node.data == "comparison" and ("." in name or (name in ARG_NAMES and name not in FIELDS)):
            return frozenset({DECODE})  # a decoded field, as _comparison reads it
        f = TABLE.get(name)
        return frozenset({f.cost if f is not None else FULL})  # (an unknown name never compiles)
    return frozenset().union(*(_costs(c) for c in node.children if not isinstance(c, Token)))


def filter_costs(text: str) -> frozenset[int]:
    """What knowing an expression's value costs, as a set of HEADER, ROWS, DECODE, FULL: a pass over a
    recording reads no more of each exchange than that.  Call after compile_filter() accepted the text."""
    if _simple_op(text) is not None:
        return frozenset({HEADER})
    return _costs(_parser().parse(text))


# `op == NAME` / `op != NAME` alone, as the grammar tokenizes it (WS is its %ignore'd whitespace; a value
# with `.` or `-`, a number or a string goes to the grammar).
_WS = "[ \t\f\r\n]*"
_SIMPLE_OP = re.compile(f"{_WS}(op|opcode){_WS}(==|!=){_WS}([A-Za-z_][A-Za-z0-9_]*){_WS}")


def _simple_op(text: str) -> tuple[int, bool] | None:
    """(opcode, equal) for `op == NAME` or `op != NAME` with a known opcode NAME, read without lark; None
    for anything else (an unknown name too: the grammar's reading gives the error and its caret)."""
    m = _SIMPLE_OP.fullmatch(text)
    if m is None:
        return None
    o = spec.OPCODE_BY_NAME.get(m.group(3).upper().removeprefix("FUSE_"))
    return None if o is None else (o.value, m.group(2) == "==")


def _build(node: Tree[Token] | Token, text: str, path_of: PathOf | None = None) -> Predicate:
    from lark import Token

    if isinstance(node, Token):  # pragma: no cover - the grammar wraps tokens
        raise FilterError(f"unexpected {node!s}", text, node.column or 1)
    kind = node.data
    if kind in ("or_expr", "and_expr"):  # the cheap operands first: `op == LOOKUP and name ~ "x"` decodes LOOKUPs
        kids = sorted((c for c in node.children if not isinstance(c, Token)), key=lambda c: max(_costs(c)))
        parts = [_build(c, text, path_of) for c in kids]
        if kind == "or_expr":
            return lambda e: any(p(e) for p in parts)
        return lambda e: all(p(e) for p in parts)
    if kind == "not_":
        inner = _build(node.children[-1], text, path_of)
        return lambda e: not inner(e)
    if kind == "comparison":
        return _comparison(node, text, path_of)
    if kind == "flag":
        tok = node.children[0]
        assert isinstance(tok, Token)
        pred = FLAGS.get(str(tok))
        if pred is None:
            hint = " (fields need a comparison, e.g. nodeid == 4)" if str(tok) in FIELDS else ""
            raise FilterError(f"unknown flag {str(tok)!r}{hint}; flags are {', '.join(FLAGS)}", text,
                              tok.column or 1)
        return pred
    raise FilterError(f"unexpected {kind}", text, 1)  # pragma: no cover


_TERMINALS = {"LPAR": "'('", "RPAR": "')'", "NAME": "a name", "NUMBER": "a number", "DURATION": "a duration",
              "ESCAPED_STRING": "a string", "NOT": "'not'", "AND": "'and'", "OR": "'or'", "CMP": "a comparison"}


def _expected(names: Any) -> str:
    return ", ".join(sorted({_TERMINALS.get(x, x) for x in names if not x.startswith("__")}))


def _describe(tok: Token) -> str:
    if tok.type == "$END":
        return "end of expression"
    return repr(str(tok))


def _bad_character(text: str, pos: int) -> str:
    """What the lexer stumbled on, said so that it teaches the syntax."""
    ch = text[pos]
    if ch == '"':
        return 'unterminated string: no closing "'
    if ch == "=":
        return "'=' is not a comparison: use '==' (or '!=', '<=', '>=')"
    if ch == "'":
        return "strings take double quotes: \"...\""
    if ch == "&" or ch == "|":
        return f"{ch!r} alone is no operator: use '{ch * 2}' or '{'and' if ch == '&' else 'or'}'"
    return f"unexpected character {ch!r}"


_OPNAMES = sorted(o.name for o in spec.OPCODES)
_ERRNAMES = sorted(_ERRNO)
_WORDS = sorted({*FIELDS, *FLAGS})
_TAIL_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*$")


def completions(text: str) -> tuple[int, list[str]]:
    """(where the word being typed starts, what may replace it) for a filter typed so far.

    The parser says what may come next, so a complete value (`latency > 500µs`) is followed by `and`/`or`,
    never by a field or flag name; after `op ==` come opcode names, after `error ==` errno names.
    """
    from lark.exceptions import UnexpectedEOF, UnexpectedInput

    m = _TAIL_WORD.search(text)
    start = len(text)
    if m is not None and (m.start() == 0 or not (text[m.start() - 1].isalnum() or text[m.start() - 1] in "µ.\"")):
        start = m.start()
    word = text[start:]
    head = text[:start]
    try:
        ip = _parser().parse_interactive(head)
        toks = list(ip.exhaust_lexer())
        accepts = ip.accepts()
    except (UnexpectedInput, UnexpectedEOF):
        return start, []
    pool: list[str] = []
    prev = [str(t) for t in toks[-2:]]
    if "NAME" in accepts:
        if len(prev) == 2 and prev[1] in ("==", "!="):
            pool = {"op": _OPNAMES, "opcode": _OPNAMES, "error": _ERRNAMES, "lint": sorted(LINTS)}.get(prev[0], [])
            word = word.upper() if prev[0] != "lint" else word
        elif not ((prev and prev[-1] in _CMP) or (prev and prev[-1] == "~")):
            pool = list(_WORDS)
    if "NOT" in accepts and "NAME" in accepts and not (prev and prev[-1] in (*_CMP, "~")):
        pool.append("not")
    if "AND" in accepts:
        pool += ["and", "or"]
        if start == len(text) and text and not text[-1].isspace():
            return start, [" and", " or"]
    out = [w for w in pool if w.startswith(word) and w != word]
    if not out and word and word in pool:  # a complete word: what may follow it
        return len(text), [" " + w for w in completions(text + " ")[1]]
    return start, out


# What an expression pins: (the set of values that can match or None = any, exact).  `exact` means the
# expression is true exactly when the field is in the set, so `not` may complement it.
_Pin = tuple[frozenset[int] | None, bool]
_ALL_OPCODES = frozenset(o.value for o in spec.OPCODES)


def _pin(node: Tree[Token] | Token, field: str, universe: frozenset[int] | None) -> _Pin:
    from lark import Token, Tree

    if isinstance(node, Token):  # pragma: no cover - the grammar wraps tokens
        return None, False
    kind = node.data
    if kind in ("or_expr", "and_expr"):
        parts = [_pin(c, field, universe) for c in node.children if not isinstance(c, Token)]
        exact = all(e for _, e in parts)
        sets = [s for s, _ in parts]
        if kind == "or_expr":
            if any(s is None for s in sets):
                return None, False
            return frozenset().union(*[s for s in sets if s is not None]), exact
        known = [s for s in sets if s is not None]
        if not known:
            return None, False
        out = known[0]
        for k in known[1:]:
            out &= k
        return out, exact and len(known) == len(sets)
    if kind == "not_":
        inner, exact = _pin(node.children[-1], field, universe)
        if inner is None or not exact or universe is None:
            return None, False
        return universe - inner, True
    if kind != "comparison":
        return None, False
    f_tok, op_tok, val_tok = node.children
    val = val_tok.children[0] if isinstance(val_tok, Tree) else val_tok
    assert isinstance(f_tok, Token) and isinstance(op_tok, Token) and isinstance(val, Token)
    names = ("op", "opcode") if field == "op" else (field,)
    if str(f_tok) not in names:
        return None, False
    op = str(op_tok)
    if field == "op":
        if op == "~":
            rx = re.compile(str(val)[1:-1] if val.type == "ESCAPED_STRING" else str(val))
            return frozenset(o.value for o in spec.OPCODES if rx.search(o.name)), True
        code = _opcode_value(val, "")
        return (frozenset({code}), True) if op == "==" else (_ALL_OPCODES - {code}, True)
    if op == "==" and val.type == "NUMBER":
        return frozenset({int(str(val), 0)}), True
    return None, False


def filter_pins(text: str) -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """(opcodes, queues) that an expression can match, or None where it does not pin the field.

    Used to compile a rule to the data path's native prefilter: a capture outside these sets can never
    match, so the path need not hold it.  Call after compile_filter() accepted the text.
    """
    simple = _simple_op(text)
    if simple is not None:
        code, equal = simple
        return (frozenset({code}) if equal else _ALL_OPCODES - {code}), None
    tree = _parser().parse(text)
    ops, _ = _pin(tree, "op", _ALL_OPCODES)
    queues, _ = _pin(tree, "queue", None)
    return ops, queues


def compile_filter(text: str, *, path_of: PathOf | None = None) -> Predicate:
    """Compile a filter expression; raises FilterError with a column on any problem.

    `path_of` names an exchange's nodeid as a path (as it was when the request came): the UI knows it,
    so `path ~ "sub"` works there.
    """
    if not text.strip():
        raise FilterError("empty filter", text, 1)
    simple = _simple_op(text)
    if simple is not None:
        code, equal = simple
        return (lambda e: e.opcode == code) if equal else (lambda e: e.opcode != code)
    from lark import Token
    from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

    try:
        tree = _parser().parse(text)
    except UnexpectedEOF as e:
        raise FilterError(f"unexpected end of expression (expected {_expected(e.expected)})", text,
                          len(text) + 1) from None
    except UnexpectedToken as e:
        tok = e.token
        col = tok.column if tok.type != "$END" and tok.column else len(text) + 1
        exp = _expected(e.expected)
        raise FilterError(f"unexpected {_describe(tok)}" + (f" (expected {exp})" if exp else ""),
                          text, col) from None
    except UnexpectedCharacters as e:
        raise FilterError(_bad_character(text, e.pos_in_stream or 0), text, e.column) from None
    except UnexpectedInput as e:  # pragma: no cover - the subclasses above cover lark's errors
        raise FilterError(str(e), text, getattr(e, "column", 1)) from None
    if isinstance(tree, Token):  # a bare word parses to a token only if the grammar allowed it
        raise FilterError(f"unexpected {tree!s}", text, tree.column or 1)
    return _build(tree, text, path_of)
