"""A compact uint64 → int32 hash map with batch verbs, backed by two numpy arrays.

Why not a dict: a Python dict of int keys costs ~100 bytes per entry (key object, value
object, table slot); this table costs 12 bytes per slot and answers a batch of lookups with a
handful of vectorized probe rounds, so a 512-block query costs tens of microseconds.

Open addressing with linear probing; keys are hash outputs (uniform), so the slot is the key's
low bits. ``EMPTY`` ends a probe sequence, ``TOMBSTONE`` (a deleted slot) does not. The table
rebuilds itself when live + deleted slots exceed ``MAX_LOAD``.
"""

from __future__ import annotations

import numpy as np

EMPTY = -1
TOMBSTONE = -2
MAX_LOAD = 0.5
SCALAR_TAIL = 24  # finish the last few probes in Python: cheaper than more numpy rounds


class U64Table:
    """Map from uint64 keys to non-negative int32 values. Not thread-safe (callers lock)."""

    __slots__ = ("_keys", "_live", "_mask", "_tomb", "_vals")

    def __init__(self, capacity: int = 1024):
        cap = 1 << max(4, int(capacity - 1).bit_length())
        self._keys = np.zeros(cap, dtype=np.uint64)
        self._vals = np.full(cap, EMPTY, dtype=np.int32)
        self._mask = np.uint64(cap - 1)
        self._live = 0
        self._tomb = 0

    def __len__(self) -> int:
        return self._live

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._vals.nbytes

    def _probe(self, keys: np.ndarray) -> np.ndarray:
        """Slot holding each key, or -1 when absent."""
        n = keys.shape[0]
        out = np.full(n, -1, dtype=np.int64)
        if n == 0 or self._live == 0:
            return out
        slot = (keys & self._mask).astype(np.int64)
        pending = np.arange(n)
        tkeys, tvals, mask = self._keys, self._vals, int(self._mask)
        while pending.size > SCALAR_TAIL:
            s = slot[pending]
            v = tvals[s]
            hit = (v >= 0) & (tkeys[s] == keys[pending])
            out[pending[hit]] = s[hit]
            cont = (v != EMPTY) & ~hit
            pending = pending[cont]
            slot[pending] = (s[cont] + 1) & mask
        for i in pending.tolist():  # the last few probes, one key at a time
            key, j = keys[i], int(slot[i])
            while True:
                val = int(tvals[j])
                if val == EMPTY:
                    break
                if val >= 0 and tkeys[j] == key:
                    out[i] = j
                    break
                j = (j + 1) & mask
        return out

    def get(self, keys: np.ndarray) -> np.ndarray:
        """Value of each key (int32), ``-1`` where absent."""
        slots = self._probe(keys)
        out = np.full(keys.shape[0], -1, dtype=np.int32)
        found = slots >= 0
        out[found] = self._vals[slots[found]]
        return out

    def insert(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Insert keys that are absent and pairwise distinct (the caller guarantees it)."""
        n = keys.shape[0]
        if n == 0:
            return
        if (self._live + self._tomb + n) > MAX_LOAD * self._vals.shape[0]:
            self._rebuild(self._live + n)
        self._place(keys, vals.astype(np.int32, copy=False))
        self._live += n

    def _place(self, keys: np.ndarray, vals: np.ndarray) -> None:
        tkeys, tvals, mask = self._keys, self._vals, int(self._mask)
        slot = (keys & self._mask).astype(np.int64)
        pending = np.arange(keys.shape[0])
        while pending.size:
            s = slot[pending]
            free = tvals[s] < 0
            cand, cs = pending[free], s[free]
            # Several keys may probe the same free slot in one round: the first one wins.
            uniq, first = np.unique(cs, return_index=True)
            win = cand[first]
            self._tomb -= int(np.count_nonzero(tvals[uniq] == TOMBSTONE))
            tkeys[uniq] = keys[win]
            tvals[uniq] = vals[win]
            placed = np.zeros(keys.shape[0], dtype=bool)
            placed[win] = True
            pending = pending[~placed[pending]]
            slot[pending] = (slot[pending] + 1) & mask

    def delete(self, keys: np.ndarray) -> None:
        """Remove present keys (absent ones are ignored)."""
        slots = self._probe(keys)
        slots = slots[slots >= 0]
        if slots.size == 0:
            return
        self._vals[slots] = TOMBSTONE
        self._live -= slots.size
        self._tomb += slots.size
        if self._tomb > self._vals.shape[0] // 4:
            self._rebuild(self._live)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        live = self._vals >= 0
        return self._keys[live].copy(), self._vals[live].copy()

    def _rebuild(self, need: int) -> None:
        keys, vals = self.items()
        cap = 16
        while need > MAX_LOAD * cap / 2:  # half full at most, so growth is amortized
            cap *= 2
        self._keys = np.zeros(cap, dtype=np.uint64)
        self._vals = np.full(cap, EMPTY, dtype=np.int32)
        self._mask = np.uint64(cap - 1)
        self._tomb = 0
        self._place(keys, vals)
