"""One Redis connection per process, the key layout, and how failures are handled.

Key layout (``P`` = the configured prefix, ``T`` = the tenant, percent-encoded so that no
tenant name can reach another tenant's keys; the braces are Redis Cluster hash tags, so one
tenant's keys share a slot and its scripts stay single-slot)::

    P:config                    hash configuration every replica must share
    P:tenants                   SET of tenants (for stats and exports)
    P:{T}:meta                  HASH epoch, ver
    P:{T}:owners                HASH owner -> owner record (tokens, namespace, metadata)
    P:{T}:feed                  STREAM (v, owner): one entry per change, capped
    P:{T}:seen                  ZSET owner -> last index time (ms), for TTL expiry
    P:res:feed / res:snap / ... engine residency (see ``kvforge.route.shared``)

Failure policy: a read whose round trip fails is answered as "nothing known" (fail open) and
counted; a write raises ``BackendUnavailableError``. Failures are logged at most once per
``log_interval`` seconds, with the URL's password masked.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any
from urllib.parse import quote

import redis

from kvforge.errors import InvalidInputError, KvforgeError
from kvforge.store.health import BackendHealth
from kvforge.store.url import mask_url, parse_backend_url

log = logging.getLogger(__name__)

# What a dropped connection, a restarting server or a timeout raise.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError)
# Replies of a server that is up but cannot take the call now: out of memory (``maxmemory``),
# a replica (what an old master turns into after a fail-over), persistence failing, a cluster
# in flux. Redis sends them as error replies, also from inside scripts and transactions
# (``-OOM ...`` inside an EVAL error, ``EXECABORT`` for a MULTI queued with one).
_UNAVAILABLE_CODES = (
    "OOM",
    "READONLY",
    "MISCONF",
    "MASTERDOWN",
    "NOREPLICAS",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "LOADING",
    "EXECABORT",
)


_UNAVAILABLE_CLASSES = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.ExecAbortError,
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means "Redis cannot serve this now" (retry later), not a bug."""
    if isinstance(exc, REDIS_DOWN + _UNAVAILABLE_CLASSES):
        return True
    if isinstance(exc, redis.ResponseError):
        msg = str(exc)
        # the code leads the reply, or follows a script's "Error ... script: ..." preamble
        return msg.startswith(_UNAVAILABLE_CODES) or any(
            f" {code} " in msg or f"-{code} " in msg for code in _UNAVAILABLE_CODES
        )
    return False


class BackendUnavailableError(KvforgeError):
    """The shared backend (Redis) cannot be reached; nothing was changed."""


def is_redis_url(url: str | None) -> bool:
    """Whether ``url`` names a Redis backend (by the one parser, ``store/url.py``)."""
    try:
        return parse_backend_url(url).shared
    except InvalidInputError:
        return False


class RedisStore:
    """A client plus the health of the link to it.

    ``socket_timeout`` bounds every round trip, so a dead server costs a lookup at most that
    long; ``retry_after`` seconds after a failure, calls fail fast without touching the
    network, then one call probes again (recovery needs no restart).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "kvf",
        socket_timeout: float = 0.5,
        retry_after: float = 1.0,
        log_interval: float = 10.0,
        client: redis.Redis | None = None,
    ) -> None:
        if not is_redis_url(url):
            raise KvforgeError(f"not a Redis URL: {mask_url(str(url))!r}")
        if not prefix or any(c in prefix for c in "{} "):
            raise KvforgeError("the Redis key prefix must be non-empty, without braces or spaces")
        self.url = url
        self.prefix = prefix
        self.client = client or redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            health_check_interval=30,
        )
        self._url_timeout = socket_timeout
        self._bulk: redis.Redis | None = None
        self.retry_after = retry_after
        self.log_interval = log_interval
        self.failures = 0  # round trips that failed or were skipped while down
        self.recoveries = 0
        self.available = True
        self._down_since = 0.0
        self._last_log = -1e18
        self._lock = threading.Lock()

    @property
    def bulk(self) -> redis.Redis:
        """A second client for bulk reads (snapshots, rebuilds): a 30 s timeout, so a large
        transfer is not mistaken for a dead server."""
        if self._bulk is None:
            self._bulk = redis.Redis.from_url(
                self.url, socket_timeout=30.0, socket_connect_timeout=self._url_timeout
            )
        return self._bulk

    # ---- keys ----------------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def tenant_key(self, tenant: str, part: str) -> str:
        return f"{self.prefix}:{{{quote(tenant, safe='')}}}:{part}"

    # ---- health --------------------------------------------------------------------------
    def call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        """Run one round trip; raises ``BackendUnavailableError`` when Redis is unreachable
        (or was, less than ``retry_after`` seconds ago)."""
        if not self.available and time.monotonic() - self._down_since < self.retry_after:
            self._failed(None)
        try:
            out = fn(*args, **kw)
        except REDIS_DOWN as exc:
            self._failed(exc)
        except redis.RedisError as exc:
            if not is_unavailable(exc):
                raise
            # up but refusing (OOM, READONLY, ...): counted and 503, the link stays "up" so
            # that reads, which such a server still answers, are not failed fast
            self._failed(exc, link_down=False)
        if not self.available:
            with self._lock:
                self.available = True
                self.recoveries += 1
            log.warning("Redis at %s is reachable again", mask_url(self.url))
        return out

    def _failed(self, exc: BaseException | None, *, link_down: bool = True) -> Any:
        now = time.monotonic()
        with self._lock:
            self.failures += 1
            if exc is not None and link_down:
                self.available = False
                self._down_since = now
            if now - self._last_log >= self.log_interval:
                self._last_log = now
                log.error(
                    "Redis at %s unavailable (%s); failing open, %d failed calls so far",
                    mask_url(self.url),
                    type(exc).__name__ if exc else "still down",
                    self.failures,
                )
        why = "" if link_down or exc is None else f" ({type(exc).__name__})"
        raise BackendUnavailableError(f"Redis at {mask_url(self.url)} is unavailable{why}") from exc

    def health(self, degraded: int = 0, **counters: int) -> BackendHealth:
        """The link's state, with the caller's own counters."""
        return BackendHealth(self.available, self.failures, self.recoveries, degraded, counters)
