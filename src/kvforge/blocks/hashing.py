"""vLLM-identical prefix-cache block hashing (vLLM 0.33.0, ``kv_cache_utils``).

Invariants (checked against vLLM's own output in ``tests/test_golden_hashes.py``):

* Only full blocks are hashed; a partial tail gets no hash.
* ``h_i = H(S((parent_i, tuple(tokens_i), extra_i)))`` with ``parent_0 = root`` and
  ``parent_i = h_{i-1}`` (raw digest bytes).
* ``root = H(S(seed))`` where ``seed`` is the engine's ``PYTHONHASHSEED`` text when it is set
  (any value, even ``""``), else ``"vllm-none-hash"`` for sha256 kinds and 32 random bytes
  (hex) per process for xxhash kinds.
* ``extra_i`` is ``None`` or a tuple of tagged tuples, in this order: LoRA
  ``("lora", name, path)`` on every block, multimodal ``("mm", identifier, offset)`` per
  overlapping item, ``("cache_salt", salt)`` on block 0 only, ``("prompt_embeds", digest)``.
* Events carry the last 8 bytes of the digest as a big-endian unsigned integer.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NewType

import cbor2
import numpy as np
import xxhash

from kvforge.errors import InvalidInputError
from kvforge.validate import require_utf8

BlockHash = NewType("BlockHash", bytes)
"""A raw block digest as vLLM keeps it internally (32 bytes sha256*, 16 bytes xxhash*)."""

HashAlgo = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
HASH_ALGOS: tuple[str, ...] = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
UNSET_SEED_STRING = "vllm-none-hash"
_U64_MASK = (1 << 64) - 1

# Tag literals are module constants on purpose: pickle memoizes by object identity, and vLLM's
# tags are interned literals, so a second "mm" inside one block pickles as a back-reference.
_TAG_LORA = "lora"
_TAG_MM = "mm"
_TAG_SALT = "cache_salt"
_TAG_EMBEDS = "prompt_embeds"


def _pickle_dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=5)


def _cbor_dumps(obj: Any) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


_ALGOS: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], bytes]]] = {
    "sha256": (_pickle_dumps, _sha256),
    "sha256_cbor": (_cbor_dumps, _sha256),
    "xxhash": (_pickle_dumps, xxhash.xxh3_128_digest),
    "xxhash_cbor": (_cbor_dumps, xxhash.xxh3_128_digest),
}


def check_algo(algo: str) -> str:
    if algo not in _ALGOS:
        raise InvalidInputError(
            f"unknown hash algorithm {algo!r}; expected one of {', '.join(HASH_ALGOS)}"
        )
    return algo


def resolve_seed(algo: str, hash_seed: str | None) -> str:
    """The seed string vLLM hashes into the root for this algorithm and PYTHONHASHSEED value."""
    check_algo(algo)
    if hash_seed is not None:
        return str(hash_seed)
    if algo.startswith("sha256"):
        return UNSET_SEED_STRING
    warnings.warn(
        f"{algo} with PYTHONHASHSEED unset has a random root in vLLM (per process): hashes from "
        "this process will not match any engine's. Pass the engine's PYTHONHASHSEED as hash_seed.",
        stacklevel=3,
    )
    return os.urandom(32).hex()


@dataclass(frozen=True, slots=True)
class LoRA:
    """A LoRA adapter as vLLM hashes it: name and path (the integer id is not hashed)."""

    name: str
    path: str

    @classmethod
    def coerce(cls, value: LoRA | tuple[str, str] | dict[str, str] | None) -> LoRA | None:
        if value is None or isinstance(value, LoRA):
            return value
        if isinstance(value, dict):
            name = value.get("name", value.get("lora_name"))
            path = value.get("path", value.get("lora_path"))
        elif isinstance(value, tuple | list) and len(value) == 2:
            name, path = value
        else:
            raise InvalidInputError("lora must be LoRA(name, path), a (name, path) pair or a dict")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise InvalidInputError("lora needs a non-empty name and a non-empty path")
        return cls(require_utf8(name, "LoRA name"), require_utf8(path, "LoRA path"))


@dataclass(frozen=True, slots=True)
class MultiModalItem:
    """A multimodal placeholder range: ``identifier`` (content hash), token offset and length."""

    identifier: str
    offset: int
    length: int


def validate_cache_salt(salt: str | None) -> str | None:
    """vLLM's API rule: a non-empty string of at most 128 characters without @ / \\ or NUL."""
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt or len(salt) > 128:
        raise InvalidInputError("cache_salt must be a non-empty string of at most 128 characters")
    if any(ch in salt for ch in "@/\\\x00"):
        raise InvalidInputError("cache_salt must not contain '@', '/', '\\' or NUL")
    return require_utf8(salt, "cache_salt")


def block_extra_keys(
    start: int,
    end: int,
    *,
    lora: LoRA | None = None,
    mm_items: Sequence[MultiModalItem] = (),
    cache_salt: str | None = None,
    embed_digest: bytes | None = None,
) -> tuple[Any, ...] | None:
    """The tagged extra-keys tuple of the block covering tokens ``[start, end)``."""
    keys: list[tuple[Any, ...]] = []
    if lora is not None:
        keys.append((_TAG_LORA, lora.name, lora.path))
    for item in mm_items:
        if item.offset < end and item.offset + item.length > start:
            keys.append((_TAG_MM, item.identifier, item.offset - start))
    if cache_salt and start == 0:
        keys.append((_TAG_SALT, cache_salt))
    if embed_digest is not None:
        keys.append((_TAG_EMBEDS, embed_digest))
    return tuple(keys) if keys else None


def event_hash(h: bytes) -> int:
    """The u64 form KV events carry: the digest's last 8 bytes, big-endian."""
    return int.from_bytes(h[-8:], "big")


class BlockHasher:
    """Chain hasher for one engine configuration (algorithm, seed, block size).

    Pure apart from the root, which is fixed at construction. Thread-safe.
    """

    __slots__ = ("_digest", "_serialize", "algo", "block_size", "root", "seed")

    def __init__(self, algo: str = "sha256", *, block_size: int = 16, hash_seed: str | None = None):
        check_algo(algo)
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise InvalidInputError(f"block_size must be a positive integer, got {block_size!r}")
        self.algo = algo
        self.block_size = block_size
        self._serialize, self._digest = _ALGOS[algo]
        self.seed = resolve_seed(algo, hash_seed)
        self.root = BlockHash(self._digest(self._serialize(self.seed)))

    def hash_block(self, parent: bytes | None, tokens: tuple[int, ...], extra: Any) -> BlockHash:
        """``H(S((parent or root, tokens, extra)))`` for one block."""
        return BlockHash(self._digest(self._serialize((parent or self.root, tokens, extra))))

    def chain(
        self,
        token_ids: Sequence[int],
        *,
        cache_salt: str | None = None,
        lora: LoRA | None = None,
        mm_items: Sequence[MultiModalItem] = (),
        prompt_embeds: np.ndarray | None = None,
        lookahead: int = 0,
        parent: bytes | None = None,
        first_block: int = 0,
        max_blocks: int | None = None,
    ) -> list[BlockHash]:
        """Hashes of every full block of ``token_ids`` (with ``lookahead`` tokens after each).

        To continue a chain, pass the tokens from block ``first_block`` on and that block's
        ``parent`` hash; ``max_blocks`` stops early. ``prompt_embeds`` and ``mm_items`` offsets
        are always relative to the whole request.
        """
        bs = self.block_size
        toks = token_ids if isinstance(token_ids, tuple) else tuple(token_ids)
        n_full = (len(toks) - lookahead) // bs if len(toks) >= lookahead else 0
        if max_blocks is not None:
            n_full = min(n_full, max_blocks)
        ser, dig = self._serialize, self._digest
        prev = parent or self.root
        out: list[BlockHash] = []
        if not (lora or mm_items or cache_salt or prompt_embeds is not None or lookahead):
            # Fast path: the common text-only request. Same object shape as the general path.
            for i in range(0, n_full * bs, bs):
                prev = dig(ser((prev, toks[i : i + bs], None)))
                out.append(BlockHash(prev))
            return out
        if prompt_embeds is not None and len(prompt_embeds) < first_block * bs + len(toks):
            raise InvalidInputError("prompt_embeds must have one row per token")
        lora_only = (
            block_extra_keys(bs, 2 * bs, lora=lora) if lora is not None else None
        )  # reused for blocks with nothing else
        base = first_block * bs  # absolute position of toks[0]
        for b in range(n_full):
            start, end = b * bs, (b + 1) * bs
            a_start, a_end = base + start, base + end
            if mm_items or prompt_embeds is not None or lookahead or (a_start == 0 and cache_salt):
                extra = block_extra_keys(
                    a_start,
                    a_end + lookahead,
                    lora=lora,
                    mm_items=mm_items,
                    cache_salt=cache_salt,
                    embed_digest=_embed_digest(prompt_embeds, a_start, a_end),
                )
                if lookahead:
                    extra = (extra, *toks[end : end + lookahead])
            else:
                extra = lora_only
            prev = dig(ser((prev, toks[start:end], extra)))
            out.append(BlockHash(prev))
        return out


def _embed_digest(embeds: np.ndarray | None, start: int, end: int) -> bytes | None:
    if embeds is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(embeds[start:end]).tobytes()).digest()


_FMIX1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (a bijection with full avalanche), in place."""
    x ^= x >> _S33
    x *= _FMIX1
    x ^= x >> _S33
    x *= _FMIX2
    x ^= x >> _S33
    return x


def _lane_constants(width: int, seed: int = 0) -> np.ndarray:
    lanes = np.arange(1, width + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return _fmix64(lanes ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF))


def content_hashes(tokens: np.ndarray) -> np.ndarray:
    """Position-independent 64-bit content hash per block (``tokens``: ``[n_blocks, B]``).

    ``fmix64(sum_j fmix64(t_j XOR K_j))`` with a distinct constant ``K_j`` per in-block
    position, so it is order-aware; vectorized over the whole prompt (~50 µs for 8k tokens).
    Equal tokens ⇔ equal hash up to 64-bit collisions: the index verifies tokens.
    """
    arr = np.asarray(tokens)
    if arr.shape[0] == 0:
        return np.zeros(0, dtype=np.uint64)
    x = arr.astype(np.uint64) ^ _lane_constants(arr.shape[1])
    return _fmix64(_fmix64(x).sum(axis=1, dtype=np.uint64))


def chain_keys(hashes: Sequence[bytes]) -> np.ndarray:
    """The u64 event form of each hash, as a uint64 array (the index's key)."""
    if not hashes:
        return np.zeros(0, dtype=np.uint64)
    width = len(hashes[0])
    buf = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), width)
    return np.ascontiguousarray(buf[:, -8:]).view(">u8").ravel().astype(np.uint64)
