"""Shared state on Redis: connection, key layout, and fail-open bookkeeping."""

from kvforge.store.redis import BackendUnavailableError, RedisStore, is_redis_url

__all__ = ["BackendUnavailableError", "RedisStore", "is_redis_url"]
