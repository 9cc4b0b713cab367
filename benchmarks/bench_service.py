"""Service benchmark: HTTP throughput and latency of match and route under concurrent load on
loopback (a bounded load generator), next to the same calls in process; the service with
several worker processes on Redis; analyze throughput.

    .venv/bin/python benchmarks/bench_service.py          # about 2 minutes

The load generator is light on purpose (it shares the machine's cores with the service): one
keep-alive socket per concurrent client, the request bytes encoded once, responses read by
their Content-Length — what a sidecar or a compiled client costs, not a Python HTTP stack.
Workers need redis-server on PATH (their rows are skipped otherwise).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import httpx
import numpy as np
import uvicorn

from kvforge import SyncMatcher
from kvforge.analyze import TraceRequest, analyze
from kvforge.blocks import BlockHasher, chain_keys
from kvforge.events.publisher import EventPublisher
from kvforge.events.schema import BlockStored
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


class _Conn:
    """One keep-alive HTTP/1.1 connection sending a prepared request."""

    def __init__(self, url: str, request: bytes) -> None:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.request = request

    def send(self) -> tuple[int, bytes]:
        self.sock.sendall(self.request)
        status = int(self.file.readline().split()[1])
        length = 0
        while True:
            line = self.file.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, self.file.read(length)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def prepared(path: str, body: dict) -> bytes:
    raw = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n\r\n"
    )
    return head.encode() + raw


def load(
    url: str, path: str, body: dict, workers: int, per_worker: int
) -> tuple[float, list[float]]:
    """``workers`` clients, each sending ``per_worker`` requests back to back (bounded) on its
    own connection, after one warm-up request."""
    request = prepared(path, body)
    lat: list[float] = []
    lock = threading.Lock()
    ready = threading.Barrier(workers + 1)

    def worker() -> None:
        conn = _Conn(url, request)
        status, reply = conn.send()  # warm-up: connection set up, caches filled
        assert status == 200, reply
        ready.wait()
        mine = []
        for _ in range(per_worker):
            t = time.perf_counter()
            status, reply = conn.send()
            mine.append((time.perf_counter() - t) * 1e3)
            assert status == 200, reply
        conn.close()
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for th in threads:
        th.start()
    ready.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    return workers * per_worker / (time.perf_counter() - t0), lat


def _publish(pub: EventPublisher, tokens: list[int], upto: int) -> None:
    """BlockStored events for the first ``upto`` blocks of ``tokens``, 32 blocks per event."""
    keys = chain_keys(BlockHasher().chain(tokens)).tolist()[:upto]
    for i in range(0, len(keys), 32):
        pub.publish(
            [
                BlockStored(
                    block_hashes=keys[i : i + 32],
                    parent_block_hash=keys[i - 1] if i else None,
                    token_ids=tokens[i * 16 : (i + len(keys[i : i + 32])) * 16],
                    block_size=16,
                    medium="GPU",
                )
            ]
        )


def bench_workers(
    m: SyncMatcher, prompt: list[int], chat: list[dict], tools: list[dict], per: int
) -> list[str]:
    """The same route calls against ``kvforge serve`` with 1 and 2 worker processes, sharing
    index and residency on a local redis-server; two engines publish their blocks as KV events
    (what the workers know of the engines comes only from those)."""
    if shutil.which("redis-server") is None:
        return ["(skipped: redis-server not found)"]
    from bench_redis import start_redis

    chat_ids = list(m.tokenize(chat, tools=tools).token_ids)
    rows = [
        "| call (8k-token prompt) | workers | concurrency | requests/s | p50 (ms) | p99 (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        redis, redis_url = start_redis(tmp)
        try:
            for n_workers in (1, 2):
                pubs = {e: EventPublisher("tcp://127.0.0.1:*", topic=e) for e in ("e3", "e5")}
                engines = "".join(
                    f'[[engines]]\nname = "e{i}"\n'
                    + (
                        f'events = "{pubs[f"e{i}"].endpoint}"\ntopic = "e{i}"\n'
                        if f"e{i}" in pubs
                        else ""
                    )
                    for i in range(8)
                )
                cfg = os.path.join(tmp, f"w{n_workers}.toml")
                with open(cfg, "w") as fh:
                    fh.write(
                        f"[service]\nworkers = {n_workers}\n"
                        f'index_url = "{redis_url}?prefix=bench{n_workers}"\n'
                        f"[router]\nspeculative_ttl = 0.0\nexpose_decisions = true\n{engines}"
                    )
                with socket.socket() as sk:
                    sk.bind(("127.0.0.1", 0))
                    port = sk.getsockname()[1]
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "kvforge.cli.main",
                        "serve",
                        "--config",
                        cfg,
                        "--port",
                        str(port),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                url = f"http://127.0.0.1:{port}"
                try:
                    _ready(url, pubs, prompt, chat_ids)
                    for label, body in (
                        ("token ids", {"token_ids": prompt}),
                        ("chat, repeated system + tools", {"messages": chat, "tools": tools}),
                    ):
                        for conc in (1, 4, 16):
                            rps, lat = load(url, "/v1/route", body, conc, max(10, per * 2 // conc))
                            rows.append(
                                f"| POST /v1/route ({label}) | {n_workers} | {conc} | {rps:,.0f} "
                                f"| {np.median(lat):.2f} | {np.percentile(lat, 99):.2f} |"
                            )
                finally:
                    proc.terminate()
                    proc.wait(timeout=20)
                    for pub in pubs.values():
                        pub.close()
        finally:
            redis.terminate()
            redis.wait(timeout=10)
    return rows


def _ready(url: str, pubs: dict[str, EventPublisher], prompt: list[int], chat: list[int]) -> None:
    """Wait for the service, then publish the engines' blocks until every worker routes by
    them: the prompt fully on e3, three quarters of the chat on e5."""
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the service did not start")
        time.sleep(0.2)
    want = len(chat) // 16 * 3 // 4
    while time.monotonic() < deadline:
        _publish(pubs["e3"], prompt, len(prompt) // 16)
        _publish(pubs["e5"], chat, want)
        time.sleep(0.3)
        got = {
            (r["engine"], r["cached_blocks"])
            for r in (
                httpx.post(url + "/v1/route", json={"token_ids": chat}, timeout=10).json()
                for _ in range(8)
            )
        }
        if got == {("e5", want)}:
            return
    raise SystemExit(f"the workers did not see the engines' events: {got}")


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
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"tool{i}",
                "description": words[:800],
                "parameters": {"type": "object"},
            },
        }
        for i in range(6)
    ]
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
            (
                "chat, repeated system + tools",
                "/v1/route",
                {"messages": chat, "tools": tools},
                lambda: router.route(m.tokenize(chat, tools=tools), dispatch=False),
            ),
        ):
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
        "\n## Worker processes on Redis (`kvforge serve --workers N`, engines' events over ZMQ)\n"
    )
    print("\n".join(bench_workers(m, prompt, chat, tools, per)))
    print(
        "\n## analyze throughput and memory (generated token-id trace, full report per request)\n"
    )
    print(
        "| requests | prompt tokens | --max-blocks | seconds | tokens / s | requests forgotten | "
        "peak RSS (MB) |\n|---:|---:|---:|---:|---:|---:|---:|"
    )
    for pipelines, max_blocks in ((24, 2_000_000), (8 if a.quick else 160, 100_000)):
        trace = multi_agent_trace(pipelines=pipelines, seed=3)
        reqs = [TraceRequest(i, r["agent_id"], r["token_ids"]) for i, r in enumerate(trace)]
        tokens = sum(len(r.prompt) for r in reqs)
        t0 = time.perf_counter()
        res = analyze(iter(reqs), SyncMatcher(), max_blocks=max_blocks)
        dt = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"| {len(reqs):,} | {tokens:,} | {max_blocks:,} | {dt:.1f} | {tokens / dt:,.0f} | "
            f"{res.forgotten:,} | {rss:,.0f} |"
        )


if __name__ == "__main__":
    main()
