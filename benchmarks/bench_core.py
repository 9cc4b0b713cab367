"""Core benchmark: tokenization and hashing throughput, match latency vs index size, memory per
indexed block, and the seed matcher side by side.

    python benchmarks/bench_core.py            # full run (about 2-3 minutes on 2 cores)
    python benchmarks/bench_core.py --quick    # smaller sizes, for a smoke check

Prints markdown tables (medians of repeated runs; ratios are measured in the same run).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import pickle
import random
import sys
import time
import tracemalloc
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvforge import PromptTokenizer, SyncMatcher
from kvforge.blocks import BlockHasher, BlockSequence

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT.parent / "shared" / "seed" / "lsh_token_matcher.py"
VOCAB = 151_643


def timeit(fn: Callable[[], Any], repeat: int) -> np.ndarray:
    out = np.empty(repeat)
    for i in range(repeat):
        t = time.perf_counter_ns()
        fn()
        out[i] = time.perf_counter_ns() - t
    return out / 1e6  # ms


def corpus_paragraphs() -> list[str]:
    """Real text to tokenize: the shipped license, this project's sources and docs."""
    files = [ROOT / "src/kvforge/tokenize/data/qwen3/LICENSE", ROOT / "README.md"]
    files += sorted((ROOT / "src/kvforge").rglob("*.py"))
    paras: list[str] = []
    for f in files:
        if f.is_file():
            paras += [p for p in f.read_text("utf-8").split("\n\n") if len(p) > 40]
    return paras


def make_text(paras: list[str], tk: PromptTokenizer, n_tokens: int, rnd: random.Random) -> str:
    parts: list[str] = []
    count = 0
    while count < n_tokens:
        p = rnd.choice(paras)
        parts.append(p)
        count += len(tk.encode_text(p).token_ids)
    return "\n\n".join(parts)


def vllm_style_chain(hasher_root: bytes, ids: Sequence[int], bs: int) -> list[bytes]:
    """vLLM's per-request hashing loop as written there: a per-block call that builds the
    extra keys (none here) and digests sha256(pickle((parent, tuple(block), extra)))."""

    def extra_keys(start: int, end: int) -> Any:
        keys: list[Any] = []
        return tuple(keys) if keys else None

    def hash_block(parent: bytes, block: Sequence[int], extra: Any) -> bytes:
        return hashlib.sha256(pickle.dumps((parent, tuple(block), extra), protocol=5)).digest()

    out: list[bytes] = []
    parent = hasher_root
    for start in range(0, len(ids) - bs + 1, bs):
        block = ids[start : start + bs]
        parent = hash_block(parent, block, extra_keys(start, start + bs))
        out.append(parent)
    return out


def bench_throughput(tk: PromptTokenizer, paras: list[str], reps: int) -> list[str]:
    rnd = random.Random(1)
    hasher = BlockHasher()
    rows = [
        "| prompt | tokenize (tok/s) | kvforge chain hash (ns/tok) | vLLM-style loop (ns/tok) "
        "| ratio | full BlockSequence (ns/tok) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in (1024, 8192, 32768):
        text = make_text(paras, tk, n, rnd)
        # tokenization without the repeated-prompt cache: the raw HF tokenizer
        ids = list(tk._tk.encode(text).ids)[:n]
        t_tok = np.median(timeit(lambda text=text: tk._tk.encode(text), reps))
        n_real = len(tk._tk.encode(text).ids)
        tup = tuple(ids)
        # interleave the two loops so that machine drift hits both alike
        ours_t, ref_t = [], []
        for _ in range(max(reps, 5)):
            ours_t.append(timeit(lambda tup=tup: hasher.chain(tup), 3).min())
            ref_t.append(timeit(lambda ids=ids: vllm_style_chain(hasher.root, ids, 16), 3).min())
        ours, ref = float(np.median(ours_t)), float(np.median(ref_t))
        full = np.median(timeit(lambda tup=tup: BlockSequence(hasher, tup).chain, max(reps, 5)))
        assert vllm_style_chain(hasher.root, ids, 16) == hasher.chain(tup)
        rows.append(
            f"| {n // 1024}k | {n_real / t_tok * 1e3:,.0f} | {ours * 1e6 / n:.0f} | "
            f"{ref * 1e6 / n:.0f} | {ours / ref:.2f}x | {full * 1e6 / n:.0f} |"
        )
    return rows


def agent_prompt(system: list[int], a: int) -> list[int]:
    """Agent ``a``'s 8k-token prompt: the shared 32-block system prompt, then its own tokens
    (regenerated from the agent number, so the benchmark never holds all prompts)."""
    return system + np.random.default_rng([1, a]).integers(0, VOCAB, 8192 - 512).tolist()


def build_index(m: SyncMatcher, n_blocks: int, system: list[int]) -> int:
    agents = max(1, n_blocks // 512)
    for a in range(agents):
        m.index_prompt(f"agent{a}", agent_prompt(system, a))
    return agents


def bench_match(
    sizes: Sequence[int], reps: int, tk: PromptTokenizer, paras: list[str]
) -> list[str]:
    rows = [
        "| indexed blocks | distinct blocks | agents | exact + moved p50 (ms) | p99 (ms) | "
        "full report p50 (ms) | hashing alone p50 (ms) | tokenize 8k text p50 (ms) | "
        "fresh 8k text, end to end p50 (ms) | "
        "exact index B / indexed block | all structures B / indexed block (traced) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    text8k = make_text(paras, tk, 8192, random.Random(7))
    t_tok = np.median(timeit(lambda: tk._tk.encode(text8k), 10))
    for n in sizes:
        rnd = np.random.default_rng(n)
        m = SyncMatcher(tokenizer=tk)
        system = rnd.integers(0, VOCAB, 512).tolist()
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        agents = build_index(m, n, system)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        s = m.stats()
        # query: a known agent's first 232 blocks, then 50 blocks that agent holds elsewhere
        # (moved), then new content: exact + moved + none in one 8k prompt
        src = agent_prompt(system, agents // 2)
        q = src[: 232 * 16] + src[400 * 16 : 450 * 16]
        q = q + rnd.integers(0, VOCAB, 8192 - len(q)).tolist()
        tp = m.tokenizer.encode_ids(q)
        # the prefix analysis (exact + aligned moved blocks); then the full report, which adds
        # near-duplicates and moved spans at any alignment
        m.near_radius, m.find_spans = 0, False
        lat = timeit(lambda m=m, tp=tp: m.match_blocks(tp, m.blocks(tp)), reps)
        m.near_radius, m.find_spans = 2, True
        full = timeit(lambda m=m, tp=tp: m.match_blocks(tp, m.blocks(tp)), max(5, reps // 5))
        hash_t = timeit(lambda m=m, tp=tp: m.blocks(tp).chain, reps)
        r = m.match_blocks(tp, m.blocks(tp))
        assert r.exact_blocks == 232 and r.moved_blocks >= 50, (r.exact_blocks, r.moved_blocks)
        # tokenization of a text never sent before (nothing cached), hashing, the full report
        fresh = [make_text(paras, tk, 8192, random.Random(n * 100 + i)) for i in range(12)]
        e2e = [timeit(lambda m=m, t=t: m.find_reusable_blocks(t), 1)[0] for t in fresh]
        rows.append(
            f"| {s['owner_blocks']:,} | {s['blocks']:,} | {s['agents']:,} | "
            f"{np.median(lat):.2f} | {np.percentile(lat, 99):.2f} | {np.median(full):.2f} | "
            f"{np.median(hash_t):.2f} | {t_tok:.1f} | {np.median(e2e):.1f} | "
            f"{s['memory_bytes_exact_index'] / s['owner_blocks']:.0f} | "
            f"{used / s['owner_blocks']:.0f} |"
        )
        del m
        gc.collect()
    return rows


def varying_depth_index(n_agents: int, rnd: np.random.Generator) -> tuple[SyncMatcher, list[int]]:
    """The shape every multi-agent pipeline has: ``n_agents`` agents, each holding a *different*
    length prefix of one shared 2k-token system prompt, then 6k tokens of its own."""
    m = SyncMatcher()
    system = rnd.integers(0, VOCAB, 2048).tolist()
    for a in range(n_agents):
        depth = int(rnd.integers(0, 2049))
        own = np.random.default_rng([2, a]).integers(0, VOCAB, 6144).tolist()
        m.index_prompt(f"agent{a}", system[:depth] + own)
    return m, system


def bench_varying_depth(agent_counts: Sequence[int], reps: int) -> list[str]:
    """find_reusable_blocks for an 8k query carrying the whole shared prompt, against plain
    sha256 chain hashing of the same tokens (the baseline the targets are stated in)."""
    rows = [
        "| agents | indexed blocks | hashing p50 (ms) | exact + moved p50 (ms) | ratio "
        "| full report p50 (ms) | ratio | spans truncated |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n in agent_counts:
        rnd = np.random.default_rng(n)
        m, system = varying_depth_index(n, rnd)
        queries = [
            m.tokenizer.encode_ids(system + rnd.integers(0, VOCAB, 6144).tolist()) for _ in range(4)
        ]
        hash_t, fast_t, full_t = [], [], []
        cut = False
        for i in range(reps):  # interleaved: drift hits all three alike
            tp = queries[i % len(queries)]
            hash_t.append(timeit(lambda tp=tp, m=m: m.blocks(tp).chain, 1)[0])
            m.near_radius, m.find_spans = 0, False
            fast_t.append(timeit(lambda tp=tp, m=m: m.match_blocks(tp, m.blocks(tp)), 1)[0])
            m.near_radius, m.find_spans = 2, True
            t0 = time.perf_counter_ns()
            r = m.match_blocks(tp, m.blocks(tp))
            full_t.append((time.perf_counter_ns() - t0) / 1e6)
            cut |= r.truncated
        h, f, g = (float(np.median(x)) for x in (hash_t, fast_t, full_t))
        s = m.stats()
        rows.append(
            f"| {n:,} | {s['owner_blocks']:,} | {h:.2f} | {f:.2f} | {f / h:.1f}x | {g:.2f} "
            f"| {g / h:.1f}x | {cut} |"
        )
        del m
        gc.collect()
    return rows


def bench_conversations(n_agents: int, turns: int) -> list[str]:
    """Conversations that grow turn by turn: each agent's next prompt is its previous one plus
    a reply and a new message; every turn is matched, then indexed (the live loop)."""
    rnd = np.random.default_rng(5)
    system = rnd.integers(0, VOCAB, 1024).tolist()
    m = SyncMatcher()
    convo = {a: list(system) for a in range(n_agents)}
    match_t, index_t = [], []
    exact_ok = 0
    for t in range(turns):
        for a in range(n_agents):
            convo[a] += rnd.integers(0, VOCAB, int(rnd.integers(64, 512))).tolist()
            tp = m.tokenizer.encode_ids(convo[a])
            seq = m.blocks(tp)
            t0 = time.perf_counter_ns()
            r = m.match_blocks(tp, seq, exclude_agent=None)
            match_t.append((time.perf_counter_ns() - t0) / 1e6)
            exact_ok += t == 0 or r.best_owner == f"agent{a}"
            t0 = time.perf_counter_ns()
            m.index_blocks(f"agent{a}", seq)
            index_t.append((time.perf_counter_ns() - t0) / 1e6)
    s = m.stats()
    return [
        "| agents x turns | final prompt (tokens) | indexed blocks | match p50 (ms) | p99 (ms) "
        "| re-index p50 (ms) | best owner = own previous turn |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| {n_agents} x {turns} | {len(convo[0]):,} | {s['owner_blocks']:,} | "
        f"{np.median(match_t):.2f} | {np.percentile(match_t, 99):.2f} | "
        f"{np.median(index_t):.2f} | {exact_ok / (n_agents * turns):.0%} |",
    ]


def bench_tokenize_repeated(tk: PromptTokenizer, paras: list[str], reps: int) -> list[str]:
    """An 8k-token chat whose 6k-token system prompt and tool schemas repeat on every request
    (a new 2k-token user message each time), against a full HF encode of the same text; and
    fresh text (no cache can help) in tokens/s. Ids are checked equal."""
    rnd = random.Random(1)
    system = make_text(paras, tk, 5000, rnd)
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"tool{i}",
                "description": make_text(paras, tk, 100, rnd)[:600],
                "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
            },
        }
        for i in range(8)
    ]
    reqs = [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": make_text(paras, tk, 2000, random.Random(100 + i))},
        ]
        for i in range(reps)
    ]
    tk.encode_chat(reqs[0], tools=tools, scope="bench")  # the system prompt was seen before
    hf_t, ours_t = [], []
    for r in reqs:
        text = tk.render_chat(r, tools=tools)
        t0 = time.perf_counter_ns()
        want = tk._tk.encode(text, add_special_tokens=False).ids
        hf_t.append(time.perf_counter_ns() - t0)
        t0 = time.perf_counter_ns()
        got = tk.encode_chat(r, tools=tools, scope="bench")
        ours_t.append(time.perf_counter_ns() - t0)
        assert list(got.token_ids) == want
    n_tok = len(want)
    fresh = make_text(paras, tk, 200_000, random.Random(9))
    fresh_t, fresh_hf = [], []
    for i in range(3):
        t0 = time.perf_counter_ns()
        got = tk.encode_text(fresh, scope=f"fresh-{i}")  # a new scope: nothing cached
        fresh_t.append(time.perf_counter_ns() - t0)
        t0 = time.perf_counter_ns()
        want = tk._tk.encode(fresh).ids
        fresh_hf.append(time.perf_counter_ns() - t0)
        assert list(got.token_ids) == want
    h, o = float(np.median(hf_t)) / 1e6, float(np.median(ours_t)) / 1e6
    ft, fh = float(np.median(fresh_t)) / 1e9, float(np.median(fresh_hf)) / 1e9
    return [
        "| case | tokens | HF encode | kvforge | ratio |",
        "|---|---:|---:|---:|---:|",
        f"| chat, repeated 6k system + tools, new 2k user message | {n_tok:,} | {h:.1f} ms | "
        f"{o:.1f} ms | {h / o:.1f}x |",
        f"| fresh text (single core) | {len(want):,} | {len(want) / fh / 1e6:.2f}M tok/s | "
        f"{len(want) / ft / 1e6:.2f}M tok/s | {fh / ft:.1f}x |",
    ]


def bench_reindex(reps: int) -> list[str]:
    """An agent re-indexes its prompt (a conversation grows, a tool result changes) in an
    index of ~100k blocks: the index update alone (blocks prepared and hashed beforehand).
    Baseline, in the same run: forgetting the agent, then indexing it again — what an update
    cost before re-indexing kept the shared part in place."""
    rnd = np.random.default_rng(11)
    system = rnd.integers(0, VOCAB, 512).tolist()
    m = SyncMatcher(near_radius=2)
    build_index(m, 100_000, system)
    base = agent_prompt(system, 0)
    cases = {
        "same prompt again": lambda i: base,
        "last 1,024 tokens changed": lambda i: (
            base[:-1024] + np.random.default_rng([3, i % 2]).integers(0, VOCAB, 1024).tolist()
        ),
        "a different prompt": lambda i: agent_prompt(system, 10_000 + i % 2),
    }
    rows = [
        "| update | re-index p50 (ms) | clear + index p50 (ms) | ratio |",
        "|---|---:|---:|---:|",
    ]
    for label, make in cases.items():
        # (held before, the update) pairs; every sequence hashed beforehand
        pairs = [(m.blocks(make(i)), m.blocks(make(i + 1))) for i in range(reps)]
        for before, after in pairs:
            before.chain_keys  # noqa: B018 - hashing is not what this measures
            after.chain_keys  # noqa: B018
        ours, old = [], []
        for before, after in pairs:
            m.index_blocks("agent0", before)
            t = time.perf_counter_ns()
            m.index_blocks("agent0", after)
            ours.append((time.perf_counter_ns() - t) / 1e6)
            m.index_blocks("agent0", before)
            t = time.perf_counter_ns()
            m.clear_agent("agent0")
            m.index_blocks("agent0", after)
            old.append((time.perf_counter_ns() - t) / 1e6)
        a, b = float(np.median(ours)), float(np.median(old))
        rows.append(f"| {label} | {a:.2f} | {b:.2f} | {b / a:.1f}x |")
    return rows


def load_seed(tk: PromptTokenizer) -> Any:
    """The original matcher, given the same (Qwen3) tokenizer through its import."""
    pkg = types.ModuleType("apohara_context_forge")
    mod = types.ModuleType("apohara_context_forge.token_counter")

    class TokenCounter:
        @staticmethod
        def get() -> Any:
            return types.SimpleNamespace(encode=lambda text: list(tk._tk.encode(text).ids))

    mod.TokenCounter = TokenCounter  # type: ignore[attr-defined]
    sys.modules["apohara_context_forge"] = pkg
    sys.modules["apohara_context_forge.token_counter"] = mod
    spec = importlib.util.spec_from_file_location("seed_lsh", SEED)
    assert spec and spec.loader
    seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed)
    return seed


def bench_seed(tk: PromptTokenizer, paras: list[str]) -> list[str]:
    import asyncio

    if not SEED.is_file():
        return ["(seed file not found beside the repo: skipped)"]
    seed = load_seed(tk)
    rows = [
        "| stored blocks | seed index (ms/prompt) | kvforge index (ms/prompt) | seed query 8k (ms) "
        "| kvforge query 8k incl. tokenize (ms) | query ratio (seed / kvforge) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    rnd = random.Random(3)
    for stored in (1_000, 10_000):
        texts = []
        while sum(len(tk._tk.encode(t).ids) // 16 for t in texts) < stored:
            texts.append(make_text(paras, tk, 2048, rnd))
        query = texts[0][: len(texts[0]) // 2] + make_text(paras, tk, 8192, rnd)
        s = seed.LSHTokenMatcher()
        ours = SyncMatcher(tokenizer=tk)

        async def seed_index(s: Any = s, texts: list[str] = texts) -> None:
            for i, t in enumerate(texts):
                await s.index_prompt(f"a{i}", t)

        t0 = time.perf_counter()
        asyncio.run(seed_index())
        t_seed_idx = (time.perf_counter() - t0) * 1e3 / len(texts)
        t0 = time.perf_counter()
        for i, t in enumerate(texts):
            ours.index_prompt(f"a{i}", t)
        t_ours_idx = (time.perf_counter() - t0) * 1e3 / len(texts)
        q_seed = np.median(
            timeit(lambda s=s, query=query: asyncio.run(s.find_reusable_blocks(query)), 3)
        )
        assert ours.tokenizer.pieces is not None
        ours.tokenizer.pieces.clear()
        q_ours = np.median(
            timeit(
                lambda ours=ours, query=query: (
                    ours.find_reusable_blocks(query),
                    ours.tokenizer.pieces.clear(),  # type: ignore[union-attr]
                ),
                10,
            )
        )
        rows.append(
            f"| {stored:,} | {t_seed_idx:.1f} | {t_ours_idx:.1f} | {q_seed:,.0f} | "
            f"{q_ours:.1f} | {q_seed / q_ours:,.0f}x |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    tk = PromptTokenizer.qwen3()
    paras = corpus_paragraphs()
    reps = 20 if args.quick else 100
    sizes = (10_000, 100_000) if args.quick else (10_000, 100_000, 1_000_000)
    print("## Tokenization and hashing throughput (sha256, block 16)\n")
    print("\n".join(bench_throughput(tk, paras, 5 if args.quick else 20)))
    print("\n## find_reusable_blocks, 8k-token prompt (after tokenization)\n")
    print("\n".join(bench_match(sizes, reps, tk, paras)))
    print("\n## Tokenization: repeated chat pieces and fresh text (ids equal to HF)\n")
    print("\n".join(bench_tokenize_repeated(tk, paras, 10 if args.quick else 30)))
    print("\n## Varying-depth sharing: 8k query, agents at different depths of one prompt\n")
    counts = (200, 1000) if args.quick else (400, 2000)
    print("\n".join(bench_varying_depth(counts, 20 if args.quick else 60)))
    print("\n## Conversations growing turn by turn (match, then re-index, every turn)\n")
    print("\n".join(bench_conversations(20 if args.quick else 50, 8 if args.quick else 16)))
    print("\n## Re-indexing an agent, ~100k indexed blocks\n")
    print("\n".join(bench_reindex(10 if args.quick else 40)))
    print("\n## Against the seed matcher (same Qwen3 tokenizer)\n")
    print("\n".join(bench_seed(tk, paras)))


if __name__ == "__main__":
    main()
