"""A prompt cut into full engine blocks with every key the index needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvforge.blocks.hashing import BlockHash, BlockHasher, LoRA, chain_keys, content_hashes


@dataclass(frozen=True, slots=True)
class BlockSequence:
    """Full blocks of one request under one hash configuration.

    Invariants: ``len(chain) == len(chain_keys) == len(content_keys) == tokens.shape[0] ==
    num_tokens // block_size``; ``chain[i]`` is vLLM's hash of block ``i``; ``chain_keys[i]`` its
    u64 event form; ``content_keys[i]`` depends on block ``i``'s tokens only.
    """

    num_tokens: int
    block_size: int
    chain: list[BlockHash]
    chain_keys: np.ndarray  # uint64 [n]
    content_keys: np.ndarray  # uint64 [n]
    tokens: np.ndarray  # uint32 [n, block_size]

    @property
    def num_blocks(self) -> int:
        return len(self.chain)

    @classmethod
    def build(
        cls,
        hasher: BlockHasher,
        token_ids: Sequence[int],
        *,
        cache_salt: str | None = None,
        lora: LoRA | None = None,
    ) -> BlockSequence:
        chain = hasher.chain(token_ids, cache_salt=cache_salt, lora=lora)
        bs = hasher.block_size
        n = len(chain)
        arr = np.asarray(token_ids[: n * bs], dtype=np.uint32).reshape(n, bs)
        return cls(
            num_tokens=len(token_ids),
            block_size=bs,
            chain=chain,
            chain_keys=chain_keys(chain),
            content_keys=content_hashes(arr),
            tokens=arr,
        )
