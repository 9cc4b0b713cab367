"""What a match says: per block, who holds it and how it could be reused, and why a prefix broke.

Kinds, from strongest to weakest:

* ``exact`` — the block's vLLM chain hash is held by an owner: the engine reuses its KV as is.
  Always a leading run: after the first non-exact block nothing is prefix-reusable.
* ``moved`` — the same tokens sit in an indexed prompt at another position or after another
  prefix. The KV differs (attention saw another prefix); reusable only by recompute-style
  engines (CacheBlend/EPIC) or by moving the varying part of the prompt below it.
* ``near`` — an indexed block differs in at most ``near_radius`` token positions (a changed
  date, name, number or whitespace token): not reusable, but a sign of prompt drift.
* ``none`` — nothing indexed holds these tokens.

Shared content that is not block-aligned in both prompts is reported as ``moved_spans``
(maximal runs of identical tokens at any alignment; every run of >= 32 tokens is found).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

BlockKind = Literal["exact", "moved", "near", "none"]


class BlockMatch(NamedTuple):
    """One full block of the query (a named tuple: a 512-block report is built in ~0.1 ms)."""

    # the field shadows tuple.index on purpose: it is the report's JSON key
    index: int  # type: ignore[assignment]  # block position in the query
    start: int  # first token of the block
    kind: BlockKind
    owners: tuple[str, ...] = ()
    sources: tuple[tuple[str, int], ...] = ()  # moved/near: (owner, block position), capped
    distance: int = 0  # near: differing token positions
    diff: tuple[tuple[int, int, int], ...] = ()  # near: (position, query token, indexed token)


@dataclass(frozen=True, slots=True)
class MovedSpan:
    """Identical tokens at another position: reusable only with a recompute-style engine."""

    owner: str
    query_start: int
    owner_start: int
    length: int  # tokens
    query_blocks: int  # whole engine blocks of the query inside the span


@dataclass(frozen=True, slots=True)
class Fix:
    """A layout change that turns moved content into exact prefix reuse.

    After ``break_token`` both prompts share ``shared_tokens`` identical tokens, but at other
    positions: something sits before them in one prompt (or in both) that the other lacks.
    ``holder`` names the prompt that must change: ``"query"``, ``"owner"``, or ``"both"``
    (each has its own varying text there, e.g. an agent's name)."""

    owner: str
    break_token: int  # where the query's prefix stops matching the owner's (same in both)
    shared_tokens: int  # the moved span that follows
    gain_tokens: int  # extra prefix-reusable tokens if the varying part moved below the span
    breaking_text: str  # the query's text between the break and the shared span ("" if none)
    advice: str
    holder: str = "query"  # which prompt holds the breaking text: query, owner or both
    owner_text: str = ""  # the owner's text between the break and the shared span
    query_gap_tokens: int = 0  # tokens of the query between the break and the span
    owner_gap_tokens: int = 0  # tokens of the owner's prompt between the break and the span


@dataclass(frozen=True, slots=True)
class Divergence:
    """Where the best owner's prefix stops matching the query, shown as text."""

    owner: str
    block_index: int
    token_index: int  # first differing token (absolute); block start when tokens are equal
    reason: str
    query_text: str  # the query's tokens from ``token_index`` to the end of the block
    owner_text: str | None  # the owner's tokens over the same range (None: prompt ended)
    query_tokens: tuple[int, ...] = ()
    owner_tokens: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class MatchReport:
    num_tokens: int
    num_blocks: int
    block_size: int
    prefix_blocks_by_owner: dict[str, int]
    best_owner: str | None
    blocks: list[BlockMatch]
    divergence: Divergence | None = None
    tenant: str | None = None
    moved_spans: list[MovedSpan] = field(default_factory=list)
    fixes: list[Fix] = field(default_factory=list)
    moved_tokens: int = 0  # query tokens (outside the exact prefix) inside some moved span/block
    recompute_tokens: int = 0  # CacheBlend-style budget to reuse them (recompute_ratio of them)
    degraded: bool = False  # the shared index was unreachable: nothing is claimed reusable
    # the moved-span search stopped at its work budget (low-entropy or hugely repeated
    # content): ``moved_spans`` may miss some; everything listed is still verified
    truncated: bool = False

    @property
    def exact_blocks(self) -> int:
        """Leading blocks the engine can reuse as is (from the best owner)."""
        return self.prefix_blocks_by_owner.get(self.best_owner, 0) if self.best_owner else 0

    @property
    def moved_blocks(self) -> int:
        return sum(1 for b in self.blocks if b.kind == "moved")

    @property
    def near_blocks(self) -> int:
        return sum(1 for b in self.blocks if b.kind == "near")

    @property
    def reusable_tokens(self) -> int:
        """Tokens of the exact prefix (held as is by the best owner)."""
        return self.exact_blocks * self.block_size

    @property
    def engine_skip_blocks(self) -> int:
        """Exact blocks a vLLM engine holding them would actually skip: never the prompt's
        last token, so at most ``(num_tokens - 1) // block_size`` (its last-token rule,
        ``KVCacheManager.get_computed_blocks``). A prompt that ends on a block boundary and
        is fully held still recomputes its last block."""
        return min(self.exact_blocks, max(0, self.num_tokens - 1) // self.block_size)

    @property
    def engine_cached_tokens(self) -> int:
        """What vLLM would report as ``usage.prompt_tokens_details.cached_tokens``."""
        return self.engine_skip_blocks * self.block_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data. Built field by field: ``dataclasses.asdict`` deep-copies
        every block and costs ~20 ms on a 512-block report."""
        d: dict[str, Any] = {
            "num_tokens": self.num_tokens,
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "prefix_blocks_by_owner": dict(self.prefix_blocks_by_owner),
            "best_owner": self.best_owner,
            "blocks": [b._asdict() for b in self.blocks],
            "divergence": asdict(self.divergence) if self.divergence else None,
            "tenant": self.tenant,
            "moved_spans": [asdict(sp) for sp in self.moved_spans],
            "fixes": [asdict(f) for f in self.fixes],
            "moved_tokens": self.moved_tokens,
            "recompute_tokens": self.recompute_tokens,
            "degraded": self.degraded,
            "truncated": self.truncated,
        }
        d["exact_blocks"] = self.exact_blocks
        d["moved_blocks"] = self.moved_blocks
        d["near_blocks"] = self.near_blocks
        d["reusable_tokens"] = self.reusable_tokens
        d["engine_skip_blocks"] = self.engine_skip_blocks
        d["engine_cached_tokens"] = self.engine_cached_tokens
        return d


@dataclass(frozen=True, slots=True)
class IndexResult:
    agent_id: str
    tenant: str | None
    num_tokens: int
    num_blocks: int
    new_blocks: int
    shared_blocks: int
    block_hashes: tuple[str, ...]  # vLLM chain hashes (hex) of every full block


@dataclass(frozen=True, slots=True)
class PrefixHash:
    """The routing hint: vLLM's chain hash of the longest indexed prefix and of block 0."""

    num_blocks: int  # leading blocks of the prompt held by any owner of the tenant
    prefix_hash_hex: str | None  # hash of block ``num_blocks - 1``; None when 0
    first_block_hash_hex: str | None  # hash of the prompt's block 0; None if no full block
    prefix_event_hash: int | None  # u64 form of ``prefix_hash_hex`` (what KV events carry)
