"""Index semantics and report truth on constructed cases."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvforge import SyncMatcher
from kvforge.index import U64Table


@pytest.fixture(scope="module")
def tok():
    from kvforge import PromptTokenizer

    return PromptTokenizer.qwen3()


@pytest.fixture
def m(tok, index_url) -> SyncMatcher:
    return SyncMatcher(tokenizer=tok, index=index_url())


def ids(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


SYSTEM = ids(1000, 64)  # 4 blocks shared by every agent


def test_shared_prefix_multi_owner(m: SyncMatcher) -> None:
    m.index_prompt("planner", SYSTEM + ids(5000, 32))
    m.index_prompt("coder", SYSTEM + ids(6000, 32))
    r = m.find_reusable_blocks(SYSTEM + ids(7000, 32))
    assert r.prefix_blocks_by_owner == {"planner": 4, "coder": 4}
    assert [b.kind for b in r.blocks] == ["exact"] * 4 + ["none"] * 2
    assert all(set(b.owners) == {"planner", "coder"} for b in r.blocks[:4])
    assert r.best_owner == "coder"  # tie → smallest name
    assert r.exact_blocks == 4 and r.reusable_tokens == 64
    # the stored tokens are shared, not copied per owner
    assert m.stats()["blocks"] == 8 and m.stats()["owner_blocks"] == 12


def test_same_document_after_other_preamble_is_moved_never_exact(m: SyncMatcher) -> None:
    doc = ids(20000, 96)
    m.index_prompt("retriever", ids(100, 32) + doc)
    r = m.find_reusable_blocks(ids(300, 48) + doc)  # other preamble, also block-aligned
    assert r.prefix_blocks_by_owner == {}
    kinds = [b.kind for b in r.blocks]
    assert kinds == ["none"] * 3 + ["moved"] * 6
    assert r.blocks[3].sources == (("retriever", 2),)
    assert r.best_owner == "retriever" and r.exact_blocks == 0
    assert r.divergence is not None and r.divergence.block_index == 0


def test_reordered_sections(m: SyncMatcher) -> None:
    a, b, c = ids(100, 32), ids(200, 32), ids(300, 32)
    m.index_prompt("x", a + b + c)
    r = m.find_reusable_blocks(a + c + b)
    assert [blk.kind for blk in r.blocks] == ["exact", "exact", "moved", "moved", "moved", "moved"]
    assert r.prefix_blocks_by_owner == {"x": 2}
    d = r.divergence
    assert d is not None and d.owner == "x" and d.block_index == 2 and d.token_index == 32


def _counts(m: SyncMatcher) -> dict:
    # memory figures are approximate (dicts keep their capacity after deletions)
    return {k: v for k, v in m.stats().items() if not k.startswith("memory")}


def test_reindex_replaces_previous_prompt(m: SyncMatcher) -> None:
    m.index_prompt("a", ids(0, 64))
    first = _counts(m)
    again = m.index_prompt("a", ids(0, 64))
    assert _counts(m) == first and again.shared_blocks == 0 and again.new_blocks == 4
    m.index_prompt("a", ids(500, 32))
    assert m.find_reusable_blocks(ids(0, 64)).prefix_blocks_by_owner == {}
    assert m.find_reusable_blocks(ids(500, 32)).prefix_blocks_by_owner == {"a": 2}
    assert m.stats()["blocks"] == 2


def test_clear_agent_keeps_blocks_shared_with_others(m: SyncMatcher) -> None:
    m.index_prompt("a", SYSTEM + ids(9000, 16))
    m.index_prompt("b", SYSTEM)
    assert m.clear_agent("a") == 5
    r = m.find_reusable_blocks(SYSTEM + ids(9000, 16))
    assert r.prefix_blocks_by_owner == {"b": 4}
    assert r.blocks[4].kind == "none"
    assert m.clear_agent("a") == 0
    assert m.clear_agent("b") == 4
    assert m.stats()["blocks"] == 0 and m.stats()["memory_bytes"] == 0


def test_tenants_are_isolated(m: SyncMatcher) -> None:
    m.index_prompt("a", SYSTEM, tenant="acme")
    assert m.find_reusable_blocks(SYSTEM, tenant="globex").prefix_blocks_by_owner == {}
    assert all(b.kind == "none" for b in m.find_reusable_blocks(SYSTEM).blocks)
    assert m.find_reusable_blocks(SYSTEM, tenant="acme").prefix_blocks_by_owner == {"a": 4}
    assert m.clear_agent("a", tenant="globex") == 0
    assert m.get_shared_prefix_hash(SYSTEM, tenant="globex").num_blocks == 0


def test_cache_salt_changes_every_chain_hash(m: SyncMatcher) -> None:
    m.index_prompt("a", SYSTEM, cache_salt="tenant-1")
    r = m.find_reusable_blocks(SYSTEM, cache_salt="tenant-2")
    assert r.prefix_blocks_by_owner == {} and [b.kind for b in r.blocks] == ["moved"] * 4
    assert r.divergence is not None and "cache_salt differs" in r.divergence.reason
    assert m.find_reusable_blocks(SYSTEM, cache_salt="tenant-1").prefix_blocks_by_owner == {"a": 4}


def test_lora_is_part_of_the_key(m: SyncMatcher) -> None:
    m.index_prompt("a", SYSTEM, lora=("sql", "/adapters/sql"))
    assert m.find_reusable_blocks(SYSTEM).prefix_blocks_by_owner == {}
    assert m.find_reusable_blocks(SYSTEM, lora=("sql", "/adapters/sql")).prefix_blocks_by_owner == {
        "a": 4
    }
    assert m.find_reusable_blocks(SYSTEM, lora=("sql", "/other/path")).prefix_blocks_by_owner == {}


def test_role_suffix_exclusion(m: SyncMatcher) -> None:
    m.index_prompt("a1:system", SYSTEM)
    m.index_prompt("a1", SYSTEM + ids(50, 16))
    m.index_prompt("a10", SYSTEM[:32])
    r = m.find_reusable_blocks(SYSTEM + ids(50, 16), exclude_agent="a1")
    assert r.prefix_blocks_by_owner == {"a10": 2}
    # blocks 2-3 are held only by a1 and a1:system, both excluded
    assert [b.kind for b in r.blocks] == ["exact", "exact", "none", "none", "none"]
    assert r.blocks[0].owners == ("a10",)
    r = m.find_reusable_blocks(SYSTEM + ids(50, 16), exclude_agent="a10")
    assert r.prefix_blocks_by_owner == {"a1": 5, "a1:system": 4}


def test_agent_counts_its_own_previous_turn(m: SyncMatcher) -> None:
    m.index_prompt("a", SYSTEM)
    r = m.find_reusable_blocks(SYSTEM + ids(1, 32))
    assert r.prefix_blocks_by_owner == {"a": 4}
    assert m.find_reusable_blocks(SYSTEM, exclude_agent="a").prefix_blocks_by_owner == {}


def test_divergence_explains_with_text(m: SyncMatcher) -> None:
    base = "You are agent PLANNER. Today is 2026-11-27. " + "Follow the tool rules carefully. " * 20
    m.index_prompt("planner", base)
    r = m.find_reusable_blocks(base.replace("PLANNER", "CRITIC"))
    assert r.prefix_blocks_by_owner == {}
    d = r.divergence
    assert d is not None and d.owner == "planner" and d.block_index == 0
    assert "CRIT" in d.query_text and "PLAN" in (d.owner_text or "")
    assert "differs" in d.reason


def test_divergence_when_owner_prompt_ends(m: SyncMatcher) -> None:
    m.index_prompt("short", SYSTEM[:32])
    r = m.find_reusable_blocks(SYSTEM)
    assert r.divergence is not None and r.divergence.owner_text is None
    assert "ends after 2 full blocks" in r.divergence.reason


def test_shared_prefix_hash_is_vllms_chain_hash(m: SyncMatcher) -> None:
    m.index_prompt("a", SYSTEM)
    ph = m.get_shared_prefix_hash(SYSTEM + ids(1, 40))
    chain = m.hasher.chain(SYSTEM)
    assert ph.num_blocks == 4
    assert ph.prefix_hash_hex == chain[3].hex()
    assert ph.first_block_hash_hex == chain[0].hex()
    assert ph.prefix_event_hash == int.from_bytes(chain[3][-8:], "big")
    assert m.get_shared_prefix_hash(ids(1, 10)).first_block_hash_hex is None


def test_index_result_reports_hashes(m: SyncMatcher) -> None:
    r = m.index_prompt("a", [*SYSTEM, 7, 7, 7])
    assert r.num_tokens == 67 and r.num_blocks == 4
    assert list(r.block_hashes) == [h.hex() for h in m.hasher.chain(SYSTEM)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), unique=True, max_size=400), st.data())
def test_u64_table_behaves_like_a_dict(keys: list[int], data: st.DataObject) -> None:
    t = U64Table(capacity=16)
    ref: dict[int, int] = {}
    arr = np.asarray(keys, dtype=np.uint64)
    half = len(keys) // 2
    t.insert(arr[:half], np.arange(half))
    ref.update({k: i for i, k in enumerate(keys[:half])})
    gone = data.draw(st.lists(st.sampled_from(keys[:half]), unique=True)) if half else []
    t.delete(np.asarray(gone, dtype=np.uint64))
    for k in gone:
        del ref[k]
    t.insert(arr[half:], np.arange(half, len(keys)))
    ref.update({k: i + half for i, k in enumerate(keys[half:])})
    assert len(t) == len(ref)
    got = t.get(arr)
    assert got.tolist() == [ref.get(k, -1) for k in keys]


def test_the_interface_validates_and_drops_a_tenant(index_url: Callable[[], str]) -> None:
    """``validate`` and ``drop_tenant`` are part of ``BlockIndex``: both backends answer them
    (a Redis replica that follows the feed sees the drop too)."""
    from kvforge.errors import HashCollisionError

    url = index_url()
    a, b = SyncMatcher(index=url), SyncMatcher(index=url)
    prompt = list(range(1000, 1064))
    for name in ("x", "y"):
        a.index_prompt(name, prompt, tenant="t")
    a.index_prompt("z", prompt, tenant="other")
    seq = a.blocks(a.tokenize(prompt))
    a.index.validate("t", seq)  # a prompt already held: nothing to refuse
    forged = a.blocks(a.tokenize(list(range(2000, 2064))))
    forged.chain_keys[1] = seq.chain_keys[1]  # another prefix under a stored chain key
    with pytest.raises(HashCollisionError):
        a.index.validate("t", forged)
    shared = url.startswith("redis")
    if shared:
        assert b.agents(tenant="t") == ["x", "y"]
    a.index.drop_tenant("t")
    assert a.agents(tenant="t") == [] and b.agents(tenant="t") == []
    assert a.agents(tenant="other") == ["z"]
    assert b.agents(tenant="other") == (["z"] if shared else [])
    assert a.find_reusable_blocks(prompt, tenant="t").exact_blocks == 0
