"""`argen distill-small`: a small model with the model's own tokenizer, cut from the model and
self-distilled to it (recipes/small_model.py), cached beside the model."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from argen.cli.options import add_model_options, model_spec
from argen.errors import ArgenError
from argen.recipes.small_model import META_FILE, RECIPE_FIELDS, Recipe, distill, small_model_path


def add_distill_small(sub) -> None:
    p = sub.add_parser(
        "distill-small",
        help="make a small model for bild / fs-gen from the model itself",
        description="Cut the model to its first K decoder layers (same embedding, final norm, LM head and "
        "tokenizer) and self-distil the cut model to the full one on text from this machine. The "
        "small model is cached beside the model as a Hugging Face model directory (keyed by the "
        "model's fingerprint and the recipe); strategies bild and fs-gen then find it.",
    )
    add_model_options(p)
    recipe = p.add_argument_group("the recipe (each setting is part of the cache key)")
    for f in RECIPE_FIELDS:
        recipe.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            help=f.metadata["help"] + " (default: %(default)s)",
        )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", metavar="DIR", help="write the small model here instead of the cache")
    p.add_argument("--force", action="store_true", help="make it again even if this model and recipe are cached")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(handler=distill_small_command)


def distill_small_command(args: argparse.Namespace) -> int:
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in RECIPE_FIELDS})
    recipe.check()
    if args.threads < 0:
        raise ArgenError("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = model_spec(args).load_text().model
    target = Path(args.out) if args.out else small_model_path(model.runtime, recipe)
    if (target / META_FILE).is_file() and not args.force:
        print(
            f"argen: a small model for this model and recipe is cached: {target} (--force makes it again)",
            file=sys.stderr,
        )
        print(target)
        return 0
    started = time.perf_counter()
    path = distill(model, recipe, progress=args.progress, path=Path(args.out) if args.out else None)
    print(
        f"argen: small model ({recipe.layers} layers) written to {path} in "
        f"{(time.perf_counter() - started) / 60:.1f} min ({torch.get_num_threads()} threads)",
        file=sys.stderr,
    )
    print(path)
    return 0
