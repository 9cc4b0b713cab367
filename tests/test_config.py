"""Configuration precedence (flags > environment > file > defaults); errors name the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvforge import InvalidInputError
from kvforge.config import load_config

FILE = """
[matcher]
block_size = 32
hash_seed = "0"

[service]
port = 9000
host = "0.0.0.0"

[[engines]]
name = "a"
url = "http://engine-a:8000"
events = "tcp://engine-a:5557"
loras = { sql = "/adapters/sql" }
"""


def test_precedence(tmp_path: Path) -> None:
    f = tmp_path / "kvforge.toml"
    f.write_text(FILE)
    cfg = load_config(f, env={})
    assert (cfg.matcher.block_size, cfg.matcher.hash_seed, cfg.service.port) == (32, "0", 9000)
    assert cfg.matcher.hash_algo == "sha256" and cfg.router.load_weight == 0.1  # defaults
    assert cfg.engines[0].name == "a" and cfg.engines[0].loras == {"sql": "/adapters/sql"}
    cfg = load_config(f, env={"KVFORGE_SERVICE_PORT": "9100", "KVFORGE_MATCHER_BLOCK_SIZE": "64"})
    assert (cfg.service.port, cfg.matcher.block_size) == (9100, 64)
    cfg = load_config(
        f, env={"KVFORGE_SERVICE_PORT": "9100"}, overrides={"service": {"port": 9200, "host": None}}
    )
    assert cfg.service.port == 9200 and cfg.service.host == "0.0.0.0"


@pytest.mark.parametrize(
    ("text", "env", "match"),
    [
        ("[service]\nport = 'abc'\n", {}, r"\[service\].port .* must be int"),
        ("[service]\nprot = 1\n", {}, r"unknown field \[service\].prot"),
        ("[servce]\n", {}, r"unknown section \[servce\]"),
        ("[[engines]]\nurl = 'x'\n", {}, r"engines\]\] #1 needs a non-empty 'name'"),
        ("[[engines]]\nname = 'a'\nurl2 = 'x'\n", {}, r"unknown fields \['url2'\]"),
        ("", {"KVFORGE_ROUTER_LOAD_WEIGHT": "heavy"}, r"\[router\].load_weight \(environment\)"),
        ("[matcher\n", {}, "not valid TOML"),
        ("[service]\nindex_url = 'mongodb://x'\n", {}, r"index_url must be memory:// or redis"),
        (
            "[service]\nindex_url = 'redis://r/0'\nsnapshot_path = '/x'\n",
            {},
            "snapshot_path persists the embedded index",
        ),
        ("", {"KVFORGE_MATCHER_MAX_TENANTS": "many"}, r"\[matcher\].max_tenants"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, text: str, env: dict, match: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(InvalidInputError, match=match):
        load_config(f, env=env)


def test_missing_file() -> None:
    with pytest.raises(InvalidInputError, match="file not found"):
        load_config("/nonexistent/kvforge.toml", env={})


def test_the_shipped_example_loads() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "kvforge.toml", env={})
    assert cfg.service.port == 8000 and cfg.engines == []


def test_router_privacy_switches(tmp_path: Path) -> None:
    from kvforge.serve.factory import build_app

    cfg = tmp_path / "k.toml"
    cfg.write_text('[router]\nexpose_decisions = true\ntenant_salt_env = "KVF_TEST_SALT"\n')
    c = load_config(cfg, env={})
    assert c.router.expose_decisions is True and c.router.tenant_salt_env == "KVF_TEST_SALT"
    off = load_config(None, env={"KVFORGE_ROUTER_EXPOSE_DECISIONS": "false"})
    assert off.router.expose_decisions is False
    assert load_config(None, env={}).router.expose_decisions is False  # private by default
    with pytest.raises(InvalidInputError, match="true or false"):
        load_config(None, env={"KVFORGE_ROUTER_EXPOSE_DECISIONS": "maybe"})
    # a configured secret that is missing stops the service before it serves anything
    with pytest.raises(InvalidInputError, match="KVF_TEST_SALT"):
        build_app(c)


def test_ttft_policy_and_tier_weight_from_the_config(tmp_path: Path) -> None:
    """policy = "ttft" prices queued work like uncached prefill (both in blocks); "prefix"
    lets a long cached prefix win over a queue."""
    from kvforge import PromptTokenizer
    from kvforge.blocks import BlockHasher, chain_keys
    from kvforge.serve.factory import build_router

    prompt = list(range(100, 100 + 16 * 10 + 1))
    chosen = {}
    for policy in ("ttft", "prefix"):
        cfg = tmp_path / f"{policy}.toml"
        cfg.write_text(
            f'[router]\npolicy = "{policy}"\ncpu_tier_weight = 0.5\n'
            '[[engines]]\nname = "e0"\n[[engines]]\nname = "e1"\n'
        )
        router = build_router(load_config(cfg, env={}), PromptTokenizer.qwen3())
        assert router is not None and router.residency.tier_weights["CPU"] == 0.5
        router.residency.store("e0", chain_keys(BlockHasher().chain(prompt)).tolist())
        # e0 holds the prompt's 10 blocks but has 50 blocks of prefill queued
        chosen[policy] = router.route_tokens(prompt, loads={"e0": 50.0}, speculate=False).engine
    assert chosen == {"ttft": "e1", "prefix": "e0"}
    with pytest.raises(InvalidInputError, match="prefix or ttft"):
        load_config(None, env={"KVFORGE_ROUTER_POLICY": "fastest"})


def _other_value(f: Any, current: Any) -> Any:
    """A valid value different from the default, for any field of any section."""
    t = str(f.type)
    if "bool" in t:
        return not current
    if f.name == "index_url":
        return "redis://localhost:1/0"
    if f.name == "policy":
        return "ttft"
    if f.name == "hash_algo":
        return "xxhash"
    if "int" in t:
        return (current or 0) + 3
    if "float" in t:
        return (current or 0.0) + 0.25
    return f"x-{f.name}"


def test_every_field_is_reachable_from_file_environment_and_flags(tmp_path: Path) -> None:
    """No option is left to one source: each field of each section is set three ways."""
    import dataclasses

    from kvforge.config import merge_overrides, parse_settings

    defaults = load_config(None, env={})
    for section in ("matcher", "service", "router"):
        for f in dataclasses.fields(getattr(defaults, section)):
            if f.name in ("workers", "snapshot_path"):  # checked against index_url below
                continue
            want = _other_value(f, getattr(getattr(defaults, section), f.name))
            text = str(want).lower() if isinstance(want, bool) else want
            toml = tmp_path / "k.toml"
            toml.write_text(f"[{section}]\n{f.name} = {json.dumps(want)}\n")
            env = {f"KVFORGE_{section.upper()}_{f.name.upper()}": str(text)}
            flags = parse_settings([f"{section}.{f.name}={text}"])
            for cfg in (
                load_config(toml, env={}),
                load_config(None, env=env),
                load_config(None, env={}, overrides=flags),
            ):
                assert getattr(getattr(cfg, section), f.name) == want, (section, f.name)
    # workers > 1 needs a shared index: both given as flags
    cfg = load_config(
        None,
        env={},
        overrides=parse_settings(["service.workers=2", "service.index_url=redis://h:1/0"]),
    )
    assert cfg.service.workers == 2
    # the named flags win over --set; a flag left out (None) does not erase it
    merged = merge_overrides(
        parse_settings(["service.port=9001", "router.policy=ttft"]),
        {"service": {"port": 9002, "host": None}},
    )
    assert merged == {"service": {"port": 9002}, "router": {"policy": "ttft"}}
    assert load_config(None, env={}, overrides=merged).service.port == 9002
    for bad, why in (
        ("port=1", "expected SECTION.KEY=VALUE"),
        ("service.port", "expected SECTION.KEY=VALUE"),
        ("engine.name=a", "unknown section"),
    ):
        with pytest.raises(InvalidInputError, match=why):
            parse_settings([bad])
    with pytest.raises(InvalidInputError, match=r"unknown field \[router\]\.nope"):
        load_config(None, env={}, overrides=parse_settings(["router.nope=1"]))


def test_matcher_and_residency_options_reach_the_objects(tmp_path: Path) -> None:
    from kvforge import PromptTokenizer
    from kvforge.index import MemoryIndex
    from kvforge.serve.factory import build_matcher, build_router

    toml = tmp_path / "k.toml"
    toml.write_text(
        "[matcher]\nfind_spans = false\nrecompute_ratio = 0.5\nspan_max_pairs = 77\n"
        "[router]\nmax_media = 3\nmax_blocks_per_engine = 1000\n"
        '[[engines]]\nname = "e0"\n'
    )
    cfg = load_config(toml, env={})
    m = build_matcher(cfg)
    assert m.find_spans is False and m.recompute_ratio == 0.5
    assert isinstance(m.index, MemoryIndex) and m.index.span_budget.max_pairs == 77
    router = build_router(cfg, PromptTokenizer.qwen3())
    assert router is not None
    assert router.residency.max_media == 3 and router.residency.max_blocks_per_engine == 1000


def test_serve_refuses_a_bad_set_before_serving() -> None:
    from typer.testing import CliRunner

    from kvforge.cli.main import app

    r = CliRunner().invoke(app, ["serve", "--set", "router.policy=fastest"])
    assert r.exit_code == 2 and "prefix or ttft" in r.output
    r = CliRunner().invoke(app, ["serve", "--set", "nonsense"])
    assert r.exit_code == 2 and "SECTION.KEY=VALUE" in r.output
