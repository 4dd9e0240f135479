"""Training the digits models here, deterministically from a seed, and caching them beside the default
model (`argen.models.sources.cache_dir()/images`). `pretrained(name)` trains on first use;
`python -m argen.images.training` trains them all ahead of time (a progress bar per model).

A cached file's name carries a hash of everything that shapes the weights (recipe, seed, data split,
format version), so changing any of them trains afresh instead of loading stale weights. The weights
are safetensors (loading runs no code), the recipe rides in their metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.nn import functional as F

from argen.errors import ArgenError
from argen.images.block_diffusion import BlockConfig, BlockDiffusionTransformer, block_loss
from argen.images.data import HELD_OUT, SPLIT_SEED, load_split
from argen.images.models import ModelConfig, build
from argen.images.var import var_loss
from argen.models.sources import cache_dir

FORMAT = 1  # bump when the training code changes what a recipe produces


@dataclass(frozen=True)
class Recipe:
    config: ModelConfig | BlockConfig
    steps: int
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-2


RECIPES: dict[str, Recipe] = {
    "digits-ar": Recipe(ModelConfig("ar", hidden=512, layers=2, dropout=0.2), steps=800),
    "digits-ar-draft": Recipe(ModelConfig("ar", hidden=64, layers=1, dropout=0.0, direct=False), steps=600),
    "digits-diffusion": Recipe(ModelConfig("diffusion", hidden=512, layers=3, dropout=0.1), steps=1000),
    "digits-block-diffusion": Recipe(BlockConfig(width=64, layers=3, heads=4), steps=400, batch=64, lr=5e-3),
    "digits-var": Recipe(ModelConfig("var", hidden=96, layers=3, dropout=0.1), steps=1000, batch=64, lr=3e-3),
}


def build_model(config: ModelConfig | BlockConfig) -> torch.nn.Module:
    return BlockDiffusionTransformer(config) if isinstance(config, BlockConfig) else build(config)


def config_from(fields: dict) -> ModelConfig | BlockConfig:
    return BlockConfig(**fields) if fields.get("kind") == "block" else ModelConfig(**fields)


def recipe_key(recipe: Recipe, seed: int) -> str:
    blob = json.dumps(
        {"recipe": asdict(recipe), "seed": seed, "split": [HELD_OUT, SPLIT_SEED], "format": FORMAT}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cached_path(name: str, recipe: Recipe, seed: int) -> Path:
    return cache_dir() / "images" / f"{name}-s{seed}-{recipe_key(recipe, seed)}.safetensors"


def _loss(model, labels: torch.Tensor, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if model.kind == "block":
        return block_loss(model, labels, pixels, gen)
    if model.kind == "var":
        return var_loss(model, labels, pixels)
    if model.kind == "ar":
        logits = model(labels, pixels)
        return F.cross_entropy(logits.reshape(-1, model.n_levels), pixels.reshape(-1))
    # Masked diffusion: a mask ratio per image drawn from U(0, 1], each pixel masked with that
    # probability; the loss is the cross-entropy of the masked pixels (at least one per image).
    b, d = pixels.shape
    ratio = 1.0 - torch.rand(b, 1, generator=gen)
    masked = torch.rand(b, d, generator=gen) < ratio
    masked[torch.arange(b), torch.randint(0, d, (b,), generator=gen)] = True
    inputs = torch.where(masked, torch.full_like(pixels, model.n_levels), pixels)
    logits = model(labels, inputs)
    return F.cross_entropy(logits[masked], pixels[masked])


def train(recipe: Recipe, seed: int = 0, progress: bool = True, desc: str = "training") -> torch.nn.Module:
    """A model trained on the training split by `recipe`: the same seed gives the same weights (on the
    same CPU kernels: training runs on one thread so the order of float sums is fixed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is about as fast, and fixes the float sums' order
    try:
        return _train(recipe, seed, progress, desc)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: Recipe, seed: int, progress: bool, desc: str) -> torch.nn.Module:
    from tqdm.auto import tqdm

    split = load_split()
    x = torch.from_numpy(split.train_x)
    y = torch.from_numpy(split.train_y)
    torch.manual_seed(seed)  # the weights' initialisation
    gen = torch.Generator().manual_seed(seed + 1)  # batches and masks
    model = build_model(recipe.config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    # Linear warm-up over 5% of the steps, then cosine decay to zero.
    warm = max(1, recipe.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, recipe.steps) / recipe.steps))
    )
    bar = tqdm(range(recipe.steps), desc=desc, disable=not progress, file=sys.stderr, mininterval=1.0)
    for _ in bar:
        idx = torch.randint(0, len(x), (recipe.batch,), generator=gen)
        loss = _loss(model, y[idx], x[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return model


def held_out_loss(model, seed: int = 0) -> float:
    """Mean cross-entropy per pixel on the held-out split (for a diffusion model: at random mask ratios)."""
    split = load_split()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return float(_loss(model, torch.from_numpy(split.test_y), torch.from_numpy(split.test_x), gen))


def save(model, recipe: Recipe, seed: int, path: Path, seconds: float) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "recipe": json.dumps(asdict(recipe)),
        "seed": str(seed),
        "train_seconds": f"{seconds:.1f}",
        "threads": str(torch.get_num_threads()),
    }
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    # Mask buffers are rebuilt from the config; only parameters are stored.
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("mask")}, tmp, metadata=meta)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one


def load_file(path: Path) -> torch.nn.Module:
    """A model saved by `save` (its recipe is in the file's metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file as load_tensors

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    config = config_from(json.loads(meta["recipe"])["config"])
    model = build_model(config)
    missing, unexpected = model.load_state_dict(load_tensors(str(path)), strict=False)
    if unexpected or any(not k.endswith("mask") for k in missing):
        raise ArgenError(f"{path} does not hold a {config.kind} model of its recipe; delete it to retrain")
    model.eval()
    return model


def pretrained(name: str, seed: int = 0, progress: bool = True, recipe: Recipe | None = None) -> torch.nn.Module:
    """The model `name` (a key of RECIPES), from the cache or trained now and cached."""
    if recipe is None:
        if name not in RECIPES:
            raise ArgenError(f"unknown digits model {name!r}; valid: {', '.join(RECIPES)}")
        recipe = RECIPES[name]
    path = cached_path(name, recipe, seed)
    if path.is_file():
        return load_file(path)
    if progress:
        print(f"argen: training {name} (seed {seed}) on the digits training split; cached in {path}", file=sys.stderr)
    start = time.perf_counter()
    model = train(recipe, seed, progress, desc=name)
    save(model, recipe, seed, path, time.perf_counter() - start)
    return model


def _train_one(name: str, seed: int, steps_scale: float) -> tuple[str, float, float]:
    """Train (or load) one model; its held-out loss and the seconds it took (a worker of main)."""
    recipe = RECIPES[name]
    if steps_scale != 1.0:
        recipe = replace(recipe, steps=max(1, round(recipe.steps * steps_scale)))
    start = time.perf_counter()
    model = pretrained(name, seed, recipe=recipe)
    return name, held_out_loss(model), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m argen.images.training",
        description="Train the digits image models into argen's cache (skips cached ones).",
    )
    p.add_argument("names", nargs="*", default=list(RECIPES), help=f"default: all ({', '.join(RECIPES)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every recipe's steps (quick trials)")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="models trained at once, each in a process of its own on one thread (the same weights as one "
        "at a time) (default: %(default)s)",
    )
    args = p.parse_args(argv)
    unknown = [name for name in args.names if name not in RECIPES]
    if unknown or args.jobs < 1:
        p.error(f"unknown models {unknown} (valid: {', '.join(RECIPES)})" if unknown else "--jobs must be >= 1")
    start = time.perf_counter()
    if args.jobs == 1 or len(args.names) == 1:
        done = (_train_one(name, args.seed, args.steps_scale) for name in args.names)
        for name, loss, seconds in done:
            print(f"{name}: held-out loss {loss:.4f} nats/pixel, {seconds:.1f} s (trained on one thread)")
    else:
        # spawn, not fork: a forked torch with its thread pools started can deadlock
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = [pool.submit(_train_one, name, args.seed, args.steps_scale) for name in args.names]
            for future in as_completed(futures):
                name, loss, seconds = future.result()
                print(f"{name}: held-out loss {loss:.4f} nats/pixel, {seconds:.1f} s (trained on one thread)")
    print(f"all: {time.perf_counter() - start:.1f} s wall, {args.jobs} at a time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
