"""Adaptive n-gram drafting, after ADED (Adaptive Draft-Verification for Efficient LLM Decoding).

A table of n-gram counts (n = 3..max_n, so every draft is conditioned on at least two tokens) is
built from the prompt and updated with every token the sequence gains. Each step drafts a small
tree of likely continuations of the last tokens, best-first:

- exploit: a candidate's value is its n-gram probability, corrected by how often the verifier
  accepted it when it was drafted before (a Beta-style estimate with the n-gram probability as
  the prior);
- explore: nodes are expanded in order of value plus an upper-confidence bonus that favours
  continuations rarely tried in this context, so that new branches get verified too (ADED uses
  Monte-Carlo tree search for this balance; a UCB priority is its one-step form).

The tree is then cut to the size whose expected accepted tokens pay for their verification on this
machine (`best_tree_size`), down to a plain step where drafts keep failing.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from argen.checks import number_option
from argen.strategies.base import DecodeState
from argen.strategies.speculative.adaptive import best_tree_size
from argen.strategies.speculative.base import Speculative, SpeculativeMemo
from argen.strategies.speculative.tree import DraftTree

PRIOR_WEIGHT = 2.0  # how many verifications the n-gram probability is worth as a prior
CALIBRATION_DECAY = 0.95  # forgetting of the acceptance-vs-frequency calibration


class NGramTable:
    """Next-token counts after every context of n - 1 tokens, n = min_n..max_n."""

    def __init__(self, min_n: int = 3, max_n: int = 4) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        self.seen = 0  # tokens of the sequence already counted

    def update(self, tokens: list[int]) -> None:
        for i in range(max(self.seen, 1), len(tokens)):
            for n in range(self.min_n, self.max_n + 1):
                if i - n + 1 >= 0:
                    self.counts[tuple(tokens[i - n + 1 : i])][tokens[i]] += 1
        self.seen = len(tokens)

    def next_tokens(self, context: list[int], width: int) -> tuple[tuple[int, ...], list[tuple[int, float]]]:
        """(the context used, [(token, probability)] best first) from the longest known context."""
        for n in range(self.max_n, self.min_n - 1, -1):
            key = tuple(context[len(context) - n + 1 :])
            if len(key) == n - 1 and key in self.counts:
                counter = self.counts[key]
                total = sum(counter.values())
                return key, [(t, c / total) for t, c in counter.most_common(width)]
        return (), []


@dataclass
class NGramMemo(SpeculativeMemo):
    table: NGramTable | None = None
    tried: Counter = field(default_factory=Counter)  # (context, token) -> times drafted with its parent accepted
    hits: Counter = field(default_factory=Counter)  # ... and accepted
    context_tries: Counter = field(default_factory=Counter)  # context -> drafts tried after it
    calibration: dict = field(default_factory=dict)  # context length -> decayed (hits, predicted)
    node_keys: list = field(default_factory=list)  # the (context, token) of each node of the tree drafted


class NGram(Speculative):
    name = "ngram"
    Memo = NGramMemo
    sizes_own_drafts = True

    def __init__(
        self,
        max_draft: int = 8,
        max_nodes: int = 16,
        width: int = 3,
        min_n: int = 3,
        max_n: int = 4,
        explore: float = 0.3,
        adaptive: bool = True,
    ) -> None:
        super().__init__(max_draft, adaptive)
        if not 3 <= min_n <= max_n:
            raise ValueError("need 3 <= min_n <= max_n (drafts are conditioned on at least two tokens)")
        if max_nodes < 1 or width < 1:
            raise ValueError("max_nodes and width must be >= 1")
        explore = number_option("explore", explore, low=0, hint=" (the exploration bonus; 0 turns it off)")
        self.max_nodes, self.width, self.min_n, self.max_n, self.explore = max_nodes, width, min_n, max_n, explore

    def max_tree_nodes(self) -> int:
        return self.max_nodes

    def start(self, state: DecodeState) -> None:
        super().start(state)
        m = state.memo
        m.table = NGramTable(self.min_n, self.max_n)
        m.table.update(state.tokens)

    def _value(self, m, context: tuple, token: int, prob: float) -> tuple[float, float]:
        """(acceptance estimate, the same plus its exploration bonus)."""
        key = (context, token)
        tried = m.tried[key]
        # n-gram frequencies are over-confident (a context seen once predicts with probability 1):
        # scale them by how often drafts from contexts of this length were accepted, as predicted.
        hits, predicted = m.calibration.get(len(context), (1.0, 1.0))
        prior = min(1.0, prob * hits / predicted)
        value = (m.hits[key] + PRIOR_WEIGHT * prior) / (tried + PRIOR_WEIGHT)
        bonus = self.explore * math.sqrt(math.log(2 + m.context_tries[context]) / (1 + tried))
        return value, min(1.0, value + bonus)

    def propose(self, state: DecodeState, k: int) -> DraftTree:
        m = state.memo
        tree, keys, probs = DraftTree(), [], []
        # Max-heap of (-priority, tie, parent node, its depth, its context tokens, its path probability).
        heap = [(-1.0, 0, -1, 0, state.tokens, 1.0)]
        tie = 1
        while heap and len(tree) < min(self.max_nodes, 4 * k):
            _, _, parent, depth, context, path_prob = heapq.heappop(heap)
            if depth >= k:
                continue
            used, candidates = m.table.next_tokens(context[-(self.max_n - 1) :], self.width)
            for token, prob in candidates:
                if len(tree) >= self.max_nodes:
                    break
                value, priority = self._value(m, used, token, prob)
                node = tree.add(token, parent)
                keys.append((used, token, prob))
                probs.append(path_prob * value)
                heapq.heappush(
                    heap,
                    (
                        -path_prob * priority,
                        tie,
                        node,
                        depth + 1,
                        list(context[-(self.max_n - 1) :]) + [token],
                        path_prob * value,
                    ),
                )
                tie += 1
        if m.cost is not None:  # adaptive
            # Keep the best nodes (by acceptance estimate; parents score at least their children).
            order = sorted(range(len(tree)), key=lambda i: -probs[i])
            n = best_tree_size([probs[i] for i in order], m.cost, batch=state.batch_size)
            keep = sorted(order[:n])
            tree, keys = _subtree(tree, keep), [keys[i] for i in keep]
        m.node_keys = keys
        return tree

    def observe(self, state: DecodeState, verdict) -> None:
        m = state.memo
        tree_parents = m.last_tree.parents
        accepted = set(verdict.path)
        # Keys of this step's draft; none when no draft was asked for (the last token of a budget).
        keys, m.node_keys = m.node_keys, []
        for node, (context, token, prob) in enumerate(keys):
            parent = tree_parents[node]
            if parent < 0 or parent in accepted:
                hit = node in accepted
                m.tried[(context, token)] += 1
                m.context_tries[context] += 1
                m.hits[(context, token)] += hit
                hits, predicted = m.calibration.get(len(context), (1.0, 1.0))
                m.calibration[len(context)] = (CALIBRATION_DECAY * hits + hit, CALIBRATION_DECAY * predicted + prob)
        m.table.update(state.tokens + verdict.tokens)


def _subtree(tree: DraftTree, keep: list[int]) -> DraftTree:
    """The nodes `keep` (sorted; closed under parents) with parent indices renumbered."""
    new_index = {old: new for new, old in enumerate(keep)}
    out = DraftTree(key=tree.key)
    for old in keep:
        parent = tree.parents[old]
        out.add(tree.tokens[old], -1 if parent < 0 else new_index[parent])
    return out
