"""kvforge analyze on the shipped example: numbers recomputed independently from token lists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kvforge import PromptTokenizer
from kvforge.analyze import read_trace

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipeline.jsonl"


def test_exact_tokens_equal_an_unlimited_prefix_cache() -> None:
    tk = PromptTokenizer.qwen3()
    reqs = read_trace(EXAMPLE)
    seen: dict[str | None, list[tuple[int, ...]]] = {}
    want: dict[str, dict[str, int]] = {}
    for r in reqs:
        ids = tk.tokenize(r.prompt, tools=r.tools).token_ids
        best = 0
        for prev in seen.get(r.tenant, []):
            n = 0
            while (n + 1) * 16 <= min(len(prev), len(ids)) and prev[: (n + 1) * 16] == ids[
                : (n + 1) * 16
            ]:
                n += 1
            best = max(best, n)
        a = want.setdefault(r.agent_id, {"requests": 0, "prompt_tokens": 0, "exact_tokens": 0})
        a["requests"] += 1
        a["prompt_tokens"] += len(ids)
        a["exact_tokens"] += best * 16
        seen.setdefault(r.tenant, []).append(ids)
    cmd = [sys.executable, "-m", "kvforge.cli.main", "analyze", str(EXAMPLE), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    for agent, w in want.items():
        got = doc["agents"][agent]
        assert {k: got[k] for k in w} == w
        assert got["moved_tokens"] + got["exact_tokens"] <= got["prompt_tokens"]
        assert "near_tokens" in got
        assert got["prefill_saved_ms"] == round(w["exact_tokens"] / 16 * 0.5, 3)
    assert isinstance(doc["pairs"], list) and isinstance(doc["advice"], list)
    assert any("put it after them" in a for a in doc["advice"])
    assert len(doc["advice"]) == len(set(doc["advice"]))


def test_analyze_rejects_bad_traces(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"agent_id": "a"}\n')
    out = subprocess.run([sys.executable, "-m", "kvforge.cli.main", "analyze", str(bad)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and "exactly one of" in out.stderr


def test_html_report_is_self_contained_and_has_the_plots(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    cmd = [sys.executable, "-m", "kvforge.cli.main", "analyze", str(EXAMPLE), "--html", str(page)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    html = page.read_text()
    assert (
        html.startswith("<!doctype html>")
        and "<script" not in html
        and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    assert (
        html.count('class="bars"')
        == html.count('class="heatmap"')
        == html.count('class="timeline"')
        == 1
    )
    agents = {r.agent_id for r in read_trace(EXAMPLE)}
    assert html.count('class="cell"') == len(agents) ** 2  # the pairwise heatmap
    assert 'class="exact"' in html and "put it after them" in html


def test_bounded_memory_forgets_the_oldest_requests() -> None:
    from kvforge import SyncMatcher
    from kvforge.analyze import TraceRequest, analyze
    from kvforge.sim import multi_agent_trace

    trace = multi_agent_trace(pipelines=6, system_tokens=256, doc_tokens=512, turn_tokens=64)
    reqs = [TraceRequest(i, r["agent_id"], r["token_ids"]) for i, r in enumerate(trace)]
    unlimited = analyze(reqs, SyncMatcher())
    peak = 0
    m = SyncMatcher()

    def watch() -> None:
        nonlocal peak
        peak = max(peak, m.index.num_blocks())

    bounded = analyze(reqs, m, max_blocks=300, progress=watch)
    assert bounded.forgotten > 0 and unlimited.forgotten == 0
    longest = max(len(r.prompt) for r in reqs) // 16
    assert peak <= 300 + longest
    exact = lambda res: sum(a.exact_tokens for a in res.agents.values())  # noqa: E731
    assert 0 < exact(bounded) <= exact(unlimited)
