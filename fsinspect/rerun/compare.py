"""Compare two replies to one request, field by field; tally the differences of a whole run.

What a back-end is free to choose is never a difference: nodeids, file handles, directory cookies
(mapped instead, see remap.py) and padding.  Volatile fields (inode numbers, times, block counts,
generations, a file system's free counts) differ between two runs of the same back-end on the same
share, so they count only with `strict`.  READDIR contents compare as sets, keyed by name.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dissectors import fuse as F
from dissectors.render import render_value
from dissectors.spec.types import Field
from dissectors.structs import Record

MAPPED = frozenset({"nodeid", "fh", "off", "kh"})  # chosen by the back-end, mapped rather than compared
VOLATILE = frozenset({"ino", "atime", "mtime", "ctime", "btime", "atimensec", "mtimensec", "ctimensec",
                      "blocks", "generation"})
VOLATILE_STATFS = frozenset({"bfree", "bavail", "files", "ffree"})
_PADDING = ("padding", "unused", "spare", "dummy", "__")


@dataclass
class FieldDiff:
    field: str
    a: Any
    b: Any


@dataclass
class ExchangeDiff:
    """One exchange whose replies differ: both sides decoded, and the fields that differ."""

    n: int  # the recording's exchange number
    opname: str
    request: str
    a: str
    b: str
    fields: list[FieldDiff]
    n_b: int | None = None  # the other recording's number (fsinspect diff)
    note: str = ""  # e.g. the recorded reply came from the debugger, not the back-end

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "n_b": self.n_b, "op": self.opname, "request": self.request, "a": self.a,
                "b": self.b, "note": self.note, "fields": [{"field": f.field, "a": _jsonable(f.a), "b": _jsonable(f.b)}
                                        for f in self.fields]}


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace") if len(v) <= 256 else f"<{len(v)} bytes>"
    if isinstance(v, (set, frozenset)):
        return sorted(_jsonable(x) for x in v)
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def _skip(path: str, strict: bool) -> bool:
    parts = path.split(".")
    last = parts[-1]
    if last in MAPPED or last.startswith(_PADDING):
        return True
    if strict:
        return False
    if any(p in VOLATILE for p in parts):
        return True
    return parts[0] == "st" and last in VOLATILE_STATFS


def flatten(args: dict[str, Any], strict: bool = False, kinds: dict[str, Field] | None = None) -> dict[str, Any]:
    """Dotted path -> comparable value; directory entries become entries[name].field.  `kinds` collects
    each path's spec field (to show flags and modes by name)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, Record):
            for f in v._spec.fields:
                path = f"{prefix}.{f.name}" if prefix else f.name
                if kinds is not None:
                    kinds[path] = f
                walk(path, getattr(v, f.name))
        elif prefix == "entries" and isinstance(v, list):
            out["entries"] = frozenset(nm for _, nm in v)
            for rec, nm in v:
                walk(f"entries[{nm.decode('utf-8', 'replace')}]", rec)
        elif isinstance(v, (bytes, bytearray, memoryview)):
            out[prefix] = bytes(v)
        elif isinstance(v, list):
            out[prefix] = tuple(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        elif not _skip(prefix, strict):
            out[prefix] = v

    walk("", args)
    return {k: v for k, v in out.items() if not _skip(k, strict)}


def compare(a: Any, b: Any, *, strict: bool = False) -> list[FieldDiff]:
    """Differences between two replies (decoded; None = no reply)."""
    if a is None or b is None:
        if a is None and b is None:
            return []
        return [FieldDiff("reply", "none" if a is None else "replied", "none" if b is None else "replied")]
    if not isinstance(a, F.Reply) or not isinstance(b, F.Reply):
        return [] if type(a) is type(b) else [FieldDiff("reply", type(a).__name__, type(b).__name__)]
    if a.error or b.error:
        return [] if a.error == b.error else [FieldDiff("errno", a.errname or 0, b.errname or 0)]
    kinds: dict[str, Field] = {}
    fa, fb = flatten(a.args, strict, kinds), flatten(b.args, strict)
    out = []
    for k in sorted(set(fa) | set(fb)):
        va, vb = fa.get(k), fb.get(k)
        if (va is None or vb is None) and k.startswith("entries["):
            continue  # an entry only one side lists: the entries set says so once
        if va != vb:
            if isinstance(va, frozenset) and isinstance(vb, frozenset):
                va, vb = va - vb, vb - va  # only what one side lists
            elif isinstance(va, bytes) and isinstance(vb, bytes):
                if a.cut and vb[:len(va)] == va:
                    continue  # the recording kept only the first bytes (snapped): those agree
                at = next((i for i, (x, y) in enumerate(zip(va, vb)) if x != y), min(len(va), len(vb)))
                va, vb = f"{len(va)} bytes, differ from byte {at}", f"{len(vb)} bytes"
            elif isinstance(va, int) and isinstance(vb, int) and k in kinds and (kinds[k].flags or kinds[k].enum):
                va, vb = render_value(kinds[k], va), render_value(kinds[k], vb)
            out.append(FieldDiff(k, va, vb))
    return out


def field_class(name: str) -> str:
    """entries[foo].entry_out.attr.mode -> entries[].entry_out.attr.mode: tallies group per field."""
    if "[" in name:
        head, _, rest = name.partition("[")
        return head + "[]" + rest.partition("]")[2]
    return name


@dataclass
class Tally:
    """A run's totals: exchanges compared, identical, differing (by opcode and by field)."""

    compared: int = 0
    identical: int = 0
    differing: int = 0
    unanswered: int = 0  # requests that expect a reply and got none from the other side
    by_op: Counter[str] = field(default_factory=Counter)
    by_field: Counter[str] = field(default_factory=Counter)
    diffs: list[ExchangeDiff] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)  # fsinspect diff: requests one recording has, the other not
    only_b: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the rerun adjusted to keep the back-end sound

    def add(self, d: ExchangeDiff | None, opname: str) -> None:
        self.compared += 1
        if d is None:
            self.identical += 1
            return
        self.differing += 1
        self.by_op[opname] += 1
        for f in d.fields:
            self.by_field[f"{opname} {field_class(f.field)}"] += 1
        self.diffs.append(d)

    @property
    def equal(self) -> bool:
        return not self.differing and not self.only_a and not self.only_b

    def summary(self) -> dict[str, Any]:
        return {"compared": self.compared, "identical": self.identical, "differing": self.differing,
                "unanswered": self.unanswered, "by_op": dict(self.by_op.most_common()),
                "by_field": dict(self.by_field.most_common()), "only_a": len(self.only_a),
                "only_b": len(self.only_b), **({"notes": self.notes} if self.notes else {})}
