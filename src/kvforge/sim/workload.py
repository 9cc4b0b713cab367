"""A synthetic multi-agent workload with the sharing structure of real pipelines.

``pipelines`` independent pipelines run concurrently; each has agents (planner, coder, critic,
judge) that all start with one global system prompt and tool schema, then their role, then the
pipeline's own retrieved document, then a conversation that grows turn by turn. Requests of
different pipelines interleave in time, so engines see cache pressure.
"""

from __future__ import annotations

import random
from typing import Any

VOCAB = 151_643


def multi_agent_trace(
    *,
    pipelines: int = 16,
    agents: tuple[str, ...] = ("planner", "coder", "critic", "judge"),
    turns: int = 3,
    system_tokens: int = 1_024,
    role_tokens: int = 48,
    doc_tokens: int = 2_048,
    turn_tokens: int = 256,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """JSON-ready requests ``{agent_id, session_id, token_ids, t}`` sorted by ``t``."""
    rnd = random.Random(seed)

    def toks(n: int) -> list[int]:
        return [rnd.randrange(VOCAB) for _ in range(n)]

    system = toks(system_tokens)
    roles = {a: toks(role_tokens) for a in agents}
    out: list[dict[str, Any]] = []
    for p in range(pipelines):
        doc = toks(doc_tokens)
        history: dict[str, list[int]] = {a: [] for a in agents}
        start = rnd.uniform(0, pipelines * 0.5)
        for turn in range(turns):
            for k, a in enumerate(agents):
                history[a] += toks(turn_tokens)
                out.append(
                    {
                        "agent_id": f"{a}",
                        "session_id": f"p{p}",
                        "token_ids": system + roles[a] + doc + history[a],
                        "t": round(start + turn * 3.0 + k * 0.4 + rnd.uniform(0, 0.2), 4),
                    }
                )
    out.sort(key=lambda r: r["t"])
    return out
