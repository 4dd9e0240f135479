"""Every option more than one subcommand takes, each defined once here, and the conversions from
parsed options to the typed values the library takes (`model_spec`, `sampling_options`,
`strategy_spec`, `scheduler_options`, `limits`): the command line is converted at this edge, and
no argparse Namespace goes further."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from argen.api import ModelSpec
from argen.errors import ArgenError
from argen.models.quant_paths import QUANTS

if TYPE_CHECKING:
    from argen.server.limits import Limits


# -- which model -------------------------------------------------------------------------------
def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model source; see 'argen models' (default: %(default)s)")
    p.add_argument("--runtime", default="auto", choices=("auto", "native", "hf"))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--quant",
        default="auto",
        choices=QUANTS,
        help="how the weights are held on CPU: auto (a GGUF's own quantized blocks where argen's kernels "
        "build, else fp32), exact (those blocks, fp32 activations), none (fp32), q8_0/q4_1/q4_0 "
        "(quantize fp32 weights at load) (default: %(default)s)",
    )


def add_recipe_options(p: argparse.ArgumentParser, fields) -> None:
    """A training recipe's settings (dataclass fields with a `help` in their metadata) as options, in a
    group that says each is part of the cache key (`argen distill-draft`, `argen distill-small`)."""
    recipe = p.add_argument_group("the recipe (each setting is part of the cache key)")
    for f in fields:
        recipe.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            help=f.metadata["help"] + " (default: %(default)s)",
        )


def recipe_of(args: argparse.Namespace, recipe_cls, fields):
    """The recipe the options of `add_recipe_options` gave, checked."""
    recipe = recipe_cls(**{f.name: getattr(args, f.name) for f in fields})
    recipe.check()
    return recipe


def model_spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(args.model, runtime=args.runtime, device=args.device, dtype=args.dtype, quant=args.quant)


# -- sampling and strategy ---------------------------------------------------------------------
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop")


def add_sampling_options(
    p: argparse.ArgumentParser, unset: str, defaults: Mapping[str, object] = {}, seed_help: str = "sampling seed"
) -> None:
    """The sampling options (unset: None, unless `defaults` gives one, which the help then shows) and
    the strategy; `unset` says in the help what an unset option means."""
    g = p.add_argument_group("sampling", f"unset options: {unset}")

    def shown(help: str, name: str) -> str:
        return f"{help} (default: %(default)s)" if name in defaults else help

    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=defaults.get("max_new_tokens"),
        help=shown("new tokens at most", "max_new_tokens"),
    )
    g.add_argument(
        "--temperature", type=float, default=defaults.get("temperature"), help=shown("0 means greedy", "temperature")
    )
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int, help=seed_help)
    g.add_argument("--stop", action="append", default=None, metavar="STR", help="stop string (repeatable)")
    g.add_argument(
        "--strategy", default=defaults.get("strategy"), help=shown("decoding strategy; see 'argen models'", "strategy")
    )
    g.add_argument(
        "--strategy-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="strategy option (repeatable); VALUE is read as JSON, else as a string",
    )


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The SamplingParams fields the user set (the rest keep SamplingParams' defaults)."""
    return {name: value for name in SAMPLING_FIELDS if (value := getattr(args, name)) is not None}


def parse_options(pairs: list[str], what: str = "strategy", example: str = "max_draft=8") -> dict[str, object]:
    """`--strategy-opt` / `--press-opt` KEY=VALUE pairs -> {key: value}; VALUE is JSON, else a string."""
    opts: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ArgenError(f"--{what}-opt takes KEY=VALUE (for example {example}); got {pair!r}")
        if key == "name":
            raise ArgenError(f"choose the {what} with --{what} NAME, not --{what}-opt name=...")
        try:
            opts[key] = json.loads(raw)
        except json.JSONDecodeError:
            opts[key] = raw  # plain strings need no JSON quotes
    return opts


def strategy_spec(args: argparse.Namespace) -> str | dict | None:
    """The strategy the user named (with its options), or None."""
    opts = parse_options(args.strategy_opt)
    if opts and args.strategy is None:
        raise ArgenError("--strategy-opt needs --strategy NAME")
    if args.strategy is None:
        return None
    return {"name": args.strategy, **opts} if opts else args.strategy


# -- the scheduler (argen serve, argen batch) --------------------------------------------------
def add_scheduler_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-batch",
        type=int,
        default=32,
        help="rows decoding at once: a request's n samples take n, an image request's images one each "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prefill long prompts in chunks of this many tokens beside the others' decode steps; 0: "
        "each prompt whole (default: %(default)s)",
    )
    p.add_argument(
        "--step-tokens",
        type=int,
        default=1024,
        help="tokens one scheduler step may run, decode rows and prefill chunks together; 0: no budget "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="compute every prompt in full instead of reusing the blocks of a prefix seen before",
    )


def check_scheduler_options(args: argparse.Namespace) -> None:
    if args.max_batch < 1:
        raise ArgenError(f"--max-batch must be >= 1; got {args.max_batch}")
    if args.prefill_chunk < 0 or args.step_tokens < 0:
        raise ArgenError("--prefill-chunk and --step-tokens must be >= 0 (0: off)")


def scheduler_options(args: argparse.Namespace) -> dict[str, Any]:
    """The scheduler's keyword arguments (JobRunner's, create_app's): 0 means off (None)."""
    return {
        "max_batch": args.max_batch,
        "prefill_chunk": args.prefill_chunk or None,
        "step_tokens": args.step_tokens or None,
        "prefix_caching": args.prefix_caching,
    }


# -- what requests may ask for (argen serve, argen batch) --------------------------------------
def add_request_policy_options(p: argparse.ArgumentParser, asker: str) -> None:
    """The companion models requests may name and the caps on their options; `asker`: who names
    them in the help ("requests", "lines")."""
    p.add_argument(
        "--draft-model",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help=f"a draft model {asker} may name (strategy draft-model, option draft=NAME); loaded at start; "
        "repeatable. The served model is always available under its --model name",
    )
    p.add_argument(
        "--guide-model",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help=f"a guide model {asker} may name (strategy guided, option guide_model=NAME); loaded at start; repeatable",
    )
    p.add_argument(
        "--draft-head",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help=f"a draft head {asker} may name (strategy draft-head, option head=NAME; the first one when "
        "none is named): SOURCE is 'cached' (the head `argen distill-draft` cached for --model) or a "
        "head file; loaded at start; repeatable",
    )
    p.add_argument(
        "--caad-store",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help=f"a CAAD grounding store {asker} may name (strategy caad, option store=NAME; the first one when "
        "none is named): a file `argen caad-store` built for --model; loaded at start; repeatable",
    )
    p.add_argument(
        "--small-model",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help=f"a small model {asker} may name (strategies bild, fs-gen, option small=NAME; the first one when "
        "none is named): SOURCE is 'cached' (the small model `argen distill-small` cached for --model) or a "
        "model with --model's tokenizer; loaded at start; repeatable",
    )
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="raise or lower a cap on a strategy option, e.g. num_beams=16, or on n (repeatable; see SECURITY.md)",
    )


def limits(args: argparse.Namespace) -> Limits:
    """The caps `--limit` sets (parsed before any slow model load)."""
    from argen.server.limits import Limits  # start-up cost: argen.server loads FastAPI; only serve and batch need it

    return Limits.parse(args.limit)
