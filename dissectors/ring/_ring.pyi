"""Type stub for the C engine: the same API as the pure-Python twin, plus tune_malloc."""

from ._common import Capture as Capture
from ._common import RingError as RingError
from ._native import CORE_LAYOUT as CORE_LAYOUT
from ._native import REASONS as REASONS
from ._native import CaptureBuffer as CaptureBuffer
from ._native import Chain as Chain
from ._native import MemoryMap as MemoryMap
from ._native import ShadowPath as ShadowPath
from ._native import SplitQueue as SplitQueue

def tune_malloc(trim_threshold: int = ..., mmap_threshold: int = ...) -> bool: ...
