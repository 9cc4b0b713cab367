"""The HTTP service: the matcher's API (index / match / clear / stats / prefix hash), routing,
Prometheus metrics and a health check.

* The tenant comes from the ``X-Tenant`` header (``default`` without it) and scopes every call.
* With an API token configured, every endpoint but ``/healthz`` needs ``Authorization: Bearer``.
* Bodies over ``max_body_bytes`` get 413 before they are parsed; prompts over the matcher's
  limits get 413; malformed bodies get 422. A failed call changes nothing.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from msgspec import json as _json
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from kvforge.errors import (
    KvforgeError,
    PromptTooLargeError,
    QuotaExceededError,
)
from kvforge.events.subscriber import EventSubscriber
from kvforge.match import SyncMatcher
from kvforge.persist import Snapshotter
from kvforge.route import Router
from kvforge.route.load import LoadScraper
from kvforge.route.tenancy import TenantSalt
from kvforge.serve.bodies import BodyError, MatchStruct, PromptOptions, RouteStruct, decode
from kvforge.serve.proxy import Proxy, add_proxy
from kvforge.serve.record import Recorder
from kvforge.serve.responses import (
    AgentsResponse,
    HealthResponse,
    IndexResponse,
    MatchResponse,
    PrefixHashResponse,
    RemovedResponse,
    RouteResponse,
    StatsResponse,
)
from kvforge.store import BackendUnavailableError

TENANT_HEADER = "X-Tenant"


class PromptBody(BaseModel, PromptOptions):
    """Exactly one of ``prompt`` (text), ``messages`` (chat) or ``token_ids``. Unknown fields
    are refused (a typo such as ``cache_sal`` must not index unsalted), and token ids must be
    JSON integers (not ``1.0``, ``true`` or ``"1"``)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    token_ids: list[StrictInt] | None = None
    tools: list[dict[str, Any]] | None = None
    cache_salt: str | None = None
    lora_name: str | None = None
    lora_path: str | None = None
    # vLLM's chat render options (chat messages only)
    add_generation_prompt: StrictBool | None = None
    continue_final_message: StrictBool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> PromptBody:
        given = [x is not None for x in (self.prompt, self.messages, self.token_ids)]
        if sum(given) != 1:
            raise ValueError("give exactly one of 'prompt', 'messages', 'token_ids'")
        if (self.lora_name is None) != (self.lora_path is None):
            raise ValueError("'lora_name' and 'lora_path' go together")
        return self


class IndexBody(PromptBody):
    agent_id: str = Field(min_length=1, max_length=256)


class MatchBody(PromptBody):
    exclude_agent: str | None = Field(default=None, min_length=1, max_length=256)


class RouteBody(PromptBody):
    loads: dict[str, Annotated[float, Field(allow_inf_nan=False)]] | None = None
    lora: str | None = None  # the adapter name; engines map it to their own path


def _count(value: object) -> float:
    """A counter from a stats dict (values typed ``object``): 0 when absent."""
    return float(value) if isinstance(value, int | float) else 0.0


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvforge_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "kvforge_request_seconds",
            "Request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.blocks = Gauge(
            "kvforge_index_blocks", "Distinct indexed blocks", registry=self.registry
        )
        self.agents = Gauge("kvforge_index_agents", "Indexed agents", registry=self.registry)
        self.hit_ratio = Histogram(
            "kvforge_match_exact_ratio",
            "Share of a matched prompt reusable exactly",
            registry=self.registry,
            buckets=(0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
        )
        self.event_lag = Gauge(
            "kvforge_engine_event_age_seconds",
            "Seconds since an engine's last KV event",
            ["engine"],
            registry=self.registry,
        )


class _BackendCollector(Collector):
    """Failure counters of the shared backend (Redis), read from the objects that keep them."""

    def __init__(self, matcher: SyncMatcher, router: Router | None) -> None:
        self.matcher, self.router = matcher, router

    def collect(self) -> Iterator[Metric]:
        index = self.matcher.index.health()
        fail = CounterMetricFamily(
            "kvforge_backend_failures",
            "Calls to the shared backend that failed (failed open)",
            labels=["part"],
        )
        fail.add_metric(["index"], float(index.failures))
        up = GaugeMetricFamily(
            "kvforge_backend_up", "1 when the shared backend is reachable", labels=["part"]
        )
        up.add_metric(["index"], float(index.available))
        degraded = CounterMetricFamily(
            "kvforge_degraded_lookups", "Lookups answered 'nothing reusable' (backend down)"
        )
        degraded.add_metric([], float(index.degraded))
        if self.router is not None:
            r = self.router.residency.health()
            fail.add_metric(["residency"], float(r.failures))
            up.add_metric(["residency"], float(r.available))
        yield from (fail, up, degraded)


_EVENT_COUNTERS = {
    "received": "Event messages received",
    "applied": "Event batches applied",
    "malformed": "Event messages or batches dropped as malformed",
    "rejected": "Well-framed batches refused whole (bad ids, bounds)",
    "duplicates": "Batches received again after a replay",
    "gaps": "Sequence gaps detected",
    "replayed": "Batches recovered from the replay endpoint",
    "restarts": "Engine restarts detected (its residency cleared)",
    "resyncs": "Unrecoverable gaps (the engine's residency cleared)",
}


class _EventsCollector(Collector):
    """The KV-event subscribers' counters per engine, and the residency's own drops: every
    way an engine's view can be cleared or lose events is visible."""

    def __init__(self, subs: list[EventSubscriber], router: Router | None) -> None:
        self.subs, self.router = subs, router

    def collect(self) -> Iterator[Metric]:
        for name, doc in _EVENT_COUNTERS.items():
            fam = CounterMetricFamily(f"kvforge_engine_events_{name}", doc, labels=["engine"])
            for sub in self.subs:
                fam.add_metric([sub.engine], float(getattr(sub.stats, name)))
            yield fam
        if self.router is not None:
            r = self.router.residency.stats()
            over = CounterMetricFamily(
                "kvforge_residency_overflows", "Engines dropped for announcing over their pool"
            )
            over.add_metric([], _count(r.get("overflows")))
            media = CounterMetricFamily(
                "kvforge_residency_ignored_media_events",
                "Events of a medium beyond the tier cap (ignored)",
            )
            media.add_metric([], _count(r.get("ignored_media_events")))
            probes = CounterMetricFamily(
                "kvforge_router_stale_probes", "Requests let through to a stale engine"
            )
            probes.add_metric([], float(self.router.probes))
            yield from (over, media, probes)


class _SnapshotCollector(Collector):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.snapshotter = snapshotter

    def collect(self) -> Iterator[Metric]:
        saves = CounterMetricFamily("kvforge_snapshot_saves", "Snapshots written")
        saves.add_metric([], float(self.snapshotter.saves))
        failed = CounterMetricFamily("kvforge_snapshot_failures", "Snapshot saves that failed")
        failed.add_metric([], float(self.snapshotter.failures))
        yield from (saves, failed)


class _ProxyCollector(Collector):
    """Claim accuracy against the engines' cached_tokens, engine failures and retries."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        c, h = self.proxy.claims, self.proxy.health
        claims = CounterMetricFamily(
            "kvforge_route_claims",
            "Routing claims checked against the engine's cached_tokens",
            labels=["outcome"],
        )
        for outcome in ("exact", "over", "under", "unknown"):
            claims.add_metric([outcome], float(getattr(c, outcome)))
        wrong = CounterMetricFamily(
            "kvforge_route_claim_error_blocks",
            "Blocks by which wrong claims missed",
            labels=["direction"],
        )
        wrong.add_metric(["over"], float(c.over_blocks))
        wrong.add_metric(["under"], float(c.under_blocks))
        fails = CounterMetricFamily(
            "kvforge_engine_failures",
            "Engine failures seen by the proxy",
            labels=["engine", "kind"],
        )
        for (engine, kind), n in sorted(h.failures.items()):
            fails.add_metric([engine, kind], float(n))
        retries = CounterMetricFamily("kvforge_proxy_retries", "Requests sent to a second engine")
        retries.add_metric([], float(h.retries))
        up = GaugeMetricFamily(
            "kvforge_engine_up", "Engine in rotation (1) or down (0)", labels=["engine"]
        )
        for e in self.proxy.health.engines:
            up.add_metric([e], 1.0 if h.is_up(e) else 0.0)
        yield from (claims, wrong, fails, retries, up)


class _RecorderCollector(Collector):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def collect(self) -> Iterator[Metric]:
        r = self.recorder
        for name, help_, value in (
            ("kvforge_record_lines", "Proxied requests written to the recording", r.written),
            ("kvforge_record_dropped", "Lines dropped (the writer fell behind)", r.dropped),
            ("kvforge_record_rotations", "Recording files rotated", r.rotations),
            ("kvforge_record_failures", "Recording writes that failed", r.failures),
        ):
            c = CounterMetricFamily(name, help_)
            c.add_metric([], float(value))
            yield c


class _AgentIdConvertor(Convertor[str]):
    """The rest of the path, any characters (Starlette's ``path`` stops at a newline)."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("agent_id", _AgentIdConvertor())

_METRIC_PATHS = {
    "/healthz",
    "/metrics",
    "/v1/index",
    "/v1/match",
    "/v1/prefix-hash",
    "/v1/agents",
    "/v1/stats",
    "/v1/route",
    "/v1/chat/completions",
    "/v1/completions",
    "/openapi.json",
    "/docs",
    "/redoc",
}


class _LimitsAndMetrics:
    """Pure ASGI middleware (no per-request task or response copy, unlike ``BaseHTTPMiddleware``):
    the body limit, enforced while the body streams in — a ``Content-Length`` over the limit is
    refused at once, a chunked body is read up to the limit and refused when it passes it
    (memory stays bounded; the app then reads the buffered body) — and request metrics,
    labelled by route (never by a caller-chosen path: labels stay few)."""

    def __init__(self, app: Any, *, metrics: _Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max = max_body_bytes

    @staticmethod
    def _label(path: str) -> str:
        if path in _METRIC_PATHS:
            return path
        return "/v1/agents/{agent_id}" if path.startswith("/v1/agents/") else "other"

    async def _refuse(self, send: Any) -> None:
        body = _json.encode({"detail": f"request body over the {self.max:,}-byte limit"})
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            length = None
            for k, v in scope.get("headers", ()):
                if k == b"content-length":
                    length = v
            if length is not None:
                if not length.isdigit() or int(length) > self.max:
                    await self._refuse(send_wrapper)
                    return
                await self.app(scope, receive, send_wrapper)
                return
            if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
                await self.app(scope, receive, send_wrapper)
                return
            # no length given (chunked): read it here, never past the limit
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max:
                    await self._refuse(send_wrapper)
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def replay_receive() -> Any:
                return replay.pop() if replay else await receive()

            await self.app(scope, replay_receive, send_wrapper)
        finally:
            label = self._label(scope.get("path", ""))
            self.metrics.requests.labels(label, str(status[0])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)


def create_app(
    matcher: SyncMatcher | None = None,
    *,
    router: Router | None = None,
    api_token: str | None = None,
    max_body_bytes: int = 8 * 1024 * 1024,
    subscribe: bool = True,
    snapshotter: Snapshotter | None = None,
    expose_decisions: bool = False,
    tenant_salt: TenantSalt | None = None,
    recorder: Recorder | None = None,
    scrape_interval: float = 0.0,
) -> FastAPI:
    """The service. With a ``router`` whose engines have URLs it also proxies the OpenAI API;
    with ``subscribe`` it starts a KV-event subscriber per engine that has an ``events``
    endpoint (and stops them on shutdown). ``expose_decisions``: /v1/route answers with the
    cached blocks, scores and reason, and the proxy sends them in headers (they tell any
    caller whether a prompt is cached somewhere). ``tenant_salt``: each tenant's routed and
    proxied requests get their own cache_salt. ``recorder``: every proxied request is written
    as a trace line (closed on shutdown). ``scrape_interval`` > 0: the engines' own metrics
    (vLLM's waiting requests) are read that often and priced into their load."""
    m = matcher if matcher is not None else SyncMatcher()
    metrics = _Metrics()
    metrics.registry.register(_BackendCollector(m, router))
    resources: dict[str, Any] = {}
    subs: list[EventSubscriber] = []
    metrics.registry.register(_EventsCollector(subs, router))
    if snapshotter is not None:
        metrics.registry.register(_SnapshotCollector(snapshotter))
    if recorder is not None:
        metrics.registry.register(_RecorderCollector(recorder))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        subs.clear()
        if router is not None and subscribe:
            for e in router.engines.values():
                if e.events:
                    sub = EventSubscriber(
                        e.name, e.events, router.residency, replay_endpoint=e.replay, topic=e.topic
                    )
                    subs.append(sub.start())
        if snapshotter is not None:
            snapshotter.start()
        if "scraper" in resources:
            resources["scraper"].start()
        try:
            yield
        finally:
            if "scraper" in resources:
                resources["scraper"].stop()
            if snapshotter is not None:
                snapshotter.stop()  # a last save on a clean shutdown
            for sub in subs:
                sub.stop()
            subs.clear()
            if "client" in resources:
                await resources["client"].aclose()
            if recorder is not None:
                recorder.close()

    # With a token, the schema is served only to callers holding it (below), and the
    # interactive docs not at all: their page would fetch the schema without the token.
    public_docs = api_token is None
    app = FastAPI(
        title="kvforge",
        version="0.1.0",
        description="Exact KV-cache reuse analysis and prefix-aware routing.",
        lifespan=lifespan,
        openapi_url="/openapi.json" if public_docs else None,
        docs_url="/docs" if public_docs else None,
        redoc_url="/redoc" if public_docs else None,
    )

    def auth(authorization: str | None = Header(default=None)) -> None:
        if api_token is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        # constant-time comparison: the token must not leak through response timing
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.encode(), api_token.encode()
        ):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    def tenant(
        request: Request,
        x_tenant: str | None = Header(
            default=None, alias=TENANT_HEADER, min_length=1, max_length=256
        ),
    ) -> str | None:
        if len(request.headers.getlist(TENANT_HEADER)) > 1:
            # two tenants in one request: "first wins" would let a proxy and a client disagree
            raise HTTPException(400, f"more than one {TENANT_HEADER} header")
        return x_tenant

    app.add_middleware(_LimitsAndMetrics, metrics=metrics, max_body_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the offending input: a whole prompt, or a string no encoder
        # accepts (the error itself then failed with a 500). Say where and why, never what.
        detail = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(BodyError)
    async def _bad_body(request: Request, exc: BodyError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=422)

    @app.exception_handler(BackendUnavailableError)
    async def _backend_down(request: Request, exc: BackendUnavailableError) -> JSONResponse:
        # a write that could not reach the shared index: nothing changed, the caller may retry
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(QuotaExceededError)
    async def _quota(request: Request, exc: QuotaExceededError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429)

    @app.exception_handler(KvforgeError)
    async def _kvforge_error(request: Request, exc: KvforgeError) -> JSONResponse:
        if isinstance(exc, PromptTooLargeError):
            return JSONResponse({"detail": str(exc)}, status_code=413)
        # the same shape as FastAPI's own validation errors (the documented 422 schema)
        detail = [{"loc": ["body"], "msg": str(exc), "type": "value_error"}]
        return JSONResponse({"detail": detail}, status_code=422)

    deps = [Depends(auth)]
    if not public_docs:

        @app.get("/openapi.json", dependencies=deps, include_in_schema=False)
        def openapi_schema() -> JSONResponse:
            return JSONResponse(app.openapi())

    errors: dict[int | str, dict[str, Any]] = {
        400: {"description": "The body is not valid JSON."},
        401: {"description": "Missing or wrong bearer token (when the service has one)."},
        413: {"description": "Request body or prompt over the configured limits."},
    }

    @app.get("/healthz", response_model=HealthResponse)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    writes = {
        **errors,
        429: {"description": "A new agent or tenant over the configured bounds."},
        503: {"description": "The shared index (Redis) is unreachable; nothing changed."},
    }

    @app.post("/v1/index", dependencies=deps, responses=writes, response_model=IndexResponse)
    def index(body: IndexBody, t: str | None = Depends(tenant)) -> dict[str, Any]:
        r = m.index_prompt(body.agent_id, body.value(), tenant=t, **body.prompt_options())
        return {
            "agent_id": r.agent_id,
            "num_tokens": r.num_tokens,
            "num_blocks": r.num_blocks,
            "new_blocks": r.new_blocks,
            "shared_blocks": r.shared_blocks,
            "block_hashes": list(r.block_hashes),
        }

    def body_schema(model: type[BaseModel]) -> dict[str, Any]:
        """The pydantic model documents a body that msgspec decodes (``bodies``)."""
        return {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": model.model_json_schema()}},
            }
        }

    invalid: dict[int | str, dict[str, Any]] = {
        422: {"description": "The body does not decode (FastAPI's error shape)."}
    }

    @app.post(
        "/v1/match",
        dependencies=deps,
        response_class=Response,
        responses={
            **errors,
            **invalid,
            200: {"model": MatchResponse, "description": "The match report."},
        },
        openapi_extra=body_schema(MatchBody),
    )
    async def match(request: Request, t: str | None = Depends(tenant)) -> Response:
        body = decode(await request.body(), MatchStruct)
        return await run_in_threadpool(_match, body, t)

    def _match(body: MatchStruct, t: str | None) -> Response:
        r = m.find_reusable_blocks(
            body.value(), exclude_agent=body.exclude_agent, tenant=t, **body.prompt_options()
        )
        if r.num_tokens:
            metrics.hit_ratio.observe(r.reusable_tokens / r.num_tokens)
        d = r.to_dict()
        # a 512-block report is large: msgspec encodes it ~20x faster than the default path
        return Response(_json.encode(d), media_type="application/json")

    @app.post(
        "/v1/prefix-hash", dependencies=deps, responses=errors, response_model=PrefixHashResponse
    )
    def prefix_hash(body: PromptBody, t: str | None = Depends(tenant)) -> dict[str, Any]:
        p = m.get_shared_prefix_hash(body.value(), tenant=t, **body.prompt_options())
        return {
            "num_blocks": p.num_blocks,
            "prefix_hash_hex": p.prefix_hash_hex,
            "first_block_hash_hex": p.first_block_hash_hex,
            "prefix_event_hash": p.prefix_event_hash,
        }

    # an agent id may hold "/" or a newline (it can be indexed with one, so it must be
    # deletable): the ``agent_id`` convertor takes the rest of the path, whatever it holds
    @app.delete(
        "/v1/agents/{agent_id:agent_id}",
        dependencies=deps,
        responses=writes,
        response_model=RemovedResponse,
    )
    def clear(agent_id: str, t: str | None = Depends(tenant)) -> dict[str, int]:
        return {"removed_blocks": m.clear_agent(agent_id, tenant=t)}

    @app.get(
        "/v1/agents",
        dependencies=deps,
        responses=errors,
        response_model=AgentsResponse,
        response_model_exclude_none=True,
    )
    def agents(t: str | None = Depends(tenant)) -> dict[str, Any]:
        names, degraded = m.list_agents(tenant=t)
        # the shared index unreachable: say so, never pass an empty list off as the truth
        return {"agents": names, "degraded": True} if degraded else {"agents": names}

    @app.get(
        "/v1/stats",
        dependencies=deps,
        responses=errors,
        response_model=StatsResponse,
        response_model_exclude_unset=True,  # the router's sections only when it runs
    )
    def stats(t: str | None = Depends(tenant)) -> dict[str, Any]:
        # the caller's tenant only (X-Tenant, or the default one): how many tenants there are
        # and what they hold is the operator's business (/metrics)
        out = m.stats(tenant=t, scoped=True)
        out["tenant"] = t
        if router is not None:
            out["events"] = {sub.engine: asdict(sub.stats) for sub in subs}
            out["residency"] = router.residency.stats()
        if "proxy" in resources:
            p: Proxy = resources["proxy"]
            out["claims"] = p.claims.as_dict()
            out["engines_up"] = {e: p.health.is_up(e) for e in router.engines} if router else {}
        return out

    @app.post(
        "/v1/route",
        dependencies=deps,
        response_class=Response,
        responses={
            **errors,
            **invalid,
            200: {"model": RouteResponse, "description": "The chosen engine."},
            404: {"description": "No engines configured."},
        },
        openapi_extra=body_schema(RouteBody),
    )
    async def route(request: Request, t: str | None = Depends(tenant)) -> Response:
        if router is None:
            raise HTTPException(404, "no engines configured: start the service with engines")
        body = decode(await request.body(), RouteStruct)
        return await run_in_threadpool(_route, router, body, t)

    def _route(router: Router, body: RouteStruct, t: str | None) -> Response:
        tp = m.tokenize(body.value(), tools=body.tools, tenant=t, chat=body.chat())
        salt = body.cache_salt if tenant_salt is None else tenant_salt.salt(t, body.cache_salt)
        # advice only (nothing is forwarded): no speculation, no event expected of the engine
        d = router.route(
            tp, loads=body.loads, cache_salt=salt, lora=body.lora, dispatch=False, tenant=t
        )
        out: dict[str, Any] = {"engine": d.engine, "num_blocks": d.num_blocks}
        if expose_decisions:
            out.update(cached_blocks=d.cached_blocks, scores=d.scores, reason=d.reason)
        return Response(_json.encode(out), media_type="application/json")

    if router is not None and any(e.url for e in router.engines.values()):
        scraper = None
        if scrape_interval > 0:
            urls = {n: e.url for n, e in router.engines.items() if e.url}
            scraper = resources["scraper"] = LoadScraper(urls, interval=scrape_interval)
        proxy = add_proxy(
            app,
            m,
            router,
            deps,
            tenant,
            expose_decisions=expose_decisions,
            tenant_salt=tenant_salt,
            recorder=recorder,
            scraper=scraper,
        )
        resources["client"] = proxy.client
        resources["proxy"] = proxy
        metrics.registry.register(_ProxyCollector(proxy))

    @app.get("/metrics", dependencies=deps, responses=errors, response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        s = m.stats()
        metrics.blocks.set(s["blocks"])
        metrics.agents.set(s["agents"])
        if router is not None:
            now = time.monotonic()
            for name in router.engines:
                e = router.residency.engine(name)
                if e.last_event:
                    metrics.event_lag.labels(name).set(now - e.last_event)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
