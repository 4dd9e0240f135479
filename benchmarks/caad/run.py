"""CAAD (strategy caad): NLL of held-back reference continuations under plain decoding and under
caad at a few blend weights, and caad's per-token decode cost against plain (default model).

    python benchmarks/caad/run.py --threads 1 > benchmarks/caad/report.md

(run pinned to one core with `taskset -c 1` on a shared machine)

References: the first PASSAGES prose passages of this machine's text (recipes/local_text.py), each
cut to HEAD + TAIL tokens. The store (`build_store`, as `argen caad-store` builds it) holds every
passage's first HEAD tokens; the TAIL tokens are held back. NLL: each tail teacher-forced after its
head, one forward pass per passage (shared by every row); at each tail position the strategy's own `blended` turns the
model's logits and final hidden state into caad's distribution (what a caad step samples from under
the same prefix). Cost: greedy decoding of GEN tokens after each of COST_PROMPTS heads, plain and
caad interleaved in one process, CPU time of the calling thread (one thread), as a ratio.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import argen
from argen.recipes import caad_store
from argen.recipes.caad_store import build_store
from argen.recipes.local_text import local_corpus
from argen.strategies.caad import CAAD
from benchmarks.harness.provenance import describe, provenance, script_args

PASSAGES = 24
HEAD, TAIL = 64, 32
BLENDS = (0.1, 0.25, 0.5)
TOP_N, TEMPERATURE = 8, 0.1
COST_PROMPTS, GEN = 4, 32


@torch.inference_mode()
def tail_pass(runtime, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(logits, final hidden states, targets) at the positions that predict tokens[HEAD:]: one pass."""
    cache = runtime.new_cache(1, len(tokens))
    logits, hidden = runtime.forward(torch.tensor([tokens]), torch.arange(len(tokens))[None], cache)
    for c in cache if isinstance(cache, list) else [cache]:
        c.free()
    return logits[0, HEAD - 1 : -1].float(), hidden[0, HEAD - 1 : -1], tokens[HEAD:]


def tail_nll(passes, strategy: CAAD | None) -> float:
    """Summed NLL of every held-back token given what precedes it."""
    total = 0.0
    for logits, hidden, targets in passes:
        for row, h, target in zip(logits, hidden, targets, strict=True):
            if strategy is not None:
                row = strategy.blended(row, h)
            total -= torch.log_softmax(row, dim=-1)[target].item()
    return total


def main() -> None:
    args, state = script_args(__doc__, threads=1)
    gen = argen.load("default")
    runtime = gen.runtime
    passages = []
    for text in local_corpus().prose:
        ids = gen.encode(text, chat=False)
        if len(ids) >= HEAD + TAIL:
            passages.append(ids[: HEAD + TAIL])
        if len(passages) == PASSAGES:
            break
    started = time.perf_counter()
    stores = {v: build_store(runtime, [p[:HEAD] for p in passages], values=v) for v in ("logits", "tokens")}
    build_s = time.perf_counter() - started

    p = provenance(state)
    print("# CAAD: NLL of held-back reference continuations, and per-token cost\n")
    print(f"```\npython benchmarks/caad/run.py --threads {args.threads} > benchmarks/caad/report.md\n```\n")
    print(describe(state) + "\n")
    print(
        f"CPU: {p['cpu_model']} ({p['cpu_count']} CPUs); torch {p['torch']}, {args.threads} thread(s); {p['date']}.\n"
    )
    n_entries = len(stores["logits"])
    print(
        f"{len(passages)} prose passages from this machine; store: the first {HEAD} tokens of each "
        f"({n_entries} entries, exact search below {caad_store.INDEX_THRESHOLD}); held back: the next {TAIL} "
        f"tokens of each ({len(passages) * TAIL} tokens scored). Both stores built in {build_s:.1f} s. "
        f"top_n {TOP_N}, temperature {TEMPERATURE}.\n"
    )
    print("| decoding | store values | blend | mean NLL / token | vs plain |")
    print("|---|---|---:|---:|---:|")
    n_tokens = len(passages) * TAIL
    passes = [tail_pass(runtime, p) for p in passages]
    plain = tail_nll(passes, None) / n_tokens
    print(f"| plain | - | - | {plain:.3f} | 1.000 |")
    for values, store in stores.items():
        for blend in BLENDS:
            s = CAAD(store, top_n=TOP_N, blend=blend, temperature=TEMPERATURE)
            nll = tail_nll(passes, s) / n_tokens
            print(f"| caad | {values} | {blend} | {nll:.3f} | {nll / plain:.3f} |")

    # Per-token cost: interleaved, CPU time of this thread.
    prompts = [gen.tokenizer.decode(p[:HEAD]) for p in passages[:COST_PROMPTS]]
    variants = {
        "plain": "plain",
        "caad (exact search)": CAAD(stores["logits"], top_n=TOP_N, blend=0.25),
        "caad (faiss HNSW index)": CAAD(stores["logits"], top_n=TOP_N, blend=0.25),
    }
    times = dict.fromkeys(variants, 0.0)
    counts = dict.fromkeys(variants, 0)
    for prompt in prompts:
        for name, strategy in variants.items():
            caad_store.INDEX_THRESHOLD = 0 if "index" in name else 4096
            t0 = time.thread_time()
            out = gen.generate(
                prompt, chat=False, max_new_tokens=GEN, temperature=0, ignore_eos=True, strategy=strategy
            )
            times[name] += time.thread_time() - t0
            counts[name] += len(out.token_ids)
    caad_store.INDEX_THRESHOLD = 4096
    print(f"\nPer-token cost: {COST_PROMPTS} heads, {GEN} greedy tokens each (prefill included), interleaved.\n")
    print("| decoding | ms / token | vs plain |")
    print("|---|---:|---:|")
    base = times["plain"] / counts["plain"]
    for name in variants:
        per = times[name] / counts[name]
        print(f"| {name} | {per * 1000:.1f} | {per / base:.3f} |")


if __name__ == "__main__":
    main()
