"""A simulated engine replica whose paged KV block pool behaves like vLLM's.

* A request reuses the longest run of cached full blocks of its prompt (prefix hit);
* the rest are allocated from the free queue, least recently freed first; taking a block that
  still carries a hash evicts it (``BlockRemoved``);
* once prefilled, the request's new full blocks are cached (``BlockStored`` with the parent hash
  and the blocks' token ids); a partial tail block is never cached;
* a finished request frees its blocks tail first, so its tail is evicted before its head.

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
    num_blocks: int
    block_size: int = 16
    publisher: EventPublisher | None = None
    cached: dict[int, int] = field(default_factory=dict)  # event hash -> physical block
    block_hash: dict[int, int] = field(default_factory=dict)  # physical block -> event hash
    refs: dict[int, int] = field(default_factory=dict)
    free: OrderedDict[int, None] = field(default_factory=OrderedDict)
    running: int = 0
    active_blocks: int = 0
    prefill_tokens: int = 0
    _next_overflow: int = -1

    def __post_init__(self) -> None:
        self.free = OrderedDict((b, None) for b in range(self.num_blocks))

    def cached_prefix(self, keys: Sequence[int]) -> int:
        """Leading blocks of ``keys`` this engine really holds (what an oracle would read)."""
        n = 0
        for h in keys:
            if h not in self.cached:
                break
            n += 1
        return n

    def admit(self, keys: Sequence[int], token_ids: Sequence[int]) -> Admission:
        """Allocate a request (``keys``: its full blocks' event hashes)."""
        bs = self.block_size
        hit = self.cached_prefix(keys)
        blocks: list[int] = []
        for h in keys[:hit]:
            b = self.cached[h]
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
                    del self.cached[old]
                    events.append(BlockRemoved(block_hashes=[old], medium="GPU", group_idx=0))
            else:  # every block is in use: run over capacity rather than stall the replay
                b = self._next_overflow
                self._next_overflow -= 1
                overflow += 1
            self.refs[b] = 1
            blocks.append(b)
        # A block whose hash another physical block already carries (its parent was evicted
        # earlier, it was not) stays uncached: one physical copy per hash keeps the model simple.
        new = [(i, h) for i, h in enumerate(keys) if i >= hit and blocks[i] >= 0
               and h not in self.cached]  # fmt: skip
        for i, h in new:
            self.cached[h] = blocks[i]
            self.block_hash[blocks[i]] = h
        if new:
            events.append(
                BlockStored(
                    block_hashes=[h for _, h in new],
                    parent_block_hash=keys[hit - 1] if hit else None,
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
        """A finished request frees its blocks tail first (the tail is evicted first)."""
        for b in reversed(blocks):
            r = self.refs.get(b, 0) - 1
            if r > 0:
                self.refs[b] = r
                continue
            self.refs.pop(b, None)
            if b >= 0:
                self.free[b] = None
        self.running -= 1
        self.active_blocks -= len(blocks)
