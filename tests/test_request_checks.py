"""Bad numbers and bad objects are errors that name the fix, before any work; and every strategy
gets the KV-cache room its worst case needs, so an accepted request never overflows the cache
(the reproductions of issue 13, through the Python API; the server's come in test_server_hostile)."""

from __future__ import annotations

import pytest

from argen.api import Generator
from argen.errors import InvalidRequestError
from argen.models import tiny as tiny_models
from argen.models.llama import LlamaRuntime
from argen.models.loading import LoadedModel
from argen.sampling import SamplingParams
from argen.strategies import make_strategy

NAN, INF = float("nan"), float("inf")


def fresh_tiny() -> Generator:
    """tiny-random on a runtime of its own: no memo (jacobi's back-off, cost model) from other tests."""
    model = tiny_models.tiny_llama(0)
    return Generator(
        LoadedModel(
            "tiny-fresh",
            LlamaRuntime(model.config, model.state_dict()),
            tiny_models.byte_tokenizer(),
            lambda: model,
            {258},
        )
    )


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"name": "guided", "omega": NAN}, "omega of strategy 'guided' must be a finite number"),
        ({"name": "guided", "omega": INF}, "must be a finite number"),
        ({"name": "guided", "omega": 1e9}, "omega must be a finite number in [0, 1000]"),
        ({"name": "ngram", "explore": NAN}, "explore of strategy 'ngram' must be a finite number"),
        ({"name": "ngram", "explore": -INF}, "must be a finite number"),
        ({"name": "beam", "length_penalty": NAN}, "length_penalty of strategy 'beam' must be a finite number"),
        ({"name": "beam", "length_penalty": 1e308}, "length_penalty must be a finite number in [-20, 20]"),
        ({"name": "beam", "length_penalty": 10**400}, "must be a finite number"),
        ({"name": "beam", "early_stopping": 1}, "early_stopping must be true, false or 'never'"),
        ({"name": "contrastive", "alpha": NAN}, "must be a finite number"),
        ({"name": "draft-model", "draft": 5}, "draft must be a model source"),
    ],
)
def test_strategy_numbers_must_be_finite_and_objects_the_right_kind(spec, words):
    with pytest.raises(InvalidRequestError) as info:
        make_strategy(spec)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", NAN),
        ("temperature", INF),
        ("top_p", NAN),
        ("min_p", NAN),
        ("repetition_penalty", INF),
        ("repetition_penalty", NAN),
        ("temperature", "hot"),
        ("max_new_tokens", True),
        ("top_k", 2.5),
        ("stop", 3),
    ],
)
def test_sampling_parameters_must_be_finite_numbers_of_the_right_type(field, value):
    with pytest.raises(InvalidRequestError, match=f"invalid sampling parameter: {field}"):
        SamplingParams(**{field: value})


def test_checks_run_before_any_work(tiny):
    """Engine.validate asks the strategy (Strategy.check) too: nothing is prefilled for a request
    that cannot run."""
    calls = []
    real_forward = tiny.runtime.forward
    tiny.runtime.forward = lambda *a, **k: calls.append(1) or real_forward(*a, **k)
    try:
        with pytest.raises(InvalidRequestError, match="temperature 0"):
            tiny.generate("hi", strategy="beam", temperature=0.5, max_new_tokens=4)
        with pytest.raises(InvalidRequestError, match="below the model's 4 layers"):
            tiny.generate("hi", strategy={"name": "layer-skip", "skip_layers": [9]}, max_new_tokens=4)
    finally:
        del tiny.runtime.forward
    assert calls == []


def test_guide_must_have_room_for_its_prefix_and_the_output(tiny):
    """The guide reads a control prefix before the output: both must fit its context."""
    spec = {"name": "guided", "guide_model": "tiny-random@2", "positive_prefix": "p" * 1900}
    with pytest.raises(InvalidRequestError, match="shorten positive_prefix / negative_prefix or ask for fewer tokens"):
        tiny.generate("x", strategy=spec, max_new_tokens=200)
    assert len(tiny.generate("x", strategy=spec, max_new_tokens=20, ignore_eos=True).token_ids) == 20


def test_draft_model_with_many_drafts_fits_the_cache(tiny):
    """Issue 13: 24 drafts of 4 tokens, sampled, 64 tokens, used to overflow the 64 spare slots."""
    spec = {"name": "draft-model", "draft": "tiny-random@1", "num_drafts": 24, "adaptive": False}
    out = tiny.generate("Once upon a time", strategy=spec, temperature=0.8, seed=3, max_new_tokens=64, ignore_eos=True)
    assert len(out.token_ids) == 64


def test_wide_jacobi_fits_the_cache(tiny):
    """Issue 13: window 60 with 10 candidate branches on a repetitive prompt, 200 tokens."""
    prompt = "abc abc abc abc " * 20
    plain = tiny.generate(prompt, max_new_tokens=200, ignore_eos=True, chat=False)
    spec = {"name": "jacobi", "window": 60, "candidates": 10, "adaptive": False}
    out = tiny.generate(prompt, strategy=spec, max_new_tokens=200, ignore_eos=True, chat=False)
    assert out.token_ids == plain.token_ids


def test_jacobi_at_the_end_of_the_context_on_a_fresh_runtime_and_after_back_off():
    """Issue 13: a 1,990-token prompt and 58 new tokens filled the cache of a fresh server (its
    lookahead trees did not fit the spare slots) but not after an adaptive request had set the
    back-off. Now both fit, and adaptive=False ignores the back-off the runtime remembers."""
    from argen.strategies.speculative.jacobi import MIN_BACKOFF

    gen = fresh_tiny()
    prompt = [(7 * i) % 250 + 1 for i in range(1990)]
    plain = gen.generate(prompt, max_new_tokens=58, ignore_eos=True)
    spec = {"name": "jacobi", "adaptive": False}
    first = gen.generate(prompt, strategy=spec, max_new_tokens=58, ignore_eos=True)
    gen.runtime._argen_jacobi_backoff = 512  # as an adaptive request leaves it where lookahead did not pay
    second = gen.generate(prompt, strategy=spec, max_new_tokens=58, ignore_eos=True)
    gen.runtime._argen_jacobi_backoff = MIN_BACKOFF
    assert first.token_ids == second.token_ids == plain.token_ids
    assert first.stats.draft_tokens_proposed == second.stats.draft_tokens_proposed > 0


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "prompt-lookup", "max_draft": 16, "adaptive": False},
        {"name": "ngram", "max_draft": 16, "max_nodes": 64, "width": 8, "adaptive": False},
        {"name": "jacobi", "window": 16, "ngram": 8, "candidates": 8, "adaptive": False},
        {"name": "layer-skip", "max_draft": 16, "skip_layers": [1], "adaptive": False},
        {"name": "draft-model", "draft": "tiny-random", "max_draft": 16, "num_drafts": 8, "adaptive": False},
        {"name": "contrastive", "top_k": 64},
        {"name": "beam", "num_beams": 16},
    ],
)
def test_every_strategy_fits_the_cache_up_to_the_last_position(tiny, spec):
    """Each strategy with wide options, on a prompt that leaves 24 positions of the context, under
    sampling where it may sample: no overflow, every position used."""
    prompt = [(3 * i) % 97 + 30 for i in range(2048 - 24)]
    sampled = spec["name"] not in ("contrastive", "beam")
    out = tiny.generate(
        prompt, strategy=spec, max_new_tokens=24, ignore_eos=True, temperature=0.9 if sampled else 0.0, seed=1
    )
    assert len(out.token_ids) == 24 or spec["name"] == "beam"


def test_beam_search_takes_one_forward_pass_per_round(tiny):
    """So that a beam request in a server's batch holds up the others for one pass at a time: each
    round of the loop runs one packed pass over the beams; no tokens until the search ends, then the
    whole output in one event."""
    from argen.engine import DecodeBatch, Event, Request

    request = Request(
        tiny.encode("Beam me up"), SamplingParams(max_new_tokens=12), make_strategy({"name": "beam", "num_beams": 3})
    )
    batch = DecodeBatch(tiny.engine)
    seq = batch.admit(0, request)
    rounds, events = 0, []
    while batch:
        before = seq.state.counters.forward_passes
        events += [item for item in batch.step() if isinstance(item, Event)]
        assert seq.state.counters.forward_passes - before <= 1  # one pass a round
        rounds += 1
    assert rounds > 2 and len(events) == 1 and events[0].token_ids
    whole = tiny.generate("Beam me up", strategy={"name": "beam", "num_beams": 3}, max_new_tokens=12)
    assert events[0].token_ids == whole.token_ids
