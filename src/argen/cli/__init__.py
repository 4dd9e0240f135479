"""The `argen` command line: `generate`, `chat`, `batch`, `models`, `bench`, `serve`,
`distill-draft`, `distill-small` and `caad-store`, one module each; the options several of them take are defined once in
`options.py`, which also converts them into the typed values the library takes (no argparse
Namespace leaves this package).

Errors caused by the user's input are printed as one line, `argen: error: ...`, with exit code 2;
a traceback means a bug. Only the completion (or its JSON) goes to stdout, each of `--n` samples
under a header line; everything else (statistics, `--logprobs` tables) goes to stderr, so `--json`
output stays parseable.
"""

from __future__ import annotations

import argparse

from argen.cli.batch import add_batch
from argen.cli.bench import add_bench
from argen.cli.caad import add_caad_store
from argen.cli.chat import add_chat
from argen.cli.distill import add_distill
from argen.cli.distill_small import add_distill_small
from argen.cli.generate import add_generate
from argen.cli.models import add_models
from argen.cli.parser import PROG, Parser, print_error
from argen.cli.serve import add_serve
from argen.errors import ArgenError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="One engine for autoregressive generation.")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{generate,chat,batch,models,bench,serve,distill-draft,distill-small,caad-store}",
        parser_class=Parser,
    )
    for add in (
        add_generate,
        add_chat,
        add_batch,
        add_models,
        add_bench,
        add_serve,
        add_distill,
        add_distill_small,
        add_caad_store,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # Only `bench` takes arguments this parser does not know: they belong to the bench's parser.
        if extra and args.command != "bench":
            print_error(f"unrecognized arguments: {' '.join(extra)} (see '{PROG} {args.command} --help')")
            return 2
        args.bench_args = extra
        return args.handler(args)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    except ArgenError as exc:
        print_error(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
