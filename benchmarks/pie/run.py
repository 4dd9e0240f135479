"""PIE prompt edits: an edit in the middle of a cached code prompt against a full re-prefill of the
edited prompt (default model): prefill compute saved, time to first token, and how far the lossy
edit's greedy output drifts from the re-prefill's.

    python benchmarks/pie/run.py --threads 1 > benchmarks/pie/report.md

Prompts: 20 Python standard-library source files (the largest-first sorted list of this
interpreter's stdlib `*.py`, every k-th, so the choice is deterministic), each cut to its first
PROMPT_TOKENS tokens and decoded back to text. Edits: at the line nearest the prompt's middle, in
turn a replaced line, an inserted line, two deleted lines. Each prompt, in one process and
interleaved: the prefix cache emptied and the original prompt prefilled into it (untimed), then
(1) PIE: `generate(original, edit=...)`, (2) the edited prompt with the prefix cache's blocks before
the edit (what prefix caching alone gives), (3) the edited prompt prefilled in full; each decodes
GREEDY_TOKENS greedy tokens. Time to first token: the calling thread's CPU time with one thread
(other work on a shared machine barely moves it), else the wall clock.
"""

from __future__ import annotations

import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import argen
from argen.prompt_edit import PromptEdit
from benchmarks.harness.drift import agreement
from benchmarks.harness.provenance import describe, provenance, script_args

PROMPTS = 20
PROMPT_TOKENS = 1100
GREEDY_TOKENS = 64
EDITS = ("replace", "insert", "delete")


def code_prompts(gen, n: int) -> list[tuple[str, str]]:
    """(name, text) of n stdlib files, each its first PROMPT_TOKENS tokens."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in stdlib.glob("*.py") if p.stat().st_size > 12_000), key=lambda p: (-p.stat().st_size, p.name)
    )
    step = max(1, len(files) // n)
    out = []
    for path in files[::step][:n]:
        ids = gen.encode(path.read_text(errors="replace"), chat=False)[:PROMPT_TOKENS]
        out.append((path.name, gen.tokenizer.decode(ids)))
    return out


def middle_edit(text: str, kind: str) -> PromptEdit:
    """An edit at the start of the line nearest the middle of `text`."""
    start = text.rfind("\n", 0, len(text) // 2) + 1
    line_end = text.find("\n", start) + 1
    if kind == "insert":
        return PromptEdit(start, start, "    # edited: check the value again before use\n")
    if kind == "replace":
        return PromptEdit(start, line_end, text[start:line_end].rstrip("\n") + "  # changed\n")
    second = text.find("\n", line_end) + 1
    return PromptEdit(start, second)


def timed(gen, prompt, clock, **options):
    """(seconds to the first token, the Result) of one streamed generation."""
    started = clock()
    stream = gen.stream(prompt, chat=False, max_new_tokens=GREEDY_TOKENS, temperature=0.0, **options)
    first = None
    for event in stream:
        if first is None and event.token_ids:
            first = clock() - started
    return first, stream.result


def fresh(gen, original: str) -> None:
    """An empty prefix cache, then the original prompt's blocks in it."""
    gen.runtime.kv_pool().drop_cached()
    gen.generate(original, chat=False, max_new_tokens=1, cache_prompt=True)


def main() -> None:
    args, state = script_args(
        __doc__,
        threads=1,
        add=lambda p: p.add_argument("--prompts", type=int, default=PROMPTS, help="prompts (default: %(default)s)"),
    )
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    gen = argen.load("default")
    rows = []
    for i, (name, original) in enumerate(code_prompts(gen, args.prompts)):
        edit = middle_edit(original, EDITS[i % len(EDITS)])
        edited = edit.apply(original)
        fresh(gen, original)
        pie_s, pie = timed(gen, original, clock, edit=edit)
        fresh(gen, original)
        prefix_s, prefix = timed(gen, edited, clock, cache_prompt=True)
        gen.runtime.kv_pool().drop_cached()
        full_s, full = timed(gen, edited, clock)
        assert pie.prompt_ids == full.prompt_ids == prefix.prompt_ids
        agree = agreement(full.token_ids, pie.token_ids)
        rows.append(
            {
                "name": name,
                "edit": EDITS[i % len(EDITS)],
                "tokens": len(full.prompt_ids),
                "pie_saved": pie.stats.prefill_saved,
                "prefix_saved": prefix.stats.prefill_saved,
                "moved": pie.stats.edit_moved_tokens,
                "fallback": pie.stats.edit_fallback,
                "pie_s": pie_s,
                "prefix_s": prefix_s,
                "full_s": full_s,
                "first": agree.first_divergence,
                "same": agree.token_agreement,
                "identical": pie.token_ids == full.token_ids,
                "prefix_same": prefix.token_ids == full.token_ids,
            }
        )
        print(f"[{i + 1}/{args.prompts}] {name}: {full_s / pie_s:.1f}x", file=sys.stderr)
    report(rows, args, state)


def report(rows: list[dict], args, state: dict) -> None:
    p = provenance(state)
    print("# PIE prompt edits: an edit in the middle of a cached code prompt against a full re-prefill\n")
    print("```")
    more = "" if args.prompts == PROMPTS else f" --prompts {args.prompts}"
    print(f"python benchmarks/pie/run.py --threads {args.threads}{more} > benchmarks/pie/report.md")
    print("```\n")
    print(f"{describe(state)}\n")
    print(
        f"CPU: {p['cpu_model']} ({p['cpu_count']} CPUs); torch {p['torch']}, {args.threads} thread(s); {p['date']}.\n"
    )
    print(
        f"{len(rows)} Python standard-library files, each its first {PROMPT_TOKENS} tokens as a raw-text prompt "
        "(no chat template), one edit at the line nearest the middle (replace a line, insert a line, delete two "
        f"lines, in turn); {GREEDY_TOKENS} greedy tokens after each. Per prompt, interleaved in one process: "
        "PIE (`generate(original, edit=...)` with the original prompt in the prefix cache), the edited prompt "
        "with the prefix cache's blocks before the edit (prefix caching alone), and the edited prompt prefilled "
        "in full. Time to first token: "
        + ("the calling thread's CPU time." if args.threads == 1 else "the wall clock.")
        + " Saved: the share of the edited prompt's prefill positions not computed (taken from the cache, or "
        "moved by PIE). Agreement: PIE's greedy tokens against the full re-prefill's (first divergence; share "
        "of positions equal).\n"
    )
    print(
        "| file | edit | tokens | PIE saved | prefix-cache saved | PIE TTFT ms | prefix-cache TTFT ms | "
        "full TTFT ms | full ÷ PIE | first divergence | same tokens |"
    )
    print("| :-- | :-- | --: | --: | --: | --: | --: | --: | --: | --: | --: |")
    for r in rows:
        print(
            f"| {r['name']} | {r['edit']} | {r['tokens']} | {r['pie_saved']:.1%} | {r['prefix_saved']:.1%} | "
            f"{r['pie_s'] * 1e3:.0f} | {r['prefix_s'] * 1e3:.0f} | {r['full_s'] * 1e3:.0f} | "
            f"{r['full_s'] / r['pie_s']:.1f} | {r['first']} | {r['same']:.0%} |"
        )
    speedups = [r["full_s"] / r["pie_s"] for r in rows]
    prefix_speedups = [r["full_s"] / r["prefix_s"] for r in rows]
    exact = sum(r["identical"] for r in rows)
    print("\n## Summary\n")
    print(
        f"- Prefill compute saved by PIE: mean {statistics.mean(r['pie_saved'] for r in rows):.1%}, "
        f"least {min(r['pie_saved'] for r in rows):.1%} (prefix caching alone: mean "
        f"{statistics.mean(r['prefix_saved'] for r in rows):.1%})."
    )
    print(
        f"- Time to first token, full re-prefill ÷ PIE: geometric mean {statistics.geometric_mean(speedups):.1f}×, "
        f"least {min(speedups):.1f}× (full re-prefill ÷ prefix caching alone: geometric mean "
        f"{statistics.geometric_mean(prefix_speedups):.1f}×)."
    )
    print(
        f"- Agreement of the {GREEDY_TOKENS} greedy tokens with the full re-prefill's: {exact}/{len(rows)} "
        f"identical; share of positions equal, mean {statistics.mean(r['same'] for r in rows):.0%}; first "
        f"divergence, median {statistics.median(r['first'] for r in rows):.0f} tokens. (Prefix caching alone: "
        f"{sum(r['prefix_same'] for r in rows)}/{len(rows)} identical; it is exact up to rounding.)"
    )
    fallbacks = [r for r in rows if r["fallback"]]
    if fallbacks:
        print(f"- Fell back to a full prefill: {len(fallbacks)} ({fallbacks[0]['fallback']}).")


if __name__ == "__main__":
    main()
