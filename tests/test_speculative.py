"""Speculative decoding invariants: exact greedy output, exact sampling, cache roll-back."""

from __future__ import annotations

import pytest
import torch
from checks import check_cache_matches_prefill, check_greedy_identical
from exact import Enumerator, assert_same_distribution
from helpers import Oracle

from argen.strategies.speculative.prompt_lookup import find_continuation


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("model", ["tiny", "tiny_gpt2"])
def test_verifier_reproduces_plain_greedy(model, tree, request):
    gen = request.getfixturevalue(model)
    plain = gen.generate("Speculate", max_new_tokens=40, ignore_eos=True)
    out = check_greedy_identical(gen, "Speculate", Oracle(plain.token_ids, tree=tree))
    s = out.stats
    assert 0 < s.draft_tokens_accepted < s.draft_tokens_proposed
    assert s.forward_passes < plain.stats.forward_passes  # accepted drafts saved passes


def test_cache_after_rejection_equals_never_extending(tiny):
    """Every step leaves exactly tokens[:-1] in the cache, as a fresh prefill would, also after a
    tree whose accepted branch is not the first (its slots are compacted behind the root)."""
    plain = tiny.generate("Roll back", max_new_tokens=30, ignore_eos=True)
    strategy = Oracle(plain.token_ids, wrong_every=3, tree=True)
    assert check_cache_matches_prefill(tiny, "Roll back", strategy, max_new_tokens=30, atol=1e-5) > 0


@pytest.mark.parametrize("prompt", ["abc abc abc abc abc abc abc", "no repeats here!", "x y x y x y x y"])
def test_prompt_lookup_greedy_equals_plain_on_tiny(tiny, prompt):
    plain = tiny.generate(prompt, max_new_tokens=48)
    for options in ({"adaptive": False}, {}):
        out = tiny.generate(prompt, max_new_tokens=48, strategy={"name": "prompt-lookup", **options})
        assert out.token_ids == plain.token_ids


def test_speculative_sampling_reproduces_plain_sampling_for_the_same_seed(tiny):
    """Deterministic drafts are verified with the plain sampler's own per-position noise, so the
    sampled output is not only equal in distribution but identical for a given seed (which is why a
    distribution test of a deterministic drafter against plain would compare plain with itself).
    Checked seed for seed, under several sampling settings, with drafts accepted and rejected; the
    exact distributions are in test_distribution.py."""
    accepted = rejected = 0
    for seed in range(12):
        params = dict(
            max_new_tokens=30,
            temperature=(1.0, 0.7, 1.4)[seed % 3],
            top_k=(0, 40)[seed % 2],
            top_p=(1.0, 0.9)[seed // 6],
            seed=seed,
        )
        plain = tiny.generate("Sample", **params)
        out = tiny.generate("Sample", strategy=Oracle(plain.token_ids, tree=True), **params)
        assert out.token_ids == plain.token_ids, params
        accepted += out.stats.draft_tokens_accepted
        rejected += out.stats.draft_tokens_proposed - out.stats.draft_tokens_accepted
    assert accepted > 0 and rejected > 0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_spectr_rule_is_exact_in_distribution(k):
    """Drafts x_1..x_k ~ q i.i.d.; the emitted token must be distributed as p (k = 1 is
    Leviathan/Chen speculative sampling). Computed exactly, not sampled: every draft tuple with
    its probability under q, every acceptance test and resampling draw enumerated (exact.py), so
    a 5% relative shift of any p_i fails with certainty. Control: without SpecTr's rho (rho = 1,
    accepting each draft with min(1, p/q) in turn) the k > 1 rule is biased, and the check sees it."""
    dist = _spectr_distribution(k)
    assert_same_distribution(dist.probs, _spectr_pq(k)[0], rel=1e-5)
    assert 0 < dist.expected["accepted"] < 1
    if k > 1:
        import argen.strategies.speculative.verify as verify

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(verify, "spectr_rho", lambda p, q, k, iters=30: 1.0)
            with pytest.raises(AssertionError, match="should be"):
                assert_same_distribution(_spectr_distribution(k).probs, _spectr_pq(k)[0], rel=1e-5)


def _spectr_pq(k: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(k)
    p = torch.rand(6, generator=gen) ** 2
    p /= p.sum()
    q = torch.rand(6, generator=gen)
    q /= q.sum()
    return {(i,): float(p[i]) for i in range(6)}, p, q


def _spectr_distribution(k: int):
    import argen.strategies.speculative.verify as verify

    _, p, q = _spectr_pq(k)
    enum = Enumerator()

    def run():
        drafts = [enum.branch(q.tolist()) for _ in range(k)]
        chosen, token = verify.spectr_select(p, q, drafts, seed=0, position=0)
        return (token,), {"accepted": chosen is not None}

    return enum.distribution(run)


def test_find_continuation():
    assert find_continuation([1, 2, 3, 9, 1, 2, 3], 1, 3, 4) == [9, 1, 2, 3]
    assert find_continuation([5, 1, 2, 7, 1, 2], 1, 3, 2) == [7, 1]
    assert find_continuation([1, 2, 3, 4], 1, 3, 4) == []
    assert find_continuation([4, 8, 4], 1, 1, 3) == [8, 4]
