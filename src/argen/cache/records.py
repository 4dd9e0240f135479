"""Attention records: what a forward pass writes into a cache that keeps them (`PagedKV.attention`,
for the presses that rank keys by the attention they received: H2O, prefix-kv, SnapKV's window).
The runtime computes them in its pass; the presses read them. Kept apart from both, so the runtime
never imports a press.
"""

from __future__ import annotations

import math

import torch


def attention_received(
    q: torch.Tensor, keys: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    """The attention weights each key receives from the queries q [n, heads, D], summed over the queries
    and over the query heads that share a kv head [kv heads, keys] (the weights SDPA computes and does
    not return; keys [kv heads, keys, D], GQA)."""
    n, heads, dim = q.shape
    kv_heads, length = keys.shape[0], keys.shape[1]
    k = keys.float().repeat_interleave(heads // kv_heads, 0)  # [heads, keys, D]
    scores = torch.einsum("nhd,htd->hnt", q.float(), k) / math.sqrt(dim)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask.to(torch.bool), -torch.inf)
    elif is_causal:
        scores = scores.masked_fill(torch.ones(n, length, dtype=torch.bool).tril(length - n).logical_not(), -torch.inf)
    return scores.softmax(-1).sum(1).view(kv_heads, heads // kv_heads, length).sum(1)
