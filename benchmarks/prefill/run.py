"""Where a prefill should run: the fused C forward (argen's block kernels, every row through the
outer-product tiles) against torch's path (the weights dequantized per call, then a GEMM), by prompt
length, with llama.cpp's prefill of the same GGUF beside them. Decides `models/fused.py`'s
MAX_NEW_TOKENS: feeds up to it take the fused forward.

    python benchmarks/prefill/run.py --threads 1 > benchmarks/prefill/report.md

Each length: one prompt's prefill into an empty cache, its last token's logits, the three systems
interleaved, best of 5 (argen's two paths in one process, forced by setting the routing limit).
One thread: timed by the calling thread's CPU time (llama.cpp computes on the calling thread at
n_threads=1), which other work on a shared machine barely moves; several: the wall clock.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import argen
import argen.models.llama as llama
from argen.models import kernels, sources
from benchmarks.harness.provenance import describe, provenance, script_args

LENGTHS = (16, 32, 64, 128, 192, 256, 384, 512)
REPS = 5


def argen_prefill(gen, ids: list[int], fused: bool, clock) -> float:
    """Seconds of one prefill of `ids`, on the fused forward (whole) or torch's path."""
    saved = llama.FUSED_MAX_NEW_TOKENS, llama.FUSED_MAX_ROWS
    limit = 10**6 if fused else 0
    llama.FUSED_MAX_NEW_TOKENS, llama.FUSED_MAX_ROWS = limit, max(limit, 1)
    try:
        rt = gen.runtime
        cache = rt.new_cache(1, len(ids) + 1)
        start = clock()
        rt.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache, num_logits=1)
        seconds = clock() - start
        cache.free()
        return seconds
    finally:
        llama.FUSED_MAX_NEW_TOKENS, llama.FUSED_MAX_ROWS = saved


def llama_prefill(llm, ids: list[int], clock) -> float:
    llm.reset()
    start = clock()
    llm.eval(ids)
    return clock() - start


def main() -> None:
    args, state = script_args(__doc__, threads=1)
    import llama_cpp  # the peer (an optional dependency: `pip install llama-cpp-python`)

    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    gen = argen.load("default")
    text = "Summarize the following notes about the history of Rome and its provinces. " * 60
    ids_all = gen.encode(text, chat=False)
    gguf = sources.gguf_file(sources.parse_source("default"))
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=1024,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=512,
        verbose=False,
    )
    rows = []
    for n in LENGTHS:
        ids = ids_all[:n]
        argen_prefill(gen, ids, True, clock), argen_prefill(gen, ids, False, clock), llama_prefill(llm, ids, clock)
        times: dict[str, list[float]] = {"fused": [], "torch": [], "llama.cpp": []}
        for _ in range(REPS):
            times["fused"].append(argen_prefill(gen, ids, True, clock))
            times["torch"].append(argen_prefill(gen, ids, False, clock))
            times["llama.cpp"].append(llama_prefill(llm, ids, clock))
        rows.append((n, {k: min(v) for k, v in times.items()}))
        print(f"{n}: " + ", ".join(f"{k} {min(v) * 1e3:.1f} ms" for k, v in times.items()), file=sys.stderr)
    llm.close()

    machine = provenance(state)
    print(
        f"# Prefill: argen's fused forward against its torch path and llama.cpp, by prompt length "
        f"(default model, {args.threads} thread{'s' * (args.threads > 1)})\n"
    )
    print(f"```\npython benchmarks/prefill/run.py --threads {args.threads} > benchmarks/prefill/report.md\n```\n")
    print(describe(machine) + "\n")
    print(
        f"CPU: {kernels.describe_cpu()}; torch {machine['torch']}, llama-cpp-python {llama_cpp.__version__}. "
        f"Routing now: feeds up to {llama.FUSED_MAX_NEW_TOKENS} tokens take the fused forward.\n"
    )
    print(f"Best of {REPS}, interleaved; ms of one prefill into an empty cache with the last token's logits.\n")
    print("| tokens | fused ms | torch ms | llama.cpp ms | torch ÷ fused | llama.cpp ÷ fused | fused tok/s |")
    print("| --: | --: | --: | --: | --: | --: | --: |")
    for n, t in rows:
        print(
            f"| {n} | {t['fused'] * 1e3:.1f} | {t['torch'] * 1e3:.1f} | {t['llama.cpp'] * 1e3:.1f} | "
            f"{t['torch'] / t['fused']:.2f} | {t['llama.cpp'] / t['fused']:.2f} | {n / t['fused']:.0f} |"
        )


if __name__ == "__main__":
    main()
