"""How fast could exact speculative decoding be on this machine? A ceiling, from the outputs of the
committed Spec-Bench run (`benchmarks/speculative/results.json`, plain greedy, 120 questions).

    python benchmarks/draft_ceiling/run.py [--allow-dirty]

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

- `draft-head`: the learned head (`argen distill-draft`, the cached default recipe), replayed by
  `head.py`: its full tree at every step (every level grown, 16 nodes kept), charged as if only the
  accepted path were verified and grown (one head pass a level), drafting only when that beats a
  plain step. Unlike the lookup drafters (whose drafting is free), its head passes are paid, at
  their measured cost. Skipped, with a note, when no head is cached.

Pass costs are argen's own `CostModel` (the one adaptive drafting uses), the median of five
calibrations at one and at two threads. Writes `report.md` and `ceiling.png` here (`--out DIR`: there).

Two more views, at one thread (`--view-threads 2`: at two), put the ceiling beside what argen measures:
- `argen's policy`: the real `prompt-lookup`, `ngram` and `draft-head` strategies replayed against
  the same outputs and costs, with an oracle verifier (`policy.py`, `head.py`): what their adaptive
  draft sizing gets out of the same drafts when it must guess how much of each draft will be accepted.
- `with prefill`: the bench's figure is wall time of the whole call, prefill included, and a long
  prompt's prefill is a fixed cost that no drafting shortens (a summarization prompt of 700 tokens
  takes about as long as 50 decoding steps). Prefill seconds are calibrated at a few prompt
  lengths and interpolated; the speed-up is then the geometric mean over questions of
  (prefill + plain decode) / (prefill + replayed decode), as the bench averages it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from head import features, head_pass_seconds, head_strategy, replay_head
from policy import STRATEGIES, replay_policy

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import argen
from argen.bench.questions import group_mt_bench, read_questions
from argen.models import kernels
from argen.recipes.draft_head import Recipe, head_path, load_draft_head
from argen.strategies.speculative.adaptive import BUCKETS, CostModel
from argen.strategies.speculative.prompt_lookup import find_match
from benchmarks.harness.provenance import describe, provenance, rerun_command, script_args
from benchmarks.harness.specbench import find_questions_file

HERE = Path(__file__).parent
RESULTS = HERE.parent / "speculative" / "results.json"
# The Spec-Bench run of draft-head on the fast path (its `measured` figures), when it has been made:
HEAD_RESULTS = "benchmarks/speculative-head"  # the default --measured
CAP = 16  # the most draft tokens a step may verify (ngram's default tree holds 16 nodes)
TARGETS = {"summarization": 1.8, "all": 1.5}  # issue 25's (and every category >= 1.0)
HEAD = "draft-head"
PREFILL_LENGTHS = (32, 128, 512, 1400)  # Spec-Bench prompts here are 39..1376 tokens


THREADS = {1: "one thread", 2: "two threads"}


def options(parser) -> None:
    parser.add_argument(
        "--view-threads",
        type=int,
        choices=(1, 2),
        default=1,
        help="threads of the policy and with-prefill view (default: %(default)s)",
    )
    parser.add_argument("--out", default=str(HERE), help="where report.md and ceiling.png go (default: here)")
    parser.add_argument(
        "--measured",
        default=HEAD_RESULTS,
        help="the fast-path Spec-Bench run (its results.json) beside the ceiling, with the draft head's "
        "measured rows: a run on this machine (default: %(default)s)",
    )


def measured_costs(runtime, threads: int) -> CostModel:
    """The median over five calibrations of each bucket (a single one swings by +-30% here)."""
    torch.set_num_threads(threads)
    models = [CostModel(runtime) for _ in range(5)]
    median = models[0]
    median.seconds = {b: statistics.median(m.seconds[b] for m in models) for b in BUCKETS}
    median.head_seconds = statistics.median(m.head_seconds for m in models)
    return median


def measured_prefill(runtime, threads: int) -> Callable[[int], float]:
    """Seconds to prefill a prompt of n tokens: the median of 3 at a few lengths, interpolated."""
    torch.set_num_threads(threads)
    seconds = []
    for n in PREFILL_LENGTHS:
        times = []
        for _ in range(3):
            cache = runtime.new_cache(1, n)
            start = time.perf_counter()
            runtime.forward(torch.arange(n)[None] % runtime.info.vocab_size, torch.arange(n)[None], cache, num_logits=0)
            times.append(time.perf_counter() - start)
        seconds.append(statistics.median(times))
    return lambda n: float(np.interp(n, PREFILL_LENGTHS, seconds))


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


DRAFTERS = {
    "prompt-lookup": prompt_lookup_accepts,
    "trigram chain": trigram_chain_accepts,
    "copy anywhere": copy_anywhere_accepts,
}
# The argen strategy each drafter bounds ("copy anywhere" bounds them all and is no strategy).
STRATEGY_OF = {"prompt-lookup": "prompt-lookup", "trigram chain": "ngram", HEAD: HEAD}


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
    args, state = script_args(__doc__, add=options)
    view, out = args.view_threads, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text())
    gen = argen.load("default")
    questions = {q.question_id: q for q in group_mt_bench(read_questions(find_questions_file()))}
    runs = []
    for record in results["records"]:
        prompt = gen.encode(questions[record["question_id"]].prompt, chat=True)
        if len(prompt) != record["prompt_tokens"]:
            raise SystemExit(
                f"question {record['question_id']}: prompt re-encodes to {len(prompt)} tokens, "
                f"the run had {record['prompt_tokens']}"
            )
        runs.append((record["category"], prompt, record["systems"]["plain"]["token_ids"]))
    costs = {threads: measured_costs(gen.runtime, threads) for threads in (1, 2)}
    prefill = measured_prefill(gen.runtime, view)
    categories = list(dict.fromkeys(c for c, _, _ in runs)) + ["all"]
    # (drafter, category, threads) -> summary of the future-knowing replay
    table: dict[tuple[str, str, int], tuple[float, float, float]] = {}
    for name, accepts in DRAFTERS.items():
        for threads, cost in costs.items():
            replayed = [replay(prompt, output, accepts, cost) for _, prompt, output in runs]
            for c, row in summarize(runs, replayed, cost, prefill if threads == view else None).items():
                table[(name, c, threads)] = row
    # (drafter, category) -> summary of the strategy it bounds, replayed with its own sizing (`view` threads)
    policy: dict[tuple[str, str], tuple[float, float, float]] = {}
    for name, strategy in STRATEGY_OF.items():
        if strategy not in STRATEGIES:
            continue  # draft-head's policy is replayed with its features (run_head)
        replayed = [replay_policy(STRATEGIES[strategy](), prompt, output, costs[view]) for _, prompt, output in runs]
        for c, row in summarize(runs, replayed, costs[view], prefill).items():
            policy[(name, c)] = row
    head_info = None
    # The default recipe's head only: a ceiling is the method's, and a head of another recipe (the tests'
    # small ones, when no default head is cached) would be read as what the method reaches.
    default_head = head_path(gen.runtime, Recipe())
    if default_head.is_file():
        head = load_draft_head(gen.runtime, default_head, "default")
        head_info = run_head(gen.runtime, head, runs, costs, prefill, table, policy, view)
    else:
        print(
            f"draft_ceiling: no draft-head rows (no head of the default recipe, {default_head.name}: "
            "run `argen distill-draft --model default`)"
        )
    best = measured_best(results["summary"])
    head_results = ROOT / args.measured / "results.json"
    head_summary = json.loads(head_results.read_text())["summary"] if head_results.is_file() else None
    if head_summary:
        for category, row in measured_best(head_summary).items():
            if row[1] > best.get(category, ("", 0))[1]:
                best[category] = row
    weights = f"the model's `quant={gen.quant}` path, argen kernels {kernels.pick_isa()}"
    write_report(
        table,
        policy,
        categories,
        costs,
        prefill,
        best,
        results["summary"],
        provenance(state) | {"weights": weights},
        head_info,
        head_summary,
        args.measured.rstrip("/"),
        view,
        out,
        rerun_command("benchmarks/draft_ceiling/run.py"),
    )
    write_chart(table, policy, categories, best, view, out)


def run_head(runtime, head, runs, costs, prefill, table, policy, view: int = 1) -> dict:
    """The learned head's rows: its oracle replay at each thread count and its policy at `view` threads
    (`head.py`), from the target's teacher-forced features of each question; and what a head pass
    costs, scoring the frequency-ranked subset and the whole vocabulary (FR-Spec)."""
    from argen.models.draft_head import DraftHeadRuntime

    torch.set_num_threads(1)
    feats = [features(runtime, prompt, output) for _, prompt, output in runs]
    everything = torch.cat(
        [
            head.vocab,
            torch.tensor(
                [t for t in range(runtime.info.vocab_size) if t not in set(head.vocab.tolist())], dtype=torch.long
            ),
        ]
    )
    full = DraftHeadRuntime(head.weights, everything, runtime, head.meta)
    width = head_strategy(head, False).width
    info = {
        "meta": head.meta,
        "subset": len(head.vocab),
        "vocab": runtime.info.vocab_size,
        "width": width,
        "seconds": {},
        "full_seconds": {},
        "head_passes": {},
    }
    for threads, cost in costs.items():
        torch.set_num_threads(threads)
        seconds = head_pass_seconds(head, width)
        info["seconds"][threads] = {rows: head_pass_seconds(head, rows) for rows in (1, width)}
        info["full_seconds"][threads] = {rows: head_pass_seconds(full, rows) for rows in (1, width)}
        replayed = [
            replay_head(head_strategy(head, oracle=True), prompt, output, f, cost, seconds, oracle=True)
            for (_, prompt, output), f in zip(runs, feats, strict=True)
        ]
        rows = summarize(runs, [(p, s) for p, s, _ in replayed], cost, prefill if threads == view else None)
        for c, row in rows.items():
            table[(HEAD, c, threads)] = row
        if threads == view:
            replayed = [
                replay_head(head_strategy(head, oracle=False), prompt, output, f, cost, seconds)
                for (_, prompt, output), f in zip(runs, feats, strict=True)
            ]
            for c, row in summarize(runs, [(p, s) for p, s, _ in replayed], cost, prefill).items():
                policy[(HEAD, c)] = row
            tokens = sum(len(output) for _, _, output in runs)
            info["head_passes"] = sum(h for _, _, h in replayed) / tokens
    return info


def summarize(
    runs, replayed: list[tuple[int, float]], cost: CostModel, prefill: Callable[[int], float] | None
) -> dict[str, tuple[float, float, float]]:
    """Per category and "all", from each question's replayed (passes, seconds): (tokens per pass,
    x plain decoding, x plain with prefill). The last is the geometric mean over questions of
    (prefill + plain decode) / (prefill + replayed decode), as the bench averages; nan without `prefill`."""
    sums: dict[str, list] = {}  # category -> [tokens, passes, seconds, log speed-ups with prefill]
    for (category, prompt, output), (passes, seconds) in zip(runs, replayed, strict=True):
        plain = len(output) * cost(1)
        fixed = prefill(len(prompt) - 1) if prefill else float("nan")
        for c in (category, "all"):
            t = sums.setdefault(c, [0, 0, 0.0, []])
            t[0], t[1], t[2] = t[0] + len(output), t[1] + passes, t[2] + seconds
            t[3].append(np.log((fixed + plain) / (fixed + seconds)))
    return {
        c: (tokens / passes, tokens * cost(1) / seconds, float(np.exp(np.mean(logs))))
        for c, (tokens, passes, seconds, logs) in sums.items()
    }


def drafters(table) -> list[str]:
    """The drafters with rows: the three lookup bounds, and the learned head where one was cached."""
    return list(DRAFTERS) + ([HEAD] if any(key[0] == HEAD for key in table) else [])


def write_report(
    table,
    policy,
    categories,
    costs,
    prefill,
    best,
    summary: dict,
    machine: dict,
    head_info: dict | None,
    head_summary: dict | None,
    head_run: str,
    view: int = 1,
    out: Path = HERE,
    command: str = "python benchmarks/draft_ceiling/run.py",
) -> None:
    names = drafters(table)
    lines = [
        "# A ceiling for exact speculative decoding on this machine",
        "",
        "```",
        command,
        "```",
        "",
        describe(machine),
        "",
        f"torch {machine['torch']}, transformers {machine['transformers']}, python {machine['python']}, "
        f"{machine['cpu_model']}, {machine['cpu_count']} CPUs, {machine['weights']}. How it is computed: the "
        "docstring of `run.py`. Inputs: the plain greedy outputs of `benchmarks/speculative/` "
        "(120 Spec-Bench questions, 128 tokens).",
        "",
        "## Measured pass cost (argen's `CostModel`, median of 5 calibrations), ms",
        "",
        "| threads | head per row | " + " | ".join(f"{b} tok" for b in BUCKETS[:8]) + " |",
        "| --: | --: | " + " | ".join("--:" for _ in BUCKETS[:8]) + " |",
    ]
    for threads, cost in costs.items():
        lines.append(
            f"| {threads} | {cost.head_seconds * 1e3:.1f} | "
            + " | ".join(f"{cost.seconds[b] * 1e3:.1f}" for b in BUCKETS[:8])
            + " |"
        )
    if head_info:
        lines += head_section(head_info, costs)
    lines += [
        "",
        "## Ceiling: speed-up over plain decoding with drafts sized knowing the future",
        "",
        "tok/pass: tokens per target pass; ×plain: decode time of plain ÷ decode time of the replay. "
        "`measured` is argen's best strategy ×plain in `benchmarks/speculative/` (one thread, wall "
        "time with prefill)"
        + (f" and `{head_run}/` (the fast path, two threads)" if head_summary else "")
        + f". Targets (issue 25): {', '.join(f'{c} {v}' for c, v in TARGETS.items())}, "
        "every category 1.0.",
        "",
        "| category | target | measured | "
        + " | ".join(f"{n} tok/pass | {n} ×plain 1 thr | {n} ×plain 2 thr" for n in names)
        + " |",
        "| --- | --: | --: | " + " | ".join("--: | --: | --:" for _ in names) + " |",
    ]
    for c in categories:
        cells = [f"{table[(n, c, 1)][0]:.2f} | {table[(n, c, 1)][1]:.2f} | {table[(n, c, 2)][1]:.2f}" for n in names]
        target = f"{TARGETS.get(c, 1.0):.2f}"
        system, speedup = best.get(c, ("", float("nan")))
        lines.append(f"| {c} | {target} | {speedup:.2f} ({system}) | " + " | ".join(cells) + " |")
    measured = {(row["system"], row["category"]): row for row in summary["rows"]}
    if head_summary:
        measured |= {(row["system"], row["category"]): row for row in head_summary["rows"] if row["system"] == HEAD}
    lines += [
        "",
        f"## argen's drafting policy beside the ceiling, and the prefill ({THREADS[view]})",
        "",
        "Prefill, from the same runtime: "
        + ", ".join(f"{n} tokens {prefill(n) * 1e3:.0f} ms" for n in PREFILL_LENGTHS)
        + f"; one plain decoding step costs {costs[view](1) * 1e3:.0f} ms. `oracle`: the drafter sized knowing the "
        "future (the table above). `policy`: the argen strategy it bounds, with its own adaptive sizing "
        "(`policy.py`, `head.py`). `measured`: that strategy in the committed bench (wall time; "
        "`benchmarks/speculative/`: one thread, two processes side by side; draft-head: "
        f"`{head_run}/`, two threads).",
        "",
        "| category | drafter | strategy | oracle tok/pass | policy tok/pass | measured tok/pass | oracle ×plain | "
        "policy ×plain | oracle ×plain with prefill | policy ×plain with prefill | measured ×plain |",
        "| --- | --- | --- | --: | --: | --: | --: | --: | --: | --: | --: |",
    ]
    for c in categories:
        for name in names:
            strategy = STRATEGY_OF.get(name)  # copy anywhere is a bound only: nothing to replay or measure
            o, p, m = table[(name, c, view)], policy.get((name, c)), measured.get((strategy, c))
            p = [f"{v:.2f}" for v in p] if p else ["—"] * 3
            m = [f"{m['tokens_per_forward']:.2f}", f"{m['speedup_vs_plain']:.2f}"] if m else ["—"] * 2
            lines.append(
                f"| {c} | {name} | {strategy or '—'} | {o[0]:.2f} | {p[0]} | {m[0]} | {o[1]:.2f} | {p[1]} | "
                f"{o[2]:.2f} | {p[2]} | {m[1]} |"
            )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def head_section(info: dict, costs) -> list[str]:
    """What the head is and what a head pass costs beside a target pass, subset and whole vocabulary."""
    meta = info["meta"]
    recipe = meta["recipe"]
    held = meta.get("held_out", {})
    agree = ", ".join(f"{held[f'top1_{s}']:.2f} at depth {s}" for s in range(1, 10) if f"top1_{s}" in held)
    agree = agree or "not measured (no held-out sequences)"
    lines = [
        "",
        "## The learned draft head",
        "",
        f"`{Path(meta['path']).name}`: distilled by `argen distill-draft` ({recipe['prompts']} prompts x "
        f"{recipe['max_new_tokens']} tokens, {recipe['epochs']} epochs, {meta['seconds'] / 60:.0f} min on "
        f"{meta['threads']} threads); {meta['response_tokens']} response tokens; the subset's "
        f"{info['subset']} tokens (of {info['vocab']}) hold {meta['vocab_coverage']:.1%} of them. Held-out top-1 "
        f"agreement with the target (within the subset): {agree}. The policy replay ran "
        f"{info['head_passes']:.2f} head passes per output token.",
        "",
        f"Head pass cost, ms (median of 5; `{info['width']}` rows = one tree level), scoring the frequency-ranked "
        "subset (FR-Spec) or the whole vocabulary, beside a one-token target pass:",
        "",
        "| threads | subset, 1 row | subset, " + f"{info['width']} rows | whole vocabulary, 1 row | whole vocabulary, "
        f"{info['width']} rows | target pass, 1 token | subset {info['width']} rows ÷ target pass |",
        "| --: | --: | --: | --: | --: | --: | --: |",
    ]
    for threads, cost in costs.items():
        sub, full = info["seconds"][threads], info["full_seconds"][threads]
        w = info["width"]
        lines.append(
            f"| {threads} | {sub[1] * 1e3:.2f} | {sub[w] * 1e3:.2f} | {full[1] * 1e3:.2f} | {full[w] * 1e3:.2f} | "
            f"{cost(1) * 1e3:.2f} | {sub[w] / cost(1):.2f} |"
        )
    return lines


def write_chart(table, policy, categories, best, view: int = 1, out: Path = HERE) -> None:
    """Left: the decode-only ceiling of each drafter. Right: wall time with prefill at `view` threads,
    the ceiling against argen's policy replayed and against the bench."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, sharey=True)
    bars_left = [(f"{n}, {t} thr", [table[(n, c, t)][1] for c in categories]) for n in drafters(table) for t in (1, 2)]
    bars_right = []
    for name in drafters(table):
        bars_right.append((f"{name}, oracle", [table[(name, c, view)][2] for c in categories]))
        if name in STRATEGY_OF:
            bars_right.append((f"{STRATEGY_OF[name]}, policy", [policy[(name, c)][2] for c in categories]))
    panels = (
        (left, bars_left, "decoding only: drafts sized knowing the future"),
        (right, bars_right, f"with prefill, {THREADS[view]}: knowing the future vs argen's policy"),
    )
    measured = [(i, best[c][1]) for i, c in enumerate(categories) if c in best]
    for ax, bars, title in panels:
        width = 0.8 / len(bars)
        for j, (label, values) in enumerate(bars):
            ax.bar([i + (j - (len(bars) - 1) / 2) * width for i in range(len(categories))], values, width, label=label)
        for i, c in enumerate(categories):
            if c in TARGETS:
                ax.hlines(TARGETS[c], i - 0.45, i + 0.45, colors="black", linestyles="dashed")
        ax.scatter(
            [i for i, _ in measured],
            [v for _, v in measured],
            marker="x",
            color="black",
            zorder=3,
            label="measured best (with prefill)",
        )
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(categories)), categories, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=2, loc="upper left")
    left.set_ylabel("× plain decoding (dashed: issue targets)")
    fig.suptitle("Exact speculative decoding on this CPU: how far drafts could go, and how far argen gets")
    fig.tight_layout()
    fig.savefig(out / "ceiling.png", dpi=110)


if __name__ == "__main__":
    main()
