"""Moved spans over the block tree: anchors posted per chain block, each run verified once for
the whole class of owners that share its path, and a work budget that bounds every query.

**Postings.** Winnowing (see ``anchors``) selects, in every window of ``ANCHOR_W`` k-grams, the
rightmost minimal k-gram. A window's content is fixed by the path to the chain block holding its
last token, so the windows of a prompt are partitioned by that block: a chain block posts the
anchors of the windows that end in it. The union over an owner's path is exactly the owner's
winnowed anchor set, so the completeness guarantee (a shared run of ``GUARANTEED_SPAN`` tokens
always holds a common anchor at the same offset) carries over, while a block shared by 2,000
owners posts its anchors once. Postings are a pure function of the block: added when the block
is created, removed (recomputed from the same tokens) when it is freed.

**Stop-words.** An anchor hash keeps at most ``SpanBudget.max_postings`` postings and counts
the rest; a query that meets such a hash (low-entropy text: ``"a " * 16384``, table rules)
uses what is kept and reports ``truncated``.

**Search.** Every (query anchor, posting) pair gives a candidate: a chain block, an owner
position and a diagonal. A candidate on diagonal 0 whose path agrees with the query from token
0 up to the anchor is the exact prefix, never a moved span, and is dropped in one vectorized
pass (this is what a prompt sharing a system prompt with thousands of owners meets). Each other
candidate is extended left and right along one representative owner's tokens; the run's left
end is shared by every owner through the block that holds it, and the owners that leave the
representative's path before the run's right end are enumerated through the tree's children,
each branch extended once. A run is keyed by (block, left end, diagonal): no run is verified
twice, and each owner's runs are derived from its class at the end.

Invariant: without truncation the result equals brute force over every owner's tokens (every
maximal run of >= ``GUARANTEED_SPAN`` equal tokens on a diagonal, but the prefix run at (0, 0)).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from kvforge.index.anchors import (
    ANCHOR_K,
    ANCHOR_W,
    GUARANTEED_SPAN,
    kgram_hashes,
    window_argmins,
    winnow,
)
from kvforge.index.base import SharedSpan, is_excluded

if TYPE_CHECKING:  # stores.py imports this module
    from kvforge.index.stores import ChainBlocks, ContentStore, OwnerTable, SpanAnchors

# tokens before a window's last token that the window covers
WINDOW_CONTEXT = ANCHOR_K + ANCHOR_W - 2
_POS_MASK = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class SpanBudget:
    """Bounds on the moved-span search. Beyond any of them the search stops early and the
    report says ``truncated``; within them it is exact."""

    max_postings: int = 512  # kept per anchor hash (a stop-word beyond)
    max_pairs: int = 32_768  # (query anchor, posting) pairs examined per query
    max_pairs_per_hash: int = 2_048  # of which from one anchor hash (repeats in the query)
    max_runs: int = 2_048  # runs verified per query (classes of owners on one diagonal)
    max_tokens: int = 2_000_000  # tokens compared per query
    max_spans: int = 4_096  # spans reported per query
    max_spans_per_owner: int = 256


def node_anchors(
    tokens: np.ndarray, base_block: int, first_block: int, bs: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anchors posted by blocks ``>= first_block`` of a prompt.

    A selected position is posted once, by the block holding the last token of the *first*
    window that selects it (selected positions never move left as the window slides, so that
    is its first occurrence): every owner through that block selects it too, so one posting
    serves them all, and a position a shallower block already posts is not posted again.

    ``tokens`` are the prompt's flat tokens from block ``base_block`` on; ``base_block`` must be
    ``context_base(first_block, bs)`` (or 0), so that every window that could be the first to
    select such a position is complete. Returns (hashes, absolute token positions, block index
    of that window's last token)."""
    empty = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64), np.zeros(0, np.int64)
    h = kgram_hashes(tokens)
    nwin = h.size - ANCHOR_W + 1
    if nwin <= 0:
        return empty
    start = base_block * bs
    rel = window_argmins(h, ANCHOR_W)
    end_block = (np.arange(nwin) + start + WINDOW_CONTEXT) // bs
    first = np.ones(rel.size, dtype=bool)
    first[1:] = rel[1:] != rel[:-1]  # the first window selecting each position
    rel, end_block = rel[first], end_block[first]
    keep = end_block >= first_block
    rel, end_block = rel[keep], end_block[keep]
    if rel.size == 0:
        return empty
    return h[rel], rel + start, end_block


def context_base(first_block: int, bs: int) -> int:
    """The first block whose tokens ``node_anchors`` needs for blocks ``>= first_block``: the
    windows ending up to ``WINDOW_CONTEXT`` tokens before, complete themselves."""
    return max(0, first_block - 2 * -(-WINDOW_CONTEXT // bs))


class AnchorPostings:
    """anchor hash -> postings ``block << 32 | position``: one int, or a set once shared.

    At most ``cap`` postings are kept per hash; ``omitted[h]`` counts the others (they are
    still owed a removal). A hash with ``omitted[h] > 0`` is a stop-word: a query meeting it
    searches only the kept postings and reports truncation."""

    __slots__ = ("_arrays", "cap", "omitted", "post")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.post: dict[int, int | set[int]] = {}
        self.omitted: dict[int, int] = {}
        # shared postings as int64 arrays, built by queries and dropped by writes: a system
        # prompt's anchors are converted once, not on every query
        self._arrays: dict[int, np.ndarray] = {}

    def array(self, h: int) -> np.ndarray | None:
        """The postings of ``h`` as an int64 array (None when there are none)."""
        arr = self._arrays.get(h)
        if arr is not None:
            return arr
        cur = self.post.get(h)
        if cur is None:
            return None
        if isinstance(cur, int):
            return np.array([cur], dtype=np.int64)
        arr = np.fromiter(cur, dtype=np.int64, count=len(cur))
        self._arrays[h] = arr
        return arr

    def __len__(self) -> int:
        return len(self.post)

    def add(self, hashes: Iterable[int], packed: Iterable[int]) -> None:
        post, cap, arrays = self.post, self.cap, self._arrays
        for h, v in zip(hashes, packed, strict=True):
            arrays.pop(h, None)
            cur = post.get(h)
            if cur is None:
                post[h] = v
            elif isinstance(cur, int):
                post[h] = {cur, v}
            elif len(cur) < cap:
                cur.add(v)
            else:
                self.omitted[h] = self.omitted.get(h, 0) + 1

    def remove(self, hashes: Iterable[int], packed: Iterable[int]) -> None:
        post, omitted, arrays = self.post, self.omitted, self._arrays
        for h, v in zip(hashes, packed, strict=True):
            arrays.pop(h, None)
            cur = post.get(h)
            if isinstance(cur, int) and cur == v:
                del post[h]
            elif isinstance(cur, set) and v in cur:
                cur.discard(v)
                if len(cur) == 1:
                    post[h] = cur.pop()
            else:  # never stored: it was one of the omitted
                left = omitted.get(h, 0) - 1
                if left > 0:
                    omitted[h] = left
                else:
                    omitted.pop(h, None)

    def nbytes(self) -> int:
        size = sys.getsizeof(self.post) + 64 * len(self.post) + sys.getsizeof(self.omitted)
        size += sum(sys.getsizeof(v) for v in self.post.values() if not isinstance(v, int))
        return size


class BlockTree(Protocol):
    """What the search reads of a tenant's exact index (see ``memory._Tenant``)."""

    bs: int
    blocks: ChainBlocks
    contents: ContentStore
    owners: OwnerTable
    anchors: SpanAnchors

    def owners_of(self, b: int) -> Any: ...

    def leaving(self, b: int, stay: int) -> tuple[list[int], list[int]]: ...


class _Stop(Exception):
    """A budget ran out."""


class SpanSearch:
    """One query's moved-span search (build one per lookup)."""

    def __init__(
        self,
        tree: BlockTree,
        q: np.ndarray,
        chain: np.ndarray,
        root: int | None,
        exclude: str | None,
        budget: SpanBudget,
    ) -> None:
        self.t = tree
        self.q = q
        self.chain = chain
        self.root = root
        self.exclude = exclude
        self.budget = budget
        self.truncated = False
        self._tokens_left = budget.max_tokens
        self._runs_left = budget.max_runs
        self._seen: set[tuple[int, int, int]] = set()  # (block at the left end, left end, diag)
        # runs already walked: short path segments marked per (block, diagonal), long ones
        # listed per diagonal as (rep, first depth, last depth, left, right)
        self._marked: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self._covered: dict[int, list[tuple[int, int, int, int, int]]] = {}
        self._per_owner: dict[int, int] = {}
        self._full = 0  # owners at their span cap
        self.out: list[SharedSpan] = []

    # ---- candidates ---------------------------------------------------------------------
    def _candidates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query position, chain block, owner position) of every anchor pair, bounded: a hash
        that would give more than ``max_pairs_per_hash`` pairs (the same anchor all over a
        low-entropy query) is used at its first query positions only, and pairs stop at
        ``max_pairs``; both set truncated."""
        pos, hashes = winnow(self.q)
        if pos.size == 0:
            z = np.zeros(0, dtype=np.int64)
            return z, z, z
        postings = self.t.anchors.postings
        omitted = postings.omitted
        uniq, inv, occ = np.unique(hashes, return_inverse=True, return_counts=True)
        # Postings as one flat array with (offset, length) per distinct query anchor: most
        # anchors of a query are posted nowhere (found in one C-level set intersection), most
        # of the rest once (a system prompt's anchors are posted by one chain block).
        ul = uniq.tolist()
        post = postings.post
        present = post.keys() & ul
        lens = np.zeros(uniq.size, dtype=np.int64)
        offs = np.zeros(uniq.size, dtype=np.int64)
        singles: list[int] = []
        single_js: list[int] = []
        shared: list[np.ndarray] = []
        shared_js: list[int] = []
        if present:
            for j in np.flatnonzero(np.isin(uniq, np.fromiter(present, np.uint64))).tolist():
                h = ul[j]
                cur = post[h]
                if h in omitted:
                    self.truncated = True
                if isinstance(cur, int):
                    singles.append(cur)
                    single_js.append(j)
                else:
                    arr = postings.array(h)
                    assert arr is not None
                    shared.append(arr)
                    shared_js.append(j)
        empty = np.zeros(0, dtype=np.int64)
        flat = np.concatenate([np.asarray(singles, dtype=np.int64), *shared])
        if single_js:
            js = np.asarray(single_js, dtype=np.int64)
            lens[js] = 1
            offs[js] = np.arange(js.size)
        if shared_js:
            sizes = np.fromiter((a.size for a in shared), dtype=np.int64, count=len(shared))
            js = np.asarray(shared_js, dtype=np.int64)
            lens[js] = sizes
            offs[js] = len(singles) + np.cumsum(sizes) - sizes
        per = lens[inv]  # pairs per query anchor, in query order
        # the rank of each query anchor among those of its hash (query order)
        order = np.argsort(inv, kind="stable")
        starts = np.concatenate(([0], np.cumsum(occ)[:-1]))
        rank = np.empty(inv.size, dtype=np.int64)
        rank[order] = np.arange(inv.size) - starts[inv[order]]
        allowed = self.budget.max_pairs_per_hash // np.maximum(lens, 1)
        over = (per > 0) & (rank >= allowed[inv])
        if over.any():
            self.truncated = True
            per = np.where(over, 0, per)
        hit = np.flatnonzero(per)
        total = np.cumsum(per[hit])
        if total.size and total[-1] > self.budget.max_pairs:
            self.truncated = True
            hit = hit[total <= self.budget.max_pairs]
        if hit.size == 0:
            return empty, empty, empty
        # ragged gather: the postings of each hit query anchor, in query order
        cnt = per[hit]
        first = offs[inv[hit]]
        packed = flat[np.repeat(first - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))]
        qpos = np.repeat(pos[hit].astype(np.int64), cnt)
        return qpos, packed >> 32, packed & _POS_MASK

    def _prefix_agreement(self, nodes: np.ndarray) -> np.ndarray:
        """Tokens from 0 on which each block's path agrees with the query: exact where the
        path leaves the query's chain within a few blocks of the block, else 0 (unknown)."""
        t, chain, bs = self.t, self.chain, self.t.bs
        deep = chain.size
        qpad = np.concatenate([self.q.astype(np.int64), np.full(bs, -1, dtype=np.int64)])
        agree = np.zeros(nodes.size, dtype=np.int64)
        todo = np.arange(nodes.size)
        x = nodes.astype(np.int64)
        for _ in range(2 + WINDOW_CONTEXT // bs):
            if todo.size == 0:
                break
            dep = t.blocks.depth[x].astype(np.int64)
            par = t.blocks.parent[x].astype(np.int64)
            if deep:
                on = (dep < deep) & (chain[np.minimum(dep, deep - 1)] == x)
                above = chain[np.clip(dep - 1, 0, deep - 1)]
                par_on = ~on & (dep >= 1) & (dep <= deep) & (par == above)
            else:
                on = np.zeros(todo.size, dtype=bool)
                par_on = np.zeros(todo.size, dtype=bool)
            if self.root is not None:
                par_on |= (dep == 0) & (par == self.root)
            agree[todo[on]] = (dep[on] + 1) * bs
            if par_on.any():
                qt = qpad[dep[par_on, None] * bs + np.arange(bs)]
                same = t.contents.tokens[t.blocks.content[x[par_on]]] == qt
                lcp = np.where(same.all(axis=1), bs, np.argmin(same, axis=1))
                agree[todo[par_on]] = dep[par_on] * bs + lcp
            # the path left the query's chain further up: continue with the parent
            up = ~on & ~par_on & (dep >= 1)
            todo, x = todo[up], par[up]
        return agree

    # ---- verification -------------------------------------------------------------------
    def _tokens(self, rep: int, lo: int, hi: int) -> np.ndarray:
        """Tokens ``[lo, hi)`` of ``rep``'s path, gathered from just the blocks they lie in
        (an extension reads what it compares, never a whole 8k-token prompt)."""
        t, bs = self.t, self.t.bs
        first = lo // bs
        rows: np.ndarray = t.contents.tokens[
            t.blocks.content[t.owners.blocks[rep][first : (hi - 1) // bs + 1]]
        ]
        out: np.ndarray = rows.ravel()[lo - first * bs : hi - first * bs]
        return out

    def _spend(self, n: int) -> None:
        self._tokens_left -= n
        if self._tokens_left < 0:
            raise _Stop

    def _extend_left(self, rep: int, op: int, d: int) -> int:
        """First owner position of the run of equal tokens that ends at ``op`` (exclusive)."""
        q = self.q
        floor = max(0, -d)
        hi, step = op, 64
        while hi > floor:
            lo = max(floor, hi - step)
            self._spend(hi - lo)
            eq = q[lo + d : hi + d] == self._tokens(rep, lo, hi)
            if not eq.all():
                return lo + int(np.flatnonzero(~eq)[-1]) + 1
            hi, step = lo, step * 4
        return floor

    def _extend_right(self, rep: int, start: int, d: int) -> int:
        """End (exclusive, owner position) of the run of equal tokens from ``start``."""
        q = self.q
        ceil = min(self.t.owners.blocks[rep].size * self.t.bs, q.size - d)
        lo, step = start, 64
        while lo < ceil:
            hi = min(ceil, lo + step)
            self._spend(hi - lo)
            eq = q[lo + d : hi + d] == self._tokens(rep, lo, hi)
            if not eq.all():
                return lo + int(np.argmin(eq))
            lo, step = hi, step * 4
        return lo

    def _emit(self, oid: int, left: int, right: int, d: int) -> None:
        if right - left < GUARANTEED_SPAN or (d == 0 and left == 0):
            return
        name = self.t.owners.name[oid]
        if is_excluded(name, self.exclude):
            return
        n = self._per_owner.get(oid, 0)
        if n >= self.budget.max_spans_per_owner or len(self.out) >= self.budget.max_spans:
            self.truncated = True
            if len(self.out) >= self.budget.max_spans:
                raise _Stop
            return
        self._per_owner[oid] = n + 1
        if n + 1 == self.budget.max_spans_per_owner:
            self._full += 1
            if self._full == len(self.t.owners.blocks):  # nobody can get another span
                raise _Stop
        self.out.append(SharedSpan(name, left + d, left, right - left))

    def _emit_all(self, b: int, left: int, right: int, d: int) -> None:
        if right - left < GUARANTEED_SPAN or (d == 0 and left == 0):
            return
        for oid in self.t.owners_of(b):
            self._emit(oid, left, right, d)

    def _walk(self, rep: int, first: int, left: int, right: int, d: int) -> None:
        """Emit the run ``[left, right)`` (on ``rep``'s path) for every owner through
        ``rep``'s block at depth ``first``; owners that leave the path before ``right`` are
        followed into their own branch."""
        t, bs = self.t, self.t.bs
        path = t.owners.blocks[rep]
        last = (right - 1) // bs
        q_end = self.q.size - d  # owner position where the query ends on this diagonal
        self._cover(rep, first, max(first, last), left, right, d)
        if last < first:  # the branch's first block already mismatches
            self._emit_all(int(path[first]), left, right, d)
            return
        # owners leave the path only where its owner count drops (sets shrink along a chain)
        nown = t.blocks.owners.count[path[first : last + 2]]
        drops = (np.flatnonzero(nown[:-1] != nown[1:]) + first).tolist()
        if not drops or drops[-1] != last:
            drops.append(last)
        for x in drops:
            node = int(path[x])
            boundary = (x + 1) * bs
            if x < last:
                stay = int(path[x + 1])
            elif right == boundary and right < q_end:
                # the run stops at the block's end: owners continuing into other children may
                # extend it (rep's own next block mismatches, or rep ends here)
                stay = int(path[x + 1]) if x + 1 < path.size else -1
            else:
                self._emit_all(node, left, right, d)
                return
            ends, branches = t.leaving(node, stay)
            for oid in ends:
                self._emit(oid, left, boundary, d)
            for child in branches:
                self._branch(child, left, boundary, d)
            if x == last:
                if stay >= 0:
                    self._emit_all(stay, left, right, d)
                return

    def _branch(self, child: int, left: int, start: int, d: int) -> None:
        """Owners through ``child`` agree with the query on ``[left, start)``: extend into it."""
        self._runs_left -= 1
        if self._runs_left < 0:
            raise _Stop
        t = self.t
        rep = int(t.blocks.owners.first[child])
        # most branches mismatch inside their first block (an owner's own text after a shared
        # prompt): compare that block alone before materializing the owner's tokens
        qs = start + d
        avail = min(t.bs, self.q.size - qs)
        self._spend(avail)
        eq = t.contents.tokens[t.blocks.content[child], :avail] == self.q[qs : qs + avail]
        if not eq.all():
            right = start + int(np.argmin(eq))
        else:
            right = self._extend_right(rep, start + avail, d)
        self._walk(rep, start // t.bs, left, right, d)

    def _cover(self, rep: int, first: int, last: int, left: int, right: int, d: int) -> None:
        if last - first < 16:
            path = self.t.owners.blocks[rep]
            for x in range(first, last + 1):
                self._marked.setdefault((int(path[x]), d), []).append((left, right))
        else:
            self._covered.setdefault(d, []).append((rep, first, last, left, right))

    def _is_covered(self, b: int, op: int, d: int) -> bool:
        """Whether a walked run on diagonal ``d`` holds the anchor ``[op, op + K)`` and passed
        through the block of the anchor's last token (``b`` or an ancestor: the window that
        posted it may end further on): then every owner's run through it is emitted."""
        t = self.t
        end = op + ANCHOR_K
        target = (end - 1) // t.bs
        while t.blocks.depth[b] > target:
            b = int(t.blocks.parent[b])
        for lo, hi in self._marked.get((b, d), ()):
            if lo <= op and end <= hi:
                return True
        segs = self._covered.get(d)
        if not segs:
            return False
        depth = int(t.blocks.depth[b])
        for rep, first, last, lo, hi in segs:
            if (
                first <= depth <= last
                and lo <= op
                and end <= hi
                and t.owners.blocks[rep][depth] == b
            ):
                return True
        return False

    def run(self) -> list[SharedSpan]:
        if self.q.size < GUARANTEED_SPAN or not self.t.owners.blocks:
            return []
        qpos, nodes, opos = self._candidates()
        diag = qpos - opos
        if nodes.size:
            # diagonal 0 back to token 0 is the exact prefix run (never a moved span)
            zero = np.flatnonzero(diag == 0)
            if zero.size:
                uniq, back = np.unique(nodes[zero], return_inverse=True)
                agree = self._prefix_agreement(uniq)[back]
                drop = zero[qpos[zero] + ANCHOR_K <= agree]
                keep = np.ones(nodes.size, dtype=bool)
                keep[drop] = False
                qpos, nodes, opos, diag = qpos[keep], nodes[keep], opos[keep], diag[keep]
            order = np.lexsort((diag, qpos))
            qpos, nodes, opos, diag = qpos[order], nodes[order], opos[order], diag[order]
        t, bs = self.t, self.t.bs
        try:
            for p, b, op, d in zip(
                qpos.tolist(), nodes.tolist(), opos.tolist(), diag.tolist(), strict=True
            ):
                if self._is_covered(b, op, d):
                    continue
                rep = int(t.blocks.owners.first[b])
                self._spend(ANCHOR_K)
                if not (self.q[p : p + ANCHOR_K] == self._tokens(rep, op, op + ANCHOR_K)).all():
                    continue  # a k-gram hash collision
                left = self._extend_left(rep, op, d)
                key = (int(t.owners.blocks[rep][left // bs]), left, d)
                if key in self._seen:
                    continue
                self._seen.add(key)
                self._runs_left -= 1
                if self._runs_left < 0:
                    raise _Stop
                # a run too short for ``rep`` may still be long for owners that branch off
                # its path: the walk follows them
                right = self._extend_right(rep, op + ANCHOR_K, d)
                self._walk(rep, left // bs, left, right, d)
        except _Stop:
            self.truncated = True
        self.out.sort(key=lambda sp: (-sp.length, sp.owner, sp.query_start, sp.owner_start))
        return self.out
