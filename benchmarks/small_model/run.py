"""The default model's small model (made by `argen distill-small`, the default recipe): how it was
made and how long it took, its quality beside the large model's and the plain cut's, and its
per-token decode cost against the large model's.

    python benchmarks/small_model/run.py > benchmarks/small_model/report.md

Quality: mean next-token NLL (nats) on held-out text from this machine (recipes/local_text.py: the
texts `is_held_out` keeps out of training), packed into windows of 128 tokens, for the large model,
the plain cut (the same K layers, untrained) and the distilled small model; with each one's top-1
agreement with the large model and its KL from the large model (full vocabulary). Cost: greedy
decoding of the same prompts with each model in this process, alternating, median of the rounds.
Run `argen distill-small --model default` first (the default recipe).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import torch

import argen
from argen.api import Generator
from argen.models.kernels import describe_cpu
from argen.recipes.small_model import (
    Recipe,
    corpus_texts,
    distill,
    is_held_out,
    load_small_model,
    model_logits,
    read_meta,
    windows,
)
from benchmarks.harness.provenance import describe, provenance, script_args

WINDOWS, SEQ_LEN = 32, 128
PROMPTS = [
    "Explain what a hash table is and when to use one.",
    "Write a short poem about the sea.",
    "What are three tips for writing clear documentation?",
    "Summarize the plot of a detective story in a few sentences.",
]
NEW_TOKENS, ROUNDS = 64, 3


def add(parser) -> None:
    parser.add_argument("--windows", type=int, default=WINDOWS, help="held-out windows of 128 tokens")


def quality(large, small_models: dict, ids: torch.Tensor) -> dict[str, dict[str, float]]:
    """NLL of the next token, top-1 agreement with the large model and KL(large || model) per model."""
    sums: dict[str, dict[str, float]] = {
        name: {"nll": 0.0, "agree": 0.0, "kl": 0.0} for name in ["large", *small_models]
    }
    count = 0
    for row in ids.split(8):
        want = model_logits(large.runtime, row)[:, :-1].log_softmax(-1)
        target = row[:, 1:, None]
        count += target.numel()
        for name, model in [("large", large), *small_models.items()]:
            got = want if model is large else model_logits(model.runtime, row)[:, :-1].log_softmax(-1)
            sums[name]["nll"] -= got.gather(-1, target).sum().item()
            sums[name]["agree"] += (got.argmax(-1) == want.argmax(-1)).sum().item()
            sums[name]["kl"] += (want.exp() * (want - got)).sum().item()
    return {name: {k: v / count for k, v in row.items()} for name, row in sums.items()}


def decode_seconds_per_token(gens: dict[str, Generator]) -> dict[str, float]:
    """Median over rounds of wall seconds per generated token, greedy, the models alternating."""
    times: dict[str, list[float]] = {name: [] for name in gens}
    for gen in gens.values():
        gen.generate(PROMPTS[0], max_new_tokens=8)  # warm-up
    for _ in range(ROUNDS):
        for name, gen in gens.items():
            tokens, started = 0, time.perf_counter()
            for prompt in PROMPTS:
                result = gen.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
                tokens += len(result.token_ids)
            times[name].append((time.perf_counter() - started) / tokens)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    args, state = script_args(__doc__, threads=1, add=add)
    gen = argen.load("default")
    small = load_small_model(gen.runtime, None, "default")
    path = Path(small.name)
    meta = read_meta(path)
    recipe = meta["recipe"]
    with tempfile.TemporaryDirectory() as tmp:
        cut_dir = distill(gen.model, Recipe(layers=recipe["layers"], steps=0), progress=False, path=Path(tmp) / "cut")
        cut = load_small_model(gen.runtime, cut_dir, "default")
        held = [t for t in corpus_texts() if is_held_out(t)]
        eos = gen.tokenizer.eos_token_id
        ids = windows(gen.tokenizer, held, args.windows, SEQ_LEN, 0, eos)
        scores = quality(gen.model, {"cut": cut, "small": small}, ids)
        speed = decode_seconds_per_token({"large": gen, "small": Generator(small)})

    large_layers = gen.runtime.info.n_layers
    print("# The default model's small model (`argen distill-small`, the default recipe)\n")
    print("```\npython benchmarks/small_model/run.py > benchmarks/small_model/report.md\n```\n")
    print(describe(provenance(state)) + "\n")
    default = path.name.endswith(Recipe().key())
    print(f"Small model: `{path.name}`" + (" (the default recipe's)." if default else " (not the default recipe's)."))
    print(
        f"Made on: {meta.get('cpu', '?')}, torch {meta.get('torch', '?')}, {meta.get('threads', '?')} thread(s). "
        f"Measured on: {describe_cpu()}, {torch.get_num_threads()} thread(s).\n"
    )
    print(
        f"The large model ({large_layers} layers) runs on `{gen.quant}` weights (its GGUF's Q4_1 blocks); the "
        f"cut and the small model ({recipe['layers']} layers) on `{small.quant}` (their fp32 weights quantized "
        "at load; `matching_quant` says why not Q4_1), the same fused kernels.\n"
    )
    print("## Recipe\n")
    print("| setting | value |\n| --- | --: |")
    for key, value in recipe.items():
        print(f"| {key} | {value} |")
    print("\n## Time to make it\n")
    print("| | value |\n| --- | --: |")
    print(f"| training tokens (windows x seq_len) | {meta['train_tokens']} |")
    print(f"| the large model reads the text, minutes (wall) | {meta['teacher_seconds'] / 60:.1f} |")
    print(f"| training, minutes (wall) | {meta['train_seconds'] / 60:.1f} |")
    print(f"| total, minutes (wall) | {meta['seconds'] / 60:.1f} |")
    print(f"| total, CPU minutes | {meta['cpu_seconds'] / 60:.1f} |")
    print(f"\n## Quality on held-out text ({ids.numel() - ids.shape[0]} tokens scored, {args.windows} windows)\n")
    print("| model | layers | NLL (nats/token) | top-1 agreement with the large model | KL(large ‖ model) |")
    print("| --- | --: | --: | --: | --: |")
    names = {"large": "large (the default model)", "cut": "plain cut (no training)", "small": "small (cut + distilled)"}
    for name, row in scores.items():
        layers = large_layers if name == "large" else recipe["layers"]
        print(f"| {names[name]} | {layers} | {row['nll']:.3f} | {100 * row['agree']:.1f}% | {row['kl']:.3f} |")
    print("\n## Decode cost per token (greedy, one request, same process)\n")
    print(f"{len(PROMPTS)} chat prompts x {NEW_TOKENS} new tokens, median of {ROUNDS} alternating rounds.\n")
    print("| model | ms/token | cost vs large |\n| --- | --: | --: |")
    for name in ("large", "small"):
        print(f"| {name} | {1000 * speed[name]:.1f} | {speed[name] / speed['large']:.2f}x |")


if __name__ == "__main__":
    main()
