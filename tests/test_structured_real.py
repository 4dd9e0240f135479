"""Structured output on the default model: 20 JSON schemas of varied shape (tests/data/schemas.json:
nested objects, arrays, enums, bounded numbers, patterns, optional fields, anyOf), each answered in
one batch, greedy and sampled, by plain decoding and by every speculative proposer. Every output
parses and validates with `jsonschema`; an exact strategy under a schema gives plain's tokens under it
(greedy; sampled too where its drafts are deterministic, since the verifier draws with plain's noise)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonschema
import pytest
import torch
from helpers import PROPOSERS

from argen.engine import Request
from argen.neartie import NEAR_TIE, first_difference
from argen.sampling import SamplingParams
from argen.strategies import make_strategy

pytestmark = pytest.mark.real

CASES = json.loads((Path(__file__).parent / "data" / "schemas.json").read_text())
MAX_TOKENS = 192
SAMPLED = {"temperature": 0.8, "seed": 1234}
DETERMINISTIC_DRAFTS = {"prompt-lookup", "ngram", "jacobi"}  # layer-skip, draft-model sample their drafts


def response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def run(real, draft, name: str, options: dict) -> list:
    """All 20 cases in one batch (one packed forward pass a round)."""
    spec = (
        {"name": "plain"} if name == "plain" else PROPOSERS[name] | ({"draft": draft} if name == "draft-model" else {})
    )
    requests = [
        Request(
            real.encode(c["prompt"]),
            SamplingParams(max_new_tokens=MAX_TOKENS, response_format=response_format(c["schema"]), **options),
            real.prepare_strategy(dict(spec)),
        )
        for c in CASES
    ]
    return real.engine.run(requests)


@pytest.fixture(scope="module")
def plain(real):
    return {mode: run(real, None, "plain", options) for mode, options in (("greedy", {}), ("sampled", SAMPLED))}


def check_valid(results) -> None:
    for case, out in zip(CASES, results, strict=True):
        assert out.finish_reason == "stop", f"{case['prompt']!r}: cut at {MAX_TOKENS} tokens: {out.text[:80]!r}"
        jsonschema.validate(json.loads(out.text), case["schema"])


def masked_gap(real, case: dict, prompt_ids: list[int], prefix: list[int]) -> float:
    """The top-2 logit gap of Hugging Face's model after prompt + prefix, under the schema's mask."""
    with torch.inference_mode():
        logits = real.model.hf_model(torch.tensor([prompt_ids + prefix])).logits[0, -1]
    request = Request(
        prompt_ids, SamplingParams(response_format=response_format(case["schema"])), make_strategy("plain")
    )
    real.engine.validate(request)
    top = real.engine.constraint(request).apply(logits, prompt_ids + prefix).topk(2).values
    return float(top[0] - top[1])


def test_plain_outputs_parse_and_validate(plain):
    check_valid(plain["greedy"])
    check_valid(plain["sampled"])


def test_control_an_output_that_breaks_its_schema_fails_the_check(plain):
    """The check, given another schema's answer for the first case, must fail."""
    broken = list(plain["greedy"])
    broken[0] = dataclasses.replace(broken[0], text=broken[1].text)
    with pytest.raises(jsonschema.ValidationError):
        check_valid(broken)


@pytest.mark.parametrize("name", PROPOSERS)
def test_speculative_outputs_validate_and_equal_plain(real, draft, plain, name):
    greedy = run(real, draft, name, {})
    check_valid(greedy)
    near_ties = 0
    for case, out, ref in zip(CASES, greedy, plain["greedy"], strict=True):
        n = first_difference(out.token_ids, ref.token_ids)
        if n is not None:  # only a near-tie of the masked logits may part them (kernel order differs)
            gap = masked_gap(real, case, ref.prompt_ids, ref.token_ids[:n])
            assert gap < NEAR_TIE, f"{name} parts from plain on {case['prompt']!r} at token {n}, logit gap {gap:.2e}"
            near_ties += 1
    assert near_ties <= 2
    assert sum(out.stats.draft_tokens_accepted for out in greedy) > 0
    sampled = run(real, draft, name, SAMPLED)
    check_valid(sampled)
    if name in DETERMINISTIC_DRAFTS:
        same = sum(out.token_ids == ref.token_ids for out, ref in zip(sampled, plain["sampled"], strict=True))
        assert same >= len(CASES) - 2, f"{name} sampled: only {same} of {len(CASES)} equal plain's"
