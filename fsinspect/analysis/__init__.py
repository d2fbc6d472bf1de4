"""Source-agnostic analysis: paired Exchanges, inode map, submount/syncfs tracker, lints, stats, filters.

No I/O and no textual here: it is fed messages one at a time (live proxy, daemon tap, recording).
"""

from .analyzer import Analyzer
from .exchange import Exchange, Lint
from .filter import FilterError, compile_filter

__all__ = ["Analyzer", "Exchange", "FilterError", "Lint", "compile_filter"]
