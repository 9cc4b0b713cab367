"""Content-defined anchors (winnowing) for finding shared token spans at any alignment, and the
chunk keys that make token-Hamming near-duplicate search exact and sub-linear.

Winnowing (Schleimer et al., SIGMOD'03): hash every k-gram, slide a window of ``w`` k-gram
hashes, keep the minimum of each window (rightmost on ties). Two sequences that share a span of
at least ``w + k - 1`` tokens select the same k-gram inside it, at the same offset — so a shared
span that long is never missed, whatever its alignment. With ``k = 8, w = 25`` that length is
32 tokens: two engine blocks.
"""

from __future__ import annotations

import numpy as np

from kvforge.blocks.hashing import _fmix64, _lane_constants

ANCHOR_K = 8
ANCHOR_W = 25
GUARANTEED_SPAN = ANCHOR_K + ANCHOR_W - 1  # 32 tokens

NEAR_CHUNKS = 4  # a block's tokens in 4 chunks: distance <= 3 leaves one chunk intact
MAX_NEAR_RADIUS = NEAR_CHUNKS - 1


# Rolling polynomial k-gram hash over Z/2^64: h_i = sum_j (t_{i+j} + C) B^j, from one prefix
# sum (h_i = (S_{i+k} - S_i) B^-i; B is odd, so invertible), then fmix64 to spread the bits.
# Position-independent and ~25x cheaper than hashing each k-gram's lanes. A collision only
# costs a token comparison: every anchor match is verified.
_B = np.uint64(0x9E3779B97F4A7C15)
_B_INV = np.uint64(pow(int(_B), -1, 1 << 64))
_C = np.uint64(0xA5C3_51ED_27D4_EB2F)
_POW = np.ones(1, dtype=np.uint64)  # B^i, grown on demand
_IPOW = np.ones(1, dtype=np.uint64)  # B^-i


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    global _POW, _IPOW
    if _POW.size < n:
        size = max(n, 2 * _POW.size, 1 << 14)
        with np.errstate(over="ignore"):
            pw = np.concatenate(([np.uint64(1)], np.cumprod(np.full(size - 1, _B))))
            ipw = np.concatenate(([np.uint64(1)], np.cumprod(np.full(size - 1, _B_INV))))
        _POW, _IPOW = pw, ipw  # swapped in whole: readers on other threads see either pair
    return _POW, _IPOW


def kgram_hashes(tokens: np.ndarray, k: int = ANCHOR_K) -> np.ndarray:
    """64-bit hash of every k-gram (``len(tokens) - k + 1`` of them)."""
    t = np.asarray(tokens, dtype=np.uint64)
    n = t.size
    if n < k:
        return np.zeros(0, dtype=np.uint64)
    pw, ipw = _powers(n)
    with np.errstate(over="ignore"):
        s = np.empty(n + 1, dtype=np.uint64)
        s[0] = 0
        np.cumsum((t + _C) * pw[:n], out=s[1:])
        h = (s[k:] - s[:-k]) * ipw[: n - k + 1]
    return _fmix64(h)


def window_argmins(h: np.ndarray, w: int) -> np.ndarray:
    """Position of the rightmost minimum of every window ``h[i : i + w]`` (``h.size >= w``).

    Sparse-table doubling: the best of ``[i, i + 2s)`` is the better of two halves, the right
    one winning ties (its position is never smaller), then one overlapping pair covers ``w``.
    O(n log w) in a handful of vector operations."""
    best = np.arange(h.size)
    s = 1
    while 2 * s <= w:
        a, b = best[:-s], best[s:]
        best = np.where(h[b] <= h[a], b, a)
        s *= 2
    m = h.size - w + 1
    a, b = best[:m], best[w - s : w - s + m]
    return np.where(h[b] <= h[a], b, a)


def winnow(
    tokens: np.ndarray, k: int = ANCHOR_K, w: int = ANCHOR_W
) -> tuple[np.ndarray, np.ndarray]:
    """Selected (positions, hashes): the rightmost minimal k-gram of every window of ``w``."""
    h = kgram_hashes(tokens, k)
    if h.size == 0:
        return np.zeros(0, dtype=np.int64), h
    if h.size <= w:
        pos = np.array([h.size - 1 - int(np.argmin(h[::-1]))])
        return pos, h[pos]
    # the rightmost minimum never moves left as the window slides, so the distinct
    # positions are where it changes (no sort)
    am = window_argmins(h, w)
    keep = np.empty(am.size, dtype=bool)
    keep[0] = True
    np.not_equal(am[1:], am[:-1], out=keep[1:])
    pos = am[keep]
    return pos, h[pos]


def near_chunk_keys(tokens: np.ndarray) -> np.ndarray:
    """``[n_blocks, NEAR_CHUNKS]`` keys: a hash of each quarter of every block. Two blocks within
    token-Hamming distance 3 agree on at least one chunk key (pigeonhole)."""
    arr = np.asarray(tokens)
    n, bs = arr.shape
    out = np.zeros((n, NEAR_CHUNKS), dtype=np.uint64)
    if n == 0:
        return out
    bounds = np.linspace(0, bs, NEAR_CHUNKS + 1).astype(int)
    for c in range(NEAR_CHUNKS):
        part = arr[:, bounds[c] : bounds[c + 1]].astype(np.uint64)
        x = part ^ _lane_constants(part.shape[1], seed=0x51F0 + c)
        out[:, c] = _fmix64(_fmix64(x).sum(axis=1, dtype=np.uint64))
    return out
