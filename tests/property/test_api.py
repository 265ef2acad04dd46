"""Property tier: requests generated from the API's own OpenAPI document never get a 5xx from the real API."""
from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowpool.devstack import Stack
from tests.helpers import Client

pytestmark = pytest.mark.property

SCRIPT = """\
INPUT_SCHEMA = {"q": {"type": "string"}}


def execute(ctx):
    return {"echo": ctx.input}
"""


def test_generated_requests_never_get_a_server_error(stack: Stack, client: Client) -> None:
    # A workflow and an application to find, so that generated refs sometimes hit something real.
    client.upload("fuzzed", SCRIPT)
    schema = schemathesis.openapi.from_url(f"{client.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 15
    session = requests.Session()
    session.headers["x-api-key"] = client.key
    failures: list[str] = []

    @settings(max_examples=500, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    # Valid requests (the routes' own paths) and invalid ones (bodies and queries that break the schema).
    @given(st.one_of([operation.as_strategy(generation_mode=mode) for operation in operations
                      for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)]))
    def check(case: schemathesis.Case) -> None:
        response = case.call(session=session, timeout=30)
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}")
        assert response.status_code < 500, failures[-1]

    check()
