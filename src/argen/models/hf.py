"""The Hugging Face adapter runtime: the ModelRuntime interface over any AutoModelForCausalLM.

Slower than the native runtime but universal (GPT-2, Phi, Gemma, ...). Tree masks are passed to
the model as a 4D additive attention mask; layer plans need the native runtime.
"""

from __future__ import annotations

import copy
from typing import cast

import torch

from argen.models.runtime import Capabilities, ModelInfo, Plan, RuntimeMemo, Segment, SegmentOut


class HFCache:
    """A single-sequence cache over transformers' DynamicCache with argen's KVCache interface."""

    def __init__(self, bytes_per_position: int, max_len: int) -> None:
        from transformers import DynamicCache

        self.dynamic = DynamicCache()
        self.lengths = [0]
        self.peak_length = 0
        self.max_len = max_len
        self._bytes_per_position = bytes_per_position

    @property
    def length(self) -> int:
        return self.lengths[0]

    def reserve(self, new_tokens: int) -> None:
        longest = self.lengths[0] + new_tokens
        if longest > self.max_len:
            raise ValueError(f"KV cache overflow: {longest} positions needed, {self.max_len} allowed")
        self.peak_length = max(self.peak_length, longest)

    def truncate(self, n: int, row: int | None = None) -> None:
        if n > self.lengths[0]:
            raise ValueError(f"cannot truncate a cache of length {self.lengths[0]} to {n}")
        if n < self.lengths[0]:
            self.dynamic.crop(n - self.lengths[0])  # negative = drop that many (the form every version takes)
        self.lengths[0] = n

    @torch.inference_mode()  # DynamicCache tensors are inference tensors: edit them in that mode
    def move_slots(self, src: list[int], dst_start: int, row: int = 0) -> None:
        from transformers.cache_utils import CacheLayerMixin

        index = torch.tensor(src)
        for layer in self.dynamic.layers:
            if not isinstance(layer, CacheLayerMixin):  # a linear-attention state has no key per position
                raise ValueError(f"cannot move positions in a {type(layer).__name__}; decode this model plainly")
            if layer.keys is None or layer.values is None:
                continue  # a layer that holds nothing yet
            for t in (layer.keys, layer.values):
                t[:, :, dst_start : dst_start + len(src)] = t[:, :, index.to(t.device)]

    def bytes_per_position(self) -> int:
        return self._bytes_per_position

    @torch.inference_mode()
    def fork(self) -> HFCache:
        """A copy with the same content (n samples of one prompt): transformers' caches are not paged,
        so the keys and values are copied, not shared."""
        other = HFCache(self._bytes_per_position, self.max_len)
        other.dynamic = copy.deepcopy(self.dynamic)
        other.lengths, other.peak_length = list(self.lengths), self.peak_length
        return other

    def free(self) -> None:
        from transformers import DynamicCache

        self.dynamic = DynamicCache()
        self.lengths[0] = 0

    @property
    def peak_bytes(self) -> int:
        return self.peak_length * self._bytes_per_position


class HFRuntime:
    def __init__(self, model) -> None:
        self.model = model.eval()
        config = model.config
        self.config = config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        n_heads = getattr(config, "num_attention_heads", None) or config.n_head
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or hidden // n_heads
        n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
        max_pos = getattr(config, "max_position_embeddings", None) or config.n_positions
        self.info = ModelInfo(n_layers, n_heads, n_kv, head_dim, hidden, config.vocab_size, max_pos)
        self.capabilities = Capabilities(paged_kv=False, layer_plans=False, kernels="transformers")
        self.memo = RuntimeMemo()

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> HFCache | list[HFCache]:
        info = self.info
        per_position = 2 * info.n_layers * info.n_kv_heads * info.head_dim * self.dtype.itemsize
        caches = [HFCache(per_position, max_len or info.max_positions) for _ in range(batch_size)]
        return caches[0] if batch_size == 1 else caches

    def forward_packed(self, segments: list[Segment], plan: Plan | None = None) -> list[SegmentOut]:
        """Each segment in a pass of its own: transformers' caches hold one sequence each."""
        outs = []
        for index, seg in enumerate(segments):
            tokens = torch.as_tensor(seg.tokens, dtype=torch.long).reshape(1, -1)
            positions = torch.as_tensor(seg.positions, dtype=torch.long).reshape(1, -1)
            if not isinstance(seg.cache, HFCache):
                raise TypeError(f"a Hugging Face runtime runs its own caches (HFCache), not {type(seg.cache).__name__}")
            logits, hidden = self.forward(tokens, positions, seg.cache, seg.mask, plan, seg.num_logits)
            outs.append(SegmentOut(None if logits is None else logits[0], hidden[0], index))
        return outs

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: HFCache | list[HFCache],
        mask: torch.Tensor | None = None,
        plan: Plan | None = None,
        num_logits: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        if plan is not None and not plan.is_full:
            raise ValueError("layer plans (layer skipping) need the native runtime")
        if isinstance(cache, list):  # several sequences: one after another
            outs = [
                self.forward(
                    tokens[r : r + 1],
                    positions[r : r + 1],
                    c,
                    None if mask is None else (mask if mask.dim() == 2 else mask[r]),
                    plan,
                    num_logits,
                )
                for r, c in enumerate(cache)
            ]
            # Logits for every row unless none were asked for.
            logits = None if num_logits == 0 else torch.cat([cast(torch.Tensor, o[0]) for o in outs])
            return logits, torch.cat([o[1] for o in outs])
        n_new = tokens.shape[1]
        cache.reserve(n_new)
        start = cache.lengths[0]
        attention_mask = None
        if mask is not None:
            allowed = torch.ones(n_new, start + n_new, dtype=torch.bool, device=self.device)
            allowed[:, start:] = mask.to(self.device, torch.bool).reshape(n_new, n_new)
            attention_mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            attention_mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
            attention_mask = attention_mask[None, None]
        out = self.model(
            input_ids=tokens.to(self.device),
            position_ids=positions.to(self.device),
            attention_mask=attention_mask,
            past_key_values=cache.dynamic,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=num_logits or 0,
        )
        cache.lengths[0] += n_new
        logits = None if num_logits == 0 else out.logits
        return logits, out.hidden_states[-1]

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for final hidden states [..., H] (the model's output embedding)."""
        return self.model.get_output_embeddings()(hidden)
