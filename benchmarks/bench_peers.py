"""kvforge side by side with NVIDIA Dynamo's KV indexer (``RadixTree`` from the
``ai-dynamo-runtime`` wheel), on the same vLLM event stream and the same prompts, in one run.

    .venv/bin/pip install ".[peers]"          # optional: the Dynamo wheel (~75 MB)
    .venv/bin/python benchmarks/bench_peers.py [--quick]

Without the wheel the Dynamo columns are skipped. What each side does:
- ingest: kvforge decodes vLLM's msgpack batches and applies them through the real subscriber
  path (``EventSubscriber.handle``: sequence checks, validation, residency, block tree);
  Dynamo's ``RadixTree.apply_event`` gets its own JSON event form, encoded beforehand (not
  timed: Dynamo's ZMQ relay would do that conversion in Rust).
- route: the cached-prefix lookup for an 8k-token prompt over the engines: kvforge's
  ``Router.route_tokens`` (block keys, tree walk, scoring) against Dynamo's
  ``compute_block_hash_for_seq`` + ``find_matches``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from kvforge.blocks import BlockHasher, chain_keys
from kvforge.events.schema import BlockRemoved, BlockStored, KVEventBatch, encode_batch
from kvforge.events.subscriber import EventSubscriber
from kvforge.route import EngineConfig, ResidencyIndex, Router

VOCAB = 151_643
BS = 16


def stream(n_prompts: int, engines: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Prompts of 512-2048 tokens sharing a 1k-token system prompt, stored by one engine each
    in events of 4-32 blocks (a prefill in chunks), with some removals (eviction)."""
    hasher = BlockHasher()
    system = rng.integers(0, VOCAB, 1024).tolist()
    out = []
    for p in range(n_prompts):
        toks = system + rng.integers(0, VOCAB, int(rng.integers(512, 2048))).tolist()
        toks = toks[: len(toks) // BS * BS]
        hashes = chain_keys(hasher.chain(toks)).tolist()
        out.append({"engine": p % engines, "tokens": toks, "hashes": hashes})
    return out


def kvforge_batches(prompts: list[dict[str, Any]], rng: np.random.Generator) -> list[Any]:
    per_engine: dict[int, list[Any]] = {}
    for pr in prompts:
        h, toks = pr["hashes"], pr["tokens"]
        i = 0
        while i < len(h):
            n = int(rng.integers(4, 33))
            ev = BlockStored(
                block_hashes=h[i : i + n],
                parent_block_hash=h[i - 1] if i else None,
                token_ids=toks[i * BS : (i + n) * BS],
                block_size=BS,
                medium="GPU",
            )
            per_engine.setdefault(pr["engine"], []).append(ev)
            i += n
        if rng.random() < 0.2:  # evict the prompt's tail
            tail = h[-min(8, len(h) - 64) :]
            per_engine[pr["engine"]].append(BlockRemoved(block_hashes=tail, medium="GPU"))
    frames = []
    for e, evs in per_engine.items():
        for seq, k in enumerate(range(0, len(evs), 4)):
            payload = encode_batch(KVEventBatch(0.0, evs[k : k + 4], 0))
            frames.append((e, [b"kv", seq.to_bytes(8, "big"), payload], len(evs[k : k + 4])))
    return frames


def dynamo_events(prompts: list[dict[str, Any]], frames: list[Any]) -> list[tuple[int, bytes]]:
    from dynamo._core import compute_block_hash_for_seq

    from kvforge.events.schema import decode_batch

    local: dict[int, int] = {}
    for pr in prompts:
        for h, lh in zip(pr["hashes"], compute_block_hash_for_seq(pr["tokens"], BS), strict=True):
            local[h] = lh
    out = []
    event_id = 0
    for e, fr, _ in frames:
        for ev in decode_batch(fr[2]).events:
            event_id += 1
            if isinstance(ev, BlockStored):
                data: dict[str, Any] = {
                    "stored": {
                        "parent_hash": ev.parent_block_hash,
                        "blocks": [
                            {"block_hash": h, "tokens_hash": local[h]} for h in ev.block_hashes
                        ],
                    }
                }
            else:
                data = {"removed": {"block_hashes": ev.block_hashes}}
            out.append((e, json.dumps({"event_id": event_id, "data": data}).encode()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    engines = 4
    prompts = stream(300 if a.quick else 2000, engines, rng)
    frames = kvforge_batches(prompts, rng)
    n_events = sum(n for *_, n in frames)
    n_blocks = sum(len(p["hashes"]) for p in prompts)
    try:
        from dynamo._core import RadixTree, compute_block_hash_for_seq

        have_dynamo = True
    except ImportError:
        have_dynamo = False

    # ---- ingest ----------------------------------------------------------------------------
    res = ResidencyIndex()
    # as in the service: the router exists (and has told the residency each engine's hash
    # group) before the first event arrives
    router = Router(
        [EngineConfig(f"e{e}") for e in range(engines)], residency=res, speculative_ttl=0
    )
    subs = {
        e: EventSubscriber(f"e{e}", "tcp://127.0.0.1:1", res, topic="kv") for e in range(engines)
    }
    t0 = time.perf_counter()
    for e, fr, _ in frames:
        subs[e].handle(fr)
    t_ours = time.perf_counter() - t0
    assert all(s.stats.malformed == 0 for s in subs.values())
    rows = [
        "| indexer | events | stored blocks | seconds | events / s | blocks / s | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| kvforge (msgpack, subscriber path) | {n_events:,} | {n_blocks:,} | {t_ours:.2f} | "
        f"{n_events / t_ours:,.0f} | {n_blocks / t_ours:,.0f} | 1.00x |",
    ]
    tree = None
    if have_dynamo:
        evs = dynamo_events(prompts, frames)
        tree = RadixTree()
        t0 = time.perf_counter()
        for e, raw in evs:
            tree.apply_event(e, raw)
        t_dyn = time.perf_counter() - t0
        rows.append(
            f"| Dynamo RadixTree (JSON, apply_event) | {len(evs):,} | {n_blocks:,} | {t_dyn:.2f} "
            f"| {len(evs) / t_dyn:,.0f} | {n_blocks / t_dyn:,.0f} | {t_dyn / t_ours:.2f}x |"
        )
    print("## Ingesting the same vLLM event stream (one core)\n")
    print("\n".join(rows))
    print("\n(ratio: the other's time over kvforge's; > 1 means kvforge is faster)\n")

    # ---- route -------------------------------------------------------------------------------
    queries = [
        p["tokens"] + rng.integers(0, VOCAB, 8192 - len(p["tokens"])).tolist()
        for p in prompts[-20:]
    ]
    ours, theirs = [], []
    for _ in range(5):
        for q in queries:
            t0 = time.perf_counter()
            d = router.route_tokens(q, speculate=False)
            ours.append(time.perf_counter() - t0)
            if tree is not None:
                t0 = time.perf_counter()
                m = tree.find_matches(compute_block_hash_for_seq(q, BS))
                theirs.append(time.perf_counter() - t0)
                assert max(m.scores.values(), default=0) == d.cached_blocks, (m.scores, d)
    rows = [
        "| router | p50 (ms) | p99 (ms) | ratio (p50) |",
        "|---|---:|---:|---:|",
        f"| kvforge route_tokens | {np.median(ours) * 1e3:.3f} | "
        f"{np.percentile(ours, 99) * 1e3:.3f} | 1.00x |",
    ]
    if theirs:
        rows.append(
            f"| Dynamo hash + find_matches | {np.median(theirs) * 1e3:.3f} | "
            f"{np.percentile(theirs, 99) * 1e3:.3f} | {np.median(theirs) / np.median(ours):.2f}x |"
        )
    print("## Cached-prefix lookup for an 8k-token prompt (same residency, same answers)\n")
    print("\n".join(rows))
    if not have_dynamo:
        print('\n(ai-dynamo-runtime not installed: `pip install ".[peers]"` for its columns)')


if __name__ == "__main__":
    main()
