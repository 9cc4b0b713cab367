"""Which engine holds which block, kept from the engines' own KV events.

Keyed by the u64 event hash. Per engine and medium a reference count (the same hash may be held
by two physical blocks: vLLM then sends two BlockStored and two BlockRemoved); across engines one
bitmask per hash and medium, so a lookup walks the prompt's blocks once with integer ANDs,
whatever the number of engines. Speculative entries (a routing decision whose events have not
arrived yet) live in a separate mask with a TTL.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from array import array
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import xor
from typing import Any

import xxhash

from kvforge.events.schema import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    _all_u64,
    to_u64,
)
from kvforge.store.health import BackendHealth

log = logging.getLogger(__name__)

DEFAULT_TIER_WEIGHTS: dict[str, float] = {"GPU": 1.0, "CPU": 0.8}
OTHER_TIER_WEIGHT = 0.5  # e.g. "STORAGE": cheaper than recompute, dearer than host memory


@dataclass
class EngineResidency:
    name: str
    bit: int
    counts: dict[str, dict[int, int]] = field(default_factory=dict)  # medium -> hash -> refs
    spec: dict[int, float] = field(default_factory=dict)  # speculative hash -> expiry
    last_event: float = 0.0

    def blocks(self, medium: str | None = None) -> int:
        if medium is not None:
            return len(self.counts.get(medium, {}))
        return sum(len(c) for c in self.counts.values())


@dataclass(frozen=True, slots=True)
class PrefixScore:
    """An engine's cached prefix for one prompt."""

    blocks: int  # leading blocks held in any tier (speculative entries count as GPU)
    score: float  # blocks weighted by the tier each is held in


class Residency(ABC):
    """Which engine holds which block, as the routers read it. Two implementations:
    :class:`ResidencyIndex` (this process's memory) and ``SharedResidency`` (the same index,
    fed through one event feed in Redis, which wraps a ``ResidencyIndex``).

    Writers are the KV-event subscribers (``apply``, ``clear_engine``) and tools and tests
    (``store``, ``remove``); readers are routers (``refresh`` once per decision, then
    ``walk`` / ``prefix_scores`` and ``tree_keys``). Every method is thread-safe.
    """

    tier_weights: dict[str, float]
    secret: int  # keys the content hashes of the block tree (``block_keys``)
    max_blocks_per_engine: int
    max_media: int

    # ---- writes: what the engines said -------------------------------------------------------
    @abstractmethod
    def apply(self, engine: str, batch: KVEventBatch) -> None:
        """One decoded, validated batch of the engine's KV events."""

    @abstractmethod
    def clear_engine(self, engine: str) -> None:
        """The engine holds nothing any more (restart, resync)."""

    @abstractmethod
    def store(self, engine: str, hashes: Sequence[int], medium: str = "GPU") -> None:
        """One stored copy of each hash (no token ids: the block tree does not grow)."""

    @abstractmethod
    def remove(self, engine: str, hashes: Sequence[int], medium: str = "GPU") -> None: ...

    # ---- engines and routing state ---------------------------------------------------------
    @abstractmethod
    def engine(self, name: str) -> EngineResidency: ...

    @property
    @abstractmethod
    def engines(self) -> list[str]: ...

    @abstractmethod
    def set_group(self, engine: str, group: Any) -> None:
        """Engines that hash alike share a group (the block tree keeps groups apart)."""

    @abstractmethod
    def speculate(self, engine: str, hashes: Sequence[int], ttl: float, now: float) -> None:
        """Count ``hashes`` as held by ``engine`` until ``now + ttl`` (routing → event gap)."""

    # ---- reads -----------------------------------------------------------------------------
    @abstractmethod
    def refresh(self) -> bool:
        """Bring this view up to date before a read; False when it could not (the reads then
        credit no engine with anything)."""

    @abstractmethod
    def walk(self, engines: Sequence[str], *, now: float | None = None) -> PrefixWalk:
        """A resumable prefix walk over the listed engines (see ``PrefixWalk``)."""

    def prefix_scores(
        self, keys: Sequence[int], engines: Sequence[str], *, now: float | None = None
    ) -> dict[str, PrefixScore]:
        """Per engine, the leading ``keys`` it holds (any tier) and their tier-weighted score.
        Stops at the first block no listed engine holds: O(matched blocks)."""
        self.refresh()
        walk = self.walk(engines, now=now)
        walk.extend(keys)
        return walk.result()

    @abstractmethod
    def tree_keys(
        self, group: Any, block_size: int, root_extra: Any, content_keys: Iterable[int]
    ) -> list[int]:
        """Hashes of the leading blocks some engine of ``group`` stored, by content key."""

    @abstractmethod
    def health(self) -> BackendHealth: ...

    @abstractmethod
    def stats(self) -> dict[str, object]: ...


class ResidencyIndex(Residency):
    """In this process's memory. Thread-safe: event subscribers write, routers read."""

    def __init__(
        self,
        tier_weights: dict[str, float] | None = None,
        *,
        max_blocks_per_engine: int = 4_000_000,
        max_media: int = 8,
    ) -> None:
        self.tier_weights = dict(DEFAULT_TIER_WEIGHTS if tier_weights is None else tier_weights)
        # An engine's events describe its own block pool (GPU: ~10^4-10^5 blocks; with CPU or
        # disk tiers ~10^6). Far more means a rogue or broken publisher: its residency is
        # dropped rather than allowed to grow without bound.
        self.max_blocks_per_engine = max_blocks_per_engine
        self.overflows = 0
        # Tiers are few (vLLM: GPU, CPU; connectors add a disk or remote tier). A publisher
        # inventing media names would grow per-medium tables for ever and make every clear
        # O(media x blocks): events of a medium beyond the first ``max_media`` are ignored
        # (and counted), and a medium nobody holds any more is forgotten.
        self.max_media = max_media
        self.ignored_media_events = 0
        self._engines: dict[str, EngineResidency] = {}
        self._masks: dict[str, dict[int, int]] = {}  # medium -> hash -> engine bitmask
        self._spec_mask: dict[int, int] = {}
        self._spec_queue: deque[tuple[float, str, tuple[int, ...]]] = deque()
        self._lock = threading.Lock()
        self.blocks_applied = 0
        # Block tree from the events' token ids: (parent hash ^ content key) -> hash. It lets a
        # router find the hashes of a prompt's held prefix without sha256 (see ``tree_keys``).
        self.secret = int.from_bytes(os.urandom(8), "little")  # keys the content hashes
        self._tree: dict[int, int] = {}  # node key (see ``_grow_tree``) -> hash
        self._tree_key: dict[int, int] = {}  # hash -> its node key (for pruning)
        self._groups: dict[str, Any] = {}  # engine -> hash-configuration group

    # ---- engines ---------------------------------------------------------------------------
    def engine(self, name: str) -> EngineResidency:
        with self._lock:
            return self._engine(name)

    def _engine(self, name: str) -> EngineResidency:
        e = self._engines.get(name)
        if e is None:
            e = self._engines[name] = EngineResidency(name, 1 << len(self._engines))
        return e

    @property
    def engines(self) -> list[str]:
        return list(self._engines)

    def reset(self) -> None:
        """Forget every engine's blocks, speculation and the block tree (a shared replica
        reloading a snapshot); keeps the hash groups and the tree's secret."""
        with self._lock:
            self._engines.clear()
            self._masks.clear()
            self._tree.clear()
            self._tree_key.clear()
            self._spec_mask.clear()
            self._spec_queue.clear()

    def counts(self) -> dict[str, dict[str, list[tuple[int, int]]]]:
        """Every engine's held copies: engine -> medium -> [(hash, refs), ...] (a consistent
        cut, for snapshots)."""
        with self._lock:
            return {
                n: {m: list(c.items()) for m, c in e.counts.items()}
                for n, e in self._engines.items()
            }

    def set_group(self, engine: str, group: Any) -> None:
        """Engines that hash alike (algorithm, seed, block size, LoRA registry) share a group;
        the block tree keeps each group's roots apart."""
        with self._lock:
            self._engine(engine)
            self._groups[engine] = group

    # ---- events ----------------------------------------------------------------------------
    def apply(self, engine: str, batch: KVEventBatch) -> None:
        """Apply one decoded batch. Unknown removals are ignored (the block was stored before
        we subscribed); stores are idempotent per physical copy."""
        with self._lock:
            e = self._engine(engine)
            e.last_event = time.monotonic()
            for ev in batch.events:
                if isinstance(ev, BlockStored):
                    medium = ev.medium or "GPU"
                    if medium not in self._masks and len(self._masks) >= self.max_media:
                        self.ignored_media_events += 1
                        continue
                    self._stored(e, medium, ev)
                elif isinstance(ev, BlockRemoved):
                    self._remove(e, ev.medium or "GPU", ev.block_hashes)
                elif isinstance(ev, AllBlocksCleared):
                    self._clear(e)
            self._bound(e)

    def store(self, engine: str, hashes: Sequence[int], medium: str = "GPU") -> None:
        with self._lock:
            e = self._engine(engine)
            if medium not in self._masks and len(self._masks) >= self.max_media:
                self.ignored_media_events += 1
                return
            self._store(e, medium, hashes)
            self._bound(e)

    def _bound(self, e: EngineResidency) -> None:
        if e.blocks() > self.max_blocks_per_engine:
            self.overflows += 1
            log.warning(
                "engine %s announced over %d blocks: dropping its residency",
                e.name,
                self.max_blocks_per_engine,
            )
            self._clear(e)

    def remove(self, engine: str, hashes: Sequence[int], medium: str = "GPU") -> None:
        with self._lock:
            self._remove(self._engine(engine), medium, hashes)

    def clear_engine(self, engine: str) -> None:
        with self._lock:
            self._clear(self._engine(engine))

    def _store(
        self, e: EngineResidency, medium: str, hashes: Sequence[int | bytes]
    ) -> tuple[list[int], dict[int, int]]:
        """Count one stored copy of each hash; returns the hashes in u64 form and the distinct
        ones (as a dict, for the block tree). Distinct hashes — every event vLLM sends for one
        request — take bulk dict operations in C; duplicate copies of held blocks (two requests
        that computed the same block) just count up."""
        hs = hashes if type(hashes) is list and _all_u64(hashes) else [to_u64(h) for h in hashes]
        new = dict.fromkeys(hs, 1)
        counts = e.counts.setdefault(medium, {})
        masks = self._masks.setdefault(medium, {})
        bit = e.bit
        self.blocks_applied += len(hs)
        if len(new) < len(hs):  # a hash repeated within the event: one copy at a time
            for h in hs:
                c = counts.get(h, 0)
                counts[h] = c + 1
                if c == 0:
                    masks[h] = masks.get(h, 0) | bit
            return hs, new
        add: Sequence[int] = hs
        if not counts.keys().isdisjoint(new):
            held = counts.keys() & new
            for h in held:
                counts[h] += 1
            add = [h for h in hs if h not in held]
            counts.update(dict.fromkeys(add, 1))
        else:
            counts.update(new)
        shared = masks.keys() & add  # held by other engines already
        if shared:
            for h in shared:
                masks[h] |= bit
            masks.update((h, bit) for h in add if h not in shared)
        else:
            masks.update(dict.fromkeys(add, bit))
        return hs, new

    def _stored(self, e: EngineResidency, medium: str, ev: BlockStored) -> None:
        """One BlockStored: residency (replacing any speculative entry), then the tree."""
        hashes, new = self._store(e, medium, ev.block_hashes)
        if e.spec:
            self._drop_spec(e, hashes)
        self._grow_tree(e, ev, hashes, new)

    def _grow_tree(
        self, e: EngineResidency, ev: BlockStored, hashes: list[int], new: dict[int, int]
    ) -> None:
        n, bs = len(hashes), ev.block_size
        if n == 0 or bs <= 0 or len(ev.token_ids) != n * bs:
            return  # masked or hybrid groups carry no usable token ids
        known = self._tree_key
        fresh = known.keys().isdisjoint(new)
        if not fresh and known.keys() >= new.keys():
            return  # a re-announcement (report mode "full")
        cks = block_keys(array("I", ev.token_ids), bs, self.secret)
        prev = ev.parent_block_hash
        if prev is None:
            first = ev.extra_keys[0] if ev.extra_keys else None
            root = self._root(self._groups.get(e.name), bs, first)
        else:
            root = prev if type(prev) is int else to_u64(prev)
        tree = self._tree
        # a node's key: parent hash XOR the keyed content key (both 64-bit; the content key is
        # secret-keyed, so no prompt can be crafted to collide with another's node)
        keys = list(map(xor, [root, *hashes[:-1]], cks))
        if fresh and len(new) == n:  # all new and distinct: two bulk updates in C
            tree.update(zip(keys, hashes, strict=True))
            known.update(zip(hashes, keys, strict=True))
            return
        for key, h in zip(keys, hashes, strict=True):
            if h not in known:
                tree[key] = h
                known[h] = key

    def _root(self, group: Any, block_size: int, extra: Any) -> int:
        """The tree's parent key of a block 0: one per hash group, block size and block-0
        extra keys (LoRA, cache salt), as a keyed 64-bit value."""
        ident = repr(("root", group, block_size, _freeze(extra))).encode()
        return xxhash.xxh3_64_intdigest(ident, self.secret)

    def _prune(self, h: int) -> None:
        """Drop ``h`` from the tree once no engine holds it in any medium."""
        for masks in self._masks.values():
            if h in masks:
                return
        key = self._tree_key.pop(h, None)
        if key is not None and self._tree.get(key) == h:
            del self._tree[key]

    def tree_keys(
        self, group: Any, block_size: int, root_extra: Any, content_keys: Iterable[int]
    ) -> list[int]:
        """Hashes of the leading blocks some engine of ``group`` stored, found by walking the
        tree with the prompt's (keyed) content keys: no sha256. ``root_extra`` is block 0's
        untagged event extra keys (e.g. ``[lora_name, cache_salt]``) or None."""
        out: list[int] = []
        with self._lock:
            tree = self._tree
            parent = self._root(group, block_size, root_extra)
            for ck in content_keys:
                h = tree.get(parent ^ ck)
                if h is None:
                    break
                out.append(h)
                parent = h
        return out

    def _drop_spec(self, e: EngineResidency, hashes: Iterable[int]) -> None:
        """The engine's events now speak for these hashes: its speculative entries for them
        end (a removal must not be outlived by a guess; a store replaces the guess)."""
        spec = e.spec
        if not spec:
            return
        masks = self._spec_mask
        for h in hashes:
            if spec.pop(h, None) is not None:
                m = masks.get(h, 0) & ~e.bit
                if m:
                    masks[h] = m
                else:
                    masks.pop(h, None)

    def _remove(self, e: EngineResidency, medium: str, hashes: Sequence[int | bytes]) -> None:
        self._drop_spec(e, (h if type(h) is int else to_u64(h) for h in hashes))
        counts = e.counts.get(medium)
        if not counts:
            return
        masks = self._masks[medium]
        bit = e.bit
        for raw in hashes:
            h = raw if type(raw) is int and raw >= 0 else to_u64(raw)
            c = counts.get(h)
            if c is None:
                continue
            if c > 1:
                counts[h] = c - 1
                continue
            del counts[h]
            m = masks.get(h, 0) & ~bit
            if m:
                masks[h] = m
            else:
                masks.pop(h, None)
                self._prune(h)
        self.blocks_applied += len(hashes)
        self._forget_medium(medium)

    def _clear(self, e: EngineResidency) -> None:
        self._drop_spec(e, list(e.spec))
        for medium, counts in list(e.counts.items()):
            masks = self._masks[medium]
            for h in counts:
                m = masks.get(h, 0) & ~e.bit
                if m:
                    masks[h] = m
                else:
                    masks.pop(h, None)
                    self._prune(h)
            counts.clear()
            self._forget_medium(medium)

    def _forget_medium(self, medium: str) -> None:
        """Drop a medium's tables once no engine holds a block in it."""
        if self._masks.get(medium):
            return
        self._masks.pop(medium, None)
        for e in self._engines.values():
            if not e.counts.get(medium, True):
                del e.counts[medium]

    # ---- speculation -----------------------------------------------------------------------
    def speculate(self, engine: str, hashes: Sequence[int], ttl: float, now: float) -> None:
        """Count ``hashes`` as held by ``engine`` until ``now + ttl`` (routing → event gap)."""
        with self._lock:
            e = self._engine(engine)
            expiry = now + ttl
            for h in hashes:
                e.spec[h] = expiry
                self._spec_mask[h] = self._spec_mask.get(h, 0) | e.bit
            self._spec_queue.append((expiry, engine, tuple(hashes)))

    def _expire(self, now: float) -> None:
        q = self._spec_queue
        while q and q[0][0] <= now:
            expiry, name, hashes = q.popleft()
            e = self._engines[name]
            for h in hashes:
                if e.spec.get(h) == expiry:
                    del e.spec[h]
                    m = self._spec_mask.get(h, 0) & ~e.bit
                    if m:
                        self._spec_mask[h] = m
                    else:
                        self._spec_mask.pop(h, None)

    # ---- lookup ----------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Bring this view up to date before a read (a no-op here: events apply directly; a
        shared residency catches up with the other replicas). False when it could not."""
        return True

    def walk(self, engines: Sequence[str], *, now: float | None = None) -> PrefixWalk:
        """A resumable prefix walk: feed it a prompt's block keys chunk by chunk (so the
        caller hashes only as far as some engine still holds the prefix)."""
        with self._lock:
            self._expire(time.monotonic() if now is None else now)
            bits = {n: self._engine(n).bit for n in engines}
        return PrefixWalk(self, bits)

    def _weights(self) -> list[tuple[str, float]]:
        return [(m, self.tier_weights.get(m, OTHER_TIER_WEIGHT)) for m in self._masks]

    def _slow_weight(self, h: int, others: list[tuple[float, dict[int, int]]]) -> dict[int, float]:
        """Best slow-tier weight per engine bit for one block."""
        best: dict[int, float] = {}
        for w, mm in others:
            m = mm.get(h, 0)
            for e in self._engines.values():
                if m & e.bit and w > best.get(e.bit, -1.0):
                    best[e.bit] = w
        return best

    def health(self) -> BackendHealth:
        """The link to the residency's store (in memory: nothing to report)."""
        return BackendHealth()

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "engines": {
                    n: {m: len(c) for m, c in e.counts.items()} for n, e in self._engines.items()
                },
                "blocks_applied": self.blocks_applied,
                "overflows": self.overflows,
                "ignored_media_events": self.ignored_media_events,
                "speculative": len(self._spec_mask),
            }


class PrefixWalk:
    """State of one prompt's walk over the residency masks (see ``ResidencyIndex.walk``)."""

    def __init__(self, index: ResidencyIndex, bits: dict[str, int]) -> None:
        self._index = index
        self._bits = bits
        self._by_bit = {b: n for n, b in bits.items()}
        self.alive = 0
        for b in bits.values():
            self.alive |= b
        self.position = 0
        self._held_upto: dict[int, int] = {}
        self._discount: dict[int, float] = {}  # engine bit -> score lost to slower tiers

    def extend(self, keys: Sequence[int]) -> bool:
        """Walk further; True while some engine still holds every key seen so far."""
        idx = self._index
        with idx._lock:
            masks = idx._masks
            gpu = masks.get("GPU", {})
            others = [(w, masks[m]) for m, w in idx._weights() if m != "GPU" and m in masks]
            spec = idx._spec_mask
            alive, pos = self.alive, self.position
            if not others and not spec:
                # the common case: one tier, nothing speculative — two operations per block
                held = self._held_upto
                get = gpu.get
                for h in keys:
                    if not alive:
                        break
                    m = get(h, 0)
                    dropped = alive & ~m
                    while dropped:
                        low = dropped & -dropped
                        held[low] = pos
                        dropped ^= low
                    alive &= m
                    pos += 1
                self.alive, self.position = alive, pos
                return bool(alive)
            for h in keys:
                if not alive:
                    break
                fast = gpu.get(h, 0) | spec.get(h, 0)
                slow = 0
                for _, mm in others:
                    slow |= mm.get(h, 0)
                m = fast | slow
                dropped = alive & ~m
                while dropped:  # visit only the engines that stop here
                    low = dropped & -dropped
                    self._held_upto[low] = pos
                    dropped ^= low
                alive &= m
                slow_only = slow & ~fast & alive
                if slow_only:
                    w = idx._slow_weight(h, others)
                    while slow_only:
                        low = slow_only & -slow_only
                        self._discount[low] = self._discount.get(low, 0.0) + 1.0 - w.get(low, 0.0)
                        slow_only ^= low
                pos += 1
            self.alive, self.position = alive, pos
        return bool(alive)

    def result(self) -> dict[str, PrefixScore]:
        out = {}
        for n, b in self._bits.items():
            held = self.position if self.alive & b else self._held_upto.get(b, 0)
            out[n] = PrefixScore(held, held - self._discount.get(b, 0.0))
        return out


def block_keys(tokens: array[int], block_size: int, secret: int) -> list[int]:
    """Keyed 64-bit content key of every full block of ``tokens`` (uint32): XXH3 of the block's
    bytes with a per-process secret seed. Per block in C, which beats numpy's per-call overhead
    on the small batches events carry; the router computes the same keys for its prompts."""
    raw = tokens.tobytes()  # slicing bytes and a positional seed beat memoryview + keyword
    width = block_size * 4
    parts = [raw[i : i + width] for i in range(0, len(raw) - width + 1, width)]
    return list(map(xxhash.xxh3_64_intdigest, parts, repeat(secret)))


def _freeze(x: Any) -> Any:
    """Hashable form of an event's untagged extra keys (lists become tuples)."""
    if isinstance(x, list | tuple):
        return tuple(_freeze(i) for i in x)
    return x
