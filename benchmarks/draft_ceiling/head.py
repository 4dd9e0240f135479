"""The learned draft head (`draft-head`, distilled by `argen distill-draft`) replayed against a
question's committed plain output, as `policy.py` replays the lookup proposers.

The head's drafts depend on the committed sequence only: its tokens and the target's final hidden
states there. So the target reads prompt + plain output once (a teacher-forced pass, `features`),
and the real strategy then steps through the output with an oracle verifier that accepts the tree
path the output follows (what the real verifier does when the outputs are identical, as the bench
checks) and hands back the target's features of the root and the accepted path. The head's own
passes run for real on its runtime (they are the drafts); each step is charged the verification
pass under a fixed `CostModel` plus the head passes at a fixed cost per pass.

Two replays per question:
- `oracle`: the head's full tree (no sizing: every level grown, `max_nodes` kept), charged as if only
  the accepted path were verified, and drafting only when that beats a plain step: the most the
  head's drafts can give (knowing the future), its head passes still paid.
- `policy`: the strategy as it runs, its adaptive sizing seeing the same frozen costs.
"""

from __future__ import annotations

import statistics
from types import SimpleNamespace
from unittest import mock

import torch
from policy import frozen

from argen.models.draft_head import HeadPassSeconds
from argen.models.runtime import RuntimeMemo, Segment
from argen.strategies.base import DecodeState
from argen.strategies.speculative import base as speculative_base
from argen.strategies.speculative.adaptive import CostModel
from argen.strategies.speculative.draft_head import DraftHead
from argen.strategies.speculative.verify import Verdict


def features(runtime, prompt: list[int], output: list[int]) -> torch.Tensor:
    """The target's final hidden states [len(prompt) + len(output) - 1, H], teacher-forced."""
    ids = prompt + output
    cache = runtime.new_cache(1, len(ids))
    _, hidden = runtime.forward(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], cache, num_logits=0)
    cache.free()
    return hidden[0]


def replay_head(
    strategy: DraftHead,
    prompt: list[int],
    output: list[int],
    feats: torch.Tensor,
    cost: CostModel,
    head_seconds: float,
    oracle: bool = False,
) -> tuple[int, float, int]:
    """(target passes, seconds, head passes) for `strategy` producing `output` after `prompt`."""
    cost = frozen(cost)
    charged, passes, head_passes = [0.0], [0], [0, 0]  # head passes: all, this step's
    plain_rate = 1 / cost(1)

    def oracle_verify(state: DecodeState, tree) -> Verdict:
        node, path = -1, []
        pending = len(state.tokens) - 1
        while True:
            token = output[state.n_generated + len(path)]
            nxt = next((c for c in tree.children(node) if tree.tokens[c] == token), None)
            if nxt is None:
                break
            path.append(nxt)
            node = nxt
        if oracle:
            # Knowing the future: verify the accepted path only, grown by as many head passes as it is
            # deep, and only when that beats a plain step.
            drafted = cost(1 + len(path), rows=1 + len(path)) + len(path) * head_seconds
            if path and (len(path) + 1) / drafted <= plain_rate:
                path, drafted = [], cost(1)
            charged[0] += drafted
        else:
            charged[0] += cost(1 + len(tree), rows=1 + len(path)) + head_passes[1] * head_seconds
        head_passes[1] = 0
        passes[0] += 1
        hidden = torch.zeros(1 + len(tree), feats.shape[-1])
        hidden[[0] + [n + 1 for n in path]] = feats[pending : pending + 1 + len(path)]
        verdict = Verdict([tree.tokens[i] for i in path] + [output[state.n_generated + len(path)]], len(path), path)
        verdict.hidden = hidden
        return verdict
        yield  # never reached: a generator like the real verifier, which yields its feed

    memo = RuntimeMemo()
    memo.learnt[CostModel] = cost  # what CostModel.for_runtime finds
    runtime = SimpleNamespace(memo=memo, device="cpu")
    cache = SimpleNamespace(max_len=len(prompt) + len(output) + 1, lengths=[len(prompt) - 1])
    state = DecodeState(
        runtime=runtime,
        cache=cache,
        sampler=None,
        tokens=list(prompt),
        prompt_len=len(prompt),
        max_new_tokens=len(output),
        prompt_hidden=feats[: len(prompt) - 1],
    )
    with (
        mock.patch.object(speculative_base, "score_and_verify", oracle_verify),
        mock.patch.object(DraftHead, "_head_seconds", lambda self, m, rows: head_seconds),
    ):
        strategy.start(state)
        while state.n_generated < len(output):
            step = strategy.step(state)
            outs = None
            try:
                while True:
                    feed = step.send(outs) if outs is not None else next(step)
                    segment = Segment(
                        feed.cache, feed.tokens, feed.positions, feed.mask, feed.num_logits, features=feed.features
                    )
                    outs = feed.runtime.forward_packed([segment])[0]
                    head_passes[0] += 1
                    head_passes[1] += 1
            except StopIteration as done:
                tokens = done.value
            cache.lengths[0] += len(tokens)
            state.tokens += tokens
    for c in state.caches:
        c.free()
    if state.output != output:
        raise AssertionError("the replay left the plain output: the oracle verifier is wrong")
    return passes[0], charged[0], head_passes[0]


def head_pass_seconds(head, rows: int, repeats: int = 5) -> float:
    """A head pass over `rows` tokens: the median of `repeats` fresh calibrations (`pass_seconds`)."""
    times = []
    for _ in range(repeats):
        head.memo.learnt.pop(HeadPassSeconds, None)  # measure afresh
        times.append(head.pass_seconds(rows))
    return statistics.median(times)


def head_strategy(head, oracle: bool) -> DraftHead:
    """The strategy as the bench runs it (default options), or its unsized full tree for the oracle."""
    return DraftHead(head=head, adaptive=not oracle)
