"""`argen chat`: the options, checked before the model loads; the conversation is argen.chat's."""

from __future__ import annotations

import argparse
import sys

from argen.chat import DEFAULT_MAX_NEW_TOKENS, ChatSession, reader, repl
from argen.cli.options import add_model_options, add_sampling_options, model_spec, sampling_options, strategy_spec
from argen.errors import ArgenError
from argen.sampling import SamplingParams
from argen.strategies import make_strategy


def add_chat(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model in the terminal (streaming; /help for commands)",
        description="Chat with a model over its chat template, replies streamed.",
    )
    add_model_options(p)
    add_sampling_options(p, f"greedy, at most {DEFAULT_MAX_NEW_TOKENS} new tokens a reply, strategy plain")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--stats", action="store_true", help="show each reply's statistics (toggle with /stats)")
    p.set_defaults(handler=chat)


def chat(args: argparse.Namespace) -> int:
    options = sampling_options(args)
    strategy = strategy_spec(args) or "plain"
    try:  # checked before the (slow) model load
        SamplingParams(**options)
        make_strategy(strategy)
    except ValueError as exc:
        raise ArgenError(str(exc)) from exc
    gen = model_spec(args).load_text()
    if not getattr(gen.tokenizer, "chat_template", None):
        raise ArgenError(f"model {args.model!r} has no chat template; use 'argen generate --no-chat' instead")
    session = ChatSession(gen, system=args.system, strategy=strategy, options=options, stats=args.stats)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"argen chat with {gen.name}; /help for commands, Ctrl-D to leave", file=sys.stderr)
    return repl(session, reader(interactive), sys.stdout, sys.stderr, prompt="> " if interactive else "")
