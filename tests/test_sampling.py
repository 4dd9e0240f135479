"""The sampler draws from softmax(filtered logits / T), replayably."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from exact import Enumerator
from scipy.stats import chisquare

from argen.errors import InvalidRequestError
from argen.sampling import GREEDY_BELOW, Sampler, SamplingParams, apply_repetition_penalty, entropy


def reference_distribution(logits: torch.Tensor, t: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """A slow, independent reading of the documented order: temperature, top-k, top-p, min-p."""
    z = logits.double().numpy() / t
    keep = np.ones_like(z, dtype=bool)
    if top_k:
        keep &= z >= np.sort(z)[-top_k]

    def renorm():
        p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
        return p / p.sum()

    if top_p < 1:
        p = renorm()
        covered = 0.0
        for i in np.argsort(-p, kind="stable"):
            if covered >= top_p:
                keep[i] = False
            covered += p[i]
    if min_p > 0:
        p = renorm()
        keep &= p >= min_p * p.max()
    return renorm()


@pytest.fixture(scope="module")
def logits(tiny) -> torch.Tensor:
    ids = tiny.encode("Sampling test")
    cache = tiny.runtime.new_cache(1, 64)
    out, _ = tiny.runtime.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache, num_logits=1)
    return out[0, -1] / 3  # flatten a little so many tokens carry mass


@pytest.mark.parametrize(
    "t, top_k, top_p, min_p",
    [
        (1.0, 0, 1.0, 0.0),
        (0.7, 0, 1.0, 0.0),
        (1.0, 12, 1.0, 0.0),
        (1.3, 0, 0.8, 0.0),
        (1.0, 0, 1.0, 0.1),
        (0.9, 40, 0.9, 0.02),
    ],
)
def test_sampler_draws_from_filtered_softmax(logits, t, top_k, top_p, min_p):
    expected = reference_distribution(logits, t, top_k, top_p, min_p)
    n = 12000
    counts = np.zeros_like(expected)
    for seed in range(n):
        sampler = Sampler(SamplingParams(temperature=t, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed))
        counts[sampler.sample(logits, [], position=0)] += 1
    assert counts[expected == 0].sum() == 0, "sampled a token the filters removed"
    # Chi-square over bins with enough expected mass; the rare tail pooled into one bin.
    big = expected * n >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum()) * n
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert chisquare(obs, exp).pvalue > 1e-3


def exact_draw(logits: torch.Tensor, **params) -> np.ndarray:
    """The exact distribution of one `Sampler.sample` draw: every branch of its noise enumerated
    (tests/exact.py), so nothing is sampled."""
    dist = Enumerator().distribution(lambda: (Sampler(SamplingParams(seed=0, **params)).sample(logits, [], 0), {}))
    out = np.zeros(logits.shape[-1])
    for token, p in dist.probs.items():
        out[token] = p
    return out


def boundaries(p: np.ndarray, picks=(1, 2, 5, 20)) -> tuple[list[float], list[float]]:
    """top_p and min_p values half way between the steps of `p`: each moves the boundary token in or
    out by its whole probability, far beyond float32 rounding."""
    ranked = np.sort(p)[::-1]
    covered = np.cumsum(ranked)
    top_p = [float((covered[j - 1] + covered[j]) / 2) for j in picks]
    ratio = ranked / ranked[0]
    min_p = [float((ratio[j] + ratio[j + 1]) / 2) for j in picks]
    return top_p, min_p


@pytest.mark.parametrize("t", [1.0, 0.7, 1.3])
def test_top_p_and_min_p_draw_exactly_the_filtered_softmax_at_every_boundary(logits, t):
    """Exact, not sampled: the distribution of one draw, enumerated, equals the independent reference
    within float32 rounding (1e-6) at top_p / min_p values that put the boundary after the 2nd, 3rd,
    6th and 21st likeliest token, alone and composed with top-k. Guards against an off-by-one at the
    boundary (dropping the token that crosses top_p, `cumulative >= top_p`, or keeping one more),
    which moves one token's whole probability, and against min_p judged before the temperature; the
    chi-square test above let a top-p off-by-one through at p = 0.8."""
    expected = reference_distribution(logits, t, 0, 1.0, 0.0)
    top_ps, min_ps = boundaries(expected)
    cases = (
        [{"top_p": p} for p in top_ps]
        + [{"min_p": m} for m in min_ps]
        + [{"top_k": 12, "top_p": top_ps[2]}, {"top_p": top_ps[3], "min_p": min_ps[1]}]
    )
    for case in cases:
        want = reference_distribution(logits, t, case.get("top_k", 0), case.get("top_p", 1.0), case.get("min_p", 0.0))
        got = exact_draw(logits, temperature=t, **case)
        assert (got > 0).sum() == (want > 0).sum(), (
            f"{case}: kept {(got > 0).sum()} tokens, should keep {(want > 0).sum()}"
        )
        assert np.abs(got - want).max() < 1e-6, case


def test_top_p_at_an_exact_boundary_drops_the_token_whose_predecessors_cover_it():
    """Four equal logits: probabilities 1/4 each and cumulative sums exact in float32. top_p = 0.5 is
    covered exactly by two tokens, so the third is dropped (its predecessors already cover top_p);
    just above 0.5 it is kept. Guards against `>` for `>=` at the boundary. (Which two of the equal
    tokens are kept is the sort's business: the check is on the probabilities kept.)"""
    logits = torch.zeros(4)
    for top_p, kept in ((0.5, 2), (0.5 + 1e-6, 3), (0.25, 1), (0.75, 3), (1.0, 4)):
        got = exact_draw(logits, temperature=1.0, top_p=top_p)
        assert sorted(got.tolist(), reverse=True)[:kept] == [1 / kept] * kept and (got > 0).sum() == kept, top_p


def test_min_p_at_an_exact_boundary_keeps_the_tokens_at_min_p_times_the_top():
    """Logits ln 2, 0, 0, -1: the second and third tokens' probabilities are exactly half the first's
    in float32 (checked), so at min_p = 0.5 they sit on the boundary and are kept (the README: tokens
    *below* min_p x the top probability are dropped); just above 0.5 they are dropped. Guards against
    `<=` for `<` at the boundary, which the boundary values half way between steps above never meet."""
    logits = torch.tensor([math.log(2), 0.0, 0.0, -1.0])
    p = logits.softmax(-1)
    assert p[1] == p[2] == 0.5 * p[0], "the construction needs float32 probabilities exactly half the top's"
    weights = np.array([2.0, 1.0, 1.0, math.exp(-1)])  # e^logit, up to a factor
    for min_p, kept in ((0.5, 3), (0.5 + 1e-6, 1), (0.1, 4)):
        want = np.where(np.arange(4) < kept, weights, 0.0)
        got = exact_draw(logits, temperature=1.0, min_p=min_p)
        assert (got > 0).sum() == kept, (min_p, got.tolist())
        assert np.abs(got - want / want.sum()).max() < 1e-6, (min_p, got.tolist())


def test_same_seed_same_sample_and_positions_differ(logits):
    params = SamplingParams(temperature=1.0, seed=7)
    a = [Sampler(params).sample(logits, [], p) for p in range(50)]
    b = [Sampler(SamplingParams(temperature=1.0, seed=7)).sample(logits, [], p) for p in range(50)]
    c = [Sampler(SamplingParams(temperature=1.0, seed=8)).sample(logits, [], p) for p in range(50)]
    assert a == b and a != c and len(set(a)) > 1


def test_greedy_is_argmax(logits):
    assert Sampler(SamplingParams(temperature=0)).sample(logits, [], 0) == int(logits.argmax())


def test_entropy_of_a_masked_vocabulary_is_that_of_the_tokens_left():
    """Logits with -inf entries (a grammar mask, a filtered vocabulary): the entropy of the finite
    ones alone, by hand sum -p log p over them; ln 3 for three equal ones. Seen failing with `.sum()`
    in place of `.nansum()` (0 * -inf = nan made the whole entropy nan)."""
    finite = torch.tensor([2.0, -1.0, 0.5, 3.0])
    masked = torch.full((10,), float("-inf"))
    masked[[1, 4, 6, 9]] = finite
    p = torch.softmax(finite.double(), -1)
    assert entropy(masked) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)
    assert entropy(torch.tensor([0.0, float("-inf"), 0.0, 0.0])) == pytest.approx(math.log(3), rel=1e-6)
    assert entropy(torch.tensor([5.0, float("-inf")])) == 0.0  # one token left: certain


@pytest.mark.parametrize("t", [1e-38, 1e-45, 5e-324, 1e-6])
def test_a_temperature_below_the_floor_is_greedy(tiny, t):
    """Bug: temperature 1e-38 overflowed logits / T to -inf, so every token was 0 with log-prob
    -9999 (a 200 with garbage). Below GREEDY_BELOW it is greedy: the same tokens, finite log-probs."""
    assert SamplingParams(temperature=t).greedy and not SamplingParams(temperature=GREEDY_BELOW).greedy
    greedy = tiny.generate("The river", chat=False, max_new_tokens=12, logprobs=3, ignore_eos=True)
    tiny_t = tiny.generate(
        "The river", chat=False, max_new_tokens=12, logprobs=3, ignore_eos=True, temperature=t, seed=5
    )
    assert tiny_t.token_ids == greedy.token_ids
    assert [r.logprob for r in tiny_t.logprobs] == [r.logprob for r in greedy.logprobs]
    assert all(math.isfinite(r.logprob) and math.isfinite(v) for r in tiny_t.logprobs for _, v in r.top)


def test_repetition_penalty_matches_hf(logits):
    from transformers import RepetitionPenaltyLogitsProcessor

    context = [3, 5, 5, 100, 200]
    ours = apply_repetition_penalty(logits, context, 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([context]), logits[None].clone())[0]
    assert torch.allclose(ours, theirs)


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"min_p": 1.0},
        {"max_new_tokens": -1},
        {"repetition_penalty": 0},
        {"seed": -1},
        {"stop": [""]},
        {"logprobs": -1},
        {"logprobs": 21},
        {"logprobs": True},
        {"logprobs": 2.0},
    ],
)
def test_invalid_parameters_are_rejected_with_a_reason(bad):
    with pytest.raises(InvalidRequestError, match="invalid sampling parameter"):
        SamplingParams(**bad)


def test_logit_bias_bans_and_forces_tokens(tiny):
    """OpenAI's logit_bias: -100 keeps a token out, +100 all but forces it; JSON's string keys work."""
    plain = tiny.generate("hello there", chat=False, max_new_tokens=12).token_ids
    banned = tiny.generate("hello there", chat=False, max_new_tokens=12, logit_bias={plain[0]: -100}).token_ids
    assert plain[0] not in banned
    forced = tiny.generate("hello there", chat=False, max_new_tokens=5, temperature=1.0, logit_bias={"77": 100})
    assert forced.token_ids == [77] * 5


@pytest.mark.parametrize(
    "bias, words",
    [
        ({"x": 1}, "token ids"),
        ({"²": 1}, "token ids"),
        ({"٣": 1}, "token ids"),
        ({-1: 1}, "token ids"),
        ({5: 101}, "[-100, 100]"),
        ({5: float("nan")}, "[-100, 100]"),
        ({5: "1"}, "[-100, 100]"),
        ({i: 1 for i in range(1025)}, "at most 1024"),
        ([5], "map token ids"),
    ],
)
def test_logit_bias_is_checked(bias, words):
    with pytest.raises(InvalidRequestError, match=re.escape(words)):
        SamplingParams(logit_bias=bias)


def test_logit_bias_outside_the_vocabulary_is_refused(tiny):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        tiny.generate("x", logit_bias={10**6: 5})


@pytest.mark.parametrize("strategy", ["prompt-lookup", "ngram", {"name": "jacobi", "adaptive": False}])
def test_exact_strategies_under_a_logit_bias_equal_plain_under_it(tiny, strategy):
    bias = {int(t): -100 for t in tiny.encode(" the", chat=False)} | {101: 3.0}
    options = dict(chat=False, max_new_tokens=40, logit_bias=bias)
    plain = tiny.generate("abc abc abc the abc abc", **options).token_ids
    assert tiny.generate("abc abc abc the abc abc", strategy=strategy, **options).token_ids == plain


def openai_penalized(logits: torch.Tensor, output: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's definition, read independently: mu[j] -= c[j] * frequency + (c[j] > 0) * presence,
    c[j] the count of token j in the output so far (the prompt's tokens do not count)."""
    out = logits.double().clone()
    for j in set(output):
        out[j] -= output.count(j) * frequency + presence
    return out


@pytest.mark.parametrize("presence, frequency", [(2.0, 0.0), (0.0, 1.5), (0.7, 0.9), (-1.0, -0.5)])
def test_presence_and_frequency_penalties_follow_openai_over_the_output_only(tiny, presence, frequency):
    """Greedy decoding under the penalties picks, at every step, the argmax of the Hugging Face
    model's logits penalized by hand over the output alone. A prompt of repeated tokens would change
    the choices if the prompt counted."""
    prompt = tiny.encode("aaaa bbbb aaaa", chat=False)
    out = tiny.generate(
        prompt, max_new_tokens=24, ignore_eos=True, presence_penalty=presence, frequency_penalty=frequency
    ).token_ids
    plain = tiny.generate(prompt, max_new_tokens=24, ignore_eos=True).token_ids
    assert out != plain  # the penalties changed something
    with torch.inference_mode():
        logits = tiny.model.hf_model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1 : -1]
    for t, token in enumerate(out):
        want = openai_penalized(logits[t], out[:t], presence, frequency)
        top2 = want.topk(2)
        assert token == int(top2.indices[0]) or (top2.values[0] - want[token]).item() < 1e-4, (t, token, top2)


def test_the_sampler_penalizes_the_context_after_the_prompt_as_openai_defines():
    """Sampler.process on a context whose prompt repeats the output's tokens: only the output counts."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=gen)
    prompt, output = [3, 3, 3, 7, 9, 9], [3, 7, 7, 7, 12, 3, 40]
    for presence, frequency in [(2.0, 0.0), (0.0, -1.5), (0.7, 0.9)]:
        sampler = Sampler(
            SamplingParams(presence_penalty=presence, frequency_penalty=frequency), prompt_len=len(prompt)
        )
        got = sampler.process(logits, prompt + output)
        assert torch.allclose(got.double(), openai_penalized(logits, output, presence, frequency), atol=1e-6)


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("penalty", [2.0, -2.0])
def test_a_verifier_under_penalties_decides_what_plain_decides(tiny, tree, penalty):
    """Drafts of plain's own output (some wrong, some as a decoy branch) are verified with each
    position's context: the penalties count the accepted path's tokens, as plain's did (a verifier
    that penalized the tokens before the draft only would decide otherwise here)."""
    from helpers import Oracle

    options = dict(chat=False, max_new_tokens=40, ignore_eos=True, presence_penalty=penalty, frequency_penalty=penalty)
    plain = tiny.generate("Speculate", **options)
    assert plain.token_ids != tiny.generate("Speculate", chat=False, max_new_tokens=40, ignore_eos=True).token_ids
    out = tiny.generate("Speculate", strategy=Oracle(plain.token_ids, tree=tree), **options)
    assert out.token_ids == plain.token_ids and out.stats.draft_tokens_accepted > 10


@pytest.mark.parametrize(
    "strategy",
    [
        "prompt-lookup",
        "ngram",
        {"name": "jacobi", "adaptive": False},
        {"name": "layer-skip", "skip_layers": [1], "adaptive": False},
        {"name": "draft-model", "draft": "tiny-random", "adaptive": False},
    ],
)
def test_exact_strategies_under_penalties_equal_plain_under_them(tiny, strategy):
    options = dict(chat=False, max_new_tokens=40, ignore_eos=True, presence_penalty=-1.5, frequency_penalty=0.2)
    prompt = "abc abc abc the abc abc abc the abc"
    plain = tiny.generate(prompt, **options).token_ids
    assert plain != tiny.generate(prompt, chat=False, max_new_tokens=40, ignore_eos=True).token_ids
    assert tiny.generate(prompt, strategy=strategy, **options).token_ids == plain


@pytest.mark.parametrize(
    "bad",
    [
        {"presence_penalty": 2.01},
        {"frequency_penalty": -2.5},
        {"presence_penalty": float("nan")},
        {"frequency_penalty": "1"},
    ],
)
def test_penalties_are_bounded_as_openai_bounds_them(bad):
    with pytest.raises(InvalidRequestError, match=r"\[-2, 2\]"):
        SamplingParams(**bad)
