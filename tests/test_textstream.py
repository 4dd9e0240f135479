"""Incremental detokenization (argen/textstream.py): the streamed text is the whole output's
decode, characters split across tokens are held until whole, stop strings cut the text and the
tokens, and each token costs one DecodeStream step however long the output is."""

from __future__ import annotations

import pytest

import argen.textstream
from argen.textstream import TextStream

TEXT = "Héllo, wörld! 世界 🙂 " * 3
MODELS = [pytest.param("tiny"), pytest.param("real", marks=pytest.mark.real)]


def stream_all(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[TextStream, list[str]]:
    ts = TextStream(tokenizer, list(stop))
    deltas = []
    for i in range(len(ids)):
        deltas.append(ts.push(ids[: i + 1]))
        if ts.stopped_at is not None:
            break
    return ts, deltas + [ts.flush()]


@pytest.mark.parametrize("model", MODELS)
def test_streamed_text_is_the_decode_of_the_whole_output(model, request):
    tokenizer = request.getfixturevalue(model).tokenizer
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ts, deltas = stream_all(tokenizer, ids)
    assert "".join(deltas) == ts.text == tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert not any("\ufffd" in d for d in deltas)  # a split character is held until it is whole


@pytest.mark.parametrize("model", MODELS)
def test_a_stop_string_cuts_the_text_and_keeps_the_tokens_that_reach_it(model, request):
    tokenizer = request.getfixturevalue(model).tokenizer
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ts, deltas = stream_all(tokenizer, ids, stop=("世界",))
    assert "".join(deltas) == ts.text == TEXT[: TEXT.index("世界")]
    kept = ts.stopped_at
    assert "世界" in tokenizer.decode(ids[:kept]) and "世界" not in tokenizer.decode(ids[: kept - 1])


def test_each_token_costs_one_stream_step_on_a_4000_token_output(tiny, monkeypatch):
    """Not a timing: the work per token is counted. 4,000 tokens pushed one at a time take 4,000
    DecodeStream steps and one whole-output decode, at the end (a decode per token made the cost
    grow with the length)."""
    steps = []
    real = argen.textstream._decode_stream

    class Counting:
        def __init__(self, stream):
            self.stream = stream

        def step(self, backend, token):
            steps.append(token)
            return self.stream.step(backend, token)

    def counting(tokenizer, *args):
        stream, backend = real(tokenizer, *args)
        return Counting(stream), backend

    monkeypatch.setattr(argen.textstream, "_decode_stream", counting)
    ids = (tiny.tokenizer(TEXT, add_special_tokens=False)["input_ids"] * 200)[:4000]
    ts = TextStream(tiny.tokenizer, ["never appears"])
    decodes = []
    real_decode = ts._decode
    monkeypatch.setattr(ts, "_decode", lambda ids: decodes.append(len(ids)) or real_decode(ids))
    out = "".join(ts.push(ids[: i + 1]) for i in range(len(ids)))
    assert len(steps) == 4000 and not decodes
    out += ts.flush()  # the last token splits a character: shown as decode shows it
    assert decodes == [4000] and out == tiny.tokenizer.decode(ids, skip_special_tokens=True)


def test_control_a_stream_that_drops_a_token_fails_the_decode_check(tiny, monkeypatch):
    real = argen.textstream._decode_stream

    class Dropping:
        def __init__(self, stream):
            self.stream, self.n = stream, 0

        def step(self, backend, token):
            self.n += 1
            return None if self.n == 5 else self.stream.step(backend, token)

    monkeypatch.setattr(argen.textstream, "_decode_stream", lambda t, *a: (Dropping(real(t, *a)[0]), real(t, *a)[1]))
    ids = tiny.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ts, deltas = stream_all(tiny.tokenizer, ids)
    assert "".join(deltas) != tiny.tokenizer.decode(ids, skip_special_tokens=True)
