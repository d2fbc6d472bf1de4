"""The driver (guest) side of a split ring, written into guest memory exactly as a guest kernel does.

The device side lives in the ring engine; this is its counterpart for tests, benchmarks and a fake guest
in front of the proxy: it fills descriptors (direct chains or one INDIRECT descriptor per request, the
way Linux virtio-fs does), publishes avail entries (entries first, the 16-bit index last) and collects
used entries.  It only writes through memoryviews that the caller hands it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..spec import virtio
from ..structs import build_codecs

_CODECS = build_codecs(virtio.REGISTRY)
_DESC = _CODECS["vring_desc"].struct
_ELEM = _CODECS["vring_used_elem"].struct
_F = virtio.VRING_DESC_F.by_name()
F_NEXT, F_WRITE, F_INDIRECT = _F["NEXT"], _F["WRITE"], _F["INDIRECT"]
DESC_SIZE = virtio.DESC_SIZE


def pack_descs(descs: Sequence[tuple[int, int, int, int]]) -> bytes:
    """(addr, len, flags, next) tuples -> a descriptor table's bytes."""
    return b"".join(_DESC.pack(*d) for d in descs)


def chain_descs(segments: Sequence[tuple[int, int, bool]], first: int = 0) -> list[tuple[int, int, int, int]]:
    """(addr, len, writable) segments -> a NEXT-linked chain occupying entries first, first+1, ..."""
    out = []
    for i, (addr, length, write) in enumerate(segments):
        last = i == len(segments) - 1
        flags = (F_WRITE if write else 0) | (0 if last else F_NEXT)
        out.append((addr, length, flags, 0 if last else first + i + 1))
    return out


class GuestRing:
    """Driver side of one split ring: `desc`, `avail` and `used` are writable views of the three areas."""

    def __init__(self, num: int, desc: memoryview, avail: memoryview, used: memoryview) -> None:
        lay = virtio.split_ring_layout(num)
        if len(desc) < lay.desc_size or len(avail) < lay.avail_size or len(used) < lay.used_size:
            raise ValueError("ring areas too small for the queue size")
        self.num, self.desc, self.avail, self.used = num, desc, avail, used
        self.avail_idx = int.from_bytes(avail[2:4], "little")
        self.last_used = int.from_bytes(used[2:4], "little")
        self._ring_off = lay.avail_ring_off
        self._used_off = lay.used_ring_off
        self._used_event_off = lay.used_event_off

    def set_desc(self, index: int, addr: int, length: int, flags: int, next_: int = 0) -> None:
        _DESC.pack_into(self.desc, index * DESC_SIZE, addr, length, flags, next_)

    def set_descs(self, first: int, descs: Sequence[tuple[int, int, int, int]]) -> None:
        raw = pack_descs(descs)
        self.desc[first * DESC_SIZE:first * DESC_SIZE + len(raw)] = raw

    def publish(self, heads: Sequence[int]) -> None:
        """Make chains available: ring entries first, then avail->idx once."""
        mask = self.num - 1
        idx = self.avail_idx
        for h in heads:
            off = self._ring_off + 2 * (idx & mask)
            self.avail[off:off + 2] = h.to_bytes(2, "little")
            idx = (idx + 1) & 0xFFFF
        self.avail_idx = idx
        self.avail[2:4] = idx.to_bytes(2, "little")

    def publish_raw(self, entries: bytes, count: int) -> None:
        """Publish pre-packed little-endian u16 heads (fast path for benchmarks); may wrap the ring."""
        mask = self.num - 1
        start = self.avail_idx & mask
        first = min(count, self.num - start)
        o = self._ring_off
        self.avail[o + 2 * start:o + 2 * (start + first)] = entries[:2 * first]
        if first < count:
            self.avail[o:o + 2 * (count - first)] = entries[2 * first:2 * count]
        self.avail_idx = (self.avail_idx + count) & 0xFFFF
        self.avail[2:4] = self.avail_idx.to_bytes(2, "little")

    def set_avail_idx(self, idx: int) -> None:
        """Write avail->idx directly (tests of a misbehaving driver)."""
        self.avail_idx = idx & 0xFFFF
        self.avail[2:4] = self.avail_idx.to_bytes(2, "little")

    def set_used_event(self, idx: int) -> None:
        """EVENT_IDX: ask the device to interrupt once used->idx passes `idx`."""
        o = self._used_event_off
        self.avail[o:o + 2] = (idx & 0xFFFF).to_bytes(2, "little")

    def used_pending(self) -> int:
        return (int.from_bytes(self.used[2:4], "little") - self.last_used) & 0xFFFF

    def collect_used(self) -> list[tuple[int, int]]:
        """New used elements (id, len) since the last call."""
        idx = int.from_bytes(self.used[2:4], "little")
        out = []
        mask = self.num - 1
        while self.last_used != idx:
            out.append(_ELEM.unpack_from(self.used, self._used_off + 8 * (self.last_used & mask)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out
