"""The one exception decoders raise."""

from __future__ import annotations


class DecodeError(Exception):
    """Malformed input: names the byte offset and the reason, so a UI can point at it."""

    def __init__(self, reason: str, offset: int | None = None, *, proto: str = "fuse") -> None:
        super().__init__(reason, offset)
        self.reason = reason
        self.offset = offset
        self.proto = proto

    def __str__(self) -> str:
        where = f" at offset {self.offset}" if self.offset is not None else ""
        return f"{self.proto}: {self.reason}{where}"
