"""Draft trees: what a proposer hands the verifier. A chain is a tree with one branch.

Node i holds a token and the index of its parent (-1 = the pending token at the root). Nodes are
stored parents-first, so a node's depth and ancestors are known when it is added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    # Draft probabilities q(token | path) per node, for stochastic proposers (None = deterministic).
    draft_probs: list[torch.Tensor] | None = None
    # What kind of draft this is (e.g. the matched n-gram length): acceptance is tracked per key.
    key: object = None

    @classmethod
    def chain(cls, tokens: list[int]) -> DraftTree:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        return len(self.tokens) - 1

    def child(self, parent: int, token: int) -> int | None:
        for i, (t, p) in enumerate(zip(self.tokens, self.parents)):
            if p == parent and t == token:
                return i
        return None

    def children(self, parent: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == parent]

    def depths(self) -> list[int]:
        depth: list[int] = []
        for p in self.parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        return depth

    def attention_mask(self) -> torch.Tensor:
        """[1 + n, 1 + n] mask over root + nodes: each sees the root, its ancestors and itself."""
        n = len(self.tokens)
        mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            row = i + 1
            mask[row, row] = True
            if p >= 0:
                mask[row] |= mask[p + 1]
        return mask

    def limited(self, depth: int) -> DraftTree:
        """The nodes at most `depth` deep (parents come first, so indices stay valid)."""
        keep = [i for i, d in enumerate(self.depths()) if d <= depth]
        if len(keep) == len(self.tokens):
            return self
        probs = None if self.draft_probs is None else [self.draft_probs[i] for i in keep]
        return DraftTree([self.tokens[i] for i in keep], [self.parents[i] for i in keep], probs, self.key)

    @property
    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.tokens) - 1))
