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

import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from kvforge.match import SyncMatcher
from kvforge.route import RouteDecision, Router
from kvforge.route.tenancy import DEFAULT_TENANT, TenantSalt
from kvforge.serve.record import Recorder
from kvforge.tokenize import ChatOptions, TokenizedPrompt
from kvforge.validate import require_utf8_tree

HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding"}


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
) -> httpx.AsyncClient:
    """Add the two endpoints; returns the upstream client (the app closes it on shutdown).
    ``tenant`` is the service's ``X-Tenant`` dependency (it scopes the tokenizer's cache and,
    with ``tenant_salt``, the salt every forwarded request carries)."""
    engines = {n: e for n, e in router.engines.items() if e.url}
    inflight = _InFlight()
    client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0))

    def decide(tp: TokenizedPrompt, body: dict[str, Any], t: str | None) -> RouteDecision:
        model = body.get("model")
        lora = model if isinstance(model, str) and model in _loras(router) else None
        return router.route(tp, loads=inflight.loads(), cache_salt=body.get("cache_salt"),
                            lora=lora, engines=list(engines), tenant=t)  # fmt: skip

    async def forward(path: str, body: dict[str, Any], d: RouteDecision) -> Response:
        url = engines[d.engine].url.rstrip("/") + path  # type: ignore[union-attr]
        headers = {"x-kvforge-engine": d.engine}
        if expose_decisions:
            headers["x-kvforge-cached-blocks"] = str(d.cached_blocks)
            headers["x-kvforge-prompt-blocks"] = str(d.num_blocks)
        inflight.add(d.engine, d.num_blocks)
        try:
            req = client.build_request("POST", url, json=body)
            upstream = await client.send(req, stream=True)
        except httpx.HTTPError as exc:
            inflight.add(d.engine, -d.num_blocks)
            raise HTTPException(502, f"engine {d.engine} unreachable: {exc}") from exc
        passthrough = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
        if body.get("stream"):

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in upstream.aiter_raw():
                        yield chunk
                finally:
                    await upstream.aclose()
                    inflight.add(d.engine, -d.num_blocks)

            return StreamingResponse(relay(), status_code=upstream.status_code,
                                     headers={**passthrough, **headers},
                                     media_type="text/event-stream")  # fmt: skip
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
            inflight.add(d.engine, -d.num_blocks)
        return Response(content, status_code=upstream.status_code,
                        headers={**passthrough, **headers})  # fmt: skip

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
            body.get("add_generation_prompt"), body.get("continue_final_message"),
            body.get("chat_template_kwargs"),
        )  # fmt: skip
        tp = await run_in_threadpool(
            matcher.tokenize, messages, tools=body.get("tools"), tenant=t, chat=chat
        )
        d = await run_in_threadpool(decide, tp, body, t)
        if recorder is not None:
            recorder.record(body, tp.token_ids, tenant=t, engine=d.engine, salt=salt)
        return await forward("/v1/chat/completions", body, d)

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
        return await forward("/v1/completions", body, d)

    return client


def _loras(router: Router) -> set[str]:
    return {name for e in router.engines.values() for name in e.loras}
