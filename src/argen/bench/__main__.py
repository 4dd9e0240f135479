"""`python -m argen.bench ...`: the same as `argen bench ...`."""

from __future__ import annotations

import argparse
import sys

import argen.bench as bench
from argen.errors import ArgenError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="argen bench", description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    bench.add_arguments(parser)
    try:
        if argv[:1] == ["drift"]:
            raise ArgenError(bench.moved("drift"))
        return bench.run(parser.parse_args(argv))
    except ArgenError as exc:
        print(f"argen bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
