"""The public API: async/sync parity, bad input, the CLI contract."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from kvforge import InvalidInputError, Matcher, QuotaExceededError, SyncMatcher
from kvforge.blocks import BlockHasher


@pytest.fixture
def m() -> SyncMatcher:
    return SyncMatcher(max_prompt_chars=10_000, max_prompt_tokens=2_000)


def test_async_matcher_same_answers() -> None:
    async def run() -> None:
        am = Matcher(block_size=16, hash_algo="sha256", hash_seed=None, tokenizer=None)
        sm = SyncMatcher()
        prompt = "Shared tool schema: search(query), fetch(url). " * 20
        await am.index_prompt("a", prompt)
        sm.index_prompt("a", prompt)
        ra, _ = await asyncio.gather(am.find_reusable_blocks(prompt + " more"), asyncio.sleep(0))
        assert ra == sm.find_reusable_blocks(prompt + " more")
        assert await am.get_shared_prefix_hash(prompt) == sm.get_shared_prefix_hash(prompt)
        results = await asyncio.gather(*(am.index_prompt(f"x{i}", prompt) for i in range(8)))
        assert all(r.shared_blocks == r.num_blocks for r in results)
        assert (await am.stats())["agents"] == 9
        assert await am.clear_agent("a") == ra.num_blocks

    asyncio.run(run())


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.index_prompt("", "x"), "agent_id"),
        (lambda m: m.index_prompt(None, "x"), "agent_id"),
        (lambda m: m.index_prompt("a", 42), "prompt must be"),
        (lambda m: m.index_prompt("a", "x" * 10_001), "limit is 10,000"),
        (lambda m: m.index_prompt("a", list(range(2_001))), "limit is 2,000"),
        (lambda m: m.index_prompt("a", [1, "2"]), "integers"),
        (lambda m: m.index_prompt("a", "x", cache_salt="a/b"), "cache_salt"),
        (lambda m: m.index_prompt("a", "x", cache_salt=""), "cache_salt"),
        (lambda m: m.index_prompt("a", "x", lora=("name", "")), "lora"),
        (lambda m: m.index_prompt("a", "x", tenant=""), "tenant"),
        (lambda m: m.find_reusable_blocks("x", exclude_agent=""), "agent_id"),
        (lambda m: m.index_prompt("a", "x", tools=[{"type": "function"}]), "tools"),
    ],
)
def test_bad_input_is_rejected_and_changes_nothing(m: SyncMatcher, call, match: str) -> None:
    m.index_prompt("keep", list(range(64)))
    before = m.stats()
    with pytest.raises(InvalidInputError, match=match):
        call(m)
    assert m.stats() == before
    assert m.find_reusable_blocks(list(range(64))).prefix_blocks_by_owner == {"keep": 4}


def test_unknown_algorithm_and_block_size() -> None:
    with pytest.raises(InvalidInputError, match="unknown hash algorithm"):
        SyncMatcher(hash_algo="md5")
    with pytest.raises(InvalidInputError, match="block_size"):
        SyncMatcher(block_size=0)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvforge.cli.main", *args], capture_output=True, text=True
    )


def test_cli_hash_json_contract(tmp_path) -> None:
    text = "The critic reviews the plan against the tool schema. " * 6
    out = _cli("hash", "--text", text, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    m = SyncMatcher()
    tp = m.tokenize(text)
    chain = BlockHasher().chain(tp.token_ids)
    assert doc["num_tokens"] == len(tp)
    assert [b["hash_hex"] for b in doc["blocks"]] == [h.hex() for h in chain]
    assert [b["event_hash"] for b in doc["blocks"]] == [
        int.from_bytes(h[-8:], "big") for h in chain
    ]
    assert [b["start"] for b in doc["blocks"]] == [16 * i for i in range(len(chain))]
    assert (
        "".join(b["text"] for b in doc["blocks"])
        == text[: len("".join(b["text"] for b in doc["blocks"]))]
    )
    assert set(doc) == {"num_tokens", "blocks"}
    assert all(
        set(b) == {"index", "start", "hash_hex", "event_hash", "text"} for b in doc["blocks"]
    )


def test_cli_hash_options_match_golden(tmp_path) -> None:
    golden = json.loads(
        (
            __import__("pathlib").Path(__file__).parent / "data" / "vllm_block_hashes.json"
        ).read_text()
    )
    case = next(
        c
        for c in golden["cases"]
        if c["name"] == "lora_and_cache_salt_bs16" and c["algo"] == "xxhash_cbor"
    )
    f = tmp_path / "ids.json"
    f.write_text(json.dumps(case["all_token_ids"]))
    out = _cli(
        "hash",
        "--token-ids",
        str(f),
        "--algo",
        "xxhash_cbor",
        "--hash-seed",
        "0",
        "--cache-salt",
        "tenant-42",
        "--lora-name",
        "agent-lora",
        "--lora-path",
        "/adapters/agent-lora",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    assert [b["hash_hex"] for b in json.loads(out.stdout)["blocks"]] == [
        b["hash_hex"] for b in case["blocks"]
    ]


def test_cli_messages_and_errors(tmp_path) -> None:
    f = tmp_path / "chat.json"
    msgs = [{"role": "system", "content": "You plan. " * 20}, {"role": "user", "content": "go"}]
    f.write_text(json.dumps({"messages": msgs}))
    out = _cli("hash", "--messages", str(f), "--json")
    assert out.returncode == 0, out.stderr
    tp = SyncMatcher().tokenize(msgs)
    assert json.loads(out.stdout)["num_tokens"] == len(tp)
    table = _cli("hash", "--messages", str(f))
    assert table.returncode == 0 and "full blocks of 16" in table.stdout
    for bad in (
        ["hash"],
        ["hash", "--text", "x", "--algo", "md5"],
        ["hash", "--token-ids", "[1, 2"],
        ["hash", "--text", "x", "--lora-name", "n"],
    ):
        r = _cli(*bad)
        assert r.returncode == 2 and "error" in r.stderr.lower(), (bad, r.stderr)


def test_agent_and_tenant_bounds(index_url) -> None:
    m = SyncMatcher(index=index_url(), max_agents_per_tenant=2, max_tenants=2)
    toks = list(range(64))
    m.index_prompt("a", toks)
    m.index_prompt("b", toks)
    m.index_prompt("a", toks + toks)  # re-indexing an agent adds none
    with pytest.raises(QuotaExceededError, match="limit is 2"):
        m.index_prompt("c", toks)
    assert m.agents() == ["a", "b"]  # the refused call changed nothing
    m.index_prompt("x", toks, tenant="t2")
    with pytest.raises(QuotaExceededError, match="tenants"):
        m.index_prompt("x", toks, tenant="t3")
    m.clear_agent("b")
    m.index_prompt("c", toks)
    assert m.agents() == ["a", "c"]
