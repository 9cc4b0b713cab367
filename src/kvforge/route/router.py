"""Prefix-aware routing: send a request to the engine whose KV cache holds most of its prefix,
without piling everything onto one hot replica.

For each engine the router computes the request's block hashes exactly as that engine does
(its algorithm, hash seed, block size, LoRA registry, the request's cache_salt), finds the
longest prefix the engine holds (from its KV events, plus speculative entries for decisions
whose events have not arrived yet), and picks the engine with the lowest

    cost = uncached_blocks × prefill_weight + load × load_weight

among engines that pass the balance guard (an engine whose load exceeds
``balance_rel × mean_load + balance_abs`` is skipped unless every engine is). With load in KV
blocks in use, the defaults (0.1, 1.5, 256) were chosen on the simulator's multi-agent
workload: they keep a conversation on the replica that holds it (hit rate within a few percent
of an oracle that ignores load) while the load spread stays near that of least-load routing
(``benchmarks/bench_route.py``).
"""

from __future__ import annotations

import os
import threading
import time
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from kvforge.blocks import BlockHasher, LoRA, block_extra_keys, validate_cache_salt
from kvforge.errors import InvalidInputError
from kvforge.route.residency import Residency, ResidencyIndex, block_keys
from kvforge.tokenize import ChatOptions, Prompt, PromptTokenizer, TokenizedPrompt


@dataclass(frozen=True)
class EngineConfig:
    """One engine replica (one data-parallel rank) as the router sees it."""

    name: str
    url: str | None = None  # OpenAI-compatible base URL (for the proxy)
    events: str | None = None  # KV-event PUB endpoint, e.g. tcp://engine-a:5557
    replay: str | None = None  # replay ROUTER endpoint
    topic: str = ""
    block_size: int = 16
    hash_algo: str = "sha256"
    hash_seed: str | None = None  # the engine's PYTHONHASHSEED (None = unset)
    loras: Mapping[str, str] = field(default_factory=dict)  # LoRA name -> path it was loaded from

    def hash_config(self) -> tuple[str, str | None, int]:
        return (self.hash_algo, self.hash_seed, self.block_size)


class HashMemo:
    """Chain hashes of recently routed blocks, so a conversation's shared prefix is not
    re-hashed on every turn (sha256 dominates routing cost).

    Key: (parent digest, keyed block key — ``residency.block_keys``, the caller's tenant);
    block 0 adds the salt and LoRA. The block key is keyed with a per-process secret, so
    nobody can craft a block that collides with another's entry. Two generations bound the
    memory: when the young one is full it becomes the old one and the previous old one is
    dropped.
    """

    def __init__(self, hasher: BlockHasher, capacity: int = 1 << 18, secret: int | None = None):
        self.hasher = hasher
        self.capacity = capacity
        self.secret = int.from_bytes(os.urandom(8), "little") if secret is None else secret
        self._young: dict[tuple[Any, ...], tuple[bytes, int]] = {}
        self._old: dict[tuple[Any, ...], tuple[bytes, int]] = {}
        self._lock = threading.Lock()

    def keys(
        self, toks: tuple[int, ...], salt: str | None, lora: LoRA | None, scope: str = ""
    ) -> _LazyKeys:
        """``scope`` (the caller's tenant) is part of every entry's key: a prompt another
        tenant routed is no faster to route (no timing oracle through the memo)."""
        return _LazyKeys(self, toks, salt, lora, scope)

    def put_many(self, items: list[tuple[tuple[Any, ...], tuple[bytes, int]]]) -> None:
        with self._lock:
            if len(self._young) + len(items) > self.capacity:
                self._old, self._young = self._young, {}
            self._young.update(items)


class _LazyKeys:
    """One request's block hashes (u64 event form), computed on demand through the memo."""

    def __init__(
        self,
        memo: HashMemo,
        toks: tuple[int, ...],
        salt: str | None,
        lora: LoRA | None,
        scope: str = "",
    ) -> None:
        bs = memo.hasher.block_size
        self.memo, self.toks, self.salt, self.lora = memo, toks, salt, lora
        self.scope = scope
        self.num_blocks = len(toks) // bs
        # the residency's keyed block keys (the same for its block tree and this memo),
        # computed as far as someone reads them: a tree walk stops at the first block no
        # engine stored, so a prompt with a short cached prefix keys only that far
        self._ck: list[int] = []
        self._digests: list[bytes] = []
        self.keys: list[int] = []
        self.tree_keys: list[int] = []  # hashes found in the residency's block tree

    def _ck_upto(self, k: int) -> list[int]:
        k = min(k, self.num_blocks)
        have = len(self._ck)
        if have < k:
            bs = self.memo.hasher.block_size
            chunk = array("I", self.toks[have * bs : k * bs])
            self._ck += block_keys(chunk, bs, self.memo.secret)
        return self._ck

    @property
    def content_keys(self) -> list[int]:
        return self._ck_upto(self.num_blocks)

    def upto(self, k: int) -> list[int]:
        """Keys of blocks ``[0, k)`` (the returned list may be longer; slice it)."""
        k = min(k, self.num_blocks)
        i = len(self._digests)
        if i >= k:
            return self.keys
        memo, hasher = self.memo, self.memo.hasher
        bs = hasher.block_size
        young, old = memo._young, memo._old
        digests, keys, cks, toks = self._digests, self.keys, self._ck_upto(k), self.toks
        scope = self.scope
        later_extra = block_extra_keys(bs, 2 * bs, lora=self.lora)  # every block after 0
        fresh: list[tuple[tuple[Any, ...], tuple[bytes, int]]] = []
        prev = digests[-1] if i else hasher.root
        while i < k:
            # the real parent digest chains the keys; the scope keeps each tenant's apart
            key: tuple[Any, ...] = (
                (prev, cks[i], scope) if i else (prev, cks[0], self.salt, self.lora, scope)
            )
            hit = young.get(key)
            if hit is None:
                hit = old.get(key)
                if hit is None:
                    extra = (
                        later_extra
                        if i
                        else block_extra_keys(0, bs, lora=self.lora, cache_salt=self.salt)
                    )
                    h = hasher.hash_block(prev, toks[i * bs : (i + 1) * bs], extra)
                    hit = (h, int.from_bytes(h[-8:], "big"))
                fresh.append((key, hit))
            prev = hit[0]
            digests.append(prev)
            keys.append(hit[1])
            i += 1
        if fresh:
            memo.put_many(fresh)
        return keys

    @property
    def num_hashed(self) -> int:
        return len(self._digests)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    engine: str
    # leading blocks of the request the chosen engine will skip: what it holds, but never the
    # prompt's last token (vLLM recomputes it: at most (num_tokens - 1) // block_size)
    cached_blocks: int
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
        residency: Residency | None = None,
        tokenizer: str | Path | PromptTokenizer | None = None,
        prefill_weight: float = 1.0,
        load_weight: float = 0.1,
        balance_rel: float = 1.5,
        balance_abs: float = 256.0,
        speculative_ttl: float = 2.0,
        stale_after: float | None = None,
    ):
        if not engines:
            raise InvalidInputError("a router needs at least one engine")
        names = [e.name for e in engines]
        if len(set(names)) != len(names):
            raise InvalidInputError("engine names must be unique")
        self.engines = {e.name: e for e in engines}
        self.residency: Residency = residency if residency is not None else ResidencyIndex()
        self._groups: dict[str, Any] = {}
        for e in engines:
            # engines that hash alike share a branch of the residency's block tree
            self._groups[e.name] = (*e.hash_config(), tuple(sorted(e.loras.items())))
            self.residency.set_group(e.name, self._groups[e.name])
        self._tokenizer = tokenizer
        self.prefill_weight = prefill_weight
        self.load_weight = load_weight
        self.balance_rel = balance_rel
        self.balance_abs = balance_abs
        self.speculative_ttl = speculative_ttl
        # An engine that was sent new blocks but published no event for ``stale_after``
        # seconds is stale (its event stream stopped): it gets no traffic until events resume.
        self.stale_after = stale_after
        self._awaiting: dict[str, float] = {}  # engine -> first unconfirmed decision
        self._probed: dict[str, float] = {}  # stale engine -> last time it was let through
        self.probes = 0
        self._memos: dict[tuple[str, str | None, int], HashMemo] = {}
        for e in engines:
            key = e.hash_config()
            if key not in self._memos:
                hasher = BlockHasher(e.hash_algo, block_size=e.block_size, hash_seed=e.hash_seed)
                # the residency's secret: the router's content keys walk its block tree too
                self._memos[key] = HashMemo(hasher, secret=self.residency.secret)

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
        dispatch: bool = True,
        chat: ChatOptions | None = None,
        tenant: str | None = None,
    ) -> RouteDecision:
        """Pick an engine for ``prompt`` (text, chat messages, token ids or a tokenized prompt).
        ``chat``: how chat messages are rendered (vLLM's request options).
        ``loads``: per engine, e.g. KV blocks in use or queued prefill blocks (0 if absent).
        ``lora``: the adapter name; each engine's registry supplies the path it hashes.
        ``dispatch=False`` is a dry run (advice only, nothing is sent): it neither speculates
        nor expects the chosen engine to publish events, so it cannot mark an engine stale."""
        tp = (
            prompt
            if isinstance(prompt, TokenizedPrompt)
            else self.tokenizer.tokenize(prompt, tools=tools, chat=chat)
        )
        return self.route_tokens(
            tp.token_ids,
            loads=loads,
            cache_salt=cache_salt,
            lora=lora,
            engines=engines,
            speculate=speculate,
            now=now,
            dispatch=dispatch,
            tenant=tenant,
        )

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
        dispatch: bool = True,
        tenant: str | None = None,
    ) -> RouteDecision:
        """``route`` for token ids. ``tenant`` scopes the hash memo (see ``HashMemo.keys``)."""
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
        self.residency.refresh()  # shared residency: catch up with the other replicas once
        toks = tuple(token_ids)
        scores: dict[str, float] = {}
        held: dict[str, int] = {}
        seqs: dict[str, _LazyKeys] = {}
        # engines sharing a hash configuration (and LoRA path) share one hash computation
        groups: dict[tuple[Any, ...], list[str]] = {}
        for c in candidates:
            cfg = self.engines[c]
            path = cfg.loras.get(lora) if lora else None
            groups.setdefault((*cfg.hash_config(), path), []).append(c)
        for (algo, seed, bs, path), members in groups.items():
            seq = self._memos[(algo, seed, bs)].keys(
                toks, salt, LoRA(lora, path) if lora and path else None, tenant or ""
            )
            for m in members:
                seqs[m] = seq
            root_extra = [x for x in (lora if path else None, salt) if x] or None
            # vLLM's last-token rule (KVCacheManager.get_computed_blocks: max_cache_hit_length
            # = num_tokens - 1): a fully held prompt still recomputes its last block
            skippable = max(0, len(toks) - 1) // bs
            for m, ps in self._scores(seq, members, now, root_extra).items():
                scores[m] = min(ps.score, skippable)
                held[m] = min(ps.blocks, skippable)
        loads = loads or {}
        load = {c: float(loads.get(c, 0.0)) for c in candidates}
        mean_load = sum(load.values()) / len(load)
        limit = self.balance_rel * mean_load + self.balance_abs
        fresh = [c for c in candidates if not self._stale(c, now, probe=dispatch)] or candidates
        eligible = [c for c in fresh if load[c] <= limit] or fresh
        costs = {
            c: (seqs[c].num_blocks - scores[c]) * self.prefill_weight + load[c] * self.load_weight
            for c in candidates
        }
        tie = xxhash.xxh3_64_intdigest(repr(toks[:16]).encode())
        # lowest cost; ties go to a rendezvous hash of the first block, so cold prompts spread
        low = min((costs[c], load[c]) for c in eligible)
        tied = [c for c in eligible if (costs[c], load[c]) == low]
        best = (
            tied[0]
            if len(tied) == 1
            else min(tied, key=lambda c: xxhash.xxh3_64_intdigest(f"{c}/{tie}".encode()))
        )
        reason = "longest cached prefix" if held[best] else "no engine holds the prefix"
        if len(fresh) < len(candidates):
            reason += f" ({len(candidates) - len(fresh)} stale engines skipped)"
        if len(eligible) < len(fresh):
            reason += f" ({len(fresh) - len(eligible)} overloaded engines skipped)"
        seq = seqs[best]
        if dispatch and self.stale_after is not None and held[best] < seq.num_blocks:
            self._awaiting.setdefault(best, now)  # its BlockStored event should follow
        if dispatch and speculate and self.speculative_ttl > 0 and seq.num_blocks:
            # every full block the engine will store once it has prefilled the prompt (hashed
            # now where the tree did not know them; the memo keeps a repeat cheap)
            keys = seq.upto(seq.num_blocks)[: seq.num_blocks]
            self.residency.speculate(best, keys, self.speculative_ttl, now)
        return RouteDecision(best, held[best], seq.num_blocks, len(toks), scores, costs, reason)

    def _scores(
        self, seq: _LazyKeys, members: list[str], now: float, root_extra: list[str] | None
    ) -> dict[str, Any]:
        """Per engine, its cached prefix. The hashes of blocks some engine stored come from the
        residency's block tree (built from the events' token ids: no sha256); a prompt the
        tree does not know is hashed, only as far as some engine holds it (doubling chunks)
        — that path also sees speculative entries."""
        out: dict[str, Any] = {}
        bs = self.engines[members[0]].block_size
        by_group: dict[Any, list[str]] = {}
        for m in members:
            by_group.setdefault(self._group(m), []).append(m)
        for group, ms in by_group.items():
            walk = self.residency.walk(ms, now=now)
            known = self.residency.tree_keys(group, bs, root_extra, seq.toks)
            if known:
                walk.extend(known)
                seq.tree_keys = known
            else:
                done, k = 0, min(seq.num_blocks, 32)
                while done < seq.num_blocks and walk.extend(seq.upto(k)[done:k]):
                    done, k = k, min(seq.num_blocks, 2 * k)
            out.update(walk.result())
        return out

    def _stale(self, engine: str, now: float, *, probe: bool = False) -> bool:
        """Whether the engine's events stopped. A stale engine is probed, never excluded for
        ever: once per ``stale_after`` a dispatched decision may choose it again (if its events
        then resume, it is fresh)."""
        since = self._awaiting.get(engine)
        if since is None or self.stale_after is None:
            return False
        if self.residency.engine(engine).last_event >= since:
            del self._awaiting[engine]  # events flow: not stale
            self._probed.pop(engine, None)
            return False
        if now - since <= self.stale_after:
            return False
        # the first probe one period after the engine went stale, then one per period
        if probe and now - self._probed.get(engine, since + self.stale_after) > self.stale_after:
            self._probed[engine] = now
            self.probes += 1
            return False
        return True

    def stale_engines(self, now: float | None = None) -> list[str]:
        """Engines currently skipped because their KV events stopped."""
        now = time.monotonic() if now is None else now
        self.residency.refresh()
        return [e for e in self.engines if self._stale(e, now)]

    def _group(self, engine: str) -> Any:
        return self._groups[engine]
