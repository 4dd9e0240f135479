"""BiLD and FS-GEN (strategies bild, fs-gen): a small model decodes, the large (default) model decides
where the small one is unsure. What it buys (speed against the large model's plain decoding) and
what it costs (drift from the large model's greedy output, NLL under the large model), over a sweep
of the thresholds; the small model is the default small model `argen distill-small` cached.

    python benchmarks/bild/run.py --threads 1 > benchmarks/bild/report.md

(run pinned to one core with `taskset -c 1` on a shared machine)

Prompts: the first turn of the first PER_CATEGORY Spec-Bench question of each category (the first
MAX_PROMPTS categories) (held out:
the small model was distilled on other text, recipes/small_model.py), in the chat template, GEN
greedy tokens each (fewer where the large model's output ends). Each prompt runs every row in turn
(interleaved), so the machine's load shifts all rows alike. Agreement: the share of the large
model's greedy output that a row reproduces before its first differing token (prefix agreement), and
the share of prompts it reproduces whole (exact match). NLL: the mean per-token negative
log-likelihood of a row's output under the large model, teacher-forced after the prompt (one pass).
Speed: new tokens per CPU second of the calling thread (one torch thread), prefill included, and its
ratio to the large model's plain decoding. Writes report.md's charts beside it (bild.png, fs_gen.png).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import argen
from argen.api import Generator
from argen.recipes.small_model import load_small_model
from benchmarks.harness.provenance import describe, provenance, script_args

QUESTIONS = ROOT.parent / "shared" / "benchmarks" / "spec_bench" / "question.jsonl"
PER_CATEGORY = 1
MAX_PROMPTS = 10
GEN = 64
FALLBACKS = (0.3, 0.5, 0.7, 0.9)
ROLLBACKS = (2.0, 4.0, 1000.0)  # 1000: no rollback
MAX_PENDING = 10
ENTROPIES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
MARGINS = (0.1, 0.3, 0.5)


def prompts() -> list[tuple[str, str]]:
    seen: dict[str, int] = {}
    out = []
    for line in QUESTIONS.read_text().splitlines():
        q = json.loads(line)
        if seen.get(q["category"], 0) < PER_CATEGORY:
            seen[q["category"]] = seen.get(q["category"], 0) + 1
            out.append((q["category"], q["turns"][0]))
    return out[:MAX_PROMPTS]


@torch.inference_mode()
def nll(runtime, prompt_ids: list[int], output: list[int]) -> tuple[float, int]:
    """Summed NLL of `output` after `prompt_ids` under `runtime`, and its token count (one pass)."""
    if not output:
        return 0.0, 0
    tokens = prompt_ids + output
    cache = runtime.new_cache(1, len(tokens))
    logits, _ = runtime.forward(torch.tensor([tokens]), torch.arange(len(tokens))[None], cache)
    for c in cache if isinstance(cache, list) else [cache]:
        c.free()
    rows = logits[0, len(prompt_ids) - 1 : -1].float()
    logp = torch.log_softmax(rows, -1).gather(1, torch.tensor(output)[:, None])
    return float(-logp.sum()), len(output)


def prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def rows(small) -> dict[str, object]:
    out: dict[str, object] = {"large (plain)": "plain", "small (plain)": None}
    for fallback in FALLBACKS:
        for rollback in ROLLBACKS:
            spec = {"name": "bild", "small": small, "fallback": fallback, "rollback": rollback}
            out[f"bild {fallback} {rollback:g}"] = spec | {"max_pending": MAX_PENDING}
    for t in ENTROPIES:
        out[f"fs-gen entropy {t}"] = {"name": "fs-gen", "small": small, "criterion": "entropy", "threshold": t}
    for t in MARGINS:
        out[f"fs-gen margin {t}"] = {"name": "fs-gen", "small": small, "criterion": "margin", "threshold": t}
    return out


def main() -> None:
    args, state = script_args(__doc__, threads=1)
    large = argen.load("default")
    small_model = load_small_model(large.runtime, "cached", "default")
    small = Generator(small_model)
    questions = prompts()
    variants = rows(small_model)
    stats = {
        name: {"cpu": 0.0, "tokens": 0, "nll": 0.0, "agree": 0, "ref": 0, "exact": 0, "large": 0} for name in variants
    }
    small_nll_of_large = [0.0, 0]  # the small model's NLL of the large model's outputs (teacher-forced)
    for _, question in questions:
        ids = large.encode(question)
        reference: list[int] = []
        for name, spec in variants.items():
            gen = small if spec is None else large
            t0 = time.thread_time()
            r = gen.generate(ids, max_new_tokens=GEN, temperature=0, strategy=spec or "plain")
            cpu = time.thread_time() - t0
            out = r.token_ids
            if name == "large (plain)":
                reference = out
                s, n = nll(small_model.runtime, ids, out)
                small_nll_of_large[0] += s
                small_nll_of_large[1] += n
            row = stats[name]
            s, n = nll(large.runtime, ids, out)
            row["cpu"] += cpu
            row["tokens"] += n
            row["nll"] += s
            row["agree"] += prefix(out, reference)
            row["ref"] += len(reference)
            row["exact"] += out == reference
            record = r.extras.get(spec["name"]) if isinstance(spec, dict) else None
            row["large"] += record["large_tokens"] if record else (n if name == "large (plain)" else 0)
    results = {}
    base = stats["large (plain)"]["tokens"] / stats["large (plain)"]["cpu"]
    for name, row in stats.items():
        speed = row["tokens"] / row["cpu"]
        results[name] = {
            "large_share": row["large"] / row["tokens"],
            "prefix_agreement": row["agree"] / row["ref"],
            "exact": row["exact"] / len(questions),
            "nll": row["nll"] / row["tokens"],
            "tokens_per_s": speed,
            "speed_ratio": speed / base,
            "tokens": row["tokens"],
        }
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results)
    report(args, state, questions, results, small_model, small_nll_of_large)


def report(args, state, questions, results, small_model, small_nll_of_large) -> None:
    p = provenance(state)
    print("# BiLD and FS-GEN: a small model decodes, the large one decides where it is unsure\n")
    print(f"```\npython benchmarks/bild/run.py --threads {args.threads} > benchmarks/bild/report.md\n```\n")
    print("(Run pinned to one core with `taskset -c 1`.)\n")
    print(describe(state) + "\n")
    print(
        f"CPU: {p['cpu_model']} ({p['cpu_count']} CPUs); torch {p['torch']}, {args.threads} thread(s); {p['date']}.\n"
    )
    info = small_model.runtime.info
    large_nll = results["large (plain)"]["nll"]
    print(
        f"Large model: the default model (SmolLM2-135M-Instruct). Small model: `{Path(small_model.name).name}`, the default "
        f"small model `argen distill-small` cached ({info.n_layers} layers: the large model cut to its first "
        f"{info.n_layers} and self-distilled). {len(questions)} held-out Spec-Bench questions (the first of each of "
        f"the first {len(questions)} categories, first turn, chat template), {GEN} greedy tokens each at most: "
        f"{results['large (plain)']['tokens']} tokens from the large model.\n"
    )
    print(
        "The small model's own quality: on the large model's greedy outputs (teacher-forced), mean NLL per token "
        f"{small_nll_of_large[0] / small_nll_of_large[1]:.3f} under the small model, {large_nll:.3f} under the "
        f"large model; its own greedy outputs score {results['small (plain)']['nll']:.3f} under the large model.\n"
    )
    print(
        "Large share: the tokens the large model produced (BiLD: fallback and rollback tokens; FS-GEN: the "
        "collaborative tokens). Prefix agreement: the share of the large model's greedy output reproduced "
        "before the first differing token; exact: prompts reproduced whole. NLL: mean per token under the large "
        "model. Speed: tokens per CPU second, and against the large model's plain decoding in the same process.\n"
    )
    print("| row | large share | prefix agreement | exact | NLL (large) | tokens/s | vs large plain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['large_share']:.3f} | {r['prefix_agreement']:.3f} | {r['exact']:.2f} | {r['nll']:.3f} "
            f"| {r['tokens_per_s']:.1f} | {r['speed_ratio']:.2f}× |"
        )
    print(
        f"\nBiLD rows: `bild FALLBACK ROLLBACK` (max_pending {MAX_PENDING}; rollback 1000: never). FS-GEN rows: "
        "the criterion and its threshold (entropy in nats: the large model is asked at or above it; margin: "
        "below it).\n"
    )
    print("![BiLD: thresholds against agreement and speed](bild.png)\n")
    print("![FS-GEN: collaborative share against agreement and NLL](fs_gen.png)")


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for rollback in ROLLBACKS:
        keys = [f"bild {f} {rollback:g}" for f in FALLBACKS]
        label = "no rollback" if rollback >= 1000 else f"rollback {rollback:g} nats"
        ax1.plot(FALLBACKS, [results[k]["prefix_agreement"] for k in keys], "o-", label=label)
        ax2.plot(FALLBACKS, [results[k]["speed_ratio"] for k in keys], "o-", label=label)
    for ax in (ax1, ax2):
        ax.axhline(results["small (plain)"]["prefix_agreement" if ax is ax1 else "speed_ratio"], ls=":", c="gray")
        ax.set_xlabel("fallback threshold (small model's top probability)")
    ax1.set(ylabel="prefix agreement with the large model", title="BiLD: agreement (dotted: small alone)")
    ax2.axhline(1.0, ls="--", c="black", lw=0.8)
    ax2.set(ylabel="speed vs large plain (x)", title="BiLD: speed (dashed: large plain)")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "bild.png", dpi=100)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for criterion, thresholds in (("entropy", ENTROPIES), ("margin", MARGINS)):
        keys = [f"fs-gen {criterion} {t}" for t in thresholds]
        pts = sorted((results[k]["large_share"], results[k]["prefix_agreement"], results[k]["nll"]) for k in keys)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"fs-gen ({criterion})")
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=f"fs-gen ({criterion})")
    bild = [results[k] for k in results if k.startswith("bild ")]
    ax1.scatter(
        [r["large_share"] for r in bild], [r["prefix_agreement"] for r in bild], marker="x", c="gray", label="bild grid"
    )
    ax2.scatter([r["large_share"] for r in bild], [r["nll"] for r in bild], marker="x", c="gray", label="bild grid")
    ax2.axhline(results["large (plain)"]["nll"], ls="--", c="black", lw=0.8, label="large plain")
    ax2.axhline(results["small (plain)"]["nll"], ls=":", c="gray", lw=0.8, label="small plain")
    for ax in (ax1, ax2):
        ax.axvline(0.2, ls="--", c="red", lw=0.6)
        ax.set_xlabel("share of tokens from the large model")
    ax1.set(ylabel="prefix agreement with the large model", title="agreement (red: the paper's 20%)")
    ax2.set(ylabel="NLL per token under the large model", title="NLL")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "fs_gen.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
