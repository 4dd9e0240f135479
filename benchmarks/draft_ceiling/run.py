"""How fast could exact speculative decoding be on this machine? A ceiling, from the outputs of the
committed Spec-Bench run (`benchmarks/speculative/results.json`, plain greedy, 120 questions).

    python benchmarks/draft_ceiling/run.py

Each question's plain greedy output is replayed step by step against three drafters, with the
draft size at every step chosen *knowing the future*: a step drafts exactly the tokens the verifier
will accept, and only when that beats a plain step under the measured pass costs. No real
policy can do better than this with the same drafter (it wastes no draft tokens and never drafts in
vain); the ceiling also leaves out prefill and drafting time, which real runs pay.

Drafters:
- `prompt-lookup`: the draft argen's prompt-lookup proposes (`find_match`, n-grams 1..3, up to 10).
- `trigram chain`: the longest prefix of the true continuation (up to 16) in which every token
  follows a two-token context seen earlier in the sequence. Every draft token of `ngram` (min_n 3)
  satisfies this, so it bounds `ngram`, whatever its tree.
- `copy anywhere`: the longest prefix of the true continuation (up to 16) that occurs as one
  contiguous span anywhere earlier in the sequence: it bounds every drafter that copies one span
  (prompt lookup with any match rule, retrieval of the context).

Pass costs are argen's own `CostModel` (the one adaptive drafting uses), the median of five
calibrations at one and at two threads, alternated. Writes `report.md` and `ceiling.png` here.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

import argen
from argen.bench.questions import find_questions_file, group_mt_bench, read_questions
from argen.strategies.speculative.adaptive import BUCKETS, CostModel
from argen.strategies.speculative.prompt_lookup import find_match

HERE = Path(__file__).parent
RESULTS = HERE.parent / "speculative" / "results.json"
CAP = 16  # the most draft tokens a step may verify (ngram's default tree holds 16 nodes)
TARGETS = {"summarization": 1.8, "rag": 1.5, "all": 1.25}


def measured_costs(runtime, threads: int) -> CostModel:
    """The median over five calibrations of each bucket (a single one swings by +-30% here)."""
    torch.set_num_threads(threads)
    models = [CostModel(runtime) for _ in range(5)]
    median = models[0]
    median.seconds = {b: statistics.median(m.seconds[b] for m in models) for b in BUCKETS}
    median.head_seconds = statistics.median(m.head_seconds for m in models)
    return median


def prompt_lookup_accepts(context: list[int], future: list[int], seen: set) -> int:
    draft, _ = find_match(context, 1, 3, 10)
    return next(
        (i for i, (d, f) in enumerate(zip(draft, future, strict=False)) if d != f), min(len(draft), len(future))
    )


def trigram_chain_accepts(context: list[int], future: list[int], seen: set[tuple[int, int, int]]) -> int:
    window = context[-2:]
    for i, token in enumerate(future[:CAP]):
        if (window[0], window[1], token) not in seen:
            return i
        window = [window[1], token]
    return min(len(future), CAP)


def copy_anywhere_accepts(context: list[int], future: list[int], seen: set) -> int:
    best = 0
    for length in range(1, min(CAP, len(future)) + 1):
        span = future[:length]
        if not any(context[j : j + length] == span for j in range(len(context) - length + 1)):
            break
        best = length
    return best


def replay(prompt: list[int], output: list[int], accepts: Callable, cost: CostModel) -> tuple[int, float]:
    """(target passes, seconds) for `output` with oracle-sized drafts under `cost`."""
    context, i, passes, seconds = list(prompt), 0, 0, 0.0
    seen: set[tuple[int, int, int]] = set()  # the sequence's trigrams so far (the trigram-chain drafter's)
    seen.update(zip(context, context[1:], context[2:], strict=False))
    plain_rate = 1 / cost(1)
    while i < len(output):
        # Drafts guess output[i:]; the verifier accepts a prefix and adds one token of its own, so
        # at most len(output) - i - 1 draft tokens can count.
        future = output[i : len(output) - 1]
        accepted = accepts(context, future, seen)
        k = accepted if (accepted + 1) / cost(1 + accepted, rows=accepted + 1) > plain_rate else 0
        step = output[i : i + k + 1]
        passes, seconds = passes + 1, seconds + cost(1 + k, rows=k + 1)
        for token in step:
            seen.add((context[-2], context[-1], token))
            context.append(token)
        i += len(step)
    return passes, seconds


DRAFTERS = {"prompt-lookup": prompt_lookup_accepts, "trigram chain": trigram_chain_accepts,
            "copy anywhere": copy_anywhere_accepts}  # fmt: skip


def measured_best(summary: dict) -> dict[str, tuple[str, float]]:
    """Per category: argen's best exact strategy ×plain in the committed run."""
    best: dict[str, tuple[str, float]] = {}
    for row in summary["rows"]:
        if (
            row["kind"] == "argen"
            and row["speedup_vs_plain"]
            and row["speedup_vs_plain"] > best.get(row["category"], ("", 0))[1]
        ):
            best[row["category"]] = (row["system"], row["speedup_vs_plain"])
    return best


def main() -> None:
    results = json.loads(RESULTS.read_text())
    gen = argen.load("default")
    questions = {q.question_id: q for q in group_mt_bench(read_questions(find_questions_file()))}
    runs = []
    for record in results["records"]:
        prompt = gen.encode(questions[record["question_id"]].prompt, chat=True)
        if len(prompt) != record["prompt_tokens"]:
            raise SystemExit(f"question {record['question_id']}: prompt re-encodes to {len(prompt)} tokens, "
                             f"the run had {record['prompt_tokens']}")  # fmt: skip
        runs.append((record["category"], prompt, record["systems"]["plain"]["token_ids"]))
    costs = {1: None, 2: None}
    for threads in costs:
        costs[threads] = measured_costs(gen.runtime, threads)
    categories = list(dict.fromkeys(c for c, _, _ in runs)) + ["all"]
    table: dict[tuple[str, str, int], tuple[float, float]] = {}  # (drafter, category, threads) -> (tok/pass, x plain)
    for name, accepts in DRAFTERS.items():
        for threads, cost in costs.items():
            totals: dict[str, list[float]] = {c: [0, 0, 0.0] for c in categories}
            for category, prompt, output in runs:
                passes, seconds = replay(prompt, output, accepts, cost)
                for c in (category, "all"):
                    t = totals[c]
                    t[0], t[1], t[2] = t[0] + len(output), t[1] + passes, t[2] + seconds
            for c, (tokens, passes, seconds) in totals.items():
                table[(name, c, threads)] = (tokens / passes, tokens * cost(1) / seconds)
    write_report(table, categories, costs, measured_best(results["summary"]))
    write_chart(table, categories, measured_best(results["summary"]))


def write_report(table, categories, costs, best) -> None:
    lines = ["# A ceiling for exact speculative decoding on this machine", "",
             "```", "python benchmarks/draft_ceiling/run.py", "```", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads available. How it is computed: the "
             "docstring of `run.py`. Inputs: the plain greedy outputs of `benchmarks/speculative/` "
             "(120 Spec-Bench questions, 128 tokens).", "",
             "## Measured pass cost (argen's `CostModel`, median of 5 calibrations), ms", "",
             "| threads | head per row | " + " | ".join(f"{b} tok" for b in BUCKETS[:8]) + " |",
             "| --: | --: | " + " | ".join("--:" for _ in BUCKETS[:8]) + " |"]  # fmt: skip
    for threads, cost in costs.items():
        lines.append(f"| {threads} | {cost.head_seconds * 1e3:.1f} | "
                     + " | ".join(f"{cost.seconds[b] * 1e3:.1f}" for b in BUCKETS[:8]) + " |")  # fmt: skip
    lines += ["", "## Ceiling: speed-up over plain decoding with drafts sized knowing the future", "",
              "tok/pass: tokens per target pass; ×plain: decode time of plain ÷ decode time of the replay. "
              "`measured` is argen's best strategy ×plain in `benchmarks/speculative/` (one thread, wall "
              "time with prefill).", "",
              "| category | target | measured | " + " | ".join(
                  f"{n} tok/pass | {n} ×plain 1 thr | {n} ×plain 2 thr" for n in DRAFTERS) + " |",
              "| --- | --: | --: | " + " | ".join("--: | --: | --:" for _ in DRAFTERS) + " |"]  # fmt: skip
    for c in categories:
        cells = [f"{table[(n, c, 1)][0]:.2f} | {table[(n, c, 1)][1]:.2f} | {table[(n, c, 2)][1]:.2f}" for n in DRAFTERS]
        target = f"{TARGETS[c]:.2f}" if c in TARGETS else ""
        system, speedup = best.get(c, ("", float("nan")))
        lines.append(f"| {c} | {target} | {speedup:.2f} ({system}) | " + " | ".join(cells) + " |")
    (HERE / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_chart(table, categories, best) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = [(n, t) for n in DRAFTERS for t in (1, 2)]
    width = 0.8 / len(bars)
    for j, (name, threads) in enumerate(bars):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(categories))]
        ax.bar(xs, [table[(name, c, threads)][1] for c in categories], width, label=f"{name}, {threads} thr")
    for i, c in enumerate(categories):
        if c in TARGETS:
            ax.hlines(TARGETS[c], i - 0.45, i + 0.45, colors="black", linestyles="dashed")
    measured = [(i, best[c][1]) for i, c in enumerate(categories) if c in best]
    ax.scatter([i for i, _ in measured], [v for _, v in measured], marker="x", color="black", zorder=3,
               label="measured best, 1 thr (with prefill)")  # fmt: skip
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(categories)), categories, fontsize=8)
    ax.set_ylabel("ceiling, × plain decoding")
    ax.set_title("Exact speculative decoding ceiling on this CPU (dashed: issue targets)")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(HERE / "ceiling.png", dpi=110)


if __name__ == "__main__":
    main()
