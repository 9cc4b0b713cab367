"""Configuration: one TOML file, environment variables, command-line flags.

Precedence, highest first: **flags > environment > file > defaults**. Every field of every
section below is reachable from all three: the file, ``KVFORGE_<SECTION>_<KEY>`` variables
(``KVFORGE_SERVICE_PORT=9000``, ``KVFORGE_MATCHER_HASH_SEED=0``) and ``kvforge serve --set
SECTION.KEY=VALUE`` (repeatable; the named flags such as ``--port`` win over it). Engines come
from the file only. Every error names the field::

    [matcher]
    block_size = 16
    hash_algo = "sha256"        # sha256 | sha256_cbor | xxhash | xxhash_cbor
    # hash_seed = "0"           # the engines' PYTHONHASHSEED; omit when unset
    # tokenizer = "/models/x/tokenizer.json"
    near_radius = 2

    [service]
    host = "127.0.0.1"
    port = 8000
    # api_token_env = "KVFORGE_API_TOKEN"   # name of the variable holding the bearer token
    max_body_bytes = 8388608
    # index_url = "redis://redis:6379/0?prefix=kvf&ttl=86400"   # shared by router replicas
    # snapshot_path = "/var/lib/kvforge/index.snapshot"   # restored on start
    snapshot_interval = 30.0
    # workers = 4               # processes; > 1 needs a redis:// index_url
    # record_path = "/var/log/kvforge/requests.jsonl"   # trace of every proxied request
    # record_redact = true      # token ids, not text

    [router]
    load_weight = 0.1
    speculative_ttl = 2.0
    # policy = "ttft"                     # or "prefix" (the default)
    # expose_decisions = true            # cached blocks in /v1/route and the proxy's headers
    # tenant_salt_env = "KVFORGE_TENANT_SALT"   # a per-tenant cache_salt on every request

    [[engines]]
    name = "a"
    url = "http://engine-a:8000"
    events = "tcp://engine-a:5557"
    replay = "tcp://engine-a:5558"
    loras = { sql = "/adapters/sql" }
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kvforge.errors import InvalidInputError
from kvforge.route import EngineConfig
from kvforge.store.url import parse_backend_url


@dataclass
class MatcherSection:
    block_size: int = 16
    hash_algo: str = "sha256"
    hash_seed: str | None = None
    tokenizer: str | None = None
    near_radius: int = 2
    max_prompt_chars: int = 4_000_000
    max_prompt_tokens: int = 1_000_000
    max_agents_per_tenant: int | None = 1_000_000
    max_tenants: int | None = 100_000
    # distinct indexed blocks, all tenants together: the memory cap (about 150-400 B each)
    max_blocks: int | None = 20_000_000
    find_spans: bool = True  # moved spans (identical tokens at other positions) in reports
    recompute_ratio: float = 0.15  # CacheBlend-style share of moved tokens to recompute
    # the moved-span search's bounds per query (index/spans.py SpanBudget): past any of them
    # it stops and the report says truncated
    span_max_postings: int = 512
    span_max_pairs: int = 32_768
    span_max_pairs_per_hash: int = 2_048
    span_max_runs: int = 2_048
    span_max_tokens: int = 2_000_000
    span_max_spans: int = 4_096
    span_max_spans_per_owner: int = 256


@dataclass
class ServiceSection:
    host: str = "127.0.0.1"
    port: int = 8000
    api_token_env: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    # memory:// (embedded, the default) or redis://host:port/db?prefix=kvf&ttl=seconds: the
    # block index and the engine residency shared by every replica on that Redis
    index_url: str = "memory://"
    snapshot_path: str | None = None  # embedded index persistence (restored on start)
    snapshot_interval: float = 30.0
    # worker processes (each answers requests, all share index_url, which must then be Redis)
    workers: int = 1
    # every proxied request as a trace line (rotated past record_max_bytes, record_keep old
    # files kept; record_redact: token ids instead of text); with workers, one file each
    record_path: str | None = None
    record_max_bytes: int = 64 * 1024 * 1024
    record_keep: int = 3
    record_redact: bool = False


@dataclass
class RouterSection:
    prefill_weight: float = 1.0
    load_weight: float = 0.1
    balance_rel: float = 1.5
    balance_abs: float = 256.0
    speculative_ttl: float = 2.0
    stale_after: float | None = 30.0  # seconds without events after new blocks were routed
    # Decision details (/v1/route's cached blocks, scores and reason; the proxy's
    # x-kvforge-cached-blocks / -prompt-blocks headers) tell a caller whether some prompt is
    # cached: off unless the operator turns them on.
    expose_decisions: bool = False
    # Name of the variable holding a secret: when set, every routed or proxied request of a
    # tenant gets a cache_salt derived from it and the tenant (tenants never share KV blocks).
    tenant_salt_env: str | None = None
    # seconds between reads of each engine's /metrics (vLLM's waiting requests priced into
    # its load); 0 turns it off
    scrape_interval: float = 2.0
    # "prefix" (cached prefix first, load as a tie-breaker: load_weight) or "ttft" (the lowest
    # predicted time to first token: uncached prefill plus queued work, in one unit)
    policy: str = "prefix"
    # what a block held in CPU memory (vLLM's offloading connector) is worth against GPU
    cpu_tier_weight: float = 0.8
    # an engine announcing more blocks than this is broken or rogue: its residency is dropped
    max_blocks_per_engine: int = 4_000_000
    max_media: int = 8  # tiers (GPU, CPU, a connector's); events of further ones are ignored


@dataclass
class Config:
    matcher: MatcherSection = field(default_factory=MatcherSection)
    service: ServiceSection = field(default_factory=ServiceSection)
    router: RouterSection = field(default_factory=RouterSection)
    engines: list[EngineConfig] = field(default_factory=list)


_SECTIONS = {"matcher": MatcherSection, "service": ServiceSection, "router": RouterSection}


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _coerce(where: str, value: Any, annotation: str) -> Any:
    if value is None and "None" in annotation:
        return None
    if "bool" in annotation:  # TOML booleans, or their spelling in an environment variable
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise InvalidInputError(f"config: {where} must be true or false (got {value!r})")
    kind = (
        int if "int" in annotation else float if "float" in annotation else str
    )  # every other field is int, float or str (optionally None)
    try:
        if kind is int and isinstance(value, bool | float):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"config: {where} must be {kind.__name__} (got {value!r})"
        ) from None


def parse_settings(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["router.policy=ttft", "matcher.near_radius=0"]`` (the ``--set`` flag) as overrides
    per section; values are coerced like environment variables, unknown fields refused."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not name:
            raise InvalidInputError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        if section not in _SECTIONS:
            raise InvalidInputError(
                f"--set {item!r}: unknown section [{section}]; known: {', '.join(_SECTIONS)}"
            )
        out.setdefault(section, {})[name] = value
    return out


def merge_overrides(*layers: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Later layers win; None means "not given" (a flag left out)."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            given = {k: v for k, v in values.items() if v is not None}
            out.setdefault(section, {}).update(given)
    return out


def _apply(section: Any, name: str, values: Mapping[str, Any], source: str) -> None:
    known = {f.name: f for f in fields(section)}
    for key, value in values.items():
        if key not in known:
            raise InvalidInputError(
                f"config: unknown field [{name}].{key} ({source}); known: {', '.join(known)}"
            )
        f = known[key]
        setattr(section, key, _coerce(f"[{name}].{key} ({source})", value, str(f.type)))


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Defaults, then the file, then ``KVFORGE_*`` variables, then ``overrides`` (flags;
    ``None`` values are ignored)."""
    cfg = Config()
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text("utf-8"))
        except FileNotFoundError:
            raise InvalidInputError(f"config: file not found: {p}") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInputError(f"config: {p} is not valid TOML: {exc}") from None
    for key in raw:
        if key not in (*_SECTIONS, "engines"):
            raise InvalidInputError(f"config: unknown section [{key}] in {path}")
    for name in _SECTIONS:
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise InvalidInputError(f"config: [{name}] must be a table")
        _apply(getattr(cfg, name), name, section, str(path))
    env = os.environ if env is None else env
    for name in _SECTIONS:
        prefix = f"KVFORGE_{name.upper()}_"
        values = {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}
        _apply(getattr(cfg, name), name, values, "environment")
    for name, given in (overrides or {}).items():
        flags = {k: v for k, v in given.items() if v is not None}
        _apply(getattr(cfg, name), name, flags, "command line")
    cfg.engines = [_engine(i, e) for i, e in enumerate(raw.get("engines", []))]
    backend = parse_backend_url(cfg.service.index_url, "config: [service].index_url")
    if cfg.router.policy not in ("prefix", "ttft"):
        raise InvalidInputError(
            f"config: [router].policy must be prefix or ttft (got {cfg.router.policy!r})"
        )
    if cfg.service.workers < 1:
        raise InvalidInputError("config: [service].workers must be at least 1")
    if cfg.service.workers > 1 and not backend.shared:
        raise InvalidInputError(
            "config: [service].workers > 1 needs a shared index_url (redis://…): with "
            "memory:// every worker process would keep its own index and residency"
        )
    if cfg.service.snapshot_path and backend.shared:
        raise InvalidInputError(
            "config: [service].snapshot_path persists the embedded index; with a Redis "
            "index_url, Redis itself persists the shared state (configure its AOF/RDB)"
        )
    return cfg


def _engine(i: int, e: Any) -> EngineConfig:
    where = f"[[engines]] #{i + 1}"
    if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
        raise InvalidInputError(f"config: {where} needs a non-empty 'name'")
    known = {f.name for f in fields(EngineConfig)}
    unknown = set(e) - known
    if unknown:
        raise InvalidInputError(f"config: {where} ({e['name']}): unknown fields {sorted(unknown)}")
    loras = e.get("loras", {})
    if not isinstance(loras, dict) or not all(isinstance(v, str) for v in loras.values()):
        raise InvalidInputError(f"config: {where} ({e['name']}).loras must map names to paths")
    try:
        return EngineConfig(**e)
    except TypeError as exc:
        raise InvalidInputError(f"config: {where} ({e['name']}): {exc}") from None
