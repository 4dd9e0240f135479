"""The default model's cached draft head (made by `argen distill-draft`): how it was made, how long it
took, and how often it agrees with the model, read from the metadata the head file carries.

    python benchmarks/draft_head/run.py --out benchmarks/draft_head/report.md

Nothing is measured here: `argen distill-draft` measured it while making the head (wall and CPU
seconds of answering and of training; the head's agreement with the target's next token on every
20th sequence, held out from training, at each of the unrolled draft steps). Run
`argen distill-draft --model default` first (the default recipe).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import argen
from argen.recipes.draft_head import Recipe, head_path, load_draft_head
from benchmarks.harness.provenance import describe, provenance, report_to, rerun_command, script_args


def options(parser) -> None:
    parser.add_argument("--out", help="where the report goes (default: stdout)")


def main() -> None:
    args, state = script_args(__doc__, add=options)
    gen = argen.load("default")
    head = load_draft_head(gen.runtime, None, "default")
    meta = head.meta
    recipe = meta["recipe"]
    command = rerun_command("benchmarks/draft_head/run.py")
    with report_to(args.out):
        print("# The default model's draft head (`argen distill-draft`, the default recipe)\n")
        print(f"```\n{command}\n```\n")
        print(describe(provenance(state)) + "\n")
        default = head_path(gen.runtime, Recipe()).name == Path(meta["path"]).name
        print(
            f"Head file: `{Path(meta['path']).name}`"
            + (" (the default recipe's)." if default else " (not the default recipe's).")
        )
        print(
            f"Made on: {meta.get('cpu', '?')}, torch {meta.get('torch', '?')}, {meta.get('threads', '?')} thread(s).\n"
        )
        print("## Recipe\n")
        print("| setting | value |\n| --- | --: |")
        for key, value in recipe.items():
            print(f"| {key} | {value} |")
        print("\n## Data and time\n")
        print("| | value |\n| --- | --: |")
        print(f"| sequences (prompt + the target's answer) | {meta['sequences']} |")
        print(f"| tokens | {meta['tokens']} |")
        print(f"| response tokens (scored) | {meta['response_tokens']} |")
        print(f"| answering, minutes (wall) | {meta['data_seconds'] / 60:.1f} |")
        print(f"| training, minutes (wall) | {meta['train_seconds'] / 60:.1f} |")
        print(f"| total, minutes (wall) | {meta['seconds'] / 60:.1f} |")
        print(f"| total, CPU minutes | {meta['cpu_seconds'] / 60:.1f} |")
        print("\n## Agreement with the target's next token (top-1), by draft step\n")
        print("Held out: every 20th sequence, never trained on. Last epoch: the training data.\n")
        steps = sorted(int(k[len("top1_") :]) for k in meta["held_out"] if k.startswith("top1_"))
        last = meta["epochs"][-1]
        print("| draft step | held-out top-1 % | held-out cross-entropy | last epoch top-1 % |")
        print("| --: | --: | --: | --: |")
        for s in steps:
            held = meta["held_out"]
            print(f"| {s} | {100 * held[f'top1_{s}']:.1f} | {held[f'ce{s}']:.2f} | {100 * last[f'top1_{s}']:.1f} |")


if __name__ == "__main__":
    main()
