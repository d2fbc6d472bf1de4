"""Building blocks of the declarative spec tables.

Every protocol table (FUSE, virtio, vhost-user) is written with these few
types, so that codecs, renderers, the Wireshark dissector and the format
document can all be generated from one place.  Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

# C scalar type -> struct format character (little endian is applied per struct).
SCALARS: dict[str, str] = {
    "u8": "B",
    "u16": "H",
    "u32": "I",
    "u64": "Q",
    "i8": "b",
    "i16": "h",
    "i32": "i",
    "i64": "q",
    "char": "s",
}
SCALAR_SIZE: dict[str, int] = {"u8": 1, "u16": 2, "u32": 4, "u64": 8, "i8": 1, "i16": 2, "i32": 4, "i64": 8, "char": 1}


@dataclass(frozen=True)
class FlagSet:
    """A named set of bit flags; values may be wider than 32 bits (INIT flags|flags2<<32)."""

    name: str
    bits: tuple[tuple[str, int], ...]
    prefix: str = ""

    def render(self, value: int) -> str:
        if value == 0:
            return "0"
        parts: list[str] = []
        rest = value
        for bname, bval in self.bits:
            if bval and value & bval == bval and rest & bval:
                parts.append(bname)
                rest &= ~bval
        if rest:
            parts.append(hex(rest))
        return "|".join(parts)

    def names(self, value: int) -> list[str]:
        return [n for n, v in self.bits if v and value & v == v]

    def by_name(self) -> dict[str, int]:
        return dict(self.bits)


@dataclass(frozen=True)
class Enum:
    """A named set of distinct values (opcodes, notify codes, whence, ...)."""

    name: str
    values: tuple[tuple[str, int], ...]
    prefix: str = ""
    _by_value: dict[int, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_value", {v: n for n, v in self.values})

    def name_of(self, value: int) -> str | None:
        return self._by_value.get(value)

    def render(self, value: int) -> str:
        n = self.name_of(value)
        return n if n is not None else str(value)

    def by_name(self) -> dict[str, int]:
        return dict(self.values)


@dataclass(frozen=True)
class Field:
    """One member of a struct.  `ctype` is a scalar name or the name of another struct."""

    name: str
    ctype: str
    count: int = 1  # array length; 1 means scalar
    flags: str | None = None  # name of a FlagSet used to render the value
    enum: str | None = None  # name of an Enum used to render the value
    since: int | None = None  # protocol minor that introduced the field
    wide: str | None = None  # for flags: name of a sibling field holding the high 32 bits
    was: str | None = None  # the field's name in older headers (renamed padding)

    @property
    def is_array(self) -> bool:
        return self.count != 1 or self.ctype == "char"


@dataclass(frozen=True)
class StructDef:
    """A fixed-size C struct, little endian, no implicit padding (protocol structs are packed by design)."""

    name: str
    fields: tuple[Field, ...]
    compat_sizes: tuple[int, ...] = ()  # shorter sizes older peers send/accept
    since: int | None = None
    doc: str = ""
    header_exempt: str | None = None  # why the C-header oracle does not check this struct


@dataclass(frozen=True)
class Part:
    """One piece of a message body, in order.

    kind:
      struct  - a fixed struct (`ref` names it)
      str     - a NUL-terminated name (bytes, rendered safely)
      text    - the rest of the body as a name without NUL (READLINK target)
      data    - the rest of the body as raw bytes
      array   - `ref` structs repeated; count from `count_from` (field of an earlier struct) or to the end
      dirents / direntplus - READDIR / READDIRPLUS record streams (8-byte aligned)
      strs    - NUL-separated list (LISTXATTR names, CUSE device info)
      xattr   - GETXATTR/LISTXATTR reply: fuse_getxattr_out when the request's size is 0, else data
    """

    kind: str
    name: str
    ref: str | None = None
    count_from: str | None = None
    optional: bool = False  # may be entirely absent (zero-length)


@dataclass(frozen=True)
class Opcode:
    name: str
    value: int
    request: tuple[Part, ...]
    reply: tuple[Part, ...] | None  # None: no reply by design (FORGET, BATCH_FORGET, NOTIFY_REPLY)
    since: int = 1
    doc: str = ""
    queue: str = "request"  # "hiprio" for FORGET/BATCH_FORGET on virtio-fs
    reply_optional: bool = False  # INTERRUPT: a reply only for EAGAIN
    needs: str | None = None  # INIT flag that announces support: ENOSYS after negotiating it is a lint


@dataclass(frozen=True)
class Notify:
    name: str
    value: int
    body: tuple[Part, ...]
    since: int
    doc: str = ""


_DECL_RE = re.compile(r"^\s*(?P<ctype>\w+)\s+(?P<name>\w+)(?:\[(?P<count>\d+)\])?(?P<mods>.*)$")
_MOD_RE = re.compile(r"\s*([:=^@~])\s*(\w+)")
_MOD_KEYS = {":": "flags", "=": "enum", "^": "wide", "@": "since", "~": "was"}


def parse_fields(text: str) -> tuple[Field, ...]:
    """Parse 'u32 flags:INIT_FLAGS; u16 max_pages @28; i32 backing_id @40 ~padding; char tag[36]'.

    `:SET` names a FlagSet or formatter, `=ENUM` an Enum, `^field` the field holding the high 32
    flag bits, `@N` the minor that gave the field its layout, `~old` its name in older headers.
    """
    out: list[Field] = []
    for raw in text.replace("\n", ";").split(";"):
        if not raw.strip():
            continue
        m = _DECL_RE.match(raw)
        if m is None:
            raise ValueError(f"bad field declaration: {raw!r}")
        mods: dict[str, str] = {}
        rest = m["mods"]
        pos = 0
        for mm in _MOD_RE.finditer(rest):
            if mm.start() != pos:
                break
            mods[_MOD_KEYS[mm.group(1)]] = mm.group(2)
            pos = mm.end()
        if rest[pos:].strip():
            raise ValueError(f"bad field modifiers: {raw!r}")
        out.append(
            Field(
                name=m["name"],
                ctype=m["ctype"],
                count=int(m["count"]) if m["count"] else 1,
                flags=mods.get("flags"),
                enum=mods.get("enum"),
                wide=mods.get("wide"),
                since=int(mods["since"]) if "since" in mods else None,
                was=mods.get("was"),
            )
        )
    return tuple(out)


def S(name: str, fields: str, *, compat: Iterable[int] = (), since: int | None = None, doc: str = "",
      header_exempt: str | None = None) -> StructDef:
    """Terse constructor used by the tables."""
    return StructDef(name, parse_fields(fields), tuple(compat), since, doc, header_exempt)


def st(name: str, ref: str | None = None, *, optional: bool = False) -> Part:
    return Part("struct", name, ref or name, optional=optional)


def name(n: str = "name") -> Part:
    return Part("str", n)


def data(n: str = "data", *, optional: bool = True) -> Part:
    return Part("data", n, optional=optional)


def array(n: str, ref: str, count_from: str | None = None) -> Part:
    return Part("array", n, ref, count_from=count_from)


@dataclass
class Registry:
    """All the tables of one protocol, indexed for derivation."""

    structs: dict[str, StructDef] = field(default_factory=dict)
    flagsets: dict[str, FlagSet] = field(default_factory=dict)
    enums: dict[str, Enum] = field(default_factory=dict)

    def add_structs(self, defs: Iterable[StructDef]) -> None:
        for d in defs:
            if d.name in self.structs:
                raise ValueError(f"duplicate struct {d.name}")
            self.structs[d.name] = d

    def add_flagsets(self, sets: Iterable[FlagSet]) -> None:
        for f in sets:
            self.flagsets[f.name] = f

    def add_enums(self, enums: Iterable[Enum]) -> None:
        for e in enums:
            self.enums[e.name] = e

    def sizeof(self, sname: str) -> int:
        return sum(self.field_size(f) for f in self.structs[sname].fields)

    def field_size(self, f: Field) -> int:
        if f.ctype in SCALAR_SIZE:
            return SCALAR_SIZE[f.ctype] * f.count
        return self.sizeof(f.ctype) * f.count

    def offsets(self, sname: str) -> Iterator[tuple[str, int, int]]:
        """(dotted field path, offset, size) for every field, nested structs expanded."""
        off = 0
        for f in self.structs[sname].fields:
            size = self.field_size(f)
            yield f.name, off, size
            if f.ctype not in SCALAR_SIZE and f.count == 1:
                for sub, soff, ssize in self.offsets(f.ctype):
                    yield f"{f.name}.{sub}", off + soff, ssize
            off += size


def bits(prefix: str, pairs: Mapping[str, int] | Iterable[tuple[str, int]], *, shift: bool = True,
         name: str) -> FlagSet:
    """Flag set from {NAME: bit_number} (shift=True) or {NAME: value}."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    return FlagSet(name, tuple((n, (1 << v) if shift else v) for n, v in items), prefix)
