"""Kernel builds side by side: the C kernels of several commits (and -D flags), timed interleaved in
one process on the default model's weights, so the machine's noise hits every build alike.

    python benchmarks/kernel_ab/run.py --variant 92b6e4f --variant 7b4d7b0 --threads 2 --rows 1,2,4,8 --out benchmarks/kernel_ab/report.md

Each variant is `REF` or `REF:FLAGS` (a git commit, and compiler flags such as `-DPF_AHEAD=0`); its
`src/argen/models/kernels/` sources are compiled for this CPU's build (or $ARGEN_KERNELS) and loaded
beside the others. The weights are packed once, by the working tree's loader, so every variant must
read the same layout (the packing code unchanged between them). Timed, round-robin over the
variants, 15 rounds: the model's 121 matmuls (`argen_qmatmul`) for a few activation rows (best of
the rounds, GFLOP/s), and 128 one-row decode steps after a 252-token prefill (median ms) at 1 and
the given threads.
"""

from __future__ import annotations

import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import argen
from argen.models import kernels
from benchmarks.harness.provenance import describe, provenance, report_to, rerun_command, script_args
from benchmarks.kernel_peak.run import matmul_calls

KERNEL_DIR = "src/argen/models/kernels"


def build(ref: str, flags: list[str], isa: str, out: Path) -> kernels.KernelLibrary:
    """The kernels of commit `ref` compiled with `flags` for `isa` (as argen compiles its own), loaded."""
    src = out / "src"
    src.mkdir(parents=True)
    for f in kernels.SOURCES + kernels.HEADERS:
        text = subprocess.run(
            ["git", "show", f"{ref}:{KERNEL_DIR}/{f.name}"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        (src / f.name).write_text(text)
    cc = kernels._compiler()
    if cc is None:
        raise SystemExit("no C compiler found (cc, gcc, clang or $CC)")
    so = kernels.build(isa, cc, out, [src / f.name for f in kernels.SOURCES], tuple(flags))
    return kernels.KernelLibrary(ctypes.CDLL(str(so)), isa, so)


def main() -> None:
    def add(p):
        p.add_argument("--variant", action="append", required=True, help="REF or REF:FLAGS (repeat)")
        p.add_argument("--rows", default="1,2,4,8", help="activation rows of the matmuls (default: %(default)s)")
        p.add_argument("--out", help="write the report to this file, not stdout")

    args, state = script_args(__doc__, threads=2, add=add)
    with report_to(args.out):
        report(args, state)


def report(args, state) -> None:
    gen = argen.load("default", quant="exact")
    rt = gen.runtime
    with tempfile.TemporaryDirectory() as tmp:
        libs = {}
        for i, spec in enumerate(args.variant):
            ref, _, flags = spec.partition(":")
            libs[spec] = build(ref, flags.split(), rt.fused.lib.isa, Path(tmp) / str(i))

        def use(lib) -> None:
            rt.fused.lib = rt.lm_head.lib = lib

        rows = [int(r) for r in args.rows.split(",")]
        counts = sorted({1, args.threads})
        ids = gen.encode(
            "Summarize the following notes about the history of Rome and its provinces. " * 40, chat=False
        )[:252]
        mm: dict = {}
        steps: dict = {}
        for threads in counts:
            torch.set_num_threads(threads)
            clock = time.thread_time if threads == 1 else time.perf_counter
            for r in rows:
                runs = {}
                for name, lib in libs.items():
                    use(lib)
                    runs[name], flops = matmul_calls(rt, r, threads)
                times: dict = {name: [] for name in libs}
                for _ in range(15):
                    for name, lib in libs.items():
                        use(lib)
                        start = clock()
                        runs[name]()
                        times[name].append(clock() - start)
                for name, t in times.items():
                    mm[name, threads, r] = flops / min(t) / 1e9
            caches = {}
            for name, lib in libs.items():
                use(lib)
                caches[name] = rt.new_cache(1, len(ids) + 130)
                rt.forward(torch.tensor([ids]), torch.arange(len(ids))[None], caches[name], num_logits=1)
            step_times: dict = {name: [] for name in libs}
            for s in range(128):
                for name, lib in libs.items():
                    use(lib)
                    start = time.perf_counter()
                    rt.forward(torch.tensor([[ids[s]]]), torch.tensor([[len(ids) + s]]), caches[name], num_logits=1)
                    step_times[name].append(time.perf_counter() - start)
            for name, cache in caches.items():
                cache.free()
                steps[name, threads] = statistics.median(step_times[name]) * 1e3
    machine = provenance(state)
    print("# Kernel builds side by side (default model, interleaved in one process)\n")
    print(f"```\n{rerun_command('benchmarks/kernel_ab/run.py')}\n```\n")
    print(describe(machine) + "\n")
    print(f"CPU: {kernels.describe_cpu()}; compiled for {rt.fused.lib.isa}; torch {machine['torch']}.\n")
    first = args.variant[0]
    print(
        f"Matmuls: GFLOP/s, best of 15 rounds. Decode step: median ms of 128 one-row steps. (×: speed-up "
        f"against `{first}`.)\n"
    )
    head = ["variant", *[f"{r} rows, {t} thr" for t in counts for r in rows], *[f"step {t} thr ms" for t in counts]]
    print("| " + " | ".join(head) + " |")
    print("| :-- |" + " --: |" * (len(head) - 1))
    for name in libs:
        cells = [f"{mm[name, t, r]:.1f} ({mm[name, t, r] / mm[first, t, r]:.2f}×)" for t in counts for r in rows]
        cells += [f"{steps[name, t]:.2f} ({steps[first, t] / steps[name, t]:.2f}×)" for t in counts]
        print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
