"""The CPU fast path's prefill speed and forward-pass cost, beside fp32 and the peers, on the default model.

    python benchmarks/fast_path/run.py --threads 2 > benchmarks/fast_path/report.md

Prefill: a prompt of 32 to 2,000 tokens run once from an empty cache (argen: one forward pass,
last logits only; llama.cpp: `Llama.eval`, n_batch 512; HF: the model's forward, the logits of the
last position kept), median of 3 runs, every system timed in turn for each length. Pass cost: one
pass of 1-16 tokens with every token's logits (what a speculative verifier pays) after a 252-token
prefill, median of 15. Weight bytes are what each system holds resident.
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import argen
from argen.models import kernels, sources
from benchmarks.harness.passes import verify_pass
from benchmarks.harness.provenance import describe, provenance, script_args

LENGTHS = (32, 128, 512, 1000, 2000)
ROWS = (1, 2, 4, 8, 16)


def median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def argen_prefill(gen, ids: list[int]) -> None:
    cache = gen.runtime.new_cache(1, len(ids))
    gen.runtime.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache, num_logits=1)
    cache.free()


def hf_prefill(gen, ids: list[int]) -> None:
    with torch.inference_mode():
        gen.model.hf_model(torch.tensor([ids]), logits_to_keep=1)


def llama_cpp_prefill(llm, ids: list[int]) -> None:
    llm.reset()
    llm.eval(ids)


def pass_ms(gen, ids: list[int], rows: int, reps: int = 15) -> float:
    with verify_pass(gen.runtime, ids, rows) as one:
        one()  # warm
        return 1000 * median_seconds(one, reps)


def main() -> None:
    args, state = script_args(
        __doc__,
        threads=2,
        add=lambda parser: parser.add_argument(
            "--no-llama-cpp", action="store_true", help="leave the llama.cpp peer out"
        ),
    )
    systems = {"argen exact": argen.load("default", quant="exact"), "argen fp32": argen.load("default", quant="none")}
    fast = systems["argen exact"]
    llm = None
    if not args.no_llama_cpp:
        import llama_cpp

        llm = llama_cpp.Llama(
            model_path=str(sources.default_gguf_path()),
            n_ctx=4096,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            n_batch=512,
            verbose=False,
        )
    text = "Summarize the following notes about the history of Rome and its provinces. " * 200
    all_ids = fast.encode(text, chat=False)
    prefill: dict[int, dict[str, float]] = {}
    for n in LENGTHS:
        ids = all_ids[:n]
        runs = {name: partial(argen_prefill, g, ids) for name, g in systems.items()}
        if llm is not None:
            runs["llama.cpp"] = partial(llama_cpp_prefill, llm, ids)
        runs["HF (fp32)"] = partial(hf_prefill, fast, ids)
        for fn in runs.values():
            fn()  # warm
        prefill[n] = {name: n / median_seconds(fn, 3) for name, fn in runs.items()}
    ids = all_ids[:252]
    cost = {name: {rows: pass_ms(g, ids, rows) for rows in ROWS} for name, g in systems.items()}

    machine = provenance(state)
    print(f"# CPU fast path: prefill and pass cost (default model, {args.threads} threads)\n")
    print(f"```\npython benchmarks/fast_path/run.py --threads {args.threads} > benchmarks/fast_path/report.md\n```\n")
    print(describe(machine) + "\n")
    print(
        f"torch {machine['torch']}, transformers {machine['transformers']}, python {machine['python']}; "
        f"CPU: {machine['cpu_model']}; argen kernels: {kernels.pick_isa()}"
        + (f"; llama-cpp-python {llama_cpp.__version__}" if llm is not None else "")
        + ".\n"
    )
    print(
        "Resident weight bytes: "
        + ", ".join(f"{name} {g.runtime.weight_bytes / 1e6:.1f} MB" for name, g in systems.items())
        + (f", llama.cpp {llama_cpp.llama_model_size(llm.model) / 1e6:.1f} MB" if llm is not None else "")
        + f"; the GGUF file {sources.default_gguf_path().stat().st_size / 1e6:.1f} MB.\n"
    )
    names = list(prefill[LENGTHS[0]])
    print("## Prefill, tokens/s (median of 3)\n")
    print("| prompt tokens | " + " | ".join(names) + " | argen exact ÷ llama.cpp |")
    print("| --: |" + " --: |" * (len(names) + 1))
    for n, row in prefill.items():
        ratio = f"{row['argen exact'] / row['llama.cpp']:.2f}" if "llama.cpp" in row else "—"
        print(f"| {n} | " + " | ".join(f"{row[k]:.0f}" for k in names) + f" | {ratio} |")
    print("\n## One forward pass with every fed token's logits, ms (after a 252-token prefill, median of 15)\n")
    print("| tokens fed | " + " | ".join(f"{k} ms | {k} ÷ its 1-token pass" for k in cost) + " |")
    print("| --: |" + " --: | --: |" * len(cost))
    for rows in ROWS:
        print(f"| {rows} | " + " | ".join(f"{c[rows]:.1f} | {c[rows] / c[1]:.2f}" for c in cost.values()) + " |")


if __name__ == "__main__":
    main()
