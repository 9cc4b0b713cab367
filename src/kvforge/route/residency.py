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
from itertools import compress, count, repeat, takewhile
from operator import not_
from typing import Any, NamedTuple

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
        self, group: Any, block_size: int, root_extra: Any, tokens: Sequence[int]
    ) -> list[int]:
        """Hashes of the leading blocks of ``tokens`` some engine of ``group`` stored and
        some engine still holds, found from the events' token ids (no sha256)."""

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
        # Block tree from the events' token ids, one run of blocks per BlockStored (see
        # ``_grow_tree``). It lets a router find the hashes of a prompt's held prefix without
        # sha256 (``tree_keys``).
        self.secret = int.from_bytes(os.urandom(8), "little")  # keys the content hashes
        self._runs: dict[int, _Run] = {}  # node key of a run's first block -> the run
        self._where: dict[int, _Run] = {}  # hash -> the run that holds the block
        self._kept = 0  # blocks left in the tree by the last sweep (``_sweep``)
        self.sweep_slack = 65_536  # blocks allowed past twice the last sweep's before the next
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
            self._runs.clear()
            self._where.clear()
            self._kept = 0
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
                    # residency (replacing any speculative entry), then the tree
                    hashes, was_held = self._store(e, medium, ev.block_hashes)
                    if e.spec:
                        self._drop_spec(e, hashes)
                    if not was_held:  # a re-announcement: the tree has the runs already
                        self._grow_tree(e, ev, hashes)
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
    ) -> tuple[list[int], bool]:
        """Count one stored copy of each hash; returns the hashes in u64 form and whether the
        engine already held every one of them in this medium (a re-announcement). Distinct
        hashes — every event vLLM sends for one request — take bulk dict operations in C;
        duplicate copies of held blocks (two requests that computed the same block) count up."""
        hs = hashes if type(hashes) is list and _all_u64(hashes) else [to_u64(h) for h in hashes]
        new = dict.fromkeys(hs, 1)
        counts = e.counts.setdefault(medium, {})
        masks = self._masks.setdefault(medium, {})
        bit = e.bit
        self.blocks_applied += len(hs)
        if len(new) < len(hs):  # a hash repeated within the event: one copy at a time
            was_held = counts.keys() >= new.keys()
            for h in hs:
                c = counts.get(h, 0)
                counts[h] = c + 1
                if c == 0:
                    masks[h] = masks.get(h, 0) | bit
            return hs, was_held
        if masks.keys().isdisjoint(new):
            # the common case: nobody holds any of them here (so neither does this engine)
            counts.update(new)
            masks.update(dict.fromkeys(hs, bit))
            return hs, False
        add: Sequence[int] = hs
        if counts.keys().isdisjoint(new):
            counts.update(new)
        else:
            held = counts.keys() & new
            # one more copy of each held block, in C (no Python loop per block)
            counts.update(zip(held, map((1).__add__, map(counts.__getitem__, held)), strict=True))
            if len(held) == len(hs):
                return hs, True  # held blocks have their mask bit already
            add = [h for h in hs if h not in held]
            counts.update(dict.fromkeys(add, 1))
        if masks.keys().isdisjoint(add):
            masks.update(dict.fromkeys(add, bit))
        else:  # some held by other engines already
            get = masks.get
            masks.update(zip(add, [get(h, 0) | bit for h in add], strict=True))
        return hs, False

    def _grow_tree(self, e: EngineResidency, ev: BlockStored, hashes: list[int]) -> None:
        """Add the event's blocks the tree does not have yet, as runs.

        The tree is a radix tree of runs. A run is a stretch of consecutive blocks of one
        event that were new to the tree — the event's hashes and token ids (uint32 bytes) and
        the stretch's bounds — keyed by its first block's node key: the parent's hash XOR the
        keyed content key of the block's tokens (both 64-bit; the content key is secret-keyed,
        so no prompt can be crafted to collide with another's node). A walk (``tree_keys``)
        keys only the first block of each run it enters and compares the rest of the run's
        tokens as bytes, so an event costs one XXH3 and two bulk dict updates, whatever its
        length (the per-block tree it replaced cost an XXH3 and two dict entries per block).

        Invariants: every block is in at most one run (``_where``); a block's child in the
        tree either follows it in its run or starts a run keyed at the block — so a walk that
        leaves a run (its end, or a block the prompt does not share) finds the next run by one
        lookup. Blocks stay in the tree after their engines drop them (a walk checks the
        residency's masks, so they are found again only once stored again); ``_sweep``
        reclaims the runs nobody holds a block of.
        """
        n, bs = len(hashes), ev.block_size
        if n == 0 or bs <= 0 or len(ev.token_ids) != n * bs:
            return  # masked or hybrid groups carry no usable token ids
        prev = ev.parent_block_hash
        if prev is None:
            first = ev.extra_keys[0] if ev.extra_keys else None
            parent = self._root(self._groups.get(e.name), bs, first)
        else:
            parent = prev if type(prev) is int else to_u64(prev)
        where, w = self._where, bs * 4
        raw = b""
        if where.keys().isdisjoint(hashes):  # the common case: all new, one run
            raw = array("I", ev.token_ids).tobytes()
            self._place(parent, _Run(hashes, raw, 0, n), w)
        else:  # the new stretches between blocks the tree has (another engine's copies)
            known = list(map(where.__contains__, hashes))
            i = 0
            while i < n:
                i = next(compress(count(i), map(not_, known[i:])), n)  # next new block
                if i == n:
                    break
                j = next(compress(count(i), known[i:]), n)  # the next known one after it
                if not raw:
                    raw = array("I", ev.token_ids).tobytes()
                self._place(hashes[i - 1] if i else parent, _Run(hashes, raw, i, j), w)
                i = j
        if len(where) > 2 * self._kept + self.sweep_slack:
            self._sweep()

    def _place(self, parent: int, run: _Run, w: int) -> None:
        """Key ``run`` under ``parent`` (``w``: bytes per block). A run already at that node
        has the same tokens after the same parent but another hash (an engine that hashes
        differently since a restart): the newest wins."""
        key = parent ^ xxhash.xxh3_64_intdigest(
            run.raw[run.start * w : (run.start + 1) * w], self.secret
        )
        old = self._runs.get(key)
        if old is not None:
            self._unlink(old)
        self._runs[key] = run
        hs = run.hashes
        self._where.update(
            dict.fromkeys(hs if run.end - run.start == len(hs) else hs[run.start : run.end], run)
        )

    def _unlink(self, run: _Run) -> None:
        """Forget the blocks of a run that is no longer keyed."""
        where = self._where
        for h in run.hashes[run.start : run.end]:
            if where.get(h) is run:
                del where[h]

    def _sweep(self) -> None:
        """Drop the runs nobody holds a block of (their blocks would be found only once
        stored again, which adds them anew). The tree at most doubles between sweeps, so a
        sweep costs O(1) per block added."""
        media = list(self._masks.values())
        dead = [
            key
            for key, run in self._runs.items()
            if not any(not m.keys().isdisjoint(run.hashes[run.start : run.end]) for m in media)
        ]
        for key in dead:
            self._unlink(self._runs.pop(key))
        self._kept = len(self._where)

    def _root(self, group: Any, block_size: int, extra: Any) -> int:
        """The tree's parent key of a block 0: one per hash group, block size and block-0
        extra keys (LoRA, cache salt), as a keyed 64-bit value."""
        ident = repr(("root", group, block_size, _freeze(extra))).encode()
        return xxhash.xxh3_64_intdigest(ident, self.secret)

    def tree_keys(
        self, group: Any, block_size: int, root_extra: Any, tokens: Sequence[int]
    ) -> list[int]:
        """Hashes of the leading blocks of ``tokens`` that some engine of ``group`` stored and
        some engine still holds: a walk over the block tree's runs (one XXH3 per run entered,
        the run's other blocks compared as bytes), stopping at the first block nobody holds.
        ``root_extra`` is block 0's untagged event extra keys (e.g. ``[lora_name,
        cache_salt]``) or None."""
        out: list[int] = []
        nb = len(tokens) // block_size
        w = block_size * 4
        prompt = _PromptBytes(tokens, block_size)
        with self._lock:
            runs, secret, media = self._runs, self.secret, list(self._masks.values())
            parent = self._root(group, block_size, root_extra)
            i = 0
            while i < nb:
                block = prompt.upto(i + 1)[i * w : (i + 1) * w]
                run = runs.get(parent ^ xxhash.xxh3_64_intdigest(block, secret))
                if run is None:
                    break
                hs, st = run.hashes, run.start
                m = min(run.end - st, nb - i)
                mine = prompt.upto(i + m)[i * w : (i + m) * w]
                j = _common_blocks(mine, run.raw[st * w : (st + m) * w], w)
                if j == 0:
                    break  # a keyed-hash collision: not this prompt's block
                seg = hs[st : st + j]
                k = _held_prefix(seg, media)
                out += seg[:k]
                if k < j:
                    break
                i += j
                parent = seg[-1]
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
        # the block tree keeps the run (a walk checks the masks; ``_sweep`` reclaims it)
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


class _Run(NamedTuple):
    """Blocks ``start..end`` of one stored event, as the block tree keeps them."""

    hashes: list[int]  # the event's block hashes (u64)
    raw: bytes  # the event's token ids, uint32 little-endian, block after block
    start: int  # the run's first block within the event
    end: int  # one past its last


class _PromptBytes:
    """A prompt's token ids as uint32 bytes, converted as far as a walk reads them (doubling
    chunks: a walk that stops early converts little)."""

    def __init__(self, tokens: Sequence[int], block_size: int) -> None:
        self._tokens, self._bs = tokens, block_size
        self._raw = b""
        self._blocks = 0

    def upto(self, k: int) -> bytes:
        """The bytes of blocks ``[0, k)`` at least."""
        if k > self._blocks:
            k = max(k, 2 * self._blocks, 16)
            bs = self._bs
            self._raw += array("I", self._tokens[self._blocks * bs : k * bs]).tobytes()
            self._blocks = k
        return self._raw


def _common_blocks(a: bytes, b: bytes, w: int) -> int:
    """How many leading ``w``-byte blocks ``a`` and ``b`` (of equal length) share."""
    if a == b:
        return len(a) // w
    lo, hi = 0, len(a) // w  # a[:lo] matches, a[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[: mid * w] == b[: mid * w]:
            lo = mid
        else:
            hi = mid
    return lo


def _held_prefix(hashes: list[int], media: list[dict[int, int]]) -> int:
    """How many leading ``hashes`` some medium holds."""
    if len(media) == 1:
        return len(list(takewhile(media[0].__contains__, hashes)))
    k = 0
    for h in hashes:
        if not any(h in m for m in media):
            break
        k += 1
    return k
