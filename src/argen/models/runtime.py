"""The ModelRuntime protocol: tokens + positions + KV cache -> logits, hidden states.

Both runtimes (the native Llama one and the Hugging Face adapter) implement it, so every strategy
works with either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Plan:
    """Which sub-blocks run in a forward pass. `attn[i]` / `ffn[i]` say whether layer i's attention /
    feed-forward block runs; a skipped block leaves the residual stream untouched."""

    attn: tuple[bool, ...]
    ffn: tuple[bool, ...]

    @classmethod
    def full(cls, n_layers: int) -> Plan:
        return cls((True,) * n_layers, (True,) * n_layers)

    @classmethod
    def skipping(cls, n_layers: int, layers=(), ffn_only=()) -> Plan:
        """Skip whole `layers`, and only the FFN of the layers in `ffn_only`."""
        skip, skip_ffn = set(layers), set(layers) | set(ffn_only)
        return cls(tuple(i not in skip for i in range(n_layers)), tuple(i not in skip_ffn for i in range(n_layers)))

    @property
    def is_full(self) -> bool:
        return all(self.attn) and all(self.ffn)


@dataclass(frozen=True)
class ModelInfo:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int


class ModelRuntime(Protocol):
    info: ModelInfo
    device: torch.device
    dtype: torch.dtype

    def new_cache(self, batch_size: int = 1, max_len: int | None = None): ...

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache,
        mask: torch.Tensor | None = None,
        plan: Plan | None = None,
        num_logits: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Run `tokens` [B, T] at `positions` [B, T], appending their keys/values to `cache` (whose
        lengths grow by T). `mask` [T, T] (or [B, T, T]) says which new tokens each new token sees
        (default: causal); every token sees the whole cached prefix. Returns logits [B, T', V] for the
        last `num_logits` tokens (all if None, no logits if 0) and the final hidden states [B, T, H]."""
        ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for final hidden states [..., H] as `forward` returns them. Verifiers use it to
        compute only the rows they examine: on CPU the vocabulary projection is the largest matmul
        of a step, and a draft row that is never reached needs no logits."""
        ...
