"""The sampler draws from softmax(filtered logits / T), replayably."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from exact import Enumerator
from scipy.stats import chisquare

from argen.errors import InvalidRequestError
from argen.sampling import Sampler, SamplingParams, apply_repetition_penalty


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
    [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 12, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1),
     (0.9, 40, 0.9, 0.02)],
)  # fmt: skip
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
    cases = [{"top_p": p} for p in top_ps] + [{"min_p": m} for m in min_ps] + [
        {"top_k": 12, "top_p": top_ps[2]}, {"top_p": top_ps[3], "min_p": min_ps[1]}]  # fmt: skip
    for case in cases:
        want = reference_distribution(logits, t, case.get("top_k", 0), case.get("top_p", 1.0), case.get("min_p", 0.0))
        got = exact_draw(logits, temperature=t, **case)
        assert (got > 0).sum() == (want > 0).sum(), f"{case}: kept {(got > 0).sum()} tokens, should keep {(want > 0).sum()}"
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


def test_same_seed_same_sample_and_positions_differ(logits):
    params = SamplingParams(temperature=1.0, seed=7)
    a = [Sampler(params).sample(logits, [], p) for p in range(50)]
    b = [Sampler(SamplingParams(temperature=1.0, seed=7)).sample(logits, [], p) for p in range(50)]
    c = [Sampler(SamplingParams(temperature=1.0, seed=8)).sample(logits, [], p) for p in range(50)]
    assert a == b and a != c and len(set(a)) > 1


def test_greedy_is_argmax(logits):
    assert Sampler(SamplingParams(temperature=0)).sample(logits, [], 0) == int(logits.argmax())


def test_repetition_penalty_matches_hf(logits):
    from transformers import RepetitionPenaltyLogitsProcessor

    context = [3, 5, 5, 100, 200]
    ours = apply_repetition_penalty(logits, context, 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([context]), logits[None].clone())[0]
    assert torch.allclose(ours, theirs)


@pytest.mark.parametrize(
    "bad", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"min_p": 1.0},
            {"max_new_tokens": -1}, {"repetition_penalty": 0}, {"seed": -1}, {"stop": [""]}, {"logprobs": -1},
            {"logprobs": 21}, {"logprobs": True}, {"logprobs": 2.0}],
)  # fmt: skip
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


@pytest.mark.parametrize("bias, words", [
    ({"x": 1}, "token ids"), ({"²": 1}, "token ids"), ({"٣": 1}, "token ids"), ({-1: 1}, "token ids"), ({5: 101}, "[-100, 100]"), ({5: float("nan")}, "[-100, 100]"),
    ({5: "1"}, "[-100, 100]"), ({i: 1 for i in range(1025)}, "at most 1024"), ([5], "map token ids"),
])  # fmt: skip
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
