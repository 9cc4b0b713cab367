"""Choose a backend from a URL (parsed by ``store/url.py``): the embedded default or Redis."""

from __future__ import annotations

from kvforge.blocks import BlockHasher
from kvforge.index.base import BlockIndex
from kvforge.index.memory import MemoryIndex
from kvforge.index.spans import SpanBudget
from kvforge.store.url import parse_backend_url


def open_index(
    url: str | None, hasher: BlockHasher, span_budget: SpanBudget | None = None
) -> BlockIndex:
    """``None`` or ``memory://``: the in-process index. ``redis://…`` / ``rediss://…`` /
    ``unix://…``: the shared Redis index (options ``prefix``, ``ttl`` seconds, ``feed_cap``,
    ``socket_timeout``, ``follow`` as query parameters)."""
    parsed = parse_backend_url(url)
    if not parsed.shared:
        return MemoryIndex(hasher.block_size, span_budget)
    from kvforge.index.redis import RedisIndex

    o = parsed.options
    return RedisIndex(
        parsed.client_url,
        hasher,
        prefix=str(o.get("prefix", "kvf")),
        ttl=parsed.option("ttl", 0.0) if "ttl" in o else None,
        feed_cap=int(parsed.option("feed_cap", 100_000)),
        socket_timeout=parsed.option("socket_timeout", 0.5),
        follow=o.get("follow", True) is not False,
        span_budget=span_budget,
    )
