"""The native runtime for the Llama family (Llama 2/3, SmolLM/SmolLM2, Qwen2, Mistral).

A whole decoder on one screen, in the spirit of gpt-fast / nanoGPT: fused QKV and gate/up
projections, a preallocated KV cache, SDPA attention, RoPE from a precomputed table. Weights come
from a Hugging Face state dict, so its logits can be checked against the HF model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from argen.cache.kv import PagedKV
from argen.cache.paged import BLOCK_SIZE, BlockPool, SeqKV, new_caches
from argen.cache.pie import rerotate, rotate_half
from argen.cache.records import attention_received
from argen.models.fused import MAX_NEW_TOKENS as FUSED_MAX_NEW_TOKENS
from argen.models.fused import MAX_ROWS as FUSED_MAX_ROWS
from argen.models.fused import FusedForward
from argen.models.matmul import Matmul
from argen.models.quant import QuantMatmul, QuantWeight
from argen.models.runtime import Capabilities, ModelInfo, Plan, RuntimeMemo, Segment, SegmentOut

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# Bytes of KV memory a runtime may use, all sequences together: the pool is reserved at this size but
# the operating system commits only the blocks written (SmolLM2-135M: 46 KB per position in fp32).
DEFAULT_KV_MEMORY = 4 << 30
# On torch's path (no fused kernels), feeds of at most this many tokens share one packed pass
# (decode steps, drafts, beams): one read of the weights for all of them.
TORCH_PACKED_MAX_NEW_TOKENS = 32


Linear = Matmul | QuantMatmul


def _paged(seg: Segment) -> PagedKV:
    # The native runtime's caches are paged (SeqKV from its pool, new_cache).
    return cast(PagedKV, seg.cache)


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

    def __init__(
        self,
        config,
        state_dict: dict[str, torch.Tensor | QuantWeight],
        device="cpu",
        dtype=torch.float32,
        kv_memory: int = DEFAULT_KV_MEMORY,
        act8: bool = False,
    ):
        """act8: quantized weights multiply activations rounded to 8 bits (the "-a8" paths)."""
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
            quantized = [x for x in parts if isinstance(x, QuantWeight)]
            if len(quantized) == len(parts) and len({x.fmt for x in quantized}) == 1:
                return QuantMatmul(QuantWeight.cat(quantized), bias, act8=act8)
            return Matmul(torch.cat([w(n) for n in names]), bias)

        self.layers: list[_Layer] = []
        for i in range(self.info.n_layers):
            p = f"model.layers.{i}."
            biases = [maybe(p + f"self_attn.{x}_proj.bias") for x in "qkv"]
            self.layers.append(
                _Layer(
                    attn_norm=w(p + "input_layernorm.weight"),
                    qkv=linear(
                        [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
                        # q, k and v have biases together or not at all (Qwen2 has them)
                        torch.cat(cast(list[torch.Tensor], biases)) if biases[0] is not None else None,
                    ),
                    o=linear([p + "self_attn.o_proj.weight"]),
                    ffn_norm=w(p + "post_attention_layernorm.weight"),
                    gate_up=linear([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                    down=linear([p + "mlp.down_proj.weight"]),
                )
            )
        embed = state_dict["model.embed_tokens.weight"]
        self.norm = w("model.norm.weight")
        # The vocabulary projection through Matmul too: for one row its GEMV on W^T runs ~1.8x faster
        # than F.linear (8 vs 15 ms for SmolLM2's 49k x 576 head), and batched rows (the server,
        # beams, guides) skip MKL's repacking of a 113 MB weight.
        head = "lm_head.weight" if "lm_head.weight" in state_dict else "model.embed_tokens.weight"
        self.lm_head = linear([head])
        # A quantized vocabulary matrix stays quantized: rows are dequantized as tokens are looked up,
        # from the head's packed blocks when the weights are tied (one copy of the matrix in memory).
        self.embed_q: QuantMatmul | QuantWeight | None = None
        if isinstance(embed, QuantWeight):
            tied = head == "model.embed_tokens.weight"
            self.embed_q = self.lm_head if tied and isinstance(self.lm_head, QuantMatmul) else embed
        self.embed = None if self.embed_q is not None else w("model.embed_tokens.weight")
        cos, sin = rope_tables(config, self.info.max_positions)
        self.cos, self.sin = cos.to(self.device, dtype).contiguous(), sin.to(self.device, dtype).contiguous()
        self.q_size = n_heads * head_dim
        self.kv_size = n_kv * head_dim
        # Quantized weights throughout: short feeds take the fused C forward (models/fused.py).
        matmuls = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        self.fused = FusedForward(self) if all(isinstance(m, QuantMatmul) for m in matmuls) else None
        self.kv_memory = kv_memory
        self.pool: BlockPool | None = None
        kernels = f"argen {self.fused.lib.isa} block kernels" if self.fused is not None else "torch"
        kernels += ", 8-bit activations" if act8 and self.fused is not None else ""
        self.capabilities = Capabilities(
            paged_kv=True, layer_plans=True, kernels=kernels, ffn_stats=True, key_rotation=True, input_embeds=True
        )
        self.memo = RuntimeMemo()

    # -- KV memory -----------------------------------------------------------------------------
    def kv_pool(self) -> BlockPool:
        """The runtime's paged KV memory, shared by every sequence (created on first use)."""
        if self.pool is None:
            info = self.info
            per_block = 2 * info.n_layers * info.n_kv_heads * BLOCK_SIZE * info.head_dim * self.dtype.itemsize
            # At most `kv_memory`, and no more than 64 full-context sequences could use.
            blocks = max(8, min(self.kv_memory // per_block, 64 * -(-info.max_positions // BLOCK_SIZE)))
            self.pool = BlockPool(
                info.n_layers, info.n_kv_heads, info.head_dim, blocks, BLOCK_SIZE, self.dtype, self.device
            )
        return self.pool

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> SeqKV | list[SeqKV]:
        """An empty cache of at most `max_len` positions (one sequence), or a list of `batch_size`."""
        return new_caches(self.kv_pool(), max_len or self.info.max_positions, batch_size)

    @torch.inference_mode()
    def rotate_keys(self, cache: SeqKV, start: int, n: int, shift: int) -> None:
        """Move the cached keys of positions start .. start + n - 1 by `shift` positions (a prompt edit,
        cache/pie.py): each is multiplied by R(shift), in place. Both paths (torch and the fused C
        forward) store keys rotated by these tables, so one rotation serves both."""
        if n <= 0 or shift == 0:
            return
        scale = self.cos[0, 0]  # the tables hold cos, sin times the rope type's attention scaling
        cos = self.cos[abs(shift)] / scale
        sin = self.sin[abs(shift)] / scale * (1 if shift > 0 else -1)  # R(-d): sin(-x) = -sin(x)
        pool, size = self.kv_pool(), BLOCK_SIZE
        slots = cache.slots(start, n)
        blocks, offsets = slots // size, slots % size
        for i in range(self.info.n_layers):
            pool.k[i][:, blocks, offsets] = rerotate(pool.k[i][:, blocks, offsets], cos, sin)

    # -- forward passes --------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: SeqKV | list[SeqKV],
        mask: torch.Tensor | None = None,
        plan: Plan | None = None,
        num_logits: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`tokens` [B, T] of B sequences (one cache each) at `positions` [B, T]; see ModelRuntime."""
        caches = [cache] if isinstance(cache, SeqKV) else list(cache)
        masks = [None] * len(caches) if mask is None else [mask] * len(caches) if mask.dim() == 2 else list(mask)
        segments = [Segment(caches[r], tokens[r], positions[r], masks[r], num_logits) for r in range(len(caches))]
        outs = self.forward_packed(segments, plan)
        hidden = torch.stack([o.hidden for o in outs])
        # Each segment returns logits unless num_logits is 0.
        logits = None if num_logits == 0 else torch.stack([cast(torch.Tensor, o.logits) for o in outs])
        return logits, hidden

    @torch.inference_mode()
    def forward_packed(self, segments: list[Segment], plan: Plan | None = None) -> list[SegmentOut]:
        """One pass over several sequences' new tokens (see ModelRuntime.forward_packed). Short feeds
        (decode steps, drafts, beams) take the fused C forward when the weights are quantized; longer
        ones (prefill chunks) take torch's path, in a pass of their own."""
        for seg in segments:
            top = int(max(seg.positions)) if len(seg.positions) else 0
            if top >= self.info.max_positions:
                raise ValueError(f"position {top} is past the model's context ({self.info.max_positions})")
        limit = FUSED_MAX_NEW_TOKENS if self.fused is not None else TORCH_PACKED_MAX_NEW_TOKENS
        # Short feeds that ask for FFN statistics, read a pressed front (quantized, or a length per layer)
        # or observe the attention their keys receive (H2O) or their queries (SnapKV) share a torch pass
        # of their own (the fused C forward does none of these), so the others keep the fused path's
        # batch invariance.
        own = [bool(seg.ffn_cos) or _paged(seg).needs_own_pass for seg in segments]
        short = [i for i, seg in enumerate(segments) if len(seg.tokens) <= limit and not own[i]]
        measured = [i for i, seg in enumerate(segments) if len(seg.tokens) <= limit and own[i]]
        long = [i for i in range(len(segments)) if i not in set(short) | set(measured)]
        outs: list[SegmentOut | None] = [None] * len(segments)
        self._passes = 0  # numbers the passes of this call (SegmentOut.pass_index)
        # Short feeds: as many segments as fit in FUSED_MAX_ROWS rows per pass.
        group: list[int] = []
        rows = 0
        for i in short:
            n = len(segments[i].tokens)
            if group and rows + n > FUSED_MAX_ROWS:
                self._run([segments[j] for j in group], plan, self.fused is not None, outs, group)
                group, rows = [], 0
            group.append(i)
            rows += n
        if group:
            self._run([segments[j] for j in group], plan, self.fused is not None, outs, group)
        if measured:
            self._run([segments[j] for j in measured], plan, False, outs, measured)
        # Long feeds (prefill chunks) each in a pass of their own: at that size a pass is bound by
        # arithmetic, so packing saves little, and a GEMM's rounding may depend on its row count, so a
        # prompt computed alone is computed the same way in a busy batch.
        for j in long:
            self._run([segments[j]], plan, False, outs, [j])
        # Without the fused path, short feeds share one torch pass (the weights are read once for all).
        done = [o for o in outs if o is not None]
        assert len(done) == len(segments), "every segment runs in one of the passes"
        return done

    def _run(self, segments: list[Segment], plan: Plan | None, fused: bool, outs: list, where: list[int]) -> None:
        starts = []
        for seg in segments:
            starts.append(seg.cache.lengths[0])
            seg.cache.reserve(len(seg.tokens))
        tokens = torch.cat([torch.as_tensor(seg.tokens, dtype=torch.long).reshape(-1) for seg in segments])
        positions = torch.cat([torch.as_tensor(seg.positions, dtype=torch.long).reshape(-1) for seg in segments])
        x = self.embed_tokens(tokens[None])[0]  # [N, H]
        if any(seg.embeds is not None for seg in segments):  # given embeddings replace their tokens' rows
            offset = 0
            for seg in segments:
                if seg.embeds is not None:
                    x[offset : offset + len(seg.tokens)] = seg.embeds.to(x.dtype)
                offset += len(seg.tokens)
        ffn_cos = None
        if fused:
            assert self.fused is not None  # `fused` is asked for only when the fused forward exists
            hidden = self.fused(x, positions, segments, starts, plan)
        else:
            want = any(seg.ffn_cos for seg in segments)
            hidden, ffn_cos = self._forward_torch(x, positions, segments, starts, plan, want)
        offset = 0
        for i, seg, start in zip(where, segments, starts, strict=True):
            n = len(seg.tokens)
            seg.cache.lengths[0] = start + n
            h = hidden[offset : offset + n]
            cos = ffn_cos[offset : offset + n] if ffn_cos is not None and seg.ffn_cos else None
            offset += n
            k = n if seg.num_logits is None else seg.num_logits
            outs[i] = SegmentOut(self.head(h[n - k :]) if k else None, h, self._passes, cos)
        self._passes += 1

    def _forward_torch(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        segments: list[Segment],
        starts: list[int],
        plan: Plan | None,
        ffn_cos: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pass in torch ops: matmuls over every segment's rows at once, attention per segment over
        its own keys (gathered from its blocks), with the same SDPA call a lone sequence makes. With
        `ffn_cos`, also cos(x, x + ffn(x)) per row and layer [N, n_layers] (1 where the FFN is skipped)."""
        info, pool = self.info, self.pool
        assert pool is not None  # the segments' caches were made from it (kv_pool)
        n_rows = x.shape[0]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [N, 1, D]
        size = pool.block_size
        slots = torch.cat([_paged(seg).slots(start, len(seg.tokens)) for seg, start in zip(segments, starts)])
        blocks, offsets = slots // size, slots % size
        plans = [self._attention_plan(seg, start) for seg, start in zip(segments, starts)]
        gqa = info.n_kv_heads != info.n_heads
        cos_rows = torch.ones(n_rows, info.n_layers, dtype=torch.float32) if ffn_cos else None
        for i, layer in enumerate(self.layers):
            if plan is None or plan.attn[i]:
                h = rms_norm(x, layer.attn_norm, self.eps)
                q, k, v = layer.qkv(h).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
                q = q.view(n_rows, info.n_heads, info.head_dim)
                k = k.view(n_rows, info.n_kv_heads, info.head_dim)
                q = q * cos + rotate_half(q) * sin
                k = k * cos + rotate_half(k) * sin
                pool.k[i][:, blocks, offsets] = k.transpose(0, 1)
                pool.v[i][:, blocks, offsets] = v.view(n_rows, info.n_kv_heads, info.head_dim).transpose(0, 1)
                outs, row = [], 0
                for seg, (n_keys, attn_mask, is_causal) in zip(segments, plans):
                    n, cache = len(seg.tokens), _paged(seg)
                    table = torch.tensor(cache.blocks, dtype=torch.long, device=self.device)
                    held = n_keys - cache.offset  # the positions in blocks; a pressed front comes first
                    keys = pool.k[i][:, table].flatten(1, 2)[:, :held]  # [kv heads, keys, D]
                    values = pool.v[i][:, table].flatten(1, 2)[:, :held]
                    mask = attn_mask
                    if cache.front is not None:
                        front_k, front_v = cache.front.layer(i)
                        keys = torch.cat([front_k.to(keys.dtype), keys], 1)
                        values = torch.cat([front_v.to(values.dtype), values], 1)
                        if mask is not None and front_k.shape[1] != cache.offset:
                            # This layer's front is not `offset` long (a per-layer press): every new query
                            # sees all of it (it is all in their past), then the mask's columns for the blocks.
                            seen = torch.ones(n, front_k.shape[1], dtype=torch.bool, device=self.device)
                            mask = torch.cat([seen, mask[:, cache.offset :]], 1)
                    if cache.attention is not None:
                        cache.observe(i, attention_received(q[row : row + n], keys, mask, is_causal))
                    if cache.window is not None:
                        cache.window.add(i, q[row : row + n], n_keys - n)
                    outs.append(
                        F.scaled_dot_product_attention(
                            q[row : row + n].transpose(0, 1)[None],
                            keys[None],
                            values[None],
                            attn_mask=mask,
                            is_causal=is_causal,
                            enable_gqa=gqa,
                        )[0].transpose(0, 1)
                    )
                    row += n
                x = x + layer.o(torch.cat(outs).reshape(n_rows, self.q_size))
            if plan is None or plan.ffn[i]:
                h = rms_norm(x, layer.ffn_norm, self.eps)
                gate, up = layer.gate_up(h).chunk(2, dim=-1)
                before = x
                x = x + layer.down(F.silu(gate) * up)
                if cos_rows is not None:
                    cos_rows[:, i] = F.cosine_similarity(before.float(), x.float(), dim=-1).cpu()
        return rms_norm(x, self.norm, self.eps), cos_rows

    def _attention_plan(self, seg: Segment, start: int):
        """(number of keys, attn_mask, is_causal) for one segment's SDPA call; the common cases (one new
        token, or a causal feed into an empty cache) need no mask tensor."""
        n = len(seg.tokens)
        if seg.mask is None and n == 1:
            return start + 1, None, False
        if seg.mask is None and start == 0:
            return n, None, True
        new = seg.mask if seg.mask is not None else torch.ones(n, n, dtype=torch.bool).tril()
        full = torch.ones(n, start + n, dtype=torch.bool, device=self.device)
        full[:, start:] = new.to(device=self.device, dtype=torch.bool)
        return start + n, full, False

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings [B, T, H] for token ids [B, T]."""
        if self.embed_q is not None:
            return self.embed_q.embedding(tokens).to(self.dtype)
        assert self.embed is not None  # set whenever embed_q is not
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
        return (
            self.embed_tokens(torch.arange(2)[None]).float().numpy().tobytes()
            + self.layers[len(self.layers) // 2].down.digest_bytes()
        )

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for final hidden states [..., H]."""
        return self.lm_head(hidden)
