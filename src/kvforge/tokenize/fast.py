"""A faster exact encoder for byte-level BPE tokenizers: tiktoken over the same ranks and
pre-tokenizer pattern, with HF's own normalizer.

Only used where it provably gives HF's ids: the tokenizer must be a plain byte-level BPE (one
``Split`` regex, then ``ByteLevel`` without its own regex; merges ordered like the ids, as in
tiktoken-born vocabularies such as Qwen's), and a differential check on a built-in sample (many
scripts, digits, whitespace runs, code) must agree with HF at construction. The test suite
checks it against the shipped test vectors, random Unicode and real text. Anything else, or
``KVFORGE_FAST_TOKENIZER=0``, or tiktoken missing: None, and HF stays the encoder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from tokenizers import Tokenizer

_SAMPLE = (
    "The quick brown fox — it's 3.14159, isn't it? DON'T PANIC.\n\n\tdef f(x):\n"
    "        return x**2  # squares\r\n"
    "Größe, naïve café; Ελληνικά; русский текст; עברית; العربية; हिन्दी; 中文测试；日本語の"
    "テキスト、한국어 텍스트. 🙂👍🏽 ١٢٣ ¹²³ ⅷ 　全角  spaces   \u00a0nbsp \u200bzero-width"
    'e\u0301 a\u0308 \ufb01 \u2126 1,234,567.89 $9.99 ```json {"a": [1, 2]}``` <b>x</b>'
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table (what ByteLevel vocabularies are written in)."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _plain_byte_level_bpe(spec: dict[str, Any]) -> str | None:
    """The pre-tokenizer regex when ``spec`` is a plain byte-level BPE, else None."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout"):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") not in ("NFC",):
        return None
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, level = steps
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    regex = (split.get("pattern") or {}).get("Regex")
    if not regex or level.get("type") != "ByteLevel" or level.get("use_regex"):
        return None
    if level.get("add_prefix_space"):
        return None
    return str(regex)


def tiktoken_encoder(tk: Tokenizer) -> Callable[[str], list[int]] | None:
    """An exact, faster ``piece -> ids`` for ``tk`` (no added tokens inside the piece)."""
    if os.environ.get("KVFORGE_FAST_TOKENIZER", "1").lower() in ("0", "false", "no"):
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(tk.to_str())
    regex = _plain_byte_level_bpe(spec)
    if regex is None:
        return None
    vocab: dict[str, int] = spec["model"]["vocab"]
    prev = -1
    for m in spec["model"]["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        rank = vocab.get(a + b)
        if rank is None or rank < prev:
            return None  # merge order differs from id order: tiktoken's ranks would not match
        prev = rank
    dec = {c: b for b, c in _bytes_to_unicode().items()}
    try:
        ranks = {bytes(dec[c] for c in tok): i for tok, i in vocab.items()}
    except KeyError:
        return None
    if any(bytes([b]) not in ranks for b in range(256)):
        return None
    enc = tiktoken.Encoding("kvforge-bpe", pat_str=regex, mergeable_ranks=ranks, special_tokens={})
    normalizer = tk.normalizer

    def encode(piece: str) -> list[int]:
        if normalizer is not None and not piece.isascii():  # NFC is the identity on ASCII
            piece = normalizer.normalize_str(piece)
        return enc.encode_ordinary(piece)

    for line in (_SAMPLE, *_SAMPLE.split(" ")):
        if encode(line) != tk.encode(line, add_special_tokens=False).ids:
            return None
    return encode
