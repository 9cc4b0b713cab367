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
from numpy.lib.stride_tricks import sliding_window_view

from kvforge.blocks.hashing import _fmix64, _lane_constants

ANCHOR_K = 8
ANCHOR_W = 25
GUARANTEED_SPAN = ANCHOR_K + ANCHOR_W - 1  # 32 tokens

NEAR_CHUNKS = 4  # a block's tokens in 4 chunks: distance <= 3 leaves one chunk intact
MAX_NEAR_RADIUS = NEAR_CHUNKS - 1


def kgram_hashes(tokens: np.ndarray, k: int = ANCHOR_K) -> np.ndarray:
    """64-bit hash of every k-gram (``len(tokens) - k + 1`` of them)."""
    t = np.asarray(tokens, dtype=np.uint64)
    if t.size < k:
        return np.zeros(0, dtype=np.uint64)
    win = sliding_window_view(t, k) ^ _lane_constants(k, seed=0xA5C3)
    return _fmix64(_fmix64(win.copy()).sum(axis=1, dtype=np.uint64))


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
    win = sliding_window_view(h, w)[:, ::-1]  # reversed: argmin finds the rightmost minimum
    pos = np.arange(win.shape[0]) + (w - 1 - np.argmin(win, axis=1))
    pos = np.unique(pos)
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
