"""SRGen (strategy srgen): where it fires, what a trigger costs, and its effect on the NLL of reference
continuations and on short arithmetic answers (default model).

    python benchmarks/srgen/run.py --threads 1 > benchmarks/srgen/report.md

(run pinned to one core with `taskset -c 1` on a shared machine)

NLL: the first PASSAGES prose passages of this machine's text (recipes/local_text.py), each cut to
HEAD + TAIL tokens; each tail teacher-forced after its head in one forward pass. At every tail
position whose plain next-token entropy exceeds the threshold, the strategy's own `reflect` fits δ
on the preceding `prefix_window` positions' final hidden states (the reference prefix) and the
position's own, and the NLL of the reference token is read off the corrected distribution (what an
srgen step samples from under that prefix); elsewhere the plain distribution. δ does not depend on
the threshold, so each (steps, lr) is fitted once per position and every threshold reads from it.

Task: QUESTIONS single-digit sums ("What is 7 + 5?", seeded operands) after three solved examples,
greedy, the answer parsed as the first integer of its first line (the default model gets two-digit
sums and most differences wrong with or without help, and under the chat template it explains
before it answers, so neither would say anything). Plain and srgen interleaved in one process; CPU time
of this thread.

Cost: a trigger's thread time (an srgen run's thread time beyond its tokens at plain's per-token
cost, over its triggers; the strategy's own record, `extras["srgen"]["ms"]`, is wall time, which a
shared machine inflates) against a plain decode step (thread time per token of the plain runs), and
one trigger timed alone at the defaults, the server's default caps (prefix_window 64, steps 8) and
the strategy's bounds (256, 16).
"""

from __future__ import annotations

import math
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import argen
from argen.recipes.local_text import local_corpus
from argen.strategies.srgen import MAX_STEPS, MAX_WINDOW, SRGen, float_head, reflect
from benchmarks.harness.provenance import describe, provenance, script_args

PASSAGES = 8
HEAD, TAIL = 64, 24
THRESHOLDS = (1.0, 2.0, 3.0, 4.0)
FITS = (
    (3, 0.02, 0.05),
    (3, 0.02, 0.0),
    (3, 0.02, 0.2),
    (1, 0.02, 0.05),
    (8, 0.02, 0.05),
    (3, 0.05, 0.05),
)  # (steps, lr, entropy_weight)
DEFAULTS = SRGen()
QUESTIONS = 80
TASK_TOKENS = 4
SHOTS = "Q: What is 2 + 3?\nA: 5\nQ: What is 4 + 4?\nA: 8\nQ: What is 7 + 1?\nA: 8\n"
TASK_CONFIGS = {
    "srgen (defaults)": {},
    "srgen (threshold 1.0, entropy_weight 0.2)": {"entropy_threshold": 1.0, "entropy_weight": 0.2},
}


@torch.inference_mode()
def teacher_forced(runtime, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V], final hidden states [N, H]) of every position: one pass."""
    cache = runtime.new_cache(1, len(tokens))
    logits, hidden = runtime.forward(torch.tensor([tokens]), torch.arange(len(tokens))[None], cache)
    for c in cache if isinstance(cache, list) else [cache]:
        c.free()
    return logits[0].float(), hidden[0].float()


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def nll_rows(runtime, passages: list[list[int]], head) -> list[dict]:
    """Per scored position: plain NLL, plain entropy, and the corrected NLL under each fit."""
    window = DEFAULTS.prefix_window
    rows = []
    for tokens in passages:
        logits, hidden = teacher_forced(runtime, tokens)
        for j in range(HEAD, len(tokens)):  # row j - 1 predicts token j
            plain_logp = torch.log_softmax(logits[j - 1], -1)
            row = {"plain": -float(plain_logp[tokens[j]]), "entropy": float(entropy_of(logits[j - 1]))}
            if row["entropy"] > min(THRESHOLDS):
                lo = max(0, j - 1 - window)
                for steps, lr, weight in FITS:
                    found = reflect(
                        head,
                        hidden[lo : j - 1],
                        tokens[lo + 1 : j],
                        hidden[j - 1],
                        steps=steps,
                        lr=lr,
                        entropy_weight=weight,
                    )
                    row[(steps, lr, weight)] = -float(torch.log_softmax(found.logits, -1)[tokens[j]])
            rows.append(row)
    return rows


def questions() -> list[tuple[str, int]]:
    """(prompt, answer): single-digit sums after three solved examples (the default model answers
    about half of them right, so there is room both ways)."""
    rng = random.Random(0)
    pairs = [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(QUESTIONS)]
    return [(SHOTS + f"Q: What is {a} + {b}?\nA:", a + b) for a, b in pairs]


def parse_answer(text: str) -> int | None:
    """The first integer of the answer's first line (None if it has none)."""
    found = re.search(r"-?\d+", text.strip().split("\n")[0]) if text.strip() else None
    return int(found.group()) if found else None


def plain_step_ms(gen, prompt: str, n: int = 32) -> float:
    """A plain greedy decode step's thread time: n tokens less one token (the prefill), over n - 1."""
    times = {}
    for k in (1, n, 1, n):  # twice each, the second kept (warm)
        t0 = time.thread_time()
        gen.generate(prompt, chat=False, max_new_tokens=k, temperature=0, ignore_eos=True)
        times[k] = time.thread_time() - t0
    return 1000 * (times[n] - times[1]) / (n - 1)


def worst_trigger_ms(head, hidden_size: int, window: int, steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    context, hidden = torch.randn(window, hidden_size, generator=gen), torch.randn(hidden_size, generator=gen)
    targets = list(range(window))
    reflect(head, context, targets, hidden, steps=1, lr=0.05, entropy_weight=0.1)  # warm
    t0 = time.thread_time()
    reflect(head, context, targets, hidden, steps=steps, lr=0.05, entropy_weight=0.1)
    return 1000 * (time.thread_time() - t0)


def main() -> None:
    args, state = script_args(__doc__, threads=1)
    gen = argen.load("default")
    runtime = gen.runtime
    head = float_head(runtime)
    passages = []
    for text in local_corpus().prose:
        ids = gen.encode(text, chat=False)
        if len(ids) >= HEAD + TAIL:
            passages.append(ids[: HEAD + TAIL])
        if len(passages) == PASSAGES:
            break

    p = provenance(state)
    print("# SRGen: where it fires, cost per trigger, NLL of reference continuations, arithmetic answers\n")
    print(f"```\npython benchmarks/srgen/run.py --threads {args.threads} > benchmarks/srgen/report.md\n```\n")
    print(describe(state) + "\n")
    print(
        f"CPU: {p['cpu_model']} ({p['cpu_count']} CPUs); torch {p['torch']}, {args.threads} thread(s); {p['date']}.\n"
    )
    d = DEFAULTS
    print(
        f"Defaults: entropy_threshold {d.entropy_threshold} nats, steps {d.steps}, lr {d.lr}, prefix_window "
        f"{d.prefix_window}, entropy_weight {d.entropy_weight} (Adam on δ from 0 at every trigger). "
        f"log(V) = {math.log(runtime.info.vocab_size):.2f} nats.\n"
    )

    # -- NLL of reference continuations ---------------------------------------------------------------
    started = time.perf_counter()
    rows = nll_rows(runtime, passages, head)
    n = len(rows)
    plain = sum(r["plain"] for r in rows) / n
    print("## NLL of reference continuations\n")
    print(
        f"{len(passages)} prose passages from this machine, {HEAD} tokens of context each, the next {TAIL} "
        f"scored ({n} tokens), teacher-forced; prefix_window {d.prefix_window}. Plain mean NLL {plain:.3f} nats/token ({time.perf_counter() - started:.0f} s).\n"
    )
    print(
        "| threshold | fired (share of tokens) | steps | lr | entropy_weight | mean NLL / token | vs plain | NLL at fired tokens: plain -> srgen |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for threshold in THRESHOLDS:
        fired = [r for r in rows if r["entropy"] > threshold]
        for steps, lr, weight in FITS:
            fit = (steps, lr, weight)
            total = sum(r[fit] if r["entropy"] > threshold else r["plain"] for r in rows) / n
            before = sum(r["plain"] for r in fired) / max(1, len(fired))
            after = sum(r[fit] for r in fired) / max(1, len(fired))
            print(
                f"| {threshold} | {len(fired) / n:.1%} | {steps} | {lr} | {weight} | {total:.3f} | {total / plain:.3f} | "
                f"{before:.3f} -> {after:.3f} |"
            )

    # -- arithmetic ------------------------------------------------------------------------------------
    items = questions()
    variants = {"plain": "plain"} | {name: {"name": "srgen", **opts} for name, opts in TASK_CONFIGS.items()}
    correct = dict.fromkeys(variants, 0)
    seconds = dict.fromkeys(variants, 0.0)
    tokens = dict.fromkeys(variants, 0)
    triggers = dict.fromkeys(variants, 0)
    changed = dict.fromkeys(variants, 0)
    examples = []
    for question, answer in items:
        plain_text = None
        for name, spec in variants.items():
            t0 = time.thread_time()
            out = gen.generate(question, chat=False, max_new_tokens=TASK_TOKENS, temperature=0, strategy=spec)
            seconds[name] += time.thread_time() - t0
            tokens[name] += len(out.token_ids)
            correct[name] += parse_answer(out.text) == answer
            record = out.extras.get("srgen")
            if record is not None:
                triggers[name] += record["triggers"]
            if plain_text is None:
                plain_text = out.text
            elif out.text != plain_text:
                changed[name] += 1
                if len(examples) < 4 and name == "srgen (defaults)":
                    examples.append((question.rsplit("Q: ", 1)[1].split("\n")[0], answer, plain_text, out.text))
    step = plain_step_ms(gen, gen.tokenizer.decode(passages[0][:HEAD]))
    print("\n## Arithmetic with checkable answers\n")
    print(
        f"{QUESTIONS} questions 'What is a + b?' (single digits, seed 0) after three solved examples (Q:/A: "
        f"lines, no chat template: the chat model would explain before it answers), greedy, up to "
        f"{TASK_TOKENS} tokens; the answer is the first integer of the first line. Thread time; a plain "
        f"greedy decode step measured in the same process: {step:.1f} ms (32 tokens less 1, after a "
        f"{HEAD}-token prompt). A trigger's cost: the run's thread time beyond plain's per question, over "
        f"its triggers.\n"
    )
    print(
        "| decoding | accuracy | answers changed vs plain | fired (share of tokens) | ms / trigger "
        "| trigger / plain step | ms / question | vs plain |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        per = 1000 * seconds[name] / QUESTIONS
        extra_ms = 1000 * (seconds[name] - seconds["plain"] * tokens[name] / tokens["plain"])
        mean_ms = extra_ms / triggers[name] if triggers[name] else 0.0
        fired = f"{triggers[name] / tokens[name]:.1%}" if name != "plain" else "-"
        cost = f"{mean_ms:.0f} | {mean_ms / step:.1f}x" if name != "plain" else "- | -"
        print(
            f"| {name} | {correct[name]}/{QUESTIONS} ({correct[name] / QUESTIONS:.0%}) | "
            f"{changed[name] if name != 'plain' else '-'} | {fired} | {cost} | {per:.0f} | "
            f"{seconds[name] / seconds['plain']:.2f} |"
        )
    if examples:
        print("\nAnswers srgen (defaults) changed, first few:\n")
        for question, answer, before, after in examples:
            print(f"- {question} (= {answer}): plain {before!r} -> srgen {after!r}")

    # -- worst-case cost of one trigger -----------------------------------------------------------------
    print("\n## Cost of one trigger\n")
    print(
        f"One trigger timed alone (random hidden states; thread time), against a plain greedy decode step "
        f"measured in the same process ({step:.1f} ms: 32 tokens less 1, after a {HEAD}-token prompt).\n"
    )
    print("| prefix_window | steps | ms / trigger | vs a plain step |")
    print("|---:|---:|---:|---:|")
    width = runtime.info.hidden_size
    for window, steps in ((d.prefix_window, 1), (d.prefix_window, d.steps), (64, 8), (MAX_WINDOW, MAX_STEPS)):
        ms = worst_trigger_ms(head, width, window, steps)
        print(f"| {window} | {steps} | {ms:.0f} | {ms / step:.1f}x |")


if __name__ == "__main__":
    main()
