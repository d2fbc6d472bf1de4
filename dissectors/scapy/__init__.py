"""scapy layers generated from the spec tables: a public way to craft and dissect FUSE and vhost-user.

    from dissectors.scapy import *
    raw = bytes(FuseIn(unique=2, nodeid=1)/FuseLookup(name=b"etc"))   # len and opcode filled in
    FuseIn(raw).show()
    fuse_reply(reply_bytes, FuseIn(raw))                              # a reply needs its request's opcode

scapy is imported only here (an import-linter contract): nothing in the proxy, daemon or TUI loads it.
A field named `name` (LOOKUP, MKDIR, ...) is shadowed by scapy's layer name: read it with
`pkt.getfieldval("name")` (setting it, `FuseLookup(name=...)`, works as any field).
"""

from __future__ import annotations

from scapy.packet import Packet

from .fuse import LAYERS as _FUSE_LAYERS
from .fuse import NOTIFY_LAYERS, REPLY_LAYERS, REQUEST_LAYERS, FuseBody, fuse_reply, header_values
from .vhost_user import BACKEND_LAYERS, FRONTEND_LAYERS, VhostUserPayload
from .vhost_user import LAYERS as _VHU_LAYERS

if _FUSE_LAYERS.keys() & _VHU_LAYERS.keys():  # pragma: no cover - a spec change needs a new naming rule
    raise ValueError(f"layer names in both protocols: {sorted(_FUSE_LAYERS.keys() & _VHU_LAYERS.keys())}")
LAYERS: dict[str, type[Packet]] = {**_FUSE_LAYERS, **_VHU_LAYERS}
globals().update(LAYERS)

__all__ = [
    "BACKEND_LAYERS", "FRONTEND_LAYERS", "LAYERS", "NOTIFY_LAYERS", "REPLY_LAYERS", "REQUEST_LAYERS", "FuseBody",
    "VhostUserPayload", "fuse_reply", "header_values", *sorted(LAYERS),
]
