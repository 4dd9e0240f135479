"""Structured output (constraints.py): every output follows its grammar, under every strategy that
decides tokens through the sampler; exact strategies under a grammar equal plain under it; bad
grammars are refused with a message. The real model's 20 JSON schemas: test_structured_real.py."""

from __future__ import annotations

import json
import re

import pytest

from argen.errors import InvalidRequestError
from argen.strategies.speculative.base import Speculative
from argen.strategies.speculative.tree import DraftTree

REGEX = r"[a-c]{2}-[0-9]{1,3}(x|yz)"
EXACT = ["prompt-lookup", "ngram", "jacobi", {"name": "layer-skip", "skip_layers": [1], "adaptive": False}]
PROMPTS = ["hello there", "abc abc abc", "1, 2, 3, 4", "The quick brown fox"]


def test_regex_output_matches_greedy_and_sampled(tiny):
    for options in ({}, {"temperature": 1.0, "seed": 3}):
        outs = tiny.generate(PROMPTS, max_new_tokens=30, response_format={"type": "regex", "regex": REGEX}, **options)
        for out in outs:
            assert re.fullmatch(REGEX, out.text), out.text
            assert out.finish_reason == "stop"


def test_control_without_the_grammar_the_output_does_not_match(tiny):
    outs = tiny.generate(PROMPTS, max_new_tokens=30)
    assert not any(re.fullmatch(REGEX, out.text) for out in outs)


def test_json_object_parses_and_lark_grammar_holds(tiny):
    out = tiny.generate("x", max_new_tokens=200, temperature=1.0, seed=5, response_format={"type": "json_object"})
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    grammar = 'start: "yes" | "no" | NUMBER\nNUMBER: /[0-9]{1,4}/'
    for seed in range(4):
        out = tiny.generate("?", max_new_tokens=10, temperature=1.0, seed=seed, grammar=grammar)
        assert re.fullmatch(r"yes|no|[0-9]{1,4}", out.text), out.text


@pytest.mark.parametrize("strategy", EXACT, ids=lambda s: s if isinstance(s, str) else s["name"])
def test_exact_strategy_under_a_grammar_equals_plain_under_it(tiny, strategy):
    """Greedy: token for token. Sampled with a seed: token for token too where the drafts are
    deterministic (the verifier draws with plain's noise); layer-skip samples its drafts (SpecTr's
    rule: the same distribution, other tokens), so sampled it is only checked for validity."""
    fmt = {"type": "regex", "regex": r"(ab|abc|b[a-c]){3,12}"}
    sampled = {"temperature": 0.9, "seed": 11}
    if isinstance(strategy, dict):
        outs = tiny.generate(PROMPTS, max_new_tokens=24, response_format=fmt, strategy=strategy, **sampled)
        assert all(re.fullmatch(fmt["regex"], o.text) for o in outs)
    for options in ({}, {} if isinstance(strategy, dict) else sampled):
        plain = tiny.generate(PROMPTS, max_new_tokens=24, response_format=fmt, **options)
        out = tiny.generate(PROMPTS, max_new_tokens=24, response_format=fmt, strategy=strategy, **options)
        assert [o.token_ids for o in out] == [p.token_ids for p in plain]


class ForbiddenDrafts(Speculative):
    """Drafts only `token`, which the grammar of the test never allows."""

    name = "forbidden-drafts"
    cheap_drafts = True

    def __init__(self, token: int) -> None:
        super().__init__(max_draft=3, adaptive=False)
        self.token = token

    def propose(self, state, k):
        return DraftTree.chain([self.token] * k)


def test_a_draft_the_grammar_forbids_is_rejected(tiny):
    fmt = {"type": "regex", "regex": "[0-9]{12}"}
    plain = tiny.generate("x", max_new_tokens=12, response_format=fmt, ignore_eos=True)
    out = tiny.generate(
        "x",
        max_new_tokens=12,
        response_format=fmt,
        ignore_eos=True,
        strategy=ForbiddenDrafts(tiny.tokenizer.convert_tokens_to_ids("z")),
    )
    assert out.token_ids == plain.token_ids and re.fullmatch("[0-9]{12}", out.text)
    assert out.stats.draft_tokens_proposed > 0 and out.stats.draft_tokens_accepted == 0


def test_beam_search_masks_every_beam(tiny):
    out = tiny.generate(
        "hi",
        max_new_tokens=16,
        strategy={"name": "beam", "num_beams": 4},
        response_format={"type": "regex", "regex": "(cat|dog|bird)( (cat|dog|bird)){0,3}"},
    )
    assert re.fullmatch("(cat|dog|bird)( (cat|dog|bird)){0,3}", out.text), out.text


@pytest.mark.parametrize(
    "fmt, message",
    [
        ({"type": "grammar", "grammar": "start: ("}, "grammar is not valid"),
        ({"type": "regex", "regex": ""}, "non-empty string"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "json_schema needs"),
        ({"type": "xml"}, "type is one of"),
        ({"type": "regex", "regex": "a" * 200_001}, "at most"),
    ],
)
def test_bad_formats_are_refused_with_a_message(tiny, fmt, message):
    with pytest.raises(InvalidRequestError, match=message):
        tiny.generate("x", max_new_tokens=4, response_format=fmt)


def test_grammar_and_response_format_together_are_refused(tiny):
    with pytest.raises(InvalidRequestError, match="not both"):
        tiny.generate("x", grammar='start: "a"', response_format={"type": "json_object"})


def test_mask_time_is_recorded(tiny):
    out = tiny.generate("x", max_new_tokens=8, response_format={"type": "regex", "regex": "[0-9]{8}"}, ignore_eos=True)
    assert out.stats.grammar_masks == 8 and out.stats.grammar_mask_seconds > 0


@pytest.mark.parametrize(
    "press", [{"name": "streaming-llm", "budget": 0.3}, {"name": "kvmerger", "budget": 0.3}], ids=lambda p: p["name"]
)
def test_a_press_and_a_grammar_compose(tiny, press):
    """A press changes the model's view of the context, not the tokens the grammar follows."""
    prompt = "word " * 60
    fmt = {"type": "regex", "regex": "(ab|cd){20}"}
    for strategy in ("plain", "prompt-lookup"):
        out = tiny.generate(prompt, max_new_tokens=48, response_format=fmt, press=press, strategy=strategy)
        assert re.fullmatch(fmt["regex"], out.text) and out.extras["press"]["evicted_positions"] > 0
