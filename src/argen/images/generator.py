"""`ImageGenerator`: what `argen.load("digits-ar")` (or "digits-diffusion", "digits-var") returns, and the way to plug
in a model of one's own (`ImageGenerator.from_modules`)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from argen.errors import ArgenError, InvalidRequestError
from argen.images import block_decoding, decoding, var
from argen.images.gsd import Grouped
from argen.images.models import check_model

MAX_IMAGES = 4096  # per call: bounds the work one request can ask for
CHUNK = 512  # images decoded together (bounds memory)

# strategy name -> (model kind, its options with (default, low, high))
STRATEGIES: dict[str, tuple[str, dict[str, tuple[float, float, float]]]] = {
    "plain": ("any", {"temperature": (1.0, 0.05, 10.0)}),
    "speculative": ("ar", {"k": (4, 1, 16), "temperature": (1.0, 0.05, 10.0)}),
    "jacobi": ("ar", {"window": (16, 1, 64), "temperature": (1.0, 0.05, 10.0)}),
    "lantern": (
        "ar",
        {"k": (4, 1, 16), "delta": (0.1, 0.0, 1.0), "neighbours": (2, 1, 16), "temperature": (1.0, 0.05, 10.0)},
    ),
    "confidence": (
        "diffusion",
        {"threshold": (0.9, 0.0, 1.0), "block": (0, 0, 4096), "temperature": (1.0, 0.05, 10.0)},
    ),
    # Block diffusion (block_decoding.py): SDAR blockwise (cache 0: recompute all, 1: block KV cache),
    # Fast-dLLM v2 sub-blocks (reuse 0: exact recompute, 1: finished sub-blocks' KV reused), dKV-Cache.
    "blockwise": ("block", {"threshold": (0.9, 0.0, 1.0), "cache": (1, 0, 1), "temperature": (1.0, 0.05, 10.0)}),
    "subblock": (
        "block",
        {"threshold": (0.9, 0.0, 1.0), "sub_block": (4, 1, 64), "reuse": (1, 0, 1), "temperature": (1.0, 0.05, 10.0)},
    ),
    "dkv": ("block", {"threshold": (0.9, 0.0, 1.0), "temperature": (1.0, 0.05, 10.0)}),
    "gsd": ("ar", {"k": (4, 1, 16), "group": (3, 1, 16), "p_gap": (1.0, 0.0, 1.0), "temperature": (1.0, 0.05, 10.0)}),
    "scalekv": (
        "var",
        {
            "budget": (8, 1, 4096),
            "drafters": (0, 0, 64),
            "drafter_budget": (4096, 1, 4096),
            "temperature": (1.0, 0.05, 10.0),
        },
    ),
}
INTEGER_OPTIONS = {
    "k",
    "neighbours",
    "block",
    "window",
    "cache",
    "sub_block",
    "reuse",
    "group",
    "budget",
    "drafters",
    "drafter_budget",
}


@dataclass
class ImageResult:
    images: np.ndarray  # (n, side, side) int64 in 0..n_levels-1
    labels: np.ndarray  # (n,)
    target_passes: np.ndarray  # (n,) forward passes of the model per image
    draft_passes: np.ndarray  # (n,) forward passes of the draft model per image
    seconds: float
    seed: int
    strategy: dict
    tokens_computed: np.ndarray | None = None  # (n,) token positions the model computed (block diffusion)


def parse_strategy(spec, kind: str) -> tuple[str, dict]:
    """A strategy name or {"name": ..., options}: checked against the model's kind, options bounded."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise InvalidRequestError(f"an image strategy is a name or a dict with 'name' and its options; got {spec!r}")
    name = spec["name"]
    valid = [s for s, (k, _) in STRATEGIES.items() if k in ("any", kind)]
    if name not in valid:
        raise InvalidRequestError(f"strategy {name!r} does not run on a {kind} image model; valid: {', '.join(valid)}")
    allowed = STRATEGIES[name][1]
    options = {}
    for key, value in spec.items():
        if key == "name":
            continue
        if key not in allowed:
            raise InvalidRequestError(f"unknown option {key!r} of strategy {name!r}; valid: {', '.join(allowed)}")
        _, low, high = allowed[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise InvalidRequestError(f"strategy option {key} must be a number in [{low}, {high}]; got {value!r}")
        if key in INTEGER_OPTIONS and int(value) != value:
            raise InvalidRequestError(f"strategy option {key} must be an integer; got {value!r}")
        options[key] = int(value) if key in INTEGER_OPTIONS else float(value)
    if options.get("temperature", 1.0) <= 0:
        raise InvalidRequestError("temperature must be > 0")
    return name, {key: options.get(key, default) for key, (default, _, _) in allowed.items()}


class ImageGenerator:
    """Generates images from an image-token model (models.py's contract) with a decoding strategy."""

    def __init__(self, name: str, model, kind: str, draft=None, latent_order: torch.Tensor | None = None) -> None:
        self.name, self.model, self.kind, self.draft = name, model, kind, draft
        # LANTERN's latent neighbourhoods: (V, V-1) other tokens nearest first; grey levels by default.
        self.latent_order = decoding.grey_level_order(model.n_levels) if latent_order is None else latent_order

    @classmethod
    def from_modules(
        cls, model, kind: str, draft=None, name: str = "custom", latent_order: torch.Tensor | None = None
    ) -> ImageGenerator:
        """Plug in a model of one's own (and a draft for "speculative" / "lantern" / "gsd"): its contract is
        checked first. `latent_order` (n_levels, n_levels - 1): each token's others, nearest first in the
        model's latent (codebook) space, for LANTERN and GSD; by default tokens are grey levels (nearest level)."""
        check_model(model, kind)
        if draft is not None:
            check_model(draft, "ar")
            if (draft.n_pixels, draft.n_levels, draft.n_classes) != (model.n_pixels, model.n_levels, model.n_classes):
                raise InvalidRequestError("the draft model must have the target's n_pixels, n_levels and n_classes")
        model.eval()
        if draft is not None:
            draft.eval()
        return cls(name, model, kind, draft, latent_order)

    def _labels(self, labels) -> torch.Tensor:
        values = list(labels) if not isinstance(labels, int) else [labels]
        if not values or len(values) > MAX_IMAGES:
            raise InvalidRequestError(f"give between 1 and {MAX_IMAGES} labels; got {len(values)}")
        c = self.model.n_classes
        if any(isinstance(v, bool) or int(v) != v or not 0 <= int(v) < c for v in values):
            raise InvalidRequestError(f"every label must be an integer class in 0..{c - 1}; got {values!r}")
        return torch.tensor([int(v) for v in values], dtype=torch.long)

    def check_request(self, labels, strategy="plain", seed: int | None = None) -> tuple[torch.Tensor, str, dict]:
        """The labels as a tensor, the strategy's name and options, after every check a request gets
        (InvalidRequestError says what is wrong): what a server runs before queueing one."""
        lab = self._labels(labels)
        name, options = parse_strategy(strategy, self.kind)
        if name in ("speculative", "lantern", "gsd") and self.draft is None:
            raise InvalidRequestError(f"model {self.name!r} has no draft model for speculative sampling")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise InvalidRequestError(f"seed must be a non-negative integer; got {seed!r}")
        if name == "scalekv":  # drafters beyond the model's layers: said now, not midway through a batch
            var.check_drafters(self.model, options["drafters"])
        return lab, name, options

    def generate_images(self, labels, *, strategy="plain", seed: int | None = None) -> np.ndarray:
        """Images of shape (n, 8, 8), integers 0..16, one per label; see `generate_images_with_stats`."""
        return self.generate_images_with_stats(labels, strategy=strategy, seed=seed).images

    def generate_images_with_stats(self, labels, *, strategy="plain", seed: int | None = None) -> ImageResult:
        """Images for `labels` (class ids) with `strategy`: "plain" (one pixel a pass), "speculative"
        (AR model with its draft: {"name": "speculative", "k": 4}), "lantern" (speculative with LANTERN's
        relaxed acceptance, lossy: {"name": "lantern", "k": 4, "delta": 0.1, "neighbours": 2}), "jacobi"
        (speculative Jacobi decoding, exact, no draft: {"name": "jacobi", "window": 16}), "gsd" (grouped
        speculative decoding, lossy: {"name": "gsd", "k": 4, "group": 3, "p_gap": 1.0}), on a next-scale
        ("var") model "plain" (one pass per scale) and "scalekv" (per-layer cache budgets, lossy:
        {"name": "scalekv", "budget": 8, "drafters": 1, "drafter_budget": 21}), "confidence" (diffusion model,
        Fast-dLLM threshold decoding: {"name": "confidence", "threshold": 0.9}, and "block": 8 for
        row-by-row semi-autoregressive blocks); every strategy takes
        "temperature". Image i draws from its own generator, from (seed, i): the same seed gives it the
        same pixels for its label, whatever the other labels are (decoding.row_generators)."""
        lab, name, options = self.check_request(labels, strategy, seed)
        if seed is None:
            seed = secrets.randbelow(2**31)
        gens = decoding.row_generators(seed, len(lab))
        start = time.perf_counter()
        parts = [
            decoding.run(self.decode(name, options, lab[i : i + CHUNK], gens[i : i + CHUNK]))
            for i in range(0, len(lab), CHUNK)
        ]
        return self.result(parts, lab, time.perf_counter() - start, seed, name, options)

    def result(
        self, parts: list[decoding.Decoded], labels: torch.Tensor, seconds: float, seed: int, name: str, options: dict
    ) -> ImageResult:
        """One request's ImageResult from its decoded rows (in `parts`, in order)."""
        tokens = torch.cat([p.tokens for p in parts]).numpy()
        d = self.model.n_pixels
        side = int(round(d**0.5))
        shape = (len(labels), side, side) if side * side == d else (len(labels), d)
        return ImageResult(
            tokens.reshape(shape),
            labels.numpy(),
            torch.cat([p.target_passes for p in parts]).numpy(),
            torch.cat([p.draft_passes for p in parts]).numpy(),
            seconds,
            seed,
            {"name": name, **options},
            computed(parts),
        )

    def decode(self, name: str, options: dict, labels: torch.Tensor, gens: Sequence[torch.Generator]) -> decoding.Steps:
        """The strategy's decode of `labels` (a checked strategy: `check_request`), row i drawing with
        gens[i], as steps (one a forward pass: decoding.py); `decoding.run` drives it to its images."""
        if self.kind == "block":
            return block_decoding.decode_strategy(self.model, name, options, labels, gens)
        if self.kind == "var":
            budgets = None
            if name == "scalekv":
                budgets = var.layer_budgets(
                    self.model, options["budget"], options["drafters"], options["drafter_budget"]
                )
            return _decoded_only(var.var_decode(self.model, labels, gens, options["temperature"], budgets))
        if self.kind == "ar":
            if name == "gsd":
                rest = {key: v for key, v in options.items() if key not in ("group", "p_gap")}
                grouped = Grouped(self.latent_order, options["group"], options["p_gap"])
                return decoding.ar_speculative(self.model, self.draft, labels, gens, relax=grouped, **rest)
            if name == "speculative":
                return decoding.ar_speculative(self.model, self.draft, labels, gens, **options)
            if name == "jacobi":
                return decoding.ar_jacobi(self.model, labels, gens, **options)
            if name == "lantern":
                rest = {key: v for key, v in options.items() if key not in ("delta", "neighbours")}
                relax = decoding.Lantern(self.latent_order, options["delta"], options["neighbours"])
                return decoding.ar_speculative(self.model, self.draft, labels, gens, relax=relax, **rest)
            return decoding.ar_plain(self.model, labels, gens, **options)
        if name == "confidence":
            return decoding.diffusion_confidence(self.model, labels, gens, **options)
        return decoding.diffusion_plain(self.model, labels, gens, **options)


def _decoded_only(steps) -> decoding.Steps:
    """var_decode's steps, returning its images without the cache figure."""
    decoded, _ = yield from steps
    return decoded


def computed(parts: list[decoding.Decoded]) -> np.ndarray | None:
    """The block decoders' tokens computed per image, or None (the other decoders do not count them)."""
    counts = [p.tokens_computed for p in parts if isinstance(p, block_decoding.BlockDecoded)]
    return torch.cat(counts).numpy() if len(counts) == len(parts) else None


def save_grid(images: np.ndarray, path, labels=None, columns: int = 10, levels: int = 17) -> None:
    """A PNG grid of images (n, side, side), white on black as in the dataset, with matplotlib (the
    images extra); each image titled with its label when given."""
    try:  # imported here: an optional dependency, needed only to draw
        import matplotlib
    except ImportError as exc:
        raise ArgenError("drawing images needs matplotlib: pip install 'argen[images]'") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = max(1, min(columns, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.9), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap="gray", vmin=0, vmax=levels - 1, interpolation="nearest")
            if labels is not None:
                ax.set_title(str(int(labels[i])), fontsize=7, pad=1)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)
