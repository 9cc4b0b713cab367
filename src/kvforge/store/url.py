"""The one parser of backend URLs (``[service].index_url``, ``--index-url``, the matcher's
``index=`` argument): every place that accepts one accepts exactly the same set.

* ``memory://`` (or ``memory``, or nothing): the embedded, in-process default. It takes no
  host, path or options.
* ``redis://``, ``rediss://`` (TLS), ``unix://`` (socket path): shared state on Redis. kvforge
  reads its own query parameters (``prefix``, ``ttl``, ``feed_cap``, ``socket_timeout``,
  ``follow``); the others are the Redis client's (e.g. ``ssl_cert_reqs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kvforge.errors import InvalidInputError

REDIS_SCHEMES = ("redis", "rediss", "unix")


def _flag(v: str) -> bool:
    return v.lower() not in ("0", "false", "no")


# query parameters kvforge reads itself, with their parsers
_OWN: dict[str, Callable[[str], object]] = {
    "prefix": str,
    "ttl": float,
    "feed_cap": int,
    "socket_timeout": float,
    "follow": _flag,
}


@dataclass(frozen=True, slots=True)
class BackendURL:
    """A parsed backend URL. ``client_url`` is what the Redis client connects to (kvforge's
    own parameters removed); empty for the embedded backend."""

    kind: Literal["memory", "redis"]
    client_url: str = ""
    options: dict[str, object] = field(default_factory=dict)

    @property
    def shared(self) -> bool:
        """State shared by every process on the same store (not this process's memory)."""
        return self.kind == "redis"

    def option(self, name: str, default: float) -> float:
        value = self.options.get(name)
        return float(value) if isinstance(value, int | float) else default


MEMORY = BackendURL("memory")


def parse_backend_url(url: str | None, what: str = "backend URL") -> BackendURL:
    """Parse ``url``; raises InvalidInputError (naming ``what`` and saying what is accepted)
    for anything else."""
    if url is None or url in ("", "memory", "memory://"):
        return MEMORY
    if not isinstance(url, str):
        raise InvalidInputError(f"{what} must be a string (got {type(url).__name__})")
    parts = urlsplit(url)
    if parts.scheme == "memory":
        raise InvalidInputError(
            f"{what}: memory:// takes no host, path or options (got {mask_url(url)!r})"
        )
    if parts.scheme not in REDIS_SCHEMES:
        raise InvalidInputError(
            f"{what} must be memory:// or redis://… (rediss://, unix://): unknown index "
            f"backend {parts.scheme!r} in {mask_url(url)!r}"
        )
    own: dict[str, object] = {}
    rest = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in _OWN:
            try:
                own[k] = _OWN[k](v)
            except ValueError:
                raise InvalidInputError(f"{what}: bad value for {k}: {v!r}") from None
        else:
            rest.append((k, v))
    prefix = own.get("prefix", "kvf")
    if not isinstance(prefix, str) or not prefix or any(c in prefix for c in "{} "):
        raise InvalidInputError(
            f"{what}: the Redis key prefix must be non-empty, without braces or spaces"
        )
    # rebuilt by hand: ``urlunsplit`` drops the empty host of ``unix:///path``
    query = urlencode(rest)
    client = f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")
    return BackendURL("redis", client, own)


def mask_url(url: str) -> str:
    """The URL without its password: safe to log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
