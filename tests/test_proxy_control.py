"""Playbook tests of the proxy's control plane: scripted QEMU 7.2 sequences, exact commands.

The sequence follows ../shared/proxy-notes.md (GET_FEATURES ... SET_VRING_ENABLE ... GET_VRING_BASE).
"""

from __future__ import annotations

from typing import Any

import pytest

from dissectors import vhost_user as V
from dissectors.spec import vhost_user as vspec
from fsinspect.proxy import control as C

REGION_FD = 99
MB = 1 << 20


def fe(name: str, payload: Any = None, fds: list[int] | None = None, flags: int = 1) -> V.VhostUserMessage:
    return V.build(name, payload, flags=flags, fds=fds)


def be_reply(name: str, payload: Any) -> V.VhostUserMessage:
    return V.build(name, payload, reply=True)


def kinds(cmds: list[C.Command]) -> list[str]:
    return [type(c).__name__ + (f":{c.kind}" if isinstance(c, C.Event) else "") for c in cmds]


class Playbook:
    """Drives a ControlPlane through a conversation, checking each step's commands."""

    def __init__(self) -> None:
        self.cp = C.ControlPlane(REGION_FD, 4 * MB)

    def request(self, msg: V.VhostUserMessage, expect: list[str]) -> list[C.Command]:
        cmds = self.cp.from_frontend(msg)
        assert kinds(cmds) == expect, kinds(cmds)
        return cmds

    def reply(self, msg: V.VhostUserMessage, expect: list[str]) -> list[C.Command]:
        cmds = self.cp.from_backend(msg)
        assert kinds(cmds) == expect, kinds(cmds)
        return cmds


def negotiate(pb: Playbook) -> None:
    c = pb.request(fe("GET_FEATURES"), ["SendBackend"])
    assert c[0].expect_reply  # type: ignore[attr-defined]
    c = pb.reply(be_reply("GET_FEATURES", V.u64(0x175000000)), ["Event:features", "SendFrontend"])
    sent = c[-1].msg.payload.u64  # type: ignore[attr-defined]
    assert sent & (1 << 26) == 0  # LOG_ALL (migration) masked
    assert sent & (1 << 28) and sent & (1 << 32) and sent & (1 << 30)  # INDIRECT, VERSION_1, PROTOCOL_FEATURES kept
    assert sent & (1 << 29)  # EVENT_IDX: the shadow path implements it
    pb.request(fe("GET_PROTOCOL_FEATURES"), ["SendBackend"])
    c = pb.reply(be_reply("GET_PROTOCOL_FEATURES", V.u64(0x8C2B)), ["Event:protocol-features", "SendFrontend"])
    proto = c[-1].msg.payload.u64  # type: ignore[attr-defined]
    bits = vspec.PROTOCOL_F.by_name()
    assert proto & bits["MQ"] and proto & bits["REPLY_ACK"]
    for masked in ("CONFIGURE_MEM_SLOTS", "BACKEND_REQ", "BACKEND_SEND_FD", "HOST_NOTIFIER", "LOG_SHMFD"):
        assert not proto & bits[masked], masked
    c = pb.request(fe("SET_PROTOCOL_FEATURES", V.u64(proto)), ["Event:protocol-features-acked", "SendBackend"])
    assert not c[-1].expect_reply  # type: ignore[attr-defined]
    pb.request(fe("GET_QUEUE_NUM"), ["SendBackend"])
    pb.reply(be_reply("GET_QUEUE_NUM", V.u64(2)), ["SendFrontend"])
    pb.request(fe("SET_OWNER"), ["SendBackend"])


def region(gpa: int, size: int, uva: int) -> Any:
    return V.make("vhost_user_memory_region", guest_address=gpa, size=size, user_address=uva, mmap_offset=gpa)


def setup_queue(pb: Playbook, index: int, *, kick_fd: int, call_fd: int) -> list[C.Command]:
    base = 0x7F00_0000_0000
    pb.request(fe("SET_VRING_NUM", V.make("vhost_vring_state", index=index, num=128)),
               ["Event:vring-num", "SendBackend"])
    pb.request(fe("SET_VRING_BASE", V.make("vhost_vring_state", index=index, num=0)),
               ["Event:vring-base", "SendBackend"])
    addr = V.make("vhost_vring_addr", index=index, descriptor=base + 0x10000 * index,
                  available=base + 0x10000 * index + 0x800, used=base + 0x10000 * index + 0x1000, log=0x12345)
    c = pb.request(fe("SET_VRING_ADDR", addr), ["QueueSetup", "Event:vring-addr", "SendBackend"])
    shadow = c[2].msg.payload  # type: ignore[attr-defined]
    assert shadow.descriptor == addr.descriptor  # the descriptor table stays shared
    assert shadow.used == C.PROXY_REGION_UVA + index * C.QUEUE_SLOT
    assert shadow.available == C.PROXY_REGION_UVA + index * C.QUEUE_SLOT + C.AVAIL_OFF
    c = pb.request(fe("SET_VRING_KICK", V.u64(index), fds=[kick_fd]), ["QueueFd", "Event:vring-kick", "SendBackend"])
    assert c[0] == C.QueueFd(index, "kick", kick_fd)
    assert c[2].msg.fds == []  # type: ignore[attr-defined]  # I/O module attaches the proxy's own eventfd
    return c


def test_qemu72_sequence() -> None:
    pb = Playbook()
    negotiate(pb)
    for q in (0, 1):
        pb.request(fe("SET_VRING_CALL", V.u64(q), fds=[10 + q]), ["QueueFd", "Event:vring-call", "SendBackend"])
        pb.request(fe("SET_VRING_ERR", V.u64(q), fds=[20 + q]), ["QueueFd", "Event:vring-err", "SendBackend"])
    pb.request(fe("SET_FEATURES", V.u64(0x170000000)), ["Event:features-acked", "SendBackend"])
    regions = [region(0, 0xA0000, 0x7F00_0000_0000), region(0xC0000, 0x1FF40000, 0x7F00_000C_0000)]
    c = pb.request(fe("SET_MEM_TABLE", regions, fds=[30, 31], flags=1 | 8),
                   ["UnmapAll", "MapRegion", "MapRegion", "Event:mem-table", "SendBackend"])
    out = c[-1]
    assert isinstance(out, C.SendBackend) and out.expect_reply  # NEED_REPLY with REPLY_ACK negotiated
    assert out.msg.fds == [30, 31, REGION_FD]
    assert out.msg.payload[-1].guest_address == C.PROXY_REGION_GPA
    assert out.msg.payload[-1].user_address == C.PROXY_REGION_UVA
    pb.reply(be_reply("SET_MEM_TABLE", V.u64(0)), ["SendFrontend"])
    for q in (0, 1):
        setup_queue(pb, q, kick_fd=40 + q, call_fd=0)
    pb.request(fe("SET_VRING_ENABLE", V.make("vhost_vring_state", index=0, num=1)),
               ["Event:vring-enable", "QueueStart", "SendBackend"])
    pb.request(fe("SET_VRING_ENABLE", V.make("vhost_vring_state", index=1, num=1)),
               ["Event:vring-enable", "QueueStart", "SendBackend"])
    # QEMU swaps call fds while traffic flows (MSI-X): only the QEMU-side fd changes.
    c = pb.request(fe("SET_VRING_CALL", V.u64(1), fds=[55]), ["QueueFd", "Event:vring-call", "SendBackend"])
    assert c[0] == C.QueueFd(1, "call", 55)
    # Power-off: disable, GET_VRING_BASE stops the queue before the reply is forwarded.
    pb.request(fe("SET_VRING_ENABLE", V.make("vhost_vring_state", index=1, num=0)),
               ["Event:vring-enable", "SendBackend"])
    pb.request(fe("GET_VRING_BASE", V.make("vhost_vring_state", index=1)), ["QueueStop", "SendBackend"])
    c = pb.reply(be_reply("GET_VRING_BASE", V.make("vhost_vring_state", index=1, num=77)),
                 ["QueueDrain", "Event:vring-stopped", "SendFrontend"])
    assert pb.cp.vrings[1].base == 77
    snap = pb.cp.snapshot()
    assert snap["features_masked"] == 1 << 26 and snap["vrings"][1]["call_changes"] == 2


def test_backend_lost_answers_locally() -> None:
    pb = Playbook()
    negotiate(pb)
    pb.request(fe("GET_FEATURES"), ["SendBackend"])
    c = pb.cp.backend_lost()
    assert kinds(c) == ["Event:backend-lost", "SendFrontend"]  # the pending GET_FEATURES is answered
    assert c[1].msg.payload.u64 == 0x175000000  # type: ignore[attr-defined]
    pb.request(fe("SET_VRING_ENABLE", V.make("vhost_vring_state", index=0, num=0), flags=1 | 8),
               ["Event:vring-enable", "SendFrontend"])
    c = pb.request(fe("GET_VRING_BASE", V.make("vhost_vring_state", index=0)), ["ReplyVringBase"])
    assert c[0] == C.ReplyVringBase(0)


@pytest.mark.parametrize(
    ("msgs", "needle"),
    [
        ([fe("SET_VRING_ADDR", V.make("vhost_vring_addr", index=0))], "before SET_VRING_NUM"),
        ([fe("SET_VRING_NUM", V.make("vhost_vring_state", index=0, num=100))], "power of two"),
        ([fe("SET_VRING_NUM", V.make("vhost_vring_state", index=0, num=128)),
          fe("SET_VRING_ADDR", V.make("vhost_vring_addr", index=0, descriptor=0x1000))], "outside every memory region"),
        ([fe("SET_MEM_TABLE", [region(0, 4096, 0)], fds=[])], "1 regions but 0 fds"),
        ([fe("SET_VRING_KICK", V.u64(0))], "without an fd or NOFD"),
        ([fe("SET_VRING_NUM", V.make("vhost_vring_state", index=200, num=128))], "exceeds"),
        ([fe("ADD_MEM_REG", V.make("vhost_user_mem_reg"), fds=[3])], "CONFIGURE_MEM_SLOTS was masked"),
    ],
)
def test_violations_are_named(msgs: list[V.VhostUserMessage], needle: str) -> None:
    cp = C.ControlPlane(REGION_FD, 4 * MB)
    with pytest.raises(C.ProtocolViolation, match=needle):
        for m in msgs:
            cp.from_frontend(m)


def test_reply_mismatch_and_unsolicited() -> None:
    cp = C.ControlPlane(REGION_FD, 4 * MB)
    with pytest.raises(C.ProtocolViolation, match="unsolicited"):
        cp.from_backend(be_reply("GET_FEATURES", V.u64(1)))
    cp.from_frontend(fe("GET_FEATURES"))
    with pytest.raises(C.ProtocolViolation, match="answered GET_FEATURES with GET_QUEUE_NUM"):
        cp.from_backend(be_reply("GET_QUEUE_NUM", V.u64(1)))
