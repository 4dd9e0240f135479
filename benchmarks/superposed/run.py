"""Superposed decoding against k independent samples: wall time for k outputs, and their quality.

    python benchmarks/superposed/run.py --threads 1 > benchmarks/superposed/report.md

(run pinned to one core on a shared machine: `taskset -c 1` before it.)

For each Spec-Bench question (the first of each category, round-robin) and each k, the same prompt
gets k outputs two ways, interleaved in one process: `superposed` (n=k, its default n-gram weight,
one superposed row a step) and plain sampling with n=k (the prompt prefilled once, then k rows a
step; temperature 1, no top-p or top-k: no sort over the vocabulary a step, the cheapest sampler). Both generate exactly
`--max-new-tokens` tokens per output (ignore_eos), so the time compares the same work asked for.
Quality: the mean NLL of the output tokens under the model, teacher-forced on the prompt (lower:
likelier), and distinct-n (n = 1, 2): the distinct n-grams among all n-grams of the k outputs
together (higher: the k outputs differ more). One thread: timed by the calling thread's CPU time
(the whole decode runs on it), which other work on a shared machine barely moves.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import argen
from argen.bench.questions import read_questions, select_questions
from argen.models import kernels
from benchmarks.harness.provenance import describe, provenance, script_args

QUESTIONS = ROOT.parent / "shared" / "benchmarks" / "spec_bench" / "question.jsonl"


def add(parser) -> None:
    parser.add_argument("--questions", type=int, default=13, help="questions (default: %(default)s, one a category)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per output (default: %(default)s)")
    parser.add_argument("--ks", default="2,3,4", help="values of k (default: %(default)s)")


def nll(gen, prompt: list[int], output: list[int]) -> float:
    """Mean negative log-likelihood of `output` after `prompt`, teacher-forced, under the model."""
    ids = prompt + output
    cache = gen.runtime.new_cache(1, len(ids) + 1)
    logits, _ = gen.runtime.forward(
        torch.tensor([ids]), torch.arange(len(ids))[None], cache, num_logits=len(output) + 1
    )
    cache.free()
    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    return -logp[torch.arange(len(output)), torch.tensor(output)].mean().item()


def distinct(outputs: list[list[int]], n: int) -> float:
    grams = [tuple(o[i : i + n]) for o in outputs for i in range(len(o) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def main() -> None:
    args, state = script_args(__doc__, threads=1, add=add)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    gen = argen.load("default")
    questions = select_questions(read_questions(QUESTIONS), limit=1)[: args.questions]
    ks = [int(k) for k in args.ks.split(",")]
    common = dict(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    systems = {
        "superposed": lambda p, k: gen.generate(p, strategy="superposed", n=k, **common),
        "sampled": lambda p, k: gen.generate(p, n=k, temperature=1.0, seed=7, **common),
    }
    gen.generate("warm up", strategy="superposed", n=2, max_new_tokens=4)  # loads the n-gram tables
    gen.generate("warm up", n=2, max_new_tokens=4, temperature=1.0)
    rows: dict[tuple[int, str], dict[str, list[float]]] = {}
    ratios: dict[int, list[float]] = {k: [] for k in ks}
    decode_ratios: dict[int, list[float]] = {k: [] for k in ks}
    for q in questions:
        prompt = gen.encode(q.prompt)
        for k in ks:
            start = clock()  # the shared part: the prompt's prefill (and one step of one row)
            gen.generate(prompt, max_new_tokens=1)
            seconds = {"prefill": clock() - start}
            for name, run in systems.items():
                start = clock()
                results = run(prompt, k)
                seconds[name] = clock() - start
                outs = [r.token_ids for r in results]
                row = rows.setdefault((k, name), {"s": [], "nll": [], "d1": [], "d2": []})
                row["s"].append(seconds[name])
                row["nll"].append(statistics.mean(nll(gen, prompt, o) for o in outs))
                row["d1"].append(distinct(outs, 1))
                row["d2"].append(distinct(outs, 2))
            ratios[k].append(seconds["superposed"] / seconds["sampled"])
            pre = seconds["prefill"]
            decode_ratios[k].append((seconds["superposed"] - pre) / (seconds["sampled"] - pre))
            print(f"q{q.question_id} k={k}: {seconds}", file=sys.stderr)

    machine = provenance(state)
    threads = f"{args.threads} thread{'s' * (args.threads > 1)}"
    print(f"# Superposed decoding against k independent samples (default model, {threads})\n")
    print(f"```\npython benchmarks/superposed/run.py --threads {args.threads} > benchmarks/superposed/report.md\n```\n")
    print(describe(machine) + "\n")
    print(
        f"CPU: {kernels.describe_cpu()}; torch {machine['torch']}; model {gen.name} ({gen.runtime.capabilities.kernels}).\n"
    )
    print(
        f"{len(questions)} Spec-Bench questions (the first of each category), {args.max_new_tokens} tokens per output "
        "(ignore_eos), chat template. `superposed`: n=k, its defaults (k drafts = n, n-gram weight 0.1, "
        "order 3, tables of this machine's text). `sampled`: plain sampling, n=k (one prefill, k rows a step), "
        "temperature 1 (no top-p). Interleaved per question; seconds are "
        + ("the calling thread's CPU time" if args.threads == 1 else "wall-clock time")
        + " for the k outputs, prefill included.\n"
    )
    print(
        "| k | system | s per prompt (mean) | ÷ sampled, whole request | ÷ sampled, after the prefill "
        "| mean NLL | distinct-1 | distinct-2 |"
    )
    print("| --: | --- | --: | --: | --: | --: | --: | --: |")
    for k in ks:
        for name in systems:
            r = rows[(k, name)]
            whole = f"{statistics.median(ratios[k]):.2f}" if name == "superposed" else "1.00"
            after = f"{statistics.median(decode_ratios[k]):.2f}" if name == "superposed" else "1.00"
            print(
                f"| {k} | {name} | {statistics.mean(r['s']):.2f} | {whole} | {after} | "
                f"{statistics.mean(r['nll']):.3f} | {statistics.mean(r['d1']):.3f} | {statistics.mean(r['d2']):.3f} |"
            )
    print(
        "\nRatios are medians over the prompts of each prompt's ratio. *Whole request*: the k outputs' time, "
        "the prompt's prefill included (both prefill it once). *After the prefill*: both times less the "
        "time of the same prompt generating one token alone (its prefill and one row), measured beside them: "
        "what the decode steps cost.\n"
    )
    for k in ks:
        lo, hi = min(ratios[k]), max(ratios[k])
        dlo, dhi = min(decode_ratios[k]), max(decode_ratios[k])
        geo = math.exp(statistics.mean(math.log(x) for x in ratios[k]))
        print(
            f"- k = {k}: whole-request ratio {lo:.2f} to {hi:.2f} over the prompts (geometric mean {geo:.2f}); "
            f"after the prefill {dlo:.2f} to {dhi:.2f}."
        )


if __name__ == "__main__":
    main()
