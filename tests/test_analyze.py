"""kvforge analyze on the shipped example: numbers recomputed independently from token lists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from kvforge import PromptTokenizer
from kvforge.analyze import read_trace

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipeline.jsonl"


def test_exact_tokens_equal_an_unlimited_prefix_cache() -> None:
    tk = PromptTokenizer.qwen3()
    reqs = read_trace(EXAMPLE)
    # vLLM's rule: blocks are shared unless cache_salt differs (a tenant field isolates nothing)
    seen: dict[str | None, list[tuple[int, ...]]] = {}
    want: dict[str, dict[str, int]] = {}
    for r in reqs:
        ids = tk.tokenize(r.prompt, tools=r.tools).token_ids
        best = 0
        for prev in seen.get(r.cache_salt, []):
            n = 0
            while (n + 1) * 16 <= min(len(prev), len(ids)) and prev[: (n + 1) * 16] == ids[
                : (n + 1) * 16
            ]:
                n += 1
            best = max(best, n)
        a = want.setdefault(r.agent_id, {"requests": 0, "prompt_tokens": 0, "exact_tokens": 0})
        a["requests"] += 1
        a["prompt_tokens"] += len(ids)
        a["exact_tokens"] += min(best, (len(ids) - 1) // 16) * 16  # vLLM's last-token rule
        seen.setdefault(r.cache_salt, []).append(ids)
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
    assert doc["tenant_without_salt"] == sum(
        1 for r in reqs if r.tenant is not None and r.cache_salt is None
    ) > 0 and any("cache_salt" in n for n in doc["notes"])
    # moved tokens are credited to their sources: per agent, the pairs add up to the total
    for agent, got in doc["agents"].items():
        pairs = [p for p in doc["pairs"] if p["agent"] == agent]
        assert sum(p["moved_tokens"] for p in pairs) == got["moved_tokens"]
        assert sum(p["exact_tokens"] for p in pairs) >= got["exact_tokens"]


def test_analyze_rejects_bad_traces(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"agent_id": "a"}\n')
    out = subprocess.run(
        [sys.executable, "-m", "kvforge.cli.main", "analyze", str(bad)],
        capture_output=True,
        text=True,
    )
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


def _tr(agent: str, ids: list[int], line: int, **kw: object) -> object:
    from kvforge.analyze import TraceRequest

    return TraceRequest(line, agent, ids, **kw)  # type: ignore[arg-type]


def _ids(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(1000, 100_000, n).tolist()


def test_advice_names_the_prompt_that_holds_the_breaking_text() -> None:
    """The extra text may be in the other agent's prompt: the advice must say so, and show it."""
    from kvforge import SyncMatcher

    rng = np.random.default_rng(1)
    tk = PromptTokenizer.qwen3()
    system, extra, doc = _ids(rng, 64), _ids(rng, 20), _ids(rng, 320)
    m = SyncMatcher()
    m.index_prompt("planner", system + extra + doc)
    (fix,) = m.find_reusable_blocks(system + doc).fixes
    assert fix.holder == "owner" and fix.owner == "planner" and fix.breaking_text == ""
    assert fix.owner_text == tk.decode(extra) and fix.owner_gap_tokens == 20
    assert fix.break_token == 64 and "planner's prompt has" in fix.advice
    # the owner's full blocks hold the doc up to its token 400; moving the extra text below it
    # makes the query's prefix exact up to the last full block of the shared part
    assert fix.shared_tokens == 400 - 84
    assert fix.gain_tokens == (64 + fix.shared_tokens) // 16 * 16 - 64

    m = SyncMatcher()
    m.index_prompt("coder", system + doc)
    (fix,) = m.find_reusable_blocks(system + extra + doc).fixes
    assert fix.holder == "query" and fix.breaking_text == tk.decode(extra)
    assert fix.owner_text == "" and fix.query_gap_tokens == 20

    m = SyncMatcher()  # each prompt has its own varying text at the same point
    m.index_prompt("critic", system + extra[:6] + doc)
    (fix,) = m.find_reusable_blocks(system + extra[6:14] + doc).fixes
    assert fix.holder == "both" and fix.owner_text == tk.decode(extra[:6])
    assert fix.breaking_text == tk.decode(extra[6:14]) and "in both prompts" in fix.advice


def test_advice_is_ranked_merged_and_summarized() -> None:
    from kvforge import SyncMatcher
    from kvforge.analyze import analyze

    rng = np.random.default_rng(2)
    system, doc, short = _ids(rng, 64), _ids(rng, 512), _ids(rng, 48)
    name = {a: _ids(rng, 6) for a in ("planner", "coder", "critic", "judge")}
    reqs = [
        _tr("planner", system + name["planner"] + doc, 1),
        # two agents whose clean prompts break against planner's: one change (planner's)
        _tr("coder", system + doc[:256] + _ids(rng, 40), 2),
        _tr("critic", system + doc + _ids(rng, 40), 3),
        # a small gain (48 tokens) below the threshold: folded into a count
        _tr("judge", system + name["judge"] + short, 4),
        _tr("writer", system + short + _ids(rng, 30), 5),
    ]
    res = analyze(reqs, SyncMatcher(), min_gain_tokens=64)
    gains = [f.gain_tokens for f in res.fixes]
    assert gains == sorted(gains, reverse=True)
    top = res.fixes[0]
    assert top.prompts == (
        ("planner", __import__("kvforge").PromptTokenizer.qwen3().decode(name["planner"])),
    )
    # coder gains doc[:256] (its prefix stops at the system prompt); critic already reuses
    # coder's prompt up to token 320, and gains the rest of planner's full blocks
    assert top.partners == {"coder", "critic"} and top.requests == 2
    assert top.gain_tokens == 256 + ((64 + (576 - 70)) // 16 * 16 - 320)
    assert (
        len(res.advice)
        == len(res.shown_fixes)
        == len({tuple(f.prompts) for f in res.fixes if f.gain_tokens >= 64})
    )
    small = [f for f in res.fixes if f.gain_tokens < 64]
    assert small and all(f not in res.shown_fixes for f in small)
    summary = res.summary()
    shown = sum(f.gain_tokens for f in res.shown_fixes)
    assert summary.startswith(f"{len(res.shown_fixes)} change") and f"+{shown:,} tokens" in summary
    assert f"{len(small)} smaller change" in summary
    assert res.advice[0].startswith("planner's prompt:")
    # threshold 0: nothing folded
    assert len(analyze(reqs, SyncMatcher(), min_gain_tokens=0).advice) == len(res.fixes)


def test_conversation_growth_is_not_a_break() -> None:
    from kvforge import SyncMatcher
    from kvforge.analyze import analyze

    rng = np.random.default_rng(3)
    turns, ids = [], _ids(rng, 300)
    for k in range(5):
        turns.append(_tr("planner", list(ids), k + 1))
        ids += _ids(rng, int(rng.integers(20, 90)))  # the reply and the next user message
    res = analyze(turns, SyncMatcher())
    assert res.divergences == [] and res.extensions == 4 and res.fixes == []
    assert any("conversation growth" in n for n in res.notes())
    # a real break still is one
    turns.append(_tr("planner", ids[:100] + [7] * 50 + ids[100:], 6))
    res = analyze(turns, SyncMatcher())
    assert len(res.divergences) == 1 and res.divergences[0].line == 6


def test_analyze_and_simulate_agree_on_tenants(tmp_path: Path) -> None:
    """Only cache_salt separates blocks, in both commands (as in vLLM)."""
    rng = np.random.default_rng(4)
    prompt = _ids(rng, 400)
    lines = [
        {"agent_id": "a", "token_ids": prompt, "tenant": "t1", "t": 0},
        {"agent_id": "b", "token_ids": prompt, "tenant": "t2", "t": 1},
        {"agent_id": "c", "token_ids": prompt, "tenant": "t3", "cache_salt": "s3", "t": 2},
    ]
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "kvforge.cli.main", *a, str(trace), "--json"],
        capture_output=True,
        text=True,
    )
    doc = json.loads(run("analyze").stdout)
    # shared across tenants (all 25 blocks; vLLM skips 24: the last token is recomputed)
    assert doc["agents"]["b"]["exact_tokens"] == 399 // 16 * 16
    assert doc["agents"]["c"]["exact_tokens"] == 0  # its own salt
    assert doc["tenant_without_salt"] == 2
    sim = json.loads(run("simulate", "--engines", "1", "--policy", "prefix").stdout)
    row = sim["policies"]["prefix"]
    # one engine: b's blocks come from a's (as in analyze; vLLM recomputes at most the last
    # block of a fully cached prompt), c's are all computed again
    assert 800 <= row["prefill_tokens"] <= 800 + 16, row


def test_html_report_into_a_missing_folder_and_an_unwritable_one(tmp_path: Path) -> None:
    page = tmp_path / "new" / "deeper" / "report.html"
    cmd = [sys.executable, "-m", "kvforge.cli.main", "analyze", str(EXAMPLE), "--html"]
    out = subprocess.run([*cmd, str(page)], capture_output=True, text=True)
    assert out.returncode == 0 and page.is_file(), out.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = subprocess.run([*cmd, str(blocker / "r.html")], capture_output=True, text=True)
    assert out.returncode == 2 and "cannot write the HTML report" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_charts_carry_scales_labels_and_numbers() -> None:
    """What a printed page needs: axis ticks and titles, a label per request, the heatmap's
    numbers in the cells and a colour scale."""
    import re

    from kvforge import SyncMatcher
    from kvforge.analyze import analyze
    from kvforge.analyze.html import _compact, render_html

    reqs = read_trace(EXAMPLE)
    res = analyze(reqs, SyncMatcher())
    page = render_html(res)
    bars = page[page.index('<svg class="bars"') : page.index("</svg>", page.index('class="bars"'))]
    assert bars.count('class="tick"') >= 3 and "prompt tokens" in bars
    heat = page[page.index('<svg class="heatmap"') :]
    heat = heat[: heat.index("</svg>")]
    values = re.findall(r'class="cell-value"[^>]*>([^<]+)<', heat)
    agents = sorted(res.agents)
    assert values == [_compact(res.pair_exact.get((a, b), 0)) for a in agents for b in agents]
    assert "exact tokens" in heat and "agent (reusing)" in heat and "source agent" in heat
    tl = page[page.index('<svg class="timeline"') :]
    tl = tl[: tl.index("</svg>")]
    labels = re.findall(r'class="req-label"[^>]*>([^<]+)<', tl)
    assert labels == [f"{r.line} {r.agent_id}" for r in reqs]
    assert all(f">{p}%<" in tl for p in (0, 50, 100))


def test_openai_request_body_logs_are_traces(tmp_path: Path) -> None:
    """One chat/completions body per line, as a gateway logs them: the agent from ``user``,
    the render options honoured, unknown fields ignored."""
    from kvforge.tokenize import ChatOptions

    tk = PromptTokenizer.qwen3()
    system = {"role": "system", "content": "You review code. " * 80}
    bodies = [
        {
            "model": "qwen3",
            "user": "critic",
            "timestamp": 1.5,
            "temperature": 0.2,
            "messages": [system, {"role": "user", "content": "Review diff 1."}],
            "chat_template_kwargs": {"enable_thinking": False},
        },
        {
            "model": "qwen3",
            "user": "critic",
            "stream": True,
            "messages": [system, {"role": "user", "content": "Review diff 2."}],
            "chat_template_kwargs": {"enable_thinking": False},
        },
        {"model": "qwen3", "prompt": ["Summarize the review.", "ignored second prompt"]},
    ]
    trace = tmp_path / "bodies.jsonl"
    trace.write_text("".join(json.dumps(b) + "\n" for b in bodies))
    reqs = read_trace(trace)
    assert [r.agent_id for r in reqs] == ["critic", "critic", "default"]
    assert reqs[0].t == 1.5 and reqs[2].prompt == "Summarize the review."
    assert reqs[0].chat == ChatOptions(chat_template_kwargs={"enable_thinking": False})
    out = subprocess.run(
        [sys.executable, "-m", "kvforge.cli.main", "analyze", str(trace), "--json"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    want = sum(len(tk.encode_chat(b["messages"], chat=reqs[0].chat)) for b in bodies[:2])
    assert doc["agents"]["critic"]["prompt_tokens"] == want
    assert doc["agents"]["critic"]["exact_tokens"] > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**bodies[0], "continue_final_message": True}) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "kvforge.cli.main", "analyze", str(bad)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "bad.jsonl:1" in out.stderr and "cannot both" in out.stderr


def test_mooncake_export_shares_exactly_what_vllm_shares(tmp_path: Path) -> None:
    """hash_ids agree with the token lists: two requests share their first k ids exactly when
    their first k blocks (the last one possibly partial) hold identical tokens and the same
    salt; ids are numbered in order of first appearance."""
    tk = PromptTokenizer.qwen3()
    rng = np.random.default_rng(9)
    base = _ids(rng, 300)
    lines = [
        {"agent_id": "a", "token_ids": base, "t": 10.0, "max_tokens": 7},
        {"agent_id": "b", "token_ids": base[:200] + _ids(rng, 50), "t": 10.25},
        {"agent_id": "c", "token_ids": base, "cache_salt": "s1", "t": 11},
        {"agent_id": "d", "token_ids": base},
    ]
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "deep" / "mooncake.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "kvforge.cli.main",
        "export-trace",
        str(trace),
        "--block-size",
        "64",
        "-o",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["timestamp"] for x in recs] == [0, 250, 1000, 0]
    assert [x["output_length"] for x in recs] == [7, 1, 1, 1]
    assert [x["input_length"] for x in recs] == [300, 250, 300, 300]
    seen: list[int] = []
    for x in recs:
        assert len(x["hash_ids"]) == -(-x["input_length"] // 64)
        seen += [i for i in x["hash_ids"] if i not in seen]
    assert seen == list(range(len(seen)))  # consecutive, in order of first appearance

    def shared(i: int, j: int) -> int:
        a, b = recs[i]["hash_ids"], recs[j]["hash_ids"]
        return next(
            (k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )

    toks = [list(tk.tokenize(x["token_ids"]).token_ids) for x in lines]
    for i in range(4):
        for j in range(i + 1, 4):
            same_salt = lines[i].get("cache_salt") == lines[j].get("cache_salt")
            k = 0
            while same_salt and k * 64 < min(len(toks[i]), len(toks[j])):
                if toks[i][k * 64 : (k + 1) * 64] != toks[j][k * 64 : (k + 1) * 64]:
                    break
                k += 1
            assert shared(i, j) == k, (i, j)
    assert recs[0]["hash_ids"] == recs[3]["hash_ids"]  # the partial last block too
