"""The response models say exactly what the endpoints answer (the schema tests rely on it)."""

from __future__ import annotations

import json

import numpy as np
from fastapi.testclient import TestClient

from kvforge import SyncMatcher
from kvforge.serve import create_app
from kvforge.serve.responses import MatchResponse, StatsResponse


def _ids(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(1000, 100_000, n).tolist()


def test_a_full_report_is_its_model_key_for_key() -> None:
    rng = np.random.default_rng(3)
    system, extra, doc = _ids(rng, 64), _ids(rng, 20), _ids(rng, 320)
    m = SyncMatcher()
    m.index_prompt("planner", system + extra + doc)
    near = list(doc[:32])
    near[5] += 1  # one differing token: a near-duplicate block
    m.index_prompt("coder", _ids(rng, 48) + near)
    r = m.find_reusable_blocks(system + doc + near[:16])
    d = json.loads(json.dumps(r.to_dict()))
    # every kind of content the model describes is present, so the check below covers it
    kinds = {b["kind"] for b in d["blocks"]}
    assert {"exact", "none"} <= kinds and ("near" in kinds or "moved" in kinds)
    assert d["fixes"] and d["moved_spans"] and d["divergence"] is not None
    # nothing dropped, nothing added, nothing of another type (extra keys are refused)
    assert MatchResponse.model_validate(d).model_dump(mode="json") == d


def test_the_schema_documents_match_and_stats_responses() -> None:
    c = TestClient(create_app(SyncMatcher()))
    spec = c.get("/openapi.json").json()
    match = spec["paths"]["/v1/match"]["post"]["responses"]["200"]["content"]
    stats = spec["paths"]["/v1/stats"]["get"]["responses"]["200"]["content"]
    assert match["application/json"]["schema"]["$ref"].endswith("/MatchResponse")
    assert stats["application/json"]["schema"]["$ref"].endswith("/StatsResponse")
    body = c.get("/v1/stats").json()
    assert StatsResponse.model_validate(body).model_dump(exclude_unset=True) == body
    assert body["tenant"] is None and "events" not in body  # no router: no router sections
