"""Replaying a multi-agent trace to measure what prefix caching reuses and what it misses.

A trace is JSON lines of ``{agent_id, prompt | messages | token_ids, tools?, tenant?,
cache_salt?, session_id?, t?}``, read as a stream and replayed in file order. OpenAI request
bodies logged one per line (``/v1/chat/completions`` or ``/v1/completions``: ``model``,
``messages`` or ``prompt``, vLLM's ``add_generation_prompt`` / ``continue_final_message`` /
``chat_template_kwargs``, any other fields ignored) are traces too: the agent is ``agent_id``,
``agent`` or the body's ``user`` (else ``"default"``), the time ``t`` or ``timestamp``.

Each request is matched against every earlier request — its own agent's earlier turns
included — as one vLLM engine with an unlimited prefix cache would reuse them, and then
indexed itself. As in vLLM (and ``kvforge simulate``), blocks are shared unless
``cache_salt`` differs: a ``tenant`` field alone isolates nothing, and requests that carry one
without a salt are counted and reported. Memory stays bounded on big traces: past
``max_blocks`` distinct blocks the oldest requests are forgotten first (an engine with that
many blocks of cache).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvforge.errors import InvalidInputError
from kvforge.match import MatchReport, SyncMatcher
from kvforge.tokenize import ChatOptions


@dataclass(frozen=True, slots=True)
class TraceRequest:
    line: int
    agent_id: str
    prompt: Any
    tools: list[dict[str, Any]] | None = None
    tenant: str | None = None
    cache_salt: str | None = None
    t: float | None = None
    chat: ChatOptions | None = None  # render options of a chat request
    output_length: int | None = None  # tokens generated (output_length / max_tokens), if known


def read_trace(path: str | Path) -> list[TraceRequest]:
    """Load a whole JSONL trace, or a folder of ``.txt``/``.json`` prompts (one agent per
    file)."""
    return list(iter_trace(path))


def iter_trace(path: str | Path) -> Iterator[TraceRequest]:
    """Stream a trace in file order (a bad line raises with its line number)."""
    p = Path(path)
    if p.is_dir():
        yield from _read_folder(p)
        return
    if not p.is_file():
        raise InvalidInputError(f"trace not found: {p}")
    with p.open(encoding="utf-8") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{p}:{n}: invalid JSON ({exc.msg})") from exc
            yield _request(obj, f"{p}:{n}", n)


def _request(obj: Any, where: str, line: int) -> TraceRequest:
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{where}: each line must be a JSON object")
    agent = next((obj[k] for k in ("agent_id", "agent", "user") if k in obj), "default")
    if not isinstance(agent, str) or not agent:
        raise InvalidInputError(f"{where}: the agent ('agent_id') must be a non-empty string")
    kinds = [k for k in ("prompt", "messages", "token_ids") if k in obj]
    if len(kinds) != 1:
        raise InvalidInputError(f"{where}: give exactly one of 'prompt', 'messages', 'token_ids'")
    prompt = obj[kinds[0]]
    if kinds[0] == "prompt" and isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]  # a completions batch: its first prompt, as the proxy routes it
    t = obj.get("t", obj.get("timestamp"))
    if t is not None and (not isinstance(t, int | float) or isinstance(t, bool)):
        raise InvalidInputError(f"{where}: 't' must be a number")
    try:
        chat = ChatOptions.from_fields(
            obj.get("add_generation_prompt"),
            obj.get("continue_final_message"),
            obj.get("chat_template_kwargs"),
        )
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None
    if chat is not None and kinds[0] != "messages":
        raise InvalidInputError(f"{where}: render options apply to 'messages' only")
    out = next(
        (obj[k] for k in ("output_length", "max_tokens", "max_completion_tokens") if k in obj),
        None,
    )
    if out is not None and (not isinstance(out, int) or isinstance(out, bool) or out < 0):
        raise InvalidInputError(f"{where}: 'output_length' must be a non-negative integer")
    return TraceRequest(
        line=line,
        agent_id=agent,
        prompt=prompt,
        tools=obj.get("tools"),
        tenant=obj.get("tenant"),
        cache_salt=obj.get("cache_salt"),
        t=t,
        chat=chat,
        output_length=out,
    )


def _read_folder(folder: Path) -> Iterator[TraceRequest]:
    files = sorted(f for f in folder.iterdir() if f.suffix in (".txt", ".json"))
    for n, f in enumerate(files, 1):
        text = f.read_text("utf-8")
        if f.suffix == ".json":
            obj = json.loads(text)
            if isinstance(obj, dict) and "agent_id" in obj:
                yield _request(obj, str(f), n)
                continue
            prompt: Any = obj["messages"] if isinstance(obj, dict) else obj
            yield TraceRequest(n, f.stem, prompt)
        else:
            yield TraceRequest(n, f.stem, text)


@dataclass
class AgentTotals:
    requests: int = 0
    prompt_tokens: int = 0
    exact_tokens: int = 0
    moved_tokens: int = 0
    near_tokens: int = 0


@dataclass
class Advice:
    """One distinct layout change, merged over every request and agent pair it helps.

    ``prompts`` holds (agent, text) for each prompt that must change: one entry when the
    breaking text is in one agent's prompt, two when both hold their own varying text at the
    same point (e.g. each agent's name)."""

    prompts: tuple[tuple[str, str], ...]
    token: int  # where the text sits (the same in every request it was seen in)
    shared_tokens: int  # longest shared run it breaks
    gain_tokens: int = 0  # over the trace: per request, the best gain of this change
    requests: int = 0
    partners: set[str] = field(default_factory=set)  # the agents it shares the content with
    first_line: int = 0

    def text(self) -> str:
        partners = ", ".join(sorted(self.partners)) or "itself"
        tail = (
            f"+{self.gain_tokens:,} prefix-reusable tokens over {self.requests} "
            f"request{'s' if self.requests != 1 else ''} (first: line {self.first_line})"
        )
        if len(self.prompts) == 1:
            ((agent, text),) = self.prompts
            return (
                f"{agent}'s prompt: {_preview(text)} at token {self.token} breaks "
                f"{self.shared_tokens:,} tokens shared with {partners}: put it after them ({tail})"
            )
        (a, ta), (b, tb) = self.prompts
        if a == b:
            return (
                f"{a}'s prompt changes at token {self.token} from one request to the next "
                f"({_preview(ta)} / {_preview(tb)}), breaking {self.shared_tokens:,} tokens it "
                f"shares with {partners}: put it after them ({tail})"
            )
        return (
            f"{a} and {b}: their varying text at token {self.token} ({_preview(ta)} / "
            f"{_preview(tb)}) breaks {self.shared_tokens:,} shared tokens: put it after them "
            f"in both prompts ({tail})"
        )


def _preview(text: str, limit: int = 60) -> str:
    return repr(text[:limit] + ("…" if len(text) > limit else "")) if text else "nothing"


@dataclass
class Divergence:
    agent_id: str
    line: int
    source: str
    token_index: int
    reason: str
    query_text: str
    source_text: str | None


# Prefill time a reused 16-token block saves, measured on an H200 (bf16) at 2k-16k-token prompts.
PREFILL_MS_PER_BLOCK = {"qwen3-8b": 0.5, "qwen3-0.6b": 0.1}


@dataclass
class TraceAnalysis:
    block_size: int
    ms_per_block: float = PREFILL_MS_PER_BLOCK["qwen3-8b"]
    agents: dict[str, AgentTotals] = field(default_factory=dict)
    # (agent, source agent) -> tokens of agent's requests reusable from source's prompts
    pair_exact: dict[tuple[str, str], int] = field(default_factory=dict)
    pair_moved: dict[tuple[str, str], int] = field(default_factory=dict)
    divergences: list[Divergence] = field(default_factory=list)
    fixes: list[Advice] = field(default_factory=list)  # ranked by tokens gained, best first
    min_gain_tokens: int = 64  # fixes gaining less over the trace are folded into a count
    extensions: int = 0  # requests that only extend an earlier prompt (conversation growth)
    tenant_without_salt: int = 0  # requests with a ``tenant`` but no ``cache_salt``
    forgotten: int = 0  # requests dropped from the replay cache to bound memory
    per_request: list[tuple[int, str, int, int, int]] = field(default_factory=list)

    @property
    def shown_fixes(self) -> list[Advice]:
        return [f for f in self.fixes if f.gain_tokens >= self.min_gain_tokens]

    @property
    def rounds(self) -> int:
        """Rounds of the pipeline: the most requests any one agent sent."""
        return max((a.requests for a in self.agents.values()), default=0)

    @property
    def advice(self) -> list[str]:
        """The ranked advice, one line per distinct change."""
        return [f.text() for f in self.shown_fixes]

    def summary(self) -> str:
        """One line over the advice: how much the listed changes would reuse."""
        shown = self.shown_fixes
        if not self.fixes:
            return "no layout change would add prefix reuse"
        gain = sum(f.gain_tokens for f in shown)
        ms = self.saved_ms(gain) / max(1, self.rounds)
        line = (
            f"{len(shown)} change{'s' if len(shown) != 1 else ''} would reuse +{gain:,} tokens, "
            f"~{ms:,.1f} ms of prefill per round ({self.rounds} rounds)"
        )
        folded = len(self.fixes) - len(shown)
        if folded:
            small = sum(f.gain_tokens for f in self.fixes) - gain
            line += (
                f"; {folded} smaller change{'s' if folded != 1 else ''} "
                f"(+{small:,} tokens, each under {self.min_gain_tokens:,}) not listed"
            )
        return line

    def notes(self) -> list[str]:
        out = []
        if self.tenant_without_salt:
            out.append(
                f"{self.tenant_without_salt} request(s) carry a 'tenant' but no 'cache_salt': "
                "vLLM shares their blocks with every other request (set cache_salt per tenant "
                "to isolate them); analyzed as shared"
            )
        if self.extensions:
            out.append(
                f"{self.extensions} request(s) only extend an earlier prompt (conversation "
                "growth): not counted as breaks"
            )
        return out

    def saved_ms(self, exact_tokens: int) -> float:
        """Estimated prefill time the engine's prefix cache saves for ``exact_tokens``
        (the per-block cost is quoted per 16 tokens, whatever the block size)."""
        return exact_tokens / 16 * self.ms_per_block

    def to_json(self) -> dict[str, Any]:
        pairs = sorted(set(self.pair_exact) | set(self.pair_moved))
        return {
            "block_size": self.block_size,
            "ms_per_block": self.ms_per_block,
            "agents": {
                a: {
                    "requests": t.requests,
                    "prompt_tokens": t.prompt_tokens,
                    "exact_tokens": t.exact_tokens,
                    "moved_tokens": t.moved_tokens,
                    "near_tokens": t.near_tokens,
                    "prefill_saved_ms": round(self.saved_ms(t.exact_tokens), 3),
                }
                for a, t in sorted(self.agents.items())
            },
            "pairs": [
                {
                    "agent": a,
                    "source": b,
                    "exact_tokens": self.pair_exact.get((a, b), 0),
                    "moved_tokens": self.pair_moved.get((a, b), 0),
                }
                for a, b in pairs
            ],
            "divergences": [vars(d) for d in self.divergences],
            "advice": self.advice,
            "advice_summary": self.summary(),
            "fixes": [
                {
                    "prompts": [{"agent": a, "text": t} for a, t in f.prompts],
                    "token": f.token,
                    "shared_tokens": f.shared_tokens,
                    "gain_tokens": f.gain_tokens,
                    "requests": f.requests,
                    "partners": sorted(f.partners),
                    "first_line": f.first_line,
                    "prefill_saved_ms": round(self.saved_ms(f.gain_tokens), 3),
                }
                for f in self.fixes
            ],
            "folded_fixes": len(self.fixes) - len(self.shown_fixes),
            "min_gain_tokens": self.min_gain_tokens,
            "extensions": self.extensions,
            "tenant_without_salt": self.tenant_without_salt,
            "notes": self.notes(),
            "forgotten_requests": self.forgotten,
            "requests": [
                {"line": ln, "agent": a, "prompt_tokens": n, "exact_tokens": e, "moved_tokens": m}
                for ln, a, n, e, m in self.per_request
            ],
        }


def _agent_of(owner: str) -> str:
    return owner.rsplit("#", 1)[0]


def analyze(
    requests: Iterable[TraceRequest],
    matcher: SyncMatcher,
    *,
    progress: Any = None,
    ms_per_block: float = PREFILL_MS_PER_BLOCK["qwen3-8b"],
    max_blocks: int = 2_000_000,
    min_gain_tokens: int = 64,
) -> TraceAnalysis:
    """Replay ``requests`` through ``matcher`` (which should start empty). ``ms_per_block`` is
    the prefill time one reused 16-token block saves on the target engine; past ``max_blocks``
    distinct blocks the oldest requests are forgotten (bounded memory); layout changes that
    gain fewer than ``min_gain_tokens`` tokens over the whole trace are folded into a count."""
    bs = matcher.block_size
    out = TraceAnalysis(bs, ms_per_block, min_gain_tokens=min_gain_tokens)
    fixes: dict[frozenset[tuple[str, str]], Advice] = {}
    held: deque[str] = deque()  # owners, oldest first
    for n, req in enumerate(requests):
        if req.tenant is not None and req.cache_salt is None:
            out.tenant_without_salt += 1
        tp, seq = matcher.prepare(
            req.prompt, cache_salt=req.cache_salt, tools=req.tools, chat=req.chat
        )
        # one cache, as one vLLM engine has: only the salt (in the block hashes) separates
        report: MatchReport = matcher.match_blocks(tp, seq, cache_salt=req.cache_salt)
        tot = out.agents.setdefault(req.agent_id, AgentTotals())
        tot.requests += 1
        tot.prompt_tokens += seq.num_tokens
        exact = report.engine_cached_tokens  # what vLLM skips (never the last token)
        moved = report.moved_tokens
        tot.exact_tokens += exact
        tot.moved_tokens += moved
        tot.near_tokens += report.near_blocks * bs
        _collect_fixes(fixes, req, report)
        out.per_request.append((req.line, req.agent_id, seq.num_tokens, exact, moved))
        _credit_pairs(out, req.agent_id, report)
        d = report.divergence
        if d is not None and report.best_owner is not None:
            if d.owner_text is None:
                # the best earlier prompt ends where this one goes on: conversation growth
                out.extensions += 1
            else:
                out.divergences.append(
                    Divergence(
                        req.agent_id,
                        req.line,
                        _agent_of(report.best_owner),
                        d.token_index,
                        d.reason.replace(report.best_owner, _agent_of(report.best_owner)),
                        d.query_text,
                        d.owner_text,
                    )
                )
        # every request stays visible to later ones, as in an engine with unlimited cache
        owner = f"{req.agent_id}#{n}"
        matcher.index_blocks(owner, seq, cache_salt=req.cache_salt)
        held.append(owner)
        while len(held) > 1 and matcher.index.num_blocks() > max_blocks:
            matcher.clear_agent(held.popleft())
            out.forgotten += 1
        if progress is not None:
            progress()
    out.fixes = sorted(fixes.values(), key=lambda f: (-f.gain_tokens, f.first_line, f.prompts))
    return out


def _collect_fixes(
    fixes: dict[frozenset[tuple[str, str]], Advice], req: TraceRequest, report: MatchReport
) -> None:
    """Merge one request's fixes into the trace's: one entry per prompt text to move. Within
    a request a change counts once, with its best gain (moving the text once helps every
    partner)."""
    best: dict[frozenset[tuple[str, str]], int] = {}
    for fix in report.fixes:
        src = _agent_of(fix.owner)
        if fix.holder == "query":
            prompts: tuple[tuple[str, str], ...] = ((req.agent_id, fix.breaking_text),)
        elif fix.holder == "owner":
            prompts = ((src, fix.owner_text),)
        else:
            prompts = tuple(sorted({(req.agent_id, fix.breaking_text), (src, fix.owner_text)}))
        key = frozenset(prompts)
        adv = fixes.get(key)
        if adv is None:
            adv = fixes[key] = Advice(prompts, fix.break_token, 0, first_line=req.line)
        adv.shared_tokens = max(adv.shared_tokens, fix.shared_tokens)
        adv.partners.add(src if fix.holder != "owner" else req.agent_id)
        best[key] = max(best.get(key, 0), fix.gain_tokens)
    for key, gain in best.items():
        fixes[key].gain_tokens += gain
        fixes[key].requests += 1


def _credit_pairs(out: TraceAnalysis, agent: str, report: MatchReport) -> None:
    """Exact blocks credit every source agent holding them; moved tokens (moved blocks and
    spans, past the exact prefix) credit one source each — the longest span's first, then a
    moved block's first owner — so each pair's moved tokens add up to the request's."""
    bs = report.block_size
    skip = report.engine_skip_blocks  # exact blocks the engine really skips
    for b in report.blocks:
        if b.kind != "exact" or b.index >= skip:
            continue
        for src in {_agent_of(o) for o in b.owners}:
            out.pair_exact[(agent, src)] = out.pair_exact.get((agent, src), 0) + bs
    if not report.moved_tokens:
        return
    source = np.full(report.num_tokens, -1, dtype=np.int32)
    names: list[str] = []
    ids: dict[str, int] = {}

    def claim(start: int, end: int, owner: str) -> None:
        src = _agent_of(owner)
        k = ids.setdefault(src, len(names))
        if k == len(names):
            names.append(src)
        part = source[start:end]
        part[part < 0] = k

    for sp in report.moved_spans:  # longest first
        claim(sp.query_start, sp.query_start + sp.length, sp.owner)
    for b in report.blocks:
        if b.kind == "moved" and b.owners:
            claim(b.start, b.start + bs, min(b.owners))
    source[: report.exact_blocks * bs] = -1
    counts = np.bincount(source[source >= 0], minlength=len(names))
    for k, src in enumerate(names):
        if counts[k]:
            key = (agent, src)
            out.pair_moved[key] = out.pair_moved.get(key, 0) + int(counts[k])
