"""The engine simulator: vLLM-like block pool, exact hit accounting, events that mirror it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import zmq

from kvforge.blocks import BlockHasher, chain_keys
from kvforge.events.publisher import EventPublisher
from kvforge.events.subscriber import EventSubscriber
from kvforge.route import ResidencyIndex
from kvforge.sim import ClusterConfig, SimEngine, SimRequest, multi_agent_trace, simulate

H = BlockHasher()


def keys(tokens) -> list[int]:
    return chain_keys(H.chain(tokens)).tolist()


def _requests(n_pipelines: int = 6, seed: int = 0) -> list[SimRequest]:
    tr = multi_agent_trace(
        pipelines=n_pipelines, system_tokens=256, doc_tokens=512, turn_tokens=64, seed=seed
    )
    return [SimRequest(r["agent_id"], tuple(r["token_ids"]), None, r["t"]) for r in tr]


def _direct_hits(reqs: list[SimRequest], assign: list[int], bs: int = 16) -> int:
    """Unlimited cache: a request hits the longest block-aligned prefix it shares with an
    earlier request on the same engine, never its own last token (vLLM's rule)."""
    total = 0
    seen: dict[int, list[tuple[int, ...]]] = {}
    for r, e in zip(reqs, assign, strict=True):
        best = 0
        for prev in seen.get(e, []):
            n = 0
            while (n + 1) * bs <= min(len(prev), len(r.token_ids)) and prev[
                n * bs : (n + 1) * bs
            ] == r.token_ids[n * bs : (n + 1) * bs]:
                n += 1
            best = max(best, n)
        total += min(best, (len(r.token_ids) - 1) // bs) * bs
        seen.setdefault(e, []).append(r.token_ids)
    return total


def test_hit_accounting_equals_direct_recomputation() -> None:
    reqs = _requests()
    reqs += reqs[:6]  # exact repeats: the last-token rule decides their hits
    for engines in (1, 3):
        res = simulate(reqs, "round_robin", ClusterConfig(engines=engines, blocks_per_engine=10**6))
        assign = [i % engines for i in range(len(reqs))]
        assert res.hit_tokens == _direct_hits(reqs, assign)
        assert res.prefill_tokens == res.prompt_tokens - res.hit_tokens
        assert sum(res.per_engine_prefill) == res.prefill_tokens


def test_pool_evicts_lru_and_frees_tail_first() -> None:
    e = SimEngine("e", num_blocks=5)  # vLLM's null block + 4 usable
    a = list(range(48))  # 3 full blocks
    adm = e.admit(keys(a), a)
    assert adm.hit_blocks == 0 and len(adm.blocks) == 3
    e.release(adm.blocks)
    b = list(range(1000, 1016))  # one cold block: takes the never-used block first
    e.release(e.admit(keys(b), b).blocks)
    c = list(range(2000, 2016))  # next: evicts A's tail block (freed first)
    e.release(e.admit(keys(c), c).blocks)
    assert e.cached_prefix(keys(a)) == 2
    again = e.admit(keys(a), a)
    assert again.hit_blocks == 2
    assert e.prefill_tokens == 48 + 16 + 16 + 16


@contextmanager
def _wired() -> Iterator[tuple[EventPublisher, EventSubscriber, ResidencyIndex]]:
    """A publisher and a subscriber over real sockets, feeding one residency."""
    ctx = zmq.Context()
    res = ResidencyIndex()
    pub = EventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", context=ctx)
    sub = EventSubscriber(
        "e", pub.endpoint, res, replay_endpoint=pub.replay_endpoint, context=ctx
    ).start()
    time.sleep(0.2)
    try:
        yield pub, sub, res
    finally:
        sub.stop()
        pub.close()
        ctx.term()


def test_events_mirror_the_true_cache_over_real_sockets() -> None:
    with _wired() as (pub, sub, res):
        eng = SimEngine("e", num_blocks=40, publisher=pub)
        running = []
        for i, r in enumerate(_requests(4)):
            toks = r.token_ids[: 16 * 12 + 5]
            running.append(eng.admit(keys(toks), toks).blocks)
            if i % 2:
                eng.release(running.pop(0))
        assert sub.wait_for_seq(pub.next_seq - 1, timeout=10)
        held = set(res._engines["e"].counts.get("GPU", {}))
        assert held == set(eng.cached)
        assert res.stats()["engines"]["e"]["GPU"] == len(eng.cached)


def test_prefix_routing_beats_blind_policies_under_cache_pressure() -> None:
    reqs = _requests(8)
    cfg = ClusterConfig(engines=4, blocks_per_engine=300)
    got = {p: simulate(reqs, p, cfg) for p in ("round_robin", "first_block_hash", "prefix")}
    assert got["prefix"].hit_rate > got["round_robin"].hit_rate
    assert got["prefix"].hit_rate > got["first_block_hash"].hit_rate
    assert got["prefix"].load_cv < got["first_block_hash"].load_cv


def test_cli_simulate_json_contract(tmp_path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"agent_id": r.agent_id, "token_ids": list(r.token_ids), "t": r.t})
            for r in _requests(3)
        )
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvforge.cli.main",
            "simulate",
            str(path),
            "--engines",
            "2",
            "--blocks-per-engine",
            "500",
            "--policy",
            "all",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    # the keys it always had, and the time model's (added, never renamed)
    assert set(doc["policies"]) == {
        "round_robin",
        "least_load",
        "first_block_hash",
        "prefix",
        "oracle",
        "ttft",
        "ttft_oracle",
    }
    for p in doc["policies"].values():
        assert set(p) == {"hit_rate", "prefill_tokens", "prompt_tokens", "load_cv"} | {
            "ttft_p50_s",
            "ttft_p99_s",
            "ttft_mean_s",
            "queue_wait_p50_s",
            "queue_wait_p99_s",
        }
        assert 0 <= p["hit_rate"] <= 1 and p["prefill_tokens"] <= p["prompt_tokens"]
    bad = subprocess.run(
        [sys.executable, "-m", "kvforge.cli.main", "simulate", str(path), "--policy", "nope"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown policy" in bad.stderr


def test_pool_follows_vllm_block_pool_rules() -> None:
    """The last-token rule, duplicate copies, the null block and the free-queue order, each
    as vLLM 0.33.0's KV cache manager decides (see sim/engine.py for the code each mirrors)."""
    # the last token is always recomputed: a 32-token prompt sent twice hits one block, and
    # its recomputed last block becomes a second cached copy of the same hash
    e = SimEngine("e", num_blocks=16)
    p = list(range(32))
    e.release(e.admit(keys(p), p).blocks)
    again = e.admit(keys(p), p)
    assert again.hit_blocks == 1 and e.hit_blocks(keys(p), 33) == 2
    assert len(e.cached[keys(p)[1]]) == 2 and len(e.cached[keys(p)[0]]) == 1
    e.release(again.blocks)
    # capacity: num_blocks counts the null block
    small = SimEngine("e", num_blocks=3)
    assert small.usable_blocks == 2 and small.admit(keys([*p, 1]), [*p, 1]).overflow == 1
    # freed blocks without a hash go to the front: the next request takes the partial block,
    # not a cached one
    f = SimEngine("e", num_blocks=4)  # 3 usable
    q = list(range(100, 140))  # 2 full blocks + 8 tokens
    adm = f.admit(keys(q), q)
    f.release(adm.blocks)
    assert next(iter(f.free)) == adm.blocks[2]  # the partial block, first to be reused
    r = list(range(500, 516))
    f.release(f.admit(keys(r), r).blocks)
    assert f.cached_prefix(keys(q)) == 2  # q's cached blocks survived


def test_duplicate_copies_reach_the_residency_as_vllm_sends_them() -> None:
    """Two copies of one hash: two BlockStored, and the block stays held until both copies
    are evicted (two BlockRemoved) — over real sockets."""
    with _wired() as (pub, sub, res):
        e = SimEngine("e", num_blocks=4, publisher=pub)
        p = list(range(32))
        e.release(e.admit(keys(p), p).blocks)
        e.release(e.admit(keys(p), p).blocks)  # block 1 recomputed: a second copy
        assert sub.wait_for_seq(pub.next_seq - 1, timeout=10)
        h1 = keys(p)[1]
        assert res._engines["e"].counts["GPU"][h1] == 2
        for n in range(2):  # each cold request evicts one more copy
            x = list(range(1000 + 100 * n, 1016 + 100 * n))
            e.release(e.admit(keys(x), x).blocks)
        assert sub.wait_for_seq(pub.next_seq - 1, timeout=10)
        held = res._engines["e"].counts["GPU"]
        assert set(held) == set(e.cached) and all(held[h] == len(e.cached[h]) for h in held)


def test_time_to_first_token_follows_the_queue() -> None:
    """One engine, a burst (everything arrives at once): each request waits for the prefills
    before it, so TTFTs are running sums of prefill times and the last one equals the whole
    prefill work; spreading the burst over engines with the TTFT policy cuts the tail."""
    reqs = [SimRequest(r.agent_id, r.token_ids, None, 0.0) for r in _requests(4)]
    cfg = ClusterConfig(engines=1, blocks_per_engine=10**6)
    one = simulate(reqs, "round_robin", cfg)
    assert one.queue_s[0] == 0.0 and one.queue_s == sorted(one.queue_s)
    assert all(t >= q for t, q in zip(one.ttft_s, one.queue_s, strict=True))
    assert abs(max(one.ttft_s) - one.prefill_tokens * cfg.prefill_s_per_token) < 1e-9
    four = ClusterConfig(engines=4, blocks_per_engine=10**6)
    got = {p: simulate(reqs, p, four).to_json() for p in ("prefix", "ttft", "ttft_oracle")}
    assert got["ttft"]["ttft_p99_s"] < one.to_json()["ttft_p99_s"]
    assert got["ttft"]["ttft_mean_s"] <= got["prefix"]["ttft_mean_s"] * 1.05
    for doc in got.values():
        assert {"ttft_p50_s", "ttft_p99_s", "ttft_mean_s", "queue_wait_p99_s"} <= set(doc)


def test_prefill_time_is_per_block_of_the_given_size(tmp_path) -> None:
    """--prefill-ms-per-block prices a block of --block-size tokens: at the same price, blocks
    twice as large make a cold prompt's prefill half as long."""
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"agent_id": "a", "token_ids": list(range(1000, 1640)), "t": 0}))

    def ttft(block_size: int) -> float:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "kvforge.cli.main",
                "simulate",
                str(path),
                "--engines",
                "1",
                "--policy",
                "prefix",
                "--block-size",
                str(block_size),
                "--prefill-ms-per-block",
                "1.0",
                "--json",
            ],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        return float(json.loads(out.stdout)["policies"]["prefix"]["ttft_p50_s"])

    t16, t32 = ttft(16), ttft(32)
    assert t16 == pytest.approx(0.040, rel=0.05)  # 640 uncached tokens = 40 blocks of 1 ms
    assert t32 == pytest.approx(t16 / 2, rel=0.05)
