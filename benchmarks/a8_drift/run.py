"""How far the a8 path (8-bit activations, `--quant exact-a8`) drifts from fp32, beside llama.cpp's
drift on the same GGUF, on the default model.

    python benchmarks/a8_drift/run.py > benchmarks/a8_drift/report.md

Teacher-forced logits over three texts from this repository (documentation and code, 256 tokens
each), against the fp32 reference (`--quant none`: the GGUF's weights dequantized, torch's fp32
matmuls): argen feeds each text 16 tokens a pass (the verifier's and the decoder's path: the a8
kernels; longer feeds keep fp32 activations), llama.cpp evaluates it with every position's logits.
Per system: the largest |logit - reference| over all positions and the vocabulary, the mean
KL(reference || system) per position, and how often its top token is the reference's. Then greedy
decoding of five prompts, 64 new tokens each: where each system's tokens first leave fp32's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import argen
from argen.models import kernels, sources
from benchmarks.harness.provenance import describe, provenance, repo_root, script_args

TEXTS = ("README.md", "ARCHITECTURE.md", "src/argen/models/quant.py")
TOKENS = 256
FEED = 16
PROMPTS = (
    "Write a Python function that reverses a linked list.",
    "Summarize the causes of the First World War.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Translate 'good morning' into French, Spanish and German.",
    "Explain how a hash table handles collisions.",
)
NEW = 64


def argen_logits(gen, ids: list[int]) -> torch.Tensor:
    rt = gen.runtime
    cache = rt.new_cache(1, len(ids))
    out = []
    for at in range(0, len(ids), FEED):
        feed = ids[at : at + FEED]
        logits, _ = rt.forward(torch.tensor([feed]), torch.arange(at, at + len(feed))[None], cache)
        out.append(logits[0])
    cache.free()
    return torch.cat(out).float()


def llama_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(llm.scores[: len(ids)].copy()).float()


def llama_greedy(llm, ids: list[int]) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) >= NEW:
            break
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where a and b differ, None if they agree over NEW tokens."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens of each text (default: %(default)s)")
        parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="greedy prompts (default: all 5)")

    args, state = script_args(__doc__, threads=2, add=options)
    import llama_cpp  # the peer (an optional dependency: `pip install llama-cpp-python`)

    gens = {q: argen.load("default", quant=q) for q in ("none", "exact", "exact-a8")}
    gguf = sources.gguf_file(sources.parse_source("default"))
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=1024,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=512,
        logits_all=True,
        verbose=False,
    )
    tok = gens["none"]
    root = repo_root() or Path.cwd()
    texts = [tok.encode((root / name).read_text(), chat=False)[: args.tokens] for name in TEXTS]
    systems = ["exact", "exact-a8", "llama.cpp"]
    stats = {s: {"max": 0.0, "kl": [], "top1": []} for s in systems}
    for ids in texts:
        ref = argen_logits(gens["none"], ids)
        got = {
            "exact": argen_logits(gens["exact"], ids),
            "exact-a8": argen_logits(gens["exact-a8"], ids),
            "llama.cpp": llama_logits(llm, ids),
        }
        logp = ref.log_softmax(-1)
        for s, logits in got.items():
            st = stats[s]
            st["max"] = max(st["max"], float((logits - ref).abs().max()))
            st["kl"].append((logp.exp() * (logp - logits.log_softmax(-1))).sum(-1))
            st["top1"].append(logits.argmax(-1) == ref.argmax(-1))
    greedy = {}
    for prompt in PROMPTS[: args.prompts]:
        ids = tok.encode(prompt)
        outs = {q: gens[q].generate(ids, max_new_tokens=NEW, ignore_eos=True).token_ids for q in gens}
        outs["llama.cpp"] = llama_greedy(llm, ids)
        greedy[prompt] = {s: first_difference(outs[s], outs["none"]) for s in systems}
    llm.close()

    machine = provenance(state)
    print("# Drift of the a8 path (8-bit activations) and of llama.cpp from fp32 (default model)\n")
    print(
        f"```\npython benchmarks/a8_drift/run.py --tokens {args.tokens} --prompts {args.prompts} "
        "> benchmarks/a8_drift/report.md\n```\n"
    )
    print(describe(machine) + "\n")
    print(
        f"CPU: {kernels.describe_cpu()}; torch {machine['torch']}, llama-cpp-python {llama_cpp.__version__}, "
        f"{args.threads} threads.\n"
    )
    print(
        f"## Teacher-forced logits against fp32 (`--quant none`), {len(texts)} texts x {args.tokens} tokens "
        f"({', '.join(TEXTS)}), argen fed {FEED} tokens a pass\n"
    )
    print("| system | max abs logit difference | mean KL(fp32 ‖ system), nats | top-1 = fp32's |")
    print("| :-- | --: | --: | --: |")
    for s, st in stats.items():
        kl, top1 = torch.cat(st["kl"]), torch.cat(st["top1"]).float()
        print(f"| {s} | {st['max']:.3f} | {float(kl.mean()):.2e} | {100 * float(top1.mean()):.1f}% |")
    print(f"\n## Greedy decoding, {NEW} new tokens: first token that differs from fp32's (— : none)\n")
    print("| prompt | " + " | ".join(systems) + " |\n| :-- |" + " --: |" * len(systems))
    for prompt, row in greedy.items():
        cells = ["—" if row[s] is None else str(row[s]) for s in systems]
        print(f"| {prompt} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
