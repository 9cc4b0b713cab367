"""A prompt cut into full engine blocks with every key the index needs."""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import numpy as np

from kvforge.blocks.hashing import BlockHash, BlockHasher, LoRA, chain_keys, content_hashes


class BlockSequence:
    """Full blocks of one request under one hash configuration.

    Invariants: ``num_blocks == num_tokens // block_size == tokens.shape[0] ==
    len(content_keys)``; ``chain_prefix(k)[i]`` is vLLM's hash of block ``i``;
    ``content_keys[i]`` depends on block ``i``'s tokens only.

    Chain hashes are computed on demand and cached: a lookup that stops at the first block
    no owner holds never pays for hashing the rest of a long prompt (sha256 over pickle is the
    dominant per-block cost). Not thread-safe; build one per request.
    """

    __slots__ = (
        "_chain",
        "_keys",
        "_lora",
        "_salt",
        "_toks",
        "block_size",
        "content_keys",
        "hasher",
        "num_blocks",
        "num_tokens",
        "tokens",
    )

    def __init__(
        self,
        hasher: BlockHasher,
        token_ids: Sequence[int],
        *,
        cache_salt: str | None = None,
        lora: LoRA | None = None,
    ):
        toks = token_ids if isinstance(token_ids, tuple) else tuple(token_ids)
        bs = hasher.block_size
        n = len(toks) // bs
        self.hasher = hasher
        self.block_size = bs
        self.num_tokens = len(toks)
        self.num_blocks = n
        self._toks = toks
        self._salt = cache_salt
        self._lora = lora
        self._chain: list[BlockHash] = []
        self._keys = np.zeros(0, dtype=np.uint64)
        # array('I') converts a tuple of ints in C, ~3x faster than np.asarray
        self.tokens = np.frombuffer(array("I", toks[: n * bs]), dtype=np.uint32).reshape(n, bs)
        self.content_keys = content_hashes(self.tokens)

    def chain_prefix(self, k: int) -> list[BlockHash]:
        """vLLM hashes of blocks ``[0, k)`` (``k`` is clipped to ``num_blocks``)."""
        k = min(k, self.num_blocks)
        have = len(self._chain)
        if k > have:
            bs = self.block_size
            self._chain += self.hasher.chain(
                self._toks[have * bs : k * bs],
                cache_salt=self._salt,
                lora=self._lora,
                parent=self._chain[-1] if have else None,
                first_block=have,
            )
            self._keys = np.concatenate([self._keys, chain_keys(self._chain[have:])])
        return self._chain[:k]

    def chain_keys_prefix(self, k: int) -> np.ndarray:
        """u64 event form of the hashes of blocks ``[0, k)``."""
        self.chain_prefix(k)
        return self._keys[: min(k, self.num_blocks)]

    @property
    def all_tokens(self) -> np.ndarray:
        """Every token of the request, the partial tail included (int64)."""
        return np.frombuffer(array("q", self._toks), dtype=np.int64)

    @property
    def num_hashed(self) -> int:
        """Blocks whose chain hash has been computed so far."""
        return len(self._chain)

    @property
    def namespace(self) -> tuple[str, str, str]:
        """What roots this chain besides the hash seed: (cache_salt, LoRA name, LoRA path).
        Two sequences can share block hashes only within one namespace."""
        lo = self._lora
        return (self._salt or "", lo.name if lo else "", lo.path if lo else "")

    @property
    def chain(self) -> list[BlockHash]:
        return self.chain_prefix(self.num_blocks)

    @property
    def chain_keys(self) -> np.ndarray:
        return self.chain_keys_prefix(self.num_blocks)
