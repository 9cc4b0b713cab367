"""Checks at the boundary that every caller-supplied string can be stored and sent on.

A Python ``str`` may hold lone surrogates (JSON ``"\\udc00"`` decodes to one) that no UTF-8
encoder accepts: stored in the index they would make every later snapshot, Redis write or
log line fail. Such strings are refused where they enter, with a clear error.
"""

from __future__ import annotations

from typing import Any

from kvforge.errors import InvalidInputError


def require_utf8(value: str, what: str) -> str:
    """``value`` if it encodes as UTF-8, else InvalidInputError naming ``what``."""
    if not value.isascii():  # ASCII (the common case) is checked in one C pass
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(
                f"{what} is not valid Unicode text (a lone surrogate at character {exc.start})"
            ) from None
    return value


MAX_NESTING = 64


def require_utf8_tree(obj: Any, what: str, _depth: int = 0) -> None:
    """Every string (keys included) inside nested dicts and lists encodes as UTF-8; deeper
    than ``MAX_NESTING`` levels is refused (nothing a prompt needs, and unchecked otherwise)."""
    if _depth > MAX_NESTING:
        raise InvalidInputError(f"{what} is nested more than {MAX_NESTING} levels deep")
    if isinstance(obj, str):
        require_utf8(obj, what)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str):
                require_utf8(k, what)
            require_utf8_tree(v, what, _depth + 1)
    elif isinstance(obj, list | tuple):
        for v in obj:
            require_utf8_tree(v, what, _depth + 1)


def text_size(obj: Any, _depth: int = 0) -> int:
    """Characters in every string inside nested dicts and lists (what a chat request carries)."""
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, dict):
        return sum(len(k) if isinstance(k, str) else 0 for k in obj) + sum(
            text_size(v, _depth + 1) for v in obj.values()
        )
    if isinstance(obj, list | tuple) and _depth < 64:
        return sum(text_size(v, _depth + 1) for v in obj)
    return 0
