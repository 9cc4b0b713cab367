"""The stores one tenant of the embedded index is made of, each with its invariants.

* :class:`ChainBlocks` — one row per distinct chain hash (the block tree);
* :class:`ContentStore` — one row per distinct block token tuple;
* :class:`OwnerTable` — who indexed what;
* :class:`NearTables` — near-duplicate buckets over the contents;
* :class:`SpanAnchors` — moved-span anchors posted by the chain blocks.

"One value, or a set when shared" is the common shape of their relations (a block's owners,
a content's chain blocks, a block's children, a bucket's contents): :class:`ArrayMultiMap`
keeps it for dense keys with numpy, :func:`mm_add` / :func:`mm_discard` / :func:`mm_values`
for sparse keys in a dict. Ids are dense int32; freed ids are reused (:class:`IdPool`).
"""

from __future__ import annotations

import sys
from bisect import bisect_right
from collections.abc import Callable, Iterable

import numpy as np

from kvforge.blocks.hashing import content_hashes
from kvforge.blocks.sequence import BlockSequence
from kvforge.index.anchors import NEAR_CHUNKS, near_chunk_keys
from kvforge.index.base import OwnerInfo
from kvforge.index.spans import AnchorPostings, SpanBudget, context_base, node_anchors
from kvforge.index.table import U64Table


def grow(arr: np.ndarray, need: int, fill: int = 0) -> np.ndarray:
    if need <= arr.shape[0]:
        return arr
    cap = max(need, arr.shape[0] + arr.shape[0] // 4, 8)  # 1.25x: memory over speed
    out = np.full((cap, *arr.shape[1:]), fill, dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


class IdPool:
    """Dense ids with reuse of freed ones."""

    __slots__ = ("free", "high")

    def __init__(self) -> None:
        self.free: list[int] = []
        self.high = 0

    def take(self, n: int) -> np.ndarray:
        reuse = self.free[-n:] if n else []
        if reuse:
            del self.free[-len(reuse) :]
        fresh = np.arange(self.high, self.high + n - len(reuse), dtype=np.int32)
        self.high += n - len(reuse)
        return np.concatenate([np.asarray(reuse, dtype=np.int32), fresh])

    def give(self, ids: np.ndarray) -> None:
        self.free.extend(ids.tolist())


# ---- "one value, or a set when shared" ------------------------------------------------------
def mm_add(d: dict[int, int | set[int]], key: int, val: int) -> None:
    """Sparse keys: one int, or a set once a key holds several values (most hold one)."""
    cur = d.get(key)
    if cur is None:
        d[key] = val
    elif isinstance(cur, int):
        if cur != val:
            d[key] = {cur, val}
    else:
        cur.add(val)


def mm_discard(d: dict[int, int | set[int]], key: int, val: int) -> None:
    cur = d.get(key)
    if isinstance(cur, set):
        cur.discard(val)
        if len(cur) == 1:
            d[key] = cur.pop()
    elif cur == val:
        del d[key]


def mm_values(cur: int | set[int] | None) -> tuple[int, ...] | set[int]:
    return () if cur is None else (cur,) if isinstance(cur, int) else cur


class ArrayMultiMap:
    """Dense key -> set of ints, for keys that almost always hold one value.

    Invariants: ``first[k]`` is one of ``k``'s values (-1: none); ``k in rest`` exactly when
    it holds two or more, and then ``rest[k]`` is the whole set (``first[k]`` included);
    ``count[k]`` is the size (when ``counted``). Vectorized readers use ``first`` and
    ``count`` directly: the common single-value case never touches the dict."""

    __slots__ = ("count", "counted", "first", "rest")

    def __init__(self, *, counted: bool) -> None:
        self.counted = counted
        self.first = np.zeros(0, dtype=np.int32)
        self.count = np.zeros(0, dtype=np.int32)
        self.rest: dict[int, set[int]] = {}

    def grow(self, need: int) -> None:
        self.first = grow(self.first, need, -1)
        if self.counted:
            self.count = grow(self.count, need)

    def start(self, keys: np.ndarray, val: int | np.ndarray) -> None:
        """New keys holding one value each."""
        self.first[keys] = val
        if self.counted:
            self.count[keys] = 1

    def clear(self, keys: np.ndarray) -> None:
        """Keys that are freed: they hold nothing."""
        self.first[keys] = -1
        if self.counted:
            self.count[keys] = 0
        for k in keys.tolist():
            self.rest.pop(k, None)

    def add(self, key: int, val: int) -> None:
        cur = int(self.first[key])
        if cur < 0:
            self.first[key] = val
        else:
            s = self.rest.get(key)
            if s is None:
                self.rest[key] = {cur, val}
            else:
                s.add(val)
        if self.counted:
            self.count[key] += 1

    def add_all(self, keys: np.ndarray, val: int) -> None:
        """``val`` joins distinct keys that each hold a value already (counts in one step)."""
        first, rest = self.first, self.rest
        for k in keys.tolist():
            s = rest.get(k)
            if s is None:
                rest[k] = {int(first[k]), val}
            else:
                s.add(val)
        if self.counted:
            self.count[keys] += 1

    def discard(self, key: int, val: int) -> None:
        self._drop(key, val)
        if self.counted:
            self.count[key] -= 1

    def discard_all(self, keys: np.ndarray, val: int) -> None:
        """``val`` leaves distinct keys that all hold it (counts in one step)."""
        for k in keys.tolist():
            self._drop(k, val)
        if self.counted:
            self.count[keys] -= 1

    def _drop(self, key: int, val: int) -> None:
        s = self.rest.get(key)
        if s is None:
            if self.first[key] == val:
                self.first[key] = -1
            return
        s.discard(val)
        if len(s) == 1:
            self.first[key] = s.pop()
            del self.rest[key]
        elif self.first[key] == val:
            self.first[key] = next(iter(s))

    def values(self, key: int) -> set[int] | tuple[int, ...]:
        s = self.rest.get(key)
        if s is not None:
            return s
        v = int(self.first[key])
        return () if v < 0 else (v,)

    def nbytes(self) -> int:
        return (
            self.first.nbytes
            + self.count.nbytes
            + sys.getsizeof(self.rest)
            + sum(sys.getsizeof(s) for s in self.rest.values())
        )


# ---- the stores -------------------------------------------------------------------------------
class ChainBlocks:
    """One row per distinct chain hash: u64 key, parent block (a root marker ``-1 - namespace``
    for block 0), content id, depth (block position), owners and children.

    Invariants: a chain hash fixes the whole prefix, so an owner of block ``i`` owns its
    ancestors too — owner sets only shrink along a chain, and a path's freed blocks are its
    suffix. ``table`` maps key -> block id for every live block. A block's children are the
    blocks whose parent it is; ``roots`` holds the block-0s under each namespace marker and
    ``ends`` the owners whose prompt ends at a block."""

    def __init__(self) -> None:
        self.table = U64Table(16)  # small tenants stay small; tables grow by doubling
        self.ids = IdPool()
        self.key = np.zeros(0, dtype=np.uint64)
        self.parent = np.zeros(0, dtype=np.int32)
        self.content = np.zeros(0, dtype=np.int32)
        self.depth = np.zeros(0, dtype=np.int32)
        self.owners = ArrayMultiMap(counted=True)
        self.children = ArrayMultiMap(counted=False)
        self.roots: dict[int, int | set[int]] = {}
        self.ends: dict[int, int | set[int]] = {}
        self.namespaces: dict[tuple[str, str, str], int] = {}

    def __len__(self) -> int:
        return len(self.table)

    def root(self, seq: BlockSequence, *, create: bool = False) -> int | None:
        """Parent marker of a chain's block 0: ``-1 - namespace id`` (salt and LoRA root the
        chain); None for a namespace nobody indexed."""
        ns = self.namespaces.get(seq.namespace)
        if ns is None:
            if not create:
                return None
            ns = self.namespaces[seq.namespace] = len(self.namespaces)
        return -1 - ns

    def take(self, n: int) -> np.ndarray:
        new = self.ids.take(n)
        hi = int(new.max()) + 1
        self.key = grow(self.key, hi)
        self.parent = grow(self.parent, hi, -1)
        self.content = grow(self.content, hi, -1)
        self.depth = grow(self.depth, hi)
        self.owners.grow(hi)
        self.children.grow(hi)
        return new

    def owners_of(self, b: int) -> set[int] | tuple[int, ...]:
        return self.owners.values(b)

    def add_child(self, parent: int, c: int) -> None:
        if parent < 0:
            mm_add(self.roots, parent, c)
        else:
            self.children.add(parent, c)

    def drop_child(self, parent: int, c: int) -> None:
        if parent < 0:
            mm_discard(self.roots, parent, c)
        else:
            self.children.discard(parent, c)

    def children_of(self, b: int) -> list[int]:
        """The chain blocks whose parent is ``b`` (a block id, or a root marker < 0)."""
        if b < 0:
            return list(mm_values(self.roots.get(b)))
        return list(self.children.values(b))

    def heads(self) -> list[int]:
        """Every block 0, of every namespace."""
        out: list[int] = []
        for ns in self.namespaces.values():
            out += mm_values(self.roots.get(-1 - ns))
        return out

    def free(self, blocks: np.ndarray) -> None:
        """Drop a path's freed suffix (no owner left): its keys, owners and children."""
        self.table.delete(self.key[blocks])
        self.owners.clear(blocks)
        self.children.clear(blocks)
        self.ids.give(blocks)

    def nbytes(self) -> int:
        out = sum(a.nbytes for a in (self.key, self.parent, self.content, self.depth))
        out += self.table.nbytes + self.owners.nbytes() + self.children.nbytes()
        for tree in (self.roots, self.ends):
            out += sys.getsizeof(tree) + 64 * len(tree)
            out += sum(sys.getsizeof(v) for v in tree.values() if not isinstance(v, int))
        return out


class ContentStore:
    """One row per distinct block token tuple: the tokens (stored once, whatever the number of
    owners or positions) and the chain blocks that carry it.

    Invariants: ``table`` maps the content key (a pure function of the tokens) -> content id
    for every content some chain block carries; ``blocks.count[c]`` is how many do; a content
    nobody carries is deleted at once."""

    def __init__(self, block_size: int) -> None:
        self.table = U64Table(16)
        self.ids = IdPool()
        self.tokens = np.zeros((0, block_size), dtype=np.uint32)
        self.blocks = ArrayMultiMap(counted=True)

    def __len__(self) -> int:
        return len(self.table)

    def ids_of(self, seq: BlockSequence) -> np.ndarray:
        """Content id per query block, -1 where unknown (token-verified: a 64-bit key
        collision never passes for a match)."""
        cids = self.table.get(seq.content_keys)
        known = np.flatnonzero(cids >= 0)
        if known.size:
            same = (self.tokens[cids[known]] == seq.tokens[known]).all(axis=1)
            cids[known[~same]] = -1
        return cids

    def insert(self, keys: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """New contents (carried by no block yet); returns their ids."""
        new = self.ids.take(keys.size)
        hi = int(new.max()) + 1
        self.tokens = grow(self.tokens, hi)
        self.blocks.grow(hi)
        self.tokens[new] = tokens
        self.blocks.count[new] = 0
        self.table.insert(keys, new)
        return new

    def link(self, c: int, b: int) -> None:
        self.blocks.add(c, b)

    def unlink(self, c: int, b: int) -> bool:
        """Chain block ``b`` no longer carries content ``c``; True when nothing does."""
        self.blocks.discard(c, b)
        return int(self.blocks.count[c]) == 0

    def delete(self, dead: np.ndarray) -> None:
        # content keys are a pure function of the tokens: no need to store them
        self.table.delete(content_hashes(self.tokens[dead]))
        self.ids.give(dead)

    def nbytes(self) -> int:
        return self.tokens.nbytes + self.table.nbytes + self.blocks.nbytes()


class OwnerTable:
    """Names <-> dense ids, and per owner its chain blocks in order and what it indexed.

    Invariants: ``blocks[o]`` is a root-to-node path of :class:`ChainBlocks` (block ``i`` at
    depth ``i``); ``rank[o]`` is the position of ``o``'s name among the live owners' names in
    sorted order (-1 for a free id), so a query orders owners by name with one numpy sort of
    their ids instead of comparing strings (a write pays O(owners) in numpy to keep it)."""

    def __init__(self) -> None:
        self.id: dict[str, int] = {}
        self.name: dict[int, str] = {}
        self.ids = IdPool()
        self.blocks: dict[int, np.ndarray] = {}
        self.info: dict[int, OwnerInfo] = {}
        self.rank = np.full(64, -1, dtype=np.int32)
        self.names = np.full(64, None, dtype=object)  # ``name`` as an array (bulk lookups)
        self._sorted: list[str] = []  # the live owners' names, sorted (ties: older first)

    def __len__(self) -> int:
        return len(self.id)

    @property
    def ranks(self) -> int:
        """How many ranks are taken (``rank`` values are ``0 .. ranks - 1``)."""
        return len(self._sorted)

    def add(self, name: str) -> int:
        oid = int(self.ids.take(1)[0])
        self.id[name] = oid
        self.name[oid] = name
        if oid >= self.rank.size:
            size = max(2 * self.rank.size, oid + 1)
            grown = np.full(size, -1, dtype=np.int32)
            grown[: self.rank.size] = self.rank
            self.rank = grown
            names = np.full(size, None, dtype=object)
            names[: self.names.size] = self.names
            self.names = names
        self.names[oid] = name
        pos = bisect_right(self._sorted, name)
        self._sorted.insert(pos, name)
        r = self.rank
        r[r >= pos] += 1
        r[oid] = pos
        return oid

    def forget(self, oid: int) -> None:
        """The id's name and metadata go (its blocks were removed from the chain already)."""
        name = self.name.pop(oid)
        if self.id.get(name) == oid:
            del self.id[name]
        self.info.pop(oid, None)
        self.blocks.pop(oid, None)
        r = self.rank
        pos = int(r[oid])
        del self._sorted[pos]
        r[oid] = -1
        r[r > pos] -= 1
        self.names[oid] = None
        self.ids.give(np.asarray([oid], dtype=np.int32))

    def nbytes(self) -> int:
        return sum(a.nbytes + 112 for a in self.blocks.values())


class NearTables:
    """Near-duplicate buckets: per chunk of a block (``NEAR_CHUNKS``), chunk key -> the contents
    holding it ("one int, or a set when shared"); shared buckets as arrays, built by queries
    and dropped by any write to the bucket.

    Invariant: every live content is in exactly its ``NEAR_CHUNKS`` buckets."""

    def __init__(self) -> None:
        self.tables: list[dict[int, int | set[int]]] = [{} for _ in range(NEAR_CHUNKS)]
        self.arrays: list[dict[int, np.ndarray]] = [{} for _ in range(NEAR_CHUNKS)]

    def add(self, cids: np.ndarray, tokens: np.ndarray) -> None:
        """New contents ``cids`` (their ``tokens``) join their buckets."""
        self._change(cids, tokens, mm_add)

    def remove(self, cids: np.ndarray, tokens: np.ndarray) -> None:
        self._change(cids, tokens, mm_discard)

    def _change(
        self,
        cids: np.ndarray,
        tokens: np.ndarray,
        change: Callable[[dict[int, int | set[int]], int, int], None],
    ) -> None:
        keys = near_chunk_keys(tokens).tolist()
        for cid, row in zip(cids.tolist(), keys, strict=True):
            for table, cache, key in zip(self.tables, self.arrays, row, strict=True):
                change(table, key, cid)
                cache.pop(key, None)

    def candidates(self, cols: Iterable[list[int]], need: int) -> tuple[np.ndarray, np.ndarray]:
        """(query row, content id) pairs found in at least ``need`` of a query block's
        buckets; ``cols`` holds, per chunk, every query block's chunk key. Buckets are
        arrays, counted at once."""
        parts: list[np.ndarray] = []
        part_rows: list[int] = []
        single_rows: list[int] = []
        singles: list[int] = []
        for table, cache, col in zip(self.tables, self.arrays, cols, strict=True):
            present = table.keys() & col  # one C-level pass; most chunks are in no bucket
            if not present:
                continue
            for j in [j for j, k in enumerate(col) if k in present]:
                cur = table[col[j]]
                if isinstance(cur, int):
                    single_rows.append(j)
                    singles.append(cur)
                    continue
                key = col[j]
                arr = cache.get(key)
                if arr is None:
                    arr = cache[key] = np.fromiter(cur, dtype=np.int64, count=len(cur))
                parts.append(arr)
                part_rows.append(j)
        z = np.zeros(0, dtype=np.int64)
        if not parts and not singles:
            return z, z
        sizes = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
        rows = np.concatenate(
            [
                np.repeat(np.asarray(part_rows, dtype=np.int64), sizes),
                np.asarray(single_rows, dtype=np.int64),
            ]
        )
        cands = np.concatenate([*parts, np.asarray(singles, dtype=np.int64)])
        uniq, counts = np.unique((rows << 32) | cands, return_counts=True)
        uniq = uniq[counts >= need]
        return uniq >> 32, uniq & 0xFFFFFFFF

    def nbytes(self) -> int:
        out = 0
        for table in self.tables:
            # int keys and values (~32 B each) plus the sets of shared keys
            out += sys.getsizeof(table) + 64 * len(table)
            out += sum(sys.getsizeof(v) for v in table.values() if not isinstance(v, int))
        return out


class SpanAnchors:
    """Moved-span anchors: anchor hash -> packed (chain block << 32 | token position), posted
    by the chain blocks whose tokens they cover (bounded per hash: ``budget.max_postings``).

    Invariant: a block's anchors are posted while it lives; they depend on the tokens from
    ``base(first)`` on, which is why a path's change re-posts from there."""

    def __init__(self, block_size: int, budget: SpanBudget) -> None:
        self.bs = block_size
        self.budget = budget
        self.postings = AnchorPostings(budget.max_postings)

    def base(self, first: int) -> int:
        """First block whose tokens the anchors of blocks ``>= first`` depend on."""
        return context_base(first, self.bs)

    def post(
        self, bids: np.ndarray, first: int, tokens: np.ndarray, base: int, *, add: bool
    ) -> None:
        """Add (or remove) the anchors posted by blocks ``bids[first:]`` of a path; ``tokens``
        are its blocks' tokens from block ``base`` on."""
        hashes, pos, end = node_anchors(tokens.ravel(), base, first, self.bs)
        if hashes.size == 0:
            return
        packed = (bids[end].astype(np.int64) << 32) | pos
        if add:
            self.postings.add(hashes.tolist(), packed.tolist())
        else:
            self.postings.remove(hashes.tolist(), packed.tolist())

    def nbytes(self) -> int:
        return self.postings.nbytes()
