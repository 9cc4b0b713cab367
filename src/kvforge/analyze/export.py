"""Traces out of kvforge, for other tools: the Mooncake trace format (Dynamo's data generator
and aiperf's ``mooncake_trace`` replay read it).

One JSON line per request: ``timestamp`` (ms since the first request), ``input_length``,
``output_length`` and ``hash_ids`` — one integer per block of ``block_size`` tokens (the last,
partial block included), equal integers meaning an identical prefix up to and including that
block. The ids come from kvforge's vLLM chain hashes (cache salt included), numbered
consecutively in order of first appearance, so a replay shares exactly what vLLM would share.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from kvforge.analyze.trace import TraceRequest
from kvforge.blocks import BlockHasher, block_extra_keys
from kvforge.tokenize import PromptTokenizer


def mooncake_lines(
    requests: Iterable[TraceRequest],
    tokenizer: PromptTokenizer,
    *,
    block_size: int = 512,
    output_length: int = 1,
) -> Iterator[dict[str, Any]]:
    """Mooncake records for ``requests``, in trace order. ``output_length``: for requests that
    do not say how many tokens they generated (``output_length`` / ``max_tokens``)."""
    hasher = BlockHasher(block_size=block_size)
    ids: dict[bytes, int] = {}
    t0: float | None = None
    for r in requests:
        toks = tokenizer.tokenize(r.prompt, tools=r.tools, chat=r.chat).token_ids
        chain = hasher.chain(toks, cache_salt=r.cache_salt)
        full = len(chain) * block_size
        if full < len(toks):  # the partial last block: its own id, after the same parent
            # the salt is part of block 0 only (vLLM's extra keys), as for full blocks
            salt = r.cache_salt if full == 0 else None
            extra = block_extra_keys(full, full + block_size, cache_salt=salt)
            chain.append(hasher.hash_block(chain[-1] if chain else None, toks[full:], extra))
        hash_ids = [ids.setdefault(bytes(h), len(ids)) for h in chain]
        if r.t is not None and t0 is None:
            t0 = r.t
        ts = 0 if r.t is None or t0 is None else round((r.t - t0) * 1000)
        out = r.output_length if r.output_length is not None else output_length
        yield {
            "timestamp": ts,
            "input_length": len(toks),
            "output_length": out,
            "hash_ids": hash_ids,
        }


def write_mooncake(lines: Iterable[dict[str, Any]], out: Any) -> int:
    n = 0
    for rec in lines:
        out.write(json.dumps(rec) + "\n")
        n += 1
    return n
