"""Near-duplicate and moved-content benchmark.

    python benchmarks/bench_similar.py            # ≈6 minutes on 2 cores
    python benchmarks/bench_similar.py --quick    # 10k and 100k only

1. Precision / recall of the near-duplicate fingerprint on real text (this repository's texts,
   tokenized with Qwen3) for edited vs unrelated blocks, next to a 64-bit SimHash of token
   unigrams+bigrams (the obvious alternative) and the seed's SimHash.
2. Query latency of an 8k-token prompt (512 blocks) at 10k / 100k / 1M indexed blocks,
   against a vectorized brute-force scan and the seed matcher; memory of the fingerprint tables.
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from pathlib import Path

import numpy as np

from kvforge import PromptTokenizer, SyncMatcher
from kvforge.index import LookupOptions
from kvforge.index.anchors import near_chunk_keys

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 151_643


def corpus_docs(tk: PromptTokenizer) -> list[np.ndarray]:
    files = [
        ROOT / "src/kvforge/tokenize/data/qwen3/LICENSE",
        ROOT / "README.md",
        ROOT / "docs/architecture.md",
        *sorted((ROOT / "src/kvforge").rglob("*.py")),
    ]
    shared = ROOT.parent / "shared"
    files += [
        shared / "DESIGN.md",
        shared / "notes/vllm-spec.md",
        shared / "seed/lsh_token_matcher.py",
    ]
    docs = []
    for f in files:
        if f.is_file():
            ids = np.asarray(tk.encode_text(f.read_text("utf-8")).token_ids, dtype=np.int64)
            n = ids.size // 16
            if n:
                docs.append(ids[: n * 16].reshape(n, 16))
    return docs


def _fmix(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


def simhash64(blocks: np.ndarray) -> np.ndarray:
    """64-bit SimHash over hashed unigrams and bigrams (order-aware, independent bits)."""
    b = blocks.astype(np.uint64)
    feats = [
        _fmix(b * np.uint64(0x9E3779B97F4A7C15) + np.uint64(1)),
        _fmix((b[:, :-1] * np.uint64(0x9E3779B97F4A7C15)) ^ _fmix(b[:, 1:] + np.uint64(7))),
    ]
    acc = np.zeros((blocks.shape[0], 64))
    for f in feats:
        bits = np.unpackbits(f.view(np.uint8).reshape(*f.shape, 8), axis=2, bitorder="little")
        acc += (2.0 * bits - 1).sum(axis=1)
    return np.packbits(acc > 0, axis=1, bitorder="little").view(np.uint64).ravel()


def seed_simhash(blocks: np.ndarray) -> np.ndarray:
    """The seed's fingerprint (order-blind, 31 effective bits), vectorized."""
    h = blocks.astype(np.uint64) & np.uint64(0xFFFFFFFF)
    for _ in range(4):
        h ^= (h << np.uint64(13)) & np.uint64(0xFFFFFFFF)
        h ^= h >> np.uint64(7)
        h ^= (h << np.uint64(17)) & np.uint64(0xFFFFFFFF)
        h &= np.uint64(0xFFFFFFFF)
    bits = (h[:, :, None] >> (np.arange(64, dtype=np.uint64) % np.uint64(32))) & np.uint64(1)
    v = (2 * bits.astype(np.int64) - 1).sum(axis=1)
    return np.packbits(v > 0, axis=1, bitorder="little").view(np.uint64).ravel()


def popcount(x: np.ndarray) -> np.ndarray:
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def edits(
    blocks: np.ndarray, rng: np.random.Generator, tk: PromptTokenizer
) -> dict[str, np.ndarray]:
    n = blocks.shape[0]
    rows = np.arange(n)
    one = blocks.copy()
    one[rows, rng.integers(0, 16, n)] = rng.integers(0, VOCAB, n)
    two = one.copy()
    two[rows, rng.integers(0, 16, n)] = rng.integers(0, VOCAB, n)
    digit = tk.encode_text("0123456789").token_ids  # a changed date / number: one digit token
    date = blocks.copy()
    date[rows, rng.integers(0, 16, n)] = np.asarray(digit)[rng.integers(0, 10, n)]
    space = tk.encode_text(" ").token_ids[0]
    shifted = np.empty_like(blocks)  # whitespace inserted: everything after it shifts
    for i in range(n):
        j = rng.integers(0, 16)
        row = list(blocks[i])
        row.insert(j, space)
        shifted[i] = row[:16]
    return {
        "1 token substituted": one,
        "2 tokens substituted": two,
        "date/number digit changed": date,
        "whitespace token inserted (shift)": shifted,
    }


def bench_quality(tk: PromptTokenizer, radius_default: int) -> list[str]:
    rng = np.random.default_rng(0)
    docs = corpus_docs(tk)
    blocks = np.concatenate(docs)
    doc_of = np.concatenate([np.full(d.shape[0], i) for i, d in enumerate(docs)])
    rows = [
        f"{blocks.shape[0]:,} real blocks from {len(docs)} documents.\n",
        "| pairs | token-Hamming r=1 | r=2 | r=3 | SimHash-64 r=8 | r=12 | seed SimHash r=8 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    s64 = simhash64(blocks)
    sseed = seed_simhash(blocks)
    for name, edited in edits(blocks, rng, tk).items():
        changed = (edited != blocks).any(axis=1)
        e, b = edited[changed], blocks[changed]
        d = (e != b).sum(axis=1)
        hs = popcount(simhash64(e) ^ s64[changed])
        hseed = popcount(seed_simhash(e) ^ sseed[changed])
        rows.append(
            f"| edited: {name} (recall) | {(d <= 1).mean():.1%} | {(d <= 2).mean():.1%} | "
            f"{(d <= 3).mean():.1%} | {(hs <= 8).mean():.1%} | {(hs <= 12).mean():.1%} | "
            f"{(hseed <= 8).mean():.1%} |"
        )
    m = 3_000_000
    i, j = rng.integers(0, blocks.shape[0], m), rng.integers(0, blocks.shape[0], m)
    keep = (doc_of[i] != doc_of[j]) & (blocks[i] != blocks[j]).any(axis=1)
    i, j = i[keep], j[keep]
    d = (blocks[i] != blocks[j]).sum(axis=1)
    hs = popcount(s64[i] ^ s64[j])
    hseed = popcount(sseed[i] ^ sseed[j])

    def rate(x: np.ndarray) -> str:
        return f"{x.mean():.1e}" if x.any() else f"0 (< {1 / x.size:.0e})"

    rows.append(
        f"| unrelated: {i.size:,} pairs from different documents (false-match rate per pair) | "
        f"{rate(d <= 1)} | {rate(d <= 2)} | {rate(d <= 3)} | {rate(hs <= 8)} | {rate(hs <= 12)} "
        f"| {rate(hseed <= 8)} |"
    )
    rows.append(f"\nDefault radius: {radius_default} differing token positions.")
    return rows


def bench_latency(sizes: list[int], reps: int) -> list[str]:
    rows = [
        "| indexed blocks | kvforge near p50 (ms) | p99 (ms) | full report p50 (ms) | "
        "brute-force scan (ms) | speed-up | seed (ms) | fingerprint tables B / block |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        rng = np.random.default_rng(n)
        m = SyncMatcher()
        agents = max(1, n // 512)
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for a in range(agents):
            m.index_prompt(
                f"agent{a}", np.random.default_rng([7, a]).integers(0, VOCAB, 8192).tolist()
            )
        gc.collect()
        total = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        t = m.index._tenants["default"]
        stored = t.contents.tokens[: t.contents.ids.high]
        # query: 128 edited copies of indexed blocks (1-2 substitutions), the rest new tokens
        src = stored[rng.integers(0, stored.shape[0], 128)].astype(np.int64)
        src[np.arange(128), rng.integers(0, 16, 128)] = rng.integers(0, VOCAB, 128)
        q = np.concatenate([rng.integers(0, VOCAB, (384, 16)), src])[rng.permutation(512)]
        seq = m.blocks(q.ravel().tolist())
        near_lat = []
        for _ in range(reps):
            t0 = time.perf_counter()
            hit = m.index.lookup("default", seq, LookupOptions(near_radius=2))
            near_lat.append((time.perf_counter() - t0) * 1e3)
        tp = m.tokenizer.encode_ids(q.ravel().tolist())
        full = [0.0] * max(5, reps // 5)
        for k in range(len(full)):
            t0 = time.perf_counter()
            m.match_blocks(tp, m.blocks(tp))
            full[k] = (time.perf_counter() - t0) * 1e3
        # brute force: every stored block against every query block, vectorized per query block
        t0 = time.perf_counter()
        brute = {}
        for i, row in enumerate(q):
            d = (stored != row).sum(axis=1)
            d = d[(d > 0) & (d <= 2)]
            if d.size:
                brute[i] = int(d.min())
        t_brute = (time.perf_counter() - t0) * 1e3
        assert {i: h.distance for i, h in hit.near.items()} == brute
        # the fingerprint tables: near-chunk buckets + winnowing anchors (kvforge's estimate)
        fp = m.stats()["memory_bytes_similarity"]
        seed_ms = _seed_query_ms(q, stored) if n <= 100_000 else float("nan")
        rows.append(
            f"| {n:,} | {np.median(near_lat):.2f} | {np.percentile(near_lat, 99):.2f} | "
            f"{np.median(full):.2f} | {t_brute:,.0f} | {t_brute / np.median(near_lat):,.0f}x | "
            + (f"{seed_ms:,.0f}" if seed_ms == seed_ms else "not run (~O(n), see note)")
            + f" | {fp / (agents * 512):.0f} |"
        )
        del m, t, stored
        gc.collect()
        _ = total
    return rows


def real_text_paragraphs(tk: PromptTokenizer) -> tuple[list[str], list[str]]:
    """This repository's paragraphs, split in two: one half is indexed, the other half queries
    (real text whose common chunks — indentation, punctuation, stop words — are what makes
    near-duplicate candidate lists long)."""
    import random

    files = [
        ROOT / "src/kvforge/tokenize/data/qwen3/LICENSE",
        ROOT / "README.md",
        ROOT / "docs/architecture.md",
        *sorted((ROOT / "src/kvforge").rglob("*.py")),
    ]
    paras = [p for f in files for p in f.read_text("utf-8").split("\n\n") if len(p) > 40]
    random.Random(5).shuffle(paras)
    return paras[::2], paras[1::2]


def _text(paras: list[str], tk: PromptTokenizer, n_tokens: int, seed: int) -> str:
    import random

    rnd = random.Random(seed)
    parts: list[str] = []
    count = 0
    while count < n_tokens:
        parts.append(rnd.choice(paras))
        count += len(tk.encode_text(parts[-1]).token_ids)
    return "\n\n".join(parts)


def bench_near_real_text(tk: PromptTokenizer, agents_list: list[int], reps: int) -> list[str]:
    """The near-duplicate query on real text: agents' 8k-token prompts built from one half of
    the paragraphs, an 8k query from the other half (plus copies with one- and two-token
    edits), radius 2. Checked against brute force over the distinct stored blocks."""
    rows = [
        "| indexed blocks | distinct blocks | near p50 (ms) | p99 (ms) | candidates / query block "
        "| near blocks found | = brute force |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    indexed, queries = real_text_paragraphs(tk)
    for agents in agents_list:
        m = SyncMatcher(tokenizer=tk)
        for a in range(agents):
            m.index_prompt(f"a{a}", _text(indexed, tk, 8192, a))
        t = m.index._tenants["default"]
        stored = t.contents.tokens[: t.contents.ids.high]
        q = np.asarray(m.tokenize(_text(queries, tk, 8192, 10**6)).token_ids[: 8192 - 1024])
        rng = np.random.default_rng(agents)
        src = stored[rng.integers(0, stored.shape[0], 64)].astype(np.int64)
        src[np.arange(64), rng.integers(0, 16, 64)] = rng.integers(0, VOCAB, 64)
        q = np.concatenate([q[: q.size // 16 * 16], src.ravel()])
        seq = m.blocks(q.tolist())
        lat = []
        for _ in range(reps):
            t0 = time.perf_counter()
            hit = m.index.lookup("default", seq, LookupOptions(near_radius=2))
            lat.append((time.perf_counter() - t0) * 1e3)
        keys = near_chunk_keys(seq.tokens)
        cands = [
            len(
                {
                    c
                    for tab, k in zip(t.near, row, strict=True)
                    for c in ((tab.get(k),) if isinstance(tab.get(k), int) else tab.get(k, ()))
                }
            )
            for row in keys.tolist()
        ]
        brute = {}
        for i, row in enumerate(seq.tokens):
            if i in hit.moved or i < hit.exact_blocks:
                continue
            d = (stored != row).sum(axis=1)
            d = d[(d > 0) & (d <= 2)]
            if d.size:
                brute[i] = int(d.min())
        same = {i: h.distance for i, h in hit.near.items()} == brute
        s = m.stats()
        rows.append(
            f"| {s['owner_blocks']:,} | {s['contents']:,} | {np.median(lat):.2f} | "
            f"{np.percentile(lat, 99):.2f} | {np.mean(cands):.1f} | {len(hit.near)} | {same} |"
        )
        del m, t, stored
        gc.collect()
    return rows


def bench_spans_varying_depth(agent_counts: list[int], reps: int) -> list[str]:
    """The moved-span search where every owner shares the query's system prompt at a
    different depth (nothing is moved, yet every owner meets the query's anchors), and the
    same with the shared prompt moved behind a per-query preamble (every owner has a span)."""
    rows = [
        "| agents | indexed blocks | case | spans found | span search p50 (ms) | truncated |",
        "|---:|---:|---|---:|---:|---|",
    ]
    from bench_core import varying_depth_index  # the same workload as the core benchmark

    for n in agent_counts:
        rnd = np.random.default_rng(n)
        m, system = varying_depth_index(n, rnd)
        cases = {
            "shared prefix (nothing moved)": system + rnd.integers(0, VOCAB, 6144).tolist(),
            "prompt moved behind a preamble": rnd.integers(0, VOCAB, 40).tolist() + system,
        }
        for label, toks in cases.items():
            seq = m.blocks(toks)
            lat = []
            for _ in range(reps):
                t0 = time.perf_counter()
                hit = m.index.lookup("default", seq, LookupOptions(spans=True))
                lat.append((time.perf_counter() - t0) * 1e3)
            base = []
            for _ in range(reps):
                t0 = time.perf_counter()
                m.index.lookup("default", seq)
                base.append((time.perf_counter() - t0) * 1e3)
            spans_ms = float(np.median(lat)) - float(np.median(base))
            rows.append(
                f"| {n:,} | {m.stats()['owner_blocks']:,} | {label} | {len(hit.spans):,} | "
                f"{spans_ms:.2f} | {hit.truncated} |"
            )
        del m
        gc.collect()
    return rows


def _seed_query_ms(q: np.ndarray, stored: np.ndarray) -> float:
    """The seed's per-query work, faithfully: for every query block, a Python loop over every
    stored SimHash computing a popcount (its own code path, minus the tokenizer)."""
    fps = seed_simhash(stored).tolist()
    qfp = seed_simhash(q).tolist()
    t0 = time.perf_counter()
    found = 0
    for f in qfp:
        for g in fps:
            if bin(f ^ g).count("1") <= 8:
                found += 1
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    tk = PromptTokenizer.qwen3()
    print("## Near-duplicate quality on real text\n")
    print("\n".join(bench_quality(tk, SyncMatcher().near_radius)))
    print("\n## Near-duplicate query, 8k-token prompt (512 blocks), radius 2\n")
    sizes = [10_000, 100_000] if a.quick else [10_000, 100_000, 1_000_000]
    print("\n".join(bench_latency(sizes, 20 if a.quick else 50)))
    print("\n## Near-duplicate query on real text, 8k-token prompt, radius 2\n")
    print("\n".join(bench_near_real_text(tk, [200] if a.quick else [200, 2000], 20)))
    print("\n## Moved-span search, agents sharing one system prompt at different depths\n")
    counts = [400] if a.quick else [400, 2000]
    print("\n".join(bench_spans_varying_depth(counts, 10 if a.quick else 30)))


if __name__ == "__main__":
    main()
