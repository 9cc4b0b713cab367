"""`kvforge doctor` against engine stand-ins that answer vLLM's /tokenize and publish real KV
events over ZMQ: agreement, and each kind of disagreement named for what it is."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import free_port, serve
from typer.testing import CliRunner

from kvforge import PromptTokenizer
from kvforge.blocks import BlockHasher
from kvforge.cli.main import app
from kvforge.events.publisher import EventPublisher
from kvforge.sim import SimEngine
from kvforge.sim.standin import standin_app
from kvforge.tokenize import ChatTemplate

runner = CliRunner()


@contextmanager
def engine(
    hasher: BlockHasher | None = None, tokenizer: PromptTokenizer | None = None
) -> Iterator[tuple[str, str]]:
    hasher = hasher or BlockHasher()
    pub = EventPublisher("tcp://127.0.0.1:*", topic="kv")
    sim = SimEngine("e0", 4096, block_size=hasher.block_size, publisher=pub)
    try:
        with serve(standin_app(sim, hasher, tokenizer or PromptTokenizer.qwen3())) as url:
            yield url, pub.endpoint
    finally:
        pub.close()


def doctor(url: str, *args: str) -> tuple[int, dict]:
    out = runner.invoke(app, ["doctor", url, "--json", *args])
    return out.exit_code, json.loads(out.stdout) if out.stdout.strip() else {}


def failed(doc: dict) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in doc["checks"] if not c["ok"]}


def test_agreement_on_tokens_and_hashes() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "pipeline.jsonl"
    with engine() as (url, events):
        code, doc = doctor(url, "--events", events, "--topic", "kv", "--trace", str(example))
    assert code == 0 and doc["ok"] and doc["model"] == "standin", doc
    names = [c["name"] for c in doc["checks"]]
    assert "tokens: chat with tools" in names and names[-1] == "block hashes"
    assert "tokens: trace line 1 (planner)" in names
    assert "identical" in doc["checks"][-1]["detail"]


@pytest.mark.parametrize(
    ("engine_hasher", "args", "why"),
    [
        (BlockHasher("xxhash", hash_seed="0"), ["--hash-seed", "0"], "hashes with xxhash"),
        (BlockHasher(hash_seed="7"), [], "hash seed differs"),
        (BlockHasher(block_size=32), [], "--block-size 32"),
    ],
)
def test_hash_mismatches_are_named(engine_hasher: BlockHasher, args: list[str], why: str) -> None:
    with engine(engine_hasher) as (url, events):
        code, doc = doctor(url, "--events", events, "--topic", "kv", *args)
    bad = failed(doc)
    assert code == 1 and list(bad) == ["block hashes"] and why in bad["block hashes"], doc


def test_a_different_chat_template_is_named() -> None:
    q = PromptTokenizer.qwen3()
    assert q.template is not None
    other = ChatTemplate(q.template.source.replace("# Tools", "## Tools"), q.template._special)
    with engine(tokenizer=PromptTokenizer(q._tk, other, "Qwen3-edited")) as (url, _):
        code, doc = doctor(url)
    bad = failed(doc)
    assert code == 1 and list(bad) == ["tokens: chat with tools"], doc
    assert "chat rendering differs" in bad["tokens: chat with tools"]


def test_an_unreachable_engine_is_one_clear_error() -> None:
    out = runner.invoke(app, ["doctor", f"http://127.0.0.1:{free_port()}"])
    assert out.exit_code == 2 and "cannot read the model name" in out.output
