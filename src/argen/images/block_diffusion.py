"""The block-diffusion model over the 64 pixels of a digit (issue 28): rows as blocks, causal across
blocks, bidirectional within a block (BD3-LM, Arriola et al. 2025; SDAR, 2025), as a small
transformer so that a KV cache is real.

The sequence is the label token, then the pixels in raster order; `block_size` pixels make a block
(8: an image row). A pixel of block c attends to the label, to every pixel of blocks < c and to every
pixel of block c; the label attends to itself. Masked pixels hold the mask token `n_levels`.

The contract the block decoders (block_decoding.py) rely on, besides `n_pixels`, `n_levels`,
`n_classes` and `block_size` attributes:

- `model(labels, pixels)`: pixels (batch, n) with n a multiple of block_size (a prefix of the image)
  -> logits (batch, n, n_levels), one pass over the whole prefix under the block-causal mask: the
  full recompute that the cached decode must equal.
- `model.new_state(batch)`: an empty `KVState` (no prefix cached).
- `model.extend(state, query, positions, labels=..., commit=...)`: one pass that (1) appends to
  the state's prefix the K/V of the label (the first pass) or of `commit`, the block just finished
  (the first pass of each later block), each commit token attending to the prefix and to the commit,
  and (2) runs the current block's tokens `query` (batch, n) at pixel indices `positions`: each attends to the prefix (with the commit) and to
  the whole current block, whose K/V are this pass's for the queried slots and the state's slot cache
  for the others. The queried slots' K/V are written into the slot cache. Returns the logits of the
  queries (batch, n, n_levels). Querying every slot is exact; querying fewer reuses cached K/V (the
  approximate caches of Fast-dLLM v2 and dKV-Cache).

Training (`block_loss`) follows BD3-LM's vectorised form: one sequence holds the label, the clean
image and a noisy copy (each block masked at its own ratio); a noisy block attends to the clean
blocks before it and to itself, so one pass trains every block's denoising given a clean prefix.
The attention layers are written here rather than taken from torch.nn.TransformerEncoder because
the decoders need each layer's keys and values (the cache), which that module does not expose.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from argen.errors import ArgenError


@dataclass(frozen=True)
class BlockConfig:
    kind: str = "block"
    width: int = 64
    layers: int = 3
    heads: int = 4
    block_size: int = 8
    n_pixels: int = 64
    n_levels: int = 17
    n_classes: int = 10

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class KVState:
    """Per layer: the prefix's keys and values (batch, heads, P, head_dim) -- the label and the finished
    blocks -- and the current block's slot cache (batch, heads, block_size, head_dim)."""

    prefix_k: list[torch.Tensor]
    prefix_v: list[torch.Tensor]
    slot_k: list[torch.Tensor]
    slot_v: list[torch.Tensor]

    def select(self, rows: torch.Tensor) -> KVState:
        return KVState(*([t[rows] for t in ts] for ts in (self.prefix_k, self.prefix_v, self.slot_k, self.slot_v)))

    def put_slots(self, rows: torch.Tensor, part: KVState) -> None:
        """Write a `select`ed state's slot cache back (the prefix only changes when every row takes part)."""
        for mine, theirs in ((self.slot_k, part.slot_k), (self.slot_v, part.slot_v)):
            for layer, t in enumerate(theirs):
                mine[layer][rows] = t

    @property
    def prefix_len(self) -> int:
        return self.prefix_k[0].shape[2]


class Layer(nn.Module):
    """A pre-norm transformer layer whose attention is done by the caller (who holds the keys)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v  # each (b, heads, t, head_dim)

    def merge(self, h: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = att.shape
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        return h + self.mlp(self.norm2(h))


class BlockDiffusionTransformer(nn.Module):
    kind = "block"

    def __init__(self, config: BlockConfig) -> None:
        super().__init__()
        if config.n_pixels % config.block_size or config.width % config.heads:
            raise ArgenError("block_size must divide n_pixels and heads must divide width")
        self.config = config
        self.n_pixels, self.n_levels, self.n_classes = config.n_pixels, config.n_levels, config.n_classes
        self.block_size = config.block_size
        # Tokens: levels 0..n_levels-1, the mask n_levels, then one token per class.
        self.tok = nn.Embedding(config.n_levels + 1 + config.n_classes, config.width)
        self.pos = nn.Embedding(config.n_pixels + 1, config.width)  # 0: the label, 1 + t: pixel t
        self.layers = nn.ModuleList(Layer(config.width, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.n_levels)

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens) + self.pos(positions)

    def _label_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels + self.n_levels + 1)[:, None]

    def _run(self, h: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        for layer in cast(list[Layer], self.layers):
            q, k, v = layer.split(h)
            h = layer.merge(h, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))
        return self.head(self.norm(h))

    def forward(self, labels: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Logits of every pixel of the prefix `pixels` (batch, n), one block-causal pass (module docstring)."""
        n = pixels.shape[1]
        tokens = torch.cat([self._label_tokens(labels), pixels], 1)
        block = torch.cat([torch.tensor([-1]), torch.arange(n) // self.block_size])
        allowed = block[None, :] <= block[:, None]
        return self._run(self._embed(tokens, torch.arange(n + 1)[None, :]), allowed)[:, 1:]

    def training_logits(self, labels: torch.Tensor, clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """BD3-LM's vectorised pass: [label, clean, noisy]; returns the noisy copy's logits (batch, 64, V)."""
        d = self.n_pixels
        tokens = torch.cat([self._label_tokens(labels), clean, noisy], 1)
        positions = torch.cat([torch.tensor([0]), torch.arange(1, d + 1), torch.arange(1, d + 1)])
        block = torch.cat([torch.tensor([-1]), torch.arange(d) // self.block_size, torch.arange(d) // self.block_size])
        is_noisy = torch.cat([torch.zeros(1 + d, dtype=torch.bool), torch.ones(d, dtype=torch.bool)])
        q_block, k_block = block[:, None], block[None, :]
        q_noisy, k_noisy = is_noisy[:, None], is_noisy[None, :]
        allowed = (
            (~q_noisy & ~k_noisy & (k_block <= q_block))  # clean: block-causal over the clean image
            | (q_noisy & ~k_noisy & (k_block < q_block))  # noisy: the clean blocks before it (and the label)
            | (q_noisy & k_noisy & (k_block == q_block))  # and its own noisy block
        )
        return self._run(self._embed(tokens, positions[None, :]), allowed)[:, 1 + d :]

    def new_state(self, batch: int) -> KVState:
        """An empty cache for `batch` images (the first `extend` commits their labels)."""
        c = self.config
        empty = torch.zeros(batch, c.heads, 0, c.width // c.heads)
        slots = torch.zeros(batch, c.heads, c.block_size, c.width // c.heads)
        n = c.layers
        return KVState([empty] * n, [empty] * n, [slots.clone() for _ in range(n)], [slots.clone() for _ in range(n)])

    def extend(
        self,
        state: KVState,
        query: torch.Tensor,
        query_positions: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        commit: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One cached pass (module docstring). `query_positions` (batch, n): the pixel indices of the
        queries, all in the current block. The first pass of a decode commits the label (`labels`); the
        first pass of each later block commits the block before it (`commit`, its pixels, batch x
        block_size). A commit starts a new block: every slot of it must be queried then."""
        bs = self.block_size
        slots = query_positions % bs
        parts = [self._embed(query, query_positions + 1)]
        if labels is not None:
            parts.insert(0, self._embed(self._label_tokens(labels), torch.zeros(len(labels), 1, dtype=torch.long)))
        elif commit is not None:
            start = int(query_positions[0, 0]) // bs * bs - bs  # the block before the queries'
            parts.insert(0, self._embed(commit, torch.arange(start, start + bs)[None, :] + 1))
        c = parts[0].shape[1] if len(parts) == 2 else 0
        if c and not bool(F.one_hot(slots, bs).amax(1).all()):
            raise ArgenError("a commit starts a new block: every slot of it must be queried")
        h = torch.cat(parts, 1)
        n = query.shape[1]
        p = state.prefix_len + c
        allowed = torch.ones(c + n, p + bs, dtype=torch.bool)
        allowed[:c, p:] = False  # the commit is block-causal: it does not see the current block
        index = slots[:, None, :, None]
        for i, layer in enumerate(cast(list[Layer], self.layers)):
            q, k, v = layer.split(h)
            if c:
                state.prefix_k[i] = torch.cat([state.prefix_k[i], k[:, :, :c]], 2)
                state.prefix_v[i] = torch.cat([state.prefix_v[i], v[:, :, :c]], 2)
            idx = index.expand(-1, k.shape[1], -1, k.shape[3])
            # Repeated slots (padding) carry equal values: either write wins.
            state.slot_k[i] = state.slot_k[i].scatter(2, idx, k[:, :, c:])
            state.slot_v[i] = state.slot_v[i].scatter(2, idx, v[:, :, c:])
            keys = torch.cat([state.prefix_k[i], state.slot_k[i]], 2)
            values = torch.cat([state.prefix_v[i], state.slot_v[i]], 2)
            h = layer.merge(h, F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed))
        return self.head(self.norm(h[:, c:]))


def block_loss(model, labels: torch.Tensor, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Cross-entropy of the masked pixels of a noisy copy whose blocks are masked at their own ratios
    drawn from U(0, 1] (each block with at least one masked pixel), given the clean blocks before."""
    b, d = pixels.shape
    bs = model.block_size
    nb = d // bs
    ratio = (1.0 - torch.rand(b, nb, 1, generator=gen)).expand(b, nb, bs).reshape(b, d)
    masked = torch.rand(b, d, generator=gen) < ratio
    forced = torch.arange(nb) * bs + torch.randint(0, bs, (b, nb), generator=gen)
    masked[torch.arange(b)[:, None], forced] = True
    noisy = torch.where(masked, torch.full_like(pixels, model.n_levels), pixels)
    logits = model.training_logits(labels, pixels, noisy)
    return F.cross_entropy(logits[masked], pixels[masked])


def check_block_model(model: nn.Module, batch: int = 2, seed: int = 0) -> None:
    """Check the block-diffusion contract (module docstring) on random inputs; raise an error naming the
    broken part: shapes, block causality, and the cached pass equal to the full recompute."""
    for attr in ("n_pixels", "n_levels", "n_classes", "block_size"):
        if not isinstance(getattr(model, attr, None), int):
            raise ArgenError(f"a block-diffusion model needs an integer attribute {attr!r}")
    d, v, c, bs = (cast(int, getattr(model, a)) for a in ("n_pixels", "n_levels", "n_classes", "block_size"))
    if bs < 1 or d % bs:
        raise ArgenError(f"block_size {bs} must divide n_pixels {d}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (batch,), generator=g)
    pixels = torch.randint(0, v + 1, (batch, d), generator=g)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(labels, pixels)
            if tuple(out.shape) != (batch, d, v):
                raise ArgenError(f"a block-diffusion model returns logits (batch, {d}, {v}); got {tuple(out.shape)}")
            cut = (d // bs // 2) * bs  # change the second half: the first half's logits must not move
            changed = pixels.clone()
            changed[:, cut:] = (changed[:, cut:] + 1) % (v + 1)
            if cut and not torch.allclose(model(labels, changed)[:, :cut], out[:, :cut], atol=1e-5):
                raise ArgenError("not block-causal: the logits of earlier blocks change with a later block")
            if not (callable(getattr(model, "new_state", None)) and callable(getattr(model, "extend", None))):
                raise ArgenError("a block-diffusion model needs the methods new_state and extend (the KV cache)")
            cacher = cast(BlockDiffusionTransformer, model)  # the contract's methods, checked just above
            state = cacher.new_state(batch)
            first = pixels[:, :bs]
            cached = cacher.extend(state, first, torch.arange(bs)[None, :].expand(batch, -1), labels=labels)
            if not torch.allclose(cached, out[:, :bs], atol=1e-4):
                raise ArgenError("the cached pass (extend) differs from the full recompute (forward)")
    finally:
        model.train(was_training)
