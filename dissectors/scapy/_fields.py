"""Spec struct -> scapy fields: one mapping shared by the FUSE and vhost-user layers.

Field names are the codecs' (`pyname`), so a dissected layer and a decoded Record compare by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from scapy.fields import (
    ConditionalField,
    EnumField,
    Field,
    FieldListField,
    FlagsField,
    PacketField,
    StrFixedLenField,
)
from scapy.packet import Packet

from ..spec.types import SCALAR_SIZE, SCALARS, Registry, StructDef
from ..spec.types import Field as SpecField
from ..structs import pyname

AnyField = Any  # scapy's field classes are generic; the generated layers mix them freely


def camel(cname: str) -> str:
    """fuse_entry_out -> FuseEntryOut, COPY_FILE_RANGE_64 -> CopyFileRange64."""
    return "".join(p[:1].upper() + p[1:].lower() for p in cname.split("_") if p)


class StructLayer(Packet):
    """A fixed spec struct nested in a message (fuse_attr in fuse_entry_out, a memory region, a dirent)."""

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes | None]:
        return b"", s  # the bytes after the struct belong to the enclosing layer


class MaybeField(ConditionalField):
    """Present only while bytes remain: an optional struct (GETATTR's getattr_in) or a compat tail
    (the fields an older peer's shorter fuse_init_in/out leaves out)."""

    def __init__(self, fld: AnyField) -> None:
        super().__init__(fld, lambda pkt: True)

    def getfield(self, pkt: Packet, s: bytes) -> tuple[bytes, Any]:
        if not s:
            return s, None
        return self.fld.getfield(pkt, s)

    def addfield(self, pkt: Packet, s: bytes, val: Any) -> bytes:
        if val is None:
            return s
        return self.fld.addfield(pkt, s, val)


def _const(n: int) -> Callable[[Packet], int]:
    return lambda pkt: n


def _fmt(ctype: str) -> str:
    return "<" + SCALARS[ctype]


def scalar_field(registry: Registry, f: SpecField, default: Any = 0) -> AnyField:
    """One scalar member: enums and flag sets named in the spec keep their names in scapy."""
    n = pyname(f.name)
    bits_ = SCALAR_SIZE[f.ctype] * 8
    if f.enum and f.enum in registry.enums:
        return EnumField(n, default, {v: k for k, v in registry.enums[f.enum].values}, fmt=_fmt(f.ctype))
    if f.flags and f.flags in registry.flagsets and not f.ctype.startswith("i"):
        names = {v: k for k, v in registry.flagsets[f.flags].bits if 0 < v < (1 << bits_) and not v & (v - 1)}
        return FlagsField(n, default, -bits_, names)
    return Field(n, default, _fmt(f.ctype))


def member_fields(registry: Registry, sdef: StructDef, struct_layer: Callable[[str], type[Packet]],
                  default: Any = 0, defaults: Mapping[str, Any] | None = None) -> list[AnyField]:
    """The scapy fields of one struct's members, in order (nested structs as PacketField).

    `defaults` overrides some scalars' default (None: computed when the layer is built)."""
    out: list[AnyField] = []
    for f in sdef.fields:
        n = pyname(f.name)
        if defaults and n in defaults:
            out.append(scalar_field(registry, f, defaults[n]))
        elif f.ctype == "char":
            out.append(StrFixedLenField(n, b"\0" * f.count if default is not None else None, f.count))
        elif f.ctype in SCALARS and f.count == 1:
            out.append(scalar_field(registry, f, default))
        elif f.ctype in SCALARS:
            fixed: Any = [0] * f.count if default is not None else None
            out.append(FieldListField(n, fixed, Field("", 0, _fmt(f.ctype)), count_from=_const(f.count)))
        else:
            cls = struct_layer(f.ctype)
            out.append(PacketField(n, cls() if default is not None else None, cls))
    return out


class StructLayers:
    """The StructLayer subclass of each struct of a registry, made on first use."""

    def __init__(self, registry: Registry, layer_name: Callable[[str], str]) -> None:
        self.registry = registry
        self.layer_name = layer_name
        self.classes: dict[str, type[Packet]] = {}

    def __call__(self, sname: str) -> type[Packet]:
        cls = self.classes.get(sname)
        if cls is None:
            sdef = self.registry.structs[sname]
            cls = type(self.layer_name(sname), (StructLayer,), {
                "name": sname, "fields_desc": member_fields(self.registry, sdef, self), "__doc__": sdef.doc or None,
                "__module__": "dissectors.scapy",
            })
            self.classes[sname] = cls
        return cls


def add_layer(layers: dict[str, type[Packet]], cls: type[Packet]) -> None:
    """One class per public name: a spec change that makes two names meet needs a new naming rule."""
    if cls.__name__ in layers:  # pragma: no cover - spec error
        raise ValueError(f"two layers named {cls.__name__}")
    layers[cls.__name__] = cls


def plain(v: Any) -> Any:
    if isinstance(v, Packet):
        return {f.name: plain(v.getfieldval(f.name)) for f in v.fields_desc}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, int):
        return int(v)  # FlagValue -> int
    return v
