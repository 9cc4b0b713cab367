"""The single-or-many helper the index stores share keeps its invariants under any sequence
of operations (checked against a plain dict of sets)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvforge.index.stores import ArrayMultiMap, OwnerTable, mm_add, mm_discard, mm_values

KEYS, VALS = 6, 5
ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "discard", "add_all", "discard_all"]),
        st.integers(0, KEYS - 1),
        st.integers(0, VALS - 1),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_array_multimap_is_a_dict_of_sets(script: list[tuple[str, int, int]]) -> None:
    mm = ArrayMultiMap(counted=True)
    mm.grow(KEYS)
    model: dict[int, set[int]] = {k: set() for k in range(KEYS)}
    for op, key, val in script:
        held = val in model[key]
        if op == "add" and not held:
            mm.add(key, val)
            model[key].add(val)
        elif op == "discard" and held:
            mm.discard(key, val)
            model[key].discard(val)
        elif op == "add_all":  # val joins every key that holds something and lacks it
            keys = [k for k in range(KEYS) if model[k] and val not in model[k]]
            mm.add_all(np.asarray(keys, dtype=np.int64), val)
            for k in keys:
                model[k].add(val)
        elif op == "discard_all":
            keys = [k for k in range(KEYS) if val in model[k]]
            mm.discard_all(np.asarray(keys, dtype=np.int64), val)
            for k in keys:
                model[k].discard(val)
        for k in range(KEYS):
            assert set(mm.values(k)) == model[k]
            assert int(mm.count[k]) == len(model[k])
            assert (k in mm.rest) == (len(model[k]) >= 2)
            first = int(mm.first[k])
            assert (first in model[k]) if model[k] else first == -1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 4)), max_size=50))
def test_the_dict_form_is_a_dict_of_sets(script: list[tuple[bool, int, int]]) -> None:
    d: dict[int, int | set[int]] = {}
    model: dict[int, set[int]] = {}
    for add, key, val in script:
        if add:
            mm_add(d, key, val)
            model.setdefault(key, set()).add(val)
        else:
            mm_discard(d, key, val)
            model.get(key, set()).discard(val)
        for k in range(4):
            assert set(mm_values(d.get(k))) == model.get(k, set())
            assert (k in d) == bool(model.get(k))
            assert isinstance(d.get(k), int) == (len(model.get(k, ())) == 1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.text(max_size=3)), max_size=120))
def test_owner_ranks_sort_the_live_names(script: list[tuple[bool, str]]) -> None:
    """``rank`` orders the live owners exactly as sorting their names would, through adds
    and forgets (ids are reused), so a query can sort owners by rank instead of by name."""
    t = OwnerTable()
    live: dict[int, str] = {}
    for add, name in script:
        if add or not live:
            live[t.add(name)] = name
        else:
            oid = sorted(live)[len(name) % len(live)]
            t.forget(oid)
            del live[oid]
        ids = list(live)
        ranks = t.rank[ids].tolist()
        assert sorted(ranks) == list(range(len(ids)))  # a permutation of 0..n-1
        by_rank = [live[o] for _, o in sorted(zip(ranks, ids, strict=True))]
        assert by_rank == sorted(live.values())
        assert all(r == -1 for o, r in enumerate(t.rank.tolist()) if o not in live)
        assert t.ranks == len(live)
        assert [t.names[o] for o in ids] == [live[o] for o in ids]
