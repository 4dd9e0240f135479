"""Command-line options shared by `argen chat` and `argen batch`: which model to load, and the
sampling options (as `argen generate` spells them)."""

from __future__ import annotations

import argparse

from argen.models.quant_paths import QUANTS


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model source; see 'argen models' (default: %(default)s)")
    p.add_argument("--runtime", default="auto", choices=("auto", "native", "hf"))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--quant", default="auto", choices=QUANTS, help="how the weights are held on CPU (see 'argen "
                   "generate --help') (default: %(default)s)")  # fmt: skip


def model_kwargs(args: argparse.Namespace) -> dict:
    """`argen.load` keyword arguments (besides the source) from `add_model_args`' options."""
    return {"runtime": args.runtime, "device": args.device, "dtype": args.dtype, "quant": args.quant}


def add_sampling_args(p: argparse.ArgumentParser, defaults: str) -> None:
    """The sampling options, all defaulting to None (unset); `defaults` says in the help what unset means."""
    g = p.add_argument_group("sampling", f"unset options: {defaults}")
    g.add_argument("--max-new-tokens", type=int, help="new tokens at most")
    g.add_argument("--temperature", type=float, help="0 means greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int, help="sampling seed")
    g.add_argument("--stop", action="append", default=None, metavar="STR", help="stop string (repeatable)")
    g.add_argument("--strategy", help="decoding strategy; see 'argen models'")
    g.add_argument("--strategy-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy option (repeatable); VALUE is read as JSON, else as a string")  # fmt: skip


def sampling_options(args: argparse.Namespace) -> dict[str, object]:
    """SamplingParams fields the user set."""
    given = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
             "top_k": args.top_k, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
             "seed": args.seed, "stop": args.stop}  # fmt: skip
    return {k: v for k, v in given.items() if v is not None}


def strategy_spec(args: argparse.Namespace) -> str | dict | None:
    """The strategy the user named (with its options), or None."""
    from argen.cli import parse_strategy_opts
    from argen.errors import ArgenError

    opts = parse_strategy_opts(args.strategy_opt)
    if opts and args.strategy is None:
        raise ArgenError("--strategy-opt needs --strategy NAME")
    if args.strategy is None:
        return None
    return {"name": args.strategy, **opts} if opts else args.strategy
