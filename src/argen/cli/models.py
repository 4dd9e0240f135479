"""`argen models`: the model sources, weight paths, strategies and presses there are."""

from __future__ import annotations

import argparse

from argen.cache.press import PRESSES, press_options
from argen.images import IMAGE_MODELS
from argen.images import training as image_training
from argen.images.generator import STRATEGIES as IMAGE_STRATEGIES
from argen.models import sources
from argen.models.kernels import describe_cpu
from argen.models.quant_paths import QUANTS
from argen.strategies import REGISTRY, strategy_options


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list model sources and decoding strategies")
    p.set_defaults(handler=models)


def models(args: argparse.Namespace) -> int:
    print("Model sources (--model):")
    for name, description in sources.describe_sources():
        print(f"  {name:<26} {description}")
    print("\nWeight paths (--quant): " + ", ".join(QUANTS) + f"; CPU: {describe_cpu()}")
    print(f"\nModel cache: {sources.cache_dir()}")
    print("  (downloaded and converted models; delete the directory to clear it, or set ARGEN_CACHE_DIR)")
    print("\nStrategies (--strategy NAME, options with --strategy-opt KEY=VALUE):")
    for name, cls in sorted(REGISTRY.items()):
        kind = "exact" if cls.exact else "lossy"
        opts = ", ".join(f"{k}={v!r}" for k, v in strategy_options(cls).items()) or "no options"
        print(f"  {name:<26} {kind}; {opts}")
    print(
        "\nKV-cache presses (--press NAME, options with --press-opt KEY=VALUE; lossy below budget 1, quantizing ones always):"
    )
    for name, press in sorted(PRESSES.items()):
        opts = ", ".join(f"{k}={v!r}" for k, v in press_options(press).items())
        print(f"  {name:<26} {opts} ({press.paper})")
    print(
        "\nImage-token models (--model NAME --labels 0,1,2; argen serve --image-model NAME; trained on first "
        "use, pip install 'argen[images]'):"
    )
    for name, (kind, draft) in IMAGE_MODELS.items():
        recipe = image_training.RECIPES[name]
        cached = "cached" if image_training.cached_path(name, recipe, 0).exists() else "not trained yet"
        print(f"  {name:<26} {kind}{f', draft {draft}' if draft else ''}; {cached}")
    print("\nImage strategies (--strategy NAME, options with --strategy-opt KEY=VALUE; default [low, high]):")
    for name, (kind, options) in IMAGE_STRATEGIES.items():
        opts = ", ".join(f"{k}={d:g} [{lo:g}, {hi:g}]" for k, (d, lo, hi) in options.items())
        print(f"  {name:<26} {kind} models; {opts}")
    return 0
