"""Routing benchmark: KV-event ingestion rate, route decision latency, simulated hit rates.

python benchmarks/bench_route.py           # about 2 minutes on 2 cores
python benchmarks/bench_route.py --quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kvforge.blocks import BlockHasher, chain_keys
from kvforge.events import BlockRemoved, BlockStored, KVEventBatch, encode_batch
from kvforge.events.subscriber import EventSubscriber
from kvforge.route import EngineConfig, ResidencyIndex, Router
from kvforge.sim import POLICIES, ClusterConfig, SimRequest, multi_agent_trace, simulate

VOCAB = 151_643


def bench_ingest(n_batches: int) -> list[str]:
    """Frames as vLLM sends them (prefill stores of 32 blocks with token ids, single-block
    removals), through the subscriber's full path: frame checks, seq tracking, msgpack
    decoding, hash normalisation, residency update."""
    rng = np.random.default_rng(0)
    frames = []
    blocks = 0
    for seq in range(n_batches):
        hashes = rng.integers(0, 2**63, 32).tolist()
        events = [
            BlockStored(
                block_hashes=hashes,
                parent_block_hash=None,
                token_ids=rng.integers(0, VOCAB, 32 * 16).tolist(),
                block_size=16,
                medium="GPU",
                extra_keys=[None] * 32,
                group_idx=0,
            ),
            *[BlockRemoved(block_hashes=[h], medium="GPU", group_idx=0) for h in hashes[:8]],
        ]
        blocks += 32 + 8
        payload = encode_batch(KVEventBatch(time.time(), events, 0))
        frames.append([b"kv@e0@m", seq.to_bytes(8, "big"), payload])
    res = ResidencyIndex()
    sub = EventSubscriber("e0", "tcp://127.0.0.1:1", res, topic="kv@e0@m")
    t = time.perf_counter()
    for fr in frames:
        sub.handle(fr)
    dt = time.perf_counter() - t
    assert sub.stats.applied == n_batches and sub.stats.malformed == 0
    return [
        "| batches | blocks (stored + removed) | seconds | blocks / s | batches / s |",
        "|---:|---:|---:|---:|---:|",
        f"| {n_batches:,} | {blocks:,} | {dt:.2f} | {blocks / dt:,.0f} | {n_batches / dt:,.0f} |",
    ]


def bench_route(reps: int) -> list[str]:
    """Route decisions. vLLM's BlockStored events carry the blocks' token ids, from which the
    residency builds a block tree: a held prefix's hashes are then found without sha256. For
    events without token ids the router hashes the prompt itself, through its hash memo."""
    rng = np.random.default_rng(1)
    rows = [
        "| engines | prompt vs cluster | hashes from | cached blocks | p50 (ms) | p99 (ms) |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for n_engines in (8, 64):
        prompts = [tuple(rng.integers(0, VOCAB, 8192).tolist()) for _ in range(n_engines)]
        half = prompts[1][:4096] + tuple(rng.integers(0, VOCAB, 4096).tolist())
        cold = tuple(rng.integers(0, VOCAB, 8192).tolist())
        cases = [
            ("fully cached on one engine", prompts[0]),
            ("half cached", half),
            ("cached nowhere", cold),
        ]
        for with_tokens in (True, False):
            router = Router([EngineConfig(f"e{i}") for i in range(n_engines)])
            for i, p in enumerate(prompts):
                keys = chain_keys(BlockHasher().chain(p)).tolist()
                ev = BlockStored(
                    block_hashes=keys,
                    parent_block_hash=None,
                    token_ids=list(p) if with_tokens else [],
                    block_size=16,
                    medium="GPU",
                )
                router.residency.apply(f"e{i}", KVEventBatch(0.0, [ev], 0))
            modes = (
                ["block tree (memo cold)"] if with_tokens else ["hash memo warm", "hash memo cold"]
            )
            for label, prompt in cases:
                for mode in modes:
                    lat = []
                    for _ in range(reps):
                        if "cold" in mode:
                            for m in router._memos.values():
                                m._young.clear()
                                m._old.clear()
                        t = time.perf_counter()
                        d = router.route_tokens(prompt, speculate=False)
                        lat.append((time.perf_counter() - t) * 1e3)
                    rows.append(
                        f"| {n_engines} | {label} | {mode} | {d.cached_blocks} | "
                        f"{np.median(lat):.3f} | {np.percentile(lat, 99):.3f} |"
                    )
    return rows


def bench_sim(pipelines: int) -> list[str]:
    trace = multi_agent_trace(pipelines=pipelines, seed=2)
    reqs = [SimRequest(r["agent_id"], tuple(r["token_ids"]), None, r["t"]) for r in trace]
    tokens = sum(len(r.token_ids) for r in reqs)
    rows = [
        f"{len(reqs)} requests, {tokens:,} prompt tokens ({pipelines} pipelines × 4 agents × "
        "3 turns; 1k-token shared system prompt, 2k-token document per pipeline).\n",
        "| engines | blocks / engine | policy | hit rate | vs oracle | prefill tokens | load CV |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for n_engines in (4, 8):
        for blocks in (100_000, 2_000):
            res = {
                p: simulate(reqs, p, ClusterConfig(engines=n_engines, blocks_per_engine=blocks))
                for p in POLICIES
            }
            oracle = res["oracle"].hit_rate
            for p, r in res.items():
                rows.append(
                    f"| {n_engines} | {blocks:,} | {p} | {r.hit_rate:.1%} | "
                    f"{r.hit_rate - oracle:+.1%} | {r.prefill_tokens:,} | {r.load_cv:.2f} |"
                )
    return rows


def bench_ttft(pipelines: int) -> list[str]:
    """Time to first token by policy: the shaped multi-agent trace sped up until the engines
    queue, and a bursty variant where a turn's four agents arrive at the same instant (a
    fan-out of sibling agents)."""
    trace = multi_agent_trace(pipelines=pipelines, seed=2)
    shaped = [SimRequest(r["agent_id"], tuple(r["token_ids"]), None, r["t"]) for r in trace]
    start: dict[str, float] = {}
    for r in trace:  # sorted by time: a session's first request opens it
        start.setdefault(r["session_id"], r["t"])
    bursty = []
    for r in trace:  # every agent of a pipeline's turn (3 s apart) at the turn's start
        s0 = start[r["session_id"]]
        turn = int((r["t"] - s0) // 3.0)
        bursty.append(SimRequest(r["agent_id"], tuple(r["token_ids"]), None, s0 + 3.0 * turn))
    bursty.sort(key=lambda q: q.t or 0.0)
    rows = [
        "| workload | policy | TTFT p50 (ms) | p99 (ms) | mean (ms) | p99 vs round_robin | "
        "mean vs ttft_oracle | hit rate |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, reqs, rate in (
        ("shaped, rate x8", shaped, 8.0),
        ("bursty fan-out, rate x8", bursty, 8.0),
    ):
        cfg = ClusterConfig(engines=4, blocks_per_engine=100_000, rate=rate)
        res = {p: simulate(reqs, p, cfg).to_json() for p in POLICIES}
        rr, best = res["round_robin"]["ttft_p99_s"], res["ttft_oracle"]["ttft_mean_s"]
        for p, j in res.items():
            rows.append(
                f"| {name} | {p} | {j['ttft_p50_s'] * 1e3:.1f} | {j['ttft_p99_s'] * 1e3:.1f} | "
                f"{j['ttft_mean_s'] * 1e3:.1f} | {j['ttft_p99_s'] / rr:.2f}x | "
                f"{j['ttft_mean_s'] / best:.2f}x | {j['hit_rate']:.1%} |"
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    print("## KV-event ingestion (one core)\n")
    print("\n".join(bench_ingest(2_000 if a.quick else 20_000)))
    print("\n## Route decision, 8k-token prompt (after tokenization)\n")
    print("\n".join(bench_route(50 if a.quick else 300)))
    print("\n## Simulated cluster: prefix-cache hit rate by policy\n")
    print("\n".join(bench_sim(8 if a.quick else 24)))
    print("\n## Simulated cluster: time to first token by policy (4 engines)\n")
    print("\n".join(bench_ttft(8 if a.quick else 24)))


if __name__ == "__main__":
    main()
