"""Property-based API tests generated from the service's own OpenAPI schema (schemathesis):
no input, however odd, makes the service fail (5xx) or answer outside its schema."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from kvforge import SyncMatcher
from kvforge.blocks import BlockHasher, chain_keys
from kvforge.route import EngineConfig, Router
from kvforge.serve import create_app

_router = Router([EngineConfig("e0"), EngineConfig("e1")], speculative_ttl=0)
_router.residency.store("e1", chain_keys(BlockHasher().chain(list(range(64)))).tolist())
app = create_app(SyncMatcher(max_prompt_tokens=4096, max_prompt_chars=20_000), router=_router)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case) -> None:
    # A prompt body must hold exactly one of prompt / messages / token_ids: a cross-field rule
    # the generated schema does not encode, so "schema-valid" bodies may rightly get 422.
    # Every other check runs: no 5xx, documented status codes, responses matching the schema.
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
