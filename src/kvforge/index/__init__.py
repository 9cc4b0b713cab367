"""Who holds which blocks: one interface (``BlockIndex``), several backends."""

from kvforge.index.base import (
    BlockIndex,
    IndexStats,
    LookupOptions,
    LookupResult,
    OwnerInfo,
    PutResult,
    is_excluded,
)
from kvforge.index.memory import MemoryIndex
from kvforge.index.open import open_index
from kvforge.index.table import U64Table

__all__ = [
    "BlockIndex",
    "IndexStats",
    "LookupOptions",
    "LookupResult",
    "MemoryIndex",
    "OwnerInfo",
    "PutResult",
    "U64Table",
    "is_excluded",
    "open_index",
]
