"""The service built from its configuration, in one place: the command line, each worker
process and the tests all go through :func:`build_app`.

With ``[service].workers > 1`` the command line hands the configuration to uvicorn's worker
processes (each builds its own app, so each subscribes to every engine's KV events itself —
ZMQ fans them out — or, on a shared residency, takes its turn ingesting them through Redis);
the workers then share one index and residency through ``index_url``, which must be Redis.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from kvforge.config import Config, load_config
from kvforge.errors import InvalidInputError
from kvforge.index.spans import SpanBudget
from kvforge.route import Router
from kvforge.route.tenancy import TenantSalt
from kvforge.serve.record import Recorder

if TYPE_CHECKING:
    from kvforge.match import SyncMatcher

# how the command line passes its arguments to uvicorn's worker processes
SERVE_ARGS_ENV = "KVFORGE_SERVE_ARGS"


def api_token(cfg: Config) -> str | None:
    """The bearer token, read from the variable the config names (never from the config)."""
    name = cfg.service.api_token_env
    if name is None:
        return None
    token = os.environ.get(name)
    if not token:
        raise InvalidInputError(f"environment variable {name} is empty or unset")
    return token


def build_matcher(cfg: Config) -> SyncMatcher:
    """The matcher of ``[matcher]`` over the index of ``[service].index_url``."""
    from kvforge.match import SyncMatcher

    mc = cfg.matcher
    return SyncMatcher(
        block_size=mc.block_size,
        hash_algo=mc.hash_algo,
        hash_seed=mc.hash_seed,
        tokenizer=mc.tokenizer,
        near_radius=mc.near_radius,
        max_prompt_chars=mc.max_prompt_chars,
        max_prompt_tokens=mc.max_prompt_tokens,
        max_agents_per_tenant=mc.max_agents_per_tenant,
        max_tenants=mc.max_tenants,
        max_blocks=mc.max_blocks,
        find_spans=mc.find_spans,
        recompute_ratio=mc.recompute_ratio,
        span_budget=span_budget(cfg),
        index=cfg.service.index_url,
    )


def build_app(cfg: Config, *, announce: Any = None) -> FastAPI:
    """Matcher, router (when engines are configured), snapshotter and the app. ``announce``
    gets one line of news (e.g. how much a snapshot restored)."""
    from kvforge.serve.app import create_app

    sc, rc = cfg.service, cfg.router
    token = api_token(cfg)
    matcher = build_matcher(cfg)
    router = build_router(cfg, matcher.tokenizer)
    snapshotter = None
    if sc.snapshot_path:
        from kvforge.persist import Snapshotter

        snapshotter = Snapshotter(matcher, sc.snapshot_path, sc.snapshot_interval)
        restored = snapshotter.restore()
        if announce is not None:
            announce(f"restored {restored} indexed prompts from {sc.snapshot_path}")
    return create_app(
        matcher,
        router=router,
        api_token=token,
        max_body_bytes=sc.max_body_bytes,
        snapshotter=snapshotter,
        expose_decisions=rc.expose_decisions,
        tenant_salt=TenantSalt.from_env(rc.tenant_salt_env) if rc.tenant_salt_env else None,
        recorder=_recorder(cfg),
        scrape_interval=rc.scrape_interval,
    )


def span_budget(cfg: Config) -> SpanBudget:
    """``[matcher] span_*`` fields as the search's budget (field for field)."""
    mc = cfg.matcher
    return SpanBudget(**{f.name: getattr(mc, f"span_{f.name}") for f in fields(SpanBudget)})


def _recorder(cfg: Config) -> Recorder | None:
    sc = cfg.service
    if not sc.record_path:
        return None
    # one file per worker process: rotation is not shared between processes
    path = sc.record_path if sc.workers == 1 else f"{sc.record_path}.{os.getpid()}"
    return Recorder(
        path, max_bytes=sc.record_max_bytes, keep=sc.record_keep, redact=sc.record_redact
    )


def build_router(cfg: Config, tokenizer: Any) -> Router | None:
    """The router of the configured engines (None without engines)."""
    from kvforge.route.shared import open_residency

    rc, sc = cfg.router, cfg.service
    tiers = {"GPU": 1.0, "CPU": rc.cpu_tier_weight}
    # ttft: both cost terms in blocks of prefill (load = queued prompt blocks), summed as they
    # come, no balance guard (the queue already prices an engine's backlog)
    ttft = rc.policy == "ttft"
    return (
        Router(
            cfg.engines,
            residency=open_residency(
                sc.index_url,
                tiers,
                max_blocks_per_engine=rc.max_blocks_per_engine,
                max_media=rc.max_media,
            ),
            tokenizer=tokenizer,
            prefill_weight=1.0 if ttft else rc.prefill_weight,
            load_weight=1.0 if ttft else rc.load_weight,
            balance_rel=1e12 if ttft else rc.balance_rel,
            balance_abs=1e12 if ttft else rc.balance_abs,
            speculative_ttl=rc.speculative_ttl,
            stale_after=rc.stale_after,
        )
        if cfg.engines
        else None
    )


def serve_args(config: str | None, overrides: dict[str, dict[str, Any]]) -> str:
    """What a worker needs to load the same configuration (the environment is inherited)."""
    return json.dumps({"config": config, "overrides": overrides})


def app_from_env() -> FastAPI:
    """uvicorn's worker entry point (``factory=True``): the configuration the command line
    loaded, loaded again in this process."""
    args = json.loads(os.environ[SERVE_ARGS_ENV])
    cfg = load_config(args["config"], overrides=args["overrides"])
    return build_app(cfg)
