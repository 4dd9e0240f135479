"""Image-token models over the 64 pixels of a digit, and the interface the decoders rely on.

Two kinds, each a `torch.nn.Module` with `n_pixels`, `n_levels` and `n_classes` attributes:

- an **AR model** (`kind = "ar"`): `model(labels, pixels)` -> logits of shape
  (batch, n_pixels, n_levels), where the logits for pixel t depend only on the label and on
  pixels[:, :t] (raster order). One call is one forward pass; it scores every position at once, as
  a causal transformer's forward over the whole sequence does. Plain sampling therefore takes
  n_pixels passes and speculative sampling verifies a whole draft in one.
- a **masked-diffusion model** (`kind = "diffusion"`): `model(labels, pixels)` -> logits of the
  same shape, where `pixels` holds `n_levels` (the mask token) at the positions not yet decoded; the
  logits at a masked position are the model's distribution of its level given everything unmasked.

Any module with that shape can be plugged into the decoders (a causal or bidirectional transformer,
say): `check_model` tests the contract (shapes, and causality for an AR model) on random inputs.
The models trained here are MLPs because they train in a minute on two cores: MADE (Germain et al.,
2015) masks the AR model's weights so that one pass gives all 64 raster-order conditionals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from argen.errors import ArgenError
from argen.images.block_diffusion import check_block_model
from argen.images.var import VarTransformer, check_var_model


@dataclass(frozen=True)
class ModelConfig:
    kind: str  # "ar" | "diffusion" | "var"
    hidden: int = 512
    layers: int = 2
    n_pixels: int = 64
    n_levels: int = 17
    n_classes: int = 10
    dropout: float = 0.1
    direct: bool = True  # AR only: MADE's direct input->output connection (a large matrix: off in drafts)

    def as_dict(self) -> dict:
        return asdict(self)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (MADE's autoregressive wiring)."""

    mask: torch.Tensor  # a buffer

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MadeAR(nn.Module):
    """Class-conditional raster-order AR model: p(x | c) = prod_t p(x_t | x_<t, c), all 64 conditionals
    from one masked-MLP pass. Pixel t's one-hot inputs have degree t+1; a hidden unit of degree m sees
    inputs of degree <= m; pixel t's outputs see hidden units of degree < t+1 (and, directly, inputs of
    degree < t+1). The label is added to every hidden layer and to the output bias."""

    kind = "ar"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, v, h = config.n_pixels, config.n_levels, config.hidden
        self.n_pixels, self.n_levels, self.n_classes = d, v, config.n_classes
        in_deg = torch.arange(1, d + 1).repeat_interleave(v)  # one-hot block of pixel t: degree t+1
        # Hidden degrees spread evenly over 1..d-1 (deterministic: no random wiring to seed).
        hid_deg = torch.arange(h) % max(d - 1, 1) + 1
        self.inputs = MaskedLinear(hid_deg[:, None] >= in_deg[None, :])
        self.hidden = nn.ModuleList(
            MaskedLinear(hid_deg[:, None] >= hid_deg[None, :]) for _ in range(config.layers - 1)
        )
        self.output = MaskedLinear(in_deg[:, None] > hid_deg[None, :])
        self.direct = MaskedLinear(in_deg[:, None] > in_deg[None, :]) if config.direct else None
        self.label_hidden = nn.Embedding(config.n_classes, h * config.layers)
        self.label_out = nn.Embedding(config.n_classes, d * v)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, labels: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        b, d, v, h = pixels.shape[0], self.n_pixels, self.n_levels, self.config.hidden
        x = F.one_hot(pixels, v).float().reshape(b, d * v)
        lab = self.label_hidden(labels).reshape(b, self.config.layers, h)
        z = self.drop(F.gelu(self.inputs(x) + lab[:, 0]))
        for i, layer in enumerate(self.hidden, start=1):
            z = self.drop(F.gelu(layer(z) + lab[:, i]))
        out = self.output(z) + self.label_out(labels)
        if self.direct is not None:
            out = out + self.direct(x)
        return out.reshape(b, d, v)


class DiffusionMLP(nn.Module):
    """Class-conditional masked-diffusion model (absorbing state, as in MDLM / LLaDA): a bidirectional
    MLP from the partly masked image (level or mask token per pixel) and the label to the logits of
    every pixel's level. Trained to predict masked pixels at random mask ratios."""

    kind = "diffusion"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, v, h = config.n_pixels, config.n_levels, config.hidden
        self.n_pixels, self.n_levels, self.n_classes = d, v, config.n_classes
        self.inputs = nn.Linear(d * (v + 1), h)
        self.hidden = nn.ModuleList(nn.Linear(h, h) for _ in range(config.layers - 1))
        self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(config.layers - 1))
        self.output = nn.Linear(h, d * v)
        self.label_hidden = nn.Embedding(config.n_classes, h)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, labels: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        b, d, v = pixels.shape[0], self.n_pixels, self.n_levels
        x = F.one_hot(pixels, v + 1).float().reshape(b, d * (v + 1))
        z = self.drop(F.gelu(self.inputs(x) + self.label_hidden(labels)))
        for layer, norm in zip(self.hidden, self.norms):
            z = z + self.drop(F.gelu(layer(norm(z))))  # residual: deeper stacks still train in a minute
        return self.output(z).reshape(b, d, v)


def build(config: ModelConfig) -> nn.Module:
    if config.kind == "ar":
        return MadeAR(config)
    if config.kind == "diffusion":
        return DiffusionMLP(config)
    if config.kind == "var":
        return VarTransformer(config)
    raise ArgenError(f"unknown image model kind {config.kind!r}; valid: ar, diffusion, var")


def check_model(model: nn.Module, kind: str, batch: int = 3, seed: int = 0) -> None:
    """Check that `model` keeps the contract the decoders rely on (module docstring); raise an error that
    names the broken part. For an AR model: changing pixel t must not change the logits of pixels <= t."""
    if kind == "var":
        return check_var_model(model)  # next-scale models keep their own contract (var.py)
    if kind == "block":
        return check_block_model(model)  # so do block-diffusion models (block_diffusion.py)
    for attr in ("n_pixels", "n_levels", "n_classes"):
        if not isinstance(getattr(model, attr, None), int):
            raise ArgenError(f"an image model needs an integer attribute {attr!r}")
    # Integers, checked just above (nn.Module's typing sees any attribute as a tensor or module).
    d, v, c = (cast(int, getattr(model, attr)) for attr in ("n_pixels", "n_levels", "n_classes"))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (batch,), generator=g)
    pixels = torch.randint(0, v, (batch, d), generator=g)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(labels, pixels)
            if tuple(out.shape) != (batch, d, v):
                raise ArgenError(f"an image model returns logits of shape (batch, {d}, {v}); got {tuple(out.shape)}")
            if kind == "ar":
                for t in range(d):
                    changed = pixels.clone()
                    changed[:, t] = (changed[:, t] + 1) % v
                    if not torch.allclose(model(labels, changed)[:, : t + 1], out[:, : t + 1], atol=1e-5):
                        raise ArgenError(
                            f"not an AR model in raster order: the logits of pixels 0..{t} change with pixel {t}"
                        )
            elif kind == "diffusion":
                masked = torch.full_like(pixels, v)
                if tuple(model(labels, masked).shape) != (batch, d, v):
                    raise ArgenError(f"a diffusion model must accept the mask token {v} at every pixel")
            else:
                raise ArgenError(f"unknown image model kind {kind!r}; valid: ar, diffusion")
    finally:
        model.train(was_training)
