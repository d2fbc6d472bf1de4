"""Shared rig for the ring-engine tests: real memfd-backed guest memory, a driver, and either engine."""

from __future__ import annotations

import gc
import mmap
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from dissectors.ring import driver
from dissectors.spec import virtio

GUEST_GPA = 0x0
GUEST_SIZE = 4 << 20
PROXY_GPA = 1 << 40  # the proxy's own region: above any guest-physical address
PROXY_UVA = 0x7F00_0000_0000 + (1 << 44)
PROXY_SIZE = 1 << 20
BUF_BASE = 0x100000  # data buffers start here in guest memory


def engines() -> dict[str, ModuleType]:
    """Both engines; the C one must exist (CI has a compiler), so its absence fails rather than skips."""
    from dissectors.ring import _native

    out: dict[str, ModuleType] = {"python": _native}
    try:
        from dissectors.ring import _ring  # type: ignore[attr-defined]

        out["c"] = _ring
    except ImportError as exc:  # pragma: no cover - visible as a failing parameter
        out["c"] = exc  # type: ignore[assignment]
    return out


def memfd_map(size: int, name: str) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


def ring_areas(base: int, num: int) -> tuple[int, int, int]:
    """(desc, avail, used) GPAs for a ring at `base`, with the spec's alignment (used 4 KiB-aligned)."""
    lay = virtio.split_ring_layout(num)
    desc = base
    avail = desc + lay.desc_size
    used = (avail + lay.avail_size + 4095) & ~4095
    return desc, avail, used


@dataclass
class Rig:
    """Guest memory (memfd at GPA 0) + a proxy region; a GuestRing and device-side SplitQueue on it."""

    eng: Any
    num: int = 8
    fds: list[int] = field(default_factory=list)
    maps: list[mmap.mmap] = field(default_factory=list)

    def __post_init__(self) -> None:
        gfd, self.gmem = memfd_map(GUEST_SIZE, "guest")
        pfd, self.pmem = memfd_map(PROXY_SIZE, "proxy")
        self.fds += [gfd, pfd]
        self.maps += [self.gmem, self.pmem]
        self.mem = self.eng.MemoryMap()
        self.mem.add_region(GUEST_GPA, GUEST_SIZE, self.gmem, uva=0x7F00_0000_0000)
        self.mem.add_region(PROXY_GPA, PROXY_SIZE, self.pmem, uva=PROXY_UVA)
        self.desc, self.avail, self.used = ring_areas(0x1000, self.num)
        self.s_avail, self.s_used = PROXY_GPA + 0x3000, PROXY_GPA
        self.guest = self.guest_ring(self.avail, self.used)
        self.next_buf = BUF_BASE

    def guest_ring(self, avail: int, used: int) -> driver.GuestRing:
        lay = virtio.split_ring_layout(self.num)
        return driver.GuestRing(self.num, self.mem.view(self.desc, lay.desc_size),
                                self.mem.view(avail, lay.avail_size), self.mem.view(used, lay.used_size))

    def queue(self, shadow: bool = False) -> Any:
        if shadow:
            return self.eng.SplitQueue(self.mem, self.num, self.desc, self.s_avail, self.s_used)
        return self.eng.SplitQueue(self.mem, self.num, self.desc, self.avail, self.used)

    def buf(self, data: bytes | int) -> tuple[int, int]:
        """Allocate a guest buffer (filled with `data`, or `data` zero bytes); returns (gpa, len)."""
        n = data if isinstance(data, int) else len(data)
        gpa = self.next_buf
        self.next_buf = (self.next_buf + n + 63) & ~63
        if not isinstance(data, int):
            self.gmem[gpa:gpa + n] = data
        return gpa, n

    def put(self, gpa: int, data: bytes) -> None:
        self.gmem[gpa:gpa + len(data)] = data

    def get(self, gpa: int, n: int) -> bytes:
        return bytes(self.gmem[gpa:gpa + n])

    def close(self) -> None:
        """The memfds, and the garbage that holds their mappings: a RingError keeps its chains (and so
        their queue and this memory), in a cycle with the frame that caught it (test_daemon_vhost_user_
        protocol's fd checks saw those mappings go during their run)."""
        for fd in self.fds:
            os.close(fd)
        gc.collect()
