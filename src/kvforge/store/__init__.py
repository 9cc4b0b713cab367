"""Shared state on Redis: connection, key layout, and fail-open bookkeeping."""

from kvforge.store.health import BackendHealth
from kvforge.store.redis import BackendUnavailableError, RedisStore, is_redis_url

__all__ = ["BackendHealth", "BackendUnavailableError", "RedisStore", "is_redis_url"]
