"""Shared content at other positions (spans) and near-duplicate blocks, against brute force."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvforge import PromptTokenizer, SyncMatcher
from kvforge.index.anchors import GUARANTEED_SPAN, winnow
from kvforge.route import EngineConfig, Router
from kvforge.route.shared import open_residency

ROOT = Path(__file__).resolve().parents[1]


def brute_spans(q: list[int], owners: dict[str, list[int]], bs: int) -> set[tuple]:
    """Every maximal diagonal run of >= 32 equal tokens between the query and each owner's
    indexed (full-block) tokens, except the prefix run at (0, 0)."""
    out = set()
    for name, toks in owners.items():
        o = toks[: len(toks) // bs * bs]
        for diag in range(-len(o) + 1, len(q)):
            run = 0
            a = max(0, diag)
            for qi in range(a, min(len(q), len(o) + diag) + 1):
                same = qi < min(len(q), len(o) + diag) and q[qi] == o[qi - diag]
                if same:
                    run += 1
                    continue
                if run >= GUARANTEED_SPAN and not (diag == 0 and qi - run == 0):
                    out.add((name, qi - run, qi - run - diag, run))
                run = 0
    return out


def _spans(m: SyncMatcher, q: list[int], **kw) -> set[tuple]:
    r = m.find_reusable_blocks(q, **kw)
    return {(s.owner, s.query_start, s.owner_start, s.length) for s in r.moved_spans}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_spans_equal_brute_force_on_random_prompts(index_url, data: st.DataObject) -> None:
    rnd = random.Random(data.draw(st.integers(0, 10**6)))
    vocab = data.draw(st.sampled_from([3, 50, 5000]))  # tiny vocabularies: many repeats

    def toks(n: int) -> list[int]:
        return [rnd.randrange(vocab) for _ in range(n)]

    doc = toks(rnd.randint(20, 120))
    owners = {
        f"a{i}": toks(rnd.randint(0, 40)) + doc + toks(rnd.randint(0, 40))
        for i in range(rnd.randint(1, 3))
    }
    m = SyncMatcher(block_size=16, index=index_url())
    for name, t in owners.items():
        m.index_prompt(name, t)
    q = toks(rnd.randint(0, 50)) + doc[rnd.randint(0, 10) :] + toks(rnd.randint(0, 30))
    assert _spans(m, q) == brute_spans(q, owners, 16)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_spans_equal_brute_force_when_owners_share_paths(data: st.DataObject) -> None:
    """Owners that share a prefix at different depths (one block tree, many branches), a
    document after it or elsewhere, re-indexed and cleared owners: the class-based search over
    the tree finds exactly the brute-force runs of every owner."""
    rnd = random.Random(data.draw(st.integers(0, 10**6)))
    bs = data.draw(st.sampled_from([4, 8, 16]))
    vocab = data.draw(st.sampled_from([2, 6, 40, 5000]))

    def toks(n: int) -> list[int]:
        return [rnd.randrange(vocab) for _ in range(n)]

    base = toks(rnd.randint(40, 200))
    doc = base[rnd.randint(0, 30) :][: rnd.randint(32, 120)]
    m = SyncMatcher(block_size=bs)
    owners: dict[str, list[int]] = {}
    for i in range(rnd.randint(1, 8)):
        depth = rnd.randint(0, len(base))
        tail = rnd.choice([toks(rnd.randint(0, 60)), doc, toks(rnd.randint(0, 9)) + doc, []])
        owners[f"a{i}"] = base[:depth] + tail
    salts = {name: rnd.choice([None, None, "s1", "s2"]) for name in owners}  # spans ignore salts
    for name, t in owners.items():
        m.index_prompt(name, t, cache_salt=salts[name])
    for name in list(owners):  # churn: the postings of freed blocks must go with them
        if rnd.random() < 0.3:
            m.clear_agent(name)
            del owners[name]
        elif rnd.random() < 0.3:
            owners[name] = owners[name][: rnd.randint(0, len(owners[name]))] + toks(20)
            m.index_prompt(name, owners[name], cache_salt=salts[name])
    q = rnd.choice([[], toks(rnd.randint(1, 40))]) + base[rnd.randint(0, 20) :]
    q = q[: rnd.randint(0, len(q))] + rnd.choice([[], doc, toks(30)])
    r = m.find_reusable_blocks(q, cache_salt=rnd.choice([None, "s1"]))
    assert not r.truncated
    got = {(s.owner, s.query_start, s.owner_start, s.length) for s in r.moved_spans}
    assert got == brute_spans(q, owners, bs)


def test_span_postings_leave_with_their_blocks() -> None:
    rng = np.random.default_rng(3)
    m = SyncMatcher()
    system = rng.integers(0, 1000, 700).tolist()
    for i in range(20):
        m.index_prompt(f"a{i}", system[: 30 * i] + rng.integers(0, 1000, 300).tolist())
    t = m.index._tenants["default"]
    assert len(t.anchors.postings) > 0
    for i in range(20):
        m.clear_agent(f"a{i}")
    assert "default" not in m.index._tenants  # the tenant and all its postings are gone
    m.index_prompt("b", system)
    m.index_prompt("c", system[:333] + [5] * 40)
    m.clear_agent("c")
    only_b = SyncMatcher()
    only_b.index_prompt("b", system)

    def by_depth(t) -> dict[int, set[tuple[int, int]]]:  # block ids differ: compare depths
        vals = {h: v if isinstance(v, set) else {v} for h, v in t.anchors.postings.post.items()}
        return {
            h: {(int(t.blocks.depth[p >> 32]), p & 0xFFFFFFFF) for p in v} for h, v in vals.items()
        }

    mine, ref = m.index._tenants["default"], only_b.index._tenants["default"]
    assert by_depth(mine) == by_depth(ref) and not mine.anchors.postings.omitted


def test_spans_on_real_text_and_cacheblend_budget(index_url) -> None:
    tk = PromptTokenizer.qwen3()
    doc = (ROOT / "src/kvforge/tokenize/data/qwen3/LICENSE").read_text()[:6000]
    m = SyncMatcher(tokenizer=tk, index=index_url())
    a = tk.encode_text("You are the retriever.\n\n" + doc).token_ids
    m.index_prompt("retriever", list(a))
    q = list(tk.encode_text("Critic here. Please check this document:\n" + doc).token_ids)
    got = _spans(m, q)
    assert got == brute_spans(q, {"retriever": list(a)}, 16)
    r = m.find_reusable_blocks(q)
    top = r.moved_spans[0]
    assert top.owner == "retriever" and top.length > 1000
    assert q[top.query_start : top.query_start + top.length] == list(
        a[top.owner_start : top.owner_start + top.length]
    )
    assert r.exact_blocks == 0 and all(b.kind != "exact" for b in r.blocks)
    assert r.moved_tokens >= top.length - 16 and r.recompute_tokens == -(
        -r.moved_tokens * 15 // 100
    )


def test_winnowing_guarantee() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        shared = rng.integers(0, 100, GUARANTEED_SPAN)
        x = np.concatenate(
            [rng.integers(0, 100, rng.integers(0, 40)), shared, rng.integers(0, 100, 20)]
        )
        y = np.concatenate([rng.integers(0, 100, rng.integers(0, 40)), shared])
        hx, hy = set(winnow(x)[1].tolist()), set(winnow(y)[1].tolist())
        assert hx & hy


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=300))
def test_winnowing_selects_the_rightmost_minimum_of_every_window(tokens: list[int]) -> None:
    """Against a brute force over every window, on low-entropy inputs (repeated k-grams tie):
    the distinct positions, in order."""
    from kvforge.index.anchors import ANCHOR_K, ANCHOR_W, kgram_hashes

    t = np.asarray(tokens, dtype=np.uint32)
    h = kgram_hashes(t, ANCHOR_K).tolist()
    want: list[int] = []
    for i in range(max(len(h) - ANCHOR_W + 1, 1 if h else 0)):
        win = h[i : i + ANCHOR_W]
        p = i + max(j for j, v in enumerate(win) if v == min(win))
        if not want or want[-1] != p:
            want.append(p)
    pos, hashes = winnow(t)
    assert pos.tolist() == sorted(set(want))
    assert hashes.tolist() == [h[p] for p in pos.tolist()]


def _brute_near(q: np.ndarray, rows: np.ndarray, r: int) -> int | None:
    d = (rows != q).sum(axis=1)
    d = d[(d > 0) & (d <= r)]
    return int(d.min()) if d.size else None


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_near_radius_search_equals_brute_force(radius: int, index_url) -> None:
    rng = np.random.default_rng(radius)
    base = rng.integers(0, 30, (200, 16))  # small vocabulary: many close pairs
    m = SyncMatcher(near_radius=radius, index=index_url())
    for i in range(0, 200, 10):
        m.index_prompt(f"o{i}", base[i : i + 10].ravel().tolist())
    for _ in range(30):
        q = base[rng.integers(0, 200, 8)].copy()
        k = rng.integers(0, 5, 8)
        for row, kk in zip(q, k, strict=True):
            row[rng.choice(16, kk, replace=False)] = rng.integers(0, 30, kk)
        r = m.find_reusable_blocks(rng.integers(100, 200, 16).tolist() + q.ravel().tolist())
        for b in r.blocks[1:]:
            want = _brute_near(q[b.index - 1], base, radius)
            if b.kind in ("moved", "exact"):
                continue
            assert (b.distance if b.kind == "near" else None) == want, (b, want)
            if b.kind == "near":
                for pos, qtok, tok in b.diff:
                    assert q[b.index - 1][pos] == qtok != tok


def test_near_finds_small_edits_and_explains_them(index_url) -> None:
    tk = PromptTokenizer.qwen3()
    text = (
        "Meeting notes for 2026-11-27. Attendees: Alice, Bob. The planner proposed a "
        "token bucket; the critic asked for a Redis outage drill. "
    ) * 8
    m = SyncMatcher(tokenizer=tk, index=index_url())
    m.index_prompt("notes", text)
    q = text.replace("2026-11-27", "2026-11-28")
    r = m.find_reusable_blocks(q)
    kinds = [b.kind for b in r.blocks]
    assert "near" in kinds and kinds[0] == "near"
    near = next(b for b in r.blocks if b.kind == "near")
    assert near.distance == 1 and near.owners == ("notes",)
    assert tk.decode([near.diff[0][1]]) == "8" and tk.decode([near.diff[0][2]]) == "7"


def test_fix_advice_for_a_name_early_in_a_template(index_url) -> None:
    tk = PromptTokenizer.qwen3()
    shared = (ROOT / "src/kvforge/tokenize/data/qwen3/LICENSE").read_text()[:4000]
    m = SyncMatcher(tokenizer=tk, index=index_url())
    m.index_prompt("planner", "You are agent PLANNER.\n" + shared)
    r = m.find_reusable_blocks("You are agent CRITIC-7.\n" + shared, exclude_agent="critic")
    assert r.fixes, r.moved_spans[:2]
    fix = r.fixes[0]
    assert fix.owner == "planner" and fix.gain_tokens > 500
    assert "CRIT" in fix.breaking_text and "put it after them" in fix.advice


def test_spans_and_near_respect_tenants_exclusion_and_clearing(index_url) -> None:
    rng = np.random.default_rng(5)
    doc = rng.integers(0, 150000, 200).tolist()
    m = SyncMatcher(index=index_url())
    m.index_prompt("a", [1, 2, 3, *doc], tenant="t1")
    m.index_prompt("a:system", [9, *doc], tenant="t2")
    q = [7, 7, 7, 7, 7, *doc]
    assert {s.owner for s in m.find_reusable_blocks(q, tenant="t1").moved_spans} == {"a"}
    assert {s.owner for s in m.find_reusable_blocks(q, tenant="t2").moved_spans} == {"a:system"}
    assert m.find_reusable_blocks(q, tenant="t2", exclude_agent="a").moved_spans == []
    assert m.find_reusable_blocks(q, tenant="t3").moved_spans == []
    m.index_prompt("a", [4] * 40, tenant="t1")  # re-index drops the old anchors
    assert m.find_reusable_blocks(q, tenant="t1").moved_spans == []
    m.clear_agent("a:system", tenant="t2")
    assert m.find_reusable_blocks(q, tenant="t2").moved_spans == []
    edited = list(doc[:48])
    edited[3] += 1
    m.index_prompt("b", doc[:48], tenant="t1")
    assert next(b.kind for b in m.find_reusable_blocks(edited, tenant="t1").blocks) == "near"
    m.clear_agent("b", tenant="t1")
    assert next(b.kind for b in m.find_reusable_blocks(edited, tenant="t1").blocks) == "none"


def _common_blocks(a: list[int], b: list[int], bs: int) -> int:
    """Leading full blocks on which ``a`` and ``b`` agree token for token."""
    n = 0
    while (n + 1) * bs <= min(len(a), len(b)) and a[n * bs : (n + 1) * bs] == b[
        n * bs : (n + 1) * bs
    ]:
        n += 1
    return n


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_no_query_of_one_tenant_ever_sees_another(index_url, data: st.DataObject) -> None:
    """Spans, moved and near blocks and exact prefixes stay inside the caller's tenant; and
    with per-tenant salts (SECURITY.md), no engine is credited with another tenant's blocks."""
    rnd = random.Random(data.draw(st.integers(0, 10**6)))
    doc = [rnd.randrange(40) for _ in range(rnd.randint(40, 120))]
    url = index_url()
    m = SyncMatcher(block_size=16, index=url)
    router = Router(
        [EngineConfig("e0"), EngineConfig("e1")], residency=open_residency(url), speculative_ttl=0
    )
    held: dict[str, list[list[int]]] = {"A": [], "B": []}
    for i in range(rnd.randint(1, 4)):
        tenant = rnd.choice(["A", "B"])
        # often no noise: then the tenants' prompts share whole prefixes with each other
        noise = [] if rnd.random() < 0.4 else [rnd.randrange(40) for _ in range(rnd.randint(1, 30))]
        m.index_prompt(f"{tenant.lower()}{i}", noise + doc, tenant=tenant)
        # the engine serving this tenant caches the prompt under the tenant's salt
        seq = m.blocks(m.tokenize(noise + doc), cache_salt=f"salt-{tenant}")
        router.residency.store("e0", seq.chain_keys.tolist())
        held[tenant].append(noise + doc)
    q = ([] if rnd.random() < 0.5 else [rnd.randrange(40) for _ in range(rnd.randint(1, 20))]) + doc
    for tenant in ("A", "B"):
        d = router.route_tokens(q, cache_salt=f"salt-{tenant}", speculate=False)
        # exactly what the tenant's own prompts explain: leading blocks equal token for token
        own = max((_common_blocks(q, p, 16) for p in held[tenant]), default=0)
        own = min(own, (len(q) - 1) // 16)  # the engine recomputes the last token (vLLM)
        assert d.cached_blocks == own, (tenant, d.cached_blocks, own)
    for tenant in ("A", "B"):
        r = m.find_reusable_blocks(q, tenant=tenant)
        seen = set(r.prefix_blocks_by_owner) | {s.owner for s in r.moved_spans}
        seen |= {o for b in r.blocks for o in b.owners}
        seen |= {f.owner for f in r.fixes}
        if r.best_owner:
            seen.add(r.best_owner)
        assert all(o.startswith(tenant.lower()) for o in seen), (tenant, seen)
