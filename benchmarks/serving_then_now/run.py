"""The server's throughput now against an older commit's, on the same machine (issue 25's server target).

    python benchmarks/serving_then_now/run.py --old 98c7c00 --threads 2 --repeats 3 --out benchmarks/serving_then_now/report.md

Runs the serving benchmark (`python -m benchmarks serving`: N Spec-Bench prompts one after another, then
all N at once) on `--old` (a git worktree of that commit, its own harness `argen.bench.serving`) and on
this checkout, once with the server's default pacing of long prefills and once unpaced
(`--prefill-slowdown 0`), this checkout on each weight path in `--quants`. Each run is its own process,
one after the other (old, then each new path), so the machine's drift between runs is in the ratios.

The prefix cache is emptied between a run's two phases, in both commits (the old harness is patched
for it at run time, as for pacing: `old_harness.py`), so the concurrent phase prefills its prompts. Left
as it was, the old pool kept the sequential phase's blocks and served the concurrent phase's prompts
from them, while today's pool reuses cached blocks before it writes fresh memory (issue 24's resident
set rule) and keeps only the last few: the comparison would be of caches, not of serving.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the benchmarks package, when run as a script

from benchmarks.harness.provenance import describe, machine_info, report_to, rerun_command, script_args  # noqa: E402

OLD_HARNESS = Path(__file__).with_name("old_harness.py")
WHY_COLD = """Why the prefix cache is emptied between the phases: left alone, the old server kept every block of
the sequential phase's prompts and served the concurrent phase's identical prompts from them (its
time to first token, all 16 at once, was then about 1.5 s on an AMD EPYC Zen 3: no prefill), while
today's pool takes a cached block before it writes fresh memory (issue 24: the resident set stays at
what the requests held at once) and keeps only the last requests' blocks. The old harness's own
figure is a decode-only figure for that reason, and comparing it with today's prefill-and-decode
figure measured the caches, not the serving."""


def run_old(worktree: Path, common: list[str], slowdown: float, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(worktree / "src"), ARGEN_OLD_SLOWDOWN=str(slowdown))
    cmd = [sys.executable, str(OLD_HARNESS), *common, "--out", str(out), "--allow-dirty"]
    subprocess.run(cmd, cwd=worktree, env=env, check=True)
    return json.loads((out / "results.json").read_text())


def run_new(quant: str, common: list[str], slowdown: float, out: Path, allow_dirty: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks", "serving", "--quant", quant, "--prefill-slowdown", str(slowdown)]
    cmd += [*common, "--out", str(out)] + (["--allow-dirty"] if allow_dirty else [])
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads((out / "results.json").read_text())


def median_run(runs: list[dict]) -> dict:
    """The run with the median all-at-once throughput (of an odd number; the lower middle of an even)."""
    ordered = sorted(runs, key=lambda r: r["concurrent"]["throughput_tok_s"])
    return ordered[(len(ordered) - 1) // 2]


def row(label: str, weights: str, runs: list[dict], base: list[dict]) -> str:
    r = median_run(runs)
    c, s = r["concurrent"], r["sequential"]
    cached = r.get("cached_prompt_tokens", {}).get("concurrent")
    # each repeat's ratio to the old run of the same round (they ran back to back)
    ratios = sorted(
        x["concurrent"]["throughput_tok_s"] / b["concurrent"]["throughput_tok_s"] for x, b in zip(runs, base)
    )
    spread = f"{ratios[0]:.2f}–{ratios[-1]:.2f}" if len(ratios) > 1 else "—"
    all_tps = ", ".join(f"{x['concurrent']['throughput_tok_s']:.1f}" for x in runs)
    return (
        f"| {label} | `{weights}` | {c['throughput_tok_s']:.1f} | "
        f"{c['throughput_tok_s'] / median_run(base)['concurrent']['throughput_tok_s']:.2f} | {spread} | {all_tps} | "
        f"{s['throughput_tok_s']:.1f} | {c['ttft_p50_s']:.2f} | {c['latency_p99_s']:.2f} | "
        f"{r['concurrent_mean_batch']:.1f} | {'—' if cached is None else f'{cached:.0f}'} | "
        f"{min(x['identical_outputs'] for x in runs)}/{r['clients']} |"
    )


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--old", default="98c7c00", help="the commit to compare with (default: %(default)s)")
    parser.add_argument("--quants", default="exact,exact-a8", help="this checkout's weight paths, comma-separated")
    parser.add_argument("--slowdowns", default="1.5", help="the servers' --prefill-slowdown values (0: unpaced)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (old, each path); medians reported")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--questions", default=str(ROOT.parent / "shared/benchmarks/spec_bench/question.jsonl"))
    parser.add_argument("--out", help="where the report goes (default: stdout)")


def main() -> int:
    args, state = script_args(__doc__, threads=2, add=options)
    old = subprocess.run(
        ["git", "rev-parse", "--short", args.old], cwd=ROOT, capture_output=True, text=True, check=True
    )
    old_commit = old.stdout.strip()
    common = ["--case", "concurrency", "--strategy", "plain", "--clients", str(args.clients)]
    common += ["--max-tokens", str(args.max_tokens), "--threads", str(args.threads), "--questions", args.questions]
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "old"
        subprocess.run(  # git's messages to stderr: stdout is the report
            ["git", "worktree", "add", "--detach", str(worktree), old_commit], cwd=ROOT, check=True, stdout=sys.stderr
        )
        try:
            for slowdown in (float(s) for s in args.slowdowns.split(",")):
                tag = f"s{slowdown:g}"
                quants = args.quants.split(",")
                old_runs: list[dict] = []
                new: dict[str, list[dict]] = {q: [] for q in quants}
                for rep in range(args.repeats):  # one round: the old server, then each path, back to back
                    old_runs.append(run_old(worktree, common, slowdown, Path(tmp) / f"old-{tag}-{rep}"))
                    for q in quants:
                        new[q].append(run_new(q, common, slowdown, Path(tmp) / f"{q}-{tag}-{rep}", args.allow_dirty))
                pacing = (
                    "unpaced (`--prefill-slowdown 0`)"
                    if not slowdown
                    else f"`--prefill-slowdown {slowdown:g}` (the default)"
                )
                lines = [
                    f"### Long prefills {pacing}",
                    "",
                    "| server | weights | all at once tok/s | × old | × old per round | every round tok/s | "
                    "one after another tok/s | time to first token p50 s | latency p99 s | mean batch | "
                    "prompt tokens from cache | identical |",
                    "| :-- | :-- | --: | --: | --: | :-- | --: | --: | --: | --: | --: | --: |",
                    row(f"{old_commit} (old)", "exact", old_runs, old_runs),
                    *(row(f"{state['git_commit']} (now)", q, runs, old_runs) for q, runs in new.items()),
                    "",
                ]
                sections.append("\n".join(lines))
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False, stdout=sys.stderr
            )
    machine = machine_info(state)
    command = rerun_command("benchmarks/serving_then_now/run.py")
    with report_to(args.out):
        print(f"# The server now against {old_commit}: {args.clients} clients at once\n")
        print(f"```\n{command}\n```\n")
        print(describe(state) + "\n")
        print(
            f"CPU: {machine.get('cpu')}; {args.threads} torch threads. Model `default`, {args.clients} different "
            f"Spec-Bench first-turn prompts, greedy, exactly {args.max_tokens} new tokens each (`ignore_eos`), the "
            "serving benchmark's two phases (one after another, then all at once), the prefix cache emptied "
            "between them. Old: the commit before the many-row kernels of issue 25 (it has no `exact-a8`). Every "
            "run is its own process; a round runs the old server, then each path, back to back; "
            f"{args.repeats} rounds. A row shows the run with the median all-at-once throughput (its other "
            "columns are that run's); × old: that median over the old server's median; × old per round: the "
            "least and most of each round's ratio to the old run of the same round.\n"
        )
        print("\n".join(sections))
        print(WHY_COLD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
