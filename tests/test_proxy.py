"""The OpenAI-compatible routing proxy, driven by the official openai client, in front of two
engine stand-ins that speak the OpenAI API and publish real vLLM KV events over ZMQ."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pytest
import zmq
from conftest import serve

from kvforge import PromptTokenizer, SyncMatcher
from kvforge.blocks import BlockHasher
from kvforge.events.publisher import EventPublisher
from kvforge.route import EngineConfig, Router
from kvforge.serve import create_app
from kvforge.sim import SimEngine
from kvforge.sim.standin import standin_app


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[openai.OpenAI, Router, list[SimEngine]]]:
    ctx = zmq.Context()
    tk = PromptTokenizer.qwen3()
    hasher = BlockHasher()
    pubs = [
        EventPublisher(
            "tcp://127.0.0.1:*",
            replay_endpoint="tcp://127.0.0.1:*",
            topic=f"kv@e{i}@m",
            context=ctx,
        )
        for i in range(2)
    ]
    engines = [SimEngine(f"e{i}", 4096, publisher=p) for i, p in enumerate(pubs)]
    with (
        serve(standin_app(engines[0], hasher, tk)) as u0,
        serve(standin_app(engines[1], hasher, tk)) as u1,
    ):
        router = Router(
            [
                EngineConfig(
                    "e0",
                    url=u0,
                    events=pubs[0].endpoint,
                    replay=pubs[0].replay_endpoint,
                    topic="kv@e0@m",
                ),
                EngineConfig(
                    "e1",
                    url=u1,
                    events=pubs[1].endpoint,
                    replay=pubs[1].replay_endpoint,
                    topic="kv@e1@m",
                ),
            ]
        )
        with serve(
            create_app(SyncMatcher(tokenizer=tk), router=router, expose_decisions=True)
        ) as proxy:
            yield openai.OpenAI(base_url=proxy + "/v1", api_key="unused"), router, engines
    for p in pubs:
        p.close()
    ctx.term()


SYSTEM = "You are the planner of a code-review pipeline. " + " ".join(
    f"Rule {i}: keep change {i} small and tested." for i in range(40)
)


def test_siblings_land_on_the_engine_that_caches_their_prefix(cluster) -> None:
    client, router, _ = cluster
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Plan step one."}]
    raw = client.chat.completions.with_raw_response.create(model="standin", messages=msgs)
    first = raw.headers["x-kvforge-engine"]
    assert raw.parse().usage.prompt_tokens_details.cached_tokens == 0
    # the engine's BlockStored event reaches the proxy's subscriber
    deadline = time.monotonic() + 10
    while not router.residency.engine(first).blocks() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert router.residency.engine(first).blocks() > 0
    msgs2 = [msgs[0], {"role": "user", "content": "Plan step two."}]
    raw2 = client.chat.completions.with_raw_response.create(model="standin", messages=msgs2)
    assert raw2.headers["x-kvforge-engine"] == first
    assert int(raw2.headers["x-kvforge-cached-blocks"]) > 20
    cached = raw2.parse().usage.prompt_tokens_details.cached_tokens
    assert cached == int(raw2.headers["x-kvforge-cached-blocks"]) * 16  # the engine agrees


def test_streaming_and_completions(cluster) -> None:
    client, _, _ = cluster
    stream = client.chat.completions.create(
        model="standin", messages=[{"role": "user", "content": "hi " * 50}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == "Sure, done."
    done = client.completions.create(model="standin", prompt="Complete this sentence. " * 20)
    assert done.choices[0].text == "Sure, done."
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="standin", messages=[])


def test_render_options_are_rendered_as_the_engine_renders_them(cluster) -> None:
    """vLLM's add_generation_prompt / continue_final_message / chat_template_kwargs change the
    rendered prompt; the proxy routes the prompt the engine will see (lengths chosen so that
    ignoring the options would change the number of full blocks)."""
    from kvforge.tokenize import ChatOptions

    client, _, _ = cluster
    tk = PromptTokenizer.qwen3()
    opts = {
        "add_generation_prompt": False,
        "continue_final_message": True,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    chat = ChatOptions(False, True, {"enable_thinking": False})
    for pad in range(64):
        msgs = [
            {"role": "user", "content": "Explain prefix caching." + " more" * pad},
            {"role": "assistant", "content": "Prefix caching keeps"},
        ]
        n_with, n_without = len(tk.encode_chat(msgs, chat=chat)), len(tk.encode_chat(msgs))
        if n_with // 16 != n_without // 16:
            break
    raw = client.chat.completions.with_raw_response.create(
        model="standin", messages=msgs, extra_body=opts
    )
    assert int(raw.headers["x-kvforge-prompt-blocks"]) == n_with // 16
    assert raw.parse().usage.prompt_tokens == n_with  # the engine rendered the same
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(
            model="standin", messages=msgs, extra_body={"continue_final_message": True}
        )


def test_decisions_are_private_by_default() -> None:
    """Without the operator's say-so, neither /v1/route nor the proxy tells a caller how many
    blocks of a prompt some engine holds (an oracle on other tenants' prompts)."""
    from fastapi.testclient import TestClient

    from kvforge.blocks import chain_keys

    router = Router([EngineConfig("e0"), EngineConfig("e1")], speculative_ttl=0)
    ids = list(range(1000, 1064))
    router.residency.store("e1", chain_keys(BlockHasher().chain(ids)).tolist())
    c = TestClient(create_app(SyncMatcher(), router=router))
    d = c.post("/v1/route", json={"token_ids": ids}).json()
    assert d == {"engine": "e1", "num_blocks": 4}


def test_tenants_get_their_own_salt_end_to_end() -> None:
    """With a tenant-salt secret, the proxy salts each tenant's requests: the engine caches a
    prompt for the tenant that sent it and for nobody else, and the router agrees."""
    from kvforge.route.tenancy import TenantSalt

    ctx = zmq.Context()
    tk = PromptTokenizer.qwen3()
    pub = EventPublisher("tcp://127.0.0.1:*", topic="kv", context=ctx)
    salts = TenantSalt(b"0123456789abcdef-secret")
    try:
        with serve(standin_app(SimEngine("e0", 4096, publisher=pub), BlockHasher(), tk)) as u0:
            router = Router(
                [EngineConfig("e0", url=u0, events=pub.endpoint, topic="kv")], speculative_ttl=0
            )
            app_ = create_app(
                SyncMatcher(tokenizer=tk), router=router, expose_decisions=True, tenant_salt=salts
            )
            with serve(app_) as proxy:
                client = openai.OpenAI(base_url=proxy + "/v1", api_key="unused")
                msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Go."}]

                def ask(tenant: str) -> tuple[int, int]:
                    raw = client.chat.completions.with_raw_response.create(
                        model="standin", messages=msgs, extra_headers={"X-Tenant": tenant}
                    )
                    cached = raw.parse().usage.prompt_tokens_details.cached_tokens
                    return cached, int(raw.headers["x-kvforge-cached-blocks"])

                assert ask("acme") == (0, 0)
                deadline = time.monotonic() + 10  # acme's blocks reach the router as events
                while not router.residency.engine("e0").blocks() and time.monotonic() < deadline:
                    time.sleep(0.05)
                acme = ask("acme")
                assert acme[0] > 0 and acme[0] == acme[1] * 16  # engine and router agree
                assert ask("globex") == (0, 0)  # the same prompt, another tenant: nothing
    finally:
        pub.close()
        ctx.term()


def test_recording_proxied_requests_as_a_trace(tmp_path) -> None:
    """serve --record: each proxied request becomes a trace line that analyze replays to the
    same prompt the engine saw; redaction keeps token ids only; the file rotates, bounded."""
    from kvforge.analyze import analyze, read_trace
    from kvforge.route.tenancy import TenantSalt
    from kvforge.serve.record import Recorder

    tk = PromptTokenizer.qwen3()
    pub = EventPublisher("tcp://127.0.0.1:*", topic="kv")
    plain, redacted = (
        Recorder(tmp_path / "rec.jsonl"),
        Recorder(tmp_path / "red.jsonl", redact=True),
    )
    seen_tokens = []
    try:
        with serve(standin_app(SimEngine("e0", 4096, publisher=pub), BlockHasher(), tk)) as u0:
            for rec, salts in ((plain, TenantSalt(b"secret-secret-secret")), (redacted, None)):
                router = Router([EngineConfig("e0", url=u0)], speculative_ttl=0)
                app_ = create_app(
                    SyncMatcher(tokenizer=tk), router=router, recorder=rec, tenant_salt=salts
                )
                with serve(app_) as proxy:
                    client = openai.OpenAI(base_url=proxy + "/v1", api_key="unused")
                    msgs = [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": "Plan."},
                    ]
                    r = client.chat.completions.create(
                        model="standin",
                        messages=msgs,
                        user="planner",
                        max_tokens=9,
                        extra_headers={"X-Tenant": "acme"},
                        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
                    )
                    seen_tokens.append(r.usage.prompt_tokens)
                    client.completions.create(model="standin", prompt="Summarize. " * 30)
    finally:
        pub.close()
    plain.flush()
    redacted.flush()
    lines = [json.loads(x) for x in (tmp_path / "rec.jsonl").read_text().splitlines()]
    assert [x["agent_id"] for x in lines] == ["planner", "default"]
    first = lines[0]
    assert first["tenant"] == "acme" and first["engine"] == "e0" and first["max_tokens"] == 9
    assert first["cache_salt"] == "tenant:acme"  # the derived salt itself is never written
    assert first["chat_template_kwargs"] == {"enable_thinking": False}
    # analyze replays the recording to the prompt the engine rendered
    res = analyze(read_trace(tmp_path / "rec.jsonl"), SyncMatcher(tokenizer=tk))
    assert res.agents["planner"].prompt_tokens == seen_tokens[0]
    red = [json.loads(x) for x in (tmp_path / "red.jsonl").read_text().splitlines()]
    assert "messages" not in red[0] and "prompt" not in red[1]
    assert len(red[0]["token_ids"]) == seen_tokens[1]
    plain.close()
    redacted.close()
    # bounded: past max_bytes the file rotates; `keep` old files, no more
    small = Recorder(tmp_path / "rot.jsonl", max_bytes=2_000, keep=2)
    for i in range(200):
        small.record({"prompt": f"request {i} " * 10}, (), tenant=None, engine="e0", salt=None)
    small.flush()
    small.close()
    files = sorted(p.name for p in tmp_path.glob("rot.jsonl*"))
    assert files == ["rot.jsonl", "rot.jsonl.1", "rot.jsonl.2"] and small.rotations > 2
    assert small.written == 200 and all(p.stat().st_size < 2_500 for p in tmp_path.glob("rot*"))
    last = json.loads((tmp_path / "rot.jsonl").read_text().splitlines()[-1])
    assert last["prompt"].startswith("request 199")


def _proxy_over(
    n: int, engine_tk: PromptTokenizer | None = None
) -> tuple[Any, list[Any], Router, list[EventPublisher]]:
    """n stand-in engines (each in its own exit stack, so a test can kill one) and a proxy;
    ``engine_tk``: the engines render with this tokenizer instead of the proxy's."""
    tk = PromptTokenizer.qwen3()
    pubs = [EventPublisher("tcp://127.0.0.1:*", topic=f"kv{i}") for i in range(n)]
    stacks, urls = [], []
    for i, p in enumerate(pubs):
        st = ExitStack()
        engine = SimEngine(f"e{i}", 4096, publisher=p)
        urls.append(st.enter_context(serve(standin_app(engine, BlockHasher(), engine_tk or tk))))
        stacks.append(st)
    router = Router(
        [
            EngineConfig(f"e{i}", url=u, events=p.endpoint, topic=f"kv{i}")
            for i, (u, p) in enumerate(zip(urls, pubs, strict=True))
        ],
        speculative_ttl=0,
    )
    app_ = create_app(SyncMatcher(tokenizer=tk), router=router)
    return app_, stacks, router, pubs


def test_claims_are_checked_against_the_engines_cached_tokens() -> None:
    """Every answer's usage.prompt_tokens_details.cached_tokens is compared with the claim:
    exact on a faithful engine; an engine whose chat template differs (so its tokens) shows up
    as under-claims — the signal to run ``kvforge doctor``."""
    from fastapi.testclient import TestClient

    from kvforge.tokenize import ChatTemplate

    q = PromptTokenizer.qwen3()
    assert q.template is not None
    edited = q.template.source.replace(
        "'<|im_start|>system\\n' + messages[0].content",
        "'<|im_start|>system\\n\\n' + messages[0].content",
    )
    assert edited != q.template.source
    other = PromptTokenizer(q._tk, ChatTemplate(edited, q.template._special), "edited")
    for engine_tk, outcome in ((None, "exact"), (other, "under")):
        app_, stacks, router, pubs = _proxy_over(1, engine_tk)
        try:
            with TestClient(app_) as c:
                msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
                for _ in range(4):
                    r = c.post("/v1/chat/completions", json={"model": "m", "messages": msgs})
                    assert r.status_code == 200
                    deadline = time.monotonic() + 5  # let the engine's events arrive
                    while (
                        not router.residency.engine("e0").blocks() and time.monotonic() < deadline
                    ):
                        time.sleep(0.05)
                claims = c.get("/v1/stats").json()["claims"]
                assert claims[outcome] >= 3, claims
                if outcome == "exact":
                    assert claims["over"] == claims["under"] == 0, claims
                metrics = c.get("/metrics").text
                assert f'kvforge_route_claims_total{{outcome="{outcome}"}}' in metrics
        finally:
            for st in stacks:
                st.close()
            for p in pubs:
                p.close()


def test_a_dead_engine_costs_the_clients_nothing() -> None:
    """Four engines, one killed mid-run: every request still answers 200 (retried once on the
    next-best engine), the dead one leaves the rotation, and it is all counted."""
    from fastapi.testclient import TestClient

    app_, stacks, _, pubs = _proxy_over(4)
    errors = 0
    try:
        with TestClient(app_) as c:
            for k in range(40):
                if k == 10:
                    stacks[2].close()  # engine e2 dies
                msgs = [{"role": "user", "content": f"Request {k}: " + "context " * 40}]
                r = c.post("/v1/chat/completions", json={"model": "m", "messages": msgs})
                errors += r.status_code != 200
                if k > 10:
                    assert r.headers["x-kvforge-engine"] != "e2" or k % 5 == 0
            stats = c.get("/v1/stats").json()
            metrics = c.get("/metrics").text
    finally:
        for st in stacks:
            st.close()
        for p in pubs:
            p.close()
    assert errors == 0
    assert stats["engines_up"]["e2"] is False and sum(stats["engines_up"].values()) == 3
    assert 'kvforge_engine_failures_total{engine="e2",kind="unreachable"}' in metrics
    assert "kvforge_proxy_retries_total" in metrics


def test_the_engines_own_queue_steers_cold_prompts() -> None:
    """An engine whose vLLM metrics report a long waiting queue (work this proxy did not
    send) is priced by it: cold prompts go elsewhere; when its queue drains they return."""
    from fastapi.testclient import TestClient

    from kvforge.route.load import parse_vllm_metrics

    tk = PromptTokenizer.qwen3()
    queue = {"e0": 0, "e1": 0}
    pubs = [EventPublisher("tcp://127.0.0.1:*", topic=f"kv{i}") for i in range(2)]
    with ExitStack() as st:
        urls = [
            st.enter_context(
                serve(
                    standin_app(
                        SimEngine(f"e{i}", 4096, publisher=p),
                        BlockHasher(),
                        tk,
                        waiting=lambda i=i: queue[f"e{i}"],
                    )
                )
            )
            for i, p in enumerate(pubs)
        ]
        text = httpx.get(urls[0] + "/metrics").text
        assert parse_vllm_metrics(text).waiting == 0
        router = Router(
            [EngineConfig(f"e{i}", url=u) for i, u in enumerate(urls)], speculative_ttl=0
        )
        app_ = create_app(SyncMatcher(tokenizer=tk), router=router, scrape_interval=0.1)
        with TestClient(app_) as c:

            def ask(k: int) -> str:
                msgs = [{"role": "user", "content": f"Cold prompt {k}. " + "words " * 200}]
                r = c.post("/v1/chat/completions", json={"model": "m", "messages": msgs})
                assert r.status_code == 200
                return str(r.headers["x-kvforge-engine"])

            ask(0)  # learns the prompt size
            queue["e0"] = 40  # e0's own queue grows (other clients)
            time.sleep(0.5)  # a few scrapes
            assert {ask(k) for k in range(1, 9)} == {"e1"}
            queue["e0"], queue["e1"] = 0, 40
            time.sleep(0.5)
            assert {ask(k) for k in range(9, 17)} == {"e0"}
    for p in pubs:
        p.close()
