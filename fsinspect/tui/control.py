"""The control-plane view: features offered/acked/masked, memory regions, vrings, kick/call changes.

Built the same shape as the proxy's `ControlPlane.snapshot()` from what each source has: a recording's
vhost-user messages (both the original and the proxy's rewritten copy, told apart by their notes), or
a live proxy's snapshot plus its events and message summaries.  No textual here.
"""

from __future__ import annotations

from typing import Any

from dissectors import vhost_user as V
from dissectors.errors import DecodeError
from dissectors.structs import Record

from ..recording import format as fmt

SENT_TO_QEMU = fmt.NOTE_TO_FRONTEND
FORWARDED = fmt.NOTE_TO_BACKEND


class ControlState:
    """features (same keys as ControlPlane.snapshot) updated message by message or event by event."""

    def __init__(self) -> None:
        self.f: dict[str, Any] = {"regions": [], "vrings": {}}
        self.messages = 0

    def vring(self, index: int) -> dict[str, Any]:
        vr: dict[str, Any] = self.f["vrings"].setdefault(str(index), {
            "num": None, "base": None, "enabled": None, "started": None, "kick_changes": 0, "call_changes": 0})
        return vr

    def seed(self, snap: dict[str, Any]) -> None:
        """A live proxy's ControlPlane.snapshot() (vring keys arrive as strings through JSON)."""
        f = dict(snap)
        f["regions"] = list(f.get("regions") or [])
        f["vrings"] = {str(k): dict(v) for k, v in (f.get("vrings") or {}).items()}
        self.f = f

    # -- live: events and message summaries ---------------------------------------------------------
    def event(self, kind: str, d: dict[str, Any]) -> None:
        f = self.f
        if kind == "features":
            f["features_offered"], f["features_masked"] = d.get("offered"), d.get("masked")
        elif kind == "protocol-features":
            f["protocol_offered"], f["protocol_masked"] = d.get("offered"), d.get("masked")
        elif kind == "features-acked":
            f["features_acked"] = d.get("value")
        elif kind == "protocol-features-acked":
            f["protocol_acked"] = d.get("value")
        elif kind == "mem-table":
            f["regions"] = list(d.get("regions") or [])
        elif kind == "vring-num":
            self.vring(int(d["index"]))["num"] = d.get("num")
        elif kind == "vring-base":
            self.vring(int(d["index"]))["base"] = d.get("base")
        elif kind == "vring-enable":
            self.vring(int(d["index"]))["enabled"] = d.get("enable")
        elif kind == "vring-addr":
            self.vring(int(d["index"]))["started"] = True
        elif kind in ("vring-kick", "vring-call"):
            self.vring(int(d["index"]))[kind.split("-")[1] + "_changes"] = d.get("changes")
        elif kind == "vring-stopped":
            vr = self.vring(int(d["index"]))
            vr["started"], vr["base"] = False, d.get("last_avail")

    def summary(self, direction: str, text: str) -> None:
        """A live message summary: counted only (the proxy's events carry the state, kick/call changes too)."""
        self.messages += 1

    # -- replay: decoded messages -----------------------------------------------------------------
    def record(self, data: bytes, from_frontend: bool, notes: list[str]) -> str:
        """Apply one recorded vhost-user message; returns its one-line summary."""
        self.messages += 1
        try:
            m = V.decode_message(data)
        except (DecodeError, ValueError) as e:
            return f"undecodable vhost-user message ({len(data)} bytes): {e}"
        p = m.payload
        f = self.f
        to_qemu = SENT_TO_QEMU in notes
        original = from_frontend and FORWARDED not in notes
        u64 = p.u64 if isinstance(p, Record) and "u64" in p._fields else None
        if m.is_reply and u64 is not None and m.name in ("GET_FEATURES", "GET_PROTOCOL_FEATURES"):
            pre = "features" if m.name == "GET_FEATURES" else "protocol"
            if to_qemu:
                f[f"{pre}_masked"] = (f.get(f"{pre}_offered") or 0) & ~u64
            else:
                f[f"{pre}_offered"] = u64
        elif original and not m.is_reply:
            self._frontend(m.name, p, u64)
        return m.summary()

    def _frontend(self, name: str, p: Any, u64: int | None) -> None:
        f = self.f
        if name == "SET_FEATURES":
            f["features_acked"] = u64
        elif name == "SET_PROTOCOL_FEATURES":
            f["protocol_acked"] = u64
        elif name in ("SET_MEM_TABLE", "ADD_MEM_REG", "REM_MEM_REG"):
            regs = p if isinstance(p, list) else [getattr(p, "region", p)]
            rows = [r.to_dict() for r in regs if isinstance(r, Record)]  # as the proxy's mem-table event
            if name == "SET_MEM_TABLE":
                f["regions"] = rows
            elif name == "ADD_MEM_REG":
                f["regions"] = [*f["regions"], *rows]
            else:
                gone = {r.get("guest_address") for r in rows}
                f["regions"] = [r for r in f["regions"] if r.get("guest_address") not in gone]
        elif name in ("SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ENABLE") and isinstance(p, Record):
            key = {"SET_VRING_NUM": "num", "SET_VRING_BASE": "base", "SET_VRING_ENABLE": "enabled"}[name]
            self.vring(getattr(p, "index"))[key] = bool(p.num) if key == "enabled" else p.num  # noqa: B009 - tuple.index shadows the field for mypy
        elif name == "SET_VRING_ADDR" and isinstance(p, Record):
            self.vring(getattr(p, "index"))["started"] = True  # noqa: B009 - tuple.index shadows the field for mypy
        elif name in ("SET_VRING_KICK", "SET_VRING_CALL") and u64 is not None:
            self.vring(u64 & 0xFF)["kick_changes" if name == "SET_VRING_KICK" else "call_changes"] += 1
        elif name == "GET_VRING_BASE" and isinstance(p, Record):
            self.vring(getattr(p, "index"))["started"] = False  # noqa: B009 - tuple.index shadows the field for mypy
