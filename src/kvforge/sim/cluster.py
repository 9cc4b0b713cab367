"""Replaying a multi-agent trace on a simulated cluster under a routing policy.

Time model: a request arrives at its ``t`` divided by ``rate`` (or ``i × interarrival``). Each
engine prefills one request at a time, in arrival order: a request waits for the engine's
earlier prefills (queue wait), then takes ``uncached_tokens × prefill_s_per_token +
cached_tokens × cached_s_per_token`` (the profile: defaults from an 8B model on an H200,
~0.5 ms per uncached 16-token block, prefix hits nearly free); its time to first token (TTFT)
is wait + prefill. It then decodes — ``output_tokens × decode_s_per_token``, or ``decode_s``
when the trace does not say (continuous batching: decoding does not hold up other
prefills) — and holds its KV blocks until it finishes.
Policies:

* ``round_robin``; ``least_load`` (fewest KV blocks in use);
* ``first_block_hash`` — the seed's routing hint (sha256 of the first 16 tokens) placed on
  the engines by rendezvous hashing;
* ``prefix`` — kvforge's router, fed by the engines' KV events over real ZMQ sockets
  (each engine publishes vLLM-format batches; subscribers apply them to the residency index);
* ``ttft`` — kvforge's router (from the KV events, as ``prefix``) choosing the lowest predicted
  TTFT: the engine's queued prefill work plus this request's uncached prefill there;
* ``oracle`` — reads every engine's true cache: the longest cached prefix, ties by load;
* ``ttft_oracle`` — the lowest *true* TTFT (true cache and true queue): the load-aware bound.
"""

from __future__ import annotations

import hashlib
import heapq
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash
import zmq

from kvforge.blocks import BlockHasher, BlockSequence
from kvforge.errors import InvalidInputError
from kvforge.events.publisher import EventPublisher
from kvforge.events.subscriber import EventSubscriber
from kvforge.route import EngineConfig, ResidencyIndex, Router
from kvforge.sim.engine import SimEngine

POLICIES = (
    "round_robin",
    "least_load",
    "first_block_hash",
    "prefix",
    "ttft",
    "oracle",
    "ttft_oracle",
)


@dataclass(frozen=True, slots=True)
class SimRequest:
    agent_id: str
    token_ids: tuple[int, ...]
    cache_salt: str | None = None
    t: float | None = None
    output_tokens: int | None = None  # decode length, when the trace says


@dataclass
class PolicyResult:
    policy: str
    requests: int
    prompt_tokens: int
    hit_tokens: int
    prefill_tokens: int
    per_engine_prefill: list[int] = field(default_factory=list)
    overflow_blocks: int = 0
    ttft_s: list[float] = field(default_factory=list)  # per request, time to first token
    queue_s: list[float] = field(default_factory=list)  # per request, wait before prefill

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def load_cv(self) -> float:
        xs = self.per_engine_prefill
        mean = statistics.fmean(xs) if xs else 0.0
        return statistics.pstdev(xs) / mean if mean else 0.0

    def pct(self, xs: list[float], q: float) -> float:
        if not xs:
            return 0.0
        s = sorted(xs)
        return s[min(len(s) - 1, int(q * len(s)))]

    def to_json(self) -> dict[str, Any]:
        return {
            "hit_rate": self.hit_rate,
            "prefill_tokens": self.prefill_tokens,
            "prompt_tokens": self.prompt_tokens,
            "load_cv": self.load_cv,
            "ttft_p50_s": self.pct(self.ttft_s, 0.5),
            "ttft_p99_s": self.pct(self.ttft_s, 0.99),
            "ttft_mean_s": statistics.fmean(self.ttft_s) if self.ttft_s else 0.0,
            "queue_wait_p50_s": self.pct(self.queue_s, 0.5),
            "queue_wait_p99_s": self.pct(self.queue_s, 0.99),
        }


@dataclass
class ClusterConfig:
    engines: int = 4
    blocks_per_engine: int = 4096
    block_size: int = 16
    hash_algo: str = "sha256"
    hash_seed: str | None = None
    prefill_s_per_token: float = 3e-5  # ≈ 0.5 ms per 16-token block (8B model, H200)
    cached_s_per_token: float = 0.0  # a prefix hit: nearly free
    decode_s: float = 2.0  # per request whose output length is unknown
    decode_s_per_token: float = 0.02  # otherwise: its output tokens at this pace
    interarrival: float = 0.05
    rate: float = 1.0  # arrival-rate multiplier for traces with times (t / rate)


def simulate(
    requests: Sequence[SimRequest], policy: str, config: ClusterConfig | None = None
) -> PolicyResult:
    """Replay ``requests`` under ``policy``; returns hit and load accounting."""
    if policy not in POLICIES:
        raise InvalidInputError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    cfg = config or ClusterConfig()
    if cfg.engines < 1 or cfg.blocks_per_engine < 1:
        raise InvalidInputError("engines and blocks_per_engine must be positive")
    hasher = BlockHasher(cfg.hash_algo, block_size=cfg.block_size, hash_seed=cfg.hash_seed)
    names = [f"engine{i}" for i in range(cfg.engines)]
    wiring = (
        _EventWiring(names, cfg, ttft=policy == "ttft") if policy in ("prefix", "ttft") else None
    )
    engines = [
        SimEngine(
            n, cfg.blocks_per_engine, cfg.block_size, wiring.publishers[i] if wiring else None
        )
        for i, n in enumerate(names)
    ]
    busy = [0.0] * cfg.engines  # per engine: when its queued prefills are done
    choose = _policy(policy, engines, wiring, busy, cfg)
    result = PolicyResult(policy, 0, 0, 0, 0)
    finishing: list[tuple[float, int, int, list[int]]] = []  # (time, order, engine, blocks)
    try:
        for i, req in enumerate(requests):
            now = req.t / cfg.rate if req.t is not None else i * cfg.interarrival
            while finishing and finishing[0][0] <= now:
                _, _, e, blocks = heapq.heappop(finishing)
                engines[e].release(blocks)
            seq = BlockSequence(hasher, req.token_ids, cache_salt=req.cache_salt)
            keys = seq.chain_keys.tolist()
            e = choose(req, keys, now)
            adm = engines[e].admit(keys, req.token_ids)
            if wiring is not None:
                wiring.sync(e)
            hit = adm.hit_blocks * cfg.block_size
            result.requests += 1
            result.prompt_tokens += len(req.token_ids)
            result.hit_tokens += hit
            result.prefill_tokens += len(req.token_ids) - hit
            result.overflow_blocks += adm.overflow
            start = max(now, busy[e])
            prefill = _prefill_s(cfg, len(req.token_ids), hit)
            busy[e] = start + prefill
            result.queue_s.append(start - now)
            result.ttft_s.append(start + prefill - now)
            decode = (
                cfg.decode_s
                if req.output_tokens is None
                else req.output_tokens * cfg.decode_s_per_token
            )
            heapq.heappush(finishing, (start + prefill + decode, i, e, adm.blocks))
    finally:
        if wiring is not None:
            wiring.close()
    result.per_engine_prefill = [eng.prefill_tokens for eng in engines]
    return result


class _EventWiring:
    """Per engine a vLLM-compatible publisher, a subscriber, and one router over them all."""

    def __init__(self, names: list[str], cfg: ClusterConfig, *, ttft: bool = False) -> None:
        self.ctx = zmq.Context()
        self.residency = ResidencyIndex()
        self.publishers: list[EventPublisher] = []
        self.subscribers: list[EventSubscriber] = []
        for n in names:
            pub = EventPublisher(
                "tcp://127.0.0.1:*",
                replay_endpoint="tcp://127.0.0.1:*",
                topic=f"kv@{n}@sim",
                context=self.ctx,
            )
            self.publishers.append(pub)
            self.subscribers.append(
                EventSubscriber(
                    n,
                    pub.endpoint,
                    self.residency,
                    replay_endpoint=pub.replay_endpoint,
                    topic=f"kv@{n}@sim",
                    context=self.ctx,
                ).start()
            )
        configs = [
            EngineConfig(
                n, block_size=cfg.block_size, hash_algo=cfg.hash_algo, hash_seed=cfg.hash_seed
            )
            for n in names
        ]
        # ttft: costs in blocks of prefill on both sides (load = queued prefill blocks), and no
        # balance guard (the queue already prices an engine's backlog)
        self.router = (
            Router(
                configs,
                residency=self.residency,
                load_weight=1.0,
                balance_rel=1e12,
                balance_abs=1e12,
            )
            if ttft
            else Router(configs, residency=self.residency)
        )

    def sync(self, e: int) -> None:
        """Wait until engine ``e``'s last batch has been applied (deterministic replays; a
        live deployment covers this gap with the router's speculative entries)."""
        last = self.publishers[e].next_seq - 1
        if last < 0 or self.subscribers[e].wait_for_seq(last, timeout=2):
            return
        # PUB/SUB drops messages past its high-water mark when the subscriber lags (a loaded
        # machine); a gap is recovered from the replay buffer only once a later batch arrives,
        # so when the *last* batches were dropped, an empty batch makes the gap visible
        for _ in range(4):
            last = self.publishers[e].publish([])
            if self.subscribers[e].wait_for_seq(last, timeout=2):
                return
        raise RuntimeError(f"events of engine {e} did not arrive")

    def close(self) -> None:
        for s in self.subscribers:
            s.stop()
        for p in self.publishers:
            p.close()
        self.ctx.term()


def _prefill_s(cfg: ClusterConfig, tokens: int, hit: int) -> float:
    return (tokens - hit) * cfg.prefill_s_per_token + hit * cfg.cached_s_per_token


def _policy(
    name: str,
    engines: list[SimEngine],
    wiring: _EventWiring | None,
    busy: list[float],
    cfg: ClusterConfig,
) -> Callable[[SimRequest, list[int], float], int]:
    n = len(engines)
    if name == "round_robin":
        counter = iter(range(1 << 62))
        return lambda req, keys, now: next(counter) % n
    if name == "least_load":
        return lambda req, keys, now: min(range(n), key=lambda e: (engines[e].active_blocks, e))
    if name == "first_block_hash":

        def by_hint(req: SimRequest, keys: list[int], now: float) -> int:
            hint = hashlib.sha256(str(tuple(req.token_ids[:16])).encode()).hexdigest()[:32]
            return max(range(n), key=lambda e: xxhash.xxh3_64_intdigest(f"{hint}/{e}".encode()))

        return by_hint
    if name == "oracle":

        def oracle(req: SimRequest, keys: list[int], now: float) -> int:
            toks = len(req.token_ids)
            return max(
                range(n),
                key=lambda e: (engines[e].hit_blocks(keys, toks), -engines[e].active_blocks, -e),
            )

        return oracle
    if name == "ttft_oracle":

        def ttft_oracle(req: SimRequest, keys: list[int], now: float) -> int:
            toks, bs = len(req.token_ids), cfg.block_size
            return min(
                range(n),
                key=lambda e: (
                    max(now, busy[e])
                    + _prefill_s(cfg, toks, engines[e].hit_blocks(keys, toks) * bs),
                    engines[e].active_blocks,
                    e,
                ),
            )

        return ttft_oracle
    assert wiring is not None
    index = {eng.name: i for i, eng in enumerate(engines)}
    if name == "ttft":
        # the router's cost, in one unit (blocks of prefill): this request's uncached blocks
        # on the engine plus the engine's queued prefill work — its predicted TTFT
        block_s = cfg.prefill_s_per_token * cfg.block_size

        def ttft(req: SimRequest, keys: list[int], now: float) -> int:
            queued = {eng.name: max(0.0, busy[i] - now) / block_s for i, eng in enumerate(engines)}
            d = wiring.router.route_tokens(
                req.token_ids, loads=queued, cache_salt=req.cache_salt, now=now
            )
            return index[d.engine]

        return ttft

    def prefix(req: SimRequest, keys: list[int], now: float) -> int:
        loads = {eng.name: float(eng.active_blocks) for eng in engines}
        d = wiring.router.route_tokens(
            req.token_ids, loads=loads, cache_salt=req.cache_salt, now=now
        )
        return index[d.engine]

    return prefix
