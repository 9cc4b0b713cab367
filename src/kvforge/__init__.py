"""kvforge: exact KV-cache reuse for multi-agent LLM pipelines.

``from kvforge import Matcher, SyncMatcher`` — index agents' prompts and ask, for a new prompt,
which blocks a vLLM engine would reuse (exactly, with vLLM-identical block hashes), which hold
the same tokens elsewhere (reusable only with recompute), and why a prefix broke.
"""

from kvforge.blocks import BlockHasher, BlockSequence, LoRA
from kvforge.errors import (
    HashCollisionError,
    InvalidInputError,
    KvforgeError,
    PromptTooLargeError,
    QuotaExceededError,
    UnsupportedInputError,
)
from kvforge.index import BlockIndex, MemoryIndex
from kvforge.match import (
    BlockMatch,
    Divergence,
    IndexResult,
    Matcher,
    MatchReport,
    PrefixHash,
    SyncMatcher,
)
from kvforge.tokenize import PromptTokenizer, TokenizedPrompt

__version__ = "0.1.0"

__all__ = [
    "BlockHasher",
    "BlockIndex",
    "BlockMatch",
    "BlockSequence",
    "Divergence",
    "HashCollisionError",
    "IndexResult",
    "InvalidInputError",
    "KvforgeError",
    "LoRA",
    "MatchReport",
    "Matcher",
    "MemoryIndex",
    "PrefixHash",
    "PromptTokenizer",
    "PromptTooLargeError",
    "QuotaExceededError",
    "SyncMatcher",
    "TokenizedPrompt",
    "UnsupportedInputError",
]
