"""Speculative strategies: a Proposer drafts a tree, the shared Verifier checks it in one pass."""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import ClassVar

from argen.strategies.base import DecodeState, Feeds, Outs, Step, Strategy
from argen.strategies.speculative.adaptive import CostModel, DraftLength
from argen.strategies.speculative.tree import DraftTree
from argen.strategies.speculative.verify import Verdict, score_and_verify


@dataclass
class SpeculativeMemo:
    """A speculative request's state (`state.memo`): the runtime's cost model and the chain-length
    controller (adaptive only), and the tree verified last. A proposer with state of its own
    declares a subclass with its fields and names it as its `Memo`."""

    cost: CostModel | None = None
    length: DraftLength | None = None
    last_tree: DraftTree | None = None


class Speculative(Strategy):
    """Subclasses implement `propose(state, k) -> DraftTree` (at most k tokens deep) and may
    override `observe(state, verdict)` to learn from what the verifier accepted. Per-request state
    goes in `state.memo`, a `Memo` (SpeculativeMemo or the subclass's own) that `start` creates."""

    Memo: ClassVar[type[SpeculativeMemo]] = SpeculativeMemo

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
        cost = CostModel.for_runtime(state.runtime) if self.adaptive else None
        # The chain-length controller (adaptive only); tree proposers that size their own drafts need none.
        length = DraftLength(self.max_draft, cost) if cost is not None and not self.sizes_own_drafts else None
        state.memo = self.Memo(cost=cost, length=length)

    def propose(self, state: DecodeState, k: int) -> DraftTree | Generator[Feeds, Outs, DraftTree]:
        """A draft tree at most k deep; costly proposers (a partial plan, a draft model) are generators
        that yield their drafter's feeds."""
        raise NotImplementedError

    def observe(self, state: DecodeState, verdict: Verdict) -> None:
        """Called after each verification, before the emitted tokens join `state.tokens`."""

    def _proposed(self, state: DecodeState, k: int) -> Generator[Feeds, Outs, DraftTree]:
        tree = self.propose(state, k) if k else DraftTree()
        if isinstance(tree, DraftTree):
            return tree
        return (yield from tree)

    def _draft(self, state: DecodeState) -> Generator[Feeds, Outs, tuple[DraftTree, bool]]:
        """(the tree to verify, whether the chain controller should learn from it: a draft was
        available at all)."""
        memo = state.memo
        room = state.cache.max_len - state.cache.lengths[0] - 1
        limit = max(0, min(self.max_draft, state.remaining - 1, room))
        if memo.length is None:
            return (yield from self._proposed(state, limit)), False
        if self.cheap_drafts:
            tree = yield from self._proposed(state, limit)
            return tree.limited(memo.length.choose(max(tree.depths(), default=0), tree.key, state.batch_size)), len(
                tree
            ) > 0
        k = memo.length.choose(limit, batch=state.batch_size)
        t0 = time.perf_counter()
        tree = yield from self._proposed(state, k)
        memo.length.observe_draft_time(len(tree), time.perf_counter() - t0)
        return tree, limit > 0

    def step(self, state: DecodeState) -> Step:
        memo = state.memo
        tree, available = yield from self._draft(state)
        memo.last_tree = tree
        t0 = time.perf_counter()
        verdict = yield from score_and_verify(state, tree)
        if memo.cost is not None and state.batch_size == 1:  # in a batch the time is the shared pass's
            memo.cost.observe(1 + len(tree), 1 + verdict.accepted, time.perf_counter() - t0)
        if available:
            memo.length.update(max(tree.depths(), default=0), verdict.accepted, tree.key)
        self.observe(state, verdict)
        return verdict.tokens
