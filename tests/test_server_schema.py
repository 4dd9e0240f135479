"""Property-based API testing with schemathesis against the server's own OpenAPI schema: whatever
the body (valid per the schema or not), no 5xx and no crash, and every response (status, content
type, JSON body, each server-sent event) is one the schema documents. Bounded: a few dozen examples per
operation on the tiny model, with max_tokens capped so that valid requests stay fast.

A second run widens the schema where careless clients go: every strategy's options, and the
sampling fields, may also be strings, NaN or +-Infinity (sent as JSON's non-standard NaN and
Infinity tokens, which Python's JSON reader accepts), numbers of any size, flags, lists.

The cases come from each operation's hypothesis strategy (`APIOperation.as_strategy`) inside a plain
test, not from schemathesis' pytest plugin (`from_fixture`), which reaches into pytest's private
node attributes and broke with pytest 9.2."""

from __future__ import annotations

import copy
import json

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
from argen.server.companions import Companions
from argen.strategies import REGISTRY, strategy_options

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def server_url():
    gen = argen.load("tiny-random")
    companions = Companions.load(gen, "tiny-random", ["small=tiny-random@1"], ["g=tiny-random@2"])
    with running_server(gen, max_batch=8, max_queue=64, max_tokens_limit=16, companions=companions) as (url, _):
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


# -- the widened run ---------------------------------------------------------------------------
NAN_JSON = "application/vnd.argen-nan+json"  # FastAPI reads any +json body as JSON
NON_FINITE = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
# A stand-in for a non-finite number, {"non-finite": "NaN"}: an object, so that hypothesis-jsonschema
# cannot fold it into the string alternative (an enum of strings would be, and then rarely drawn).
STAND_IN = {
    "type": "object",
    "required": ["non-finite"],
    "additionalProperties": False,
    "properties": {"non-finite": {"enum": list(NON_FINITE)}},
}
SAMPLING_FIELDS = [
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "max_tokens",
    "max_completion_tokens",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "stream",
    "ignore_eos",
    "return_token_ids",
    "logprobs",
    "top_logprobs",
    "echo",
    "stop_token_ids",
    "min_tokens",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "prompt_logprobs",
    "add_generation_prompt",
    "continue_final_message",
    "store",
    "service_tier",
]
ANY_VALUE = {
    "anyOf": [
        {"type": "integer"},
        {"type": "number"},
        {"type": "string", "maxLength": 20},
        {"type": "boolean"},
        STAND_IN,
        {"type": "null"},
        {"type": "array", "items": {"type": "integer"}, "maxItems": 4},
    ]
}
COMPANIONS = {"enum": ["small", "g", "tiny-random", "default", "/etc/passwd", "~/x.gguf"]}


@schemathesis.serializer(NAN_JSON)
def _json_with_non_finite(ctx, value) -> bytes:
    """JSON with each stand-in written as NaN, Infinity or -Infinity."""

    def swap(v):
        if isinstance(v, dict) and list(v) == ["non-finite"]:
            return NON_FINITE[v["non-finite"]]
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        return [swap(x) for x in v] if isinstance(v, list) else v

    return json.dumps(swap(value)).encode()


def widened(schema: dict, sampling: bool) -> dict:
    """The schema with strategy objects per strategy (every option of any JSON type, or NaN and
    Infinity) and, if `sampling`, the sampling fields open to strings and non-finite numbers."""
    schema = copy.deepcopy(schema)
    strategies = [
        {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {"name": {"const": name}}
            | {
                option: {"anyOf": [ANY_VALUE, COMPANIONS]} if option in cls.companion_options else ANY_VALUE
                for option in strategy_options(cls)
            },
        }
        for name, cls in REGISTRY.items()
    ]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        properties = schema["components"]["schemas"][name]["properties"]
        if sampling:
            properties["strategy"] = {"anyOf": [{"enum": sorted(REGISTRY)}, *strategies]}
        else:  # every case carries a strategy object (hypothesis would mostly pick the name form)
            properties["strategy"] = {"anyOf": strategies}
            schema["components"]["schemas"][name]["required"].append("strategy")
        for field in SAMPLING_FIELDS if sampling else ():
            if field in properties:
                properties[field] = {"anyOf": [properties[field], {"type": "string"}, STAND_IN]}
    for path in schema["paths"].values():
        for operation in path.values():
            content = operation.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                content[NAN_JSON] = content.pop("application/json")
    return schema


@pytest.mark.parametrize("sampling", [True, False], ids=["sampling-and-strategy", "strategy"])
def test_no_server_errors_for_any_option_type_or_non_finite_number(server_url, sampling):
    spec = widened(httpx.get(f"{server_url}/openapi.json").json(), sampling)
    schema = schemathesis.openapi.from_dict(spec)
    posts = [op for op in operations(schema) if op.method.upper() == "POST" and op.path.endswith("completions")]
    assert len(posts) == 2
    for operation in posts:
        run_cases(operation, server_url, 60)


def test_server_survived(server_url):
    r = httpx.post(f"{server_url}/v1/completions", json={"model": "tiny-random", "prompt": "still", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
