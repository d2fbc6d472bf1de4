"""scapy layers for FUSE, generated from spec/fuse.py as recording/lua.py generates the Lua dissector.

`FuseIn` (fuse_in_header) is bound to each request body by opcode; `FuseOut` (fuse_out_header) to each
notification by code (unique 0).  A reply carries no opcode, so `FuseOut(data, opcode=...)` (or
`fuse_reply(data, request)`) names it.  A body's struct parts are inlined (`FuseWrite(fh=3, data=b"x")`),
nested structs are PacketFields (`FuseLookupReply(attr=FuseAttr(mode=0o100644))`), and `len`,
`opcode`, `total_extlen`, `namelen` and list counts are filled in when left unset.
"""

from __future__ import annotations

import struct
from typing import Any, cast

from scapy.fields import (
    ConditionalField,
    Field,
    FieldLenField,
    FieldListField,
    PacketListField,
    StrField,
    StrLenField,
    StrNullField,
)
from scapy.packet import NoPayload, Packet, Raw, bind_layers

from ..spec import fuse as spec
from ..spec.types import Part
from ..structs import pyname
from ._fields import AnyField, MaybeField, StructLayer, StructLayers, add_layer, camel, member_fields, plain

_REG = spec.REGISTRY
_OP_NAMES = {camel(o.name) for o in spec.OPCODES}


def _struct_name(sname: str) -> str:
    """fuse_attr -> FuseAttr; a struct whose name an opcode's layer takes gets 'Struct' (FuseStatxStruct)."""
    base = camel(sname)
    return base + "Struct" if base.removeprefix("Fuse") in _OP_NAMES else base


STRUCTS = StructLayers(_REG, _struct_name)


class FuseBody(Packet):
    """A request, reply or notification body.  `parts` maps each spec part to its fields, for comparisons."""

    parts: tuple[tuple[Part, tuple[str, ...]], ...] = ()

    def part_values(self) -> dict[str, Any]:
        """The body as the codec's `args` would hold it (struct parts as dicts of their fields)."""
        out: dict[str, Any] = {}
        for p, names in self.parts:
            if p.kind == "struct":
                vals = {n: plain(self.getfieldval(n)) for n in names}
                out[p.name] = None if all(v is None for v in vals.values()) else vals
            elif p.kind == "xattr":
                if _xattr_is_size(self):
                    out["xattr"] = {n: plain(self.getfieldval(n)) for n in ("size", "padding")}
                else:
                    out["value"] = bytes(self.getfieldval("value"))
            else:
                out[p.name] = plain(self.getfieldval(names[0]))
        return out


def _setxattr_ext(pkt: Packet) -> bool:
    """fuse_setxattr_in is 8 bytes unless INIT negotiated FUSE_SETXATTR_EXT (FuseIn(setxattr_ext=False))."""
    u = pkt.underlayer
    return bool(getattr(u, "setxattr_ext", True)) if u is not None else True


def _xattr_is_size(pkt: Packet) -> bool:
    """A GETXATTR/LISTXATTR reply is fuse_getxattr_out when the request asked size 0; crafted: when `size` is set."""
    u = pkt.underlayer
    q = getattr(u, "size_query", None) if u is not None else None
    if q is not None:
        return bool(q)
    return pkt.fields.get("size") is not None


def _dirent_layer(plus: bool) -> type[Packet]:
    """One READDIR(PLUS) record: the struct, name[namelen], padding to 8 bytes (the last may be cut)."""
    sname = "fuse_direntplus" if plus else "fuse_dirent"
    head = _REG.sizeof(sname)
    fields: list[AnyField] = member_fields(_REG, _REG.structs[sname], STRUCTS)
    if not plus:  # namelen from the name when left unset
        fields = [FieldLenField("namelen", None, length_of="name", fmt="<I") if f.name == "namelen" else f
                  for f in fields]

    def namelen(pkt: Packet) -> int:
        return int(pkt.dirent.namelen if plus else pkt.namelen)

    fields += [StrLenField("name", b"", length_from=namelen),
               StrLenField("pad", cast(Any, None), length_from=lambda pkt: -(head + namelen(pkt)) % 8)]

    def post_build(self: Packet, pkt: bytes, pay: bytes) -> bytes:
        if plus and self.dirent.namelen == 0 and self.getfieldval("name"):
            pkt = pkt[:head - 8] + struct.pack("<I", len(self.getfieldval("name"))) + pkt[head - 4:]
        if self.getfieldval("pad") is None:
            pkt += b"\0" * (-len(pkt) % 8)
        return pkt + pay

    return type("FuseDirentplusRecord" if plus else "FuseDirentRecord", (StructLayer,), {
        "name": sname + " record", "fields_desc": fields, "post_build": post_build, "__module__": "dissectors.scapy",
    })


DIRENT_RECORD = _dirent_layer(False)
DIRENTPLUS_RECORD = _dirent_layer(True)


def _count_of(path: str) -> Any:
    field = path.split(".")[1]
    return lambda pkt: pkt.getfieldval(field)


def _part_fields(p: Part, last: bool) -> list[AnyField]:
    if p.kind == "struct":
        sdef = _REG.structs[p.ref or p.name]
        fields = member_fields(_REG, sdef, STRUCTS, None if p.optional else 0)
        if p.optional:
            return [MaybeField(f) for f in fields]
        if p.name == "setxattr":  # the 7.33 extension: only with FUSE_SETXATTR_EXT
            return fields[:2] + [ConditionalField(f, _setxattr_ext) for f in fields[2:]]
        if sdef.compat_sizes and last:  # an older peer's shorter struct: the tail is absent
            out, off = [], 0
            for sf, f in zip(sdef.fields, fields):
                out.append(MaybeField(f) if off >= min(sdef.compat_sizes) else f)
                off += _REG.field_size(sf)
            return out
        return fields
    if p.kind == "str":
        return [StrNullField(p.name, b"")]
    if p.kind in ("text", "data"):
        return [StrField(p.name, b"")]
    if p.kind == "array":
        count = _count_of(p.count_from) if p.count_from else None
        if p.ref == "u64":
            return [FieldListField(p.name, [], Field("", 0, "<Q"), count_from=count)]
        return [PacketListField(p.name, [], STRUCTS(p.ref or ""), count_from=count)]
    if p.kind in ("dirents", "direntplus"):
        return [PacketListField(p.name, [], DIRENTPLUS_RECORD if p.kind == "direntplus" else DIRENT_RECORD)]
    if p.kind == "strs":
        return [FieldListField(p.name, [], StrNullField("", b""))]
    if p.kind == "xattr":
        return [ConditionalField(Field("size", None, "<I"), _xattr_is_size),
                ConditionalField(Field("padding", 0, "<I"), _xattr_is_size),
                ConditionalField(StrField("value", b""), lambda pkt: not _xattr_is_size(pkt))]
    raise ValueError(f"unknown part kind {p.kind}")  # pragma: no cover - spec error


def _body_layer(clsname: str, title: str, parts: tuple[Part, ...], doc: str) -> type[FuseBody]:
    fields: list[AnyField] = []
    mapping: list[tuple[Part, tuple[str, ...]]] = []
    for i, p in enumerate(parts):
        pf = _part_fields(p, i == len(parts) - 1)
        taken = {f.name for f in fields}
        clash = taken & {f.name for f in pf}
        if clash:  # pragma: no cover - a spec change that needs a naming rule here
            raise ValueError(f"{clsname}: fields {sorted(clash)} appear in two parts")
        fields += pf
        mapping.append((p, tuple(f.name for f in pf)))
    for p in parts:  # a list's count (batch.count, removemapping.count, prune.count) follows the list
        if p.kind == "array" and p.count_from:
            cname = p.count_from.split(".")[1]
            fields = [FieldLenField(cname, None, count_of=p.name, fmt=f.fmt) if f.name == cname else f
                      for f in fields]
    ns: dict[str, Any] = {"name": title, "fields_desc": fields, "parts": tuple(mapping), "__doc__": doc or None,
                          "__module__": "dissectors.scapy"}
    return type(clsname, (FuseBody,), ns)


def _header_fields(sname: str, auto: tuple[str, ...]) -> list[AnyField]:
    """A header struct's fields, with `auto` ones defaulting to None (computed in post_build)."""
    return member_fields(_REG, _REG.structs[sname], STRUCTS, defaults=dict.fromkeys(auto))


class FuseExt(Packet):
    """A request extension (fuse_ext_header + body, 8-byte aligned): FUSE_EXT_GROUPS carries supplementary
    groups; others keep their bytes in `data`."""

    name = "fuse_ext_header"
    fields_desc = [
        *_header_fields("fuse_ext_header", ("size",)),
        ConditionalField(FieldLenField("nr_groups", None, count_of="groups", fmt="<I"), lambda p: p.type == 32),
        ConditionalField(FieldListField("groups", [], Field("", 0, "<I"), count_from=lambda p: p.nr_groups),
                         lambda p: p.type == 32),
        StrLenField("data", b"", length_from=lambda p: max(0, (p.size or 0) - 8 - (
            4 + 4 * len(p.groups) if p.type == 32 else 0))),
    ]

    def post_build(self, pkt: bytes, pay: bytes) -> bytes:
        pkt += b"\0" * (-len(pkt) % 8)
        if self.size is None:
            pkt = struct.pack("<I", len(pkt)) + pkt[4:]
        return pkt + pay

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes | None]:
        return b"", s

    def values(self) -> tuple[dict[str, Any], Any]:
        """As the codec lists it: (header fields, groups list or body bytes)."""
        head = {"size": int(self.size), "type": int(self.type)}
        return head, [int(g) for g in self.groups] if self.type == 32 else bytes(self.data)


class _Header(Packet):
    """FuseIn and FuseOut: an empty body still gets its layer (DESTROY, an empty READDIR reply), as the
    codec still gives it its parts."""

    def do_dissect_payload(self, s: bytes) -> None:
        if s:
            super().do_dissect_payload(s)
            return
        cls = self.guess_payload_class(s)
        if issubclass(cls, FuseBody):
            self.add_payload(cls(_internal=1, _underlayer=self))


class FuseIn(_Header):
    """fuse_in_header.  `len`, `opcode` (from the body layer) and `total_extlen` (from FuseExt layers at the
    end) are computed when unset.  FuseIn(data, setxattr_ext=False) dissects SETXATTR's 8-byte layout."""

    __slots__ = ["setxattr_ext"]
    name = "fuse_in_header"
    fields_desc = _header_fields("fuse_in_header", ("len", "total_extlen"))

    def __init__(self, _pkt: bytes = b"", *args: Any, setxattr_ext: bool = True, **kw: Any) -> None:
        self.setxattr_ext = setxattr_ext
        super().__init__(_pkt, *args, **kw)

    def dissect(self, s: bytes) -> None:
        s = self.post_dissect(self.do_dissect(self.pre_dissect(s)))
        rest = (self.len or 0) - spec.IN_HEADER_SIZE
        ext = (self.total_extlen or 0) * 8
        if len(s) < rest or ext > rest:  # a capture cut inside the message: the extensions are past the cut
            body, exts, pad = s[:max(0, rest - ext)], b"", b""
        else:
            body, exts, pad = s[:rest - ext], s[rest - ext:rest], s[rest:]
        self.do_dissect_payload(body)
        while len(exts) >= 8:
            size = struct.unpack_from("<I", exts)[0]
            size = size if size >= 8 else len(exts)
            self.add_payload(FuseExt(exts[:size]))
            exts = exts[size:]
        if exts + pad:
            self.add_payload(Raw(exts + pad))

    def post_build(self, pkt: bytes, pay: bytes) -> bytes:
        if self.total_extlen is None:
            ext = 0
            layer = self.payload
            while not isinstance(layer, NoPayload):
                if isinstance(layer, FuseExt):
                    ext = len(layer)  # this extension and those after it
                    break
                layer = layer.payload
            pkt = pkt[:36] + struct.pack("<H", ext // 8) + pkt[38:]
        if self.len is None:
            pkt = struct.pack("<I", len(pkt) + len(pay)) + pkt[4:]
        return pkt + pay

    def guess_payload_class(self, payload: bytes) -> type[Packet]:
        return REQUEST_LAYERS.get(self.opcode, Raw)


class FuseOut(_Header):
    """fuse_out_header.  A reply's body depends on its request: FuseOut(data, opcode=...) or
    FuseOut(data, request=<FuseIn>); unique 0 is a notification (error holds its code)."""

    __slots__ = ["reply_opcode", "size_query"]
    name = "fuse_out_header"
    fields_desc = _header_fields("fuse_out_header", ("len",))

    def __init__(self, _pkt: bytes = b"", *args: Any, opcode: int | str | None = None,
                 request: Packet | None = None, **kw: Any) -> None:
        self.size_query: bool | None = None
        if request is not None:
            opcode = int(request.opcode)
            body = request.payload
            if opcode in (22, 23) and isinstance(body, FuseBody):  # GETXATTR/LISTXATTR: size 0 asks the size
                self.size_query = body.getfieldval("size") == 0
        if isinstance(opcode, str):
            opcode = spec.OPCODE_BY_NAME[opcode.upper().removeprefix("FUSE_")].value
        self.reply_opcode = opcode
        super().__init__(_pkt, *args, **kw)

    def post_build(self, pkt: bytes, pay: bytes) -> bytes:
        if self.len is None:
            pkt = struct.pack("<I", len(pkt) + len(pay)) + pkt[4:]
        return pkt + pay

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes | None]:
        rest = (self.len or 0) - spec.OUT_HEADER_SIZE
        return (s, None) if len(s) <= rest else (s[:rest], s[rest:])

    def guess_payload_class(self, payload: bytes) -> type[Packet]:
        if self.unique == 0:
            return NOTIFY_LAYERS.get(self.error, Raw)
        if self.error or self.reply_opcode is None:
            return Raw
        if self.reply_opcode in (22, 23) and self.size_query is None:
            self.size_query = len(payload) == 8  # without the request: an 8-byte reply is the size answer
        return REPLY_LAYERS.get(self.reply_opcode, Raw)


def fuse_reply(data: bytes, request: Packet | int | str) -> FuseOut:
    """Dissect a reply given its request (a FuseIn, or the opcode as a number or name)."""
    if isinstance(request, Packet):
        return FuseOut(data, request=request)
    return FuseOut(data, opcode=request)


REQUEST_LAYERS: dict[int, type[FuseBody]] = {}
REPLY_LAYERS: dict[int, type[FuseBody]] = {}
NOTIFY_LAYERS: dict[int, type[FuseBody]] = {}
LAYERS: dict[str, type[Packet]] = {"FuseIn": FuseIn, "FuseOut": FuseOut, "FuseExt": FuseExt,
                                   "FuseDirentRecord": DIRENT_RECORD, "FuseDirentplusRecord": DIRENTPLUS_RECORD}

for _o in spec.OPCODES:
    _cls = _body_layer("Fuse" + camel(_o.name), f"FUSE_{_o.name}", _o.request, _o.doc)
    REQUEST_LAYERS[_o.value] = _cls
    bind_layers(FuseIn, _cls, opcode=_o.value)
    add_layer(LAYERS, _cls)
    if _o.reply:
        _rcls = _body_layer("Fuse" + camel(_o.name) + "Reply", f"FUSE_{_o.name} reply", _o.reply, _o.doc)
        REPLY_LAYERS[_o.value] = _rcls
        add_layer(LAYERS, _rcls)
for _n in spec.NOTIFIES:
    _cls = _body_layer("FuseNotify" + camel(_n.name), f"FUSE_NOTIFY_{_n.name}", _n.body, _n.doc)
    NOTIFY_LAYERS[_n.value] = _cls
    bind_layers(FuseOut, _cls, error=_n.value, unique=0)
    add_layer(LAYERS, _cls)
for _s in _REG.structs:
    add_layer(LAYERS, STRUCTS(_s))


def header_values(pkt: Packet) -> dict[str, Any]:
    """fuse_in/out_header fields as ints, keyed like the codec's header Record."""
    return {pyname(f.name): int(pkt.getfieldval(f.name)) for f in pkt.fields_desc}
