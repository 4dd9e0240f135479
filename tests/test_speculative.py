"""Speculative decoding invariants: exact greedy output, exact sampling, cache roll-back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from argen.strategies.speculative import DraftTree, Speculative
from argen.strategies.speculative.prompt_lookup import find_continuation
from argen.strategies.speculative.verify import spectr_select


class Oracle(Speculative):
    """Drafts from a known continuation, with chosen positions corrupted, as a chain or as a tree
    whose correct branch is not the first: drafts that succeed and fail exactly where we say."""

    name = "oracle"

    def __init__(self, truth: list[int], wrong_every: int = 4, tree: bool = False, max_draft: int = 6) -> None:
        super().__init__(max_draft=max_draft, adaptive=False)
        self.truth, self.wrong_every, self.tree = truth, wrong_every, tree

    def propose(self, state, k):
        done = state.n_generated
        draft = list(self.truth[done : done + k])
        for i in range(len(draft)):
            if (done + i) % self.wrong_every == self.wrong_every - 1:
                draft[i] = (draft[i] + 1) % 250
        if not self.tree or not draft:
            return DraftTree.chain(draft)
        t = DraftTree()
        decoy = t.add((draft[0] + 7) % 250, -1)  # a wrong first branch, scored in the same pass
        t.add((draft[0] + 3) % 250, decoy)
        parent = -1
        for token in draft:
            parent = t.add(token, parent)
        return t


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("model", ["tiny", "tiny_gpt2"])
def test_verifier_reproduces_plain_greedy(model, tree, request):
    gen = request.getfixturevalue(model)
    plain = gen.generate("Speculate", max_new_tokens=40)
    out = gen.generate("Speculate", max_new_tokens=40, strategy=Oracle(plain.token_ids, tree=tree))
    assert out.token_ids == plain.token_ids
    s = out.stats
    assert 0 < s.draft_tokens_accepted < s.draft_tokens_proposed
    assert s.forward_passes < plain.stats.forward_passes  # accepted drafts saved passes


def test_cache_after_rejection_equals_never_extending(tiny):
    plain = tiny.generate("Roll back", max_new_tokens=30)
    strategy = Oracle(plain.token_ids, wrong_every=3, tree=True)
    # Step by hand to inspect the cache: every step leaves exactly tokens[:-1] in it.
    from argen.engine import Request
    from argen.sampling import SamplingParams

    seq = tiny.engine._start(0, Request(plain.prompt_ids, SamplingParams(max_new_tokens=30), strategy))
    for _ in range(6):
        seq.accept(strategy.step(seq.state))
    state = seq.state
    state_cache = state.cache
    n = state_cache.lengths[0]
    assert n == len(state.tokens) - 1
    fresh = tiny.runtime.new_cache(1, n + 1)
    tiny.runtime.forward(torch.tensor([state.tokens[:-1]]), torch.arange(n)[None], fresh, num_logits=0)
    assert torch.allclose(state_cache.k[:, :, :, :n], fresh.k[:, :, :, :n], atol=1e-5)
    assert torch.allclose(state_cache.v[:, :, :, :n], fresh.v[:, :, :, :n], atol=1e-5)
    assert strategy._length is None and state.counters.draft_accepted > 0


@pytest.mark.parametrize("prompt", ["abc abc abc abc abc abc abc", "no repeats here!", "x y x y x y x y"])
def test_prompt_lookup_greedy_equals_plain_on_tiny(tiny, prompt):
    plain = tiny.generate(prompt, max_new_tokens=48)
    for options in ({"adaptive": False}, {}):
        out = tiny.generate(prompt, max_new_tokens=48, strategy={"name": "prompt-lookup", **options})
        assert out.token_ids == plain.token_ids


def test_speculative_sampling_reproduces_plain_sampling_for_the_same_seed(tiny):
    """Deterministic drafts are verified with the plain sampler's own per-position noise, so the
    sampled output is not only equal in distribution but identical for a given seed."""
    for seed in range(5):
        plain = tiny.generate("Sample", max_new_tokens=30, temperature=1.0, seed=seed)
        out = tiny.generate("Sample", max_new_tokens=30, temperature=1.0, seed=seed,
                            strategy=Oracle(plain.token_ids, tree=True))  # fmt: skip
        assert out.token_ids == plain.token_ids
        assert out.stats.draft_tokens_accepted > 0


def test_speculative_sampling_distribution_is_unchanged_statistically(tiny):
    """Many seeds: the first three sampled tokens under prompt lookup (adaptive off, so it always
    drafts) are distributed as under plain sampling (chi-square on the first token and on pairs)."""
    prompt = "ab ab ab ab ab ab"
    firsts_plain, firsts_spec = [], []
    for seed in range(300):
        firsts_plain.append(tuple(tiny.generate(prompt, max_new_tokens=2, temperature=1.5, seed=seed).token_ids))
        spec = tiny.generate(prompt, max_new_tokens=2, temperature=1.5, seed=10_000 + seed,
                             strategy={"name": "prompt-lookup", "adaptive": False, "min_ngram": 1})  # fmt: skip
        firsts_spec.append(tuple(spec.token_ids))
    keys = sorted({k[0] for k in firsts_plain + firsts_spec})
    a = np.array([sum(k[0] == x for k in firsts_plain) for x in keys], dtype=float)
    b = np.array([sum(k[0] == x for k in firsts_spec) for x in keys], dtype=float)
    keep = (a + b) >= 10
    table = np.vstack([np.append(a[keep], a[~keep].sum()), np.append(b[keep], b[~keep].sum())])
    table = table[:, table.sum(0) > 0]
    from scipy.stats import chi2_contingency

    assert chi2_contingency(table).pvalue > 1e-3


@pytest.mark.parametrize("k", [1, 2, 3])
def test_spectr_rule_is_exact_in_distribution(k):
    """Drafts x_1..x_k ~ q i.i.d.; the emitted token must be distributed as p (k = 1 is
    Leviathan/Chen speculative sampling)."""
    gen = torch.Generator().manual_seed(k)
    p = torch.rand(6, generator=gen) ** 2
    p /= p.sum()
    q = torch.rand(6, generator=gen)
    q /= q.sum()
    n = 6000
    counts = np.zeros(6)
    accepted = 0
    for seed in range(n):
        g = torch.Generator().manual_seed(50_000 + seed)
        drafts = torch.multinomial(q, k, replacement=True, generator=g).tolist()
        chosen, token = spectr_select(p, q, drafts, seed, position=0)
        counts[token] += 1
        accepted += chosen is not None
    expected = p.double().numpy()
    assert chisquare(counts, expected / expected.sum() * counts.sum()).pvalue > 1e-3
    assert accepted > 0


def test_find_continuation():
    assert find_continuation([1, 2, 3, 9, 1, 2, 3], 1, 3, 4) == [9, 1, 2, 3]
    assert find_continuation([5, 1, 2, 7, 1, 2], 1, 3, 2) == [7, 1]
    assert find_continuation([1, 2, 3, 4], 1, 3, 4) == []
    assert find_continuation([4, 8, 4], 1, 1, 3) == [8, 4]
