"""Editing a reply by its decoded fields, for the debugger: a form lists the fields, the user's values are
applied over a base (the held reply, or zeros for a request answered by hand) and re-encoded by the codecs.

Fields are named by dotted paths as the detail pane shows them: the body part, then the struct fields
(`entry.nodeid`, `entry.attr.ino`, `attr_out.attr.mode`, `target` for READLINK, `data` for READ).  Struct
fields take integers (or "0o755"/"0x1f" strings); name, text and data parts take text (UTF-8, undecodable
bytes kept with surrogateescape).  Variable-length records (READDIR entries, arrays) keep their base value.
The control protocol's `"fields": {...}` is such a mapping; `apply_fields` checks every name and value.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import fuse as F
from .spec import fuse as spec
from .spec.types import SCALAR_SIZE
from .structs import Record, iter_fields, pyname

_TEXT_KINDS = ("str", "text", "data")


class FieldError(ValueError):
    """A field name or value the reply cannot take (the message says which, and why)."""


@dataclass(frozen=True, slots=True)
class EditField:
    path: str
    kind: str  # "int" or "text"
    value: int | str


def _opcode(op: int | str) -> spec.Opcode:
    try:
        return spec.OPCODE_BY_VALUE[op] if isinstance(op, int) else spec.OPCODE_BY_NAME[op.upper()]
    except KeyError:
        raise FieldError(f"unknown opcode {op!r}") from None


def _text(v: Any) -> str:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes | bytearray) else str(v or "")


def base_args(op: int | str, reply: F.Reply | None = None) -> dict[str, Any]:
    """The reply's args to edit: the held reply's own, or zeroed structs and empty text for `op`."""
    o = _opcode(op)
    if o.reply is None:
        raise FieldError(f"{o.name} has no reply to edit")
    if reply is not None and not reply.error:
        return dict(reply.args)
    out: dict[str, Any] = {}
    for p in o.reply:
        if p.kind == "struct" and not p.optional:
            out[p.name] = F.make(p.ref or p.name)
        elif p.kind in _TEXT_KINDS:
            out[p.name] = b""
    return out


def editable_fields(op: int | str, reply: F.Reply | None = None) -> list[EditField]:
    """Every field a form can edit, with its current value, in message order."""
    o = _opcode(op)
    args = base_args(op, reply)
    out: list[EditField] = []
    for p in o.reply or ():
        v = args.get(p.name)
        if p.kind == "struct":
            rec = v if isinstance(v, Record) else F.make(p.ref or p.name)
            out.extend(EditField(f"{p.name}.{path}", "int", val)
                       for path, f, val, _off, _size in iter_fields(rec) if isinstance(val, int) and f.count == 1)
        elif p.kind in _TEXT_KINDS:
            out.append(EditField(p.name, "text", _text(v)))
    return out


def _int(path: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise FieldError(f"{path}: expected an integer, got {v!r}")
    try:
        return v if isinstance(v, int) else int(v.strip(), 0)
    except ValueError:
        raise FieldError(f"{path}: {v!r} is not an integer (decimal, 0x.. or 0o..)") from None


def _set(rec: Record, names: list[str], path: str, value: Any) -> Record:
    fields = {pyname(f.name): f for f in rec._codec.spec.fields}
    f = fields.get(names[0])
    if f is None:
        raise FieldError(f"{path}: {rec._codec.name} has no field {names[0]!r} (fields: {', '.join(fields)})")
    cur = getattr(rec, names[0])
    if isinstance(cur, Record):
        if len(names) == 1:
            raise FieldError(f"{path}: is a struct; name one of its fields ({path}.{cur._fields[0]}, ...)")
        return rec._replace(**{names[0]: _set(cur, names[1:], path, value)})
    if len(names) > 1 or f.count != 1 or f.ctype not in SCALAR_SIZE:
        raise FieldError(f"{path}: cannot be edited")
    v = _int(path, value)
    bits = SCALAR_SIZE[f.ctype] * 8
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if f.ctype.startswith("i") else (0, (1 << bits) - 1)
    if not lo <= v <= hi:
        raise FieldError(f"{path}: {v} does not fit a {f.ctype} ({lo}..{hi})")
    return rec._replace(**{names[0]: v})


def flatten(fields: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects (`{"entry": {"attr": {"ino": 5}}}`) as dotted paths (`{"entry.attr.ino": 5}`)."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def apply_fields(op: int | str, fields: Mapping[str, Any], reply: F.Reply | None = None) -> dict[str, Any]:
    """`fields` (dotted paths, or nested objects, -> values) applied over `base_args(op, reply)`: a field not
    named keeps its base value.  Raises FieldError."""
    o = _opcode(op)
    args = base_args(op, reply)
    parts = {p.name: p for p in o.reply or ()}
    for path, value in flatten(fields).items():
        head, *rest = str(path).split(".")
        p = parts.get(head)
        if p is None:
            raise FieldError(f"{path}: {o.name} replies have no {head!r} (parts: {', '.join(parts) or 'none'})")
        if p.kind == "struct":
            if not rest:
                raise FieldError(f"{path}: is a struct; name one of its fields ({path}.<field>)")
            cur = args.get(head)
            rec = cur if isinstance(cur, Record) else F.make(p.ref or p.name)
            args[head] = _set(rec, rest, path, value)
        elif p.kind in _TEXT_KINDS and not rest:
            if not isinstance(value, str | bytes):
                raise FieldError(f"{path}: expected text, got {value!r}")
            args[head] = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        else:
            raise FieldError(f"{path}: a {p.kind} part cannot be edited field by field")
    return args


def encode_fields(op: int | str, fields: Mapping[str, Any], *, unique: int, reply: F.Reply | None = None,
                  ctx: F.FuseContext = F.DEFAULT_CONTEXT) -> bytes:
    """The whole reply (fuse_out_header + body) with `fields` applied; raises FieldError."""
    args = apply_fields(op, fields, reply)
    try:
        return F.encode_reply(_opcode(op), args, unique=unique, ctx=ctx)
    except (struct.error, ValueError, TypeError, OverflowError) as e:  # a value out of its field's range
        raise FieldError(f"cannot encode: {e}") from None
