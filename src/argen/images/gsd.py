"""Grouped speculative decoding (GSD; So et al., ICCV 2025) for the AR image models' draft-model
speculative sampling (decoding.ar_speculative's `relax`).

Image tokens are redundant: several neighbouring tokens make nearly the same picture, so exact
speculative sampling rejects drafts that would have looked as good. GSD judges a draft token x
against its group G(x) of similar tokens instead: x is kept with probability
min(1, p(G(x)) / q(G(x))), the target's and the draft's probability mass over the group; a rejected
x is resampled from norm(max(p - q, 0)), as speculative sampling does. This follows the authors'
released code (github.com/junhyukso/GSD, jacobi_iteration_lumina_mgpt.py): a kept draft token is
kept as drafted, and the rejection resamples over all tokens. Lossy: the group's total mass is the
target's, but within a group the kept token follows the draft's distribution.

The group (dynamic, as the paper's): x and its `group - 1` nearest tokens in latent space (for grey
levels: the neighbouring levels, `decoding.grey_level_order`; a codebook model passes its own
order), each kept only if its target probability is within `p_gap` of p(x) (the paper's probability
filter; 1.0 turns it off). With group = 1 the group is {x}: exact speculative sampling, draw for draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grouped:
    order: torch.Tensor  # (V, V-1): each token's other tokens, nearest first
    group: int = 3
    p_gap: float = 1.0

    def members(self, p: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """(A, V) bool: the group of each row's token `tok` under the target's probabilities p (A, V)."""
        rows = torch.arange(len(tok))
        mask = torch.zeros_like(p, dtype=torch.bool)
        mask[rows, tok] = True
        near = self.order[tok][:, : self.group - 1]  # (A, group - 1)
        if near.shape[1]:
            close = (p.gather(1, near) - p[rows, tok][:, None]).abs() < self.p_gap
            mask.scatter_(1, near, close)
        return mask

    def judge(self, p: torch.Tensor, q: torch.Tensor, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(p(G), q(G), nothing excluded from the resampling) for rows p, q (A, V) and drafts tok (A,)."""
        g = self.members(p, tok)
        return (p * g).sum(-1), (q * g).sum(-1), None
