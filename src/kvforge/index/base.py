"""The index interface every backend implements, and the values it returns.

An index holds, per tenant, which owners (agents, role-suffixed agents, sessions) hold which
blocks. Tenants never see each other: every method takes the tenant, and a backend must keep
their data disjoint. Owner names are opaque strings; ``exclude`` filters an owner ``a`` and
every role-suffixed ``a:<role>``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from kvforge.blocks.sequence import BlockSequence
from kvforge.store.health import BackendHealth


def is_excluded(owner: str, exclude: str | None) -> bool:
    """``exclude="a1"`` hides ``a1`` and role-suffixed owners such as ``a1:system``."""
    return exclude is not None and (owner == exclude or owner.startswith(exclude + ":"))


@dataclass(frozen=True, slots=True)
class OwnerInfo:
    """What an owner last indexed (its previous prompt is replaced on re-index)."""

    owner: str
    num_tokens: int
    num_blocks: int
    cache_salt: str | None = None
    lora_name: str | None = None


@dataclass(frozen=True, slots=True)
class OwnerRecord:
    """One owner's indexed prompt, as a snapshot stores it."""

    tenant: str
    info: OwnerInfo
    tokens: np.ndarray  # uint32, the owner's full blocks
    namespace: tuple[str, str, str]  # (cache_salt, LoRA name, LoRA path); "" when absent


@dataclass(frozen=True, slots=True)
class PutResult:
    num_blocks: int
    new_blocks: int  # blocks nobody in the tenant held before
    shared_blocks: int  # blocks already held by another owner (prefix-valid)


@dataclass(frozen=True, slots=True)
class NearHit:
    """The closest indexed block within the near-duplicate radius (token-Hamming distance:
    the number of positions whose tokens differ)."""

    owners: tuple[str, ...]
    sources: tuple[tuple[str, int], ...]  # (owner, block position there), capped
    distance: int
    positions: tuple[int, ...]  # in-block positions that differ
    tokens: tuple[int, ...]  # the indexed block's tokens


@dataclass(frozen=True, slots=True)
class SharedSpan:
    """A maximal run of identical tokens between the query and an owner's indexed prompt, at
    any alignment (positions in tokens)."""

    owner: str
    query_start: int
    owner_start: int
    length: int


@dataclass(frozen=True, slots=True)
class LookupOptions:
    """What a lookup computes beyond the exact prefix and the block-aligned moved content.

    ``exclude``: an owner (or an agent and its sub-owners) left out; ``near_radius``: find
    blocks within that many differing token positions (0: none); ``spans``: find moved spans
    at any alignment."""

    exclude: str | None = None
    near_radius: int = 0
    spans: bool = False


PREFIX_ONLY = LookupOptions()


@dataclass(frozen=True, slots=True)
class LookupResult:
    """What the index knows about a query's blocks (after exclusion).

    * ``prefix_by_owner[o]`` = number of leading query blocks whose chain hash ``o`` holds;
      owners with 0 are absent. ``exact_blocks`` = the maximum (0 when empty).
    * ``exact_runs``: ``(start, end, owners)`` covering blocks ``[0, exact_blocks)``; every block
      of a run is held by exactly ``owners`` (sorted).
    * ``moved[i] = (owners, sources)`` for blocks ``i >= exact_blocks`` whose tokens equal an
      aligned block of some indexed prompt (at another position or after another prefix);
      ``sources`` lists up to ``MAX_SOURCES`` ``(owner, block position)`` pairs.
    """

    exact_blocks: int
    prefix_by_owner: dict[str, int]
    exact_runs: list[tuple[int, int, tuple[str, ...]]]
    moved: dict[int, tuple[tuple[str, ...], tuple[tuple[str, int], ...]]] = field(
        default_factory=dict
    )
    deepest_hash_block: int = 0  # leading blocks held by anyone, exclusion ignored
    near: dict[int, NearHit] = field(default_factory=dict)  # blocks neither exact nor moved
    spans: list[SharedSpan] = field(default_factory=list)
    # the backend could not be consulted (shared backend down): nothing is claimed reusable
    degraded: bool = False
    # the moved-span search hit its work budget: ``spans`` may miss some (never wrong ones)
    truncated: bool = False


MAX_SOURCES = 16


@dataclass(frozen=True, slots=True)
class IndexStats:
    tenants: int
    owners: int
    blocks: int  # distinct chain blocks
    owner_blocks: int  # sum over owners of their blocks (what index_prompt indexed)
    contents: int  # distinct block contents
    nbytes: int  # approximate memory held by the index structures
    exact_nbytes: int = 0  # of which the exact index (chain → owners, owner → blocks)
    similarity_nbytes: int = 0  # of which near-duplicate and moved-span tables


class BlockIndex(ABC):
    """Per-tenant block ownership. Implementations guard their own structures, and calls on
    different tenants must not wait for each other's work; ``SyncMatcher`` serializes the
    calls of one tenant. Costs below are for the in-memory backend."""

    @abstractmethod
    def put(self, tenant: str, owner: str, seq: BlockSequence, info: OwnerInfo) -> PutResult:
        """Make ``seq`` the owner's prompt, replacing any earlier one. O(blocks). Either
        everything is applied or (on error) nothing."""

    @abstractmethod
    def remove(self, tenant: str, owner: str) -> int:
        """Forget the owner; blocks other owners hold stay. Returns the owner's block count
        (0 when unknown). O(owner's blocks)."""

    @abstractmethod
    def validate(self, tenant: str, seq: BlockSequence) -> None:
        """Raise what ``put`` would raise for ``seq`` (``HashCollisionError``), changing
        nothing."""

    @abstractmethod
    def drop_tenant(self, tenant: str) -> None:
        """Forget everything the tenant indexed (every owner; the tenant is then unknown)."""

    @abstractmethod
    def lookup(
        self, tenant: str, seq: BlockSequence, options: LookupOptions = PREFIX_ONLY
    ) -> LookupResult:
        """Exact prefix holders and moved content for a query, and what ``options`` asks for
        (near-duplicate blocks, moved spans; an excluded owner). O(query blocks + owners
        reported); independent of the index size."""

    @abstractmethod
    def owner_block_tokens(self, tenant: str, owner: str, block: int) -> np.ndarray | None:
        """Tokens of block ``block`` of the owner's prompt, or None past its end."""

    @abstractmethod
    def closest_owner(
        self, tenant: str, first_block: np.ndarray, *, exclude: str | None = None
    ) -> str | None:
        """The owner whose block 0 shares the longest token prefix (>= 1 token) with
        ``first_block``; ties to the smallest name. Used only to explain a prefix that broke
        inside block 0. O(owners), vectorized."""

    @abstractmethod
    def owner_info(self, tenant: str, owner: str) -> OwnerInfo | None: ...

    @abstractmethod
    def owners(self, tenant: str) -> list[str]:
        """The tenant's owners, sorted. A shared backend that cannot be reached raises
        ``BackendUnavailableError`` (never answers an empty list as if it were true)."""

    def count_owners(self, tenant: str) -> int:
        """Owners the tenant holds (as this process knows them)."""
        return len(self.owners(tenant))

    def count_tenants(self) -> int:
        """Tenants holding at least one owner (as this process knows them)."""
        return self.stats().tenants

    @abstractmethod
    def stats(self, tenant: str | None = None) -> IndexStats:
        """Sizes of the whole index, or of one tenant's part (``tenants`` is then 0 or 1)."""

    @abstractmethod
    def tenants(self) -> list[str]:
        """Tenants holding at least one owner."""

    @abstractmethod
    def export(self, tenant: str | None = None) -> Iterator[OwnerRecord]:
        """Every owner's indexed prompt (what ``put`` needs to rebuild the index elsewhere), of
        one tenant or all. O(index); for snapshots."""

    def health(self) -> BackendHealth:
        """The backend's link state and failure counters (nothing to report in memory)."""
        return BackendHealth()

    @abstractmethod
    def num_blocks(self) -> int:
        """Distinct chain blocks held, all tenants together. O(tenants)."""

    def held_blocks(self) -> int:
        """Distinct chain blocks this process holds in memory, O(1): what a memory cap
        bounds (a shared backend's replica counts what it has applied)."""
        return self.num_blocks()
