"""OpenAI-compatible routing proxy: ``/v1/chat/completions`` and ``/v1/completions``.

Each request is rendered and tokenized exactly as vLLM does it, routed to the engine that holds
the longest prefix (from the engines' KV events), and forwarded with httpx, streamed (SSE) or
not — unchanged, but for the tenant's ``cache_salt`` when tenant salting is on. The chosen
engine comes back in ``x-kvforge-engine``; ``x-kvforge-cached-blocks`` and
``x-kvforge-prompt-blocks`` only when the operator exposes decisions (they tell a caller
whether a prompt is cached). The router's load signal is the number of prompt blocks in flight
on each engine through this proxy.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import httpx
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from kvforge.match import SyncMatcher
from kvforge.route import RouteDecision, Router
from kvforge.route.load import LoadScraper
from kvforge.route.tenancy import DEFAULT_TENANT, TenantSalt
from kvforge.serve.record import Recorder
from kvforge.tokenize import ChatOptions, TokenizedPrompt
from kvforge.validate import require_utf8_tree

HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding"}
log = logging.getLogger(__name__)


class EngineHealth:
    """Per engine: up, or down after ``down_after`` failures in a row (unreachable, timed out,
    or a 5xx before the response started). A down engine gets no traffic, except one probe
    request per ``probe_after`` seconds; the first success brings it back."""

    def __init__(self, names: list[str], *, down_after: int = 2, probe_after: float = 5.0):
        self.down_after = down_after
        self.probe_after = probe_after
        self.failures: dict[tuple[str, str], int] = {}  # (engine, kind) -> count
        self._streak = dict.fromkeys(names, 0)
        self._down: dict[str, float] = {}  # engine -> when it may be probed next
        self.retries = 0
        self._lock = threading.Lock()

    def usable(self, names: list[str], now: float) -> list[str]:
        """The engines a request may go to: the up ones, and a down one whose probe is due
        (that claims the probe); every engine when all are down (better a try than a 503)."""
        with self._lock:
            up = [n for n in names if n not in self._down]
            for n in names:
                if n in self._down and self._down[n] <= now:
                    self._down[n] = now + self.probe_after
                    up.append(n)
                    break
            return up or list(names)

    def failed(self, name: str, kind: str, now: float) -> None:
        with self._lock:
            self.failures[(name, kind)] = self.failures.get((name, kind), 0) + 1
            self._streak[name] = self._streak.get(name, 0) + 1
            if self._streak[name] >= self.down_after and name not in self._down:
                self._down[name] = now + self.probe_after
                log.warning(
                    "engine %s is down (%s); probing every %.0f s", name, kind, self.probe_after
                )

    def ok(self, name: str) -> None:
        with self._lock:
            self._streak[name] = 0
            if self._down.pop(name, None) is not None:
                log.info("engine %s answers again", name)

    def is_up(self, name: str) -> bool:
        return name not in self._down

    @property
    def engines(self) -> list[str]:
        return list(self._streak)


@dataclass
class ClaimStats:
    """The router's claim (blocks the engine will skip) against the engine's own
    ``usage.prompt_tokens_details.cached_tokens``: a claim that is often wrong means a render
    or hash mismatch (run ``kvforge doctor``)."""

    exact: int = 0
    over: int = 0  # claimed more than the engine reused
    under: int = 0
    over_blocks: int = 0
    under_blocks: int = 0
    unknown: int = 0  # the engine sent no cached_tokens (vLLM: --enable-prompt-tokens-details)

    def record(self, d: RouteDecision, usage: Any, block_size: int, tp: TokenizedPrompt) -> None:
        details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if not isinstance(cached, int):
            self.unknown += 1
            return
        engine = cached // block_size
        if engine == d.cached_blocks:
            self.exact += 1
            return
        if engine < d.cached_blocks:
            self.over += 1
            self.over_blocks += d.cached_blocks - engine
        else:
            self.under += 1
            self.under_blocks += engine - d.cached_blocks
        wrong = self.over + self.under
        if wrong & (wrong - 1) == 0:  # the 1st, 2nd, 4th ... wrong claim: never a log flood
            first = min(engine, d.cached_blocks)
            ids = list(tp.token_ids[first * block_size : (first + 1) * block_size])
            log.warning(
                "engine %s reused %d blocks where kvforge claimed %d (%d wrong claims so far): "
                "the first diverging block is %d, token ids %s; check the render and the hash "
                "configuration with `kvforge doctor`",
                d.engine,
                engine,
                d.cached_blocks,
                wrong,
                first,
                ids,
            )

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Proxy:
    client: httpx.AsyncClient
    health: EngineHealth
    claims: ClaimStats = field(default_factory=ClaimStats)


class _InFlight:
    def __init__(self) -> None:
        self._blocks: dict[str, int] = {}
        self._lock = threading.Lock()

    def loads(self) -> dict[str, float]:
        with self._lock:
            return {k: float(v) for k, v in self._blocks.items()}

    def add(self, engine: str, blocks: int) -> None:
        with self._lock:
            self._blocks[engine] = self._blocks.get(engine, 0) + blocks


def add_proxy(
    app: FastAPI,
    matcher: SyncMatcher,
    router: Router,
    deps: list[Any],
    tenant: Any,
    *,
    expose_decisions: bool = False,
    tenant_salt: TenantSalt | None = None,
    recorder: Recorder | None = None,
    scraper: LoadScraper | None = None,
) -> Proxy:
    """Add the two endpoints; returns the upstream client (the app closes it on shutdown),
    the engines' health and the claim accuracy. ``tenant`` is the service's ``X-Tenant``
    dependency (it scopes the tokenizer's cache and, with ``tenant_salt``, the salt every
    forwarded request carries).

    Failures: a request whose engine fails before its response starts (unreachable, timed
    out, a 5xx status) is sent once more, to the next-best engine of the same decision; an
    engine that keeps failing is taken out of rotation until a probe succeeds.

    Load: the prompt blocks this proxy has in flight on each engine, plus — with a
    ``scraper`` of the engines' own metrics — their waiting requests priced at the mean prompt
    size seen here (work queued by other routers or direct clients)."""
    engines = {n: e for n, e in router.engines.items() if e.url}
    inflight = _InFlight()
    client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0))
    state = Proxy(client, EngineHealth(list(engines)))
    health, claims = state.health, state.claims

    mean_blocks = [0.0]  # running mean of prompt blocks (prices a waiting request)

    def loads() -> dict[str, float]:
        out = inflight.loads()
        if scraper is not None and mean_blocks[0]:
            now = time.monotonic()
            for e in engines:
                out[e] = out.get(e, 0.0) + scraper.waiting(e, now) * mean_blocks[0]
        return out

    def decide(tp: TokenizedPrompt, body: dict[str, Any], t: str | None) -> RouteDecision:
        model = body.get("model")
        lora = model if isinstance(model, str) and model in _loras(router) else None
        usable = health.usable(list(engines), time.monotonic())
        d = router.route(
            tp,
            loads=loads(),
            cache_salt=body.get("cache_salt"),
            lora=lora,
            engines=usable,
            tenant=t,
        )
        mean_blocks[0] += (d.num_blocks - mean_blocks[0]) * (0.05 if mean_blocks[0] else 1.0)
        return d

    def next_best(d: RouteDecision, tried: set[str]) -> RouteDecision | None:
        left = [
            e
            for e in sorted(d.costs, key=d.costs.__getitem__)
            if e not in tried and health.is_up(e)
        ]
        if not left:
            return None
        e = left[0]
        held = int(d.scores.get(e, 0.0))  # its skippable prefix, tier-weighted
        return replace(
            d,
            engine=e,
            cached_blocks=held,
            reason=f"{d.reason}; retried after {', '.join(sorted(tried))} failed",
        )

    async def send(path: str, body: dict[str, Any], d: RouteDecision) -> httpx.Response | str:
        """The engine's response once it has started (a 5xx before any byte is a failure);
        or why it failed."""
        base = engines[d.engine].url
        assert base is not None  # the proxy routes among engines that have a URL only
        url = base.rstrip("/") + path
        try:
            upstream = await client.send(client.build_request("POST", url, json=body), stream=True)
        except httpx.TimeoutException:
            return "timeout"
        except httpx.HTTPError:
            return "unreachable"
        if upstream.status_code >= 500:
            await upstream.aclose()
            return f"status {upstream.status_code}"
        return upstream

    async def forward(
        path: str, body: dict[str, Any], d: RouteDecision, tp: TokenizedPrompt
    ) -> Response:
        tried: set[str] = set()
        cur: RouteDecision | None = d
        upstream: httpx.Response | str = "no engine"
        while cur is not None and len(tried) < 2:
            tried.add(cur.engine)
            inflight.add(cur.engine, cur.num_blocks)
            upstream = await send(path, body, cur)
            if not isinstance(upstream, str):
                health.ok(cur.engine)
                break
            inflight.add(cur.engine, -cur.num_blocks)
            health.failed(cur.engine, upstream.split()[0], time.monotonic())
            nxt = next_best(cur, tried) if len(tried) < 2 else None
            if nxt is not None:
                health.retries += 1
            cur = nxt
        if cur is None or isinstance(upstream, str):
            raise HTTPException(502, f"engines {', '.join(sorted(tried))} failed ({upstream})")
        d = cur
        bs = engines[d.engine].block_size
        headers = {"x-kvforge-engine": d.engine}
        if expose_decisions:
            headers["x-kvforge-cached-blocks"] = str(d.cached_blocks)
            headers["x-kvforge-prompt-blocks"] = str(d.num_blocks)
        passthrough = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
        ok = upstream.status_code == 200
        if body.get("stream"):
            stream = upstream

            async def relay() -> AsyncIterator[bytes]:
                tail = b""
                try:
                    async for chunk in stream.aiter_raw():
                        if ok:  # the usage chunk (stream_options.include_usage) comes last
                            tail = (tail + chunk)[-65536:]
                        yield chunk
                finally:
                    await stream.aclose()
                    inflight.add(d.engine, -d.num_blocks)
                    if ok:
                        claims.record(d, _stream_usage(tail), bs, tp)

            return StreamingResponse(
                relay(),
                status_code=upstream.status_code,
                headers={**passthrough, **headers},
                media_type="text/event-stream",
            )
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
            inflight.add(d.engine, -d.num_blocks)
        if ok:
            claims.record(d, _usage(content), bs, tp)
        return Response(
            content, status_code=upstream.status_code, headers={**passthrough, **headers}
        )

    async def read_json(request: Request, t: str | None) -> tuple[dict[str, Any], str | None]:
        """The body (salted for the tenant when configured) and the salt as recorded."""
        try:
            body = await request.json()
        except ValueError as exc:
            raise HTTPException(422, "body must be a JSON object") from exc
        if not isinstance(body, dict):
            raise HTTPException(422, "body must be a JSON object")
        # forwarded as UTF-8 JSON: a lone surrogate anywhere (an escape JSON allows) is refused
        # here, not met as an encoding error on the way out
        require_utf8_tree(body, "the body")
        given = body.get("cache_salt")
        if given is not None and not isinstance(given, str):
            raise HTTPException(422, "cache_salt must be a string")
        if tenant_salt is None:
            return body, given
        body["cache_salt"] = tenant_salt.salt(t, given)  # the engine hashes what we looked up
        # the recording keeps the sharing (one salt per tenant), never the derived value
        return body, f"tenant:{t or DEFAULT_TENANT}" + (f":{given}" if given else "")

    @app.post("/v1/chat/completions", dependencies=deps)
    async def chat(request: Request, t: str | None = Depends(tenant)) -> Response:
        body, salt = await read_json(request, t)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return JSONResponse({"detail": "'messages' must be a non-empty list"}, 422)
        # tokenizing and hashing are CPU work: keep them off the event loop; the matcher's
        # prompt limits apply here as on /v1/* (413)
        # rendered with the request's own options, as vLLM renders it
        chat = ChatOptions.from_fields(
            body.get("add_generation_prompt"),
            body.get("continue_final_message"),
            body.get("chat_template_kwargs"),
        )
        tp = await run_in_threadpool(
            matcher.tokenize, messages, tools=body.get("tools"), tenant=t, chat=chat
        )
        d = await run_in_threadpool(decide, tp, body, t)
        if recorder is not None:
            recorder.record(body, tp.token_ids, tenant=t, engine=d.engine, salt=salt)
        return await forward("/v1/chat/completions", body, d, tp)

    @app.post("/v1/completions", dependencies=deps)
    async def completions(request: Request, t: str | None = Depends(tenant)) -> Response:
        body, salt = await read_json(request, t)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]  # a batch: route by its first prompt
        if not isinstance(prompt, str | list) or not prompt:
            return JSONResponse({"detail": "'prompt' must be text or token ids"}, 422)
        tp = await run_in_threadpool(matcher.tokenize, prompt, tenant=t)
        d = await run_in_threadpool(decide, tp, body, t)
        if recorder is not None:
            recorder.record(body, tp.token_ids, tenant=t, engine=d.engine, salt=salt)
        return await forward("/v1/completions", body, d, tp)

    return state


def _usage(content: bytes) -> Any:
    try:
        doc = json.loads(content)
    except ValueError:
        return None
    return doc.get("usage") if isinstance(doc, dict) else None


def _stream_usage(tail: bytes) -> Any:
    """The usage of a streamed answer: the last ``data:`` event that carries one."""
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            usage = _usage(line[6:])
            if usage:
                return usage
    return None


def _loras(router: Router) -> set[str]:
    return {name for e in router.engines.values() for name in e.loras}
