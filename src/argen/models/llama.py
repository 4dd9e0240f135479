"""The native runtime for the Llama family (Llama 2/3, SmolLM/SmolLM2, Qwen2, Mistral).

A whole decoder on one screen, in the spirit of gpt-fast / nanoGPT: fused QKV and gate/up
projections, a preallocated KV cache, SDPA attention, RoPE from a precomputed table. Weights come
from a Hugging Face state dict, so its logits can be checked against the HF model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from argen.cache import KVCache
from argen.models.fused import MAX_NEW_TOKENS as FUSED_MAX_NEW_TOKENS
from argen.models.fused import MAX_ROWS as FUSED_MAX_ROWS
from argen.models.fused import FusedForward
from argen.models.matmul import Matmul
from argen.models.quant import QuantMatmul, QuantWeight
from argen.models.runtime import ModelInfo, Plan

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


Linear = Matmul | QuantMatmul


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    ffn_norm: torch.Tensor
    gate_up: Linear
    down: Linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as HF's LlamaRMSNorm: normalise in fp32, scale in the input dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(config, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [n_positions, head_dim], computed exactly as HF does (any rope_type HF knows:
    default, linear, llama3, yarn, ...; we reuse its parameter code rather than re-deriving it)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config)
    freqs = torch.arange(n_positions, dtype=torch.float32)[:, None] * rotary.inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling


class LlamaRuntime:
    """`forward(tokens, positions, cache, mask, plan)` over a Llama-family decoder."""

    def __init__(self, config, state_dict: dict[str, torch.Tensor], device="cpu", dtype=torch.float32):
        arch = getattr(config, "model_type", None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"native runtime supports {', '.join(SUPPORTED_ARCHITECTURES)}, not {arch!r}")
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        self.info = ModelInfo(
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
        )
        self.eps = config.rms_norm_eps

        def w(name: str) -> torch.Tensor:
            value = state_dict[name]
            value = value.dequantize() if isinstance(value, QuantWeight) else value
            return value.to(device=self.device, dtype=dtype).contiguous()

        def maybe(name: str) -> torch.Tensor | None:
            return w(name) if name in state_dict else None

        def linear(names: list[str], bias: torch.Tensor | None = None) -> Linear:
            """One fused linear layer: block-quantized if every part is (same format), else dense."""
            parts = [state_dict[n] for n in names]
            if all(isinstance(x, QuantWeight) for x in parts) and len({x.fmt for x in parts}) == 1:
                return QuantMatmul(QuantWeight.cat(parts), bias)
            return Matmul(torch.cat([w(n) for n in names]), bias)

        self.layers: list[_Layer] = []
        for i in range(self.info.n_layers):
            p = f"model.layers.{i}."
            biases = [maybe(p + f"self_attn.{x}_proj.bias") for x in "qkv"]
            self.layers.append(
                _Layer(
                    attn_norm=w(p + "input_layernorm.weight"),
                    qkv=linear([p + f"self_attn.{x}_proj.weight" for x in "qkv"],
                               torch.cat(biases) if biases[0] is not None else None),
                    o=linear([p + "self_attn.o_proj.weight"]),
                    ffn_norm=w(p + "post_attention_layernorm.weight"),
                    gate_up=linear([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                    down=linear([p + "mlp.down_proj.weight"]),
                )
            )
        embed = state_dict["model.embed_tokens.weight"]
        # A quantized vocabulary matrix stays quantized: rows are dequantized as tokens are looked up.
        self.embed_q = embed if isinstance(embed, QuantWeight) else None
        self.embed = None if self.embed_q is not None else w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        # The vocabulary projection through Matmul too: for one row its GEMV on W^T runs ~1.8x faster
        # than F.linear (8 vs 15 ms for SmolLM2's 49k x 576 head), and batched rows (the server,
        # beams, guides) skip MKL's repacking of a 113 MB weight. Tied weights share the embedding.
        head = "lm_head.weight" if "lm_head.weight" in state_dict else "model.embed_tokens.weight"
        self.lm_head = linear([head])
        cos, sin = rope_tables(config, self.info.max_positions)
        self.cos, self.sin = cos.to(self.device, dtype).contiguous(), sin.to(self.device, dtype).contiguous()
        self.q_size = n_heads * head_dim
        self.kv_size = n_kv * head_dim
        # Quantized weights throughout: short feeds take the fused C forward (models/fused.py).
        matmuls = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        self.fused = FusedForward(self) if all(isinstance(m, QuantMatmul) for m in matmuls) else None

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        info = self.info
        return KVCache(
            info.n_layers,
            batch_size,
            info.n_kv_heads,
            info.head_dim,
            max_len or info.max_positions,
            dtype=self.dtype,
            device=self.device,
        )

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        mask: torch.Tensor | None = None,
        plan: Plan | None = None,
        num_logits: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        batch, n_new = tokens.shape
        if positions.max().item() >= self.info.max_positions:
            raise ValueError(
                f"position {positions.max().item()} is past the model's context ({self.info.max_positions})"
            )
        cache.reserve(n_new)
        starts = list(cache.lengths)
        x = self.embed_tokens(tokens)
        if self.fused is not None and n_new <= FUSED_MAX_NEW_TOKENS and batch * n_new <= FUSED_MAX_ROWS:
            hidden = self.fused(x, positions, starts, cache, mask, plan)
            for r in range(batch):
                cache.lengths[r] += n_new
            if num_logits == 0:
                return None, hidden
            return self.head(hidden if num_logits is None else hidden[:, -num_logits:]), hidden
        cos = self.cos[positions].unsqueeze(1)  # [B, 1, T, D]
        sin = self.sin[positions].unsqueeze(1)
        # One new token per row and rows of different lengths (continuous batching): each row
        # attends over its own keys only, instead of every row over the longest row's length.
        ragged = n_new == 1 and mask is None and len(set(starts)) > 1
        attn_mask, is_causal, n_keys = (None, False, 0) if ragged else self._attention_mask(starts, n_new, mask)
        write = self._cache_writer(starts, n_new)
        info = self.info
        for i, layer in enumerate(self.layers):
            if plan is None or plan.attn[i]:
                h = rms_norm(x, layer.attn_norm, self.eps)
                qkv = layer.qkv(h)
                q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
                q = q.view(batch, n_new, info.n_heads, info.head_dim).transpose(1, 2)
                k = k.view(batch, n_new, info.n_kv_heads, info.head_dim).transpose(1, 2)
                v = v.view(batch, n_new, info.n_kv_heads, info.head_dim).transpose(1, 2)
                q = q * cos + rotate_half(q) * sin
                k = k * cos + rotate_half(k) * sin
                keys, values = write(cache.k[i], cache.v[i], k, v)
                if ragged:
                    out = self._ragged_attention(q, keys, values, starts)
                else:
                    out = F.scaled_dot_product_attention(
                        q, keys[:, :, :n_keys], values[:, :, :n_keys],
                        attn_mask=attn_mask, is_causal=is_causal, enable_gqa=info.n_kv_heads != info.n_heads,
                    )  # fmt: skip
                x = x + layer.o(out.transpose(1, 2).reshape(batch, n_new, self.q_size))
            if plan is None or plan.ffn[i]:
                h = rms_norm(x, layer.ffn_norm, self.eps)
                gate, up = layer.gate_up(h).chunk(2, dim=-1)
                x = x + layer.down(F.silu(gate) * up)
        for r in range(batch):
            cache.lengths[r] += n_new
        hidden = rms_norm(x, self.norm, self.eps)
        if num_logits == 0:
            return None, hidden
        return self.head(hidden if num_logits is None else hidden[:, -num_logits:]), hidden

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings [B, T, H] for token ids [B, T]."""
        if self.embed_q is not None:
            return self.embed_q.embedding(tokens).to(self.dtype)
        return F.embedding(tokens, self.embed)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights the runtime holds (quantized blocks at their stored size)."""
        tensors = [self.norm, self.embed, *(self.embed_q.tensors() if self.embed_q else ()), *self.lm_head.tensors()]
        for layer in self.layers:
            tensors += [layer.attn_norm, layer.ffn_norm]
            tensors += [t for m in (layer.qkv, layer.o, layer.gate_up, layer.down) for t in m.tensors()]
        # Keyed by storage, as a tied head shares the embedding's; oneDNN's packed copies have none.
        unique = {t.data_ptr() if t.layout == torch.strided else id(t): t for t in tensors if t is not None}
        return sum(t.numel() * t.element_size() for t in unique.values())

    def weight_digest(self) -> bytes:
        """A few bytes that identify these weights and their format (calibration caches key on them)."""
        return self.embed_tokens(torch.arange(2)[None]).float().numpy().tobytes() + \
            self.layers[len(self.layers) // 2].down.digest_bytes()

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for final hidden states [..., H]."""
        return self.lm_head(hidden)

    def _ragged_attention(self, q, keys, values, starts: list[int]) -> torch.Tensor:
        """Decode attention for rows of different lengths, row by row. A padded mask makes every
        row read the cache up to the longest row (measured: 1.5x slower steps for 16 Spec-Bench
        prompts of 40..769 tokens); and each row makes the very call a lone sequence makes, so a
        batched row computes what it would alone."""
        gqa = self.info.n_kv_heads != self.info.n_heads
        return torch.cat([F.scaled_dot_product_attention(q[r : r + 1], keys[r : r + 1, :, : s + 1],
                                                         values[r : r + 1, :, : s + 1], enable_gqa=gqa)
                          for r, s in enumerate(starts)])  # fmt: skip

    def _attention_mask(self, starts: list[int], n_new: int, mask: torch.Tensor | None):
        """(attn_mask, is_causal, number of key slots) for SDPA. The common cases (one sequence,
        causal) need no mask tensor at all."""
        n_keys = max(starts) + n_new
        uniform = all(s == starts[0] for s in starts)
        if mask is None and uniform:
            if n_new == 1:
                return None, False, n_keys
            if starts[0] == 0:
                return None, True, n_keys
        new_mask = mask if mask is not None else torch.ones(n_new, n_new, dtype=torch.bool).tril()
        new_mask = new_mask.to(device=self.device, dtype=torch.bool)
        if new_mask.dim() == 2:
            new_mask = new_mask.expand(len(starts), n_new, n_new)
        full = torch.zeros(len(starts), n_new, n_keys, dtype=torch.bool, device=self.device)
        for r, s in enumerate(starts):
            full[r, :, :s] = True
            full[r, :, s : s + n_new] = new_mask[r]
        return full.unsqueeze(1), False, n_keys

    def _cache_writer(self, starts: list[int], n_new: int):
        if all(s == starts[0] for s in starts):
            s = starts[0]

            def write_slice(kc, vc, k, v):
                kc[:, :, s : s + n_new] = k
                vc[:, :, s : s + n_new] = v
                return kc, vc

            return write_slice
        rows = torch.arange(len(starts), device=self.device)[:, None]
        slots = torch.tensor(starts, device=self.device)[:, None] + torch.arange(n_new, device=self.device)

        def write_rows(kc, vc, k, v):
            kc[rows, :, slots] = k.transpose(1, 2)
            vc[rows, :, slots] = v.transpose(1, 2)
            return kc, vc

        return write_rows
