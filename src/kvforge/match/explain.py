"""Explaining a match to a person: which owner it is measured against, the divergence that
broke that owner's prefix (as text), the layout changes that would turn moved content into
prefix reuse (and which prompt must change), the per-block view and the moved coverage.

Pure functions of a lookup's result, the prompt and the tokenizer; ``owner_gaps`` reads the
index and must run under the tenant's lock, like the lookup it explains.
"""

from __future__ import annotations

import numpy as np

from kvforge.blocks import BlockSequence
from kvforge.index import BlockIndex, LookupResult, OwnerInfo
from kvforge.match.report import BlockMatch, Divergence, Fix, MovedSpan
from kvforge.tokenize import PromptTokenizer, TokenizedPrompt

# How far past an owner's exact prefix its tokens are fetched to show the text it holds between
# a break and the shared span (advice only; a longer gap is shown by its first blocks).
GAP_BLOCKS = 4


def preview(text: str, limit: int = 60) -> str:
    return repr(text[:limit] + ("…" if len(text) > limit else "")) if text else "nothing"


def best_owner(hit: LookupResult) -> str | None:
    """Longest exact prefix; ties, and the no-prefix case, go to the owner sharing the most
    moved blocks, then to the smallest name (deterministic). Only the deepest owners are
    candidates, so the cost does not grow with the owners sharing a short prefix."""
    moved_count: dict[str, int] = {}
    for owners, _ in hit.moved.values():
        for o in owners:
            moved_count[o] = moved_count.get(o, 0) + 1
    candidates = hit.exact_runs[-1][2] if hit.exact_runs else tuple(moved_count)
    if not candidates:
        return None
    return min(candidates, key=lambda o: (-moved_count.get(o, 0), o))


def block_matches(hit: LookupResult, n: int, bs: int, tokens: np.ndarray) -> list[BlockMatch]:
    # tuple.__new__ skips the named tuple's Python-level constructor: 512 blocks in ~0.2 ms
    new = tuple.__new__
    bm = BlockMatch
    out: list[BlockMatch] = []
    for start, end, owners in hit.exact_runs:
        out += [new(bm, (i, i * bs, "exact", owners, (), 0, ())) for i in range(start, end)]
    moved, near = hit.moved, hit.near
    if not moved and not near:
        out += [new(bm, (i, i * bs, "none", (), (), 0, ())) for i in range(hit.exact_blocks, n)]
        return out
    for i in range(hit.exact_blocks, n):
        m = moved.get(i)
        if m is not None:
            out.append(new(bm, (i, i * bs, "moved", m[0], m[1], 0, ())))
            continue
        nh = near.get(i)
        if nh is None:
            out.append(new(bm, (i, i * bs, "none", (), (), 0, ())))
        else:
            diff = tuple((p, int(tokens[i, p]), nh.tokens[p]) for p in nh.positions)
            out.append(new(bm, (i, i * bs, "near", nh.owners, nh.sources, nh.distance, diff)))
    return out


def moved_coverage(
    num_tokens: int, bs: int, exact: int, hit: LookupResult, spans: list[MovedSpan]
) -> int:
    """Query tokens after the exact prefix that some moved block or span covers."""
    mask = np.zeros(num_tokens, dtype=bool)
    if hit.moved:
        starts = np.fromiter(hit.moved, dtype=np.int64, count=len(hit.moved)) * bs
        mask[(starts[:, None] + np.arange(bs)).ravel()] = True
    for sp in spans:
        mask[sp.query_start : sp.query_start + sp.length] = True
    mask[: exact * bs] = False
    return int(mask.sum())


def owner_gaps(
    index: BlockIndex, key: str, seq: BlockSequence, hit: LookupResult
) -> dict[str, tuple[int, np.ndarray | None]]:
    """Per span owner (at most 8): the token where its prefix stops matching the query,
    and its tokens from the start of that block over ``GAP_BLOCKS`` blocks (the text it
    holds between the break and the shared span, for the advice). Call under lock."""
    out: dict[str, tuple[int, np.ndarray | None]] = {}
    bs = seq.block_size
    for sp in hit.spans:
        o = sp.owner
        if o in out or len(out) >= 8:
            continue
        depth = hit.prefix_by_owner.get(o, 0)
        blocks = []
        for b in range(depth, depth + GAP_BLOCKS):
            toks = index.owner_block_tokens(key, o, b)
            if toks is None:
                break
            blocks.append(toks)
        if not blocks or depth >= seq.num_blocks:
            out[o] = (depth * bs, None)
            continue
        same = blocks[0] == seq.tokens[depth]
        brk = depth * bs + (int(np.argmin(same)) if not same.all() else bs)
        out[o] = (brk, np.concatenate(blocks))
    return out


def fixes(
    tokenizer: PromptTokenizer,
    tp: TokenizedPrompt,
    hit: LookupResult,
    spans: list[MovedSpan],
    breaks: dict[str, tuple[int, np.ndarray | None]],
    bs: int,
) -> list[Fix]:
    """Per owner: shared content right after the point where the prefix broke — moving the
    varying text (in the query, in the owner's prompt, or in both) below it would make it
    exact prefix reuse. The advice names the prompt that holds that text."""
    out: list[Fix] = []
    done: set[str] = set()
    for sp in spans:  # longest first
        got = breaks.get(sp.owner)
        if got is None or sp.owner in done:
            continue
        brk, owner_toks = got
        # a span may start inside the common prefix on one side: only its part after the
        # break can follow the prefix in both prompts
        cut = max(0, brk - sp.query_start, brk - sp.owner_start)
        q_start, o_start, length = sp.query_start + cut, sp.owner_start + cut, sp.length - cut
        q_gap, o_gap = q_start - brk, o_start - brk
        if length <= 0 or (q_gap == 0 and o_gap == 0):
            continue
        # over what the query already reuses (another owner may hold a longer prefix)
        gain = (brk + length) // bs * bs - hit.exact_blocks * bs
        if gain < 2 * bs or min(q_gap, o_gap) > GAP_BLOCKS * bs:
            continue  # little to gain, or two different texts too long to call "varying"
        done.add(sp.owner)
        q_text = prompt_text(tokenizer, tp, brk, q_start) if q_gap else ""
        o_text = ""
        if o_gap and owner_toks is not None:
            base = hit.prefix_by_owner.get(sp.owner, 0) * bs
            o_text = tokenizer.decode(owner_toks[brk - base : o_start - base].tolist())
        holder = "both" if q_gap and o_gap else "query" if q_gap else "owner"
        where = f"(+{gain:,} prefix-reusable tokens)"
        if holder == "query":
            advice = (
                f"{preview(q_text)} at token {brk} breaks {length:,} tokens shared with "
                f"{sp.owner} (there at token {o_start}): put it after them {where}"
            )
        elif holder == "owner":
            advice = (
                f"{sp.owner}'s prompt has {preview(o_text)} ({o_gap:,} tokens) at token "
                f"{brk} where this prompt goes straight on; it breaks {length:,} shared "
                f"tokens (here at token {q_start}): put it after them in "
                f"{sp.owner}'s prompt {where}"
            )
        else:
            advice = (
                f"the varying text at token {brk} — {preview(q_text)} here, "
                f"{preview(o_text)} in {sp.owner} — breaks {length:,} shared tokens: "
                f"put it after them in both prompts {where}"
            )
        out.append(
            Fix(
                owner=sp.owner,
                break_token=brk,
                shared_tokens=length,
                gain_tokens=gain,
                breaking_text=q_text,
                advice=advice,
                holder=holder,
                owner_text=o_text,
                query_gap_tokens=q_gap,
                owner_gap_tokens=o_gap,
            )
        )
    return out


def prompt_text(tokenizer: PromptTokenizer, tp: TokenizedPrompt, start: int, end: int) -> str:
    """The prompt's text over tokens ``[start, end)``."""
    # offsets only when already at hand: computing them costs a whole HF encode
    span = tp.char_span(start, end) if tp.has_offsets else None
    if span is not None and tp.text is not None:
        return tp.text[span[0] : span[1]]
    return tokenizer.decode(tp.token_ids[start:end])


def divergence(
    tokenizer: PromptTokenizer,
    tp: TokenizedPrompt,
    seq: BlockSequence,
    owner: str,
    block: int,
    owner_tokens: np.ndarray | None,
    info: OwnerInfo | None,
    cache_salt: str | None,
) -> Divergence:
    bs = seq.block_size
    start, end = block * bs, (block + 1) * bs
    q = tuple(int(t) for t in seq.tokens[block])
    if owner_tokens is None:
        held = info.num_blocks if info else block
        return Divergence(
            owner=owner,
            block_index=block,
            token_index=start,
            reason=(
                f"{owner}'s indexed prompt ends after {held} full blocks "
                f"({held * bs} tokens); the query continues"
            ),
            query_text=prompt_text(tokenizer, tp, start, end),
            owner_text=None,
            query_tokens=q,
        )
    o = tuple(int(t) for t in owner_tokens)
    diff = next((j for j in range(bs) if q[j] != o[j]), None)
    if diff is None:
        why = []
        if info is not None and (info.cache_salt or None) != (cache_salt or None):
            why.append("cache_salt differs")
        if info is not None and info.lora_name is not None:
            why.append(f"{owner} was indexed with LoRA {info.lora_name!r}")
        detail = "; ".join(why) or "cache_salt or LoRA differs"
        return Divergence(
            owner=owner,
            block_index=block,
            token_index=start,
            reason=f"block {block} has the same tokens but other extra keys ({detail})",
            query_text=prompt_text(tokenizer, tp, start, end),
            owner_text=tokenizer.decode(o),
            query_tokens=q,
            owner_tokens=o,
        )
    q_text = prompt_text(tokenizer, tp, start + diff, end)
    o_text = tokenizer.decode(o[diff:])
    first_q = tokenizer.decode(q[diff : diff + 1])
    first_o = tokenizer.decode(o[diff : diff + 1])
    return Divergence(
        owner=owner,
        block_index=block,
        token_index=start + diff,
        reason=(
            f"token {start + diff} (block {block}) differs: query has {first_q!r} where "
            f"{owner} has {first_o!r}; nothing after it is prefix-reusable"
        ),
        query_text=q_text,
        owner_text=o_text,
        query_tokens=q[diff:],
        owner_tokens=o[diff:],
    )
