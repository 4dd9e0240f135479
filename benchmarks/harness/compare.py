"""`python -m benchmarks compare`: Spec-Bench questions through argen's strategies and through
Hugging Face `generate()` on the same weights (and llama.cpp, optionally), greedy, batch 1,
interleaved in one process; tokens/s, speed ratios, tokens per forward pass and token identity per
category, written as results.json, report.md and chart.png. `--merge` joins runs over disjoint
questions; `--control` measures the control strategies instead (control.py).

`argen bench` (in the wheel) measures argen's strategies alone; this is its comparison with peers.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from argen import load
from argen.bench import parse_strategy
from argen.bench.questions import bench_questions
from argen.errors import ArgenError
from argen.models import sources
from argen.models.loading import parse_dtype
from benchmarks.harness import control, report, runner
from benchmarks.harness.provenance import (
    env_prefix,
    git_state,
    machine_info,
    portable_argv,
    portable_path,
    require_clean,
)
from benchmarks.harness.specbench import find_questions_file
from benchmarks.harness.systems import HF, ArgenSystem, HFSystem, LlamaCppSystem

PROG = "python -m benchmarks compare"

DEFAULT_OUT = "bench-out"
PEERS = ("llama-cpp",)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="default", help="model to load (as for `argen generate`); default: %(default)s"
    )
    parser.add_argument(
        "--questions",
        metavar="FILE",
        default=None,
        help="questions JSONL (question_id, category, turns); default: "
        "shared/benchmarks/spec_bench/question.jsonl found in the current directory's parents",
    )
    parser.add_argument("--categories", metavar="A,B", type=_csv, default=None, help="only these categories")
    parser.add_argument("--limit", metavar="N", type=int, default=None, help="at most N questions per category")
    parser.add_argument(
        "--group-mt-bench",
        action="store_true",
        help="count MT-bench's eight categories (10 questions each) as one, mt_bench, as "
        "Spec-Bench's tables do; --limit then samples all eight round-robin",
    )
    parser.add_argument("--max-new-tokens", metavar="N", type=int, default=128, help="default: %(default)s")
    parser.add_argument(
        "--strategies",
        metavar="S,S",
        type=_csv,
        default=["plain"],
        help="argen strategies to measure, comma-separated; each `name` or `name:key=value:key=value`; default: plain",
    )
    parser.add_argument(
        "--dtypes",
        "--dtype",
        metavar="D,D",
        type=_csv,
        default=["float32"],
        help="float32 always runs; each extra dtype (e.g. bfloat16) loads a second argen model "
        "and measures its plain decoding against float32 plain; default: float32",
    )
    parser.add_argument(
        "--quant",
        default="auto",
        help="how the model's weights are held (as `argen generate --quant`); default: %(default)s",
    )
    parser.add_argument(
        "--quants",
        metavar="Q,Q",
        type=_csv,
        default=[],
        help="each extra quant path (e.g. none,exact) loads a second argen model and measures its "
        "plain decoding; default: none",
    )
    parser.add_argument(
        "--systems",
        metavar="S,S",
        type=_csv,
        default=[],
        help="optional peers on the same weights: llama-cpp (llama-cpp-python on the same GGUF "
        "file, same threads; `pip install llama-cpp-python`); default: none",
    )
    parser.add_argument(
        "--reference",
        default="hf",
        help="the system whose tokens argen's systems and the peers are compared with: hf (HF "
        "generate(), fp32) or an argen system's name, e.g. plain@none (argen fp32); "
        "default: %(default)s",
    )
    parser.add_argument(
        "--hf-prompt-lookup",
        metavar="N",
        type=int,
        default=0,
        help="also run HF generate(prompt_lookup_num_tokens=N) as a second peer; 0: off",
    )
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one short untimed generation per system first (default: on)",
    )
    parser.add_argument(
        "--threads",
        metavar="N",
        type=int,
        default=0,
        help="torch CPU threads for every system (0: torch's default); on a CPU shared with "
        "other work, 1 avoids threads waiting on each other",
    )
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help="output directory; default: %(default)s")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write the report even though the working tree has uncommitted changes (it is "
        "recorded as dirty); by default a report must be reproducible from its commit",
    )
    parser.add_argument(
        "--merge",
        metavar="DIR",
        nargs="+",
        default=None,
        help="write one report (to --out) from finished runs over disjoint questions, e.g. "
        "categories split over processes; nothing is measured",
    )
    control = parser.add_argument_group("control strategies (counterfactual, set prompt, guided; see bench/control.py)")
    control.add_argument(
        "--control", action="store_true", help="measure the control strategies instead of comparing with HF generate()"
    )
    control.add_argument("--guide-model", default=None, help="guide for the guided rows (default: --model)")
    control.add_argument("--omega", type=float, default=20.0, help="guidance weight of the guided row (default: 20)")


def command_line(args: argparse.Namespace) -> str:
    """The run's command with every option spelled out, so it reproduces the run whatever the defaults
    become."""
    parts = [*PROG.split(), "--model", args.model]
    if args.questions:
        parts += ["--questions", portable_path(args.questions)]
    if args.categories:
        parts += ["--categories", ",".join(args.categories)]
    if args.limit is not None:
        parts += ["--limit", str(args.limit)]
    if getattr(args, "group_mt_bench", False):
        parts.append("--group-mt-bench")
    parts += ["--max-new-tokens", str(args.max_new_tokens), "--strategies", ",".join(args.strategies)]
    parts += ["--dtypes", ",".join(args.dtypes), "--hf-prompt-lookup", str(args.hf_prompt_lookup)]
    if getattr(args, "quant", "auto") != "auto":
        parts += ["--quant", args.quant]
    if getattr(args, "quants", None):
        parts += ["--quants", ",".join(args.quants)]
    if getattr(args, "systems", None):
        parts += ["--systems", ",".join(args.systems)]
    if getattr(args, "reference", "hf") != "hf":
        parts += ["--reference", args.reference]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    parts += ["--warmup" if args.warmup else "--no-warmup", "--out", portable_path(args.out)]
    if getattr(args, "allow_dirty", False):
        parts.append("--allow-dirty")
    return env_prefix() + shlex.join(parts)


def _check(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ArgenError("--max-new-tokens must be at least 1")
    if args.hf_prompt_lookup < 0:
        raise ArgenError("--hf-prompt-lookup must be >= 0 (0 turns it off)")
    if args.threads < 0:
        raise ArgenError("--threads must be >= 0 (0: torch's default)")
    if not args.strategies:
        raise ArgenError("--strategies needs at least one strategy, e.g. --strategies plain")
    unknown = sorted(set(getattr(args, "systems", [])) - set(PEERS))
    if unknown:
        raise ArgenError(f"unknown --systems {', '.join(unknown)}; available: {', '.join(PEERS)}")


def build_systems(args, generator, specs: list[dict], extra_dtypes: list[str]):
    tokenizer = generator.tokenizer
    eos = generator.model.eos_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    hf_model = generator.model.hf_model
    systems = [HFSystem(hf_model, eos, pad)]
    systems += [ArgenSystem(generator, spec) for spec in specs]
    reference = "plain" if any(s.name == "plain" for s in systems) else HF
    for dtype in extra_dtypes:
        systems.append(ArgenSystem(load(args.model, dtype=dtype), {"name": "plain"}, dtype, reference))
    for quant in getattr(args, "quants", []):
        other = load(args.model, quant=quant)
        systems.append(ArgenSystem(other, {"name": "plain"}, reference=HF, suffix=f"@{other.quant}"))
    if "llama-cpp" in getattr(args, "systems", []):
        gguf_file = sources.gguf_file(sources.parse_source(args.model))
        if gguf_file is None:
            raise ArgenError("--systems llama-cpp runs llama.cpp on the model's GGUF file; this model has none")
        systems.append(LlamaCppSystem(gguf_file, torch.get_num_threads(), eos))
    if args.hf_prompt_lookup:
        systems.append(HFSystem(hf_model, eos, pad, prompt_lookup=args.hf_prompt_lookup))
    names = [s.name for s in systems]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ArgenError(f"--strategies names {', '.join(duplicates)} more than once")
    chosen = getattr(args, "reference", "hf")
    if chosen != HF:
        if chosen not in names:
            raise ArgenError(f"--reference {chosen!r} is not among the systems ({', '.join(names)})")
        for system in systems:  # argen's and the peers' outputs are compared with (exact ones: judged by) it
            if system.name != chosen and system.kind != "hf":
                system.reference = chosen
    return systems, hf_model


def run(args: argparse.Namespace) -> int:
    """Run the bench described by `args` (see `add_arguments`), print the tables, write the report."""
    if getattr(args, "merge", None):
        from benchmarks.harness.merge import merge  # here: merge.py names this tool's command (a cycle)

        if getattr(args, "control", False):
            raise ArgenError("--merge measures nothing, so it cannot go with --control; give one of them")
        paths = merge([Path(d) for d in args.merge], Path(args.out), getattr(args, "allow_dirty", False))
        print(f"\n{PROG}: merged report written to {paths['markdown']}")
        return 0
    # Before anything is measured: a report must be reproducible from the commit it records.
    args.git_state = git_state()
    require_clean(args.git_state, getattr(args, "allow_dirty", False))
    threads = torch.get_num_threads()
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    try:
        if getattr(args, "control", False):
            _check(args)
            return control.run(args)
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    _check(args)
    specs = [parse_strategy(s) for s in args.strategies]
    dtypes = [str(parse_dtype(d)).removeprefix("torch.") for d in args.dtypes]
    extra_dtypes = [d for d in dict.fromkeys(dtypes) if d != "float32"]
    questions_path = Path(args.questions) if args.questions else find_questions_file()
    questions = bench_questions(questions_path, args.categories, args.limit, args.group_mt_bench)
    out = Path(args.out)

    print(f"{PROG}: loading {args.model!r}", file=sys.stderr)
    generator = load(args.model, quant=getattr(args, "quant", "auto"))
    systems, hf_model = build_systems(args, generator, specs, extra_dtypes)
    n_categories = len({q.category for q in questions})
    print(
        f"{PROG}: {len(questions)} questions in {n_categories} categories × {len(systems)} systems "
        f"({', '.join(s.name for s in systems)}), up to {args.max_new_tokens} new tokens",
        file=sys.stderr,
    )

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "records.partial.jsonl"  # per-question records as they finish; removed at the end
    log_path.unlink(missing_ok=True)
    records = runner.run_questions(
        questions,
        lambda prompt: generator.encode(prompt, chat=True),
        systems,
        args.max_new_tokens,
        tie_model=hf_model,
        warmup=args.warmup,
        progress=args.progress,
        log_path=log_path,
    )
    described = [s.describe() for s in systems]
    summary = report.summarize(records, described)
    settings = {
        "model": args.model,
        "questions": portable_path(questions_path.resolve()),
        "questions_count": len(questions),
        "categories": {
            c: sum(q.category == c for q in questions) for c in dict.fromkeys(q.category for q in questions)
        },
        "limit": args.limit,
        "group_mt_bench": args.group_mt_bench,
        "max_new_tokens": args.max_new_tokens,
        "strategies": specs,
        "dtypes": ["float32", *extra_dtypes],
        "hf_prompt_lookup": args.hf_prompt_lookup,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "quant": generator.quant,
        "quants": getattr(args, "quants", []),
        "peers": getattr(args, "systems", []),
        "greedy": True,
        "batch_size": 1,
    }
    paths = report.write_all(
        out,
        command_line(args),
        portable_argv(sys.argv),
        machine_info(args.git_state) | {f"{s.name} build": s.build for s in systems if isinstance(s, LlamaCppSystem)},
        settings,
        described,
        records,
        summary,
    )
    log_path.unlink(missing_ok=True)
    report.print_summary(summary, records)
    print(f"\n{PROG}: report written to {paths['markdown']} (also {paths['json'].name}, {paths['chart'].name})")
    return 0


__all__ = ["add_arguments", "command_line", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ArgenError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
