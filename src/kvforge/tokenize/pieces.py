"""Exact piecewise encoding: the text between added tokens, cached per scope by digest.

HF ``tokenizers`` splits a text on its added tokens (``<|im_start|>``, ``<tool_call>`` …)
before normalization and pre-tokenization, then encodes every piece between them on its own.
So ``encode(text) == concat(encode(piece) or [added id])`` exactly, and a rendered chat whose
system prompt, tool schemas and earlier turns repeat tokenizes only its new pieces. This holds
when every added token is matched literally (no ``lstrip``/``rstrip``/``single_word``, not
``normalized``) and the post-processor adds nothing; ``PieceEncoder.for_tokenizer`` checks both
and answers None otherwise (the caller then encodes whole texts).

The cache is keyed by (scope, blake2b digest of the piece): a caller only ever hits pieces its
own scope (tenant) sent, so cache timing reveals nothing about other tenants, and no text is
retained. It is bounded by the tokens it holds (LRU).

A piece is encoded by a faster exact encoder when one is given (tiktoken over the same ranks and
pre-tokenizer pattern, see ``fast``), else by HF itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable

from tokenizers import Tokenizer

MIN_CACHED_CHARS = 256  # shorter pieces are cheaper to encode than to look up


class PieceEncoder:
    """Thread-safe."""

    def __init__(
        self,
        split: re.Pattern[str],
        added: dict[str, int],
        encode_piece: Callable[[str], list[int]],
        cache_tokens: int = 2_000_000,
    ) -> None:
        self._split = split
        self._added = added
        self._encode_piece = encode_piece
        self._cache: OrderedDict[tuple[str, bytes], array[int]] = OrderedDict()
        self._cached = 0
        self.cache_tokens = cache_tokens
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_tokenizer(
        cls, tk: Tokenizer, encode_piece: Callable[[str], list[int]] | None = None
    ) -> PieceEncoder | None:
        """A piecewise encoder for ``tk``, or None when its added tokens or post-processor make
        piecewise encoding differ from a whole encode."""
        spec = json.loads(tk.to_str())
        added = spec.get("added_tokens") or []
        if any(
            a.get("lstrip") or a.get("rstrip") or a.get("single_word") or a.get("normalized")
            for a in added
        ):
            return None
        if (
            tk.encode("x y", add_special_tokens=True).ids
            != tk.encode("x y", add_special_tokens=False).ids
        ):
            return None  # a post-processor adds tokens (BOS/EOS): keep whole encodes
        table = {a["content"]: int(a["id"]) for a in added}
        if not table:
            split = re.compile(r"(?!x)x")  # never matches
        else:
            # longest first: at one position the longest added token wins, as in HF
            alts = sorted(table, key=len, reverse=True)
            split = re.compile("|".join(re.escape(a) for a in alts))

        def hf_piece(piece: str) -> list[int]:
            return tk.encode(piece, add_special_tokens=False).ids

        return cls(split, table, encode_piece or hf_piece)

    def encode(self, text: str, scope: str) -> list[int]:
        """Token ids of ``text`` (no post-processing), pieces cached under ``scope``."""
        out: list[int] = []
        pos = 0
        for m in self._split.finditer(text):
            if m.start() > pos:
                out += self._piece(text[pos : m.start()], scope)
            out.append(self._added[m.group()])
            pos = m.end()
        if pos < len(text):
            out += self._piece(text[pos:], scope)
        return out

    def _piece(self, piece: str, scope: str) -> list[int] | array[int]:
        if len(piece) < MIN_CACHED_CHARS:
            return self._encode_piece(piece)
        key = (scope, hashlib.blake2b(piece.encode("utf-8"), digest_size=16).digest())
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
        ids = array("I", self._encode_piece(piece))
        with self._lock:
            self.misses += 1
            if key not in self._cache and len(ids) <= self.cache_tokens // 8:
                self._cache[key] = ids
                self._cached += len(ids)
                while self._cached > self.cache_tokens:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= len(old)
        return ids

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cached = 0
