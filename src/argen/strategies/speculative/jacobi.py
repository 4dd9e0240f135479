"""Jacobi / lookahead decoding (Santilli et al.; Fu et al.): iterate a window of guessed future
tokens in parallel with verification, and draft from n-grams harvested from the iterations.

Each step feeds one tree to the target: the pending token, then two kinds of branches from it:
- the lookahead branch: the current window of W guesses g_1..g_W for the next positions. The
  target's outputs over it are one Jacobi iteration: the output after g_j is the new guess for the
  position after it. (The branch is also verified like any draft: Jacobi decoding proper.)
- verification branches: up to `candidates` chains drawn from an n-gram pool harvested from
  earlier iterations. The output after g_j was computed from the window prefix g_1..g_j, so
  (g_{j-n+2}, ..., g_j) -> output is an n-gram the model vouches for; chains follow the longest
  known context (backing off to shorter ones), alternatives branch at the first token.

Both are scored in the one pass and the verifier accepts the longest valid path, so the output is
exactly plain decoding's. On a machine where the extra tokens cost more than they return (a CPU
runs a wider pass slower), the strategy measures its own gain and falls back to plain steps,
retrying the iteration now and then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from argen.strategies.base import DecodeState, Step
from argen.strategies.speculative.base import Speculative, SpeculativeMemo
from argen.strategies.speculative.tree import DraftTree

POOL_PER_KEY = 2  # next tokens kept per context, most recent first
MIN_BACKOFF, MAX_BACKOFF = 4, 512  # plain steps between lookahead tries after one that did not pay


@dataclass
class JacobiMemo(SpeculativeMemo):
    guesses: list[int] = field(default_factory=list)  # the window's current guesses
    pool: dict = field(default_factory=dict)  # n-gram context -> next tokens seen, most recent first
    window_nodes: list[int] = field(default_factory=list)  # the window's nodes in this step's tree
    gain: float = 1.0  # EMA of tokens per lookahead step
    cost_ratio: float = 1.0  # EMA of a lookahead step's cost / a plain step's
    backoff: int = MIN_BACKOFF
    cooldown: int = 0  # plain steps left before the next try


@dataclass
class JacobiLearnt:
    """What adaptive requests learnt on one runtime (its memo): the back-off where lookahead did not pay."""

    backoff: int | None = None


class Jacobi(Speculative):
    name = "jacobi"
    sizes_own_drafts = True
    Memo = JacobiMemo

    def __init__(self, window: int = 4, ngram: int = 4, candidates: int = 2, adaptive: bool = True) -> None:
        super().__init__(max_draft=max(window, ngram - 1), adaptive=adaptive)
        if window < 1 or ngram < 2 or candidates < 0:
            raise ValueError("need window >= 1, ngram >= 2 and candidates >= 0")
        self.window, self.ngram, self.candidates = window, ngram, candidates

    def max_tree_nodes(self) -> int:
        # The window (at most max_draft guesses) plus `candidates` chains of at most max_draft.
        return self.max_draft * (1 + self.candidates)

    def start(self, state: DecodeState) -> None:
        super().start(state)
        m = state.memo
        # Initial guesses: tokens of the prompt (lookahead decoding starts from random vocabulary).
        m.guesses = (list(state.tokens[-self.window :]) * self.window)[: self.window]
        # The back-off carries over between adaptive requests on one runtime (its memo): where
        # lookahead does not pay (on a CPU a wider pass costs much more), a new request does not pay
        # for the lesson again. adaptive=False always iterates, whatever earlier requests learnt.
        learnt = state.runtime.memo.get(JacobiLearnt).backoff or MIN_BACKOFF
        m.backoff = learnt if self.adaptive else MIN_BACKOFF
        m.cooldown = 0 if m.backoff <= MIN_BACKOFF else m.backoff

    def propose(self, state: DecodeState, k: int) -> DraftTree:
        m = state.memo
        tree = DraftTree()
        m.window_nodes = []
        if k == 0 or m.cooldown > 0:
            m.cooldown = max(0, m.cooldown - 1)
            return tree
        m.window_nodes = _insert(tree, m.guesses[:k], merge=False)
        for first in self._next(m.pool, state.tokens)[: self.candidates]:
            chain = [first]
            while len(chain) < k and (following := self._next(m.pool, state.tokens + chain)):
                chain.append(following[0])
            _insert(tree, chain, merge=True)
        return tree

    def _next(self, pool: dict, context: list[int]) -> list[int]:
        """Tokens the pool has seen after the longest matching suffix of `context`."""
        for n in range(self.ngram - 1, 0, -1):
            found = pool.get(tuple(context[-n:]))
            if found:
                return found
        return []

    def step(self, state: DecodeState) -> Step:
        t0 = time.perf_counter()
        state.memo.window_nodes = []  # set by propose when this step runs an iteration
        tokens = yield from super().step(state)
        if state.memo.cost is not None and state.batch_size == 1:  # adaptive; timed alone
            self._learn(state, len(tokens), time.perf_counter() - t0)
        return tokens

    def _learn(self, state: DecodeState, n_tokens: int, seconds: float) -> None:
        """Compare the measured rate of lookahead steps with plain steps' (from the cost model)."""
        m = state.memo
        if not m.window_nodes:
            return
        m.gain = 0.7 * m.gain + 0.3 * n_tokens
        m.cost_ratio = 0.7 * m.cost_ratio + 0.3 * seconds / m.cost(1)
        if m.gain / m.cost_ratio < 1.0:
            m.cooldown, m.backoff = m.backoff, min(MAX_BACKOFF, 2 * m.backoff)
        else:
            m.backoff = MIN_BACKOFF
        state.runtime.memo.get(JacobiLearnt).backoff = m.backoff

    def observe(self, state: DecodeState, verdict) -> None:
        m = state.memo
        if not m.window_nodes:
            return
        # One Jacobi iteration: outputs after the root and after each guess.
        rows = [0] + [node + 1 for node in m.window_nodes]
        outputs = state.runtime.head(verdict.hidden[rows]).argmax(-1).tolist()
        guesses = [state.tokens[-1]] + m.guesses[: len(m.window_nodes)]
        # Harvest: the output after guess j was computed from everything before it in the window.
        for j in range(len(guesses)):
            for n in range(1, self.ngram):
                if j - n + 1 < 0:
                    break
                kept = m.pool.setdefault(tuple(guesses[j - n + 1 : j + 1]), [])
                if outputs[j] in kept:
                    kept.remove(outputs[j])
                kept.insert(0, outputs[j])
                del kept[POOL_PER_KEY:]
        # The next window starts after the new pending token: shift by what was emitted.
        shift = len(verdict.tokens)
        fresh = outputs[shift:] if shift < len(outputs) else []
        filler = fresh[-1:] or outputs[-1:]
        m.guesses = (fresh + filler * self.window)[: self.window]


def _insert(tree: DraftTree, tokens: list[int], merge: bool) -> list[int]:
    """Add a chain from the root (sharing existing nodes if `merge`); returns its node ids."""
    parent, nodes = -1, []
    for token in tokens:
        node = tree.child(parent, token) if merge else None
        parent = tree.add(token, parent) if node is None else node
        nodes.append(parent)
    return nodes
