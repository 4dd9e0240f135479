"""argen's own drafting policy, replayed: the real `prompt-lookup` and `ngram` strategies (their
proposers and adaptive controllers, unchanged) step through a question's committed plain output
with an oracle in place of the target model.

The oracle verifier accepts the tree path that the plain output follows, exactly what the real
verifier does under greedy decoding when the outputs are token-identical (they are: 720/720 in
`benchmarks/speculative/`). Each step is charged what the real verifier would cost under a fixed
`CostModel`: the body over 1 + tree size tokens and the vocabulary projection for the rows walked.
The controllers see that same cost model (frozen: the oracle takes no time to observe), so the
replay shows what the policy gives up against the future-knowing sizing of `run.py`, with no noise.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from unittest import mock

from argen.models.runtime import RuntimeMemo
from argen.strategies.base import DecodeState
from argen.strategies.speculative import base as speculative_base
from argen.strategies.speculative.adaptive import CostModel
from argen.strategies.speculative.base import Speculative
from argen.strategies.speculative.ngram import NGram
from argen.strategies.speculative.prompt_lookup import PromptLookup
from argen.strategies.speculative.verify import Verdict

STRATEGIES = {"prompt-lookup": PromptLookup, "ngram": NGram}  # with their default options


def frozen(cost: CostModel) -> CostModel:
    """A copy of `cost` that ignores the timings the strategies report."""
    out = copy.copy(cost)
    out.seconds = dict(cost.seconds)
    out.observe = lambda *args: None
    return out


def replay_policy(strategy: Speculative, prompt: list[int], output: list[int], cost: CostModel) -> tuple[int, float]:
    """(target passes, seconds) for `strategy` producing `output` after `prompt` under `cost`."""
    cost = frozen(cost)
    charged, passes = [0.0], [0]

    def oracle_verify(state: DecodeState, tree) -> Verdict:
        node, path = -1, []
        while True:
            token = output[state.n_generated + len(path)]
            nxt = next((c for c in tree.children(node) if tree.tokens[c] == token), None)
            if nxt is None:
                charged[0] += cost(1 + len(tree), rows=1 + len(path))
                passes[0] += 1
                return Verdict([tree.tokens[i] for i in path] + [token], len(path), path)
            path.append(nxt)
            node = nxt
        yield  # never reached: a generator like the real verifier, which yields its feed

    # `CostModel.for_runtime` finds the cost model in the runtime's memo; the oracle needs no model.
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
    )
    with mock.patch.object(speculative_base, "score_and_verify", oracle_verify):
        strategy.start(state)
        while state.n_generated < len(output):
            tokens = without_feeds(strategy.step(state))
            cache.lengths[0] += len(tokens)
            state.tokens += tokens
    if state.output != output:
        raise AssertionError("the replay left the plain output: the oracle verifier is wrong")
    return passes[0], charged[0]


def without_feeds(step):
    """Run a strategy's step (a generator) that must not feed the model: lookup drafts and the
    oracle verifier need none."""
    try:
        next(step)
    except StopIteration as done:
        return done.value
    raise AssertionError("the step fed the model: only lookup proposers can be replayed without one")
