"""Cost of one native-runtime forward pass (transformer body, no vocabulary projection) by the
number of tokens fed, with `Matmul`'s CPU kernels and with plain `F.linear`, on the default model.

    python benchmarks/pass_cost/run.py > benchmarks/pass_cost/report.md

Median of 15 passes after a 252-token prefill, one thread. Both runtimes load in this process and
are timed alternately per row count.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import argen
from argen.models import matmul
from argen.models.llama import LlamaRuntime
from benchmarks.harness.provenance import describe, provenance, script_args

ROWS = (1, 2, 4, 8, 16)


def body_ms(runtime, ids: list[int], rows: int, reps: int = 15) -> float:
    cache = runtime.new_cache(1, 2048)
    runtime.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache, num_logits=0)
    n, times = len(ids), []
    for _ in range(reps):
        start = time.perf_counter()
        runtime.forward(torch.tensor([ids[:rows]]), torch.arange(n, n + rows)[None], cache, num_logits=0)
        times.append(time.perf_counter() - start)
        cache.truncate(n)
    return 1000 * statistics.median(times)


def main() -> None:
    _, state = script_args(__doc__)
    torch.set_num_threads(1)
    gen = argen.load("default")
    hf = gen.model.hf_model
    with mock.patch.object(matmul, "_onednn_pack", lambda weight: None):  # every Matmul is F.linear
        plain_linear = LlamaRuntime(hf.config, hf.state_dict())
    ids = gen.encode("Summarize the following text about the history of Rome. " * 20)
    results = {rows: (body_ms(plain_linear, ids, rows), body_ms(gen.runtime, ids, rows)) for rows in ROWS}
    print("# Forward-pass cost by tokens fed (SmolLM2-135M, fp32, 1 thread, body only)\n")
    print("```\npython benchmarks/pass_cost/run.py > benchmarks/pass_cost/report.md\n```\n")
    machine = provenance(state)
    print(describe(machine) + "\n")
    print(
        f"Prompt {len(ids)} tokens, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"python {machine['python']}, {machine['cpu_model']}.\n"
    )
    print("| tokens fed | F.linear ms | Matmul ms | Matmul ÷ its 1-token pass |")
    print("| --: | --: | --: | --: |")
    for rows, (linear, ours) in results.items():
        print(f"| {rows} | {linear:.1f} | {ours:.1f} | {ours / results[1][1]:.2f} |")


if __name__ == "__main__":
    main()
