"""The embedded default backend: compact numpy arrays per tenant.

One tenant is five stores (``index/stores.py``, each with its invariants): the chain blocks
(the block tree: one row per distinct chain hash, with its parent, content, depth, owners and
children), the content store (one row per distinct block token tuple, stored once), the owner
table, the near-duplicate buckets and the moved-span anchors. ``_Tenant`` holds them and the
operations that keep them consistent (put, remove, lookup); ``MemoryIndex`` adds the tenants
and their locks.

A chain match is accepted only when the key, the parent block and the (token-verified)
content all agree, so a 64-bit key collision can never produce a false "exact".
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import compress
from typing import Any

import numpy as np

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
from kvforge.index.spans import SpanBudget, SpanSearch
from kvforge.index.stores import (
    ChainBlocks,
    ContentStore,
    NearTables,
    OwnerTable,
    SpanAnchors,
    mm_add,
    mm_discard,
    mm_values,
)


class _Tenant:
    """One tenant of the embedded index: its stores (``index/stores.py``) and the operations
    that keep them consistent. Not locked itself: ``MemoryIndex`` holds ``lock`` around every
    call."""

    def __init__(self, block_size: int, budget: SpanBudget | None = None) -> None:
        self.lock = threading.Lock()
        self.bs = block_size
        self.blocks = ChainBlocks()
        self.contents = ContentStore(block_size)
        self.owners = OwnerTable()
        self.near = NearTables()
        self.anchors = SpanAnchors(block_size, budget or SpanBudget())

    # ---- helpers ------------------------------------------------------------------------
    def owners_of(self, b: int) -> set[int] | tuple[int, ...]:
        return self.blocks.owners.values(b)

    def _content_ids(self, seq: BlockSequence) -> np.ndarray:
        """Content id per query block, -1 where unknown (token-verified)."""
        return self.contents.ids_of(seq)

    def _root(self, seq: BlockSequence, *, create: bool = False) -> int | None:
        return self.blocks.root(seq, create=create)

    def _chain_prefix(self, seq: BlockSequence, cids: np.ndarray) -> tuple[np.ndarray, int]:
        """Block id of every query block by chain hash, and how many leading ones are verified
        (key, parent and content agree). Hashes the whole query: used when indexing."""
        n = seq.num_blocks
        bids = (
            self.blocks.table.get(seq.chain_keys) if len(self.blocks) else np.full(n, -1, np.int32)
        )
        root = self._root(seq)
        if n == 0 or root is None or len(self.blocks) == 0:
            return bids, 0
        ok = bids >= 0
        g = np.where(ok, bids, 0)
        parent = np.empty(n, dtype=np.int32)
        parent[0] = root
        parent[1:] = bids[:-1]
        ok &= (self.blocks.content[g] == cids) & (cids >= 0) & (self.blocks.parent[g] == parent)
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
        if n == 0 or root is None or len(self.blocks) == 0:
            return bids, 0
        known = cids >= 0
        cand = np.where(known, self.contents.blocks.first[np.where(known, cids, 0)], 0)
        depth_ok = known & (self.blocks.depth[cand] == np.arange(n, dtype=np.int32))
        i, prev = 0, root
        while i < n:
            seg = cand[i:]
            parents = np.empty(n - i, dtype=np.int32)
            parents[0] = prev
            parents[1:] = seg[:-1]
            ok = depth_ok[i:] & (self.blocks.parent[seg] == parents)
            run = int(np.argmin(ok)) if not ok.all() else n - i
            bids[i : i + run] = seg[:run]
            i += run
            if i == n:
                break
            prev = int(bids[i - 1]) if i else root
            c = int(cids[i])
            if c >= 0 and len(self.contents.blocks.rest.get(c, ())) > 32:
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
        got = self.blocks.table.get(seq.chain_keys[i:])
        g = np.where(got >= 0, got, 0)
        parents = np.empty(got.size, dtype=np.int32)
        parents[0] = prev
        parents[1:] = got[:-1]
        ok = (got >= 0) & (cids[i:] >= 0) & (self.blocks.content[g] == cids[i:])
        ok &= self.blocks.parent[g] == parents
        run = int(np.argmin(ok)) if not ok.all() else got.size
        bids[i : i + run] = got[:run]
        return i + run

    def _child(self, parent: int, c: int) -> int:
        """The chain block under ``parent`` whose content is ``c``, or -1 (``c`` is held by at
        most 32 chain blocks: ``_walk`` hashes the rest of the query past that)."""
        if c < 0:
            return -1
        blocks = self.contents.blocks.rest.get(c)
        if blocks is None:  # one chain block holds it; the vectorized pass already refused it
            return -1
        parent_of = self.blocks.parent
        for b in blocks:
            if parent_of[b] == parent:
                return b
        return -1

    def validate(self, seq: BlockSequence) -> None:
        """Raise before any mutation if ``seq`` collides with stored keys."""
        keys, first = np.unique(seq.content_keys, return_index=True)
        if keys.size != seq.content_keys.size:
            _, inv = np.unique(seq.content_keys, return_inverse=True)
            if not (seq.tokens == seq.tokens[first][inv]).all():
                raise HashCollisionError("two different blocks of one prompt share a content key")
        cids = self.contents.table.get(seq.content_keys)
        known = np.flatnonzero(cids >= 0)
        if known.size and not (self.contents.tokens[cids[known]] == seq.tokens[known]).all():
            raise HashCollisionError("a block's content key collides with a stored block")
        if np.unique(seq.chain_keys).size != seq.chain_keys.size:
            raise HashCollisionError("two blocks of one prompt share a chain key")
        bids, k = self._chain_prefix(seq, cids)
        if (bids[k:] >= 0).any():
            raise HashCollisionError("a chain key collides with a stored block of another prefix")

    def put(self, oid: int, seq: BlockSequence) -> tuple[int, int]:
        n = seq.num_blocks
        cs, bl = self.contents, self.blocks
        # contents: one row per distinct token tuple
        ukeys, first, inv = np.unique(seq.content_keys, return_index=True, return_inverse=True)
        ucids = cs.table.get(ukeys)
        missing = np.flatnonzero(ucids < 0)
        if missing.size:
            new = cs.insert(ukeys[missing], seq.tokens[first[missing]])
            ucids[missing] = new
            self.near.add(new, cs.tokens[new])
        cids = ucids[inv].astype(np.int32)
        # chain: the held prefix gains an owner, the rest are new blocks
        root = bl.root(seq, create=True)
        bids, k = self._chain_prefix(seq, cids)
        shared = bids[:k]
        bl.owners.add_all(shared, oid)
        if k < n:
            new = bl.take(n - k)
            bl.key[new] = seq.chain_keys[k:]
            parents = np.empty(n - k, dtype=np.int32)
            assert root is not None  # created above
            parents[0] = bids[k - 1] if k else root
            parents[1:] = new[:-1]
            bl.parent[new] = parents
            bl.content[new] = cids[k:]
            bl.depth[new] = np.arange(k, n, dtype=np.int32)
            bl.owners.start(new, oid)
            bl.table.insert(seq.chain_keys[k:], new)
            for c, b in zip(cids[k:].tolist(), new.tolist(), strict=True):
                cs.link(c, b)
            bl.children.first[new] = -1
            bl.children.first[new[:-1]] = new[1:]  # a new suffix is a chain: each its next's parent
            bl.add_child(int(parents[0]), int(new[0]))
            bids = np.concatenate([shared, new]).astype(np.int32)
            base = self.anchors.base(k)
            self.anchors.post(bids, k, seq.tokens[base:], base, add=True)
        self.owners.blocks[oid] = bids.astype(np.int32)
        if n:
            mm_add(bl.ends, int(bids[-1]), oid)
        return n - k, k

    def children_of(self, b: int) -> list[int]:
        """The chain blocks whose parent is ``b`` (a block id, or a root marker < 0)."""
        return self.blocks.children_of(b)

    def _leaving_along(self, chain: list[int], points: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The owners through ``chain[i]`` that do not continue into ``chain[i + 1]`` (their
        prompt ends there, or goes into another child), for every change point ``i``, as two
        flat arrays: owner ids and the index in ``points`` of where each leaves. The children
        of all points are gathered in C (``list.extend``) and classified in one vectorized
        pass: O(points) Python steps plus O(owners) in numpy."""
        bl = self.blocks
        ends, more, bo = bl.ends, bl.children.rest, bl.owners.rest
        e_own: list[int] = []  # owners whose prompt ends at a point
        e_pt: list[int] = []
        kids: list[int] = []
        counts: list[int] = []
        firsts = bl.children.first[[chain[i] for i in points]].tolist() if points else []
        for k, (i, first) in enumerate(zip(points, firsts, strict=True)):
            b = chain[i]
            got = ends.get(b)
            if got is not None:
                if isinstance(got, int):
                    e_own.append(got)
                    e_pt.append(k)
                else:
                    e_own += got
                    e_pt += [k] * len(got)
            n0 = len(kids)
            if first >= 0:
                m = more.get(b)
                if m is None:
                    kids.append(first)
                else:
                    kids.extend(m)
            counts.append(len(kids) - n0)
        owners = [np.asarray(e_own, dtype=np.int64)]
        where = [np.asarray(e_pt, dtype=np.int64)]
        if kids:
            k_arr = np.asarray(kids, dtype=np.int64)
            point = np.repeat(np.arange(len(points)), counts)
            stay = np.asarray([chain[i + 1] for i in points], dtype=np.int64)[point]
            keep = k_arr != stay
            single = bl.owners.count[k_arr] == 1
            sel = keep & single
            owners.append(bl.owners.first[k_arr[sel]].astype(np.int64))
            where.append(point[sel])
            shared = keep & ~single  # children several owners go through (rare here)
            for c, k in zip(k_arr[shared].tolist(), point[shared].tolist(), strict=True):
                got_c = list(bo[c])
                owners.append(np.asarray(got_c, dtype=np.int64))
                where.append(np.full(len(got_c), k, dtype=np.int64))
        return np.concatenate(owners), np.concatenate(where)

    def leaving(self, b: int, stay: int) -> tuple[list[int], list[int]]:
        """Owners through block ``b`` that do not continue into its child ``stay``: those whose
        prompt ends at ``b``, and the other children that the rest continue into."""
        ends = list(mm_values(self.blocks.ends.get(b)))
        kids = [c for c in self.blocks.children_of(b) if c != stay]
        return ends, kids

    def remove(self, oid: int) -> int:
        bl, cs = self.blocks, self.contents
        bids = self.owners.blocks.pop(oid)
        if bids.size:
            mm_discard(bl.ends, int(bids[-1]), oid)
        bl.owners.discard_all(bids, oid)
        freed = bids[bl.owners.count[bids] == 0]
        if freed.size:
            # owner sets shrink along a chain: the freed blocks are the path's suffix
            first = bids.size - freed.size
            base = self.anchors.base(first)
            tokens = cs.tokens[bl.content[bids[base:]]]
            self.anchors.post(bids, first, tokens, base, add=False)
            bl.drop_child(int(bl.parent[freed[0]]), int(freed[0]))
            dead = [
                c
                for c, b in zip(bl.content[freed].tolist(), freed.tolist(), strict=True)
                if cs.unlink(c, b)
            ]
            if dead:
                d = np.asarray(dead, dtype=np.int32)
                self.near.remove(d, cs.tokens[d])
                cs.delete(d)
            bl.free(freed)
        return int(bids.size)

    def closest_owner(self, first_block: np.ndarray, exclude: str | None) -> str | None:
        """The owner whose block 0 shares the longest token prefix with ``first_block``; ties
        to the smallest name. Compares the distinct block-0 contents (the roots' children),
        not every owner."""
        heads = self.blocks.heads()
        if not heads:
            return None
        h = np.asarray(heads, dtype=np.int64)
        same = self.contents.tokens[self.blocks.content[h]] == np.asarray(
            first_block, dtype=np.uint32
        )
        lcp = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
        names = self.owners.name
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
        out: np.ndarray = self.contents.tokens[self.blocks.content[self.owners.blocks[oid]]].ravel()
        return out

    # ---- query --------------------------------------------------------------------------
    def lookup(
        self, seq: BlockSequence, exclude: str | None, near_radius: int = 0, spans: bool = False
    ) -> LookupResult:
        n = seq.num_blocks
        if n == 0 or not self.owners.blocks:
            found, cut = self._spans(seq, exclude) if spans and self.owners.blocks else ([], False)
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
            # O(1) once, however many change points there are; ``order`` is sorted by
            # decreasing depth, names sorted within, in one numpy sort of the owners' ids.
            nown = self.blocks.owners.count[chain_b]
            cps = [*np.flatnonzero(nown[:-1] != nown[1:]).tolist(), deep - 1]
            chain_l = chain_b.tolist()
            oids, pts = self._leaving_along(chain_l, cps[:-1])
            last = list(self.owners_of(chain_l[deep - 1]))  # through the deepest block
            oids = np.concatenate([oids, np.asarray(last, dtype=np.int64)])
            ends = np.asarray(cps, dtype=np.int64)[pts] + 1
            ends = np.concatenate([ends, np.full(len(last), deep, dtype=np.int64)])
            # by decreasing depth, names sorted within: one sort of (depth, name rank) keys
            ow = self.owners
            by = np.argsort((deep - ends) * ow.ranks + ow.rank[oids])
            order = ow.names[oids[by]].tolist()
            ends_by = ends[by]
            if exclude is not None:
                kept = np.asarray([not is_excluded(n, exclude) for n in order], dtype=bool)
                order = list(compress(order, kept.tolist()))
                ends_by = ends_by[kept]
            depth = dict(zip(order, ends_by.tolist(), strict=True))
            neg_depths = (-ends_by).tolist()  # ascending, for bisect
            # Runs of identical owner sets: the owners of blocks [.., end) are those whose depth
            # is >= end, i.e. a prefix of ``order``.
            start = 0
            last_m = -1
            by_depth = tuple(order)  # a tuple's slice is one copy (a list's, then tuple(): two)
            for i in cps:
                end = i + 1
                m = bisect_right(neg_depths, -end)
                if m:
                    # the same prefix of ``order`` as the run before (and adjacent): extend it
                    if m == last_m and runs and runs[-1][1] == start:
                        runs[-1] = (runs[-1][0], end, runs[-1][2])
                    else:
                        runs.append((start, end, by_depth[:m]))
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
        rows, ci = self.near.candidates(keys, need)
        if ci.size == 0:
            return {}
        qi = np.asarray(todo, dtype=np.int64)[rows]
        diff = self.contents.tokens[ci] != seq.tokens[qi]
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
                tokens=tuple(self.contents.tokens[ci[j]].tolist()),
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
        search = SpanSearch(
            self, seq.all_tokens, chain, self._root(seq), exclude, self.anchors.budget
        )
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
        blk = self.contents.blocks.first[c]
        simple = (self.contents.blocks.count[c] == 1) & (self.blocks.owners.count[blk] == 1)
        names = self.owners.name
        memo: dict[object, tuple[tuple[str, ...], tuple[tuple[str, int], ...]] | None] = {}
        for i, ci, is_simple, o, d in zip(
            idx.tolist(),
            c.tolist(),
            simple.tolist(),
            self.blocks.owners.first[blk].tolist(),
            self.blocks.depth[blk].tolist(),
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
        names = self.owners.name
        blocks = self.contents.blocks.rest.get(c) or (int(self.contents.blocks.first[c]),)
        # owner ids by set union (C-level), names once per distinct owner; the first
        # MAX_SOURCES (owner, position) pairs in block order, as before
        ids: set[int] = set()
        sources: list[tuple[str, int]] = []
        for b in blocks:
            got = self.owners_of(b)
            ids.update(got)
            if len(sources) < MAX_SOURCES:
                d = int(self.blocks.depth[b])
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
        exact = self.blocks.nbytes() + self.owners.nbytes()
        content = self.contents.nbytes()
        similar = self.near.nbytes() + self.anchors.nbytes()
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
                self._moved_blocks(-len(t.blocks))
                del self._tenants[tenant]

    def put(self, tenant: str, owner: str, seq: BlockSequence, info: OwnerInfo) -> PutResult:
        with self._use(tenant, create=True) as t:
            assert t is not None
            before = len(t.blocks)
            try:
                return self._put(t, owner, seq, info)
            finally:
                self._moved_blocks(len(t.blocks) - before)
                if not t.owners.id:  # a refused first prompt leaves no empty tenant behind
                    del self._tenants[tenant]

    @staticmethod
    def _put(t: _Tenant, owner: str, seq: BlockSequence, info: OwnerInfo) -> PutResult:
        old = t.owners.id.get(owner)
        if old is not None:
            ob = t.owners.blocks[old]
            if ob.size == seq.num_blocks and (t.blocks.key[ob] == seq.chain_keys).all():
                # the same prompt again (chain keys cover tokens, salt and LoRA; the blocks
                # were verified when first stored): only the metadata may change
                t.owners.info[old] = info
                others = int(
                    (t.blocks.owners.count[ob] > 1).sum()
                )  # owner sets shrink along a chain
                return PutResult(seq.num_blocks, seq.num_blocks - others, others)
        t.validate(seq)  # raises before anything changes
        # The new prompt goes in under a fresh id before the old one leaves, so what the two
        # share (a growing conversation, a re-sent prompt) is never torn down and rebuilt.
        oid = t.owners.add(owner)
        new, shared = t.put(oid, seq)
        t.owners.info[oid] = info
        if old is not None:
            # count only blocks held by *other* owners as shared (the old prompt is leaving)
            ob, nb = t.owners.blocks[old], t.owners.blocks[oid]
            m = min(ob.size, nb.size, shared)
            same = int(np.argmin(ob[:m] == nb[:m])) if m and not (ob[:m] == nb[:m]).all() else m
            others = t.blocks.owners.count[nb[:shared]] - 1 - (np.arange(shared) < same)
            shared = int((others > 0).sum())
            new = seq.num_blocks - shared
            t.remove(old)
            t.owners.forget(old)
        return PutResult(seq.num_blocks, new, shared)

    def remove(self, tenant: str, owner: str) -> int:
        with self._use(tenant) as t:
            if t is None or owner not in t.owners.id:
                return 0
            oid = t.owners.id[owner]
            before = len(t.blocks)
            n = t.remove(oid)
            t.owners.forget(oid)
            self._moved_blocks(len(t.blocks) - before)
            if not t.owners.id:
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
            if t is None or owner not in t.owners.id:
                return None
            bids = t.owners.blocks[t.owners.id[owner]]
            if not 0 <= block < bids.size:
                return None
            out: np.ndarray = t.contents.tokens[t.blocks.content[bids[block]]].copy()
            return out

    def closest_owner(
        self, tenant: str, first_block: np.ndarray, *, exclude: str | None = None
    ) -> str | None:
        with self._use(tenant) as t:
            return None if t is None else t.closest_owner(first_block, exclude)

    def owner_info(self, tenant: str, owner: str) -> OwnerInfo | None:
        with self._use(tenant) as t:
            if t is None or owner not in t.owners.id:
                return None
            return t.owners.info.get(t.owners.id[owner])

    def owners(self, tenant: str) -> list[str]:
        with self._use(tenant) as t:
            return sorted(t.owners.id) if t else []

    def count_owners(self, tenant: str) -> int:
        t = self._tenant(tenant)
        return len(t.owners.id) if t else 0  # one len(): atomic, no lock needed

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
        spaces = {-1 - ns: key for key, ns in t.blocks.namespaces.items()}
        for oid in t.owners.id.values():
            bids = t.owners.blocks[oid]
            info = t.owners.info[oid]
            if bids.size == 0:
                yield OwnerRecord(name, info, np.zeros(0, dtype=np.uint32), ("", "", ""))
                continue
            root = int(t.blocks.parent[bids[0]])
            yield OwnerRecord(name, info, t.owner_tokens(oid).copy(), spaces[root])

    def stats(self, tenant: str | None = None) -> IndexStats:
        rows = []
        for name in self.tenants() if tenant is None else [tenant]:
            with self._use(name) as t:
                if t is not None:
                    rows.append(
                        (
                            len(t.owners.id),
                            len(t.blocks),
                            sum(int(b.size) for b in t.owners.blocks.values()),
                            len(t.contents),
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
