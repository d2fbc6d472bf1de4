"""struct.Struct codecs generated from the spec tables.

Each spec struct becomes a namedtuple subclass plus a compiled decoder and
encoder.  The generated code unpacks a whole (possibly nested) struct with one
`unpack_from` call, which is what makes full decoding fast in pure Python.
"""

from __future__ import annotations

import struct
from collections import namedtuple
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .spec.types import SCALAR_SIZE, SCALARS, Field, Registry, StructDef


def pyname(cname: str) -> str:
    """Python attribute for a C field name (namedtuple forbids a leading underscore)."""
    return cname.lstrip("_") or cname


class Record(tuple):
    """Base of generated struct records: immutable, tuple-fast, with the spec attached."""

    __slots__ = ()
    _spec: StructDef
    _codec: StructCodec
    _fields: tuple[str, ...]

    def _asdict(self) -> dict[str, Any]:  # overridden by namedtuple; declared for typing
        raise NotImplementedError

    def _replace(self, **kw: Any) -> Any:  # overridden by namedtuple
        raise NotImplementedError

    if TYPE_CHECKING:
        # Fields are generated from the spec; to the type checker every field is Any.
        def __getattr__(self, name: str) -> Any: ...

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (records inside become dicts, arrays lists)."""
        out: dict[str, Any] = {}
        for k, v in zip(self._fields, self, strict=True):
            if isinstance(v, Record):
                out[k] = v.to_dict()
            elif isinstance(v, tuple):
                out[k] = list(v)
            else:
                out[k] = v
        return out

    def pack(self) -> bytes:
        return self._codec.encode(self)


class StructCodec:
    """Compiled codec for one spec struct."""

    def __init__(self, registry: Registry, sdef: StructDef, codecs: dict[str, StructCodec]) -> None:
        self.spec = sdef
        self.name = sdef.name
        fmt, self._plan = self._flatten(registry, sdef, codecs)
        self.struct = struct.Struct("<" + fmt)
        self.size = self.struct.size
        assert self.size == registry.sizeof(sdef.name), sdef.name
        fields = [pyname(f.name) for f in sdef.fields]
        base = namedtuple(sdef.name, fields)  # type: ignore[misc]
        self.cls: type[Record] = type(sdef.name, (base, Record), {"__slots__": (), "_spec": sdef, "_codec": self})
        self.decode: Callable[..., Record] = self._compile_decode()
        self.flatten_values: Callable[[Any], list[Any]] = self._compile_flatten()
        self.compat_sizes = tuple(sorted(sdef.compat_sizes))

    @staticmethod
    def _flatten(registry: Registry, sdef: StructDef,
                 codecs: dict[str, StructCodec]) -> tuple[str, list[tuple[str, int, Any]]]:
        """Return the struct format and a plan: (kind, value_count, aux) per field."""
        fmt = []
        plan: list[tuple[str, int, Any]] = []
        for f in sdef.fields:
            if f.ctype == "char":
                fmt.append(f"{f.count}s")
                plan.append(("scalar", 1, None))
            elif f.ctype in SCALARS:
                c = SCALARS[f.ctype]
                if f.count == 1:
                    fmt.append(c)
                    plan.append(("scalar", 1, None))
                else:
                    fmt.append(f"{f.count}{c}")
                    plan.append(("array", f.count, None))
            else:
                sub = codecs[f.ctype]
                if f.count != 1:
                    raise ValueError(f"{sdef.name}.{f.name}: arrays of structs are not supported")
                fmt.append(sub.struct.format.lstrip("<"))
                plan.append(("struct", sub.n_values, sub))
        return "".join(fmt), plan

    @property
    def n_values(self) -> int:
        return sum(n for _, n, _ in self._plan)

    def _compile_decode(self) -> Callable[..., Record]:
        ns: dict[str, Any] = {"_unpack": self.struct.unpack_from, "_new": tuple.__new__, "_cls": self.cls,
                              "_tuple": tuple}
        if all(k == "scalar" for k, _, _ in self._plan):
            src = "def decode(buf, off=0):\n    return _new(_cls, _unpack(buf, off))\n"
        else:
            ns["_build"] = self._compile_build(ns)
            src = "def decode(buf, off=0):\n    return _build(_unpack(buf, off), 0)\n"
        exec(src, ns)  # generated from the spec tables, like namedtuple
        return ns["decode"]

    def _compile_build(self, ns: dict[str, Any], prefix: str = "") -> Callable[[tuple[Any, ...], int], Record]:
        """A function building this record from a flat value tuple starting at index i."""
        parts = []
        i = 0
        for n, (kind, count, sub) in enumerate(self._plan):
            if kind == "scalar":
                parts.append(f"v[i+{i}]")
            elif kind == "array":
                parts.append(f"_tuple(v[i+{i}:i+{i + count}])")
            else:
                key = f"_b{prefix}{n}"
                ns[key] = sub._compile_build(ns, prefix + f"{n}_")
                parts.append(f"{key}(v, i+{i})")
            i += count
        key = f"_c{prefix}"
        ns[key] = self.cls
        fname = f"_build{prefix}"
        src = f"def {fname}(v, i):\n    return _new({key}, ({', '.join(parts)},))\n"
        exec(src, ns)  # generated from the spec tables, like namedtuple
        return ns[fname]

    def _compile_flatten(self) -> Callable[[Any], list[Any]]:
        plan = self._plan

        def flatten(rec: Any) -> list[Any]:
            out: list[Any] = []
            for (kind, count, sub), v in zip(plan, rec, strict=True):
                if kind == "scalar":
                    out.append(v)
                elif kind == "array":
                    if len(v) != count:
                        raise ValueError(f"array of {count} expected, got {len(v)}")
                    out.extend(v)
                else:
                    out.extend(sub.flatten_values(v))
            return out

        return flatten

    def encode(self, rec: Any) -> bytes:
        return self.struct.pack(*self.flatten_values(rec))

    def decode_compat(self, buf: Any, off: int, avail: int) -> Record:
        """Decode a shorter, older layout: the missing tail reads as zeros."""
        if avail >= self.size:
            return self.decode(buf, off)
        padded = bytes(buf[off:off + avail]) + bytes(self.size - avail)
        return self.decode(padded, 0)

    def make(self, **kw: Any) -> Record:
        """A record with every field zero (or empty) except those given."""
        vals = []
        for f in self.spec.fields:
            key = pyname(f.name)
            if key in kw:
                v = kw.pop(key)
                if isinstance(v, dict):
                    v = self._sub_codecs[key].make(**v)
            else:
                v = self.zero_value(f)
            vals.append(v)
        if kw:
            raise TypeError(f"{self.name} has no field(s) {', '.join(kw)}")
        return self.cls(*vals)

    def zero_value(self, f: Field) -> Any:
        if f.ctype == "char":
            return b"\0" * f.count
        if f.ctype in SCALARS:
            return 0 if f.count == 1 else (0,) * f.count
        return self._sub_codecs[f.name].make()

    _sub_codecs: dict[str, StructCodec]


def build_codecs(registry: Registry) -> dict[str, StructCodec]:
    """Compile every struct of a registry, nested ones first."""
    codecs: dict[str, StructCodec] = {}

    def build(name: str) -> StructCodec:
        if name in codecs:
            return codecs[name]
        sdef = registry.structs[name]
        for f in sdef.fields:
            if f.ctype not in SCALAR_SIZE:
                build(f.ctype)
        c = StructCodec(registry, sdef, codecs)
        c._sub_codecs = {f.name: codecs[f.ctype] for f in sdef.fields if f.ctype not in SCALAR_SIZE}
        c._sub_codecs.update({pyname(k): v for k, v in list(c._sub_codecs.items())})
        codecs[name] = c
        return c

    for n in registry.structs:
        build(n)
    return codecs


def iter_fields(rec: Record, base_off: int = 0, prefix: str = "") -> Iterator[tuple[str, Field, Any, int, int]]:
    """(path, Field, value, offset, size) for every leaf field of a record, with byte offsets."""
    codec = rec._codec
    off = base_off
    for f, v in zip(codec.spec.fields, rec, strict=True):
        path = f"{prefix}{pyname(f.name)}"
        if isinstance(v, Record):
            yield from iter_fields(v, off, path + ".")
            off += v._codec.size
        else:
            size = (SCALAR_SIZE[f.ctype]) * f.count
            yield path, f, v, off, size
            off += size


class Snapped(bytes):
    """A payload the capture cut: the bytes captured, and `wire_len`, its length on the wire."""

    wire_len: int

    def __new__(cls, data: bytes, wire_len: int) -> Snapped:
        obj = super().__new__(cls, data)
        obj.wire_len = wire_len
        return obj


def wire_len(v: bytes) -> int:
    """A payload's length on the wire, whether or not the capture cut it."""
    return v.wire_len if isinstance(v, Snapped) else len(v)
