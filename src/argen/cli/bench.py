"""`argen bench`: registered here; its options are the benchmark harness's own (argen.bench)."""

from __future__ import annotations

import argparse

from argen.cli.parser import PROG, Parser
from argen.errors import ArgenError


def add_bench(sub) -> None:
    # The bench's own parser is built only when it runs, so `argen generate` never imports it.
    p = sub.add_parser("bench", help="benchmark strategies (see 'argen bench --help')", add_help=False)
    p.set_defaults(handler=bench)


def bench(args: argparse.Namespace) -> int:
    try:
        from argen.bench import add_arguments, run  # start-up cost: the bench only for `argen bench`
    except ImportError as exc:
        raise ArgenError(f"the benchmark suite is not available in this install ({exc})") from exc
    if args.bench_args[:1] == ["drift"]:  # moved to the repository's benchmark harness: say where
        from argen.bench import moved  # start-up cost, as above

        raise ArgenError(moved("drift"))
    parser = Parser(prog=f"{PROG} bench", description="Benchmark decoding strategies.")
    add_arguments(parser)
    return run(parser.parse_args(args.bench_args))
