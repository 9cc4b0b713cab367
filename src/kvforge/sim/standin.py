"""An engine stand-in that speaks the OpenAI API and publishes vLLM KV events.

It renders and tokenizes requests the way vLLM does (same tokenizer and chat template),
allocates them in a simulated vLLM block pool (`SimEngine`), publishes the resulting events over
ZMQ, and answers with a short canned completion whose ``usage.prompt_tokens_details.
cached_tokens`` reports the prefix-cache hit. For tests, demos and what-if runs of the proxy —
not an inference engine.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvforge.blocks import BlockHasher, BlockSequence
from kvforge.sim.engine import SimEngine
from kvforge.tokenize import ChatOptions, PromptTokenizer

REPLY = ["Sure", ",", " done", "."]


def standin_app(
    engine: SimEngine,
    hasher: BlockHasher,
    tokenizer: PromptTokenizer,
    *,
    waiting: Callable[[], int] | None = None,
) -> FastAPI:
    """``waiting``: the queue the stand-in reports in its metrics (it answers instantly, so
    it has none of its own; tests give it one)."""
    app = FastAPI(title=f"kvforge engine stand-in {engine.name}")

    def admit(token_ids: tuple[int, ...], salt: str | None) -> int:
        keys = BlockSequence(hasher, token_ids, cache_salt=salt).chain_keys.tolist()
        adm = engine.admit(keys, token_ids)
        engine.release(adm.blocks)  # the canned answer is instant: free right away
        return adm.hit_blocks * hasher.block_size

    def answer(body: dict[str, Any], n_prompt: int, cached: int, chat: bool) -> Any:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:12]}"
        usage = {
            "prompt_tokens": n_prompt,
            "completion_tokens": len(REPLY),
            "total_tokens": n_prompt + len(REPLY),
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        base = {"id": rid, "created": int(time.time()), "model": body.get("model", "standin")}
        if not body.get("stream"):
            text = "".join(REPLY)
            choice: dict[str, Any] = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                if chat
                else {"index": 0, "text": text, "finish_reason": "stop"}
            )
            kind = "chat.completion" if chat else "text_completion"
            return JSONResponse({**base, "object": kind, "choices": [choice], "usage": usage})

        def events() -> Iterator[bytes]:
            kind = "chat.completion.chunk" if chat else "text_completion"
            for i, piece in enumerate(REPLY):
                done = "stop" if i == len(REPLY) - 1 else None
                choice: dict[str, Any] = {"index": 0, "finish_reason": done}
                choice.update({"delta": {"content": piece}} if chat else {"text": piece})
                chunk = {**base, "object": kind, "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        chat_opts = ChatOptions.from_fields(
            body.get("add_generation_prompt"),
            body.get("continue_final_message"),
            body.get("chat_template_kwargs"),
        )
        tp = tokenizer.encode_chat(body["messages"], tools=body.get("tools"), chat=chat_opts)
        cached = admit(tp.token_ids, body.get("cache_salt"))
        return answer(body, len(tp), cached, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        prompt = body["prompt"]
        tp = tokenizer.tokenize(prompt if isinstance(prompt, str | list) else str(prompt))
        cached = admit(tp.token_ids, body.get("cache_salt"))
        return answer(body, len(tp), cached, chat=False)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Any:
        """vLLM's /tokenize: a completions body (``prompt``) or a chat one (``messages``, with
        ``tools`` and the render options)."""
        body = await request.json()
        if "messages" in body:
            opts = ChatOptions.from_fields(
                body.get("add_generation_prompt"),
                body.get("continue_final_message"),
                body.get("chat_template_kwargs"),
            )
            tp = tokenizer.encode_chat(body["messages"], tools=body.get("tools"), chat=opts)
        else:
            tp = tokenizer.tokenize(body["prompt"])
        return {
            "count": len(tp),
            "max_model_len": 32768,
            "tokens": list(tp.token_ids),
            "token_strs": None,
        }

    @app.get("/metrics")
    def metrics() -> Response:
        """vLLM's gauges, by their names."""
        usage = engine.active_blocks / engine.usable_blocks
        text = (
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="standin"}} {engine.running}\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="standin"}} {waiting() if waiting else 0}\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{model_name="standin"}} {usage}\n'
        )
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "standin", "object": "model"}]}

    return app
