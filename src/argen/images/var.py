"""Next-scale prediction (VAR, Tian et al. 2024) over the digits: the model, its loss, its contract
check, and its decoders (plain, and ScaleKV's per-layer cache budgets).

An image is a pyramid of token maps at sides 1, 2, 4, 8 (85 tokens). The 8x8 map is the image; each
coarser map is the image average-pooled to that side and rounded to the nearest of the same 17 grey
levels. One vocabulary for every scale (as VAR shares one codebook across scales) keeps a single
embedding table and head, lets LANTERN / GSD's grey-level neighbourhoods apply unchanged, and costs
at most half a level of rounding at the coarse scales; a learned multi-scale codebook would need a
VQ-VAE trained here first, for 21 coarse tokens. Unlike VAR's residual quantizer the finest map
is the image itself (the coarse maps condition it, they are not summed into it).

The model (`VarTransformer`): a small pre-LN transformer over the 85 positions. The inputs of scale
k are the embeddings of scale k-1's tokens interpolated (bilinear, as VAR interpolates its feature
map) to scale k's side, plus position, scale and class embeddings; the first scale's single input is
the class token, and the class is added again before every block. Attention is block-causal: a position
of scale k attends to every position of scales <= k (bidirectional within its own scale). So
`model(labels, tokens)` gives all scales' logits from ground truth in one pass (training), and
decoding takes one pass per scale (4 per image): `step` feeds scale k's inputs, attends to the keys
and values cached from the scales before, and appends its own (`VarCache`).

The contract a plugged-in next-scale model keeps (`check_var_model`): attributes kind = "var",
n_pixels, n_levels, n_classes and `scales` (sides, the last one's square = n_pixels); `forward(labels,
tokens (b, sum side^2))` -> logits of the same positions, the logits of scale k depending only on the
label and scales < k; `new_cache()` and `step(labels, prev, cache)` -> the next scale's logits, equal
to forward's. ScaleKV additionally needs the cache to be a `VarCache` (it prunes its entries).

ScaleKV (Li et al. 2025) splits the layers into drafters (attention spread over many scales: they keep
a larger cache) and refiners (attention on the current scale: a small cache suffices). Here a layer's
role comes from a calibration decode (labels 0..9, seed 0): the share of the last scale's attention
that goes to earlier scales' entries; the `drafters` layers with the largest share are drafters. After
each pass, every layer keeps at most its budget of cached entries, those that the pass's queries
(all of the current scale's positions: SnapKV's observation window) attended to most, per head.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from argen.errors import ArgenError, InvalidRequestError
from argen.images.decoding import Decoded, _draw, row_generators

if TYPE_CHECKING:
    from argen.images.models import ModelConfig

HEAD_WIDTH = 32  # attention heads: hidden // HEAD_WIDTH


def scale_sides(n_pixels: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to the image's side (8 for the digits)."""
    side = int(round(n_pixels**0.5))
    if side * side != n_pixels or side & (side - 1):
        raise ArgenError(f"a next-scale model needs a square image with a power-of-two side; got {n_pixels} pixels")
    return tuple(2**i for i in range(int(math.log2(side)) + 1))


def pyramid(pixels: torch.Tensor, sides: tuple[int, ...], levels: int = 17) -> torch.Tensor:
    """(b, n_pixels) grey levels -> (b, sum side^2): every scale's map, coarse first, each the image
    average-pooled to that side and rounded to the nearest level (round half to even)."""
    b, top = pixels.shape[0], sides[-1]
    image = pixels.reshape(b, 1, top, top).double()
    maps = [F.adaptive_avg_pool2d(image, s).round().clamp(0, levels - 1).long().reshape(b, s * s) for s in sides]
    return torch.cat(maps, 1)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v  # each (b, heads, n, head width)

    def _merge(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = att.shape
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, n, -1)))
        return x + self.drop(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(x)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self._merge(x, att)

    def step(self, x: torch.Tensor, layer: LayerCache) -> torch.Tensor:
        """The new scale's positions x: attend to the cached entries and to each other; cache their own."""
        q, k, v = self._split(x)
        keys, values = layer.append(k, v)
        weights = torch.softmax((q @ keys.transpose(-1, -2)) / math.sqrt(q.shape[-1]), -1)
        layer.attention = weights  # (b, heads, new, cached): what ScaleKV scores entries by
        return self._merge(x, weights @ values)


@dataclass
class LayerCache:
    keys: torch.Tensor | None = None  # (b, heads, entries, head width)
    values: torch.Tensor | None = None
    attention: torch.Tensor | None = None  # the last step's attention weights (b, heads, new, entries)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache the new entries; every entry's keys and values now."""
        keys = k if self.keys is None else torch.cat([self.keys, k], 2)
        values = v if self.values is None else torch.cat([self.values, v], 2)
        self.keys, self.values = keys, values
        return keys, values

    @property
    def entries(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def keep(self, budget: int) -> None:
        """ScaleKV / SnapKV: keep the `budget` entries (per image and head) that the last step's queries
        attended to most, in their original order."""
        keys, values = self.keys, self.values
        if keys is None or values is None or self.attention is None or self.entries <= budget:
            return
        score = self.attention.sum(2)  # (b, heads, entries): attention received from the current scale
        idx = score.topk(budget, -1).indices.sort(-1).values[..., None]
        self.keys = keys.gather(2, idx.expand(-1, -1, -1, keys.shape[-1]))
        self.values = values.gather(2, idx.expand(-1, -1, -1, values.shape[-1]))


@dataclass
class VarCache:
    layers: list[LayerCache]
    scale: int = 0  # the next scale to decode
    prev: torch.Tensor | None = field(default=None, repr=False)


class VarTransformer(nn.Module):
    """Class-conditional next-scale model (module docstring). config.hidden is the width, config.layers
    the number of blocks; heads of HEAD_WIDTH channels."""

    kind = "var"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.n_pixels, self.n_levels, self.n_classes = config.n_pixels, config.n_levels, config.n_classes
        self.scales = scale_sides(config.n_pixels)
        w = config.hidden
        sizes = [s * s for s in self.scales]
        self.length = sum(sizes)
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.tok = nn.Embedding(config.n_levels, w)
        self.label = nn.Embedding(config.n_classes, w)
        self.pos = nn.Parameter(torch.randn(self.length, w) * 0.02)
        self.scale_emb = nn.Embedding(len(self.scales), w)
        self.blocks = nn.ModuleList(_Block(w, max(1, w // HEAD_WIDTH), config.dropout) for _ in range(config.layers))
        # The class again before every block (VAR conditions every block on it through AdaLN; a learned
        # per-block class bias is the cheap form).
        self.label_blocks = nn.Embedding(config.n_classes, w * config.layers)
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, config.n_levels)
        self.drop = nn.Dropout(config.dropout)
        scale_of = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
        self.register_buffer("scale_of", scale_of, persistent=False)
        # Block-causal: a position attends to every position of its own scale and the coarser ones.
        self.register_buffer("mask", scale_of[:, None] >= scale_of[None, :], persistent=False)

    def _inputs(self, labels: torch.Tensor, k: int, prev: torch.Tensor | None) -> torch.Tensor:
        """Scale k's input embeddings (b, side_k^2, w) from scale k-1's tokens (None for k = 0)."""
        lab = self.label(labels)[:, None, :]
        start, side = self.starts[k], self.scales[k]
        x = lab
        if prev is not None:  # VAR's input: the previous map's embeddings, interpolated up (bilinear)
            small = self.scales[k - 1]
            maps = self.tok(prev).transpose(1, 2).reshape(len(prev), -1, small, small)
            up = F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False)
            x = up.flatten(2).transpose(1, 2) + lab
        return x + self.pos[start : start + side * side] + self.scale_emb.weight[k]

    def forward(self, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tokens (b, 85), every scale's map coarse first -> logits (b, 85, n_levels)."""
        x = torch.cat(
            [
                self._inputs(labels, k, None if k == 0 else tokens[:, self.starts[k - 1] : self.starts[k]])
                for k in range(len(self.scales))
            ],
            1,
        )
        x = self.drop(x)
        lab = self.label_blocks(labels).reshape(len(labels), len(self.blocks), 1, -1)
        for i, block in enumerate(self.blocks):
            x = block(x + lab[:, i], self.mask)
        return self.head(self.norm(x))

    def new_cache(self) -> VarCache:
        return VarCache([LayerCache() for _ in self.blocks])

    def step(self, labels: torch.Tensor, prev: torch.Tensor | None, cache: VarCache) -> torch.Tensor:
        """The next scale's logits (b, side^2, n_levels) from the previous scale's tokens (None first)."""
        x = self._inputs(labels, cache.scale, prev)
        lab = self.label_blocks(labels).reshape(len(labels), len(self.blocks), 1, -1)
        for i, (block, layer) in enumerate(zip(self.blocks, cache.layers)):
            assert isinstance(block, _Block)  # (ModuleList's items are typed Module)
            x = block.step(x + lab[:, i], layer)
        cache.scale += 1
        return self.head(self.norm(x))


def var_loss(model, labels: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every scale's tokens (all 85 positions weighted alike), as VAR trains."""
    tokens = pyramid(pixels, model.scales, model.n_levels)
    logits = model(labels, tokens)
    return F.cross_entropy(logits.reshape(-1, model.n_levels), tokens.reshape(-1))


def check_var_model(model, batch: int = 3, seed: int = 0) -> None:
    """Check the next-scale contract (module docstring); raise an error naming the broken part."""
    for attr in ("n_pixels", "n_levels", "n_classes"):
        if not isinstance(getattr(model, attr, None), int):
            raise ArgenError(f"an image model needs an integer attribute {attr!r}")
    sides = tuple(getattr(model, "scales", ()))
    if not sides or sides[-1] ** 2 != model.n_pixels:
        raise ArgenError("a next-scale model needs `scales`: the sides of its maps, the last one's square = n_pixels")
    if not all(callable(getattr(model, m, None)) for m in ("new_cache", "step")):
        raise ArgenError("a next-scale model needs new_cache() and step(labels, prev, cache) (one pass per scale)")
    sizes = [s * s for s in sides]
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, model.n_classes, (batch,), generator=g)
    tokens = torch.randint(0, model.n_levels, (batch, starts[-1]), generator=g)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(labels, tokens)
            if tuple(out.shape) != (batch, starts[-1], model.n_levels):
                raise ArgenError(
                    f"a next-scale model returns logits of shape (batch, {starts[-1]}, {model.n_levels}); "
                    f"got {tuple(out.shape)}"
                )
            for k in range(len(sides)):
                changed = tokens.clone()
                changed[:, starts[k] : starts[k + 1]] = (changed[:, starts[k] : starts[k + 1]] + 1) % model.n_levels
                if not torch.allclose(model(labels, changed)[:, : starts[k + 1]], out[:, : starts[k + 1]], atol=1e-5):
                    raise ArgenError(
                        f"not a next-scale model: the logits of scales 0..{k} change with scale {k}'s tokens"
                    )
            cache = model.new_cache()
            for k in range(len(sides)):
                prev = None if k == 0 else tokens[:, starts[k - 1] : starts[k]]
                got = model.step(labels, prev, cache)
                if not torch.allclose(got, out[:, starts[k] : starts[k + 1]], atol=1e-4):
                    raise ArgenError(f"step() with the cache disagrees with forward() at scale {k}")
    finally:
        model.train(was_training)


# -- decoding ------------------------------------------------------------------------------------------
_HISTORY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> per-layer history share


@torch.no_grad()
def history_share(model) -> torch.Tensor:
    """Per layer: the share of the last scale's attention on earlier scales' entries, over a calibration
    decode (labels 0..9, seed 0, full cache). Cached per model (its weights do not change in eval)."""
    if model not in _HISTORY:
        labels = torch.arange(model.n_classes)
        cache = model.new_cache()
        gens = row_generators(0, len(labels))
        prev = None
        for _ in model.scales:
            prev = _draw(torch.softmax(model.step(labels, prev, cache).double(), -1), gens)
        last = model.scales[-1] ** 2
        _HISTORY[model] = torch.stack([layer.attention[..., :-last].sum(-1).mean() for layer in cache.layers])
    return _HISTORY[model]


def check_drafters(model, drafters: int) -> int:
    """The model's layers, after checking that `drafters` of them can be drafters."""
    n = len(model.new_cache().layers)
    if drafters > n:
        raise InvalidRequestError(f"drafters must be at most the model's {n} layers; got {drafters}")
    return n


def layer_budgets(model, budget: int, drafters: int, drafter_budget: int) -> list[int]:
    """Each layer's cache budget: the `drafters` layers with the largest history share get
    drafter_budget, the others (refiners) budget."""
    n = check_drafters(model, drafters)
    roles = [budget] * n
    if drafters:
        for i in history_share(model).topk(drafters).indices.tolist():
            roles[i] = drafter_budget
    return roles


@torch.no_grad()
def var_decode(
    model,
    labels: torch.Tensor,
    gens: Sequence[torch.Generator],
    temperature: float = 1.0,
    budgets: list[int] | None = None,
) -> Generator[None, None, tuple[Decoded, float]]:
    """One pass per scale (a step each, as decoding.py's decoders), every token of a scale drawn at once
    from its distribution, image i's with gens[i]. With `budgets` (one per layer, a `VarCache` model
    only), each layer keeps at most that many cached entries after every pass (ScaleKV). Returns the
    decode and the mean cached entries per layer that the last pass attended to besides its own scale."""
    cache = model.new_cache()
    prev = None
    held = 0.0
    for k in range(len(model.scales)):
        yield
        if k == len(model.scales) - 1:
            held = sum(layer.entries for layer in cache.layers) / max(1, len(cache.layers))
        prev = _draw(_probs_step(model, labels, prev, cache, temperature), gens)
        if budgets is not None and k < len(model.scales) - 1:
            for layer, b in zip(cache.layers, budgets):
                layer.keep(b)
    n = len(labels)
    assert prev is not None  # every model has at least one scale
    return Decoded(prev, torch.full((n,), len(model.scales)), torch.zeros(n, dtype=torch.long)), held


def _probs_step(model, labels, prev, cache, temperature: float) -> torch.Tensor:
    return torch.softmax(model.step(labels, prev, cache).double() / temperature, -1)
