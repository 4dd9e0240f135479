"""The exact path's matmul kernels against this machine's FMA peak, and a forward pass's cost by rows.

    python benchmarks/kernel_peak/run.py --threads 2 > benchmarks/kernel_peak/report.md

FMA peak: `argen_fma_peak` (cpu_kernels.c), 12 independent fma chains per thread on vectors of the
kernels' width, GFLOP/s per thread from each thread's CPU time (so other processes on the cores do
not lower it), best of 5. Kernels: the default model's 120 body matmuls (30 layers x qkv, o,
gate/up, down: Q4_1) and its vocabulary head (Q8_0) through `argen_qmatmul` for 1-32 activation
rows, 2 flops per multiply-add, best of 15; 1 thread timed by its CPU time, several by the wall
clock. Pass cost: one fused forward pass with every fed token's logits (what a speculative verifier
pays) after a 252-token prefill, best of 15 (wall clock). Best-of rather than median because other
work on a shared machine only ever adds time.
"""

from __future__ import annotations

import argparse
import ctypes
import time

import torch

import argen
from argen.bench.provenance import describe, git_state, provenance, require_clean
from argen.models import kernels

ROWS = (1, 2, 4, 8, 16, 32)


def fma_peak(lib, threads: int, iters: int = 20_000_000) -> float:
    """GFLOP/s of `threads` threads together, each counted over its own CPU time, best of 5."""
    best = 0.0
    for _ in range(5):
        seconds = (ctypes.c_double * (threads + 1))()
        flops = lib.lib.argen_fma_peak(threads, iters, seconds)
        best = max(best, sum(flops / threads / seconds[t] for t in range(threads)) / 1e9)
    return best


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
    args = [(ctypes.byref(m.struct), threads, xs[m.in_features].data_ptr(), rows, m.in_features,
             ys[m.out_features].data_ptr(), m.out_features) for m in mms]  # fmt: skip
    flops = 2 * rows * sum(m.in_features * m.out_features for m in mms)

    def run() -> None:
        for a in args:
            lib.lib.argen_qmatmul(*a)

    return run, flops


def pass_seconds(gen, ids: list[int], rows: int, reps: int = 15) -> float:
    rt = gen.runtime
    cache = rt.new_cache(1, len(ids) + rows)
    rt.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache, num_logits=0)
    n = len(ids)

    def one() -> None:
        rt.forward(torch.tensor([ids[:rows]]), torch.arange(n, n + rows)[None], cache, num_logits=rows)
        cache.truncate(n)

    seconds = best_seconds(one, reps, time.perf_counter)
    cache.free()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allow-dirty", action="store_true", help="run from a tree with uncommitted changes (recorded)")
    args = parser.parse_args()
    state = git_state()
    require_clean(state, args.allow_dirty)
    torch.set_num_threads(args.threads)
    gen = argen.load("default", quant="exact")
    rt = gen.runtime
    lib = rt.fused.lib
    peaks = {t: fma_peak(lib, t) for t in sorted({1, args.threads})}
    kernel = {}
    for threads in sorted({1, args.threads}):
        clock = time.thread_time if threads == 1 else time.perf_counter
        for rows in ROWS:
            run, flops = matmul_calls(rt, rows, threads)
            kernel[threads, rows] = flops / best_seconds(run, 15, clock) / 1e9
    ids = gen.encode("Summarize the following notes about the history of Rome and its provinces. " * 40,
                     chat=False)[:252]  # fmt: skip
    cost = {rows: pass_seconds(gen, ids, rows) for rows in ROWS}
    _, one_row_flops = matmul_calls(rt, 1, 1)

    machine = provenance(state)
    t = args.threads
    print(f"# Matmul kernels against the FMA peak, and pass cost by rows (default model, {t} threads)\n")
    print(f"```\npython benchmarks/kernel_peak/run.py --threads {t} > benchmarks/kernel_peak/report.md\n```\n")
    print(describe(machine) + "\n")
    print(f"CPU: {kernels.describe_cpu()}; vector width {lib.width} floats; torch {machine['torch']}, "
          f"python {machine['python']}.\n")  # fmt: skip
    print("## FMA peak (`argen_fma_peak`, GFLOP/s over each thread's CPU time, best of 5)\n")
    print("| threads | GFLOP/s | per thread |\n| --: | --: | --: |")
    for threads, peak in peaks.items():
        print(f"| {threads} | {peak:.1f} | {peak / threads:.1f} |")
    print(f"\n## Exact path's matmuls: GFLOP/s by activation rows (body 120 x Q4_1 + head Q8_0, "
          f"{one_row_flops / 2e6:.1f} M multiply-adds per row)\n")  # fmt: skip
    print("| rows | " + " | ".join(f"{th} thread{'s' * (th > 1)} GFLOP/s | % of peak" for th in peaks) + " |")
    print("| --: |" + " --: | --: |" * len(peaks))
    for rows in ROWS:
        cells = [f"{kernel[th, rows]:.1f} | {100 * kernel[th, rows] / peaks[th]:.0f}%" for th in peaks]
        print(f"| {rows} | " + " | ".join(cells) + " |")
    print(f"\n## One forward pass with every fed token's logits ({t} threads, after a 252-token prefill, best of 15)\n")
    print("| rows | ms | ÷ the 1-row pass | matmuls alone at the FMA peak, ms | at the kernels' rate, ms |")
    print("| --: | --: | --: | --: | --: |")
    for rows in ROWS:
        ideal = one_row_flops * rows / (peaks[t] * 1e9) * 1e3
        at_rate = one_row_flops * rows / (kernel[t, rows] * 1e9) * 1e3
        print(f"| {rows} | {cost[rows] * 1e3:.1f} | {cost[rows] / cost[1]:.2f} | {ideal:.1f} | {at_rate:.1f} |")


if __name__ == "__main__":
    main()
