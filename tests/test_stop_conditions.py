"""Where an output ends and what its text shows (vLLM's meanings): `stop_token_ids`, `min_tokens`,
`include_stop_str_in_output` and `skip_special_tokens`, in the engine (Sampler, Sequence,
TextStream), through the Python API, streamed and not."""

from __future__ import annotations

import pytest

from argen.errors import InvalidRequestError
from argen.sampling import SamplingParams

PROMPT = "Hello there"
EOS = 258  # tiny-random's <|im_end|>
IM_START = 257  # a special token that is not EOS


@pytest.fixture(scope="module")
def plain(tiny):
    return tiny.generate(PROMPT, chat=False, max_new_tokens=24, ignore_eos=True)


def printable_index(tiny, ids: list[int]) -> int:
    """An output position whose token is one printable ASCII byte seen nowhere before it."""
    for i, t in enumerate(ids):
        text = tiny.tokenizer.decode([t])
        if i >= 3 and len(text) == 1 and text.isprintable() and text.isascii() and t not in ids[:i]:
            return i
    raise AssertionError("no printable token in the output")


def streamed(tiny, **options) -> tuple[str, list[int]]:
    stream = tiny.stream(PROMPT, chat=False, **options)
    events = list(stream)
    text = "".join(e.text for e in events)
    assert text == stream.result.text and [t for e in events for t in e.token_ids] == stream.result.token_ids
    return text, stream.result.token_ids


def test_stop_token_ids_end_the_output_at_the_token_which_stays_in_the_ids_but_not_the_text(tiny, plain):
    i = printable_index(tiny, plain.token_ids)
    stop = plain.token_ids[i]
    out = tiny.generate(PROMPT, chat=False, max_new_tokens=24, ignore_eos=True, stop_token_ids=[stop])
    assert out.token_ids == plain.token_ids[: i + 1] and out.finish_reason == "stop"
    assert out.text == tiny.tokenizer.decode(plain.token_ids[:i], skip_special_tokens=True)
    kept = tiny.generate(
        PROMPT, chat=False, max_new_tokens=24, ignore_eos=True, stop_token_ids=[stop], include_stop_str_in_output=True
    )
    assert kept.token_ids == out.token_ids and kept.text == out.text + tiny.tokenizer.decode([stop])
    assert streamed(tiny, max_new_tokens=24, ignore_eos=True, stop_token_ids=[stop]) == (out.text, out.token_ids)


def test_include_stop_str_in_output_keeps_the_stop_string(tiny, plain):
    i = printable_index(tiny, plain.token_ids)
    stop = tiny.tokenizer.decode([plain.token_ids[i]])
    cut = tiny.generate(PROMPT, chat=False, max_new_tokens=24, ignore_eos=True, stop=[stop])
    kept = tiny.generate(
        PROMPT, chat=False, max_new_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
    )
    assert kept.text == cut.text + stop and kept.token_ids == cut.token_ids and kept.finish_reason == "stop"
    assert streamed(tiny, max_new_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True) == (
        kept.text,
        kept.token_ids,
    )


def test_min_tokens_bans_eos_and_stop_token_ids_until_that_many_tokens(tiny):
    """EOS all but forced (+100): the output ends at once, or with min_tokens=3 at the fourth token
    (a sampler that does not ban the ending ids before min_tokens fails this)."""
    bias = {EOS: 100}
    assert tiny.generate(PROMPT, chat=False, max_new_tokens=8, logit_bias=bias).token_ids == [EOS]
    out = tiny.generate(PROMPT, chat=False, max_new_tokens=8, logit_bias=bias, min_tokens=3)
    assert len(out.token_ids) == 4 and out.token_ids[-1] == EOS and EOS not in out.token_ids[:3]
    assert out.finish_reason == "stop"
    stopper = tiny.generate(
        PROMPT, chat=False, max_new_tokens=8, logit_bias={77: 100}, stop_token_ids=[77], min_tokens=2, ignore_eos=True
    )
    assert len(stopper.token_ids) == 3 and stopper.token_ids[-1] == 77 and 77 not in stopper.token_ids[:2]
    assert streamed(tiny, max_new_tokens=8, logit_bias=bias, min_tokens=3) == (out.text, out.token_ids)


def test_min_tokens_looks_for_stop_strings_only_in_later_text(tiny, plain):
    """As vLLM: stop strings are looked for once the output has min_tokens tokens (so min_tokens=2
    skips the first token's text), and never in text already shown (a TextStream that looks for
    them from the first token fails this)."""
    first = tiny.tokenizer.decode([plain.token_ids[0]])
    assert first.isprintable() and len(first) == 1
    early = tiny.generate(PROMPT, chat=False, max_new_tokens=24, ignore_eos=True, stop=[first], min_tokens=1)
    assert early.token_ids == plain.token_ids[:1] and early.text == ""
    late = tiny.generate(PROMPT, chat=False, max_new_tokens=24, ignore_eos=True, stop=[first], min_tokens=2)
    again = [i for i in range(1, 24) if first in tiny.tokenizer.decode(plain.token_ids[1 : i + 1])]
    want = plain.token_ids[: again[0] + 1] if again else plain.token_ids
    assert late.token_ids == want and late.text.startswith(first)


def test_skip_special_tokens_false_shows_them_in_the_text(tiny):
    bias = {IM_START: 100}
    hidden = tiny.generate(PROMPT, chat=False, max_new_tokens=3, logit_bias=bias)
    shown = tiny.generate(PROMPT, chat=False, max_new_tokens=3, logit_bias=bias, skip_special_tokens=False)
    assert hidden.token_ids == shown.token_ids == [IM_START] * 3
    assert hidden.text == "" and shown.text == "<|im_start|>" * 3
    assert streamed(tiny, max_new_tokens=3, logit_bias=bias, skip_special_tokens=False)[0] == shown.text
    # EOS ends the output: its text is left out unless include_stop_str_in_output, as vLLM does
    ended = tiny.generate(PROMPT, chat=False, max_new_tokens=3, logit_bias={EOS: 100}, skip_special_tokens=False)
    assert ended.token_ids == [EOS] and ended.text == ""
    kept = tiny.generate(
        PROMPT,
        chat=False,
        max_new_tokens=3,
        logit_bias={EOS: 100},
        skip_special_tokens=False,
        include_stop_str_in_output=True,
    )
    assert kept.text == "<|im_end|>"


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"min_tokens": 5, "max_new_tokens": 4}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 1.5}, "min_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"min_tokens": 2, "response_format": {"type": "json_object"}}, "min_tokens cannot"),
        ({"skip_special_tokens": "no"}, "skip_special_tokens"),
        ({"include_stop_str_in_output": 1}, "include_stop"),
    ],
)
def test_bad_values_are_refused_with_a_reason(bad, words):
    with pytest.raises(InvalidRequestError, match=words):
        SamplingParams(**bad)


def test_stop_token_ids_outside_the_vocabulary_are_refused(tiny):
    with pytest.raises(InvalidRequestError, match="stop_token_ids .* outside the vocabulary"):
        tiny.generate(PROMPT, stop_token_ids=[10**6])
