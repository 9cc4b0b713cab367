"""What every endpoint answers, as models: the OpenAPI schema documents them, FastAPI checks
the ``response_model`` ones, and the schema tests check every response against them. The hot
endpoints (``/v1/match``, ``/v1/route``) encode with msgspec and declare their model for the
schema; a test holds the report's ``to_dict`` to :class:`MatchResponse` key for key."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    # a key the model does not name is a schema that lies: refused (additionalProperties false)
    model_config = ConfigDict(extra="forbid")


class IndexResponse(BaseModel):
    agent_id: str
    num_tokens: int
    num_blocks: int
    new_blocks: int  # blocks nobody in the tenant held before
    shared_blocks: int
    block_hashes: list[str]  # hex chain hashes, one per full block


class PrefixHashResponse(BaseModel):
    num_blocks: int  # leading blocks some agent of the tenant holds
    prefix_hash_hex: str | None
    first_block_hash_hex: str | None
    prefix_event_hash: int | None  # the u64 form vLLM's KV events carry


class AgentsResponse(BaseModel):
    agents: list[str]
    degraded: bool | None = None  # present (true) when the shared index was unreachable


class RemovedResponse(BaseModel):
    removed_blocks: int


class HealthResponse(BaseModel):
    status: str


class RouteResponse(BaseModel):
    engine: str
    num_blocks: int
    # with [router] expose_decisions only
    cached_blocks: int | None = None
    scores: dict[str, float] | None = None
    reason: str | None = None


# ---- /v1/match: MatchReport.to_dict ------------------------------------------------------
class BlockMatchModel(_Strict):
    index: int
    start: int
    kind: Literal["exact", "moved", "near", "none"]
    owners: list[str]
    sources: list[tuple[str, int]]  # moved/near: (owner, block position), capped
    distance: int  # near: differing token positions
    diff: list[tuple[int, int, int]]  # near: (position, query token, indexed token)


class DivergenceModel(_Strict):
    owner: str
    block_index: int
    token_index: int
    reason: str
    query_text: str
    owner_text: str | None
    query_tokens: list[int]
    owner_tokens: list[int] | None


class MovedSpanModel(_Strict):
    owner: str
    query_start: int
    owner_start: int
    length: int
    query_blocks: int


class FixModel(_Strict):
    owner: str
    break_token: int
    shared_tokens: int
    gain_tokens: int
    breaking_text: str
    advice: str
    holder: Literal["query", "owner", "both"]
    owner_text: str
    query_gap_tokens: int
    owner_gap_tokens: int


class MatchResponse(_Strict):
    num_tokens: int
    num_blocks: int
    block_size: int
    prefix_blocks_by_owner: dict[str, int]
    best_owner: str | None
    blocks: list[BlockMatchModel]
    divergence: DivergenceModel | None
    tenant: str | None
    moved_spans: list[MovedSpanModel]
    fixes: list[FixModel]
    moved_tokens: int
    recompute_tokens: int
    degraded: bool
    truncated: bool
    exact_blocks: int
    moved_blocks: int
    near_blocks: int
    reusable_tokens: int
    engine_skip_blocks: int
    engine_cached_tokens: int


# ---- /v1/stats ------------------------------------------------------------------------------
class SubscriberStatsModel(_Strict):
    received: int
    applied: int
    malformed: int
    foreign: int
    duplicates: int
    gaps: int
    replayed: int
    restarts: int
    resyncs: int
    rejected: int
    last_seq: int | None
    data_parallel_rank: int | None
    last_event_at: float | None


class ResidencyStatsModel(_Strict):
    engines: dict[str, dict[str, int]]  # engine -> medium -> blocks held
    blocks_applied: int
    overflows: int
    ignored_media_events: int
    speculative: int
    backend: dict[str, int | bool] | None = None  # a shared (Redis) residency's link


class ClaimStatsModel(_Strict):
    exact: int
    over: int
    under: int
    over_blocks: int
    under_blocks: int
    unknown: int


class StatsResponse(_Strict):
    """The caller's tenant only; the router's sections when the service routes."""

    tenants: int
    agents: int
    blocks: int
    owner_blocks: int
    contents: int
    memory_bytes: int
    memory_bytes_exact_index: int
    memory_bytes_similarity: int
    block_size: int
    hash_algo: str
    tokenizer: str
    backend: dict[str, int | bool]  # the index's link to its store (Redis) and its counters
    total_blocks: int
    total_agents: int
    tenant: str | None
    events: dict[str, SubscriberStatsModel] | None = None
    residency: ResidencyStatsModel | None = None
    claims: ClaimStatsModel | None = None
    engines_up: dict[str, bool] | None = None
