"""The proxy's vhost-user control plane as a sans-I/O state machine (the mitmproxy layer pattern).

It takes typed events (a message from the front-end, a reply from the back-end,
the back-end gone) and returns commands for the I/O module to carry out in
order: forward a message, map or unmap a memory region, set up, start or stop
a queue's shadow data path, swap the front-end's kick or call fd, log an event.
Nothing here touches a socket, an fd or a mapping, so tests drive it with
scripted message sequences and assert the exact commands.

What it changes on the way through (design.md, "The proxy"):
- feature and protocol-feature replies are masked to what the proxy implements;
- the proxy's own memory region is appended to every memory table sent to the back-end;
- SET_VRING_ADDR points the back-end at shadow avail/used rings in that region;
- the back-end gets the proxy's own kick/call eventfds; QEMU's fds stay with the proxy;
- GET_VRING_BASE stops the queue and flushes shadow used entries before QEMU sees the reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dissectors import vhost_user as V
from dissectors.spec import vhost_user as vspec
from dissectors.spec import virtio as vio

F_BIT = vio.VIRTIO_F.by_name()
P_BIT = vspec.PROTOCOL_F.by_name()

# Device features the data path does not implement (yet): masked in GET_FEATURES replies.
MASKED_FEATURES = (
    F_BIT["VIRTIO_F_RING_PACKED"] | F_BIT["VIRTIO_F_ACCESS_PLATFORM"] | F_BIT["VHOST_F_LOG_ALL"]
    | F_BIT["VIRTIO_F_IN_ORDER"] | F_BIT["VIRTIO_F_NOTIFICATION_DATA"] | F_BIT["VIRTIO_F_RING_RESET"]
)
# Protocol features the proxy forwards faithfully; everything else is masked.
ALLOWED_PROTOCOL_FEATURES = (
    P_BIT["MQ"] | P_BIT["REPLY_ACK"] | P_BIT["CONFIG"] | P_BIT["RESET_DEVICE"] | P_BIT["STATUS"]
    | P_BIT["MTU"] | P_BIT["RARP"]
)
# Where the proxy's region lives for the back-end: a non-canonical user address and a guest-physical
# address above any physical address width, so nothing QEMU adds later can collide.
PROXY_REGION_UVA = 0x4000_0000_0000_0000
PROXY_REGION_GPA = 1 << 56
QUEUE_SLOT = 64 * 1024  # per queue in the proxy region: shadow used at +0, shadow avail at +AVAIL_OFF
AVAIL_OFF = 48 * 1024
MAX_QUEUE_FOR_SLOT = 4096  # used ring 4+8*4096+2 = 32774 < AVAIL_OFF; avail 4+2*4096+2 < 16 KiB


class ProtocolViolation(Exception):
    """The front-end or back-end broke the protocol in a way the proxy cannot forward around."""


# ---- commands ------------------------------------------------------------------------------------
@dataclass
class Command:
    pass


@dataclass
class SendBackend(Command):
    msg: V.VhostUserMessage
    expect_reply: bool = False  # the I/O module reads the back-end's reply next and feeds it back


@dataclass
class SendFrontend(Command):
    msg: V.VhostUserMessage


@dataclass
class MapRegion(Command):
    gpa: int
    size: int
    uva: int
    mmap_offset: int
    fd: int


@dataclass
class UnmapAll(Command):
    pass


@dataclass
class QueueSetup(Command):
    index: int
    num: int
    desc_uva: int
    avail_uva: int
    used_uva: int
    base: int
    shadow_used_off: int  # offsets in the proxy region
    shadow_avail_off: int


@dataclass
class QueueFd(Command):
    index: int
    which: str  # "kick" | "call" | "err"
    fd: int | None  # None: NOFD (polling mode)


@dataclass
class QueueStart(Command):
    index: int


@dataclass
class QueueStop(Command):
    """Stop forwarding new requests on this queue (GET_VRING_BASE is on its way to the back-end)."""

    index: int


@dataclass
class QueueDrain(Command):
    """Move every used entry the back-end published into the guest's ring and signal: runs after the
    back-end answered GET_VRING_BASE (nothing more can complete) and before QEMU sees that answer."""

    index: int


@dataclass
class ReplyVringBase(Command):
    """Back-end gone: answer GET_VRING_BASE with the data path's own last avail index."""

    index: int


@dataclass
class Event(Command):
    """A control-plane event for the recording and the UI's control panel."""

    kind: str
    detail: dict[str, Any] = field(default_factory=dict)


# ---- state ---------------------------------------------------------------------------------------
@dataclass
class VringState:
    index: int
    num: int = 0
    base: int = 0
    addr: Any = None  # vhost_vring_addr record as QEMU sent it
    kick_fd: int | None = None
    call_fd: int | None = None
    enabled: bool = False
    started: bool = False
    kick_changes: int = 0
    call_changes: int = 0


@dataclass
class Negotiated:
    features_offered: int | None = None  # back-end's GET_FEATURES answer
    features_masked: int = 0  # what the proxy removed from it
    features_acked: int | None = None  # SET_FEATURES from QEMU
    protocol_offered: int | None = None
    protocol_masked: int = 0
    protocol_acked: int | None = None
    queue_num: int | None = None
    owner: bool = False


class ControlPlane:
    """Feed it messages; it returns the commands to execute, in order."""

    def __init__(self, proxy_region_fd: int, proxy_region_size: int) -> None:
        self.region_fd = proxy_region_fd
        self.region_size = proxy_region_size
        self.neg = Negotiated()
        self.vrings: dict[int, VringState] = {}
        self.regions: list[Any] = []  # QEMU's memory regions (vhost_user_memory_region records)
        self.backend_alive = True
        self.pending: V.VhostUserMessage | None = None  # request awaiting the back-end's reply
        self.messages = 0

    # -- helpers ---------------------------------------------------------------------------------
    def vring(self, index: int) -> VringState:
        if index not in self.vrings:
            if index >= self.region_size // QUEUE_SLOT:
                raise ProtocolViolation(f"vring index {index} exceeds the proxy's {self.region_size // QUEUE_SLOT} slots")
            self.vrings[index] = VringState(index)
        return self.vrings[index]

    def _reply_ack_negotiated(self) -> bool:
        return bool((self.neg.protocol_acked or 0) & P_BIT["REPLY_ACK"])

    def _expects_reply(self, msg: V.VhostUserMessage) -> bool:
        s = msg.spec
        if s is None:
            return False
        if s.reply is not None:
            return True
        return msg.need_reply and self._reply_ack_negotiated()

    def _proxy_region(self) -> Any:
        return V.make("vhost_user_memory_region", guest_address=PROXY_REGION_GPA, size=self.region_size,
                      user_address=PROXY_REGION_UVA, mmap_offset=0)

    def _uva_mapped(self, uva: int, length: int) -> bool:
        return any(r.user_address <= uva and uva + length <= r.user_address + r.size for r in self.regions)

    def _try_start(self, vr: VringState) -> list[Command]:
        if vr.started or not vr.enabled or vr.addr is None or vr.num == 0:
            return []
        vr.started = True
        return [QueueStart(vr.index)]

    # -- events ----------------------------------------------------------------------------------
    def from_frontend(self, msg: V.VhostUserMessage) -> list[Command]:
        """A request from QEMU.  Returns commands; fds in msg are owned by the I/O module."""
        self.messages += 1
        if msg.is_reply:  # decoded with the reply's layout: no request handler may see it
            raise ProtocolViolation(f"{msg.name} with the REPLY flag: QEMU sends only requests on this socket")
        if self.pending is not None:
            raise ProtocolViolation(f"{msg.name} arrived while {self.pending.name} still awaits its reply")
        name = msg.name
        handler = getattr(self, f"_fe_{name.lower()}", None)
        cmds: list[Command] = handler(msg) if handler is not None else []
        if not self.backend_alive:
            return [c for c in cmds if not isinstance(c, SendBackend)] + self._answer_locally(msg)
        expect = self._expects_reply(msg)
        if expect:
            self.pending = msg
        fwd = next((c for c in cmds if isinstance(c, SendBackend)), None)
        if fwd is None:
            cmds.append(SendBackend(msg, expect))
        else:
            fwd.expect_reply = expect
        return cmds

    def from_backend(self, msg: V.VhostUserMessage) -> list[Command]:
        """The back-end's reply to the pending request."""
        req = self.pending
        if req is None:
            raise ProtocolViolation(f"unsolicited {msg.name} from the back-end (the back-end channel is masked)")
        if not msg.is_reply or msg.request != req.request:
            raise ProtocolViolation(f"back-end answered {req.name} with {msg.name}")
        self.pending = None
        cmds: list[Command] = []
        handler = getattr(self, f"_be_{req.name.lower()}", None)
        if handler is not None:
            cmds += handler(req, msg)
        cmds.append(SendFrontend(msg))
        return cmds

    def backend_lost(self) -> list[Command]:
        """The back-end closed its socket: from now on the proxy answers QEMU itself."""
        if not self.backend_alive:
            return []
        self.backend_alive = False
        cmds: list[Command] = [Event("backend-lost", {"pending": self.pending.name if self.pending else None})]
        if self.pending is not None:
            req, self.pending = self.pending, None
            cmds += self._answer_locally(req)
        return cmds

    # -- answers when the back-end is gone --------------------------------------------------------
    def _answer_locally(self, msg: V.VhostUserMessage) -> list[Command]:
        s = msg.spec
        if s is None:
            return []
        if s.reply is None:
            if msg.need_reply and self._reply_ack_negotiated():
                return [SendFrontend(V.VhostUserMessage(msg.request, 1 | 4, V.u64(0)))]
            return []
        if s.name == "GET_VRING_BASE":
            return [ReplyVringBase(msg.payload.index)]
        value = {"GET_FEATURES": self.neg.features_offered, "GET_PROTOCOL_FEATURES": self.neg.protocol_offered,
                 "GET_QUEUE_NUM": self.neg.queue_num}.get(s.name)
        if s.reply == "vhost_user_u64":
            return [SendFrontend(V.VhostUserMessage(msg.request, 1 | 4, V.u64(value or 0)))]
        if s.reply == "raw":  # nothing to say without the back-end: an empty answer, which QEMU refuses
            return [SendFrontend(V.VhostUserMessage(msg.request, 1 | 4, b""))]
        if s.reply == "config":
            return [SendFrontend(V.VhostUserMessage(msg.request, 1 | 4, msg.payload, extra=dict(msg.extra)))]
        return [SendFrontend(V.VhostUserMessage(msg.request, 1 | 4, V.CODECS[s.reply].make()))]

    # -- front-end request handlers ---------------------------------------------------------------
    def _fe_set_features(self, msg: V.VhostUserMessage) -> list[Command]:
        self.neg.features_acked = msg.payload.u64
        return [Event("features-acked", {"value": msg.payload.u64})]

    def _fe_set_protocol_features(self, msg: V.VhostUserMessage) -> list[Command]:
        self.neg.protocol_acked = msg.payload.u64
        return [Event("protocol-features-acked", {"value": msg.payload.u64})]

    def _fe_set_owner(self, msg: V.VhostUserMessage) -> list[Command]:
        self.neg.owner = True
        return []

    def _fe_set_mem_table(self, msg: V.VhostUserMessage) -> list[Command]:
        regions = list(msg.payload)
        if len(msg.fds) != len(regions):
            raise ProtocolViolation(f"SET_MEM_TABLE: {len(regions)} regions but {len(msg.fds)} fds")
        if len(regions) + 1 > vspec.MEMORY_BASELINE_NREGIONS:
            raise ProtocolViolation(f"SET_MEM_TABLE: {len(regions)} regions leave no slot for the proxy's shadow "
                                    "rings (the back-end accepts 8)")
        for i, r in enumerate(regions):
            problem = V.region_problem(r, regions[:i])
            if problem is not None:
                raise ProtocolViolation(f"SET_MEM_TABLE refused: {problem}")
        self.regions = regions
        cmds: list[Command] = [UnmapAll()]
        for r, fd in zip(regions, msg.fds, strict=True):
            cmds.append(MapRegion(r.guest_address, r.size, r.user_address, r.mmap_offset, fd))
        cmds.append(Event("mem-table", {"regions": [r.to_dict() for r in regions]}))
        out = V.VhostUserMessage(msg.request, msg.flags, [*regions, self._proxy_region()],
                                 [*msg.fds, self.region_fd])
        cmds.append(SendBackend(out))
        return cmds

    def _fe_add_mem_reg(self, msg: V.VhostUserMessage) -> list[Command]:
        raise ProtocolViolation("ADD_MEM_REG although CONFIGURE_MEM_SLOTS was masked")

    def _fe_rem_mem_reg(self, msg: V.VhostUserMessage) -> list[Command]:
        raise ProtocolViolation("REM_MEM_REG although CONFIGURE_MEM_SLOTS was masked")

    def _fe_set_vring_num(self, msg: V.VhostUserMessage) -> list[Command]:
        vr = self.vring(msg.payload.index)
        num = msg.payload.num
        if num == 0 or num & (num - 1) or num > MAX_QUEUE_FOR_SLOT:
            raise ProtocolViolation(f"vring {vr.index}: size {num} is not a power of two <= {MAX_QUEUE_FOR_SLOT}")
        vr.num = num
        return [Event("vring-num", {"index": vr.index, "num": num})]

    def _fe_set_vring_base(self, msg: V.VhostUserMessage) -> list[Command]:
        vr = self.vring(msg.payload.index)
        if msg.payload.num > 0xFFFF:  # a split ring's index (packed rings are masked)
            raise ProtocolViolation(f"vring {vr.index}: base {msg.payload.num} is not a 16-bit ring index")
        vr.base = msg.payload.num
        return [Event("vring-base", {"index": vr.index, "base": vr.base})]

    def _fe_set_vring_addr(self, msg: V.VhostUserMessage) -> list[Command]:
        a = msg.payload
        vr = self.vring(a.index)
        if vr.num == 0:
            raise ProtocolViolation(f"SET_VRING_ADDR for vring {a.index} before SET_VRING_NUM")
        layout = vio.split_ring_layout(vr.num)
        for what, uva, size in (("desc", a.descriptor, layout.desc_size), ("avail", a.available, layout.avail_size),
                                ("used", a.used, layout.used_size)):
            if not self._uva_mapped(uva, size):
                raise ProtocolViolation(f"vring {a.index}: {what} ring {uva:#x}+{size} outside every memory region")
        vr.addr = a
        slot = a.index * QUEUE_SLOT
        setup = QueueSetup(a.index, vr.num, a.descriptor, a.available, a.used, vr.base, slot, slot + AVAIL_OFF)
        shadow = a._replace(used=PROXY_REGION_UVA + slot, available=PROXY_REGION_UVA + slot + AVAIL_OFF,
                            flags=a.flags & ~1)  # no dirty logging through the shadow rings
        out = V.VhostUserMessage(msg.request, msg.flags, shadow, [])
        return [setup, Event("vring-addr", {"index": a.index, "desc": a.descriptor, "avail": a.available,
                                             "used": a.used, "shadow_avail": shadow.available,
                                             "shadow_used": shadow.used}),
                SendBackend(out), *self._try_start(vr)]

    def _vring_fd(self, msg: V.VhostUserMessage, which: str) -> list[Command]:
        v = msg.payload.u64
        index = v & vspec.VRING_IDX_MASK
        nofd = bool(v & vspec.VRING_NOFD_MASK)
        vr = self.vring(index)
        fd = None if nofd or not msg.fds else msg.fds[0]
        if not nofd and not msg.fds:
            raise ProtocolViolation(f"SET_VRING_{which.upper()} for vring {index} without an fd or NOFD")
        cmds: list[Command] = [QueueFd(index, which, fd)]
        if which == "kick":
            vr.kick_fd = fd
            vr.kick_changes += 1
        elif which == "call":
            vr.call_fd = fd
            vr.call_changes += 1
        cmds.append(Event(f"vring-{which}", {"index": index, "nofd": nofd, "changes": getattr(vr, f"{which}_changes", 0)}))
        if which == "err":
            return cmds  # forwarded as-is: the back-end signals QEMU's error fd directly
        # The back-end always gets the proxy's own eventfd for this queue; the I/O module fills it in.
        out = V.VhostUserMessage(msg.request, msg.flags, V.u64(index), [])
        cmds.append(SendBackend(out))
        return cmds

    def _fe_set_vring_kick(self, msg: V.VhostUserMessage) -> list[Command]:
        cmds = self._vring_fd(msg, "kick")
        return cmds + self._try_start(self.vring(msg.payload.u64 & vspec.VRING_IDX_MASK))

    def _fe_set_vring_call(self, msg: V.VhostUserMessage) -> list[Command]:
        return self._vring_fd(msg, "call")

    def _fe_set_vring_err(self, msg: V.VhostUserMessage) -> list[Command]:
        return self._vring_fd(msg, "err")

    def _fe_set_vring_enable(self, msg: V.VhostUserMessage) -> list[Command]:
        vr = self.vring(msg.payload.index)
        vr.enabled = bool(msg.payload.num)
        cmds: list[Command] = [Event("vring-enable", {"index": vr.index, "enable": vr.enabled})]
        return cmds + self._try_start(vr)

    def _fe_get_vring_base(self, msg: V.VhostUserMessage) -> list[Command]:
        vr = self.vring(msg.payload.index)
        cmds: list[Command] = []
        if vr.started:
            # Stop our kick handling now; the flush of used entries happens before QEMU gets the reply.
            cmds.append(QueueStop(vr.index))
            vr.started = False
        vr.enabled = False
        return cmds

    def _fe_reset_device(self, msg: V.VhostUserMessage) -> list[Command]:
        return self._stop_all("reset-device")

    def _fe_reset_owner(self, msg: V.VhostUserMessage) -> list[Command]:
        return self._stop_all("reset-owner")

    def _stop_all(self, why: str) -> list[Command]:
        cmds: list[Command] = [c for vr in self.vrings.values() if vr.started
                               for c in (QueueStop(vr.index), QueueDrain(vr.index))]
        self.vrings.clear()
        cmds.append(Event(why, {}))
        return cmds

    # -- back-end reply handlers --------------------------------------------------------------------
    def _be_get_features(self, req: V.VhostUserMessage, rep: V.VhostUserMessage) -> list[Command]:
        offered = rep.payload.u64
        self.neg.features_offered = offered
        self.neg.features_masked = offered & MASKED_FEATURES
        rep.payload = V.u64(offered & ~MASKED_FEATURES)
        return [Event("features", {"offered": offered, "masked": self.neg.features_masked})]

    def _be_get_protocol_features(self, req: V.VhostUserMessage, rep: V.VhostUserMessage) -> list[Command]:
        offered = rep.payload.u64
        self.neg.protocol_offered = offered
        self.neg.protocol_masked = offered & ~ALLOWED_PROTOCOL_FEATURES
        rep.payload = V.u64(offered & ALLOWED_PROTOCOL_FEATURES)
        return [Event("protocol-features", {"offered": offered, "masked": self.neg.protocol_masked})]

    def _be_get_queue_num(self, req: V.VhostUserMessage, rep: V.VhostUserMessage) -> list[Command]:
        self.neg.queue_num = rep.payload.u64
        return []

    def _be_get_vring_base(self, req: V.VhostUserMessage, rep: V.VhostUserMessage) -> list[Command]:
        vr = self.vring(req.payload.index)
        vr.base = rep.payload.num
        return [QueueDrain(vr.index), Event("vring-stopped", {"index": vr.index, "last_avail": vr.base})]

    # -- views for the UI / summary -----------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {
            "features_offered": self.neg.features_offered,
            "features_masked": self.neg.features_masked,
            "features_acked": self.neg.features_acked,
            "protocol_offered": self.neg.protocol_offered,
            "protocol_masked": self.neg.protocol_masked,
            "protocol_acked": self.neg.protocol_acked,
            "regions": [r.to_dict() for r in self.regions],
            "vrings": {i: {"num": v.num, "base": v.base, "enabled": v.enabled, "started": v.started,
                           "kick_changes": v.kick_changes, "call_changes": v.call_changes}
                       for i, v in self.vrings.items()},
            "backend_alive": self.backend_alive,
            "messages": self.messages,
        }
