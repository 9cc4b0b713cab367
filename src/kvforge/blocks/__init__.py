"""Cutting token sequences into engine blocks and hashing them exactly as vLLM does."""

from kvforge.blocks.hashing import (
    HASH_ALGOS,
    BlockHash,
    BlockHasher,
    LoRA,
    MultiModalItem,
    block_extra_keys,
    chain_keys,
    content_hashes,
    event_hash,
    validate_cache_salt,
)
from kvforge.blocks.sequence import BlockSequence

__all__ = [
    "HASH_ALGOS",
    "BlockHash",
    "BlockHasher",
    "BlockSequence",
    "LoRA",
    "MultiModalItem",
    "block_extra_keys",
    "chain_keys",
    "content_hashes",
    "event_hash",
    "validate_cache_salt",
]
