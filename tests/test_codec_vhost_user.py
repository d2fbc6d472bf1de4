"""vhost-user codec: every request in the spec round-trips; payload checks name the problem."""

from __future__ import annotations

from typing import Any

import pytest

from dissectors import vhost_user as V
from dissectors.errors import DecodeError
from dissectors.spec import vhost_user as vspec
from tests.specgen import fill


def _payload(layout: str | None) -> tuple[Any, dict[str, Any]]:
    if layout is None:
        return None, {}
    if layout == "raw":
        return b"\x01\x02\x03", {}
    if layout == "memory":
        return [fill(V.CODECS["vhost_user_memory_region"], i) for i in range(3)], {}
    if layout == "config":
        return V.make("vhost_user_config", offset=0, size=8, flags=0), {"region": b"myfs\0\0\0\0"}
    return fill(V.CODECS[layout]), {}


@pytest.mark.parametrize("req", vspec.FRONTEND_REQUESTS + vspec.BACKEND_REQUESTS, ids=lambda r: r.name)
@pytest.mark.parametrize("reply", [False, True])
def test_roundtrip(req: vspec.Request, reply: bool) -> None:
    layout = (req.reply or "vhost_user_u64") if reply else req.payload  # REPLY_ACK: a u64
    backend = req in vspec.BACKEND_REQUESTS
    payload, extra = _payload(layout)
    msg = V.VhostUserMessage(req.value, 1 | (4 if reply else 0), payload, [], backend, dict(extra))
    raw = V.encode_message(msg)
    back = V.decode_message(raw, backend_channel=backend)
    assert back.name == req.name and back.is_reply == reply
    assert back.payload == payload
    assert V.encode_message(back) == raw


def test_vring_kick_nofd_and_index() -> None:
    m = V.decode_message(V.encode_message(V.build("SET_VRING_KICK", V.u64(1 | vspec.VRING_NOFD_MASK))))
    assert (m.vring_index(), m.nofd()) == (1, True)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (V.HEADER.struct.pack(8, 1, 4) + b"\0" * 4, "needs 8 bytes"),
        (V.HEADER.struct.pack(99, 1, 0), "unknown front-end request 99"),
        (V.HEADER.struct.pack(3, 1, 8) + b"\0" * 8, "takes no payload"),
        (V.HEADER.struct.pack(5, 1, 8) + (9).to_bytes(4, "little") + b"\0" * 4, "9 regions"),
        (V.HEADER.struct.pack(5, 1, 8) + (2).to_bytes(4, "little") + b"\0" * 4, "truncated"),
        (V.HEADER.struct.pack(1, 1, 8), "length mismatch"),
    ],
)
def test_bad_messages(raw: bytes, needle: str) -> None:
    with pytest.raises(DecodeError, match=needle):
        V.decode_message(raw)
