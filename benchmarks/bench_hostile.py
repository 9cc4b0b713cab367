"""Hostile inputs, measured: low-entropy prompts (the span budget), a pathological tenant beside
a normal one (per-tenant locks), invented tenants (memory), and a sweep of malformed HTTP
bodies (statuses, 5xx, state).

    .venv/bin/python benchmarks/bench_hostile.py          # about 1 minute

Prints markdown tables; everything runs in process (the service through FastAPI's test client).
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
from fastapi.testclient import TestClient

from kvforge import SyncMatcher
from kvforge.route import EngineConfig, Router
from kvforge.serve import create_app

LOW_ENTROPY = {
    '"a " * 16384': "a " * 16384,
    "[5] * 8192": [5] * 8192,
    '"| --- " * 2048': "| --- " * 2048,
}


def ms(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return (time.perf_counter() - t0) * 1e3


def bench_low_entropy() -> list[str]:
    rows = [
        "| prompt | index (ms) | match (ms) | shifted (ms) | clear (ms) | truncated | spans |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    m = SyncMatcher()
    for name, p in LOW_ENTROPY.items():
        shifted = ("x " + p) if isinstance(p, str) else [7, *p]
        t0 = time.perf_counter()
        m.index_prompt("owner", p, tenant=name)
        t1 = time.perf_counter()
        r = m.find_reusable_blocks(p, tenant=name)
        t2 = time.perf_counter()
        m.find_reusable_blocks(shifted, tenant=name)
        t3 = time.perf_counter()
        m.clear_agent("owner", tenant=name)
        t4 = time.perf_counter()
        cells = " | ".join(
            f"{(b - a) * 1e3:.0f}" for a, b in ((t0, t1), (t1, t2), (t2, t3), (t3, t4))
        )
        label = name.replace("|", "\\|")  # a pipe inside a markdown table cell
        rows.append(f"| `{label}` | {cells} | {r.truncated} | {len(r.moved_spans)} |")
    return rows


def bench_tenants() -> list[str]:
    """Tenant B's small lookups, alone and while tenant A loops on a low-entropy prompt."""
    m = SyncMatcher()
    rng = np.random.default_rng(1)
    b_prompt = rng.integers(0, 150_000, 1024).tolist()
    m.index_prompt("b", b_prompt, tenant="B")
    bad = "a " * 16384
    m.index_prompt("a", bad, tenant="A")
    q = b_prompt[:512] + rng.integers(0, 150_000, 512).tolist()

    def sample(n: int) -> list[float]:
        return [ms(lambda: m.find_reusable_blocks(q, tenant="B")) for _ in range(n)]

    quiet = sample(200)
    stop = threading.Event()
    a_times: list[float] = []

    def attacker() -> None:
        while not stop.is_set():
            a_times.append(ms(lambda: m.find_reusable_blocks(bad, tenant="A")))

    th = threading.Thread(target=attacker)
    th.start()
    time.sleep(0.05)
    busy = sample(200)
    stop.set()
    th.join()
    return [
        "| tenant B | p50 (ms) | p99 (ms) | tenant A's query p50 (ms) |",
        "|---|---:|---:|---:|",
        f"| alone | {np.median(quiet):.2f} | {np.percentile(quiet, 99):.2f} | — |",
        f'| while A runs `"a " * 16384` | {np.median(busy):.2f} | '
        f"{np.percentile(busy, 99):.2f} | {np.median(a_times):.1f} |",
    ]


def bench_tenant_cost(n: int = 3000) -> list[str]:
    """Memory a caller buys by inventing tenants: one small prompt each (tracemalloc)."""
    import gc
    import tracemalloc

    m = SyncMatcher()
    m.index_prompt("warm", [1] * 16, tenant="warm")
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        m.index_prompt("a", [1] * 16, tenant=f"t{i}")
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return [
        "| tenants | total (MiB) | per tenant (KiB) |",
        "|---:|---:|---:|",
        f"| {n:,} | {used / 2**20:.1f} | {used / n / 1024:.1f} |",
    ]


def bench_http() -> list[str]:
    m = SyncMatcher(max_prompt_tokens=200_000, max_prompt_chars=1_000_000)
    router = Router(
        [EngineConfig("e0", url="http://127.0.0.1:9"), EngineConfig("e1")], speculative_ttl=0
    )
    c = TestClient(
        create_app(m, router=router, subscribe=False, max_body_bytes=2_000_000),
        raise_server_exceptions=False,
    )
    c.post("/v1/index", json={"agent_id": "base", "token_ids": list(range(100, 1100))})
    before = (m.agents(), m.stats()["blocks"])
    bodies = [
        '{"token_ids": [NaN]}',
        '{"token_ids": [1e400]}',
        '{"token_ids": [-1]}',
        '{"token_ids": [4294967296]}',
        '{"token_ids": [1.0]}',
        '{"token_ids": [true]}',
        '{"token_ids": ["1"]}',
        '{"token_ids": [99999999999999999999999]}',
        '{"prompt": "a\\udc00"}',
        '{"prompt": "a\\u0000b"}',
        '{"messages": [{"role": "user", "content": "x\\ud800"}]}',
        '{"messages": [{"role": "user", "content": 5}]}',
        '{"messages": [{"role": "user", "tool_calls": 5}]}',
        '{"messages": [{"role": "user", "tool_calls": ["x"]}]}',
        '{"messages": [{"role": "user", "tool_calls": [{"function": 5}]}]}',
        '{"messages": []}',
        '{"messages": [5]}',
        '{"prompt": ""}',
        '{"prompt": null}',
        "{}",
        "[]",
        "null",
        '{"prompt": "a", "cache_sal": "x"}',
        '{"prompt": "a", "cache_salt": "s\\udc00"}',
        '{"prompt": "a", "cache_salt": "a/b"}',
        '{"prompt": "a", "lora_name": "x"}',
        '{"prompt": "a", "loads": {"e0": NaN}}',
        '{"prompt": "a", "loads": {"e0": 1e400}}',
        '{"prompt": "a", "exclude_agent": ""}',
        *(
            json.dumps({"prompt": p}) if isinstance(p, str) else json.dumps({"token_ids": p})
            for p in LOW_ENTROPY.values()
        ),
        '{"prompt": "' + "x" * 1_500_000 + '"}',
    ]
    cases: list[tuple[str, str, dict[str, object]]] = []
    for path in ("/v1/index", "/v1/match", "/v1/prefix-hash", "/v1/route"):
        for b in bodies:
            if path == "/v1/index" and b.startswith("{") and b != "{}":
                b = '{"agent_id": "x", ' + b[1:]
            cases.append(("POST", path, {"content": b}))
    big_chat = '{"model": "m", "messages": [{"role": "user", "content": "' + "w " * 600_000 + '"}]}'
    cases += [
        ("DELETE", "/v1/agents/a/b/c", {}),
        ("DELETE", "/v1/agents/" + "x" * 5000, {}),
        ("GET", "/v1/agents", {"headers": {"X-Tenant": "x" * 300}}),
        ("GET", "/v1/agents", {"headers": [("X-Tenant", "a"), ("X-Tenant", "b")]}),
        (
            "POST",
            "/v1/chat/completions",
            {"content": '{"model": [1], "messages": [{"role": "user", "content": "hi"}]}'},
        ),
        ("POST", "/v1/chat/completions", {"content": big_chat}),
        (
            "POST",
            "/v1/completions",
            {"content": '{"model": "m", "prompt": ' + json.dumps(list(range(300_000))) + "}"},
        ),
    ]
    codes: dict[int, int] = {}
    server_errors = 0
    longest = 0.0
    for method, path, kw in cases:
        if "content" in kw:
            kw = {**kw, "headers": {"content-type": "application/json"}}
        t0 = time.perf_counter()
        r = c.request(method, path, **kw)  # type: ignore[arg-type]
        longest = max(longest, time.perf_counter() - t0)
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
        # 502 is the proxy's honest answer for an engine that is not there (e0's URL)
        server_errors += r.status_code >= 500 and r.status_code != 502
    m.clear_agent("x")
    same = (m.agents(), m.stats()["blocks"]) == before
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(codes.items()))
    return [
        "| inputs | statuses | 5xx (not 502) | longest call (ms) | state unchanged |",
        "|---:|---|---:|---:|---|",
        f"| {len(cases)} | {statuses} | {server_errors} | {longest * 1e3:.0f} | {same} |",
    ]


def main() -> None:
    print("## Low-entropy prompts (span budget), tokenization included\n")
    print("\n".join(bench_low_entropy()))
    print("\n## A pathological tenant beside a normal one (one matcher, two threads)\n")
    print("\n".join(bench_tenants()))
    print("\n## Tenants invented by a caller (one 16-token prompt each)\n")
    print("\n".join(bench_tenant_cost()))
    print("\n## Malformed and hostile HTTP inputs (service in process)\n")
    print("\n".join(bench_http()))


if __name__ == "__main__":
    main()
