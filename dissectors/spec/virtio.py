"""Virtio split rings, common feature bits and the virtio-fs config space, as tables.

Names follow include/uapi/linux/virtio_ring.h and virtio_config.h.  The ring
structs end in flexible arrays; the tables hold the fixed heads, and
`split_ring_layout` derives the full layout for a queue size.
"""

from __future__ import annotations

from dataclasses import dataclass

from .types import Registry, S, bits

VRING_DESC_F = bits("VRING_DESC_F_", {"NEXT": 0, "WRITE": 1, "INDIRECT": 2}, name="VRING_DESC_F")
VRING_AVAIL_F = bits("VRING_AVAIL_F_", {"NO_INTERRUPT": 0}, name="VRING_AVAIL_F")
VRING_USED_F = bits("VRING_USED_F_", {"NO_NOTIFY": 0}, name="VRING_USED_F")
VRING_PACKED_DESC_F = bits("VRING_PACKED_DESC_F_", {"AVAIL": 7, "USED": 15}, name="VRING_PACKED_DESC_F")

# Device-independent feature bits (virtio 1.2 section 6) plus the vhost ones that share the space, under
# the names the headers give them (virtio_config.h, virtio_ring.h, vhost.h, the vhost-user spec).
VIRTIO_F = bits(
    "",
    {
        "VIRTIO_F_NOTIFY_ON_EMPTY": 24, "VHOST_F_LOG_ALL": 26, "VIRTIO_F_ANY_LAYOUT": 27,
        "VIRTIO_RING_F_INDIRECT_DESC": 28, "VIRTIO_RING_F_EVENT_IDX": 29, "VHOST_USER_F_PROTOCOL_FEATURES": 30,
        "VIRTIO_F_VERSION_1": 32, "VIRTIO_F_ACCESS_PLATFORM": 33, "VIRTIO_F_RING_PACKED": 34,
        "VIRTIO_F_IN_ORDER": 35, "VIRTIO_F_ORDER_PLATFORM": 36, "VIRTIO_F_SR_IOV": 37,
        "VIRTIO_F_NOTIFICATION_DATA": 38, "VIRTIO_F_NOTIF_CONFIG_DATA": 39, "VIRTIO_F_RING_RESET": 40,
        "VIRTIO_F_ADMIN_VQ": 41,
    },
    name="VIRTIO_F",
)
VIRTIO_FS_F = bits("VIRTIO_FS_F_", {"NOTIFICATION": 0}, name="VIRTIO_FS_F")

STRUCTS = (
    S("vring_desc", "u64 addr:HEX; u32 len; u16 flags:VRING_DESC_F; u16 next"),
    S("vring_avail", "u16 flags:VRING_AVAIL_F; u16 idx", doc="then u16 ring[num]; u16 used_event (EVENT_IDX)"),
    S("vring_used_elem", "u32 id; u32 len"),
    S("vring_used", "u16 flags:VRING_USED_F; u16 idx", doc="then vring_used_elem ring[num]; u16 avail_event"),
    S("vring_packed_desc_event", "u16 off_wrap; u16 flags"),
    S("vring_packed_desc", "u64 addr:HEX; u32 len; u16 id; u16 flags:VRING_PACKED_DESC_F"),
    S("virtio_fs_config", "char tag[36]; u32 num_request_queues; u32 notify_buf_size",
      header_exempt="virtio_fs.h has no notify_buf_size before Linux 6.x; checked by size only"),
)

REGISTRY = Registry()
REGISTRY.add_structs(STRUCTS)
REGISTRY.add_flagsets((VRING_DESC_F, VRING_AVAIL_F, VRING_USED_F, VRING_PACKED_DESC_F, VIRTIO_F, VIRTIO_FS_F))

DESC_SIZE = REGISTRY.sizeof("vring_desc")
USED_ELEM_SIZE = REGISTRY.sizeof("vring_used_elem")
MAX_QUEUE_SIZE = 32768  # virtio 1.2: split queue size is a power of 2, at most 32768
FS_HIPRIO_QUEUE = 0  # virtio-fs: queue 0 carries FORGET/BATCH_FORGET, no replies
FS_REQUEST_QUEUE_BASE = 1


@dataclass(frozen=True)
class SplitRingLayout:
    """Byte sizes of the three split-ring areas for a queue of `num` entries (virtio 1.2 2.7)."""

    num: int
    desc_size: int
    avail_size: int
    used_size: int
    # offsets inside the avail and used areas
    avail_ring_off: int = 4
    used_ring_off: int = 4

    @property
    def used_event_off(self) -> int:
        """Offset of used_event at the end of the avail ring (EVENT_IDX)."""
        return 4 + 2 * self.num

    @property
    def avail_event_off(self) -> int:
        """Offset of avail_event at the end of the used ring (EVENT_IDX)."""
        return 4 + USED_ELEM_SIZE * self.num


def split_ring_layout(num: int) -> SplitRingLayout:
    if num <= 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
        raise ValueError(f"queue size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}")
    return SplitRingLayout(num, DESC_SIZE * num, 4 + 2 * num + 2, 4 + USED_ELEM_SIZE * num + 2)
