"""`python -m benchmarks TOOL ...`: the harness's tools, each with its own `--help`.

- `compare`: Spec-Bench through argen's strategies beside Hugging Face `generate()` (and llama.cpp)
  on the same weights; `--merge` joins runs, `--control` measures the control strategies.
- `drift`: what each lossy option (compute skipping, KV presses) loses against exact decoding,
  beside NVIDIA kvpress (`--kvpress`).
- `serving`: `argen serve` under concurrent clients (`--case`).
"""

from __future__ import annotations

import sys
from importlib import import_module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tools = {
        "compare": "benchmarks.harness.compare",
        "drift": "benchmarks.harness.drift_bench",
        "serving": "benchmarks.harness.serving",
    }
    if not argv or argv[0] not in tools:
        print(__doc__, file=sys.stderr if argv[:1] not in (["-h"], ["--help"]) else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    # Import the chosen tool only: each pulls its own heavy dependencies (torch, matplotlib, httpx).
    return import_module(tools[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
