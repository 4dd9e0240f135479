"""Positive controls: each invariant's check (checks.py), run on a deliberately broken variant of
the code it guards, must fail. The same checks pass on the real code in test_speculative.py,
test_proposers.py, test_setprompt.py and test_counterfactual.py. (Distribution identity has its
controls next to its exact check, in test_distribution.py and test_speculative.py.)"""

from __future__ import annotations

import pytest
import torch
from checks import (
    check_cache_matches_prefill,
    check_counterfactual,
    check_greedy_identical,
    check_order_independent,
    next_logits,
    set_layouts,
)
from helpers import Oracle

import argen.sampling
import argen.setprompt
import argen.strategies.speculative.base as speculative_base
import argen.strategies.speculative.verify as verify
from argen.cache.paged import SeqKV

MEMBERS = ["apples and pears", "a kiwi", "three bananas, ripe"]


# -- greedy identity ---------------------------------------------------------------------------


def accepts_one_extra(real_verify):
    """The verifier, except that where it stops it also takes the first rejected draft token."""

    def broken(state, tree, row_logits):
        verdict = real_verify(state, tree, row_logits)
        kids = tree.children(verdict.path[-1] if verdict.path else -1)
        if kids:
            verdict.path.append(kids[0])
            verdict.accepted += 1
            verdict.tokens = [tree.tokens[i] for i in verdict.path] + verdict.tokens[-1:]
        return verdict

    return broken


@pytest.mark.parametrize("tree", [False, True])
def test_control_a_verifier_accepting_one_extra_token_fails_greedy_identity(tiny, monkeypatch, tree):
    plain = tiny.generate("Speculate", max_new_tokens=40, ignore_eos=True)
    check_greedy_identical(tiny, "Speculate", Oracle(plain.token_ids, tree=tree))  # the real verifier passes
    monkeypatch.setattr(verify, "verify", accepts_one_extra(verify.verify))
    with pytest.raises(AssertionError, match="differs from plain greedy"):
        check_greedy_identical(tiny, "Speculate", Oracle(plain.token_ids, tree=tree))


# -- cache truncation --------------------------------------------------------------------------


def test_control_skipped_compaction_leaves_stale_slots(tiny, monkeypatch):
    """Without `move_slots`, a tree whose accepted branch is not the first keeps the decoy's keys
    and values where the accepted tokens' belong: the right length, the wrong content."""
    plain = tiny.generate("Roll back", max_new_tokens=30, ignore_eos=True)
    monkeypatch.setattr(SeqKV, "move_slots", lambda self, src, dst_start, row=0: None)
    with pytest.raises(AssertionError, match="differs from a fresh prefill"):
        check_cache_matches_prefill(tiny, "Roll back", Oracle(plain.token_ids, wrong_every=3, tree=True), 30, atol=1e-5)


def test_control_a_truncation_keeping_one_stale_slot_fails(tiny, monkeypatch):
    real = speculative_base.score_and_verify

    def keeps_one_more(state, tree):
        verdict = yield from real(state, tree)
        if len(tree) > verdict.accepted:  # a rejected draft's slot stays behind
            state.cache.lengths[0] += 1
        return verdict

    plain = tiny.generate("Roll back", max_new_tokens=30, ignore_eos=True)
    monkeypatch.setattr(speculative_base, "score_and_verify", keeps_one_more)
    with pytest.raises(AssertionError, match="the cache holds"):
        check_cache_matches_prefill(tiny, "Roll back", Oracle(plain.token_ids, wrong_every=3), 30, atol=1e-5)


# -- set-prompt mask ---------------------------------------------------------------------------


def leaking(real_layout):
    """The set-prompt layout, except that the second member stored sees the first member's first token."""

    def broken(tokenizer, prompt, chat=True, canonical=True):
        layout = real_layout(tokenizer, prompt, chat=chat, canonical=canonical)
        pos = layout.positions
        second = next(i for i in range(1, len(pos)) if pos[i] <= pos[i - 1])  # positions restart: a member
        first = pos[second]  # members start at position P, and the first one at index P
        layout.mask[second, first] = True
        return layout

    return broken


def test_control_a_mask_leaking_one_member_fails_order_independence(tiny, monkeypatch):
    monkeypatch.setattr(argen.setprompt, "set_prompt_layout", leaking(argen.setprompt.set_prompt_layout))
    # Sorted canonically, every permutation is the same (leaky) input: that check cannot fail.
    sorted_logits = [
        next_logits(tiny.runtime, lay) for lay in set_layouts(tiny.tokenizer, "Fruit:", MEMBERS, " Pick.", True)
    ]
    assert all(torch.equal(sorted_logits[0], x) for x in sorted_logits)
    # Kept in the given order, the leak depends on the order, and the check sees it.
    with pytest.raises(AssertionError, match="member order changes"):
        check_order_independent(tiny.runtime, set_layouts(tiny.tokenizer, "Fruit:", MEMBERS, " Pick.", False), 1e-4)


# -- counterfactual replay ---------------------------------------------------------------------


def test_control_a_replay_that_reseeds_one_position_fails(tiny, monkeypatch):
    original = tiny.generate("Once upon a time", max_new_tokens=24, temperature=1.0, top_k=50, seed=11)
    t = 7
    token = (original.token_ids[t] + 1) % 256
    check_counterfactual(tiny, original, t, token)  # the real replay passes
    real = argen.sampling.gumbel_noise

    def reseeded(seed, position, size, device="cpu", stream=0):
        return real(seed + 1 if position == t + 2 else seed, position, size, device, stream)

    monkeypatch.setattr(argen.sampling, "gumbel_noise", reseeded)
    with pytest.raises(AssertionError, match="replay without intervention differs|original noise"):
        check_counterfactual(tiny, original, t, token)
