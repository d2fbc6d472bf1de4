"""scapy layers for vhost-user, generated from spec/vhost_user.py.

`VhostUser` is the 12-byte header; each request's payload is its own layer (`VhostUserSetVringNum`),
and so is its reply (`VhostUserGetFeaturesReply`; a request without a reply of its own is acknowledged
with a u64, REPLY_ACK).  The back-end channel reuses request numbers: `VhostUser(data, backend_channel=True)`.
`size`, `request`, the REPLY flag and the memory table's `num_regions` are filled in when left unset.
"""

from __future__ import annotations

import struct
from typing import Any

from scapy.fields import EnumField, FieldLenField, PacketListField, StrField, StrLenField
from scapy.packet import Packet, Raw, bind_layers

from ..spec import vhost_user as spec
from ._fields import AnyField, StructLayers, add_layer, camel, member_fields, plain

_REG = spec.REGISTRY
STRUCTS = StructLayers(_REG, camel)


class VhostUserPayload(Packet):
    """A request's or reply's payload; `layout` is the spec's (a struct name, 'memory', 'config' or 'raw')."""

    layout: str = ""

    def payload_values(self) -> dict[str, Any]:
        return {f.name: plain(self.getfieldval(f.name)) for f in self.fields_desc}


def _layout_fields(layout: str) -> list[AnyField]:
    if layout == "memory":
        return [FieldLenField("num_regions", None, count_of="regions", fmt="<I"),
                *member_fields(_REG, _REG.structs["vhost_user_memory"], STRUCTS)[1:],
                PacketListField("regions", [], STRUCTS("vhost_user_memory_region"),
                                count_from=lambda p: p.num_regions),
                StrField("unused", b"")]  # QEMU sends all 8 slots; the ones past num_regions are ignored
    if layout == "config":
        head = member_fields(_REG, _REG.structs["vhost_user_config"], STRUCTS)
        return [head[0], FieldLenField("size", None, length_of="region", fmt="<I"), head[2],
                StrLenField("region", b"", length_from=lambda p: p.size)]
    if layout == "raw":
        return [StrField("data", b"")]
    return member_fields(_REG, _REG.structs[layout], STRUCTS)


def _payload_layer(clsname: str, title: str, layout: str, doc: str) -> type[VhostUserPayload]:
    return type(clsname, (VhostUserPayload,), {"name": title, "fields_desc": _layout_fields(layout),
                                                "layout": layout, "__doc__": doc or None,
                                                "__module__": "dissectors.scapy"})


class VhostUser(Packet):
    """vhost_user_header (flags default to version 1)."""

    __slots__ = ["backend_channel"]
    name = "vhost_user_header"
    fields_desc = [
        EnumField("request", 0, {r.value: r.name for r in spec.FRONTEND_REQUESTS}, fmt="<I"),
        *member_fields(_REG, _REG.structs["vhost_user_header"], STRUCTS,
                       defaults={"size": None, "flags": spec.VERSION})[1:],
    ]

    def __init__(self, _pkt: bytes = b"", *args: Any, backend_channel: bool = False, **kw: Any) -> None:
        self.backend_channel = backend_channel
        super().__init__(_pkt, *args, **kw)

    def post_build(self, pkt: bytes, pay: bytes) -> bytes:
        if self.size is None:
            pkt = pkt[:8] + struct.pack("<I", len(pay))
        return pkt + pay

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes | None]:
        n = self.size or 0
        return (s, None) if len(s) <= n else (s[:n], s[n:])

    def guess_payload_class(self, payload: bytes) -> type[Packet]:
        table = BACKEND_LAYERS if self.backend_channel else FRONTEND_LAYERS
        return table.get((self.request, bool(self.flags & 0x4)), Raw)


FRONTEND_LAYERS: dict[tuple[int, bool], type[VhostUserPayload]] = {}
BACKEND_LAYERS: dict[tuple[int, bool], type[VhostUserPayload]] = {}
LAYERS: dict[str, type[Packet]] = {"VhostUser": VhostUser}

for _table, _reqs in ((FRONTEND_LAYERS, spec.FRONTEND_REQUESTS), (BACKEND_LAYERS, spec.BACKEND_REQUESTS)):
    for _r in _reqs:
        _base = "VhostUser" + camel(_r.name)
        for _reply, _layout in ((False, _r.payload), (True, _r.reply or "vhost_user_u64")):
            if _layout is None:
                continue
            _cls = _payload_layer(_base + ("Reply" if _reply else ""),
                                  f"VHOST_USER_{_r.name}" + (" reply" if _reply else ""), _layout, _r.doc)
            _table[(_r.value, _reply)] = _cls
            add_layer(LAYERS, _cls)
            bind_layers(VhostUser, _cls, request=_r.value, flags=spec.VERSION | (0x4 if _reply else 0))
for _s in _REG.structs:
    add_layer(LAYERS, STRUCTS(_s))
