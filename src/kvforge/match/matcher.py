"""The matcher API: the seed's surface (``index_prompt``, ``find_reusable_blocks``,
``get_shared_prefix_hash``, ``stats``, ``clear_agent``), made truthful.

``SyncMatcher`` does the work; ``Matcher`` offers the same methods as coroutines that run it on
a worker thread. Tokenization and hashing are pure and run outside any lock; the index reads and
writes of one call happen under the caller's *tenant* lock, so concurrent callers of a tenant see
a consistent index and tenants never wait for each other (a slow query of one tenant, bounded by
the span budget, delays no other tenant).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvforge.blocks import BlockHasher, BlockSequence, LoRA, event_hash, validate_cache_salt
from kvforge.errors import InvalidInputError, PromptTooLargeError, QuotaExceededError
from kvforge.index import BlockIndex, LookupOptions, OwnerInfo, open_index
from kvforge.index.anchors import MAX_NEAR_RADIUS
from kvforge.index.base import OwnerRecord
from kvforge.index.record import record_sequence
from kvforge.index.spans import SpanBudget
from kvforge.match.explain import (
    best_owner,
    block_matches,
    divergence,
    fixes,
    moved_coverage,
    owner_gaps,
)
from kvforge.match.report import (
    IndexResult,
    MatchReport,
    MovedSpan,
    PrefixHash,
)
from kvforge.store import BackendUnavailableError
from kvforge.tokenize import ChatOptions, Prompt, PromptTokenizer, TokenizedPrompt
from kvforge.validate import require_utf8, text_size

DEFAULT_TENANT = "default"


class _TenantLock:
    __slots__ = ("__weakref__", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()


class TenantLocks:
    """One lock per tenant, alive while some call holds or waits for it (a weak registry:
    callers inventing tenants cannot grow it)."""

    def __init__(self) -> None:
        self._registry: weakref.WeakValueDictionary[str, _TenantLock] = (
            weakref.WeakValueDictionary()
        )
        self._guard = threading.Lock()

    @contextmanager
    def __call__(self, tenant: str) -> Iterator[None]:
        with self._guard:
            entry = self._registry.get(tenant)
            if entry is None:
                entry = self._registry[tenant] = _TenantLock()
        with entry.lock:
            yield


MAX_AGENT_ID = 256


def _tenant_key(tenant: str | None) -> str:
    if tenant is None:
        return DEFAULT_TENANT
    if not isinstance(tenant, str) or not tenant or len(tenant) > MAX_AGENT_ID:
        raise InvalidInputError("tenant must be a non-empty string of at most 256 characters")
    return require_utf8(tenant, "tenant")


def _check_agent(agent_id: Any) -> str:
    if not isinstance(agent_id, str) or not agent_id.strip():
        raise InvalidInputError("agent_id must be a non-empty string")
    if len(agent_id) > MAX_AGENT_ID:
        raise InvalidInputError(f"agent_id is longer than {MAX_AGENT_ID} characters")
    return require_utf8(agent_id, "agent_id")


class SyncMatcher:
    """Find exactly which KV-cache blocks of a prompt an engine could reuse, and from whom.

    ``block_size``, ``hash_algo`` and ``hash_seed`` must equal the engine's (``--block-size``,
    ``--prefix-caching-hash-algo``, ``PYTHONHASHSEED``; ``None`` = unset). ``tokenizer`` is
    ``None`` for the shipped Qwen3 tokenizer or a path to a local ``tokenizer.json``.
    """

    def __init__(
        self,
        *,
        block_size: int = 16,
        hash_algo: str = "sha256",
        hash_seed: str | None = None,
        tokenizer: str | Path | PromptTokenizer | None = None,
        index: BlockIndex | str | None = None,
        max_prompt_chars: int = 4_000_000,
        max_prompt_tokens: int = 1_000_000,
        max_agents_per_tenant: int | None = 1_000_000,
        max_tenants: int | None = 100_000,
        max_blocks: int | None = None,
        near_radius: int = 2,
        find_spans: bool = True,
        recompute_ratio: float = 0.15,
        span_budget: SpanBudget | None = None,
    ):
        if not isinstance(near_radius, int) or not 0 <= near_radius <= MAX_NEAR_RADIUS:
            raise InvalidInputError(f"near_radius must be an integer in [0, {MAX_NEAR_RADIUS}]")
        if not 0.0 <= recompute_ratio <= 1.0:
            raise InvalidInputError("recompute_ratio must be in [0, 1]")
        self.near_radius = near_radius
        self.find_spans = find_spans
        self.recompute_ratio = recompute_ratio
        self.hasher = BlockHasher(hash_algo, block_size=block_size, hash_seed=hash_seed)
        self.tokenizer = PromptTokenizer.resolve(tokenizer)
        # an index URL (``memory://``, ``redis://host/0?prefix=kvf&ttl=3600``) or an instance
        self.index: BlockIndex = (
            open_index(index, self.hasher, span_budget)
            if index is None or isinstance(index, str)
            else index
        )
        self.max_prompt_chars = max_prompt_chars
        self.max_prompt_tokens = max_prompt_tokens
        # bounds against callers that invent agents or tenants without end (memory)
        self.max_agents_per_tenant = max_agents_per_tenant
        self.max_tenants = max_tenants
        self.max_blocks = max_blocks  # distinct blocks, all tenants (memory); None: unbounded
        self.tenant_lock = TenantLocks()
        # admits new tenants one at a time, so ``max_tenants`` holds under concurrency
        self._admit = threading.Lock()
        self._generations = itertools.count(1)
        self.generation = 0  # bumped by every change to the index (snapshots watch it)

    @property
    def block_size(self) -> int:
        return self.hasher.block_size

    @property
    def hash_algo(self) -> str:
        return self.hasher.algo

    # ---- preparation (pure, lock-free) --------------------------------------------------
    def tokenize(
        self,
        prompt: Prompt,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tenant: str | None = None,
        chat: ChatOptions | None = None,
    ) -> TokenizedPrompt:
        """Token ids within the prompt limits. Repeated pieces (system prompt, tools, earlier
        turns) come from the tokenizer's piece cache, scoped to ``tenant``: one tenant's
        requests never make another's faster (no timing oracle)."""
        if isinstance(prompt, str) and len(prompt) > self.max_prompt_chars:
            raise PromptTooLargeError(
                f"prompt has {len(prompt):,} characters; the limit is {self.max_prompt_chars:,}"
            )
        if isinstance(prompt, Sequence) and not isinstance(prompt, str) and prompt:
            if isinstance(prompt[0], Mapping):
                size = text_size(prompt) + text_size(tools)
                if size > self.max_prompt_chars:
                    raise PromptTooLargeError(
                        f"messages and tools hold {size:,} characters; "
                        f"the limit is {self.max_prompt_chars:,}"
                    )
            elif len(prompt) > self.max_prompt_tokens:
                raise PromptTooLargeError(
                    f"prompt has {len(prompt):,} tokens; the limit is {self.max_prompt_tokens:,}"
                )
        tp = self.tokenizer.tokenize(prompt, tools=tools, scope=_tenant_key(tenant), chat=chat)
        if len(tp) > self.max_prompt_tokens:
            raise PromptTooLargeError(
                f"prompt has {len(tp):,} tokens; the limit is {self.max_prompt_tokens:,}"
            )
        return tp

    def blocks(
        self,
        tokens: TokenizedPrompt | Sequence[int],
        *,
        cache_salt: str | None = None,
        lora: LoRA | tuple[str, str] | dict[str, str] | None = None,
    ) -> BlockSequence:
        ids = tokens.token_ids if isinstance(tokens, TokenizedPrompt) else tuple(tokens)
        return BlockSequence(
            self.hasher, ids, cache_salt=validate_cache_salt(cache_salt), lora=LoRA.coerce(lora)
        )

    def prepare(
        self,
        prompt: Prompt,
        *,
        cache_salt: str | None = None,
        lora: LoRA | tuple[str, str] | dict[str, str] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tenant: str | None = None,
        chat: ChatOptions | None = None,
    ) -> tuple[TokenizedPrompt, BlockSequence]:
        """Tokenize and cut a prompt (pure, lock-free): the input of ``match_blocks`` and
        ``index_blocks``, for callers that use one prompt twice."""
        salt = validate_cache_salt(cache_salt)
        lo = LoRA.coerce(lora)
        tp = self.tokenize(prompt, tools=tools, tenant=tenant, chat=chat)
        return tp, BlockSequence(self.hasher, tp.token_ids, cache_salt=salt, lora=lo)

    # ---- the API --------------------------------------------------------------------------
    def index_prompt(
        self,
        agent_id: str,
        prompt: Prompt,
        *,
        tenant: str | None = None,
        cache_salt: str | None = None,
        lora: LoRA | tuple[str, str] | dict[str, str] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat: ChatOptions | None = None,
    ) -> IndexResult:
        """Make ``prompt`` the agent's indexed prompt (replacing its previous one). ``chat``:
        how chat messages are rendered (vLLM's request options)."""
        _check_agent(agent_id)  # fail fast, before the tokenizer runs
        _tenant_key(tenant)
        _, seq = self.prepare(
            prompt, cache_salt=cache_salt, lora=lora, tools=tools, tenant=tenant, chat=chat
        )
        return self.index_blocks(agent_id, seq, tenant=tenant, cache_salt=cache_salt, lora=lora)

    def _check_quota(self, key: str, agent: str, blocks: int = 0) -> None:
        """Refuse a new agent or tenant beyond the configured bounds (call under the lock)."""
        idx = self.index
        if self.max_blocks is not None and blocks:
            held = idx.held_blocks()
            if held + blocks > self.max_blocks:
                raise QuotaExceededError(
                    f"the index holds {held:,} blocks; {blocks:,} more would pass the limit of "
                    f"{self.max_blocks:,} (clear agents, or raise max_blocks)"
                )
        if self.max_agents_per_tenant is None and self.max_tenants is None:
            return
        n = idx.count_owners(key)
        if n and idx.owner_info(key, agent) is not None:
            return  # re-indexing an existing agent never adds one
        if self.max_agents_per_tenant is not None and n >= self.max_agents_per_tenant:
            raise QuotaExceededError(
                f"tenant already holds {n:,} agents; the limit is {self.max_agents_per_tenant:,}"
                " (clear some, or raise max_agents_per_tenant)"
            )
        if n == 0 and self.max_tenants is not None and idx.count_tenants() >= self.max_tenants:
            raise QuotaExceededError(
                f"{idx.count_tenants():,} tenants are indexed; the limit is {self.max_tenants:,}"
            )

    def index_blocks(
        self,
        agent_id: str,
        seq: BlockSequence,
        *,
        tenant: str | None = None,
        cache_salt: str | None = None,
        lora: LoRA | tuple[str, str] | dict[str, str] | None = None,
    ) -> IndexResult:
        """``index_prompt`` for a prompt already prepared (``cache_salt``/``lora`` are recorded
        for explanations; the hashes in ``seq`` already include them)."""
        agent = _check_agent(agent_id)
        key = _tenant_key(tenant)
        lo = LoRA.coerce(lora)
        info = OwnerInfo(agent, seq.num_tokens, seq.num_blocks, cache_salt, lo.name if lo else None)
        seq.chain_keys  # noqa: B018 - hash every block here, not while holding the lock
        with self.tenant_lock(key):
            if self.index.count_owners(key) == 0:  # a new tenant: admitted one at a time
                with self._admit:
                    self._check_quota(key, agent, seq.num_blocks)
                    put = self.index.put(key, agent, seq, info)
            else:
                self._check_quota(key, agent, seq.num_blocks)
                put = self.index.put(key, agent, seq, info)
            self.generation = next(self._generations)
        return IndexResult(
            agent_id=agent,
            tenant=tenant,
            num_tokens=seq.num_tokens,
            num_blocks=seq.num_blocks,
            new_blocks=put.new_blocks,
            shared_blocks=put.shared_blocks,
            block_hashes=tuple(h.hex() for h in seq.chain),
        )

    def find_reusable_blocks(
        self,
        prompt: Prompt,
        *,
        exclude_agent: str | None = None,
        tenant: str | None = None,
        cache_salt: str | None = None,
        lora: LoRA | tuple[str, str] | dict[str, str] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat: ChatOptions | None = None,
    ) -> MatchReport:
        """Which blocks of ``prompt`` are reusable exactly (prefix), only with recompute
        (moved), or not at all; and why the best owner's prefix broke."""
        if exclude_agent is not None:
            _check_agent(exclude_agent)
        key = _tenant_key(tenant)
        tp, seq = self.prepare(
            prompt, cache_salt=cache_salt, lora=lora, tools=tools, tenant=tenant, chat=chat
        )
        return self.match_blocks(
            tp, seq, exclude_agent=exclude_agent, tenant=tenant, _key=key, cache_salt=cache_salt
        )

    def match_blocks(
        self,
        tp: TokenizedPrompt,
        seq: BlockSequence,
        *,
        exclude_agent: str | None = None,
        tenant: str | None = None,
        cache_salt: str | None = None,
        _key: str | None = None,
    ) -> MatchReport:
        """``find_reusable_blocks`` for an already tokenized and hashed prompt."""
        key = _key or _tenant_key(tenant)
        with self.tenant_lock(key):
            opts = LookupOptions(exclude_agent, self.near_radius, self.find_spans)
            hit = self.index.lookup(key, seq, opts)
            best = best_owner(hit)
            if best is None and seq.num_blocks and not hit.degraded:
                # Nothing shared at block granularity: explain against the prompt that agrees
                # longest token by token (e.g. an agent name early in a common template).
                best = self.index.closest_owner(key, seq.tokens[0], exclude=exclude_agent)
            depth = hit.prefix_by_owner.get(best, 0) if best else 0
            owner_tokens = (
                self.index.owner_block_tokens(key, best, depth)
                if best is not None and depth < seq.num_blocks
                else None
            )
            info = self.index.owner_info(key, best) if best else None
            breaks = owner_gaps(self.index, key, seq, hit)
        blocks = block_matches(hit, seq.num_blocks, seq.block_size, seq.tokens)
        broke = None
        if best is not None and depth < seq.num_blocks:
            broke = divergence(self.tokenizer, tp, seq, best, depth, owner_tokens, info, cache_salt)
        bs = seq.block_size
        spans = [
            MovedSpan(
                sp.owner,
                sp.query_start,
                sp.owner_start,
                sp.length,
                max(0, (sp.query_start + sp.length) // bs - -(-sp.query_start // bs)),
            )
            for sp in hit.spans
        ]
        moved_tokens = moved_coverage(seq.num_tokens, bs, hit.exact_blocks, hit, spans)
        return MatchReport(
            num_tokens=seq.num_tokens,
            num_blocks=seq.num_blocks,
            block_size=bs,
            prefix_blocks_by_owner=hit.prefix_by_owner,
            best_owner=best,
            blocks=blocks,
            divergence=broke,
            tenant=tenant,
            moved_spans=spans,
            fixes=fixes(self.tokenizer, tp, hit, spans, breaks, bs),
            moved_tokens=moved_tokens,
            recompute_tokens=math.ceil(moved_tokens * self.recompute_ratio),
            degraded=hit.degraded,
            truncated=hit.truncated,
        )

    def get_shared_prefix_hash(
        self,
        prompt: Prompt,
        *,
        tenant: str | None = None,
        cache_salt: str | None = None,
        lora: LoRA | tuple[str, str] | dict[str, str] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat: ChatOptions | None = None,
    ) -> PrefixHash:
        key = _tenant_key(tenant)
        _, seq = self.prepare(
            prompt, cache_salt=cache_salt, lora=lora, tools=tools, tenant=tenant, chat=chat
        )
        with self.tenant_lock(key):
            n = self.index.lookup(key, seq).deepest_hash_block
        chain = seq.chain_prefix(max(n, 1))
        return PrefixHash(
            num_blocks=n,
            prefix_hash_hex=chain[n - 1].hex() if n else None,
            first_block_hash_hex=chain[0].hex() if chain else None,
            prefix_event_hash=event_hash(chain[n - 1]) if n else None,
        )

    def clear_agent(self, agent_id: str, *, tenant: str | None = None) -> int:
        """Forget the agent's prompt (only that owner); returns how many blocks it held."""
        agent = _check_agent(agent_id)
        key = _tenant_key(tenant)
        with self.tenant_lock(key):
            self.generation = next(self._generations)
            return self.index.remove(key, agent)

    def agents(self, *, tenant: str | None = None) -> list[str]:
        """The tenant's indexed agents ([] while a shared backend is unreachable)."""
        return self.list_agents(tenant=tenant)[0]

    def list_agents(self, *, tenant: str | None = None) -> tuple[list[str], bool]:
        """(agents, degraded): degraded when the shared backend could not be consulted."""
        key = _tenant_key(tenant)
        with self.tenant_lock(key):
            try:
                return self.index.owners(key), False
            except BackendUnavailableError:
                return [], True

    def export(self) -> list[OwnerRecord]:
        """Every owner's record (``OwnerRecord``), each tenant taken as a consistent cut under
        its lock (no write of that tenant interleaves); for snapshots."""
        out: list[OwnerRecord] = []
        for tenant in self.index.tenants():
            with self.tenant_lock(tenant):
                out += self.index.export(tenant)
        return out

    def restore(self, records: Iterable[OwnerRecord]) -> int:
        """Index exported records (``export``) again, re-hashed with this matcher's
        configuration; returns how many. Every record is rebuilt before the first is indexed,
        so a bad one indexes nothing."""
        items = [(r, record_sequence(r, self.hasher)) for r in records]
        for r, seq in items:
            seq.chain_keys  # noqa: B018 - hash outside the lock
            with self.tenant_lock(r.tenant):
                self.index.put(r.tenant, r.info.owner, seq, r.info)
        if items:
            self.generation = next(self._generations)
        return len(items)

    def stats(self, *, tenant: str | None = None, scoped: bool = False) -> dict[str, Any]:
        """Index sizes and configuration. ``scoped``: only ``tenant``'s part (the default
        tenant when None) — what a caller may see of a shared service."""
        s = self.index.stats(_tenant_key(tenant) if scoped else None)
        return {
            "tenants": s.tenants,
            "agents": s.owners,
            "blocks": s.blocks,
            "owner_blocks": s.owner_blocks,
            "contents": s.contents,
            "memory_bytes": s.nbytes,
            "memory_bytes_exact_index": s.exact_nbytes,
            "memory_bytes_similarity": s.similarity_nbytes,
            "block_size": self.block_size,
            "hash_algo": self.hash_algo,
            "tokenizer": self.tokenizer.name,
            "backend": self.index.health().as_dict("degraded_lookups"),
            # the seed's names, kept for callers written against it
            "total_blocks": s.blocks,
            "total_agents": s.owners,
        }


class Matcher:
    """The async face of :class:`SyncMatcher`: the same constructor and methods, as coroutines.
    Work runs on a worker thread so the event loop never blocks on tokenization."""

    def __init__(
        self,
        *,
        block_size: int = 16,
        hash_algo: str = "sha256",
        hash_seed: str | None = None,
        tokenizer: str | Path | PromptTokenizer | None = None,
        **options: Any,
    ):
        self.sync = SyncMatcher(
            block_size=block_size,
            hash_algo=hash_algo,
            hash_seed=hash_seed,
            tokenizer=tokenizer,
            **options,
        )

    @property
    def block_size(self) -> int:
        return self.sync.block_size

    async def index_prompt(self, agent_id: str, prompt: Prompt, **kw: Any) -> IndexResult:
        return await asyncio.to_thread(self.sync.index_prompt, agent_id, prompt, **kw)

    async def find_reusable_blocks(self, prompt: Prompt, **kw: Any) -> MatchReport:
        return await asyncio.to_thread(self.sync.find_reusable_blocks, prompt, **kw)

    async def get_shared_prefix_hash(self, prompt: Prompt, **kw: Any) -> PrefixHash:
        return await asyncio.to_thread(self.sync.get_shared_prefix_hash, prompt, **kw)

    async def clear_agent(self, agent_id: str, **kw: Any) -> int:
        return await asyncio.to_thread(self.sync.clear_agent, agent_id, **kw)

    async def agents(self, **kw: Any) -> list[str]:
        return await asyncio.to_thread(self.sync.agents, **kw)

    async def stats(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.sync.stats)
