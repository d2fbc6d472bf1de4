"""Source-agnostic analysis: paired Exchanges, inode map, submount/syncfs tracker, lints, stats, filters.

No I/O and no textual here: it is fed messages one at a time (live proxy, daemon tap, recording).
"""

from typing import TYPE_CHECKING, Any

from .analyzer import Analyzer
from .exchange import Exchange, Lint

if TYPE_CHECKING:
    from .filter import FilterError, compile_filter

__all__ = ["Analyzer", "Exchange", "FilterError", "Lint", "compile_filter"]


def __getattr__(name: str) -> Any:
    """The filter language (and lark) loads for whoever filters, not with the analysis: a headless client
    without --filter never needs it."""
    if name in ("FilterError", "compile_filter"):
        from . import filter as _filter

        return getattr(_filter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
