"""The exact path's matmul kernels against this machine's FMA peak, a forward pass's cost by rows,
and a one-row decode step against llama.cpp on the same GGUF (the a8 path beside the exact one).

    python benchmarks/kernel_peak/run.py --threads 2 > benchmarks/kernel_peak/report.md
    python benchmarks/kernel_peak/run.py --threads 2 --out benchmarks/kernel_peak/avx512/report.md

FMA peak: `argen_fma_peak` (cpu_kernels.c), 12 independent fma chains per thread on vectors of the
kernels' width, GFLOP/s per thread from each thread's CPU time (so other processes on the cores do
not lower it), best of 5. Kernels: the default model's 120 body matmuls (30 layers x qkv, o,
gate/up, down: Q4_1) and its vocabulary head (Q8_0) through `argen_qmatmul` for 1-32 activation
rows, 2 flops per multiply-add, best of 9. Pass cost: one fused forward pass with every fed token's
logits (what a speculative verifier pays) after a 252-token prefill, best of 9. Decode step: one
token fed, its logits, argen (exact, exact-a8) and llama.cpp (llama-cpp-python) interleaved step by
step, median of 40 each. At one thread everything is timed by the calling thread's CPU time
(llama.cpp computes on the calling thread at n_threads=1), which other work on a shared machine
barely moves; at several threads by the wall clock, best-of for the kernels and passes (other work
only ever adds time), median for the interleaved decode steps, whose ratio is the figure to read.
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import argen
from argen.models import kernels, sources
from benchmarks.harness.passes import verify_pass
from benchmarks.harness.provenance import describe, provenance, report_to, rerun_command, script_args
from benchmarks.harness.systems import LlamaCppSystem

ROWS = (1, 2, 4, 8, 16, 32)
OUT_HELP = "write the report to this file (e.g. benchmarks/kernel_peak/avx512/report.md), not stdout"
PATHS = ("exact", "exact-a8")


def fma_peak(lib, threads: int, iters: int = 20_000_000) -> float:
    """GFLOP/s of `threads` threads together, each counted over its own CPU time, best of 5."""
    best = 0.0
    for _ in range(5):
        seconds = (ctypes.c_double * (threads + 1))()
        flops = lib.lib.argen_fma_peak(threads, iters, seconds)
        best = max(best, sum(flops / threads / seconds[t] for t in range(threads)) / 1e9)
    return best


def clock_for(threads: int):
    """The calling thread's CPU time at one thread (robust on a busy machine), else the wall clock."""
    return time.thread_time if threads == 1 else time.perf_counter


def best_seconds(fn, reps: int, clock) -> float:
    fn()  # warm
    best = float("inf")
    for _ in range(reps):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def matmul_calls(runtime, rows: int, threads: int):
    """Every matmul of one pass over `rows` rows (body and head), as one function."""
    lib = runtime.fused.lib
    mms = [m for layer in runtime.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    mms.append(runtime.lm_head)
    xs = {m.in_features: torch.randn(rows, m.in_features) for m in mms}
    ys = {m.out_features: torch.empty(rows, m.out_features) for m in mms}
    args = [
        (
            ctypes.byref(m.struct),
            threads,
            xs[m.in_features].data_ptr(),
            rows,
            m.in_features,
            ys[m.out_features].data_ptr(),
            m.out_features,
        )
        for m in mms
    ]
    flops = 2 * rows * sum(m.in_features * m.out_features for m in mms)

    def run() -> None:
        assert xs and ys  # the buffers' pointers are in args: the closure keeps the tensors alive
        for a in args:
            lib.lib.argen_qmatmul(*a)

    return run, flops


def pass_seconds(gen, ids: list[int], rows: int, threads: int, reps: int = 9) -> float:
    torch.set_num_threads(threads)
    with verify_pass(gen.runtime, ids, rows) as one:
        return best_seconds(one, reps, clock_for(threads))


def decode_steps(gens: dict, llm, ids: list[int], threads: int, steps: int = 40) -> dict[str, float]:
    """Median seconds of a one-token step (its logits) after the prompt, each system in turn per step."""
    torch.set_num_threads(threads)
    clock, n = clock_for(threads), len(ids)
    caches = {}
    for name, gen in gens.items():
        rt = gen.runtime
        caches[name] = rt.new_cache(1, n + steps + 1)
        rt.forward(torch.tensor([ids]), torch.arange(n)[None], caches[name], num_logits=1)
    llm.reset()
    llm.eval(ids)
    times: dict[str, list[float]] = {name: [] for name in [*gens, "llama.cpp"]}
    for step in range(steps):
        token = ids[step % n]
        for name, gen in gens.items():
            start = clock()
            gen.runtime.forward(torch.tensor([[token]]), torch.tensor([[n + step]]), caches[name], num_logits=1)
            times[name].append(clock() - start)
        start = clock()
        llm.eval([token])
        times["llama.cpp"].append(clock() - start)
    for cache in caches.values():
        cache.free()
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    args, state = script_args(__doc__, threads=2, add=lambda p: p.add_argument("--out", help=OUT_HELP))
    with report_to(args.out):
        report(args, state)


def report(args, state) -> None:
    import llama_cpp  # the peer (an optional dependency: `pip install llama-cpp-python`)

    gens = {path: argen.load("default", quant=path) for path in PATHS}
    lib = gens["exact"].runtime.fused.lib
    counts = sorted({1, args.threads})
    peaks = {t: fma_peak(lib, t) for t in counts}
    kernel = {}
    for path, gen in gens.items():
        for threads in counts:
            for rows in ROWS:
                run, flops = matmul_calls(gen.runtime, rows, threads)
                kernel[path, threads, rows] = flops / best_seconds(run, 9, clock_for(threads)) / 1e9
    ids = gens["exact"].encode(
        "Summarize the following notes about the history of Rome and its provinces. " * 40, chat=False
    )[:252]
    cost = {
        (path, t, rows): pass_seconds(gen, ids, rows, t) for path, gen in gens.items() for t in counts for rows in ROWS
    }
    gguf = sources.gguf_file(sources.parse_source("default"))
    prompt = gens["exact"].encode(
        "Write a Python function that reads a CSV file and returns its rows. " * 3, chat=False
    )
    steps = {}
    for t in counts:
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_threads=t, n_threads_batch=t, verbose=False)
        steps[t] = decode_steps(gens, llm, prompt, t)
        llm.close()
    _, one_row_flops = matmul_calls(gens["exact"].runtime, 1, 1)

    machine = provenance(state)
    t = args.threads
    print(
        f"# Matmul kernels against the FMA peak, pass cost by rows, decode step against llama.cpp "
        f"(default model, 1 and {t} threads)\n"
    )
    target = "" if args.out else " > benchmarks/kernel_peak/report.md"
    print(f"```\n{rerun_command('benchmarks/kernel_peak/run.py')}{target}\n```\n")
    print(describe(machine) + "\n")
    print(
        f"CPU: {kernels.describe_cpu()}; vector width {lib.width} floats; torch {machine['torch']}, "
        f"python {machine['python']}, llama-cpp-python {llama_cpp.__version__} (built for "
        f"{LlamaCppSystem.build_of(llama_cpp)}).\n"
    )
    print(
        "One thread: the calling thread's CPU time; several: the wall clock (noisy where the cores are "
        "shared; read the ratios).\n"
    )
    print("## FMA peak (`argen_fma_peak`, GFLOP/s over each thread's CPU time, best of 5)\n")
    print("| threads | GFLOP/s | per thread |\n| --: | --: | --: |")
    for threads, peak in peaks.items():
        print(f"| {threads} | {peak:.1f} | {peak / threads:.1f} |")
    print(
        f"\n## Matmuls of one pass: GFLOP/s by activation rows (body 120 x Q4_1 + head Q8_0, "
        f"{one_row_flops / 2e6:.1f} M multiply-adds per row; a8: integer multiply-adds, counted the same)\n"
    )
    head = " | ".join(f"{p} {th} thr GFLOP/s | % of peak" for p in PATHS for th in counts)
    print(f"| rows | {head} |\n| --: |" + " --: | --: |" * len(PATHS) * len(counts))
    for rows in ROWS:
        cells = [
            f"{kernel[p, th, rows]:.1f} | {100 * kernel[p, th, rows] / peaks[th]:.0f}%" for p in PATHS for th in counts
        ]
        print(f"| {rows} | " + " | ".join(cells) + " |")
    print("\n## One forward pass with every fed token's logits, ms (after a 252-token prefill, best of 9)\n")
    print(
        "Lowest ratio at the peak: the pass's matmuls at the FMA peak over the measured one-row exact pass, "
        "rows x F / (peak x t1): no fp32 kernel can make the ratio lower without making one row slower.\n"
    )
    for th in counts:
        print(f"### {th} thread{'s' * (th > 1)}\n")
        print(
            "| rows | exact ms | ÷ its 1-row pass | exact-a8 ms | ÷ its 1-row pass | lowest exact ratio at the peak |"
        )
        print("| --: | --: | --: | --: | --: | --: |")
        for rows in ROWS:
            ex, a8 = cost["exact", th, rows], cost["exact-a8", th, rows]
            floor = one_row_flops * rows / (peaks[th] * 1e9) / cost["exact", th, 1]
            print(
                f"| {rows} | {ex * 1e3:.1f} | {ex / cost['exact', th, 1]:.2f} | {a8 * 1e3:.1f} | "
                f"{a8 / cost['exact-a8', th, 1]:.2f} | {floor:.2f} |"
            )
        print()
    print("## One-row decode step against llama.cpp (same GGUF, interleaved, median of 40 steps)\n")
    print("| threads | exact ms | exact-a8 ms | llama.cpp ms | llama.cpp ÷ exact | llama.cpp ÷ exact-a8 |")
    print("| --: | --: | --: | --: | --: | --: |")
    for th, s in steps.items():
        print(
            f"| {th} | {s['exact'] * 1e3:.2f} | {s['exact-a8'] * 1e3:.2f} | {s['llama.cpp'] * 1e3:.2f} | "
            f"{s['llama.cpp'] / s['exact']:.2f} | {s['llama.cpp'] / s['exact-a8']:.2f} |"
        )


if __name__ == "__main__":
    main()
