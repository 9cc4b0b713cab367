"""Every endpoint under hostile input (hypothesis): huge, negative and float ids, booleans,
NaN and infinities, lone surrogates, null bytes, megabyte strings, wrong shapes, unknown
fields, odd tenants and agent ids. Whatever comes in: never a 500, a refused call changes
nothing, and an error never echoes the input back.

``KVFORGE_FUZZ_EXAMPLES`` raises the number of examples (default 150 per endpoint group); the
counts of one run are printed with ``-s``."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from conftest import serve
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvforge import PromptTokenizer, SyncMatcher
from kvforge.blocks import BlockHasher
from kvforge.route import EngineConfig, Router
from kvforge.serve import create_app
from kvforge.sim import SimEngine
from kvforge.sim.standin import standin_app

EXAMPLES = int(os.environ.get("KVFORGE_FUZZ_EXAMPLES", "150"))
SEEN: Counter[str] = Counter()

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 151_643, 151_642, 2**31, 2**32, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["\ud800", "a\x00b", "<|im_start|>", "\u202e", "ok", "", " " * 300]),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
_ids = st.lists(st.integers(min_value=-5, max_value=160_000), max_size=80)
_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool", "", "x"]) | _scalars,
        "content": st.text(max_size=60) | _values,
    },
    optional={"tool_calls": _values, "name": _values},
)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "prompt": st.text(max_size=200) | _values,
    "messages": st.lists(_message, max_size=4) | _values,
    "token_ids": _ids | _values,
    "tools": st.lists(st.dictionaries(st.sampled_from(["type", "function"]), _values)) | _values,
    "cache_salt": st.text(max_size=20) | _values,
    "lora_name": st.text(max_size=10) | _values,
    "lora_path": st.text(max_size=10) | _values,
    "agent_id": st.text(max_size=30) | st.just("a" * 1_000_000) | _values,
    "exclude_agent": st.text(max_size=10) | _values,
    "loads": st.dictionaries(st.sampled_from(["e0", "e1", "x"]), _values) | _values,
    "lora": st.text(max_size=10) | _values,
    "add_generation_prompt": _values,
    "continue_final_message": _values,
    "chat_template_kwargs": st.dictionaries(st.text(max_size=10), _values) | _values,
    "model": _values,
    "stream": _values,
    "max_tokens": _values,
    "junk_field": _values,
}
_body = st.one_of(
    st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), max_size=6).flatmap(
        lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys})
    ),
    _values,  # not even an object
)
_tenant = st.one_of(
    st.none(),
    st.text(max_size=20).filter(lambda t: t.isascii()),
    st.just("t" * 300),
    st.just("acme"),
)
PATHS = [
    "/v1/index",
    "/v1/match",
    "/v1/prefix-hash",
    "/v1/route",
    "/v1/chat/completions",
    "/v1/completions",
]


def _encode(body: Any) -> bytes:
    # NaN / Infinity as the bare literals some clients send; lone surrogates as JSON escapes
    return json.dumps(body, allow_nan=True, ensure_ascii=True).encode()


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[TestClient, SyncMatcher]]:
    tk = PromptTokenizer.qwen3()
    sim = SimEngine("e0", 4096)
    with serve(standin_app(sim, BlockHasher(), tk)) as url:
        router = Router([EngineConfig("e0", url=url), EngineConfig("e1")], speculative_ttl=0)
        m = SyncMatcher(tokenizer=tk, max_prompt_tokens=4_000, max_agents_per_tenant=50)
        # one event loop for the whole run (the proxy's upstream client lives in it)
        with TestClient(create_app(m, router=router, max_body_bytes=2_000_000)) as client:
            keep = {"agent_id": "keep", "token_ids": list(range(100, 164))}
            assert client.post("/v1/index", json=keep).status_code == 200
            yield client, m
    calls = sum(v for k, v in SEEN.items() if k.endswith("xx"))
    print(f"\nfuzz: {calls} calls; by status class and outcome: {dict(sorted(SEEN.items()))}")


def _state(m: SyncMatcher) -> tuple[Any, ...]:
    recs = m.export()
    return tuple(sorted((r.tenant, r.info.owner, r.tokens.tobytes()) for r in recs))


def _check(client: TestClient, m: SyncMatcher, method: str, path: str, **kw: Any) -> None:
    before = _state(m)
    r = client.request(method, path, **kw)
    SEEN[f"{r.status_code // 100}xx"] += 1
    assert r.status_code < 500 or r.status_code == 502, (path, r.status_code, r.text[:300])
    if r.status_code >= 400:
        changed = _state(m) != before
        SEEN["refused, state changed"] += changed
        assert not changed, (path, r.status_code)  # a refused call changed nothing
        assert len(r.content) < 4_000, "an error must not echo the input"
        if r.headers.get("content-type", "").startswith("application/json"):
            assert "detail" in r.json()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(PATHS), body=_body, tenant=_tenant)
def test_post_endpoints_never_fail_on_hostile_bodies(
    service: tuple[TestClient, SyncMatcher], path: str, body: Any, tenant: str | None
) -> None:
    client, m = service
    headers = {"content-type": "application/json"}
    if tenant is not None:
        headers["X-Tenant"] = tenant
    _check(client, m, "POST", path, content=_encode(body), headers=headers)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    agent=st.text(min_size=1, max_size=40) | st.just("x" * 5000) | st.sampled_from(["..", "%2F"]),
    raw=st.binary(max_size=200),
    tenants=st.lists(st.sampled_from(["a", "b", "a\t", "z" * 257]), max_size=3),
)
def test_paths_headers_and_raw_bytes_never_fail(
    service: tuple[TestClient, SyncMatcher], agent: str, raw: bytes, tenants: list[str]
) -> None:
    client, m = service
    hdrs = [("X-Tenant", t) for t in tenants]
    # any character reaches the server percent-encoded (surrogates as their UTF-8-ish escapes)
    path = "/v1/agents/" + quote(agent, safe="", errors="surrogatepass")
    _check(client, m, "DELETE", path, headers=hdrs)
    _check(client, m, "GET", "/v1/agents", headers=hdrs)
    _check(client, m, "GET", "/v1/stats", headers=hdrs)
    for path in PATHS:
        _check(client, m, "POST", path, content=raw, headers=hdrs)


def test_the_fuzzer_reaches_the_handlers(service: tuple[TestClient, SyncMatcher]) -> None:
    """A fuzzer that only ever hits the body validator proves little: valid calls get 2xx."""
    client, _ = service
    for path in PATHS[:4]:
        body = {"token_ids": [1, 2, 3] * 20}
        if path == "/v1/index":
            body["agent_id"] = "fuzz-ok"
        assert client.post(path, json=body).status_code == 200, path
    r = client.post(
        "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 200 and not math.isnan(r.json()["usage"]["prompt_tokens"])


def test_deep_nesting_and_hidden_surrogates_are_refused(
    service: tuple[TestClient, SyncMatcher],
) -> None:
    client, m = service
    deep: Any = "\ud800"
    for _ in range(100):
        deep = [deep]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/match"):
        body = {"model": deep, "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
        if path == "/v1/match":
            body = {"messages": [{"role": "user", "content": "x", "extra": deep}]}
        _check(
            client,
            m,
            "POST",
            path,
            content=_encode(body),
            headers={"content-type": "application/json"},
        )
        assert (
            client.post(
                path, content=_encode(body), headers={"content-type": "application/json"}
            ).status_code
            == 422
        )
