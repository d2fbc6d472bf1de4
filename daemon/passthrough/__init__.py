"""The passthrough filesystem: a host directory served through the engine (daemon.server)."""

from .fs import CacheMode, Options, PassthroughFS
from .inodes import HandleMode

__all__ = ["CacheMode", "HandleMode", "Options", "PassthroughFS"]
