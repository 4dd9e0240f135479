"""Counterfactual generation (Gumbel-max SCM): replays, interventions, the noise record, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from checks import check_counterfactual, teacher_forced_logits

import argen
from argen.cli import main
from argen.errors import InvalidRequestError
from argen.sampling import Sampler, SamplingParams, gumbel_noise

PROMPT = "Once upon a time"
OPTS = dict(max_new_tokens=24, temperature=1.0, top_k=50, seed=11)


@pytest.fixture(scope="module")
def original(tiny):
    return tiny.generate(PROMPT, **OPTS)


def test_replay_without_intervention_is_identical(tiny, original):
    replay = tiny.counterfactual(original)
    assert replay.token_ids == original.token_ids and replay.text == original.text
    assert replay.seed == original.seed and replay.finish_reason == original.finish_reason


def test_recorded_seed_is_the_noise(tiny, original):
    """Every sampled token is argmax(processed logits + gumbel_noise(seed, t)): the noise is a function of
    (seed, position), so recording the seed and the parameters records it."""
    replay = original.extras["replay"]
    params = SamplingParams(**replay["params"])
    sampler = Sampler(params)
    logits = teacher_forced_logits(tiny, original.prompt_ids, original.token_ids)
    for t, token in enumerate(original.token_ids):
        processed = sampler.process(logits[t], original.prompt_ids + original.token_ids[:t])
        noise = gumbel_noise(params.seed, t, processed.shape[-1])
        assert int((processed + noise).argmax()) == token
    other = gumbel_noise(params.seed + 1, 0, logits.shape[-1])
    assert not torch.equal(other, gumbel_noise(params.seed, 0, logits.shape[-1]))


def test_intervention_keeps_prefix_and_noise(tiny, original):
    t = 7
    new = (original.token_ids[t] + 1) % 256
    cf = check_counterfactual(tiny, original, t, new)  # prefix kept, later tokens drawn with the original noise
    assert cf.token_ids != original.token_ids
    # Cost: one prefill, then one pass per decoded token.
    assert cf.stats.new_tokens == len(cf.token_ids) - (t + 1)
    assert cf.stats.forward_passes == 1 + cf.stats.new_tokens


def test_intervening_with_the_original_token_changes_nothing(tiny, original):
    for t in (0, 5, len(original.token_ids) - 1):
        assert tiny.counterfactual(original, {t: original.token_ids[t]}).token_ids == original.token_ids


def test_generate_with_intervene_equals_counterfactual(tiny, original):
    forced = {4: 65, 9: 66}
    cf = tiny.counterfactual(original, forced)
    scratch = tiny.generate(PROMPT, intervene=forced, **OPTS)
    assert cf.token_ids == scratch.token_ids and cf.token_ids[4] == 65 and cf.token_ids[9] == 66
    # A counterfactual of a counterfactual keeps the earlier intervention in force.
    again = tiny.counterfactual(cf, {2: 67})
    assert again.token_ids[:2] == original.token_ids[:2] and again.token_ids[9] == 66
    assert again.token_ids == tiny.generate(PROMPT, intervene={2: 67, 4: 65, 9: 66}, **OPTS).token_ids


def test_replay_uses_the_recorded_strategy(tiny):
    """An exact speculative strategy draws with the same noise, so its counterfactual is plain's."""
    prompt = "abc abc abc abc abc abc"
    plain = tiny.generate(prompt, **OPTS)
    lookup = tiny.generate(prompt, strategy={"name": "prompt-lookup", "adaptive": False}, **OPTS)
    assert lookup.token_ids == plain.token_ids
    cf = tiny.counterfactual(lookup, {3: 97})
    assert lookup.extras["replay"]["strategy"]["name"] == "prompt-lookup"
    assert cf.token_ids == tiny.counterfactual(plain, {3: 97}).token_ids


def test_greedy_and_hf_runtime(tiny_gpt2):
    greedy = tiny_gpt2.generate(PROMPT, max_new_tokens=16)
    assert tiny_gpt2.counterfactual(greedy).token_ids == greedy.token_ids
    cf = tiny_gpt2.counterfactual(greedy, {3: 70})
    assert cf.token_ids[:3] == greedy.token_ids[:3] and cf.token_ids[3] == 70
    assert cf.token_ids == tiny_gpt2.generate(PROMPT, max_new_tokens=16, intervene={3: 70}).token_ids


def test_stream_of_a_replay_carries_the_prefix(tiny, original):
    request_events = list(tiny.stream(PROMPT, intervene={6: 80}, **OPTS))
    cf = tiny.counterfactual(original, {6: 80})
    assert [t for e in request_events for t in e.token_ids] == cf.token_ids
    assert "".join(e.text for e in request_events) == cf.text


def test_eos_intervention_ends_the_output(tiny, original):
    eos = min(tiny.model.eos_ids)
    cf = tiny.counterfactual(original, {3: eos})
    assert cf.token_ids == original.token_ids[:3] + [eos] and cf.finish_reason == "stop"
    assert cf.stats.new_tokens == 0


@pytest.mark.parametrize("intervene", [{-1: 5}, {24: 5}, {3: 10_000}, {"3": 5}])
def test_bad_interventions(tiny, original, intervene):
    with pytest.raises(InvalidRequestError):
        tiny.counterfactual(original, intervene)


@pytest.mark.parametrize(
    "strategy", ["beam", "conditional-beam", "contrastive", {"name": "superposed", "ngram_weight": 0}]
)
def test_a_search_that_picks_its_own_tokens_refuses_an_intervention(tiny, strategy):
    """Beams, contrastive and superposed decoding choose tokens by their own scores, not through the
    sampler that holds a forced token: an intervention is refused, never dropped. Seen failing before
    the Engine checked (beam returned token 2 as 53, not the forced 77, and said nothing)."""
    with pytest.raises(InvalidRequestError, match="forced token"):
        tiny.generate("Hello there", chat=False, max_new_tokens=6, strategy=strategy, intervene={2: 77}, temperature=0)
    plain = tiny.generate("Hello there", chat=False, max_new_tokens=6, intervene={2: 77}, temperature=0)
    assert plain.token_ids[2] == 77


def test_result_without_record(tiny, original):
    bare = argen.Result(original.text, original.token_ids, original.prompt_ids, "length", original.stats, 11, "plain")
    with pytest.raises(InvalidRequestError, match="replay record"):
        tiny.counterfactual(bare)


def test_cli_intervene(capsys, tiny):
    b = tiny.tokenizer("b", add_special_tokens=False)["input_ids"][0]
    base = [
        "generate",
        PROMPT,
        "--model",
        "tiny-random",
        "--device",
        "cpu",
        "--max-new-tokens",
        "16",
        "--temperature",
        "1",
        "--seed",
        "5",
        "--json",
    ]
    assert main(base) == 0
    original = json.loads(capsys.readouterr().out)
    assert main([*base, "--intervene", "4=97", "--intervene", "6=b"]) == 0
    cf = json.loads(capsys.readouterr().out)
    assert cf["token_ids"][:4] == original["token_ids"][:4] and cf["token_ids"][4] == 97
    assert cf["token_ids"][6] == b and cf["intervene"] == {"4": 97, "6": b}
    assert main([*base, "--intervene", "4=ab"]) == 2
    assert "2 tokens" in capsys.readouterr().err
