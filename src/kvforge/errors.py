"""Exceptions raised by kvforge. Every one leaves the index unchanged."""


class KvforgeError(Exception):
    """Base class of kvforge errors."""


class InvalidInputError(KvforgeError, ValueError):
    """A caller passed something kvforge cannot use (wrong type, empty id, too large, ...)."""


class PromptTooLargeError(InvalidInputError):
    """A prompt over the configured size limits (characters or tokens): HTTP 413."""


class UnsupportedInputError(InvalidInputError):
    """A valid vLLM feature kvforge does not model on this path (e.g. multimodal prompts)."""


class HashCollisionError(KvforgeError):
    """Two different blocks share a 64-bit index key. Astronomically unlikely by chance;
    raised instead of silently merging them."""


class QuotaExceededError(KvforgeError):
    """Indexing this would exceed a configured bound (agents per tenant, tenants)."""
