"""Residency from events against a reference model, and router choices on built clusters."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvforge import InvalidInputError
from kvforge.blocks import BlockHasher, LoRA, chain_keys
from kvforge.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from kvforge.route import EngineConfig, ResidencyIndex, Router

ENGINES = ["e0", "e1", "e2"]
MEDIA = ["GPU", "CPU"]
hashes = st.lists(st.integers(0, 12), min_size=1, max_size=5)
ops = st.one_of(
    st.tuples(st.just("store"), st.sampled_from(ENGINES), st.sampled_from(MEDIA), hashes),
    st.tuples(st.just("remove"), st.sampled_from(ENGINES), st.sampled_from(MEDIA), hashes),
    st.tuples(st.just("clear"), st.sampled_from(ENGINES), st.just(""), st.just([])),
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(ops, max_size=40), st.lists(st.lists(st.integers(0, 12), max_size=8), max_size=5))
def test_residency_matches_reference(new_residency, seq_ops, queries) -> None:
    res = new_residency()
    ref: dict[tuple[str, str], Counter[int]] = {(e, m): Counter() for e in ENGINES for m in MEDIA}
    for op, eng, medium, hs in seq_ops:
        if op == "store":
            res.apply(eng, KVEventBatch(0.0, [BlockStored(block_hashes=hs, medium=medium)]))
            ref[(eng, medium)].update(hs)
        elif op == "remove":
            res.apply(eng, KVEventBatch(0.0, [BlockRemoved(block_hashes=hs, medium=medium)]))
            for h in hs:
                if ref[(eng, medium)][h] > 0:
                    ref[(eng, medium)][h] -= 1
        else:
            res.apply(eng, KVEventBatch(0.0, [AllBlocksCleared()]))
            for m in MEDIA:
                ref[(eng, m)].clear()
    for keys in queries:
        got = res.prefix_scores(keys, ENGINES)
        for e in ENGINES:
            n, score = 0, 0.0
            for h in keys:
                w = max((res.tier_weights[m] for m in MEDIA if ref[(e, m)][h] > 0), default=None)
                if w is None:
                    break
                n += 1
                score += w
            assert got[e].blocks == n
            assert got[e].score == pytest.approx(score)


def _keys(tokens, **kw) -> list[int]:
    return chain_keys(BlockHasher().chain(tokens, **kw)).tolist()


PROMPT = list(range(1000, 1000 + 16 * 40))


def test_longest_prefix_wins_and_tiers_weigh(new_residency) -> None:
    r = Router(
        residency=new_residency(), engines=[EngineConfig(e) for e in ENGINES], speculative_ttl=0
    )
    r.residency.store("e1", _keys(PROMPT)[:30])
    r.residency.store("e2", _keys(PROMPT)[:20])
    d = r.route_tokens(PROMPT)
    assert (d.engine, d.cached_blocks, d.num_blocks) == ("e1", 30, 40)
    r.residency.store("e2", _keys(PROMPT)[:36], medium="CPU")  # 36 blocks, 16 of them on CPU
    d = r.route_tokens(PROMPT)
    assert d.engine == "e2" and d.scores["e2"] == pytest.approx(20 + 16 * 0.8)


def test_load_trades_off_against_cached_blocks(new_residency) -> None:
    r = Router(
        residency=new_residency(),
        engines=[EngineConfig(e) for e in ENGINES],
        speculative_ttl=0,
        load_weight=1.0,
    )
    r.residency.store("e1", _keys(PROMPT)[:30])
    assert r.route_tokens(PROMPT, loads={"e1": 20}).engine == "e1"  # 10 uncached + 20 < 40
    assert r.route_tokens(PROMPT, loads={"e1": 35}).engine != "e1"  # 10 + 35 > 40


def test_balance_guard_skips_a_hot_replica(new_residency) -> None:
    r = Router(
        residency=new_residency(),
        engines=[EngineConfig(e) for e in ENGINES],
        speculative_ttl=0,
        load_weight=0.0,
        balance_rel=1.5,
        balance_abs=100,
    )
    r.residency.store("e1", _keys(PROMPT))
    assert r.route_tokens(PROMPT, loads={"e1": 150, "e0": 0, "e2": 0}).engine == "e1"  # ≤ 175
    d = r.route_tokens(PROMPT, loads={"e1": 500, "e0": 0, "e2": 0})  # limit 1.5*166+100=350
    assert d.engine != "e1" and "overloaded" in d.reason
    # all over the limit: nobody is skipped
    assert r.route_tokens(PROMPT, loads={"e1": 500}, engines=["e1"]).engine == "e1"


def test_route_decision_matches_a_direct_computation(new_residency) -> None:
    """Scores equal the leading blocks each engine holds, computed without the router."""
    r = Router(
        residency=new_residency(), engines=[EngineConfig(e) for e in ENGINES], speculative_ttl=0
    )
    keys = _keys(PROMPT)
    held = {"e0": 3, "e1": 17, "e2": 40}
    for e, n in held.items():
        r.residency.store(e, keys[:n])
    r.residency.remove("e2", [keys[5]])  # a hole: e2's prefix now ends at block 5
    d = r.route_tokens(PROMPT)
    assert d.scores == {"e0": 3, "e1": 17, "e2": 5}
    assert d.engine == "e1"


def test_cold_siblings_land_together_until_the_speculation_expires(new_residency) -> None:
    r = Router(
        residency=new_residency(), engines=[EngineConfig(e) for e in ENGINES], speculative_ttl=2.0
    )
    first = r.route_tokens(PROMPT, now=100.0)
    assert first.cached_blocks == 0
    sibling = r.route_tokens([*PROMPT, 1, 2, 3], now=100.5)
    assert sibling.engine == first.engine and sibling.cached_blocks >= 32
    later = r.route_tokens(PROMPT, now=103.0, speculate=False)
    assert later.cached_blocks == 0


def test_salts_and_loras_are_part_of_the_key(new_residency) -> None:
    cfgs = [EngineConfig("e0"), EngineConfig("e1", loras={"sql": "/adapters/sql"})]
    r = Router(residency=new_residency(), engines=cfgs, speculative_ttl=0)
    r.residency.store("e0", _keys(PROMPT, cache_salt="tenant-a"))
    # all 40 blocks held; vLLM recomputes the last token, so it skips 39 (the last-token rule)
    assert r.route_tokens(PROMPT, cache_salt="tenant-a").cached_blocks == 39
    assert r.route_tokens([*PROMPT, 7], cache_salt="tenant-a").cached_blocks == 40
    assert r.route_tokens(PROMPT, cache_salt="tenant-b").cached_blocks == 0
    assert r.route_tokens(PROMPT).cached_blocks == 0
    r.residency.store("e1", _keys(PROMPT, lora=LoRA("sql", "/adapters/sql")))
    d = r.route_tokens(PROMPT, lora="sql")
    assert (d.engine, d.cached_blocks) == ("e1", 39)
    with pytest.raises(InvalidInputError, match="LoRA"):
        r.route_tokens(PROMPT, lora="unknown")


def test_engines_with_other_hash_configs(new_residency) -> None:
    cfgs = [EngineConfig("a", hash_algo="xxhash", hash_seed="0"), EngineConfig("b", block_size=32)]
    r = Router(residency=new_residency(), engines=cfgs, speculative_ttl=0)
    r.residency.store(
        "a", chain_keys(BlockHasher("xxhash", hash_seed="0").chain(PROMPT)[:10]).tolist()
    )
    r.residency.store("b", chain_keys(BlockHasher(block_size=32).chain(PROMPT)[:8]).tolist())
    d = r.route_tokens(PROMPT)
    assert d.scores == {"a": 10, "b": 8}
    assert d.engine == "b"  # 12 of 20 blocks of 32 uncached vs 30 of 40 blocks of 16 → cost
    with pytest.raises(InvalidInputError):
        Router([EngineConfig("x"), EngineConfig("x")])


def test_route_text_and_chat(tmp_path, new_residency) -> None:
    r = Router(residency=new_residency(), engines=[EngineConfig(e) for e in ENGINES])
    d1 = r.route(
        [
            {"role": "system", "content": "You are a planner. " * 50},
            {"role": "user", "content": "go"},
        ]
    )
    d2 = r.route(
        [
            {"role": "system", "content": "You are a planner. " * 50},
            {"role": "user", "content": "again"},
        ]
    )
    assert d2.engine == d1.engine and d2.cached_blocks > 0


def test_block_tree_from_golden_events_gives_the_engines_hashes_without_hashing(
    new_residency,
) -> None:
    import json
    from pathlib import Path

    from kvforge.events import decode_batch, normalize_hashes

    golden = json.loads((Path(__file__).parent / "data" / "vllm_kv_events.json").read_text())
    cfg = EngineConfig("pod-a", loras={"agent-lora": "/adapters/agent-lora"})
    r = Router(residency=new_residency(), engines=[cfg, EngineConfig("pod-b")], speculative_ttl=0)
    for msg in golden["int_hash_mode"]["messages"][:5]:
        batch = normalize_hashes(decode_batch(bytes.fromhex(msg["frames_hex"][2])))
        r.residency.apply("pod-a", batch)
    # request B of the capture: LoRA + salt, tokens 1000..1063 (4 blocks)
    toks = list(range(1000, 1064))
    d = r.route_tokens(toks, cache_salt="tenant-42", lora="agent-lora", engines=["pod-a"])
    assert d.cached_blocks == 4 - 1  # all four held; the last block is recomputed
    lora = LoRA("agent-lora", "/adapters/agent-lora")
    want = chain_keys(BlockHasher().chain(toks, cache_salt="tenant-42", lora=lora))
    seq = r._memos[cfg.hash_config()].keys(tuple(toks), "tenant-42", lora)
    group = r._group("pod-a")
    tree = r.residency.tree_keys(group, 16, ["agent-lora", "tenant-42"], toks)
    assert tree == want.tolist()  # the tree returns vLLM's own hashes
    assert seq.num_hashed == 0  # and nothing was hashed to get them
    # request A's two prefill blocks (no salt, no LoRA); removing a block prunes the tree
    a = r.route_tokens(list(range(48)), engines=["pod-a"])
    assert a.cached_blocks == 3 - 1  # block 3 was evicted in batch 4 (BlockRemoved)
    held = r.residency.tree_keys(group, 16, None, list(range(48)))
    assert held == chain_keys(BlockHasher().chain(range(32))).tolist()
    r.residency.apply("pod-a", KVEventBatch(0.0, [AllBlocksCleared()]))
    r.residency.refresh()  # a direct read (not through the router): catch up first
    assert r.residency.tree_keys(group, 16, None, list(range(48))) == []  # nobody holds it


def test_an_engine_whose_events_stop_goes_stale_and_recovers(new_residency) -> None:
    r = Router(
        residency=new_residency(),
        engines=[EngineConfig("e0"), EngineConfig("e1")],
        speculative_ttl=0,
        stale_after=5.0,
    )
    first = r.route_tokens(PROMPT, now=100.0).engine  # new blocks: an event is now expected
    assert r.stale_engines(now=104.0) == []
    assert r.stale_engines(now=106.0) == [first]  # nothing arrived within 5 s
    other = r.route_tokens(PROMPT, now=106.0)
    assert other.engine != first and "stale" in other.reason
    ev = BlockStored(block_hashes=_keys(PROMPT)[:3], medium="GPU")
    r.residency.apply(first, KVEventBatch(0.0, [ev]))  # events resume
    assert r.stale_engines(now=107.0) == []  # the other engine's wait has just begun
    # only stale engines left: they still get traffic
    only = Router(
        residency=new_residency(), engines=[EngineConfig("e0")], speculative_ttl=0, stale_after=1.0
    )
    only.route_tokens(PROMPT, now=0.0)
    assert only.route_tokens(PROMPT, now=10.0).engine == "e0"


def test_a_dry_run_never_marks_an_engine_stale_and_stale_engines_are_probed(
    new_residency,
) -> None:
    r = Router(
        residency=new_residency(),
        engines=[EngineConfig("e0"), EngineConfig("e1")],
        speculative_ttl=2.0,
        stale_after=5.0,
    )
    # a caller asking for advice (nothing forwarded) with made-up loads, many times
    for t in range(0, 60, 3):
        d = r.route_tokens(PROMPT, loads={"e0": 0, "e1": 1e9}, now=float(t), dispatch=False)
        assert d.engine == "e0"
    assert r.stale_engines(now=60.0) == []
    assert r.residency.prefix_scores(_keys(PROMPT), ["e0"], now=60.0)["e0"].blocks == 0
    # a dispatched request whose events never come: stale, then probed once per period
    first = r.route_tokens(PROMPT, loads={"e1": 1e9}, now=100.0).engine
    assert first == "e0" and r.stale_engines(now=106.0) == ["e0"]
    picks = []
    for i in range(12):
        picks.append(r.route_tokens(PROMPT, loads={"e1": 1e9}, now=106.0 + i).engine)
        ev = BlockStored(block_hashes=_keys(PROMPT)[:1], medium="GPU")
        r.residency.apply("e1", KVEventBatch(0.0, [ev]))  # e1's events flow
    assert picks.count("e0") == 2 and r.probes == 2  # probes at 111 s and 117 s, e1 otherwise
    assert picks.index("e0") == 5


def test_an_engine_announcing_more_than_its_pool_is_dropped() -> None:
    res = ResidencyIndex(max_blocks_per_engine=100)
    res.store("e1", list(range(10)))
    res.apply("e0", KVEventBatch(0.0, [BlockStored(block_hashes=list(range(90)))]))
    assert res.prefix_scores(list(range(90)), ["e0"])["e0"].blocks == 90
    res.apply("e0", KVEventBatch(0.0, [BlockStored(block_hashes=list(range(90, 101)))]))
    assert res.prefix_scores(list(range(90)), ["e0"])["e0"].blocks == 0  # flood: dropped
    assert res.overflows == 1
    assert res.prefix_scores(list(range(10)), ["e1"])["e1"].blocks == 10  # others untouched


def test_the_hash_memo_is_per_tenant() -> None:
    """Routing a prompt another tenant routed recently must cost the same as a new one: the
    memo of chain hashes is keyed by the caller's tenant (no timing oracle), and still saves
    the tenant's own repeats."""
    router = Router([EngineConfig("e0")], speculative_ttl=0)
    prompt = list(range(5000, 5000 + 64 * 16))
    router.residency.store("e0", chain_keys(BlockHasher().chain(prompt)).tolist())
    memo = next(iter(router._memos.values()))

    def entries() -> int:
        return len(memo._young) + len(memo._old)

    router.route_tokens(prompt, tenant="acme")
    first = entries()
    assert first >= 32
    router.route_tokens(prompt, tenant="acme")
    assert entries() == first  # acme's repeat: every block from the memo
    d = router.route_tokens(prompt, tenant="globex")
    assert entries() == 2 * first  # hashed again for another tenant
    assert d.cached_blocks == 63  # and the decision is the same (last token recomputed)


def test_speculation_covers_the_prompt_and_yields_to_the_engines_events(new_residency) -> None:
    """A dispatched decision assumes the engine will hold every full block of the prompt; a
    BlockRemoved or AllBlocksCleared for those blocks ends the assumption (vLLM's events are
    the truth), and a BlockStored replaces it with the real thing."""
    r = Router(
        [EngineConfig("e0"), EngineConfig("e1")], residency=new_residency(), speculative_ttl=30.0
    )
    prompt = list(range(3000, 3000 + 16 * 10 + 5))  # 10 full blocks and 5 tokens
    keys = _keys(prompt)
    e = r.route_tokens(prompt, now=100.0).engine  # cold, dispatched: speculates
    assert r.route_tokens(prompt, now=101.0, dispatch=False).cached_blocks == 10  # all of it
    r.residency.apply(e, KVEventBatch(0.0, [BlockRemoved(block_hashes=keys[:1], medium="GPU")]))
    assert r.route_tokens(prompt, now=102.0, dispatch=False).cached_blocks == 0
    # a new guess, then the engine clears: gone at once, not after the TTL
    r.route_tokens(prompt, now=103.0, engines=[e])
    assert r.route_tokens(prompt, now=104.0, dispatch=False).cached_blocks == 10
    r.residency.apply(e, KVEventBatch(0.0, [AllBlocksCleared()]))
    assert r.route_tokens(prompt, now=105.0, dispatch=False).cached_blocks == 0
    # confirmed by a store, then evicted: the real residency decides
    r.route_tokens(prompt, now=106.0, engines=[e])
    r.residency.apply(e, KVEventBatch(0.0, [BlockStored(block_hashes=keys[:4], medium="GPU")]))
    r.residency.apply(e, KVEventBatch(0.0, [BlockRemoved(block_hashes=keys[2:4], medium="GPU")]))
    assert r.route_tokens(prompt, now=107.0, dispatch=False).cached_blocks == 2


# ---- the block tree against a model --------------------------------------------------------

_LETTERS = 2  # block contents: few, so prompts share prefixes and runs meet and part
_first = st.sampled_from([0, 0, 1, 2, 3])  # where an event starts (mostly block 0)
_tree_ops = st.lists(
    st.one_of(
        # (engine, prompt, first block, blocks): one BlockStored with token ids
        st.tuples(
            st.just("store"), st.integers(0, 2), st.integers(0, 5), _first, st.integers(1, 4)
        ),
        st.tuples(st.just("remove"), st.integers(0, 2), st.integers(0, 5), st.integers(0, 5)),
        st.tuples(st.just("clear"), st.integers(0, 2)),
    ),
    min_size=8,
    max_size=60,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(  # a later chunk stored before the chunk that leads to it (found by this test)
    prompts=[[0], [0], [0, 0, 0], [0], [0], [0, 0, 0, 0]],
    ops=[("store", 0, 0, 0, 1), ("store", 0, 5, 2, 2), ("store", 0, 2, 0, 3)],
    slack=65_536,
)
@given(
    prompts=st.lists(
        st.lists(st.integers(0, _LETTERS - 1), min_size=1, max_size=8), min_size=6, max_size=6
    ),
    ops=_tree_ops,
    slack=st.sampled_from([0, 1, 65_536]),
)
def test_block_tree_returns_the_held_stored_prefix(prompts, ops, slack) -> None:
    """The run tree (an event's blocks new to the tree as runs keyed by their first block;
    sweeps drop runs nobody holds a block of) answers what a per-block tree would: block
    ``i`` of a prompt is found iff every block up to it was stored with its token ids and
    some engine holds it now — whatever the events' chunking and order (a later chunk before
    an earlier one, another engine's copies), the removals, the clears and how often the tree
    is swept."""
    hasher = BlockHasher()
    res = ResidencyIndex()
    res.sweep_slack = slack
    group = ("g",)
    for e in range(3):
        res.set_group(f"e{e}", group)
    toks = [[t for c in p for t in [c * 7 + 1] * 16] for p in prompts]
    chains = [chain_keys(hasher.chain(t)).tolist() for t in toks]
    held: dict[int, Counter[int]] = {e: Counter() for e in range(3)}
    stored: set[int] = set()
    for op in ops:
        if op[0] == "store":
            _, e, p, first, n = op
            hs = chains[p][first : first + n]
            if not hs:
                continue
            ev = BlockStored(
                block_hashes=hs,
                parent_block_hash=chains[p][first - 1] if first else None,
                token_ids=toks[p][first * 16 : (first + len(hs)) * 16],
                block_size=16,
                medium="GPU",
            )
            res.apply(f"e{e}", KVEventBatch(0.0, [ev]))
            held[e].update(hs)
            stored.update(hs)
        elif op[0] == "remove":
            _, e, p, i = op
            if i >= len(chains[p]):
                continue
            h = chains[p][i]
            res.apply(f"e{e}", KVEventBatch(0.0, [BlockRemoved(block_hashes=[h], medium="GPU")]))
            if held[e][h]:
                held[e][h] -= 1
        else:
            res.apply(f"e{op[1]}", KVEventBatch(0.0, [AllBlocksCleared()]))
            held[op[1]].clear()
            stored -= {h for h in stored if not any(held[e][h] for e in range(3))}
        # a block nobody holds leaves the model's tree (a per-block tree prunes it)
        stored -= {h for h in stored if not any(held[e][h] for e in range(3))}
    for p, chain in enumerate(chains):
        want = []
        for h in chain:
            if h not in stored:
                break
            want.append(h)
        assert res.tree_keys(group, 16, None, toks[p]) == want


def test_the_block_tree_follows_an_engine_that_hashes_differently_after_a_restart() -> None:
    """Same tokens after the same root, another hash (a restarted engine with another
    PYTHONHASHSEED): the newest run takes the node, and the older hashes are found again
    when an engine stores them again."""
    res = ResidencyIndex()
    for e in ("e0", "e1"):
        res.set_group(e, ("g",))
    toks = list(range(64))
    a = chain_keys(BlockHasher(hash_seed="1").chain(toks)).tolist()
    b = chain_keys(BlockHasher(hash_seed="2").chain(toks)).tolist()
    assert a != b

    def store(engine: str, hashes: list[int]) -> None:
        ev = BlockStored(block_hashes=hashes, token_ids=toks, block_size=16, medium="GPU")
        res.apply(engine, KVEventBatch(0.0, [ev]))

    store("e0", a)
    assert res.tree_keys(("g",), 16, None, toks) == a
    res.apply("e0", KVEventBatch(0.0, [AllBlocksCleared()]))  # restarted ...
    store("e0", b)  # ... hashing with another seed
    assert res.tree_keys(("g",), 16, None, toks) == b
    store("e1", a)  # an engine with the first seed stores the prompt again
    assert res.tree_keys(("g",), 16, None, toks) == a
