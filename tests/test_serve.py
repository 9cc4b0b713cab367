"""The HTTP service: endpoints, tenants over HTTP, auth, size limits, metrics, a real server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from kvforge import SyncMatcher
from kvforge.blocks import BlockHasher, chain_keys
from kvforge.route import EngineConfig, Router
from kvforge.serve import create_app

SYSTEM = list(range(1000, 1064))


@pytest.fixture
def client() -> TestClient:
    return TestClient(create_app(SyncMatcher(max_prompt_tokens=5_000)))


def test_index_match_prefix_clear_stats(client: TestClient) -> None:
    r = client.post("/v1/index", json={"agent_id": "planner", "token_ids": SYSTEM + [5] * 20})
    assert r.status_code == 200 and r.json()["num_blocks"] == 5
    m = client.post("/v1/match", json={"token_ids": SYSTEM + [9] * 16}).json()
    assert m["prefix_blocks_by_owner"] == {"planner": 4}
    assert [b["kind"] for b in m["blocks"]] == ["exact"] * 4 + ["none"]
    p = client.post("/v1/prefix-hash", json={"token_ids": SYSTEM}).json()
    assert p["prefix_hash_hex"] == BlockHasher().chain(SYSTEM)[3].hex()
    assert client.get("/v1/agents").json() == {"agents": ["planner"]}
    assert client.get("/v1/stats").json()["blocks"] == 5
    assert client.delete("/v1/agents/planner").json() == {"removed_blocks": 5}
    assert client.get("/v1/stats").json()["blocks"] == 0


def test_stats_show_only_the_callers_tenant(client: TestClient) -> None:
    for t, n in (("acme", 3), ("globex", 2)):
        for k in range(n):
            r = client.post(
                "/v1/index",
                json={"agent_id": f"a{k}", "token_ids": SYSTEM + [k] * 32},
                headers={"X-Tenant": t},
            )
            assert r.status_code == 200
    acme = client.get("/v1/stats", headers={"X-Tenant": "acme"}).json()
    globex = client.get("/v1/stats", headers={"X-Tenant": "globex"}).json()
    assert (acme["tenant"], acme["agents"], acme["blocks"]) == ("acme", 3, 4 + 3 * 2)
    assert (globex["agents"], globex["blocks"], globex["tenants"]) == (2, 4 + 2 * 2, 1)
    other = client.get("/v1/stats", headers={"X-Tenant": "nobody"}).json()
    assert (other["agents"], other["blocks"], other["tenants"]) == (0, 0, 0)
    assert client.get("/v1/stats").json()["agents"] == 0  # the default tenant holds nothing


def test_chat_and_text_prompts(client: TestClient) -> None:
    msgs = [{"role": "system", "content": "You plan. " * 40}, {"role": "user", "content": "go"}]
    assert client.post("/v1/index", json={"agent_id": "a", "messages": msgs}).status_code == 200
    r = client.post("/v1/match", json={"messages": [*msgs[:1], {"role": "user", "content": "x"}]})
    assert r.json()["best_owner"] == "a" and r.json()["exact_blocks"] > 0


def test_tenants_are_isolated_over_http(client: TestClient) -> None:
    client.post(
        "/v1/index", json={"agent_id": "a", "token_ids": SYSTEM}, headers={"X-Tenant": "acme"}
    )
    other = client.post("/v1/match", json={"token_ids": SYSTEM}, headers={"X-Tenant": "globex"})
    assert other.json()["prefix_blocks_by_owner"] == {}
    same = client.post("/v1/match", json={"token_ids": SYSTEM}, headers={"X-Tenant": "acme"})
    assert same.json()["prefix_blocks_by_owner"] == {"a": 4}
    assert (
        client.delete("/v1/agents/a", headers={"X-Tenant": "globex"}).json()["removed_blocks"] == 0
    )


def test_bad_input_limits_and_nothing_half_applied(client: TestClient) -> None:
    client.post("/v1/index", json={"agent_id": "keep", "token_ids": SYSTEM})
    before = client.get("/v1/stats").json()
    assert client.post("/v1/index", json={"agent_id": "a"}).status_code == 422
    assert client.post("/v1/index", json={"agent_id": "", "token_ids": [1]}).status_code == 422
    assert client.post("/v1/index", json={"agent_id": "a", "token_ids": [-5]}).status_code == 422
    big = client.post("/v1/index", json={"agent_id": "a", "token_ids": [1] * 6_000})
    assert big.status_code == 413 and "limit" in big.json()["detail"]
    small = TestClient(create_app(SyncMatcher(), max_body_bytes=1_000))
    r = small.post("/v1/match", json={"token_ids": list(range(1000))})
    assert r.status_code == 413
    assert client.get("/v1/stats").json() == before


def test_bearer_auth() -> None:
    c = TestClient(create_app(SyncMatcher(), api_token="s3cret"))
    assert c.get("/healthz").status_code == 200
    assert c.get("/v1/stats").status_code == 401
    assert c.get("/v1/stats", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.get("/v1/stats", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/metrics").status_code == 401
    # the schema and the docs are not public either when a token is set
    assert c.get("/openapi.json").status_code == 401
    ok = c.get("/openapi.json", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and "/v1/match" in ok.json()["paths"]
    assert c.get("/docs").status_code == 404 and c.get("/redoc").status_code == 404
    open_ = TestClient(create_app(SyncMatcher()))
    assert open_.get("/openapi.json").status_code == 200 and open_.get("/docs").status_code == 200


def test_metrics_and_route() -> None:
    router = Router([EngineConfig("e0"), EngineConfig("e1")], speculative_ttl=0)
    router.residency.store("e1", chain_keys(BlockHasher().chain(SYSTEM)).tolist())
    c = TestClient(create_app(SyncMatcher(), router=router, expose_decisions=True))
    d = c.post("/v1/route", json={"token_ids": SYSTEM + [7] * 16}).json()
    assert d["engine"] == "e1" and d["cached_blocks"] == 4
    c.post("/v1/match", json={"token_ids": SYSTEM})
    text = c.get("/metrics").text
    assert 'kvforge_requests_total{endpoint="/v1/route",status="200"} 1.0' in text
    assert "kvforge_request_seconds_bucket" in text and "kvforge_index_blocks" in text
    assert (
        TestClient(create_app(SyncMatcher()))
        .post("/v1/route", json={"token_ids": SYSTEM})
        .status_code
        == 404
    )
    assert c.get("/openapi.json").json()["info"]["title"] == "kvforge"


def test_real_server_process() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "KVF_TOKEN": "tok"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvforge.cli.main",
            "serve",
            "--port",
            str(port),
            "--api-token-env",
            "KVF_TOKEN",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        h = {"Authorization": "Bearer tok"}
        r = httpx.post(
            url + "/v1/index",
            json={"agent_id": "a", "prompt": "hello " * 40},
            headers=h,
            timeout=30,
        )
        assert r.status_code == 200 and r.json()["num_blocks"] == 2
        assert httpx.get(url + "/v1/stats", timeout=5).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_render_options_on_the_api(client: TestClient) -> None:
    from kvforge import PromptTokenizer
    from kvforge.tokenize import ChatOptions

    msgs = [{"role": "system", "content": "You plan. " * 60}, {"role": "user", "content": "go"}]
    opts = {"add_generation_prompt": True, "chat_template_kwargs": {"enable_thinking": False}}
    want = len(PromptTokenizer.qwen3().encode_chat(msgs, chat=ChatOptions(**opts)))
    r = client.post("/v1/index", json={"agent_id": "p", "messages": msgs, **opts})
    assert r.status_code == 200 and r.json()["num_tokens"] == want
    m = client.post("/v1/match", json={"messages": msgs, **opts}).json()
    assert m["num_tokens"] == want and m["exact_blocks"] == want // 16
    plain = client.post("/v1/match", json={"messages": msgs}).json()
    assert plain["num_tokens"] == want - 4  # no "<think>\n\n</think>\n\n" after the header
    for bad in (
        {"messages": msgs, "continue_final_message": True},
        {"token_ids": [1, 2], "add_generation_prompt": False},
        {"messages": msgs, "chat_template_kwargs": {"messages": []}},
        {"messages": msgs, "add_generation_prompt": "no"},
    ):
        for path in ("/v1/match", "/v1/prefix-hash"):
            assert client.post(path, json=bad).status_code == 422, (path, bad)


def test_prompt_limits_are_a_typed_error_and_a_413() -> None:
    """The 413 comes from the error's type, not from its wording."""
    from kvforge import InvalidInputError, PromptTooLargeError

    m = SyncMatcher(max_prompt_tokens=100)
    with pytest.raises(PromptTooLargeError) as info:
        m.find_reusable_blocks(list(range(200)))
    assert isinstance(info.value, InvalidInputError)  # still a bad input to Python callers
    c = TestClient(create_app(m))
    assert c.post("/v1/match", json={"token_ids": list(range(200))}).status_code == 413
    assert c.post("/v1/match", json={"prompt": "x " * 300}).status_code == 413
    # another bad input that mentions a limit in its text is still a 422
    r = c.post("/v1/match", json={"token_ids": [-1]})
    assert r.status_code == 422
