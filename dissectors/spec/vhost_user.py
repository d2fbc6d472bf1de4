"""vhost-user, as tables: front-end and back-end requests, header flags, protocol features, payloads.

Source: docs/interop/vhost-user.rst (QEMU 7.2 copy in ../shared/reference) plus the
requests added since (shared objects, device-state transfer).  Newer QEMU calls the
"slave" channel the "back-end" channel; names here use the new terms.
"""

from __future__ import annotations

from dataclasses import dataclass

from .types import Enum, Registry, S, bits

HEADER_SIZE = 12
VERSION = 1
MAX_PAYLOAD = 4096  # QEMU's VHOST_USER_PAYLOAD_SIZE bound (the largest is the memory table)
MAX_FDS = 32  # VHOST_MEMORY_BASELINE_NREGIONS is 8; ADD_MEM_REG carries 1; keep room
MEMORY_BASELINE_NREGIONS = 8
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

HEADER_FLAGS = bits("VHOST_USER_", {"REPLY": 2, "NEED_REPLY": 3}, name="HEADER_FLAGS")
VERSION_MASK = 0x3

PROTOCOL_F = bits(
    "VHOST_USER_PROTOCOL_F_",
    {
        "MQ": 0, "LOG_SHMFD": 1, "RARP": 2, "REPLY_ACK": 3, "MTU": 4, "BACKEND_REQ": 5, "CROSS_ENDIAN": 6,
        "CRYPTO_SESSION": 7, "PAGEFAULT": 8, "CONFIG": 9, "BACKEND_SEND_FD": 10, "HOST_NOTIFIER": 11,
        "INFLIGHT_SHMFD": 12, "RESET_DEVICE": 13, "INBAND_NOTIFICATIONS": 14, "CONFIGURE_MEM_SLOTS": 15,
        "STATUS": 16, "XEN_MMAP": 17, "SHARED_OBJECT": 18, "DEVICE_STATE": 19,
    },
    name="PROTOCOL_F",
)
VRING_ADDR_F = bits("VHOST_VRING_F_", {"LOG": 0}, name="VRING_ADDR_F")
IOTLB_TYPE = Enum(
    "IOTLB_TYPE",
    (("VHOST_IOTLB_MISS", 1), ("VHOST_IOTLB_UPDATE", 2), ("VHOST_IOTLB_INVALIDATE", 3),
     ("VHOST_IOTLB_ACCESS_FAIL", 4), ("VHOST_IOTLB_BATCH_BEGIN", 5), ("VHOST_IOTLB_BATCH_END", 6)),
)
TRANSFER_DIRECTION = Enum("TRANSFER_DIRECTION", (("SAVE", 0), ("LOAD", 1)))
MIGRATION_PHASE = Enum("MIGRATION_PHASE", (("STOPPED", 0),))

STRUCTS = (
    S("vhost_user_header", "u32 request; u32 flags:HEADER_FLAGS; u32 size"),
    S("vhost_user_u64", "u64 u64:HEX"),
    S("vhost_vring_state", "u32 index; u32 num"),
    S("vhost_vring_addr", "u32 index; u32 flags:VRING_ADDR_F; u64 descriptor:HEX; u64 used:HEX; "
                          "u64 available:HEX; u64 log:HEX"),
    S("vhost_user_memory_region", "u64 guest_address:HEX; u64 size:HEX; u64 user_address:HEX; "
                                  "u64 mmap_offset:HEX"),
    S("vhost_user_memory", "u32 num_regions; u32 padding", doc="then vhost_user_memory_region regions[num_regions]"),
    S("vhost_user_mem_reg", "u64 padding; vhost_user_memory_region region"),
    S("vhost_user_log", "u64 mmap_size:HEX; u64 mmap_offset:HEX"),
    S("vhost_iotlb_msg", "u64 iova:HEX; u64 size:HEX; u64 uaddr:HEX; u8 perm; u8 type=IOTLB_TYPE; u8 reserved[6]"),
    S("vhost_user_config", "u32 offset; u32 size; u32 flags", doc="then u8 region[size]"),
    S("vhost_user_vring_area", "u64 u64:HEX; u64 size:HEX; u64 offset:HEX"),
    S("vhost_user_inflight", "u64 mmap_size:HEX; u64 mmap_offset:HEX; u16 num_queues; u16 queue_size"),
    S("vhost_user_transfer_device_state", "u32 direction=TRANSFER_DIRECTION; u32 phase=MIGRATION_PHASE"),
    S("vhost_user_shared_object", "u8 uuid[16]"),
)


@dataclass(frozen=True)
class Request:
    """One vhost-user request: its payload going in, and the payload of its reply (None: no reply)."""

    name: str
    value: int
    payload: str | None  # struct name, "config"/"memory" for variable ones, None for empty
    reply: str | None = None
    fds: str = ""  # "" none, "1" exactly one (unless NOFD), "n" one per region, "?" optional
    doc: str = ""


def R(name: str, value: int, payload: str | None = None, reply: str | None = None, fds: str = "",
      doc: str = "") -> Request:
    return Request(name, value, payload, reply, fds, doc)


U64 = "vhost_user_u64"
STATE = "vhost_vring_state"
FRONTEND_REQUESTS = (
    R("GET_FEATURES", 1, None, U64),
    R("SET_FEATURES", 2, U64),
    R("SET_OWNER", 3),
    R("RESET_OWNER", 4),
    R("SET_MEM_TABLE", 5, "memory", fds="n"),
    R("SET_LOG_BASE", 6, "vhost_user_log", U64, fds="1"),
    R("SET_LOG_FD", 7, None, fds="1"),
    R("SET_VRING_NUM", 8, STATE),
    R("SET_VRING_ADDR", 9, "vhost_vring_addr"),
    R("SET_VRING_BASE", 10, STATE),
    R("GET_VRING_BASE", 11, STATE, STATE),
    R("SET_VRING_KICK", 12, U64, fds="?", doc="u64: vring index | NOFD bit 8"),
    R("SET_VRING_CALL", 13, U64, fds="?"),
    R("SET_VRING_ERR", 14, U64, fds="?"),
    R("GET_PROTOCOL_FEATURES", 15, None, U64),
    R("SET_PROTOCOL_FEATURES", 16, U64),
    R("GET_QUEUE_NUM", 17, None, U64),
    R("SET_VRING_ENABLE", 18, STATE),
    R("SEND_RARP", 19, U64),
    R("NET_SET_MTU", 20, U64),
    R("SET_BACKEND_REQ_FD", 21, None, fds="1"),
    R("IOTLB_MSG", 22, "vhost_iotlb_msg"),
    R("SET_VRING_ENDIAN", 23, STATE),
    R("GET_CONFIG", 24, "config", "config"),
    R("SET_CONFIG", 25, "config"),
    R("CREATE_CRYPTO_SESSION", 26, "raw", "raw"),
    R("CLOSE_CRYPTO_SESSION", 27, U64),
    R("POSTCOPY_ADVISE", 28, None, None, fds="?"),
    R("POSTCOPY_LISTEN", 29),
    R("POSTCOPY_END", 30, None, U64),
    R("GET_INFLIGHT_FD", 31, "vhost_user_inflight", "vhost_user_inflight"),
    R("SET_INFLIGHT_FD", 32, "vhost_user_inflight", fds="1"),
    R("GPU_SET_SOCKET", 33, None, fds="1"),
    R("RESET_DEVICE", 34),
    R("VRING_KICK", 35, STATE),
    R("GET_MAX_MEM_SLOTS", 36, None, U64),
    R("ADD_MEM_REG", 37, "vhost_user_mem_reg", fds="1"),
    R("REM_MEM_REG", 38, "vhost_user_mem_reg"),
    R("SET_STATUS", 39, U64),
    R("GET_STATUS", 40, None, U64),
    R("GET_SHARED_OBJECT", 41, "vhost_user_shared_object", U64),
    R("SET_DEVICE_STATE_FD", 42, "vhost_user_transfer_device_state", U64, fds="1"),
    R("CHECK_DEVICE_STATE", 43, None, U64),
)
BACKEND_REQUESTS = (
    R("BACKEND_IOTLB_MSG", 1, "vhost_iotlb_msg"),
    R("BACKEND_CONFIG_CHANGE_MSG", 2),
    R("BACKEND_VRING_HOST_NOTIFIER_MSG", 3, "vhost_user_vring_area", fds="?"),
    R("BACKEND_VRING_CALL", 4, STATE),
    R("BACKEND_VRING_ERR", 5, STATE),
    R("BACKEND_SHARED_OBJECT_ADD", 6, "vhost_user_shared_object"),
    R("BACKEND_SHARED_OBJECT_REMOVE", 7, "vhost_user_shared_object"),
    R("BACKEND_SHARED_OBJECT_LOOKUP", 8, "vhost_user_shared_object"),
)

FRONTEND_REQUEST = Enum("FRONTEND_REQUEST", tuple((r.name, r.value) for r in FRONTEND_REQUESTS), "VHOST_USER_")
BACKEND_REQUEST = Enum("BACKEND_REQUEST", tuple((r.name, r.value) for r in BACKEND_REQUESTS), "VHOST_USER_")
FRONTEND_BY_VALUE = {r.value: r for r in FRONTEND_REQUESTS}
BACKEND_BY_VALUE = {r.value: r for r in BACKEND_REQUESTS}
FRONTEND_BY_NAME = {r.name: r for r in FRONTEND_REQUESTS}

REGISTRY = Registry()
REGISTRY.add_structs(STRUCTS)
REGISTRY.add_flagsets((HEADER_FLAGS, PROTOCOL_F, VRING_ADDR_F))
REGISTRY.add_enums((IOTLB_TYPE, TRANSFER_DIRECTION, MIGRATION_PHASE, FRONTEND_REQUEST, BACKEND_REQUEST))
