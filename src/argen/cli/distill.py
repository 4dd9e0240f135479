"""`argen distill-draft`: train a draft head for strategy draft-head from the model itself
(recipes/draft_head.py), cached beside the model."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from argen.cli.options import add_model_options, add_recipe_options, model_spec, recipe_of
from argen.errors import ArgenError
from argen.recipes.draft_head import RECIPE_FIELDS, Recipe, distill, head_path


def add_distill(sub) -> None:
    p = sub.add_parser(
        "distill-draft",
        help="train a draft head for strategy draft-head from the model itself",
        description="Self-distill an EAGLE-style draft head: the model answers prompts built from text "
        "on this machine, and a one-layer head learns to predict its next features and "
        "tokens. The head is cached beside the model (keyed by the model's fingerprint and "
        "the recipe); strategy draft-head then finds it.",
    )
    add_model_options(p)
    add_recipe_options(p, RECIPE_FIELDS)
    p.add_argument("--batch", type=int, default=32, help="prompts the model answers together (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", metavar="FILE", help="write the head here instead of the cache")
    p.add_argument("--force", action="store_true", help="train again even if this model and recipe are cached")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(handler=distill_command)


def distill_command(args: argparse.Namespace) -> int:
    recipe = recipe_of(args, Recipe, RECIPE_FIELDS)
    if args.batch < 1 or args.threads < 0:
        raise ArgenError("--batch must be >= 1 and --threads >= 0")
    if args.runtime == "hf":
        raise ArgenError(
            "a draft head is distilled on the native runtime (the head reads its hidden states and "
            "pool); drop --runtime hf"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = model_spec(args).load_text()
    target = Path(args.out) if args.out else head_path(gen.runtime, recipe)
    if target.is_file() and not args.force:
        print(
            f"argen: a draft head for this model and recipe is cached: {target} (--force trains it again)",
            file=sys.stderr,
        )
        return 0
    started = time.perf_counter()
    path = distill(gen, recipe, batch=args.batch, progress=args.progress, path=Path(args.out) if args.out else None)
    print(
        f"argen: draft head written to {path} in {(time.perf_counter() - started) / 60:.1f} min "
        f"({torch.get_num_threads()} threads)",
        file=sys.stderr,
    )
    print(path)
    return 0
