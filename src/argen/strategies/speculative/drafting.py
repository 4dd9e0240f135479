"""Drawing a chain of draft tokens from a drafter (a partial plan of the target, or a draft model).

Under greedy decoding a draft is the drafter's argmax. Under sampling it is drawn from the
drafter's own distribution q (after the request's temperature / top-k / top-p / min-p), with noise
from a stream of its own, and q is kept with the draft so the verifier can apply speculative
sampling (accept with min(1, p/q), else resample from norm(max(0, p - q))).
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import torch

from argen.sampling import gumbel_noise
from argen.strategies.base import DecodeState, Feed, Feeds, Outs, run
from argen.strategies.speculative.tree import DraftTree

DRAFT_STREAM = 7919  # noise streams for drafts; the target's own sampling uses stream 0


def draw_chain(
    state: DecodeState, k: int, feed: Callable[[int], Feed], chain: int = 0, first_logits: torch.Tensor | None = None
) -> Generator[Feeds, Outs, tuple[list[int], list]]:
    """k draft tokens after `state.tokens` (a generator: yields the drafter's feeds). `feed(token)` is
    the drafter's feed of the next token, whose last logits are for the position after it;
    `first_logits`, if given, are the drafter's logits after the pending token already (so the
    first feed is saved)."""
    sampler = state.sampler
    drafts: list[int] = []
    probs: list[torch.Tensor] = []
    logits = first_logits
    for j in range(k):
        if logits is None:
            out = yield from run(feed(state.tokens[-1] if j == 0 else drafts[-1]))
            logits = out.requested_logits()[-1]
        index = state.n_generated + j
        processed = sampler.process(logits, state.tokens + drafts)
        if sampler.params.greedy:
            token = int(processed.argmax())
        else:
            q = processed.softmax(-1)
            noise = gumbel_noise(sampler.seed, index, q.shape[-1], q.device, stream=DRAFT_STREAM + chain)
            token = int((processed + noise).argmax())
            probs.append(q)
        drafts.append(token)
        logits = None
    return drafts, probs


def chain_tree(drafts: list[int], probs: list[torch.Tensor]) -> DraftTree:
    tree = DraftTree.chain(drafts)
    tree.draft_probs = probs or None
    return tree
