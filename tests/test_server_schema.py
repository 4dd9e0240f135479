"""Property-based API testing with schemathesis against the server's own OpenAPI schema: whatever
the body (valid per the schema or not), no 5xx and no crash, and every response (status, content
type, JSON body, each server-sent event) is one the schema documents. Bounded: a few dozen examples per
operation on the tiny model, with max_tokens capped so that valid requests stay fast.

The cases come from each operation's hypothesis strategy (`APIOperation.as_strategy`) inside a plain
test, not from schemathesis' pytest plugin (`from_fixture`), which reaches into pytest's private
node attributes and broke with pytest 9.2."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from server_helpers import running_server

import argen

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def server_url():
    with running_server(argen.load("tiny-random"), max_batch=8, max_queue=64, max_tokens_limit=16) as (url, _):
        yield url


def operations(schema):
    found = [result.ok() for result in schema.get_all_operations()]
    assert found, "the schema has no operations"
    return found


def run_cases(operation, url: str, max_examples: int) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        case.call_and_validate(base_url=url, checks=CHECKS, timeout=60)

    check()


def test_no_server_errors(server_url):
    schema = schemathesis.openapi.from_url(f"{server_url}/openapi.json")
    for operation in operations(schema):
        run_cases(operation, server_url, 40)


def test_server_survived(server_url):
    r = httpx.post(f"{server_url}/v1/completions", json={"model": "tiny-random", "prompt": "still", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
