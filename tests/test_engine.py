"""Engine behaviour: stop conditions, streaming, batching, replay, errors."""

from __future__ import annotations

import pytest

import argen
from argen.errors import InvalidRequestError


def test_same_seed_same_sampled_text(tiny):
    a = tiny.generate("Once upon", max_new_tokens=24, temperature=1.0, seed=123)
    b = tiny.generate("Once upon", max_new_tokens=24, temperature=1.0, seed=123)
    c = tiny.generate("Once upon", max_new_tokens=24, temperature=1.0, seed=124)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids
    assert a.seed == 123


def test_unseeded_sampling_records_its_seed_for_replay(tiny):
    a = tiny.generate("Once upon", max_new_tokens=16, temperature=1.0)
    b = tiny.generate("Once upon", max_new_tokens=16, temperature=1.0, seed=a.seed)
    assert a.token_ids == b.token_ids


def test_stream_concatenates_to_generate(tiny):
    full = tiny.generate("Stream me", max_new_tokens=30)
    events = list(tiny.stream("Stream me", max_new_tokens=30))
    assert "".join(e.text for e in events) == full.text
    assert [t for e in events for t in e.token_ids] == full.token_ids
    assert events[-1].finish_reason == full.finish_reason == "length"
    assert all(e.finish_reason is None for e in events[:-1])


def test_max_new_tokens_and_stats(tiny):
    out = tiny.generate("Count", max_new_tokens=17)
    assert len(out.token_ids) == 17 and out.finish_reason == "length"
    s = out.stats
    assert s.new_tokens == 17 and s.forward_passes == 18  # prefill + one per token
    assert s.prompt_tokens == len(out.prompt_ids) and s.wall_seconds > 0 and s.tokens_per_s > 0
    # KV memory is held in blocks of 16 positions: the prompt and 16 of the 17 new tokens, rounded up.
    positions = len(out.prompt_ids) + 16
    assert s.peak_kv_bytes == -(-positions // 16) * 16 * tiny.runtime.new_cache(1, 1).bytes_per_position()


def test_stop_string_cuts_exactly(tiny):
    full = tiny.generate("Stop strings", max_new_tokens=40).text
    i = next(i for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2] and full[i : i + 2] not in full[:i])
    stop = full[i : i + 2]
    out = tiny.generate("Stop strings", max_new_tokens=40, stop=[stop])
    assert out.text == full[:i] and out.finish_reason == "stop"
    assert stop in tiny.tokenizer.decode(out.token_ids) and stop not in tiny.tokenizer.decode(out.token_ids[:-1])
    streamed = "".join(e.text for e in tiny.stream("Stop strings", max_new_tokens=40, stop=[stop]))
    assert streamed == full[:i]


def test_eos_stops_unless_ignored(tiny):
    full = tiny.generate("eos", max_new_tokens=40)
    eos = full.token_ids[5]
    tiny.engine.eos_ids.add(eos)
    try:
        out = tiny.generate("eos", max_new_tokens=40)
        assert out.token_ids == full.token_ids[: full.token_ids.index(eos) + 1] and out.finish_reason == "stop"
        assert tiny.generate("eos", max_new_tokens=40, ignore_eos=True).token_ids == full.token_ids
    finally:
        tiny.engine.eos_ids.discard(eos)


def test_batch_of_different_lengths_equals_one_by_one(tiny):
    prompts = ["a", "a longer prompt", "the longest prompt of these three, by far"]
    batch = tiny.generate(prompts, max_new_tokens=20)
    for prompt, out in zip(prompts, batch):
        alone = tiny.generate(prompt, max_new_tokens=20)
        assert out.token_ids == alone.token_ids and out.text == alone.text and out.prompt_ids == alone.prompt_ids


def test_batch_with_sampling_and_stops_per_sequence(tiny):
    prompts = ["x", "yy", "zzz"]
    batch = tiny.generate(prompts, max_new_tokens=15, temperature=0.8, seed=5)
    for prompt, out in zip(prompts, batch):
        assert out.token_ids == tiny.generate(prompt, max_new_tokens=15, temperature=0.8, seed=5).token_ids


def test_chat_template_and_raw_prompt_ids(tiny):
    chat = tiny.generate("hi", max_new_tokens=4)
    assert tiny.tokenizer.decode(chat.prompt_ids).startswith("<|im_start|>user\nhi<|im_end|>")
    raw = tiny.generate("hi", max_new_tokens=4, chat=False)
    assert raw.prompt_ids == tiny.tokenizer("hi")["input_ids"]
    by_ids = tiny.generate(chat.prompt_ids, max_new_tokens=4)
    assert by_ids.token_ids == chat.token_ids


def test_hf_adapter_generates_like_hf(tiny_gpt2):
    import torch

    out = tiny_gpt2.generate("adapter", max_new_tokens=12)
    ids = torch.tensor([out.prompt_ids])
    with torch.inference_mode():
        ref = tiny_gpt2.model.hf_model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.token_ids == ref[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strategy": "warp-drive"}, "unknown strategy 'warp-drive'; valid strategies: .*plain"),
        ({"strategy": {"name": "plain", "speed": 9}}, "unknown option"),
        ({"strategy": 42}, "a strategy is a name"),
        ({"max_new_tokens": -3}, "max_new_tokens must be"),
        ({"temprature": 1.0}, "unknown generation option.*temperature"),
    ],
)
def test_bad_requests_say_what_to_do(tiny, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        tiny.generate("x", **kwargs)


def test_prompt_longer_than_context_is_rejected(tiny):
    with pytest.raises(InvalidRequestError, match="shorten the prompt"):
        tiny.generate("x" * 3000, max_new_tokens=4)


def test_unknown_model_names_sources():
    with pytest.raises(argen.ModelNotFoundError, match="Supported sources: default"):
        argen.load("/no/such/model")
    with pytest.raises(argen.ModelNotFoundError, match="does not exist"):
        argen.load("/no/such/model.gguf")


def test_tiny_random_is_deterministic_from_seed():
    a = argen.load("tiny-random@3").generate("seed", max_new_tokens=10).token_ids
    b = argen.load("tiny-random@3").generate("seed", max_new_tokens=10).token_ids
    c = argen.load("tiny-random@4").generate("seed", max_new_tokens=10).token_ids
    assert a == b != c
