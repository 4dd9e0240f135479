"""Where each output token came from (engine/request.py ORIGINS): plain steps, accepted drafts, the
verification pass's own token, a grammar's only choice, a forced token, a replayed prefix. The decode
loop reads it off the strategy's counters around each step (engine/sequence.py)."""

from __future__ import annotations

import pytest

from argen.engine.request import ORIGINS
from argen.engine.sequence import step_origins

REPEAT = "one two three four five six seven eight nine ten " * 6


def _events_and_result(gen, **options):
    stream = gen.stream(REPEAT, chat=False, **options)
    events = list(stream)
    return events, stream.result


def test_step_origins_put_the_accepted_drafts_before_the_verified_token():
    assert step_origins(4, accepted=3, verified=True) == ["draft", "draft", "draft", "verify"]
    assert step_origins(1, accepted=0, verified=True) == ["verify"]
    assert step_origins(2, accepted=5, verified=True) == ["draft", "draft"]  # cut at max tokens
    assert step_origins(1, accepted=0, verified=False) == ["step"]


def test_plain_decoding_is_all_steps_and_events_add_up_to_the_result(tiny):
    events, result = _events_and_result(tiny, max_new_tokens=24, ignore_eos=True)
    assert result.origins == ["step"] * len(result.token_ids)
    assert [o for e in events for o in e.origins] == result.origins
    assert all(len(e.origins) == len(e.token_ids) for e in events)
    assert set(result.origins) <= set(ORIGINS)


@pytest.mark.parametrize("strategy", ["prompt-lookup", "ngram", "jacobi"])
def test_drafts_in_the_origins_are_the_drafts_the_verifier_accepted(looping, strategy):
    """Greedy speculation where drafts succeed (conftest's looping model): the tokens marked "draft" number exactly the drafts
    the stats say were accepted (for an output whose last step was not cut short), each step's Event
    is drafts then one verified token, and the output equals plain greedy. Fails if the loop counts
    a step's tokens otherwise (e.g. the verified token first) or loses a step's origins."""
    plain = looping.generate("hello", max_new_tokens=64, ignore_eos=True)
    checked = 0
    for length in range(40, 52):
        stream = looping.stream(
            "hello", strategy={"name": strategy, "adaptive": False}, max_new_tokens=length, ignore_eos=True
        )
        events = list(stream)
        result = stream.result
        assert result.token_ids == plain.token_ids[:length]
        for event in events[:-1]:  # every step but the last: drafts, then the verifier's token
            if "verify" in event.origins:
                a = event.origins.count("draft")
                assert event.origins == ["draft"] * a + ["verify"], event.origins
        if events[-1].origins[-1] in ("verify", "step"):  # the last step kept all its tokens
            assert result.origins.count("draft") == result.stats.draft_tokens_accepted
            checked += 1
    assert checked >= 2 and plain.stats.draft_tokens_accepted == 0
    assert result.stats.draft_tokens_accepted > 0  # the premise: drafts were accepted


def test_a_grammar_s_only_choice_and_a_forced_token_are_marked(tiny):
    out = tiny.generate("x", max_new_tokens=12, response_format={"type": "regex", "regex": "abc[0-9]{3}"})
    # 'a', 'b', 'c' and the EOS after the last digit are the grammar's only choices (byte tokens)
    assert out.text == "abc" + out.text[3:] and len(out.token_ids) == 7
    assert out.origins == ["grammar"] * 3 + ["step"] * 3 + ["grammar"]
    forced = tiny.generate(REPEAT, chat=False, max_new_tokens=6, ignore_eos=True, intervene={2: 65})
    assert forced.origins[2] == "forced" and forced.token_ids[2] == 65
    assert forced.origins.count("forced") == 1


def test_a_step_right_after_a_press_evicted_context_is_marked(tiny):
    """streaming-llm at half the positions evicts as the output grows: the steps that ran right after
    an eviction say "press"; without a press none does. Fails if the loop ignores what press() removed."""
    prompt, options = "hello world " * 40, {"chat": False, "max_new_tokens": 40, "ignore_eos": True}
    pressed = tiny.generate(prompt, press={"name": "streaming-llm", "budget": 0.5}, **options)
    assert pressed.extras["press"]["evicted_positions"] > 0
    assert 0 < pressed.origins.count("press") < len(pressed.origins)
    assert "press" not in tiny.generate(prompt, **options).origins
