"""A simulated engine replica whose paged KV block pool decides as vLLM 0.33.0's does.

Each rule mirrors vLLM's ``vllm/v1/core``:

* **capacity**: ``num_blocks`` is vLLM's ``num_gpu_blocks``; block 0 is its null block, so
  ``num_blocks - 1`` are usable (``BlockPool.__init__``);
* **the last-token rule**: a prompt of L tokens reuses at most ``(L - 1) // block_size``
  cached blocks — the last token is always recomputed for its logits
  (``KVCacheManager.get_computed_blocks``: ``max_cache_hit_length = num_tokens - 1``);
* **prefix hit**: the longest run of cached full blocks; a hash held by several physical
  blocks hits its first copy (``BlockHashToBlockMap.get_one_block``);
* **allocation**: from the head of the free queue; taking a block that still carries a hash
  evicts that copy (``BlockPool._maybe_evict_cached_block``: one ``BlockRemoved`` per copy);
* **caching**: every full block the request computed is cached under its hash, even when
  another physical block already carries that hash — a duplicate copy: two ``BlockStored``
  and, later, two ``BlockRemoved`` for one hash (``BlockPool.cache_full_blocks``); a partial
  tail block is never cached;
* **freeing**: blocks are freed tail first (``SingleTypeKVCacheManager.free``: reversed);
  those without a hash go to the *front* of the free queue (reused first), hashed ones to the
  back (``BlockPool.free_blocks``: ``prepend_n`` / ``append_n``), so a prompt's tail is
  evicted before its head and cached blocks outlive uncached ones.

Every admission publishes one vLLM-format event batch (when a publisher is attached).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvforge.events.publisher import EventPublisher
from kvforge.events.schema import BlockRemoved, BlockStored, KVEvent


@dataclass
class Admission:
    blocks: list[int]  # physical blocks held by the request, in prompt order
    hit_blocks: int
    overflow: int  # blocks allocated beyond the pool (all others were in use)


@dataclass
class SimEngine:
    name: str
    num_blocks: int  # vLLM's num_gpu_blocks (the null block included)
    block_size: int = 16
    publisher: EventPublisher | None = None
    # event hash -> physical blocks carrying it, oldest copy first (vLLM may hold several)
    cached: dict[int, list[int]] = field(default_factory=dict)
    block_hash: dict[int, int] = field(default_factory=dict)  # physical block -> event hash
    refs: dict[int, int] = field(default_factory=dict)
    free: OrderedDict[int, None] = field(default_factory=OrderedDict)
    running: int = 0
    active_blocks: int = 0
    prefill_tokens: int = 0
    _next_overflow: int = -1

    def __post_init__(self) -> None:
        if self.num_blocks < 2:
            raise ValueError("num_blocks counts vLLM's null block: at least 2")
        self.free = OrderedDict((b, None) for b in range(1, self.num_blocks))

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    def cached_prefix(self, keys: Sequence[int]) -> int:
        """Leading blocks of ``keys`` this engine really holds (what an oracle would read)."""
        n = 0
        for h in keys:
            if h not in self.cached:
                break
            n += 1
        return n

    def hit_blocks(self, keys: Sequence[int], num_tokens: int) -> int:
        """Blocks a prompt of ``num_tokens`` tokens would skip: its held prefix, never its last
        token (so at most ``(num_tokens - 1) // block_size``)."""
        return min(self.cached_prefix(keys), max(0, num_tokens - 1) // self.block_size)

    def admit(self, keys: Sequence[int], token_ids: Sequence[int]) -> Admission:
        """Allocate a request (``keys``: its full blocks' event hashes)."""
        bs = self.block_size
        hit = self.hit_blocks(keys, len(token_ids))
        blocks: list[int] = []
        for h in keys[:hit]:
            b = self.cached[h][0]
            if self.refs.get(b, 0) == 0:
                self.free.pop(b, None)
            self.refs[b] = self.refs.get(b, 0) + 1
            blocks.append(b)
        need = -(-len(token_ids) // bs) - hit
        events: list[KVEvent] = []
        overflow = 0
        for _ in range(need):
            if self.free:
                b, _ = self.free.popitem(last=False)
                old = self.block_hash.pop(b, None)
                if old is not None:
                    copies = self.cached[old]
                    copies.remove(b)
                    if not copies:
                        del self.cached[old]
                    events.append(BlockRemoved(block_hashes=[old], medium="GPU", group_idx=0))
            else:  # every block is in use: run over capacity rather than stall the replay
                b = self._next_overflow
                self._next_overflow -= 1
                overflow += 1
            self.refs[b] = 1
            blocks.append(b)
        # every full block computed here is cached, a hash already held included (a copy)
        new = [(i, keys[i]) for i in range(hit, len(keys)) if blocks[i] >= 0]
        for i, h in new:
            self.cached.setdefault(h, []).append(blocks[i])
            self.block_hash[blocks[i]] = h
        if new:
            events.append(
                BlockStored(
                    block_hashes=[h for _, h in new],
                    parent_block_hash=keys[new[0][0] - 1] if new[0][0] else None,
                    token_ids=[t for i, _ in new for t in token_ids[i * bs : (i + 1) * bs]],
                    block_size=bs,
                    medium="GPU",
                    extra_keys=[None] * len(new),
                    group_idx=0,
                    kv_cache_spec_kind="full_attention",
                )
            )
        if events and self.publisher is not None:
            self.publisher.publish(events)
        self.running += 1
        self.active_blocks += len(blocks)
        self.prefill_tokens += len(token_ids) - hit * bs
        return Admission(blocks, hit, overflow)

    def release(self, blocks: Sequence[int]) -> None:
        """A finished request frees its blocks tail first; freed blocks without a hash go to
        the front of the free queue (reused first), hashed ones to the back."""
        front: list[int] = []
        for b in reversed(blocks):
            r = self.refs.get(b, 0) - 1
            if r > 0:
                self.refs[b] = r
                continue
            self.refs.pop(b, None)
            if b < 0:
                continue
            if b in self.block_hash:
                self.free[b] = None
            else:
                front.append(b)
        for b in reversed(front):  # prepend_n keeps the list's order at the head
            self.free[b] = None
            self.free.move_to_end(b, last=False)
        self.running -= 1
        self.active_blocks -= len(blocks)
