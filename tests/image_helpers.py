"""Tiny random image-token models of every family (no training, seconds to build) and a strategy list
that runs every decoder of each, for the tests of batching and serving images."""

from __future__ import annotations

import torch

from argen.images import ImageGenerator
from argen.images.block_diffusion import BlockConfig, BlockDiffusionTransformer
from argen.images.models import ModelConfig, build

# Every strategy of every family, with options that make each decoder's branches run on random models
# (thresholds low enough that some pixels pass and some do not).
STRATEGIES: dict[str, list[dict]] = {
    "ar": [
        {"name": "plain"},
        {"name": "speculative", "k": 3},
        {"name": "jacobi", "window": 5},
        {"name": "lantern", "k": 3, "delta": 0.2},
        {"name": "gsd", "k": 3, "group": 3},
    ],
    "diffusion": [
        {"name": "plain"},
        {"name": "confidence", "threshold": 0.3},
        {"name": "confidence", "threshold": 0.3, "block": 8},
    ],
    "block": [
        {"name": "plain"},
        {"name": "blockwise", "threshold": 0.3},
        {"name": "blockwise", "threshold": 0.3, "cache": 0},
        {"name": "subblock", "threshold": 0.3, "sub_block": 4},
        {"name": "subblock", "threshold": 0.3, "sub_block": 2, "reuse": 0},
        {"name": "dkv", "threshold": 0.3},
    ],
    "var": [
        {"name": "plain"},
        {"name": "scalekv", "budget": 3, "drafters": 1, "drafter_budget": 9},
    ],
}


def _sharpened(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Weights scaled up: random small weights give near-uniform distributions (nothing passes a
    threshold, every draft is kept); scaled, they are far from uniform."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model.eval()


def tiny_image_models() -> dict[str, ImageGenerator]:
    """One ImageGenerator per family, named after the real models (digits-ar has a draft)."""
    torch.manual_seed(0)
    ar = _sharpened(build(ModelConfig("ar", hidden=32, layers=1, dropout=0.0)), 2.0)
    draft = _sharpened(build(ModelConfig("ar", hidden=8, layers=1, dropout=0.0, direct=False)), 2.0)
    diffusion = _sharpened(build(ModelConfig("diffusion", hidden=32, layers=1, dropout=0.0)), 2.0)
    block = _sharpened(BlockDiffusionTransformer(BlockConfig(width=16, layers=1, heads=2)), 1.5)
    var = _sharpened(build(ModelConfig("var", hidden=32, layers=2, dropout=0.0)), 1.5)
    return {
        "digits-ar": ImageGenerator.from_modules(ar, "ar", draft=draft, name="digits-ar"),
        "digits-diffusion": ImageGenerator.from_modules(diffusion, "diffusion", name="digits-diffusion"),
        "digits-block-diffusion": ImageGenerator.from_modules(block, "block", name="digits-block-diffusion"),
        "digits-var": ImageGenerator.from_modules(var, "var", name="digits-var"),
    }


def cases() -> list[tuple[str, dict]]:
    """(model name, strategy) for every strategy of every family."""
    names = {"ar": "digits-ar", "diffusion": "digits-diffusion", "block": "digits-block-diffusion", "var": "digits-var"}
    return [(names[kind], s) for kind, strategies in STRATEGIES.items() for s in strategies]
