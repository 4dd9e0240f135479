"""The one Verifier every proposer shares: score a draft tree in a single target forward pass,
accept the longest valid path plus one bonus token, and roll the KV cache back to it.

Acceptance rules (exact: greedy output equals plain greedy; sampled output has the target's
distribution):
- greedy: follow the child equal to the target's argmax;
- deterministic drafts under sampling: the speculative-sampling rule with q one-hot (accept x with
  probability p(x), else draw from norm(p without x)), realised by drawing the target's token with
  the same per-position Gumbel noise plain sampling uses and following the child that equals it.
  So an exact strategy with a seed emits exactly what plain sampling with that seed emits;
- stochastic drafts (a draft model sampling q): SpecTr's k-sequential rule over the children,
  which is Leviathan/Chen speculative sampling (accept with min(1, p/q), else norm(max(0, p - q)))
  when a node has one child.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch

from argen.neartie import gap_is_near_tie
from argen.sampling import gumbel_noise, uniform
from argen.strategies.base import DecodeState, Feeds, Outs, run
from argen.strategies.speculative.tree import DraftTree


@dataclass
class Verdict:
    tokens: list[int]  # accepted draft tokens followed by the bonus token
    accepted: int  # how many draft tokens were accepted
    path: list[int] = field(default_factory=list)  # the accepted tree nodes, root first
    hidden: torch.Tensor | None = None  # the target's final hidden states over root + nodes ([1 + n, H])


def spectr_rho(p: torch.Tensor, q: torch.Tensor, k: int, iters: int = 30) -> float:
    """The smallest rho in [1, k] with (1 - (1 - beta)^k) / beta <= rho, where
    beta = sum min(q, p / rho) is one draft's acceptance probability (SpecTr, k-SEQ)."""
    if k == 1:
        return 1.0

    def ok(rho: float) -> bool:
        beta = torch.minimum(q, p / rho).sum().item()
        return beta <= 0 or (1 - (1 - beta) ** k) / beta <= rho + 1e-12

    lo, hi = 1.0, float(k)
    if ok(lo):
        return lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def spectr_select(
    p: torch.Tensor, q: torch.Tensor, drafts: list[int], seed: int, position: int
) -> tuple[int | None, int]:
    """SpecTr k-sequential selection among i.i.d. drafts ~ q. Returns (index of the accepted draft
    or None, the token emitted). Exact: the emitted token is distributed as p."""
    k = len(drafts)
    rho = spectr_rho(p, q, k)
    for i, x in enumerate(drafts):
        ratio = (p[x] / (rho * q[x])).item() if q[x] > 0 else 0.0
        if uniform(seed, position, stream=1 + i) < min(1.0, ratio):
            return i, x
    beta = torch.minimum(q, p / rho).sum().clamp_min(1e-30)
    accepted_mass = torch.minimum(q, p / rho) * (1 - (1 - beta) ** k) / beta
    residual = (p - accepted_mass).clamp_min(0)
    if residual.sum() <= 0:
        residual = p
    noise = gumbel_noise(seed, position, residual.shape[-1], residual.device)
    return None, int((residual.log() + noise).argmax())


def verify(state: DecodeState, tree: DraftTree, row_logits: Callable[[int], torch.Tensor]) -> Verdict:
    """Walk the tree with the target's logits; `row_logits(r)` gives row r's ([V]; row 0 is the
    pending root, row i + 1 node i). Only the rows on the walked path are asked for."""
    sampler = state.sampler
    greedy = sampler.params.greedy
    node, row = -1, 0
    path: list[int] = []  # the accepted nodes so far
    while True:
        index = state.n_generated + len(path)  # output position of the token being decided
        context = state.tokens + [tree.tokens[i] for i in path]
        processed = sampler.process(row_logits(row), context)
        kids = tree.children(node)
        # (A forced token, a counterfactual intervention, is decided by the sampler whatever the draft.)
        if greedy or tree.draft_probs is None or not kids or index in sampler.forced:
            token = sampler.choose(processed, index)
            nxt = next((c for c in kids if tree.tokens[c] == token), None)
            if greedy and nxt is not None:
                top = processed.topk(2).values
                if gap_is_near_tie((top[0] - top[1]).item()):
                    state.counters.near_ties += 1
        else:
            p = processed.softmax(-1)
            q = tree.draft_probs[kids[0]]  # siblings share q(. | path)
            chosen, token = spectr_select(p, q, [tree.tokens[c] for c in kids], sampler.seed, index)
            sampler.record(processed, index, token)  # decided here, not by choose
            nxt = None if chosen is None else kids[chosen]
        if nxt is None:
            return Verdict([tree.tokens[i] for i in path] + [token], len(path), path)
        path.append(nxt)
        node, row = nxt, nxt + 1


def score_and_verify(state: DecodeState, tree: DraftTree) -> Generator[Feeds, Outs, Verdict]:
    """One target pass over pending + tree (yielded as a feed), then accept and fix up the cache so
    that it holds everything but the new pending (bonus) token."""
    start = state.cache.lengths[0]
    depths = [0] + tree.depths()
    positions = [start + state.position_shift + d for d in depths]
    mask = None if tree.is_chain else tree.attention_mask()
    # Hidden states for every node, logits only for the rows the walk reaches: a rejected draft
    # then costs its share of the transformer body but not the vocabulary projection.
    out = yield from run(state.feed([state.tokens[-1]] + tree.tokens, mask=mask, positions=positions, num_logits=0))
    hidden = out.hidden
    verdict = verify(state, tree, lambda row: state.runtime.head(hidden[row]))
    verdict.hidden = hidden
    state.counters.draft_proposed += len(tree)
    state.counters.draft_accepted += verdict.accepted
    # Keep the root and the accepted nodes, in path order, right after the old length.
    kept = [start + 1 + node for node in verdict.path]
    if kept != list(range(start + 1, start + 1 + len(kept))):
        state.cache.move_slots(kept, start + 1)
    state.cache.truncate(start + 1 + verdict.accepted)
    return verdict
