"""Speculative strategies: a Proposer drafts a tree, the shared Verifier checks it in one pass."""

from __future__ import annotations

import time

from argen.strategies.base import DecodeState, Strategy
from argen.strategies.speculative.adaptive import CostModel, DraftLength
from argen.strategies.speculative.tree import DraftTree
from argen.strategies.speculative.verify import score_and_verify


class Speculative(Strategy):
    """Subclasses implement `propose(state, k) -> DraftTree` (at most k tokens deep) and may
    override `observe(state, tokens)` to learn from what was emitted."""

    exact = True

    def __init__(self, max_draft: int = 8, adaptive: bool = True) -> None:
        if not isinstance(max_draft, int) or max_draft < 1:
            raise ValueError("max_draft must be an integer >= 1")
        self.max_draft = max_draft
        self.adaptive = adaptive

    def start(self, state: DecodeState) -> None:
        self._cost = CostModel.for_runtime(state.runtime) if self.adaptive else None
        self._length = DraftLength(self.max_draft, self._cost) if self.adaptive else None

    def propose(self, state: DecodeState, k: int) -> DraftTree:
        raise NotImplementedError

    def observe(self, state: DecodeState, tokens: list[int]) -> None:
        """Called with each step's emitted tokens before they join `state.tokens`."""

    def draft_budget(self, state: DecodeState) -> int:
        room = state.cache.max_len - state.cache.lengths[0] - 1
        limit = min(state.remaining - 1, room)
        return self._length.choose(limit) if self._length else max(0, min(self.max_draft, limit))

    def step(self, state: DecodeState) -> list[int]:
        k = self.draft_budget(state)
        t0 = time.perf_counter()
        tree = self.propose(state, k) if k > 0 else DraftTree()
        t1 = time.perf_counter()
        verdict = score_and_verify(state, tree)
        t2 = time.perf_counter()
        if self._length is not None:
            depth = max(tree.depths(), default=0)
            self._length.update(depth, verdict.accepted)
            self._length.observe_draft_time(len(tree), t1 - t0)
            self._cost.observe(1 + len(tree), t2 - t1)
        self.observe(state, verdict.tokens)
        return verdict.tokens
