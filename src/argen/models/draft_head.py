"""An EAGLE-style draft head: a one-layer drafter that reads the target model's own hidden states
(EAGLE-1, Li et al. 2024), distilled from the target by `argen distill-draft` (recipes/draft_head.py).

Entry i of the head joins the target's final hidden state f_i (after the final norm, as runtimes
return it) with the target's own embedding of token i + 1, each RMS-normalised first (EAGLE-3):

    x_i = fc([norm(embed(t_{i+1})); norm(f_i)])  ->  one Llama decoder layer (attention over the head's own KV
    cache, RoPE at position i, SwiGLU)  ->  a final norm  ->  f^_{i+1}, a guess at the target's next
    feature, whose logits are the target's own (frozen) LM head applied to it.

The LM head is restricted to the `vocab` most frequent tokens of the distillation data (FR-Spec,
Zhao et al. 2025): on SmolLM2-135M the vocabulary matrix is a fifth of all weights, so scoring the
whole vocabulary would make a draft step cost a quarter of a target pass. Drafting deeper feeds f^
back in place of f; the head is trained on its own predictions as well as on the target's features
(EAGLE-3's "training-time test", `HeadWeights.unrolled`).

`HeadWeights` is the trainable module (training runs whole sequences through torch's autograd);
`DraftHeadRuntime` runs it as a ModelRuntime, with its own paged KV cache, packed feeds of many
sequences and tree masks, so the Engine packs every sequence's head feeds into one pass as it does
any model's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from argen.cache.paged import BLOCK_SIZE, BlockPool, SeqKV, new_caches
from argen.errors import ArgenError
from argen.models.llama import rms_norm, rotate_half
from argen.models.matmul import Matmul
from argen.models.quant import QuantMatmul, quantize
from argen.models.runtime import Capabilities, ModelInfo, RuntimeMemo, Segment, SegmentOut

FORMAT = 2  # the head file's layout; a head of another format is refused with what to do


@dataclass(frozen=True)
class HeadConfig:
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float

    @classmethod
    def like(cls, target, intermediate_size: int | None = None) -> HeadConfig:
        """The target's own layer shape (a smaller FFN if asked)."""
        info = target.info
        inter = target.config.intermediate_size
        return cls(
            info.hidden_size, info.n_heads, info.n_kv_heads, info.head_dim, intermediate_size or inter, target.eps
        )


def unroll_mask(n: int, step: int) -> torch.Tensor:
    """Which keys entry i of unrolled step `step` (1-based) sees, [n, step * n] over the keys of steps
    1..step side by side. Step s stands for a draft s - 1 deep: entry i's ancestors are entry i - 1 of
    step s - 1, ..., entry i - s + 2 of step 2, and everything up to entry i - s + 1 of step 1 (the
    committed sequence, whose features are the target's), exactly what a drafted node sees."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    blocks = [j <= i - step + 1] + [j == i - step + e for e in range(2, step + 1)]
    return torch.cat(blocks, 1)


class HeadWeights(nn.Module):
    """The head's trainable weights: fc, one decoder layer, the final norm. The embedding and the LM
    head are the target's, frozen, and not part of it."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        h, d = config.hidden_size, config.head_dim
        # The token's embedding and the feature are normalised before they are joined (as EAGLE-3 does):
        # on SmolLM2 a feature's RMS is ~17x an embedding's, which would drown the token at the start.
        self.emb_norm = nn.Parameter(torch.ones(h))
        self.feat_norm = nn.Parameter(torch.ones(h))
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.attn_norm = nn.Parameter(torch.ones(h))
        self.qkv = nn.Linear(h, (config.n_heads + 2 * config.n_kv_heads) * d, bias=False)
        self.o = nn.Linear(config.n_heads * d, h, bias=False)
        self.ffn_norm = nn.Parameter(torch.ones(h))
        self.gate_up = nn.Linear(h, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, h, bias=False)
        self.norm = nn.Parameter(torch.ones(h))

    def reset(self, generator: torch.Generator, final_norm: torch.Tensor, layer=None) -> HeadWeights:
        """Seeded initialisation: linear weights N(0, 0.02) (the Llama default), the final norm the
        target's (the LM head expects features at its scale). With `layer` (the target's last decoder
        layer, of the same shape), the decoder layer starts as a copy of it and fc passes the feature
        through (x = f + W e, W small), so training starts from the target's own last computation."""
        with torch.no_grad():
            for m in (self.fc, self.qkv, self.o, self.gate_up, self.down):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * 0.02)
            self.fc.bias.zero_()
            self.norm.copy_(final_norm)
            if layer is not None:
                h = self.config.hidden_size
                self.fc.weight[:, h:] = torch.eye(h)
                for name in ("qkv", "o", "gate_up", "down"):
                    getattr(self, name).weight.copy_(dense(getattr(layer, name)))
                self.attn_norm.copy_(layer.attn_norm)
                self.ffn_norm.copy_(layer.ffn_norm)
        return self

    def joined(self, emb: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """x = fc([norm(embedding); norm(feature)])."""
        eps = self.config.rms_eps
        return self.fc(torch.cat([rms_norm(emb, self.emb_norm, eps), rms_norm(feats, self.feat_norm, eps)], -1))

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        q, k, v = self.qkv(rms_norm(x, self.attn_norm, c.rms_eps)).split(
            [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim], -1
        )
        shape = x.shape[:-1]
        return (
            q.view(*shape, c.n_heads, c.head_dim),
            k.view(*shape, c.n_kv_heads, c.head_dim),
            v.view(*shape, c.n_kv_heads, c.head_dim),
        )

    def _finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = x + self.o(attn)
        gate, up = self.gate_up(rms_norm(x, self.ffn_norm, c.rms_eps)).chunk(2, -1)
        x = x + self.down(F.silu(gate) * up)
        return rms_norm(x, self.norm, c.rms_eps)

    def unrolled(
        self, emb: torch.Tensor, feats: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, steps: int, first: int = 0
    ) -> list[torch.Tensor]:
        """Training forward over whole sequences: `emb` [B, n, H] the embeddings of t_{i+1}, `feats`
        [B, n, H] the target's features f_i, `cos`/`sin` [n, D] (positions 0..n-1). Returns each step's
        predictions [B, n, H] (entry i: f^_{i+1}). Step 1 reads the target's features; step s reads
        step s - 1's predictions (entry i: what entry i - 1 predicted for f_i), attending as a draft
        s - 1 deep does (`unroll_mask`). Predictions are computed for entries `first`.. only (zeros
        before; entries before `first` give step 1 their keys and values, nothing more): exact for every
        entry from `first` + `steps` on, which is all a loss on the responses needs when `first` is the
        first response entry minus `steps` (a prompt is context, read by step 1's attention only)."""
        b, n, _ = emb.shape
        c = self.config
        keys, values, outs = [], [], []
        inputs = feats
        for step in range(1, steps + 1):
            lo = 0 if step == 1 else first
            x = self.joined(emb[:, lo:], inputs)
            q, k, v = self._split(x)
            cos_, sin_ = cos[None, lo:, None], sin[None, lo:, None]
            q, k = q * cos_ + rotate_half(q) * sin_, k * cos_ + rotate_half(k) * sin_
            keys.append(k)
            values.append(v)
            q, x = q[:, first - lo :], x[:, first - lo :]  # queries from `first` on
            full = unroll_mask(n, step)[first:]
            mask = torch.cat([full[:, :n]] + [full[:, (e - 1) * n + first : e * n] for e in range(2, step + 1)], 1)
            attn = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                torch.cat(keys, 1).transpose(1, 2),
                torch.cat(values, 1).transpose(1, 2),
                attn_mask=mask,
                enable_gqa=c.n_kv_heads != c.n_heads,
            )
            out = self._finish(x, attn.transpose(1, 2).reshape(b, n - first, c.n_heads * c.head_dim))
            if first:
                out = torch.cat([out.new_zeros(b, first, out.shape[-1]), out], 1)
            outs.append(out)
            # Entry i of the next step reads what entry i - 1 predicted; entry 0 has no predecessor (never scored).
            inputs = torch.cat([feats[:, :1], out[:, :-1]], 1)[:, first:]
        return outs


def dense(linear) -> torch.Tensor:
    """A runtime linear layer's weight as fp32 [out, in] (quantized blocks dequantized)."""
    return linear.qweight.dequantize() if isinstance(linear, QuantMatmul) else linear.weight.float()


def head_rows(target, vocab: torch.Tensor):
    """The target's LM head restricted to the rows `vocab` (its own quantized blocks where it has them)."""
    lm = target.lm_head
    if isinstance(lm, QuantMatmul):
        return QuantMatmul(lm.qweight.rows(vocab))
    return Matmul(lm.weight[vocab].contiguous())


def head_rows_dense(target, vocab: torch.Tensor) -> torch.Tensor:
    """The same rows as an fp32 tensor [S, H] (training)."""
    lm = target.lm_head
    if isinstance(lm, QuantMatmul):
        return lm.qweight.rows(vocab).dequantize()
    return lm.weight[vocab].float().contiguous()


@dataclass
class HeadPassSeconds:
    """A head's measured pass times (its memo's record): rows -> seconds."""

    by_rows: dict[int, float] = field(default_factory=dict)


class DraftHeadRuntime:
    """The head as a ModelRuntime. A segment's tokens are t_{i+1} and its `features` [T, H] the f_i
    they join (the target's hidden states, or the head's own predictions when drafting deeper); its
    positions are the i. Logits are over `vocab` (column j scores token `vocab[j]`); `hidden` are
    the predicted features f^. A mask may be [T, T] (among the new tokens) or [T, cached + T]
    (the cached positions too: a tree grown depth by depth in the head's cache)."""

    def __init__(
        self, weights: HeadWeights, vocab: torch.Tensor, target, meta: dict | None = None, quant: str | None = "auto"
    ) -> None:
        """`quant`: "q8_0" runs the head's matrices as Q8_0 blocks on argen's kernels (a quarter of the
        bytes to read per pass), None in fp32; "auto": Q8_0 when the target itself runs on the quantized
        fast path. A draft is a guess, so its precision changes what is accepted, never the output."""
        if not target.capabilities.paged_kv or not hasattr(target, "embed_tokens"):
            raise ArgenError(
                "a draft head needs the target on argen's native runtime (Llama-family models); load "
                "it with runtime='native'"
            )
        c = weights.config
        self.config, self.weights, self.meta = c, weights.eval(), dict(meta or {})
        self.target = target
        self.vocab = vocab.to(torch.long)
        self.device, self.dtype = target.device, torch.float32
        info = target.info
        self.info = ModelInfo(
            1, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_size, info.vocab_size, info.max_positions
        )
        self.capabilities = Capabilities(
            paged_kv=True, layer_plans=False, kernels="torch", input_features=True, cache_masks=True
        )
        self.memo = RuntimeMemo()
        w = {k: v.detach().float().contiguous() for k, v in weights.state_dict().items()}
        if quant == "auto":
            quant = "q8_0" if getattr(target, "fused", None) is not None else None
        self.quant = quant

        def linear(name: str, bias: torch.Tensor | None = None):
            return QuantMatmul(quantize(w[name], quant), bias) if quant else Matmul(w[name], bias)

        self.fc = linear("fc.weight", w["fc.bias"])
        self.qkv, self.o = linear("qkv.weight"), linear("o.weight")
        self.gate_up, self.down = linear("gate_up.weight"), linear("down.weight")
        self.attn_norm, self.ffn_norm, self.norm = w["attn_norm"], w["ffn_norm"], w["norm"]
        self.emb_norm, self.feat_norm = w["emb_norm"], w["feat_norm"]
        self.lm_head = head_rows(target, self.vocab)
        self.cos, self.sin = target.cos, target.sin  # the target's RoPE: the head shares its head_dim
        self.pool: BlockPool | None = None

    # -- KV memory -----------------------------------------------------------------------------
    def kv_pool(self) -> BlockPool:
        """One layer's blocks: as many as the target's pool holds (a sequence's head cache is never longer
        than its target cache plus a draft tree), at a 30th of the bytes for a 30-layer target."""
        if self.pool is None:
            blocks = self.target.kv_pool().max_blocks + 64
            c = self.config
            self.pool = BlockPool(1, c.n_kv_heads, c.head_dim, blocks, BLOCK_SIZE, self.dtype, self.device)
        return self.pool

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> SeqKV | list[SeqKV]:
        return new_caches(self.kv_pool(), max_len or self.info.max_positions, batch_size)

    # -- passes --------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache,
        mask=None,
        plan=None,
        num_logits: int | None = None,
        features: torch.Tensor | None = None,
    ):
        """ModelRuntime.forward for one sequence ([1, T] tokens and positions, `features` [1, T, H])."""
        if features is None:
            raise ArgenError("a draft head's pass needs input features (the target's hidden states)")
        out = self.forward_packed([Segment(cache, tokens[0], positions[0], mask, num_logits, features=features[0])])[0]
        return (None if out.logits is None else out.logits[None]), out.hidden[None]

    @torch.inference_mode()
    def forward_packed(self, segments: list[Segment], plan=None) -> list[SegmentOut]:
        if plan is not None and not plan.is_full:
            raise ArgenError("a draft head has one layer and runs it whole; it takes no layer plan")
        c, pool = self.config, self.kv_pool()
        starts, caches, features = [], [], []
        for seg in segments:
            if seg.features is None or len(seg.features) != len(seg.tokens):
                raise ArgenError("each draft-head segment needs one input feature per token (Segment.features)")
            if not isinstance(seg.cache, SeqKV):
                raise ArgenError("a draft head runs its own paged caches (DraftHeadRuntime.new_cache)")
            starts.append(seg.cache.lengths[0])
            seg.cache.reserve(len(seg.tokens))
            caches.append(seg.cache)
            features.append(seg.features)
        tokens = torch.cat([torch.as_tensor(s.tokens, dtype=torch.long).reshape(-1) for s in segments])
        positions = torch.cat([torch.as_tensor(s.positions, dtype=torch.long).reshape(-1) for s in segments])
        feats = torch.cat([f.reshape(-1, c.hidden_size).to(self.dtype) for f in features])
        emb = self.target.embed_tokens(tokens[None])[0].to(self.dtype)
        x = self.fc(
            torch.cat([rms_norm(emb, self.emb_norm, c.rms_eps), rms_norm(feats, self.feat_norm, c.rms_eps)], -1)
        )
        n_rows = x.shape[0]
        h = rms_norm(x, self.attn_norm, c.rms_eps)
        q, k, v = self.qkv(h).split([c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim], -1)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        q = q.view(n_rows, c.n_heads, c.head_dim)
        k = k.view(n_rows, c.n_kv_heads, c.head_dim)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        slots = torch.cat([cache.slots(start, len(s.tokens)) for s, cache, start in zip(segments, caches, starts)])
        blocks, offsets = slots // pool.block_size, slots % pool.block_size
        pool.k[0][:, blocks, offsets] = k.transpose(0, 1)
        pool.v[0][:, blocks, offsets] = v.view(n_rows, c.n_kv_heads, c.head_dim).transpose(0, 1)
        outs, row = [], 0
        for seg, cache, start in zip(segments, caches, starts):
            n = len(seg.tokens)
            table = torch.tensor(cache.blocks, dtype=torch.long)
            keys = pool.k[0][:, table].flatten(1, 2)[:, : start + n]
            values = pool.v[0][:, table].flatten(1, 2)[:, : start + n]
            outs.append(
                F.scaled_dot_product_attention(
                    q[row : row + n].transpose(0, 1)[None],
                    keys[None],
                    values[None],
                    attn_mask=self._mask(seg, start),
                    enable_gqa=c.n_kv_heads != c.n_heads,
                )[0].transpose(0, 1)
            )
            row += n
        x = x + self.o(torch.cat(outs).reshape(n_rows, c.n_heads * c.head_dim))
        gate, up = self.gate_up(rms_norm(x, self.ffn_norm, c.rms_eps)).chunk(2, -1)
        x = x + self.down(F.silu(gate) * up)
        hidden = rms_norm(x, self.norm, c.rms_eps)
        results, row = [], 0
        for seg, start in zip(segments, starts):
            n = len(seg.tokens)
            seg.cache.lengths[0] = start + n
            h = hidden[row : row + n]
            row += n
            k = n if seg.num_logits is None else seg.num_logits
            results.append(SegmentOut(self.head(h[n - k :]) if k else None, h))
        return results

    @staticmethod
    def _mask(seg: Segment, start: int) -> torch.Tensor | None:
        """The SDPA mask over the segment's keys (cached + new): [T, start + T]."""
        n = len(seg.tokens)
        if seg.mask is not None and seg.mask.shape[-1] == start + n:
            return seg.mask.to(torch.bool)
        if seg.mask is None and n == 1:
            return None
        new = seg.mask if seg.mask is not None else torch.ones(n, n, dtype=torch.bool).tril()
        full = torch.ones(n, start + n, dtype=torch.bool)
        full[:, start:] = new.to(torch.bool)
        return full

    def pass_seconds(self, rows: int) -> float:
        """Seconds of one head pass over `rows` tokens after 64 cached, with their logits (the median of
        three; measured once per head and row count, kept in its memo): a drafting policy's prior."""
        table = self.memo.get(HeadPassSeconds).by_rows
        if rows not in table:
            context = 64
            cache = self.new_cache(1, context + rows)
            assert isinstance(cache, SeqKV)  # one sequence: the cache itself, not a list
            ids = torch.arange(context + rows)[None] % self.info.vocab_size
            feats = torch.zeros(1, context + rows, self.config.hidden_size)
            self.forward(
                ids[:, :context], torch.arange(context)[None], cache, num_logits=0, features=feats[:, :context]
            )
            times = []
            for _ in range(3):
                start = time.perf_counter()
                self.forward(
                    ids[:, context:],
                    torch.arange(context, context + rows)[None],
                    cache,
                    num_logits=rows,
                    features=feats[:, context:],
                )
                times.append(time.perf_counter() - start)
                cache.truncate(context)
            cache.free()
            table[rows] = sorted(times)[1]
        return table[rows]

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over `vocab` for predicted features [..., H]."""
        return self.lm_head(hidden)

    @property
    def weight_bytes(self) -> int:
        """The head's own weights and its rows of the LM head (the embedding is the target's)."""
        tensors = [t for m in (self.fc, self.qkv, self.o, self.gate_up, self.down, self.lm_head) for t in m.tensors()]
        tensors += [self.attn_norm, self.ffn_norm, self.norm, self.emb_norm, self.feat_norm]
        return sum(t.numel() * t.element_size() for t in tensors)


def save_head(path: Path, weights: HeadWeights, vocab: torch.Tensor, meta: dict) -> None:
    """One safetensors file: the weights, the ranked vocabulary, and the recipe and model it came from."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() for k, v in weights.state_dict().items()}
    tensors["vocab"] = vocab.to(torch.int64).contiguous()
    meta = {"format": FORMAT, "config": asdict(weights.config)} | meta
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={"argen_draft_head": json.dumps(meta)})
    partial.replace(path)


def read_head(path: Path) -> tuple[HeadWeights, torch.Tensor, dict]:
    """(weights, vocab, meta) from a file `save_head` wrote."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["argen_draft_head"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (OSError, KeyError, ValueError) as exc:
        raise ArgenError(
            f"{path} is not a draft head argen wrote ({exc}); make one with `argen distill-draft`"
        ) from exc
    if meta.get("format") != FORMAT:
        raise ArgenError(
            f"{path} is a draft head of format {meta.get('format')}, and this argen reads format {FORMAT}; "
            "run `argen distill-draft` again"
        )
    weights = HeadWeights(HeadConfig(**meta["config"]))
    vocab = tensors.pop("vocab")
    weights.load_state_dict(tensors)
    return weights, vocab, meta
