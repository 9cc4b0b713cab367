"""Tenants on the routing path: a per-tenant ``cache_salt`` (CVE-2025-46570).

vLLM shares a KV block between any two requests whose prefixes hash alike; a tenant able to
time its requests (or to read a router's decision) learns whether another tenant's prompt is
cached. vLLM's answer is ``cache_salt``, mixed into the first block's hash: requests with
different salts share nothing. With a secret configured, the router salts every request of a
tenant with a value derived from the secret and the tenant (the client's own salt, if any, is
kept inside it), so tenants never share blocks and no tenant can guess another's salt. Every
replica and worker given the same secret derives the same salts, so caches survive restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from kvforge.errors import InvalidInputError

DEFAULT_TENANT = "default"


class TenantSalt:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise InvalidInputError("the tenant-salt secret must be at least 16 bytes")
        self._secret = secret

    @classmethod
    def from_env(cls, name: str) -> TenantSalt:
        value = os.environ.get(name)
        if not value:
            raise InvalidInputError(f"environment variable {name} (tenant-salt secret) is unset")
        return cls(value.encode())

    def salt(self, tenant: str | None, given: str | None = None) -> str:
        """The cache_salt a request of ``tenant`` is sent with (``given``: the client's own)."""
        tag = hmac.new(self._secret, (tenant or DEFAULT_TENANT).encode(), hashlib.sha256)
        mine = "kvf-" + tag.hexdigest()[:32]
        return mine if not given else f"{mine}:{given}"
