"""Structured output: which grammar engine (mask time per token on the default model's 49k vocabulary,
rollback, work bounds), and what a JSON schema costs argen per token, plain and speculative.

    python benchmarks/structured/run.py --threads 2 > benchmarks/structured/report.md

Engines: the 20 schemas of tests/data/schemas.json; each engine compiles the schema, then follows the
tokens of argen's constrained greedy answer, computing the next-token mask before each token (what
a sampler needs) and consuming the token; per-token times over all 20 answers. Every engine must
accept every answer (checked), so all follow the same path.

argen: each schema's prompt at batch 1, constrained (plain, prompt-lookup, ngram), and plain without
the schema for as many tokens (ignore_eos): seconds per token, the grammar's share (the sampler's
mask time, `Result.stats.grammar_mask_seconds`), speculative tokens per pass.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the `benchmarks` package (harness) is there

import argen
from argen.models import kernels
from benchmarks.harness.provenance import describe, provenance, script_args

CASES = json.loads((Path(__file__).resolve().parents[2] / "tests" / "data" / "schemas.json").read_text())
MAX_TOKENS = 192


def fmt(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class LLGuidance:
    name, rollback, bounded = "llguidance", "yes (`rollback(n)`)", "yes: lexer fuel and Earley items per token"

    def __init__(self, gen) -> None:
        import llguidance
        import llguidance.hf

        self.version = version("llguidance")
        self.ll, self.tok = llguidance, llguidance.hf.from_tokenizer(gen.tokenizer, n_vocab=gen.runtime.info.vocab_size)

    def compile(self, schema: dict):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        return self.ll.LLMatcher(self.tok, grammar)

    def step(self, m, token: int) -> bool:
        m.compute_bitmask()
        return m.consume_token(token)


class XGrammar:
    name, rollback, bounded = "xgrammar", "yes (`rollback(n)`)", "no per-token bound (compiles ahead)"

    def __init__(self, gen) -> None:
        import xgrammar

        self.version = version("xgrammar")
        self.xg = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(gen.tokenizer, vocab_size=gen.runtime.info.vocab_size)
        self.compiler, self.mask = xgrammar.GrammarCompiler(info), xgrammar.allocate_token_bitmask(1, info.vocab_size)

    def compile(self, schema: dict):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        return self.xg.GrammarMatcher(compiled)

    def step(self, m, token: int) -> bool:
        m.fill_next_token_bitmask(self.mask)
        return m.accept_token(token)


class OutlinesCore:
    name, rollback, bounded = "outlines-core", "yes (`rollback_state(n)`)", "no: builds the whole automaton per schema"

    def __init__(self, gen) -> None:
        import outlines_core
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.version, self.oc = version("outlines-core"), outlines_core
        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        vocab: dict[bytes, list[int]] = {}
        for text, i in gen.tokenizer.get_vocab().items():
            if i not in gen.model.eos_ids and all(c in to_byte for c in text):
                vocab.setdefault(bytes(to_byte[c] for c in text), []).append(i)
        self.vocab = outlines_core.Vocabulary(min(gen.model.eos_ids), vocab)
        self.mask = torch.zeros((gen.runtime.info.vocab_size + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def step(self, m, token: int) -> bool:
        m.write_mask_into(self.mask.data_ptr(), self.mask.numel(), self.mask.element_size())
        if not m.accepts_tokens([token]):
            return False
        m.advance(token)
        return True


def engine_rows(gen, answers: list[list[int]]) -> list[dict]:
    rows = []
    for cls in (LLGuidance, XGrammar, OutlinesCore):
        started = time.perf_counter()
        engine = cls(gen)
        setup = time.perf_counter() - started
        compile_s, per_token, accepted = [], [], 0
        for case, tokens in zip(CASES, answers, strict=True):
            started = time.perf_counter()
            matcher = engine.compile(case["schema"])
            compile_s.append(time.perf_counter() - started)
            ok = True
            for token in tokens:
                started = time.perf_counter()
                ok = engine.step(matcher, token) and ok
                per_token.append(time.perf_counter() - started)
            accepted += ok
        rows.append(
            {
                "engine": f"{cls.name} {engine.version}",
                "setup_s": setup,
                "compile_ms": 1e3 * statistics.median(compile_s),
                "compile_max_ms": 1e3 * max(compile_s),
                "median_us": 1e6 * statistics.median(per_token),
                "mean_us": 1e6 * statistics.mean(per_token),
                "p99_us": 1e6 * percentile(per_token, 0.99),
                "accepted": accepted,
                "rollback": cls.rollback,
                "bounded": cls.bounded,
            }
        )
    return rows


def argen_rows(gen) -> tuple[list[dict], list[list[int]]]:
    rows, answers = [], []
    for strategy in ("plain", "prompt-lookup", "ngram"):
        tokens = masks = 0
        seconds = mask_seconds = free_seconds = passes = 0.0
        for case in CASES:
            out = gen.generate(
                case["prompt"], strategy=strategy, max_new_tokens=MAX_TOKENS, response_format=fmt(case["schema"])
            )
            if strategy == "plain":  # the engines follow the answer, its end-of-sequence token aside
                answers.append([t for t in out.token_ids if t not in gen.model.eos_ids])
                free = gen.generate(case["prompt"], max_new_tokens=len(out.token_ids), ignore_eos=True)
                free_seconds += free.stats.wall_seconds - free.stats.prefill_seconds
            s = out.stats
            tokens, seconds = tokens + s.new_tokens, seconds + s.wall_seconds - s.prefill_seconds
            masks, mask_seconds, passes = (
                masks + s.grammar_masks,
                mask_seconds + s.grammar_mask_seconds,
                passes + s.forward_passes - s.prefill_passes,
            )
        rows.append(
            {
                "strategy": strategy,
                "tokens": tokens,
                "ms_per_token": 1e3 * seconds / tokens,
                "free_ms_per_token": 1e3 * free_seconds / tokens if strategy == "plain" else None,
                "mask_us": 1e6 * mask_seconds / masks,
                "masks_per_token": masks / tokens,
                "mask_share": mask_seconds / seconds,
                "tokens_per_pass": tokens / passes,
            }
        )
    return rows, answers


def main() -> None:
    args, state = script_args(__doc__, threads=2)
    gen = argen.load("default")
    gen.generate(
        CASES[0]["prompt"], max_new_tokens=8, response_format=fmt(CASES[0]["schema"])
    )  # warm: kernels, tokenizer
    ours, answers = argen_rows(gen)
    engines = engine_rows(gen, answers)
    machine = provenance(state)
    print(f"# Structured output: grammar engines and argen's cost per token (default model, {args.threads} threads)\n")
    print(f"```\npython benchmarks/structured/run.py --threads {args.threads} > benchmarks/structured/report.md\n```\n")
    print(describe(machine) + "\n")
    print(
        f"torch {machine['torch']}, transformers {machine['transformers']}, python {machine['python']}; "
        f"CPU: {machine['cpu_model']}; argen kernels: {kernels.pick_isa()}; vocabulary {gen.runtime.info.vocab_size} tokens; "
        f"{len(CASES)} JSON schemas (tests/data/schemas.json), {sum(map(len, answers))} answer tokens.\n"
    )
    print("## Grammar engines: the next-token mask and consuming the token, per token\n")
    print(
        "| engine | tokenizer setup s | compile ms (median / max) | µs per token (median / mean / p99) | answers accepted | rollback | work bounded per token |"
    )
    print("| --- | --: | --: | --: | --: | --- | --- |")
    for r in engines:
        print(
            f"| {r['engine']} | {r['setup_s']:.2f} | {r['compile_ms']:.1f} / {r['compile_max_ms']:.1f} | "
            f"{r['median_us']:.0f} / {r['mean_us']:.0f} / {r['p99_us']:.0f} | {r['accepted']}/{len(CASES)} | "
            f"{r['rollback']} | {r['bounded']} |"
        )
    print("\n## argen under a JSON schema, batch 1, greedy (decode only, prefill excluded)\n")
    print(
        "| strategy | answer tokens | ms per token | same tokens unconstrained, ms per token | grammar mask µs | masks per token | mask share of decode | tokens per pass |"
    )
    print("| --- | --: | --: | --: | --: | --: | --: | --: |")
    for r in ours:
        free = f"{r['free_ms_per_token']:.2f}" if r["free_ms_per_token"] is not None else "—"
        print(
            f"| {r['strategy']} | {r['tokens']} | {r['ms_per_token']:.2f} | {free} | {r['mask_us']:.0f} | "
            f"{r['masks_per_token']:.2f} | {100 * r['mask_share']:.1f}% | {r['tokens_per_pass']:.2f} |"
        )


if __name__ == "__main__":
    main()
