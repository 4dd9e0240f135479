"""The ModelRuntime protocol: tokens + positions + KV cache -> logits, hidden states.

Both runtimes (the native Llama one and the Hugging Face adapter) implement it, so every strategy
works with either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from argen.cache.kv import KVCache

T = TypeVar("T")


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


@dataclass
class Segment:
    """New tokens of one sequence for a packed forward pass: the pass writes their keys/values into
    `cache` after what it holds. `mask` [T, T] says which new tokens each new token sees (None:
    causal); every new token sees the whole cached prefix, unless the runtime declares `cache_masks`
    and the mask is [T, cached + T] (then it says which cached positions each sees too: a draft tree
    grown depth by depth in a draft head's cache). `num_logits`: logits for the last that many tokens
    (None: all, 0: none)."""

    cache: KVCache
    tokens: list[int] | torch.Tensor
    positions: list[int] | torch.Tensor
    mask: torch.Tensor | None = None
    num_logits: int | None = 0
    # Opt-in: also return, per token and layer, the cosine similarity of the FFN block's input and
    # output residual streams (FFN-SkipLLM's trigger). Runtimes that declare `ffn_stats` support it.
    ffn_cos: bool = False
    # [T, H]: what a feature-level drafter reads beside each token (a draft head: the target's hidden
    # states, or its own predictions); runtimes that declare `input_features` need it, others ignore it.
    features: torch.Tensor | None = None
    # [T, H]: input embeddings that replace the tokens' own (superposed decoding feeds a weighted sum
    # of several tokens' embeddings); runtimes that declare `input_embeds` read it.
    embeds: torch.Tensor | None = None


@dataclass
class SegmentOut:
    logits: torch.Tensor | None  # [num_logits, V]
    hidden: torch.Tensor  # final hidden states [T, H]
    pass_index: int = 0  # which forward pass of the packed call computed it (segments may be split)
    # [T, n_layers]: cos(x, x + ffn(x)) per token and layer when the segment asked (1.0 where skipped)
    ffn_cos: torch.Tensor | None = None

    def requested_logits(self) -> torch.Tensor:
        """`logits`, of a segment that asked for some (num_logits other than 0)."""
        if self.logits is None:
            raise ValueError("this segment asked for no logits (num_logits=0)")
        return self.logits

    def requested_ffn_cos(self) -> torch.Tensor:
        """`ffn_cos`, of a segment that asked for it (Segment.ffn_cos)."""
        if self.ffn_cos is None:
            raise ValueError("this segment did not ask for FFN similarities (ffn_cos=False)")
        return self.ffn_cos


@dataclass(frozen=True)
class ModelInfo:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int


@dataclass(frozen=True)
class Capabilities:
    """What a runtime can do, declared (strategies and the Engine ask this, never the object's type)."""

    paged_kv: bool  # caches are block tables in a shared pool (`kv_pool()`): prefix caching, forks
    layer_plans: bool  # a Plan may skip attention / FFN sub-blocks (layer-skip drafts)
    kernels: str = "torch"  # which kernels run the weights (for reports)
    ffn_stats: bool = False  # segments may ask for per-layer FFN input/output similarity (Segment.ffn_cos)
    input_features: bool = False  # segments carry input features beside their tokens (Segment.features)
    cache_masks: bool = False  # a segment's mask may cover the cached positions too ([T, cached + T])
    key_rotation: bool = False  # `rotate_keys(cache, start, n, shift)`: cached RoPE keys moved (prompt edits)
    # Segments may carry input embeddings in place of their tokens' (Segment.embeds), and the runtime
    # has `embed_tokens(ids [B, T]) -> [B, T, H]` to compute them.
    input_embeds: bool = False


@dataclass
class RuntimeMemo:
    """What strategies learn about a model once and reuse across requests. It lives with the runtime,
    so every request on that model shares it, and nothing else is attached to a runtime."""

    calibration_ids: list[list[int]] = field(default_factory=list)  # sample text (models/calibration.py)
    # What strategies learnt, one record per type the strategy declares (e.g. speculative/adaptive.py's
    # CostModel, jacobi.py's JacobiLearnt): the memo holds no strategy's fields itself.
    learnt: dict[type, Any] = field(default_factory=dict)

    def get(self, kind: type[T], make: Callable[[], T] | None = None) -> T:
        """The runtime's record of type `kind`, made by `make` (default: `kind()`) on first use."""
        if kind not in self.learnt:
            self.learnt[kind] = kind() if make is None else make()
        return self.learnt[kind]


class ModelRuntime(Protocol):
    info: ModelInfo
    device: torch.device
    dtype: torch.dtype
    capabilities: Capabilities
    memo: RuntimeMemo

    @property
    def weight_bytes(self) -> int:
        """The weights held in memory (quantized blocks at their stored size)."""
        ...

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

    def forward_packed(self, segments: list[Segment], plan: Plan | None = None) -> list[SegmentOut]:
        """Several sequences' new tokens in one pass (each its own length, positions, mask and cache):
        the weights are read once for all of them. Results are per segment, in order."""
        ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for final hidden states [..., H] as `forward` returns them. Verifiers use it to
        compute only the rows they examine: on CPU the vocabulary projection is the largest matmul
        of a step, and a draft row that is never reached needs no logits."""
        ...
