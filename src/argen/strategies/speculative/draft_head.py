"""`draft-head`: speculative decoding with a draft head learned from the model itself (EAGLE-1's
feature-level head, EAGLE-2's dynamic draft tree). The head (models/draft_head.py) is made by
`argen distill-draft` and resolved above the strategy (the API loads the cached one, a server the
one its operator loaded); the strategy receives its runtime and only ever feeds it.

Each step:
1. Catch up: the head reads the pairs (f_i, t_{i+1}) that the last verification confirmed (the
   target's own hidden states from that pass), up to the pending token. Its last row predicts the
   feature after the pending token; the top `width` tokens of its logits are the tree's first level.
2. Grow: each further head pass feeds the `width` most probable nodes of the newest level (each its
   parent's predicted feature and its own token, masked to see the sequence and its ancestors in
   the head's cache) and scores their children. A node's value is its path probability: the
   product along its path of the head's probabilities, scaled by how often the verifier accepted
   what the head predicted (a running calibration).
3. Size (adaptive): the nodes are cut to the count that maximises expected tokens per second under
   the measured pass costs (`adaptive.best_tree`: the verification pass over 1 + n tokens and one
   head pass per level); a level that does not raise that rate ends the growth, and with no node
   worth verifying the step is a plain one, after which the head rests a few steps (MAX_REST).
4. Verify with the shared tree verifier; the head's cache is cut back to the confirmed sequence, and
   the target's hidden states of the root and the accepted path wait for the next catch-up.

The drafts are deterministic (the head's top tokens, whatever the sampling settings), so the
verifier's rule for deterministic drafts applies: greedy output is plain greedy output, and sampled
output is plain sampling's, draw for draw (the same per-position noise), hence also in distribution.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from argen.errors import InvalidRequestError
from argen.models.draft_head import DraftHeadRuntime
from argen.models.runtime import SegmentOut
from argen.strategies.base import DecodeState, Feed, Feeds, Outs, run
from argen.strategies.speculative.adaptive import best_tree
from argen.strategies.speculative.base import Speculative, SpeculativeMemo
from argen.strategies.speculative.ngram import _subtree
from argen.strategies.speculative.tree import DraftTree

CALIBRATION_DECAY = 0.95  # forgetting of the accepted-vs-predicted calibration
# After a step whose sizing kept no node, the head rests 1, 2, 4, 8 steps (doubling while it keeps
# finding nothing worth verifying, back to 0 once it does): where drafting does not pay, the head pass
# (a seventh of a target pass on SmolLM2 at one thread) is no longer paid every step. The features it
# skipped are read in the next catch-up, one pass for all of them. Exactness does not depend on it.
MAX_REST = 8
NO_HEAD = (
    "strategy 'draft-head' needs a draft head distilled from this model: run `argen distill-draft --model "
    "MODEL` once (it caches the head beside the model), then ask for draft-head again"
)


@dataclass
class DraftHeadMemo(SpeculativeMemo):
    head: DraftHeadRuntime | None = None
    cache: object = None  # the head's own KV cache: the confirmed sequence, then this step's tree
    features: torch.Tensor | None = None  # the target's confirmed features the head has not read yet
    calibration: list[float] = field(default_factory=lambda: [1.0, 1.0])  # decayed (accepted, predicted)
    head_seconds: float | None = None  # per head pass, measured (a prior from the head's own timing until then)
    node_q: list[float] = field(default_factory=list)  # this step's nodes: the head's probability given the parent
    rest: int = 0  # steps the head still skips (adaptive: after steps with no node worth verifying)
    rested: int = 0  # the length of the last rest (doubles up to MAX_REST while drafts do not pay)


class DraftHead(Speculative):
    Memo = DraftHeadMemo
    name = "draft-head"
    companion_options = {"head": "head"}
    sizes_own_drafts = True
    needs_prompt_hidden = True  # the head's first catch-up reads the prompt's features

    def __init__(
        self, head: object = None, max_draft: int = 6, max_nodes: int = 16, width: int = 4, adaptive: bool = True
    ) -> None:
        super().__init__(max_draft, adaptive)
        if not (head is None or isinstance(head, str | Path | DraftHeadRuntime)):
            raise ValueError(
                "head must be a draft head file, 'cached' (the head `argen distill-draft` cached for the "
                f"model) or a loaded head; got {type(head).__name__}"
            )
        for option, value in (("max_nodes", max_nodes), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{option} must be an integer >= 1")
        self.head, self.max_nodes, self.width = head, max_nodes, width
        # The loaded head: given as one, or resolved above the strategy (prepare); the option keeps what was given.
        self._head = head if isinstance(head, DraftHeadRuntime) else None

    def options(self) -> dict:
        head = self.head  # a loaded head is recorded by its file
        if isinstance(head, DraftHeadRuntime):
            head = Path(head.meta.get("path", "head")).name
        return super().options() | {"head": None if head is None else str(head)}

    def max_tree_nodes(self) -> int:
        return self.max_nodes

    def prepare(self, base, companions: dict | None = None) -> None:
        """Called by the API or the server with the head they resolved (`companions["head"]`: loaded
        above the strategy, from the cache, a file, or the operator's `--draft-head`)."""
        head = (companions or {}).get("head")
        if isinstance(head, DraftHeadRuntime):
            self._head = head

    def check(self, runtime, prompt_len: int, params) -> None:
        if self._head is None:
            raise InvalidRequestError(NO_HEAD)
        if self._head.target is not runtime:
            raise InvalidRequestError(
                "this draft head was loaded for another model than the one decoding; load the "
                "head of the model you decode with"
            )

    def start(self, state: DecodeState) -> None:
        super().start(state)
        m = state.memo
        if self._head is None:
            raise InvalidRequestError(NO_HEAD)
        m.head = self._head
        m.cache = state.new_cache(m.head, state.cache.max_len + self.width * self.max_draft + 1)
        hidden = state.prompt_hidden  # the prompt's features f_0..f_{n-2}: the head's first catch-up
        m.features = hidden if hidden is not None else torch.zeros(0, m.head.config.hidden_size)
        state.extras["draft_head"] = {"head_passes": 0, "head_seconds": 0.0}

    def _head_seconds(self, m, rows: int) -> float:
        return m.head_seconds if m.head_seconds is not None else m.head.pass_seconds(rows)

    def _timed(self, state: DecodeState, feed: Feed) -> Generator[Feeds, Outs, SegmentOut]:
        m = state.memo
        start = time.perf_counter()
        out = yield from run(feed)
        seconds = time.perf_counter() - start
        record = state.extras["draft_head"]
        record["head_passes"] += 1
        record["head_seconds"] += seconds
        # A tree level's pass, alone in its round (in a batch the time is the shared pass's; a catch-up
        # over a whole prompt is no level).
        if state.batch_size == 1 and len(feed.tokens) <= 2 * self.width:
            m.head_seconds = seconds if m.head_seconds is None else 0.8 * m.head_seconds + 0.2 * seconds
        return out

    def propose(self, state: DecodeState, k: int) -> Generator[Feeds, Outs, DraftTree]:
        m = state.memo
        m.node_q = []
        committed = m.cache.lengths[0]
        pending = (
            len(state.tokens) - 1
        )  # the pending token's index; the head holds entries 0..pending-1 after the catch-up
        if committed + len(m.features) != pending:
            raise RuntimeError(f"draft head out of step: {committed} entries + {len(m.features)} new != {pending}")
        if len(m.features) == 0:
            return DraftTree()  # a one-token prompt: nothing to predict from until the first verification
        if m.rest:
            m.rest -= 1
            return DraftTree()  # resting: the features wait for the next catch-up
        vocab, width = m.head.vocab, self.width
        out = yield from self._timed(
            state,
            Feed(
                state.tokens[committed + 1 :],
                list(range(committed, pending)),
                None,
                None,
                1,
                m.cache,
                m.head,
                True,
                features=m.features,
            ),
        )
        m.features = m.features[:0]
        alpha = m.calibration[0] / m.calibration[1]
        tree = DraftTree()
        probs: list[float] = []  # each node's path probability (calibrated)
        q_of: list[float] = []  # each node's probability under the head
        depth_of: list[int] = []
        # Nodes whose children are scored next: (tree node or -1, predicted feature after it, logits of its children).
        level = [(-1, out.hidden[-1], out.requested_logits()[-1])]
        fed: list[int] = []  # tree nodes whose entries follow the committed ones in the head's cache, in order
        best = (0, 0.0, 0)  # (nodes kept, rate, depth)
        for depth in range(1, k + 1):
            children = []
            for parent, _, logits in level:
                top = logits.float().softmax(-1).topk(min(width, len(vocab)))
                parent_prob = 1.0 if parent < 0 else probs[parent]
                for q, j in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    children.append(tree.add(int(vocab[j]), parent))
                    q_of.append(q)
                    probs.append(parent_prob * min(1.0, alpha * q))
                    depth_of.append(depth)
            feature_of = {node: feature for node, feature, _ in level}
            candidates = children
            if self.adaptive:
                order = sorted(range(len(tree)), key=lambda i: (-probs[i], depth_of[i], i))
                n, rate = best_tree(
                    [probs[i] for i in order],
                    m.cost,
                    batch=state.batch_size,
                    fixed_seconds=depth * self._head_seconds(m, width),
                )
                if depth > 1 and rate <= best[1]:
                    break  # this level does not pay for its head pass
                best = (n, rate, depth)
                kept = set(order[:n])
                candidates = [
                    node for node in children if node in kept
                ]  # a node not worth verifying has no children that are
                if not candidates:
                    break
            if depth == k:
                break
            # Grow: the `width` most probable nodes of this level get their children scored.
            grow = sorted(candidates, key=lambda i: (-probs[i], i))[:width]
            mask = torch.zeros(len(grow), pending + len(fed) + len(grow), dtype=torch.bool)
            mask[:, :pending] = True
            for r, node in enumerate(grow):
                ancestors, p = set(), tree.parents[node]
                while p >= 0:
                    ancestors.add(p)
                    p = tree.parents[p]
                for e, other in enumerate(fed):
                    mask[r, pending + e] = other in ancestors
                mask[r, pending + len(fed) + r] = True
            parents_feature = torch.stack([feature_of[tree.parents[node]] for node in grow])
            grown = yield from self._timed(
                state,
                Feed(
                    [tree.tokens[node] for node in grow],
                    [pending + depth - 1] * len(grow),
                    mask,
                    None,
                    len(grow),
                    m.cache,
                    m.head,
                    True,
                    features=parents_feature,
                ),
            )
            fed += grow
            level = [(node, grown.hidden[r], grown.requested_logits()[r]) for r, node in enumerate(grow)]
        m.cache.truncate(pending)
        if self.adaptive:
            m.rested = 0 if best[0] else min(MAX_REST, 2 * m.rested or 1)
            m.rest = m.rested
        n, depth = (best[0], best[2]) if self.adaptive else (self.max_nodes, k)
        keep = _best_nodes(probs, depth_of, depth, min(n, self.max_nodes))
        m.node_q = [q_of[i] for i in keep]
        return _subtree(tree, keep)

    def observe(self, state: DecodeState, verdict) -> None:
        m = state.memo
        # The target's features of the old pending token and of each accepted node: the next catch-up's.
        rows = [0] + [node + 1 for node in verdict.path]
        m.features = torch.cat([m.features, verdict.hidden[rows]])
        tree, accepted = m.last_tree, set(verdict.path)
        qs, m.node_q = m.node_q, []
        if len(qs) != len(tree):
            return  # no draft this step (the last token of the budget)
        hits = predicted = 0.0
        for node, q in enumerate(qs):
            parent = tree.parents[node]
            if parent < 0 or parent in accepted:  # the verifier looked at this node's level under its parent
                predicted += q
                hits += node in accepted
        if predicted:
            m.calibration = [
                CALIBRATION_DECAY * m.calibration[0] + hits,
                CALIBRATION_DECAY * m.calibration[1] + predicted,
            ]


def _best_nodes(probs: list[float], depth_of: list[int], max_depth: int, n: int) -> list[int]:
    """The n most probable nodes at most `max_depth` deep, in tree order (a node's path probability
    never exceeds its parent's, and ties go parent first, so the set keeps every node's parent)."""
    order = sorted(
        (i for i in range(len(probs)) if depth_of[i] <= max_depth), key=lambda i: (-probs[i], depth_of[i], i)
    )
    return sorted(order[:n])
