"""Property-based API testing with schemathesis against the server's own OpenAPI schema: whatever
the body (valid per the schema or not), no 5xx and no crash, and every response (status, content
type, JSON body, each server-sent event) is one the schema documents. Bounded: a few dozen examples per
operation on the tiny model, with max_tokens capped so that valid requests stay fast."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from server_helpers import running_server

import argen


@pytest.fixture(scope="module")
def server_url():
    with running_server(argen.load("tiny-random"), max_batch=8, max_queue=64, max_tokens_limit=16) as (url, _):
        yield url


@pytest.fixture
def api_schema(server_url):
    return schemathesis.openapi.from_url(f"{server_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    case.call_and_validate(checks=checks, timeout=60)


def test_server_survived(server_url):
    r = httpx.post(f"{server_url}/v1/completions", json={"model": "tiny-random", "prompt": "still", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
