"""Redis backend vs the in-memory default: index throughput, find_reusable_blocks and route
latency for an 8k-token prompt with 1M blocks stored, KV events applied per second.

    python benchmarks/bench_redis.py            # 1M blocks (about 3 minutes on 2 cores)
    python benchmarks/bench_redis.py --quick    # 100k blocks
    python benchmarks/bench_redis.py --url redis://host:6379/0   # an existing server

Without ``--url`` it starts a local redis-server (append-only file, fsync every second: the
usual production setting) in a temporary directory. Prints markdown tables; every ratio
compares numbers measured in this run, on this machine.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import agent_prompt, timeit

from kvforge import SyncMatcher
from kvforge.blocks import BlockHasher, chain_keys
from kvforge.events import BlockRemoved, BlockStored, KVEventBatch
from kvforge.route import EngineConfig, ResidencyIndex, Router
from kvforge.route.shared import SharedResidency

VOCAB = 151_643


def start_redis(directory: str) -> tuple[subprocess.Popen, str]:
    if shutil.which("redis-server") is None:
        sys.exit("redis-server not found: apt-get install redis-server, or pass --url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            directory,
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def pct(a: np.ndarray) -> str:
    return f"{np.median(a):.2f} | {np.percentile(a, 99):.2f}"


def bench_index_and_match(url: str, n_blocks: int, reps: int) -> list[str]:
    agents = max(4, n_blocks // 512)
    rnd = np.random.default_rng(n_blocks)
    system = rnd.integers(0, VOCAB, 512).tolist()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    shared = f"{url}?prefix={prefix}"
    rows_index = [
        "| backend | agents (8k tokens each) | blocks | seconds | prompts / s | blocks / s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    matchers: dict[str, SyncMatcher] = {}
    for label, index in (("memory", "memory://"), ("redis", shared)):
        m = SyncMatcher(index=index, near_radius=0)
        m.find_spans = False
        prompts = [agent_prompt(system, a) for a in range(agents)]
        t = time.perf_counter()
        for a, p in enumerate(prompts):
            m.index_prompt(f"agent{a}", p)
        dt = time.perf_counter() - t
        blocks = agents * 512
        rows_index.append(
            f"| {label} | {agents:,} | {blocks:,} | {dt:.1f} | "
            f"{agents / dt:,.0f} | {blocks / dt:,.0f} |"
        )
        matchers[label] = m
        del prompts
    # a second process's replica: it starts empty and rebuilds from Redis on first use
    t = time.perf_counter()
    peer = SyncMatcher(index=shared, near_radius=0)
    peer.find_spans = False
    peer.agents()
    warm = time.perf_counter() - t
    assert peer.stats()["blocks"] == matchers["memory"].stats()["blocks"]

    src = agent_prompt(system, agents // 2)
    q = src[: 232 * 16] + src[400 * 16 : 450 * 16]
    q = q + rnd.integers(0, VOCAB, 8192 - len(q)).tolist()
    rows = [
        "| backend | report | p50 (ms) | p99 (ms) | vs memory alike (p50) |",
        "|---|---|---:|---:|---:|",
    ]
    # the peer that writes runs in another process, as it would in production
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_writer, args=(shared, system, child), daemon=True)
    proc.start()
    assert conn.recv() == "ready"

    def peer_write(pause: float) -> Callable[[], Any]:
        def run() -> None:
            conn.send(True)
            conn.recv()
            time.sleep(pause)

        return run

    writes = iter(range(1, 1 << 30))

    def local_write() -> None:
        matchers["memory"].index_prompt("agent0", variant(system, next(writes)))

    for full in (False, True):
        kind = "full (near + spans)" if full else "exact + moved"
        base: dict[str, float] = {}
        cases: list[tuple[str, SyncMatcher, Callable[[], Any] | None, str]] = [
            ("memory", matchers["memory"], None, "memory"),
            ("redis, nothing new", peer, None, "memory"),
            # every write invalidates per-version caches: the fair baseline for the next two
            ("memory, re-indexed an agent just before", matchers["memory"], local_write, "w"),
            # another process re-indexed one agent just before: the query may apply its record
            ("redis, another process wrote just before", peer, peer_write(0.0), "w"),
            # the usual case: the follower thread applied the write before the query came
            ("redis, another process wrote 50 ms before", peer, peer_write(0.05), "w"),
        ]
        for label, m, before, ref in cases:
            m.near_radius, m.find_spans = (2, True) if full else (0, False)
            tp = m.tokenizer.encode_ids(q)
            n = reps if not full else max(10, reps // 3)
            lat = []
            for _ in range(n):
                if before is not None:
                    before()
                lat.append(timeit(lambda m=m, tp=tp: m.match_blocks(tp, m.blocks(tp)), 1)[0])
            arr = np.asarray(lat)
            r = m.match_blocks(tp, m.blocks(tp))
            assert r.exact_blocks == 232 and not r.degraded, (label, r.exact_blocks)
            base.setdefault(ref, float(np.median(arr)))
            rows.append(f"| {label} | {kind} | {pct(arr)} | {np.median(arr) / base[ref]:.2f}x |")
    conn.send(False)
    proc.join(10)
    used = redis.Redis.from_url(url).info("memory")["used_memory"]
    info = [
        f"A new replica (another process) rebuilt {agents * 512:,} blocks from Redis "
        f"in {warm:.1f} s. Redis holds them in {used / 2**20:,.0f} MiB "
        f"({used / (agents * 512):.0f} B per indexed block: the tokens, 64 B, plus the "
        "hash and feed overhead)."
    ]
    return [*rows_index, "", *rows, "", *info]


def _writer(url: str, system: list[int], conn: Any) -> None:
    """Another process on the same index: re-indexes agent0 whenever asked."""
    m = SyncMatcher(index=url, near_radius=0)
    m.find_spans = False
    conn.send("ready")
    i = 0
    while conn.recv():
        i += 1
        m.index_prompt("agent0", variant(system, i))
        conn.send(True)


def variant(system: list[int], i: int) -> list[int]:
    """agent0's prompt with its last 1,024 tokens changed: a real update (re-sending the same
    prompt costs nothing)."""
    tail = np.random.default_rng([2, i % 2]).integers(0, VOCAB, 1024).tolist()
    return agent_prompt(system, 0)[:-1024] + tail


def _batches(n: int, rng: np.random.Generator) -> list[KVEventBatch]:
    """vLLM-like batches: a 32-block prefill store with token ids, 8 single-block removals."""
    out = []
    for _ in range(n):
        hashes = rng.integers(0, 2**63, 32).tolist()
        out.append(
            KVEventBatch(
                time.time(),
                [
                    BlockStored(
                        block_hashes=hashes,
                        token_ids=rng.integers(0, VOCAB, 512).tolist(),
                        block_size=16,
                        medium="GPU",
                    ),
                    *[BlockRemoved(block_hashes=[h], medium="GPU") for h in hashes[:8]],
                ],
                0,
            )
        )
    return out


def bench_events(url: str, n: int) -> list[str]:
    batches = _batches(n, np.random.default_rng(3))
    blocks = n * 40
    rows = [
        "| backend | path | batches | blocks / s | batches / s |",
        "|---|---|---:|---:|---:|",
    ]
    mem = ResidencyIndex()
    t = time.perf_counter()
    for b in batches:
        mem.apply("e0", b)
    dt = time.perf_counter() - t
    rows.append(f"| memory | apply | {n:,} | {blocks / dt:,.0f} | {n / dt:,.0f} |")
    base, prefix = url, f"bench-ev-{uuid.uuid4().hex[:8]}"
    ingest = SharedResidency(base, prefix=prefix, snapshot_every=10**9)
    t = time.perf_counter()
    for b in batches:
        ingest.apply("e0", b)
    dt = time.perf_counter() - t
    rows.append(
        f"| redis | ingest (lease + XADD per batch) | {n:,} | {blocks / dt:,.0f} | {n / dt:,.0f} |"
    )
    replica = SharedResidency(base, prefix=prefix, snapshot_every=10**9)
    t = time.perf_counter()
    replica.refresh()
    dt = time.perf_counter() - t
    assert replica.engine("e0").counts == mem.engine("e0").counts
    rows.append(
        f"| redis | another replica catching up | {n:,} | {blocks / dt:,.0f} | {n / dt:,.0f} |"
    )
    return rows


def bench_route(url: str, n_blocks: int, reps: int) -> list[str]:
    """8 engines sharing ``n_blocks`` resident blocks (8k-token prompts, events with token
    ids, so routing walks the block tree)."""
    rng = np.random.default_rng(5)
    engines = [EngineConfig(f"e{i}") for i in range(8)]
    prompts = [tuple(rng.integers(0, VOCAB, 8192).tolist()) for _ in range(max(8, n_blocks // 512))]
    hasher = BlockHasher()
    events = []
    for i, p in enumerate(prompts):
        keys = chain_keys(hasher.chain(p)).tolist()
        ev = BlockStored(block_hashes=keys, token_ids=list(p), block_size=16, medium="GPU")
        events.append((f"e{i % 8}", KVEventBatch(0.0, [ev], 0)))
    half = prompts[1][:4096] + tuple(rng.integers(0, VOCAB, 4096).tolist())
    cold = tuple(rng.integers(0, VOCAB, 8192).tolist())
    cases = [
        ("fully cached on one engine", prompts[0]),
        ("half cached", half),
        ("cached nowhere", cold),
    ]
    rows = [
        "| backend | prompt | cached blocks | p50 (ms) | p99 (ms) | vs memory (p50) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    prefix = f"bench-rt-{uuid.uuid4().hex[:8]}"
    writer = SharedResidency(url, prefix=prefix)
    for name, batch in events:
        writer.apply(name, batch)
    routers = {
        "memory": Router(engines, speculative_ttl=0),
        "redis": Router(engines, residency=SharedResidency(url, prefix=prefix), speculative_ttl=0),
    }
    for name, batch in events:
        routers["memory"].residency.apply(name, batch)
    routers["redis"].residency.refresh()
    base: dict[str, float] = {}
    base_blocks: dict[str, int] = {}
    for label, r in routers.items():
        for case, prompt in cases:
            r.route_tokens(prompt, speculate=False)  # memo warm-up
            lat = timeit(lambda r=r, p=prompt: r.route_tokens(p, speculate=False), reps)
            d = r.route_tokens(prompt, speculate=False)
            expect = base_blocks.setdefault(case, d.cached_blocks)
            assert d.cached_blocks == expect, (label, case, d.cached_blocks)  # never degraded
            base.setdefault(case, float(np.median(lat)))
            rows.append(
                f"| {label} | {case} | {d.cached_blocks} | {pct(lat)} | "
                f"{np.median(lat) / base[case]:.2f}x |"
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--url", help="an existing Redis (default: start one)")
    args = ap.parse_args()
    n_blocks = 100_000 if args.quick else 1_000_000
    reps = 30 if args.quick else 100
    proc = None
    tmp = tempfile.mkdtemp(prefix="kvforge-bench-redis-")
    url = args.url
    if url is None:
        proc, url = start_redis(tmp)
    try:
        print(f"## Index and match ({n_blocks:,} blocks)\n")
        print("\n".join(bench_index_and_match(url, n_blocks, reps)))
        print(f"\n## Route latency, 8 engines, {n_blocks:,} resident blocks\n")
        print("\n".join(bench_route(url, n_blocks, reps)))
        print("\n## KV events applied\n")
        print("\n".join(bench_events(url, 2_000 if args.quick else 10_000)))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
