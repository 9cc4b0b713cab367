"""Service benchmark: HTTP throughput and latency of match and route under concurrent load on
loopback (a bounded load generator), next to the same calls in process; analyze throughput.

    python benchmarks/bench_service.py          # about 1 minute
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import socket
import statistics
import threading
import time
from collections.abc import Callable

import httpx
import numpy as np
import uvicorn

from kvforge import SyncMatcher
from kvforge.analyze import TraceRequest, analyze
from kvforge.blocks import BlockHasher, chain_keys
from kvforge.route import EngineConfig, Router
from kvforge.serve import create_app
from kvforge.sim import multi_agent_trace

VOCAB = 151_643


def _server(app) -> tuple[multiprocessing.Process, str]:
    """The service in a forked process (it inherits the built index), so the load generator
    does not share its interpreter lock."""
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only then, and
    # without it every response stalls ~40 ms on delayed ACKs
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def run() -> None:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(
            sockets=[sock]
        )

    proc = multiprocessing.get_context("fork").Process(target=run, daemon=True)
    proc.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    return proc, url


def load(
    url: str, path: str, body: dict, workers: int, per_worker: int
) -> tuple[float, list[float]]:
    """``workers`` threads, each sending ``per_worker`` requests back to back (bounded)."""
    lat: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            mine = []
            for _ in range(per_worker):
                t = time.perf_counter()
                r = c.post(path, json=body)
                mine.append((time.perf_counter() - t) * 1e3)
                assert r.status_code == 200, r.text
            with lock:
                lat.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return workers * per_worker / (time.perf_counter() - t0), lat


def in_process(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    per = 20 if a.quick else 60
    rng = np.random.default_rng(0)
    m = SyncMatcher()
    system = rng.integers(0, VOCAB, 1024).tolist()
    for i in range(200):  # ~100k indexed blocks
        m.index_prompt(f"agent{i}", system + rng.integers(0, VOCAB, 7168).tolist())
    router = Router(
        [EngineConfig(f"e{i}") for i in range(8)], speculative_ttl=0, tokenizer=m.tokenizer
    )
    prompt = system + rng.integers(0, VOCAB, 7168).tolist()  # 8k tokens, 64 blocks shared
    router.residency.store("e3", chain_keys(BlockHasher().chain(prompt)).tolist())
    # the live shape: an ~8k-token chat whose system prompt and tools repeat on every request
    words = " ".join(f"rule{i} keep changes small and reviewed." for i in range(900))
    tools = [{"type": "function", "function": {"name": f"tool{i}", "description": words[:800],
              "parameters": {"type": "object"}}} for i in range(6)]  # fmt: skip
    user = " ".join(f"step {i} of the plan" for i in range(400))
    chat = [{"role": "system", "content": words}, {"role": "user", "content": user}]
    held = m.blocks(m.tokenize(chat, tools=tools))
    router.residency.store("e5", held.chain_keys[: held.num_blocks * 3 // 4].tolist())
    proc, url = _server(create_app(m, router=router, subscribe=False))
    rows = [
        "| call (8k-token prompt) | concurrency | requests/s | p50 (ms) | p99 (ms) | "
        "in-process p50 (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    try:
        body = {"token_ids": prompt}
        for label, path, req, fn in (
            ("token ids", "/v1/match", body, lambda: m.find_reusable_blocks(prompt)),
            ("token ids", "/v1/route", body, lambda: router.route_tokens(prompt)),
            ("chat, repeated system + tools", "/v1/route", {"messages": chat, "tools": tools},
             lambda: router.route(m.tokenize(chat, tools=tools), dispatch=False)),
        ):  # fmt: skip
            local = statistics.median(in_process(fn, 30))
            for workers in (1, 4, 16):
                rps, lat = load(url, path, req, workers, max(5, per // workers * 2))
                rows.append(
                    f"| POST {path} ({label}) | {workers} | {rps:,.0f} | {np.median(lat):.2f} | "
                    f"{np.percentile(lat, 99):.2f} | {local:.2f} |"
                )
    finally:
        proc.terminate()
        proc.join(timeout=10)
    print("## Service under concurrent load (loopback, ~100k indexed blocks)\n")
    print("\n".join(rows))
    print(
        "\n## analyze throughput and memory (generated token-id trace, full report per request)\n"
    )
    print("| requests | prompt tokens | --max-blocks | seconds | tokens / s | requests forgotten | "
          "peak RSS (MB) |\n|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for pipelines, max_blocks in ((24, 2_000_000), (8 if a.quick else 160, 100_000)):
        trace = multi_agent_trace(pipelines=pipelines, seed=3)
        reqs = [TraceRequest(i, r["agent_id"], r["token_ids"]) for i, r in enumerate(trace)]
        tokens = sum(len(r.prompt) for r in reqs)
        t0 = time.perf_counter()
        res = analyze(iter(reqs), SyncMatcher(), max_blocks=max_blocks)
        dt = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {len(reqs):,} | {tokens:,} | {max_blocks:,} | {dt:.1f} | {tokens / dt:,.0f} | "
              f"{res.forgotten:,} | {rss:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
