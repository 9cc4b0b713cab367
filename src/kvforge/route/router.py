"""Prefix-aware routing: send a request to the engine whose KV cache holds most of its prefix,
without piling everything onto one hot replica.

For each engine the router computes the request's block hashes exactly as that engine does
(its algorithm, hash seed, block size, LoRA registry, the request's cache_salt), finds the
longest prefix the engine holds (from its KV events, plus speculative entries for decisions
whose events have not arrived yet), and picks the engine with the lowest

    cost = uncached_blocks × prefill_weight + load × load_weight

among engines that pass the balance guard (an engine whose load exceeds
``balance_rel × min_load + balance_abs`` is skipped unless every engine is).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from kvforge.blocks import BlockHasher, BlockSequence, LoRA, validate_cache_salt
from kvforge.errors import InvalidInputError
from kvforge.route.residency import ResidencyIndex
from kvforge.tokenize import Prompt, PromptTokenizer, TokenizedPrompt


@dataclass(frozen=True)
class EngineConfig:
    """One engine replica (one data-parallel rank) as the router sees it."""

    name: str
    url: str | None = None  # OpenAI-compatible base URL (for the proxy)
    events: str | None = None  # KV-event PUB endpoint, e.g. tcp://10.0.0.5:5557
    replay: str | None = None  # replay ROUTER endpoint
    topic: str = ""
    block_size: int = 16
    hash_algo: str = "sha256"
    hash_seed: str | None = None  # the engine's PYTHONHASHSEED (None = unset)
    loras: Mapping[str, str] = field(default_factory=dict)  # LoRA name -> path it was loaded from

    def hash_config(self) -> tuple[str, str | None, int]:
        return (self.hash_algo, self.hash_seed, self.block_size)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    engine: str
    cached_blocks: int  # leading blocks of the request the chosen engine holds
    num_blocks: int
    num_tokens: int
    scores: dict[str, float]  # per engine: tier-weighted cached prefix (blocks)
    costs: dict[str, float]
    reason: str


class Router:
    """Thread-safe (the residency index locks; the router itself holds no mutable state besides
    its round-robin tie breaker)."""

    def __init__(
        self,
        engines: Sequence[EngineConfig],
        *,
        residency: ResidencyIndex | None = None,
        tokenizer: str | Path | PromptTokenizer | None = None,
        prefill_weight: float = 1.0,
        load_weight: float = 1.0,
        balance_rel: float = 1.5,
        balance_abs: float = 64.0,
        speculative_ttl: float = 2.0,
    ):
        if not engines:
            raise InvalidInputError("a router needs at least one engine")
        names = [e.name for e in engines]
        if len(set(names)) != len(names):
            raise InvalidInputError("engine names must be unique")
        self.engines = {e.name: e for e in engines}
        self.residency = residency if residency is not None else ResidencyIndex()
        for n in names:
            self.residency.engine(n)
        self._tokenizer = tokenizer
        self.prefill_weight = prefill_weight
        self.load_weight = load_weight
        self.balance_rel = balance_rel
        self.balance_abs = balance_abs
        self.speculative_ttl = speculative_ttl
        self._hashers: dict[tuple[str, str | None, int], BlockHasher] = {}
        for e in engines:
            key = e.hash_config()
            if key not in self._hashers:
                self._hashers[key] = BlockHasher(e.hash_algo, block_size=e.block_size,
                                                 hash_seed=e.hash_seed)  # fmt: skip

    @property
    def tokenizer(self) -> PromptTokenizer:
        if not isinstance(self._tokenizer, PromptTokenizer):
            self._tokenizer = PromptTokenizer.resolve(self._tokenizer)
        return self._tokenizer

    def route(
        self,
        prompt: Prompt | TokenizedPrompt,
        *,
        loads: Mapping[str, float] | None = None,
        cache_salt: str | None = None,
        lora: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        engines: Sequence[str] | None = None,
        speculate: bool = True,
        now: float | None = None,
    ) -> RouteDecision:
        """Pick an engine for ``prompt`` (text, chat messages, token ids or a tokenized prompt).
        ``loads``: per engine, e.g. KV blocks in use or queued prefill blocks (0 if absent).
        ``lora``: the adapter name; each engine's registry supplies the path it hashes."""
        tp = prompt if isinstance(prompt, TokenizedPrompt) else self.tokenizer.tokenize(
            prompt, tools=tools
        )  # fmt: skip
        return self.route_tokens(
            tp.token_ids, loads=loads, cache_salt=cache_salt, lora=lora, engines=engines,
            speculate=speculate, now=now,
        )  # fmt: skip

    def route_tokens(
        self,
        token_ids: Sequence[int],
        *,
        loads: Mapping[str, float] | None = None,
        cache_salt: str | None = None,
        lora: str | None = None,
        engines: Sequence[str] | None = None,
        speculate: bool = True,
        now: float | None = None,
    ) -> RouteDecision:
        salt = validate_cache_salt(cache_salt)
        candidates = list(engines) if engines is not None else list(self.engines)
        unknown = [c for c in candidates if c not in self.engines]
        if unknown or not candidates:
            raise InvalidInputError(f"unknown engines: {unknown}" if unknown else "no engines")
        if lora is not None:
            candidates = [c for c in candidates if lora in self.engines[c].loras]
            if not candidates:
                raise InvalidInputError(f"no engine serves LoRA {lora!r}")
        now = time.monotonic() if now is None else now
        toks = tuple(token_ids)
        scores: dict[str, float] = {}
        held: dict[str, int] = {}
        seqs: dict[str, BlockSequence] = {}
        # engines sharing a hash configuration (and LoRA path) share one hash computation
        groups: dict[tuple[Any, ...], list[str]] = {}
        for c in candidates:
            cfg = self.engines[c]
            path = cfg.loras.get(lora) if lora else None
            groups.setdefault((*cfg.hash_config(), path), []).append(c)
        for (algo, seed, bs, path), members in groups.items():
            seq = BlockSequence(
                self._hashers[(algo, seed, bs)], toks, cache_salt=salt,
                lora=LoRA(lora, path) if lora and path else None,
            )  # fmt: skip
            for m in members:
                seqs[m] = seq
            res = self._scores(seq, members, now)
            for m, ps in res.items():
                scores[m] = ps.score
                held[m] = ps.blocks
        loads = loads or {}
        load = {c: float(loads.get(c, 0.0)) for c in candidates}
        min_load = min(load.values())
        limit = self.balance_rel * min_load + self.balance_abs
        eligible = [c for c in candidates if load[c] <= limit] or candidates
        costs = {
            c: (seqs[c].num_blocks - scores[c]) * self.prefill_weight + load[c] * self.load_weight
            for c in candidates
        }
        first = seqs[candidates[0]]
        tie = first.content_keys[0] if first.num_blocks else xxhash.xxh3_64_intdigest(
            repr(toks[:16]).encode()
        )  # fmt: skip
        # lowest cost; ties go to a rendezvous hash of the first block, so cold prompts spread
        best = min(
            eligible,
            key=lambda c: (costs[c], load[c], xxhash.xxh3_64_intdigest(f"{c}/{tie}".encode())),
        )
        reason = "longest cached prefix" if held[best] else "no engine holds the prefix"
        if len(eligible) < len(candidates):
            reason += f" ({len(candidates) - len(eligible)} overloaded engines skipped)"
        seq = seqs[best]
        if speculate and self.speculative_ttl > 0 and seq.num_hashed:
            # The blocks hashed so far (the longest held prefix plus one chunk, at least 32)
            # are enough for a sibling request with the same prefix to land here too.
            keys = seq.chain_keys_prefix(seq.num_hashed).tolist()
            self.residency.speculate(best, keys, self.speculative_ttl, now)
        return RouteDecision(best, held[best], seq.num_blocks, seq.num_tokens, scores, costs,
                             reason)  # fmt: skip

    def _scores(self, seq: BlockSequence, members: list[str], now: float) -> dict[str, Any]:
        """Hash only as far as some engine holds the prefix (doubling chunks)."""
        n = seq.num_blocks
        k = min(n, 32)
        while True:
            res = self.residency.prefix_scores(seq.chain_keys_prefix(k).tolist(), members, now=now)
            if k == n or max(ps.blocks for ps in res.values()) < k:
                return res
            k = min(n, 2 * k)
