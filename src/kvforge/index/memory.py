"""The embedded default backend: compact numpy arrays per tenant.

Layout of one tenant (all ids are dense int32, freed ids are reused):

* **chain blocks** — one row per distinct chain hash: u64 key, parent block, content id,
  depth (block position), first owner, owner count. ``chain`` maps key → block id.
  Owners of a block are ``{first owner}`` or, when shared, a set in ``_block_owners``.
  Because a chain hash fixes the whole prefix, an owner holding block ``i`` holds its
  ancestors too: owner sets only shrink along a chain, which lookups exploit.
* **contents** — one row per distinct block token tuple: u64 content key, the tokens (stored
  once, whatever the number of owners or positions), and the chain blocks that carry it.
* **owners** — name ↔ id, and per owner an int32 array of its chain blocks in order.

A chain match is accepted only when the key, the parent block and the (token-verified)
content all agree, so a 64-bit key collision can never produce a false "exact".
"""

from __future__ import annotations

import sys
import threading
from bisect import bisect_right
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from kvforge.blocks.hashing import content_hashes
from kvforge.blocks.sequence import BlockSequence
from kvforge.errors import HashCollisionError
from kvforge.index.anchors import MAX_NEAR_RADIUS, NEAR_CHUNKS, near_chunk_keys
from kvforge.index.base import (
    MAX_SOURCES,
    PREFIX_ONLY,
    BlockIndex,
    IndexStats,
    LookupOptions,
    LookupResult,
    NearHit,
    OwnerInfo,
    OwnerRecord,
    PutResult,
    SharedSpan,
    is_excluded,
)
from kvforge.index.spans import (
    AnchorPostings,
    SpanBudget,
    SpanSearch,
    context_base,
    node_anchors,
)
from kvforge.index.table import U64Table


def _grow(arr: np.ndarray, need: int, fill: int = 0) -> np.ndarray:
    if need <= arr.shape[0]:
        return arr
    cap = max(need, arr.shape[0] + arr.shape[0] // 4, 8)  # 1.25x: memory over speed
    out = np.full((cap, *arr.shape[1:]), fill, dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


class _IdPool:
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


def _mm_add(d: dict[int, int | set[int]], key: int, val: int) -> None:
    """Multi-map kept as one int, or a set once a key holds several values (most hold one)."""
    cur = d.get(key)
    if cur is None:
        d[key] = val
    elif isinstance(cur, int):
        d[key] = {cur, val}
    else:
        cur.add(val)


def _mm_discard(d: dict[int, int | set[int]], key: int, val: int) -> None:
    cur = d.get(key)
    if isinstance(cur, set):
        cur.discard(val)
        if len(cur) == 1:
            d[key] = cur.pop()
    elif cur == val:
        del d[key]


def _mm_values(cur: int | set[int] | None) -> tuple[int, ...] | set[int]:
    return () if cur is None else (cur,) if isinstance(cur, int) else cur


class _Tenant:
    def __init__(self, block_size: int, budget: SpanBudget | None = None) -> None:
        budget = budget or SpanBudget()
        self.lock = threading.Lock()
        self.bs = block_size
        self.chain = U64Table(16)  # small tenants stay small; tables grow by doubling
        self.content = U64Table(16)
        # chain blocks
        self.b_ids = _IdPool()
        self.b_key = np.zeros(0, dtype=np.uint64)
        self.b_parent = np.zeros(0, dtype=np.int32)
        self.b_content = np.zeros(0, dtype=np.int32)
        self.b_depth = np.zeros(0, dtype=np.int32)
        self.b_owner = np.zeros(0, dtype=np.int32)
        self.b_nown = np.zeros(0, dtype=np.int32)
        self.block_owners: dict[int, set[int]] = {}
        self.namespaces: dict[tuple[str, str, str], int] = {}
        self.version = 0  # bumped by every write; invalidates ``_owner_cache``
        self._owner_cache: dict[int, tuple[int, set[int], list[tuple[str, int]]]] = {}
        # contents
        self.c_ids = _IdPool()
        self.c_tokens = np.zeros((0, block_size), dtype=np.uint32)
        self.c_refs = np.zeros(0, dtype=np.int32)
        self.c_block = np.zeros(0, dtype=np.int32)
        self.content_blocks: dict[int, set[int]] = {}
        # near-duplicates: per chunk, chunk key -> content id (or a set of them)
        self.near: list[dict[int, int | set[int]]] = [{} for _ in range(NEAR_CHUNKS)]
        # shared buckets as arrays, built by queries, dropped by writes to the bucket
        self.near_arrays: list[dict[int, np.ndarray]] = [{} for _ in range(NEAR_CHUNKS)]
        # moved spans: anchor hash -> packed (chain block << 32 | token position)
        self.postings = AnchorPostings(budget.max_postings)
        self.budget = budget
        # The block tree downwards: ``b_child`` holds each block's first child (-1: none; 4 B
        # a block), ``more_children`` the others of the few blocks where prompts branch, and
        # ``root_children`` the block-0s under each namespace's negative marker; ``ends`` the
        # owners whose prompt ends at a block ("one int, or a set when shared").
        self.b_child = np.zeros(0, dtype=np.int32)
        self.more_children: dict[int, int | set[int]] = {}
        self.root_children: dict[int, int | set[int]] = {}
        self.ends: dict[int, int | set[int]] = {}
        # owners
        self.owner_id: dict[str, int] = {}
        self.owner_name: dict[int, str] = {}
        self.o_ids = _IdPool()
        self.owner_blocks: dict[int, np.ndarray] = {}
        self.owner_info: dict[int, OwnerInfo] = {}

    # ---- helpers ------------------------------------------------------------------------
    def owners_of(self, b: int) -> set[int] | tuple[int]:
        s = self.block_owners.get(b)
        return s if s is not None else (int(self.b_owner[b]),)

    def _content_ids(self, seq: BlockSequence) -> np.ndarray:
        """Content id per query block, -1 where unknown (token-verified)."""
        cids = self.content.get(seq.content_keys)
        known = np.flatnonzero(cids >= 0)
        if known.size:
            same = (self.c_tokens[cids[known]] == seq.tokens[known]).all(axis=1)
            cids[known[~same]] = -1
        return cids

    def _root(self, seq: BlockSequence, *, create: bool = False) -> int | None:
        """Parent marker of a chain's block 0: ``-1 - namespace id`` (salt and LoRA root the
        chain); None for a namespace nobody indexed."""
        ns = self.namespaces.get(seq.namespace)
        if ns is None:
            if not create:
                return None
            ns = self.namespaces[seq.namespace] = len(self.namespaces)
        return -1 - ns

    def _chain_prefix(self, seq: BlockSequence, cids: np.ndarray) -> tuple[np.ndarray, int]:
        """Block id of every query block by chain hash, and how many leading ones are verified
        (key, parent and content agree). Hashes the whole query: used when indexing."""
        n = seq.num_blocks
        bids = self.chain.get(seq.chain_keys) if len(self.chain) else np.full(n, -1, np.int32)
        root = self._root(seq)
        if n == 0 or root is None or len(self.chain) == 0:
            return bids, 0
        ok = bids >= 0
        g = np.where(ok, bids, 0)
        parent = np.empty(n, dtype=np.int32)
        parent[0] = root
        parent[1:] = bids[:-1]
        ok &= (self.b_content[g] == cids) & (cids >= 0) & (self.b_parent[g] == parent)
        bad = np.flatnonzero(~ok)
        return bids, int(bad[0]) if bad.size else n

    def _walk(self, seq: BlockSequence, cids: np.ndarray) -> tuple[np.ndarray, int]:
        """The query's verified chain prefix, found by walking the block tree (parent, content)
        instead of hashing: a chain hash is a function of the root and the blocks' tokens, so
        "block i's child with content c" is the same question, answered without sha256.

        Vectorized for contents that sit in a single chain block (the common case); a content
        held by several chains is resolved by scanning them, or, when more than 32 hold it
        (repeated content), by hashing the rest of the query once and verifying it by key."""
        n = seq.num_blocks
        bids = np.full(n, -1, dtype=np.int32)
        root = self._root(seq)
        if n == 0 or root is None or len(self.chain) == 0:
            return bids, 0
        known = cids >= 0
        cand = np.where(known, self.c_block[np.where(known, cids, 0)], 0)
        depth_ok = known & (self.b_depth[cand] == np.arange(n, dtype=np.int32))
        i, prev = 0, root
        while i < n:
            seg = cand[i:]
            parents = np.empty(n - i, dtype=np.int32)
            parents[0] = prev
            parents[1:] = seg[:-1]
            ok = depth_ok[i:] & (self.b_parent[seg] == parents)
            run = int(np.argmin(ok)) if not ok.all() else n - i
            bids[i : i + run] = seg[:run]
            i += run
            if i == n:
                break
            prev = int(bids[i - 1]) if i else root
            c = int(cids[i])
            if c >= 0 and len(self.content_blocks.get(c, ())) > 32:
                # repeated content (held by many chains): hash the rest of the query once and
                # verify it in one vectorized pass, rather than one probe per block
                return bids, self._hashed_rest(seq, cids, bids, i, prev)
            b = self._child(prev, c)
            if b < 0:
                break
            bids[i] = b
            prev = b
            i += 1
        return bids, i

    def _hashed_rest(
        self, seq: BlockSequence, cids: np.ndarray, bids: np.ndarray, i: int, prev: int
    ) -> int:
        """Verify blocks ``[i, n)`` by chain key (key, parent and content agree); fills
        ``bids`` and returns the verified prefix length."""
        got = self.chain.get(seq.chain_keys[i:])
        g = np.where(got >= 0, got, 0)
        parents = np.empty(got.size, dtype=np.int32)
        parents[0] = prev
        parents[1:] = got[:-1]
        ok = (got >= 0) & (cids[i:] >= 0) & (self.b_content[g] == cids[i:])
        ok &= self.b_parent[g] == parents
        run = int(np.argmin(ok)) if not ok.all() else got.size
        bids[i : i + run] = got[:run]
        return i + run

    def _child(self, parent: int, c: int) -> int:
        """The chain block under ``parent`` whose content is ``c``, or -1 (``c`` is held by at
        most 32 chain blocks: ``_walk`` hashes the rest of the query past that)."""
        if c < 0:
            return -1
        blocks = self.content_blocks.get(c)
        if blocks is None:  # one chain block holds it; the vectorized pass already refused it
            return -1
        for b in blocks:
            if self.b_parent[b] == parent:
                return b
        return -1

    # ---- mutation -----------------------------------------------------------------------
    def validate(self, seq: BlockSequence) -> None:
        """Raise before any mutation if ``seq`` collides with stored keys."""
        keys, first = np.unique(seq.content_keys, return_index=True)
        if keys.size != seq.content_keys.size:
            _, inv = np.unique(seq.content_keys, return_inverse=True)
            if not (seq.tokens == seq.tokens[first][inv]).all():
                raise HashCollisionError("two different blocks of one prompt share a content key")
        cids = self.content.get(seq.content_keys)
        known = np.flatnonzero(cids >= 0)
        if known.size and not (self.c_tokens[cids[known]] == seq.tokens[known]).all():
            raise HashCollisionError("a block's content key collides with a stored block")
        if np.unique(seq.chain_keys).size != seq.chain_keys.size:
            raise HashCollisionError("two blocks of one prompt share a chain key")
        bids, k = self._chain_prefix(seq, cids)
        if (bids[k:] >= 0).any():
            raise HashCollisionError("a chain key collides with a stored block of another prefix")

    def put(self, oid: int, seq: BlockSequence) -> tuple[int, int]:
        self.version += 1
        self._owner_cache.clear()
        n = seq.num_blocks
        # contents: one row per distinct token tuple
        ukeys, first, inv = np.unique(seq.content_keys, return_index=True, return_inverse=True)
        ucids = self.content.get(ukeys)
        missing = np.flatnonzero(ucids < 0)
        if missing.size:
            new = self.c_ids.take(missing.size)
            hi = int(new.max()) + 1
            self.c_tokens = _grow(self.c_tokens, hi)
            self.c_refs = _grow(self.c_refs, hi)
            self.c_block = _grow(self.c_block, hi, -1)
            self.c_tokens[new] = seq.tokens[first[missing]]
            self.c_refs[new] = 0
            self.content.insert(ukeys[missing], new)
            ucids[missing] = new
            self._near_add(new)
        cids = ucids[inv].astype(np.int32)
        # chain: the held prefix gains an owner, the rest are new blocks
        root = self._root(seq, create=True)
        bids, k = self._chain_prefix(seq, cids)
        shared = bids[:k]
        for b in shared.tolist():
            s = self.block_owners.get(b)
            if s is None:
                self.block_owners[b] = {int(self.b_owner[b]), oid}
            else:
                s.add(oid)
        self.b_nown[shared] += 1
        if k < n:
            new = self.b_ids.take(n - k)
            hi = int(new.max()) + 1
            self.b_key = _grow(self.b_key, hi)
            self.b_parent = _grow(self.b_parent, hi, -1)
            self.b_content = _grow(self.b_content, hi, -1)
            self.b_depth = _grow(self.b_depth, hi)
            self.b_owner = _grow(self.b_owner, hi, -1)
            self.b_nown = _grow(self.b_nown, hi)
            self.b_child = _grow(self.b_child, hi, -1)
            self.b_key[new] = seq.chain_keys[k:]
            parents = np.empty(n - k, dtype=np.int32)
            assert root is not None  # created above
            parents[0] = bids[k - 1] if k else root
            parents[1:] = new[:-1]
            self.b_parent[new] = parents
            self.b_content[new] = cids[k:]
            self.b_depth[new] = np.arange(k, n, dtype=np.int32)
            self.b_owner[new] = oid
            self.b_nown[new] = 1
            self.chain.insert(seq.chain_keys[k:], new)
            for c, b in zip(cids[k:].tolist(), new.tolist(), strict=True):
                self._link_content(c, b)
            self.b_child[new] = -1
            self.b_child[new[:-1]] = new[1:]  # a new suffix is a chain: each its next's parent
            self._add_child(int(parents[0]), int(new[0]))
            bids = np.concatenate([shared, new]).astype(np.int32)
            base = self._post_base(k)
            self._post(bids, k, seq.tokens[base:], base, add=True)
        self.owner_blocks[oid] = bids.astype(np.int32)
        if n:
            _mm_add(self.ends, int(bids[-1]), oid)
        return n - k, k

    def _post_base(self, first: int) -> int:
        """First block whose tokens the anchors of blocks ``>= first`` depend on."""
        return context_base(first, self.bs)

    def _post(
        self, bids: np.ndarray, first: int, tokens: np.ndarray, base: int, *, add: bool
    ) -> None:
        """Add (or remove) the anchors posted by blocks ``bids[first:]`` of a path; ``tokens``
        are its blocks' tokens from block ``base = _post_base(first)`` on."""
        hashes, pos, end = node_anchors(tokens.ravel(), base, first, self.bs)
        if hashes.size == 0:
            return
        packed = (bids[end].astype(np.int64) << 32) | pos
        if add:
            self.postings.add(hashes.tolist(), packed.tolist())
        else:
            self.postings.remove(hashes.tolist(), packed.tolist())

    def _add_child(self, parent: int, c: int) -> None:
        if parent < 0:
            _mm_add(self.root_children, parent, c)
        elif self.b_child[parent] < 0:
            self.b_child[parent] = c
        else:
            _mm_add(self.more_children, parent, c)

    def _drop_child(self, parent: int, c: int) -> None:
        if parent < 0:
            _mm_discard(self.root_children, parent, c)
        elif self.b_child[parent] == c:  # promote another child, if any
            more = self.more_children.get(parent)
            if more is None:
                self.b_child[parent] = -1
            elif isinstance(more, int):
                self.b_child[parent] = more
                del self.more_children[parent]
            else:
                nxt = more.pop()
                self.b_child[parent] = nxt
                if len(more) == 1:
                    self.more_children[parent] = more.pop()
        else:
            _mm_discard(self.more_children, parent, c)

    def children_of(self, b: int) -> list[int]:
        """The chain blocks whose parent is ``b`` (a block id, or a root marker < 0)."""
        if b < 0:
            return list(_mm_values(self.root_children.get(b)))
        first = int(self.b_child[b])
        if first < 0:
            return []
        more = self.more_children.get(b)
        return [first] if more is None else [first, *_mm_values(more)]

    def _leaving_along(self, chain: list[int], points: list[int]) -> list[list[int]]:
        """Per change point ``i`` of the chain: ids of the owners through ``chain[i]`` that do
        not continue into ``chain[i + 1]`` (their prompt ends there, or goes into another
        child). The children of all points are gathered in C (``list.extend``) and classified
        in one vectorized pass: O(points) Python steps plus O(owners) in numpy."""
        ends, more, bo = self.ends, self.more_children, self.block_owners
        out: list[list[int]] = []
        kids: list[int] = []
        counts: list[int] = []
        firsts = self.b_child[[chain[i] for i in points]].tolist() if points else []
        for i, first in zip(points, firsts, strict=True):
            b = chain[i]
            got = ends.get(b)
            out.append([] if got is None else [got] if isinstance(got, int) else list(got))
            n0 = len(kids)
            if first >= 0:
                kids.append(first)
                m = more.get(b)
                if isinstance(m, int):
                    kids.append(m)
                elif m is not None:
                    kids.extend(m)
            counts.append(len(kids) - n0)
        if not kids:
            return out
        k_arr = np.asarray(kids, dtype=np.int64)
        point = np.repeat(np.arange(len(points)), counts)
        stay = np.asarray([chain[i + 1] for i in points], dtype=np.int64)[point]
        keep = k_arr != stay
        single = self.b_nown[k_arr] == 1
        sel = keep & single
        sp = point[sel]  # grouped by point: kids were gathered in point order
        owners = self.b_owner[k_arr[sel]].tolist()
        bounds = np.searchsorted(sp, np.arange(len(points) + 1)).tolist()
        for k in range(len(points)):
            lo, hi = bounds[k], bounds[k + 1]
            if hi > lo:
                out[k] += owners[lo:hi]
        shared = keep & ~single  # children several owners go through (rare here)
        for c, k in zip(k_arr[shared].tolist(), point[shared].tolist(), strict=True):
            out[k] += bo[c]
        return out

    def leaving(self, b: int, stay: int) -> tuple[list[int], list[int]]:
        """Owners through block ``b`` that do not continue into its child ``stay``: those whose
        prompt ends at ``b``, and the other children that the rest continue into."""
        ends = list(_mm_values(self.ends.get(b)))
        kids = [c for c in self.children_of(b) if c != stay]
        return ends, kids

    def _link_content(self, c: int, b: int) -> None:
        refs = int(self.c_refs[c])
        if refs == 0:
            self.c_block[c] = b
        elif refs == 1:
            self.content_blocks[c] = {int(self.c_block[c]), b}
        else:
            self.content_blocks[c].add(b)
        self.c_refs[c] = refs + 1

    def _unlink_content(self, c: int, b: int) -> bool:
        """Drop block ``b`` from content ``c``; True when the content is now unused."""
        refs = int(self.c_refs[c]) - 1
        self.c_refs[c] = refs
        if refs == 0:
            return True
        s = self.content_blocks[c]
        s.discard(b)
        if refs == 1:
            self.c_block[c] = s.pop()
            del self.content_blocks[c]
        elif self.c_block[c] == b:
            self.c_block[c] = next(iter(s))
        return False

    def remove(self, oid: int) -> int:
        self.version += 1
        self._owner_cache.clear()
        bids = self.owner_blocks.pop(oid)
        if bids.size:
            _mm_discard(self.ends, int(bids[-1]), oid)
        for b in bids.tolist():
            s = self.block_owners.get(b)
            if s is None:
                continue
            s.discard(oid)
            if len(s) == 1:
                self.b_owner[b] = s.pop()
                del self.block_owners[b]
            elif self.b_owner[b] == oid:
                self.b_owner[b] = next(iter(s))
        self.b_nown[bids] -= 1
        freed = bids[self.b_nown[bids] == 0]
        if freed.size:
            # owner sets shrink along a chain: the freed blocks are the path's suffix
            first = bids.size - freed.size
            base = self._post_base(first)
            self._post(bids, first, self.c_tokens[self.b_content[bids[base:]]], base, add=False)
            self._drop_child(int(self.b_parent[freed[0]]), int(freed[0]))
            self.b_child[freed] = -1  # the rest of the suffix goes with it
            for b in freed.tolist():
                self.more_children.pop(b, None)
            self.chain.delete(self.b_key[freed])
            dead = [
                c
                for c, b in zip(self.b_content[freed].tolist(), freed.tolist(), strict=True)
                if self._unlink_content(c, b)
            ]
            if dead:
                d = np.asarray(dead, dtype=np.int32)
                # content keys are a pure function of the tokens: no need to store them
                self.content.delete(content_hashes(self.c_tokens[d]))
                self._near_remove(d)
                self.c_ids.give(d)
            self.b_owner[freed] = -1
            self.b_ids.give(freed)
        return int(bids.size)

    def _sorted_owners(self, b: int) -> tuple[set[int], list[tuple[str, int]]]:
        """Owner ids of block ``b`` and (name, id) pairs sorted by name. Cached for widely
        shared blocks (a system prompt held by thousands of agents) until the next write."""
        hit = self._owner_cache.get(b)
        if hit is not None and hit[0] == self.version:
            return hit[1], hit[2]
        cur = set(self.owners_of(b))
        names = self.owner_name
        by_name = sorted((names[o], o) for o in cur)
        if len(cur) >= 32:
            self._owner_cache[b] = (self.version, cur, by_name)
        return cur, by_name

    def _near_add(self, cids: np.ndarray) -> None:
        keys = near_chunk_keys(self.c_tokens[cids]).tolist()
        for cid, row in zip(cids.tolist(), keys, strict=True):
            for table, cache, key in zip(self.near, self.near_arrays, row, strict=True):
                _mm_add(table, key, cid)
                cache.pop(key, None)

    def _near_remove(self, cids: np.ndarray) -> None:
        keys = near_chunk_keys(self.c_tokens[cids]).tolist()
        for cid, row in zip(cids.tolist(), keys, strict=True):
            for table, cache, key in zip(self.near, self.near_arrays, row, strict=True):
                _mm_discard(table, key, cid)
                cache.pop(key, None)

    def closest_owner(self, first_block: np.ndarray, exclude: str | None) -> str | None:
        """The owner whose block 0 shares the longest token prefix with ``first_block``; ties
        to the smallest name. Compares the distinct block-0 contents (the roots' children),
        not every owner."""
        heads: list[int] = []
        for ns in self.namespaces.values():
            heads += _mm_values(self.root_children.get(-1 - ns))
        if not heads:
            return None
        h = np.asarray(heads, dtype=np.int64)
        same = self.c_tokens[self.b_content[h]] == np.asarray(first_block, dtype=np.uint32)
        lcp = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
        names = self.owner_name
        for best in sorted(set(lcp.tolist()), reverse=True):
            if best == 0:
                return None
            found = [
                names[o]
                for b in h[lcp == best].tolist()
                for o in self.owners_of(b)
                if not is_excluded(names[o], exclude)
            ]
            if found:
                return min(found)
        return None

    def owner_tokens(self, oid: int) -> np.ndarray:
        """The owner's indexed tokens (its full blocks), rebuilt from the content store."""
        out: np.ndarray = self.c_tokens[self.b_content[self.owner_blocks[oid]]].ravel()
        return out

    # ---- query --------------------------------------------------------------------------
    def lookup(
        self, seq: BlockSequence, exclude: str | None, near_radius: int = 0, spans: bool = False
    ) -> LookupResult:
        n = seq.num_blocks
        if n == 0 or not self.owner_blocks:
            found, cut = self._spans(seq, exclude) if spans and self.owner_blocks else ([], False)
            return LookupResult(0, {}, [], spans=found, truncated=cut)
        cids = self._content_ids(seq)
        bids, deep = self._walk(seq, cids)
        chain_b = bids[:deep]
        depth: dict[str, int] = {}
        runs: list[tuple[int, int, tuple[str, ...]]] = []
        if deep:
            # Owner sets shrink along the chain and change only where the owner count changes.
            # The owners whose prefix stops at block i are those of block i that do not go on
            # into block i+1: found through the tree's children and ends, so each owner costs
            # O(1) once, however many change points there are. Walking the change points from
            # the deepest one, ``order`` comes out sorted by decreasing depth (names sorted
            # within).
            nown = self.b_nown[chain_b]
            cps = [*np.flatnonzero(nown[:-1] != nown[1:]).tolist(), deep - 1]
            names = self.owner_name
            order: list[str] = []
            neg_depths: list[int] = []  # ascending, for bisect
            chain_l = chain_b.tolist()
            leaving = self._leaving_along(chain_l, cps[:-1])
            for k in range(len(cps) - 1, -1, -1):
                i = cps[k]
                if i == deep - 1:
                    fresh = [n for n, _ in self._sorted_owners(chain_l[i])[1]]
                else:
                    fresh = sorted(map(names.__getitem__, leaving[k]))
                if exclude is not None:
                    fresh = [n for n in fresh if not is_excluded(n, exclude)]
                if fresh:
                    depth.update(dict.fromkeys(fresh, i + 1))
                    order += fresh
                    neg_depths += [-(i + 1)] * len(fresh)
            # Runs of identical owner sets: the owners of blocks [.., end) are those whose depth
            # is >= end, i.e. a prefix of ``order``.
            start = 0
            last_m = -1
            for i in cps:
                end = i + 1
                m = bisect_right(neg_depths, -end)
                if m:
                    # the same prefix of ``order`` as the run before (and adjacent): extend it
                    if m == last_m and runs and runs[-1][1] == start:
                        runs[-1] = (runs[-1][0], end, runs[-1][2])
                    else:
                        runs.append((start, end, tuple(order[:m])))
                    last_m = m
                else:
                    last_m = -1
                start = end
        exact = max(depth.values(), default=0)
        moved = self._moved(cids, exact, exclude)
        near = self._near(seq, exact, moved, exclude, near_radius) if near_radius > 0 else {}
        found, cut = self._spans(seq, exclude, chain_b) if spans else ([], False)
        return LookupResult(exact, depth, runs, moved, deep, near, found, truncated=cut)

    def _near(
        self,
        seq: BlockSequence,
        exact: int,
        moved: dict[int, Any],
        exclude: str | None,
        radius: int,
    ) -> dict[int, NearHit]:
        """Closest indexed content within ``radius`` differing tokens, for the blocks that are
        neither exact nor moved. Exact: every content within the radius shares a chunk key with
        the query block (pigeonhole), and candidates are checked against the stored tokens."""
        radius = min(radius, MAX_NEAR_RADIUS)
        todo = [i for i in range(exact, seq.num_blocks) if i not in moved]
        if not todo:
            return {}
        keys = near_chunk_keys(seq.tokens[todo]).T.tolist()
        # Pigeonhole, sharpened: a block within distance r differs in at most r positions, so
        # at least NEAR_CHUNKS - r of its chunks are intact — a candidate must appear in that
        # many of the query block's buckets (exact, and it prunes the common chunks of real
        # text: indentation, punctuation, stop words). Buckets are arrays, counted at once.
        need = NEAR_CHUNKS - radius
        parts: list[np.ndarray] = []
        part_rows: list[int] = []
        single_rows: list[int] = []
        singles: list[int] = []
        for table, cache, col in zip(self.near, self.near_arrays, keys, strict=True):
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
        if not parts and not singles:
            return {}
        sizes = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
        rows = np.concatenate(
            [
                np.repeat(np.asarray(part_rows, dtype=np.int64), sizes),
                np.asarray(single_rows, dtype=np.int64),
            ]
        )
        cands = np.concatenate([*parts, np.asarray(singles, dtype=np.int64)])
        packed = (rows << 32) | cands
        uniq, counts = np.unique(packed, return_counts=True)
        uniq = uniq[counts >= need]
        if uniq.size == 0:
            return {}
        qi = np.asarray(todo, dtype=np.int64)[uniq >> 32]
        ci = uniq & 0xFFFFFFFF
        diff = self.c_tokens[ci] != seq.tokens[qi]
        dist = diff.sum(axis=1)
        ok = np.flatnonzero((dist > 0) & (dist <= radius))
        # closest first, then smallest content id: deterministic
        order = ok[np.lexsort((ci[ok], dist[ok], qi[ok]))]
        out: dict[int, NearHit] = {}
        for j in order.tolist():
            i = int(qi[j])
            if i in out:
                continue
            hit = self._moved_slow(int(ci[j]), exclude)
            if hit is None:
                continue
            out[i] = NearHit(
                owners=hit[0],
                sources=hit[1],
                distance=int(dist[j]),
                positions=tuple(np.flatnonzero(diff[j]).tolist()),
                tokens=tuple(self.c_tokens[ci[j]].tolist()),
            )
        return out

    def _spans(
        self,
        seq: BlockSequence,
        exclude: str | None,
        chain: np.ndarray | None = None,
    ) -> tuple[list[SharedSpan], bool]:
        """Maximal shared token runs of at least ``GUARANTEED_SPAN`` tokens with every
        owner, at any alignment, within the span budget: (spans, truncated). See ``spans``."""
        chain = np.zeros(0, dtype=np.int32) if chain is None else chain
        search = SpanSearch(self, seq.all_tokens, chain, self._root(seq), exclude, self.budget)
        return search.run(), search.truncated

    def _moved(
        self, cids: np.ndarray, exact: int, exclude: str | None
    ) -> dict[int, tuple[tuple[str, ...], tuple[tuple[str, int], ...]]]:
        out: dict[int, tuple[tuple[str, ...], tuple[tuple[str, int], ...]]] = {}
        idx = np.flatnonzero(cids[exact:] >= 0) + exact
        if idx.size == 0:
            return out
        c = cids[idx]
        # Common case, vectorized: the content sits in one chain block held by one owner.
        blk = self.c_block[c]
        simple = (self.c_refs[c] == 1) & (self.b_nown[blk] == 1)
        names = self.owner_name
        memo: dict[object, tuple[tuple[str, ...], tuple[tuple[str, int], ...]] | None] = {}
        for i, ci, is_simple, o, d in zip(
            idx.tolist(),
            c.tolist(),
            simple.tolist(),
            self.b_owner[blk].tolist(),
            self.b_depth[blk].tolist(),
            strict=True,
        ):
            if is_simple:
                key: object = (o, d)
                if key not in memo:
                    name = names[o]
                    memo[key] = None if is_excluded(name, exclude) else ((name,), ((name, d),))
            else:
                key = ci
                if key not in memo:
                    memo[key] = self._moved_slow(ci, exclude)
            hit = memo[key]
            if hit is not None:
                out[i] = hit
        return out

    def _moved_slow(
        self, c: int, exclude: str | None
    ) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]] | None:
        names = self.owner_name
        blocks = self.content_blocks.get(c) or (int(self.c_block[c]),)
        # owner ids by set union (C-level), names once per distinct owner; the first
        # MAX_SOURCES (owner, position) pairs in block order, as before
        ids: set[int] = set()
        sources: list[tuple[str, int]] = []
        for b in blocks:
            got = self.owners_of(b)
            ids.update(got)
            if len(sources) < MAX_SOURCES:
                d = int(self.b_depth[b])
                for o in got:
                    name = names[o]
                    if not is_excluded(name, exclude):
                        sources.append((name, d))
                        if len(sources) == MAX_SOURCES:
                            break
        owners = [names[o] for o in ids]
        if exclude is not None:
            owners = [n for n in owners if not is_excluded(n, exclude)]
        return (tuple(sorted(owners)), tuple(sorted(sources))) if owners else None

    def nbytes(self) -> tuple[int, int, int]:
        """Approximate bytes held: (exact index, content store, similarity tables)."""
        exact_arrays = (
            self.b_key,
            self.b_parent,
            self.b_content,
            self.b_depth,
            self.b_owner,
            self.b_nown,
            self.b_child,
        )
        exact = sum(a.nbytes for a in exact_arrays) + self.chain.nbytes
        for tree in (self.more_children, self.root_children, self.ends):
            exact += sys.getsizeof(tree) + 64 * len(tree)
            exact += sum(sys.getsizeof(v) for v in tree.values() if not isinstance(v, int))
        exact += sum(a.nbytes + 112 for a in self.owner_blocks.values())
        exact += sys.getsizeof(self.block_owners)
        exact += sum(sys.getsizeof(s) for s in self.block_owners.values())
        content = self.c_tokens.nbytes + self.c_refs.nbytes + self.c_block.nbytes
        content += self.content.nbytes + sys.getsizeof(self.content_blocks)
        content += sum(sys.getsizeof(s) for s in self.content_blocks.values())
        similar = 0
        for table in self.near:
            # int keys and values (~32 B each) plus the sets of shared keys
            similar += sys.getsizeof(table) + 64 * len(table)
            similar += sum(sys.getsizeof(v) for v in table.values() if not isinstance(v, int))
        similar += self.postings.nbytes()
        return exact, content, similar


class MemoryIndex(BlockIndex):
    """In-process index: the embedded default. See the module docstring for the layout.

    Thread-safe per tenant: every call on a tenant holds that tenant's lock only, so a long
    lookup of one tenant never delays another's; ``stats`` and ``export`` take each tenant's
    lock in turn (a consistent cut per tenant)."""

    def __init__(self, block_size: int = 16, span_budget: SpanBudget | None = None):
        self.block_size = block_size
        self.span_budget = span_budget or SpanBudget()
        self._tenants: dict[str, _Tenant] = {}
        self._create = threading.Lock()
        self._nblocks = 0  # distinct chain blocks, all tenants (kept by every write)
        self._count = threading.Lock()

    def _moved_blocks(self, delta: int) -> None:
        if delta:
            with self._count:
                self._nblocks += delta

    @contextmanager
    def _use(self, tenant: str, create: bool = False) -> Iterator[_Tenant | None]:
        """The tenant's structures, under its lock (None when unknown and not created)."""
        while True:
            t = self._tenants.get(tenant)
            if t is None and create:
                with self._create:
                    t = self._tenants.get(tenant)
                    if t is None:
                        t = self._tenants[tenant] = _Tenant(self.block_size, self.span_budget)
            if t is None:
                yield None
                return
            with t.lock:
                if self._tenants.get(tenant) is t:  # not dropped while we waited
                    yield t
                    return

    def _tenant(self, tenant: str) -> _Tenant | None:
        """Unlocked access, for callers already inside ``_use``."""
        return self._tenants.get(tenant)

    def tenants(self) -> list[str]:
        return list(self._tenants)

    def validate(self, tenant: str, seq: BlockSequence) -> None:
        """Raise what ``put`` would raise for ``seq``, changing nothing."""
        with self._use(tenant) as t:
            if t is not None:
                t.validate(seq)

    def drop_tenant(self, tenant: str) -> None:
        """Forget everything the tenant indexed."""
        with self._use(tenant) as t:
            if t is not None:
                self._moved_blocks(-len(t.chain))
                del self._tenants[tenant]

    def put(self, tenant: str, owner: str, seq: BlockSequence, info: OwnerInfo) -> PutResult:
        with self._use(tenant, create=True) as t:
            assert t is not None
            before = len(t.chain)
            try:
                return self._put(t, owner, seq, info)
            finally:
                self._moved_blocks(len(t.chain) - before)
                if not t.owner_id:  # a refused first prompt leaves no empty tenant behind
                    del self._tenants[tenant]

    @staticmethod
    def _put(t: _Tenant, owner: str, seq: BlockSequence, info: OwnerInfo) -> PutResult:
        old = t.owner_id.get(owner)
        if old is not None:
            ob = t.owner_blocks[old]
            if ob.size == seq.num_blocks and (t.b_key[ob] == seq.chain_keys).all():
                # the same prompt again (chain keys cover tokens, salt and LoRA; the blocks
                # were verified when first stored): only the metadata may change
                t.owner_info[old] = info
                others = int((t.b_nown[ob] > 1).sum())  # owner sets shrink along a chain
                return PutResult(seq.num_blocks, seq.num_blocks - others, others)
        t.validate(seq)  # raises before anything changes
        # The new prompt goes in under a fresh id before the old one leaves, so what the two
        # share (a growing conversation, a re-sent prompt) is never torn down and rebuilt.
        oid = int(t.o_ids.take(1)[0])
        t.owner_id[owner] = oid
        t.owner_name[oid] = owner
        new, shared = t.put(oid, seq)
        t.owner_info[oid] = info
        if old is not None:
            # count only blocks held by *other* owners as shared (the old prompt is leaving)
            ob, nb = t.owner_blocks[old], t.owner_blocks[oid]
            m = min(ob.size, nb.size, shared)
            same = int(np.argmin(ob[:m] == nb[:m])) if m and not (ob[:m] == nb[:m]).all() else m
            others = t.b_nown[nb[:shared]] - 1 - (np.arange(shared) < same)
            shared = int((others > 0).sum())
            new = seq.num_blocks - shared
            del t.owner_name[old]
            t.owner_info.pop(old, None)
            t.remove(old)
            t.o_ids.give(np.asarray([old], dtype=np.int32))
        return PutResult(seq.num_blocks, new, shared)

    def remove(self, tenant: str, owner: str) -> int:
        with self._use(tenant) as t:
            if t is None or owner not in t.owner_id:
                return 0
            oid = t.owner_id.pop(owner)
            del t.owner_name[oid]
            t.owner_info.pop(oid, None)
            before = len(t.chain)
            n = t.remove(oid)
            self._moved_blocks(len(t.chain) - before)
            t.o_ids.give(np.asarray([oid], dtype=np.int32))
            if not t.owner_id:
                del self._tenants[tenant]
            return n

    def lookup(
        self, tenant: str, seq: BlockSequence, options: LookupOptions = PREFIX_ONLY
    ) -> LookupResult:
        with self._use(tenant) as t:
            if t is None:
                return LookupResult(0, {}, [])
            return t.lookup(seq, options.exclude, options.near_radius, options.spans)

    def owner_block_tokens(self, tenant: str, owner: str, block: int) -> np.ndarray | None:
        with self._use(tenant) as t:
            if t is None or owner not in t.owner_id:
                return None
            bids = t.owner_blocks[t.owner_id[owner]]
            if not 0 <= block < bids.size:
                return None
            out: np.ndarray = t.c_tokens[t.b_content[bids[block]]].copy()
            return out

    def closest_owner(
        self, tenant: str, first_block: np.ndarray, *, exclude: str | None = None
    ) -> str | None:
        with self._use(tenant) as t:
            return None if t is None else t.closest_owner(first_block, exclude)

    def owner_info(self, tenant: str, owner: str) -> OwnerInfo | None:
        with self._use(tenant) as t:
            if t is None or owner not in t.owner_id:
                return None
            return t.owner_info.get(t.owner_id[owner])

    def owners(self, tenant: str) -> list[str]:
        with self._use(tenant) as t:
            return sorted(t.owner_id) if t else []

    def count_owners(self, tenant: str) -> int:
        t = self._tenant(tenant)
        return len(t.owner_id) if t else 0  # one len(): atomic, no lock needed

    def count_tenants(self) -> int:
        return len(self._tenants)

    def num_blocks(self) -> int:
        return self._nblocks

    def held_blocks(self) -> int:
        return self._nblocks

    def export(self, tenant: str | None = None) -> Iterator[OwnerRecord]:
        """Every owner's record (of one tenant, or all): materialized per tenant under its
        lock, so the caller may iterate at leisure."""
        for name in [tenant] if tenant is not None else self.tenants():
            with self._use(name) as t:
                recs = [] if t is None else list(self._export(name, t))
            yield from recs

    @staticmethod
    def _export(name: str, t: _Tenant) -> Iterator[OwnerRecord]:
        spaces = {-1 - ns: key for key, ns in t.namespaces.items()}
        for oid in t.owner_id.values():
            bids = t.owner_blocks[oid]
            info = t.owner_info[oid]
            if bids.size == 0:
                yield OwnerRecord(name, info, np.zeros(0, dtype=np.uint32), ("", "", ""))
                continue
            root = int(t.b_parent[bids[0]])
            yield OwnerRecord(name, info, t.owner_tokens(oid).copy(), spaces[root])

    def stats(self, tenant: str | None = None) -> IndexStats:
        rows = []
        for name in self.tenants() if tenant is None else [tenant]:
            with self._use(name) as t:
                if t is not None:
                    rows.append(
                        (
                            len(t.owner_id),
                            len(t.chain),
                            sum(int(b.size) for b in t.owner_blocks.values()),
                            len(t.content),
                            t.nbytes(),
                        )
                    )
        return IndexStats(
            tenants=len(rows),
            owners=sum(r[0] for r in rows),
            blocks=sum(r[1] for r in rows),
            owner_blocks=sum(r[2] for r in rows),
            contents=sum(r[3] for r in rows),
            nbytes=sum(sum(r[4]) for r in rows),
            exact_nbytes=sum(r[4][0] for r in rows),
            similarity_nbytes=sum(r[4][2] for r in rows),
        )
