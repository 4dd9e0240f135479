"""`argen bench`: argen's decoding strategies on the same prompts, greedy, batch 1, interleaved in one
process; per strategy its tokens/s, tokens per target forward pass, draft acceptance and (for exact
strategies, beside `plain`) whether its tokens equal plain's. Prints a table; writes results.json.

The prompts are a few built-in ones, or a questions file in Spec-Bench's format (`--questions`).
Comparisons with other engines (Hugging Face `generate()`, llama.cpp, kvpress), the drift and
serving benchmarks and the committed reports are the repository's benchmark harness, outside the
wheel: `pip install -e '.[bench]'`, then `python -m benchmarks --help` (docs/benchmarks.md).

`add_arguments(parser)` and `run(args)` are what the CLI wires into `argen bench`;
`python -m argen.bench ...` runs the same thing.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import argen
from argen.api import ModelSpec
from argen.bench.questions import Question, bench_questions, select_questions
from argen.errors import ArgenError
from argen.models.kernels import describe_cpu
from argen.strategies import REGISTRY, make_strategy

DEFAULT_OUT = "bench-out"
WARMUP_TOKENS = 8
BASELINE = "plain"
# Options of the comparison harness that `argen bench` once took; naming one says where it went.
HARNESS = "pip install -e '.[bench]' in a checkout of the repository, then `python -m benchmarks {tool} ...`"
MOVED = {
    "compare": (
        "--dtypes",
        "--quants",
        "--systems",
        "--reference",
        "--hf-prompt-lookup",
        "--merge",
        "--control",
        "--guide-model",
        "--omega",
        "--allow-dirty",
    )
}

# One prompt per kind of task (Spec-Bench's categories), for a bench that needs no file.
BUILTIN_PROMPTS = (
    ("writing", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
    ("coding", "Write a Python function that returns the n-th Fibonacci number, with a docstring and a doctest."),
    (
        "math_reasoning",
        "A train travels 120 km in 1.5 hours and then 80 km in 1 hour. What is its average speed "
        "over the whole trip? Explain step by step.",
    ),
    ("qa", "Why does the Moon always show the same face to the Earth?"),
    (
        "summarization",
        "Summarize in two sentences: The city council met on Tuesday to discuss the new bike lanes "
        "on Main Street. Shop owners said the lanes removed parking their customers need; cyclists "
        "said the lanes made the street safe for the first time. The council voted to keep the lanes "
        "for a trial of six months and to count parking use and accidents before deciding.",
    ),
    (
        "rag",
        "Context: The Rhine rises in the Swiss Alps, forms part of the Swiss-Austrian and Swiss-German "
        "borders, flows through Germany and the Netherlands and empties into the North Sea near Rotterdam. "
        "It is about 1,230 km long.\nQuestion: Which countries does the Rhine flow through, and where does "
        "it end? Answer from the context.",
    ),
)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_strategy(text: str) -> dict:
    """`name` or `name:key=value:key=value` -> a strategy spec dict, checked against the registry."""
    name, *options = text.strip().split(":")
    spec: dict = {"name": name.strip()}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise ArgenError(f"bad strategy {text!r}: options are written name:key=value:key=value")
        spec[key.strip()] = parse_value(value.strip())
    make_strategy(dict(spec))  # raises an InvalidRequestError naming the valid strategies / options
    return spec


def strategy_label(spec: dict) -> str:
    return ":".join([spec["name"], *(f"{k}={v}" for k, v in spec.items() if k != "name")])


def moved(what: str) -> str:
    """Where a part of the old `argen bench` went: `drift`, or an option of the comparison."""
    if what == "drift":
        return "`argen bench drift` left the wheel with the benchmark harness: " + HARNESS.format(tool="drift")
    return f"{what} belongs to the comparison with other engines, which left the wheel: " + HARNESS.format(
        tool="compare"
    )


class _Moved(argparse.Action):
    """An option of the comparison harness: refused with where it went, not as an unknown option."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(moved(option_string))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="default", help="model to load (as for `argen generate`); default: %(default)s"
    )
    parser.add_argument("--quant", default="auto", help="how the weights are held (as `argen generate --quant`)")
    parser.add_argument("--dtype", default="float32", help="the model's dtype (default: %(default)s)")
    parser.add_argument(
        "--strategies",
        metavar="S,S",
        type=_csv,
        default=["plain"],
        help="strategies to measure, comma-separated; each `name` or `name:key=value:key=value`; default: plain",
    )
    parser.add_argument(
        "--questions",
        metavar="FILE",
        default=None,
        help="questions JSONL in Spec-Bench's format (question_id, category, turns); default: "
        f"{len(BUILTIN_PROMPTS)} built-in prompts, one per kind of task",
    )
    parser.add_argument("--categories", metavar="A,B", type=_csv, default=None, help="only these categories")
    parser.add_argument("--limit", metavar="N", type=int, default=None, help="at most N questions per category")
    parser.add_argument(
        "--group-mt-bench",
        action="store_true",
        help="count MT-bench's eight categories as one, mt_bench, as Spec-Bench's tables do",
    )
    parser.add_argument("--max-new-tokens", metavar="N", type=int, default=128, help="default: %(default)s")
    parser.add_argument("--threads", metavar="N", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one short untimed generation per strategy first (default: on)",
    )
    parser.add_argument(
        "--out", metavar="DIR", default=DEFAULT_OUT, help="where results.json goes; default: %(default)s"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    for option in MOVED["compare"]:
        parser.add_argument(option, nargs="?", action=_Moved, help=argparse.SUPPRESS)


def _check(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ArgenError("--max-new-tokens must be at least 1")
    if args.threads < 0:
        raise ArgenError("--threads must be >= 0 (0: torch's default)")
    if not args.strategies:
        raise ArgenError("--strategies needs at least one strategy, e.g. --strategies plain")


def questions_for(args: argparse.Namespace) -> list[Question]:
    if args.questions:
        return bench_questions(args.questions, args.categories, args.limit, args.group_mt_bench)
    builtin = [Question(i + 1, category, prompt) for i, (category, prompt) in enumerate(BUILTIN_PROMPTS)]
    return select_questions(builtin, args.categories, args.limit)


def measure(
    generator,
    questions: list[Question],
    specs: list[dict],
    max_new_tokens: int,
    warmup: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Every question through every strategy, the order of the strategies alternating per question
    (forward, then reversed) so that a slow drift of the machine's speed favours none. One record
    per question: each strategy's tokens, seconds and pass counts."""
    encoded = [generator.encode(q.prompt, chat=True) for q in questions]
    if warmup and questions:
        for spec in specs:
            generator.generate(encoded[0], strategy=dict(spec), max_new_tokens=min(WARMUP_TOKENS, max_new_tokens))
    records = []
    with tqdm(total=len(questions) * len(specs), desc="bench", unit="run", disable=not progress) as bar:
        for qi, (question, ids) in enumerate(zip(questions, encoded, strict=True)):
            runs = {}
            for spec in specs if qi % 2 == 0 else specs[::-1]:
                start = time.perf_counter()
                result = generator.generate(ids, strategy=dict(spec), max_new_tokens=max_new_tokens)
                seconds = time.perf_counter() - start
                s = result.stats
                runs[strategy_label(spec)] = {
                    "new_tokens": len(result.token_ids),
                    "seconds": seconds,
                    "prefill_seconds": s.prefill_seconds,
                    "decode_passes": s.forward_passes - s.prefill_passes,
                    "draft_proposed": s.draft_tokens_proposed,
                    "draft_accepted": s.draft_tokens_accepted,
                    "token_ids": list(result.token_ids),
                }
                bar.update()
            records.append(
                {
                    "question_id": question.question_id,
                    "category": question.category,
                    "prompt_tokens": len(ids),
                    "runs": runs,
                }
            )
    return records


def summarize(records: list[dict], specs: list[dict]) -> list[dict]:
    """One row per strategy: tokens/s (all new tokens ÷ all seconds, prefill included), decode
    tokens/s (after each prefill), tokens per target forward pass after the prefill, draft
    acceptance (accepted ÷ proposed, None without drafts); beside `plain`, the geometric mean of the
    per-question speed ratios and, for exact strategies, the questions with plain's very tokens."""
    rows = []
    for spec in specs:
        label = strategy_label(spec)
        runs = [r["runs"][label] for r in records]
        base = [r["runs"].get(BASELINE) for r in records]
        tokens, seconds = sum(x["new_tokens"] for x in runs), sum(x["seconds"] for x in runs)
        decode_seconds = seconds - sum(x["prefill_seconds"] for x in runs)
        passes, proposed = sum(x["decode_passes"] for x in runs), sum(x["draft_proposed"] for x in runs)
        row = {
            "strategy": label,
            "exact": REGISTRY[spec["name"]].exact,
            "questions": len(runs),
            "new_tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "decode_tokens_per_s": tokens / decode_seconds if decode_seconds > 0 else None,
            "tokens_per_forward": tokens / passes if passes else None,
            "acceptance": sum(x["draft_accepted"] for x in runs) / proposed if proposed else None,
            "speedup_vs_plain": None,
            "identical_to_plain": None,
        }
        if all(base) and label != BASELINE:
            ratios = [
                (x["new_tokens"] / x["seconds"]) / (b["new_tokens"] / b["seconds"])
                for x, b in zip(runs, base)
                if x["seconds"] > 0 and b["seconds"] > 0 and x["new_tokens"] and b["new_tokens"]
            ]
            row["speedup_vs_plain"] = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
            if row["exact"]:
                row["identical_to_plain"] = sum(x["token_ids"] == b["token_ids"] for x, b in zip(runs, base))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def cell(value, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    header = ["strategy", "tok/s", "decode tok/s", "tok/pass", "acceptance", "×plain", "= plain"]
    lines = [
        [
            r["strategy"],
            cell(r["tokens_per_s"], ".1f"),
            cell(r["decode_tokens_per_s"], ".1f"),
            cell(r["tokens_per_forward"], ".2f"),
            cell(r["acceptance"], ".1%"),
            cell(r["speedup_vs_plain"], ".2f"),
            "—" if r["identical_to_plain"] is None else f"{r['identical_to_plain']}/{r['questions']}",
        ]
        for r in rows
    ]
    widths = [max(len(c) for c in column) for column in zip(header, *lines, strict=True)]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        for cells in [header, *lines]
    )


def run(args: argparse.Namespace) -> int:
    """Run the bench described by `args` (see `add_arguments`), print the table, write results.json."""
    _check(args)
    specs = [parse_strategy(s) for s in args.strategies]
    labels = [strategy_label(s) for s in specs]
    if len(set(labels)) < len(labels):
        raise ArgenError("--strategies names a strategy more than once")
    questions = questions_for(args)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        print(f"argen bench: loading {args.model!r}", file=sys.stderr)
        generator = ModelSpec(args.model, quant=args.quant, dtype=args.dtype).load_text()
        print(
            f"argen bench: {len(questions)} prompts × {len(specs)} strategies ({', '.join(labels)}), up to "
            f"{args.max_new_tokens} new tokens",
            file=sys.stderr,
        )
        records = measure(generator, questions, specs, args.max_new_tokens, args.warmup, args.progress)
        rows = summarize(records, specs)
        machine = {
            "argen": argen.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": describe_cpu(),
            "threads": torch.get_num_threads(),
        }
    finally:
        torch.set_num_threads(threads)
    settings = {
        "model": args.model,
        "quant": generator.quant,
        "dtype": args.dtype,
        "questions": args.questions or "built-in",
        "max_new_tokens": args.max_new_tokens,
        "strategies": specs,
        "greedy": True,
        "batch_size": 1,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"argv": sys.argv[1:], "settings": settings, "machine": machine, "summary": rows, "records": records}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(table(rows))
    print(f"\nargen bench: results written to {out / 'results.json'}", file=sys.stderr)
    return 0


__all__ = ["add_arguments", "measure", "parse_strategy", "run", "strategy_label", "summarize"]
