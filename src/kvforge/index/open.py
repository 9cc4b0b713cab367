"""Choose a backend from a URL: the embedded default or Redis."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kvforge.blocks import BlockHasher
from kvforge.errors import InvalidInputError
from kvforge.index.base import BlockIndex
from kvforge.index.memory import MemoryIndex

# query parameters kvforge reads itself; the rest go to the Redis client (e.g. ``ssl_cert_reqs``)
_OWN: dict[str, Callable[[str], object]] = {
    "prefix": str,
    "ttl": float,
    "feed_cap": int,
    "socket_timeout": float,
    "follow": lambda v: v.lower() not in ("0", "false", "no"),
}


def split_redis_url(url: str) -> tuple[str, dict[str, object]]:
    """``redis://h:6379/0?prefix=a&ttl=60`` -> (``redis://h:6379/0``, {prefix, ttl})."""
    parts = urlsplit(url)
    own: dict[str, object] = {}
    rest = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in _OWN:
            try:
                own[k] = _OWN[k](v)
            except ValueError:
                raise InvalidInputError(f"index URL: bad value for {k}: {v!r}") from None
        else:
            rest.append((k, v))
    return urlunsplit(parts._replace(query=urlencode(rest))), own


def open_index(url: str | None, hasher: BlockHasher) -> BlockIndex:
    """``None`` or ``memory://``: the in-process index. ``redis://…`` / ``rediss://…`` /
    ``unix://…``: the shared Redis index (options ``prefix``, ``ttl`` seconds, ``feed_cap``,
    ``socket_timeout`` as query parameters)."""
    if url is None or url in ("memory", "memory://"):
        return MemoryIndex(hasher.block_size)
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        from kvforge.index.redis import RedisIndex

        base, opts = split_redis_url(url)
        return RedisIndex(base, hasher, **opts)  # type: ignore[arg-type]
    raise InvalidInputError(f"unknown index backend {scheme!r}: use memory:// or redis://")
