"""Search strategies: beam search (against greedy and HF generate), conditional beam search (never a
degenerate output), contrastive search (against a slow reference, token for token)."""

from __future__ import annotations

import pytest
import torch
from search_cases import repeated_ngram

from argen.engine import Engine, Request
from argen.errors import InvalidRequestError
from argen.sampling import SamplingParams
from argen.strategies import make_strategy
from argen.strategies.search import ConditionalBeam

PROMPTS = ["Hello there", "The quick brown fox", "xyz 123", "Beam me up"]


def run(gen, prompt, strategy, eos=None, **params):
    """Generate with a strategy; `eos` overrides the model's EOS ids (the random model never ends)."""
    engine = gen.engine if eos is None else Engine(gen.runtime, gen.tokenizer, set(eos))
    request = Request(gen.encode(prompt), SamplingParams(**params), make_strategy(strategy))
    return engine.run([request])[0]


def full_forward(runtime, ids: list[int]):
    """Logits [T, V] and final hidden states [T, H] of one uncached pass over the whole sequence."""
    cache = runtime.new_cache(1, len(ids))
    positions = torch.arange(len(ids), device=runtime.device)[None]
    logits, hidden = runtime.forward(torch.tensor([ids], device=runtime.device), positions, cache)
    return logits[0].float(), hidden[0].float()


def sequence_logprob(runtime, prompt: list[int], output: list[int]) -> float:
    logits, _ = full_forward(runtime, prompt + output)
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return float(logp.gather(-1, torch.tensor(output)[:, None]).sum())


# -- beam search -------------------------------------------------------------------------------


@pytest.mark.parametrize("eos", [None, {19}, {188, 60, 7}])
def test_beam_of_one_is_greedy(tiny, eos):
    for prompt in PROMPTS:
        greedy = run(tiny, prompt, "plain", eos, max_new_tokens=40)
        beam = run(tiny, prompt, {"name": "beam", "num_beams": 1}, eos, max_new_tokens=40)
        assert beam.token_ids == greedy.token_ids
        assert beam.finish_reason == greedy.finish_reason


@pytest.mark.parametrize("eos", [None, {19}, {188, 60, 7}])
def test_beam_score_is_at_least_greedys(tiny, eos):
    for prompt in PROMPTS:
        ids = tiny.encode(prompt)
        greedy = run(tiny, prompt, "plain", eos, max_new_tokens=40).token_ids
        greedy_score = sequence_logprob(tiny.runtime, ids, greedy) / len(greedy)  # length_penalty 1
        beam = run(tiny, prompt, {"name": "beam", "num_beams": 4}, eos, max_new_tokens=40)
        # The reported log-prob is the output's own, and the score is it over the length.
        assert beam.extras["beam_logprob"] == pytest.approx(
            sequence_logprob(tiny.runtime, ids, beam.token_ids), abs=1e-3
        )
        assert beam.extras["beam_score"] == pytest.approx(beam.extras["beam_logprob"] / len(beam.token_ids), rel=1e-6)
        assert beam.extras["beam_score"] >= greedy_score - 1e-5
        assert beam.token_ids != greedy  # the search found a better output than greedy's here


HF_CASES = [  # (EOS ids, num_beams, length_penalty, early_stopping, max_new_tokens, some output ends at EOS)
    ({19}, 2, -1.0, True, 40, True),
    ({19, 189}, 3, 0.0, "never", 20, True),
    ({19, 189}, 4, 1.0, False, 40, True),
    ({188, 60, 7}, 4, 1.0, True, 30, True),
    ({188, 60, 7}, 5, 2.0, False, 25, False),  # a large length penalty favours running to the limit
]


@pytest.mark.parametrize("eos,num_beams,length_penalty,early_stopping,n,ends", HF_CASES)
def test_beam_matches_hf_generate(tiny, eos, num_beams, length_penalty, early_stopping, n, ends):
    hf = tiny.model.hf_model
    spec = {"name": "beam", "num_beams": num_beams, "length_penalty": length_penalty, "early_stopping": early_stopping}
    lengths = set()
    for prompt in PROMPTS:
        ids = tiny.encode(prompt)
        ours = run(tiny, prompt, spec, eos, max_new_tokens=n)
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([ids]),
                num_beams=num_beams,
                length_penalty=length_penalty,
                early_stopping=early_stopping,
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=256,
                eos_token_id=sorted(eos),
                output_scores=True,
                return_dict_in_generate=True,
            )
        theirs = out.sequences[0, len(ids) :].tolist()
        theirs = next((theirs[: i + 1] for i, t in enumerate(theirs) if t in eos), theirs)
        assert ours.token_ids == theirs, prompt
        assert ours.extras["beam_score"] == pytest.approx(float(out.sequences_scores[0]), rel=1e-4)
        lengths.add(len(theirs))
    assert (min(lengths) < n) == ends  # the cases cover hypotheses ending at EOS and at the limit


def test_beam_counts_one_pass_per_step_and_keeps_beams_in_the_cache(tiny):
    r = run(tiny, "Hello there", {"name": "beam", "num_beams": 3}, {19}, max_new_tokens=40)
    plain = run(tiny, "Hello there", "plain", max_new_tokens=1)
    assert r.stats.prefill_passes == 1
    assert len(r.token_ids) <= r.stats.forward_passes - 1 <= 40  # a step per search position
    assert r.stats.peak_kv_bytes > 3 * plain.stats.peak_kv_bytes  # three rows were held


# -- conditional beam search -------------------------------------------------------------------

# Found by tests/search_cases.py on tiny-random: prompts whose 4-beam output repeats a 3-gram, and
# prompts with their 2nd..4th most likely first tokens (declared as EOS, they make the output empty).
LOOP_PROMPTS = ["dog 1", "dog no cat ok"]
EMPTY_CASES = [(". a no 2", 260), ("! yes 1 ?", 198), ("2 end", 127), ("why", 312)]


@pytest.mark.parametrize("prompt", LOOP_PROMPTS)
def test_conditional_beam_never_loops(tiny, prompt):
    plain = run(tiny, prompt, {"name": "beam", "num_beams": 4}, max_new_tokens=48)
    assert repeated_ngram(plain.token_ids, 3)  # the case still is one
    spec = {"name": "conditional-beam", "num_beams": 4, "loop_ngram": 3}
    cond = run(tiny, prompt, spec, max_new_tokens=48)
    assert len(cond.token_ids) >= 40 and not repeated_ngram(cond.token_ids, 3)


@pytest.mark.parametrize("prompt,eos", EMPTY_CASES)
def test_conditional_beam_is_never_empty(tiny, prompt, eos):
    opts = {"num_beams": 4, "length_penalty": 0.0}
    plain = run(tiny, prompt, {"name": "beam", **opts}, {eos}, max_new_tokens=32)
    assert plain.token_ids == [eos]  # the case still is one: the best hypothesis is just EOS
    cond = run(tiny, prompt, {"name": "conditional-beam", **opts}, {eos}, max_new_tokens=32)
    assert len(cond.token_ids) >= 2 and cond.token_ids[0] != eos
    assert not repeated_ngram(cond.token_ids, 4)
    # Longer minimum, and the search still ends at EOS when that scores best.
    longer = run(tiny, prompt, {"name": "conditional-beam", "min_length": 5, **opts}, {eos}, max_new_tokens=32)
    assert len(longer.token_ids) >= 6 and eos not in longer.token_ids[:5]


def test_conditional_beam_degeneracy_condition():
    s = ConditionalBeam(min_length=2, loop_ngram=3)
    eos = frozenset({9})
    assert sorted(s.banned([], eos)) == [9] and s.banned([1], eos) == [9]  # too short to end
    assert s.banned([1, 2], eos) == []
    assert s.banned([1, 2, 3, 1, 2], eos) == [3]  # "1 2 3" may not occur again
    assert s.banned([5, 5, 5], eos) == [5]  # a period-1 loop: "5 5 5" may not occur twice
    assert s.banned([4, 4, 6, 4, 4], eos) == [6]
    assert s.banned([1, 2, 3, 4, 2, 3], eos) == [4]  # anywhere in the output, not only back to back
    assert ConditionalBeam(loop_ngram=1).banned([3, 1], eos) == [3, 1]  # no token twice


# -- contrastive search ------------------------------------------------------------------------


def contrastive_reference(runtime, prompt: list[int], n: int, top_k: int, alpha: float, eos: set[int]) -> list[int]:
    """Su et al.'s rule recomputed from scratch: full uncached passes, one per candidate."""
    ids = list(prompt)
    for _ in range(n):
        logits, context = full_forward(runtime, ids)
        probs = logits[-1].softmax(-1)
        top_p, top_ids = probs.topk(top_k)
        scores = []
        for p, v in zip(top_p.tolist(), top_ids.tolist()):
            h = full_forward(runtime, ids + [v])[1][-1]
            similarity = torch.nn.functional.cosine_similarity(h[None], context, dim=-1).max().item()
            scores.append((1 - alpha) * p - alpha * similarity)
        ids.append(top_ids[max(range(top_k), key=lambda i: scores[i])].item())
        if ids[-1] in eos:
            break
    return ids[len(prompt) :]


@pytest.mark.parametrize("model", ["tiny", "tiny_gpt2"])
@pytest.mark.parametrize("top_k,alpha", [(4, 0.6), (3, 0.3), (6, 0.9)])
def test_contrastive_matches_slow_reference(model, top_k, alpha, request):
    gen = request.getfixturevalue(model)
    for prompt in PROMPTS[:3]:
        fast = gen.generate(prompt, strategy={"name": "contrastive", "top_k": top_k, "alpha": alpha}, max_new_tokens=24)
        slow = contrastive_reference(gen.runtime, gen.encode(prompt), 24, top_k, alpha, gen.model.eos_ids)
        assert fast.token_ids == slow, prompt
        # One target pass per token after the prefill (which includes the pending token's pass).
        assert fast.stats.forward_passes - fast.stats.prefill_passes == len(fast.token_ids)


def test_contrastive_alpha_zero_is_greedy(tiny):
    for prompt in PROMPTS:
        plain = tiny.generate(prompt, max_new_tokens=30)
        assert tiny.generate(prompt, strategy={"name": "contrastive", "alpha": 0}, max_new_tokens=30).token_ids == (
            plain.token_ids
        )
    # With a penalty the output differs (the random model's states are similar enough to matter).
    assert tiny.generate(PROMPTS[0], strategy="contrastive", max_new_tokens=30).token_ids != plain.token_ids


def test_contrastive_single_token_prompt_and_bans(tiny):
    ids = [65]  # no prefill at all: the history starts with the pending token
    r = tiny.generate(ids, strategy="contrastive", max_new_tokens=10)
    assert r.token_ids == contrastive_reference(tiny.runtime, ids, 10, 4, 0.6, tiny.model.eos_ids)
    banned = r.token_ids[:3]
    r2 = tiny.generate(ids, strategy="contrastive", max_new_tokens=10, banned_token_ids=banned)
    assert not set(banned) & set(r2.token_ids)


# -- options and errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "beam", "num_beams": 0},
        {"name": "beam", "early_stopping": "sometimes"},
        {"name": "conditional-beam", "loop_ngram": 0},
        {"name": "conditional-beam", "min_length": -1},
        {"name": "contrastive", "top_k": 0},
        {"name": "contrastive", "alpha": 1.5},
    ],
)
def test_bad_options_are_rejected(spec):
    with pytest.raises(InvalidRequestError):
        make_strategy(spec)


@pytest.mark.parametrize("name", ["beam", "conditional-beam", "contrastive"])
def test_sampling_is_rejected(tiny, name):
    with pytest.raises(InvalidRequestError, match="temperature 0"):
        tiny.generate("hi", strategy=name, temperature=0.7, max_new_tokens=4)


def test_beam_needs_the_native_runtime(tiny_gpt2):
    with pytest.raises(InvalidRequestError, match="native runtime"):
        tiny_gpt2.generate("hi", strategy="beam", max_new_tokens=4)


def test_contrastive_candidates_get_room_in_the_cache_up_to_the_context(tiny):
    """The Engine allocates the candidates' slots (kv_slack) even where the sequence reaches the
    end of the context: the cache may hold more slots than the model has positions."""
    prompt = list(range(1, 256)) * 8  # 2040 of the tiny model's 2048 positions
    out = tiny.generate(prompt, strategy={"name": "contrastive", "top_k": 100}, max_new_tokens=8, ignore_eos=True)
    assert len(out.token_ids) == 8
