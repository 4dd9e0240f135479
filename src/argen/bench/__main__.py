"""`python -m argen.bench ...`: the same as `argen bench ...`."""

from __future__ import annotations

import argparse
import sys

import argen.bench as bench
from argen.bench import add_arguments, run
from argen.errors import ArgenError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["drift"]:
        from argen.bench import drift_bench

        return drift_bench.main(argv[1:])
    parser = argparse.ArgumentParser(prog="argen bench", description=bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ArgenError as exc:
        print(f"argen bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
