"""Image-token models and their decoders, on handwritten digits trained here (issue 28).

`argen.load("digits-ar")` / `"digits-diffusion"` / `"digits-block-diffusion"` / `"digits-var"` return an
`ImageGenerator` whose `generate_images(labels=[...], strategy=..., seed=...)` gives (n, 8, 8) integer
arrays in 0..16. Modules: data (the split), models (the model contract and the MLP models),
block_diffusion (the block-causal transformer with its KV cache, and its contract), var (the
next-scale model, its contract and decoders, ScaleKV's cache budgets), training (train + cache),
decoding (the strategies), block_decoding (the block model's cached decoders: SDAR blockwise,
Fast-dLLM v2 sub-blocks, dKV-Cache), gsd (grouped speculative decoding's acceptance), quality
(classifier accuracy and Fréchet distance), generator (the API).
"""

from __future__ import annotations

from argen.errors import ModelNotFoundError
from argen.images.generator import ImageGenerator, save_grid
from argen.images.training import pretrained

# loadable name -> (model kind, its draft model's name or None)
IMAGE_MODELS: dict[str, tuple[str, str | None]] = {
    "digits-ar": ("ar", "digits-ar-draft"),
    "digits-ar-draft": ("ar", None),
    "digits-diffusion": ("diffusion", None),
    "digits-block-diffusion": ("block", None),
    "digits-var": ("var", None),
}


def is_image_model(name: str) -> bool:
    return isinstance(name, str) and name.partition("@")[0] in IMAGE_MODELS


def load_image_model(name: str, progress: bool = True) -> ImageGenerator:
    """A digits model by name (optionally "@SEED": the training seed), trained and cached on first use."""
    base, _, seed = name.partition("@")
    if base not in IMAGE_MODELS or (seed and not seed.isdigit()):
        raise ModelNotFoundError(f"unknown image model {name!r}; valid: {', '.join(IMAGE_MODELS)} (optionally @SEED)")
    kind, draft = IMAGE_MODELS[base]
    s = int(seed or 0)
    return ImageGenerator(name, pretrained(base, s, progress), kind, pretrained(draft, s, progress) if draft else None)


__all__ = ["IMAGE_MODELS", "ImageGenerator", "is_image_model", "load_image_model", "save_grid"]
