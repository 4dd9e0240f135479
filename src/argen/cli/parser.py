"""argparse with argen's one-line error format: `argen: error: ...`, exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

PROG = "argen"


def print_error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    """argparse's own error prints the usage block too; ours says it in one line."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{message} (see '{self.prog} --help')")
        raise SystemExit(2)
