"""Speculative strategies: a Proposer drafts a tree, the shared Verifier checks it in one pass."""

from __future__ import annotations

import time
from typing import ClassVar

from argen.strategies.base import DecodeState, Strategy
from argen.strategies.speculative.adaptive import CostModel, DraftLength
from argen.strategies.speculative.tree import DraftTree
from argen.strategies.speculative.verify import Verdict, score_and_verify


class Speculative(Strategy):
    """Subclasses implement `propose(state, k) -> DraftTree` (at most k tokens deep) and may
    override `observe(state, verdict)` to learn from what the verifier accepted."""

    exact = True
    # Lookup proposers draft for free: propose first, then let the controller cut the draft by
    # what its kind (tree.key) has earned. Costly proposers are told the length before drafting.
    cheap_drafts: ClassVar[bool] = False
    # Tree proposers weigh each node's acceptance estimate against the cost model themselves
    # (`best_tree_size`); the per-key chain-length controller is then not used.
    sizes_own_drafts: ClassVar[bool] = False

    def __init__(self, max_draft: int = 8, adaptive: bool = True) -> None:
        if not isinstance(max_draft, int) or max_draft < 1:
            raise ValueError("max_draft must be an integer >= 1")
        self.max_draft = max_draft
        self.adaptive = adaptive

    def max_tree_nodes(self) -> int:
        """The most nodes `propose` may return (a chain: its length)."""
        return self.max_draft

    def kv_slack(self) -> int:
        # Verification writes the pending token and every node of the tree after the sequence.
        return 1 + self.max_tree_nodes()

    def start(self, state: DecodeState) -> None:
        self._cost = CostModel.for_runtime(state.runtime) if self.adaptive else None
        # The chain-length controller; tree proposers that size their own drafts need none.
        chains = self.adaptive and not self.sizes_own_drafts
        self._length = DraftLength(self.max_draft, self._cost) if chains else None

    def propose(self, state: DecodeState, k: int) -> DraftTree:
        raise NotImplementedError

    def observe(self, state: DecodeState, verdict: Verdict) -> None:
        """Called after each verification, before the emitted tokens join `state.tokens`."""

    def _draft(self, state: DecodeState) -> tuple[DraftTree, bool]:
        """(the tree to verify, whether the chain controller should learn from it: a draft was
        available at all)."""
        room = state.cache.max_len - state.cache.lengths[0] - 1
        limit = max(0, min(self.max_draft, state.remaining - 1, room))
        if self._length is None:
            return (self.propose(state, limit) if limit else DraftTree()), False
        if self.cheap_drafts:
            tree = self.propose(state, limit) if limit else DraftTree()
            return tree.limited(self._length.choose(max(tree.depths(), default=0), tree.key)), len(tree) > 0
        k = self._length.choose(limit)
        t0 = time.perf_counter()
        tree = self.propose(state, k) if k else DraftTree()
        self._length.observe_draft_time(len(tree), time.perf_counter() - t0)
        return tree, limit > 0

    def step(self, state: DecodeState) -> list[int]:
        tree, available = self._draft(state)
        self._last_tree = tree
        t0 = time.perf_counter()
        verdict = score_and_verify(state, tree)
        if self._cost is not None:
            self._cost.observe(1 + len(tree), 1 + verdict.accepted, time.perf_counter() - t0)
        if available:
            self._length.update(max(tree.depths(), default=0), verdict.accepted, tree.key)
        self.observe(state, verdict)
        return verdict.tokens
